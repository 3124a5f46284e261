"""The batch runner: notebooks as papermill jobs over the GPUs (or CPU slots) of one machine, one process per slot,
params files, the time budget, the batch table; and the first cell every notebook starts with."""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import difflib
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .util import (BUDGET_ENV, DATA_ENV, DEADLINE_ENV, JOB_FILES_ENV, MARK_BUDGET, MARK_ERROR, MARK_LOCKED,
                   MARK_PAUSED, ROOT, RUNNER_PARAMS, RunLocked, SLOT_ENV, TORCHRUN_ENV, atomic_write_bytes,
                   atomic_write_json, format_hours, is_locked, parse_duration, run_lock, with_package_on_path)
from .runs import fits_budget, read_result, result_is_ok, result_status, run_cost, run_key
from .estimates import estimate_eval_seconds, estimate_run, gpu_kind, placeable, placement, seconds_left
from .reports import build_summary
from .notebook import PRESETS, resolve_seeds, validate_params
from .calibration import calibrated_epoch, read_calibration, usable_memory


# (Colab / Kaggle / repo)

# Finds the seslib package in cwd, .. or an attached Kaggle dataset (bounded depth: a recursive glob would walk the
# image data sets too; a dataset pushed with `--dir-mode zip` may hold it as seslib.zip); on Colab, if still not
# importable, clones $SES_REPO (the git URL of your copy of the repository) and installs its requirements.
# Defines only underscore names and modules, so check_notebook_params ignores it.
SETUP_CELL = """\
# Setup: make seslib importable (repo checkout, Kaggle dataset, or Colab clone).
import sys, os, glob, importlib.util
_found = lambda pattern: sorted(p for k in (1, 2, 3) for p in glob.glob("/kaggle/input" + "/*" * k + pattern))
_dirs = [os.getcwd(), os.path.dirname(os.getcwd())] + [os.path.dirname(os.path.dirname(p)) for p in _found("/seslib/__init__.py")]
_dirs = [d for d in _dirs if os.path.isfile(os.path.join(d, "seslib", "__init__.py"))]
if not _dirs and _found("/seslib.zip"):  # the package as the Kaggle API uploaded it: the code dataset, unpacked once
    import shutil, zipfile
    _src = os.path.dirname(_found("/seslib.zip")[0])
    shutil.copytree(_src, "/kaggle/working/seslib-code", dirs_exist_ok=True)
    zipfile.ZipFile(os.path.join(_src, "seslib.zip")).extractall("/kaggle/working/seslib-code/seslib")
    _dirs = ["/kaggle/working/seslib-code"]
if _dirs and _dirs[0] not in sys.path:
    sys.path.insert(0, _dirs[0])
if "google.colab" in sys.modules and importlib.util.find_spec("seslib") is None:
    import subprocess
    _repo = os.environ.get("SES_REPO", "")  # git URL of your copy of the repository
    if not _repo:
        raise RuntimeError("seslib is not importable: set os.environ['SES_REPO'] to the git URL of your copy of the "
                           "repository (or upload the seslib folder and requirements.txt), then run this cell again")
    subprocess.run(["git", "clone", "-q", "--depth", "1", _repo, "/content/ses"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "/content/ses/requirements.txt"], check=True)
    sys.path.insert(0, "/content/ses")
if importlib.util.find_spec("seslib") is None:  # a plain Jupyter kernel started somewhere else
    raise RuntimeError("seslib is not importable: looked in " + os.getcwd() + ", its parent and /kaggle/input. "
                       "Open this notebook from the repository's notebooks/ folder (or its root), or add the "
                       "repository to the path first: import sys; sys.path.insert(0, '/path/to/the/repository')")
"""


def suite_root():
    """The folder holding the seslib package and notebooks/ (the runner's children import seslib from there)."""
    return ROOT


def _nb_number(path):
    m = re.match(r"(\d+)_", Path(path).name)
    return int(m.group(1)) if m else None


def find_notebooks(specs, dirs=None):
    """Resolve notebook specs: paths, numbers (3 -> 03_*.ipynb), stems, or "all".

    Looked up in ./notebooks, then notebooks/ beside the seslib package, then beside it (Kaggle dataset)."""
    dirs = list(dict.fromkeys(Path(d).resolve() for d in (dirs or [Path.cwd() / "notebooks", suite_root() / "notebooks", suite_root()])))
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


