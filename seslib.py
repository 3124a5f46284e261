"""seslib: Spectral Entropy Shaping (SES), the one helper every notebook of the suite imports.

SES adds  lambda * sum_l alpha_l (H_l - beta * log d_l)^2  to the training loss, where H_l is the
spectral entropy of layer l's batch activations (pooled to [B, d]) and exp(H_l) its effective rank.

The batch runner and the command line (quick, batch, plan, kaggle, summary) live in sesrun.py, which imports this
module; this module never imports it. `python seslib.py train --config run.json` stays here: torchrun launches it.

Sections (in data-flow order: each uses only itself and those above it):
  utilities: the run contract with the runner, atomic writes, locks, type checks, device and precision, figures
  SES core: spectral entropy, effective rank, the SES loss, beta schedules
  hooks and the SES object: which layers, pooled activations, ActivationCollector, SES for any nn.Module
  data: data sets on disk, loading, the on-device loader and its augmentations; GLUE text, synthetic smoke text
  models: ResNet-18/50, WRN-28-10, the ViTs, the toy MLP; BERT's shapes, the smoke BERT, its SES layers
  corruptions: CIFAR-10-C / Tiny-ImageNet-C generated or read, their evaluation, the paper's own protocol
  run folders, the stale rule and estimates: when a result counts as done, setting stale ones aside, time estimates,
    GPU memory estimates (estimate_memory, image and text runs)
  train: a run's config, the training loop as named steps, distributed runs, result.json
  toy 2-D study (Exp 4): rings, a 5 x 16 MLP, the Jacobian's condition number
  text (Exp 22): BERT fine-tuned on GLUE SST-2 / MRPC with the author's recipe, train_text
  results & reports: results, claims and verdicts, tables, figures, report.md, SUMMARY.md
  explore: a finished run's model and its layers' spectra
  notebook side: parameters, presets, the run plan a notebook makes and runs
  the train command: `python seslib.py train --config run.json`, one run (one process or one torchrun rank)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import errno
import gc
import importlib.util
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import warnings
import weakref
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.overrides import TorchFunctionMode  # estimate_memory's stand-in for a GPU's fused attention
from torch.utils._python_dispatch import TorchDispatchMode  # estimate_memory's tracer
from tqdm.auto import tqdm


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# utilities
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# ── the run contract: what the batch runner (sesrun.py, the parent) and the notebook kernels it starts share ──
# The runner sets notebook parameters and environment variables and reads the log markers a kernel prints; nothing
# else crosses the process boundary. sesrun checks CONTRACT_VERSION at start: bump it whenever one of these changes
# meaning, so a seslib.py from another version fails with one line instead of logs read the wrong way.
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


# ── type checks, durations, the time budget ────────────────────────────────────────────────────
def _is_int(v):
    """An int and not a bool (True is an int to Python): every integer setting is checked with this."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v):
    """A real number and not a bool (True is an int to Python, never a value a user means)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_num(v):
    """A finite real number and not a bool."""
    return _is_real(v) and math.isfinite(v)


def _check(cond, key, value, want):
    if not cond:
        raise ValueError(f"config {key!r} must be {want}; got {value!r}")


def _check_config_keys(cfg, known, what="config"):
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
    if _is_num(v):
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


def _device_name(device) -> str:
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


def _device_capability(device):
    return torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None


def _amp_dtype(precision):
    """None (fp32) | torch.float16 (with GradScaler) | torch.bfloat16, for a resolved precision."""
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _eval_amp_dtype(amp, device, cpu_amp=False):
    """The autocast dtype of an evaluation: amp = a precision ('fp32' | 'fp16' | 'bf16'), an amp request ('auto',
    'fp16', 'bf16', 'off'), or True/False/None (auto/off). Resolved as training resolves it (cpu_amp likewise)."""
    if amp in PRECISIONS:
        return _amp_dtype(amp if device.type == "cuda" or cpu_amp else "fp32")
    request = "auto" if amp is True else "off" if amp in (False, None) else amp
    return _amp_dtype(resolve_precision(request, device.type, _device_capability(device), cpu_amp)[0])


def autocast(device, amp_dtype):
    """torch.autocast on the device's own type at amp_dtype (torch.float16 / bfloat16), or a no-op for fp32 (None)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


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


def _save(fig, out_dir, name, show=True):
    import matplotlib.pyplot as plt
    path = Path(out_dir) / "figures" / f"{name}.png"
    w, h = fig.get_size_inches()
    if max(w, h) > MAX_FIG_INCHES:  # a safety net for many configs: never a 5000-px strip
        k = MAX_FIG_INCHES / max(w, h)
        fig.set_size_inches(w * k, h * k)
    # a legend of the whole figure sits below the axes: keep half an inch for it, whatever the figure's height
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1) if fig.legends else None)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))  # a crash never leaves half a PNG
    if show and "ipykernel" in sys.modules:  # inline in notebooks, whatever the matplotlib backend
        from IPython.display import Image, display
        display(Image(filename=str(path)))
    plt.close(fig)
    return path


def _hours(seconds, approx=False) -> str:
    """A duration for people, the suite's one format of time: '11.5 h', '25 min' (from 2 min on), '40 s'.
    approx=True, the cost plan's and the README's runtime column: '≈ 1.2 h', or '≈ 25 min' under an hour (at least
    '≈ 1 min': an estimate never reads as seconds)."""
    if approx:
        return f"≈ {seconds / 3600:.1f} h" if seconds >= 3600 else f"≈ {max(1, round(seconds / 60))} min"
    return (f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 120
            else f"{seconds:.0f} s")


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# SES core
# ═══════════════════════════════════════════════════════════════════════════════════════════════

SES_EPS = 1e-12  # eigenvalue floor, as the reference; keeps log finite on rank-deficient spectra
_warned_unreachable: set = set()


def _check_beta(beta):
    if not _is_real(beta) or not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta must be a number in (0, 1) (the target normalised entropy); got {beta!r}")
    return float(beta)


def _as_matrix(acts: torch.Tensor) -> torch.Tensor:
    if acts.dim() != 2:
        raise ValueError(f"activations must be pooled to [B, d]; got shape {tuple(acts.shape)}")
    if acts.shape[0] < 2:
        raise ValueError(f"spectral entropy needs a batch of at least 2 samples; got B={acts.shape[0]}")
    # float32 at least (half/bf16 eigvalsh is inaccurate or unsupported); float64 stays float64
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def _second_moment(acts: torch.Tensor) -> torch.Tensor:
    """Centred second-moment matrix whose eigenvalues are the covariance spectrum.

    When B < d we use the B x B Gram matrix Hc Hc^T instead of the d x d covariance Hc^T Hc: both
    have the same non-zero eigenvalues, and eigvalsh is O(k^3), so at d = 2048, B = 256 this is
    (2048/256)^3 = 512x less work, and float32 has fewer near-zero noise eigenvalues to smear H.
    """
    h = _as_matrix(acts)
    h = h - h.mean(dim=0, keepdim=True)
    B, d = h.shape
    m = h @ h.T if B < d else h.T @ h
    return m / (B - 1)


def _entropy_from_eigs(eigs: torch.Tensor) -> torch.Tensor:
    lam = eigs.clamp(min=SES_EPS)
    p = lam / lam.sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def layer_entropies(acts_list) -> torch.Tensor:
    """Spectral entropy of each [B, d_l] activation matrix, as one float32 vector [L].

    Batched: matrices of equal size are stacked and sent to ONE eigvalsh call (a [L, k, k] batch),
    since per-layer calls pay a kernel launch + sync each and a small eigvalsh underuses the GPU;
    ResNet-18's 9 hooks become 2-3 calls. Sizes are grouped, not zero-padded, so the result is exact.
    """
    if len(acts_list) == 0:
        raise ValueError("no activations: was the forward pass run in train mode with the hooks active?")
    device = acts_list[0].device  # all on one device (multi-GPU models: move, never assume cuda:0)
    with _no_autocast(device):
        mats = [_second_moment(a.to(device)) for a in acts_list]
        groups: dict = {}
        for i, m in enumerate(mats):
            groups.setdefault(m.shape[-1], []).append(i)
        out = [None] * len(mats)
        for idx in groups.values():
            eigs = torch.linalg.eigvalsh(torch.stack([mats[i] for i in idx]))
            for i, h in zip(idx, _entropy_from_eigs(eigs)):
                out[i] = h
        return torch.stack(out)


def spectral_entropy(acts: torch.Tensor) -> torch.Tensor:
    """H = -sum p_i log p_i of the normalised covariance spectrum of acts [B, d]; float32, differentiable."""
    return layer_entropies([acts])[0]


def effective_rank(acts: torch.Tensor) -> torch.Tensor:
    return spectral_entropy(acts).exp()


def _warn_if_unreachable(B: int, d: int, beta: float):
    target_rank = d ** beta
    key = (B, d, round(beta, 6))
    if target_rank > B - 1 and key not in _warned_unreachable:
        _warned_unreachable.add(key)
        warnings.warn(
            f"SES target effective rank d^beta = {d}^{beta:g} = {target_rank:.1f} exceeds B-1 = {B - 1}, the "
            f"largest rank a batch of {B} centred samples can have: the target is unreachable for this layer "
            f"(raise the batch size, lower beta, or hook fewer wide layers).", stacklevel=3)


def ses_loss(acts_list, beta, alphas=None) -> torch.Tensor:
    """sum_l alpha_l (H_l - beta log d_l)^2 in float32 (lambda is applied by the caller)."""
    beta = _check_beta(beta)
    H = layer_entropies(acts_list)
    dims = [a.shape[1] for a in acts_list]
    for a, d in zip(acts_list, dims):
        _warn_if_unreachable(a.shape[0], d, beta)
    target = beta * torch.log(torch.tensor(dims, dtype=H.dtype, device=H.device))
    sq = (H - target) ** 2
    if alphas is not None:
        if len(alphas) != len(acts_list):
            raise ValueError(f"got {len(alphas)} alphas for {len(acts_list)} layers")
        sq = sq * torch.as_tensor(alphas, dtype=H.dtype, device=H.device)
    return sq.sum()


def ses_active(step: int, every_k: int = 1) -> bool:
    """Periodic SES: apply the regulariser on every k-th optimiser step (k = 1: every step)."""
    return step % every_k == 0


def erank_stats(acts_list, names, beta) -> dict:
    """Per-layer effective rank and its ratio to the target d^beta (for the per-epoch log)."""
    with torch.no_grad():
        H = layer_entropies(acts_list).double().cpu()
    stats = {}
    for name, a, h in zip(names, acts_list, H):
        d = a.shape[1]
        erank, target = math.exp(h.item()), d ** beta
        stats[name] = {"erank": erank, "d": d, "target": target, "ratio": erank / target}
    return stats


def layer_erank_stats(collector, beta) -> dict:
    return erank_stats(collector.activations, collector.names, beta)


# ── β schedules ──────────────────────────────────────────────────────────────────────────────────

class BetaSchedule:
    """beta as a function of the epoch, as in the reference's adaptive-beta experiment (Exp 16).

    fixed: start | linear: start -> end | cosine: start -> end, slow start (1 - cos) / 2 |
    reverse: linear with start > end (default 0.9 -> 0.3) | step: values[i] until milestone i
    (milestones as fractions of training: default 0.3 -> 0.7 -> 0.9 at 40% and 70%, i.e. epochs 20, 35 of 50).
    Progress t = epoch / (epochs - 1), so the last epoch uses exactly `end`.
    """
    KINDS = ("fixed", "linear", "cosine", "reverse", "step")
    DEFAULTS = {"fixed": (0.7, None), "linear": (0.3, 0.9), "cosine": (0.3, 0.9), "reverse": (0.9, 0.3)}

    def __init__(self, kind="fixed", start=None, end=None, values=(0.3, 0.7, 0.9), milestones=(0.4, 0.7)):
        if kind not in self.KINDS:
            raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(self.KINDS)}")
        d_start, d_end = self.DEFAULTS.get(kind, (None, None))
        self.kind = kind
        self.start = _check_beta(d_start if start is None else start) if kind != "step" else None
        self.end = _check_beta(d_end if end is None else end) if kind in ("linear", "cosine", "reverse") else None
        self.values = tuple(_check_beta(v) for v in values) if kind == "step" else None
        self.milestones = tuple(float(m) for m in milestones) if kind == "step" else None
        if kind == "step" and len(self.values) != len(self.milestones) + 1:
            raise ValueError("step schedule needs len(values) == len(milestones) + 1")

    @classmethod
    def parse(cls, spec) -> "BetaSchedule":
        """0.7 | "fixed:0.7" | "linear:0.3:0.9" | "cosine:0.3:0.9" | "reverse:0.9:0.3" | "step:0.3,0.7,0.9"
        | {"kind": ..., ...} | a BetaSchedule."""
        if isinstance(spec, BetaSchedule):
            return spec
        if _is_real(spec):
            return cls("fixed", start=spec)
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, str):
            kind, *args = spec.split(":")
            if kind == "step":
                return cls("step", values=[float(v) for v in args[0].split(",")]) if args else cls("step")
            nums = [float(a) for a in args]
            return cls(kind, *nums)
        raise ValueError(f"cannot parse beta schedule {spec!r}")

    def value(self, epoch: int, epochs: int) -> float:
        t = epoch / max(epochs - 1, 1)
        if self.kind == "fixed":
            return self.start
        if self.kind in ("linear", "reverse"):
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.start + (self.end - self.start) * 0.5 * (1 - math.cos(math.pi * t))
        frac = epoch / epochs  # step: milestones are fractions of the epochs, as [20, 35] of 50
        return self.values[sum(frac >= m for m in self.milestones)]

    def __repr__(self):
        if self.kind == "step":
            return f"step:{','.join(map(str, self.values))}"
        return f"{self.kind}:{self.start}" + (f":{self.end}" if self.end is not None else "")


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# hooks and the SES object
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# ── hooks ────────────────────────────────────────────────────────────────────────────────────────

def pool_activation(x: torch.Tensor, kind: str = "output", pool="auto") -> torch.Tensor:
    """Pool one hooked tensor to [B, d].

    auto: 4-D conv maps [B,C,H,W] -> mean over H,W; token sequences [B,N,D] -> mean over tokens;
    attention probabilities [B,heads,N,N] (kind "attn_weights") -> mean over queries -> [B, heads*N],
    as the SES reference (ses_vit_attention.py) does: each head's average attention each key receives.
    [B, d] outputs are cloned so that a following inplace op (ReLU(inplace=True)) can't change them
    before the loss reads them; the pooled means are new tensors already.
    """
    if callable(pool):
        return pool(x)
    if pool == "flatten":
        return x.flatten(1)
    if pool not in ("auto", "mean"):
        raise ValueError(f"unknown pool {pool!r}; use 'auto', 'mean', 'flatten' or a callable")
    if kind == "attn_weights":
        if x.dim() != 4:
            raise ValueError(f"attention weights must be [B, heads, N, N]; got {tuple(x.shape)}")
        return x.mean(dim=2).flatten(1)
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 2:
        return x.clone()
    raise ValueError(f"cannot pool an activation of shape {tuple(x.shape)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states x [B, N, D] averaged over the positions mask [B, N] marks (1: a real token, 0: padding) -> [B, D],
    in float32 (a sum over N half-precision values loses digits)."""
    if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"masked_mean needs x [B, N, D] and mask [B, N]; got {tuple(x.shape)} and {tuple(mask.shape)}")
    m = mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class MaskedTokenPool:
    """A `pool` for ActivationCollector / SES that mean-pools token sequences [B, N, D] over the real tokens of the
    current batch only (padding excluded): set `.mask` to the batch's attention mask [B, N] before each forward.
    Anything that is not a token sequence is pooled as pool_activation does."""

    def __init__(self):
        self.mask = None

    def __call__(self, x):
        if x.dim() != 3:
            return pool_activation(x)
        if self.mask is None:
            raise ValueError("MaskedTokenPool: set .mask to the batch's attention mask before the forward pass")
        return masked_mean(x, self.mask)


def _model_family(model) -> str:
    cls = type(model).__name__
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return "vit"
    if cls == "WideResNet":
        return "wrn"
    if hasattr(model, "layer4") and hasattr(model, "avgpool"):
        return "resnet"
    if hasattr(model, "hidden") and isinstance(model.hidden, nn.ModuleList):
        return "mlp"
    return "unknown"


_RESIDUAL_BLOCKS = ("BasicBlock", "Bottleneck", "WideBasic", "ErankBasicBlock")
VIT_TARGETS = ("block", "attn_out", "attn_weights")


def _select(items, spec: str, what: str):
    m = re.fullmatch(r"(first|last)(\d+)", spec)
    if spec == "all":
        return list(items)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= len(items):
            raise ValueError(f"preset {spec!r}: the model has {len(items)} {what}")
        return list(items[:n] if m.group(1) == "first" else items[-n:])
    return None


def hook_targets(model, preset="auto", targets=("block",)):
    """The (name, module, kind) triples SES hooks for a layer preset.

    CNNs (torchvision ResNet, WideResNet): "blocks+pool" (every residual block + avgpool: 9 for
    ResNet-18, 13 for WRN-28-10, 17 for ResNet-50), "layer4+pool" (ResNet-50's Tiny-ImageNet hooks, 4),
    "lastN"/"firstN" (of the blocks+pool list: Exp 9's last 5 / last 3), "pool". auto: ResNet-50
    (Bottleneck) -> layer4+pool, others -> blocks+pool.
    ViTs (the author's SESViT, timm's): "all" (12), "first4", "last4", any firstN/lastN; `targets` picks, per chosen
    block, "block" (block output), "attn_out" (attention sub-layer output, before the residual) and "attn_weights"
    (softmax probabilities [B, heads, N, N]: SESViT's blocks.i.attn_probs, fed when store_attn is set, as the author's
    ses_vit_attention.py; timm's attn.attn_drop input, with non-fused attention; see use_attention_weights).
    Toy MLP: "all" = its 5 hidden layers (after the activation).
    A list of module names (model.named_modules) selects them directly.
    """
    family = _model_family(model)
    if isinstance(preset, (list, tuple)):
        mods = dict(model.named_modules())
        missing = [n for n in preset if n not in mods]
        if missing:
            raise ValueError(f"no module named {missing} in {type(model).__name__}; valid names: {_name_list(mods)}")
        return [(n, mods[n], "attn_weights" if n.endswith(("attn_drop", "attn_probs")) and "attn_weights" in targets
                 else "output") for n in preset]
    if family in ("resnet", "wrn"):
        blocks = [(n, m, "output") for n, m in model.named_modules() if type(m).__name__ in _RESIDUAL_BLOCKS]
        pool = [("avgpool", model.avgpool, "output")]
        bottleneck = any(type(m).__name__ == "Bottleneck" for _, m, _ in blocks)
        if preset == "auto":
            preset = "layer4+pool" if bottleneck else "blocks+pool"
        if preset == "blocks+pool":
            return blocks + pool
        if preset == "layer4+pool" and family == "resnet":
            return [b for b in blocks if b[0].startswith("layer4.")] + pool
        if preset == "pool":
            return pool
        chosen = _select(blocks + pool, preset, "hook points (blocks + pool)")
        if chosen is not None:
            return chosen
        raise ValueError(f"unknown CNN layer preset {preset!r}; known: blocks+pool, layer4+pool (ResNet), "
                         "pool, firstN, lastN, or a list of module names")
    if family == "vit":
        bad = [t for t in targets if t not in VIT_TARGETS]
        if bad or not targets:
            raise ValueError(f"unknown ViT hook target(s) {bad or targets}; known: {', '.join(VIT_TARGETS)}")
        idx = _select(list(range(len(model.blocks))), "all" if preset == "auto" else preset, "blocks")
        if idx is None:
            raise ValueError(f"unknown ViT layer preset {preset!r}; known: all, first4, last4, firstN, lastN")
        out = []
        for t in targets:  # grouped by target: the loss is a sum, order only affects logs
            for i in idx:
                blk = model.blocks[i]
                if t == "block":
                    out.append((f"blocks.{i}", blk, "output"))
                elif t == "attn_out":  # timm's Attention returns the tensor, nn.MultiheadAttention (out, weights)
                    out.append((f"blocks.{i}.attn", blk.attn, "output"))
                elif hasattr(blk, "attn_probs"):  # the author's block (SESViT) with store_attn set
                    out.append((f"blocks.{i}.attn_probs", blk.attn_probs, "attn_weights"))
                else:
                    out.append((f"blocks.{i}.attn.attn_drop", blk.attn.attn_drop, "attn_weights"))
        return out
    if family == "mlp":
        items = [(f"hidden.{i}", m, "output") for i, m in enumerate(model.hidden)]
        chosen = _select(items, "all" if preset in ("auto", "hidden") else preset, "hidden layers")
        if chosen is None:
            raise ValueError(f"unknown MLP layer preset {preset!r}; known: all, firstN, lastN")
        return chosen
    raise ValueError(f"no layer presets for {type(model).__name__}: pass a list of module names, e.g. from "
                     f"{_name_list(dict(model.named_modules()), depth=2)}")


def _name_list(mods, depth=None, limit=40) -> str:
    """Module names for an error message: all of them, or those up to `depth` dots, the first `limit`."""
    names = [n for n in mods if n and (depth is None or n.count(".") < depth)]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def use_attention_weights(model):
    """Make every block's softmax weights [B, heads, N, N] exist where SES hooks them ("attn_weights").

    The author's SESViT: store_attn on (ses_vit_attention.py's flag: the attention is called with need_weights=True,
    average_attn_weights=False and the per-head weights pass through blocks.i.attn_probs); its output is unchanged.
    timm: the non-fused path, since the fused one (F.scaled_dot_product_attention) never materialises the
    probabilities; it is faster and lighter, so only call this when SES hooks attention weights.
    """
    for blk in model.blocks:
        if hasattr(blk, "store_attn"):
            blk.store_attn = True
        else:
            blk.attn.fused_attn = False
    return model


class ActivationCollector:
    """Forward hooks that keep one pooled [B, d] activation per hooked module for the SES loss.

    layers: a preset name (see hook_targets), a list of module names, or (name, module[, kind]) tuples.
    Pooling happens inside the hook (memory stays O(B*d), and inplace ops that follow can't alter it).
    Nothing is stored while a hooked module is in eval mode or inside `with collector.paused():`, so
    evaluation never accumulates activations. Each forward overwrites the previous one (per name).
    """

    def __init__(self, model, layers="auto", pool="auto", targets=("block",)):
        if isinstance(layers, str) or (isinstance(layers, (list, tuple)) and layers and isinstance(layers[0], str)):
            triples = hook_targets(model, layers, targets)
        else:
            triples = [(t[0], t[1], t[2] if len(t) > 2 else "output") for t in layers]
        if not triples:
            raise ValueError("ActivationCollector needs at least one layer to hook")
        self.names = [n for n, _, _ in triples]
        self.kinds = {n: k for n, _, k in triples}
        self.pool = pool
        self.gate = None  # optional callable: the hooks store only while it returns True (periodic SES)
        self._acts: dict = {}
        self._paused = False
        self._handles = []
        for name, module, kind in triples:
            if kind == "attn_weights":
                attn = next((m for m in model.modules() if getattr(m, "attn_drop", None) is module), None)
                if attn is not None and getattr(attn, "fused_attn", False):
                    raise ValueError(
                        f"{name}: timm's fused attention never materialises the attention weights, so this hook "
                        "would never fire. Call seslib.use_attention_weights(model) (or "
                        "timm.layers.set_fused_attn(False) before building the model) first.")
                blk = next((m for m in model.modules() if getattr(m, "attn_probs", None) is module), None)
                if blk is not None and not getattr(blk, "store_attn", True):
                    raise ValueError(f"{name}: the block's store_attn is off, so its attention weights never reach "
                                     "this hook. Call seslib.use_attention_weights(model) first.")
                self._handles.append(module.register_forward_hook(self._make_hook(name, kind, use_input=True)))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(name, kind)))

    def _make_hook(self, name, kind, use_input=False):
        def hook(module, inputs, output):
            if self._paused or not module.training or (self.gate is not None and not self.gate()):
                return
            x = inputs[0] if use_input else output
            if isinstance(x, (tuple, list)) and x:
                x = x[0]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(x).__name__}, not a tensor SES can pool: hook one of "
                                 "its submodules instead")
            try:
                self._acts[name] = pool_activation(x, kind, self.pool)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from None
        return hook

    @property
    def activations(self) -> list:
        if self._acts and len(self._acts) != len(self.names):
            missing = [n for n in self.names if n not in self._acts]
            raise RuntimeError(f"hooks did not fire for {missing} (timm's fused attention on, or SESViT's store_attn "
                               "off? see use_attention_weights)")
        return [self._acts[n] for n in self.names if n in self._acts]

    @property
    def dims(self) -> list:
        return [a.shape[1] for a in self.activations]

    def clear(self):
        self._acts = {}

    @contextlib.contextmanager
    def paused(self):
        prev, self._paused = self._paused, True
        self.clear()
        try:
            yield self
        finally:
            self._paused = prev

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        return f"ActivationCollector({len(self.names)} hooks: {', '.join(self.names)})"


class SES:
    """Spectral Entropy Shaping on any nn.Module, in your own training loop:

        ses = SES(model, layers="auto", beta=0.7, lam=0.01)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + ses()   # lam * sum_l (H_l - beta log d_l)^2 of this batch
            opt.zero_grad(); loss.backward(); opt.step()

    layers: "auto" (the suite's presets for torchvision ResNets, WideResNet and the ViTs: every residual block
    + avgpool, ResNet-50's layer4 + avgpool, all 12 ViT blocks), a preset name (see hook_targets), or a list of
    module names. every_k: SES on every k-th step only; on the others the hooks store nothing and ses() returns 0.
    schedule: a beta schedule (BetaSchedule.parse spec), applied by ses.set_epoch(epoch, epochs).
    Hooks store nothing in eval mode or inside `with ses.paused():`. ses.erank() / ses.report(): per-layer effective
    rank, d, target d^beta and their ratio on the last SES batch. train() uses this same object."""

    def __init__(self, model, layers="auto", beta=0.7, lam=0.01, every_k=1, schedule=None, targets=("block",),
                 pool="auto"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"SES needs an nn.Module; got {type(model).__name__}")
        if not _is_num(lam) or lam < 0:
            raise ValueError(f"lam must be a number >= 0; got {lam!r}")
        if not _is_int(every_k) or every_k < 1:
            raise ValueError(f"every_k must be an int >= 1; got {every_k!r}")
        self.model, self.beta = model, _check_beta(beta)
        self.lam, self.every_k = float(lam), every_k
        self.schedule = BetaSchedule.parse(schedule) if schedule is not None else None
        if "attn_weights" in targets and hasattr(model, "blocks"):
            use_attention_weights(model)  # SESViT: store_attn on; timm: its fused attention never materialises them
        self.collector = ActivationCollector(model, layers, pool=pool, targets=tuple(targets))
        self.collector.gate = lambda: self.active or self._measuring
        self.step = 0  # ses() calls so far: the optimiser step the next forward belongs to
        self._measuring = False
        self.last_loss = None  # sum_l (H_l - beta log d_l)^2 of the last SES batch (lambda not applied), detached
        self._last = None

    @property
    def names(self) -> list:
        return self.collector.names

    @property
    def active(self) -> bool:
        """Whether SES applies on the current step (every_k); lam = 0 switches it off."""
        return self.lam > 0 and ses_active(self.step, self.every_k)

    def set_epoch(self, epoch, epochs):
        """beta of the schedule for this epoch (no-op without a schedule); returns beta."""
        if self.schedule is not None:
            self.beta = self.schedule.value(epoch, epochs)
        return self.beta

    def __call__(self, gather=None) -> torch.Tensor:
        """lam * sum_l (H_l - beta log d_l)^2 for the batch of the last forward (0 on a step SES skips), and one step
        on. gather: maps the pooled activations before the loss (DDP: gather_activations, the global batch)."""
        active, self.step = self.active, self.step + 1
        acts = self.collector.activations if active else []
        self.collector.clear()
        if not acts:
            self.last_loss = None
            if active:
                raise RuntimeError(f"SES hooks stored nothing for {self.names}: was the forward pass run in train mode "
                                   "(model.train()) before calling ses()?")
            return torch.zeros((), device=next(self.model.parameters(), torch.empty(0)).device)
        acts = gather(acts) if gather is not None else acts
        reg = ses_loss(acts, self.beta)
        self.last_loss, self._last = reg.detach(), [a.detach() for a in acts]
        return self.lam * reg

    def erank(self) -> dict:
        """{layer: {erank, d, target, ratio}} of the last batch SES was computed on."""
        if self._last is None:
            raise RuntimeError("no SES batch yet: call ses() after a training forward pass first")
        return erank_stats(self._last, self.names, self.beta)

    def report(self):
        """erank() as a table (pandas), one row per hooked layer."""
        import pandas as pd
        return pd.DataFrame(self.erank()).T.rename_axis("layer")

    @contextlib.contextmanager
    def measuring(self):
        """Let the hooks store on any step (e.g. to measure erank on a fixed batch), whatever every_k says."""
        prev, self._measuring = self._measuring, True
        try:
            yield self.collector
        finally:
            self._measuring = prev

    def paused(self):
        return self.collector.paused()

    def remove(self):
        self.collector.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"SES(beta={self.beta:g}, lam={self.lam:g}, every_k={self.every_k}, {len(self.names)} layers: "
                f"{', '.join(self.names)})")


def pooled_activations(model, layers, x, batch_size=512, amp_dtype=None):
    """{layer name: pooled [N, d] float32 activations (CPU)} of `model` on the normalised images x, in the model's
    current mode, through temporary hooks (any mode: ActivationCollector stores only in train mode by design).
    layers: (name, kind) pairs, as ActivationCollector.names / .kinds."""
    modules = dict(model.named_modules())
    out = {name: [] for name, _ in layers}
    handles = []
    for name, kind in layers:
        def hook(module, inputs, output, name=name, kind=kind):
            t = inputs[0] if kind == "attn_weights" else output
            t = t[0] if isinstance(t, (tuple, list)) else t
            out[name].append(pool_activation(t, kind).float().cpu())
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                with autocast(x.device, amp_dtype):
                    model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# data
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# Per-channel pixel statistics of each training set (in [0, 1] units, as torchvision Normalize).
DATASETS = read_only({
    "cifar10": {"num_classes": 10, "img_size": 32, "folder": "cifar-10-batches-py", "sizes": (50000, 10000),
                "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"num_classes": 100, "img_size": 32, "folder": "cifar-100-python", "sizes": (50000, 10000),
                 "mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)},
    "tinyimagenet": {"num_classes": 200, "img_size": 64, "folder": "tiny-imagenet-200", "sizes": (100000, 10000),
                     "mean": (0.4802, 0.4481, 0.3975), "std": (0.2770, 0.2691, 0.2821)},
})
# files whose presence identifies each official layout
_LAYOUT = {"cifar10": ("data_batch_1", "test_batch"), "cifar100": ("train", "test"),
           "tinyimagenet": ("wnids.txt", "train", "val/val_annotations.txt")}
_KAGGLE_HINT = {"cifar10": "a CIFAR-10 python-version dataset", "cifar100": "a CIFAR-100 python-version dataset",
                "tinyimagenet": "a Tiny-ImageNet-200 dataset (the official tiny-imagenet-200/ folder)"}
_IMG_SUFFIXES = (".jpeg", ".jpg", ".png")


def dataset_info(name) -> dict:
    """num_classes, img_size, mean, std (and the official folder name) of a known dataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return dict(DATASETS[name])


def _has_layout(name, folder: Path) -> bool:
    return all((folder / f).exists() for f in _LAYOUT[name])


def _search(name, base: Path, max_depth: int):
    """The folder under base (base/<official name>, base itself, then up to max_depth levels) with the layout."""
    if not base.is_dir():
        return None
    for d in (base / DATASETS[name]["folder"], base):
        if _has_layout(name, d):
            return d
    for dirpath, dirnames, _ in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
        dirnames.sort()
        if _has_layout(name, Path(dirpath)):
            return Path(dirpath)
        if len(Path(dirpath).relative_to(base).parts) >= max_depth:
            dirnames[:] = []
    return None


def _candidate_roots(root):
    """(label, path, search depth) in resolution order: an explicit root alone (it is authoritative: the user said
    where the data is), else SES_DATA, Kaggle inputs, ./data."""
    if root is not None:
        return [("data_root", Path(root).expanduser(), 2)]
    cands = []
    if os.environ.get(DATA_ENV):
        cands.append((DATA_ENV, Path(os.environ[DATA_ENV]).expanduser(), 2))
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        cands.append(("Kaggle inputs", Path("/kaggle/input"), 4))  # attached datasets nest a level or two
    cands.append(("./data", Path("data").resolve(), 2))
    return cands


def resolve_data_dir(name, root=None, download=True) -> Path:
    """The folder holding `name`'s official layout. An explicit root is searched alone (and must exist); without
    one: $SES_DATA, /kaggle/input/** (on Kaggle), ./data. CIFAR is downloaded with torchvision when found nowhere
    (a failed download leaves nothing behind); otherwise a FileNotFoundError names every place tried and how to
    provide the data. Never falls back to fake data."""
    dataset_info(name)
    if root is not None and not Path(root).expanduser().exists():
        raise FileNotFoundError(f"data_root {root} does not exist (an explicit data_root is used as given: fix the "
                                "path, or leave it None to search $SES_DATA, Kaggle inputs and ./data)")
    tried = []
    for label, base, depth in _candidate_roots(root):
        found = _search(name, base, depth)
        if found is not None:
            return found
        tried.append(f"{label}: {base}")
    folder = DATASETS[name]["folder"]
    how = (f"Provide it with SES_DATA=/path/holding/{folder}/ (or its parent), the data_root=... argument/"
           f"notebook parameter, or on Kaggle by attaching {_KAGGLE_HINT[name]} to the notebook.")
    if name in ("cifar10", "cifar100") and download:
        target = Path(root).expanduser() if root is not None else Path("data").resolve()
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        existed = target.exists()
        before = set(target.iterdir()) if existed else set()
        try:
            for train in (True, False):
                cls(root=str(target), train=train, download=True)
        except Exception as e:  # no network, disk full, bad checksum...: remove what the attempt created
            for f in (set(target.iterdir()) if target.exists() else set()) - before:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
            if not existed and target.exists() and not any(target.iterdir()):
                target.rmdir()
            raise FileNotFoundError(f"{name} not found in: {'; '.join(tried)}; downloading it into {target} "
                                    f"failed ({type(e).__name__}: {e}). {how}") from e
        if _has_layout(name, target / folder):
            return target / folder
        tried.append(f"download target: {target}")
    raise FileNotFoundError(f"{name} ({folder}/) not found in: {'; '.join(tried)}. {how}")


# ── CIFAR python batches: an attached data set is untrusted input ────────────────────────────────
# Unpickling can call any importable function; the official batches reference only numpy's array reconstruction, so
# nothing else is resolved (plus the bytes and protocol-5 forms of the same arrays, for batches re-pickled by Python 3).
# numpy's functions are taken from numpy itself: their module moved (numpy.core -> numpy._core in numpy 2) and files
# written by either spell it their way.
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_bytes(text, encoding):
    """_codecs.encode as a batch re-pickled by Python 3 at protocol 2 uses it (for bytes), and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


_CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
                         ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
                         ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
                         ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
                         ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                         ("_codecs", "encode"): _latin1_bytes}
_CIFAR_REMEDY = "re-download or re-extract the data set"


class _RefusedGlobal(ValueError):
    """A global outside _CIFAR_PICKLE_GLOBALS; its message names the file already."""


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only _CIFAR_PICKLE_GLOBALS (lists, dicts, ints and strings need no global)."""

    def __init__(self, fh, path):
        super().__init__(fh, encoding="latin1")  # as pickle.load(fh, encoding="latin1") read them before
        self.path = path

    def find_class(self, module, name):  # also reached by the EXT opcodes: no other way to a global
        found = _CIFAR_PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{self.path}: refused to load {module}.{name}: a CIFAR python batch references "
                                 "only numpy arrays, so this file is not one and could run code; use the official "
                                 "data set")
        return found


def _bad_batch(path, what, cause=None) -> ValueError:
    """One line naming the file, what is wrong (and the exception behind it) and what to do."""
    if cause is not None:
        what += f" ({str(cause).splitlines()[0] if str(cause) else type(cause).__name__})"
    return ValueError(f"{path}: {what}: {_CIFAR_REMEDY}")


def _unpickle_cifar_batch(path: Path):
    """The object a batch file holds; a truncated, empty or foreign file is a ValueError naming it."""
    try:
        with open(path, "rb") as fh:  # the official pickles, read directly: no md5 check on shortened copies
            return _CifarUnpickler(fh, path).load()
    except _RefusedGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError) as e:  # what the unpickler raises on bytes it cannot read
        raise _bad_batch(path, "truncated or not a CIFAR python batch", e) from None


def _batch_array(path, value, what) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise _bad_batch(path, f"{what} is not an array", e) from None


def _cifar_pixels(path, data) -> np.ndarray:
    """`data` as uint8 [N, 3, 32, 32]: N rows of 3*32*32 values, converted only where nothing is lost."""
    data = _batch_array(path, data, "'data'")
    if data.ndim < 2 or math.prod(data.shape[1:]) != 3 * 32 * 32:
        got = f"rows of {math.prod(data.shape[1:])} values" if data.ndim >= 2 else f"shape {data.shape}"
        raise _bad_batch(path, f"'data' has {got}, not 3072 (3x32x32) per image")
    if data.dtype != np.uint8:  # another integer or float type is fine when every value is a whole 0..255
        lossless = data.dtype.kind in "iuf" and bool(np.all((data >= 0) & (data <= 255) & (data == np.round(data))))
        if not lossless:
            raise _bad_batch(path, f"the pixels are not uint8 0..255 ('data' is {data.dtype} and does not "
                                   "convert without loss)")
    return data.astype(np.uint8, copy=False).reshape(len(data), 3, 32, 32)


def _cifar_labels(path, labels, key, n, num_classes) -> np.ndarray:
    """`labels` as int64 [n], every one a class index: a short or foreign list would mislabel the batches after it."""
    labels = _batch_array(path, labels, f"{key!r}")
    if labels.ndim != 1:
        raise _bad_batch(path, f"{key!r} has shape {labels.shape}, not a list of {n} labels")
    if len(labels) != n:
        raise _bad_batch(path, f"{n} images but {len(labels)} labels in {key!r}")
    if n and labels.dtype.kind not in "iu":
        raise _bad_batch(path, f"{key!r} are not integers ({labels.dtype})")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise _bad_batch(path, f"{key!r} outside [0, {num_classes}): {int(bad[0])} ({bad.size} of {n} labels)")
    return labels.astype(np.int64, copy=False)


def _read_cifar_batch(name, path: Path, key):
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) of one batch file, checked as read: a damaged or foreign
    file fails here naming itself, not later as a bare IndexError mid-training."""
    entry = _unpickle_cifar_batch(path)
    if not isinstance(entry, dict):
        raise _bad_batch(path, f"a {type(entry).__name__}, not a dict with 'data' and {key!r}: not a {name} batch")
    missing = [k for k in ("data", key) if k not in entry]
    if missing:
        keys = ", ".join(map(repr, list(entry)[:8]))
        raise _bad_batch(path, f"no {' or '.join(map(repr, missing))} (its keys: {keys}): not a {name} batch")
    x = _cifar_pixels(path, entry["data"])
    return x, _cifar_labels(path, entry[key], key, len(x), DATASETS[name]["num_classes"])


def _load_cifar(name, d: Path, split):
    if name == "cifar10":
        files, key = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]), "labels"
    else:
        files, key = (["train"] if split == "train" else ["test"]), "fine_labels"
    xs, ys = [], []
    for f in files:
        if not (d / f).exists():
            raise FileNotFoundError(f"{name}: {d / f} is missing (incomplete copy of {d.name}/?)")
        x, y = _read_cifar_batch(name, d / f, key)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def tinyimagenet_classes(d) -> list:
    """The wnids in class-index order: sorted, as torchvision ImageFolder (and Tiny-ImageNet-C folders) order them."""
    return sorted(w.strip() for w in (Path(d) / "wnids.txt").read_text().split() if w.strip())


def tinyimagenet_val_files(d) -> list:
    """The val image file names in val_annotations.txt order: load_dataset(..., "test") and Tiny-ImageNet-C's
    <corruption>/<severity>/<wnid>/<file> share them, so official corrupted images can be matched one to one."""
    return [ln.split("\t")[0] for ln in (Path(d) / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]


def _decode_rgb(path):
    # PIL, not torchvision.io (its decoders are deprecated since torchvision 0.29 in favour of TorchCodec)
    from PIL import Image
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # greyscale JPEGs -> 3 channels
    except (OSError, ValueError, SyntaxError) as e:  # truncated, empty or not an image: name the file
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); re-copy or remove it") from None


def _decode_images(paths) -> list:
    """The images as uint8 [3, H, W] tensors (RGB). PIL releases the GIL while decoding: threads cut the
    ~100k-image Tiny-ImageNet train set's load time."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        return list(ex.map(_decode_rgb, paths))


def _load_tinyimagenet(d: Path, split, subset=None):
    wnids = tinyimagenet_classes(d)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        per_class = [sorted(p for p in (d / "train" / w / "images").glob("*") if p.suffix.lower() in _IMG_SUFFIXES)
                     for w in wnids]
        # round-robin over classes (1st image of every class, then the 2nd, ...): every prefix, e.g. a
        # smoke subset or the erank batch, is class-balanced instead of holding class 0 only
        order = sorted((j, c) for c, files in enumerate(per_class) for j in range(len(files)))
        paths, labels = [per_class[c][j] for j, c in order], [c for _, c in order]
    else:  # the labelled val split is the test set (the official test/ folder has no labels)
        rows = [ln.split("\t") for ln in (d / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]
        paths = [d / "val" / "images" / r[0] for r in rows]
        labels = [index[r[1]] for r in rows]
    paths, labels = paths[:subset], labels[:subset]  # decode only what is used
    if not paths:
        raise FileNotFoundError(f"tinyimagenet: no {split} images under {d}")
    imgs = _decode_images(paths)
    bad = [str(p) for p, im in zip(paths, imgs) if tuple(im.shape) != (3, 64, 64)]
    if bad:
        raise ValueError(f"tinyimagenet: {len(bad)} images are not 64x64, e.g. {bad[0]}")
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)


def load_dataset(name, root=None, split="train", download=True, subset=None):
    """(uint8 images [N, 3, H, W], int64 labels [N]) of cifar10 | cifar100 | tinyimagenet, split train | test
    ("val" = "test" for Tiny-ImageNet, whose labelled val set is the test set); subset: the first n images.
    Order: CIFAR as in the official batches; Tiny-ImageNet train round-robin over the classes (sorted wnids),
    val as in val_annotations.txt. See resolve_data_dir for how root is found."""
    dataset_info(name)
    if subset is not None and (not _is_int(subset) or subset < 1):
        raise ValueError(f"subset must be None or an int >= 1; got {subset!r}")
    if split == "val" and name == "tinyimagenet":
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    d = resolve_data_dir(name, root, download)
    if name == "tinyimagenet":
        return _load_tinyimagenet(d, split, subset)
    x, y = _load_cifar(name, d, split)
    return x[:subset], y[:subset]


def normalize_u8(x, mean=None, std=None):
    """uint8 images [N, C, H, W] -> the model's float input on x's device: ToTensor's /255, then Normalize(mean, std)
    when given, exactly as torchvision computes them (the evaluations and the paper protocol replay rely on that).
    DeviceLoader folds the same two steps into one multiply-add per batch (its hot path)."""
    x = x.float() / 255
    if mean is None:
        return x
    m, s = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - m) / s


def random_crop_flip(x, oy, ox, flip, pad=4):
    """Per-sample random crop (zero padding, as torchvision RandomCrop(size, padding=pad)) + horizontal flip
    of a uint8 batch [B, C, H, W], vectorised. oy, ox in [0, 2*pad]: crop offsets in the padded image;
    flip: bool [B]. unfold makes a [B, C, 2p+1, 2p+1, H, W] view of every possible crop (no copy); one
    advanced-indexing gather picks each sample's own (10x faster on CPU than gathering pixel indices)."""
    B, C, H, W = x.shape
    crops = F.pad(x, (pad, pad, pad, pad)).unfold(2, H, 1).unfold(3, W, 1)
    out = crops[torch.arange(B, device=x.device), :, oy, ox]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


_JITTER_KEYS = ("brightness", "contrast", "saturation")  # ColorJitter's ops, in color_jitter's factor order


def _pil_luma(x):
    """PIL's RGB -> L conversion (ImagingConvert rgb2l: fixed-point ITU-R 601-2 luma, rounded) of a uint8-valued
    float batch [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[:, None].to(x.dtype)


def _pil_blend(degenerate, img, factor):
    """Image.blend(degenerate, img, factor) on uint8-valued floats: float32 maths, then C's (UINT8) truncation
    (Pillow's ImagingBlend), which ImageEnhance uses for every adjustment."""
    return (degenerate + factor * (img - degenerate)).clamp(0, 255).floor()


def color_jitter(x, factors, order):
    """torchvision ColorJitter(brightness, contrast, saturation) on PIL images, per sample, for a uint8 batch
    [B, 3, H, W] on any device: factors [B, 3] (brightness, contrast, saturation; 1 = unchanged) and order
    [B, 3] (each row a permutation of 0, 1, 2: ColorJitter applies its ops in a random order per image).
    PIL's ImageEnhance.Brightness / Contrast / Color exactly (what torchvision's functional ops call on PIL
    images, as the Tiny-ImageNet script does): blend with black, with the rounded mean luma, with the luma image.
    Batched (each step computes all three ops and keeps each image's own), since a per-image PIL loop would be
    the input pipeline's bottleneck on a GPU box with few CPU cores."""
    y = x.float()
    f = factors.to(device=x.device, dtype=torch.float32)
    rows = torch.arange(len(y), device=x.device)
    for step in range(3):
        op = order[:, step].to(x.device)
        luma = _pil_luma(y)
        mean = torch.floor(luma.mean((1, 2, 3), keepdim=True, dtype=torch.float64) + 0.5).float()
        # one blend per image with its own op's degenerate image (computing all three and picking cost 3x):
        # black (Brightness), its rounded mean luma (Contrast), its luma image (Color, i.e. saturation)
        degenerate = torch.where((op == 0).view(-1, 1, 1, 1), 0.0,
                                 torch.where((op == 1).view(-1, 1, 1, 1), mean, luma)).expand_as(y)
        y = _pil_blend(degenerate, y, f[rows, op].view(-1, 1, 1, 1))
    return y.to(torch.uint8)


def draw_color_jitter(n, strengths, generator):
    """Per-sample (factors [n, 3], order [n, 3]) for color_jitter: factor ~ U[1 - s, 1 + s] per op (s = 0: the op
    is skipped by torchvision; factor 1 is the identity here), op order a uniform random permutation."""
    s = torch.tensor([strengths[k] for k in _JITTER_KEYS])
    factors = 1 + s * (2 * torch.rand(n, 3, generator=generator) - 1)
    return factors, torch.argsort(torch.rand(n, 3, generator=generator), dim=1)


class BatchRandAugment:
    """RandAugment(num_ops, magnitude) drawn PER IMAGE for a uint8 batch [B, C, H, W], on its device.

    torchvision's v2.RandAugment draws one op for a whole batched tensor, and calling it image by image is
    a Python loop of B x num_ops small ops (slow: see bench/data_pipeline.py). Here each image draws its
    own (op, sign) for every slot, exactly as v2.RandAugment does per call, and the images that drew the
    same (op, sign) go through torchvision's own op implementation together (<= 23 calls per slot): same
    ops, magnitudes and per-image distribution, far fewer launches. If this torchvision lacks the
    (private) per-op entry point, it falls back to the per-image loop."""

    def __init__(self, num_ops=2, magnitude=9):
        from torchvision.transforms import v2
        self.ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.ops = list(self.ra._AUGMENTATION_SPACE.items())
        self.signed = torch.tensor([int(signed) for _, (_, signed) in self.ops])
        self.grouped = hasattr(self.ra, "_apply_image_or_video_transform")

    def draw(self, n, generator):
        """(op index, sign) per slot and image: two int tensors [num_ops, n] (CPU)."""
        return (torch.randint(len(self.ops), (self.ra.num_ops, n), generator=generator),
                torch.randint(2, (self.ra.num_ops, n), generator=generator))

    def apply_op(self, x, k, negative=False):
        """Op k of the RandAugment table at the set magnitude (negated if negative and the op is signed)."""
        name, (mags_fn, signed) = self.ops[k]
        mags = mags_fn(self.ra.num_magnitude_bins, x.shape[-2], x.shape[-1])
        m = float(mags[self.ra.magnitude]) if mags is not None and mags.ndim > 0 else 0.0
        m = -m if (signed and negative) else m
        return self.ra._apply_image_or_video_transform(x, name, m, interpolation=self.ra.interpolation,
                                                       fill=self.ra._fill)

    def __call__(self, x, ops, signs):
        if not self.grouped:  # per-image loop (torch's global RNG draws the ops then)
            return torch.stack([self.ra(img) for img in x])
        x = x.clone()
        for slot in range(len(ops)):
            key = ops[slot] * 2 + signs[slot] * self.signed[ops[slot]]  # unsigned ops ignore the sign
            for g in key.unique().tolist():
                idx = (key == g).nonzero().flatten().to(x.device)
                x[idx] = self.apply_op(x.index_select(0, idx), g // 2, bool(g % 2))
        return x


class DeviceLoader:
    """Batches from a uint8 dataset kept whole on the training device.

    Per batch, on the device: random crop (zero padding `pad`) + horizontal flip with per-sample randomness,
    optional ColorJitter per sample (color_jitter: {brightness, contrast, saturation} strengths, PIL-exact),
    optional RandAugment(num_ops, magnitude) drawn per image (BatchRandAugment), normalisation to float32. Every
    random draw (shuffle, crops, flips, jitter, RandAugment ops) comes from one seeded CPU torch.Generator (identical on
    every device, checkpointable via state_dict). Training: shuffled, drop_last; eval (train=False): in
    order, no augmentation, last partial batch kept.

    Ready for data parallelism: batch_size is the GLOBAL batch; with world_size > 1 each rank takes its
    contiguous slice of every global batch of the shared permutation, and the augmentation draws are
    made for the whole global batch, so the union over ranks equals the single-process batch.
    """

    def __init__(self, images, labels, batch_size, *, mean, std, device="cpu", train=True, augment="standard",
                 pad=4, hflip=True, color_jitter=None, randaugment=(2, 9), seed=0, max_steps=None, rank=0,
                 world_size=1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if augment not in ("standard", "randaugment", "none"):
            raise ValueError(f"augment must be 'standard', 'randaugment' or 'none'; got {augment!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.train, self.pad, self.hflip, self.max_steps = batch_size, train, pad, hflip, max_steps
        self.augment = augment if train else "none"
        self.jitter = color_jitter if train and color_jitter and any(color_jitter.values()) else None
        self.rank, self.world_size = rank, world_size
        m, s = (torch.tensor(v, device=self.device, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        # normalize_u8 folded into one multiply-add per batch (the hot path): (x/255 - mean)/std = x * scale + bias
        self.scale, self.bias = 1.0 / (255.0 * s), -m / s
        self.generator = torch.Generator().manual_seed(seed)
        self._randaug = BatchRandAugment(*randaugment) if self.augment == "randaugment" else None
        if len(self) == 0:
            raise ValueError(f"{len(images)} images give no full batch of {batch_size} (drop_last)")

    def __len__(self):
        n, b = len(self.images), self.batch_size
        steps = n // b if self.train else -(-n // b)
        return min(steps, self.max_steps) if self.max_steps else steps

    def normalize(self, x_uint8):
        return x_uint8.float().mul_(self.scale).add_(self.bias)  # in place: one pass less than (x - m) / s

    def __iter__(self):
        n, b = len(self.images), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for s in range(len(self)):
            idx = order[s * b:(s + 1) * b]
            if self.augment != "none":  # draws for the whole global batch, then sliced: rank-count invariant
                off = torch.randint(0, 2 * self.pad + 1, (2, len(idx)), generator=self.generator)
                flip = (torch.rand(len(idx), generator=self.generator) < 0.5) & self.hflip
            if self.jitter is not None:
                cj_factors, cj_order = draw_color_jitter(len(idx), self.jitter, self.generator)
            if self._randaug is not None:
                ra_ops, ra_signs = self._randaug.draw(len(idx), self.generator)
            lo, hi = self.rank * len(idx) // self.world_size, (self.rank + 1) * len(idx) // self.world_size
            sl = slice(lo, hi)
            i = idx[sl].to(self.device, non_blocking=True)
            x, y = self.images.index_select(0, i), self.labels.index_select(0, i)
            if self.augment != "none":
                x = random_crop_flip(x, off[0, sl].to(self.device), off[1, sl].to(self.device),
                                     flip[sl].to(self.device), self.pad)
            if self.jitter is not None:  # after crop + flip, as in the Tiny-ImageNet script's Compose
                x = color_jitter(x, cj_factors[sl], cj_order[sl])
            if self._randaug is not None:  # per-image op draws (v2.RandAugment on a batch would pick one op)
                x = self._randaug(x, ra_ops[:, sl], ra_signs[:, sl])
            yield self.normalize(x), y

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ── GLUE text (Exp 22): SST-2 and MRPC as GLUE distributes them (TSV files), or the `datasets` library's copy ──
# GLUE's files: SST-2/{train,dev}.tsv with a "sentence<TAB>label" header; MRPC/{train,dev}.tsv with "Quality<TAB>#1 ID
# <TAB>#2 ID<TAB>#1 String<TAB>#2 String" (label = Quality). "dev" is GLUE's validation split, the author's val set.
GLUE_TASKS = read_only({
    "sst2": {"name": "GLUE SST-2", "folder": "SST-2", "sizes": (67349, 872), "text": ("sentence", None),
             "label": "label", "hf": ("sentence", None)},
    "mrpc": {"name": "GLUE MRPC", "folder": "MRPC", "sizes": (3668, 408), "text": ("#1 String", "#2 String"),
             "label": "Quality", "hf": ("sentence1", "sentence2")},
})
GLUE_SPLITS = read_only({"train": ("train.tsv", "train"), "dev": ("dev.tsv", "validation")})  # -> (GLUE file, datasets')
HF_HUB_ID = "nyu-mll/glue"  # the `datasets` id of GLUE (the author's load_dataset("glue", task); same data)


def hub_reachable(timeout=3.0) -> bool:
    """Whether the Hugging Face hub answers (HF_ENDPOINT, default huggingface.co), in at most `timeout` seconds: offline,
    a download attempt would retry for about a minute before failing. HF_HUB_OFFLINE=1 means no."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = re.sub(r"^\w+://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout).close()
        return True
    except OSError:
        return False


def glue_task(task) -> dict:
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
    return dict(GLUE_TASKS[task])


def _glue_search(task, base: Path, max_depth: int):
    """The folder under base named as GLUE names the task's (SST-2, MRPC; or sst2, mrpc) holding train.tsv and dev.tsv."""
    names = {GLUE_TASKS[task]["folder"].lower(), task}
    if not base.is_dir():
        return None
    for dirpath, dirnames, files in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
        dirnames.sort()
        d = Path(dirpath)
        if d.name.lower() in names and {"train.tsv", "dev.tsv"} <= set(files):
            return d
        if len(d.relative_to(base).parts) >= max_depth:
            dirnames[:] = []
    return None


def resolve_glue_dir(task, root=None):
    """(the folder holding the task's GLUE TSV files or None, the places tried): under data_root, else $SES_DATA,
    Kaggle inputs, ./data (as the image data sets are found)."""
    glue_task(task)
    tried = []
    for label, base, depth in _candidate_roots(root):
        found = _glue_search(task, base, depth + 1)  # one more level: GLUE's own glue_data/
        if found is not None:
            return found, tried
        tried.append(f"{label}: {base}")
    return None, tried


def read_glue_tsv(path, task):
    """(first texts, second texts or None, int labels) of one GLUE TSV file, columns found by the header's names. GLUE's
    files hold unbalanced quotes, so no quoting is parsed (QUOTE_NONE, as `datasets` reads them); a BOM is dropped
    (MRPC's header has one). A row with a missing column or a label not 0/1 is an error naming the file and line."""
    import csv
    info = glue_task(task)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: empty file; re-download or re-extract the GLUE data")
    head = [h.strip() for h in rows[0]]
    want = [c for c in (*info["text"], info["label"]) if c]
    if any(c not in head for c in want):
        raise ValueError(f"{path}: header {head} lacks {[c for c in want if c not in head]} ({info['name']}'s columns "
                         f"are {want}): not GLUE's {info['folder']}/{Path(path).name}")
    idx = [head.index(c) if c else None for c in (*info["text"], info["label"])]
    a, b, y = [], [] if idx[1] is not None else None, []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(i for i in idx if i is not None) or row[idx[2]].strip() not in ("0", "1"):
            raise ValueError(f"{path}, line {line}: expected {len(head)} tab-separated columns with a 0/1 "
                             f"{info['label']}; got {row!r}")
        a.append(row[idx[0]])
        if b is not None:
            b.append(row[idx[1]])
        y.append(int(row[idx[2]]))
    return a, b, y


def _glue_from_datasets(task, split):
    """The split from the `datasets` library (downloads it once, then its cache); None when it cannot."""
    if importlib.util.find_spec("datasets") is None or not hub_reachable():
        return None
    from datasets import load_dataset
    ds = load_dataset(HF_HUB_ID, task, split=GLUE_SPLITS[split][1])
    ka, kb = GLUE_TASKS[task]["hf"]
    return list(ds[ka]), list(ds[kb]) if kb else None, [int(v) for v in ds["label"]]


def load_glue(task, split="train", root=None, download=True):
    """(first texts, second texts or None, labels) of a GLUE task's split ("train" | "dev"): GLUE's TSV files found
    under data_root / $SES_DATA / Kaggle inputs / ./data, else (download) the `datasets` library's copy when the hub
    answers. Neither: FileNotFoundError in one line saying what to attach. Never synthetic (that is the smoke
    preset's own, labelled, text)."""
    info = glue_task(task)
    if split not in GLUE_SPLITS:
        raise ValueError(f"unknown GLUE split {split!r}; known: {', '.join(GLUE_SPLITS)}")
    d, tried = resolve_glue_dir(task, root)
    if d is not None:
        return read_glue_tsv(d / GLUE_SPLITS[split][0], task)
    got = _glue_from_datasets(task, split) if download else None
    if got is not None:
        return got
    online = ("online, `datasets` downloads it" if importlib.util.find_spec("datasets") else
              "online, `pip install datasets` and it downloads it")
    raise FileNotFoundError(
        f"{info['name']} not found under {'; '.join(tried)}: attach a Kaggle dataset holding GLUE's "
        f"{info['folder']}/train.tsv and dev.tsv (the official GLUE files, e.g. glue_data/{info['folder']}/) or put "
        f"{info['folder']}/train.tsv and dev.tsv there (data_root or SES_DATA); {online}")


# ── SYNTHETIC text: smoke only ──
# Sentences from a few dozen words, labelled by a rule: they take the tokenizer, the model, the hooks and the loop
# through their paths offline in seconds. SYNTHETIC: smoke only; nothing about GLUE can be learnt from them.
_SYN_WORDS = read_only({
    "pos": ("good", "great", "fine", "superb", "lovely", "moving", "fun", "clever"),
    "neg": ("bad", "dull", "awful", "weak", "boring", "poor", "flat", "silly"),
    "fill": ("the", "a", "film", "movie", "plot", "story", "cast", "acting", "was", "is", "very", "quite", "and",
             "but", "it", "this", "its", "music", "ending", "script", "really", "so")})
SYNTHETIC_VOCAB = tuple(w for ws in _SYN_WORDS.values() for w in ws)
SYNTHETIC_SIZES = (512, 128)  # (train, dev) examples of the synthetic sets when no subset is asked for


def synthetic_glue(task, n, seed=0):
    """SYNTHETIC: smoke only. (first texts, second texts or None, labels) shaped like the task's: SST-2-like sentences
    labelled by the polarity of the sentiment words they hold; MRPC-like pairs whose second sentence is the first
    shuffled (label 1) or another sentence (label 0). Its own RNG: the global streams are left alone."""
    glue_task(task)
    rng = random.Random(seed)

    def sentence(pol):
        words = [rng.choice(_SYN_WORDS["fill"]) for _ in range(rng.randint(4, 10))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_SYN_WORDS[pol]))
        return " ".join(words)
    a, b, y = [], [] if task == "mrpc" else None, []
    for _ in range(n):
        label = rng.randint(0, 1)
        if b is None:
            a.append(sentence("pos" if label else "neg"))
        else:
            a.append(sentence(rng.choice(("pos", "neg"))))
            b.append(" ".join(rng.sample(a[-1].split(), len(a[-1].split()))) if label else
                     sentence(rng.choice(("pos", "neg"))))
        y.append(label)
    return a, b, y


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# models
# ═══════════════════════════════════════════════════════════════════════════════════════════════

MODELS = ("resnet18", "resnet18_erank", "resnet50", "wrn28_10", "vit_tiny", "vit_small", "vit_tiny_timm",
          "vit_small_timm", "mlp_toy")
CNN_MODELS = ("resnet18", "resnet18_erank", "resnet50", "wrn28_10")
TINY_BERT = "bert-tiny-random"  # Exp 22's smoke model: a small BERT, randomly initialised, no download (text section)
VIT_MODELS = ("vit_tiny", "vit_small", "vit_tiny_timm", "vit_small_timm")  # all train with the ViT recipe
TIMM_VIT_MODELS = ("vit_tiny_timm", "vit_small_timm")  # timm's VisionTransformer; the others are the author's (SESViT)


class WideBasic(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv x2) as in the SES reference WRN (stride on conv2, 1x1 shortcut)."""

    def __init__(self, in_planes, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR (Zagoruyko & Komodakis): 3 stages of (depth-4)/6 WideBasic blocks, 16/16k/32k/64k."""

    def __init__(self, depth=28, widen_factor=10, num_classes=100, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4; got {depth}")
        n, k = (depth - 4) // 6, widen_factor
        widths = [16, round(16 * k), round(32 * k), round(64 * k)]  # k may be fractional (a narrowed smoke model)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(cin, cout, n, stride, dropout):
        return nn.Sequential(*[WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                               for i in range(n)])

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(F.relu(self.bn1(x)))  # a real module call: SES hooks it ("blocks+pool")
        return self.fc(torch.flatten(x, 1))


class ToyMLP(nn.Module):
    """The toy 2-D study's MLP: `depth` hidden layers of `width` units, each Linear + activation, then a head.
    The paper only says "5-layer MLP (16 hidden neurons per layer)"; tanh (smooth, so the input Jacobian
    and its condition number are well defined everywhere) is our choice, selectable."""

    ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

    def __init__(self, in_dim=2, num_classes=3, width=16, depth=5, activation="tanh"):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(self.ACTIVATIONS)}")
        act = self.ACTIVATIONS[activation]
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(in_dim if i == 0 else width, width), act())
                                    for i in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


class _NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every stage's planes scaled by `width` (64·w, 128·w, ...): same modules and names,
    so the hook presets and checkpoint keys are those of the full model. For the smoke preset and quick looks."""

    def __init__(self, block, layers, num_classes, width):
        self._scale, self._stages = width, 0
        super().__init__(block, layers, num_classes=num_classes)
        w = self.inplanes_first
        self.bn1 = nn.BatchNorm2d(w)
        self.fc = nn.Linear(round(512 * width) * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if self._stages == 0:  # the stem's output width feeds the first stage
            self.inplanes = self.inplanes_first = round(64 * self._scale)
        self._stages += 1
        return super()._make_layer(block, round(planes * self._scale), blocks, stride, dilate)


def _cifar_resnet(name, num_classes, width=1.0):
    if width == 1.0:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    else:
        block, layers = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                         "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[name]
        model = _NarrowResNet(block, layers, num_classes, width)
    model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)  # CIFAR stem
    model.maxpool = nn.Identity()
    return model


# ── the ResNet-18 of ses_erank_dynamics.py (Exp 28), ported (akira-n-28/Spectral-Entropy-Shaping@4abfcca) ──
# The common CIFAR ResNet-18 (3x3 stem, no max-pool, 1x1 conv + BN shortcut): the same layers and parameter count
# (11.22 M at 100 classes) as 'resnet18', but PyTorch's default init everywhere (kaiming-uniform a=sqrt(5): conv weight
# SD 0.024 in layer1, where torchvision's kaiming-normal fan-out gives 0.059) and the shortcut named `shortcut`. Same
# modules, names and construction order as the author's, so under the same seed it builds the author's weights
# (tests/test_author_resnet.py against tests/fixtures/author_resnet18_erank.json).
class ErankBasicBlock(nn.Module):
    """ses_erank_dynamics.py's BasicBlock: conv-BN-ReLU, conv-BN, + shortcut (identity, or 1x1 conv + BN), ReLU."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ErankResNet18(nn.Module):
    """ses_erank_dynamics.py's ResNet18 (build_model 'resnet18_erank'); width scales every stage (smoke preset)."""

    def __init__(self, num_classes=100, width=1.0):
        super().__init__()
        w = [round(c * width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, w[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layer1 = self._make_layer(w[0], w[0], 1)
        self.layer2 = self._make_layer(w[0], w[1], 2)
        self.layer3 = self._make_layer(w[1], w[2], 2)
        self.layer4 = self._make_layer(w[2], w[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    @staticmethod
    def _make_layer(in_p, out_p, stride):
        return nn.Sequential(ErankBasicBlock(in_p, out_p, stride), ErankBasicBlock(out_p, out_p, 1))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ── the author's ViT, ported from ses_vit_experiment.py (akira-n-28/Spectral-Entropy-Shaping@4abfcca; the same classes
# in ses_vit_ablations.py, ses_vit_augmentation.py, and ses_vit_attention.py with its store_attn flag) ──
# Same modules, names, construction order and init, so under the same seed it builds the author's weights bit for bit
# (tests/test_author_vit.py against tests/fixtures/author_vit.json, recorded from the script run as written):
# nn.MultiheadAttention (its own xavier-uniform in-projection, zero in-proj bias), trunc-normal(0.02) Linear weights
# (the out-projection included) with zero bias, cls token and pos embed trunc-normal(0.02), PyTorch's default Conv2d
# init for the patch projection, LayerNorm eps 1e-5, the author's per-sample drop path (torch.bernoulli mask).
class AuthorPatchEmbed(nn.Module):
    """ses_vit_experiment.py's PatchEmbedding: a patch x patch convolution of stride patch, as tokens [B, N, D]."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=384):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_size = (patch_size, patch_size)  # as timm's PatchEmbed says it
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SESViTBlock(nn.Module):
    """The author's TransformerBlock: pre-norm, nn.MultiheadAttention (batch_first), GELU MLP, drop path per sample.
    store_attn (ses_vit_attention.py's flag; use_attention_weights sets it): the attention is called with
    need_weights=True, average_attn_weights=False and its per-head probabilities [B, heads, N, N] pass through
    self.attn_probs (an Identity: what SES's "attn_weights" target hooks). Otherwise the author's plain call, whose
    need_weights defaults to True as well: the same explicit-softmax path, so the block's output is the same either way."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=drop, batch_first=True)
        self.attn_probs = nn.Identity()  # no parameters: the state dict is the author's
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))
        self.drop_path_rate = drop_path
        self.store_attn = False

    def _drop_path(self, x):
        if self.drop_path_rate == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_path_rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.bernoulli(torch.full(shape, keep_prob, device=x.device, dtype=x.dtype))
        return x * mask / keep_prob

    def forward(self, x):
        normed = self.norm1(x)
        if self.store_attn:
            attn_out, probs = self.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
            self.attn_probs(probs)
        else:
            attn_out, _ = self.attn(normed, normed, normed)
        x = x + self._drop_path(attn_out)
        return x + self._drop_path(self.mlp(self.norm2(x)))


class SESViT(nn.Module):
    """The author's VisionTransformer for CIFAR-sized images: patch embedding, CLS token + learned positions, `depth`
    SESViTBlocks with stochastic depth linear in 0..drop_path_rate (torch.linspace, as the author), final LayerNorm,
    linear head on the CLS token. ViT-Tiny/4: 192 dim, 3 heads (5.38 M); ViT-Small/4: 384 dim, 6 heads (21.38 M)."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, num_classes=100, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1):
        super().__init__()
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_embed = AuthorPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also when built on meta
        self.blocks = nn.ModuleList([SESViTBlock(embed_dim, num_heads, mlp_ratio, drop_rate, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_drop_path(self, rate):
        """Stochastic depth at max rate `rate`, spaced over the blocks as the author's constructor does."""
        for blk, p in zip(self.blocks, torch.linspace(0, rate, len(self.blocks), device="cpu").tolist()):
            blk.drop_path_rate = p

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch_embed(x)], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _vit(name, num_classes, img_size, width=1.0):
    """vit_tiny / vit_small: the author's SESViT; vit_tiny_timm / vit_small_timm: timm's VisionTransformer with the same
    shape (patch 4, depth 12, mlp 4x, qkv bias, no dropout, stochastic depth 0.1, CLS-token head) and parameter count,
    but timm's init (qkv trunc-normal 0.02, cls token 1e-6) and LayerNorm eps 1e-6. width narrows the embed dim, same heads."""
    if img_size % 4:
        raise ValueError(f"ViT patch size 4 needs img_size divisible by 4; got {img_size}")
    dim, heads = {"vit_tiny": (192, 3), "vit_small": (384, 6)}[name.removesuffix("_timm")]
    dim = max(1, round(dim * width / heads)) * heads  # narrowed: the same heads, narrower each
    if name not in TIMM_VIT_MODELS:
        return SESViT(img_size=img_size, patch_size=4, num_classes=num_classes, embed_dim=dim, depth=12,
                      num_heads=heads, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1)
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=4, num_classes=num_classes, embed_dim=dim, depth=12,
                             num_heads=heads, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, drop_path_rate=0.1,
                             global_pool="token")


def vit_impl(model_name):
    """The resolved config's vit_impl: 'author' (SESViT) or 'timm' for a ViT model name, None for any other model."""
    return None if model_name not in VIT_MODELS else "timm" if model_name in TIMM_VIT_MODELS else "author"


def _apply_spectral_norm(model):
    from torch.nn.utils.parametrizations import spectral_norm as sn
    for m in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]:
        if isinstance(m, nn.MultiheadAttention):  # its stacked q, k, v projection: as timm's qkv Linear
            sn(m, name="in_proj_weight")
        else:
            sn(m)
    return model


def build_model(name, num_classes, img_size=32, spectral_norm=False, width=1.0):
    """resnet18 | resnet50 (torchvision, CIFAR stem) | resnet18_erank (ses_erank_dynamics.py's CIFAR ResNet-18,
    PyTorch's default init: ErankResNet18) | wrn28_10 | vit_tiny | vit_small (the author's ViT/4: SESViT) | vit_tiny_timm |
    vit_small_timm (timm's VisionTransformer, same shape, timm's init) | mlp_toy.
    spectral_norm=True wraps every Conv2d and Linear (and an nn.MultiheadAttention's in-projection) in
    torch.nn.utils.parametrizations.spectral_norm.
    width in (0, 1]: every channel width (ResNets: 64·w ... 512·w; WRN: widen factor 10·w; ViTs: embed dim) scaled,
    same depth, modules and hook points: the smoke preset's narrow models (width=1 is the published model)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if not _is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if not _is_real(width) or not 0 < width <= 1:
        raise ValueError(f"width must be a number in (0, 1] (1: the published model); got {width!r}")
    if name in ("resnet18", "resnet50"):
        model = _cifar_resnet(name, num_classes, width)
    elif name == "resnet18_erank":
        model = ErankResNet18(num_classes, width)
    elif name == "wrn28_10":
        model = WideResNet(depth=28, widen_factor=10 * width, num_classes=num_classes)
    elif name in VIT_MODELS:
        model = _vit(name, num_classes, img_size, width)
    else:
        model = ToyMLP(num_classes=num_classes)
    return _apply_spectral_norm(model) if spectral_norm else model


def count_params(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ── BERT (Exp 22): the smoke model and tokenizer, and the encoder layers SES hooks ──

def tiny_tokenizer(words=SYNTHETIC_VOCAB):
    """A word-level BERT-style tokenizer over `words` built in memory (no download): lower-cased, whitespace split,
    [CLS] a [SEP] (b [SEP]), [UNK] for any other word; a transformers tokenizer, called as bert-base-uncased's is."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_bert(vocab_size, max_len=128, num_labels=2):
    """TINY_BERT: BertForSequenceClassification with 6 layers of width 64 (2 heads), randomly initialised (the global
    torch RNG: seed first). Six layers, so SES on the last 4 and on all of them hook different layers."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=max(64, max_len), num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def bert_hook_targets(model, preset="all"):
    """The (name, module, "output") triples of a BERT's encoder layers for SES: "all", "lastN", "firstN" (their output
    is the hidden states [B, N, D]; transformers 4 returns them as output[0], 5 as the tensor)."""
    prefix = getattr(model, "base_model_prefix", "bert")
    layers = list(getattr(model, prefix).encoder.layer)
    idx = _select(list(range(len(layers))), preset, "encoder layers")
    if idx is None:
        raise ValueError(f"unknown encoder layer preset {preset!r}; known: all, lastN, firstN")
    return [(f"{prefix}.encoder.layer.{i}", layers[i], "output") for i in idx]


def text_skeleton(c):
    """An Exp 22 config's model on the meta device (shapes only: no memory, no download, no init work), or None for a
    model other than bert-base-uncased (the default BertConfig: its config.json's values) and TINY_BERT."""
    from transformers import BertConfig, BertForSequenceClassification
    if c.get("model") not in ("bert-base-uncased", TINY_BERT):
        return None
    with torch.device("meta"):
        return (tiny_bert(len(SYNTHETIC_VOCAB) + 5, c.get("max_len", 128)) if c["model"] == TINY_BERT else
                BertForSequenceClassification(BertConfig(num_labels=2)))


def text_model_bytes(c) -> int | None:
    """The float32 weights of a resolved Exp 22 config's model (model_final.pt; checkpoint.pt holds 3x: AdamW's two
    moments), counted on meta tensors; None where text_skeleton does not know the model."""
    m = text_skeleton(c)
    return None if m is None else 4 * sum(p.numel() for p in m.parameters())


NO_DECAY = ("bias", "LayerNorm.weight")  # the author's parameter names without weight decay


def text_param_groups(model, weight_decay) -> list:
    """The author's two AdamW groups: weight decay on all but NO_DECAY's parameters."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(k in n for k in NO_DECAY)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0}]


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# corruptions
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# The CIFAR-10-C / Tiny-ImageNet-C protocol of Hendrycks & Dietterich (hendrycks/robustness,
# ImageNet-C/create_c/make_cifar_c.py for 32 px, make_tinyimagenet_c.py for 64 px), re-implemented as
# batched torch ops on uint8 [N, 3, H, W] so a whole test set is corrupted on the device in one go.
# The original works per PIL image in float64 and writes np.uint8(clip(x, 0, 1) * 255), i.e. it
# TRUNCATES: so do we (float -> uint8 casts truncate in torch too); the Tiny-ImageNet generator then saves a
# JPEG of quality 85, and corrupt() returns that too for 64-px images. Checked against the originals run as
# written (tests/fixtures/corruptions/: hendrycks/robustness@8190fe3, ImageMagick 6.9.11-60 Q16 via Wand):
#   exact formula (float32 instead of float64, so rare 1-level truncation flips): gaussian/shot/impulse/
#     speckle noise, contrast, brightness, saturate, gaussian_blur, defocus_blur, zoom_blur, fog, frost,
#     glass_blur (the sequential pixel loop run as a wavefront: the original's "swap" on NumPy views is a
#     one-way copy, and so is ours; with the original's draws >= 98 % of pixels identical)
#   exact up to the codec/rounding: pixelate (PIL BOX weights + PIL's per-pass uint8 rounding),
#     jpeg_compression and the JPEG-85 of 64 px (libjpeg through torchvision; nvjpeg on CUDA)
#   ImageMagick's MotionBlurImage (motion_blur, snow): its kernel, and its 8-bit output (the 16-bit quantum
#     truncated), pixel for pixel with the same angle
#   re-implemented from another library: elastic_transform (cv2.warpAffine + scipy map_coordinates), spatter
#     (cv2 Canny/distanceTransform/equalizeHist): same algorithms, small numeric differences documented at each.
# Random draws come from torch (not numpy's stream), so images match the official files in distribution (mean
# change from clean per severity within 3 % of the original's; 6-12 % for the most random ones), not pixel
# for pixel; the official files are used when present (evaluate_corruptions).


CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# The named corruption sets, defined here only: evaluate_corruptions(corruptions=<name>) and a run's "robustness"
# (ROBUSTNESS_PRESETS in the train section) take these names. Every set runs the STANDARD pixel-space protocol above.
# "paper5" is the five corruptions of the published SES evaluation (ses_kaggle_dual_gpu.py / ses_phase3.py,
# evaluate_robustness) under that standard protocol, comparable with all15; the published evaluation itself (its
# own parameters on normalised tensors, severities 1, 3, 5) is another measurement: PAPER_PROTOCOL, protocol="paper".
CORRUPTION_SETS = read_only({
    "all15": CORRUPTIONS,  # Hendrycks & Dietterich's 15 benchmark corruptions: the headline
    "paper5": ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "shot_noise"),
    "extra": EXTRA_CORRUPTIONS,  # the 4 the benchmark holds out for validation
    "all19": CORRUPTIONS + EXTRA_CORRUPTIONS,
})
PAPER5 = CORRUPTION_SETS["paper5"]  # the set's old name, kept for callers: standard protocol, not PAPER_PROTOCOL

# Per-severity parameters, copied from make_cifar_c.py (32) and make_tinyimagenet_c.py (64).
_ZOOMS = [np.arange(1, e, 0.01) for e in (1.06, 1.11, 1.16, 1.21, 1.26)]  # float arange: 7,12,16,21,26 factors


def _elastic(s, rows):
    return [(s * a, s * b, s * c) for a, b, c in rows]


_PARAMS = {
    32: dict(
        gaussian_noise=[0.04, 0.06, .08, .09, .10],
        shot_noise=[500, 250, 100, 75, 50],
        impulse_noise=[.01, .02, .03, .05, .07],
        speckle_noise=[.06, .1, .12, .16, .2],
        gaussian_blur=[.4, .6, 0.7, .8, 1],
        glass_blur=[(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        defocus_blur=[(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        motion_blur=[(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        zoom_blur=_ZOOMS,
        fog=[(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        frost=[(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        snow=[(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
              (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        spatter=[(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                 (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
        contrast=[.75, .5, .4, .3, 0.15],
        brightness=[.05, .1, .15, .2, .3],
        saturate=[(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        jpeg_compression=[80, 65, 58, 50, 40],
        pixelate=[0.95, 0.9, 0.85, 0.75, 0.65],
        elastic_transform=_elastic(32, [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                                        (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)]),
    ),
    64: dict(
        gaussian_noise=[0.04, 0.08, .12, .15, .18],
        shot_noise=[250, 100, 50, 30, 15],
        impulse_noise=[.01, .02, .05, .08, .14],
        speckle_noise=[.15, .2, 0.25, 0.3, 0.35],
        gaussian_blur=[.5, .75, 1, 1.25, 1.5],
        glass_blur=[(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        defocus_blur=[(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        motion_blur=[(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        zoom_blur=_ZOOMS,
        fog=[(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
        frost=[(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
        snow=[(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
              (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)],
        spatter=[(0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0), (0.65, 0.3, 1, 0.69, 0.6, 0),
                 (0.65, 0.1, 0.7, 0.68, 0.6, 1), (0.65, 0.1, 0.5, 0.67, 0.6, 1)],
        contrast=[.4, .3, .2, .1, 0.05],
        brightness=[.1, .2, .3, .4, .5],
        saturate=[(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        jpeg_compression=[65, 58, 50, 40, 25],
        pixelate=[0.9, 0.8, 0.7, 0.6, 0.5],
        elastic_transform=_elastic(64, [(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06),
                                        (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)]),
    ),
}
_FROST_SCALE = {32: 0.2, 64: 0.3}  # the generators shrink the frost photos before cropping


def corruption_params(name, severity, size):
    """The generator's per-severity parameter `c` for an image side of 32 or 64 px."""
    _check_name_severity(name, severity)
    if size not in _PARAMS:
        raise ValueError(f"no standard parameters for {size} px images (only 32 = CIFAR-C, 64 = Tiny-ImageNet-C); "
                         "pass params= explicitly")
    return _PARAMS[size][name][severity - 1]


def _check_name_severity(name, severity):
    valid = CORRUPTIONS + EXTRA_CORRUPTIONS
    if name not in valid:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(valid)}")
    if not (_is_int(severity) or isinstance(severity, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer in 1..5 (valid: 1, 2, 3, 4, 5), got {severity!r}")


# ─── small helpers: random draws, float <-> uint8, padding, separable filters ─────────────────────
def _dev(g, dev):  # draw on the generator's device (a torch.Generator is tied to one), then move
    return g.device if g is not None else dev


def _rand(shape, g, dev):
    return torch.rand(shape, generator=g, device=_dev(g, dev)).to(dev)


def _randn(shape, g, dev):
    return torch.randn(shape, generator=g, device=_dev(g, dev)).to(dev)


def _uniform(lo, hi, shape, g, dev):
    return lo + (hi - lo) * _rand(shape, g, dev)


def _randint(lo, hi, shape, g, dev):  # high exclusive, like np.random.randint
    return torch.randint(lo, hi, shape, generator=g, device=_dev(g, dev)).to(dev)


def _f(img):
    return img.float() / 255.0


def _u8(x):  # np.uint8(np.clip(x, 0, 1) * 255): truncation, as the generator writes its files
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _pad_index(n, p, mode, device):
    """Source indices for padding a length-n axis by p each side.
    replicate = scipy 'nearest'; reflect101 = cv2 BORDER_REFLECT_101 (dcb|abcd|cba);
    symmetric = scipy 'reflect' (cba|abcd|dcb)."""
    i = torch.arange(-p, n + p, device=device)
    if mode == "replicate" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect101":
        per = 2 * n - 2
        i = i.abs() % per
        return torch.where(i >= n, per - i, i)
    per = 2 * n
    i = i % per
    return torch.where(i >= n, per - 1 - i, i)


def _pad(x, p, mode):
    """Pad the last two dims of a 4-D float tensor (F.pad's fast kernels where they apply)."""
    H, W = x.shape[-2:]
    if p == 0:
        return x
    if mode == "replicate":
        return F.pad(x, (p, p, p, p), mode="replicate")
    if mode == "reflect101" and p < min(H, W):
        return F.pad(x, (p, p, p, p), mode="reflect")
    if mode == "symmetric" and p <= min(H, W):
        x = torch.cat([x[..., :p, :].flip(-2), x, x[..., H - p:, :].flip(-2)], -2)
        return torch.cat([x[..., :p].flip(-1), x, x[..., W - p:].flip(-1)], -1)
    return x.index_select(-2, _pad_index(H, p, mode, x.device)).index_select(-1, _pad_index(W, p, mode, x.device))


def _gauss_kernel(sigma, truncate=4.0):  # scipy.ndimage.gaussian_filter1d's kernel
    r = int(truncate * float(sigma) + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * t ** 2 / float(sigma) ** 2)
    return k / k.sum()


def _filter_matrix(n, k, mode):
    """Correlation with the 1-D kernel k along an axis of length n, border handled by `mode`, as an [n, n]
    matrix (out = M @ x): a separable filter becomes two small GEMMs, much faster than conv2d on CPU."""
    r = (len(k) - 1) // 2
    M = np.zeros((n, n))
    cols = _pad_index(n, r, mode, "cpu").numpy()  # padded position i + t -> source index
    for i in range(n):
        np.add.at(M[i], cols[i:i + len(k)], k)
    return M


def _sep_filter(x, k, mode):
    """Separable correlation of each channel of x [..., H, W] with the 1-D kernel k on both axes."""
    H, W = x.shape[-2:]
    key = tuple(np.round(k, 12))
    Mh, Mw = (_cached(("filt", n, key, mode, x.dtype, str(x.device)),
                      lambda n=n: torch.as_tensor(_filter_matrix(n, k, mode), dtype=x.dtype, device=x.device))
              for n in (H, W))
    return Mh @ x @ Mw.T


def _gaussian(x, sigma, mode="replicate", truncate=4.0):
    """skimage.filters.gaussian(x, sigma, channel_axis=...) (scipy gaussian_filter per channel; default
    mode 'nearest' = replicate, truncate 4)."""
    if sigma <= 1e-15:  # scipy skips such axes
        return x
    return _sep_filter(x, _gauss_kernel(sigma, truncate), mode)


def _box3(x, mode="reflect101"):  # cv2.blur(x, (3, 3)), float result
    return _sep_filter(x, np.full(3, 1 / 3), mode)


def _rgb_to_hsv(x):
    """skimage.color.rgb2hsv for [N, 3, H, W] in [0, 1] (H in [0, 1), 0 for greys; S = 0 where V = 0)."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    delta = v - x.min(1).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(v > 0, delta / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    h = torch.where(b == v, 4 + (r - g) / safe, torch.where(g == v, 2 + (b - r) / safe, (g - b) / safe))
    h = torch.where(delta > 0, (h / 6) % 1, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x):
    """skimage.color.hsv2rgb for [N, 3, H, W], in the closed form channel = v - v*s*clip(min(k, 4 - k), 0, 1),
    k = (n + 6h) mod 6 with n = 5, 3, 1 for R, G, B (the same sextant table, without materialising it)."""
    h6, s, v = x[:, :1] * 6, x[:, 1:2], x[:, 2:3]
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) + h6) % 6
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def _zoom_matrix(n, z, dtype, device):
    """clipped_zoom along one axis as an [n, n] matrix: centre crop of ceil(n/z) px, scipy.ndimage.zoom
    (order 1, grid_mode=False: corners aligned) to round(crop*z) px, centre trim back to n."""
    ch = int(np.ceil(n / z))
    top = (n - ch) // 2
    out = int(round(ch * z))
    trim = (out - n) // 2
    M = np.zeros((n, n))
    scale = (ch - 1) / (out - 1) if out > 1 else 0.0
    for j in range(n):
        src = (j + trim) * scale
        i0 = min(int(np.floor(src)), ch - 1)
        fr = src - i0
        M[j, top + i0] += 1 - fr
        if fr > 0:
            M[j, top + min(i0 + 1, ch - 1)] += fr
    return torch.as_tensor(M, dtype=dtype, device=device)


# ─── the corruptions: f(img uint8 [N,3,H,W], c, generator) -> uint8 ───────────────────────────────
def _gaussian_noise(img, c, g):
    x = _f(img)
    return _u8(x + c * _randn(x.shape, g, x.device))


def _shot_noise(img, c, g):
    x = _f(img)
    rate = (x * c).to(_dev(g, x.device))
    return _u8(torch.poisson(rate, generator=g).to(x.device) / c)


def _impulse_noise(img, c, g):  # skimage random_noise(mode='s&p', amount=c): per element, salt/pepper 50/50
    x = _f(img)
    flipped = _rand(x.shape, g, x.device) <= c
    salted = _rand(x.shape, g, x.device) <= 0.5
    x = torch.where(flipped & salted, torch.ones_like(x), x)
    return _u8(torch.where(flipped & ~salted, torch.zeros_like(x), x))


def _speckle_noise(img, c, g):
    x = _f(img)
    return _u8(x + x * c * _randn(x.shape, g, x.device))


def _gaussian_blur(img, c, g):
    return _u8(_gaussian(_f(img), c))


def _contrast(img, c, g):  # per-image, per-channel means (CIFAR: axis=(0, 1) of HxWx3)
    x = _f(img)
    m = x.mean((2, 3), keepdim=True)
    return _u8((x - m) * c + m)


def _brightness(img, c, g):  # float64 (pointwise, cheap): max channels sit exactly on the truncation edge
    hsv = _rgb_to_hsv(img.double() / 255)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return _u8(_hsv_to_rgb(hsv))


def _saturate(img, c, g):
    hsv = _rgb_to_hsv(img.double() / 255)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return _u8(_hsv_to_rgb(hsv))


def _disk(radius, alias_blur):
    """make_*_c.py disk(): aliased disk on a 17x17 grid, then cv2.GaussianBlur (3x3, reflect-101)."""
    L = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    X, Y = np.meshgrid(L, L)
    d = ((X ** 2 + Y ** 2) <= radius ** 2).astype(np.float64)
    d /= d.sum()
    ks = 3 if radius <= 8 else 5
    t = np.arange(ks) - (ks - 1) / 2
    k1 = np.exp(-t ** 2 / (2 * alias_blur ** 2))
    k1 /= k1.sum()
    n, r = len(L), ks // 2
    idx = _pad_index(n, r, "reflect101", "cpu").numpy()
    dp = d[idx][:, idx]
    d = sum(k1[a] * dp[a:a + n] for a in range(ks))
    d = sum(k1[a] * d[:, a:a + n] for a in range(ks))
    nz = np.nonzero(d.any(0))[0]  # crop the exact-zero border: same result, smaller conv
    m = min(nz[0], n - 1 - nz[-1])
    return d[m:n - m, m:n - m]


def _defocus_blur(img, c, g):  # cv2.filter2D per channel, border reflect-101
    x = _f(img)
    N, C, H, W = x.shape
    k = torch.as_tensor(_disk(*c), dtype=x.dtype, device=x.device)
    r = (k.shape[0] - 1) // 2
    y = F.conv2d(_pad(x.reshape(N * C, 1, H, W), r, "reflect101"), k[None, None])
    return _u8(y.view(N, C, H, W))


def _zoom_operator(H, W, factors, device):
    """(I + sum_z clipped_zoom_z) / (len + 1) as one [H*W, H*W] matrix (transposed, for x @ K): the whole zoom
    blur of a batch becomes a single matmul. sum_z kron(A_z, B_z) is itself one small GEMM over z."""
    A = torch.stack([_zoom_matrix(H, z, torch.float64, "cpu") for z in factors])  # [Z, H, H]
    B = torch.stack([_zoom_matrix(W, z, torch.float64, "cpu") for z in factors])
    K = (A.reshape(len(factors), -1).T @ B.reshape(len(factors), -1)).view(H, H, W, W)
    K = K.permute(0, 2, 1, 3).reshape(H * W, H * W) + torch.eye(H * W, dtype=torch.float64)
    return (K / (len(factors) + 1)).T.to(device=device, dtype=torch.float32).contiguous()


# Operators built once per shape/parameters/device (filter and zoom matrices, frost textures, glass schedules): the
# module's only mutable state. Device tensors (the 64-px zoom-blur operators alone ~335 MB), so a run's cleanup
# empties it with the rest of its device memory (clear_corruption_cache).
_CACHE: dict = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def clear_corruption_cache():
    """Drop every cached corruption operator (they are rebuilt on demand)."""
    _CACHE.clear()


def _zoom_blur(img, c, g):
    x = _f(img)
    N, C, H, W = x.shape
    if H * W > 64 * 64:  # the dense operator would be too big: sum the zooms one by one (separable)
        out = x.clone()
        for z in c:
            out += _zoom_matrix(H, z, x.dtype, x.device) @ x @ _zoom_matrix(W, z, x.dtype, x.device).T
        return _u8(out / (len(c) + 1))
    K = _cached(("zoom", H, W, tuple(np.round(c, 6)), str(x.device)), lambda: _zoom_operator(H, W, c, x.device))
    return _u8((x.reshape(N * C, H * W) @ K).view(N, C, H, W))


def _motion_blur_float(x, radius, sigma, angle):
    """ImageMagick MotionBlurImage (the generator calls it through Wand): a one-sided Gaussian of width
    2*ceil(radius)+1 along `angle` (degrees, one per image), sampling x + ceil(i*cos - .5), y + ceil(i*sin - .5)
    with edge-replicated virtual pixels (the same kernel imagecorruptions ported to numpy). ImageMagick
    works in 16-bit quanta: callers convert with _imagemagick_8bit, as its 8-bit PNG does."""
    N, C, H, W = x.shape
    width = 2 * int(math.ceil(radius)) + 1
    i = torch.arange(width, dtype=torch.float64, device=x.device)
    k = torch.exp(-i ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    a = torch.deg2rad(angle.double())[:, None]
    ox = torch.ceil(i * torch.cos(a) - 0.5).long()  # [N, width]
    oy = torch.ceil(i * torch.sin(a) - 0.5).long()
    ys, xs = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    flat = x.reshape(N, C, H * W)
    out = torch.zeros_like(flat)
    for j in range(width):
        rows = (ys[None, :] + oy[:, j, None]).clamp(0, H - 1)  # [N, H]
        cols = (xs[None, :] + ox[:, j, None]).clamp(0, W - 1)
        idx = (rows[:, :, None] * W + cols[:, None, :]).view(N, 1, H * W).expand(N, C, H * W)
        out.add_(flat.gather(2, idx), alpha=float(k[j]))
    return out.view(N, C, H, W)


def _imagemagick_8bit(y):
    """What ImageMagick 6.9 Q16 stores in an 8-bit PNG for a float result y on the 0..255 scale: the 16-bit quantum
    rounded (y * 257), then TRUNCATED to 8 bits."""
    return torch.floor(torch.round(y * 257) / 257).clamp(0, 255)


def _imagemagick_motion_blur(x, radius, sigma, angle):
    """MagickMotionBlurImage on uint8-valued x [N, C, H, W] as the generator gets it back (8-bit PNG), in x's dtype.
    float64 inside: in float32 one pixel in ~3000 lands on the other side of a truncation. Checked against
    ImageMagick 6.9.11-60 Q16 through Wand, called as the generator calls it: every pixel equal
    (tests/fixtures/corruptions/motion_imagemagick.npz; rounding instead of truncating: 51 % equal)."""
    return _imagemagick_8bit(_motion_blur_float(x.double(), radius, sigma, angle)).to(x.dtype)


def _motion_blur(img, c, g):
    angle = _uniform(-45, 45, (img.shape[0],), g, img.device)
    return _imagemagick_motion_blur(img.float(), c[0], c[1], angle).to(torch.uint8)


def _snow(img, c, g):
    """snow(): zoomed Gaussian flakes, thresholded, 8-bit, ImageMagick motion blur (angle -135..-45),
    added twice (once rotated 180 deg) onto the greyish-brightened image."""
    x = _f(img)
    N, C, H, W = x.shape
    layer = c[0] + c[1] * _randn((N, 1, H, W), g, x.device)
    Mh, Mw = (_zoom_matrix(n, c[2], x.dtype, x.device) for n in (H, W))
    layer = Mh @ layer @ Mw.T
    layer = torch.where(layer < c[3], torch.zeros_like(layer), layer)
    layer = (layer.clamp(0, 1) * 255).to(torch.uint8).float()  # .astype(np.uint8) before the PNG
    angle = _uniform(-135, -45, (N,), g, x.device)
    layer = _imagemagick_motion_blur(layer, c[4], c[5], angle) / 255
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # cv2 RGB2GRAY
    x = c[6] * x + (1 - c[6]) * torch.maximum(x, grey * 1.5 + 0.5)
    return _u8(x + layer + layer.flip(-1, -2))


def _frost_dir():
    spec = importlib.util.find_spec("imagecorruptions")  # locate only: importing it fails on new numpy
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        d = Path(loc) / "frost"
        if all((d / f).is_file() for f in _FROST_FILES):
            return d
    raise RuntimeError("frost needs the frost texture photos shipped by the PyPI package 'imagecorruptions' "
                       "(only its image files are used): pip install --no-deps imagecorruptions")


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


def _frost_textures(scale, device):
    """The photos the generator may pick (np.random.randint(5): frost1..frost5; frost6 is never used),
    shrunk like cv2.resize(fx=fy=scale) (bilinear, half-pixel centres, no antialias), padded into one
    uint8 [5, 3, Hmax, Wmax] tensor, with their true sizes."""
    from PIL import Image
    d = _frost_dir()
    ims, sizes = [], []
    for f in _FROST_FILES[:5]:
        t = torch.from_numpy(np.asarray(Image.open(d / f).convert("RGB")).copy()).permute(2, 0, 1).float()
        if scale != 1:
            t = F.interpolate(t[None], scale_factor=scale, mode="bilinear", align_corners=False,
                              recompute_scale_factor=False)[0]
        ims.append(t.round().clamp(0, 255).to(torch.uint8))
        sizes.append(ims[-1].shape[1:])
    Hm, Wm = max(s[0] for s in sizes), max(s[1] for s in sizes)
    out = torch.zeros(5, 3, Hm, Wm, dtype=torch.uint8)
    for i, t in enumerate(ims):
        out[i, :, :t.shape[1], :t.shape[2]] = t
    return out.to(device), torch.tensor(sizes, device=device)


def _frost(img, c, g):
    N, C, H, W = img.shape
    tex, sizes = _cached(("frost", _FROST_SCALE.get(H, 1.0), str(img.device)),
                         lambda: _frost_textures(_FROST_SCALE.get(H, 1.0), img.device))
    if bool((sizes[:, 0] <= H).any() or (sizes[:, 1] <= W).any()):
        raise ValueError(f"frost textures are too small for {H}x{W} images")
    idx = _randint(0, 5, (N,), g, img.device)
    hs, ws = sizes[idx, 0], sizes[idx, 1]
    x0 = (_rand((N,), g, img.device) * (hs - H)).long()  # randint(0, h - H), per image
    y0 = (_rand((N,), g, img.device) * (ws - W)).long()
    rows = x0[:, None] + torch.arange(H, device=img.device)
    cols = y0[:, None] + torch.arange(W, device=img.device)
    crop = tex[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # [N, 3, H, W]
    return (c[0] * img.float() + c[1] * crop.float()).clamp(0, 255).to(torch.uint8)


def _plasma(n, size, decay, g, dev):
    """plasma_fractal() (diamond-square), one independent map per image, normalised to [0, 1]."""
    m = torch.zeros(n, size, size, device=dev)
    step, wib = size, 100.0
    while step >= 2:
        h = step // 2

        def wmean(a):
            return a / 4 + wib * _uniform(-wib, wib, a.shape, g, dev)
        corner = m[:, ::step, ::step]
        sq = corner + corner.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        m[:, h::step, h::step] = wmean(sq)
        dr, ul = m[:, h::step, h::step], m[:, ::step, ::step]
        m[:, ::step, h::step] = wmean(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, h::step, ::step] = wmean(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wib /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def _fog(img, c, g):
    x = _f(img)
    N, C, H, W = x.shape
    size = 1 << (max(H, W) - 1).bit_length()  # mapsize: 32 for CIFAR, 64 for Tiny-ImageNet, next power of 2
    fog = _plasma(N, size, c[1], g, x.device)[:, None, :H, :W]
    mx = x.amax((1, 2, 3), keepdim=True)
    return _u8((x + c[0] * fog) * mx / (mx + c[0]))


def _glass_schedule(H, W, d):
    """The generator visits pixel (h, w), for h = H-d .. d+1 and w = W-d .. d+1 (both descending), one after
    the other, with a partner (h+dy, w+dx), dx, dy in [-d, d). Step (h, w) only touches rows h-d..h+d-1 and
    the same columns, so two steps interfere only if |dh|, |dw| < 2d. Step t = 2d*a + b (a, b = rank of h, w
    in the scan) keeps every interfering pair in scan order and puts only non-interfering steps in the same
    wavefront: running the wavefronts one by one, all of a wavefront at once, gives exactly the sequential
    result (88 wavefronts instead of 900 steps at 32 px). Returns the scan order sorted by wavefront, the flat
    pixel index of each position in that order, and the wavefront boundaries."""
    hs, ws = torch.arange(H - d, d, -1), torch.arange(W - d, d, -1)
    a, b = torch.meshgrid(torch.arange(len(hs)), torch.arange(len(ws)), indexing="ij")
    t = (2 * d * a + b).flatten()
    order = torch.argsort(t, stable=True)
    src = (hs[a.flatten()] * W + ws[b.flatten()])[order]
    bounds = torch.cumsum(torch.bincount(t), 0).tolist()
    return order, src, [0] + bounds


def _glass_blur(img, c, g, offsets=None):
    """make_*_c.py glass_blur: blur, then for every pixel (h, w) in scan order
    `x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]` on NumPy VIEWS: the right side holds two views,
    the first assignment overwrites x[h, w] with its partner's pixel and the second writes x[h, w]'s NEW value back
    into the partner, which so stays as it was. The net effect, reproduced here, is a one-way copy
    x[h, w] <- x[h + dy, w + dx] (a true swap would move ~40 % more pixels: see tests/test_corruptions.py,
    checked against the original loop run as written). offsets: the (dx, dy) draws per pass, [N, positions, 2]
    in scan order (tests inject the original's own draws); default: drawn from g."""
    sigma, d, iters = c
    x = _gaussian(_f(img), sigma)
    x = (x.clamp(0, 1) * 255).to(torch.uint8)  # np.uint8(gaussian(...) * 255)
    N, C, H, W = x.shape
    order, src, bounds = _cached(("glass", H, W, d), lambda: _glass_schedule(H, W, d))
    order, src = order.to(x.device), src.to(x.device)
    p = x.to(torch.int32)  # pack each RGB pixel in one int32: a pixel copy is then a 1-D gather/scatter
    flat = (p[:, 0] | (p[:, 1] << 8) | (p[:, 2] << 16)).reshape(-1)
    base = (torch.arange(N, device=x.device) * H * W)[None, :]  # image offsets in the flat buffer
    for it in range(iters):
        off = _randint(-d, d, (N, len(order), 2), g, x.device) if offsets is None else \
            torch.as_tensor(offsets[it], device=x.device).long()  # (dx, dy) per pixel, in scan order
        delta = (off[..., 1] * W + off[..., 0]).T[order]  # [positions in step order, N]
        s_all = src[:, None] + base
        d_all = s_all + delta
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            s_i, d_i = s_all[lo:hi].reshape(-1), d_all[lo:hi].reshape(-1)
            flat.index_copy_(0, s_i, flat.index_select(0, d_i))  # x[h, w] <- x[h', w'] (the partner keeps its pixel)
    flat = flat.view(N, 1, H, W)
    x = torch.cat([(flat >> (8 * i)) & 255 for i in range(3)], 1).float() / 255
    return _u8(_gaussian(x, sigma))


def _pil_box_weights(n_in, n_out):
    """PIL's BOX resampling coefficients (ImagingResample precompute_coeffs) as an [n_out, n_in] matrix."""
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = 0.5 * fscale
    M = np.zeros((n_out, n_in))
    for xx in range(n_out):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in)
        w = np.array([1.0 if -0.5 <= (x - center + 0.5) / fscale < 0.5 else 0.0 for x in range(xmin, xmax)])
        M[xx, xmin:xmax] = w / w.sum() if w.sum() else w
    return M


def _pil_resize_box(x, h_out, w_out):
    """Image.resize((w, h), Image.BOX) on float pixel values: horizontal pass then vertical, each rounded
    to uint8 as PIL's 8-bit resampler does."""
    N, C, H, W = x.shape
    if w_out != W:
        Mw = torch.as_tensor(_pil_box_weights(W, w_out), dtype=x.dtype, device=x.device)
        x = torch.floor(x @ Mw.T + 0.5).clamp(0, 255)
    if h_out != H:
        Mh = torch.as_tensor(_pil_box_weights(H, h_out), dtype=x.dtype, device=x.device)
        x = torch.floor(Mh @ x + 0.5).clamp(0, 255)
    return x


def _pixelate(img, c, g):
    N, C, H, W = img.shape
    x = _pil_resize_box(img.float(), int(H * c), int(W * c))
    return _pil_resize_box(x, H, W).to(torch.uint8)


def _jpeg_compression(img, c, g):
    """Real JPEG round trip at quality c (PIL's default 4:2:0 chroma subsampling = libjpeg's, which
    torchvision also uses). Per image on CPU (libjpeg), batched nvjpeg on CUDA."""
    imgs = list(img.contiguous().unbind(0))
    with warnings.catch_warnings():  # torchvision 0.29 flags its image codecs as moving to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return _jpeg_roundtrip(imgs, int(c), img.device)


def _jpeg_roundtrip(imgs, q, device):
    from torchvision.io import decode_jpeg, encode_jpeg
    try:
        out = decode_jpeg(encode_jpeg(imgs, quality=q), device=device)
    except RuntimeError:  # no nvjpeg on this build: fall back to the CPU codec
        out = [t.to(device) for t in decode_jpeg(encode_jpeg([t.cpu() for t in imgs], quality=q))]
    return torch.stack(out)


def _elastic_transform(img, c, g):
    """Random affine (cv2.warpAffine, bilinear at OpenCV's 1/32-px precision, border reflect-101) then a
    smooth displacement field (skimage gaussian of U(-1, 1), mode 'reflect', truncate 3, times alpha) applied
    with scipy map_coordinates(order=1, mode='reflect')."""
    x = _f(img)
    N, C, H, W = x.shape
    dev = x.device
    cs = torch.tensor([H // 2, W // 2], dtype=torch.float64, device=dev)
    sq = min(H, W) // 3
    pts1 = torch.stack([cs + sq, torch.stack([cs[0] + sq, cs[1] - sq]), cs - sq])  # [3, 2] (x, y) like cv2
    pts2 = pts1[None] + _uniform(-c[2], c[2], (N, 3, 2), g, dev).double()
    P = torch.cat([pts1, torch.ones(3, 1, dtype=torch.float64, device=dev)], 1)
    A = torch.linalg.solve(P[None].expand(N, 3, 3), pts2)  # [N, 3, 2]: [x y 1] @ A = pts2
    T = torch.zeros(N, 3, 3, dtype=torch.float64, device=dev)
    T[:, :2], T[:, 2, 2] = A.transpose(1, 2), 1
    Ti = torch.linalg.inv(T)  # warpAffine samples the source at M^-1 (dst)
    yy, xx = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.float64),
                            torch.arange(W, device=dev, dtype=torch.float64), indexing="ij")
    sx = Ti[:, 0, 0, None, None] * xx + Ti[:, 0, 1, None, None] * yy + Ti[:, 0, 2, None, None]
    sy = Ti[:, 1, 0, None, None] * xx + Ti[:, 1, 1, None, None] * yy + Ti[:, 1, 2, None, None]
    x = _bilinear(x, (torch.round(sy * 32) / 32).float(), (torch.round(sx * 32) / 32).float(), "reflect101")
    field = _uniform(-1, 1, (N, 2, H, W), g, dev)  # dx then dy, as drawn by the generator
    field = _gaussian(field, c[1], mode="symmetric", truncate=3) * c[0]
    return _u8(_bilinear(x, yy.float() + field[:, 1], xx.float() + field[:, 0], "symmetric"))


def _bilinear(x, sy, sx, mode):
    """Sample x [N, C, H, W] at float coordinates sy, sx [N, H, W]. Out-of-range neighbours follow the border
    mode: x is padded by half its size once (fast F.pad), beyond that indices clamp (never reached by the
    elastic_transform displacements, a few pixels)."""
    N, C, H, W = x.shape
    p = min(H, W) // 2
    xp = _pad(x, p, mode)
    Hp, Wp = H + 2 * p, W + 2 * p
    y0, x0 = torch.floor(sy), torch.floor(sx)
    fy, fx = (sy - y0).to(x.dtype)[:, None], (sx - x0).to(x.dtype)[:, None]
    y0 = (y0.long() + p).clamp(0, Hp - 2)
    x0 = (x0.long() + p).clamp(0, Wp - 2)
    flat = xp.reshape(N, C, Hp * Wp)
    i00 = y0 * Wp + x0

    def at(off):
        return flat.gather(2, (i00 + off).view(N, 1, H * W).expand(N, C, H * W)).view(N, C, H, W)
    return ((1 - fy) * ((1 - fx) * at(0) + fx * at(1)) + fy * ((1 - fx) * at(Wp) + fx * at(Wp + 1)))


def _spatter(img, c, g):
    """spatter(): a blurred, thresholded Gaussian 'liquid' layer. Mud (c[5] = 1) is plain array maths.
    Water (c[5] = 0) runs OpenCV's Canny (3x3 Sobel, L1 magnitude, non-maximum suppression, hysteresis
    50/150), distanceTransform(DIST_L2, mask 5: chamfer weights 1, 1.4, 2.1969; only distances <= 20 matter
    since they are truncated at 20, so 20 min-plus sweeps are exact), blur, equalizeHist, an 8-bit filter2D,
    blur, in torch. The generator's uint8 cast of liquid*255 wraps above 1.0; we clamp (very rare)."""
    x = _f(img)
    N, C, H, W = x.shape
    dev = x.device
    liquid = _gaussian(c[0] + c[1] * _randn((N, 1, H, W), g, dev), c[2])
    liquid = torch.where(liquid < c[3], torch.zeros_like(liquid), liquid)
    if c[5] == 0:
        l8 = (liquid * 255).clamp(0, 255).floor()
        edges = _canny(l8, 50, 150)
        dist = _chamfer_distance(edges, 20.0).clamp(max=20)
        dist = _box3(dist).floor()  # blur, then .astype(np.uint8)
        dist = _equalize_hist(dist)
        ker = torch.tensor([[-2., -1, 0], [-1, 1, 1], [0, 1, 2]], device=dev)
        dist = F.conv2d(_pad(dist, 1, "reflect101"), ker[None, None])
        dist = _round_half_even(dist).clamp(0, 255)  # filter2D to CV_8U saturates
        dist = _round_half_even(_box3(dist)).clamp(0, 255)  # cv2.blur on uint8
        m = liquid * dist
        mx = m.amax((2, 3), keepdim=True)
        m = torch.where(mx > 0, m / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(m)) * c[4]
        color = torch.tensor([175 / 255, 238 / 255, 238 / 255], device=dev).view(1, 3, 1, 1)
        return _u8(x + m * color)
    m = _gaussian((liquid > c[3]).float(), c[4])
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.tensor([63 / 255, 42 / 255, 20 / 255], device=dev).view(1, 3, 1, 1)
    return _u8(x * (1 - m) + color * m)


def _round_half_even(x):
    return torch.round(x)  # torch.round rounds half to even, like cvRound


def _canny(img, low, high):
    """cv2.Canny(img, low, high) for [N, 1, H, W] uint8-valued floats: bool edge map."""
    N, _, H, W = img.shape
    p = _pad(img, 1, "replicate")
    sob = torch.tensor([[-1., 0, 1], [-2, 0, 2], [-1, 0, 1]], device=img.device)
    gx = F.conv2d(p, sob[None, None])
    gy = F.conv2d(p, sob.T.contiguous()[None, None])
    mag = gx.abs() + gy.abs()
    mp = F.pad(mag, (1, 1, 1, 1))  # magnitude outside the image is 0

    def nb(dy, dx):
        return mp[:, :, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
    ax, ay = gx.abs(), gy.abs()
    tg22 = ax * 0.4142135623730950
    tg67 = tg22 + 2 * ax
    s = torch.where((gx < 0) ^ (gy < 0), -1, 1)
    horiz = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    vert = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    diag = torch.where(s < 0, (mag > nb(-1, 1)) & (mag > nb(1, -1)), (mag > nb(-1, -1)) & (mag > nb(1, 1)))
    keep = torch.where(ay < tg22, horiz, torch.where(ay > tg67, vert, diag)) & (mag > low)
    strong = keep & (mag > high)
    while True:  # hysteresis: grow strong edges through 8-connected candidates
        grown = keep & (F.max_pool2d(strong.float(), 3, 1, 1) > 0)
        if torch.equal(grown, strong):
            return strong
        strong = grown


def _chamfer_distance(edges, cap):
    """cv2.distanceTransform(255 - edges, DIST_L2, 5) for distances up to `cap` (outside = unreachable)."""
    steps = {(0, 1): 1.0, (1, 1): 1.4, (1, 2): 2.1969}  # OpenCV's mask5 for DIST_L2 (|dy|, |dx|), either order
    moves = [(dy, dx, steps[tuple(sorted((abs(dy), abs(dx))))]) for dy in range(-2, 3) for dx in range(-2, 3)
             if tuple(sorted((abs(dy), abs(dx)))) in steps]
    big = 1e4
    d = torch.where(edges, torch.zeros_like(edges, dtype=torch.float32), torch.full_like(edges, big, dtype=torch.float32))
    N, _, H, W = d.shape
    for _ in range(int(cap) + 1):
        p = F.pad(d, (2, 2, 2, 2), value=big)
        cand = torch.stack([p[:, :, 2 + dy:2 + dy + H, 2 + dx:2 + dx + W] + w for dy, dx, w in moves], 0).amin(0)
        nd = torch.minimum(d, cand)
        if torch.equal(nd, d):
            break
        d = nd
    return d


def _equalize_hist(x):
    """cv2.equalizeHist per image on [N, 1, H, W] integer-valued floats 0..255."""
    N = x.shape[0]
    v = x.reshape(N, -1).long()
    hist = torch.zeros(N, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    total = v.shape[1]
    first = (hist > 0).float().argmax(1)
    hfirst = hist.gather(1, first[:, None]).squeeze(1)
    cum = hist.cumsum(1) - hfirst[:, None]  # sum over (first, i]
    scale = 255.0 / (total - hfirst).clamp(min=1).float()
    lut = _round_half_even(cum.float() * scale[:, None]).clamp(0, 255)
    ar = torch.arange(256, device=x.device)[None]
    lut = torch.where(ar <= first[:, None], torch.zeros_like(lut), lut)
    lut = torch.where((hfirst == total)[:, None], first[:, None].float().expand_as(lut), lut)
    return lut.gather(1, v).view_as(x)


_FUNCS = dict(gaussian_noise=_gaussian_noise, shot_noise=_shot_noise, impulse_noise=_impulse_noise,
              speckle_noise=_speckle_noise, gaussian_blur=_gaussian_blur, glass_blur=_glass_blur,
              defocus_blur=_defocus_blur, motion_blur=_motion_blur, zoom_blur=_zoom_blur, snow=_snow,
              frost=_frost, fog=_fog, brightness=_brightness, contrast=_contrast, saturate=_saturate,
              pixelate=_pixelate, jpeg_compression=_jpeg_compression, elastic_transform=_elastic_transform,
              spatter=_spatter)


def corrupt(images, name, severity, generator=None, params=None):
    """Apply one CIFAR-C / Tiny-ImageNet-C corruption to uint8 images [N, 3, H, W] (batched, on their device).

    Parameters per severity are those of make_cifar_c.py (H = W = 32) or make_tinyimagenet_c.py (64);
    for other sizes pass `params` (the generator's `c` for that corruption, e.g. 0.08 for gaussian_noise).
    `generator` (a torch.Generator, on any device) makes the draws reproducible.

    Returns what the generator STORES: CIFAR-10-C keeps np.uint8 arrays (.npy), but make_tinyimagenet_c.py saves
    every corrupted image as a JPEG of quality 85 (Image.save(path, quality=85, optimize=True); optimize only
    shrinks the Huffman tables), so 64 x 64 images with the standard parameters get that JPEG round trip too,
    batched (torchvision's libjpeg encoder decodes bit-identically to PIL's here; nvjpeg on CUDA). Without it the
    generated images would be further from clean than the official files (noise 25-35 %, impulse and spatter
    far more). With explicit `params` nothing is added."""
    _check_name_severity(name, severity)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        raise ValueError("images must be a uint8 tensor [N, 3, H, W], got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
    H, W = images.shape[-2:]
    stored_as_jpeg = params is None and H == W == 64  # Tiny-ImageNet-C's files
    if params is None:
        if H != W or H not in _PARAMS:
            raise ValueError(f"standard parameters exist for 32x32 (CIFAR-C) and 64x64 (Tiny-ImageNet-C) images, "
                             f"got {H}x{W}: pass params= explicitly")
        params = _PARAMS[H][name][severity - 1]
    if images.shape[0] == 0:
        return images.clone()
    with torch.no_grad():
        out = _FUNCS[name](images, params, generator)
        if stored_as_jpeg:
            out = _jpeg_compression(out, TINY_C_JPEG_QUALITY, None)
    return out.contiguous()


TINY_C_JPEG_QUALITY = 85  # make_tinyimagenet_c.py: Image.fromarray(np.uint8(img)).save(save_path, quality=85, ...)


# ─── official files ─────────────────────────────────────────────────────────────────────────────
_C_DIRS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C", "tinyimagenet": "Tiny-ImageNet-C"}


def _dataset_key(dataset):
    key = str(dataset).lower().replace("-", "").replace("_", "")
    key = {"cifar10c": "cifar10", "cifar100c": "cifar100", "tinyimagenet200": "tinyimagenet",
           "tinyimagenetc": "tinyimagenet", "tiny": "tinyimagenet"}.get(key, key)
    if key not in _C_DIRS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: cifar10, cifar100, tinyimagenet")
    return key


def _c_dir(root, key):
    root = Path(root)
    return root if root.name == _C_DIRS[key] else root / _C_DIRS[key]


def corrupted_available(root, dataset, name):
    """True when the official corrupted files for `name` exist under root: for CIFAR-C <name>.npy and labels.npy,
    for Tiny-ImageNet-C all five severity folders holding images (a partial copy is not "available")."""
    if root is None:
        return False
    key = _dataset_key(dataset)
    d = _c_dir(root, key)
    if key != "tinyimagenet":
        return (d / f"{name}.npy").is_file() and (d / "labels.npy").is_file()
    return all(any(p.suffix.lower() in _IMG_SUFFIXES for p in (d / name / str(s)).glob("*/*"))
               for s in range(1, 6))


def _npy(path, what):
    """np.load(mmap) of an official .npy with errors that name the file (a truncated or garbage file otherwise
    fails deep inside NumPy with no path)."""
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable {what} .npy ({type(e).__name__}: {e}); download it again") from None


def load_corrupted(root, dataset, name, severity, classes=None, limit=None, files=None, labels=None, size=None):
    """Official corrupted test images -> (uint8 [N, 3, H, W], int64 labels [N]).

    CIFAR-10-C / CIFAR-100-C: <root>/CIFAR-10-C/<name>.npy, uint8 [50000, 32, 32, 3], severity s = rows
    (s-1)*10000 .. s*10000 (the test set in order) and labels.npy (memory-mapped: only the block is read);
    `limit`: the first `limit` images of the block. Float arrays, a 2-D labels.npy, images not of `size` px
    (default 32) and unreadable files are errors naming the file.
    Tiny-ImageNet-C: <root>/Tiny-ImageNet-C/<name>/<severity>/<wnid>/*.JPEG; labels index `classes` (the clean
    set's wnids in class order: tinyimagenet_classes(clean folder); default: read from tiny-imagenet-200/wnids.txt
    beside the -C folder, since a class folder missing from one severity would shift every later label if the
    folders were counted). files + labels: exactly those clean val images (file names and their labels, in
    order: tinyimagenet_val_files), so the corrupted set is the clean subset being evaluated, image for image;
    without them every image of the severity folder, class by class (`limit`: the first `limit`).
    `root` may also be the -C folder itself."""
    _check_name_severity(name, severity)
    key = _dataset_key(dataset)
    d = _c_dir(root, key)
    if key != "tinyimagenet":
        return _load_cifar_c(d, key, name, severity, limit, size or 32)
    return _load_tiny_c(d, name, severity, classes, limit, files, labels, size or 64)


def _load_cifar_c(d, key, name, severity, limit, size):
    """One severity's block of <d>/<name>.npy and labels.npy (memory-mapped: only the block is read)."""
    f, fl = d / f"{name}.npy", d / "labels.npy"
    if not f.is_file() or not fl.is_file():
        raise FileNotFoundError(f"official {_C_DIRS[key]} files not found: need {f} and {fl}")
    arr, lab = _npy(f, "images"), _npy(fl, "labels")
    if arr.dtype != np.uint8:
        raise ValueError(f"{f}: images must be uint8 (the official files are); got {arr.dtype}")
    if arr.ndim != 4 or arr.shape[1:] != (size, size, 3) or arr.shape[0] % 5:
        raise ValueError(f"{f}: expected uint8 [5*n, {size}, {size}, 3]; got {arr.shape}")
    if lab.ndim != 1 or lab.shape[0] != arr.shape[0]:
        raise ValueError(f"{fl}: expected one label per image, shape [{arr.shape[0]}]; got {lab.shape}")
    n = arr.shape[0] // 5
    start = (severity - 1) * n
    stop = start + (n if limit is None else min(limit, n))
    block = np.array(arr[start:stop])  # a copy: the memmap slice is read-only
    labels = torch.from_numpy(np.asarray(lab[start:stop]).astype(np.int64))
    return torch.from_numpy(block).permute(0, 3, 1, 2).contiguous(), labels


def _load_tiny_c(d, name, severity, classes, limit, files, labels, size):
    """<d>/<name>/<severity>/<wnid>/*.JPEG: the images `files` names, or the whole folder (its first `limit`)."""
    sd = d / name / str(severity)
    if not sd.is_dir():
        raise FileNotFoundError(f"official Tiny-ImageNet-C folder not found: {sd}")
    classes = classes if classes is not None else _tiny_c_classes(d)
    if files is not None:
        paths, labels = _tiny_c_files(sd, classes, files, labels)
    else:
        paths, labels = _tiny_c_folder(sd, classes, limit)
    if not paths:
        raise FileNotFoundError(f"no images under {sd}")
    imgs = _decode_images(paths)
    bad = [str(p) for p, im in zip(paths, imgs) if tuple(im.shape[1:]) != (size, size)]
    if bad:
        raise ValueError(f"{bad[0]}: a Tiny-ImageNet-C image must be {size}x{size}"
                         + (f" ({len(bad)} such files)" if len(bad) > 1 else ""))
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)


def _tiny_c_classes(d):
    """The clean set's wnids in class order, from the tiny-imagenet-200 folder beside the -C folder (counting the
    -C class folders would shift every later label when one is missing from a severity)."""
    wn = d.parent / DATASETS["tinyimagenet"]["folder"]
    if not (wn / "wnids.txt").is_file():
        raise FileNotFoundError(f"Tiny-ImageNet-C labels need the clean set's class order: no {wn / 'wnids.txt'}; "
                                "pass classes=seslib.tinyimagenet_classes(<tiny-imagenet-200 folder>)")
    return tinyimagenet_classes(wn)


def _tiny_c_files(sd, classes, files, labels):
    """The corrupted copies of the clean images evaluated, image for image -> (paths, labels)."""
    if labels is None or len(labels) != len(files):
        raise ValueError("files= needs labels= (one per file) to find each image's class folder")
    paths = [sd / classes[int(y)] / f for f, y in zip(files, labels)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the evaluated clean images have no corrupted copy, e.g. "
                                f"{missing[0]} (an incomplete Tiny-ImageNet-C folder?)")
    return paths, [int(y) for y in labels]


def _tiny_c_folder(sd, classes, limit):
    """Every image of a severity folder, class by class -> (paths, labels), the first `limit` of them."""
    index = {w: i for i, w in enumerate(classes)}
    paths, labels = [], []
    for w in sorted(p.name for p in sd.iterdir() if p.is_dir()):
        if w not in index:
            raise ValueError(f"{sd / w}: class {w!r} is not one of the clean set's classes")
        fs = sorted(p for p in (sd / w).iterdir() if p.suffix.lower() in _IMG_SUFFIXES)
        paths += fs
        labels += [index[w]] * len(fs)
    return paths[:limit], labels[:limit]  # decode only what is used


# ─── evaluation ─────────────────────────────────────────────────────────────────────────────────
def _resolve_corruptions(corruptions):
    """A set's name (CORRUPTION_SETS), one corruption's name or a list of names -> the list of names."""
    if isinstance(corruptions, str):
        if corruptions in CORRUPTION_SETS:
            return list(CORRUPTION_SETS[corruptions])
        corruptions = [corruptions]
    names = list(corruptions)
    valid = CORRUPTIONS + EXTRA_CORRUPTIONS
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"unknown corruption(s) {bad}; valid: {', '.join(map(repr, CORRUPTION_SETS))} or names from "
                         f"{', '.join(valid)}")
    return names


def evaluate_corruptions(model, images, labels, corruptions="all15", severities=(1, 2, 3, 4, 5), batch_size=500,
                         normalize=None, device=None, data_root=None, dataset=None, seed=0, collector=None,
                         amp="auto", classes=None, progress=True, protocol="standard", files=None, cpu_amp=False):
    """Accuracy (%) and ECE of `model` on clean and corrupted test images.

    images: clean uint8 [N, 3, H, W] (the test set, or its first N images in order); labels [N].
    normalize: (mean, std) applied after scaling to [0, 1]. Official files under `data_root` (for `dataset`
    'cifar10' | 'cifar100' | 'tinyimagenet') are preferred per corruption; otherwise images are generated
    with `corrupt` (seeded by `seed`, per corruption and severity). Returns a JSON-ready dict with
    accuracy[c][s], per_corruption, per_severity, mean_corruption_acc, clean_acc, ece_clean, ece[c][s],
    ece_corrupted (pooled over all corrupted predictions), detail {"<c>_s<s>": acc} (the paper's naming)
    and source[c] ('official files' | 'generated').
    files: the clean images' file names (Tiny-ImageNet val: tinyimagenet_val_files) so that official
    Tiny-ImageNet-C images are matched to exactly the clean images evaluated; without them the whole severity
    folder is scored and `n_scored` says how many images each such cell had.
    Errors: error[c][s] = 100 - accuracy, mean_corruption_error (the unnormalised mCE), relative_degradation
    (mean over cells of corrupted error - clean error); corruption_error_vs_baseline normalises by a baseline run.
    protocol="paper": the published SES evaluation instead (evaluate_paper_protocol).
    cpu_amp=True: amp's fp16/bf16 runs on the CPU too (the run config's cpu_amp; see resolve_precision)."""
    if protocol not in CORRUPTION_PROTOCOLS:
        raise ValueError(f"unknown corruption protocol {protocol!r}; known: {', '.join(CORRUPTION_PROTOCOLS)}")
    if protocol == "paper":
        return evaluate_paper_protocol(model, images, labels, normalize, batch_size=batch_size, device=device,
                                       amp=amp, seed=seed, collector=collector, cpu_amp=cpu_amp)
    from torchmetrics.classification import MulticlassCalibrationError  # noqa: F401  (the ECE's: fail before any work)
    names, sevs, labels = _standard_inputs(images, labels, corruptions, severities, batch_size, data_root)
    dev = _eval_device(model, device)
    # same precision rule as training (bf16 only on compute capability >= 8; fp16 on a T4; fp32 on CPU)
    predict = _predictor(model, dev, _eval_amp_dtype(amp, dev, cpu_amp), _normalize_on(dev, normalize))
    key = _dataset_key(dataset) if dataset is not None else None
    H = images.shape[-1]
    sources = _corruption_sources(names, labels, H, data_root, key)
    official = dict(root=data_root, dataset=key, classes=classes, size=H, files=files,
                    limit=None if key == "tinyimagenet" else len(labels), labels=labels if files is not None else None)
    cell_images = _cell_images(images, labels, sources, official, batch_size, dev, seed)
    with measuring(model), _paused(collector):
        clean_acc, p, y = _score(predict, _chunks(images, labels, batch_size))
        clean = clean_acc, _ece(p, y)
        cells = _score_cells(predict, names, sevs, cell_images, len(labels), progress)
    return _robustness_summary(names, sevs, len(labels), clean, cells, sources)


# ─── evaluate_corruptions' steps: inputs, sources, predictor, scoring, summary ───────────────────
def _standard_inputs(images, labels, corruptions, severities, batch_size, data_root):
    """The standard protocol's arguments, checked before any work -> (corruption names, severities, CPU labels)."""
    names = _resolve_corruptions(corruptions)
    sevs = [severities] if isinstance(severities, (int, np.integer)) else list(severities)
    for s in sevs:
        _check_name_severity(names[0], s)
    if not sevs:
        raise ValueError("severities is empty; valid: 1, 2, 3, 4, 5")
    labels = _checked_labels(images, labels).cpu()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if images.shape[-1] not in _PARAMS and data_root is None:
        raise ValueError(f"no standard corruption parameters for {images.shape[-1]} px images (32 or 64)")
    return names, sevs, labels


def _checked_labels(images, labels):
    """Checks that images are clean uint8 [N, 3, H, W] -> their labels as int64 [N] (on the labels' device)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a clean uint8 tensor [N, 3, H, W]")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    return labels


def _eval_device(model, device):
    """The device asked for, else the model's (the CPU for a model without parameters)."""
    return torch.device(device) if device is not None else next(model.parameters(), torch.empty(0)).device


def _normalize_on(dev, normalize):
    """normalize = (mean, std) as float32 tensors on dev, made once per evaluation; None: (None, None), /255 only."""
    if normalize is None:
        return None, None
    return tuple(torch.as_tensor(v, dtype=torch.float32, device=dev) for v in (normalize[0], normalize[1]))


def _paused(collector):
    """The collector's hooks record nothing during an evaluation (no collector: nothing to pause)."""
    return collector.paused() if collector is not None else nullcontext()


def _corruption_sources(names, labels, size, data_root, key):
    """Where each corruption's images come from: 'official files' when they are under data_root and can be matched to
    the clean images evaluated, else 'generated' by corrupt() (which needs the standard parameters for `size` px)."""
    sources = {}
    for n in names:
        official = key is not None and corrupted_available(data_root, key, n)
        if official and key != "tinyimagenet":
            official = _cifar_c_matches(data_root, key, n, labels)
        sources[n] = "official files" if official else "generated"
        if not official and size not in _PARAMS:
            raise ValueError(f"{n}: no official files and no standard parameters for {size} px images")
    return sources


def _cifar_c_matches(data_root, key, name, labels):
    """CIFAR-C files hold the whole test set in order: usable when the clean labels are its start (else a warning)."""
    lab = _npy(_c_dir(data_root, key) / "labels.npy", "labels")
    if len(labels) <= len(lab) // 5 and np.array_equal(np.asarray(lab[:len(labels)]).astype(np.int64), labels.numpy()):
        return True
    warnings.warn(f"{name}: the clean labels are not the start of the official test set, so the official "
                  "files can't be matched to them; generating this corruption instead")
    return False


def _cell_images(images, labels, sources, official, batch_size, dev, seed):
    """-> cell(ci, name, severity): that cell's batches of (uint8 images, labels), from the official files
    (`official`: load_corrupted's arguments) or made by corrupt() on dev from the clean batches, seeded per cell."""
    def cell(ci, name, severity):
        if sources[name] == "official files":
            return _chunks(*load_corrupted(name=name, severity=severity, **official), batch_size)
        g = torch.Generator(device=dev).manual_seed(int(seed) * 1000 + ci * 10 + severity)
        return ((corrupt(x.to(dev), name, severity, generator=g), y) for x, y in _chunks(images, labels, batch_size))
    return cell


def _chunks(x, y, batch_size):
    for i in range(0, len(y), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def _predictor(model, dev, amp_dtype, mean_std):
    """uint8 batch -> the model's class probabilities (fp32): on dev, ToTensor + Normalize, the run's autocast."""
    def predict(x_u8):
        x = normalize_u8(x_u8.to(dev), *mean_std)
        with autocast(dev, amp_dtype):
            return model(x).float().softmax(1)
    return predict


def _score(predict, batches):
    """-> (accuracy %, probabilities, labels) over (uint8 images, labels) batches, both on the CPU."""
    correct, total, P, Y = 0, 0, [], []
    for x, y in batches:
        p = predict(x)
        correct += (p.argmax(1).cpu() == y).sum().item()
        total += len(y)
        P.append(p.cpu())
        Y.append(y)
    return 100.0 * correct / max(total, 1), torch.cat(P), torch.cat(Y)


def _ece(p, y):
    """Expected calibration error: 15 equal-width confidence bins, L1 (torchmetrics)."""
    from torchmetrics.classification import MulticlassCalibrationError
    return float(MulticlassCalibrationError(num_classes=p.shape[1], n_bins=15, norm="l1")(p, y))


def _score_cells(predict, names, sevs, cell_images, n_clean, progress):
    """Every (corruption, severity) cell -> (accuracy[c][s], ece[c][s], ECE pooled over all corrupted predictions,
    {"<c>_s<s>": images scored} for the cells that did not score the n_clean images: a whole official folder)."""
    acc, eces, all_p, all_y, scored = {}, {}, [], [], {}
    bar = tqdm(total=len(names) * len(sevs), desc="corruptions", disable=not progress or None, leave=False)
    for ci, n in enumerate(names):
        acc[n], eces[n] = {}, {}
        for s in sevs:
            bar.set_postfix_str(f"{n} s{s}")
            a, p, y = _score(predict, cell_images(ci, n, s))
            acc[n][str(s)], eces[n][str(s)] = a, _ece(p, y)
            if len(y) != n_clean:
                scored[f"{n}_s{s}"] = len(y)
            all_p.append(p)
            all_y.append(y)
            bar.update(1)
    bar.close()
    return acc, eces, _ece(torch.cat(all_p), torch.cat(all_y)), scored


def _robustness_summary(names, sevs, n_images, clean, cells, sources):
    """evaluate_corruptions' JSON-ready result from the clean (accuracy, ECE) and the cells' scores."""
    (clean_acc, ece_clean), (acc, eces, ece_corrupted, scored) = clean, cells
    per_c = {n: float(np.mean(list(acc[n].values()))) for n in names}
    per_s = {str(s): float(np.mean([acc[n][str(s)] for n in names])) for s in sevs}
    err = {n: {s: 100.0 - a for s, a in acc[n].items()} for n in names}
    mca = float(np.mean(list(per_c.values())))
    return {
        "corruptions": names, "severities": sevs, "n_images": int(n_images),
        "accuracy": acc, "per_corruption": per_c, "per_severity": per_s,
        "mean_corruption_acc": mca,
        "clean_acc": clean_acc, "ece_clean": ece_clean, "ece": eces,
        "ece_corrupted": ece_corrupted,
        "detail": {f"{n}_s{s}": acc[n][str(s)] for n in names for s in sevs},
        "error": err, "mean_corruption_error": 100.0 - mca,
        "relative_degradation": float(np.mean([e - (100.0 - clean_acc) for n in names for e in err[n].values()])),
        "source": sources, **({"n_scored": scored} if scored else {}),
    }


def corruption_error_vs_baseline(rob, baseline_rob):
    """Hendrycks & Dietterich's corruption errors, normalised by a baseline run's instead of AlexNet's (there is no
    AlexNet reference run for CIFAR or Tiny-ImageNet): per corruption c, CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}
    and relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean); mCE and relative mCE are
    their means over the corruptions both runs share, in % (100 = as the baseline, lower is better). rob /
    baseline_rob: evaluate_corruptions results (accuracy[c][s], clean_acc), possibly seed means."""
    names = [n for n in rob["accuracy"] if n in baseline_rob["accuracy"]]
    if not names:
        raise ValueError("the two robustness results share no corruption")
    ce, rel = {}, {}
    for n in names:
        sevs = [s for s in rob["accuracy"][n] if s in baseline_rob["accuracy"][n]]
        e = [100.0 - rob["accuracy"][n][s] for s in sevs]
        eb = [100.0 - baseline_rob["accuracy"][n][s] for s in sevs]
        ce[n] = 100.0 * sum(e) / sum(eb) if sum(eb) else float("nan")
        db = sum(x - (100.0 - baseline_rob["clean_acc"]) for x in eb)
        rel[n] = 100.0 * sum(x - (100.0 - rob["clean_acc"]) for x in e) / db if db else float("nan")
    return {"ce": ce, "mce": float(np.nanmean(list(ce.values()))), "relative_ce": rel,
            "relative_mce": float(np.nanmean(list(rel.values())))}


# ─── the paper's robustness protocol, replicated ─────────────────────────────────────────────────
# The SES scripts' evaluate_robustness + apply_corruption (identical in ses_kaggle_dual_gpu.py, ses_vit_*.py,
# ses_adaptive_beta.py, ses_phase3.py, ses_resnet50_tinyimagenet .py; they differ only in the autocast dtype):
# 5 corruptions x severities 1, 3, 5 applied to the NORMALISED test tensors, batch by batch, in this order,
# with these parameters. Not Hendrycks' protocol: noise is added in normalised units, "gaussian_blur" is a
# k x k box filter with zero padding, brightness adds a constant, shot noise clamps negatives to 0 first.
# Reproduced operation for operation (same torch ops, same draw order), so with the same seed on the CPU it
# gives the author's function's numbers exactly (tests/test_paper_protocol.py, against its recorded output).
CORRUPTION_PROTOCOLS = ("standard", "paper")
# Its own list, in the author's order (the order of the draws): the same five names as the "paper5" set of
# CORRUPTION_SETS, but not the same corruptions (that set runs the standard pixel-space ones).
PAPER_PROTOCOL = read_only({"corruptions": ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "shot_noise"),
                            "severities": (1, 3, 5)})


def _paper_corruption(x, name, severity, generator=None):
    """apply_corruption(images, corruption_type, severity) of the SES scripts, on a normalised float batch."""
    if name == "gaussian_noise":
        scale = [0.04, 0.06, 0.08, 0.10, 0.12][severity - 1]
        return x + torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * scale
    if name == "gaussian_blur":
        k = [3, 3, 5, 5, 7][severity - 1]
        c = x.shape[1]
        kernel = torch.ones(c, 1, k, k, device=x.device) / (k * k)
        return F.conv2d(x, kernel, padding=k // 2, groups=c)
    if name == "contrast":
        factor = [0.8, 0.6, 0.4, 0.3, 0.2][severity - 1]
        mean = x.mean(dim=[2, 3], keepdim=True)
        return (x - mean) * factor + mean
    if name == "brightness":
        return x + [0.1, 0.2, 0.3, 0.4, 0.5][severity - 1]
    if name == "shot_noise":
        scale = [500, 250, 100, 75, 50][severity - 1]
        return torch.poisson(x.clamp(0) * scale, generator=generator) / scale
    raise ValueError(f"the paper protocol has no corruption {name!r}; it has {', '.join(PAPER_PROTOCOL['corruptions'])}")


def evaluate_paper_protocol(model, images, labels, normalize, batch_size=256, device=None, amp="fp32", seed=0,
                            collector=None, generator=None, cpu_amp=False):
    """The published SES robustness evaluation (see the block comment above), as an exact replica.

    images: clean uint8 [N, 3, H, W] (the author's test loader: ToTensor + Normalize, in order, batches of the
    training batch size); normalize: (mean, std) of the run. Noise is drawn from `generator` (default: a CPU/device
    generator seeded with `seed`), in the author's order: corruption, severity, batch. amp: the run's precision
    (the author's autocast: fp16 in the T4 scripts, bf16 for Tiny-ImageNet, none in ses_phase3.py); on the CPU it
    runs in fp32 unless cpu_amp=True (the run config's cpu_amp).
    Returns {"protocol": "paper", "detail": {"<c>_s<s>": acc}, "mean_corruption_acc", "n_images", ...}."""
    if normalize is None:
        raise ValueError("the paper protocol corrupts normalised tensors: pass normalize=(mean, std)")
    labels = _checked_labels(images, labels)
    dev = _eval_device(model, device)
    amp_dtype = _eval_amp_dtype(amp, dev, cpu_amp)
    g = generator if generator is not None else torch.Generator(device=dev).manual_seed(int(seed))
    mean_std = _normalize_on(dev, normalize)
    detail = {}
    with measuring(model), _paused(collector):
        for name in PAPER_PROTOCOL["corruptions"]:
            for sev in PAPER_PROTOCOL["severities"]:
                correct = total = 0
                if g.device.type == "cpu":  # the author's `for X, y in test_loader` draws the DataLoader
                    torch.empty((), dtype=torch.int64).random_(generator=g)  # iterator's base seed from it
                for i in range(0, len(labels), batch_size):
                    x = normalize_u8(images[i:i + batch_size].to(dev), *mean_std)  # ToTensor + Normalize
                    y = labels[i:i + batch_size].to(dev)
                    xc = _paper_corruption(x, name, sev, g)
                    with autocast(dev, amp_dtype):
                        correct += (model(xc).argmax(1) == y).sum().item()
                    total += len(y)
                detail[f"{name}_s{sev}"] = 100.0 * correct / total
    return {"protocol": "paper", "corruptions": list(PAPER_PROTOCOL["corruptions"]),
            "severities": list(PAPER_PROTOCOL["severities"]), "n_images": int(len(labels)), "detail": detail,
            "mean_corruption_acc": float(np.mean(list(detail.values()))),
            "precision": {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp_dtype]}


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# run folders, the stale rule and estimates
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# ── "done" means: the same settings ──
# Keys that cannot change what a run computes: a result made with other values still counts as done.
_NOT_COMPUTED = ("resume", "log", "data_root", "out_dir", "device", "keep_checkpoint", "save_model", "eval_batch_size",
                 "precision", "preset",  # precision follows from amp + the device (+ cpu_amp); preset is a label
                 # which cuDNN kernels compute the same convolutions (rounding only, as another GPU would)
                 "cudnn_deterministic")
# A checkpoint may also be resumed under other robustness settings: they act only after the last epoch.
_RESUME_FREE = _NOT_COMPUTED + ("robustness", "robustness_severities", "robustness_subset")


# Keys added after results were stored whose value there is known: a config without one reads as that value.
# vit_impl: before it, 'vit_tiny' / 'vit_small' were timm's VisionTransformer (now the author's SESViT; timm's is
# 'vit_*_timm'), so an old ViT result differs ("vit_impl timm → author") and an old CNN result does not.
_IMPLIED = {"vit_impl": lambda cfg: "timm" if cfg.get("model") in VIT_MODELS else None,
            "cpu_amp": lambda cfg: False,  # before cpu_amp every CPU run was fp32: what cpu_amp=False runs
            "lr_lag": lambda cfg: 0}  # before lr_lag every schedule ran on time


def config_value(cfg: dict, key):
    """cfg[key], else the value a config made before the key existed implied (_IMPLIED), else "<absent>"."""
    return cfg[key] if key in cfg else _IMPLIED[key](cfg) if key in _IMPLIED else "<absent>"


def config_diff(now: dict, then: dict, ignore=_NOT_COMPUTED) -> list:
    """[(key, then, now)] for every key that differs between a stored run's config and the one planned now
    (a key missing from the older config counts as different: the suite's recipe grew since; except the keys
    of _IMPLIED, read as the value they had). 'preset' is listed too when anything else differs, so a message
    can say "preset smoke -> paper"."""
    diff = [(k, config_value(then, k), config_value(now, k)) for k in sorted(set(now) | set(then))
            if k not in ignore and config_value(then, k) != config_value(now, k)]
    if diff and now.get("preset") != then.get("preset") and "preset" in ignore:
        diff.append(("preset", then.get("preset"), now.get("preset")))
    return diff


def describe_diff(diff, limit=6) -> str:
    """'epochs 2 → 50, preset smoke → paper' (the first `limit` keys)."""
    parts = [f"{k} {json.dumps(a, default=str) if not isinstance(a, str) else a} → "
             f"{json.dumps(b, default=str) if not isinstance(b, str) else b}" for k, a, b in diff[:limit]]
    return ", ".join(parts) + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def set_aside(run_dir, why: str) -> Path:
    """Move a run folder's files (not the folder, which a lock may hold) into {out_dir}/stale/<name>.<time>/,
    with why.txt: nothing is deleted. Returns the new folder. The files the batch runner is writing for the job that
    redoes this run ($SES_JOB_FILES: its log, its executed notebook) stay: they belong to the new run, not the old
    (whose log the runner kept as log.1.txt, which moves with it)."""
    run_dir = Path(run_dir)
    root = run_dir.parent.parent if run_dir.parent.name == "runs" else run_dir.parent
    dest = root / "stale" / f"{run_dir.name}.{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    dest.mkdir(parents=True)
    current_job = {Path(f).resolve() for f in os.environ.get(JOB_FILES_ENV, "").split(os.pathsep) if f}
    for f in run_dir.iterdir():
        if f.name != ".lock" and f.resolve() not in current_job:
            shutil.move(str(f), str(dest / f.name))
    (dest / "why.txt").write_text(why + "\n")
    return dest


def _result_ok(path):
    """A run's result.json exists and parses (train writes it atomically)."""
    return _read_result(path) is not None


def _read_result(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def result_status(result_path, cfg, ignore=_NOT_COMPUTED):
    """("done" | "stale" | "todo", diff) of a run folder's result.json against the config planned now."""
    r = _read_result(result_path)
    if r is None:
        return "todo", []
    if cfg is None:  # a plan without a recipe (e.g. a custom grid): any parseable result counts
        return "done", []
    diff = config_diff(cfg, r.get("config") or {}, ignore)
    return ("stale" if diff else "done"), diff


def fits_budget(est, end, budget=None) -> bool:
    """Whether a run estimated at est["seconds"] may start with the deadline `end`: it must finish before it. A run
    longer than a whole budget can never do that, so it starts when at least half the budget is left (it pauses at an
    epoch boundary and the next invocation resumes it)."""
    if end is None or not est:
        return True
    left = end - time.time()
    if est["seconds"] <= left:
        return True
    return bool(budget) and est["seconds"] > budget and left >= budget / 2


_MODEL_COST = read_only({"resnet18": 1.0, "resnet18_erank": 1.0, "resnet50": 4.0, "wrn28_10": 6.0, "vit_tiny": 0.8,
                          "vit_small": 1.6, "vit_tiny_timm": 0.8, "vit_small_timm": 1.6, "mlp_toy": 0.01,
                          # per SST-2 epoch (batch 32, 128 tokens, fp16): 301.7 s on a T4 in the author's
                          # bert_nlp_summary.json, vs 28.9 s for a ResNet-18 CIFAR epoch
                          "bert-base-uncased": 10.4, TINY_BERT: 0.001})


def run_cost(cfg: dict) -> float:
    """A run's relative cost (model x epochs x pixels, SES adds ~1/every_k); the batch runner starts the costliest first."""
    ses = 1.0 + (0.3 / cfg.get("ses_every_k", 1) if cfg.get("ses") else 0.0)
    return _MODEL_COST.get(cfg.get("model"), 1.0) * cfg.get("epochs", 50) * _data_scale(cfg) * ses


def _data_scale(c) -> float:
    """A config's data per epoch in its model's _MODEL_COST unit: pixels over CIFAR's 32 x 32 (Tiny-ImageNet: 4), or a
    GLUE task's training examples over SST-2's (a text model's unit is an SST-2 epoch)."""
    if c.get("task") in GLUE_TASKS:
        return GLUE_TASKS[c["task"]]["sizes"][0] / GLUE_TASKS["sst2"]["sizes"][0]
    return (DATASETS.get(c.get("dataset"), {}).get("img_size", 32) / 32) ** 2


# ── run-time estimates (the time budget, `sesrun.py plan`) ──
# A run's time = epochs left x seconds per epoch + its final evaluation. Seconds per epoch, best source first: this
# run's own measured epochs (progress.json, a paused run), the measured epochs of a finished run of the same config
# (another seed), the paper's epoch time for the config (PAPER[...]["epoch_s"], on PAPER_GPU), else the paper's
# ResNet-18 CIFAR times scaled by model and image size. Across GPUs, times scale by GPU_SPEED: rough training
# throughput relative to a T4 from public CNN training benchmarks; a measured time on the GPU at hand replaces it.
GPU_SPEED = read_only({"h200": 6.5, "h100": 6.0, "a100": 4.0, "l40s": 3.0, "a10": 2.0, "v100": 2.0, "l4": 1.8,
                       "p100": 1.1, "t4": 1.0, "cpu": 0.02})
_RESNET18_T4_EPOCH_S = {False: 28.9, True: 42.5}  # the paper's ResNet-18 CIFAR epoch, batch 256, fp32 (Exp 1-9)
TOY_RUN_SECONDS = 60.0  # Exp 4's 2-D MLP: about a minute per run on a CPU core (measured), whatever the GPU
TINY_BERT_RUN_SECONDS = 5.0  # Exp 22's smoke run (TINY_BERT on its synthetic text): a few seconds on a CPU (measured)


def gpu_kind(name) -> str:
    """'t4', 'a100', ... from a device name ('Tesla T4', 'NVIDIA A100-SXM4-40GB'), 'cpu' for a CPU model name."""
    n = str(name or "").lower().replace("-", " ")
    for k in sorted(GPU_SPEED, key=len, reverse=True):  # 'l40s' before 'l4'
        if k != "cpu" and re.search(rf"\b{k}\b", n):
            return k
    return "cpu" if not any(w in n for w in ("nvidia", "tesla", "geforce", "rtx", "quadro")) else "t4"


def _speed(kind) -> float:
    if kind not in GPU_SPEED:
        raise ValueError(f"unknown GPU {kind!r}; known: {', '.join(GPU_SPEED)}")
    return GPU_SPEED[kind]


def _steps_fraction(c) -> float:
    """The share of a full epoch's steps a config runs (train_subset, max_steps_per_epoch; 1 for the paper)."""
    n_train = (DATASETS[c["dataset"]]["sizes"][0] if c.get("dataset") in DATASETS else
               GLUE_TASKS[c["task"]]["sizes"][0] if c.get("task") in GLUE_TASKS else 1)
    n = min(c.get("train_subset") or n_train, n_train)
    if c.get("max_steps_per_epoch"):
        n = min(n, c["max_steps_per_epoch"] * c["batch_size"])
    return n / n_train


def estimate_eval_seconds(c, epoch_s) -> float:
    """The final evaluation's time from the training epoch's: every corrupted test image is one forward pass (a
    training image costs about 3: forward + backward), over the standard protocol's corruptions x severities and
    the paper's protocol twice (final and best weights, 5 x 3 cells each)."""
    if not c.get("robustness") or c.get("dataset") not in DATASETS:
        return 0.0
    n_train, n_test = DATASETS[c["dataset"]]["sizes"]  # epoch_s / fraction: the time of a full epoch of n_train
    n_test = min(c.get("robustness_subset") or c.get("test_subset") or n_test, n_test)
    cells = len(_resolve_corruptions(c["robustness"])) * len(c.get("robustness_severities") or (1, 2, 3, 4, 5)) + 30
    return epoch_s / _steps_fraction(c) * cells * n_test / (3 * n_train)


def _paper_t4_epoch_seconds(c, paper_entry=None, paper_gpu=None):
    """(seconds per full epoch on a T4, source) from the paper."""
    if paper_entry and paper_entry.get("epoch_s"):
        kind = gpu_kind(paper_gpu or "Tesla T4")
        return paper_entry["epoch_s"] * _speed(kind), f"paper ({paper_gpu or 'T4'})"
    s = _RESNET18_T4_EPOCH_S[bool(c.get("ses"))] * _MODEL_COST.get(c.get("model"), 1.0) * _data_scale(c)
    return s, "est. from the paper's ResNet-18 times"


def seconds_left(epochs, epochs_done, epoch_seconds) -> float:
    """A run's training seconds left at the mean of its measured epochs (its history, or its progress.json's
    epoch_seconds); the final evaluation not included."""
    return (epochs - epochs_done) * float(np.mean(epoch_seconds)) if len(epoch_seconds) else 0.0


def estimate_run(c, gpu, paper_entry=None, paper_gpu=None, measured=None, progress=None) -> dict:
    """{seconds, epoch_s, epochs_left, source} for the resolved config c on a `gpu` kind. measured: a finished run
    of the same config {epoch_s, eval_s, gpu}; progress: this run's progress.json (epochs done, epoch seconds)."""
    if c.get("model") == "mlp_toy" or "radii" in c:  # the toy study (its config has no model key)
        return {"seconds": TOY_RUN_SECONDS, "epoch_s": TOY_RUN_SECONDS / c["epochs"], "epochs_left": c["epochs"],
                "source": "measured (CPU)"}
    if c.get("model") == TINY_BERT:  # Exp 22's smoke model: seconds on any device, whatever the paper's BERT took
        return {"seconds": TINY_BERT_RUN_SECONDS, "epoch_s": TINY_BERT_RUN_SECONDS / c["epochs"],
                "epochs_left": c["epochs"], "source": "measured (CPU)"}
    speed, frac = _speed(gpu), _steps_fraction(c)
    eval_s = None
    done = (progress or {}).get("epochs_done", 0)
    own = (progress or {}).get("epoch_seconds") or []
    if own and gpu_kind(progress.get("device")) == gpu:
        epoch_s, source = float(np.mean(own)), "measured (this run)"
    elif measured:
        k = GPU_SPEED.get(gpu_kind(measured["gpu"]), 1.0) / speed
        epoch_s, source = measured["epoch_s"] * k, f"measured ({measured['gpu']})"
        eval_s = measured["eval_s"] * k if measured.get("eval_s") is not None else None
    else:
        t4, source = _paper_t4_epoch_seconds(c, paper_entry, paper_gpu)
        epoch_s = t4 / speed * frac
    left = max(0, c["epochs"] - done)
    if eval_s is None:
        eval_s = estimate_eval_seconds(c, epoch_s)
    return {"seconds": left * epoch_s + eval_s, "epoch_s": epoch_s, "epochs_left": left, "source": source}


def _measured(run_dir) -> dict | None:
    """A finished run's measured epoch and evaluation seconds and its GPU, from result.json."""
    r = _read_result(Path(run_dir) / "result.json")
    fin = (r or {}).get("final") or {}
    if not fin.get("epoch_seconds_mean"):
        return None
    return {"epoch_s": fin["epoch_seconds_mean"], "eval_s": fin.get("eval_seconds"),
            "gpu": (r.get("env") or {}).get("device_name", "cpu")}


def run_estimate(run, paper=None, paper_gpu=None, gpu=None) -> dict:
    """estimate_run for one planned run: its progress.json, another finished seed of its config, the paper."""
    if gpu is None:
        dev = pick_device((run.cfg or {}).get("device", "auto"))
        gpu = gpu_kind(_device_name(dev)) if dev.type == "cuda" else "cpu"
    progress = _read_result(run.run_dir / "progress.json")
    same = sorted(run.run_dir.parent.glob(f"{run.config}_seed*")) if run.run_dir.parent.is_dir() else []
    measured = _measured_like(run, [d for d in same if d != run.run_dir])
    return estimate_run(run.cfg or {}, gpu, (paper or {}).get(run.config), paper_gpu, measured, progress)


def _measured_like(run, run_dirs):
    """The first finished run among run_dirs made with this run's config up to the seed (so its epoch time counts)."""
    for d in run_dirs:
        m = _measured(d)
        if m is None or run.cfg is None:
            continue
        then = (_read_result(d / "result.json") or {}).get("config") or {}
        if not config_diff(dict(run.cfg, seed=then.get("seed")), then):
            return m
    return None


# ── GPU memory estimates (estimate_memory: does a run fit a GPU, and on how many) ──
# A run's peak device memory as torch.cuda.max_memory_allocated() would report it, known without a GPU: the real model
# traced through one training step and one evaluation with fake tensors (shapes and dtypes only: no memory, no
# compute), every tensor's bytes counted while it lives, at the precision that GPU runs; plus what a run keeps on the
# device beside the model (its data, the robustness pass's operators). bench/memory_estimates.py checks it against
# every peak the author published (bench/RESULTS.md).
# Per GPU kind: its memory as torch reports it (total_memory / 1e9, decimal GB, to ~0.1: a 16 GB T4 shows 15.8) and
# compute capability (bf16: >= 8).
GPU_MEMORY = read_only({"t4": (15.8, (7, 5)), "p100": (17.1, (6, 0)), "v100": (16.9, (7, 0)), "a10": (23.7, (8, 6)),
                        "l4": (23.7, (8, 9)), "a100": (42.4, (8, 0)), "a100-40": (42.4, (8, 0)),
                        "a100-80": (85.1, (8, 0)), "l40s": (47.7, (8, 9)), "h100": (85.0, (9, 0)),
                        "h200": (150.0, (9, 0))})  # "a100": gpu_kind's name for both sizes, so the smaller
MEM_CONTEXT_GB = 0.5  # the CUDA context and cuBLAS/cuDNN handles: on the GPU, never in max_memory_allocated
MEM_FRAGMENTATION = 0.05  # the caching allocator reserves ~5 % more than it hands out: not usable by tensors
# cudnn.benchmark (cudnn_deterministic=False, Exp 11's recipe) tries each convolution's algorithms with their own
# workspaces, counted by max_memory_allocated: x the training activations of a CNN, fitted on the author's two Exp 11
# peaks (bench/RESULTS.md), so that agreement is not evidence. It takes only free memory, so it never makes a run fail.
CUDNN_AUTOTUNE = 0.5
MAX_DDP_GPUS = 8  # one node: the runner's torchrun is --standalone
_CUDA_FP32_OPS = ("_softmax", "_log_softmax", "native_layer_norm", "native_group_norm")  # see _LiveBytes
# the resolved config's keys the estimate reads (validate_config fills them in)
_MEMORY_KEYS = ("model", "dataset", "batch_size", "eval_batch_size", "amp", "width", "spectral_norm", "drop_path",
                "optimizer", "lr", "momentum", "weight_decay", "grad_clip", "mix", "ses", "ses_lambda", "ses_beta",
                "ses_layers", "ses_targets", "train_subset", "test_subset", "val_split", "erank_batches",
                "erank_eval_samples", "robustness", "robustness_severities")
_TEXT_MEMORY_KEYS = ("model", "task", "text_data", "max_len", "token_type_ids", "batch_size", "eval_batch_size", "amp",
                     "lr", "weight_decay", "grad_clip", "ses", "ses_lambda", "ses_beta", "ses_layers", "train_subset",
                     "test_subset")  # resolve_text_config's


def _is_text(c) -> bool:
    """Whether c is an Exp 22 text run's config (resolve_text_config: a task and max_len, no dataset)."""
    return "task" in c and "max_len" in c and "dataset" not in c


class _LiveBytes(TorchDispatchMode):
    """Every tensor storage's bytes while it lives (rounded up to the caching allocator's 512-byte blocks), and their
    peak. The trace runs CPU autocast, which keeps fp16/bf16 where CUDA autocast computes in float32: with fp32_ops
    set (autocast on), those ops (_CUDA_FP32_OPS; a ViT's softmax is the one that counts) run in float32 here too."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.fp32_ops = False
        self._refs = {}

    def add(self, t):
        st = t.untyped_storage()
        if id(st) not in self._refs:
            n = -(-st.nbytes() // 512) * 512
            self._refs[id(st)] = weakref.ref(st, lambda _, k=id(st), n=n: self._free(k, n))
            self.live += n
            self.peak = max(self.peak, self.live)

    def _free(self, key, n):
        self._refs.pop(key, None)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fp32_ops and func.__name__.split(".")[0] in _CUDA_FP32_OPS:
            args = [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
                    for a in args]
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


@contextlib.contextmanager
def _traced_autocast(mem, dtype):
    """The GPU's autocast on the trace's fake CPU tensors (torch.autocast("cuda") needs a GPU): CPU autocast (the same
    fp16/bf16 ops: convolutions, matmuls) with CUDA's float32 ops (see _LiveBytes); fp32 (dtype None): nothing."""
    if dtype is None:
        yield
        return
    mem.fp32_ops = True
    try:
        with torch.autocast("cpu", dtype=dtype):
            yield
    finally:
        mem.fp32_ops = False


def _meta_model(c):
    """c's model on the meta device (shapes only: no init work): as train builds it, or a text run's text_skeleton."""
    if _is_text(c):
        net = text_skeleton(c)
        if net is None:
            raise ValueError(f"estimate_memory does not know the text model {c['model']!r} (bert-base-uncased and "
                             f"{TINY_BERT} only)")
        return net
    info = dataset_info(c["dataset"])
    with torch.device("meta"):
        net = build_model(c["model"], info["num_classes"], info["img_size"], c["spectral_norm"], c["width"])
    if c["drop_path"] is not None and hasattr(net, "set_drop_path"):  # timm's ViTs keep their built-in 0.1
        net.set_drop_path(c["drop_path"])
    return net


def _fake_model(c):
    """(c's model, its weights fake CPU tensors: no memory; the fake tensor mode to trace it in)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    net, mode = _meta_model(c), FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        return net.to_empty(device="cpu"), mode


def _traced_setup(c, net, mem):
    """The weights counted, then what a run holds between its steps: the last step's gradients (zero_grad comes after
    the next forward) and the optimiser's state (SGD momentum, AdamW's two moments; a text run's AdamW in the author's
    two groups), made by one step on them. Returns (optimiser, {weights, gradients, optimizer} bytes)."""
    for t in [*net.parameters(), *net.buffers()]:
        mem.add(t)
    weights = mem.live
    params = text_param_groups(net, c["weight_decay"]) if _is_text(c) else net.parameters()
    opt = (torch.optim.SGD(params, lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                           foreach=True) if c.get("optimizer") == "sgd" else  # foreach: the default on a GPU
           torch.optim.AdamW(params, lr=c["lr"], weight_decay=c["weight_decay"], foreach=True))
    for p in net.parameters():
        p.grad = torch.empty_like(p)
    grads = mem.live - weights
    opt.step()
    return opt, {"weights": weights, "gradients": grads, "optimizer": mem.live - weights - grads}


def _traced_inputs(c, batch, size):
    """A fake batch: images [batch, 3, size, size], or a text run's padded token ids [batch, max_len] with their
    attention mask (token_type_ids as the run passes them)."""
    if not _is_text(c):
        return torch.empty(batch, 3, size, size)
    ids = torch.zeros(batch, c["max_len"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            **({"token_type_ids": torch.zeros_like(ids)} if c["token_type_ids"] else {})}


def _traced_forward(net, inputs):
    """The model's logits on _traced_inputs' batch."""
    return net(**inputs).logits if isinstance(inputs, dict) else net(inputs)


class _FusedAttention(torch.autograd.Function):
    """What a GPU's fused attention kernel keeps for backward (memory-efficient or flash: BERT's SDPA on every GPU the
    suite knows, with or without a padding mask): its inputs, its output and a float32 log-sum-exp per query; not the
    [B, heads, L, L] probabilities that the CPU decomposition of scaled_dot_product_attention materialises."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _FusedSDPA(TorchFunctionMode):
    """F.scaled_dot_product_attention as _FusedAttention, at the autocast dtype as CUDA's autocast runs it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value")[len(args):]))[:3]
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        return _FusedAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype))


def _traced_step(c, net, ses, opt, mem, dtype, batch, size) -> int:
    """One training step as _train_step takes it: forward under autocast, SES in float32 outside it, zero_grad, the
    (scaled) backward, clipping, the optimiser's step. Returns the bytes SES holds at the loss: its pooled activations
    and its graph (centred activations, Gram or covariance matrices, eigenvectors)."""
    x, y = _traced_inputs(c, batch, size), torch.zeros(batch, dtype=torch.long)  # held through the step, as the loop
    with _traced_autocast(mem, dtype):
        out = _traced_forward(net, x)
        target = torch.empty(batch, out.shape[1]) if c.get("mix", "none") != "none" else y  # Mixup/CutMix: soft
        task = F.cross_entropy(out, target)
    pooled = sum(-(-a.nbytes // 512) * 512 for a in ses.collector._acts.values())
    before = mem.live
    loss = task.float() + ses()
    ses_bytes = pooled + mem.live - before if pooled else 0
    opt.zero_grad(set_to_none=True)
    (loss * 2.0 ** 16).backward()  # GradScaler's scaling: the same memory
    if c["grad_clip"]:
        torch.nn.utils.clip_grad_norm_(net.parameters(), c["grad_clip"], foreach=True)
    opt.step()
    return ses_bytes


def _trace_memory(c, batch, eval_batch, precision) -> dict:
    """Bytes of c's model at `precision`: weights, gradients, optimizer (state), and over them the training step's
    peak at `batch` (activations, with SES's share apart: ses) and an evaluation forward's at `eval_batch`."""
    text = _is_text(c)
    dtype, size = _amp_dtype(precision), None if text else dataset_info(c["dataset"])["img_size"]
    warned = set(_warned_unreachable)  # SES warns once per shape: the real run must still say it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SES's unreachable-target warning (a shape, not this estimate's business)
        net, mode = _fake_model(c)
        with mode, _LiveBytes() as mem, _FusedSDPA() if text else contextlib.nullcontext():
            layers = bert_hook_targets(net, c["ses_layers"]) if text else c["ses_layers"]
            ses = SES(net, layers, beta=c["ses_beta"], lam=c["ses_lambda"] if c["ses"] else 0.0,
                      **({} if text else {"targets": c["ses_targets"]}))
            opt, out = _traced_setup(c, net, mem)
            net.train()
            static = mem.peak = mem.live
            out["ses"] = _traced_step(c, net, ses, opt, mem, dtype, batch, size)
            out["activations"] = mem.peak - static - out["ses"]
            net.eval()
            mem.peak = base = mem.live
            with torch.no_grad(), _traced_autocast(mem, dtype):
                _traced_forward(net, _traced_inputs(c, eval_batch, size)).float().softmax(1)  # as _predictor
            out["evaluation"] = mem.peak - base
            ses.remove()
    _warned_unreachable.intersection_update(warned)
    return out


_MEMORY_TRACES: dict = {}  # the traces made so far (a second or three each), by what they depend on


def _memory_trace(c, batch, eval_batch, precision) -> dict:
    ses = c["ses"] and c["ses_lambda"] > 0
    if _is_text(c):
        key = ("text", c["model"], c["max_len"], c["token_type_ids"], c["grad_clip"], ses,
               c["ses_layers"] if ses else None, batch, eval_batch, precision)
    else:
        hooks = (str(c["ses_layers"]), str(c["ses_targets"])) if ses or "attn_weights" in c["ses_targets"] else None
        key = (c["model"], c["dataset"], c["width"], c["spectral_norm"], c["drop_path"], c["optimizer"],
               c["grad_clip"], c["mix"] != "none", ses, hooks, batch, eval_batch, precision)  # idle hooks store nothing
    if key not in _MEMORY_TRACES:
        _MEMORY_TRACES[key] = _trace_memory(c, batch, eval_batch, precision)
    return _MEMORY_TRACES[key]


def _data_bytes(c) -> int:
    """What the on-device loaders keep on the GPU through the run (each rank all of it): the train (and val) and test
    sets as uint8 with int64 labels, and the fixed erank inputs (float32: erank_batches training batches, the first
    erank_eval_samples test images). CIFAR's train set is 154 MB, Tiny-ImageNet's 1.23 GB."""
    n_train, n_test = DATASETS[c["dataset"]]["sizes"]
    px = 3 * DATASETS[c["dataset"]]["img_size"] ** 2
    n_val = round(c["val_split"] * n_train)
    n_train = min(c["train_subset"] or n_train, n_train - n_val)
    n_test = min(c["test_subset"] or n_test, n_test)
    erank = min(c["erank_batches"], n_train // c["batch_size"]) * c["batch_size"] + min(c["erank_eval_samples"], n_test)
    return (n_train + n_val + n_test) * (px + 8) + erank * px * 4


def _text_data_bytes(c) -> int:
    """What a text run keeps on the GPU: its train and dev sets tokenised to max_len (input_ids, attention_mask,
    token_type_ids: int64, as the tokenizer returns them) with int64 labels; SST-2's are 0.21 GB at 128 tokens."""
    n_train, n_dev = GLUE_TASKS[c["task"]]["sizes"] if c["text_data"] == "glue" else SYNTHETIC_SIZES
    n_train, n_dev = min(c["train_subset"] or n_train, n_train), min(c["test_subset"] or n_dev, n_dev)
    return (n_train + n_dev) * (3 * c["max_len"] * 8 + 8)


def _corruption_bytes(c, eval_batch) -> int:
    """The robustness pass's own memory: zoom blur's cached [HW, HW] float32 operator per severity (67 MB at 64 px)
    and about 4 float32 copies of a batch inside corrupt()."""
    if not c["robustness"]:
        return 0
    hw = DATASETS[c["dataset"]]["img_size"] ** 2
    zoom = len(c["robustness_severities"]) * hw * hw * 4 if "zoom_blur" in _resolve_corruptions(c["robustness"]) else 0
    return zoom + 4 * eval_batch * 3 * hw * 4


def memory_gpu_kind(device) -> str:
    """The GPU_MEMORY name of a CUDA device's kind, a T4's when GPU_MEMORY lacks it (the estimate made for the GPU
    the paper preset targets)."""
    kind = gpu_kind(_device_name(device))
    return kind if kind in GPU_MEMORY else "t4"


def _gpu_memory(gpu):
    """(memory in GB as torch reports it, compute capability) of a GPU kind; 'cpu': the host's memory, no capability."""
    if gpu == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, None
    if gpu not in GPU_MEMORY:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(set(GPU_MEMORY) | set(GPU_SPEED)))}")
    return GPU_MEMORY[gpu]


def _gpu_terms(t, data, corr, autotune, k) -> tuple[str, dict]:
    """(phase, its terms in bytes) of the larger phase on each of k GPUs (DDP): every rank holds the weights, the
    gradients (under DDP twice: its buckets), the optimiser state and the data; the activations split k ways, SES
    sees the global batch (gathered); rank 0 alone runs the final evaluation, at the whole evaluation batch."""
    fixed = {"weights": t["weights"], "gradients": t["gradients"] * (2 if k > 1 else 1), "optimizer state":
             t["optimizer"], "data on the GPU": data}
    train = {"activations": t["activations"] / k, "SES": t["ses"], "cuDNN autotuning (benchmark)": autotune / k}
    final = {"evaluation": t["evaluation"], "corruption pass": corr}
    if sum(train.values()) >= sum(final.values()):
        return "the training step", {**fixed, **train}
    return "the final evaluation", {**fixed, **final}


def _memory_check(c, gpu):
    missing = [k for k in (_TEXT_MEMORY_KEYS if _is_text(c) else _MEMORY_KEYS) if k not in c]
    if missing:
        raise ValueError("estimate_memory needs a resolved config (validate_config(cfg)); missing: "
                         + ", ".join(missing))
    return _gpu_memory(str(gpu).lower())


def estimate_memory(c, gpu="t4") -> dict:
    """The peak GPU memory of the run c (a resolved config: validate_config, or resolve_text_config for an Exp 22 text
    run: one GPU, no DDP, its attention as a GPU's fused kernel keeps it) on a `gpu` kind (GPU_MEMORY's names, and
    'cpu'), in a few seconds on the CPU (the traces are cached). A dict whose keys stay as they are:
      gpu, precision: the kind, and what c's amp runs at on it (bf16 needs compute capability >= 8: fp16 on a T4);
      peak_gb: decimal GB of torch.cuda.max_memory_allocated() over the run on one GPU (the author's vram_peak_gb);
      need_gb: what must fit: peak_gb less cuDNN's autotuning trials (CNNs with cudnn_deterministic False), which
        take only free memory;
      total_gb, usable_gb: the GPU's memory, and what tensors can use of it: less MEM_CONTEXT_GB (CUDA context) and
        MEM_FRAGMENTATION (allocator) - a T4: 15.8 GB, 14.5 usable;
      fits: need_gb <= usable_gb; gpus_needed: the fewest GPUs of this kind (DDP, the batch split; at most
        MAX_DDP_GPUS, dividing batch_size) it fits on, None if none;
      per_gpu_gb: {k: each GPU's peak_gb under DDP over k GPUs} for k = 1..MAX_DDP_GPUS dividing batch_size;
      data_gb: our on-device data (train/test sets, erank inputs; a text run's tokenised sets), which the author's
        DataLoaders kept off the GPU;
      terms: {what: GB} adding up to peak_gb, of the phase that sets it: weights, gradients, optimizer state, data on
        the GPU, and activations, SES, cuDNN autotuning (benchmark) (the training step) or evaluation, corruption pass
        (the final evaluation); why: that phase and its largest terms, in words.
    What it leaves out: cuDNN's workspace for the algorithm it picks without autotuning (small next to the
    activations), and allocator rounding beyond 512-byte blocks. Within 25 % of each of the 38 image peaks the author
    published; his BERT peak (Exp 22) is 3x the estimate, unexplained (bench/RESULTS.md, tests/test_memory.py)."""
    total, capability = _memory_check(c, gpu)
    on_gpu = capability is not None
    precision = resolve_precision(c["amp"], "cuda" if on_gpu else "cpu", capability, c.get("cpu_amp", False))[0]
    text = _is_text(c)  # Exp 22: its dev set at eval_batch_size or the batch size (_text_evaluate); one GPU, no DDP
    eval_batch = c["eval_batch_size"] or (1 if text else 2) * c["batch_size"]  # as _eval_batch_size (train section)
    t = _memory_trace(c, c["batch_size"], eval_batch, precision)
    data = _text_data_bytes(c) if text else _data_bytes(c)
    corr = 0 if text else _corruption_bytes(c, eval_batch)
    tunes = on_gpu and not c.get("cudnn_deterministic", True) and c["model"] in CNN_MODELS  # a ViT's one conv: little
    autotune = CUDNN_AUTOTUNE * t["activations"] if tunes else 0.0
    usable = (total - MEM_CONTEXT_GB) * (1 - MEM_FRAGMENTATION) if on_gpu else total
    per_gpu, need = {}, {}
    for k in (k for k in range(1, 2 if text else MAX_DDP_GPUS + 1) if c["batch_size"] % k == 0):
        terms = _gpu_terms(t, data, corr, autotune, k)[1]
        per_gpu[k] = sum(terms.values()) / 1e9
        need[k] = per_gpu[k] - terms.get("cuDNN autotuning (benchmark)", 0) / 1e9
    phase, terms = _gpu_terms(t, data, corr, autotune, 1)
    fits_on = next((k for k in need if need[k] <= usable), None)
    top = sorted(((v, name) for name, v in terms.items() if v > 0), reverse=True)[:4]
    why = (f"{phase} at batch {c['batch_size']} in {precision} sets the peak: "
           + ", ".join(f"{name} {v / 1e9:.2f} GB" for v, name in top))
    return {"gpu": str(gpu).lower(), "precision": precision, "peak_gb": round(per_gpu[1], 3),
            "need_gb": round(need[1], 3), "total_gb": round(total, 2), "usable_gb": round(usable, 2),
            "fits": fits_on == 1, "gpus_needed": fits_on, "per_gpu_gb": {k: round(v, 3) for k, v in per_gpu.items()},
            "data_gb": round(data / 1e9, 3), "terms": {name: round(v / 1e9, 3) for name, v in terms.items()},
            "why": why}


DDP_EFFICIENCY = 0.9  # a DDP run over k GPUs trains ~0.9 k times as fast (an all-reduce per step): assumed, not measured


def placeable(c) -> bool:
    """Whether estimate_memory knows c's model and data: image runs, and Exp 22's text runs of bert-base-uncased or
    TINY_BERT (not the toy study)."""
    if _is_text(c):
        return text_skeleton(c) is not None
    return c.get("model") in _MODEL_COST and c.get("dataset") in DATASETS


def placement(c, gpu="t4", n_gpus=1) -> dict:
    """Where the run c goes on a machine of n_gpus GPUs of kind gpu, by estimate_memory: one GPU; one DDP run over k
    of them (SyncBN and SES over the global batch, so BN and SES see the batch the recipe names: no gradient
    accumulation); or nowhere on this machine. {"gpus": k (0: does not fit), "peak_gb": each GPU's, "text", "memory"}."""
    m = estimate_memory(c, gpu)
    k = m["gpus_needed"]
    if k == 1:
        return {"gpus": 1, "peak_gb": m["peak_gb"], "text": f"1 × {gpu}", "memory": m}
    if k is not None and k <= n_gpus:
        return {"gpus": k, "peak_gb": m["per_gpu_gb"][k], "memory": m,
                "text": f"one DDP run over {k} × {gpu} ({m['per_gpu_gb'][k]:.1f} GB each; one holds "
                        f"{m['usable_gb']:.1f})"}
    over = (f"{k} × {gpu} by DDP" if k else f"more than {MAX_DDP_GPUS} × {gpu}" if len(m["per_gpu_gb"]) > 1 else
            "and it runs on one GPU (no DDP)")
    return {"gpus": 0, "peak_gb": m["peak_gb"], "memory": m,
            "text": f"does not fit this machine: needs {m['need_gb']:.1f} GB on one {gpu} ({m['usable_gb']:.1f} usable), "
                    f"{over}; this machine has {n_gpus}"}


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# train
# ═══════════════════════════════════════════════════════════════════════════════════════════════

ROBUSTNESS_PRESETS = tuple(CORRUPTION_SETS)
# MultiStep milestones when a config gives none: fractions of the epochs that reproduce the reference's
# [20, 35, 45] of 50 (CIFAR) and [25, 40, 52] of 60 (Tiny-ImageNet) exactly; gamma 0.2 as ses_phase3.py and the
# Tiny-ImageNet script (assumed for Exp 1-9, see the README; ses_erank_dynamics.py uses 0.1).
# The notebooks state the author's absolute milestones (see run_config for an epochs override).
_MILESTONE_FRACTIONS = {"tinyimagenet": (25 / 60, 40 / 60, 52 / 60)}
_DEFAULT_FRACTIONS = (0.4, 0.7, 0.9)

_BASE_CONFIG = {
    "model": "resnet18", "dataset": "cifar10", "data_root": None,
    "epochs": 50, "batch_size": 256, "eval_batch_size": None,
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "schedule": "multistep", "milestones": None, "lr_gamma": 0.2, "warmup_epochs": 0, "min_lr": 1e-5,
    # epochs the LR schedule runs behind: 1 = ses_erank_dynamics.py's ViT, which steps its warm-up + cosine at the END
    # of each epoch with that epoch's index (scheduler.step(epoch)), so epoch 0 trains at the base lr, epoch e at e-1's
    "lr_lag": 0,
    "grad_clip": None,
    "seed": 42, "device": "auto",
    "amp": "auto",  # asked for: auto | fp16 | bf16 | off
    "precision": None,  # derived: what this device runs (fp32 | fp16 | bf16); see resolve_precision
    "cpu_amp": False,  # True: a CPU run uses amp's fp16/bf16 as a GPU would (to test those paths; slower than fp32)
    "tf32": False,  # TF32 matmuls/convs on Ampere+ (the Tiny-ImageNet script turns it on)
    # cuDNN: deterministic kernels, no autotuning (the author's scripts); False: autotuned (benchmark), faster
    "cudnn_deterministic": True,
    # input pipeline: normalisation (None: the dataset's statistics) and every augmentation parameter
    "norm_mean": None, "norm_std": None,
    "augment": "standard", "crop_padding": 4, "hflip": True, "color_jitter": None,
    "randaugment_num_ops": None, "randaugment_magnitude": None,  # None: RandAugment(2, 9) when augment="randaugment"
    "mix": "none", "mix_alpha": None,  # None: 1.0 with mixup/cutmix
    "spectral_norm": False, "width": 1.0,  # width < 1: narrowed model (the smoke preset's; see build_model)
    "ses": False, "ses_lambda": 0.01, "ses_beta": 0.7, "ses_beta_schedule": None,
    "ses_layers": "auto", "ses_targets": ["block"], "ses_every_k": 1,
    "ses_scope": "global", "sync_bn": None,  # multi-GPU (torchrun) only; see the "distributed" section
    "drop_path": None,  # ViTs: stochastic-depth rate (None: the recipe's 0.1)
    "vit_impl": None,  # derived from model: "author" (SESViT: vit_tiny, vit_small) | "timm" (vit_*_timm) | None
    # per-epoch effective rank, measured two ways (see _erank_ses_view / _erank_author_view)
    "erank_batches": 4, "erank_eval_samples": 2048,
    "out_dir": None, "resume": False, "save_model": True, "keep_checkpoint": False,  # a finished run keeps result.json; True: checkpoint.pt too
    "train_subset": None, "test_subset": None, "max_steps_per_epoch": None, "val_split": 0.0,
    "robustness": None, "robustness_severities": [1, 2, 3, 4, 5], "robustness_subset": None,
    "preset": None,  # label set by run_config ("paper", "smoke", ...): reports and the stale rule name it
    "log": "auto",
}

_CHOICES = {"optimizer": ("sgd", "adamw"), "schedule": ("multistep", "cosine", "constant"),
            "amp": ("auto", "fp16", "bf16", "off"), "augment": ("standard", "randaugment", "none"),
            "mix": ("none", "mixup", "cutmix"), "log": ("auto", "tqdm", "plain", "none"),
            "ses_scope": ("global", "local")}
# ses_resnet50_tinyimagenet .py: Normalize((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)) (its std is not the
# data set's pixel std in DATASETS), RandomCrop(64, padding=8), flip, ColorJitter(0.1, 0.1, 0.1), BF16 + TF32,
# cudnn.benchmark = True (the one script that autotunes instead of setting cudnn.deterministic).
_TINY_RECIPE = dict(epochs=60, norm_mean=[0.4802, 0.4481, 0.3975], norm_std=[0.2302, 0.2265, 0.2262],
                    crop_padding=8, color_jitter={"brightness": 0.1, "contrast": 0.1, "saturation": 0.1},
                    amp="bf16", tf32=True, cudnn_deterministic=False)


def default_config(model="resnet18", dataset="cifar10") -> dict:
    """The reference recipe for (model, dataset) as a full cfg dict ("Setup tecnico di riferimento").
    CNNs: SGD lr 0.1 mom 0.9 wd 5e-4, MultiStep x0.2 at 40/70/90% = [20, 35, 45] of 50 epochs, batch 256.
    Tiny-ImageNet: 60 epochs, [25, 40, 52], and ses_resnet50_tinyimagenet .py's pipeline (_TINY_RECIPE).
    ViTs: AdamW lr 1e-3 wd 0.05, 5 warm-up epochs + cosine to 1e-5, grad clip 1.0, batch 512, FP16 (every ViT script)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    dataset_info(dataset)
    cfg = dict(_BASE_CONFIG, model=model, dataset=dataset, ses_targets=["block"],
               robustness_severities=[1, 2, 3, 4, 5])
    if dataset == "tinyimagenet":
        cfg.update(_TINY_RECIPE)
    if model in VIT_MODELS:
        cfg.update(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=5,
                   grad_clip=1.0, batch_size=512, amp="fp16")
    return cfg


def _derived_milestones(dataset, epochs):
    fr = _MILESTONE_FRACTIONS.get(dataset, _DEFAULT_FRACTIONS)
    return sorted({max(1, round(f * epochs)) for f in fr})


def _resolve_pipeline(c, info):
    """Check and fill in the input pipeline keys, so that the resolved config says exactly how inputs were made."""
    for k, default in (("norm_mean", info["mean"]), ("norm_std", info["std"])):
        v = default if c[k] is None else c[k]
        _check(isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_num(x) for x in v)
               and (k == "norm_mean" or all(x > 0 for x in v)), k, c[k], "None or 3 numbers (std > 0)")
        c[k] = [float(x) for x in v]
    _check(_is_int(c["crop_padding"]) and c["crop_padding"] >= 0, "crop_padding", c["crop_padding"], "an int >= 0")
    _check(isinstance(c["hflip"], bool), "hflip", c["hflip"], "True or False")
    cj = c["color_jitter"]
    _check(cj is None or (isinstance(cj, dict) and set(cj) <= set(_JITTER_KEYS)
                          and all(_is_num(v) and 0 <= v < 1 for v in cj.values())), "color_jitter", cj,
           f"None or a dict of {', '.join(_JITTER_KEYS)} strengths in [0, 1) (torchvision ColorJitter)")
    c["color_jitter"] = None if not cj else {k: float(cj.get(k, 0.0)) for k in _JITTER_KEYS}
    if c["augment"] == "randaugment":
        n, m = c["randaugment_num_ops"], c["randaugment_magnitude"]
        c["randaugment_num_ops"], c["randaugment_magnitude"] = 2 if n is None else n, 9 if m is None else m
        _check(_is_int(c["randaugment_num_ops"]) and c["randaugment_num_ops"] >= 1, "randaugment_num_ops", n, "an int >= 1")
        _check(_is_int(c["randaugment_magnitude"]) and 0 <= c["randaugment_magnitude"] <= 30, "randaugment_magnitude", m,
               "an int in 0..30")
    else:  # not used: say so rather than carry numbers that did nothing
        c["randaugment_num_ops"] = c["randaugment_magnitude"] = None
    if c["mix"] == "none":
        c["mix_alpha"] = None
    else:
        c["mix_alpha"] = 1.0 if c["mix_alpha"] is None else c["mix_alpha"]
        _check(_is_num(c["mix_alpha"]) and c["mix_alpha"] > 0, "mix_alpha", c["mix_alpha"], "a number > 0")


def _with_recipe_defaults(cfg) -> dict:
    """cfg over the reference recipe of its (model, dataset); a non-dict, unknown keys, models or data sets fail first."""
    _check_config_keys(cfg, _BASE_CONFIG)
    model, dataset = cfg.get("model", "resnet18"), cfg.get("dataset", "cifar10")
    recipe = default_config(model, dataset)  # rejects an unknown model or dataset
    if model == "mlp_toy":
        raise ValueError("model 'mlp_toy' is the toy 2-D study's network: it does not train on image datasets")
    return dict(recipe, **cfg)


def _resolve_milestones(c):
    c["milestones"] = list(c["milestones"]) if c["milestones"] is not None else \
        _derived_milestones(c["dataset"], c["epochs"])


def _resolve_inputs(c):
    _resolve_pipeline(c, dataset_info(c["dataset"]))


def _resolve_drop_path(c):
    if c["model"] in VIT_MODELS and c["drop_path"] is None:
        c["drop_path"] = 0.1  # the reference ViT/4's stochastic depth


def _resolve_vit_impl(c):
    c["vit_impl"] = vit_impl(c["model"])  # which ViT the name builds: the stale rule tells results of each apart


def _check_cuda_visible(spec, device):
    """A CUDA device this machine shows: a config made for a GPU fails here, not at the first tensor moved."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"config 'device' is {spec!r} but this machine has no usable CUDA GPU "
                         "(torch.cuda.is_available() is False): use device='auto' (GPU when there is one) or 'cpu'")
    if (device.index or 0) >= n:
        raise ValueError(f"config 'device' is {spec!r} but only {n} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{n - 1}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def _resolve_device(c):
    """A device this machine has, and the precision (fp32 | fp16 | bf16) c's amp request runs at on it."""
    try:
        torch.device("cpu" if c["device"] == "auto" else c["device"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"config 'device' is not a torch device: {c['device']!r} ({e})") from None
    if torchrun_env() is not None and c["device"] not in ("auto", "cuda", "cpu"):  # before the GPU check: a
        _dist_device(c["device"], 0)  # 'cuda:1' under torchrun is wrong on every machine, so say that first
    device = pick_device(c["device"])
    if device.type == "cuda":
        _check_cuda_visible(c["device"], device)
    c["precision"] = resolve_precision(c["amp"], device.type, _device_capability(device), c["cpu_amp"])[0]


def _resolve_paths(c):
    for k in ("data_root", "out_dir"):
        c[k] = None if c[k] is None else str(c[k])


def _resolve_beta_schedule(c):
    """A schedule BetaSchedule can parse: its own message, under the config key's name."""
    if c["ses_beta_schedule"] is not None:
        try:
            BetaSchedule.parse(c["ses_beta_schedule"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"config 'ses_beta_schedule' {c['ses_beta_schedule']!r}: {e}") from None


def _resolve_lists(c):
    """Tuples as lists, and lists copied: the resolved config shares no list with the caller's cfg."""
    for k in ("ses_layers", "ses_targets", "robustness", "robustness_severities"):
        if isinstance(c[k], (list, tuple)):
            c[k] = list(c[k])


def _each(keys, test, want):
    return tuple((k, test, want) for k in keys)


# validate_config's steps, in order: a rule (key, test(value, cfg), what the value must be) fails with
# "config 'key' must be <want>; got <value>"; a resolver (a function of the cfg) checks what a row cannot say and
# fills in derived values, so the rules after it see them. The order decides which error a cfg with several gets.
_CONFIG_RULES = (
    *((k, lambda v, c, opts=opts: v in opts, "one of " + ", ".join(map(repr, opts))) for k, opts in _CHOICES.items()),
    *_each(("epochs", "batch_size", "ses_every_k", "erank_batches", "erank_eval_samples"),
           lambda v, c: _is_int(v) and v >= 1, "an int >= 1"),
    ("batch_size", lambda v, c: v >= 2, "an int >= 2"),
    *_each(("eval_batch_size", "train_subset", "test_subset", "max_steps_per_epoch", "robustness_subset"),
           lambda v, c: v is None or (_is_int(v) and v >= 1), "None or an int >= 1"),
    ("seed", lambda v, c: _is_int(v), "an int"),
    *_each(("warmup_epochs", "lr_lag"), lambda v, c: _is_int(v) and v >= 0, "an int >= 0"),
    ("lr", lambda v, c: _is_num(v) and v > 0, "a number > 0"),
    ("min_lr", lambda v, c: _is_num(v) and 0 <= v <= c["lr"], "a number in [0, lr]"),
    ("weight_decay", lambda v, c: _is_num(v) and v >= 0, "a number >= 0"),
    ("momentum", lambda v, c: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("lr_gamma", lambda v, c: _is_num(v) and v > 0, "a number > 0"),
    ("grad_clip", lambda v, c: v is None or (_is_num(v) and v > 0), "None or a number > 0"),
    ("ses_lambda", lambda v, c: _is_num(v) and v >= 0, "a number >= 0"),
    ("ses_beta", lambda v, c: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    ("val_split", lambda v, c: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("milestones", lambda v, c: v is None or (isinstance(v, (list, tuple)) and all(_is_int(m) and m >= 1 for m in v)
                                              and list(v) == sorted(set(v))),
     "None (40/70/90% of epochs) or an increasing list of epochs >= 1"),
    _resolve_milestones,
    _resolve_inputs,
    *_each(("spectral_norm", "ses", "resume", "keep_checkpoint", "tf32", "save_model", "cpu_amp", "cudnn_deterministic"),
           lambda v, c: isinstance(v, bool), "True or False"),
    ("sync_bn", lambda v, c: v is None or isinstance(v, bool), "None (auto: on under multi-GPU DDP), True or False"),
    ("drop_path", lambda v, c: v is None or (c["model"] in VIT_MODELS and _is_num(v) and 0 <= v < 1),
     "None, or for a ViT a number in [0, 1)"),
    _resolve_drop_path,
    ("vit_impl", lambda v, c: v is None or v == vit_impl(c["model"]),
     lambda c: ("None" if vit_impl(c["model"]) is None else f"None or {vit_impl(c['model'])!r}")
     + f" (it follows from model {c['model']!r})"),
    _resolve_vit_impl,
    ("preset", lambda v, c: v is None or isinstance(v, str), "None or a preset name"),
    ("width", lambda v, c: _is_num(v) and 0 < v <= 1, "a number in (0, 1] (1: the published model)"),
    ("device", lambda v, c: isinstance(v, str), "a string ('auto', 'cpu', 'cuda', 'cuda:1', ...)"),
    _resolve_device,
    *_each(("data_root", "out_dir"), lambda v, c: v is None or isinstance(v, (str, os.PathLike)), "None or a path"),
    _resolve_paths,
    ("resume", lambda v, c: not v or c["out_dir"] is not None, "False when out_dir is None"),
    ("ses_beta_schedule", lambda v, c: v is None or isinstance(v, (str, dict, float)),
     "None, a spec string ('linear:0.3:0.9') or a dict"),
    _resolve_beta_schedule,
    ("ses_layers", lambda v, c: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)),
     "a preset name or a list of module names"),
    ("ses_targets", lambda v, c: isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v),
     'a non-empty list like ["block"]'),
    ("robustness", lambda v, c: v is None or v in ROBUSTNESS_PRESETS or (isinstance(v, (list, tuple)) and v
                                                                         and all(isinstance(s, str) for s in v)),
     f"None, {', '.join(map(repr, ROBUSTNESS_PRESETS))} or a list of corruption names"),
    ("robustness_severities", lambda v, c: isinstance(v, (list, tuple)) and v and all(_is_int(s) and 1 <= s <= 5 for s in v),
     "a non-empty list of ints in 1..5"),
    _resolve_lists,
    ("batch_size", lambda v, c: c["mix"] == "none" or v % 2 == 0, "even with mixup/cutmix (timm Mixup)"),
    ("train_subset", lambda v, c: v is None or v >= c["batch_size"],
     lambda c: f">= batch_size ({c['batch_size']}): training drops the last partial batch"),
)


def validate_config(cfg) -> dict:
    """The full cfg (defaults of default_config(model, dataset) filled in), or ValueError naming the bad key.
    Runs before any data is touched: the steps of _CONFIG_RULES, in order."""
    c = _with_recipe_defaults(cfg)
    for rule in _CONFIG_RULES:
        if callable(rule):  # a resolver
            rule(c)
        else:
            key, test, want = rule
            _check(test(c[key], c), key, c[key], want(c) if callable(want) else want)
    return c


# ── pieces of the loop ───────────────────────────────────────────────────────────────────────────

class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the last good checkpoint is left untouched."""


def _eval_batch_size(c):
    return c["eval_batch_size"] or 2 * c["batch_size"]


def _lr_factor(c):
    """Per-epoch LR multiplier (LambdaLR), as the reference schedules step once per epoch."""
    E, w, ms, g = c["epochs"], c["warmup_epochs"], c["milestones"], c["lr_gamma"]
    floor = c["min_lr"] / c["lr"]
    lag = c.get("lr_lag", 0)

    def factor(e):
        if e < lag:  # the lagging schedule has not stepped yet: the optimiser's base lr
            return 1.0
        e -= lag
        if e < w:
            return (e + 1) / w  # linear warm-up: base * (e+1)/w, as ses_vit_experiment.py
        if c["schedule"] == "cosine":
            t = (e - w) / max(1, E - w)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        if c["schedule"] == "multistep":
            return g ** sum(e >= m for m in ms)
        return 1.0
    return factor


def _set_drop_path(model, rate):
    """Stochastic depth of a ViT at max rate `rate`, spaced linearly over the blocks: the author's SESViT its own way
    (torch.linspace, its drop path), timm's with timm's DropPath."""
    if isinstance(model, SESViT):
        model.set_drop_path(rate)
        return
    from timm.layers import DropPath
    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        p = rate * i / max(1, n - 1)
        blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


def _make_optimizer(model, c):
    if c["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])


def _peak_mem_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-lifetime peak RSS


def _env_info(device, c):
    import timm
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "device_name": _device_name(device),
            "cuda": torch.version.cuda, "seed": c["seed"], "hostname": socket.gethostname(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": torch.get_num_threads(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _rng_state(loader):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # numpy's MT state as a tensor + primitives, so torch.load(weights_only=True) accepts it
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
            "python": random.getstate(), "loader": loader.state_dict()}


def _set_rng_state(s, loader):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))
    loader.load_state_dict(s["loader"])


def _stale_on_disk(c, out_dir, dd):
    """Before resuming: a finished result or a checkpoint in out_dir made with other settings is set aside
    (set_aside: moved, never deleted) and the run starts over. Returns (finished result or None, checkpoint or None)."""
    result_path, ckpt_path = out_dir / "result.json", out_dir / "checkpoint.pt"
    done = ck = None
    corrupt = []  # truncated, empty or garbage files: moved aside as *.corrupt, and the run starts over
    if c["resume"] and result_path.exists():
        done = _read_result(result_path)
        if not isinstance(done, dict) or not isinstance(done.get("config"), dict):
            done = None
            corrupt.append(result_path)
    if c["resume"] and done is None and ckpt_path.exists():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or not {"config", "model", "epoch"} <= set(ck):
                raise ValueError("not a seslib checkpoint")
        except Exception:  # noqa: BLE001 - any unreadable file: torch raises many types for garbage
            ck = None
            corrupt.append(ckpt_path)
    if corrupt and dd.is_main:
        for f in corrupt:
            print(f"[corrupt] {f} is unreadable (truncated, empty or not a {f.suffix[1:]} file); moved to "
                  f"{move_aside(f)}; starting the run over", flush=True)
    diff = config_diff(c, done["config"]) if done is not None else \
        config_diff(c, ck["config"], _RESUME_FREE) if ck is not None else []
    diff = _same_on_all_ranks(diff, dd, "whether out_dir holds a run made with other settings")
    if not diff:
        if corrupt and dd.enabled:
            dist.barrier()
        return done, ck
    if dd.is_main:
        what = "result" if done is not None else "checkpoint"
        where = set_aside(out_dir, f"stale {what}: {describe_diff(diff, limit=100)}")
        print(f"[stale] {out_dir}: its {what} was made with other settings ({describe_diff(diff)}); "
              f"moved to {where}; starting over", flush=True)
    if dd.enabled:
        dist.barrier()
    return None, None


def _log_mode(mode):
    """"auto": a tqdm bar where a person watches (a terminal, a notebook), one line per epoch where a log file is read
    later (a kernel the batch runner started: tqdm there leaves one '0%|' frame per epoch and never the numbers)."""
    mode = os.environ.get(LOG_ENV, mode) if mode == "auto" else mode
    if mode != "auto":
        return mode
    if os.environ.get(SLOT_ENV) is not None:
        return "plain"
    return "tqdm" if (sys.stderr.isatty() or "ipykernel" in sys.modules) else "plain"


def _erank_ses_view(model, collector, batches, beta, device):
    """Per-layer effective rank as SES sees it: train mode, on a few fixed batches of (unaugmented) training images
    of the training batch size (erank grows with the number of samples, so only this batch size compares with
    the target SES pulls towards), averaged over the batches; grad off. BatchNorm running stats and spectral-norm
    vectors are restored afterwards and the RNG is forked, so the measurement changes nothing in the run."""
    devices = [device] if device.type == "cuda" else []
    per_batch = []
    with measuring(model, mode="train"), torch.random.fork_rng(devices=devices):
        for x in batches:
            collector.clear()
            model(x)
            per_batch.append(layer_erank_stats(collector, beta))
        collector.clear()
    out = {}
    for name, st in per_batch[0].items():
        erank = float(np.mean([p[name]["erank"] for p in per_batch]))
        out[name] = {"erank": erank, "d": st["d"], "target": st["target"], "ratio": erank / st["target"],
                     "samples": len(batches[0])}
    return out


def _erank_author_view(model, collector, x, beta, batch_size, amp_dtype):
    """Per-layer effective rank as the SES author measured it (ses_erank_dynamics.py measure_erank, the source of
    the published ResNet-18 erank ratios): eval mode, the first 2048 TEST images, forward under the run's
    autocast, outputs mean-pooled, then one spectrum of the [2048, d] matrix (the d x d covariance, float32)."""
    with measuring(model, mode="eval"):
        acts = pooled_activations(model, [(n, collector.kinds[n]) for n in collector.names], x, batch_size, amp_dtype)
    names = list(acts)
    stats = erank_stats([acts[n] for n in names], names, beta)
    for st in stats.values():
        st["samples"] = len(x)
    return stats


def _evaluate(model, loader, amp_dtype, collector, dd=None):
    """(accuracy %, mean loss) over the loader; under DDP each rank scores its shard and the sums are reduced.
    `model` is the unwrapped module: eval needs no gradient sync (and eval-mode BatchNorm no collective).
    The model's mode is restored afterwards (train_one_epoch sets train mode itself)."""
    device = loader.device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # hits, loss sum, samples
    with measuring(model, mode="eval"), collector.paused() if collector else contextlib.nullcontext():
        for x, y in loader:
            if len(y) == 0:  # a rank's share of the last partial batch can be empty
                continue
            with autocast(device, amp_dtype):
                out = model(x)
            sums[0] += (out.argmax(1) == y).sum()
            sums[1] += F.cross_entropy(out.float(), y, reduction="sum").double()
            sums[2] += len(y)
    correct, loss_sum, n = _all_reduce_sum(sums, dd).tolist() if dd else sums.tolist()
    return 100.0 * correct / n, loss_sum / n


def _check_finite(pending, epoch, step0, steps, ckpt_note, dd=None):
    vals = torch.stack(pending)
    if dd is not None:  # a NaN on any rank reaches every rank: all stop at the same step, none hangs
        vals = _all_reduce_sum(vals, dd)
    bad = ~torch.isfinite(vals)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise NonFiniteLossError(f"non-finite training loss ({vals[i].item()}) at epoch {epoch + 1}, step "
                                 f"{step0 + i + 1}/{steps}; stopped. {ckpt_note}")


# ── distributed: one run over many GPUs / nodes (torchrun + DistributedDataParallel) ──────────────
# Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment), train() joins the process
# group itself (NCCL on CUDA, gloo on CPU), one process per GPU on cuda:LOCAL_RANK. What is global, what per rank:
#   batch_size is the GLOBAL batch: rank r trains on the r-th contiguous slice of every global batch of the
#     shared seeded permutation (DeviceLoader(rank, world_size)), augmentation drawn for the whole global batch;
#   gradients: DDP's all-reduce (mean over ranks); SES with ses_scope="global" sees the whole batch (below);
#   BatchNorm: per-rank batch statistics unless sync_bn (SyncBatchNorm: CUDA only, torch has no CPU kernel);
#   metrics: per-rank sums all-reduced; test/val evaluation sharded over the ranks and reduced; the erank pass
#     (one fixed batch) runs whole on every rank (SyncBatchNorm needs every rank in its forward);
#   rank 0 alone logs, writes checkpoint.pt / result.json and evaluates robustness; it returns the result,
#     the other ranks return None (they do not wait for rank 0's robustness pass);
#   the checkpoint holds the unwrapped model and the global loader/RNG state: any world size resumes it.
# With torchrun over several nodes, out_dir must be a folder every node sees (rank 0 writes, all read).

@dataclasses.dataclass
class DistInfo:
    """This process's place in the run: rank 0 of 1 when not distributed."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (plain single-process training)
    created: bool = False  # train() initialised the group, so train() destroys it

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> dict | None:
    """{rank, world_size, local_rank} set by torchrun (or any env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None


def _dist_device(spec, local_rank) -> torch.device:
    """One process per GPU: cuda:LOCAL_RANK ("auto" / "cuda"), or the CPU ("cpu"; "auto" without CUDA)."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise ValueError(f"config 'device' must be 'auto', 'cuda' or 'cpu' under torchrun (each rank uses "
                         f"cuda:LOCAL_RANK); got {spec!r}")
    if not local_rank < torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                         "give torchrun --nproc_per_node <= the number of GPUs")
    return torch.device("cuda", local_rank)


def _has_batchnorm(model) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def dist_setup(c) -> tuple[DistInfo, torch.device]:
    """(DistInfo, device) for validated cfg c; joins the process group under torchrun. The cfg is checked
    against the world size (global batch divisible, ...) before the group is created."""
    env = torchrun_env()
    if dist.is_available() and dist.is_initialized():  # the caller built the group: use it, leave it alone
        info = DistInfo(dist.get_rank(), dist.get_world_size(), env["local_rank"] if env else 0, dist.get_backend())
    elif env is not None:
        info = DistInfo(**env)
    else:
        return DistInfo(), pick_device(c["device"])
    device = _dist_device(c["device"], info.local_rank)
    R, B = info.world_size, c["batch_size"]
    _check(B % R == 0, "batch_size", B, f"divisible by the number of ranks ({R}): it is the global batch")
    _check(B // R >= 2, "batch_size", B, f">= 2 x the number of ranks ({R}): each rank needs 2 samples")
    ebs = _eval_batch_size(c)
    _check(ebs % R == 0, "eval_batch_size", ebs, f"divisible by the number of ranks ({R})")
    if c["mix"] != "none":
        _check(B // R % 2 == 0, "batch_size", B, f"an even number per rank with mixup/cutmix ({R} ranks)")
    _check(not (c["sync_bn"] and device.type == "cpu"), "sync_bn", c["sync_bn"],
           "False or None on CPU (torch's SyncBatchNorm runs on GPUs only)")
    if info.backend is None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        info.backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(info.backend)  # env:// rendezvous: torchrun's MASTER_ADDR / MASTER_PORT
        info.created = True
    return info, device


def dist_teardown(info: DistInfo):
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def _use_sync_bn(c, model, device, info) -> bool:
    """SyncBatchNorm when asked, or by default under DDP on CUDA for models with BatchNorm: without it each
    rank normalises by its own B/R samples, so R ranks do not compute what one process on the batch would."""
    if not info.enabled or not _has_batchnorm(model):
        return False
    if c["sync_bn"] is None and device.type == "cpu" and info.world_size > 1 and info.is_main:
        warnings.warn(f"{c['model']} has BatchNorm and SyncBatchNorm needs GPUs: on CPU each of the "
                      f"{info.world_size} ranks normalises with its own batch statistics",
                      stacklevel=4)  # train()'s line: _use_sync_bn <- _build_model_and_ses <- _train <- train
    return c["sync_bn"] if c["sync_bn"] is not None else device.type == "cuda"


def gather_activations(acts_list) -> list:
    """Each rank's pooled [B/R, d_l] activations -> the global [B, d_l] ones (rank order = the single-process
    batch order, as DeviceLoader slices it), differentiably: torch.distributed.nn.functional.all_gather.

    Gradient: every rank computes the same SES value S on the gathered batch; all_gather's backward SUMS
    the R ranks' gradients for rank r's slice (reduce-scatter), so rank r's activations receive R * dS/dA_r;
    DDP then AVERAGES the parameter gradients over the R ranks: (1/R) sum_r R dS/dA_r dA_r/dtheta = dS/dtheta,
    exactly the single-process gradient. So no rescaling: the sum and the mean cancel. (Task loss: each
    rank's mean over B/R, averaged over R = the mean over B.) One collective for all layers per step."""
    from torch.distributed.nn.functional import all_gather
    dims = [a.shape[1] for a in acts_list]
    # half -> float32 before the collective (ses_loss would upcast anyway; the gradient exchange stays fp32)
    flat = torch.cat([a.float() if a.dtype in (torch.float16, torch.bfloat16) else a for a in acts_list], dim=1)
    with warnings.catch_warnings():  # 2.x marks it deprecated for a private successor; it is the public, documented one
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        parts = all_gather(flat)
    return list(torch.cat(parts, dim=0).split(dims, dim=1))


def _rank_seed(seed, epoch, rank) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _same_on_all_ranks(value, info: DistInfo, what: str):
    """Fail clearly (not hang) when ranks disagree on a decision, e.g. out_dir not shared between nodes."""
    if not info.enabled:
        return value
    seen = [None] * info.world_size
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        raise RuntimeError(f"ranks disagree on {what}: {seen} (with several nodes, out_dir must be a shared folder)")
    return value


def train_torchrun(cfg: dict, nproc="auto", log=print) -> dict:
    """train(cfg) as ONE run over `nproc` local processes: `torchrun --standalone --nproc_per_node nproc
    seslib.py train --config {out_dir}/config.json`; returns its result.json. nproc: "auto" (every visible
    GPU) or an int (CPU ranks when there is no GPU). Needs cfg["out_dir"]. Output streams through `log`."""
    c = validate_config(cfg)
    if c["out_dir"] is None:
        raise ValueError("train_torchrun needs cfg['out_dir'] (the run's config and result travel through it)")
    if nproc == "auto":
        nproc = torch.cuda.device_count()
        if nproc == 0:
            raise ValueError("torchrun='auto' found no GPU; give a number of (CPU) processes instead")
    if isinstance(nproc, str) and nproc.isdigit():
        nproc = int(nproc)
    if not _is_int(nproc) or nproc < 1:
        raise ValueError(f"torchrun must be 'auto' or an int >= 1; got {nproc!r}")
    _check(c["batch_size"] % nproc == 0, "batch_size", c["batch_size"], f"divisible by torchrun={nproc}")
    out = Path(c["out_dir"])
    atomic_write_json(out / "config.json", c)  # the validated cfg: also the run's record of what it ran
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "train", "--config", str(out / "config.json")]
    log(f"[torchrun] {' '.join(cmd[2:])}")
    proc_start = time.time()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:  # streamed, so a notebook cell shows the run live
            log(line.rstrip())
    prog = _read_result(out / "progress.json") or {}
    if not _result_ok(out / "result.json") and prog.get("paused") and prog.get("time", 0) >= proc_start:
        raise RunPaused(f"paused after epoch {prog['epochs_done']}/{prog['epochs']} (time budget); run again to resume")
    if proc.returncode != 0 or not _result_ok(out / "result.json"):
        raise RuntimeError(f"torchrun run failed (exit {proc.returncode}); see the output above. Command: {' '.join(cmd)}")
    return json.loads((out / "result.json").read_text())


# ── train ────────────────────────────────────────────────────────────────────────────────────────

def train(cfg: dict) -> dict | None:
    """Train one run (model, dataset, recipe, SES options in cfg; see default_config / validate_config) and
    return {config, env, history, final}. With out_dir: checkpoint.pt every epoch (atomic), result.json at
    completion (atomic); resume=True continues from the checkpoint (or returns the finished result).

    Under torchrun it runs as one DDP run over all ranks (see the "distributed" notes above): rank 0
    returns the result and writes the files, the other ranks return None. ses_scope="global" (default):
    SES on the activations of the whole global batch, gathered from every rank: loss and gradients equal
    one process on the batch. "local": each rank's SES on its own B/R samples, averaged over ranks (no
    gather, but the reachable effective rank is capped at B/R - 1 instead of B - 1). sync_bn: None (auto:
    SyncBatchNorm for BatchNorm models on CUDA), True, False."""
    c = validate_config(cfg)
    dd, device = dist_setup(c)  # checks c against the world size before joining the group
    owner = c["out_dir"] and dd.is_main  # rank 0 alone writes the run folder
    try:
        with run_lock(c["out_dir"]) if owner else contextlib.nullcontext():
            if owner:
                gone = clean_temporaries(c["out_dir"])
                if gone:
                    print(f"removed {len(gone)} temporary file(s) an interrupted write left in {c['out_dir']}: "
                          f"{', '.join(gone)}", flush=True)
            return _train(c, dd, device)
    finally:
        dist_teardown(dd)


def _checkpoint_bytes(model, c) -> int:
    """checkpoint.pt's size: the weights, the optimiser state (SGD momentum 1x, AdamW 2x), the best epoch's copy."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return n * (2 + (2 if c["optimizer"] == "adamw" else 1)) + (1 << 20)


def preflight(c, model=None):
    """Check in well under a second that everything the run `c` will need exists, so it cannot fail after hours of
    training for a missing package or file (as a robustness pass needing the frost photos would): the packages of
    its code path, the frost texture photos when frost will be generated, the data set (CIFAR is downloaded now if
    absent), a writable out_dir with room for the checkpoint. Raises PreflightError listing every problem and its fix."""
    problems = []
    need = {"timm": ("timm's ViTs and Mixup/CutMix", c["model"] in TIMM_VIT_MODELS or c["mix"] != "none"),
            "torchmetrics": ("the robustness pass's calibration error", bool(c["robustness"]))}
    for mod, (why, needed) in need.items():
        if needed and importlib.util.find_spec(mod) is None:
            problems.append(f"the package {mod!r} is missing (needed for {why}): pip install {mod}")
    try:
        d = resolve_data_dir(c["dataset"], c["data_root"], download=True)
    except FileNotFoundError as e:
        problems.append(str(e))
        d = None
    if c["robustness"] and "frost" in _resolve_corruptions(c["robustness"]) and \
            not (d is not None and corrupted_available(d.parent, c["dataset"], "frost")):
        try:
            _frost_dir()
        except RuntimeError as e:
            problems.append(f"robustness includes frost, which is generated here: {e}")
    if c["out_dir"]:
        out = Path(c["out_dir"])
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as e:
            problems.append(f"out_dir {out} is not writable ({e.strerror or e}): choose another out_dir")
        else:
            need_b = _checkpoint_bytes(model, c) if model is not None else 0
            free = shutil.disk_usage(out).free
            if need_b and free < 2 * need_b:  # the new checkpoint is written beside the old one, then renamed
                problems.append(f"out_dir {out} has {free / 2**30:.2f} GiB free; a checkpoint of this run takes "
                                f"{need_b / 2**30:.2f} GiB and needs twice that while it is replaced: free space "
                                "or choose another out_dir")
    if problems:
        raise PreflightError("this run cannot start:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass(eq=False)
class _Run:
    """What one training run holds, filled in by _train's steps in order; _release empties it at the end."""
    c: dict
    dd: DistInfo
    device: torch.device
    out_dir: Path | None = None
    ckpt_path: Path | None = None  # out_dir/checkpoint.pt; None without out_dir
    ck: dict | None = None  # the checkpoint to resume from, until _restore_checkpoint consumes it
    amp_dtype: torch.dtype | None = None  # None: fp32
    t_start: float = 0.0
    mem_estimate: dict | None = None  # {gpu, peak_gb}: estimate_memory at the start (CUDA runs), for result.json
    tf32_before: tuple = ()
    cudnn_before: tuple = ()  # cudnn.deterministic, cudnn.benchmark before the run (_set_cudnn)
    # the model: net is the unwrapped module (evaluation, checkpoints, erank), model what trains (net or its DDP wrapper)
    net: nn.Module | None = None
    model: nn.Module | None = None
    ses: SES | None = None
    sync_bn: bool = False
    gather: object = None  # gather_activations when SES sees the global batch under DDP, else None
    # the data
    loader: DeviceLoader | None = None
    evals: dict | None = None  # {"test": loader, "val": loader (with val_split)}
    erank_batches: list | None = None
    erank_test: torch.Tensor | None = None
    steps: int = 0  # optimiser steps per epoch
    # the optimisation
    mixer: object = None  # timm Mixup with mix="mixup" | "cutmix"; its soft-target loss is the criterion
    criterion: object = None  # None: cross-entropy
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: object = None
    # the progress
    history: list = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    best: dict | None = None  # rank 0: the best test-accuracy epoch's weights (the paper's model selection)
    log: str = "none"
    tag: str = ""  # the run's name in its log lines
    ckpt_note: str = ""  # what a stopped run says about its checkpoint


def _train(c, dd: DistInfo, device):
    """One run as a recipe, in the shape of timm's train.py: a finished run hands back its result; otherwise build the
    model, the data and the optimisation (resumed from the checkpoint if there is one), then train and evaluate epoch
    by epoch, keeping the best epoch and a checkpoint after each and pausing before an epoch the time budget would
    not fit; then the final metrics and result.json. Rank 0 returns the result, the other ranks None."""
    out_dir = Path(c["out_dir"]) if c["out_dir"] else None
    run = _Run(c, dd, device, out_dir=out_dir, ckpt_path=out_dir / "checkpoint.pt" if out_dir else None)
    done = _resume_or_finish(run)
    if done is not None:  # finished already, with these settings: hand back its result
        return done if dd.is_main else None
    _set_precision(run)
    _estimate_peak_memory(run)  # CUDA only: a few seconds of tracing, for result.json
    set_seed(c["seed"])  # the same on every rank: identical init (DDP also broadcasts rank 0's weights)
    run.t_start = time.time()
    _build_model_and_ses(run)  # model + hooks first: a bad layer preset fails here, before any data is read
    run.tf32_before = _set_tf32(c["tf32"])  # process-wide: _release restores it
    run.cudnn_before = _set_cudnn(c["cudnn_deterministic"])  # likewise
    try:
        _build_data(run)
        _build_optimisation(run)
        _restore_checkpoint(run)
        _wrap_model(run)
        _start_log(run)
        end = deadline()
        for epoch in range(run.start_epoch, c["epochs"]):
            _pause_if_out_of_time(run, epoch, end)
            beta, lr = _start_epoch(run, epoch)
            bar, t0 = _epoch_bar(run, epoch), time.time()  # t0 just before the training loop, as the author's
            row, train_seconds = train_one_epoch(run, epoch, bar, t0)
            evaluate_epoch(run, row, beta)
            row.update(beta=beta, lr=lr, steps=run.steps, train_seconds=train_seconds,
                       epoch_seconds=time.time() - t0, peak_mem_mb=_peak_mem_mb(device))
            run.history.append(row)
            _keep_best(run, row)
            run.scheduler.step()
            _log_epoch(run, row, bar)
            _save_checkpoint(run, epoch)
        return _finish_run(run) if dd.is_main else None  # rank 0 alone evaluates robustness and writes the result
    finally:
        _release(run)


# ── the steps of _train, in the order it takes them ─────────────────────────────────────────────

def _resume_or_finish(run) -> dict | None:
    """out_dir's result when it holds this run finished with these settings (hand it back), else None, with run.ck
    the checkpoint to resume from if there is one. Stale or unreadable files are set aside first (_stale_on_disk)."""
    done, run.ck = _stale_on_disk(run.c, run.out_dir, run.dd) if run.out_dir else (None, None)
    _same_on_all_ranks((done is not None, run.ck is not None), run.dd,
                       "whether out_dir holds a finished result / a checkpoint")
    return done


def _set_precision(run):
    """The autocast dtype of the resolved precision, and a note when this device runs another than the one asked for."""
    c, device = run.c, run.device
    run.amp_dtype = _amp_dtype(c["precision"])
    note = resolve_precision(c["amp"], device.type, _device_capability(device), c["cpu_amp"])[1]
    if note and run.dd.is_main and _log_mode(c["log"]) != "none":
        print(f"note: {note}", flush=True)


def _estimate_peak_memory(run):
    """Rank 0 of a CUDA run: estimate_memory for this GPU's kind (a T4's when GPU_MEMORY lacks it) at the run's world
    size, once before the run takes memory, so result.json holds it beside the measured peak and the first GPU run
    checks the estimator. A failed estimate is a note, never a failed run."""
    if run.device.type != "cuda" or not run.dd.is_main:  # the CPU branch: no max_memory_allocated to compare with
        return
    kind = memory_gpu_kind(run.device)
    try:
        est = estimate_memory(run.c, kind)
    except Exception as e:  # noqa: BLE001 - an estimate beside the run, not a reason to stop it
        print(f"note: no memory estimate ({type(e).__name__}: {e})", flush=True)
        return
    run.mem_estimate = {"gpu": kind, "peak_gb": est["per_gpu_gb"].get(run.dd.world_size, est["peak_gb"])}


def _peak_memory(run) -> dict:
    """result.json's measured peak (max_memory_allocated / 1e9 over every epoch and the final evaluation; None on the
    CPU, where RSS is no such thing) beside the estimate made at the start (None without one)."""
    measured = None
    if run.device.type == "cuda":
        measured = max([torch.cuda.max_memory_allocated(run.device)]
                       + [r["peak_mem_mb"] * 2**20 for r in run.history]) / 1e9  # epochs reset the peak
    est = run.mem_estimate or {}
    return {"peak_mem_gb": measured, "peak_mem_estimate_gb": est.get("peak_gb"),
            "peak_mem_estimate_gpu": est.get("gpu")}


def _build_model_and_ses(run):
    """The model on its device (stochastic depth, SyncBatchNorm under DDP) and the SES object on it, the one users
    call in their own loops (lam 0 for a baseline: its hooks then serve the erank measurements); rank 0's preflight."""
    c, dd = run.c, run.dd
    info = dataset_info(c["dataset"])
    net = build_model(c["model"], info["num_classes"], info["img_size"], c["spectral_norm"], c["width"])
    if c["drop_path"] is not None:
        _set_drop_path(net, c["drop_path"])
    run.sync_bn = _use_sync_bn(c, net, run.device, dd)
    if run.sync_bn:  # same parameter/buffer names as BatchNorm: checkpoints stay interchangeable
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    run.net = net.to(run.device)
    run.ses = SES(run.net, c["ses_layers"], beta=c["ses_beta"], lam=c["ses_lambda"] if c["ses"] else 0.0,
                  every_k=c["ses_every_k"], schedule=c["ses_beta_schedule"], targets=c["ses_targets"])
    if dd.is_main:
        preflight(c, run.net)
    run.gather = gather_activations if dd.enabled and c["ses_scope"] == "global" else None


def _set_tf32(on) -> tuple:
    """TF32 matmuls and convolutions on or off, process-wide; returns the previous settings, for _release."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    return before


def _set_cudnn(deterministic) -> tuple:
    """CUDA-only in effect (cuDNN alone reads these flags; set on every device, so the CPU tests see the set and the
    restore): deterministic kernels without autotuning, as the author's scripts set them, or autotuned ones
    (benchmark, as ses_resnet50_tinyimagenet .py). Process-wide; returns the previous flags, for _release."""
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic
    return before


def _load_splits(c):
    """((x, y) train, test, val) as loaded (uint8); val is (None, None) without val_split. Subsets are cut at load
    time (Tiny-ImageNet then decodes only those), after the val split if any."""
    xtr, ytr = load_dataset(c["dataset"], c["data_root"], "train",
                            subset=c["train_subset"] if not c["val_split"] else None)
    xte, yte = load_dataset(c["dataset"], c["data_root"], "test", subset=c["test_subset"])
    xval = yval = None
    if c["val_split"] > 0:  # fixed holdout (seed-independent) so every run selects on the same images
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(20240229))
        nv = int(round(c["val_split"] * len(xtr)))
        vi, ti = perm[:nv].sort().values, perm[nv:].sort().values
        xval, yval, xtr, ytr = xtr[vi], ytr[vi], xtr[ti], ytr[ti]
    if c["train_subset"]:
        xtr, ytr = xtr[:c["train_subset"]], ytr[:c["train_subset"]]
    if len(xtr) < c["batch_size"]:  # name what the user set: batch_size, and train_subset only if set
        raise ValueError(f"batch_size {c['batch_size']} is larger than the {len(xtr)} training images"
                         + (f" (train_subset={c['train_subset']})" if c["train_subset"] else
                            f" of {c['dataset']} in {resolve_data_dir(c['dataset'], c['data_root'], download=False)}")
                         + ": training drops the last partial batch, so no step would run; lower batch_size")
    return (xtr, ytr), (xte, yte), (xval, yval)


def _build_data(run):
    """The on-device loaders (train; test, and val with val_split) and the fixed erank inputs. Every rank holds the
    whole (uint8) set and takes its slice of each global batch."""
    c, dd = run.c, run.dd
    (xtr, ytr), (xte, yte), (xval, yval) = _load_splits(c)
    norm = {"mean": c["norm_mean"], "std": c["norm_std"], "device": run.device, "rank": dd.rank,
            "world_size": dd.world_size}
    ebs = _eval_batch_size(c)
    run.loader = DeviceLoader(xtr, ytr, c["batch_size"], train=True, augment=c["augment"], pad=c["crop_padding"],
                              hflip=c["hflip"], color_jitter=c["color_jitter"],
                              randaugment=(c["randaugment_num_ops"], c["randaugment_magnitude"]), seed=c["seed"],
                              max_steps=c["max_steps_per_epoch"], **norm)
    run.evals = {"test": DeviceLoader(xte, yte, ebs, train=False, **norm)}
    if xval is not None:
        run.evals["val"] = DeviceLoader(xval, yval, ebs, train=False, **norm)
    # the fixed erank inputs (identical for every run, epoch and rank): the first erank_batches training batches,
    # unaugmented, at the training batch size; and the first erank_eval_samples test images
    B = c["batch_size"]
    run.erank_batches = [run.loader.normalize(run.loader.images[i * B:(i + 1) * B])
                         for i in range(min(c["erank_batches"], len(xtr) // B))]
    run.erank_test = run.evals["test"].normalize(run.evals["test"].images[:c["erank_eval_samples"]])
    run.steps = len(run.loader)


def _make_mixer(c):
    """timm's Mixup set to mixup or cutmix, and its soft-target loss. Under DDP the pairs are mixed within each rank's
    slice (numpy RNG: the same lam on every rank)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    a = c["mix_alpha"]
    mixer = Mixup(mixup_alpha=a if c["mix"] == "mixup" else 0.0,
                  cutmix_alpha=a if c["mix"] == "cutmix" else 0.0,
                  label_smoothing=0.0, num_classes=dataset_info(c["dataset"])["num_classes"])
    return mixer, SoftTargetCrossEntropy()


def _build_optimisation(run):
    """Mixup/CutMix when asked, the optimiser, its per-epoch LR schedule and the gradient scaler (on for fp16 only)."""
    c = run.c
    if c["mix"] != "none":
        run.mixer, run.criterion = _make_mixer(c)
    run.optimizer = _make_optimizer(run.net, c)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, _lr_factor(c))
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)


def _restore_checkpoint(run):
    """Continue where run.ck left off: every rank loads the same global state (saved from rank 0 by any number of
    ranks): weights, optimiser, schedule, scaler, the RNG streams and the loader's, the history, the best epoch."""
    ck = run.ck
    if ck is not None:
        run.net.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        run.scheduler.load_state_dict(ck["scheduler"])
        run.scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"], run.loader)
        run.best = ck.get("best")  # the best test-accuracy epoch's weights (the paper's model selection)
        run.history, run.start_epoch = ck["history"], ck["epoch"]
    run.ck = None  # consumed: its tensors need not stay in memory through the training


def _wrap_model(run):
    """What trains: the model, or under DDP its wrapper, made after the restore (DDP broadcasts rank 0's state)."""
    device = run.device
    run.model = (nn.parallel.DistributedDataParallel(run.net, device_ids=[device.index] if device.type == "cuda" else None)
                 if run.dd.enabled else run.net)


def _start_log(run):
    """The log mode (rank 0 alone logs), the run's tag in its log lines, the note a stopped run ends with."""
    c, dd = run.c, run.dd
    run.log = _log_mode(c["log"]) if dd.is_main else "none"
    run.tag = (f"{c['dataset']}/{c['model']}{'+SES' if c['ses'] else ''} seed {c['seed']}"
               + (f" x{dd.world_size} ranks" if dd.world_size > 1 else ""))
    run.ckpt_note = (f"Last good checkpoint kept: {run.ckpt_path} (epoch {run.start_epoch})" if run.ckpt_path else
                     "No checkpoint (out_dir=None).")
    if run.log in ("plain", "tqdm") and run.start_epoch:
        print(f"[{run.tag}] resumed from {run.ckpt_path} at epoch {run.start_epoch}", flush=True)


def _pause_if_out_of_time(run, epoch, end):
    """RunPaused (progress.json saying so) before an epoch the time budget ending at `end` would not fit (_pause_now)."""
    c = run.c
    if end is None or not _pause_now(run.history, c, epoch, end, run.dd):
        return
    if run.ckpt_path and run.dd.is_main:
        _write_progress(run.out_dir, c, run.history, run.device, paused=True)
    raise RunPaused(f"paused before epoch {epoch + 1}/{c['epochs']}: the time budget ends in "
                    f"{max(0.0, end - time.time()) / 60:.0f} min, less than the next epoch"
                    + (" and the final evaluation" if epoch + 1 == c["epochs"] else "")
                    + f" would take; {run.ckpt_note.lower()}; run it again to resume")


def _start_epoch(run, epoch):
    """(SES beta, learning rate) of the epoch; SES's step count set, the memory peak reset, and under DDP each
    rank's own seed for in-model randomness."""
    c, device = run.c, run.device
    beta = run.ses.set_epoch(epoch, c["epochs"])
    run.ses.step = epoch * run.steps  # periodic SES counts optimiser steps over the whole run (exact on resume)
    lr = run.optimizer.param_groups[0]["lr"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # DDP: in-model randomness (drop path, dropout) from its own stream per rank (equal streams would drop
    # the same slots on every rank), seeded by (seed, epoch, rank) so a resume at any world size is exact
    if run.dd.enabled:
        torch.manual_seed(_rank_seed(c["seed"], epoch, run.dd.rank))
    return beta, lr


def _epoch_bar(run, epoch):
    """The epoch's tqdm bar (log "tqdm"; _log_epoch closes it), else None."""
    if run.log != "tqdm":
        return None
    return tqdm(total=run.steps, desc=f"{run.tag} ep {epoch + 1}/{run.c['epochs']}", leave=True)


def train_one_epoch(run, epoch, bar, t0) -> tuple[dict, float]:
    """One pass over the training data: (the epoch's training metrics, summed over the ranks; its training seconds,
    counted from t0). The losses are checked finite once per 16 steps: one host sync, not one per step."""
    run.model.train()  # the measurements restore the mode they found, so training sets its own
    # loss sum, SES sum, hits, samples, SES steps: this rank's share, summed over ranks after the epoch
    sums = torch.zeros(5, device=run.device, dtype=torch.float64)
    pending, step0 = [], 0
    for step, (x, y) in enumerate(run.loader):
        pending.append(_train_step(run, x, y, sums))
        if len(pending) == 16 or step == run.steps - 1:
            _check_finite(pending, epoch, step0, run.steps, run.ckpt_note, run.dd)
            if bar is not None:
                bar.set_postfix(loss=f"{pending[-1].item():.3f}")
            step0, pending = step + 1, []
        if bar is not None:
            bar.update()
    if run.device.type == "cuda":  # CUDA only: the clock must include the work still queued on the GPU
        torch.cuda.synchronize(run.device)
    train_seconds = time.time() - t0  # the training loop alone, as the author's epoch_time (avg_epoch_time)
    return _train_metrics(run, epoch, sums), train_seconds


def _train_step(run, x, y, sums):
    """One optimiser step on the batch (x, y), its loss, SES, hits and samples added to sums; returns the loss."""
    target = y
    if run.mixer is not None:
        x, target = run.mixer(x, y)  # soft targets [B, C]
    with autocast(run.device, run.amp_dtype):
        out = run.model(x)
        task = run.criterion(out, target) if run.criterion else F.cross_entropy(out, target)
    # SES in float32 outside autocast, scaled with the rest below; 0 on the steps it skips (every_k).
    # Under DDP on the gathered global batch: no 1/R or R, see gather_activations
    loss = task.float() + run.ses(gather=run.gather)
    if run.ses.last_loss is not None:
        sums[1] += run.ses.last_loss.double()
        sums[4] += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.c["grad_clip"]:  # DDP's gradients are already averaged: every rank clips the same norm
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.c["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with torch.no_grad():
        pred = out.argmax(1)
        # with mixed targets: the lam-weighted hit rate sum_i t_i[pred_i] (the reference's metric)
        hits = target.gather(1, pred[:, None]).sum() if run.mixer is not None else (pred == y).sum()
        sums[2] += hits.double()
        sums[0] += task.detach().double() * len(y)
        sums[3] += len(y)
    return loss.detach()


def _train_metrics(run, epoch, sums) -> dict:
    """The epoch's row, its training part: from this rank's sums, summed over the ranks."""
    loss_sum, reg_sum, correct, n_seen, n_reg = _all_reduce_sum(sums, run.dd).tolist()
    ses_mean = reg_sum / n_reg if n_reg else None
    row = {"epoch": epoch + 1, "train_loss": loss_sum / n_seen, "train_acc": 100.0 * correct / n_seen,
           "ses_loss": ses_mean}  # mean of sum_l (H_l - beta log d_l)^2 over the SES steps, lambda NOT applied
    if n_reg:  # the SES term as it enters the loss (lambda applied, mean over ALL steps: 0 on skipped ones,
        # as the author's reg meter), and the training loss including it (the paper's Exp 1 scale)
        row["ses_term"] = run.c["ses_lambda"] * reg_sum / (run.steps * run.dd.world_size)  # reg_sum: summed over ranks
        row["train_loss_total"] = row["train_loss"] + row["ses_term"]
    return row


def evaluate_epoch(run, row, beta):
    """The epoch's evaluation, into row: accuracy and loss on each held-out split, the train-test gap, and each
    layer's effective rank seen both ways (as SES sees it, as the author measured it)."""
    for split, ev in run.evals.items():
        row[f"{split}_acc"], row[f"{split}_loss"] = _evaluate(run.net, ev, run.amp_dtype, run.ses.collector, run.dd)
    row["gap"] = row["train_acc"] - row["test_acc"]
    with run.ses.measuring():
        row["erank"] = _erank_ses_view(run.net, run.ses.collector, run.erank_batches, beta, run.device)
    row["erank_author"] = _erank_author_view(run.net, run.ses.collector, run.erank_test, beta,
                                             _eval_batch_size(run.c), run.amp_dtype)


def _keep_best(run, row):
    """Rank 0 keeps a CPU copy of the best test-accuracy epoch's weights (the paper's model selection; never our
    headline). Strictly better: the first best epoch, as the author's `if acc > best_acc`."""
    if run.dd.is_main and (run.best is None or row["test_acc"] > run.best["test_acc"]):
        run.best = {"epoch": row["epoch"], "test_acc": row["test_acc"],
                    "model": {k: v.detach().to("cpu", copy=True) for k, v in run.net.state_dict().items()}}


def _log_epoch(run, row, bar):
    """The epoch's summary: on its tqdm bar, closed here, or one plain line."""
    if bar is not None:
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", test=f"{row['test_acc']:.2f}", gap=f"{row['gap']:.1f}")
        bar.close()
    elif run.log == "plain":
        print(f"[{run.tag}] ep {row['epoch']}/{run.c['epochs']} loss {row['train_loss']:.4f} "
              f"train {row['train_acc']:.2f}% test {row['test_acc']:.2f}% gap {row['gap']:.2f} "
              f"lr {row['lr']:.3g} beta {row['beta']:.2f} {row['epoch_seconds']:.1f}s {row['peak_mem_mb']:.0f}MB "
              f"~{_hours(seconds_left(run.c['epochs'], row['epoch'], [r['epoch_seconds'] for r in run.history]))} left",
              flush=True)


def _save_checkpoint(run, epoch):
    """Rank 0 writes checkpoint.pt after the epoch (atomic: a kill mid-write leaves the previous one), then
    progress.json."""
    if not (run.ckpt_path and run.dd.is_main):
        return
    atomic_torch_save({"format": 1, "epoch": epoch + 1, "config": run.c, "model": run.net.state_dict(),
                       "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                       "scaler": run.scaler.state_dict(), "rng": _rng_state(run.loader), "history": run.history,
                       "best": run.best}, run.ckpt_path)
    run.ckpt_note = f"Last good checkpoint kept: {run.ckpt_path} (epoch {epoch + 1})"
    _write_progress(run.out_dir, run.c, run.history, run.device)


def _finish_run(run) -> dict:
    """Rank 0's end of the run: the final metrics (robustness passes included), model_final.pt and result.json;
    checkpoint.pt goes unless keep_checkpoint. Returns the result."""
    c = run.c
    t_eval = time.time()
    final = _final_metrics(run.history, c, run.net, run.device, run.evals, run.ses.collector, run.log, run.best)
    final["eval_seconds"] = time.time() - t_eval  # the final evaluation (robustness passes): for run estimates
    final["total_seconds"] = time.time() - run.t_start
    final.update(_peak_memory(run))  # measured beside estimated (GPU runs)
    result = {"config": c, "env": _run_env(run), "history": run.history, "final": final}
    if run.out_dir:
        if c["save_model"]:  # the final weights, for load_run (checkpoint.pt goes once the run is done)
            atomic_torch_save(run.net.state_dict(), run.out_dir / "model_final.pt")
        atomic_write_json(run.out_dir / "result.json", result)
        if not c["keep_checkpoint"] and run.ckpt_path.exists():
            run.ckpt_path.unlink()
    return result


def _run_env(run) -> dict:
    """_env_info, with the data folder used and, under DDP, how the run was distributed."""
    c, dd = run.c, run.dd
    env = _env_info(run.device, c)
    env["data_dir"] = str(resolve_data_dir(c["dataset"], c["data_root"], download=False))  # the folder used
    env["distributed"] = ({"world_size": dd.world_size, "backend": dd.backend, "ses_scope": c["ses_scope"],
                           "sync_bn": run.sync_bn, "nodes": int(os.environ.get("GROUP_WORLD_SIZE", 0)) or None}
                          if dd.enabled else None)
    return env


def _release(run):
    """Free the device between runs (reference bug 2), also when the run fails: SES's hooks off, TF32 and cuDNN flags
    back, and every reference the run holds dropped (its fields emptied: a traceback keeps the frames that name `run`
    alive)."""
    run.ses.remove()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = run.tf32_before
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = run.cudnn_before
    clear_corruption_cache()  # its operators are device tensors too (up to ~335 MB)
    _free_fields(run, ("net", "model", "ses", "loader", "evals", "erank_batches", "erank_test", "mixer", "criterion",
                       "optimizer", "scheduler", "scaler", "best", "ck"))


def _free_fields(run, names):
    """Drop the run's references `names` (a traceback keeps the frames that name `run` alive) and hand the device
    memory back."""
    for name in names:
        setattr(run, name, None)
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def _pause_now(history, c, epoch, end, dd) -> bool:
    """Whether the next epoch (and, before the last one, the final evaluation) would end after the deadline, by
    this run's own measured epoch times (the slowest of the last 3; none measured yet: go, the runner only starts
    a run it expects to fit). Rank 0 decides for all ranks."""
    go_on = True
    if history:
        epoch_s = max(r["epoch_seconds"] for r in history[-3:])
        need = 1.1 * epoch_s + (estimate_eval_seconds(c, epoch_s) if epoch + 1 == c["epochs"] else 0.0)
        go_on = time.time() + need <= end
    if dd.enabled:
        box = [go_on]
        dist.broadcast_object_list(box, src=0)
        go_on = box[0]
    return not go_on


def _write_progress(out_dir, c, history, device, paused=False):
    """progress.json beside the checkpoint: epochs done, measured epoch seconds, the GPU. Small, so the batch runner
    and `sesrun.py plan` can estimate the time left of an unfinished run without loading its checkpoint."""
    atomic_write_json(Path(out_dir) / "progress.json", {
        "epochs_done": len(history), "epochs": c["epochs"], "paused": paused, "time": time.time(),
        "epoch_seconds": [round(r["epoch_seconds"], 3) for r in history], "device": _device_name(device)})


def _final_metrics(history, c, model, device, evals, collector, log, best=None):
    last = history[-1]
    top = max(history, key=lambda r: r["test_acc"])  # the first epoch with the best test accuracy
    final = {"test_acc": last["test_acc"],  # the headline: the FINAL epoch's test accuracy
             "train_acc": last["train_acc"], "gap": last["gap"], "test_loss": last["test_loss"],
             # selected on the test set (what the published reference reports as best_acc): never a headline
             "best_test_acc_over_epochs": top["test_acc"], "best_test_epoch": top["epoch"],
             "params_m": count_params(model) / 1e6,
             "epoch_seconds_mean": float(np.mean([r["epoch_seconds"] for r in history])),
             "train_seconds_mean": float(np.mean([r["train_seconds"] for r in history])),
             "peak_mem_mb": max(r["peak_mem_mb"] for r in history),
             "erank": last["erank"], "erank_author": last.get("erank_author"), "epochs_run": len(history)}
    if "val_acc" in last:  # honest model selection: the epoch with the best held-out val accuracy
        sel = max(history, key=lambda r: r["val_acc"])
        final.update(val_acc=last["val_acc"], best_val_epoch=sel["epoch"], test_acc_at_best_val=sel["test_acc"])
    final["robustness"] = final["robustness_paper"] = final["robustness_paper_best"] = None
    if c["robustness"]:
        test = evals["test"]
        n = c["robustness_subset"] or len(test.images)
        x, y = test.images[:n], test.labels[:n]
        d = resolve_data_dir(c["dataset"], c["data_root"])
        normalize = (c["norm_mean"], c["norm_std"])
        # the standard protocol (Hendrycks & Dietterich, pixel space) on the final weights: our headline
        final["robustness"] = evaluate_corruptions(
            model, x, y, corruptions=c["robustness"],
            severities=c["robustness_severities"], batch_size=_eval_batch_size(c),
            normalize=normalize, device=device, data_root=d.parent, dataset=c["dataset"],
            seed=c["seed"], collector=collector, amp=c["precision"], cpu_amp=c["cpu_amp"], progress=log == "tqdm",
            classes=tinyimagenet_classes(d) if c["dataset"] == "tinyimagenet" else None,
            files=tinyimagenet_val_files(d)[:n] if c["dataset"] == "tinyimagenet" else None)  # the same images
        # the paper's protocol, on the final weights and on the best test-accuracy epoch's (what every SES
        # script reloads before its robustness pass: selected on the test set, so never our headline)
        paper = dict(normalize=normalize, batch_size=c["batch_size"], device=device, amp=c["precision"],
                     seed=c["seed"], collector=collector, cpu_amp=c["cpu_amp"])
        final["robustness_paper"] = evaluate_paper_protocol(model, x, y, **paper)
        if best is not None:
            final_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            model.load_state_dict(best["model"])
            try:
                final["robustness_paper_best"] = evaluate_paper_protocol(model, x, y, **paper)
                final["robustness_paper_best"].update(weights="best test-accuracy epoch (test-selected, as the paper)",
                                                      epoch=best["epoch"], test_acc=best["test_acc"])
            finally:
                model.load_state_dict(final_state)
    return final


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# toy 2-D study (Exp 4)
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# The paper gives only: 3 ring classes, a 5-layer MLP of 16 units, beta = 0.6, both models at 100%,
# kappa(J) 57.3 +- 156.2 -> 23.4 +- 30.7, every layer's erank within 5% of 16^0.6. Everything else
# (points, radii, noise, activation, optimiser, epochs, lambda) is our documented choice below.

TOY_PRESETS = read_only({"paper": {}, "smoke": dict(epochs=20, n_per_class=100, log_every=5)})
TOY_DEFAULTS = read_only(dict(
    seed=42, ses=False, ses_beta=0.6, ses_lambda=0.1, n_per_class=500, radii=[1.0, 2.0, 3.0], noise=0.15,
    test_fraction=0.2, activation="tanh", epochs=300, batch_size=128, lr=3e-3, weight_decay=0.0,
    log_every=10, out_dir=None, resume=True, device="cpu", preset=None,
))


def make_rings(n_per_class=500, radii=(1.0, 2.0, 3.0), noise=0.15, seed=0):
    """Three concentric rings in 2-D (class = ring), radial Gaussian noise; float32 [N, 2], int64 [N]."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for cls, r in enumerate(radii):
        theta = torch.rand(n_per_class, generator=g) * 2 * math.pi
        rad = r + noise * torch.randn(n_per_class, generator=g)
        xs.append(torch.stack([rad * theta.cos(), rad * theta.sin()], 1))
        ys.append(torch.full((n_per_class,), cls, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def jacobian_condition(model, x) -> torch.Tensor:
    """kappa(J) = sigma_max / sigma_min of the logits' Jacobian w.r.t. the input, at every point of x.

    torch.func (vmap of jacrev) gives all N Jacobians [N, classes, 2] in one batched call."""
    from torch.func import jacrev, vmap
    model.eval()
    J = vmap(jacrev(lambda p: model(p[None])[0]))(x)
    s = torch.linalg.svdvals(J)
    return s[:, 0] / s[:, -1].clamp_min(1e-12)


def resolve_toy_config(cfg):
    unknown = sorted(set(cfg) - set(TOY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown toy config key(s) {unknown}; known: {', '.join(sorted(TOY_DEFAULTS))}")
    c = {**TOY_DEFAULTS, **cfg}
    _check_beta(c["ses_beta"])
    if c["ses_lambda"] < 0 or c["epochs"] < 1:
        raise ValueError("ses_lambda must be >= 0 and epochs >= 1")
    return c


def train_toy(cfg: dict) -> dict:
    """Train the toy MLP (baseline or SES on all 5 hidden layers) and measure kappa(J) and erank."""
    c = resolve_toy_config(cfg)
    out = Path(c["out_dir"]) if c["out_dir"] else None
    set_seed(c["seed"])
    x, y = make_rings(c["n_per_class"], c["radii"], c["noise"], seed=c["seed"])
    n_test = int(len(y) * c["test_fraction"])
    xte, yte, xtr, ytr = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    model = ToyMLP(activation=c["activation"])
    collector = ActivationCollector(model, "all")
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    g = torch.Generator().manual_seed(c["seed"])
    history, names = [], collector.names
    t0 = time.time()
    for epoch in range(c["epochs"]):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        losses = []
        for i in range(0, len(perm) - c["batch_size"] + 1, c["batch_size"]):  # drop_last
            idx = perm[i:i + c["batch_size"]]
            collector.clear()
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            if c["ses"]:
                loss = loss + c["ses_lambda"] * ses_loss(collector.activations, c["ses_beta"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if epoch % c["log_every"] == 0 or epoch == c["epochs"] - 1:
            history.append(_toy_epoch_log(model, collector, epoch, float(np.mean(losses)), xtr, ytr, xte, yte, c))
    collector.remove()
    kappa = jacobian_condition(model, xte).double()
    last = history[-1]
    final = dict(test_acc=last["test_acc"], train_acc=last["train_acc"], gap=last["train_acc"] - last["test_acc"],
                 kappa_mean=kappa.mean().item(), kappa_std=kappa.std().item(), kappa_median=kappa.median().item(),
                 erank={n: last["erank"][n]["erank"] for n in names}, erank_target=16 ** c["ses_beta"],
                 erank_within_5pct=all(abs(last["erank"][n]["ratio"] - 1) <= 0.05 for n in names),
                 epoch_seconds_mean=(time.time() - t0) / c["epochs"], best_test_acc_over_epochs=max(h["test_acc"] for h in history))
    grid = _toy_decision_grid(model)
    result = dict(config=c, env=dict(torch=torch.__version__, device="cpu"), history=history, final=final,
                  kappa=kappa.tolist(), decision_grid=grid, test_points=dict(x=xte.tolist(), y=yte.tolist()))
    if out:
        atomic_write_json(out / "result.json", result)
    return result


def _toy_epoch_log(model, collector, epoch, loss, xtr, ytr, xte, yte, c):
    with measuring(model, "train"):  # erank on the whole test set as SES sees it (its hooks store in train mode)
        collector.clear()
        model(xte)
        er = erank_stats(collector.activations, collector.names, c["ses_beta"])
        collector.clear()
    with measuring(model):
        tr = (model(xtr).argmax(1) == ytr).float().mean().item() * 100
        te = (model(xte).argmax(1) == yte).float().mean().item() * 100
    return dict(epoch=epoch, train_loss=loss, train_acc=tr, test_acc=te, erank=er)


def _toy_decision_grid(model, lim=4.0, n=121):
    xs = torch.linspace(-lim, lim, n)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    with measuring(model):
        pred = model(torch.stack([gx.flatten(), gy.flatten()], 1)).argmax(1).view(n, n)
    return dict(lim=lim, n=n, pred=pred.tolist())


def toy_table(df, paper=None):
    """kappa(J) and erank per config (mean over seeds) beside the paper's numbers."""
    import pandas as pd
    paper = paper or {}
    rows = []
    for cfgname, sub in df.groupby("config", sort=False):
        fins = [r["final"] for r in sub["result"]]
        er = [v for f in fins for v in f["erank"].values()]
        p = paper.get(cfgname, {})
        rows.append({"config": cfgname, "seeds": len(fins),
                     "test acc": round(float(np.mean([f["test_acc"] for f in fins])), 2), "paper acc": p.get("acc"),
                     "κ(J) mean": round(float(np.mean([f["kappa_mean"] for f in fins])), 2),
                     "κ(J) std": round(float(np.mean([f["kappa_std"] for f in fins])), 2),
                     "κ(J) median": round(float(np.mean([f["kappa_median"] for f in fins])), 2),
                     "paper κ mean": p.get("kappa_mean"), "paper κ std": p.get("kappa_std"),
                     "erank range": f"{min(er):.2f}–{max(er):.2f}", "target 16^β": round(fins[0]["erank_target"], 2),
                     "all layers within ±5%": all(f["erank_within_5pct"] for f in fins)})
    return pd.DataFrame(rows).set_index("config")


def fig_toy(df, out_dir, name="toy", show=True):
    """Decision boundaries, the kappa(J) distribution, and erank convergence to 16^beta."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    configs = list(dict.fromkeys(df["config"]))
    first = {c: df[df["config"] == c].iloc[0]["result"] for c in configs}
    n = len(configs) + 2
    fig, axes = plt.subplots(1, n, figsize=(min(MAX_FIG_INCHES, 3.9 * n), 3.8))
    for ax, c in zip(axes, configs):
        r = first[c]
        g, pts = r["decision_grid"], r["test_points"]
        ax.imshow(np.array(g["pred"]), extent=(-g["lim"], g["lim"], -g["lim"], g["lim"]), origin="lower",
                  cmap=ListedColormap(["#fbb4ae", "#b3cde3", "#ccebc5"]), vmin=0, vmax=2)
        p = np.array(pts["x"])
        ax.scatter(p[:, 0], p[:, 1], c=pts["y"], s=4, cmap=ListedColormap(["#e41a1c", "#377eb8", "#4daf4a"]),
                   vmin=0, vmax=2)
        ax.set_title(f"{c}: κ(J) {r['final']['kappa_mean']:.1f} ± {r['final']['kappa_std']:.1f}", fontsize=9)
    ax = axes[len(configs)]
    for c in configs:
        k = np.concatenate([np.array(r["kappa"]) for r in df[df["config"] == c]["result"]])
        ax.hist(np.log10(k), bins=40, alpha=0.6, label=c)
    ax.set_xlabel("log10 κ(J) over test points")
    ax.legend()
    ax = axes[-1]
    for c in configs:
        r = first[c]
        for layer in r["history"][0]["erank"]:
            ax.plot([h["epoch"] for h in r["history"]], [h["erank"][layer]["erank"] for h in r["history"]],
                    ls="-" if r["config"].get("ses") else ":", label=f"{c} {layer}")
    ax.axhline(16 ** 0.6, color="k", ls="--", lw=1)
    ax.set_title("erank per hidden layer (dashed: 16^0.6)", fontsize=9)
    ax.set_xlabel("epoch")
    ax.legend(fontsize=5, ncol=2)
    return _save(fig, out_dir, name, show)


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# text (Exp 22)
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# Exp 22 as the author ran it (ses_bert_nlp.py): BERT-base-uncased fine-tuned on GLUE SST-2 and MRPC, baseline vs SES
# on the last 4 / all 12 encoder layers' outputs, beta 0.5, lambda 0.01; AdamW 2e-5 (no decay on biases and LayerNorm
# weights) wd 0.01, linear warm-up over 6 % of the steps then linear decay to 0, 3 epochs, batch 32 (last partial batch
# dropped), FP16 + GradScaler, gradient clip 1.0, 128 tokens padded to max_length, seed 42; acc = dev accuracy, gap =
# the last epoch's running train accuracy (dropout on) minus its dev accuracy. Its loaders keep only input_ids,
# attention_mask and label, so sentence pairs run with token type 0 throughout (token_type_ids=False here), and its
# hooks mean-pool over all 128 positions, padding included (ses_pool="tokens"; "mask": over the real tokens only).
# train_text writes the same run folder (result.json: config / env / history / final) as train().

TEXT_DEFAULTS = read_only(dict(
    task="sst2", text_data="glue", model="bert-base-uncased", max_len=128, token_type_ids=False,
    epochs=3, batch_size=32, eval_batch_size=None, lr=2e-5, weight_decay=0.01, warmup_ratio=0.06, grad_clip=1.0,
    amp="fp16", precision=None, cpu_amp=False,
    ses=False, ses_lambda=0.01, ses_beta=0.5, ses_layers="all", ses_pool="tokens", erank_batches=4,
    seed=42, device="auto", data_root=None, out_dir=None, resume=False, save_model=False, keep_checkpoint=False,
    train_subset=None, test_subset=None, max_steps_per_epoch=None, preset=None, log="auto",
))
# smoke: the whole path offline in seconds on a CPU: TINY_BERT on SYNTHETIC text (smoke only), 2 epochs of 8 steps, at
# lr 1e-3 (a randomly initialised BERT moves nowhere in 16 steps at the fine-tuning rate 2e-5)
TEXT_PRESETS = read_only({"paper": {}, "smoke": dict(model=TINY_BERT, text_data="synthetic", epochs=2, max_len=32,
                                                     train_subset=256, test_subset=64, erank_batches=1, lr=1e-3)})
_TEXT_CHOICES = {"task": tuple(GLUE_TASKS), "text_data": ("glue", "synthetic"), "amp": ("auto", "fp16", "bf16", "off"),
                 "ses_pool": ("tokens", "mask"), "log": ("auto", "tqdm", "plain", "none")}
_TEXT_RULES = (
    *_each(("epochs", "batch_size", "max_len", "erank_batches"), lambda v, c: _is_int(v) and v >= 1, "an int >= 1"),
    ("batch_size", lambda v, c: v >= 2, "an int >= 2 (the spectrum of one sample is empty)"),
    *_each(("eval_batch_size", "train_subset", "test_subset", "max_steps_per_epoch"),
           lambda v, c: v is None or (_is_int(v) and v >= 1), "None or an int >= 1"),
    ("seed", lambda v, c: _is_int(v), "an int"),
    ("lr", lambda v, c: _is_num(v) and v > 0, "a number > 0"),
    *_each(("weight_decay", "ses_lambda"), lambda v, c: _is_num(v) and v >= 0, "a number >= 0"),
    ("warmup_ratio", lambda v, c: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("grad_clip", lambda v, c: v is None or (_is_num(v) and v > 0), "None or a number > 0"),
    ("ses_beta", lambda v, c: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    *_each(("ses", "token_type_ids", "cpu_amp", "resume", "save_model", "keep_checkpoint"),
           lambda v, c: isinstance(v, bool), "True or False"),
    ("model", lambda v, c: isinstance(v, str) and v, "a Hugging Face model name or a local folder"),
    ("model", lambda v, c: v != TINY_BERT or c["text_data"] == "synthetic",
     f"not {TINY_BERT!r} with GLUE data (its vocabulary is the synthetic text's)"),
    ("ses_layers", lambda v, c: isinstance(v, str) and re.fullmatch(r"all|(first|last)\d+", v),
     "'all', 'lastN' or 'firstN' (encoder layers)"),
    ("resume", lambda v, c: not v or c["out_dir"] is not None, "False when out_dir is None"),
)


def resolve_text_config(cfg) -> dict:
    """An Exp 22 run's full config (TEXT_DEFAULTS filled in, precision resolved for this device), or ValueError naming
    the bad key: the text counterpart of validate_config, for plan_runs(resolve=...)."""
    _check_config_keys(cfg, TEXT_DEFAULTS, "text config")
    c = {**TEXT_DEFAULTS, **cfg}
    for k, opts in _TEXT_CHOICES.items():
        _check(c[k] in opts, k, c[k], "one of " + ", ".join(map(repr, opts)))
    for key, test, want in _TEXT_RULES:
        _check(test(c[key], c), key, c[key], want)
    for k in ("data_root", "out_dir"):
        c[k] = None if c[k] is None else str(c[k])
    _resolve_device(c)  # a device this machine has; precision: what the amp request runs at on it
    return c


# ── the model ──

def _local_text_model(name, root=None):
    """A folder holding `name` (config.json and a tokenizer): `name` itself when it is one, else the first folder under
    data_root / $SES_DATA / Kaggle inputs / ./data whose path names it (an attached copy), else None."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    key = name.rstrip("/").split("/")[-1].lower()
    for _, base, depth in _candidate_roots(root):
        if not base.is_dir():
            continue
        for dirpath, dirnames, files in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
            dirnames.sort()
            d = Path(dirpath)
            if "config.json" in files and {"vocab.txt", "tokenizer.json"} & set(files) and key in str(d).lower():
                return d
            if len(d.relative_to(base).parts) >= depth + 2:
                dirnames[:] = []
    return None


def load_pretrained_text(name, num_labels=2, root=None):
    """(model, tokenizer, where from) of a pretrained sequence classifier: an attached copy (_local_text_model), else
    the Hugging Face cache, else a download when the hub answers. None of these: FileNotFoundError in one line naming
    what to attach (offline, transformers would retry for a minute and then say little)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    local = _local_text_model(name, root)
    src, kw = (str(local), {}) if local is not None else (name, {"local_files_only": not hub_reachable()})
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels, **kw)
    except OSError:
        if not kw.get("local_files_only"):
            raise
        from huggingface_hub.constants import HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name} is not in the Hugging Face cache ({HF_HUB_CACHE}) and huggingface.co is unreachable (offline): "
            f"attach a Kaggle dataset or model holding its files (config.json, vocab.txt, model.safetensors or "
            f"pytorch_model.bin; found under /kaggle/input, data_root or SES_DATA when a folder's path names "
            f"{name.rstrip('/').split('/')[-1]!r}) "
            f"or set HF_HOME to a cache holding it; online, it downloads itself") from None
    return model, tok, str(local) if local is not None else f"Hugging Face: {name}"


def encode_text(tokenizer, a, b, max_len) -> dict:
    """The tokenizer's input_ids, attention_mask, token_type_ids for texts a (and pairs b), truncated and padded to
    max_len tokens, as the author's map (padding="max_length": the mean over tokens includes the padding)."""
    enc = tokenizer(a, b, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def text_lr_factor(warmup, total):
    """The author's LinearWarmupScheduler as a LambdaLR factor of the optimiser steps taken: it sets the rate after
    each step, so the first step runs at the base rate, step i >= 1 at i / warmup of it during the warm-up, then the
    rate falls linearly to 0 at `total`."""
    def factor(i):
        if i == 0:
            return 1.0
        if i <= warmup:
            return i / max(1, warmup)
        return max(0.0, 1.0 - (i - warmup) / max(1, total - warmup))
    return factor


# ── a run ──

@dataclasses.dataclass(eq=False)
class _TextRun:
    """What one Exp 22 run holds, filled in by train_text's steps in order."""
    c: dict
    device: torch.device
    out_dir: Path | None = None
    ckpt_path: Path | None = None
    amp_dtype: torch.dtype | None = None
    model: nn.Module | None = None
    tokenizer: object = None
    source: str = ""  # where the model came from
    ses: SES | None = None  # lam 0 for a baseline: its hooks then serve the erank measurement alone
    pool: MaskedTokenPool | None = None  # ses_pool="mask": the current batch's attention mask
    train: dict | None = None  # the training set as tensors on the device (input_ids, ..., labels)
    dev: dict | None = None
    data_source: str = ""
    erank_batches: list | None = None
    steps: int = 0
    order: torch.Generator | None = None  # each epoch's shuffle (its state is checkpointed)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    scaler: object = None
    history: list = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    t_start: float = 0.0
    log: str = "none"
    tag: str = ""
    mem_estimate: dict | None = None  # {gpu, peak_gb}: estimate_memory at the start (CUDA runs), for result.json


def train_text(cfg: dict) -> dict:
    """Train one Exp 22 run (resolve_text_config) and return {config, env, history, final}, the run folder as train()'s:
    with out_dir, result.json at the end and checkpoint.pt after every epoch (atomic both), resume=True continues from
    the checkpoint or hands back the finished result, files made with other settings are set aside, an exclusive lock,
    a pause before an epoch the time budget cannot fit."""
    c = resolve_text_config(cfg)
    if importlib.util.find_spec("transformers") is None:
        raise PreflightError("this run cannot start:\n  - the package 'transformers' is missing (Exp 22's "
                             "tokenizers and BERT): pip install transformers")
    out = Path(c["out_dir"]) if c["out_dir"] else None
    with run_lock(out) if out else contextlib.nullcontext():
        if out:
            clean_temporaries(out)
        done, ck = _stale_on_disk(c, out, DistInfo()) if out else (None, None)
        if done is not None:  # finished already, with these settings
            return done
        run = _TextRun(c, pick_device(c["device"]), out_dir=out, ckpt_path=out / "checkpoint.pt" if out else None)
        threads = torch.get_num_threads()
        if c["model"] == TINY_BERT and run.device.type == "cpu":  # its 64-wide ops: handing them to a second thread
            torch.set_num_threads(1)  # costs more than the op (35x slower on a busy 2-core machine, measured)
        try:
            return _train_text(run, ck)
        finally:
            torch.set_num_threads(threads)
            _release_text(run)


def _train_text(run, ck) -> dict:
    """The run's steps: model and hooks, data, optimisation (resumed from ck), the epochs, the result."""
    c = run.c
    run.amp_dtype = _amp_dtype(c["precision"])
    if run.device.type == "cuda":  # CUDA-only: the CPU twin is text_memory_preflight (tests/test_memory.py)
        run.mem_estimate = text_memory_preflight(c, memory_gpu_kind(run.device))
    set_seed(c["seed"])  # before the model: the classifier head's initialisation, as the author's set_seed
    run.t_start = time.time()
    _text_model(run)
    _text_data(run)
    _text_optimisation(run)
    _text_restore(run, ck)
    run.log = _log_mode(c["log"])
    run.tag = f"{c['task']}/{c['model']}" + (f"+SES {c['ses_layers']}" if c["ses"] else "") + f" seed {c['seed']}"
    if run.device.type == "cuda":  # the run's own peak (the author's worker never reset it between its 3 runs)
        torch.cuda.reset_peak_memory_stats(run.device)
    end = deadline()
    for epoch in range(run.start_epoch, c["epochs"]):
        if end is not None and _pause_now(run.history, c, epoch, end, DistInfo()):
            if run.ckpt_path:
                _write_progress(run.out_dir, c, run.history, run.device, paused=True)
            raise RunPaused(f"paused before epoch {epoch + 1}/{c['epochs']}: the time budget ends in "
                            f"{max(0.0, end - time.time()) / 60:.0f} min; run it again to resume")
        t0 = time.time()
        row = _text_train_epoch(run, epoch, t0)
        row["test_acc"], row["test_loss"] = _text_evaluate(run)  # GLUE's dev set: the author's val set
        row["gap"] = row["train_acc"] - row["test_acc"]
        row["erank"] = _text_erank(run)
        row.update(epoch_seconds=time.time() - t0, peak_mem_mb=_peak_mem_mb(run.device))
        run.history.append(row)
        _text_log(run, row)
        _text_checkpoint(run, epoch)
    return _text_finish(run)


def text_memory_preflight(c, gpu) -> dict | None:
    """Before a text run loads anything: estimate_memory on this GPU kind; PreflightError in one line when the run
    cannot fit it (Exp 22 runs on one GPU), else {gpu, peak_gb} for result.json; None for a model it does not know."""
    if not placeable(c):
        return None
    est = estimate_memory(c, gpu)
    if not est["fits"]:
        raise PreflightError(f"this run cannot start: it needs {est['need_gb']:.1f} GB on one {gpu} "
                             f"({est['usable_gb']:.1f} usable; {est['why']}); lower batch_size or max_len")
    return {"gpu": gpu, "peak_gb": est["peak_gb"]}


def _text_model(run):
    """The model and tokenizer on the device, and the SES object on its encoder layers."""
    c = run.c
    if c["model"] == TINY_BERT:
        run.tokenizer = tiny_tokenizer()
        run.model, run.source = tiny_bert(len(run.tokenizer), c["max_len"]), f"{TINY_BERT} (random init, smoke only)"
    else:
        run.model, run.tokenizer, run.source = load_pretrained_text(c["model"], 2, c["data_root"])
    run.model.to(run.device)
    run.pool = MaskedTokenPool() if c["ses_pool"] == "mask" else None
    run.ses = SES(run.model, bert_hook_targets(run.model, c["ses_layers"]), beta=c["ses_beta"],
                  lam=c["ses_lambda"] if c["ses"] else 0.0, pool=run.pool or "auto")


def _text_split(c, split):
    """(a, b, labels) of one split: GLUE's, cut to train_subset / test_subset, or SYNTHETIC (smoke only)."""
    n = c["train_subset"] if split == "train" else c["test_subset"]
    if c["text_data"] == "synthetic":  # fixed seeds: every run sees the same synthetic sets
        return synthetic_glue(c["task"], n or SYNTHETIC_SIZES[split != "train"], seed=1 if split == "train" else 2)
    a, b, y = load_glue(c["task"], split, c["data_root"])
    return a[:n], b[:n] if b is not None else None, y[:n]


def _text_data(run):
    """Both splits tokenised once into tensors on the device, the fixed erank batches, the steps per epoch."""
    c, dev = run.c, run.device
    sets = {}
    for split in ("train", "dev"):
        a, b, y = _text_split(c, split)
        enc = encode_text(run.tokenizer, a, b, c["max_len"])
        sets[split] = {**{k: v.to(dev) for k, v in enc.items()}, "labels": torch.tensor(y, device=dev)}
    run.train, run.dev = sets["train"], sets["dev"]
    glue_dir = resolve_glue_dir(c["task"], c["data_root"])[0] if c["text_data"] == "glue" else None
    run.data_source = ("SYNTHETIC text (smoke only)" if c["text_data"] == "synthetic" else
                       f"{GLUE_TASKS[c['task']]['name']}: {glue_dir or HF_HUB_ID}")
    n, B = len(run.train["labels"]), c["batch_size"]
    if n < B:
        raise ValueError(f"batch_size {B} is larger than the {n} training examples: the last partial batch is dropped, "
                         "so no step would run; lower batch_size")
    run.steps = min(n // B, c["max_steps_per_epoch"] or n)
    run.erank_batches = [_rows(run.train, slice(i * B, (i + 1) * B)) for i in range(min(c["erank_batches"], n // B))]


def _rows(data, idx) -> dict:
    return {k: v[idx] for k, v in data.items()}


def _text_optimisation(run):
    """AdamW in two groups (no decay on NO_DECAY), the author's warm-up schedule per step, the FP16 gradient scaler."""
    c = run.c
    run.optimizer = torch.optim.AdamW(text_param_groups(run.model, c["weight_decay"]), lr=c["lr"])
    total = run.steps * c["epochs"]
    warmup = int(total * c["warmup_ratio"])  # the author's int(total_steps * WARMUP_RATIO)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, text_lr_factor(warmup, total))
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)
    run.order = torch.Generator().manual_seed(c["seed"])


def _text_restore(run, ck):
    """Continue where the checkpoint left off: weights, optimiser, schedule, scaler, RNG streams, history."""
    if ck is None:
        return
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"] and torch.cuda.is_available() and len(ck["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    run.order.set_state(ck["rng"]["order"])
    run.history, run.start_epoch = ck["history"], ck["epoch"]
    print(f"[{run.c['task']}] resumed from {run.ckpt_path} at epoch {run.start_epoch}", flush=True)


def _model_inputs(run, batch) -> dict:
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if run.c["token_type_ids"] else ())
    if run.pool is not None:  # the hooks pool over this batch's real tokens
        run.pool.mask = batch["attention_mask"]
    return {k: batch[k] for k in keys if k in batch}


def _text_train_epoch(run, epoch, t0) -> dict:
    """One pass over the training set in this epoch's shuffled order: the epoch's row (running train accuracy with
    dropout on, as the author's). Losses are checked finite once per 16 steps (one host sync)."""
    c, B = run.c, run.c["batch_size"]
    run.model.train()
    lr = run.optimizer.param_groups[0]["lr"]  # the epoch's first step's (as the image runs log it)
    perm = torch.randperm(len(run.train["labels"]), generator=run.order).to(run.device)
    sums = torch.zeros(5, device=run.device, dtype=torch.float64)  # task loss, SES sum, hits, samples, SES steps
    bar = tqdm(total=run.steps, desc=f"{run.tag} ep {epoch + 1}/{c['epochs']}") if run.log == "tqdm" else None
    pending, step0 = [], 0
    for step in range(run.steps):
        pending.append(_text_step(run, _rows(run.train, perm[step * B:(step + 1) * B]), sums))
        if len(pending) == 16 or step == run.steps - 1:
            _check_finite(pending, epoch, step0, run.steps, "")
            step0, pending = step + 1, []
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if run.device.type == "cuda":  # the clock must include the work still queued on the GPU
        torch.cuda.synchronize(run.device)
    loss, reg, hits, n, n_reg = sums.tolist()
    row = {"epoch": epoch + 1, "train_loss": loss / n, "train_acc": 100.0 * hits / n,
           "ses_loss": reg / n_reg if n_reg else None,  # mean of sum_l (H_l - beta log d_l)^2, lambda not applied
           "lr": lr, "beta": c["ses_beta"], "steps": run.steps, "train_seconds": time.time() - t0}
    if n_reg:  # the SES term as it enters the loss, and the training loss with it (the author's loss meter)
        row["ses_term"] = c["ses_lambda"] * reg / run.steps
        row["train_loss_total"] = row["train_loss"] + row["ses_term"]
    return row


def _text_step(run, batch, sums):
    """One optimiser step, the author's order: forward under autocast, SES in float32 outside it, scaled backward,
    unscale, clip 1.0, step, scaler update, schedule step."""
    with autocast(run.device, run.amp_dtype):
        out = run.model(**_model_inputs(run, batch), labels=batch["labels"])
    loss = out.loss.float() + run.ses()  # lam * sum_l (H_l - beta log d_l)^2; 0 for a baseline
    if run.ses.last_loss is not None:
        sums[1] += run.ses.last_loss.double()
        sums[4] += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.c["grad_clip"]:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.c["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():
        n = len(batch["labels"])
        sums[0] += out.loss.detach().double() * n
        sums[2] += (out.logits.argmax(-1) == batch["labels"]).sum().double()
        sums[3] += n
    return loss.detach()


def _text_evaluate(run):
    """(accuracy %, mean loss) on the dev set, eval mode, under the run's autocast, hooks paused."""
    data, eb = run.dev, run.c["eval_batch_size"] or run.c["batch_size"]
    sums = torch.zeros(3, device=run.device, dtype=torch.float64)
    with measuring(run.model, "eval"), run.ses.paused():
        for i in range(0, len(data["labels"]), eb):
            batch = _rows(data, slice(i, i + eb))
            with autocast(run.device, run.amp_dtype):
                logits = run.model(**_model_inputs(run, batch)).logits
            sums[0] += (logits.argmax(-1) == batch["labels"]).sum()
            sums[1] += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").double()
            sums[2] += len(batch["labels"])
    hits, loss, n = sums.tolist()
    return 100.0 * hits / n, loss / n


def _text_erank(run) -> dict:
    """Per-layer effective rank as SES sees it (train mode, the first erank_batches training batches of the batch
    size, the run's pooling), averaged over the batches; the RNG is forked, so the measurement changes nothing."""
    per = []
    devices = [run.device] if run.device.type == "cuda" else []
    with run.ses.measuring(), measuring(run.model, "train"), torch.random.fork_rng(devices=devices):
        for batch in run.erank_batches:
            run.ses.collector.clear()
            with autocast(run.device, run.amp_dtype):
                run.model(**_model_inputs(run, batch))
            per.append(layer_erank_stats(run.ses.collector, run.c["ses_beta"]))
        run.ses.collector.clear()
    out = {}
    for name, st in per[0].items():
        erank = float(np.mean([p[name]["erank"] for p in per]))
        out[name] = {"erank": erank, "d": st["d"], "target": st["target"], "ratio": erank / st["target"],
                     "samples": run.c["batch_size"]}
    return out


def _text_log(run, row):
    if run.log in ("plain", "tqdm"):
        left = seconds_left(run.c["epochs"], row["epoch"], [r["epoch_seconds"] for r in run.history])
        print(f"[{run.tag}] ep {row['epoch']}/{run.c['epochs']} loss {row['train_loss']:.4f} train "
              f"{row['train_acc']:.2f}% dev {row['test_acc']:.2f}% gap {row['gap']:.2f} lr {row['lr']:.3g} "
              f"{row['epoch_seconds']:.1f}s {row['peak_mem_mb']:.0f}MB ~{_hours(left)} left", flush=True)


def _text_checkpoint(run, epoch):
    """checkpoint.pt after the epoch (atomic), then progress.json."""
    if not run.ckpt_path:
        return
    rng = {"torch": torch.get_rng_state(), "order": run.order.get_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_torch_save({"format": 1, "epoch": epoch + 1, "config": run.c, "model": run.model.state_dict(),
                       "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                       "scaler": run.scaler.state_dict(), "rng": rng, "history": run.history}, run.ckpt_path)
    _write_progress(run.out_dir, run.c, run.history, run.device)


def _text_finish(run) -> dict:
    """The final metrics (on the image runs' keys, so reports and claims read both alike), result.json, the weights
    when save_model; checkpoint.pt goes unless keep_checkpoint."""
    c, hist = run.c, run.history
    last, top = hist[-1], max(hist, key=lambda r: r["test_acc"])  # the first best epoch: the author's best_val_acc
    final = {"test_acc": last["test_acc"], "train_acc": last["train_acc"], "gap": last["gap"],
             "test_loss": last["test_loss"], "best_test_acc_over_epochs": top["test_acc"],
             "best_test_epoch": top["epoch"],
             "params_m": count_params(run.model) / 1e6,
             "epoch_seconds_mean": float(np.mean([r["epoch_seconds"] for r in hist])),
             "train_seconds_mean": float(np.mean([r["train_seconds"] for r in hist])),
             "peak_mem_mb": max(r["peak_mem_mb"] for r in hist), "erank": last["erank"], "epochs_run": len(hist),
             **_peak_memory(run),  # GPU runs: max_memory_allocated in decimal GB (the author's vram_peak_gb), estimate
             "robustness": None, "robustness_paper": None, "robustness_paper_best": None, "eval_seconds": 0.0,
             "total_seconds": time.time() - run.t_start}
    import transformers
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(run.device), "device_name": _device_name(run.device), "cuda": torch.version.cuda,
           "model_source": run.source, "data": run.data_source, "hostname": socket.gethostname(),
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    result = {"config": c, "env": env, "history": hist, "final": final}
    if run.out_dir:
        if c["save_model"]:
            atomic_torch_save(run.model.state_dict(), run.out_dir / "model_final.pt")
        atomic_write_json(run.out_dir / "result.json", result)
        if not c["keep_checkpoint"] and run.ckpt_path.exists():
            run.ckpt_path.unlink()
    return result


def _release_text(run):
    """Hooks off and the device memory back between runs, also when a run fails."""
    if run.ses is not None:
        run.ses.remove()
    _free_fields(run, ("model", "ses", "train", "dev", "erank_batches", "optimizer", "scheduler", "scaler"))


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# results & reports
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# One run = one result.json (see train); a notebook's report reads whatever results exist under
# {out_dir}/runs/*/result.json, aggregates over seeds, puts the paper's number beside ours, and draws
# the figures the reference published for that experiment into {out_dir}/figures/.

def _num(v):
    return float(v) if _is_real(v) else float("nan")


def _rob_mean(final: dict, key="robustness"):
    return _num((final.get(key) or {}).get("mean_corruption_acc"))


def _result_row(config, result, run_dir):
    """The per-run numbers every report and claim works from (NaN where a run has none)."""
    cfg, fin, env = result.get("config", {}), result.get("final", {}), result.get("env", {})
    return dict(
        config=config, seed=cfg.get("seed"),
        acc_final=_num(fin.get("test_acc")), acc_best=_num(fin.get("best_test_acc_over_epochs")),
        gap=_num(fin.get("gap")), rob=_rob_mean(fin), rob_paper=_rob_mean(fin, "robustness_paper"),
        rob_paper_best=_rob_mean(fin, "robustness_paper_best"), epoch_s=_num(fin.get("epoch_seconds_mean")),
        train_s=_num(fin.get("train_seconds_mean")),  # the training loop alone (NaN in results made before it)
        eval_s=_num(fin.get("epoch_seconds_mean")) - _num(fin.get("train_seconds_mean")),  # the rest of an epoch
        peak_mem_mb=_num(fin.get("peak_mem_mb")), kappa_mean=_num(fin.get("kappa_mean")),
        # GPU runs: the measured max_memory_allocated and estimate_memory's figure, decimal GB (NaN elsewhere)
        peak_mem_gb=_num(fin.get("peak_mem_gb")), peak_mem_est_gb=_num(fin.get("peak_mem_estimate_gb")),
        erank_dev=_erank_dev(result), device_name=env.get("device_name"), **_claim_extras(result),
        run_dir=str(run_dir), result=result)


def _erank_dev(result):
    """Largest |erank / d^β − 1| over the hooked layers at the last epoch, in % (as SES sees the layers)."""
    last = (result.get("history") or [{}])[-1].get("erank") or {}
    ratios = [st["ratio"] for st in last.values() if isinstance(st, dict) and "ratio" in st]
    return 100 * max(abs(r - 1) for r in ratios) if ratios else float("nan")


ERANK_SUMMARY = ("erank_ratio_mean", "erank_absdev_mean", "erank_spread")  # Exp 28's numbers (erank_summary)


def erank_summary(stats: dict) -> dict:
    """Exp 28's numbers over layers {name: {erank, ratio, ...}} (erank_stats' form): the mean of erank / d^β
    (erank_ratio_mean), the mean distance to the target |erank / d^β − 1| (erank_absdev_mean: the paper's "40.9 %
    reduction in distance to target") and the spread of erank across the layers, max / min (erank_spread: the ViT's
    "7.1x -> 2.4x"). One definition for our runs and the author's files, so both are computed alike."""
    st = [s for s in (stats or {}).values() if isinstance(s, dict) and "ratio" in s and "erank" in s]
    if not st:
        return dict.fromkeys(ERANK_SUMMARY, float("nan"))
    ratios, eranks = np.array([s["ratio"] for s in st], float), np.array([s["erank"] for s in st], float)
    return {"erank_ratio_mean": float(ratios.mean()), "erank_absdev_mean": float(np.abs(ratios - 1).mean()),
            "erank_spread": float(eranks.max() / eranks.min()) if eranks.min() > 0 else float("nan")}


def _erank_shape(result):
    """erank_summary at the last epoch, as the author measured the layers (erank_author: eval mode, the first 2048
    test images; his Exp 28 tables and figures), not as SES sees them on training batches."""
    return erank_summary((result.get("history") or [{}])[-1].get("erank_author"))


CLAIM_CORRUPTIONS = (("contrast", 3), ("contrast", 5), ("brightness", 5), ("gaussian_noise", 1), ("gaussian_noise", 5))


def _claim_extras(result):
    """The numbers only some claims use: kappa(J)'s spread over points, the SES loss's last/first-epoch ratio,
    parameters (M), Exp 28's erank numbers (erank_summary), and the per-corruption accuracies the paper quotes
    (CLAIM_CORRUPTIONS), on its protocol (test-selected weights) and on the standard one (final epoch)."""
    fin, hist = result.get("final", {}), result.get("history") or []
    ses = [_num(r.get("ses_loss")) for r in (hist[0], hist[-1])] if hist else [float("nan")] * 2
    out = {"kappa_std": _num(fin.get("kappa_std")), "params_m": _num(fin.get("params_m")),
           "ses_loss_ratio": ses[1] / ses[0] if ses[0] == ses[0] and ses[0] > 0 else float("nan"),
           **_erank_shape(result)}
    paper = (fin.get("robustness_paper_best") or {}).get("detail") or {}
    std = (fin.get("robustness") or {}).get("accuracy") or {}
    for name, sev in CLAIM_CORRUPTIONS:
        out[f"rob_{name}_s{sev}_paper"] = _num(paper.get(f"{name}_s{sev}"))
        out[f"rob_{name}_s{sev}"] = _num((std.get(name) or {}).get(str(sev)))
    return out


def load_results(out_dir):
    """One row per parseable {out_dir}/runs/*/result.json, whatever made it (the raw result in column `result`).
    Reports use plan_results instead, which keeps only the runs made with the settings planned now."""
    import pandas as pd
    rows = []
    for path in sorted(Path(out_dir).glob("runs/*/result.json")):
        r = _read_result(path)
        if r is not None:
            rows.append(_result_row(path.parent.name.rsplit("_seed", 1)[0], r, path.parent))
    return pd.DataFrame(rows)


def plan_results(plan):
    """(rows of the results made with the plan's settings, [(run folder, why it was left out)]).

    Every grid config (not only the selected ones) at the plan's seeds: a report of a re-run of one config still
    shows its baseline. A result made with other settings (config_diff) is left out and named."""
    import pandas as pd
    rows, left_out = [], []
    for (config, seed), cfg in plan.resolved.items():
        run_dir = Path(plan.out_dir) / "runs" / f"{config}_seed{seed}"
        r = _read_result(run_dir / "result.json")
        if r is None:
            continue
        diff = config_diff(cfg, r.get("config") or {})
        if diff:
            left_out.append((str(run_dir), f"made with other settings: {describe_diff(diff)}"))
        else:
            rows.append(_result_row(config, r, run_dir))
    return pd.DataFrame(rows), left_out


# ── the paper's numbers from the author's published result files ─────────────────────────────────
REFERENCE_ENV = "SES_REFERENCE"  # the folder of the author's result files (erank_*.json, ...)


def reference_dir(path=None) -> Path | None:
    """The folder of the author's published result files: `path`, else $SES_REFERENCE (either must be a folder),
    else ../shared/reference/paper_results beside the repository when it exists, else None (no network, no copy:
    a notebook then keeps the paper's numbers typed in it)."""
    for p in (path, os.environ.get(REFERENCE_ENV)):
        if p:
            if not Path(p).expanduser().is_dir():
                raise ValueError(f"reference_dir {str(p)!r} is not a folder (the author's result files, e.g. "
                                 "erank_resnet18.json); None: the paper's numbers typed in the notebook")
            return Path(p).expanduser()
    default = Path(__file__).resolve().parent.parent / "shared" / "reference" / "paper_results"
    return default if default.is_dir() else None


def paper_erank(path) -> dict:
    """{"baseline": {...}, "ses": {...}} from one of ses_erank_dynamics.py's result files (erank_resnet18.json,
    erank_vit_small.json): per run its best test accuracy over epochs (acc, the author's best_acc), erank_summary at
    the last epoch on the targets d^β of the run's β, and each layer's erank, d, target and ratio (erank_layers,
    in the file's order and with its names: block_i where our hooks say blocks.i)."""
    out = {}
    for key, run in json.loads(Path(path).read_text()).items():
        beta = float(run["beta"])
        last = run["erank_history"][-1]
        layers = {n: {"erank": s["erank"], "d": s["dim"], "target": s["dim"] ** beta,
                      "ratio": s["erank"] / s["dim"] ** beta} for n, s in last.items() if isinstance(s, dict)}
        out[key] = {"acc": float(run["best_acc"]), **erank_summary(layers), "erank_layers": layers}
    return out


def paper_erank_results(files: dict, reference=None) -> dict:
    """PAPER entries {"<prefix>_<run>": numbers} read from the author's erank files {prefix: file name} in
    reference_dir(reference); {} for what is not at hand (said in one line): the notebook keeps its typed copy."""
    folder = reference_dir(reference)
    if folder is None:
        print("paper numbers: the copy typed in this notebook (no folder of the author's result files: set "
              f"reference_dir or ${REFERENCE_ENV})")
        return {}
    out = {}
    for prefix, name in files.items():
        if (folder / name).is_file():
            out.update({f"{prefix}_{k}": v for k, v in paper_erank(folder / name).items()})
        else:
            print(f"paper numbers for {prefix}: the typed copy ({folder / name} not found)")
    if out:
        print(f"paper numbers: read from the author's files in {folder}")
    return out


# ses_bert_nlp.py's result keys -> PAPER's: best dev accuracy over epochs, the last epoch's train - dev gap, the training
# loop's seconds per epoch (a T4), torch.cuda.max_memory_allocated at the end (GB = 1e9 bytes; as MiB for claims)
GLUE_PAPER_FIELDS = read_only({"acc": ("best_val_acc", 1.0), "gap": ("final_gap", 1.0),
                               "epoch_s": ("avg_epoch_time", 1.0), "vram_gb": ("vram_peak_gb", 1.0),
                               "peak_mem_mb": ("vram_peak_gb", 1e9 / 2**20)})
GLUE_PAPER_FILES = ("bert_nlp_summary.json", "gpu0_sst2_results.json", "gpu1_mrpc_results.json")


def paper_glue_results(reference=None) -> dict:
    """Exp 22's PAPER entries {config (sst2_baseline, ...): numbers} read from ses_bert_nlp.py's result files in
    reference_dir(reference) (the summary, else the per-GPU files); {} when they are not at hand (said in one line):
    the notebook keeps its typed copy."""
    folder = reference_dir(reference)
    files = [folder / n for n in GLUE_PAPER_FILES if (folder / n).is_file()] if folder is not None else []
    if not files:
        print("paper numbers: the copy typed in this notebook (no bert_nlp_summary.json at hand: set reference_dir "
              f"or ${REFERENCE_ENV})")
        return {}
    runs = {}
    for f in reversed(files):  # the summary last: it wins where both hold a run
        runs.update(json.loads(f.read_text()))
    print(f"paper numbers: read from the author's files {', '.join(f.name for f in files)} in {folder}")
    return {k: {key: round(float(r[src]) * scale, 4) for key, (src, scale) in GLUE_PAPER_FIELDS.items() if src in r}
            for k, r in runs.items()}


# ── metrics, claims and verdicts ─────────────────────────────────────────────────────────────────
# A claim is one published statement, as data in its notebook, e.g.
#   dict(text="SES improves robustness on CIFAR-100", a="ses", b="baseline", metric="rob")
# metric: a key of CLAIM_METRICS; kind, with the statistic each judges:
#   delta     a - b (paper: the signed difference)          ratio     a / b, on the log scale (size claims: "+15 %")
#   contrast  sum of weight * config, terms={config: w}      sd_ratio  seed SD of a / seed SD of b (variance claims)
#   best      a minus its best rival among `among`          tie       a - b within ± margin (equivalence)
#   at_most   a (or a - b) at most `paper`                   near_best a's best rival leads it by at most `margin`
#   spread    max - min over `among` at most `paper`
# The paper's own value comes from the notebook's PAPER numbers unless the claim gives `paper`; `source` says where
# the number is published. A config named "NN_notebook/config" is another notebook's (SUMMARY_CLAIMS).
# Each claim is judged twice: on the paper's metric definition (accuracy = best test accuracy over epochs,
# robustness = its own protocol on the test-selected weights) and on our headline definition (final epoch,
# the standard 15 x 5 corruptions).
CLAIM_METRICS = read_only({  # metric -> (paper's definition, our headline definition, PAPER key, higher is better)
    "acc": ("acc_best", "acc_final", "acc", True),
    "rob": ("rob_paper_best", "rob", "rob", True),
    "gap": ("gap", "gap", "gap", False),
    "epoch_s": ("train_s", "train_s", "epoch_s", False),  # the training loop's seconds, as the author's avg_epoch_time
    "kappa": ("kappa_mean", "kappa_mean", "kappa_mean", False),
    "erank_dev": ("erank_dev", "erank_dev", "erank_dev", False),  # max_l |erank_l / d_l^β - 1| in %
    "kappa_std": ("kappa_std", "kappa_std", "kappa_std", False),  # kappa(J)'s SD over the test points (Exp 4)
    "ses_loss_ratio": ("ses_loss_ratio", "ses_loss_ratio", "ses_loss_ratio", False),  # last / first epoch SES loss
    "peak_mem": ("peak_mem_mb", "peak_mem_mb", "peak_mem_mb", False),  # peak device memory (ratios only)
    "params": ("params_m", "params_m", "params_m", False),  # parameters, millions (deterministic: one run decides)
    # Exp 28, at the last epoch as the author measured (erank_summary); "higher" matters only to best/near_best
    "erank_ratio_mean": ("erank_ratio_mean", "erank_ratio_mean", "erank_ratio_mean", True),  # mean erank / d^β
    "erank_absdev_mean": ("erank_absdev_mean", "erank_absdev_mean", "erank_absdev_mean", False),  # mean |ratio − 1|
    "erank_spread": ("erank_spread", "erank_spread", "erank_spread", False),  # max / min erank across the layers
    **{f"rob_{n}_s{s}": (f"rob_{n}_s{s}_paper", f"rob_{n}_s{s}", f"rob_{n}_s{s}", True) for n, s in CLAIM_CORRUPTIONS},
})
DETERMINISTIC_METRICS = ("params",)  # the same for every seed: one run is enough
CLAIM_KINDS = ("delta", "ratio", "contrast", "sd_ratio", "best", "tie", "at_most", "near_best", "spread")
DIRECTION_KINDS = ("delta", "ratio", "contrast", "sd_ratio", "best")  # judged against 0 and the paper's size
LOG_KINDS = ("ratio", "sd_ratio")  # judged on log ratios (a ratio's noise is multiplicative)
CONFIDENCE = 0.95  # two-sided, for direction claims; bounds and ties use one-sided tests at 1 - CONFIDENCE / 2 each
TIE_MARGINS = read_only({  # metric -> the difference a tie (or "near the best") tolerates, and why that size
    "acc": (0.5, "about 2x the paper's largest accuracy seed SD (0.23, Exp 5)"),
    "rob": (1.2, "2x the paper's largest robustness seed SD (0.60, Exp 5)"),
    "gap": (1.0, "the paper reports no gap SD; 1 pp, the size of its smallest gap claim (Exp 6: -1.3)"),
    "erank_dev": (5.0, "5 percentage points of deviation from d^beta"),
})
RATIO_TOLERANCE = read_only({  # metric -> relative band around the paper's ratio that still counts as its size
    "epoch_s": (0.10, "time depends on the GPU, driver and implementation beyond seed noise: a 10 % band"),
})
VERDICTS = ("reproduced", "same direction, smaller effect", "same direction, larger effect", "not reproduced",
            "inconclusive")
VERDICT_RULE = (
    "Verdict rule (seslib.verdict): each claim's statistic gets a t-based 95 % interval over seeds (paired by "
    "seed when every config in it ran the same seeds, Welch otherwise; ratios on the log scale; an SD ratio from the "
    "F distribution). With fewer than 2 seeds it is inconclusive. A direction claim (delta, ratio, contrast, SD "
    "ratio, best) is reproduced when the interval excludes 0 on the paper's side and holds the paper's value; same "
    "direction, smaller/larger effect when it excludes 0 on the paper's side but also the paper's value; not "
    "reproduced when it shows the opposite direction, or excludes the paper's value without showing its direction; "
    "inconclusive when it holds both 0 and the paper's value. A tie is judged by equivalence (two one-sided tests at "
    "5 %, i.e. the 90 % interval) against the metric's stated margin: reproduced when the 90 % interval lies within "
    "± margin, not reproduced when it lies wholly outside, inconclusive otherwise. A bound (at_most: value ≤ bound; "
    "spread: max − min ≤ bound; near_best: the best rival leads by at most the margin) is reproduced when the "
    "one-sided 95 % limit meets it, not reproduced when the opposite one-sided limit breaks it, inconclusive "
    "otherwise.")
_CLAIM_KEYS = {"text", "a", "b", "metric", "kind", "among", "paper", "margin", "terms", "source", "paper_sd"}


def check_claim(claim, grid, paper=None) -> dict:
    """A claim dict, checked against the grid when the notebook is loaded (not after training): names every
    config it needs that the grid lacks, an unknown metric or kind, a paper value it cannot find."""
    if not isinstance(claim, Mapping) or "text" not in claim or not (claim.get("a") or claim.get("terms")):
        raise ValueError(f"a claim is a dict with 'text' and 'a' (a config name) or 'terms'; got {claim!r}")
    c = {"b": None, "a": None, "metric": "acc", "kind": "delta", "among": None, "paper": None, "margin": None,
         "terms": None, "source": None, "paper_sd": None, **claim}
    bad = sorted(set(c) - _CLAIM_KEYS)
    if bad:
        raise ValueError(f"claim {c['text']!r}: unknown key(s) {bad}")
    if c["metric"] not in CLAIM_METRICS:
        raise ValueError(f"claim {c['text']!r}: unknown metric {c['metric']!r}; known: {', '.join(CLAIM_METRICS)}")
    if c["kind"] not in CLAIM_KINDS:
        raise ValueError(f"claim {c['text']!r}: unknown kind {c['kind']!r}; known: {', '.join(CLAIM_KINDS)}")
    _check_claim_shape(c, grid)
    if c["paper"] is None:
        c["paper"] = _paper_value(c, paper or {})
    if c["kind"] in DIRECTION_KINDS and not (_is_real(c["paper"]) and c["paper"] != (1 if c["kind"] in LOG_KINDS else 0)):
        raise ValueError(f"claim {c['text']!r}: a {c['kind']} claim needs the paper's nonzero effect; got "
                         f"{c['paper']!r} (a claim of no difference is a 'tie')")
    if c["kind"] in ("tie", "near_best") and c["margin"] is None:
        if c["metric"] not in TIE_MARGINS:
            raise ValueError(f"claim {c['text']!r}: no stated tie margin for {c['metric']!r}: give 'margin'")
        c["margin"] = TIE_MARGINS[c["metric"]][0]
    if c["paper_sd"] is None:  # the paper's seed SD, where it ran seeds (Exp 5/6: PAPER's "<key>_std")
        key = CLAIM_METRICS[c["metric"]][2] + "_std"
        sds = [(paper or {}).get(x, {}).get(key) for x in (c["a"], c["b"]) if x]
        c["paper_sd"] = max([v for v in sds if _is_real(v)], default=None)
    return c


def _check_claim_shape(c, grid):
    """The configs a claim of its kind needs, all in the grid."""
    if c["kind"] in ("delta", "ratio", "tie", "sd_ratio") and not (c["a"] and c["b"]):
        raise ValueError(f"claim {c['text']!r}: a {c['kind']} claim compares 'a' with 'b'")
    if c["kind"] == "contrast" or (c["kind"] == "at_most" and c["terms"] is not None):
        if not isinstance(c["terms"], Mapping) or not c["terms"] or not all(_is_real(w) for w in c["terms"].values()):
            raise ValueError(f"claim {c['text']!r}: a {c['kind']} claim on a contrast needs terms={{config: weight}}")
        c["terms"] = dict(c["terms"])
    elif not c["a"]:
        raise ValueError(f"claim {c['text']!r}: a {c['kind']} claim needs 'a'")
    if c["kind"] in ("best", "near_best", "spread"):
        c["among"] = list(c["among"] or grid)
    needed = [x for x in [c["a"], c["b"], *(c["among"] or []), *(c["terms"] or {})] if x]
    missing = [x for x in dict.fromkeys(needed) if x not in grid]
    if missing:
        raise ValueError(f"claim {c['text']!r} names config(s) {missing} that the grid lacks; grid: {list(grid)}")


def _paper_value(c, paper):
    """The paper's value of the claim's statistic, from the notebook's PAPER numbers."""
    key, higher = CLAIM_METRICS[c["metric"]][2], CLAIM_METRICS[c["metric"]][3]
    if c["kind"] == "sd_ratio":
        key += "_std"
    names = set([c["a"], c["b"], *(c["among"] or []), *(c["terms"] or {})]) - {None}
    val = {k: (paper.get(k) or {}).get(key) for k in names}
    try:
        if c["kind"] in ("delta", "tie"):
            return round(val[c["a"]] - val[c["b"]], 4)
        if c["kind"] in ("ratio", "sd_ratio"):
            return round(val[c["a"]] / val[c["b"]], 4)
        if c["terms"]:
            return round(sum(w * val[k] for k, w in c["terms"].items()), 4)
        if c["kind"] == "at_most":
            return round(val[c["a"]] - (val[c["b"]] if c["b"] else 0.0), 4)
        others = [val[x] for x in c["among"] if x != c["a"]]
        if c["kind"] in ("best", "near_best"):
            return round((val[c["a"]] - max(others)) if higher else (min(others) - val[c["a"]]), 4)
        return round(max(val.values()) - min(val.values()), 4)
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        raise ValueError(f"claim {c['text']!r}: the paper's {key} for {sorted(names)} is not in PAPER: give 'paper'") \
            from None


# ── intervals ──
# Why t and not 2 SE: with 2-3 seeds the SDs are themselves noisy; the t critical values are 4.3 (df 2) and 2.8
# (df 4), and a 2-SE rule calls a non-existent effect "reproduced" 6-9 % of the time instead of 2.5 %.

def _seed_values(df, config, col) -> dict:
    """{seed: value} of one config's runs (a seed run twice counts once, averaged)."""
    if col not in df or "seed" not in df:
        return {}
    sub = df.loc[df["config"] == config, ["seed", col]].dropna()
    return {s: float(v) for s, v in sub.groupby("seed")[col].mean().items()} if len(sub) else {}


def contrast_interval(values: dict, weights: dict, log=False, paired=True) -> dict:
    """The 95 % (and 90 %) t interval of sum_k weights[k] * mean(values[k]) over seeds.

    values: {config: {seed: value}}. Paired by seed (the per-seed contrast, df n - 1) when `paired` and every
    config ran the same >= 2 seeds; Welch-Satterthwaite otherwise. log: on log values (ratios), positive only."""
    vals = {k: {s: (math.log(v) if v > 0 else float("nan")) if log else v for s, v in values.get(k, {}).items()}
            for k in weights}
    vals = {k: {s: v for s, v in d.items() if v == v} for k, d in vals.items()}
    seeds = [set(d) for d in vals.values()]
    n = min(len(s) for s in seeds)
    if paired and n >= 2 and all(s == seeds[0] for s in seeds):
        per_seed = np.array([sum(w * vals[k][s] for k, w in weights.items()) for s in sorted(seeds[0])])
        est, se, dof = float(per_seed.mean()), float(per_seed.std(ddof=1) / math.sqrt(n)), n - 1
    else:
        paired = False
        est = sum(w * float(np.mean(list(vals[k].values()))) if vals[k] else float("nan") for k, w in weights.items())
        parts = [w * w * float(np.var(list(vals[k].values()), ddof=1)) / len(vals[k]) if len(vals[k]) > 1 else
                 float("nan") for k, w in weights.items()]
        se = math.sqrt(sum(parts))
        den = sum(p * p / (len(vals[k]) - 1) for p, k in zip(parts, weights) if len(vals[k]) > 1)
        dof = se ** 4 / den if den > 0 else float("inf")
    return _interval(est, se, dof, n, paired)


def _interval(est, se, dof, n, paired) -> dict:
    from scipy import stats
    out = {"est": est, "se": se, "dof": dof, "n": n, "paired": paired}
    for name, q in (("", 0.5 + CONFIDENCE / 2), ("90", CONFIDENCE)):  # 95 % two-sided; 90 % = one-sided 95 %
        half = float(stats.t.ppf(q, dof)) * se if n >= 2 and se > 0 else 0.0 if n >= 2 else float("nan")
        out["lo" + name], out["hi" + name] = est - half, est + half
    return out


def sd_ratio_interval(values_a: dict, values_b: dict) -> dict:
    """The interval of log(SD_a / SD_b) over seeds, from the F distribution (normal seed noise)."""
    from scipy import stats
    a, b = np.array(list(values_a.values())), np.array(list(values_b.values()))
    n = min(len(a), len(b))
    if n < 2 or a.std(ddof=1) == 0 or b.std(ddof=1) == 0:
        return _interval(float("nan"), float("nan"), float("nan"), n, False)
    f = a.var(ddof=1) / b.var(ddof=1)
    out = {"est": 0.5 * math.log(f), "se": float("nan"), "dof": (len(a) - 1, len(b) - 1), "n": n, "paired": False}
    for name, conf in (("", CONFIDENCE), ("90", 2 * CONFIDENCE - 1)):
        lo_q, hi_q = stats.f.ppf([(1 + conf) / 2, (1 - conf) / 2], len(a) - 1, len(b) - 1)
        out["lo" + name], out["hi" + name] = 0.5 * math.log(f / lo_q), 0.5 * math.log(f / hi_q)
    return out


# ── the verdict: one rule for every claim ──

def verdict(kind, iv, paper, margin=None, tol=0.0) -> str:
    """The verdict of one claim from its interval iv (contrast_interval; log scale for ratios, and then paper and
    tol on the log scale too), by VERDICT_RULE. margin: ties and near_best; tol: the band around the paper's value."""
    lo, hi, lo90, hi90 = iv["lo"], iv["hi"], iv["lo90"], iv["hi90"]
    if iv["n"] < 2 or lo != lo or hi != hi:
        return "inconclusive"
    if kind == "tie":
        return _bound_verdict(lo90 >= -margin and hi90 <= margin, lo90 > margin or hi90 < -margin)
    if kind in ("at_most", "spread"):
        return _bound_verdict(hi90 <= paper, lo90 > paper)
    if kind == "near_best":  # the statistic is a minus its best rival (>0: a leads); claim: >= -margin
        return _bound_verdict(lo90 >= -margin, hi90 < -margin)
    side = 1 if paper > 0 else -1
    shows = side * (lo if side > 0 else hi) > 0
    opposite = side * (hi if side > 0 else lo) < 0
    holds_paper = lo - tol <= paper <= hi + tol
    if shows and holds_paper:
        return "reproduced"
    if shows:
        return "same direction, larger effect" if abs(iv["est"]) > abs(paper) else "same direction, smaller effect"
    return "not reproduced" if opposite or not holds_paper else "inconclusive"


def _bound_verdict(holds, broken) -> str:
    return "reproduced" if holds else "not reproduced" if broken else "inconclusive"


def judge_claim(c, df, definition=0, paired=True) -> dict:
    """{est, lo, hi, n, verdict, ...} of one claim on our results (one row per run, a column per metric definition);
    definition 0: the paper's metric, 1: our headline. Ratios come back on the ratio scale (est, lo, hi)."""
    col, higher = CLAIM_METRICS[c["metric"]][definition], CLAIM_METRICS[c["metric"]][3]
    weights = _claim_weights(c, df, col, higher)
    if weights is None:
        iv = _interval(float("nan"), float("nan"), float("nan"), 0, False)
    elif c["kind"] == "sd_ratio":
        iv = sd_ratio_interval(_seed_values(df, c["a"], col), _seed_values(df, c["b"], col))
    else:
        iv = contrast_interval({k: _seed_values(df, k, col) for k in weights}, weights,
                               log=c["kind"] == "ratio", paired=paired)
    log = c["kind"] in LOG_KINDS
    paper = math.log(c["paper"]) if log else c["paper"]
    tol = math.log1p(RATIO_TOLERANCE[c["metric"]][0]) if log and c["metric"] in RATIO_TOLERANCE else 0.0
    if c["metric"] in DETERMINISTIC_METRICS and iv["n"] >= 1 and iv["est"] == iv["est"]:  # no seed noise to weigh
        iv = dict(iv, **{k: iv["est"] for k in ("lo", "hi", "lo90", "hi90")}, n=max(iv["n"], 2))
    out = dict(iv, verdict=verdict(c["kind"], iv, paper, c["margin"], tol), log=log)
    if log:
        out.update({k: math.exp(iv[k]) if iv[k] == iv[k] else iv[k] for k in ("est", "lo", "hi", "lo90", "hi90")})
    return out


def _claim_weights(c, df, col, higher):
    """{config: weight} of the claim's statistic; for best/near_best/spread the rival is chosen by our means."""
    if c["terms"]:
        return c["terms"]
    if c["kind"] in ("delta", "ratio", "tie", "sd_ratio") or (c["kind"] == "at_most" and c["b"]):
        return {c["a"]: 1.0, c["b"]: -1.0}
    if c["kind"] == "at_most":
        return {c["a"]: 1.0}
    means = {x: float(np.mean(list(v.values()))) for x in c["among"] if (v := _seed_values(df, x, col))}
    if c["kind"] == "spread":
        return {max(means, key=means.get): 1.0, min(means, key=means.get): -1.0} if len(means) > 1 else None
    others = {x: m for x, m in means.items() if x != c["a"]}
    if c["a"] not in means or not others:
        return None
    rival = (max if higher else min)(others, key=others.get)
    sign = 1.0 if higher else -1.0  # > 0: a beats its best rival
    return {c["a"]: sign, rival: -sign}


def claims_table(df, claims, paired=True):
    """One row per claim: the paper's value (and its seed SD where known), ours with its 95 % interval on the
    paper's metric definition and on our headline one, each with its verdict."""
    import pandas as pd
    rows = []
    for c in claims:
        p, h = judge_claim(c, df, 0, paired), judge_claim(c, df, 1, paired)
        cols = CLAIM_METRICS[c["metric"]]
        rows.append({"claim": c["text"], "kind": c["kind"], "configs": _claim_configs(c),
                     "metric (paper's / headline)": cols[0] if cols[0] == cols[1] else f"{cols[0]} / {cols[1]}",
                     "paper": _paper_text(c), "paper seed SD": c["paper_sd"],
                     "ours (paper's definition), 95 % interval": _interval_text(p),
                     "verdict": p["verdict"], "ours (headline), 95 % interval": _interval_text(h),
                     "verdict (headline)": h["verdict"], "seeds": p["n"],
                     "interval": "paired by seed" if p["paired"] else "Welch", "source": c["source"]})
    return pd.DataFrame(rows)


def _claim_configs(c):
    if c["terms"]:
        return " ".join(f"{'+' if w > 0 else '−'}{abs(w):g}·{k}" for k, w in c["terms"].items())
    if c["kind"] in ("best", "near_best"):
        return f"{c['a']} among {len(c['among'])}"
    if c["kind"] == "spread":
        return f"{len(c['among'])} configs"
    return " vs ".join(x for x in (c["a"], c["b"]) if x)


def _paper_text(c):
    if c["kind"] in LOG_KINDS:
        return f"×{c['paper']:.3g}"
    if c["kind"] == "tie":
        return f"{c['paper']:+.2f} (tie within ±{c['margin']:g})"
    if c["kind"] == "near_best":
        return f"{c['paper']:+.2f} (within {c['margin']:g} of the best)"
    return f"{c['paper']:+.2f}" if c["kind"] != "spread" and c["kind"] != "at_most" else f"≤ {c['paper']:g}"


def _interval_text(iv):
    if iv["est"] != iv["est"]:
        return "—"
    if iv.get("log"):
        ci = f" [{iv['lo']:.3g}, {iv['hi']:.3g}]" if iv["lo"] == iv["lo"] else ""
        return f"×{iv['est']:.3g}{ci}"
    ci = f" [{iv['lo']:+.2f}, {iv['hi']:+.2f}]" if iv["lo"] == iv["lo"] else ""
    return f"{iv['est']:+.2f}{ci}"


def chance_verdicts(n_judged, rate=1 - CONFIDENCE) -> str:
    """What chance alone gives: with no true effect anywhere, each judged claim reads 'reproduced' (or shows the
    opposite direction) with probability (1 - CONFIDENCE) / 2; over n claims, about n·rate of them one way or the other."""
    from scipy import stats
    hi = int(stats.binom.ppf(0.95, n_judged, rate / 2)) if n_judged else 0
    return (f"Chance alone: of the {n_judged} claims judged on ≥ 2 seeds, if SES had no effect at all about "
            f"{n_judged * rate / 2:.1f} would still read 'reproduced' (at most {hi} in 95 % of such suites), and as "
            f"many would show the opposite direction.")


# The claims that span notebooks (configs "NN_notebook/config"), judged by build_summary on each notebook's
# values.csv. Filled from the paper's text; see the README's coverage table.
def _ses_gain(notebook, config="ses", baseline="baseline"):
    """The (config, baseline) pair of another notebook's SES gain, as SUMMARY_CLAIMS name configs."""
    return f"{notebook}/{config}", f"{notebook}/{baseline}"


def _gain_difference(gain, other):
    """terms of (gain's config − its baseline) − (other's config − its baseline): a difference of SES gains."""
    return {gain[0]: 1, gain[1]: -1, other[0]: -1, other[1]: 1}


SUMMARY_CLAIMS = (
    dict(
        text="difficulty scaling of the gap (P1), step 1: SES's gap change CIFAR-10 (+0.01) -> CIFAR-100 (-0.33)",
        terms=_gain_difference(_ses_gain('06_multiseed_cifar100'),
                               _ses_gain('05_multiseed_cifar10')),
        metric='gap',
        kind='contrast',
        paper=-0.34,
        source="tex: Summary of Empirical Results ('0% on CIFAR-10, -1.3% on CIFAR-100, -6.1% on Tiny-"
               "ImageNet'); tab:multiseed, tab:cifar100",
    ),
    dict(
        text='difficulty scaling of the gap (P1), step 2: CIFAR-100 (-0.33) -> Tiny-ImageNet (-2.21)',
        terms=_gain_difference(_ses_gain('11_resnet50_tinyimagenet'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='gap',
        kind='contrast',
        paper=-1.88,
        source='resnet50_tinyimagenet_results.json: final_gap (-2.214); tex: tab:cifar100; Summary of Empirical '
               'Results',
    ),
    dict(
        text='difficulty scaling of accuracy, step 1: CIFAR-10 (-0.06) -> CIFAR-100 (+0.47)',
        terms=_gain_difference(_ses_gain('06_multiseed_cifar100'),
                               _ses_gain('05_multiseed_cifar10')),
        metric='acc',
        kind='contrast',
        paper=0.53,
        source="tex: Exp 6 text ('+0.47 pp accuracy vs -0.06 pp'); abstract; ses_context.md: trend table",
    ),
    dict(
        text='difficulty scaling of accuracy, step 2: CIFAR-100 (+0.47) -> Tiny-ImageNet (+2.58)',
        terms=_gain_difference(_ses_gain('11_resnet50_tinyimagenet'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='acc',
        kind='contrast',
        paper=2.11,
        source="resnet50_tinyimagenet_results.json: best_val_acc; tex: abstract ('scale monotonically with task "
               "difficulty'); Exp 11 difficulty table",
    ),
    dict(
        text='difficulty scaling of robustness, step 1: CIFAR-10 (+0.45) -> CIFAR-100 (+0.65)',
        terms=_gain_difference(_ses_gain('06_multiseed_cifar100'),
                               _ses_gain('05_multiseed_cifar10')),
        metric='rob',
        kind='contrast',
        paper=0.2,
        source="tex: Exp 6 text ('+0.65 pp robustness vs +0.45 pp'); abstract",
    ),
    dict(
        text='difficulty scaling of robustness, step 2: CIFAR-100 (+0.65) -> Tiny-ImageNet (+2.37)',
        terms=_gain_difference(_ses_gain('11_resnet50_tinyimagenet'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='rob',
        kind='contrast',
        paper=1.72,
        source='resnet50_tinyimagenet_results.json: rob_mean (2.367); tex: abstract; Exp 11 difficulty table',
    ),
    dict(
        text='CIFAR-100 overfits more than CIFAR-10 (baseline gap 25.60 vs 6.56)',
        a='06_multiseed_cifar100/baseline',
        b='05_multiseed_cifar10/baseline',
        metric='gap',
        kind='delta',
        paper=19.04,
        source="tex: Exp 6 text ('25.60 pp vs 6.56 pp on CIFAR-10')",
    ),
    dict(
        text='lambda = 0.05 beats the 3-seed CIFAR-10 baseline on robustness by +2.1 pp (70.32 vs 68.22)',
        a='07_lambda_ablation/lam_0.05',
        b='05_multiseed_cifar10/baseline',
        metric='rob',
        kind='delta',
        paper=2.1,
        source="tex: Exp 7 text ('a +2.1 pp improvement over the baseline (68.22%)'); ses_context.md: Exp 7",
    ),
    dict(
        text='CIFAR-100 is relatively easy for WRN-28-10 (baseline 75.24 vs 73.00 for ResNet-18)',
        a='13_wrn28_10/baseline',
        b='12_mixup_cutmix/baseline',
        metric='acc',
        kind='delta',
        paper=2.24,
        source='wrn_results.json / aug_results.json: best_acc; tex: Exp 13 text',
    ),
    dict(
        text='WRN-28-10 has 3.3x the parameters of ResNet-18 (36.5M vs 11M)',
        a='13_wrn28_10/baseline',
        b='12_mixup_cutmix/baseline',
        metric='params',
        kind='ratio',
        paper=3.3,
        source="tex: Exp 13 text ('36.5M parameters, 3.3x larger than ResNet-18')",
    ),
    dict(
        text="on WRN-28-10 SES's accuracy benefit disappears: gain -0.31 vs +0.47 for ResNet-18 on CIFAR-100",
        terms=_gain_difference(_ses_gain('13_wrn28_10'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='acc',
        kind='contrast',
        paper=-0.78,
        source="tex: Exp 11 difficulty table + text ('SES's accuracy benefit disappears (-0.31 pp)')",
    ),
    dict(
        text="ViT-Tiny's robustness gain exceeds ResNet-18's on CIFAR-100 (+1.31 vs +0.65)",
        terms=_gain_difference(_ses_gain('14_vit', 'vit_tiny_ses', 'vit_tiny_baseline'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='rob',
        kind='contrast',
        paper=0.66,
        source="vit_summary.json: rob_mean; tex: Exp 14 text ('notably larger than those observed for ResNet-18 "
               "on CIFAR-100 (+0.65 pp)')",
    ),
    dict(
        text="ViT-Small's robustness gain exceeds ResNet-18's on CIFAR-100 (+1.33 vs +0.65)",
        terms=_gain_difference(_ses_gain('14_vit', 'vit_small_ses', 'vit_small_baseline'),
                               _ses_gain('06_multiseed_cifar100')),
        metric='rob',
        kind='contrast',
        paper=0.68,
        source='vit_summary.json: rob_mean (1.334); tex: Exp 14 text',
    ),
    dict(
        text='beta = 0.5 on ViT-Small is the largest single-config gain of the paper (+2.66, above Tiny-'
             "ImageNet's +2.58)",
        terms=_gain_difference(_ses_gain('17_vit_ablations', 'beta_0.5', 'baseline'),
                               _ses_gain('11_resnet50_tinyimagenet')),
        metric='acc',
        kind='contrast',
        paper=0.08,
        source='vit_ablations_summary.json, resnet50_tinyimagenet_results.json: best acc; tex: '
               "abstract/Summary/Conclusion ('the largest single-configuration gain across all experiments'); "
               "contradicts Exp 11 'strongest SES effect observed across all experiments'",
    ),
    dict(
        text="Exp 18's triple SES (last 4, beta 0.5) matches Exp 17's beta = 0.5 on all 12 blocks (57.93 vs "
             '57.94)',
        a='18_vit_attention/triple_l4',
        b='17_vit_ablations/beta_0.5',
        metric='acc',
        kind='tie',
        paper=-0.01,
        margin=0.5,
        source="vit_attention_summary.json / vit_ablations_summary.json: best_acc; tex: Exp 18 text ('virtually "
               "identical'); ses_context.md: Exp 18 ('Triple (57.93%) ~ beta=0.5 All-12 (57.94%)')",
    ),
    dict(
        text='block output, last 4, beta 0.5 (57.31) is below beta 0.5 on all 12 blocks (57.94)',
        a='18_vit_attention/block_l4',
        b='17_vit_ablations/beta_0.5',
        metric='acc',
        kind='delta',
        paper=-0.63,
        source="vit_attention_summary.json / vit_ablations_summary.json: best_acc; ses_context.md: Exp 18 'Nota'",
    ),
    dict(
        text='block output, last 4, beta 0.5 (57.31) is below last 4 at beta 0.7 (57.61)',
        a='18_vit_attention/block_l4',
        b='17_vit_ablations/last4',
        metric='acc',
        kind='delta',
        paper=-0.3,
        source="vit_attention_summary.json / vit_ablations_summary.json: best_acc; ses_context.md: Exp 18 'Nota'",
    ),
)
SUMMARY_CLAIMS = tuple(read_only(c) for c in SUMMARY_CLAIMS)  # shared, so read-only


def claim_values(df):
    """The per-run numbers claims are judged on (config, seed, every CLAIM_METRICS column the runs have)."""
    cols = ["config", "seed"] + [c for c in dict.fromkeys(x for m in CLAIM_METRICS.values() for x in m[:2]) if c in df]
    return df[[c for c in cols if c in df]].copy()


_PAIR_KINDS = ("delta", "ratio", "tie")  # claim kinds that compare config a with config b


def claim_baselines(claims) -> dict:
    """{a: b} from a notebook's claims: a config's baseline is the b of the first delta / ratio / tie claim (kind
    missing: delta) that names it as a. The report's Δ and overhead columns then compare the pairs the claims compare
    (SES + Mixup vs Mixup, ViT-Small SES vs ViT-Small baseline), not every config with "baseline". A b of another
    notebook ("NN_notebook/config") is not this report's. A config named as a baseline ("baseline", "*_baseline") gets
    no pair (it is the reference, even when a claim compares two baselines), and a pair with a baseline-named b wins
    over an earlier one (beta_0.7 vs baseline, not beta_0.7 vs beta_0.9)."""
    pairs = {}
    for c in claims or ():
        a, b = c.get("a"), c.get("b")
        if not ((c.get("kind") or "delta") in _PAIR_KINDS and a and b and a != b and "/" not in str(b)):
            continue
        if _is_baseline_name(a) or (a in pairs and _is_baseline_name(pairs[a])):
            continue
        if a not in pairs or _is_baseline_name(b):
            pairs[a] = b
    return pairs


def _is_baseline_name(config):
    return config == "baseline" or str(config).endswith("_baseline")


# ── tables ───────────────────────────────────────────────────────────────────────────────────────

def _fmt(mean, std, n):
    if mean != mean:  # NaN
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def _stats(df, config, col):
    """(mean, sd, n) of one config's runs in column col, NaNs left out: the per-config table's cells."""
    v = df.loc[df["config"] == config, col].astype(float).dropna()
    return float(v.mean()) if len(v) else float("nan"), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def rob_label(df) -> str:
    """What the standard robustness column really averages, read off the results ("15×5 mean" only when it is)."""
    robs = [r.get("final", {}).get("robustness") for r in df["result"]] if len(df) else []
    robs = [r for r in robs if r]
    if not robs:
        return "rob (standard)"
    nc = {len(r.get("corruptions", [])) for r in robs}
    ns = {len(r.get("severities", [])) for r in robs}
    ni = {r.get("n_images") for r in robs}
    txt = "/".join(map(str, sorted(nc))) + "×" + "/".join(map(str, sorted(ns)))
    return f"rob ({txt} mean, {'/'.join(str(n) for n in sorted(ni))} images)"


def _memory_cells(st, p) -> dict:
    """The cost table's memory columns, for GPU runs or where the paper states its VRAM: the measured peak
    (max_memory_allocated), estimate_memory's figure made at the run's start, the paper's vram_peak_gb; decimal GB."""
    cells = {"peak mem GB": st["peak_mem_gb"][0], "est. peak GB": st["peak_mem_est_gb"][0]}
    cells = {k: round(v, 2) if v == v else None for k, v in cells.items()}
    if "vram_gb" not in p and all(v is None for v in cells.values()):
        return {}
    return {**cells, "paper VRAM GB": p.get("vram_gb")}


def summary_table(df, paper=None, order=None, baseline="baseline", baseline_of=None, paper_gpu=None, claims=None):
    """Per config: ours (mean ± sd over seeds, n) on both metric definitions beside the paper's numbers, the Δ vs
    the config's baseline (ours on both definitions, the paper's), robustness on both protocols, time and memory.
    A config's baseline: baseline_of[config], else the b its claims compare it with (claim_baselines), else
    `baseline` (when that config has results)."""
    import pandas as pd
    paper, baseline_of = paper or {}, {**claim_baselines(claims), **(baseline_of or {})}
    if df.empty:
        return pd.DataFrame()
    configs = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in set(df["config"])]
    rl = rob_label(df)
    rows = []
    for c in configs:
        st = {k: _stats(df, c, k) for k in ("acc_final", "acc_best", "gap", "rob", "rob_paper", "rob_paper_best",
                                            "train_s", "eval_s", "peak_mem_gb", "peak_mem_est_gb")}
        n = st["acc_final"][2]
        p = paper.get(c, {})
        b = baseline_of.get(c, baseline)
        row = {"config": c, "seeds": n,
               "acc (final epoch)": _fmt(*st["acc_final"]), "acc (best epoch, test-selected)": _fmt(*st["acc_best"]),
               "paper acc (best epoch)": p.get("acc"),
               "gap": _fmt(*st["gap"]), "paper gap": p.get("gap"),
               rl: _fmt(*st["rob"]), "rob paper protocol (final)": _fmt(*st["rob_paper"]),
               "rob paper protocol (test-selected, as the paper)": _fmt(*st["rob_paper_best"]),
               "paper rob": p.get("rob"),
               # time = the training loop alone (the author's avg_epoch_time); evaluation + erank passes apart
               "s/epoch": round(st["train_s"][0], 1) if st["train_s"][0] == st["train_s"][0] else None,
               "paper s/epoch": p.get("epoch_s"),
               "eval s/epoch": round(st["eval_s"][0], 1) if st["eval_s"][0] == st["eval_s"][0] else None}
        row.update(_memory_cells(st, p))
        if b != c and b in set(df["config"]):
            bs = {k: _stats(df, b, k)[0] for k in st}
            pb = paper.get(b, {})

            def pd_(k):
                return round(p[k] - pb[k], 2) if p.get(k) is not None and pb.get(k) is not None else None
            row.update({"vs": b, "Δ acc final": round(st["acc_final"][0] - bs["acc_final"], 2),
                        "Δ acc best": round(st["acc_best"][0] - bs["acc_best"], 2), "paper Δ acc": pd_("acc"),
                        "Δ gap": round(st["gap"][0] - bs["gap"], 2), "paper Δ gap": pd_("gap"),
                        "Δ rob": round(st["rob"][0] - bs["rob"], 2),
                        "Δ rob paper (test-selected)": round(st["rob_paper_best"][0] - bs["rob_paper_best"], 2),
                        "paper Δ rob": pd_("rob")})
            mr, mb = _seed_mean_rob(df, c), _seed_mean_rob(df, b)
            if mr and mb:  # Hendrycks & Dietterich's mCE, normalised by this config's baseline (no AlexNet run here)
                ce = corruption_error_vs_baseline(mr, mb)
                row.update({"mCE vs baseline %": round(ce["mce"], 1), "relative mCE %": round(ce["relative_mce"], 1)})
            if st["train_s"][0] == st["train_s"][0] and bs["train_s"] == bs["train_s"] and bs["train_s"]:
                row["SES overhead %"] = round(100 * (st["train_s"][0] / bs["train_s"] - 1), 1)
            if p.get("epoch_s") and pb.get("epoch_s"):
                row["paper overhead %"] = round(100 * (p["epoch_s"] / pb["epoch_s"] - 1), 1)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("config")
    gpus = sorted({g for g in df["device_name"] if g})
    table.attrs["devices"] = ", ".join(gpus)
    table.attrs["paper_gpu"] = paper_gpu
    return table


def _seed_mean_rob(df, config):
    """The standard-protocol robustness of a config averaged over its seeds (accuracy[c][s], clean_acc), or None."""
    robs = [r["final"].get("robustness") for r in df.loc[df["config"] == config, "result"]]
    robs = [r for r in robs if r and r.get("accuracy")]
    if not robs:
        return None
    acc = {n: {s: float(np.mean([r["accuracy"][n][s] for r in robs if s in r["accuracy"].get(n, {})]))
               for s in robs[0]["accuracy"][n]} for n in robs[0]["accuracy"]}
    return {"accuracy": acc, "clean_acc": float(np.mean([r["clean_acc"] for r in robs]))}


_TABLE_GROUPS = {  # report.md shows the wide table as three readable ones
    "accuracy and gap": ("seeds", "acc (final epoch)", "acc (best epoch, test-selected)", "paper acc (best epoch)",
                         "vs", "Δ acc final", "Δ acc best", "paper Δ acc", "gap", "paper gap", "Δ gap", "paper Δ gap"),
    "robustness": ("seeds", "rob (", "rob paper protocol (final)", "rob paper protocol (test-selected, as the paper)",
                   "paper rob", "vs", "Δ rob", "Δ rob paper (test-selected)", "paper Δ rob", "mCE vs baseline %",
                   "relative mCE %"),
    "cost": ("seeds", "s/epoch", "paper s/epoch", "eval s/epoch", "vs", "SES overhead %", "paper overhead %",
             "peak mem GB", "est. peak GB", "paper VRAM GB"),
}


def _split_table(table):
    out = {}
    for name, cols in _TABLE_GROUPS.items():
        keep = [c for c in table.columns if any(c == k or (k.endswith("(") and c.startswith(k)) for k in cols)]
        if len(keep) > 1:
            out[name] = table[keep]
    return out or {"results": table}


def _markdown(table) -> str:
    cols = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        cells = ["—" if v is None or (isinstance(v, float) and v != v) else str(v) for v in row.tolist()]
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Report:
    """A notebook's report: title, tables, claim verdicts, the results left out. Shown as HTML in notebooks."""
    title: str
    table: object  # the wide per-config table (report.csv)
    claims: object  # claims_table (claims.csv)
    left_out: list
    figures: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    values: object = None  # one row per run: config, seed and every claim metric (values.csv, for SUMMARY_CLAIMS)

    def markdown(self) -> str:
        parts = [f"# {self.title}\n"] + [f"{n}\n" for n in self.notes]
        for name, t in _split_table(self.table).items():
            parts.append(f"## {name}\n\n{_markdown(t)}")
        if self.claims is not None and len(self.claims):
            parts.append(f"## the paper's claims\n\n{_markdown(self.claims.set_index('claim'))}\n{VERDICT_RULE}\n")
        if self.left_out:
            parts.append("## left out (made with other settings)\n\n" + "".join(f"- {d}: {why}\n" for d, why in self.left_out))
        if self.figures:
            parts.append("## figures\n\n" + "".join(f"![{Path(f).stem}](figures/{Path(f).name})\n" for f in self.figures))
        return "\n".join(parts)

    def _repr_html_(self):
        html = [f"<h3>{self.title}</h3>"] + [f"<p>{n}</p>" for n in self.notes]
        for name, t in _split_table(self.table).items():
            html.append(f"<h4>{name}</h4>" + t.to_html(na_rep="—"))
        if self.claims is not None and len(self.claims):
            html.append("<h4>the paper's claims</h4>" + self.claims.to_html(index=False, na_rep="—")
                        + f"<p><small>{VERDICT_RULE}</small></p>")
        if self.left_out:
            html.append("<h4>left out (made with other settings)</h4><ul>"
                        + "".join(f"<li>{d}: {why}</li>" for d, why in self.left_out) + "</ul>")
        return "\n".join(html)

    def __repr__(self):
        return self.markdown()


def report_title(plan, df) -> str:
    cfg = next(iter(plan.resolved.values()), {}) if plan.resolved else {}
    seeds = sorted({int(s) for s in df["seed"]}) if len(df) else plan.seeds
    e = cfg.get("epochs", "?")
    return (f"{plan.name or Path(plan.out_dir).name}: preset {plan.preset}, {e} epoch{'s' if e != 1 else ''}, "
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds}")


def write_report(rep: Report, out_dir):
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "report.md", rep.markdown().encode())
    atomic_write_bytes(out_dir / "report.csv", rep.table.to_csv().encode())
    claims = rep.claims if rep.claims is not None else None
    if claims is not None and len(claims):
        atomic_write_bytes(out_dir / "claims.csv", claims.assign(report=rep.title).to_csv(index=False).encode())
    else:
        (out_dir / "claims.csv").unlink(missing_ok=True)
    if rep.values is not None:
        atomic_write_bytes(out_dir / "values.csv", rep.values.to_csv(index=False).encode())


def _history_frame(df):
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        for h in r["result"].get("history", []):
            rows.append({"config": r["config"], "seed": r["seed"], **{k: v for k, v in h.items() if not isinstance(v, dict)}})
    return pd.DataFrame(rows)


def config_palette(configs) -> dict:
    """{config: colour} in first-seen order: every panel of a figure draws a config in the same colour, whatever
    configs have values there (the baseline has no SES term)."""
    import seaborn as sns
    order = list(dict.fromkeys(configs))
    return dict(zip(order, sns.color_palette(n_colors=len(order))))


def _palette_legend(fig, palette, ncol=7, line=False):
    """One legend below the axes with every config of the palette, drawn as lines or bar patches."""
    import matplotlib.pyplot as plt
    handles = [plt.Line2D([], [], color=c) if line else plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    fig.legend(handles, list(palette), loc="lower center", ncol=min(ncol, len(palette)), fontsize=8, frameon=False)


def _label_bars(ax, fmt="%.1f"):
    """The value on every bar, and a bar of height 0 drawn as a thick line at 0 in its colour: otherwise it is
    invisible, and a series of zeros looks like a missing one."""
    for bars in ax.containers:
        ax.bar_label(bars, fmt=fmt, fontsize=6, padding=1)
        for bar in bars:
            if bar.get_height() == 0:
                ax.plot([bar.get_x(), bar.get_x() + bar.get_width()], [0, 0], color=bar.get_facecolor(), lw=4,
                        solid_capstyle="butt", clip_on=False)


def fig_bars(df, out_dir, paper=None, order=None, name="bars", show=True):
    """Accuracy, gap and robustness per config (mean ± sd over seeds): ours on our headline definition, ours on
    the paper's definition, and the paper's number; the legend sits below the axes, never on a bar."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    paper = paper or {}
    order = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in set(df["config"])]
    panels = {  # metric -> [(column, series name)], the paper's key
        "test accuracy (%)": ([("acc_final", "ours: final epoch"), ("acc_best", "ours: best epoch (test-selected)")], "acc"),
        "train − test gap (pp)": ([("gap", "ours: final epoch")], "gap"),
        "corruption accuracy (%)": ([("rob", "ours: standard 15×5"),
                                     ("rob_paper_best", "ours: paper protocol, test-selected")], "rob"),
    }
    width = min(MAX_FIG_INCHES, max(9, 1.1 * len(order) * 3))
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.4))
    for ax, (title, (series, pkey)) in zip(axes, panels.items()):
        long = pd.concat([df[["config", col]].rename(columns={col: "value"}).assign(series=lab) for col, lab in series]
                         + [pd.DataFrame([{"config": c, "value": paper[c][pkey], "series": "paper"}
                                          for c in order if (paper.get(c) or {}).get(pkey) is not None])],
                         ignore_index=True).dropna(subset=["value"])
        if not long.empty:
            sns.barplot(data=long, x="config", y="value", hue="series", order=order, ax=ax, errorbar="sd",
                        hue_order=[h for h in [lab for _, lab in series] + ["paper"] if h in set(long["series"])])
            _label_bars(ax)
            lo, hi = long["value"].min(), long["value"].max()
            if pkey != "gap" and hi > 0:  # zoomed in to show differences of a point: the title says so
                ax.set_ylim(max(0, lo - 0.15 * (hi - lo) - 1), hi + 0.1 * (hi - lo) + 1)
            elif pkey != "gap":  # every bar 0: an axis of 0..1 rather than ±0.04 around nothing
                ax.set_ylim(0, 1)
        bottom = ax.get_ylim()[0]
        ax.set_title(title + (f"\naxis from {bottom:.0f}, not 0" if pkey != "gap" and bottom > 0.5 else ""),
                     fontsize=10)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(axis="x", rotation=40, labelsize=8)
        handles, labels = ax.get_legend_handles_labels()
        if ax.get_legend():
            ax.get_legend().remove()
        if handles:
            ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), frameon=False)
    return _save(fig, out_dir, name, show)


def fig_glue(df, out_dir, paper=None, order=None, name="glue", show=True):
    """Exp 22 as the author's figures show it, one column per GLUE task: dev accuracy (ours at the final epoch, ours at
    the best epoch as the author's best_val_acc, the paper's) and the train − dev gap (ours, the paper's) of each
    variant (the config name after the task: baseline, ses_l4, ses_all), mean ± sd over seeds."""
    import matplotlib.pyplot as plt
    tasks = {r["config"]: r["result"]["config"].get("task", "?") for _, r in df.iterrows()}
    order = [c for c in (order or list(dict.fromkeys(df["config"]))) if c in tasks]
    columns = list(dict.fromkeys(tasks[c] for c in order))
    rows = (("dev accuracy (%)", [("acc_final", "ours: final epoch"),
                                  ("acc_best", "ours: best epoch (dev-selected, as the paper)")], "acc"),
            ("train − dev gap (pp)", [("gap", "ours: final epoch")], "gap"))
    fig, axes = plt.subplots(2, len(columns), figsize=(min(MAX_FIG_INCHES, 5.2 * len(columns) + 1), 8.5),
                             squeeze=False)
    for j, task in enumerate(columns):
        configs = [c for c in order if tasks[c] == task]
        for i, (title, series, pkey) in enumerate(rows):
            ax = axes[i][j]
            _glue_panel(ax, df, configs, series, paper or {}, pkey, task)
            ax.set_title(f"{GLUE_TASKS.get(task, {}).get('name', task)}: {title}" + (
                f"\naxis from {ax.get_ylim()[0]:.0f}, not 0" if pkey == "acc" and ax.get_ylim()[0] > 0.5 else ""),
                fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, name, show)


def _glue_panel(ax, df, configs, series, paper, pkey, task):
    """One fig_glue panel: bars per variant (x) and series (hue), the paper's beside ours, values on the bars."""
    import pandas as pd
    import seaborn as sns
    label = {c: c[len(task) + 1:] if c.startswith(f"{task}_") else c for c in configs}
    sub = df[df["config"].isin(configs)]
    long = pd.concat([sub[["config", col]].rename(columns={col: "value"}).assign(series=lab) for col, lab in series]
                     + [pd.DataFrame([{"config": c, "value": paper[c][pkey], "series": "paper"}
                                      for c in configs if (paper.get(c) or {}).get(pkey) is not None])],
                     ignore_index=True).dropna(subset=["value"])
    if long.empty:
        return
    long["variant"] = long["config"].map(label)
    names = [lab for _, lab in series] + ["paper"]
    colours = dict(zip(["ours: final epoch", "ours: best epoch (dev-selected, as the paper)", "paper"],
                       sns.color_palette(n_colors=3)))  # one colour per series in every panel
    sns.barplot(data=long, x="variant", y="value", hue="series", order=[label[c] for c in configs], ax=ax,
                errorbar="sd", hue_order=[h for h in names if h in set(long["series"])], palette=colours)
    _label_bars(ax, "%.2f")
    lo, hi = long["value"].min(), long["value"].max()
    if pkey == "acc" and hi > 0:  # zoomed in to show differences of a fraction of a point: the title says so
        ax.set_ylim(max(0, lo - 0.3 * (hi - lo) - 1), hi + 0.15 * (hi - lo) + 0.5)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False, ncol=2)


def fig_curves(df, out_dir, name="curves", metrics=("test_acc", "train_loss", "gap"), log=(), show=True):
    """Per-epoch curves per config (mean over seeds, shaded sd); metrics named in `log` on a log scale."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    hist = _history_frame(df)
    metrics = [m for m in metrics if m in hist.columns and hist[m].notna().any()]
    if hist.empty or not metrics:
        return None
    titles = {"ses_term": "SES term λ·Σ(H−β log d)² (as in the loss)", "train_loss_total": "train loss incl. SES term",
              "ses_loss": "Σ(H−β log d)² (λ not applied)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(min(MAX_FIG_INCHES, 4.3 * len(metrics)), 3.8), squeeze=False)
    palette = config_palette(hist["config"])  # a config keeps its colour in a panel where another has no values
    for ax, m in zip(axes[0], metrics):
        sns.lineplot(data=hist.dropna(subset=[m]), x="epoch", y=m, hue="config", palette=palette, ax=ax,
                     errorbar="sd", marker="o" if hist["epoch"].nunique() < 5 else None, legend=False)
        ax.set_title(titles.get(m, m.replace("_", " ")), fontsize=10)
        if m in log:
            ax.set_yscale("log")
    _palette_legend(fig, palette, line=True)
    fig.subplots_adjust(bottom=0.25)
    return _save(fig, out_dir, name, show)


def fig_erank(df, out_dir, name="erank", show=True):
    """Per-layer effective rank over epochs relative to its target d^β (1 = on target), measured two ways, each
    against its own target line: as SES sees it (training batch size, train mode) and as the SES author measured
    it (2048 test images, eval mode). erank grows with the number of samples: only the first compares with the
    target SES pulls towards."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns
    views = {"erank": "as SES sees it (train mode, {n} train images per batch)",
             "erank_author": "as the author measured it (eval mode, {n} test images)"}
    rows = []
    for _, r in df.iterrows():
        for h in r["result"].get("history", []):
            for view in views:
                for layer, st in (h.get(view) or {}).items():
                    rows.append({"config": r["config"], "epoch": h["epoch"], "layer": layer, "ratio": st["ratio"],
                                 "view": view, "n": st.get("samples")})
    if not rows:
        return None
    er = pd.DataFrame(rows)
    configs, present = list(dict.fromkeys(er["config"])), [v for v in views if v in set(er["view"])]
    fig, axes = plt.subplots(len(present), len(configs), figsize=(min(MAX_FIG_INCHES, 3.6 * len(configs) + 1.5),
                                                                  3.2 * len(present)), squeeze=False, sharey="row")
    for i, view in enumerate(present):
        for j, c in enumerate(configs):
            sub = er[(er["config"] == c) & (er["view"] == view)]
            ax = axes[i][j]
            sns.lineplot(data=sub, x="epoch", y="ratio", hue="layer", ax=ax, errorbar=None, legend=j == len(configs) - 1,
                         marker="o" if er["epoch"].nunique() < 5 else None)
            ax.axhline(1.0, color="k", ls="--", lw=1, label="target d^β")
            n = sub["n"].dropna().iloc[0] if sub["n"].notna().any() else "?"
            ax.set_title(f"{c}: erank / d^β\n" + views[view].format(n=int(n) if n != "?" else n), fontsize=8)
        if axes[i][-1].get_legend():
            axes[i][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, out_dir, name, show)


def _per_corruption_frame(df):
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        rob = r["result"].get("final", {}).get("robustness") or {}
        for corr, acc in (rob.get("per_corruption") or {}).items():
            rows.append({"config": r["config"], "seed": r["seed"], "corruption": corr, "acc": acc})
    return pd.DataFrame(rows)


def fig_per_corruption(df, out_dir, order=None, name="per_corruption", show=True):
    """Accuracy per corruption (mean over severities and seeds), one small panel per corruption (wrapped five
    to a row), so the figure stays readable for any number of configs."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    pc = _per_corruption_frame(df)
    if pc.empty:
        return None
    order = [c for c in (order or list(dict.fromkeys(pc["config"]))) if c in set(pc["config"])]
    corrs = list(dict.fromkeys(pc["corruption"]))
    ncol = min(5, len(corrs))
    nrow = -(-len(corrs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 2.9 * ncol), 2.4 * nrow + 0.8), squeeze=False,
                             sharey=True)
    palette = config_palette(order)
    top = max(1.0, float(pc.groupby(["corruption", "config"])["acc"].mean().max()))
    for ax, corr in zip(axes.flat, corrs):
        sub = pc[pc["corruption"] == corr]
        sns.barplot(data=sub, x="config", y="acc", hue="config", order=order, hue_order=order, palette=palette,
                    ax=ax, errorbar=None, legend=False)
        _label_bars(ax, "%.0f")
        ax.set_ylim(0, top * 1.15)  # accuracy from 0; an all-zero panel keeps a readable axis
        ax.set_title(corr.replace("_", " "), fontsize=9)
        ax.set_xticks([])
        ax.set_xlabel("")
        ax.set_ylabel("acc (%)", fontsize=8)
    for ax in list(axes.flat)[len(corrs):]:
        ax.axis("off")
    _palette_legend(fig, palette)
    fig.suptitle("accuracy per corruption (mean over severities), standard protocol", fontsize=10)
    return _save(fig, out_dir, name, show)


def fig_pareto(df, out_dir, name="pareto", show=True):
    """Accuracy and robustness against epoch time, the training loop alone as the paper's (Exp 10's
    overhead/benefit trade-off)."""
    import matplotlib.pyplot as plt
    agg = df.groupby("config", sort=False)[["acc_final", "rob", "train_s"]].mean()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, m, label in ((axes[0], "acc_final", "test accuracy, final epoch (%)"), (axes[1], "rob", "corruption accuracy (%)")):
        ax.scatter(agg["train_s"], agg[m])
        for c, row in agg.iterrows():
            ax.annotate(c, (row["train_s"], row[m]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("seconds per epoch (training loop)")
        ax.set_ylabel(label)
    return _save(fig, out_dir, name, show)


def fig_beta(df, out_dir, name="beta_schedules", show=True):
    """The beta each config used per epoch beside its test accuracy (Exp 16)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    hist = _history_frame(df)
    if hist.empty or "beta" not in hist.columns:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    palette = config_palette(hist["config"])  # the baseline has no β: the same colours in both panels all the same
    sns.lineplot(data=hist.dropna(subset=["beta"]), x="epoch", y="beta", hue="config", palette=palette, ax=axes[0],
                 errorbar=None, legend=False)
    sns.lineplot(data=hist, x="epoch", y="test_acc", hue="config", palette=palette, ax=axes[1], errorbar=None,
                 legend=False)
    axes[0].set_title("β schedule")
    axes[1].set_title("test accuracy")
    _palette_legend(fig, palette, line=True)
    fig.subplots_adjust(bottom=0.25)
    return _save(fig, out_dir, name, show)


def fig_dynamics(df, out_dir, name="dynamics", show=True):
    """Exp 1's four panels: accuracy, the training loss including the SES term (log), the SES term as it enters
    the loss (λ applied, log: the paper's ~0.5 -> ~0.003 scale), and the gap."""
    return fig_curves(df, out_dir, name, metrics=("test_acc", "train_loss_total", "ses_term", "gap"),
                      log=("train_loss_total", "ses_term"), show=show)


# ── Exp 28's figures: erank as the author measured it (erank_author: eval mode, the first 2048 test images) ──

def _erank_frame(df, view="erank_author"):
    """One row per (run, epoch, layer) of a per-epoch erank view: config, seed, model, epoch, layer, its position
    among the run's layers, erank, d, target d^β, ratio, samples."""
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        model = (r["result"].get("config") or {}).get("model", "?")
        for h in r["result"].get("history", []):
            for i, (layer, st) in enumerate((h.get(view) or {}).items()):
                rows.append({"config": r["config"], "seed": r["seed"], "model": model, "epoch": h["epoch"],
                             "layer": layer, "pos": i, "erank": st["erank"], "d": st["d"], "target": st["target"],
                             "ratio": st["ratio"], "samples": st.get("samples")})
    return pd.DataFrame(rows)


def _last_epoch(er):
    """The rows of each run's last epoch."""
    return er[er["epoch"] == er.groupby(["config", "seed"])["epoch"].transform("max")]


def _paper_layers(paper, config) -> list:
    """The paper's final-epoch layers of a config, in order ([] without the author's file: the typed copy has none)."""
    return list(((paper or {}).get(config) or {}).get("erank_layers", {}).values())


def fig_erank_dynamics(df, out_dir, name="erank_dynamics", show=True):
    """Exp 28's dynamics panels: each layer's effective rank over the epochs (mean over seeds), one panel per config,
    with its target d^β as a dashed line of the same colour; two configs to a row (baseline beside SES)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    er = _erank_frame(df)
    if er.empty:
        return None
    configs = list(dict.fromkeys(er["config"]))
    ncol = min(2, len(configs))
    nrow = -(-len(configs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 6 * ncol + 2), 3.3 * nrow), squeeze=False,
                             sharey="row")
    for k, (ax, c) in enumerate(zip(axes.flat, configs)):
        sub = er[er["config"] == c]
        layers = list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        for colour, layer in zip(sns.color_palette("viridis", len(layers)), layers):
            curve = sub[sub["layer"] == layer].groupby("epoch")[["erank", "target", "d"]].mean()
            ax.plot(curve.index, curve["erank"], color=colour, lw=1.4, label=f"{layer} (d={int(curve['d'].iloc[0])})",
                    marker="o" if len(curve) < 5 else None)
            ax.axhline(curve["target"].iloc[-1], color=colour, ls="--", lw=0.8, alpha=0.7)
        ax.set_title(f"{c}: erank per layer (dashed: its target d^β)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("effective rank")
        if k % ncol == ncol - 1 or k == len(configs) - 1:  # one legend per row, right of it
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for ax in list(axes.flat)[len(configs):]:
        ax.axis("off")
    n = er["samples"].dropna()
    fig.suptitle(f"as the author measured it: eval mode, {int(n.iloc[0]) if len(n) else '?'} test images",
                 fontsize=9)
    return _save(fig, out_dir, name, show)


def fig_erank_final(df, out_dir, paper=None, order=None, name="erank_final", show=True):
    """Exp 28's final-epoch bars: erank / d^β per layer (1 = on target), the configs of one model side by side (mean
    ± sd over seeds), one panel per model; the paper's ratios as black stars where its files were read."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    er = _erank_frame(df)
    if er.empty:
        return None
    fin = _last_epoch(er)
    models = list(dict.fromkeys(fin["model"]))
    palette = config_palette([c for c in (order or []) if c in set(fin["config"])] + list(fin["config"]))
    fig, axes = plt.subplots(len(models), 1, figsize=(min(MAX_FIG_INCHES, 11), 3.4 * len(models)), squeeze=False)
    for ax, m in zip(axes[:, 0], models):
        sub = fin[fin["model"] == m]
        configs, layers = list(dict.fromkeys(sub["config"])), list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        sns.barplot(data=sub, x="layer", y="ratio", hue="config", order=layers, hue_order=configs, palette=palette,
                    errorbar="sd", ax=ax)
        for k, c in enumerate(configs):  # the hue's bar centres: seaborn dodges the configs over 0.8 of a slot
            ours = _paper_layers(paper, c)
            if len(ours) == len(layers):
                xs = [i - 0.4 + 0.8 * (k + 0.5) / len(configs) for i in range(len(layers))]
                ax.scatter(xs, [p["ratio"] for p in ours], marker="*", color="k", s=40, zorder=5,
                           label="paper" if k == 0 else None)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="target (ratio 1)")
        means = ", ".join(f"{c} {sub[sub['config'] == c].groupby('seed')['ratio'].mean().mean():.2f}" for c in configs)
        ax.set_title(f"{m}: erank / d^β at the last epoch; mean over the layers: {means}", fontsize=9)
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=40, labelsize=7)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out_dir, name, show)


def fig_erank_spread(df, out_dir, paper=None, order=None, name="erank_spread", show=True):
    """Exp 28's spread across blocks: each layer's erank at the last epoch in depth order (mean over seeds), one line
    per config, the paper's dashed where its files were read, the targets d^β in black; max / min in the legend."""
    import matplotlib.pyplot as plt
    er = _erank_frame(df)
    if er.empty:
        return None
    fin = _last_epoch(er)
    models = list(dict.fromkeys(fin["model"]))
    palette = config_palette([c for c in (order or []) if c in set(fin["config"])] + list(fin["config"]))
    fig, axes = plt.subplots(1, len(models), figsize=(min(MAX_FIG_INCHES, 6 * len(models) + 1), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        sub = fin[fin["model"] == m]
        for c in dict.fromkeys(sub["config"]):
            line = sub[sub["config"] == c].groupby("pos")[["erank", "target"]].mean()
            ax.plot(line.index, line["erank"], "o-", color=palette[c], ms=3,
                    label=f"{c}: {line['erank'].max() / line['erank'].min():.1f}×")
            theirs = _paper_layers(paper, c)
            if len(theirs) == len(line):
                e = [p["erank"] for p in theirs]
                ax.plot(line.index, e, "x--", color=palette[c], ms=4, lw=1, label=f"paper: {max(e) / min(e):.1f}×")
        ax.plot(line.index, line["target"], "k:", lw=1.2, label="target d^β")
        layers = list(dict.fromkeys(sub.sort_values("pos")["layer"]))
        ax.set_xticks(range(len(layers)), layers, rotation=40, fontsize=7)
        ax.set_title(f"{m}: erank across the layers at the last epoch (spread max / min)", fontsize=9)
        ax.set_ylabel("effective rank")
        ax.legend(fontsize=7)
    return _save(fig, out_dir, name, show)


FIGURES = read_only({"bars": fig_bars, "curves": fig_curves, "dynamics": fig_dynamics, "erank": fig_erank,
                     "per_corruption": fig_per_corruption, "pareto": fig_pareto, "beta": fig_beta, "toy": fig_toy,
                     "erank_dynamics": fig_erank_dynamics, "erank_final": fig_erank_final,
                     "erank_spread": fig_erank_spread, "glue": fig_glue})
_PAPER_FIGURES = ("bars", "erank_final", "erank_spread", "glue")  # the figures that draw the paper's numbers beside ours


def report(plan, figures=("bars", "curves"), baseline="baseline", baseline_of=None, show=True):
    """The experiment's report from the results made with the plan's settings (others are left out and named):
    the per-config table (report.md / .csv), the claim verdicts (claims.csv), the figures (PNG; shown inline in a
    notebook unless show=False)."""
    df, left_out = plan_results(plan)
    for d, why in left_out:
        print(f"left out: {d}: {why}")
    if df.empty:
        print(f"no finished runs with these settings under {plan.out_dir}/runs yet")
        return None
    bad = [f for f in figures if f not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; known: {', '.join(FIGURES)}")
    order = [c for c in plan.grid if c in set(df["config"])]
    if plan.name == "04_toy_jacobian" or "kappa_mean" in df and df["kappa_mean"].notna().all():
        table = toy_table(df, plan.paper)
    else:
        table = summary_table(df, plan.paper, order, baseline, baseline_of, plan.paper_gpu, claims=plan.claims)
    notes = list(plan.notes)
    if table.attrs.get("devices"):
        notes.append(f"our runs: {table.attrs['devices']}" + (f"; the paper's: {plan.paper_gpu}" if plan.paper_gpu else ""))
    rep = Report(report_title(plan, df), table, claims_table(df, plan.claims) if plan.claims else None, left_out,
                 notes=notes, values=claim_values(df))
    for f in figures:
        fn = FIGURES[f]
        kw = ({"paper": plan.paper, "order": order} if f in _PAPER_FIGURES else
              {"order": order} if f == "per_corruption" else {})
        path = fn(df, plan.out_dir, show=show, **kw)
        if path:
            rep.figures.append(str(path))
    write_report(rep, plan.out_dir)
    return rep


def summary_claims():
    """SUMMARY_CLAIMS checked (their configs are "NN_notebook/config"; tests check them against the notebooks)."""
    return [check_claim(c, {x for x in [c.get("a"), c.get("b"), *(c.get("terms") or {})] if x}) for c in SUMMARY_CLAIMS]


def summary_claims_table(root):
    """The cross-notebook claims judged on every notebook's values.csv under root (Welch: different experiments
    share no randomness even where their seeds agree); None when no notebook has values yet."""
    import pandas as pd
    parts = [pd.read_csv(p).assign(config=lambda d, nb=p.parent.name: nb + "/" + d["config"].astype(str))
             for p in sorted(Path(root).glob("*/values.csv"))]
    if not parts:
        return None
    return claims_table(pd.concat(parts, ignore_index=True), summary_claims(), paired=False)


def build_summary(root="outputs"):
    """outputs/SUMMARY.md and .csv: one row per claim over every notebook folder under root that has a report
    (each report's claims.csv holds only runs made with its own settings, and names its preset, epochs, seeds),
    then the cross-notebook claims (SUMMARY_CLAIMS) and what chance alone would give."""
    import pandas as pd
    root = Path(root)
    parts = [pd.read_csv(p).assign(notebook=p.parent.name) for p in sorted(root.glob("*/claims.csv"))]
    if not parts:
        return None
    across = summary_claims_table(root)
    if across is not None:
        parts.append(across.assign(notebook="across notebooks", report="across notebooks (SUMMARY_CLAIMS)"))
    df = pd.concat(parts, ignore_index=True)
    df = df[["notebook"] + [c for c in df.columns if c != "notebook"]]
    counts = df["verdict"].value_counts().to_dict()
    n_nb = df.loc[df["notebook"] != "across notebooks", "notebook"].nunique()
    md = [f"# SES claims: {len(df)} claims, from {n_nb} notebook{'s' if n_nb != 1 else ''} and across notebooks\n",
          ", ".join(f"{v} {k}" for k, v in counts.items()) + " (on the paper's metric definitions)\n",
          chance_verdicts(int((df["seeds"] >= 2).sum())) + "\n", VERDICT_RULE + "\n"]
    for nb, sub in df.groupby("notebook", sort=True):
        md.append(f"## {sub['report'].iloc[0]}\n\n" + _markdown(sub.drop(columns=["notebook", "report"]).set_index("claim")))
    atomic_write_bytes(root / "SUMMARY.csv", df.to_csv(index=False).encode())
    atomic_write_bytes(root / "SUMMARY.md", "\n".join(md).encode())
    return df


def runs_frame(results: dict):
    """{label: result dict (result.json, or {"history": [...]})} as the frame the report figures take."""
    import pandas as pd
    return pd.DataFrame([{"config": label, "seed": r.get("config", {}).get("seed"), "result": r}
                         for label, r in results.items()])


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# explore
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# ── explore: a finished run's model, and its layers' spectra ────────────────────────────────────

def load_run(run_dir, device="cpu"):
    """(model with the run's final weights, its resolved config, its per-epoch history) of a train() run folder
    (runs/<config>_seed<seed>/): weights from model_final.pt (written at the end of every run with save_model)
    or else checkpoint.pt (a run still in progress, or kept with keep_checkpoint). The model is in eval mode."""
    run_dir = Path(run_dir)
    r = _read_result(run_dir / "result.json")
    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True) \
        if (run_dir / "checkpoint.pt").is_file() else None
    if r is None and ck is None:
        raise FileNotFoundError(f"{run_dir}: neither result.json nor checkpoint.pt (a run folder is "
                                "outputs/NN_name/runs/<config>_seed<seed>/)")
    cfg, history = (r["config"], r["history"]) if r is not None else (ck["config"], ck["history"])
    if "model" not in cfg:
        raise ValueError(f"{run_dir} is not a train() run (the toy study's runs keep no model)")
    if (run_dir / "model_final.pt").is_file():
        state = torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True)
    elif ck is not None:
        state = ck["model"]
    else:
        raise FileNotFoundError(f"{run_dir}: no saved weights (neither model_final.pt nor checkpoint.pt: the run was "
                                "made with save_model=False and keep_checkpoint=False)")
    info = dataset_info(cfg["dataset"])
    name = cfg["model"]  # a ViT run made before vit_impl existed was timm's: rebuild that
    name = f"{name}_timm" if config_value(cfg, "vit_impl") == "timm" and name not in TIMM_VIT_MODELS else name
    model = build_model(name, info["num_classes"], info["img_size"], cfg.get("spectral_norm", False),
                        cfg.get("width", 1.0))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, history


def layer_spectra(model, images, layers="auto", targets=("block",), normalize=None, batch_size=256, mode="eval"):
    """{layer: eigenvalues (descending, float64) of the covariance of its pooled activations} on `images` (a
    normalised float batch, or uint8 with normalize=(mean, std)). mode "eval" (the model as it predicts, default)
    or "train" (as SES sees it: batch statistics; BatchNorm buffers are restored afterwards). The covariance is the
    d x d one in float64, so the spectrum is exact whatever the number of images (below d, the extra eigenvalues
    are 0: a batch of N centred samples has rank <= N - 1)."""
    if images.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("uint8 images need normalize=(mean, std), as the model was trained with")
        images = normalize_u8(images, *normalize)
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
    dev = next(model.parameters()).device
    if "attn_weights" in targets and hasattr(model, "blocks"):
        use_attention_weights(model)
    triples = hook_targets(model, layers, targets) if isinstance(layers, (str, list, tuple)) else layers
    with measuring(model, mode):
        acts = pooled_activations(model, [(n, k) for n, _, k in triples], images.to(dev), batch_size)
    out = {}
    for name, a in acts.items():
        h = a.double()
        h = h - h.mean(0, keepdim=True)
        out[name] = torch.linalg.eigvalsh(h.T @ h / (len(h) - 1)).flip(0)
    return out


def spectral_erank(eigs) -> float:
    """exp of the spectral entropy of an eigenvalue vector (the effective rank SES shapes)."""
    return float(_entropy_from_eigs(torch.as_tensor(eigs, dtype=torch.float64)).exp())


def fig_spectra(spectra: dict, beta, out_dir, name="spectra", show=True):
    """Per layer, each run's normalised eigenvalue spectrum p_i (log-log), with the effective-rank target d^beta
    (dashed) and each run's own effective rank exp(H) (dotted, its colour): baseline vs SES side by side."""
    import matplotlib.pyplot as plt
    labels = list(spectra)
    layers = list(spectra[labels[0]])
    ncol = min(4, len(layers))
    nrow = -(-len(layers) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 3.4 * ncol), 2.8 * nrow + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes.flat, layers):
        for k, lab in enumerate(labels):
            eig = spectra[lab][layer].clamp(min=0)
            p = (eig / eig.sum()).numpy()
            rank = np.arange(1, len(p) + 1)
            ax.loglog(rank[p > 0], p[p > 0], color=colors[k % len(colors)], lw=1.2, label=lab)
            ax.axvline(spectral_erank(eig), color=colors[k % len(colors)], ls=":", lw=1)
        d = len(spectra[labels[0]][layer])
        ax.axvline(d ** beta, color="k", ls="--", lw=1, label=f"target effective rank d^β (β = {beta:g})")
        ax.set_title(f"{layer} (d = {d}, d^β = {d ** beta:.1f})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=len(labs), fontsize=8, frameon=False)
    fig.suptitle("eigenvalue spectrum per layer (normalised, log-log); dotted: each run's effective rank", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return _save(fig, out_dir, name, show)


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# notebook side
# ═══════════════════════════════════════════════════════════════════════════════════════════════

# Notebook side of the run contract (plan_runs), the batch runner that
# drives the notebooks over the GPUs of one machine (one papermill subprocess per GPU: threads in one
# process serialize on the GIL), Kaggle/Colab packaging, and the `python seslib.py ...` command line.


# ─── notebook side: parameters and the run plan ────────────────────────────────────────────────

def validate_params(params, allowed, where="notebook"):
    """Raise ValueError naming every key of `params` not in `allowed` (with a did-you-mean).
    The runner checks the params YAML with it against each notebook's declared parameters."""
    bad = sorted(set(params) - set(allowed))
    if bad:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else "")
                 for k in bad]
        raise ValueError(f"unknown parameter(s) for {where}: {', '.join(hints)}; valid: {sorted(allowed)}")
    return params


PRESETS = read_only({
    # the published setup: each notebook's base recipe as is
    "paper": {},
    # every code path of a notebook on a tiny real-data subset, in seconds per run on a laptop CPU: 1 epoch of 2
    # steps, the models narrowed to a quarter of their width (same depth, modules and hooks: ResNet-50 1.5 M
    # parameters instead of 24 M, WRN-28-10 2.3 M instead of 36.5 M), 32 test images, robustness (both protocols)
    # on 8 images at one severity, no saved weights. Proves the pipeline end to end; its numbers mean nothing.
    "smoke": dict(epochs=1, batch_size=32, train_subset=256, test_subset=32, max_steps_per_epoch=2, width=0.25,
                  robustness_subset=8, robustness_severities=[3], warmup_epochs=0, erank_batches=1,
                  erank_eval_samples=32, save_model=False),
})
PAPER_SEEDS = (42, 123, 7)  # the paper's three seeds, in its order (Exp 5/6: "3 random seeds (42, 123, 7)")
SEED_PRESETS = read_only({"paper3": PAPER_SEEDS})  # seeds="paper3" in a notebook, plan_runs, a batch's params
NOTEBOOK_PARAMS = ("configs", "seeds", "epochs", "batch_size", "data_root", "out_dir", "device", "amp",
                   "preset", "resume", "report_only", "report", "list_runs", "torchrun")


def check_notebook_params(namespace: dict, defined_before: set, extra=()):
    """Reject misspelled papermill parameters (papermill itself only warns) and bad values, up front.

    `defined_before` is the set of globals at the end of the parameters cell: papermill's injected cell
    comes after it, so any new public name is a parameter the notebook does not know.
    """
    known = set(NOTEBOOK_PARAMS) | set(extra)
    injected = {k for k, v in namespace.items() if not k.startswith("_") and k not in defined_before
                and not isinstance(v, type(json))}  # modules imported after the parameters cell are not parameters
    unknown = sorted(injected - known - {"In", "Out", "get_ipython", "exit", "quit", "open"})
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; known: {', '.join(sorted(known))}")
    if "preset" in namespace and namespace.get("preset") not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}; got {namespace.get('preset')!r}")
    if "seeds" in namespace:  # a seed preset ("paper3") becomes its list here: the notebook shows the seeds it runs
        namespace["seeds"] = resolve_seeds(namespace["seeds"])
    for k in ("epochs", "batch_size"):
        v = namespace.get(k)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{k} must be None (the preset's value) or a positive int; got {v!r}")
    _check_device_name(namespace.get("device", "auto"))


def _check_device_name(device):
    """A notebook's `device` names a torch device, whether or not its runs use it (the toy study runs on the CPU):
    a typo fails the same way in every notebook, before anything runs."""
    try:
        torch.device("cpu" if device in (None, "auto") else device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"device must be 'auto' or a torch device ('cpu', 'cuda', 'cuda:1'); got {device!r} "
                         f"({e})") from None


def run_config(base: dict, overrides: dict, *, preset="paper", seed=42, run_dir=None, epochs=None,
               batch_size=None, presets=None, **common) -> dict:
    """The train() config of one run: base recipe < experiment overrides < preset < explicit knobs.
    When the epochs differ from the recipe's (an epochs knob, the smoke preset), milestones the recipe states in
    epochs are scaled with them: [20, 35, 45] of 50 -> [8, 14, 18] of 20 (else they would never be reached)."""
    presets = presets or PRESETS
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; known: {list(presets)}")
    recipe = {**base, **overrides}
    cfg = {**recipe, **presets[preset]}
    if epochs is not None:
        cfg["epochs"] = epochs
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    if cfg.get("milestones") and "epochs" in recipe and cfg.get("epochs") != recipe["epochs"]:
        cfg["milestones"] = sorted({max(1, round(m * cfg["epochs"] / recipe["epochs"])) for m in cfg["milestones"]})
    cfg.update({k: v for k, v in common.items() if v is not None})
    cfg.update(seed=seed, out_dir=str(run_dir) if run_dir is not None else cfg.get("out_dir"))
    cfg["preset"] = preset  # a label: reports and the stale rule name it
    return cfg


@dataclasses.dataclass
class Run:
    """One (config, seed) run of a notebook; `overrides` are the grid's settings for `config`.
    status: "done" (a result made with the config planned now), "stale" (a result made with other settings:
    `diff` says which; it is set aside and redone), "todo" (no result yet; a checkpoint resumes)."""
    config: str
    seed: int
    overrides: dict
    run_dir: Path
    result_path: Path
    status: str
    cost: float = 1.0
    cfg: dict = None  # the resolved config this plan runs (None for a plan without a base recipe)
    diff: list = dataclasses.field(default_factory=list)
    est: dict = None  # estimate_run on this machine: seconds left, epoch_s, epochs_left, source

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclasses.dataclass
class RunPlan:
    """What a notebook does: `S.run_plan(plan)` then `if plan.report: S.report(plan)`.

    In listing mode (list_runs set) the run list is written as JSON, `todo` is empty and `report`
    False, so the rest of the notebook does nothing; with report_only, `todo` is empty too.
    The plan also holds what its report needs: the resolved config of every grid config (for every seed),
    the paper's numbers and claims."""
    runs: list
    listing: bool
    todo: list
    report: bool
    out_dir: Path = None
    name: str = ""
    grid: dict = None
    seeds: list = None
    preset: str = "paper"
    resolved: dict = None  # {(config, seed): resolved cfg} over the WHOLE grid, for the report
    paper: dict = None
    claims: list = None
    paper_gpu: str = None
    train_fn: object = None
    notes: list = dataclasses.field(default_factory=list)  # non-paper settings, for the report's title


def _as_list(x, what):
    if isinstance(x, str):
        x = [s.strip() for s in x.split(",") if s.strip()]
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        x = [x]
    x = list(dict.fromkeys(x))  # dedupe, keep order
    if not x:
        raise ValueError(f"{what} is empty")
    return x


def resolve_seeds(seeds) -> list:
    """A seeds parameter as a list of ints: an int, a list of ints, "42,123" or a SEED_PRESETS name ("paper3":
    the paper's PAPER_SEEDS [42, 123, 7]). Anything else is refused in one line naming what is accepted."""
    if isinstance(seeds, str) and seeds.strip() in SEED_PRESETS:
        return list(SEED_PRESETS[seeds.strip()])
    accepted = (f"seeds must be an int, a list of ints, 'a,b,c' or one of {', '.join(map(repr, SEED_PRESETS))} "
                f"({', '.join(f'{k} = {list(v)}' for k, v in SEED_PRESETS.items())})")
    try:
        items = _as_list(seeds, "seeds")
    except (TypeError, ValueError):
        raise ValueError(f"{accepted}; got {seeds!r}") from None
    if not all(_is_int(s) or (isinstance(s, str) and s.isdigit()) for s in items):
        raise ValueError(f"{accepted}; got {seeds!r}")
    return list(dict.fromkeys(int(s) for s in items))


def plan_runs(grid, configs="all", seeds=(42,), out_dir=None, list_runs="", cost=None, report=True,
              report_only=False, *, base=None, preset="paper", epochs=None, batch_size=None, presets=None,
              resolve=None, train_fn=None, paper=None, claims=None, paper_gpu=None, name="", **common):
    """Expand a notebook's grid {config: overrides} into its (config, seed) runs, and decide which are done.

    configs: "all", a list of names or "a,b"; seeds: int, list or "paper3" (resolve_seeds); out_dir: the
    notebook's output folder (runs live in {out_dir}/runs/{config}_seed{seed}/); list_runs: "" or a path where the run list is
    written as JSON for the batch runner (listing mode); cost: None (run_cost of the config, or 1),
    {config: cost} or callable(config, overrides) -> relative cost (the runner starts the costliest first).
    base (+ preset, epochs, batch_size, common knobs such as data_root/device/amp): the recipe; every run's
    config is resolved now (resolve: validate_config, or the toy study's resolve_toy_config), so bad settings
    fail here, before anything runs, and a run is done only when its result.json was made with the config
    planned now (config_diff; keys in _NOT_COMPUTED aside). paper / claims: the published numbers and the
    claims the report checks (claim configs are checked against the grid here)."""
    names, seeds = _planned_selection(grid, configs, seeds, out_dir)
    claims = [check_claim(c, grid, paper) for c in (claims or [])]
    out_dir = Path(out_dir)
    knobs = dict(preset=preset, epochs=epochs, batch_size=batch_size, presets=presets, **common)
    resolved = {} if base is None else _resolve_grid(grid, seeds, out_dir, base, resolve or validate_config, knobs)
    runs = _planned_runs(names, seeds, grid, out_dir, resolved, _cost_of(cost, grid, resolved, seeds), paper, paper_gpu)
    listing = bool(list_runs)
    if listing:
        _write_run_list(list_runs, runs)
    _print_plan(runs, listing, report_only)
    first = next(iter(resolved.values()), None)
    return RunPlan(runs=runs, listing=listing, todo=[] if listing or report_only else [r for r in runs if not r.done],
                   report=not listing and (report or report_only), out_dir=out_dir, name=name, grid=dict(grid),
                   seeds=seeds, preset=preset, resolved=resolved, paper=paper or {}, claims=claims,
                   paper_gpu=paper_gpu, train_fn=train_fn,
                   notes=_non_paper_notes(base, grid, first, preset, epochs, batch_size, presets) if first else [])


def _planned_selection(grid, configs, seeds, out_dir):
    """plan_runs' arguments checked: the grid's shape, out_dir given, the configs named (-> their names) and the
    seeds (-> ints)."""
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, dict) for v in grid.values()):
        raise ValueError("grid must be a non-empty dict {config_name: {overrides}}")
    if not out_dir:
        raise ValueError("out_dir is required")
    names = list(grid) if configs == "all" else _as_list(configs, "configs")
    unknown = [c for c in names if c not in grid]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; valid: {list(grid)}")
    return names, resolve_seeds(seeds)


def _planned_run_dir(out_dir, config, seed) -> Path:
    return out_dir / "runs" / f"{config}_seed{seed}"


def _resolve_grid(grid, seeds, out_dir, base, resolve, knobs) -> dict:
    """{(config, seed): resolved config} for EVERY grid config and seed, not only those selected: the report matches
    results against these. A bad setting fails here, before anything runs, naming its config."""
    resolved = {}
    for c in grid:
        for s in seeds:
            rd = _planned_run_dir(out_dir, c, s)
            try:
                resolved[c, s] = resolve(run_config(base, grid[c], seed=s, run_dir=rd, **knobs))
            except ValueError as e:
                raise ValueError(f"config {c!r}: {e}") from None
    return resolved


def _cost_of(cost, grid, resolved, seeds):
    """config -> its relative cost, from plan_runs' `cost`: None (run_cost of the resolved config, 1 without a
    recipe), {config: cost} or callable(config, overrides)."""
    def cost_of(c):
        if cost is None:
            return run_cost(resolved[c, seeds[0]]) if resolved else 1.0
        return float(cost(c, grid[c]) if callable(cost) else cost.get(c, 1.0))
    return cost_of


def _planned_runs(names, seeds, grid, out_dir, resolved, cost_of, paper, paper_gpu) -> list:
    """Each selected (config, seed) as a Run whose status its result.json decides (done, stale or todo); the runs
    not done get their time estimate (the time budget and the cost plan use it)."""
    runs = []
    for c in names:
        for s in seeds:
            run_dir = _planned_run_dir(out_dir, c, s)
            cfg = resolved.get((c, s))
            status, diff = result_status(run_dir / "result.json", cfg)
            runs.append(Run(config=c, seed=s, overrides=dict(grid[c]), run_dir=run_dir,
                            result_path=run_dir / "result.json", status=status, cost=cost_of(c), cfg=cfg, diff=diff))
    for r in runs:
        if r.cfg is not None and not r.done:
            r.est = run_estimate(r, paper, paper_gpu)
    return runs


def _write_run_list(path, runs):
    """Listing mode: the run list the batch runner reads (one entry per run; keys are part of the run contract)."""
    atomic_write_json(path, [{"config": r.config, "seed": r.seed, "cost": r.cost, "done": r.done,
                              "status": r.status, "stale": describe_diff(r.diff), "run_dir": str(r.run_dir),
                              "cfg": r.cfg, "est": r.est} for r in runs])


def _print_plan(runs, listing, report_only):
    """The plan in a line (runs, done, to do, stale), then one line per stale run saying what differs."""
    counts = {k: sum(r.status == k for r in runs) for k in ("done", "stale", "todo")}
    print(f"{len(runs)} run(s): {counts['done']} done, {counts['stale'] + counts['todo']} to do"
          + (f" ({counts['stale']} stale)" if counts["stale"] else "")
          + (" (listing only)" if listing else " (report only)" if report_only else ""))
    for r in runs:
        if r.status == "stale":
            print(f"  stale: {r.config} seed {r.seed}: {describe_diff(r.diff)}"
                  + ("" if listing or report_only else " (set aside and redone)"))


def _non_paper_notes(base, grid, cfg, preset, epochs, batch_size, presets=None):
    values = (presets or PRESETS).get(preset, {})  # the notebook's own presets (the toy study's, Exp 22's)
    notes = [] if preset == "paper" else [f"Not the published setup: the {preset!r} preset "
                                          f"({', '.join(f'{k}={v}' for k, v in values.items())})."]
    recipe = {**base, **next(iter(grid.values()))}
    for k, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v is not None and v != recipe.get(k):
            notes.append(f"Not the published setup: {k} {v} (recipe: {recipe.get(k)}).")
    return notes


def _visible_gpus():
    """(kind, count) of the CUDA devices this process sees; (None, 0) without CUDA."""
    if not torch.cuda.is_available():  # CUDA-only: memory placement places runs on GPUs (CPU twin: tests pass gpus)
        return None, 0
    return gpu_kind(torch.cuda.get_device_name(0)), torch.cuda.device_count()


def placed_train_fn(cfg, torchrun=None, gpus=None):
    """The train function memory placement picks for the run cfg in this process, or None (train it as asked):
    a run that does not fit one of this machine's GPUs but fits k of them runs as ONE DDP run over k (train_torchrun);
    one that fits nowhere here raises PreflightError, one line, before its data loads. Nothing to place when the caller
    chose torchrun, on a CPU, or for a model estimate_memory does not know. gpus: (kind, count), else this process's."""
    if torchrun not in (None, "", 0, "0", False) or not placeable(cfg):
        return None
    kind, n = gpus or _visible_gpus()
    device = str(cfg.get("device") or "auto")
    if not n or not (device == "auto" or device.startswith("cuda")):
        return None
    p = placement(validate_config(cfg), kind, n)
    if p["gpus"] == 0:
        raise PreflightError(f"{p['text']} ({p['memory']['why']})")
    if p["gpus"] == 1:
        return None
    print(f"[place] {p['text']}", flush=True)
    return lambda c: train_torchrun(c, p["gpus"])


def run_plan(plan, resume=True, torchrun=None, train_fn=None):
    """Run every planned (config, seed) that is not done; resume interrupted ones; set stale results aside first.

    torchrun: None / 0 (each run in this process), "auto" or N: each run as ONE DDP run over all GPUs
    (N processes) via train_torchrun; None reads $SES_TORCHRUN (set by `sesrun.py batch --torchrun`).
    A failing run does not stop the others; the first error is re-raised at the end so papermill and
    the batch runner still see the failure. Returns a compact table (pandas) of the runs and their headline
    numbers, not the result dicts (a notebook cell would print all of them)."""
    import pandas as pd
    torchrun = os.environ.get(TORCHRUN_ENV) if torchrun is None else torchrun
    train_fn = train_fn or plan.train_fn
    if train_fn is None and torchrun not in (None, "", 0, "0", False):
        train_fn = lambda cfg: train_torchrun(cfg, torchrun)  # noqa: E731
    train_fn = train_fn or train
    rows = []
    for run in plan.runs:
        if run.done and not plan.listing:
            print(f"[skip] {run.config} seed {run.seed}: done ({run.result_path})")
            rows.append(_run_row(run, "done", _read_result(run.result_path)))
    errors = []
    end, budget = deadline(), parse_duration(os.environ.get(BUDGET_ENV))
    for run in plan.todo:
        if end is not None and not fits_budget(run.est, end, budget):
            print(f"[budget] {run.config} seed {run.seed}: not started, needs ~{_hours(run.est['seconds'])} and the "
                  f"time budget has {_hours(end - time.time())} left (to do in the next invocation)\n{MARK_BUDGET}",
                  flush=True)
            rows.append(_run_row(run, "to do (time budget)", None))
            continue
        if run.status == "stale":
            where = set_aside(run.run_dir, f"stale: {describe_diff(run.diff, limit=100)}")
            print(f"[stale] {run.config} seed {run.seed}: {describe_diff(run.diff)}; old files moved to {where}")
        if run.cfg is None:
            raise ValueError("run_plan needs a plan made with base=... (the recipe)")
        print(f"[run] {run.config} seed {run.seed} -> {run.run_dir}", flush=True)
        t0 = time.time()
        try:
            fn = train_fn if plan.train_fn else placed_train_fn(run.cfg, torchrun) or train_fn
            res = fn(dict(run.cfg, resume=resume))
            rows.append(_run_row(run, "ran", res, time.time() - t0))
        except RunLocked as e:  # another runner is training it right now: not a failure
            print(f"[locked] {run.config} seed {run.seed}: {e}\n{MARK_LOCKED}", flush=True)
            rows.append(_run_row(run, "locked by another process", None))
        except RunPaused as e:  # the time budget ends: checkpoint kept, the next invocation resumes it
            print(f"[paused] {run.config} seed {run.seed}: {e}\n{MARK_PAUSED}", flush=True)
            rows.append(_run_row(run, "paused", None, time.time() - t0))
        except Exception as e:  # noqa: BLE001 - reported and re-raised below
            print(f"[failed] {run.config} seed {run.seed}: {type(e).__name__}: {e}", flush=True)
            rows.append(_run_row(run, f"failed: {type(e).__name__}", None, time.time() - t0))
            errors.append(e)
    if errors:
        raise errors[0]
    return pd.DataFrame(rows, columns=["config", "seed", "status", "test acc (final)", "rob", "minutes"])


def _run_row(run, status, result, seconds=None):
    fin = (result or {}).get("final") or {}
    rob = (fin.get("robustness") or {}).get("mean_corruption_acc")
    return {"config": run.config, "seed": run.seed, "status": status, "test acc (final)": fin.get("test_acc"),
            "rob": rob, "minutes": None if seconds is None else round(seconds / 60, 1)}


def resolve_out_dir(out_dir, preset="paper", name=None) -> str:
    """Where a notebook writes. None -> outputs/<name> for the paper preset, outputs/<preset>/<name> otherwise,
    so a smoke run's results can never pass for a paper run's. Relative paths resolve against /kaggle/working
    on Kaggle, else the repo root (the folder of seslib.py when it holds notebooks/), else the current
    directory: a notebook run from notebooks/ and a batch run from the root write to the same place."""
    if out_dir is None:
        if not name:
            raise ValueError("out_dir is None and no notebook name was given")
        out_dir = Path("outputs") / name if preset == "paper" else Path("outputs") / preset / name
    p = Path(out_dir)
    if p.is_absolute():
        return str(p)
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or Path("/kaggle/working").is_dir():
        return str(Path("/kaggle/working") / p)
    here = Path(__file__).resolve().parent
    if (here / "notebooks").is_dir() and os.access(here, os.W_OK):
        return str(here / p)
    return str(Path.cwd() / p)


# ═══════════════════════════════════════════════════════════════════════════════════════════════
# the train command
# ═══════════════════════════════════════════════════════════════════════════════════════════════

def _train_args(p):
    p.add_argument("--config", required=True, help="JSON file holding one run's train() cfg (as run_config builds it)")


def _train_cmd(a):
    """One run; under `torchrun ... seslib.py train --config run.json` one DDP run over all the ranks."""
    try:
        cfg = json.loads(Path(a.config).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {a.config}: {e}") from None
    res = train(cfg)
    if res is not None:  # rank 0 (or the only process)
        f = res["final"]
        print(f"[done] test_acc {f['test_acc']:.2f}% (final epoch), gap {f['gap']:.2f}, "
              f"{f['epochs_run']} epochs" + (f" -> {cfg['out_dir']}" if cfg.get("out_dir") else ""), flush=True)
    return 0


# what a user's input or machine can cause (bad values, missing files, no GPU, a run locked elsewhere): main() turns
# these into one line; anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, RunLocked, NonFiniteLossError)

# The commands that moved to the batch runner's own file (the parent process only): seslib.py names the command that
# replaced each one and exits 2, so an old habit or script gets one line, not an argparse error.
MOVED_COMMANDS = ("quick", "batch", "plan", "kaggle", "summary")


def run_command(parser, command, args, interrupted):
    """Run one command of a command line (this one's, sesrun.py's): a user's error becomes one line and exit 2 (what
    was wrong and how to fix it, not a traceback), Ctrl-C exit 130 with `interrupted`, a failure its exit status."""
    try:
        code = command(args)
    except USER_ERRORS as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        code = 130
    if code:
        raise SystemExit(code)
    return 0


def main(argv=None):
    """`python seslib.py train --config run.json` (torchrun launches exactly this); exits non-zero on failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED_COMMANDS:
        print(f"error: `seslib.py {argv[0]}` moved: run `python sesrun.py {' '.join(argv)}` instead", file=sys.stderr)
        raise SystemExit(2)
    parser = argparse.ArgumentParser(prog="seslib.py", description="SES experiment suite: one training run "
                                     "(the batch runner and the other commands: python sesrun.py --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="train one run from a JSON cfg (under torchrun: one DDP run over all "
                                             "ranks)"))
    return run_command(parser, _train_cmd, parser.parse_args(argv),
                       interrupted="interrupted: run the same command again to resume from the last checkpoint")


if __name__ == "__main__":
    main()
