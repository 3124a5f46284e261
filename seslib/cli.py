"""The command line of `python sesrun.py`: quick, batch, plan, kaggle, summary."""
from __future__ import annotations

import argparse
import datetime
import re
import sys
import time
from pathlib import Path

import torch

from .util import parse_duration
from .data import DATASETS, resolve_data_dir
from .estimates import GPU_SPEED
from .reports import build_summary, verdict_counts
from .notebook import PRESETS, resolve_seeds
from .command import run_command
from .batch import CPU_HOURS_WITHOUT_ASKING, find_notebooks, preset_folder, read_notebook, read_params, run_batch
from .calibration import calibration_lines, read_calibration
from .planning import QUOTA_COUNTS, cost_plan, format_plan
from .budget import budget_plan, budget_params, catalogue, format_budget, format_power, power_table, write_params
from .kaggle import kaggle_package


# python sesrun.py COMMAND ...
# Argument types: a bad value is one line naming the flag (argparse's "argument --gpus:") and what it takes, before
# any notebook is read.

def _count(least=1):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}; got {v!r}")
        return n
    return parse


def _seconds(allow_zero=False):
    def parse(v):
        try:
            x = float(v)
        except ValueError:
            x = None
        if x is None or x < 0 or (x == 0 and not allow_zero) or x != x:
            raise argparse.ArgumentTypeError(f"must be a number of seconds {'>=' if allow_zero else '>'} 0; got {v!r}")
        return x
    return parse


def _duration(allow_zero):
    """11.5h / 90m / 3600: a positive duration (0 / none: no limit, where allow_zero); '-5h' is refused by name."""
    def parse(v):
        if allow_zero and str(v).strip().lower() in ("0", "none"):
            return None
        try:
            seconds = parse_duration(v)
        except ValueError:
            seconds = None
        if not seconds:
            raise argparse.ArgumentTypeError("must be a positive duration such as 11.5h, 90m or 3600"
                                             + (" (0: no limit)" if allow_zero else "") + f"; got {v!r}")
        return v
    return parse


_VALUE_FLAGS = ("--time-budget", "--budget", "--timeout", "--stagger", "--gpus", "--workers", "--retries")