def read_params(params) -> dict:
    """The params file (YAML path) or dict, checked: {"all" / number / stem: {overrides}, "time_budget": "11.5h"}."""
    import yaml
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        where = params
        if Path(where).is_dir():
            raise ValueError(f"--params {where} is a folder: give the YAML file (such as plan.yaml)")
        if not Path(where).is_file():
            raise ValueError(f"--params {where}: no such file (a YAML file such as: all: {{preset: paper}})")
        try:
            params = yaml.safe_load(Path(where).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ValueError(f"--params {where}: not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}): "
                             "save it as UTF-8") from None
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
    params = read_params(params)
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
            raise ValueError(f"{nb.name} is not a notebook the batch runner can run: its parameters cell has no "
                             f"{', '.join(sorted(missing))} (the run contract of the experiment notebooks)"
                             + (": it is an interactive notebook, open it in Jupyter" if "configs" in missing else ""))
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
    prog = read_result(progress_path) or {}
    done, total, secs = prog.get("epochs_done"), prog.get("epochs"), prog.get("epoch_seconds") or []
    if not done or not total or not secs or prog.get("time", 0) < time.time() - seconds_running:  # none of this run's
        return f"starting ({format_hours(seconds_running)} in)"
    return f"epoch {done}/{total}, ~{format_hours(seconds_left(total, done, secs))} left"


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


def place_jobs(jobs, slots, say, kind=None, cal=None):
    """Each run's GPUs by estimate_memory on this machine's GPUs (kind: the GPU model, else read from CUDA; cal: a
    calibration measured on this kind gives the usable memory): 1; k for one DDP run over k GPUs (SyncBN and SES over
    the global batch); 0 when it fits nowhere here (it fails with that line, before it starts). CPU slots, and runs
    estimate_memory does not know, stay as they are."""
    gpus = _slot_gpus(slots)
    if not gpus:
        return
    kind = kind or gpu_kind(torch.cuda.get_device_name(0))  # CUDA-only: GPU slots exist only where CUDA does
    for j in jobs:
        c = j.cfg or {}
        if j.kind != "run" or not placeable(c):
            continue
        p = placement(c, kind, len(gpus), usable_memory(cal, kind))
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
        result_ok = rc == 0 and j.kind == "run" and result_is_ok(j.result)
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
            return "to do", (f"time budget: needs ~{format_hours(j.est['seconds'])}, "
                             f"{format_hours(max(0.0, self.end - time.time()))} left")
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


def calibrate_jobs(jobs, slots, cal, kind=None):
    """The runs whose time estimate is the paper's get the calibration's measured step instead (estimate_run with
    calibration.calibrated_epoch on this machine's GPU kind); measured runs and CPU slots stay as they are."""
    if cal is None or not _slot_gpus(slots):
        return
    kind = kind or gpu_kind(torch.cuda.get_device_name(0))  # CUDA-only: GPU slots exist only where CUDA does
    for j in jobs:
        if j.kind == "run" and j.est and j.cfg and not str(j.est.get("source", "")).startswith("measured"):
            if (timed := calibrated_epoch(cal, j.cfg, kind)) is not None:
                j.est = estimate_run(j.cfg, kind, calibrated=timed)


def _schedule(jobs, slots, env, cwd, kernel, say, t_start, retries=1, stagger=1.0, timeout=None, end=None, budget=None,
              cal=None):
    """Run jobs over the slots, one subprocess per slot, in list order as dependencies allow. With a deadline
    `end`: a run that fits_budget says cannot finish is not started ("to do"); a run that pauses itself at an
    epoch boundary is "paused". Runs are placed by their memory estimate first (place_jobs), and timed by the
    calibration where it measured them (calibrate_jobs). Returns one record per job (by index)."""
    place_jobs(jobs, slots, say, cal=cal)
    calibrate_jobs(jobs, slots, cal)
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
    the runs costliest first, then one report per notebook that waits for that notebook's runs. A run another
    notebook of the batch also needs (the same runs.run_key) is started once; the other's report waits for it."""
    records, runs, reports, first = [], [], [], {}
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
        start, waits_for = len(runs), []
        for e in entries:
            rd = Path(e["run_dir"]) if Path(e["run_dir"]).is_absolute() else Path(cwd) / e["run_dir"]
            if e["done"] and result_status(rd / "result.json", e.get("cfg"))[0] == "done":
                records.append(_record(lj.nb.stem, "run", "skipped", e["config"], e["seed"]))
                continue
            key = run_key(e.get("cfg"))
            if key in first:  # trained once, by the first notebook that needs it
                records.append(_record(lj.nb.stem, "run", "shared", e["config"], e["seed"],
                                       error=f"the same run as {first[key][1]}: trained there, read here"))
                waits_for.append(first[key][0])
                continue
            if key:
                first[key] = (len(runs), f"{lj.nb.stem}/{e['config']} seed {e['seed']}")
            p = {**overrides[lj.nb], "configs": [e["config"]], "seeds": [e["seed"]], "out_dir": nb_out[lj.nb], "report": False}
            runs.append(_Job("run", lj.nb, p, rd / "notebook.ipynb", rd / "log.txt", e["config"], e["seed"],
                             rd / "result.json", float(e.get("cost", 1.0)), cfg=e.get("cfg"), est=e.get("est")))
        if report:
            p = {**overrides[lj.nb], "out_dir": nb_out[lj.nb], "report_only": True, "report": True}
            reports.append(_Job("report", lj.nb, p, Path(nb_out[lj.nb]) / "report.ipynb",
                                Path(nb_out[lj.nb]) / "report_log.txt",
                                after=tuple(range(start, len(runs))) + tuple(waits_for)))
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
              preset=None, whole_notebooks=False, time_budget=None, allow_cpu=False, calibration=None):
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
    its estimate. calibration: a gpu_check.json (bench/gpu_check.py), else {out}/gpu_check.json when there is one: its
    measured step times and usable memory time and place the runs. Returns one record per run / report / failed listing (notebook, kind, config, seed, status, seconds, slot, attempts, error, log), also saved
    as {out}/batch_summary.csv."""
    if params is not None and params_file is not None:
        raise ValueError("give params_file or params, not both")
    nbs, overrides, budget = _batch_notebooks(notebooks, params if params is not None else params_file, time_budget,
                                              preset)
    slots = batch_slots(gpus, workers, torchrun)
    out, cwd = Path(out).resolve(), os.getcwd()
    _check_outputs_root(out, dry_run)
    nb_out = _notebook_out_dirs(nbs, overrides, out)
    cal = _batch_calibration(calibration, out, log)
    # the kernels' files (kernelspec, run lists, listing logs): a dry run keeps them in a temporary folder, so that
    # it writes nothing under --out (nor creates it)
    work = Path(tempfile.mkdtemp(prefix="ses-dry-run-")) if dry_run else out / ".batch"
    try:
        return _batch(nbs, overrides, nb_out, slots, out, cwd, work, dict(
            retries=retries, stagger=stagger, timeout=timeout, report=report, dry_run=dry_run, log=log,
            whole_notebooks=whole_notebooks, budget=budget, allow_cpu=allow_cpu, cal=cal))
    finally:
        if dry_run:
            shutil.rmtree(work, ignore_errors=True)


def _batch_calibration(calibration, out, log):
    """The calibration the batch uses: the file given (a bad one: one line), else {out}/gpu_check.json if there is
    one (the Kaggle driver writes it there on its first version), else None."""
    path = calibration or (out / "gpu_check.json" if (out / "gpu_check.json").is_file() else None)
    if path is None:
        return None
    try:
        cal = read_calibration(path)
    except ValueError as e:
        if calibration:
            raise
        raise ValueError(f"found {path}, which the batch would use to time and place its runs, but "
                         f"{str(e).split(': ', 1)[1]}: move it away, or give --calibration FILE") from None
    log(f"calibration: {cal.path} (measured on {cal.device}, {cal.time}): its step times and memory time and place "
        "the runs it measured")
    return cal


def _check_outputs_root(out, dry_run):
    """--out is a folder this batch can write (a dry run only reads it): one line naming it, before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give the outputs folder (it is created when missing)")
    if not dry_run:
        parent = next(p for p in [out, *out.parents] if p.exists())
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--out {out}: {parent} is read-only; the batch writes its results, reports and "
                             "batch_summary.csv there: give a writable --out (or --dry-run, which writes nothing)")


