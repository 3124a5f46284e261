"""Training: train(cfg) and its driver _train as named steps (data, model, optimisation, the epoch loop, evaluation,
checkpoint, resume, finish), train_torchrun, the final metrics in result.json."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from .ses import SES, autocast, erank_stats, is_int, layer_erank_stats, pooled_activations
from .util import (LOG_ENV, PreflightError, RunPaused, SLOT_ENV, amp_dtype_of, atomic_torch_save, atomic_write_json,
                   check_value, clean_temporaries, cpu_thread_advice, deadline, device_capability, device_label,
                   format_hours, measuring, move_aside, resolve_precision, run_lock, set_seed, with_package_on_path)
from .data import (DeviceLoader, dataset_info, load_dataset, resolve_data_dir, tinyimagenet_classes,
                   tinyimagenet_val_files)
from .models import SESViT, TIMM_VIT_MODELS, build_model, count_params
from .steps import image_step, text_step
from .corruptions import (clear_corruption_cache, corrupted_available, evaluate_corruptions, evaluate_paper_protocol,
                          frost_dir, resolve_corruptions)
from .runs import RESUME_FREE, config_diff, describe_diff, read_result, result_is_ok, set_aside
from .estimates import (GUARD_HEADROOM, GUARD_STEPS, MEM_MARGIN, checkpoint_bytes, estimate_eval_seconds, guard_estimate,
                        guard_target, memory_guard_verdict, seconds_left)
from .distributed import (DistInfo, all_reduce_sum, dist_setup, dist_teardown, eval_batch_size_of,
                          gather_activations, rank_seed, same_on_all_ranks, torchrun_env, use_sync_bn)
from .configs import resolve_config
from .toy import train_toy
from .text import (build_text_data, build_text_model, build_text_optimisation, check_text_memory,
                   evaluate_text_epoch, text_env, text_tag)


# ── pieces of the loop ───────────────────────────────────────────────────────────────────────────

class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the last good checkpoint is left untouched."""


class MemoryGuardError(RuntimeError):
    """A CUDA run's first steps showed it will not fit its GPU (guard_memory): stopped before its hours are spent."""


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


def measured_peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-lifetime peak RSS


def _env_info(device, c):
    import timm
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "device_name": device_label(device),
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


def stale_on_disk(c, out_dir, dd):
    """Before resuming: a finished result or a checkpoint in out_dir made with other settings is set aside
    (set_aside: moved, never deleted) and the run starts over. Returns (finished result or None, checkpoint or None)."""
    result_path, ckpt_path = out_dir / "result.json", out_dir / "checkpoint.pt"
    done = ck = None
    corrupt = []  # truncated, empty or garbage files: moved aside as *.corrupt, and the run starts over
    if c["resume"] and result_path.exists():
        done = read_result(result_path)
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
        config_diff(c, ck["config"], RESUME_FREE) if ck is not None else []
    diff = same_on_all_ranks(diff, dd, "whether out_dir holds a run made with other settings")
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


def log_mode(mode):
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
    correct, loss_sum, n = all_reduce_sum(sums, dd).tolist() if dd else sums.tolist()
    return 100.0 * correct / n, loss_sum / n


def check_finite(pending, epoch, step0, steps, ckpt_note, dd=None):
    vals = torch.stack(pending)
    if dd is not None:  # a NaN on any rank reaches every rank: all stop at the same step, none hangs
        vals = all_reduce_sum(vals, dd)
    bad = ~torch.isfinite(vals)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise NonFiniteLossError(f"non-finite training loss ({vals[i].item()}) at epoch {epoch + 1}, step "
                                 f"{step0 + i + 1}/{steps}; stopped. {ckpt_note}")


# ── train ────────────────────────────────────────────────────────────────────────────────────────

def torchrun_processes(nproc) -> int:
    """torchrun's process count: "auto" (every visible GPU), an int or its digits; else one line saying what to give."""
    if nproc == "auto":
        nproc = torch.cuda.device_count()
        if nproc == 0:
            raise ValueError("torchrun='auto' found no GPU; give a number of (CPU) processes instead")
    if isinstance(nproc, str) and nproc.isdigit():
        nproc = int(nproc)
    if not is_int(nproc) or nproc < 1:
        raise ValueError(f"torchrun must be 'auto' or an int >= 1; got {nproc!r}")
    return nproc