def _attach_negative_values(argv):
    """argparse reads a value such as '-5h' after --time-budget as an option and says only 'expected one argument':
    attach it (--time-budget=-5h) so that its check names the flag and the fix."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _VALUE_FLAGS and i + 1 < len(argv) and re.match(r"-\d", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


MAX_SEEDS_DEFAULT = 10  # plan --budget's --max-seeds


def _plan_args(p):
    p.add_argument("notebooks", nargs="*", default=["all"], help="numbers, stems or paths (default: all)")
    p.add_argument("--gpus", type=_count(), default=2, help="GPUs working in parallel (default 2: Kaggle's "
                   "T4 x2)")
    p.add_argument("--gpu", default="t4", choices=[k for k in GPU_SPEED], help="the GPU kind (default t4)")
    p.add_argument("--out", default="outputs", help="outputs root: runs done there count as done (default outputs)")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="the preset planned (default paper)")
    p.add_argument("--time-budget", default="11.5h", type=_duration(allow_zero=False),
                   help="per Kaggle version (default 11.5h)")
    p.add_argument("--seeds", help="every notebook's seeds: 'paper3' (the paper's 42, 123, 7) or e.g. '42,123' "
                                   "(default: each notebook's own)")
    p.add_argument("--quota-counts", default="once", choices=list(QUOTA_COUNTS), help="what a session-hour on "
                   "--gpus GPUs costs of the weekly quota: once (assumed, default) or per-gpu")
    p.add_argument("--budget", type=_duration(allow_zero=False), help="e.g. 30h of the weekly quota: choose the runs "
                   "that settle the most claims "
                   "per GPU-hour within it (each identical run once) instead of planning every notebook's grid")
    p.add_argument("--max-seeds", type=_count(2), default=MAX_SEEDS_DEFAULT, help="with --budget: the most seeds a claim may get "
                   "(10)")
    p.add_argument("--write-params", help="with --budget: write the chosen runs as a params file for "
                   "`batch --params` and `kaggle --params`")
    p.add_argument("--calibration", help="a gpu_check.json (`python bench/gpu_check.py` on a GPU): its measured step "
                   "times, SES overhead, DDP efficiency and usable memory replace the assumed ones")


def _budget_cmd(a):
    budget_h = parse_duration(a.budget) / 3600
    cal = read_calibration(a.calibration) if a.calibration else None
    costs, needs = catalogue(a.notebooks or ["all"], a.gpu, a.gpus, a.out, a.preset, cal)
    charge = QUOTA_COUNTS[a.quota_counts] or float(a.gpus)
    plan = budget_plan(costs, needs, budget_h, a.gpus, charge, a.max_seeds)
    print("\n".join(calibration_lines(cal, a.gpu)))
    print(format_budget(plan, budget_h, a.gpus, a.gpu, charge))
    if not plan.chosen:  # nothing to run: no params file (an empty one would run every notebook's whole grid)
        print(f"--budget {a.budget} buys no claim (each claim left is listed above, with why); nothing written",
              file=sys.stderr)
        return 1
    if a.write_params:
        _write_to(a.write_params, "--write-params", lambda path: write_params(path, budget_params(plan)))
        stems = " ".join(budget_params(plan))
        print(f"params file: {a.write_params}: python sesrun.py batch {stems} --params {a.write_params} (or kaggle "
              f"--notebooks {stems} --params {a.write_params})")
    return 0


def _power_args(p):
    p.add_argument("notebooks", nargs="*", default=["all"], help="numbers, stems or paths (default: all)")
    p.add_argument("--seeds", default="paper3", help="seeds per config: a number, or 'paper3' (3, the default)")
    p.add_argument("--gpu", default="t4", choices=[k for k in GPU_SPEED], help="the GPU the cost is in (default t4)")
    p.add_argument("--gpus", type=_count(), default=2, help="GPUs a DDP run may hold (default 2)")
    p.add_argument("--out", default="outputs", help="outputs root: runs there give measured seed SDs")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="the preset (default paper)")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--calibration", help="a gpu_check.json: the GPU-hours from its measured step times")


def _power_cmd(a):
    seeds = 3 if a.seeds == "paper3" else int(a.seeds) if str(a.seeds).isdigit() else None
    if not seeds or not 1 <= seeds <= 100:
        raise ValueError(f"--seeds must be a number of seeds (1-100) or 'paper3'; got {a.seeds!r}")
    _check_target(a.csv, "--csv")
    cal = read_calibration(a.calibration) if a.calibration else None
    costs, needs = catalogue(a.notebooks or ["all"], a.gpu, a.gpus, a.out, a.preset, cal)
    df = power_table(costs, needs, seeds)
    print("\n".join(calibration_lines(cal, a.gpu)))
    print(format_power(df, seeds, a.gpu))
    if a.csv:
        from .util import atomic_write_bytes
        _write_to(a.csv, "--csv", lambda path: atomic_write_bytes(path, df.to_csv(index=False).encode()))
    return 0


def _check_target(path, flag):
    """A file to write must not be a folder: said before any work."""
    if path and Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name")


def _write_to(path, flag, write):
    """write(Path(path)); a folder, or a place that cannot be written, is one line naming the flag (not a temp file)."""
    _check_target(path, flag)
    try:
        write(Path(path))
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it there ({e.strerror or e})") from None


def _plan_cmd(a):
    if a.budget and a.seeds:
        raise ValueError("--seeds with --budget: the budget chooses each claim's seeds (up to --max-seeds); drop "
                         "--seeds, or drop --budget to cost those seeds everywhere")
    if not a.budget and (a.write_params or a.max_seeds != MAX_SEEDS_DEFAULT):
        raise ValueError(f"{'--write-params' if a.write_params else '--max-seeds'} needs --budget (e.g. --budget 30h): "
                         "without it the plan costs every notebook's grid and chooses nothing")
    _check_target(a.write_params, "--write-params")
    if a.budget:
        return _budget_cmd(a)
    seeds = resolve_seeds(a.seeds) if a.seeds else None  # a bad value: one line, before any notebook is read
    cal = read_calibration(a.calibration) if a.calibration else None
    df, t = cost_plan(a.notebooks or ["all"], a.gpus, a.gpu, a.out, a.preset, a.time_budget, seeds, a.quota_counts,
                      cal)
    print(format_plan(df, t))
    return 0


def _batch_args(p):
    p.add_argument("notebooks", nargs="+", help="notebook paths, numbers (3 -> notebooks/03_*.ipynb), stems or 'all'")
    p.add_argument("--params", help="YAML of overrides: {all: {...}, 3: {...}, 03_name: {...}}")
    p.add_argument("--gpus", default="auto", help="'auto' (all visible CUDA devices), '0,1', or 'cpu'")
    p.add_argument("--workers", type=_count(), help="CPU slots when there is no GPU (default 1); with GPUs: "
                   "slots per GPU")
    p.add_argument("--out", default="outputs", help="outputs root; notebook NN_name writes to OUT/NN_name")
    p.add_argument("--calibration", help="a gpu_check.json (bench/gpu_check.py) whose measured step times and usable "
                   "memory time and place the runs (default: OUT/gpu_check.json when there is one)")
    p.add_argument("--retries", type=_count(0), default=1, help="retries of a run whose kernel failed to start "
                   "(default 1)")
    p.add_argument("--timeout", type=_seconds(), help="seconds after which a run is killed and counted failed")
    p.add_argument("--stagger", type=_seconds(allow_zero=True), default=1.0, help="seconds between process launches "
                   "(kernel-start races)")
    p.add_argument("--no-report", action="store_true", help="skip the report_only pass")
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and stop")
    p.add_argument("--torchrun", action="store_true", help="one run at a time over ALL the GPUs (DDP via torchrun) "
                   "instead of one run per GPU; with --gpus cpu: --workers CPU ranks (default 2)")
    p.add_argument("--preset", choices=list(PRESETS), help="every notebook's preset (default: the params file's, else "
                   "paper); a non-paper preset writes under OUT/<preset>/")
    p.add_argument("--whole-notebooks", action="store_true", help="one job per notebook (its whole grid, then its "
                   "report, in one kernel) instead of one per run: faster for many short runs (the quick job uses it)")
    p.add_argument("--time-budget", type=_duration(allow_zero=True), help="e.g. 11.5h: start no run that cannot "
                   "finish in time, pause the runs in "
                   "flight at an epoch boundary (checkpoint kept); run the batch again to go on (default: none)")
    p.add_argument("--allow-cpu", action="store_true", help="start runs on CPU slots even when their estimates add "
                   f"up to more than {CPU_HOURS_WITHOUT_ASKING:g} h (refused without it: a paper batch on a CPU takes days)")


def _batch_cmd(a):
    recs = run_batch(a.notebooks, a.params, gpus=a.gpus, workers=a.workers, out=a.out, retries=a.retries,
                     stagger=a.stagger, timeout=a.timeout, report=not a.no_report, dry_run=a.dry_run,
                     torchrun=a.torchrun, preset=a.preset, whole_notebooks=a.whole_notebooks,
                     time_budget=a.time_budget, allow_cpu=a.allow_cpu, calibration=a.calibration)
    return 1 if any(r["status"] == "failed" for r in recs) else 0


def _kaggle_args(p):
    p.add_argument("--out", required=True, help="folder to write (kernel) and OUT/code-dataset (seslib dataset)")
    p.add_argument("--notebooks", nargs="+", default=["all"], help="notebooks the kernel runs (default all)")
    p.add_argument("--username", required=True, help="your Kaggle user name")
    p.add_argument("--slug", default="ses-batch-t4x2", help="kernel slug (5-50 chars, lowercase, hyphens)")
    p.add_argument("--data-dataset", help="owner/slug of the data dataset (default USERNAME/ses-data)")
    p.add_argument("--code-dataset", help="owner/slug of the seslib code dataset (default USERNAME/seslib-code)")
    p.add_argument("--preset", default="paper", choices=["paper", "smoke"])
    p.add_argument("--time-budget", default="11.5h", type=_duration(allow_zero=False),
                   help="per version (default 11.5h of Kaggle's 12)")
    p.add_argument("--continue-from", help="USER/KERNEL whose output the kernel copies in first, or 'self' (this "
                   "kernel's previous version: use it from the second push on)")
    p.add_argument("--params", help="a params file of per-notebook configs and seeds (`plan --budget ... "
                   "--write-params FILE`): the kernel runs those")


def _kaggle_cmd(a):
    notebooks = a.notebooks
    if a.params and notebooks == ["all"]:  # a budget plan names its notebooks: run those, not every grid
        notebooks = [k for k in read_params(a.params) if k not in ("all", "time_budget")] or ["all"]
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file: give a folder for the kernel bundle")
    try:
        out = kaggle_package(a.out, notebooks, a.username, a.slug, a.data_dataset, a.code_dataset, a.preset,
                             a.continue_from, a.time_budget, a.params)
    except OSError as e:
        raise ValueError(f"--out {a.out}: cannot write the bundle there ({e.strerror or e})") from None
    print(f"wrote {out}\n  1. kaggle datasets create -p {out / 'code-dataset'} --dir-mode zip   (later: kaggle datasets "
          "version -p ... --dir-mode zip -m msg)\n"
          f"  2. kaggle kernels push -p {out}\n  3. kaggle kernels output {a.username}/{a.slug} -p results/"
          + ("" if a.continue_from else "\n  next versions: rewrite with --continue-from self, then push again"))
    return 0


def _notebook_datasets(nb) -> set:
    """The data sets a notebook's code names (dataset="...", {"dataset": ...}, dataset = ...)."""
    return set(read_notebook(nb).strings("dataset")) & set(DATASETS)


