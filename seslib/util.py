"""Utilities every room shares: the run contract with the batch runner, atomic writes, run-outcome errors, config
value checks, durations and the time budget, run-folder locks, device, seeds and precision, saving figures."""
from __future__ import annotations

import contextlib
import contextvars
import difflib
import errno
import json
import os
import platform
import random
import re
import shutil
import socket
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

from .ses import is_num

# The folder holding this package: the repository (or the Kaggle code dataset), where notebooks/ and outputs/ live.
ROOT = Path(__file__).resolve().parent.parent


def with_package_on_path(environ) -> dict:
    """A copy of `environ` whose PYTHONPATH starts with ROOT: a child process (a torchrun rank, a notebook kernel)
    imports this same package whatever its working directory."""
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return env


# ── the run contract: what the batch runner (sesrun.py, the parent) and the notebook kernels it starts share ──
# The runner sets notebook parameters and environment variables and reads the log markers a kernel prints; nothing
# else crosses the process boundary. sesrun checks CONTRACT_VERSION at start: bump it whenever one of these changes
# meaning, so a seslib from another version fails with one line instead of logs read the wrong way.
CONTRACT_VERSION = 2  # 2: SES_JOB_FILES
RUNNER_PARAMS = frozenset({"list_runs", "report_only", "report"})  # notebook parameters only the runner sets
DATA_ENV = "SES_DATA"  # the data root (absolute in every kernel)
DEADLINE_ENV = "SES_DEADLINE"  # unix time the batch's time budget ends
BUDGET_ENV = "SES_TIME_BUDGET"  # the batch's whole time budget in seconds (with SES_DEADLINE)
TORCHRUN_ENV = "SES_TORCHRUN"  # N: each run of the kernel as ONE DDP run over N processes (run_plan reads it)
SLOT_ENV = "SES_SLOT"  # the kernel's slot index in the batch (for a person reading its environment)
LOG_ENV = "SES_LOG"  # a run's progress display: "bar" | "lines" | "auto"
JOB_FILES_ENV = "SES_JOB_FILES"  # the files the runner writes for this job (its log, the executed notebook), os.pathsep
MARK_ERROR = "SES-RUN-ERROR:"  # + the first line of the exception that failed the notebook
MARK_LOCKED = "SES-RUN-LOCKED"  # a run another process is training: skipped, not failed
MARK_PAUSED = "SES-RUN-PAUSED"  # a run paused at an epoch boundary by the time budget: checkpoint kept
MARK_BUDGET = "SES-RUN-BUDGET"  # a run not started: its estimate does not fit the time left


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it): restored at once
os.umask(_UMASK)


def atomic_write(path, write):
    """Write `path` through write(file) into a temp file in the same folder, fsync it, then os.replace: a reader
    never sees half a file, and a crash leaves the old file (plus a '.<name>.*.tmp' that clean_temporaries
    removes on the next start). The file gets the mode a plain open() would (0666 & ~umask), not mkstemp's 0600,
    so results stay readable on a shared machine or a multi-node shared folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut once the folder is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=_json_default).encode())


def atomic_torch_save(obj, path):
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except RuntimeError as e:  # torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos"
        folder, need = Path(path).parent, _tensor_bytes(obj)
        free = shutil.disk_usage(folder).free  # the partial file is gone again: what is free now is all there is
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: {Path(path).name} needs ~{need / 2**30:.2f} GiB "
                                        f"and {folder} has {free / 2**30:.2f} GiB free: free some space or choose "
                                        "another out_dir (the previous checkpoint is intact)") from e
        raise


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def clean_temporaries(folder) -> list:
    """Remove the '.<name>.*.tmp' files an interrupted atomic write left in `folder` (a checkpoint's can be
    300 MB). Call it only while holding the folder's run_lock: then no live writer owns them."""
    gone = []
    for f in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            gone.append(f.name)
    return gone


def move_aside(path, tag="corrupt") -> Path:
    """Rename a bad file to '<name>.<tag>' ('.<tag>.1', ... if taken), never deleting it; returns the new path."""
    path = Path(path)
    dest, k = path.with_name(f"{path.name}.{tag}"), 0
    while dest.exists():
        k += 1
        dest = path.with_name(f"{path.name}.{tag}.{k}")
    os.replace(path, dest)
    return dest


