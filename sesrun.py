"""sesrun: the SES suite's batch runner and command line (the parent process; notebooks never import it).

    python sesrun.py quick                      the smoke preset over every notebook (the first command to run)
    python sesrun.py batch 5 6 --gpus auto      notebooks' runs over this machine's GPUs, then their reports
    python sesrun.py plan all --gpus 2          the cost plan: runs, GPU-hours, wall time, Kaggle versions, disk
    python sesrun.py kaggle --out pkg ...       a ready-to-push Kaggle kernel + the code dataset
    python sesrun.py summary --out outputs      outputs/SUMMARY.md: every claim's verdict

It imports seslib (the notebooks' helper) and talks to the notebook kernels it starts only through seslib's run
contract: the notebook parameters in seslib.RUNNER_PARAMS, the environment variables and the SES-RUN-* log markers
(seslib section "utilities"), checked once at start against seslib.CONTRACT_VERSION.

Sections (each uses only seslib, itself and those above it):
  first cell of every notebook: the setup cell that makes seslib importable (repo, Kaggle, Colab)
  batch runner: notebooks, params files, slots, the scheduler of papermill subprocesses, run_batch
  the cost plan: runs, GPU-hours, wall time on N GPUs, Kaggle versions and quota weeks, disk
  Kaggle packaging: the kernel, its driver notebook, the code dataset, continuation across versions
  command line: python sesrun.py COMMAND
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import difflib
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import seslib

# The run contract this runner speaks (seslib section "utilities"): a seslib.py from another version of the suite
# would set other parameters or print other markers, so it is refused here, in one line, before anything runs.
CONTRACT_VERSION = 2
if getattr(seslib, "CONTRACT_VERSION", None) != CONTRACT_VERSION:
    _msg = (f"error: {seslib.__file__} speaks run contract {getattr(seslib, 'CONTRACT_VERSION', 'none (older)')}, this "
            f"sesrun.py speaks {CONTRACT_VERSION}: use seslib.py and sesrun.py from the same version of the suite")
    if __name__ == "__main__":
        print(_msg, file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(_msg)

from seslib import (BUDGET_ENV, DATASETS, DATA_ENV, DEADLINE_ENV, GPU_SPEED, JOB_FILES_ENV, MARK_BUDGET, MARK_ERROR,
                    DDP_EFFICIENCY, MARK_LOCKED, MARK_PAUSED, PRESETS, RUNNER_PARAMS, RunLocked, SLOT_ENV, TORCHRUN_ENV,
                    gpu_kind, placeable, placement,
                    _hours, _read_result, _result_ok, _speed, atomic_write_bytes, atomic_write_json, build_model,
                    build_summary, dataset_info, estimate_eval_seconds, fits_budget, is_locked, parse_duration,
                    read_only, report, resolve_data_dir, resolve_seeds, result_status, run_command, run_cost,
                    run_estimate, run_lock, seconds_left, validate_params)


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# first cell of every notebook
# ═══════════════════════════════════════════════════════════════════════════════════════════════
# (Colab / Kaggle / repo)

# Finds seslib.py in cwd, .. or an attached Kaggle dataset (bounded depth: a recursive glob would
# walk the image data sets too); on Colab, if still not importable, fetches it + requirements from
# $SESLIB_URL (the raw URL of seslib.py in your copy of the repository).
# Defines only underscore names and modules, so check_notebook_params ignores it.
SETUP_CELL = """\
# Setup: make seslib importable (repo checkout, Kaggle dataset, or Colab download).
import sys, os, glob, importlib.util
_dirs = [os.getcwd(), os.path.dirname(os.getcwd())] + sorted(
    os.path.dirname(p) for k in (1, 2, 3) for p in glob.glob("/kaggle/input" + "/*" * k + "/seslib.py"))
_dirs = [d for d in _dirs if os.path.isfile(os.path.join(d, "seslib.py"))]
if _dirs and _dirs[0] not in sys.path:
    sys.path.insert(0, _dirs[0])
if "google.colab" in sys.modules and importlib.util.find_spec("seslib") is None:
    import subprocess, urllib.request
    _url = os.environ.get("SESLIB_URL", "")  # raw URL of seslib.py in your copy of the repository
    if not _url:
        raise RuntimeError("seslib.py is not importable: upload seslib.py and requirements.txt to this session, "
                           "or set os.environ['SESLIB_URL'] to the raw URL of seslib.py, then run this cell again")
    for _f in ("seslib.py", "requirements.txt"):
        urllib.request.urlretrieve(_url.rsplit("/", 1)[0] + "/" + _f, _f)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements.txt"], check=True)
    sys.path.insert(0, os.getcwd())
if importlib.util.find_spec("seslib") is None:  # a plain Jupyter kernel started somewhere else
    raise RuntimeError("seslib.py is not importable: looked in " + os.getcwd() + ", its parent and /kaggle/input. "
                       "Open this notebook from the repository's notebooks/ folder (or its root), or add the "
                       "repository to the path first: import sys; sys.path.insert(0, '/path/to/the/repository')")