def _quick_args(p):
    p.add_argument("notebooks", nargs="*", default=["all"], help="numbers, stems or paths (default: all)")
    p.add_argument("--gpus", default="auto", help="'auto' (all visible CUDA devices), '0,1', or 'cpu'")
    p.add_argument("--workers", type=_count(), help="CPU slots when there is no GPU (default 2)")
    p.add_argument("--data-root", help="folder holding the data sets (default: $SES_DATA, Kaggle inputs, ./data)")
    p.add_argument("--out", default="outputs", help="outputs root (default outputs): the smoke results land in OUT/smoke/")
    p.add_argument("--allow-missing-data", action="store_true", help="exit 0 when notebooks were skipped for missing "
                   "data and the rest ran (default: exit 3, so that a script or a CI never reads 'most notebooks "
                   "skipped' as success)")
    p.add_argument("--require-data", action="store_true", help=argparse.SUPPRESS)  # exit 3: now the default, accepted


QUICK_SKIPPED = 3  # the quick job's exit status when a notebook was skipped for missing data (unless allowed)


def _quick_cmd(a):
    """The suite's smoke preset over every notebook whose data can be found or downloaded (see the README for what
    it proves): each notebook whole, in one kernel, through the batch runner; then the reports and SUMMARY.md."""
    if a.require_data and a.allow_missing_data:
        raise ValueError("--require-data and --allow-missing-data contradict each other: give one")
    t0 = time.time()
    status, runnable, skipped = {}, [], {}
    for nb in find_notebooks(a.notebooks or ["all"]):
        missing = []
        for ds in sorted(_notebook_datasets(nb)):
            if ds not in status:
                try:
                    status[ds] = str(resolve_data_dir(ds, a.data_root, download=True))
                except FileNotFoundError as e:
                    status[ds] = e
            if isinstance(status[ds], FileNotFoundError):
                missing.append(ds)
        if missing:
            skipped[nb.stem] = missing
        else:
            runnable.append(nb)
    for ds, where in status.items():
        print(f"[data] {ds}: {where if not isinstance(where, Exception) else 'not found'}")
    if skipped:  # one line per notebook, then once per missing data set how to provide it (each has its own way)
        for stem, missing in skipped.items():
            print(f"[skip] {stem}: needs {', '.join(missing)}")
        for ds, why in status.items():
            if isinstance(why, Exception):
                print(f"how to provide {ds}: {why}")
    recs = []
    if runnable:
        params = {"all": {"preset": "smoke", **({"data_root": a.data_root} if a.data_root else {})}}
        workers = a.workers or (None if torch.cuda.is_available() and a.gpus != "cpu" else 2)
        recs = run_batch(runnable, params=params, gpus=a.gpus, workers=workers, out=a.out, whole_notebooks=True)
    out = preset_folder(Path(a.out).resolve(), "smoke")
    failed = [r for r in recs if r["status"] == "failed"]
    covered = "every notebook ran" if not skipped else (
        f"ONLY {len(runnable)} of {len(runnable) + len(skipped)} notebooks: {len(skipped)} SKIPPED for missing data "
        f"({', '.join(sorted({d for m in skipped.values() for d in m}))})")
    print(f"\nquick job: {covered}; {len(runnable) - len(failed)} ran, {len(failed)} failed, in "
          f"{datetime.timedelta(seconds=int(time.time() - t0))}")
    if runnable:
        print(f"reports: {out}/NN_name/report.md; figures: {out}/NN_name/figures/*.png; claims: {out}/SUMMARY.md; "
              f"run table: {out}/batch_summary.csv")
    if not runnable:  # nothing ran: not a success, whatever the reason
        print("nothing ran: no data set was found or could be downloaded (see above)")
        return 1
    if failed:
        return 1
    if skipped and not a.allow_missing_data:
        print(f"exit {QUICK_SKIPPED}: {len(skipped)} notebook(s) skipped for missing data (--allow-missing-data exits 0 "
              "when that is expected)")
        return QUICK_SKIPPED
    return 0