# ── run outcomes other than success ────────────────────────────────────────────────────────────
class RunLocked(RuntimeError):
    """Another live process holds this run folder's lock (it is training this run right now); `owner` says which."""

    def __init__(self, folder, owner):
        super().__init__(f"{folder} is being trained by another live process ({owner}); skipped")
        self.folder, self.owner = folder, owner


class RunPaused(RuntimeError):
    """The run stopped at an epoch boundary because the time budget ends before its next epoch would: its
    checkpoint is on disk and the next invocation resumes it exactly. Not a failure."""


class PreflightError(ValueError):
    """Something a run will need is missing: raised before any data is read or any training (one line per fix)."""


# ── config value checks, durations, the time budget ────────────────────────────────────────────

def check_value(cond, key, value, want):
    if not cond:
        raise ValueError(f"config {key!r} must be {want}; got {value!r}")


def check_config_keys(cfg, known, what="config"):
    """cfg is a dict whose keys are all in `known`; else ValueError in one line, a did-you-mean for each stray key."""
    if not isinstance(cfg, dict):
        raise ValueError(f"cfg must be a dict; got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in known]
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), known, n=1) for k in unknown}
        raise ValueError(f"unknown {what} key(s): " + ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()))


def read_only(table: dict):
    """A module-level table (nested dicts too) as a read-only view. A notebook cell that writes
    S.PRESETS["smoke"]["epochs"] = 5 would otherwise change every later run of that kernel; now it gets a TypeError
    (to change a copy: {**S.PRESETS["smoke"], "epochs": 5}). Lists inside stay lists: configs compare equal to the
    ones stored in result.json."""
    return types.MappingProxyType({k: read_only(v) if isinstance(v, dict) else v for k, v in table.items()})


def parse_duration(v) -> float | None:
    """Seconds from 11.5h / 90m / 3600s / 3600 / '1h30m' (None / '' / 0: no limit)."""
    if v in (None, "", 0, "0"):
        return None
    if is_num(v):
        return float(v) if v > 0 else None
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(v))
    if not m or not any(m.groups()):
        raise ValueError(f"time budget {v!r}: give hours, minutes or seconds, e.g. 11.5h, 90m, 3600")
    h, mi, sec = (float(g) if g else 0.0 for g in m.groups())
    total = 3600 * h + 60 * mi + sec
    return total or None


def deadline() -> float | None:
    """The time budget's end (unix seconds) from $SES_DEADLINE, or None (no budget)."""
    v = os.environ.get(DEADLINE_ENV)
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"${DEADLINE_ENV} must be a unix time in seconds; got {v!r}") from None


# ── run folder locks ───────────────────────────────────────────────────────────────────────────
@contextlib.contextmanager
def run_lock(folder):
    """An exclusive, non-blocking lock on {folder}/.lock (fcntl.flock: released when the process dies, so a
    killed run never leaves a stale lock). Two runners on one outputs folder then never train the same run
    twice: the second gets RunLocked. No-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    except OSError as e:  # the first thing a run touches: say what to do, not errno
        raise PreflightError(f"this run cannot start:\n  - out_dir {folder} is not writable ({e.strerror or e}): "
                             "choose another out_dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RunLocked(folder, owner) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def is_locked(folder) -> bool:
    if not (Path(folder) / ".lock").exists():
        return False
    try:
        with run_lock(folder):
            return False
    except RunLocked:
        return True


# ── device, seeds, precision ───────────────────────────────────────────────────────────────────
def pick_device(device="auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _cpu_name():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def thread_advice(cores, busy_others, threads, omp_set) -> str | None:
    """One line when a CPU run's torch threads outnumber the cores other processes leave free, else None. Measured on
    a 2-core machine with two other busy processes: 2.48 s a step with 2 threads, 0.80 s with 1. The threads are not
    changed for the user: a run resumed with another thread count would not reproduce its history bit for bit."""
    free = max(1, int(cores - busy_others + 0.5))
    if omp_set or threads <= free:
        return None
    return (f"[threads] this machine's {cores} cores are {busy_others:.1f} busy with other processes and torch uses "
            f"{threads} threads: steps may run several times slower. Start Python with OMP_NUM_THREADS={free} (the "
            "batch runner sets it per slot), or wait for the machine to be idle")


def cpu_thread_advice() -> str | None:
    """thread_advice for this process now (other processes' CPU use over 0.2 s; this one is idle before a run)."""
    import psutil
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=0.2) / 100 * (psutil.cpu_count() or cores)
    return thread_advice(cores, busy, torch.get_num_threads(), bool(os.environ.get("OMP_NUM_THREADS")))