def train_torchrun(cfg: dict, nproc="auto", log=print) -> dict:
    """train(cfg) as ONE run over `nproc` local processes: `torchrun --standalone --nproc_per_node nproc
    -m seslib train --config {out_dir}/config.json`; returns its result.json. nproc: "auto" (every visible
    GPU) or an int (CPU ranks when there is no GPU). Needs cfg["out_dir"]. Output streams through `log`."""
    c = resolve_config(cfg)
    check_value(c["kind"] == "image", "kind", c["kind"], "'image' under torchrun (text and toy runs use one process)")
    if c["out_dir"] is None:
        raise ValueError("train_torchrun needs cfg['out_dir'] (the run's config and result travel through it)")
    nproc = torchrun_processes(nproc)
    check_value(c["batch_size"] % nproc == 0, "batch_size", c["batch_size"], f"divisible by torchrun={nproc}")
    out = Path(c["out_dir"])
    atomic_write_json(out / "config.json", c)  # the validated cfg: also the run's record of what it ran
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "seslib", "train", "--config", str(out / "config.json")]
    log(f"[torchrun] {' '.join(cmd[2:])}")
    proc_start = time.time()
    env = with_package_on_path(os.environ)  # the ranks import this package, whatever their working directory
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env) as proc:
        for line in proc.stdout:  # streamed, so a notebook cell shows the run live
            log(line.rstrip())
    prog = read_result(out / "progress.json") or {}
    if not result_is_ok(out / "result.json") and prog.get("paused") and prog.get("time", 0) >= proc_start:
        raise RunPaused(f"paused after epoch {prog['epochs_done']}/{prog['epochs']} (time budget); run again to resume")
    if proc.returncode != 0 or not result_is_ok(out / "result.json"):
        raise RuntimeError(f"torchrun run failed (exit {proc.returncode}); see the output above. Command: {' '.join(cmd)}")
    return json.loads((out / "result.json").read_text())