def _summary_args(p):
    p.add_argument("--out", default="outputs", help="outputs root holding the notebook folders (default outputs; "
                   "outputs/smoke for the smoke preset)")


def _summary_cmd(a):
    out = Path(a.out)
    if out.is_file():
        raise ValueError(f"summary --out {a.out} is a file: give the outputs root of a notebook or a batch (a folder; "
                         "the smoke preset's is outputs/smoke)")
    if not out.is_dir():
        raise ValueError(f"summary --out {a.out}: no such folder (the outputs root of a notebook or a batch; the smoke "
                         "preset's is outputs/smoke)")
    df = build_summary(out)
    if df is None:
        elsewhere = sorted({p.parent.parent for p in out.glob("*/*/claims.csv")})
        hint = (f": they are under {', '.join(map(str, elsewhere))} (python sesrun.py summary --out "
                f"{elsewhere[0]})" if elsewhere else " (run a notebook or a batch first)")
        print(f"no notebook reports with claims directly under {a.out}/ yet{hint}")
        return 1
    n_nb = df.loc[df["notebook"] != "across notebooks", "notebook"].nunique()
    print(f"{Path(a.out) / 'SUMMARY.md'}: {len(df)} claims, from {n_nb} notebook(s) and across notebooks; paper's "
          f"definitions: {verdict_counts(df, 'verdict')}; headline: {verdict_counts(df, 'verdict (headline)')}")
    return 0


