"""sesrun: the SES suite's command line (the parent process; notebooks never import it).

    python sesrun.py quick                      the smoke preset over every notebook (the first command to run)
    python sesrun.py batch 5 6 --gpus auto      notebooks' runs over this machine's GPUs, then their reports
    python sesrun.py plan all --gpus 2          the cost plan: runs, GPU-hours, wall time, Kaggle versions, disk
    python sesrun.py kaggle --out pkg ...       a ready-to-push Kaggle kernel + the code dataset
    python sesrun.py summary --out outputs      outputs/SUMMARY.md: every claim's verdict

The code lives in the seslib package's runner rooms (seslib.calibration, seslib.batch, seslib.planning, seslib.kaggle, seslib.cli); this
file is their entry and their namespace (`import sesrun as R` in the Kaggle driver notebook). The runner talks to the
notebook kernels it starts only through seslib's run contract (the notebook parameters in seslib.RUNNER_PARAMS, the
environment variables and the SES-RUN-* log markers, in seslib.util), checked here once against CONTRACT_VERSION.
"""
import sys

try:
    import seslib
except ImportError as _e:  # a broken install (a torch/torchvision pair that does not load, a missing package)
    if __name__ != "__main__":
        raise
    _fix = " (pip install -r requirements.txt)" if isinstance(_e, ModuleNotFoundError) else ""
    print(f"error: {_e}{_fix}", file=sys.stderr)  # one line, not a traceback: the message says the fix
    raise SystemExit(2)

# The run contract this entry speaks: a seslib from another version of the suite would set other parameters or print
# other markers, so it is refused here, in one line, before anything runs.
CONTRACT_VERSION = 2
if getattr(seslib, "CONTRACT_VERSION", None) != CONTRACT_VERSION:
    _msg = (f"error: {seslib.__file__} speaks run contract {getattr(seslib, 'CONTRACT_VERSION', 'none (older)')}, this "
            f"sesrun.py speaks {CONTRACT_VERSION}: use the seslib package and sesrun.py from the same version of the "
            "suite")
    if __name__ == "__main__":
        print(_msg, file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_msg)

from seslib.calibration import *  # noqa: E402,F401,F403
from seslib.batch import *  # noqa: E402,F401,F403
from seslib.planning import *  # noqa: E402,F401,F403
from seslib.budget import *  # noqa: E402,F401,F403
from seslib.kaggle import *  # noqa: E402,F401,F403
from seslib.cli import *  # noqa: E402,F401,F403
from seslib import calibration, batch, planning, budget, kaggle, cli  # noqa: E402,F401  (their private names: R.batch._Job)

if __name__ == "__main__":
    main()