def train(cfg: dict) -> dict | None:
    """Train one run (model, dataset, recipe, SES options in cfg; see default_config / validate_config) and
    return {config, env, history, final}. With out_dir: checkpoint.pt every epoch (atomic), result.json at
    completion (atomic); resume=True continues from the checkpoint (or returns the finished result).

    Under torchrun it runs as one DDP run over all ranks (see the "distributed" notes above): rank 0
    returns the result and writes the files, the other ranks return None. ses_scope="global" (default):
    SES on the activations of the whole global batch, gathered from every rank: loss and gradients equal
    one process on the batch. "local": each rank's SES on its own B/R samples, averaged over ranks (no
    gather, but the reachable effective rank is capped at B/R - 1 instead of B - 1). sync_bn: None (auto:
    SyncBatchNorm for BatchNorm models on CUDA), True, False.

    Every kind of run starts here: cfg["kind"] (resolve_config) is "image" (the default), "text" (Exp 22: BERT on
    GLUE, one process) or "toy" (Exp 4: train_toy's full-batch study); image and text runs share this driver."""
    c = resolve_config(cfg)
    if c["kind"] == "toy":
        return train_toy(c)
    if c["kind"] == "text" and torchrun_env() is not None:
        raise ValueError("a text run (Exp 22) trains in one process on one GPU: start it without torchrun")
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
    """checkpoint.pt's size for this model (checkpoint_bytes of its weights)."""
    return checkpoint_bytes(sum(t.numel() * t.element_size() for t in model.state_dict().values()), c)


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
    if c["robustness"] and "frost" in resolve_corruptions(c["robustness"]) and \
            not (d is not None and corrupted_available(d.parent, c["dataset"], "frost")):
        try:
            frost_dir()
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
    kind: RunKind | None = None  # what the run's kind supplies: model, data, optimisation, step, evaluation
    out_dir: Path | None = None
    ckpt_path: Path | None = None  # out_dir/checkpoint.pt; None without out_dir
    ck: dict | None = None  # the checkpoint to resume from, until _restore_checkpoint consumes it
    amp_dtype: torch.dtype | None = None  # None: fp32
    t_start: float = 0.0
    mem_estimate: dict | None = None  # guard_estimate at the start (CUDA runs): result.json, the memory guard
    memory_guarded: bool = False  # guard_memory ran (after the first GUARD_STEPS steps this process trains)
    tf32_before: tuple = ()  # the flags before the run (_set_backend_flags): _release restores them
    cudnn_before: tuple = ()  # cudnn.deterministic, cudnn.benchmark before the run (_set_cudnn)
    threads_before: int | None = None  # torch's CPU threads before a run that set its own (the smoke BERT)
    # the model: net is the unwrapped module (evaluation, checkpoints, erank), model what trains (net or its DDP wrapper)
    net: nn.Module | None = None
    model: nn.Module | None = None
    ses: SES | None = None
    sync_bn: bool = False
    gather: object = None  # gather_activations when SES sees the global batch under DDP, else None
    # text runs: the tokenizer, where the model came from, the token pooling of ses_pool="mask"
    tokenizer: object = None
    source: str = ""
    pool: object = None
    # the data
    loader: object = None  # DeviceLoader (image) or TextBatches (text): batches, len, state_dict
    evals: dict | None = None  # {"test": loader, "val": loader (with val_split)}; text: {"test": the dev set}
    data_source: str = ""
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
    """One run of either kind (image or text: run.kind supplies its model, data, optimisation, step and evaluation) as
    a recipe, in the shape of timm's train.py: a finished run hands back its result; otherwise build the
    model, the data and the optimisation (resumed from the checkpoint if there is one), then train and evaluate epoch
    by epoch, keeping the best epoch and a checkpoint after each and pausing before an epoch the time budget would
    not fit; then the final metrics and result.json. Rank 0 returns the result, the other ranks None."""
    out_dir = Path(c["out_dir"]) if c["out_dir"] else None
    run = _Run(c, dd, device, kind=RUN_KIND_STEPS[c["kind"]], out_dir=out_dir,
               ckpt_path=out_dir / "checkpoint.pt" if out_dir else None)
    done = _resume_or_finish(run)
    if done is not None:  # finished already, with these settings: hand back its result
        return done if dd.is_main else None
    _set_precision(run)
    if device.type == "cpu" and dd.is_main and (advice := cpu_thread_advice()):  # a busy machine: say so, once
        print(advice, flush=True)
    run.kind.check_memory(run)  # CUDA only: the estimate (an image run's a note, a text run's a check)
    set_seed(c["seed"])  # the same on every rank: identical init (DDP also broadcasts rank 0's weights)
    run.t_start = time.time()
    try:
        run.kind.build_model(run)  # model + hooks first: a bad layer preset fails here, before any data is read
        _set_backend_flags(run)  # process-wide: _release restores them
        run.kind.build_data(run)
        run.kind.build_optimisation(run)
        _restore_checkpoint(run)
        _wrap_model(run)
        _start_log(run)
        end = deadline()
        for epoch in range(run.start_epoch, c["epochs"]):
            _pause_if_out_of_time(run, epoch, end)
            beta, lr = _start_epoch(run, epoch)
            bar, t0 = _epoch_bar(run, epoch), time.time()  # t0 just before the training loop, as the author's
            row, train_seconds = train_one_epoch(run, epoch, bar, t0)
            run.kind.evaluate(run, row, beta)
            row.update(beta=beta, lr=lr, steps=run.steps, train_seconds=train_seconds,
                       epoch_seconds=time.time() - t0, peak_mem_mb=measured_peak_mb(device))
            run.history.append(row)
            _keep_best(run, row)
            if run.kind.schedule_per_epoch:  # a text run's schedule steps with each optimiser step instead
                run.scheduler.step()
            _log_epoch(run, row, bar)
            _save_checkpoint(run, epoch)
        return _finish_run(run) if dd.is_main else None  # rank 0 alone evaluates robustness and writes the result
    finally:
        _release(run)


# ── the steps of _train, in the order it takes them ─────────────────────────────────────────────

def _resume_or_finish(run) -> dict | None:
    """out_dir's result when it holds this run finished with these settings (hand it back), else None, with run.ck
    the checkpoint to resume from if there is one. Stale or unreadable files are set aside first (stale_on_disk)."""
    done, run.ck = stale_on_disk(run.c, run.out_dir, run.dd) if run.out_dir else (None, None)
    same_on_all_ranks((done is not None, run.ck is not None), run.dd,
                       "whether out_dir holds a finished result / a checkpoint")
    return done


def _set_precision(run):
    """The autocast dtype of the resolved precision, and a note when this device runs another than the one asked for."""
    c, device = run.c, run.device
    run.amp_dtype = amp_dtype_of(c["precision"])
    note = resolve_precision(c["amp"], device.type, device_capability(device), c["cpu_amp"])[1]
    if note and run.dd.is_main and log_mode(c["log"]) != "none":
        print(f"note: {note}", flush=True)


