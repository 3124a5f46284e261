"""Estimates: a run's time (the time budget, `sesrun.py plan`), its GPU memory traced on fake tensors
(estimate_memory, image and text runs), and where it fits (placement: one GPU or DDP over k)."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import types
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode  # estimate_memory's stand-in for a GPU's fused attention

from .ses import SES, warned_unreachable
from .util import amp_dtype_of, device_label, pick_device, read_only, resolve_precision
from .data import DATASETS, GLUE_TASKS, SYNTHETIC_SIZES, dataset_info
from .models import CNN_MODELS, TINY_BERT, bert_hook_targets, build_model, text_param_groups, text_skeleton
from .steps import image_step, text_step
from .corruptions import resolve_corruptions
from .runs import MODEL_COST, config_diff, data_scale, read_result


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


def gpu_speed(kind) -> float:
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
    cells = len(resolve_corruptions(c["robustness"])) * len(c.get("robustness_severities") or (1, 2, 3, 4, 5)) + 30
    return epoch_s / _steps_fraction(c) * cells * n_test / (3 * n_train)


def _paper_t4_epoch_seconds(c, paper_entry=None, paper_gpu=None):
    """(seconds per full epoch on a T4, source) from the paper."""
    if paper_entry and paper_entry.get("epoch_s"):
        kind = gpu_kind(paper_gpu or "Tesla T4")
        return paper_entry["epoch_s"] * gpu_speed(kind), f"paper ({paper_gpu or 'T4'})"
    s = _RESNET18_T4_EPOCH_S[bool(c.get("ses"))] * MODEL_COST.get(c.get("model"), 1.0) * data_scale(c)
    return s, "est. from the paper's ResNet-18 times"


def seconds_left(epochs, epochs_done, epoch_seconds) -> float:
    """A run's training seconds left at the mean of its measured epochs (its history, or its progress.json's
    epoch_seconds); the final evaluation not included."""
    return (epochs - epochs_done) * float(np.mean(epoch_seconds)) if len(epoch_seconds) else 0.0


def checkpoint_bytes(weight_bytes, c) -> int:
    """An image run's checkpoint.pt for a model of weight_bytes: the weights, the optimiser state (SGD momentum 1x,
    AdamW 2x) and the best epoch's copy, plus a MiB of history and RNG state. The preflight's disk check and the cost
    plan's disk estimate both use it."""
    return weight_bytes * (2 + (2 if c.get("optimizer") == "adamw" else 1)) + (1 << 20)


def estimate_run(c, gpu, paper_entry=None, paper_gpu=None, measured=None, progress=None, calibrated=None) -> dict:
    """{seconds, epoch_s, epochs_left, source} for the resolved config c on a `gpu` kind. measured: a finished run
    of the same config {epoch_s, eval_s, gpu}; progress: this run's progress.json (epochs done, epoch seconds);
    calibrated: {epoch_s, source} from a GPU's measured steps (calibration.calibrated_epoch), used before the paper's."""
    if c.get("kind") == "toy":  # the toy study
        return {"seconds": TOY_RUN_SECONDS, "epoch_s": TOY_RUN_SECONDS / c["epochs"], "epochs_left": c["epochs"],
                "source": "measured (CPU)"}
    if c.get("model") == TINY_BERT:  # Exp 22's smoke model: seconds on any device, whatever the paper's BERT took
        return {"seconds": TINY_BERT_RUN_SECONDS, "epoch_s": TINY_BERT_RUN_SECONDS / c["epochs"],
                "epochs_left": c["epochs"], "source": "measured (CPU)"}
    speed, frac = gpu_speed(gpu), _steps_fraction(c)
    eval_s = None
    done = (progress or {}).get("epochs_done", 0)
    own = (progress or {}).get("epoch_seconds") or []
    if own and gpu_kind(progress.get("device")) == gpu:
        epoch_s, source = float(np.mean(own)), "measured (this run)"
    elif measured:
        k = GPU_SPEED.get(gpu_kind(measured["gpu"]), 1.0) / speed
        epoch_s, source = measured["epoch_s"] * k, f"measured ({measured['gpu']})"
        eval_s = measured["eval_s"] * k if measured.get("eval_s") is not None else None
    elif calibrated:
        epoch_s, source = calibrated["epoch_s"], calibrated["source"]
    else:
        t4, source = _paper_t4_epoch_seconds(c, paper_entry, paper_gpu)
        epoch_s = t4 / speed * frac
    left = max(0, c["epochs"] - done)
    if eval_s is None:
        eval_s = estimate_eval_seconds(c, epoch_s)
    return {"seconds": left * epoch_s + eval_s, "epoch_s": epoch_s, "epochs_left": left, "source": source}