def _batch(nbs, overrides, nb_out, slots, out, cwd, work, o):
    """run_batch's work once its inputs are checked: the listing pass, the runs, the reports, the summary."""
    retries, stagger, timeout, report, dry_run, log = (o[k] for k in ("retries", "stagger", "timeout", "report",
                                                                      "dry_run", "log"))
    budget, whole_notebooks, allow_cpu = o["budget"], o["whole_notebooks"], o["allow_cpu"]
    env = _kernel_env(work)
    t_start = time.time()
    end = t_start + budget if budget else None
    _set_deadline(env, end, budget)
    log(f"batch: {len(nbs)} notebook(s) on {len(slots)} slot(s) [{', '.join(s['name'] for s in slots)}] -> {out}"
        + (f"; time budget {format_hours(budget)} (until {datetime.datetime.fromtimestamp(end):%H:%M})" if end else ""))
    if not dry_run:
        _mark_outputs_root(out)
    listing_pass = functools.partial(_schedule, slots=slots, env=env, cwd=cwd, kernel=_KERNEL, say=log, t_start=t_start,
                                     retries=retries, stagger=stagger)
    run_pass = functools.partial(listing_pass, timeout=timeout, end=end, budget=budget, cal=o["cal"])
    with _one_batch_at_a_time(out, dry_run), _sigterm_interrupts():
        if whole_notebooks:
            records = _whole_notebooks_pass(nbs, overrides, nb_out, report, dry_run, run_pass)
            return _finish_batch(records, nb_out, out, t_start, log, report, dry_run)
        lists, listed = _listing_pass(nbs, overrides, nb_out, work, listing_pass)
        check = functools.partial(_refuse_a_long_cpu_batch, slots=slots, allow=allow_cpu or dry_run)
        records = _run_pass(lists, listed, overrides, nb_out, cwd, report, dry_run, run_pass, log, check)
    return _finish_batch(records, nb_out, out, t_start, log, report, dry_run)