def estimate_image_memory(run):
    """Every rank of a CUDA run: its guard estimate (estimates.guard_estimate) for this GPU's kind and memory at the
    run's world size, once before the run takes memory, so result.json holds it beside the measured peak and the
    memory guard has it after the first steps. A failed estimate is a note, never a failed run (and no guard)."""
    target = guard_target(run.device)
    if target is None:  # the CPU: no max_memory_allocated to compare with
        return
    try:
        run.mem_estimate = guard_estimate(run.c, *target, run.dd.world_size)
    except Exception as e:  # noqa: BLE001 - an estimate beside the run, not a reason to stop it
        if run.dd.is_main:
            print(f"note: no memory estimate ({type(e).__name__}: {e})", flush=True)


def step_peak_gb(device) -> float:
    """The peak memory of this process's tensors on a CUDA device so far (decimal GB, as the author's vram_peak_gb)."""
    return torch.cuda.max_memory_allocated(device) / 1e9


def guard_memory(run, epoch):
    """The run-time memory guard, after GUARD_STEPS steps of the first epoch this process trains: when the measured
    peak, or the estimate scaled by what it missed, leaves less than GUARD_HEADROOM of the usable memory free, every
    rank stops at once with one line (MemoryGuardError) instead of an out-of-memory error hours later; an estimate
    that ran more than MEM_MARGIN low on a run that fits is a note. Runs without an estimate (the CPU) pass."""
    est = run.mem_estimate
    if not est or not est.get("usable_gb"):
        return
    measured = step_peak_gb(run.device)
    v = memory_guard_verdict(measured, est)
    stop = all_reduce_sum(torch.tensor([float(v["stop"])], dtype=torch.float64, device=run.device), run.dd)
    if float(stop[0]) > 0:
        raise MemoryGuardError(
            f"memory guard: after {GUARD_STEPS} steps this run holds {measured:.1f} GB per GPU on "
            f"{device_label(run.device)}, {v['ratio']:.2f}x the {est['train_gb']:.1f} GB estimated for its steps; its "
            f"whole run would need about {v['projected_gb']:.1f} GB of {est['usable_gb']:.1f} usable "
            f"({1 - GUARD_HEADROOM:.0%} allowed): stopped at epoch {epoch + 1} before its hours are spent. Run it as one DDP run over more GPUs "
            "(`python sesrun.py plan NN --gpus K` says how many), or, leaving the paper's recipe, with a smaller "
            f"batch_size. {run.ckpt_note}")
    if v["ratio"] > 1 + MEM_MARGIN and run.dd.is_main:
        print(f"note: this run's first steps hold {measured:.2f} GB, {v['ratio']:.2f}x the estimate "
              f"({est['train_gb']:.2f} GB): it fits, but the estimator is off here (bench/gpu_check.py measures it)",
              flush=True)


def peak_memory_fields(run) -> dict:
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
    """The model and SES (model_and_ses), then rank 0's preflight (data, packages, disk)."""
    model_and_ses(run)
    if run.dd.is_main:
        preflight(run.c, run.net)


def model_and_ses(run):
    """The model on its device (stochastic depth, SyncBatchNorm under DDP) and the SES object on it, the one users
    call in their own loops (lam 0 for a baseline: its hooks then serve the erank measurements), and SES's gather
    under DDP; no data is read (bench/gpu_check.py builds its runs with it)."""
    c, dd = run.c, run.dd
    info = dataset_info(c["dataset"])
    net = build_model(c["model"], info["num_classes"], info["img_size"], c["spectral_norm"], c["width"])
    if c["drop_path"] is not None:
        _set_drop_path(net, c["drop_path"])
    run.sync_bn = use_sync_bn(c, net, run.device, dd)
    if run.sync_bn:  # same parameter/buffer names as BatchNorm: checkpoints stay interchangeable
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    run.net = net.to(run.device)
    run.ses = SES(run.net, c["ses_layers"], beta=c["ses_beta"], lam=c["ses_lambda"] if c["ses"] else 0.0,
                  every_k=c["ses_every_k"], schedule=c["ses_beta_schedule"], targets=c["ses_targets"],
                  impl=c["ses_impl"])
    run.gather = gather_activations if dd.enabled and c["ses_scope"] == "global" else None


