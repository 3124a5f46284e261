"""The train command: `python -m seslib train --config run.json`, one run (one process or one torchrun rank)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .util import RunLocked
from .training import MemoryGuardError, NonFiniteLossError, train


def _train_args(p):
    p.add_argument("--config", required=True, help="JSON file holding one run's train() cfg (as run_config builds it)")


def _train_cmd(a):
    """One run; under `torchrun ... -m seslib train --config run.json` one DDP run over all the ranks."""
    try:
        cfg = json.loads(Path(a.config).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {a.config}: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {a.config}: must hold one JSON object (a run's config); got a {type(cfg).__name__}")
    res = train(cfg)
    if res is not None:  # rank 0 (or the only process)
        f = res["final"]
        print(f"[done] test_acc {f['test_acc']:.2f}% (final epoch), gap {f['gap']:.2f}, "
              f"{f['epochs_run']} epochs" + (f" -> {cfg['out_dir']}" if cfg.get("out_dir") else ""), flush=True)
    return 0


# what a user's input or machine can cause (bad values, missing files, no GPU, a run locked elsewhere): main() turns
# these into one line; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, RunLocked, NonFiniteLossError, MemoryGuardError)

# The commands of the batch runner's own entry (the parent process only): `python -m seslib quick` names the command
# that runs it and exits 2, so an old habit or script gets one line, not an argparse error.
MOVED_COMMANDS = ("quick", "batch", "plan", "kaggle", "summary")


def run_command(parser, command, args, interrupted):
    """Run one command of a command line (this one's, sesrun.py's): a user's error becomes one line and exit 2 (what
    was wrong and how to fix it, not a traceback), Ctrl-C exit 130 with `interrupted`, a failure its exit status."""
    try:
        code = command(args)
    except BrokenPipeError:  # `sesrun.py plan | head`: the reader stopped reading, not an error of this command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 0
    except USER_ERRORS as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        code = 130
    if code:
        raise SystemExit(code)
    return 0


def main(argv=None):
    """`python -m seslib train --config run.json` (torchrun launches exactly this); exits non-zero on failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED_COMMANDS:
        print(f"error: `python -m seslib {argv[0]}` is the runner's: run `python sesrun.py {' '.join(argv)}` instead",
              file=sys.stderr)
        raise SystemExit(2)
    parser = argparse.ArgumentParser(prog="python -m seslib", description="SES experiment suite: one training run "
                                     "(the batch runner and the other commands: python sesrun.py --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="train one run from a JSON cfg (under torchrun: one DDP run over all "
                                             "ranks)"))
    return run_command(parser, _train_cmd, parser.parse_args(argv),
                       interrupted="interrupted: run the same command again to resume from the last checkpoint")
