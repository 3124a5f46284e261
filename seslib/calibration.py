"""Calibration: what bench/gpu_check.py measured on a GPU (its gpu_check.json) in place of the cost plan's assumed
factors: each measured model's seconds per step with SES off and on, DDP's efficiency, the usable memory per GPU.

`python sesrun.py plan ... --calibration bench/gpu_check/gpu_check.json` reads it; without one, the plan's first line
says that its times are the paper's, converted by assumed factors, and unmeasured on this suite."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .util import resolve_precision
from .data import DATASETS, GLUE_TASKS
from .estimates import DDP_EFFICIENCY, GPU_MEMORY, GPU_SPEED, MEM_CONTEXT_GB, MEM_FRAGMENTATION, _steps_fraction, \
    gpu_kind

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


def _step_row_ok(row) -> bool:
    secs = row.get("seconds_per_step") or {}
    return (isinstance(row.get("model"), str) and isinstance(row.get("measured_batch"), int)
            and row["measured_batch"] > 0 and isinstance(row.get("precision"), str)
            and all(isinstance(secs.get(k), (int, float)) and secs[k] > 0 for k in ("baseline", "ses")))


def read_calibration(path) -> Calibration:
    """gpu_check.json as a Calibration; ValueError in one line naming the file and what is wrong with it."""
    p = Path(path)
    if not p.is_file():
        raise _bad(path, "no such file")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"not a JSON file ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise _bad(path, f"not a gpu_check.json of schema {SCHEMA!r} (schema "
                         f"{d.get('schema') if isinstance(d, dict) else None!r})")
    if d.get("dry_run") or gpu_kind(d.get("device")) == "cpu":
        raise _bad(path, f"written by a CPU dry run ({d.get('device')}): it measured nothing about a GPU")
    steps = tuple(r for r in d.get("steps") or [] if isinstance(r, dict) and _step_row_ok(r))
    ddp = d.get("ddp") or {}
    eff = ddp.get("efficiency") if ddp.get("status") == "PASS" else None
    usable = (d.get("memory") or {}).get("usable_gb")
    return Calibration(str(p), str(d.get("device") or "?"), gpu_kind(d.get("device")), str(d.get("time") or "?"),
                       steps, float(eff) if isinstance(eff, (int, float)) and 0 < eff <= 1.5 else None,
                       float(usable) if isinstance(usable, (int, float)) and usable > 0 else None)


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
    if cal is None or c.get("ses_impl") == "author" and c.get("ses"):
        return None
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
    usable = (GPU_MEMORY[gpu][0] - MEM_CONTEXT_GB) * (1 - MEM_FRAGMENTATION) if gpu in GPU_MEMORY else None
    assumed_mem = f"usable memory {usable:.1f} GB per {gpu} ({MEM_CONTEXT_GB} GB CUDA context, " \
                  f"{MEM_FRAGMENTATION:.0%} fragmentation)" if usable else f"memory of a {gpu}"
    if cal is None:
        return ["times: the paper's epoch times (else its ResNet-18 times scaled by model), converted to "
                f"{gpu} by assumed GPU speed factors, UNMEASURED on this suite; DDP efficiency {DDP_EFFICIENCY} and "
                f"{assumed_mem} assumed. Measure them: python bench/gpu_check.py on the GPU, then plan ... "
                "--calibration bench/gpu_check/gpu_check.json"]
    measured = sorted({r["model"] for r in cal.steps})
    left = sorted(set(models) - set(measured))
    lines = [f"calibration: {cal.path}, measured on {cal.device} ({cal.time})"
             + ("" if cal.gpu == gpu else f"; planned for {gpu}: times scaled by the assumed speed ratio")]
    lines.append(f"  measured: seconds per step with SES off and on of {', '.join(measured) or 'no model'}"
                 + (f"; DDP efficiency {cal.ddp_efficiency:.2f}" if cal.ddp_efficiency else "")
                 + (f"; usable memory {cal.usable_gb:.1f} GB per GPU" if usable_memory(cal, gpu) else ""))
    still = ([f"times of {', '.join(left)} (the paper's)"] if left else []) \
        + ([] if cal.ddp_efficiency else [f"DDP efficiency {DDP_EFFICIENCY} (one GPU measured)"]) \
        + ([] if usable_memory(cal, gpu) else [assumed_mem]) \
        + ["the final robustness pass (from the epoch time)", "runs timed with ses_impl='author'"]
    lines.append("  still assumed: " + "; ".join(still))
    return lines
