"""Calibration: what bench/gpu_check.py measured on a GPU (its gpu_check.json) in place of the cost plan's assumed
factors: each measured model's seconds per step with SES off and on, DDP's efficiency, the usable memory per GPU.

`python sesrun.py plan ... --calibration bench/gpu_check/gpu_check.json` reads it; without one, the plan's first line
says that its times are the paper's, converted by assumed factors, and unmeasured on this suite."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .util import resolve_precision
from .data import DATASETS, GLUE_TASKS
from .estimates import DDP_EFFICIENCY, GPU_MEMORY, GPU_SPEED, MEM_CONTEXT_GB, MEM_FRAGMENTATION, _steps_fraction, \
    gpu_kind, usable_gb_of

SCHEMA = "ses-gpu-check/2"
# An evaluation image costs one forward pass: about a third of a training image (forward + backward). The epoch of
# a calibrated run is its training steps at the measured speed plus its held-out pass at that share.
EVAL_SHARE = 1 / 3


@dataclass(frozen=True)
class Calibration:
    """A GPU's measured figures: path, device name, its kind (GPU_SPEED's), when; steps: gpu_check's step rows;
    ddp_efficiency (None: not measured, one GPU), usable_gb (None: not measured)."""
    path: str
    device: str
    gpu: str
    time: str
    steps: tuple
    ddp_efficiency: float | None
    usable_gb: float | None


def _bad(path, why) -> ValueError:
    return ValueError(f"--calibration {path}: {why}; write one with `python bench/gpu_check.py` on a GPU")


def _number(v, where, path, hi=math.inf, integer=False):
    """v if it is a finite number in (0, hi] (an int where integer), else _bad naming where it is."""
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds) or not (0 < v <= hi and math.isfinite(v)):
        want = "a whole number > 0" if integer else f"a number in (0, {hi:g}]" if hi < math.inf else "a number > 0"
        raise _bad(path, f"{where} must be {want}; got {v!r}")
    return v


def _of_type(v, kinds, where, path):
    if not isinstance(v, kinds):
        names = " or ".join("null" if k is type(None) else {"dict": "an object", "list": "a list", "str": "a string",
                                                                "int": "a whole number"}[k.__name__] for k in kinds)
        raise _bad(path, f"{where} must be {names}; got {type(v).__name__} {v!r:.40}")
    return v


def _step(row, i, path) -> dict:
    """One checked step row (every field the plan reads, of its type)."""
    _of_type(row, (dict,), f"steps[{i}]", path)
    where = f"step {row.get('name', i)!r}"
    for key in ("model", "precision"):
        _of_type(row.get(key), (str,), f"{where}: {key!r}", path)
    for key in ("dataset", "task"):
        _of_type(row.get(key), (str, type(None)), f"{where}: {key!r}", path)
    if row.get("max_len") is not None:
        _number(row["max_len"], f"{where}: 'max_len'", path, integer=True)
    _number(row.get("measured_batch"), f"{where}: 'measured_batch'", path, integer=True)
    secs = _of_type(row.get("seconds_per_step"), (dict,), f"{where}: 'seconds_per_step'", path)
    for role in ("baseline", "ses"):
        _number(secs.get(role), f"{where}: seconds_per_step[{role!r}]", path)
    return row


def _known_gpu(device, path) -> str:
    """The GPU_SPEED kind the device name names: a name no kind matches is refused (never read as a T4's)."""
    name = _of_type(device, (str,), "'device' (the GPU's name)", path)
    kind = gpu_kind(name)
    if kind == "cpu":
        raise _bad(path, f"written by a CPU dry run ({name}): it measured nothing about a GPU")
    if not re.search(rf"\b{kind}\b", name.lower().replace("-", " ")):
        raise _bad(path, f"device {name!r} is no GPU kind this suite knows ({', '.join(k for k in GPU_SPEED if k != 'cpu')})")
    return kind


def _ddp_efficiency(ddp, path):
    """The measured DDP efficiency when the DDP check passed (its steps equal one process's), else None."""
    _of_type(ddp, (dict, type(None)), "'ddp'", path)
    if not ddp or ddp.get("status") != "PASS" or ddp.get("efficiency") is None:
        return None
    return float(_number(ddp["efficiency"], "ddp['efficiency']", path, hi=1.5))


def _usable(memory, path):
    """The measured usable GB per GPU (at most the file's own total_gb), or None when not measured."""
    memory = _of_type(memory, (dict, type(None)), "'memory'", path) or {}
    if memory.get("usable_gb") is None:
        return None
    total = _number(memory.get("total_gb"), "memory['total_gb'] (beside usable_gb)", path)
    return float(_number(memory["usable_gb"], "memory['usable_gb']", path, hi=total))


def read_calibration(path) -> Calibration:
    """gpu_check.json as a Calibration; ValueError in one line naming the file, the field and what is wrong with it."""
    p = Path(path)
    if p.is_dir():
        raise _bad(path, "is a folder: give its gpu_check.json")
    if not p.is_file():
        raise _bad(path, "no such file")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not a JSON file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise _bad(path, f"not a gpu_check.json of schema {SCHEMA!r} (schema "
                         f"{d.get('schema') if isinstance(d, dict) else None!r})")
    if d.get("dry_run"):
        raise _bad(path, f"written by a CPU dry run ({d.get('device')}): it measured nothing about a GPU")
    kind = _known_gpu(d.get("device"), path)
    steps = tuple(_step(r, i, path) for i, r in enumerate(_of_type(d.get("steps"), (list,), "'steps'", path)))
    return Calibration(str(p), d["device"], kind, str(d.get("time") or "?"), steps, _ddp_efficiency(d.get("ddp"), path),
                       _usable(d.get("memory"), path))


def _precision_on(c, gpu) -> str:
    capability = GPU_MEMORY.get(gpu, (None, (7, 5)))[1]
    return resolve_precision(c.get("amp", "off"), "cuda", capability)[0]


def step_row(cal: Calibration, c, gpu):
    """The measured step of c's model, data and precision on `gpu` (its recipe's), or None. Image data match by image
    size (CIFAR-10 and CIFAR-100 differ only in the classifier's 10 or 100 outputs), text by task and max_len."""
    text = c.get("kind") == "text"
    px = DATASETS.get(c.get("dataset"), {}).get("img_size")
    for r in cal.steps:
        same_data = (r.get("task") == c.get("task") and r.get("max_len") == c.get("max_len")) if text else \
            px is not None and DATASETS.get(r.get("dataset"), {}).get("img_size") == px
        if r["model"] == c.get("model") and same_data and r["precision"] == _precision_on(c, gpu):
            return r
    return None


def _seconds_per_image(c, row) -> float:
    """A training image's seconds: SES's measured step, or the baseline's; SES every k-th step costs its extra 1/k;
    a baseline (or lam 0) the baseline's."""
    base, ses = (row["seconds_per_step"][k] / row["measured_batch"] for k in ("baseline", "ses"))
    if not c.get("ses") or not c.get("ses_lambda", 1.0):
        return base
    return base + (ses - base) / max(1, int(c.get("ses_every_k") or 1))


def calibrated_epoch(cal: Calibration | None, c, gpu) -> dict | None:
    """{epoch_s, source} of the run c on `gpu` from the calibration: its measured step (scaled by GPU_SPEED's
    assumed ratio when measured on another kind) x the images of an epoch, plus its held-out pass at EVAL_SHARE; None
    when the calibration has no step of c's model, data and precision, or c times the author's SES (not measured)."""
    if cal is None or gpu == "cpu" or c.get("ses_impl") == "author" and c.get("ses"):
        return None  # a GPU's step says nothing of a CPU's; the author's SES was not measured
    row = step_row(cal, c, gpu)
    if row is None:
        return None
    text = c.get("kind") == "text"
    if text:
        n_train, n_test = GLUE_TASKS[c["task"]]["sizes"]
    elif c.get("dataset") in DATASETS:
        n_train, n_test = DATASETS[c["dataset"]]["sizes"]
    else:
        return None
    images = n_train * _steps_fraction(c) + EVAL_SHARE * (n_test + round((c.get("val_split") or 0) * n_train))
    scale = GPU_SPEED[cal.gpu] / GPU_SPEED[gpu] if cal.gpu != gpu else 1.0
    where = cal.device if scale == 1.0 else f"{cal.device}, scaled to {gpu} by the assumed speed ratio"
    if not text and row.get("dataset") != c.get("dataset"):
        where += f"; its {row['dataset']} step"
    return {"epoch_s": _seconds_per_image(c, row) * images * scale, "source": f"measured step ({where})"}


def calibrated(cal: Calibration | None, gpu):
    """The function run_estimate takes: c -> calibrated_epoch(cal, c, gpu); None without a calibration."""
    return None if cal is None else (lambda c: calibrated_epoch(cal, c, gpu))


def ddp_efficiency(cal: Calibration | None) -> float:
    return cal.ddp_efficiency if cal is not None and cal.ddp_efficiency else DDP_EFFICIENCY


def usable_memory(cal: Calibration | None, gpu) -> float | None:
    """The measured usable GB per GPU when the calibration was measured on this kind, else None (GPU_MEMORY's)."""
    return cal.usable_gb if cal is not None and cal.gpu == gpu else None


def calibration_lines(cal: Calibration | None, gpu, models=()) -> list[str]:
    """The plan's first lines: what its figures rest on, measured (and on which GPU) or assumed."""
    usable = usable_gb_of(GPU_MEMORY[gpu][0]) if gpu in GPU_MEMORY else None
    assumed_mem = f"usable memory {usable:.1f} GB per {gpu} ({MEM_CONTEXT_GB} GB CUDA context, " \
                  f"{MEM_FRAGMENTATION:.0%} fragmentation)" if usable else f"memory of a {gpu}"
    if cal is None:
        return ["times: the paper's epoch times (else its ResNet-18 times scaled by model), converted to "
                f"{gpu} by assumed GPU speed factors, UNMEASURED on this suite; DDP efficiency {DDP_EFFICIENCY} and "
                f"{assumed_mem} assumed. Measure them: python bench/gpu_check.py on the GPU, then plan ... "
                "--calibration bench/gpu_check/gpu_check.json"]
    if gpu == "cpu":
        return [f"calibration: {cal.path} measured a GPU ({cal.device}); a CPU plan does not use it: its times are "
                "the paper's, converted by the assumed CPU speed factor, UNMEASURED"]
    measured = sorted({r["model"] for r in cal.steps})
    left = sorted(set(models) - set(measured))
    lines = [f"calibration: {cal.path}, measured on {cal.device} ({cal.time})"
             + ("" if cal.gpu == gpu else f"; planned for {gpu}: times scaled by the assumed speed ratio")]
    lines.append(f"  measured: seconds per step with SES off and on of {', '.join(measured) or 'no model'}"
                 + (f"; DDP efficiency {cal.ddp_efficiency:.2f}" if cal.ddp_efficiency else "")
                 + (f"; usable memory {cal.usable_gb:.1f} GB per GPU" if usable_memory(cal, gpu) else ""))
    still = ([f"times of {', '.join(left)} (the paper's)"] if left else []) \
        + ([] if cal.ddp_efficiency else [f"DDP efficiency {DDP_EFFICIENCY} (not measured: one GPU, or its DDP check did not pass)"]) \
        + ([] if usable_memory(cal, gpu) else [assumed_mem]) \
        + ["the final robustness pass (from the epoch time)", "runs timed with ses_impl='author'"]
    lines.append("  still assumed: " + "; ".join(still))
    return lines