def _set_backend_flags(run):
    """TF32 and cuDNN as the run's config says (image runs' keys; a text run leaves both as they are)."""
    if "tf32" in run.c:
        run.tf32_before = _set_tf32(run.c["tf32"])
    if "cudnn_deterministic" in run.c:
        run.cudnn_before = _set_cudnn(run.c["cudnn_deterministic"])


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
    ebs = eval_batch_size_of(c)
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
    run.log = log_mode(c["log"]) if dd.is_main else "none"
    run.tag = run.kind.tag(run) + (f" x{dd.world_size} ranks" if dd.world_size > 1 else "")
    run.ckpt_note = (f"Last good checkpoint kept: {run.ckpt_path} (epoch {run.start_epoch})" if run.ckpt_path else
                     "No checkpoint (out_dir=None).")
    if run.log in ("plain", "tqdm") and run.start_epoch:
        print(f"[{run.tag}] resumed from {run.ckpt_path} at epoch {run.start_epoch}", flush=True)


def _pause_if_out_of_time(run, epoch, end):
    """RunPaused (progress.json saying so) before an epoch the time budget ending at `end` would not fit (pause_now)."""
    c = run.c
    if end is None or not pause_now(run.history, c, epoch, end, run.dd):
        return
    if run.ckpt_path and run.dd.is_main:
        write_progress(run.out_dir, c, run.history, run.device, paused=True)
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
        torch.manual_seed(rank_seed(c["seed"], epoch, run.dd.rank))
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
    for step, batch in enumerate(run.loader):
        pending.append(run.kind.step(run, batch, sums))
        if step + 1 == min(GUARD_STEPS, run.steps) and not run.memory_guarded:  # once a process: its first steps
            run.memory_guarded = True
            guard_memory(run, epoch)
        if len(pending) == 16 or step == run.steps - 1:
            check_finite(pending, epoch, step0, run.steps, run.ckpt_note, run.dd)
            if bar is not None:
                bar.set_postfix(loss=f"{pending[-1].item():.3f}")
            step0, pending = step + 1, []
        if bar is not None:
            bar.update()
    if run.device.type == "cuda":  # CUDA only: the clock must include the work still queued on the GPU
        torch.cuda.synchronize(run.device)
    train_seconds = time.time() - t0  # the training loop alone, as the author's epoch_time (avg_epoch_time)
    check_finite_weights(run.net, epoch, run.ckpt_note)
    return _train_metrics(run, epoch, sums), train_seconds


def check_finite_weights(net, epoch, ckpt_note):
    """The losses are checked before each update; the epoch's LAST update can still leave the weights non-finite,
    and the end-of-epoch measurements would then die on them (an eigvalsh error): the same stop, one sync an epoch."""
    sums = [p.detach().float().sum() for p in net.parameters() if p.is_floating_point()]
    if sums and not bool(torch.isfinite(torch.stack(sums).sum())):
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}: the model diverged through its last "
                                 f"optimizer step (non-finite weights); stopped. {ckpt_note}")


def _train_metrics(run, epoch, sums) -> dict:
    """The epoch's row, its training part: from this rank's sums, summed over the ranks."""
    loss_sum, reg_sum, correct, n_seen, n_reg = all_reduce_sum(sums, run.dd).tolist()
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
    try:
        with run.ses.measuring():
            row["erank"] = _erank_ses_view(run.net, run.ses.collector, run.erank_batches, beta, run.device)
        row["erank_author"] = _erank_author_view(run.net, run.ses.collector, run.erank_test, beta,
                                                 eval_batch_size_of(run.c), run.amp_dtype)
    except torch.linalg.LinAlgError as e:  # activations too large for a spectrum: the last update diverged
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {row['epoch']}: the model diverged through its last optimizer step "
            f"(test loss {row['test_loss']:.3g}; its activations have no spectrum: {str(e).splitlines()[0][:80]}); "
            f"stopped. {run.ckpt_note}") from None


def _keep_best(run, row):
    """Rank 0 keeps a CPU copy of the best test-accuracy epoch's weights (the paper's model selection; never our
    headline). Strictly better: the first best epoch, as the author's `if acc > best_acc`."""
    if run.kind.keeps_best and run.dd.is_main and (run.best is None or row["test_acc"] > run.best["test_acc"]):
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
              f"~{format_hours(seconds_left(run.c['epochs'], row['epoch'], [r['epoch_seconds'] for r in run.history]))} left",
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
    write_progress(run.out_dir, run.c, run.history, run.device)