def _measured(run_dir) -> dict | None:
    """A finished run's measured epoch and evaluation seconds and its GPU, from result.json."""
    r = read_result(Path(run_dir) / "result.json")
    fin = (r or {}).get("final") or {}
    if not fin.get("epoch_seconds_mean"):
        return None
    return {"epoch_s": fin["epoch_seconds_mean"], "eval_s": fin.get("eval_seconds"),
            "gpu": (r.get("env") or {}).get("device_name", "cpu")}


def run_estimate(run, paper=None, paper_gpu=None, gpu=None, calibrated=None) -> dict:
    """estimate_run for one planned run: its progress.json, another finished seed of its config, a GPU's measured
    step (calibrated: c -> {epoch_s, source} or None, see calibration.calibrated), the paper."""
    if gpu is None:
        dev = pick_device((run.cfg or {}).get("device", "auto"))
        gpu = gpu_kind(device_label(dev)) if dev.type == "cuda" else "cpu"
    progress = read_result(run.run_dir / "progress.json")
    same = sorted(run.run_dir.parent.glob(f"{run.config}_seed*")) if run.run_dir.parent.is_dir() else []
    measured = _measured_like(run, [d for d in same if d != run.run_dir])
    c = run.cfg or {}
    return estimate_run(c, gpu, (paper or {}).get(run.config), paper_gpu, measured, progress,
                        calibrated(c) if calibrated else None)


def _measured_like(run, run_dirs):
    """The first finished run among run_dirs made with this run's config up to the seed (so its epoch time counts)."""
    for d in run_dirs:
        m = _measured(d)
        if m is None or run.cfg is None:
            continue
        then = (read_result(d / "result.json") or {}).get("config") or {}
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
# Placement's safety margin on the traced part of a run (not on our data, whose bytes are exact): every one of the 38
# image peaks the author published lies at or above the estimate less data, at ratios 0.83-1.00 (bench/RESULTS.md);
# 1 / 0.83 = 1.20, rounded up to the estimator's tolerance: a run is placed on a GPU only when 1.25 x its traced peak
# plus its data fits (tests/test_memory.py checks that no published peak lands on a GPU it would not fit).
MEM_MARGIN = 0.25
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
    """Whether c is an Exp 22 text run's config (its kind, as every resolved config states it)."""
    return c.get("kind") == "text"


@functools.lru_cache(maxsize=None)
def _live_bytes_class():
    """_LiveBytes, defined on first use: its base TorchDispatchMode is private torch API, imported only when a trace
    runs, so `import seslib` never depends on where a torch release keeps it."""
    from torch.utils._python_dispatch import TorchDispatchMode

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
    return _LiveBytes


def _live_bytes():
    """A fresh _LiveBytes tracer (see _live_bytes_class)."""
    return _live_bytes_class()()


@contextlib.contextmanager
def _cuda_fp32_ops(mem, dtype):
    """While code runs CPU autocast at a reduced precision (dtype fp16/bf16), the ops CUDA's autocast keeps in float32
    run in float32 in the trace too (see _LiveBytes); fp32 (dtype None): nothing."""
    mem.fp32_ops = dtype is not None
    try:
        yield
    finally:
        mem.fp32_ops = False


@contextlib.contextmanager
def _traced_autocast(mem, dtype):
    """The GPU's autocast on the trace's fake CPU tensors (torch.autocast("cuda") needs a GPU): CPU autocast (the same
    fp16/bf16 ops: convolutions, matmuls) with CUDA's float32 ops; fp32 (dtype None): nothing."""
    with _cuda_fp32_ops(mem, dtype), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        yield


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