def device_label(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_precision(amp, device_type, capability=None, cpu_amp=False):
    """(precision this device runs, note or None) for the requested amp.
    off -> fp32; fp16 -> fp16 on CUDA; bf16 -> bf16 on compute capability >= 8, else fp16 (a T4 has no bf16
    tensor cores: is_bf16_supported() says True there through emulation); auto -> bf16 / fp16 / fp32 by device.
    On the CPU every request runs in fp32 (CPU autocast is slower than fp32 for these models): the recipe's
    fp16/bf16 is a GPU setting. cpu_amp=True runs it there anyway (fp16 with GradScaler("cpu"), bf16 without), so
    the tests execute every precision path a GPU would; auto stays fp32 (a CPU's own choice)."""
    if amp == "off":
        return "fp32", None
    if device_type != "cuda" and cpu_amp:
        return ("fp32" if amp == "auto" else amp), None
    if device_type != "cuda":
        return "fp32", None if amp == "auto" else f"amp={amp!r} is a GPU setting: fp32 on {device_type}"
    native_bf16 = capability is not None and capability[0] >= 8
    if amp == "fp16":
        return "fp16", None
    if amp == "bf16" and not native_bf16:
        return "fp16", f"amp='bf16' asked for, but this GPU (compute capability {capability}) has no native bf16: fp16"
    return ("bf16" if native_bf16 else "fp16"), None


def device_capability(device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None


def amp_dtype_of(precision):
    """None (fp32) | torch.float16 (with GradScaler) | torch.bfloat16, for a resolved precision."""
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def eval_amp_dtype(amp, device, cpu_amp=False):
    """The autocast dtype of an evaluation: amp = a precision ('fp32' | 'fp16' | 'bf16'), an amp request ('auto',
    'fp16', 'bf16', 'off'), or True/False/None (auto/off). Resolved as training resolves it (cpu_amp likewise)."""
    if amp in PRECISIONS:
        return amp_dtype_of(amp if device.type == "cuda" or cpu_amp else "fp32")
    request = "auto" if amp is True else "off" if amp in (False, None) else amp
    return amp_dtype_of(resolve_precision(request, device.type, device_capability(device), cpu_amp)[0])


@contextlib.contextmanager
def measuring(model, mode="eval"):
    """A measuring forward: the model in `mode` ("eval", or "train" to see activations as SES sees them), without
    gradients, and afterwards exactly as before: its own train/eval mode back, and in train mode its buffers too
    (BatchNorm's running statistics would otherwise move with every measured batch)."""
    was_training = model.training
    saved = [b.detach().clone() for b in model.buffers()] if mode == "train" else None
    model.train(mode == "train")
    try:
        with torch.no_grad():
            yield model
    finally:
        if saved is not None:
            with torch.no_grad():
                for b, v in zip(model.buffers(), saved):
                    b.copy_(v)
        model.train(was_training)


# ── figures ──────────────────────────────────────────────────────────────────────────────────────
MAX_FIG_INCHES = 16  # at 120 dpi: 1920 px, readable on a laptop screen and in a notebook cell


# ── torch and torchvision: one matching pair ──
CPU_WHEELS = "https://download.pytorch.org/whl/cpu"


def torch_pair_problem(torch_version: str, torchvision_version: str) -> str | None:
    """Why this torch and this torchvision do not belong together (torchvision 0.(m + 15) goes with torch 2.m), or
    None. A mixed install (CPU torch beside a CUDA torchvision, or another release) fails at its first operator."""
    tm = re.match(r"(\d+)\.(\d+)", torch_version)
    vm = re.match(r"(\d+)\.(\d+)", torchvision_version)
    if not (tm and vm) or tm.group(1) != "2" or vm.group(1) != "0":
        return None
    want = int(tm.group(2)) + 15
    if int(vm.group(2)) == want:
        return None
    return (f"torch {torch_version} goes with torchvision 0.{want}, not {torchvision_version}: install a matching "
            f"pair from one index, e.g. pip install --force-reinstall torch torchvision --index-url {CPU_WHEELS} "
            "(CPU only), or without --index-url for CUDA builds")


def check_torch_pair():
    """At import: torchvision loads (else ImportError) and matches torch (else a warning), each in one line saying how
    to fix the install."""
    try:
        import torchvision
    except RuntimeError as e:  # 'operator torchvision::nms does not exist': built for another torch
        raise ImportError(f"torchvision does not load with torch {torch.__version__} ({str(e).splitlines()[0]}): "
                          "they come from different builds; install a matching pair from one index, e.g. pip install "
                          f"--force-reinstall torch torchvision --index-url {CPU_WHEELS} (CPU only)") from None
    problem = torch_pair_problem(torch.__version__, torchvision.__version__)
    if problem:  # it loaded: it may work, so a warning, not a refusal
        import warnings
        warnings.warn(problem, stacklevel=3)


# What every figure saved now must say beneath it (the report sets it: "preset smoke ..., synthetic data"), so a figure
# seen alone cannot pass for a paper-preset result.
FIGURE_NOTE = contextvars.ContextVar("FIGURE_NOTE", default=None)


def save_figure(fig, out_dir, name, show=True):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    path = Path(out_dir) / "figures" / f"{name}.png"
    for ax in fig.axes:  # an epoch is a whole number: never a 0.96-1.04 axis for a 1-epoch run
        if ax.get_xlabel() == "epoch":
            lo, hi = ax.get_xlim()
            if hi - lo < 2:  # too short for the locator to find whole numbers: widen to one around the middle
                mid = round((lo + hi) / 2)
                ax.set_xlim(min(lo, mid - 0.5), max(hi, mid + 0.5))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    w, h = fig.get_size_inches()
    if max(w, h) > MAX_FIG_INCHES:  # a safety net for many configs: never a 5000-px strip
        k = MAX_FIG_INCHES / max(w, h)
        fig.set_size_inches(w * k, h * k)
    note = FIGURE_NOTE.get()
    lines = textwrap.wrap(note, width=max(40, int(fig.get_figwidth() * 15))) if note else []
    if lines:  # beneath everything, the width of the figure: 7-pt text, about 15 characters an inch
        fig.text(0.005, 0.003, "\n".join(lines), fontsize=7, color="firebrick", ha="left", va="bottom")
    # a legend of the whole figure sits below the axes: keep half an inch for it, whatever the figure's height; and
    # 0.13 inch a line of the note
    bottom = (0.5 if fig.legends else 0.0) + 0.13 * len(lines)
    fig.tight_layout(rect=(0, bottom / fig.get_figheight(), 1, 1) if bottom else None)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))  # a crash never leaves half a PNG
    if show and "ipykernel" in sys.modules:  # inline in notebooks, whatever the matplotlib backend
        from IPython.display import Image, display
        display(Image(filename=str(path)))
    plt.close(fig)
    return path


def format_hours(seconds, approx=False) -> str:
    """A duration for people, the suite's one format of time: '11.5 h', '25 min' (from 2 min on), '40 s'.
    approx=True, the cost plan's and the README's runtime column: '≈ 1.2 h', or '≈ 25 min' under an hour (at least
    '≈ 1 min': an estimate never reads as seconds), and '0' for nothing (a notebook whose runs are all done)."""
    if approx and seconds <= 0:
        return "0"
    if approx:
        return f"≈ {seconds / 3600:.1f} h" if seconds >= 3600 else f"≈ {max(1, round(seconds / 60))} min"
    return (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 120
            else f"{seconds:.0f} s")