def _finish_run(run) -> dict:
    """Rank 0's end of the run: the final metrics (robustness passes included), model_final.pt and result.json;
    checkpoint.pt goes unless keep_checkpoint. Returns the result."""
    c = run.c
    t_eval = time.time()
    final = _final_metrics(run.history, c, run.net, run.device, run.evals, run.ses.collector, run.log, run.best)
    final["eval_seconds"] = time.time() - t_eval  # the final evaluation (robustness passes): for run estimates
    final["total_seconds"] = time.time() - run.t_start
    final.update(peak_memory_fields(run))  # measured beside estimated (GPU runs)
    result = {"config": c, "env": run.kind.env(run), "history": run.history, "final": final}
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
    if run.ses is not None:
        run.ses.remove()
    if run.tf32_before:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = run.tf32_before
    if run.cudnn_before:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = run.cudnn_before
    if run.threads_before is not None:
        torch.set_num_threads(run.threads_before)
    clear_corruption_cache()  # its operators are device tensors too (up to ~335 MB)
    free_fields(run, ("net", "model", "ses", "loader", "evals", "erank_batches", "erank_test", "mixer", "criterion",
                       "optimizer", "scheduler", "scaler", "best", "ck", "tokenizer", "pool"))


def free_fields(run, names):
    """Drop the run's references `names` (a traceback keeps the frames that name `run` alive) and hand the device
    memory back."""
    for name in names:
        setattr(run, name, None)
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def pause_now(history, c, epoch, end, dd) -> bool:
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


def write_progress(out_dir, c, history, device, paused=False):
    """progress.json beside the checkpoint: epochs done, measured epoch seconds, the GPU. Small, so the batch runner
    and `sesrun.py plan` can estimate the time left of an unfinished run without loading its checkpoint."""
    atomic_write_json(Path(out_dir) / "progress.json", {
        "epochs_done": len(history), "epochs": c["epochs"], "paused": paused, "time": time.time(),
        "epoch_seconds": [round(r["epoch_seconds"], 3) for r in history], "device": device_label(device)})


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
    if c.get("robustness"):  # image runs only
        test = evals["test"]
        n = c["robustness_subset"] or len(test.images)
        x, y = test.images[:n], test.labels[:n]
        d = resolve_data_dir(c["dataset"], c["data_root"])
        normalize = (c["norm_mean"], c["norm_std"])
        # the standard protocol (Hendrycks & Dietterich, pixel space) on the final weights: our headline
        final["robustness"] = evaluate_corruptions(
            model, x, y, corruptions=c["robustness"],
            severities=c["robustness_severities"], batch_size=eval_batch_size_of(c),
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


# ── the kinds of run the driver trains ──────────────────────────────────────────────────────────

@dataclasses.dataclass(frozen=True)
class RunKind:
    """What a kind of run supplies to the one driver (_train): its memory check, model and SES hooks, data (a loader:
    batches, len, state_dict), optimisation, optimiser step, evaluation, log tag and environment record. The rest is
    the driver's and the same for every kind: resume, the epoch loop, the time budget, checkpoints, result.json,
    release."""
    check_memory: Callable  # (run): CUDA only, before anything loads
    build_model: Callable  # (run): run.net and run.ses
    build_data: Callable  # (run): run.loader, run.evals, run.steps, run.erank_batches
    build_optimisation: Callable  # (run): run.optimizer, run.scheduler, run.scaler
    step: Callable  # (run, batch, sums) -> the loss: one optimiser step (seslib.steps)
    evaluate: Callable  # (run, row, beta): the epoch's held-out metrics and erank, into row
    tag: Callable  # (run) -> the run's name in its log lines
    env: Callable  # (run) -> result.json's env
    schedule_per_epoch: bool = True  # False: the step itself steps the schedule (the author's BERT warm-up)
    keeps_best: bool = True  # the best test-accuracy epoch's weights, for the paper's robustness protocol


def _image_batch_step(run, batch, sums):
    x, y = batch
    return image_step(run, x, y, sums)


def _image_tag(run) -> str:
    c = run.c
    return f"{c['dataset']}/{c['model']}{'+SES' if c['ses'] else ''} seed {c['seed']}"


RUN_KIND_STEPS = {
    "image": RunKind(estimate_image_memory, _build_model_and_ses, _build_data, _build_optimisation, _image_batch_step,
                     evaluate_epoch, _image_tag, _run_env),
    "text": RunKind(check_text_memory, build_text_model, build_text_data, build_text_optimisation, text_step,
                    evaluate_text_epoch, text_tag, text_env, schedule_per_epoch=False, keeps_best=False),
}


def train_text(cfg: dict) -> dict:
    """train() of an Exp 22 text run (cfg's kind set to "text")."""
    return train({**cfg, "kind": "text"})