class _MeasuredSES:
    """The run's SES as the traced step calls it: the bytes SES holds at the loss (its pooled activations and its graph:
    centred activations, Gram or covariance matrices, eigenvectors) are measured around the call."""

    def __init__(self, ses, mem):
        self.ses, self.mem, self.bytes = ses, mem, 0

    def __call__(self, **kw):
        pooled = sum(-(-a.nbytes // 512) * 512 for a in self.ses.collector._acts.values())
        before = self.mem.live
        loss = self.ses(**kw)
        self.bytes = pooled + self.mem.live - before if pooled else 0
        return loss

    def __getattr__(self, name):
        return getattr(self.ses, name)


def _traced_run(c, net, ses, opt, dtype, classes):
    """The fields the training step reads, for the trace: the GPU's autocast dtype on the CPU device (_traced_autocast
    makes it the GPU's), the tracer's optimiser, a disabled GradScaler (scaling changes no tensor's size), Mixup/CutMix
    as its soft targets (the mixer's own copy of the batch is not counted) and no per-step schedule to speak of."""
    mixer = (lambda x, y: (x, torch.empty(len(y), classes))) if c.get("mix", "none") != "none" else None
    return types.SimpleNamespace(
        c=c, net=net, model=net, ses=ses, optimizer=opt, device=torch.device("cpu"), amp_dtype=dtype, mixer=mixer,
        criterion=None, gather=None, pool=None, scaler=torch.amp.GradScaler("cpu", enabled=False),
        scheduler=types.SimpleNamespace(step=lambda: None))


def _traced_step(c, net, ses, opt, mem, dtype, batch, size) -> int:
    """One training step, traced: the very step the training runs (seslib.steps: image_step, text_step) on a fake
    batch held through it, as the loop holds it. Returns the bytes SES holds at the loss."""
    x, y = _traced_inputs(c, batch, size), torch.zeros(batch, dtype=torch.long)
    measured = _MeasuredSES(ses, mem)
    sums = torch.zeros(5, dtype=torch.float64)
    classes = None if _is_text(c) else dataset_info(c["dataset"])["num_classes"]
    run = _traced_run(c, net, measured, opt, dtype, classes)
    with _cuda_fp32_ops(mem, dtype):  # the step enters the run's autocast itself (its device: this CPU)
        if _is_text(c):
            text_step(run, {**x, "labels": y}, sums)
        else:
            image_step(run, x, y, sums)
    return measured.bytes


def _trace_memory(c, batch, eval_batch, precision) -> dict:
    """Bytes of c's model at `precision`: weights, gradients, optimizer (state), and over them the training step's
    peak at `batch` (activations, with SES's share apart: ses) and an evaluation forward's at `eval_batch`."""
    text = _is_text(c)
    dtype, size = amp_dtype_of(precision), None if text else dataset_info(c["dataset"])["img_size"]
    warned = set(warned_unreachable)  # SES warns once per shape: the real run must still say it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SES's unreachable-target warning (a shape, not this estimate's business)
        net, mode = _fake_model(c)
        with mode, _live_bytes() as mem, _FusedSDPA() if text else contextlib.nullcontext():
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
    warned_unreachable.intersection_update(warned)
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
    zoom = len(c["robustness_severities"]) * hw * hw * 4 if "zoom_blur" in resolve_corruptions(c["robustness"]) else 0
    return zoom + 4 * eval_batch * 3 * hw * 4


def memory_gpu_kind(device) -> str:
    """The GPU_MEMORY name of a CUDA device's kind, a T4's when GPU_MEMORY lacks it (the estimate made for the GPU
    the paper preset targets)."""
    kind = gpu_kind(device_label(device))
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


def estimate_memory(c, gpu="t4", usable_gb=None) -> dict:
    """The peak GPU memory of the run c (a resolved config: validate_config, or resolve_text_config for an Exp 22 text
    run: one GPU, no DDP, its attention as a GPU's fused kernel keeps it) on a `gpu` kind (GPU_MEMORY's names, and
    'cpu'), in a few seconds on the CPU (the traces are cached). A dict whose keys stay as they are:
      gpu, precision: the kind, and what c's amp runs at on it (bf16 needs compute capability >= 8: fp16 on a T4);
      peak_gb: decimal GB of torch.cuda.max_memory_allocated() over the run on one GPU (the author's vram_peak_gb);
      need_gb: what must fit: peak_gb less cuDNN's autotuning trials (CNNs with cudnn_deterministic False), which
        take only free memory, its traced part (all but our data) times 1 + MEM_MARGIN (the estimator runs low by
        up to 17 % against the published peaks);
      total_gb, usable_gb: the GPU's memory, and what tensors can use of it: less MEM_CONTEXT_GB (CUDA context) and
        MEM_FRAGMENTATION (allocator) - a T4: 15.8 GB, 14.5 usable; usable_gb given (a GPU's measured figure,
        bench/gpu_check.py): that instead;
      fits: need_gb <= usable_gb; gpus_needed: the fewest GPUs of this kind (DDP, the batch split; at most
        MAX_DDP_GPUS, dividing batch_size) it fits on, None if none;
      per_gpu_gb: {k: each GPU's peak_gb under DDP over k GPUs} for k = 1..MAX_DDP_GPUS dividing batch_size;
      need_per_gpu_gb: {k: need_gb under DDP over k GPUs}; train_per_gpu_gb: {k: each GPU's peak over the training
        steps alone} (what the run-time memory guard compares its first steps with);
      data_gb: our on-device data (train/test sets, erank inputs; a text run's tokenised sets), which the author's
        DataLoaders kept off the GPU;
      step_gb: the training step's peak on one GPU without that data (weights, gradients, optimizer state,
        activations, SES, cuDNN autotuning): what a few steps on synthetic batches measure (bench/gpu_check.py);
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
    eval_batch = c["eval_batch_size"] or (1 if text else 2) * c["batch_size"]  # as eval_batch_size_of (distributed room)
    t = _memory_trace(c, c["batch_size"], eval_batch, precision)
    data = _text_data_bytes(c) if text else _data_bytes(c)
    corr = 0 if text else _corruption_bytes(c, eval_batch)
    tunes = on_gpu and not c.get("cudnn_deterministic", True) and c["model"] in CNN_MODELS  # a ViT's one conv: little
    autotune = CUDNN_AUTOTUNE * t["activations"] if tunes else 0.0
    usable = usable_gb if usable_gb else usable_gb_of(total) if on_gpu else total
    per_gpu, need, train = {}, {}, {}
    for k in (k for k in range(1, 2 if text else MAX_DDP_GPUS + 1) if c["batch_size"] % k == 0):
        terms = _gpu_terms(t, data, corr, autotune, k)[1]
        per_gpu[k] = sum(terms.values()) / 1e9
        traced = per_gpu[k] - (data + terms.get("cuDNN autotuning (benchmark)", 0)) / 1e9
        need[k] = traced * (1 + MEM_MARGIN) + data / 1e9
        steps = _gpu_terms(dict(t, evaluation=0), data, 0, autotune, k)[1]  # the training phase's terms
        train[k] = sum(steps.values()) / 1e9
    phase, terms = _gpu_terms(t, data, corr, autotune, 1)
    step = t["weights"] + t["gradients"] + t["optimizer"] + t["activations"] + t["ses"] + autotune  # no data
    fits_on = next((k for k in need if need[k] <= usable), None)
    top = sorted(((v, name) for name, v in terms.items() if v > 0), reverse=True)[:4]
    why = (f"{phase} at batch {c['batch_size']} in {precision} sets the peak: "
           + ", ".join(f"{name} {v / 1e9:.2f} GB" for v, name in top))
    return {"gpu": str(gpu).lower(), "precision": precision, "peak_gb": round(per_gpu[1], 3),
            "need_gb": round(need[1], 3), "total_gb": round(total, 2), "usable_gb": round(usable, 2),
            "fits": fits_on == 1, "gpus_needed": fits_on, "per_gpu_gb": {k: round(v, 3) for k, v in per_gpu.items()},
            "need_per_gpu_gb": {k: round(v, 3) for k, v in need.items()},
            "train_per_gpu_gb": {k: round(v, 3) for k, v in train.items()},
            "data_gb": round(data / 1e9, 3), "step_gb": round(step / 1e9, 3),
            "terms": {name: round(v / 1e9, 3) for name, v in terms.items()},
            "why": why}


def usable_gb_of(total_gb) -> float:
    """What tensors can use of a GPU of total_gb: less the CUDA context and the allocator's fragmentation."""
    return (total_gb - MEM_CONTEXT_GB) * (1 - MEM_FRAGMENTATION)


def guard_target(device):
    """(GPU kind, its memory in GB as torch reports it) of a CUDA device: what a run's estimate and its memory guard
    are made for. CUDA only: None on the CPU, which has no max_memory_allocated (the guard's CPU twin is tested by
    giving this a GPU and the run a fake measured peak, tests/test_memory.py)."""
    if device.type != "cuda":
        return None
    return memory_gpu_kind(device), torch.cuda.get_device_properties(device).total_memory / 1e9


# The run-time memory guard (training's guard_memory): after its first steps a CUDA run compares its measured peak
# with the estimate. The estimate scaled by what it missed must leave GUARD_HEADROOM of the usable memory free for the
# whole run (its evaluation and robustness pass come later), else the run stops at once, before hours are spent.
GUARD_STEPS = 3
GUARD_HEADROOM = 0.05


def memory_guard_verdict(measured_gb, est) -> dict:
    """{stop, ratio, projected_gb, limit_gb}: est {peak_gb, train_gb, usable_gb} (a run's guard estimate at its
    world size), measured_gb the peak of its first steps. ratio = measured / the training steps' estimate; the run's
    whole peak projected = the estimate's peak x max(1, ratio); stop when that or the measured peak is over the usable
    memory less GUARD_HEADROOM."""
    ratio = measured_gb / est["train_gb"] if est.get("train_gb") else 1.0
    projected = est["peak_gb"] * max(1.0, ratio)
    limit = est["usable_gb"] * (1 - GUARD_HEADROOM)
    return {"stop": max(measured_gb, projected) > limit, "ratio": ratio, "projected_gb": projected, "limit_gb": limit}


def guard_estimate(c, gpu, total_gb, world_size=1, must_fit=False) -> dict:
    """What a CUDA run records at its start (result.json's peak_mem_estimate_gb) and its guard compares with:
    {gpu, peak_gb, train_gb, usable_gb} on each of world_size GPUs of this kind, usable from the device's own
    memory. must_fit: a PreflightError-worthy ValueError when it cannot fit (text runs: one GPU, no DDP)."""
    est = estimate_memory(c, gpu, usable_gb_of(total_gb))
    k = world_size if world_size in est["per_gpu_gb"] else 1
    if must_fit and est["need_per_gpu_gb"][k] > est["usable_gb"]:
        raise ValueError(f"this run cannot start: it needs {est['need_per_gpu_gb'][k]:.1f} GB on one {gpu} "
                         f"({est['usable_gb']:.1f} usable; {est['why']}); lower batch_size or max_len")
    return {"gpu": gpu, "peak_gb": est["per_gpu_gb"][k], "train_gb": est["train_per_gpu_gb"][k],
            "usable_gb": est["usable_gb"]}


DDP_EFFICIENCY = 0.9  # a DDP run over k GPUs trains ~0.9 k times as fast (an all-reduce per step): assumed, not measured


def placeable(c) -> bool:
    """Whether estimate_memory knows c's model and data: image runs, and Exp 22's text runs of bert-base-uncased or
    TINY_BERT (not the toy study)."""
    if _is_text(c):
        return text_skeleton(c) is not None
    return c.get("model") in MODEL_COST and c.get("dataset") in DATASETS


def placement(c, gpu="t4", n_gpus=1, usable_gb=None) -> dict:
    """Where the run c goes on a machine of n_gpus GPUs of kind gpu, by estimate_memory's need_gb (the estimate with
    MEM_MARGIN): one GPU; one DDP run over k of them (SyncBN and SES over the global batch, so BN and SES see the
    batch the recipe names: no gradient accumulation); or nowhere on this machine. usable_gb: a GPU's measured usable
    memory (a calibration) instead of GPU_MEMORY's. {"gpus": k (0: does not fit), "peak_gb": each GPU's estimated
    peak, "text", "memory"}."""
    m = estimate_memory(c, gpu, usable_gb)
    k = m["gpus_needed"]
    if k == 1:
        return {"gpus": 1, "peak_gb": m["peak_gb"], "text": f"1 × {gpu}", "memory": m}
    if k is not None and k <= n_gpus:
        return {"gpus": k, "peak_gb": m["per_gpu_gb"][k], "memory": m,
                "text": f"one DDP run over {k} × {gpu}: {m['need_per_gpu_gb'][k]:.1f} GB must fit on each (the "
                        f"estimate + {MEM_MARGIN:.0%}; one {gpu} holds {m['usable_gb']:.1f}; on one alone: "
                        f"{m['need_gb']:.1f})"}
    over = (f"{k} × {gpu} by DDP" if k else f"more than {MAX_DDP_GPUS} × {gpu}" if len(m["per_gpu_gb"]) > 1 else
            "and it runs on one GPU (no DDP)")
    return {"gpus": 0, "peak_gb": m["peak_gb"], "memory": m,
            "text": f"does not fit this machine: needs {m['need_gb']:.1f} GB on one {gpu} ({m['usable_gb']:.1f} usable), "
                    f"{over}; this machine has {n_gpus}"}