"""


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# batch runner
# ═══════════════════════════════════════════════════════════════════════════════════════════════

def _here():
    """Folder holding seslib.py (the runner's children import it from there)."""
    return Path(__file__).resolve().parent


def _nb_number(path):
    m = re.match(r"(\d+)_", Path(path).name)
    return int(m.group(1)) if m else None


def find_notebooks(specs, dirs=None):
    """Resolve notebook specs: paths, numbers (3 -> 03_*.ipynb), stems, or "all".

    Looked up in ./notebooks, then notebooks/ beside seslib.py, then beside seslib.py (Kaggle dataset)."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in (dirs or [Path.cwd() / "notebooks", _here() / "notebooks", _here()])))
    out = []
    for spec in [specs] if isinstance(specs, (str, int, Path)) else specs:
        s = str(spec)
        if Path(s).is_file():
            out.append(Path(s).resolve())
            continue
        if s == "all":
            # every experiment (01-18, 22, 28); 00_explore is interactive, not part of a batch
            found = next((sorted(p for p in d.glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00_"))
                          for d in dirs if list(d.glob("[0-9][0-9]_*.ipynb"))), [])
        elif s.isdigit():
            found = next((m for d in dirs if (m := sorted(d.glob(f"{int(s):02d}_*.ipynb")))), [])
        else:
            stem = s[:-6] if s.endswith(".ipynb") else s
            found = next(([d / f"{stem}.ipynb"] for d in dirs if (d / f"{stem}.ipynb").is_file()), [])
        if not found or (s != "all" and len(found) > 1):
            raise ValueError(f"notebook {s!r}: {'ambiguous ' + str(found) if found else 'not found'} "
                             f"(looked in {', '.join(map(str, dirs))})")
        out += [p.resolve() for p in found]
    out = list(dict.fromkeys(out))
    stems = [p.stem for p in out]
    if len(set(stems)) != len(stems):
        raise ValueError(f"two notebooks share a name (their outputs would collide): {stems}")
    return out


# ── a notebook's source, read with ast (never run here; only the cost plan's notebook_plan executes cells) ──

@dataclasses.dataclass(frozen=True)
class NotebookSource:
    """A notebook's code cells, each parsed once with ast: the one way this file reads a notebook's source.
    cells: (source, tags) of every code cell, in order; trees: each cell's ast.Module, or the SyntaxError of a cell
    that is not plain Python (IPython magics), which the scans below skip."""
    path: Path
    cells: tuple
    trees: tuple

    def declared_params(self) -> set:
        """Names assigned at top level of the `parameters` cell, _private ones aside. Read with ast: papermill's own
        line parser skips lines whose comment holds quotes or '=' (papermill.inspect_notebook)."""
        k = next((k for k, (_, tags) in enumerate(self.cells) if "parameters" in tags), None)
        if k is None:
            raise ValueError(f"{self.path.name}: no cell tagged 'parameters'")
        if isinstance(self.trees[k], SyntaxError):
            raise ValueError(f"{self.path.name}: the parameters cell is not plain Python ({self.trees[k]})")
        names = set()
        for node in self.trees[k].body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        return {n for n in names if not n.startswith("_")}

    def grid_configs(self) -> list | None:
        """The config names of the notebook's GRID (its first top-level `GRID = ...`) however it is laid out or
        spelled ({...}, dict(...)); None when there is none, or its keys are computed."""
        for tree in self.trees:
            for node in getattr(tree, "body", ()):
                if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GRID" for t in node.targets):
                    return _dict_keys(node.value)
        return None

    def strings(self, name) -> list:
        """The string constants the code gives `name`, in source order: keyword arguments (model="x"), dict entries
        ({"model": "x"}) and assignments (model = "x")."""
        found = []
        for tree in self.trees:
            if not isinstance(tree, ast.Module):
                continue
            for node in sorted((n for n in ast.walk(tree) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset)):
                if isinstance(node, ast.keyword) and node.arg == name:
                    found.append(node.value)
                elif isinstance(node, ast.Dict):
                    found += [v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == name]
                elif isinstance(node, ast.Assign):
                    found += [node.value for t in node.targets if isinstance(t, ast.Name) and t.id == name]
        return [v.value for v in found if isinstance(v, ast.Constant) and isinstance(v.value, str)]


def _dict_keys(node) -> list | None:
    """The keys of a dict written in the ast as {...} or dict(k=..., ...) (dict({...}, k=...) too); None where they
    cannot be known without running the code (a comprehension, **unpacking, a call)."""
    if isinstance(node, ast.Dict):
        keys = [k.value if isinstance(k, ast.Constant) else None for k in node.keys]  # None: **unpacking
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and len(node.args) <= 1:
        first = _dict_keys(node.args[0]) if node.args else []
        keys = None if first is None else first + [kw.arg for kw in node.keywords]
    else:
        return None
    return None if keys is None or None in keys else list(dict.fromkeys(keys))


def _parse_cell(source):
    try:
        return ast.parse(source)
    except SyntaxError as e:
        return e


def read_notebook(nb) -> NotebookSource:
    """A notebook's code cells and their ast (see NotebookSource)."""
    import nbformat
    cells = tuple((c.source, tuple(c.metadata.get("tags", []))) for c in nbformat.read(str(nb), as_version=4).cells
                  if c.cell_type == "code")
    return NotebookSource(Path(nb), cells, tuple(_parse_cell(source) for source, _ in cells))


BATCH_KEYS = {"time_budget"}  # params-file keys for the whole batch, not for a notebook


def _read_params(params) -> dict:
    """The params file (YAML path) or dict, checked: {"all" / number / stem: {overrides}, "time_budget": "11.5h"}."""
    import yaml
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        where = params
        if not Path(where).is_file():
            raise ValueError(f"--params {where}: no such file (a YAML file such as: all: {{preset: paper}})")
        try:
            params = yaml.safe_load(Path(where).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--params {where}: not valid YAML ({str(e).splitlines()[0]}"
                             + (f", line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else "")
                             + ")") from None
    if not isinstance(params, dict):
        raise ValueError("batch params must map 'all' / notebook number / notebook stem to a dict of overrides")
    for k, v in params.items():
        if str(k) not in BATCH_KEYS and not isinstance(v, (dict, type(None))):
            near = difflib.get_close_matches(str(k), sorted(BATCH_KEYS), 1)
            raise ValueError(f"params key {str(k)!r}: " + (f"unknown batch setting (did you mean {near[0]!r}?)" if near
                             else f"{v!r} is not a dict of overrides (a key is 'all', a notebook number or name, "
                                  f"or a batch setting: {', '.join(sorted(BATCH_KEYS))})"))
    return params


def _check_notebook_keys(keys, notebooks):
    """Every params key names 'all' or a notebook of the suite (in this batch or not): a misspelled name would leave
    its notebook on its defaults (the paper preset) with nothing but a note, so it is refused, with a did-you-mean."""
    try:
        suite = find_notebooks("all")
    except ValueError:  # no notebooks/ folder here (a custom layout): only the batch's own notebooks are known
        suite = []
    known = {nb.stem for nb in [*notebooks, *suite]} | {nb.name for nb in [*notebooks, *suite]}
    numbers = {_nb_number(nb) for nb in [*notebooks, *suite]} - {None}
    for k in keys:
        if k == "all" or k in known or (k.isdigit() and int(k) in numbers):
            continue
        near = difflib.get_close_matches(k, ["all", *sorted(BATCH_KEYS), *sorted(known)], 1)
        raise ValueError(f"params key {k!r} names no notebook" + (f" (did you mean {near[0]!r}?)" if near else "")
                         + f"; a key is 'all', a notebook number or name, or a batch setting: "
                           f"{', '.join(sorted(BATCH_KEYS))}")


def load_batch_params(params, notebooks):
    """Overrides per notebook from a YAML file or dict: {"all": {...}, 3: {...}, "03_name": {...}}.

    Later keys win: all < number < stem. Each notebook's overrides are checked against the
    parameters its `parameters` cell declares before any work."""
    params = _read_params(params)
    keys = {str(k): v or {} for k, v in params.items() if str(k) not in BATCH_KEYS}
    _check_notebook_keys(keys, notebooks)
    out, used = {}, {"all"}
    for nb in notebooks:
        num = _nb_number(nb)
        mine = [k for k in keys if (k.isdigit() and int(k) == num) or k in (nb.stem, nb.name)]
        used |= set(mine)
        merged = dict(keys.get("all", {}))
        for k in sorted(mine, key=lambda k: not k.isdigit()):  # numbers first, then stems
            merged.update(keys[k])
        declared = read_notebook(nb).declared_params()
        missing = ({"out_dir", "configs", "seeds"} | RUNNER_PARAMS) - set(declared)
        if missing:
            raise ValueError(f"{nb.name} does not follow the run contract: no parameter(s) {sorted(missing)}")
        reserved = RUNNER_PARAMS & set(merged)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by the batch runner; remove them from the params")
        out[nb] = validate_params(merged, set(declared), where=nb.name)
        if "seeds" in merged:  # a bad seeds value (or preset name, "paper3") fails here, before any work
            resolve_seeds(merged["seeds"])
    for k in set(keys) - used:
        print(f"note: params for {k!r} match no notebook of this batch")
    return out


def batch_slots(gpus="auto", workers=None, torchrun=False):
    """One slot per GPU (× workers per GPU), or `workers` CPU slots when there is no GPU.

    gpus: "auto" (every visible CUDA device), "0,1" (indices among the visible devices; mapped
    through the parent's CUDA_VISIBLE_DEVICES), or "cpu". Each slot is {name, env} for its process.
    torchrun=True: ONE slot holding all those GPUs (or `workers` CPU ranks), whose runs each go through
    torchrun as one DDP run over them ($SES_TORCHRUN, read by run_plan)."""
    if torchrun:
        per_gpu = batch_slots(gpus)
        on_gpu = per_gpu[0]["name"].startswith("gpu")
        n = len(per_gpu) if on_gpu else int(workers or 2)
        env = {SLOT_ENV: "0", TORCHRUN_ENV: str(n),
               "CUDA_VISIBLE_DEVICES": ",".join(s["env"]["CUDA_VISIBLE_DEVICES"] for s in per_gpu) if on_gpu else ""}
        if not on_gpu:  # no oversubscription between the CPU ranks
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
        return [{"name": f"torchrun:{n}{'gpu' if on_gpu else 'cpu'}", "env": env}]
    spec = str(gpus).strip().lower() if gpus is not None else "cpu"
    if spec in ("cpu", "none", ""):
        ids = []
    else:
        n = torch.cuda.device_count()
        try:
            ids = list(range(n)) if spec == "auto" else [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(f"--gpus must be 'auto', 'cpu' or a list like 0,1; got {gpus!r}") from None
        if any(not 0 <= i < n for i in ids):
            raise ValueError(f"--gpus {gpus}: only {n} CUDA device(s) visible")
    if workers is not None and int(workers) < 1:
        raise ValueError("workers must be >= 1")
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if ids:  # a process sees only its own GPU, as cuda:0
        per = int(workers or 1)
        gpu_ids = [visible[i] if i < len(visible) else str(i) for i in ids]
        devs = [g for g in gpu_ids for _ in range(per)]
        return [{"name": f"gpu{g}", "env": {"CUDA_VISIBLE_DEVICES": g, SLOT_ENV: str(k)}} for k, g in enumerate(devs)]
    n = int(workers or 1)
    threads = str(max(1, (os.cpu_count() or 1) // n))  # no oversubscription between CPU slots
    return [{"name": f"cpu{k}", "env": {"CUDA_VISIBLE_DEVICES": "", SLOT_ENV: str(k),
                                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}}
            for k in range(n)]


# The subprocess of one job: dies with the runner even when the runner is SIGKILLed (PR_SET_PDEATHSIG;
# its kernel then exits by itself, ipykernel polls its parent), runs papermill with cell output
# streamed to the log, and prints one MARK_ERROR line (SES-RUN-ERROR:) the runner shows in its table.
_DRIVER = r"""
import ctypes, json, logging, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("runner already gone")
spec = json.loads(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(message)s")
import papermill as pm
try:
    pm.execute_notebook(spec["input"], spec["output"], parameters=spec["parameters"], kernel_name=spec["kernel"],
                        log_output=True, progress_bar=False, cwd=spec["cwd"])
except BaseException as e:
    msg = " ".join(ln.strip() for ln in f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}".splitlines())
    print(spec["mark_error"], msg[:400] or type(e).__name__, flush=True)  # one line, the reason included
    raise
"""
# papermill/nbclient kernel-start races: retried once after a stagger.
_START_RACE = ("Kernel didn't respond", "Address already in use", "ZMQError", "Kernel died before replying to kernel_info")
_KERNEL = "seslib-python"


def _kernel_dir(root):
    """A kernelspec pinned to this interpreter, so every run uses the runner's own environment
    (a user-level 'python3' kernelspec may point at another Python). Shown to jupyter via JUPYTER_PATH."""
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    atomic_write_json(Path(root) / "kernels" / _KERNEL / "kernel.json", spec)
    return str(root)


@dataclasses.dataclass
class _Job:
    kind: str  # "list" | "run" | "report"
    nb: Path
    params: dict
    output: Path  # executed notebook
    log: Path
    config: str = None
    seed: int = None
    result: Path = None
    cost: float = 0.0
    after: tuple = ()  # indices of jobs that must finish first
    cfg: dict = None  # a run's resolved config: a result.json made with other settings is not "done"
    attempt: int = 0
    not_before: float = 0.0
    est: dict = None  # a run's estimate (estimate_run on the listing's GPU): the time budget decides with it
    gpus: int = 1  # GPUs the run holds (placement by estimate_memory): k > 1 one DDP run over k, 0 fits nowhere here
    place: str = ""  # where, in words (the placement's text)


def _kill_tree(proc):
    """SIGTERM the job's process group and its kernel (own session), SIGKILL what is left after 5 s."""
    try:
        import psutil
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        procs = []
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        try:
            os.killpg(proc.pid, sig) if hasattr(os, "killpg") else proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in procs:
            try:
                p.send_signal(sig)
            except Exception:
                pass
        try:
            proc.wait(5)
            if not any(p.is_running() for p in procs[1:]):
                return
        except subprocess.TimeoutExpired:
            pass


# A run whose kernel exited cleanly without writing its result.json says why in its log, with one of seslib's markers
# (looked for in this order): (marker, status, error). Without one, it failed.
_NO_RESULT_MARKS = ((MARK_LOCKED, "skipped", "locked by another process"),
                    (MARK_PAUSED, "paused", "time budget: checkpoint kept, resumes next time"),
                    (MARK_BUDGET, "to do", "time budget: not started"))


def last_error_line(log_text) -> str:
    """What failed a job, from its log's text: what follows the last MARK_ERROR (the driver prints the exception there
    as one line, its reason included), else the log's last line (200 characters at most)."""
    lines = log_text.splitlines()
    return next((ln.split(MARK_ERROR, 1)[1].strip() for ln in reversed(lines) if MARK_ERROR in ln),
                lines[-1][:200] if lines else "")


def job_outcome(kind, rc, result_ok, log_text, attempt, retries, timeout):
    """How a finished job ended, from plain values: (status, error, retry).

    kind: "list" | "run" | "report" | "notebook"; rc: its process's exit status, or "timeout" (the runner killed it
    after `timeout` seconds); result_ok: a run wrote a readable result.json; log_text: its log; attempt: the attempt
    that just ended (1 = the first), of 1 + `retries` allowed. status: "done", "failed", "skipped" (a run locked by
    another process), "paused" or "to do" (the time budget); error: why, for the table ("" when done). retry: a
    kernel-start race (_START_RACE) failed it and a retry is left: launch it again (status is then what it would be)."""
    if rc == 0 and kind == "run" and not result_ok:
        for mark, status, error in _NO_RESULT_MARKS:
            if mark in log_text:
                return status, error, False
        rc, error = 1, "the notebook finished but wrote no result.json"
    elif rc == 0 and kind == "notebook":  # a whole notebook in one kernel: done only if none of its runs stopped short
        return _notebook_outcome(log_text)
    elif rc == 0:
        return "done", "", False
    else:
        error = f"timeout after {timeout}s" if rc == "timeout" else last_error_line(log_text)
    retry = rc != "timeout" and attempt <= retries and any(m in log_text for m in _START_RACE)
    return "failed", error, retry


def _notebook_outcome(log_text):
    """(status, error, False) of a whole-notebook job that exited 0, from the markers its runs printed: "paused" when
    any run paused at the time budget, else "to do" when any was not started for it, else "skipped" when any was
    locked by another process, else "done"."""
    by_status = {status: (mark, error) for mark, status, error in _NO_RESULT_MARKS}
    for status in ("paused", "to do", "skipped"):  # the most to do next time first
        mark, error = by_status[status]
        if log_text.count(mark):
            return status, f"{log_text.count(mark)} run(s): {error}", False
    return "done", "", False


HEARTBEAT_SECONDS = 60  # at most one progress line a minute per run in flight: an hour-long run never looks frozen


def progress_text(progress_path, seconds_running) -> str:
    """'epoch 12/50, ~25 min left' from a run's progress.json (written with every checkpoint), or how long it has
    been starting (kernel, data, model) before its first epoch ended."""
    prog = _read_result(progress_path) or {}
    done, total, secs = prog.get("epochs_done"), prog.get("epochs"), prog.get("epoch_seconds") or []
    if not done or not total or not secs or prog.get("time", 0) < time.time() - seconds_running:  # none of this run's
        return f"starting ({_hours(seconds_running)} in)"
    return f"epoch {done}/{total}, ~{_hours(seconds_left(total, done, secs))} left"


def _label(j):
    return f"{j.nb.stem} {j.config} seed{j.seed}" if j.kind == "run" else f"{j.nb.stem} ({j.kind})"


def _slot_gpus(slots) -> list:
    """The distinct GPUs (CUDA_VISIBLE_DEVICES ids) of the slots, in slot order; [] for CPU slots."""
    ids = [sl["env"].get("CUDA_VISIBLE_DEVICES", "") for sl in slots if sl["name"].startswith("gpu")]
    return list(dict.fromkeys(i for i in ids if i))


def take_slots(k, free, slots):
    """The slots a job holding k GPUs starts on: [one free slot] for k <= 1, else free slots on k distinct GPUs
    (the first names the run's process); None while too few are free."""
    if k <= 1:
        return free[:1] or None
    by_gpu = {}
    for s in free:
        by_gpu.setdefault(slots[s]["env"].get("CUDA_VISIBLE_DEVICES", ""), s)
    picked = [s for g, s in by_gpu.items() if g][:k]
    return picked if len(picked) == k else None


def slots_env(slots, taken) -> dict:
    """The slot a run starts with: the first taken; a DDP run's env names all its GPUs and its torchrun size."""
    first = slots[taken[0]]
    if len(taken) == 1:
        return first
    gpus = ",".join(slots[s]["env"]["CUDA_VISIBLE_DEVICES"] for s in taken)
    return {"name": "+".join(slots[s]["name"] for s in taken),
            "env": {**first["env"], "CUDA_VISIBLE_DEVICES": gpus, TORCHRUN_ENV: str(len(taken))}}


def place_jobs(jobs, slots, say, kind=None):
    """Each run's GPUs by estimate_memory on this machine's GPUs (kind: the GPU model, else read from CUDA): 1; k
    for one DDP run over k GPUs (SyncBN and SES over the global batch); 0 when it fits nowhere here (it fails with
    that line, before it starts). CPU slots, and runs estimate_memory does not know, stay as they are."""
    gpus = _slot_gpus(slots)
    if not gpus:
        return
    kind = kind or gpu_kind(torch.cuda.get_device_name(0))  # CUDA-only: GPU slots exist only where CUDA does
    for j in jobs:
        c = j.cfg or {}
        if j.kind != "run" or not placeable(c):
            continue
        p = placement(c, kind, len(gpus))
        j.gpus, j.place = p["gpus"], p["text"]
        if p["gpus"] != 1:
            say(f"  place {_label(j)}: {p['text']}")


class _Scheduler:
    """The state of one _schedule call: the jobs waiting (`pending`, in start order), running ({slot: (job index,
    process, start time, log file)}) and finished, one record per finished job, the counts the progress lines show."""

    def __init__(self, jobs, slots, env, cwd, kernel, say, t_start, retries, stagger, timeout, end, budget):
        self.jobs, self.slots, self.env, self.cwd, self.kernel, self.say = jobs, slots, env, cwd, kernel, say
        self.t_start, self.retries, self.stagger, self.timeout = t_start, retries, stagger, timeout
        self.end, self.budget = end, budget
        self.pending = list(range(len(jobs)))
        self.running, self.finished, self.records = {}, set(), {}
        self.held = {}  # slot -> the slot whose DDP run holds it as well
        self.last_launch, self.last_beat = -1e9, time.time()
        self.counts = {"done": 0, "failed": 0, "skipped": 0, "paused": 0, "to do": 0}

    def run(self) -> list:
        """Poll the running jobs, launch what is ready, every 0.2 s until every job has its record."""
        try:
            while self.pending or self.running:
                for s in list(self.running):
                    self.poll(s)
                self.launch_ready()
                self.heartbeat()
                time.sleep(0.2)
        finally:  # interrupted (Ctrl-C, SIGTERM) or crashed: take the children down with us
            for i, proc, t0, fh in self.running.values():
                _kill_tree(proc)
                fh.close()
        return [self.records[i] for i in sorted(self.records)]

    def stamp(self):
        return f"[{datetime.timedelta(seconds=int(time.time() - self.t_start))}]"

    def heartbeat(self):
        """Every HEARTBEAT_SECONDS, one line per run in flight: its epoch and time left (its progress.json)."""
        if time.time() - self.last_beat < HEARTBEAT_SECONDS:
            return
        self.last_beat = time.time()
        for s, (i, _, t0, _) in sorted(self.running.items()):
            j = self.jobs[i]
            if j.kind == "run":
                self.say(f"{self.stamp()} running {_label(j)} on {self.slots[s]['name']}: "
                         f"{progress_text(j.result.parent / 'progress.json', time.time() - t0)}")

    def finish(self, i, status, slot, seconds, error=""):
        """Record job i's outcome and say it (a listing only when it failed)."""
        j = self.jobs[i]
        self.finished.add(i)
        self.counts[status] += 1
        self.records[i] = _record(j.nb.stem, j.kind, status, j.config, j.seed, round(seconds, 1), slot, j.attempt,
                                  error, str(j.log) if status != "skipped" else "")
        left = len(self.pending) + len(self.running)
        if j.kind != "list" or status == "failed":
            self.say(f"{self.stamp()} {status:<7} {_label(j)} on {slot} in {seconds:.1f}s"
                     + (f"  {error}  (log: {j.log})" if status == "failed" else "")
                     + f"  | done {self.counts['done']}, failed {self.counts['failed']}, left {left}")

    def poll(self, s):
        """The poll step of slot s: nothing while its job runs (killed once past the timeout); once it has ended, its
        outcome (job_outcome) is recorded, or it is queued again first (a kernel-start race)."""
        i, proc, t0, fh = self.running[s]
        rc = proc.poll()
        if rc is None and self.timeout and time.time() - t0 > self.timeout:
            _kill_tree(proc)
            rc = "timeout"
        if rc is None:
            return
        fh.close()
        del self.running[s]
        self.held = {h: owner for h, owner in self.held.items() if owner != s}
        j = self.jobs[i]
        log_text = j.log.read_text(errors="replace") if j.log.exists() else ""
        result_ok = rc == 0 and j.kind == "run" and _result_ok(j.result)
        status, error, retry = job_outcome(j.kind, rc, result_ok, log_text, j.attempt, self.retries, self.timeout)
        if retry:
            j.not_before = time.time() + self.stagger * (2 + s) + random.random()
            self.pending.insert(0, i)
            self.say(f"{self.stamp()} retry   {_label(j)}: kernel start race ({error})")
        else:
            self.finish(i, status, self.slots[s]["name"], time.time() - t0, error)

    def launch_ready(self):
        """The launch step: each free slot takes the first pending job whose dependencies are over (one launch per
        `stagger` seconds); a run that must not start now is recorded instead (not_started)."""
        for s in range(len(self.slots)):
            if s in self.running or s in self.held or time.time() - self.last_launch < self.stagger:
                continue
            i = next((i for i in self.pending if set(self.jobs[i].after) <= self.finished
                      and self.jobs[i].not_before <= time.time()), None)
            if i is None:
                break
            taken = take_slots(self.jobs[i].gpus, self.free_slots(), self.slots)
            if taken is None and self.jobs[i].gpus > 0:
                break  # a DDP run waits for its GPUs; nothing jumps the queue past it (it would starve)
            self.pending.remove(i)
            held = self.not_started(self.jobs[i])
            if held:
                self.finish(i, held[0], "", 0.0, held[1])
            else:
                self.launch(i, taken)

    def free_slots(self) -> list:
        return [s for s in range(len(self.slots)) if s not in self.running and s not in self.held]

    def not_started(self, j):
        """(status, error) of a run that must not start now, else None: another runner is training it, it was
        finished meanwhile, or its estimate does not fit the time budget left."""
        if j.kind != "run":
            return None
        if j.gpus == 0:  # estimate_memory: no GPU of this machine, nor all of them, hold it
            return "failed", j.place
        if is_locked(j.result.parent):
            return "skipped", "locked by another process"
        if result_status(j.result, j.cfg)[0] == "done":
            return "skipped", ""
        if not fits_budget(j.est, self.end, self.budget):
            return "to do", (f"time budget: needs ~{_hours(j.est['seconds'])}, "
                             f"{_hours(max(0.0, self.end - time.time()))} left")
        return None

    def launch(self, i, taken):
        """Start job i on the slots taken (one; a DDP run: one per GPU it holds): the papermill driver in a subprocess
        of its own session, its output into the job's log (a first attempt keeps the previous log as log.1.txt; a
        retry appends)."""
        j, s = self.jobs[i], taken[0]
        slot = slots_env(self.slots, taken)
        self.held.update({h: s for h in taken[1:]})
        j.attempt += 1
        j.output.parent.mkdir(parents=True, exist_ok=True)
        if j.attempt == 1:
            _keep_previous_log(j.log)
        fh = open(j.log, "w" if j.attempt == 1 else "a")
        spec = {"input": str(j.nb), "output": str(j.output), "parameters": j.params, "kernel": self.kernel,
                "cwd": self.cwd, "mark_error": MARK_ERROR}
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(os.getpid()), json.dumps(spec, default=str)],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True,
                                env={**self.env, **slot["env"], JOB_FILES_ENV: os.pathsep.join(map(str, (j.log, j.output)))})
        self.running[s] = (i, proc, time.time(), fh)
        self.last_launch = time.time()
        if j.kind != "list":
            self.say(f"{self.stamp()} start   {_label(j)} on {slot['name']}"
                     + (f" (attempt {j.attempt})" if j.attempt > 1 else "")
                     + f"  | running {len(self.running)}, queued {len(self.pending)}")


def _schedule(jobs, slots, env, cwd, kernel, say, t_start, retries=1, stagger=1.0, timeout=None, end=None, budget=None):
    """Run jobs over the slots, one subprocess per slot, in list order as dependencies allow. With a deadline
    `end`: a run that fits_budget says cannot finish is not started ("to do"); a run that pauses itself at an
    epoch boundary is "paused". Runs are placed by their memory estimate first (place_jobs). Returns one record
    per job (by index)."""
    place_jobs(jobs, slots, say)
    return _Scheduler(jobs, slots, env, cwd, kernel, say, t_start, retries, stagger, timeout, end, budget).run()


def _keep_previous_log(log, keep=5):
    """log.txt -> log.1.txt (and log.1 -> log.2 ...): a re-run never overwrites the log of the attempt that failed."""
    log = Path(log)
    if not log.exists():
        return
    olds = [log.with_name(f"{log.stem}.{k}{log.suffix}") for k in range(1, keep + 1)]
    olds[-1].unlink(missing_ok=True)
    for k in range(keep - 1, 0, -1):
        if olds[k - 1].exists():
            os.replace(olds[k - 1], olds[k])
    os.replace(log, olds[0])


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _print(msg):
    print(msg, flush=True)  # progress must show up live through pipes and in notebook cells


def _record(nb, kind, status, config=None, seed=None, seconds=0.0, slot="", attempts=0, error="", log=""):
    return {"notebook": nb, "kind": kind, "config": config, "seed": seed, "status": status, "seconds": seconds,
            "slot": slot, "attempts": attempts, "error": error, "log": log, "hours_left": None}


def _plan_jobs(lists, overrides, nb_out, cwd, report, say):
    """From the listings: records of done runs (skipped) and unreadable lists (failed), and the jobs:
    the runs costliest first, then one report per notebook that waits for that notebook's runs."""
    records, runs, reports = [], [], []
    for lj in lists:
        try:
            entries = json.loads(lj.result.read_text())
        except (OSError, ValueError):
            records.append(_record(lj.nb.stem, "list", "failed", log=str(lj.log),
                                   error="no run list written (does the notebook call S.plan_runs(..., list_runs)?)"))
            continue
        stale = [e for e in entries if e.get("status") == "stale"]
        say(f"  {lj.nb.stem}: {len(entries)} run(s), {sum(bool(e['done']) for e in entries)} done"
            + (f", {len(stale)} stale (made with other settings: set aside and redone)" if stale else ""))
        for e in stale:
            say(f"    stale: {e['config']} seed {e['seed']}: {e['stale']}")
        start = len(runs)
        for e in entries:
            rd = Path(e["run_dir"]) if Path(e["run_dir"]).is_absolute() else Path(cwd) / e["run_dir"]
            if e["done"] and result_status(rd / "result.json", e.get("cfg"))[0] == "done":
                records.append(_record(lj.nb.stem, "run", "skipped", e["config"], e["seed"]))
                continue
            p = {**overrides[lj.nb], "configs": [e["config"]], "seeds": [e["seed"]], "out_dir": nb_out[lj.nb], "report": False}
            runs.append(_Job("run", lj.nb, p, rd / "notebook.ipynb", rd / "log.txt", e["config"], e["seed"],
                             rd / "result.json", float(e.get("cost", 1.0)), cfg=e.get("cfg"), est=e.get("est")))
        if report:
            p = {**overrides[lj.nb], "out_dir": nb_out[lj.nb], "report_only": True, "report": True}
            reports.append(_Job("report", lj.nb, p, Path(nb_out[lj.nb]) / "report.ipynb",
                                Path(nb_out[lj.nb]) / "report_log.txt", after=tuple(range(start, len(runs)))))
    order = sorted(range(len(runs)), key=lambda i: -runs[i].cost)  # stable: notebook order among equals
    where = {old: new for new, old in enumerate(order)}
    for r in reports:
        r.after = tuple(where[i] for i in r.after)
    return records, [runs[i] for i in order] + reports


def _summarize(records, out, t_start, say, save=True):
    """Print the table of runs and save it as {out}/batch_summary.csv."""
    import pandas as pd
    df = pd.DataFrame(records, columns=list(_record("", "", "")))
    df["seed"] = df["seed"].astype("Int64")
    if save:
        atomic_write_bytes(out / "batch_summary.csv", df.to_csv(index=False).encode())
    shown = df.drop(columns=["log"]).astype(object)
    say(shown.where(shown.notna(), "").to_string(index=False) if len(df) else "(nothing to run)")
    say(f"batch finished in {datetime.timedelta(seconds=int(time.time() - t_start))}: "
        + ", ".join(f"{v} {k}" for k, v in df["status"].value_counts().items())
        + (f"; table: {out / 'batch_summary.csv'}" if save else ""))


def run_batch(notebooks, params_file=None, gpus="auto", workers=None, out="outputs", *, params=None,
              retries=1, stagger=1.0, timeout=None, report=True, dry_run=False, log=_print, torchrun=False,
              preset=None, whole_notebooks=False, time_budget=None, allow_cpu=False):
    """Run notebooks' (config, seed) runs over the GPUs (or CPU slots) of this machine, then their reports.

    notebooks: paths / numbers / stems / "all" (see find_notebooks); params_file: YAML of overrides
    (or params= the same as a dict); gpus: "auto" | "0,1" | "cpu"; workers: CPU slots (or slots per GPU);
    out: outputs root, each notebook writes to {out}/{stem} (paper preset) or {out}/{preset}/{stem} (any other
    preset: presets never share a folder) unless its overrides set out_dir; preset: every notebook's preset
    (overrides the params' `preset`); whole_notebooks: one job per notebook (its whole grid and its report in one
    kernel, as a person running it would) instead of one per run: for many short runs (the smoke preset) the
    kernel starts would cost more than the runs;
    retries: re-launches of a job whose kernel failed to start; timeout: seconds per job.
    time_budget: "11.5h", "90m", seconds, or the params file's `time_budget`: no run starts that its estimate says
    cannot finish in time (it stays "to do"), a run in flight pauses at an epoch boundary ("paused", checkpoint
    kept), the reports still run. Done runs are skipped, so calling it again resumes (paused runs included).
    allow_cpu: run on CPU slots even runs whose estimates add up to more than CPU_HOURS_WITHOUT_ASKING (a paper-preset
    batch on a machine without a GPU: days of work); without it such a batch is refused before any run starts, with
    its estimate. Returns one record per run / report / failed listing (notebook, kind, config, seed, status, seconds, slot, attempts, error, log), also saved
    as {out}/batch_summary.csv."""
    if params is not None and params_file is not None:
        raise ValueError("give params_file or params, not both")
    nbs, overrides, budget = _batch_notebooks(notebooks, params if params is not None else params_file, time_budget,
                                              preset)
    slots = batch_slots(gpus, workers, torchrun)
    out, cwd = Path(out).resolve(), os.getcwd()
    nb_out = _notebook_out_dirs(nbs, overrides, out)
    env = _kernel_env(out / ".batch")
    t_start = time.time()
    end = t_start + budget if budget else None
    _set_deadline(env, end, budget)
    log(f"batch: {len(nbs)} notebook(s) on {len(slots)} slot(s) [{', '.join(s['name'] for s in slots)}] -> {out}"
        + (f"; time budget {_hours(budget)} (until {datetime.datetime.fromtimestamp(end):%H:%M})" if end else ""))
    if not dry_run:
        _mark_outputs_root(out)
    listing_pass = functools.partial(_schedule, slots=slots, env=env, cwd=cwd, kernel=_KERNEL, say=log, t_start=t_start,
                                     retries=retries, stagger=stagger)
    run_pass = functools.partial(listing_pass, timeout=timeout, end=end, budget=budget)
    with _one_batch_at_a_time(out, dry_run), _sigterm_interrupts():
        if whole_notebooks:
            records = _whole_notebooks_pass(nbs, overrides, nb_out, report, dry_run, run_pass)
            return _finish_batch(records, nb_out, out, t_start, log, report, dry_run)
        lists, listed = _listing_pass(nbs, overrides, nb_out, out / ".batch", listing_pass)
        check = functools.partial(_refuse_a_long_cpu_batch, slots=slots, allow=allow_cpu or dry_run)
        records = _run_pass(lists, listed, overrides, nb_out, cwd, report, dry_run, run_pass, log, check)
    return _finish_batch(records, nb_out, out, t_start, log, report, dry_run)


def _batch_notebooks(notebooks, params, time_budget, preset):
    """The batch's notebooks, their overrides (checked against each one's parameters; `preset` over the params') and
    its time budget in seconds (time_budget, else the params file's; None: no budget)."""
    nbs = find_notebooks(notebooks)
    given = _read_params(params)
    budget = parse_duration(time_budget if time_budget is not None else given.get("time_budget"))
    overrides = load_batch_params(given, nbs)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        overrides = {nb: {**o, "preset": preset} for nb, o in overrides.items()}
    return nbs, overrides, budget


def _notebook_out_dirs(nbs, overrides, out) -> dict:
    """{notebook: its out_dir}: its overrides' out_dir, else {out}/{stem} (paper preset) or {out}/{preset}/{stem};
    never one folder for two notebooks."""
    nb_out = {nb: str(Path(overrides[nb].get("out_dir") or _preset_folder(out, overrides[nb].get("preset", "paper"))
                           / nb.stem).resolve()) for nb in nbs}
    if len(set(nb_out.values())) < len(nbs):
        raise ValueError(f"two notebooks would write to the same out_dir: {sorted(nb_out.values())}")
    return nb_out


def _kernel_env(tmp) -> dict:
    """The kernels' environment: the runner's, with $SES_DATA absolute, seslib's folder first on PYTHONPATH and the
    kernelspec pinned to this interpreter (written under tmp/jupyter) first on JUPYTER_PATH."""
    env = dict(os.environ)
    if env.get(DATA_ENV):  # absolute, so a relative SES_DATA means the same in every kernel whatever its cwd
        env[DATA_ENV] = str(Path(env[DATA_ENV]).expanduser().resolve())
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(_here())] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env["JUPYTER_PATH"] = os.pathsep.join([_kernel_dir(tmp / "jupyter")] + ([env["JUPYTER_PATH"]] if env.get("JUPYTER_PATH") else []))
    return env


def _set_deadline(env, end, budget):
    """The time budget's end and length in the kernels' environment (they pause their runs at an epoch boundary
    before it), or neither when there is no budget."""
    if end:
        env[DEADLINE_ENV], env[BUDGET_ENV] = repr(end), repr(budget)
    else:
        env.pop(DEADLINE_ENV, None), env.pop(BUDGET_ENV, None)


def _mark_outputs_root(out):
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUTS_MARKER).write_text("An outputs root of the SES suite: the next Kaggle version copies this folder "
                                      "in (sesrun.copy_previous_outputs).\n")


@contextlib.contextmanager
def _one_batch_at_a_time(out, dry_run):
    """One batch at a time on an outputs root ({out}/.batch/.lock, released when the process dies): a second batch
    would train nothing twice (the run locks see to that) but would mix its logs and batch_summary.csv with the
    first's. A dry run only reads, so it never waits for nor blocks a batch."""
    with contextlib.ExitStack() as stack:
        if not dry_run:
            try:
                stack.enter_context(run_lock(out / ".batch"))
            except RunLocked as e:
                raise ValueError(f"another batch is running on {out} ({e.owner}): wait for it to finish (its runs "
                                 "are skipped here anyway), or give this batch another --out") from None
        yield


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM -> KeyboardInterrupt inside, so the scheduler's finally blocks kill the children."""
    prev_term = None
    try:
        prev_term = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: no handler, the caller cleans up
        pass
    try:
        yield
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)


def _whole_notebooks_pass(nbs, overrides, nb_out, report, dry_run, run_pass) -> list:
    """One job per notebook (its whole grid, then its report, in one kernel), the longest first so the tail is
    short; a dry run only lists them."""
    jobs = [_Job("notebook", nb, {**overrides[nb], "out_dir": nb_out[nb], "report": report},
                 Path(nb_out[nb]) / "notebook.ipynb", Path(nb_out[nb]) / "log.txt", cost=_notebook_cost(nb))
            for nb in nbs]
    jobs.sort(key=lambda j: -j.cost)
    return [_record(j.nb.stem, j.kind, "todo") for j in jobs] if dry_run else run_pass(jobs)


def _listing_pass(nbs, overrides, nb_out, tmp, listing_pass):
    """1. Every notebook in listing mode: it writes its run list to tmp/<stem>.runs.json and does nothing else.
    Returns the listing jobs and their records."""
    lists = []
    for nb in nbs:
        path = tmp / f"{nb.stem}.runs.json"
        path.unlink(missing_ok=True)
        p = {**overrides[nb], "out_dir": nb_out[nb], "list_runs": str(path), "report": False}
        lists.append(_Job("list", nb, p, tmp / f"{nb.stem}.listing.ipynb", tmp / f"{nb.stem}.listing.log", result=path))
    return lists, listing_pass(lists)


def _run_pass(lists, listed, overrides, nb_out, cwd, report, dry_run, run_pass, log, check=None) -> list:
    """2. The listed runs not done, costliest first, then each notebook's report once its runs are over (a dry run
    only lists them). Returns the records: failed listings, runs done before (skipped), then the jobs'."""
    failed = [r for r in listed if r["status"] == "failed"]
    records, jobs = _plan_jobs([lj for lj, r in zip(lists, listed) if r["status"] == "done"],
                               overrides, nb_out, cwd, report, log)
    records = failed + records
    log(f"{sum(j.kind == 'run' for j in jobs)} run(s) to do, {sum(r['status'] == 'skipped' for r in records)} "
        f"already done, {sum(j.kind == 'report' for j in jobs)} report(s)")
    if dry_run:
        return records + [_record(j.nb.stem, j.kind, "todo", j.config, j.seed) for j in jobs]
    if check is not None:
        check(jobs)
    records += run_pass(jobs)
    _hours_left(records, jobs, log)
    return records


CPU_HOURS_WITHOUT_ASKING = 1.0  # a batch on CPU slots estimated past this needs allow_cpu (--allow-cpu)


def _refuse_a_long_cpu_batch(jobs, slots, allow):
    """Refuse, before any run starts, runs that would train on the CPU for hours (a paper-preset batch where no GPU
    is visible: `--gpus auto` then falls back to CPU slots). Short CPU work (the smoke preset, the toy study's paper
    runs) is not asked about."""
    if allow or any(s["env"].get("CUDA_VISIBLE_DEVICES") != "" for s in slots):
        return
    runs = [j for j in jobs if j.kind == "run"]
    seconds = sum((j.est or {}).get("seconds", 0.0) for j in runs)
    if seconds > CPU_HOURS_WITHOUT_ASKING * 3600:
        raise ValueError(f"{len(runs)} run(s) would train on the CPU (no GPU slot) for {_hours(seconds, approx=True)} "
                         f"(estimate, {len(slots)} slot(s) in all): run them on a GPU, use --preset smoke to check the "
                         "pipeline, or pass --allow-cpu (allow_cpu=True) to start them anyway")


OUTPUTS_MARKER = "ses-outputs.txt"  # a visible file: Kaggle's output listing may leave dot files out


def _hours_left(records, jobs, log):
    """Put each unfinished run's estimated time left (its progress.json: epochs done) into its record, and say
    what is done, paused and still to do."""
    by_run = {(j.nb.stem, j.config, j.seed): j for j in jobs if j.kind == "run"}
    left = 0.0
    for r in records:
        j = by_run.get((r["notebook"], r["config"], r["seed"]))
        if r["kind"] != "run" or j is None or r["status"] not in ("paused", "to do", "failed") or not j.est:
            continue
        seconds = j.est["seconds"]
        prog = _read_result(j.result.parent / "progress.json") or {}
        if r["status"] == "paused" and prog.get("epochs") is not None:  # its own measured epochs, now
            epoch_s = float(np.mean(prog["epoch_seconds"])) if prog.get("epoch_seconds") else j.est["epoch_s"]
            seconds = (prog["epochs"] - prog["epochs_done"]) * epoch_s + estimate_eval_seconds(j.cfg or {}, epoch_s)
        r["hours_left"] = round(seconds / 3600, 4)
        left += seconds / 3600
    n = {k: sum(r["kind"] == "run" and r["status"] == k for r in records) for k in ("done", "skipped", "paused", "to do", "failed")}
    if n["paused"] or n["to do"]:
        log(f"time budget: {n['done']} run(s) finished now, {n['skipped']} done before, {n['paused']} paused, "
            f"{n['to do']} to do, {n['failed']} failed; about {_hours(left * 3600)} of GPU time left (estimate): "
            "run the same batch again to go on")


def _finish_batch(records, nb_out, out, t_start, log, report, dry_run):
    """The run table (batch_summary.csv in the preset's folder, never the paper folder for a smoke batch) and
    SUMMARY.md (one row per claim over every notebook folder that has a report)."""
    roots = sorted({Path(d).parent for d in nb_out.values()})
    _summarize(records, roots[0] if len(roots) == 1 else out, t_start, log, save=not dry_run)
    if report and not dry_run:
        for root in roots:
            if build_summary(root) is not None:
                log(f"claims: {root / 'SUMMARY.md'}")
    return records


def _notebook_cost(nb):
    """A rough cost of a whole notebook from its source: run_cost of its recipe's model (the first `model` its code
    names) on the first data set it names, x its number of GRID configs (1 without a GRID)."""
    src = read_notebook(nb)
    models, datasets = src.strings("model"), src.strings("dataset")
    n = max(1, len(src.grid_configs() or ()))
    return run_cost({"model": models[0] if models else "resnet18", "dataset": datasets[0] if datasets else None,
                     "epochs": 1}) * n


def _preset_folder(out, preset):
    """Where a preset's notebook folders live under an outputs root: the root for the paper preset, else
    root/<preset> (a root that is already that folder, as outputs/smoke, is used as is)."""
    out = Path(out)
    return out if preset == "paper" or out.name == preset else out / preset


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# the cost plan
# ═══════════════════════════════════════════════════════════════════════════════════════════════
# python sesrun.py plan

KAGGLE = read_only({"version_hours": 12.0, "quota_hours": 30.0, "working_gb": 20.0,  # a version's limit, GPU quota
                    "overhead_hours": 0.25})  # per week, /kaggle/working's size; per version: setup, installs, reports


def notebook_plan(nb, **params):
    """A notebook's own RunPlan: its parameters cell, `params` injected after it as papermill would, then its cells
    up to the S.plan_runs call, executed here (nothing trains, nothing is written)."""
    import io
    ns = {"__name__": "__notebook_plan__"}
    started = False
    with contextlib.redirect_stdout(io.StringIO()):
        for source, tags in read_notebook(nb).cells:
            if "parameters" in tags:
                started = True
                exec(source, ns)  # noqa: S102 - the notebook's own code, as papermill would run it
                ns.update(params)
                continue
            if started:
                exec(source, ns)  # noqa: S102
                if type(ns.get("plan")).__name__ == "RunPlan":
                    return ns["plan"]
    raise ValueError(f"{Path(nb).name}: no cell after the parameters cell creates `plan` with S.plan_runs")


def _lpt(durations, slots) -> float:
    """Makespan of jobs on `slots` machines, longest first onto the least loaded (as the batch runner starts them).
    A job is seconds, or (seconds, k): a DDP run holding k machines at once, from when the k least loaded are free."""
    loads = [0.0] * max(1, slots)
    jobs = [d if isinstance(d, tuple) else (d, 1) for d in durations]
    for d, k in sorted(jobs, key=lambda j: j[0] * j[1], reverse=True):
        free = sorted(range(len(loads)), key=loads.__getitem__)[:min(k, len(loads))]
        start = max(loads[i] for i in free)
        for i in free:
            loads[i] = start + d
    return max(loads)


def _placements(runs, gpu, gpus) -> dict:
    """{config: placement} of the runs estimate_memory knows (one per config: the seed changes no memory)."""
    out = {}
    for r in runs:
        c = r.cfg or {}
        if r.config not in out and placeable(c):
            out[r.config] = placement(c, gpu, gpus)
    return out


def _placed_seconds(est, where):
    """A run's (wall seconds, GPUs it holds): a DDP run over k GPUs at DDP_EFFICIENCY."""
    k = where["gpus"] if where else 1
    return (est["seconds"] / (k * DDP_EFFICIENCY), k) if k > 1 else (est["seconds"], 1)


def _where_text(places) -> str:
    """A notebook's placements in a few words: '1 × t4 each', or each config that needs more (or does not fit)."""
    if not places:
        return "-"
    odd = {}
    for c, p in places.items():
        if p["gpus"] != 1:
            odd.setdefault(p["text"], []).append(c)
    return "; ".join(f"{', '.join(cs)}: {t}" for t, cs in odd.items()) if odd else \
        f"{next(iter(places.values()))['text']} each"


_PARAMS_CACHE = {}


def _model_bytes(c) -> int:
    """The float32 weights of c's model (model_final.pt), counted once per (model, classes, width)."""
    key = (c["model"], c.get("dataset"), c.get("width", 1.0), bool(c.get("spectral_norm")))
    if key not in _PARAMS_CACHE:
        if c["model"] == "mlp_toy":
            _PARAMS_CACHE[key] = 4 * 2000
        else:
            info = dataset_info(c["dataset"])
            with torch.device("meta"):  # shapes only: no memory, no time
                m = build_model(c["model"], info["num_classes"], info["img_size"], c.get("spectral_norm", False),
                                c.get("width", 1.0))
            _PARAMS_CACHE[key] = 4 * sum(p.numel() for p in m.state_dict().values())
    return _PARAMS_CACHE[key]


def cost_plan(notebooks="all", gpus=2, gpu="t4", out="outputs", preset="paper", budget="11.5h", seeds=None):
    """Per notebook: runs (all / left), the GPU-hours left on `gpu` and where the estimate comes from; for the
    selection: wall time on `gpus` GPUs (longest first), Kaggle versions of `budget`, weeks of the 30-h quota, the
    disk footprint. Done runs (under `out`) count as done. Returns (per-notebook DataFrame, totals dict)."""
    import pandas as pd
    _speed(gpu)
    seeds = resolve_seeds(seeds) if seeds else None  # every notebook's seeds ("paper3": 42, 123, 7), else its own
    budget_h = parse_duration(budget) / 3600
    rows, ests, final_bytes, ckpt_bytes = [], [], 0, 0
    for nb in find_notebooks(notebooks):
        out_dir = _preset_folder(Path(out).resolve(), preset) / nb.stem
        plan = notebook_plan(nb, preset=preset, out_dir=str(out_dir), **({"seeds": seeds} if seeds else {}))
        left = [r for r in plan.runs if not r.done]
        est = [run_estimate(r, plan.paper, plan.paper_gpu, gpu) for r in left]
        places = _placements(plan.runs, gpu, gpus)
        placed = [_placed_seconds(e, places.get(r.config)) for e, r in zip(est, left)]
        ests += [p for p in placed if p[1] > 0]  # a run that fits nowhere here is named, not scheduled
        for r in plan.runs:
            c = r.cfg or {}
            if c.get("task") and (n := seslib.text_model_bytes(c)):  # Exp 22: weights + AdamW's 2 moments
                final_bytes += n if c.get("save_model") else 0
                ckpt_bytes = max(ckpt_bytes, 3 * n)
            elif placeable(c):
                final_bytes += _model_bytes(c) if c.get("save_model", True) else 0
                n = _model_bytes(c)
                ckpt_bytes = max(ckpt_bytes, n * (2 + (2 if c.get("optimizer") == "adamw" else 1)))
        rows.append({"notebook": nb.stem, "runs": len(plan.runs), "left": len(left),
                     "gpu_hours": sum(sec * k for sec, k in placed) / 3600,
                     "source": ", ".join(sorted({e["source"] for e in est})) or "-",
                     "peak_gb": max((p["memory"]["peak_gb"] for p in places.values()), default=float("nan")),
                     "where": _where_text(places), "fits": all(p["gpus"] for p in places.values()),
                     "gpus_max": max((p["gpus"] for p in places.values()), default=1)})
    df = pd.DataFrame(rows)
    wall_h = _lpt(ests, gpus) / 3600
    per_version = max(budget_h, 1e-9)
    versions = math.ceil(wall_h / per_version - 1e-9) if wall_h else 0
    per_week = max(1, int(KAGGLE["quota_hours"] // (budget_h + KAGGLE["overhead_hours"])))
    disk_gb = (final_bytes + gpus * ckpt_bytes) / 1e9
    totals = {"gpu": gpu, "gpus": gpus, "gpu_hours": float(df["gpu_hours"].sum()) if len(df) else 0.0,
              "wall_hours": wall_h, "budget_hours": budget_h, "versions": versions,
              "weeks": math.ceil(versions / per_week) if versions else 0, "versions_per_week": per_week,
              "disk_gb": disk_gb, "disk_ok": disk_gb <= KAGGLE["working_gb"], "seeds": seeds}
    return df, totals


def memory_cell(row, gpu="T4") -> str:
    """A notebook's peak memory and placement in a few words (the README's experiment table)."""
    if row.peak_gb != row.peak_gb:
        return "—"
    if not row.fits:
        return f"{row.peak_gb:.1f} GB: does not fit"
    k = row.gpus_max
    return f"{row.peak_gb:.1f} GB, 1 {gpu}" if k == 1 else f"{row.peak_gb:.1f} GB: DDP over {k} {gpu}s"


def format_plan(df, t) -> str:
    lines = [f"seeds {list(t['seeds'])} in every notebook"] if t.get("seeds") else []
    lines += [f"{'notebook':<28} {'runs':>4} {'left':>4} {'GPU-h left':>10} {'peak GB':>7}  estimate from; where"]
    for r in df.itertuples():
        gpu_h = _hours(r.gpu_hours * 3600, approx=True)
        peak = f"{r.peak_gb:.1f}" if r.peak_gb == r.peak_gb else "-"
        lines.append(f"{r.notebook:<28} {r.runs:>4} {r.left:>4} {gpu_h:>10} {peak:>7}  {r.source}; {r.where}")
    if len(df) and not df["fits"].all():
        lines.append("NOT ON THIS MACHINE: " + ", ".join(df.loc[~df["fits"], "notebook"]) + " (see 'where'; a bigger "
                     "GPU, or more of them: --gpus / --gpu)")
    lines += [
        f"total: {_hours(t['gpu_hours'] * 3600, approx=True)} of {t['gpu']} GPU time; wall time on {t['gpus']} x "
        f"{t['gpu']}: {_hours(t['wall_hours'] * 3600, approx=True)} (longest runs first)",
        f"Kaggle: {t['versions']} version(s) with --time-budget {t['budget_hours']:g}h (a version stops at "
        f"{KAGGLE['version_hours']:g} h), {t['versions_per_week']} per week of the {KAGGLE['quota_hours']:g}-h GPU quota "
        f"-> {t['weeks']} week(s)",
        f"disk: {t['disk_gb']:.1f} GB (model_final.pt of every run + one checkpoint per GPU in flight or paused; "
        f"/kaggle/working holds {KAGGLE['working_gb']:g} GB{'' if t['disk_ok'] else ': TOO MUCH, set save_model=False'})"]
    return "\n".join(lines)


def _plan_args(p):
    p.add_argument("notebooks", nargs="*", default=["all"], help="numbers, stems or paths (default: all)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs working in parallel (default 2: Kaggle's T4 x2)")
    p.add_argument("--gpu", default="t4", choices=[k for k in GPU_SPEED], help="the GPU kind (default t4)")
    p.add_argument("--out", default="outputs", help="outputs root: runs done there count as done (default outputs)")
    p.add_argument("--preset", default="paper", choices=list(PRESETS), help="the preset planned (default paper)")
    p.add_argument("--time-budget", default="11.5h", help="per Kaggle version (default 11.5h)")
    p.add_argument("--seeds", help="every notebook's seeds: 'paper3' (the paper's 42, 123, 7) or e.g. '42,123' "
                                   "(default: each notebook's own)")


def _plan_cmd(a):
    seeds = resolve_seeds(a.seeds) if a.seeds else None  # a bad value: one line, before any notebook is read
    df, t = cost_plan(a.notebooks or ["all"], a.gpus, a.gpu, a.out, a.preset, a.time_budget, seeds)
    print(format_plan(df, t))
    return 0


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# Kaggle packaging
# ═══════════════════════════════════════════════════════════════════════════════════════════════

def kaggle_slug(title):
    """Kaggle's clean-URL slug of a title: lowercase, runs of other characters -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


_KAGGLE_USER = r"[A-Za-z0-9][A-Za-z0-9_-]{1,49}"  # a Kaggle user name, as in kaggle.com/<username>


def _check_ref(ref, what, lo, hi, problems):
    owner, _, slug = str(ref).partition("/")
    if not owner or "/" in slug or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug or "") or not lo <= len(slug) <= hi:
        problems.append(f"{what} {ref!r} must be 'owner/slug' with a slug of {lo}-{hi} lowercase letters, digits and hyphens")
    elif not re.fullmatch(_KAGGLE_USER, owner):
        problems.append(f"{what} {ref!r}: the owner {owner!r} is not a Kaggle user name (letters, digits, '-' or '_', "
                        "2-50 characters, as in kaggle.com/<username>)")
    return slug


def validate_kaggle_metadata(path):
    """Check a kernel-metadata.json or dataset-metadata.json (or a folder holding one) before pushing.

    Kernel: required fields, id 'owner/slug' (slug 5-50 chars, lowercase and hyphens), title
    slugifying to the slug, language/kernel_type values, the code file present (a valid notebook for
    kernel_type notebook), boolean flags, source refs. Dataset: title 6-50 chars, slug 3-50, one license.
    Raises ValueError listing every problem; returns the metadata."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("kernel-metadata.json", "dataset-metadata.json") if (path / n).is_file()]
        if not found:
            raise ValueError(f"{path}: no kernel-metadata.json or dataset-metadata.json")
        path = found[0]
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from None
    problems = []
    if path.name == "dataset-metadata.json":
        _dataset_meta_problems(meta, problems)
    else:
        _kernel_meta_problems(meta, path.parent, problems)
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return meta


def _dataset_meta_problems(meta, problems):
    _check_ref(meta.get("id", ""), "id", 3, 50, problems)
    title = str(meta.get("title", ""))
    if not 6 <= len(title) <= 50:
        problems.append(f"title {title!r} must be 6-50 characters")
    if not isinstance(meta.get("licenses"), list) or len(meta["licenses"]) != 1 or "name" not in meta["licenses"][0]:
        problems.append("licenses must hold exactly one {'name': ...}")


def _kernel_meta_problems(meta, folder, problems):
    missing = [k for k in ("id", "title", "code_file", "language", "kernel_type") if not meta.get(k)]
    if missing:
        problems.append(f"missing field(s) {missing}")
    slug = _check_ref(meta.get("id", ""), "id", 5, 50, problems)
    title = str(meta.get("title", ""))
    if len(title) < 5 or kaggle_slug(title) != slug:
        problems.append(f"title {title!r} must be >= 5 characters and slugify to the id's slug {slug!r} "
                        f"(it gives {kaggle_slug(title)!r})")
    if meta.get("language") not in ("python", "r", "rmarkdown"):
        problems.append(f"language {meta.get('language')!r} must be python, r or rmarkdown")
    if meta.get("kernel_type") not in ("script", "notebook"):
        problems.append(f"kernel_type {meta.get('kernel_type')!r} must be script or notebook")
    for k in ("is_private", "enable_gpu", "enable_internet", "enable_tpu"):
        if k in meta and meta[k] not in (True, False, "true", "false"):
            problems.append(f"{k} must be true or false, got {meta[k]!r}")
    for k, kind in (("dataset_sources", "dataset"), ("kernel_sources", "kernel"), ("competition_sources", None)):
        v = meta.get(k, [])
        if not isinstance(v, list):
            problems.append(f"{k} must be a list")
        elif kind:
            for ref in v:
                _check_ref(ref, f"{k} entry", 3 if kind == "dataset" else 5, 50, problems)
    if "machine_shape" in meta and not (isinstance(meta["machine_shape"], str) and meta["machine_shape"]):
        problems.append("machine_shape must be a non-empty string such as 'NvidiaTeslaT4'")
    _code_file_problems(meta, folder, problems)


def _code_file_problems(meta, folder, problems):
    """The kernel's code file is there (and a valid notebook for kernel_type notebook)."""
    code = folder / str(meta.get("code_file", ""))
    if meta.get("code_file") and not code.is_file():
        problems.append(f"code file {code} not found")
    elif meta.get("code_file") and meta.get("kernel_type") == "notebook":
        import nbformat
        try:
            nbformat.validate(nbformat.read(str(code), as_version=4))
        except Exception as e:
            problems.append(f"code file {code.name} is not a valid notebook ({str(e).splitlines()[0]})")


def copy_previous_outputs(dest, inputs="/kaggle/input", log=print) -> list:
    """Continuation across Kaggle kernel versions: copy every earlier outputs root found under `inputs` (the previous
    version's output, attached as this kernel's input: <inputs>/<slug>/outputs/, marked by ses-outputs.txt, up to 5
    folders deep) into `dest`, never over a file dest already has. Results, checkpoints, progress.json, logs and
    reports come along, so done runs are skipped and paused ones resume. Returns the roots copied from."""
    dest = Path(dest).resolve()
    found = {m.parent.resolve() for k in range(1, 6) for m in Path(inputs).glob("/".join(["*"] * k) + "/" + OUTPUTS_MARKER)}
    roots = sorted(r for r in found - {dest} if not any(o in r.parents for o in found))  # outermost roots only
    for root in roots:
        n = size = 0
        for dirpath, _, files in os.walk(root):
            for f in files:
                src = Path(dirpath) / f
                if f.endswith(".tmp") or f == ".lock":  # a write cut short, or a lock: not data
                    continue
                target = dest / src.relative_to(root)
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.copy2(src, tmp)  # then renamed: an interrupted copy never leaves half a checkpoint
                os.replace(tmp, target)
                n, size = n + 1, size + target.stat().st_size
        log(f"continuation: copied {n} file(s), {size / 2**30:.2f} GiB, from {root} into {dest}")
    if not roots:
        log(f"continuation: no earlier outputs under {inputs} (a first version starts from scratch)")
    return roots


# The driver notebook's setup, after SETUP_CELL (str.format: {data_slug!r} is the data set's slug).
_KAGGLE_DATA_CELL = """\
# The data set attached as a Kaggle dataset -> SES_DATA (the notebooks' data_root default).
_data = [p for k in (1, 2, 3) for p in glob.glob("/kaggle/input" + "/*" * k) if os.path.basename(p) == {data_slug!r}]
if _data:
    os.environ.setdefault("SES_DATA", _data[0])
print("seslib from", _dirs[:1], "| data from", os.environ.get("SES_DATA"))
# Install only what this image lacks (a blanket `pip install -r` could swap Kaggle's torch).
# Everything the runs need (seslib.preflight checks it again before each run): papermill & co for the runner, timm
# (ViTs, Mixup/CutMix), torchmetrics (the robustness pass), transformers (Exp 22's BERT; Kaggle's image has it), and
# the frost photos of imagecorruptions (--no-deps: only its image files are read; its own dependencies would pull an
# OpenCV build).
_need = {{"papermill": "papermill", "nbformat": "nbformat", "yaml": "pyyaml", "timm": "timm", "torchmetrics": "torchmetrics",
         "seaborn": "seaborn", "ipykernel": "ipykernel", "pandas": "pandas", "tqdm": "tqdm",
         "transformers": "transformers"}}
_missing = [pkg for mod, pkg in _need.items() if importlib.util.find_spec(mod) is None]
import subprocess
if _missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *_missing], check=True)
if importlib.util.find_spec("imagecorruptions") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "imagecorruptions"], check=True)
"""


def _driver_notebook(notebooks, data_dataset, out_dir, preset, time_budget="11.5h"):
    import nbformat
    v4 = nbformat.v4
    find_data = _KAGGLE_DATA_CELL.format(data_slug=data_dataset.split("/")[1])
    cells = [
        v4.new_markdown_cell(
            "# SES experiments: batch run on Kaggle (GPU T4 ×2)\n\n"
            "Runs the experiment notebooks with `sesrun.run_batch`: one papermill process per GPU, longest runs first. "
            f"Outputs (results JSON, figures, reports, `batch_summary.csv`) go to `{out_dir}`. "
            "Edit the parameters cell to choose notebooks and the preset; re-running resumes (done runs are skipped).\n\n"
            "**Across versions.** The batch stops starting runs that cannot finish within `TIME_BUDGET` and pauses the "
            "runs in flight at an epoch boundary (a version stops at 12 hours). When this kernel lists its own output "
            "as an input (`sesrun.py kaggle --continue-from self`), the next version first copies the previous "
            "version's outputs into place, so done runs are skipped and paused runs resume: push again until the "
            "summary says nothing is left to do."),
        v4.new_code_cell(SETUP_CELL + find_data),
        v4.new_code_cell(
            f"NOTEBOOKS = {[str(n) for n in notebooks]!r}  # numbers, stems or 'all'\n"
            f"PRESET = {preset!r}  # 'paper' (published setup) or 'smoke' (tiny, minutes)\n"
            "EXTRA = {}  # more overrides for every notebook, e.g. {'epochs': 10}\n"
            f"OUT = {out_dir!r}\n"
            f"TIME_BUDGET = {time_budget!r}  # this version's share of Kaggle's 12 h: the rest is setup and reports\n"
            "CONTINUE = True  # first copy the previous version's outputs (an attached kernel output) into OUT"),
        v4.new_code_cell(
            "!nvidia-smi -L\n"
            "import sesrun as R\n"
            "if CONTINUE:\n"
            "    R.copy_previous_outputs(OUT)\n"
            "records = R.run_batch(NOTEBOOKS, params={'all': {'preset': PRESET, **EXTRA}}, gpus='auto', out=OUT,\n"
            "                      time_budget=TIME_BUDGET)"),
        v4.new_code_cell(
            "import pandas as pd\n"
            "failed = [r for r in records if r['status'] == 'failed']\n"
            "display(pd.DataFrame(records))\n"
            "left = [r for r in records if r['status'] in ('paused', 'to do')]\n"
            "print(f'{len(left)} run(s) paused or to do: push this kernel again to go on' if left else 'all runs done')\n"
            "if failed:  # the kernel version then ends as an error on Kaggle, not 'successful'\n"
            "    raise RuntimeError(f\"{len(failed)} run(s) failed: \" + '; '.join(\n"
            "        f\"{r['notebook']} {r['config'] or ''} seed {r['seed']}: {r['error']}\" for r in failed[:5]))"),
    ]
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def kaggle_package(out, notebooks="all", username=None, slug="ses-batch-t4x2", data_dataset=None,
                   code_dataset=None, preset="paper", continue_from=None, time_budget="11.5h"):
    """Write a ready-to-push Kaggle kernel folder `out` and the seslib code dataset in `out/code-dataset`.

    Push with: `kaggle datasets create -p OUT/code-dataset` (once; `kaggle datasets version` after),
    then `kaggle kernels push -p OUT`. The kernel runs the batch over both T4s into /kaggle/working/outputs."""
    import nbformat
    if not username or not re.fullmatch(_KAGGLE_USER, str(username)):
        raise ValueError(f"--username {username!r} is not a Kaggle user name (letters, digits, '-' or '_', no "
                         "spaces): the one in your profile URL kaggle.com/<username>")
    data_dataset = data_dataset or f"{username}/ses-data"
    code_dataset = code_dataset or f"{username}/seslib-code"
    out = Path(out)
    nbs = find_notebooks(notebooks)
    parse_duration(time_budget)  # a bad budget fails here, not on Kaggle
    kernel_meta, data_meta = _kaggle_metadata(username, slug, data_dataset, code_dataset, continue_from)
    if out.exists() and any(out.iterdir()) and not (out / "kernel-metadata.json").is_file():
        raise ValueError(f"--out {out} exists and is not a kernel bundle written by this command: choose another folder")
    # built in a temporary folder beside `out` and moved in place only once complete and valid: a failure
    # never leaves a half-written bundle (nor touches the previous one)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ds = _write_code_dataset(tmp / "code-dataset", nbs, data_meta)
        driver = _driver_notebook([nb.stem for nb in nbs], data_dataset, "/kaggle/working/outputs", preset, time_budget)
        nbformat.write(driver, str(tmp / kernel_meta["code_file"]))
        atomic_write_json(tmp / "kernel-metadata.json", kernel_meta)
        validate_kaggle_metadata(tmp / "kernel-metadata.json")
        validate_kaggle_metadata(ds / "dataset-metadata.json")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _kaggle_metadata(username, slug, data_dataset, code_dataset, continue_from):
    """(kernel-metadata.json, the code dataset's dataset-metadata.json) of the bundle, every reference checked."""
    kernel_meta = {
        "id": f"{username}/{slug}", "title": slug.replace("-", " "), "code_file": f"{slug}.ipynb",
        "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
        "enable_internet": True, "machine_shape": "NvidiaTeslaT4",  # T4 x2
        "dataset_sources": [data_dataset, code_dataset], "competition_sources": [],
        # continuation: the previous version's output as an input ("self": this kernel's own, once it exists)
        "kernel_sources": [] if not continue_from else [f"{username}/{slug}" if continue_from == "self" else continue_from]}
    code_slug = code_dataset.split("/")[-1]
    data_meta = {"title": code_slug.replace("-", " "), "id": code_dataset, "licenses": [{"name": "CC0-1.0"}]}
    problems = []
    for ref, lo in ((data_dataset, 3), (code_dataset, 3), (kernel_meta["id"], 5), *((k, 5) for k in kernel_meta["kernel_sources"])):
        _check_ref(ref, "reference", lo, 50, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return kernel_meta, data_meta


def _write_code_dataset(ds, nbs, data_meta) -> Path:
    """The code dataset folder: seslib.py, sesrun.py, requirements.txt and the notebooks (flat: `kaggle datasets
    create` skips sub-folders by default), and its metadata."""
    ds.mkdir(parents=True)
    here = _here()
    for f in (here / "seslib.py", here / "sesrun.py", here / "requirements.txt"):
        shutil.copy2(f, ds / f.name)
    for nb in nbs:
        shutil.copy2(nb, ds / nb.name)
    atomic_write_json(ds / "dataset-metadata.json", data_meta)
    return ds


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# command line
# ═══════════════════════════════════════════════════════════════════════════════════════════════
# python sesrun.py COMMAND ...

def _batch_args(p):
    p.add_argument("notebooks", nargs="+", help="notebook paths, numbers (3 -> notebooks/03_*.ipynb), stems or 'all'")
    p.add_argument("--params", help="YAML of overrides: {all: {...}, 3: {...}, 03_name: {...}}")
    p.add_argument("--gpus", default="auto", help="'auto' (all visible CUDA devices), '0,1', or 'cpu'")
    p.add_argument("--workers", type=int, help="CPU slots when there is no GPU (default 1); with GPUs: slots per GPU")
    p.add_argument("--out", default="outputs", help="outputs root; notebook NN_name writes to OUT/NN_name")
    p.add_argument("--retries", type=int, default=1, help="retries of a run whose kernel failed to start (default 1)")
    p.add_argument("--timeout", type=float, help="seconds after which a run is killed and counted failed")
    p.add_argument("--stagger", type=float, default=1.0, help="seconds between process launches (kernel-start races)")
    p.add_argument("--no-report", action="store_true", help="skip the report_only pass")
    p.add_argument("--dry-run", action="store_true", help="list the runs to do and stop")
    p.add_argument("--torchrun", action="store_true", help="one run at a time over ALL the GPUs (DDP via torchrun) "
                   "instead of one run per GPU; with --gpus cpu: --workers CPU ranks (default 2)")
    p.add_argument("--preset", choices=list(PRESETS), help="every notebook's preset (default: the params file's, else "
                   "paper); a non-paper preset writes under OUT/<preset>/")
    p.add_argument("--whole-notebooks", action="store_true", help="one job per notebook (its whole grid, then its "
                   "report, in one kernel) instead of one per run: faster for many short runs (the quick job uses it)")
    p.add_argument("--time-budget", help="e.g. 11.5h: start no run that cannot finish in time, pause the runs in "
                   "flight at an epoch boundary (checkpoint kept); run the batch again to go on (default: none)")
    p.add_argument("--allow-cpu", action="store_true", help="start runs on CPU slots even when their estimates add "
                   f"up to more than {CPU_HOURS_WITHOUT_ASKING:g} h (refused without it: a paper batch on a CPU takes days)")


def _batch_cmd(a):
    recs = run_batch(a.notebooks, a.params, gpus=a.gpus, workers=a.workers, out=a.out, retries=a.retries,
                     stagger=a.stagger, timeout=a.timeout, report=not a.no_report, dry_run=a.dry_run,
                     torchrun=a.torchrun, preset=a.preset, whole_notebooks=a.whole_notebooks,
                     time_budget=a.time_budget, allow_cpu=a.allow_cpu)
    return 1 if any(r["status"] == "failed" for r in recs) else 0


def _kaggle_args(p):
    p.add_argument("--out", required=True, help="folder to write (kernel) and OUT/code-dataset (seslib dataset)")
    p.add_argument("--notebooks", nargs="+", default=["all"], help="notebooks the kernel runs (default all)")
    p.add_argument("--username", required=True, help="your Kaggle user name")
    p.add_argument("--slug", default="ses-batch-t4x2", help="kernel slug (5-50 chars, lowercase, hyphens)")
    p.add_argument("--data-dataset", help="owner/slug of the data dataset (default USERNAME/ses-data)")
    p.add_argument("--code-dataset", help="owner/slug of the seslib code dataset (default USERNAME/seslib-code)")
    p.add_argument("--preset", default="paper", choices=["paper", "smoke"])
    p.add_argument("--time-budget", default="11.5h", help="per version (default 11.5h of Kaggle's 12)")
    p.add_argument("--continue-from", help="USER/KERNEL whose output the kernel copies in first, or 'self' (this "
                   "kernel's previous version: use it from the second push on)")


def _kaggle_cmd(a):
    out = kaggle_package(a.out, a.notebooks, a.username, a.slug, a.data_dataset, a.code_dataset, a.preset,
                         a.continue_from, a.time_budget)
    print(f"wrote {out}\n  1. kaggle datasets create -p {out / 'code-dataset'}   (later: kaggle datasets version -p ... -m msg)\n"
          f"  2. kaggle kernels push -p {out}\n  3. kaggle kernels output {a.username}/{a.slug} -p results/"
          + ("" if a.continue_from else f"\n  next versions: rewrite with --continue-from self, then push again"))
    return 0


def _notebook_datasets(nb) -> set:
    """The data sets a notebook's code names (dataset="...", {"dataset": ...}, dataset = ...)."""
    return set(read_notebook(nb).strings("dataset")) & set(DATASETS)


def _quick_args(p):
    p.add_argument("notebooks", nargs="*", default=["all"], help="numbers, stems or paths (default: all)")
    p.add_argument("--gpus", default="auto", help="'auto' (all visible CUDA devices), '0,1', or 'cpu'")
    p.add_argument("--workers", type=int, help="CPU slots when there is no GPU (default 2)")
    p.add_argument("--data-root", help="folder holding the data sets (default: $SES_DATA, Kaggle inputs, ./data)")
    p.add_argument("--out", default="outputs", help="outputs root (default outputs): the smoke results land in OUT/smoke/")


def _quick_cmd(a):
    """The suite's smoke preset over every notebook whose data can be found or downloaded (see the README for what
    it proves): each notebook whole, in one kernel, through the batch runner; then the reports and SUMMARY.md."""
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
    out = _preset_folder(Path(a.out).resolve(), "smoke")
    failed = [r for r in recs if r["status"] == "failed"]
    print(f"\nquick job: {len(runnable) - len(failed)} notebook(s) ran, {len(failed)} failed, {len(skipped)} skipped "
          f"for missing data, in {datetime.timedelta(seconds=int(time.time() - t0))}")
    if runnable:
        print(f"reports: {out}/NN_name/report.md; figures: {out}/NN_name/figures/*.png; claims: {out}/SUMMARY.md; "
              f"run table: {out}/batch_summary.csv")
    if not runnable:  # nothing ran: not a success, whatever the reason
        print("nothing ran: no data set was found or could be downloaded (see above)")
        return 1
    return 1 if failed else 0


def _summary_args(p):
    p.add_argument("--out", default="outputs", help="outputs root holding the notebook folders (default outputs; "
                   "outputs/smoke for the smoke preset)")


def _summary_cmd(a):
    df = build_summary(a.out)
    if df is None:
        print(f"no notebook reports with claims under {a.out}/ yet (run a notebook or a batch first)")
        return 1
    n_nb = df.loc[df["notebook"] != "across notebooks", "notebook"].nunique()
    print(f"{Path(a.out) / 'SUMMARY.md'}: {len(df)} claims, from {n_nb} notebook(s) and across notebooks; "
          + ", ".join(f"{v} {k}" for k, v in df["verdict"].value_counts().items()))
    return 0


# name -> (help, add_arguments(parser), run(args) -> exit status). Add a command by adding an entry.
CLI_COMMANDS = {
    "batch": ("run notebooks' runs over this machine's GPUs (or CPU slots), then their reports", _batch_args, _batch_cmd),
    "kaggle": ("write a ready-to-push Kaggle kernel + seslib code dataset", _kaggle_args, _kaggle_cmd),
    "quick": ("the quick job: every notebook's smoke preset through the batch runner, on the data found or "
              "downloaded", _quick_args, _quick_cmd),
    "summary": ("outputs/SUMMARY.md and .csv: every claim's verdict over the notebooks that have reports",
                _summary_args, _summary_cmd),
    "plan": ("the cost plan: runs, GPU-hours, wall time on N GPUs, Kaggle versions and quota weeks, disk",
             _plan_args, _plan_cmd),
}


def main(argv=None):
    """`python sesrun.py COMMAND ...`; exits non-zero when the command fails."""
    parser = argparse.ArgumentParser(prog="sesrun.py", description="SES experiment suite: batch runner and CLI")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in CLI_COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    return run_command(parser, CLI_COMMANDS[args.command][2], args,
                       interrupted="interrupted: the running jobs were stopped; run the same command again to resume")


if __name__ == "__main__":
    main()