# name -> (help, add_arguments(parser), run(args) -> exit status). Add a command by adding an entry.
CLI_COMMANDS = {
    "batch": ("run notebooks' runs over this machine's GPUs (or CPU slots), then their reports", _batch_args, _batch_cmd),
    "kaggle": ("write a ready-to-push Kaggle kernel + seslib code dataset", _kaggle_args, _kaggle_cmd),
    "quick": ("the quick job: every notebook's smoke preset through the batch runner, on the data found or "
              "downloaded", _quick_args, _quick_cmd),
    "summary": ("outputs/SUMMARY.md and .csv: every claim's verdict over the notebooks that have reports",
                _summary_args, _summary_cmd),
    "plan": ("the cost plan: runs, GPU-hours, wall time on N GPUs, Kaggle versions and quota weeks, disk; with "
             "--budget, the runs that settle the most claims within it", _plan_args, _plan_cmd),
    "power": ("the power of every claim before any run: how often it would read 'reproduced' if the paper is "
              "right, at N seeds; the seeds it needs for 80 %, and their GPU-hours", _power_args, _power_cmd),
}


def main(argv=None):
    """`python sesrun.py COMMAND ...`; exits non-zero when the command fails."""
    parser = argparse.ArgumentParser(prog="sesrun.py", description="SES experiment suite: batch runner and CLI")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in CLI_COMMANDS.items():
        add_args(sub.add_parser(name, help=help_.replace("%", "%%"), description=help_))  # argparse %-formats help
    args = parser.parse_args(_attach_negative_values(list(sys.argv[1:] if argv is None else argv)))
    return run_command(parser, CLI_COMMANDS[args.command][2], args,
                       interrupted="interrupted: the running jobs were stopped; run the same command again to resume")