def _batch_notebooks(notebooks, params, time_budget, preset):
    """The batch's notebooks, their overrides (checked against each one's parameters; `preset` over the params') and
    its time budget in seconds (time_budget, else the params file's; None: no budget)."""
    nbs = find_notebooks(notebooks)
    given = read_params(params)
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
    nb_out = {nb: str(Path(overrides[nb].get("out_dir") or preset_folder(out, overrides[nb].get("preset", "paper"))
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
    env = with_package_on_path(env)
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
    shared = sum(r["status"] == "shared" for r in records)
    log(f"{sum(j.kind == 'run' for j in jobs)} run(s) to do, {sum(r['status'] == 'skipped' for r in records)} "
        f"already done, " + (f"{shared} shared with another notebook (trained once), " if shared else "")
        + f"{sum(j.kind == 'report' for j in jobs)} report(s)")
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
        raise ValueError(f"{len(runs)} run(s) would train on the CPU (no GPU slot) for {format_hours(seconds, approx=True)} "
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
        prog = read_result(j.result.parent / "progress.json") or {}
        if r["status"] == "paused" and prog.get("epochs") is not None:  # its own measured epochs, now
            epoch_s = float(np.mean(prog["epoch_seconds"])) if prog.get("epoch_seconds") else j.est["epoch_s"]
            seconds = (prog["epochs"] - prog["epochs_done"]) * epoch_s + estimate_eval_seconds(j.cfg or {}, epoch_s)
        r["hours_left"] = round(seconds / 3600, 4)
        left += seconds / 3600
    n = {k: sum(r["kind"] == "run" and r["status"] == k for r in records) for k in ("done", "skipped", "paused", "to do", "failed")}
    if n["paused"] or n["to do"]:
        log(f"time budget: {n['done']} run(s) finished now, {n['skipped']} done before, {n['paused']} paused, "
            f"{n['to do']} to do, {n['failed']} failed; about {format_hours(left * 3600)} of GPU time left (estimate): "
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


def preset_folder(out, preset):
    """Where a preset's notebook folders live under an outputs root: the root for the paper preset, else
    root/<preset> (a root that is already that folder, as outputs/smoke, is used as is)."""
    out = Path(out)
    return out if preset == "paper" or out.name == preset else out / preset
