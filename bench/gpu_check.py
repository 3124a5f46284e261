"""What only a GPU can check, and what the cost plan and the placement assume, measured on it in one command (under
5 minutes on one T4; docs/memory.md "What only a GPU can check").

    python bench/gpu_check.py [--out bench/gpu_check] [--data-root DIR]
    python bench/gpu_check.py --cpu-dry-run [--out DIR]  # every code path on the CPU, tiny shapes, no GPU figure;
                                                         # it writes the JSON/md only where --out says

Each line printed reads `PASS <name>: ... (threshold ...)`, `FAIL <name>: ...` or `SKIP <name>: <why>` and is one entry
of "checks" in {out}/gpu_check.json (schema ses-gpu-check/2: the calibration `sesrun.py plan --calibration` reads) and
of {out}/gpu_check.md. The checks: fp16_train_resnet18 / _vit_attn (train() in fp16 with SES and GradScaler, real
CIFAR-100; ViT-Small with Exp 18's three hook targets), hooks_on_cuda, corruptions_on_cuda, ddp_two_gpus (torchrun,
NCCL, SyncBatchNorm) and slots_two_gpus (one run per GPU) - skipped on one GPU - and bert_peak_memory (BERT-base, random
weights, 32 x 128 fp16, SES on 12 layers, SDPA and eager attention, beside the author's 13.71 GB: bench/RESULTS.md).
The decisions, per run kind, its baseline and its SES config from the notebook's own paper preset (01 ResNet-18
CIFAR-10 batch 256 fp32; 11 ResNet-50 Tiny-ImageNet batch 256, amp bf16 = fp16 on a T4, cuDNN benchmark; 13 WRN-28-10
batch 512 fp16; 14 ViT-Small batch 512 fp16; 22 BERT-base SST-2 batch 32 x 128 fp16, SES on all 12 layers), timed on
SYNTHETIC batches already on the GPU with seslib's own step (steps.image_step / text_step), W=3 warm-up + M=5 steps:
  time_<row>      seconds per optimiser step beside the cost plan's (estimate_run over the epoch's steps)
  memory_<row>    max_memory_allocated beside estimate_memory's step_gb; a recipe batch that needs k GPUs of this kind
                  is measured at batch // k (one GPU's share) against that one-GPU config's estimate
  skipped_<row>   GradScaler's skipped steps (its scale fell at update); fp32/bf16: not applicable
  (ResNet-50 gets a bf16 row too where the GPU has bf16 natively: compute capability >= 8)
  ddp_equal       2 processes (NCCL; gloo in the dry run) against one on the same global batch: loss and gradients
  ddp_efficiency  images/s of Exp 11's SES step over 2 processes against its one-process row (DDP_EFFICIENCY)
  cuda_context    the CUDA context with cuBLAS/cuDNN loaded against estimates.MEM_CONTEXT_GB
T4 time, estimated (it has not run on one): the checks ~100 s (60 of it torchrun/slots, 2 GPUs only); the decisions
~75 s (2 x 8 steps per kind at the plan's T4 step times, ResNet-18 0.15-0.22 s, ResNet-50 at 128 0.45-0.52 s,
WRN-28-10 1.3-1.5 s, ViT-S 0.6-0.8 s, BERT 0.14-0.18 s: ~45 s, plus model builds, cuDNN autotuning, a few more fp16
warm-up steps while GradScaler calibrates, and estimate_memory's CPU traces of 1-2 s each); the DDP pair ~25 s (two
processes starting, 8 ResNet-50 steps): ~3.5 min on a T4 x2, ~2.5 min on one T4.
CIFAR-100 comes from --data-root, $SES_DATA or ./data (downloaded by torchvision when absent). Exit 0 when nothing
FAILs, 1 when one does; without a CUDA GPU (and no --cpu-dry-run): exit 2 and one line, before anything is written."""
import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# the thresholds (tests/test_gpu_check.py checks their boundaries)
MEM_BAND = (0.90, 1.25)  # estimate / measured: the estimator may run 10 % low or 25 % high of a step's peak
MAX_SKIPPED = 1  # GradScaler's skipped steps among the timed ones, per config (the first steps' overflows: warm-up)
TIME_BAND = (0.5, 2.0)  # the cost plan's seconds per step / measured: within a factor 2
DDP_RTOL = 1e-3  # loss and gradients, |a - b|max / |b|max per tensor, fp32 (TF32 off, deterministic cuDNN)
DDP_MIN_EFFICIENCY = 0.75  # the planner assumes estimates.DDP_EFFICIENCY (0.9): below, its DDP times run >20 % short
W, M = 3, 5  # warm-up and timed steps on a GPU
DRY_W, DRY_M = 1, 2  # ... in the dry run
# (notebook, baseline config, SES config) of each run kind the placement or the cost rests on; BERT's SES config: all 12
# layers, the one the memory check names (Exp 22's last-4 config holds less)
DECISIONS = (("01_training_dynamics", "baseline", "ses"), ("12_mixup_cutmix", "baseline", "ses"),
             ("11_resnet50_tinyimagenet", "baseline", "ses"), ("13_wrn28_10", "baseline", "ses"),
             ("14_vit", "vit_small_baseline", "vit_small_ses"), ("14_vit", "vit_tiny_baseline", "vit_tiny_ses"),
             ("22_bert_glue", "sst2_baseline", "sst2_ses_all"))  # ResNet-18 in fp32 (Exps 1-10) and fp16 (12, 16)
PAPER_GPU = "t4"  # the GPU the rows' precision is chosen for (amp bf16 runs fp16 there), and the dry run's estimates
EQUAL_NOTEBOOK = "01_training_dynamics"  # ddp_equal: a small ResNet-18 of this recipe
DDP_NOTEBOOK = "11_resnet50_tinyimagenet"  # ddp_efficiency: the run the planner places over 2 GPUs


def parse(argv):
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for gpu_check.json / .md (default bench/gpu_check; in a dry "
                   "run nothing is written unless --out is given)")
    p.add_argument("--data-root", default=None, help="folder holding cifar-100-python/ (default: $SES_DATA, ./data)")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every check on the CPU with cpu_amp and tiny "
                   "shapes (the GPU-only ones skip): tests this script, measures nothing about a GPU")
    return p.parse_args(argv)


# the dry run's sizes: fp16 convolutions are slow on a CPU, and it checks only that the script runs
CPU_SMALL = dict(batch_size=16, train_subset=32, test_subset=32, erank_eval_samples=32, max_steps_per_epoch=2,
                 width=0.125)


def tiny_cfg(data_root, dev, **kw):
    """A few steps of real CIFAR-100 on cuda:0 (or the CPU with cpu_amp) in fp16 with SES: each training check's."""
    return dict(dict(model="resnet18", dataset="cifar100", data_root=data_root, epochs=1, batch_size=64,
                     train_subset=256, test_subset=256, max_steps_per_epoch=3, erank_batches=1, erank_eval_samples=128,
                     width=0.25, log="none", device=dev.type, amp="fp16", cpu_amp=dev.type == "cpu", ses=True,
                     save_model=False, cudnn_deterministic=True), **(CPU_SMALL if dev.type == "cpu" else {}), **kw)


def bert_config(dry, **kw):
    """BERT-base's shape (random weights: no download), or in the dry run a 2-layer, 32-wide one (its code path, fast)."""
    from transformers import BertConfig
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if dry else {}
    return BertConfig(num_labels=2, **small, **kw)


# ── the checks: each returns its figures (a dict) or raises ──────────────────────────────────────

def check_fp16_train(S, data_root, dev, tmp, **kw):
    res = S.train(tiny_cfg(data_root, dev, out_dir=str(tmp / kw.get("model", "resnet18")), keep_checkpoint=True,
                           **kw))
    c, row = res["config"], res["history"][-1]
    scaler = torch.load(Path(c["out_dir"]) / "checkpoint.pt", weights_only=True)["scaler"]
    assert c["precision"] == "fp16" and res["env"]["device"].startswith(dev.type), (c["precision"], res["env"]["device"])
    assert scaler, "GradScaler was not enabled (its state is empty)"  # a disabled scaler saves {}
    bad = [k for k in ("train_loss", "test_loss", "ses_loss") if not math.isfinite(row[k] or float("nan"))]
    assert not bad, f"non-finite {bad}: {row}"
    assert 0 < row["train_seconds"] < row["epoch_seconds"]  # the clock waited for the GPU (torch.cuda.synchronize)
    return {"precision": c["precision"], "cudnn_deterministic": c["cudnn_deterministic"], "scale": scaler["scale"],
            "train_loss": round(row["train_loss"], 4), "ses_loss": round(row["ses_loss"], 4),
            "hooks": len(row["erank"]), "steps": row["steps"], "train_seconds": round(row["train_seconds"], 2),
            "peak_mem_mb": round(row["peak_mem_mb"], 1)}


def check_hooks_on_cuda(S, dev):
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = S.build_model("vit_small", 100, 32, width=0.25).to(dev).train()
    ses = S.SES(model, "last4", beta=0.5, lam=0.01, targets=["block", "attn_out", "attn_weights"])
    solves, real_eig = [], torch.linalg.eigvalsh

    def eig(m, *a, **k):
        solves.append((str(m.dtype), m.device.type, torch.is_autocast_enabled(dev.type)))
        return real_eig(m, *a, **k)
    B = 64 if dev.type == "cuda" else 16
    x, y = torch.randn(B, 3, 32, 32, device=dev), torch.randint(0, 100, (B,), device=dev)
    opt, scaler = torch.optim.AdamW(model.parameters(), 1e-3), torch.amp.GradScaler(dev.type)
    torch.linalg.eigvalsh = eig
    try:
        with S.autocast(dev, torch.float16):
            task = F.cross_entropy(model(x), y)
            acts = {n: (a.device.type, str(a.dtype)) for n, a in zip(ses.names, ses.collector.activations)}
            loss = task.float() + ses()  # SES called inside autocast: it must turn autocast off itself
    finally:
        torch.linalg.eigvalsh = real_eig
        ses.remove()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert len(acts) == 12 and all(d == dev.type for d, _ in acts.values()), acts
    assert any(n.endswith("attn_probs") for n in acts), "no attention-weight hook fired"
    assert solves and all(dt in ("torch.float32", "torch.float64") and not on for dt, _, on in solves), solves
    assert math.isfinite(loss.item())
    return {"hooks": len(acts), "activation_dtypes": sorted({dt for _, dt in acts.values()}),
            "eigvalsh": sorted({f"{dt} on {d}, autocast {on}" for dt, d, on in solves}), "loss": round(loss.item(), 4),
            "scale": scaler.get_scale()}


def check_corruptions_on_cuda(S, data_root, dev):
    torch.manual_seed(0)
    model = S.build_model("resnet18", 100, 32, width=0.25 if dev.type == "cuda" else 0.125).to(dev).eval()
    x, y = S.load_dataset("cifar100", data_root, "test", subset=256 if dev.type == "cuda" else 32)
    norm = (S.dataset_info("cifar100")["mean"], S.dataset_info("cifar100")["std"])
    cpu_amp = dev.type == "cpu"
    paper = S.evaluate_paper_protocol(model, x, y, normalize=norm, device=dev, amp="fp16", seed=0, cpu_amp=cpu_amp)
    std = S.evaluate_corruptions(model, x, y, corruptions=["gaussian_noise"], severities=[3], normalize=norm,
                                 device=dev, seed=0, amp="fp16", progress=False, cpu_amp=cpu_amp)
    assert paper["precision"] == "fp16" and len(paper["detail"]) == 15
    return {"paper_mean_acc": round(paper["mean_corruption_acc"], 2),
            "gaussian_noise_s3_acc": std["detail"]["gaussian_noise_s3"], "source": std["source"]["gaussian_noise"]}


def check_ddp_two_gpus(S, data_root, dev, tmp):
    n = torch.cuda.device_count()
    if n < 2 or dev.type != "cuda":
        return {"skipped": f"needs 2 GPUs, this machine shows {n} (its CPU twin: tests/test_ddp.py, gloo)"}
    cfg = tiny_cfg(data_root, dev, out_dir=str(tmp / "ddp"), batch_size=64)
    lines = []  # torchrun's output: kept for the report when the run fails
    try:
        res = S.train_torchrun(cfg, nproc=2, log=lines.append)
    except Exception as e:
        raise RuntimeError(f"{e}\n" + "\n".join(lines[-40:])) from None
    dist = res["env"]["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "nccl" and dist["sync_bn"] is True, dist
    assert all(math.isfinite(r["train_loss"]) for r in res["history"])
    return {"distributed": dist, "train_loss": round(res["history"][-1]["train_loss"], 4)}


def check_gpu_slots(S, data_root, dev, tmp):
    n = torch.cuda.device_count()
    if n < 2 or dev.type != "cuda":
        return {"skipped": f"needs 2 GPUs, this machine shows {n} (its CPU twin: tests/test_runner.py test_batch_slots)"}
    import sesrun as R
    procs = []
    for k, slot in enumerate(R.batch_slots("0,1")):  # each process sees its own GPU as cuda:0
        run = tmp / f"slot{k}"
        S.atomic_write_json(run / "config.json", tiny_cfg(data_root, dev, out_dir=str(run)))
        procs.append(subprocess.Popen([sys.executable, "-m", "seslib", "train", "--config",
                                       str(run / "config.json")], env={**S.with_package_on_path(os.environ), **slot["env"]},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]
    envs = [json.loads((tmp / f"slot{k}" / "result.json").read_text())["env"] for k in range(2)]
    seen = [(e["CUDA_VISIBLE_DEVICES"], e["device"]) for e in envs]
    assert len({v for v, _ in seen}) == 2 and all(d.startswith("cuda") for _, d in seen), seen
    return {"processes": [{"CUDA_VISIBLE_DEVICES": v, "device": d} for v, d in seen]}


def check_bert_peak_memory(S, dev):
    """Exp 22's step (seslib's text_step: fp16 autocast, GradScaler, clip 1.0, AdamW in the author's two groups) on a
    randomly initialised BERT-base at the recipe's batch 32 x 128 tokens, SES on all 12 layers, 3 steps per attention
    implementation: max_memory_allocated beside estimate_memory's step_gb. The dry run: a 2-layer BERT, 2 x 16
    tokens."""
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed"}
    cuda = dev.type == "cuda"
    batch, tokens = (32, 128) if cuda else (2, 16)
    c = S.resolve_text_config(dict(task="sst2", ses=True, ses_layers="all", device=dev.type, cpu_amp=not cuda,
                                   batch_size=batch, max_len=tokens))
    out = {"config": f"bert-base sst2 batch {batch} x {tokens} fp16 SES all-12, 3 steps", "published_gb": 13.71,
           "estimate_gb": S.estimate_memory(c, S.memory_gpu_kind(dev) if cuda else PAPER_GPU)["step_gb"]}
    for impl in ("sdpa", "eager"):
        out[f"measured_gb_{impl}"] = measure_config(S, c, dev, 0, 3, attn=impl)["peak_gb"]
    if cuda:
        out["ratio"] = round(out["estimate_gb"] / out["measured_gb_sdpa"], 3)
    return out


# ── the thresholds: (status, figure) from numbers alone ─────────────────────────────────────────

def within(value, lo=-math.inf, hi=math.inf) -> str:
    """"PASS" when lo <= value <= hi, else "FAIL": every threshold of the decisions is one such band."""
    return "PASS" if lo <= value <= hi else "FAIL"


def memory_verdict(estimate_gb, measured_gb):
    """(status, estimate / measured): PASS when MEM_BAND[0] <= estimate / measured <= MEM_BAND[1]."""
    return within(estimate_gb / measured_gb, *MEM_BAND), estimate_gb / measured_gb


def time_verdict(planned_s, measured_s):
    """(status, planned / measured): PASS when the cost plan's step time is within TIME_BAND of the measured one."""
    return within(planned_s / measured_s, *TIME_BAND), planned_s / measured_s


def skipped_steps(scales) -> int:
    """GradScaler's skipped steps in a run of steps, from its scale before the first and after each: a step whose
    gradients held an inf/NaN is skipped, and update() then lowers the scale (backoff), so each fall is one skip."""
    return sum(after < before for before, after in zip(scales, scales[1:]))


def max_rel_diff(got, ref) -> float:
    """max over the tensors of |got - ref|max / |ref|max, each tensor's scale floored at 1e-6 of the largest one's (a
    tensor of gradients near 0 would turn mere rounding into a large relative difference)."""
    floor = max(1e-6 * max(float(r.abs().max()) for r in ref), 1e-30)
    return max(float((g.double() - r.double()).abs().max()) / max(float(r.abs().max()), floor)
               for g, r in zip(got, ref))


# ── the decisions: one run kind's steps on synthetic batches ─────────────────────────────────────

def sync(dev):
    if dev.type == "cuda":  # CUDA only: the clock and the peak must include the work still queued on the GPU
        torch.cuda.synchronize(dev)


def amp_of(precision) -> str:
    return "off" if precision == "fp32" else precision


def measured_cfg(S, cfg, precision, batch, dev, **kw):
    """The recipe's config as measured here: its precision named, this batch, this device, nothing written; in the dry
    run a narrow model (width 0.125) or 16 tokens, with cpu_amp so fp16 runs (and GradScaler steps) on the CPU."""
    text = cfg["kind"] == "text"
    over = dict(amp=amp_of(precision), batch_size=batch, device=dev.type, out_dir=None, log="none")
    if dev.type == "cpu":
        over.update(cpu_amp=True, **({"max_len": 16} if text else {"width": 0.125}))
    return (S.resolve_text_config if text else S.resolve_config)({**cfg, **over, **kw})


def synthetic_batch(S, c, n, dev, seed=0):
    """n samples of c's shape and dtype, on the device (timing and memory do not depend on their values): normalised
    images and labels, or token ids (all real tokens) and labels."""
    g = torch.Generator().manual_seed(seed)
    if c["kind"] == "text":
        ids = torch.randint(1000, 30000, (n, c["max_len"]), generator=g)  # BERT's vocabulary: 30522 ids
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                 "labels": torch.randint(0, 2, (n,), generator=g)}
        return {k: v.to(dev) for k, v in batch.items()}
    info = S.dataset_info(c["dataset"])
    x = torch.randn(n, 3, info["img_size"], info["img_size"], generator=g)
    return x.to(dev), torch.randint(0, info["num_classes"], (n,), generator=g).to(dev)


def build_bert(S, run, attn=None):
    """text.build_text_model without its download: BERT-base's shape, random weights (2 layers in the dry run), its
    attention implementation transformers' default or `attn`."""
    from transformers import BertForSequenceClassification
    c, kw = run.c, {"attn_implementation": attn} if attn else {}
    run.net = BertForSequenceClassification(bert_config(run.device.type == "cpu", **kw))
    S.attach_text_ses(run)  # on the device, SES on its encoder layers: as text.build_text_model does
    run.steps = S.GLUE_TASKS[c["task"]]["sizes"][0] // c["batch_size"]  # a real epoch's: the warm-up schedule's length


def build_run(S, c, dev, dd=None, attn=None):
    """A _Run of the config c built as training._train builds it (its kind's optimisation, the backend flags, the model
    wrapped in DDP under a process group, epoch 0 started), but on no data: the caller feeds synthetic batches.
    training._release undoes it (hooks off, flags back, memory handed back)."""
    run = S.training._Run(c, dd or S.DistInfo(), dev, kind=S.RUN_KIND_STEPS[c["kind"]],
                          amp_dtype=S.amp_dtype_of(c["precision"]))
    S.set_seed(c["seed"])  # the same weights in every process (ddp_equal's reference included)
    build_bert(S, run, attn) if c["kind"] == "text" else S.training.model_and_ses(run)  # no data read
    S.training._set_backend_flags(run)  # TF32 and cuDNN benchmark/deterministic as the recipe sets them
    run.kind.build_optimisation(run)
    S.training._wrap_model(run)
    S.training._start_epoch(run, 0)
    return run


def warm_up(run, batch, sums, steps, extra=16) -> int:
    """`steps` steps (cuDNN autotuning, lazy initialisation), then on while GradScaler still backs off from its initial
    2^16 (its own calibration: each overflow halves it; at most `extra` more), so that the timed steps see the scale a
    run settles at and a skip among them is an overflow a run would keep meeting. Returns the steps taken."""
    fp16 = run.scaler.is_enabled()
    for i in range(steps + extra):
        before = run.scaler.get_scale() if fp16 else None
        run.kind.step(run, batch, sums)
        if i + 1 >= steps and (not fp16 or run.scaler.get_scale() >= before):
            return i + 1
    return steps + extra


def timed_steps(run, batch, warmup, timed):
    """(seconds per optimiser step, GradScaler's scales or None, the last loss, warm-up steps): warm_up, then `timed`
    steps between two synchronisations."""
    sums = torch.zeros(5, device=run.device, dtype=torch.float64)
    warmed = warm_up(run, batch, sums, warmup)
    fp16 = run.scaler.is_enabled()
    scales = [run.scaler.get_scale()] if fp16 else None
    sync(run.device)
    t0 = time.perf_counter()
    for _ in range(timed):
        loss = run.kind.step(run, batch, sums)
        if fp16:  # a host sync, as GradScaler.step's own inf check already is every step
            scales.append(run.scaler.get_scale())
    sync(run.device)
    return (time.perf_counter() - t0) / timed, scales, float(loss), warmed


def measure_config(S, c, dev, warmup, timed, attn=None):
    """One config's timed steps on a synthetic batch held on the device: seconds per step, the peak above what was
    allocated before the run was built (decimal GB, as estimate_memory; None on the CPU), skipped steps."""
    cuda = dev.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    run = build_run(S, c, dev, attn=attn)
    try:
        batch = synthetic_batch(S, c, c["batch_size"], dev)
        seconds, scales, loss, warmed = timed_steps(run, batch, warmup, timed)
        del batch
        peak = round((torch.cuda.max_memory_allocated(dev) - base) / 1e9, 3) if cuda else None
    finally:
        S.training._release(run)
    return {"seconds": seconds, "peak_gb": peak, "skipped": skipped_steps(scales) if scales else None, "loss": loss,
            "warmup": warmed}


def recipes(S, tmp):
    """{(notebook, baseline, ses): (its RunPlan, {config: resolved cfg})} of DECISIONS from each notebook's paper
    preset, as `sesrun.py plan` reads them (nothing trains, nothing is written)."""
    import sesrun as R
    out, plans = {}, {}
    for key in DECISIONS:
        nb, configs = key[0], key[1:]
        if nb not in plans:  # the notebook wherever this suite keeps it (notebooks/, or a Kaggle code dataset's root)
            plans[nb] = R.notebook_plan(R.find_notebooks([nb])[0], preset="paper", out_dir=str(Path(tmp) / nb))
        cfgs = {r.config: r.cfg for r in plans[nb].runs if r.config in configs}
        missing = set(configs) - set(cfgs)
        if missing:
            raise ValueError(f"{nb}: its paper preset has no config {sorted(missing)}")
        out[key] = (plans[nb], cfgs)
    return out


def recipe_of(recs, nb):
    """The first recipe of DECISIONS from notebook nb."""
    return recs[next(k for k in recs if k[0] == nb)]


def one_gpu_batch(S, cfgs, precision, kind):
    """(batch one GPU of `kind` runs, k): the recipe's batch when both configs fit one GPU, else its share under the
    DDP over k GPUs the placement picks (None when no k fits)."""
    ks = [S.estimate_memory(dict(c, amp=amp_of(precision)), kind)["gpus_needed"] for c in cfgs]
    k = None if None in ks else max(ks)
    B = cfgs[0]["batch_size"]
    return (B // k if k else None), k


def plan_step_seconds(S, plan, config, cfg, batch, kind):
    """The cost plan's seconds per optimiser step of `config` at `batch` on one GPU of `kind`: estimate_run's epoch (the
    paper's time scaled by GPU_SPEED, as `sesrun.py plan` estimates) over that epoch's steps."""
    e = S.estimate_run(cfg, kind, (plan.paper or {}).get(config), plan.paper_gpu)
    n = (S.GLUE_TASKS[cfg["task"]] if cfg["kind"] == "text" else S.DATASETS[cfg["dataset"]])["sizes"][0]
    return e["epoch_s"] / max(1, n // batch)


def line(status, name, text, seconds=0.0, figures=None) -> dict:
    """One printed line and its entry of the JSON's "checks"."""
    text = f"{status} {name}: {text}"
    print(text, flush=True)
    return {"check": name, "status": status, "line": text, "seconds": round(seconds, 1), "figures": figures or {}}


ROLE = {"baseline": "baseline", "ses": "SES"}


def row_lines(ctx, row, where, planned, seconds):
    """The time, memory and skipped-steps lines of one measured row (SKIP what a CPU cannot say)."""
    name, sps, est, peak, skip = (row["name"], row["seconds_per_step"], row["estimate_gb"], row["peak_gb"],
                                  row["skipped_steps"])
    said = f"baseline {sps['baseline']:.4f}, SES {sps['ses']:.4f} s/step (SES x{row['ses_overhead']:.2f})"
    figs = {"measured_s": sps, "planned_s": planned}
    if ctx.dry:
        out = [line("SKIP", f"time_{name}", f"CPU dry run, a CPU's seconds say nothing of a GPU ({said} on synthetic "
                    f"batches, {where})", seconds, figs),
               line("SKIP", f"memory_{name}", f"no max_memory_allocated on the CPU (the estimates ran: baseline "
                    f"{est['baseline']:.3f}, SES {est['ses']:.3f} GB at {where})", seconds, {"estimate_gb": est})]
    else:
        t, m = ({r: fn(a[r], b[r]) for r in a} for fn, a, b in ((time_verdict, planned, sps),
                                                                 (memory_verdict, est, peak)))
        worst = lambda v: "FAIL" if any(st == "FAIL" for st, _ in v.values()) else "PASS"  # noqa: E731
        out = [line(worst(t), f"time_{name}", f"{said} on synthetic batches, {where}; the cost plan's "
                    f"{planned['baseline']:.4f} / {planned['ses']:.4f} (threshold {TIME_BAND[0]} <= plan/measured <= "
                    f"{TIME_BAND[1]})", seconds, figs),
               line(worst(m), f"memory_{name}", ", ".join(f"{ROLE[r]} estimate {est[r]:.3f} / measured {peak[r]:.3f} "
                                                          f"GB = {v:.2f}" for r, (_, v) in m.items())
                    + f", {where} (threshold {MEM_BAND[0]:.2f} <= estimate/measured <= {MEM_BAND[1]:.2f})", seconds,
                    {"estimate_gb": est, "peak_gb": peak})]
    if skip["ses"] is None:
        return out + [line("SKIP", f"skipped_{name}", f"{row['precision']} has no GradScaler (not applicable)")]
    warm = row["warmup_steps"]
    return out + [line(within(max(skip.values()), hi=MAX_SKIPPED), f"skipped_{name}", f"GradScaler skipped baseline "
                       f"{skip['baseline']}, SES {skip['ses']} of {row['timed_steps']} timed steps, after "
                       f"{warm['baseline']} / {warm['ses']} warm-up steps (threshold: at most {MAX_SKIPPED} per "
                       "config)", seconds, {"skipped_steps": skip})]


def row_name(c, precision) -> str:
    text = c["kind"] == "text"
    return f"{'bert' if text else c['model']}_{c['task'] if text else c['dataset']}_{precision}"


def measure_kind(S, ctx, key, plan, cfgs, precision):
    """(the JSON's row, its lines) of one run kind at one precision: its baseline and SES configs, each at the batch one
    GPU of this kind runs (the recipe's, or its share of the DDP the placement picks), timed on synthetic batches."""
    t0, c, name, nb = time.time(), cfgs["ses"], row_name(cfgs["ses"], precision), key[0]
    text = c["kind"] == "text"
    batch, k = one_gpu_batch(S, list(cfgs.values()), precision, ctx.mem_kind)
    if batch is None:
        return None, [line("SKIP", name, f"batch {c['batch_size']} fits no {S.MAX_DDP_GPUS} x {ctx.mem_kind}")]
    where = f"batch {batch}" + (f" = {c['batch_size']}/{k}, one GPU's share of the recipe's DDP over {k} x "
                                f"{ctx.mem_kind}" if k > 1 else " (the recipe's, on one GPU)")
    run_batch = (2 if text else 4) if ctx.dry else batch
    if ctx.dry:
        where = f"dry run: batch {run_batch}, {'16 tokens' if text else 'width 0.125'} (a {ctx.mem_kind}: {where})"
    mc = {r: measured_cfg(S, cfg, precision, run_batch, ctx.dev) for r, cfg in cfgs.items()}
    est = {r: S.estimate_memory(cfg, ctx.mem_kind)["step_gb"] for r, cfg in mc.items()}
    got = {r: measure_config(S, cfg, ctx.dev, ctx.w, ctx.m) for r, cfg in mc.items()}
    planned = {r: round(plan_step_seconds(S, plan, ctx.configs[key][r], cfg, batch, ctx.time_kind), 4)
               for r, cfg in cfgs.items()}
    row = {"name": name, "notebook": nb, "model": c["model"], "dataset": None if text else c["dataset"],
           "task": c["task"] if text else None, "precision": precision, "recipe_batch": c["batch_size"],
           "measured_batch": run_batch, "max_len": mc["ses"]["max_len"] if text else None,
           "configs": ctx.configs[key],
           "seconds_per_step": {r: round(g["seconds"], 5) for r, g in got.items()},
           "ses_overhead": round(got["ses"]["seconds"] / got["baseline"]["seconds"], 3),
           "peak_gb": {r: g["peak_gb"] for r, g in got.items()}, "estimate_gb": est,
           "skipped_steps": {r: g["skipped"] for r, g in got.items()}, "timed_steps": ctx.m,
           "warmup_steps": {r: g["warmup"] for r, g in got.items()}}
    return row, row_lines(ctx, row, where, planned, time.time() - t0)


def row_precisions(S, ctx, cfg):
    """The precision each row of this kind runs: the recipe's amp as a T4 runs it (the paper's GPU: bf16 is fp16 there),
    and for ResNet-50 also bf16 where this GPU has it natively (a SKIP line where it has not)."""
    main = S.resolve_precision(cfg["amp"], "cuda", S.GPU_MEMORY[PAPER_GPU][1])[0]
    if cfg["model"] != "resnet50":
        return [main], []
    cap = None if ctx.dry else torch.cuda.get_device_capability(0)
    if ctx.dry or (cap[0] >= 8 and torch.cuda.is_bf16_supported()):
        return [main, "bf16"], []
    return [main], [line("SKIP", row_name(cfg, "bf16"), f"this GPU (compute capability {cap}) has no "
                         "native bf16 (capability >= 8); the recipe runs fp16 here")]


def run_decisions(S, ctx, recs):
    """The rows of every run kind of DECISIONS and their lines; a kind that fails is a FAIL line and no row."""
    steps, lines = [], []
    for key in DECISIONS:
        plan, cfgs = recs[key]
        cfgs = {"baseline": cfgs[key[1]], "ses": cfgs[key[2]]}
        precisions, skips = row_precisions(S, ctx, cfgs["ses"])
        lines += skips
        for precision in precisions:
            t0 = time.time()
            try:
                row, out = measure_kind(S, ctx, key, plan, cfgs, precision)
            except Exception as e:  # noqa: BLE001 - one kind's failure (out of memory, say) is its line, the rest run
                row, out = None, [line("FAIL", row_name(cfgs["ses"], precision), f"{type(e).__name__}: {str(e)[:300]}",
                                       time.time() - t0, {"traceback": traceback.format_exc(limit=6)})]
                if ctx.dev.type == "cuda":
                    torch.cuda.empty_cache()
            steps += [row] if row else []
            lines += out
    return steps, lines


# ── the DDP decision: 2 processes against one ───────────────────────────────────────────────────

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def equality_step(S, c, dev, dd):
    """One step of the config c on a fixed global batch: under DDP this rank's slice (DeviceLoader's), SES over the
    gathered batch, else all of it. (The global loss, the parameters' gradients on the CPU.)"""
    import torch.distributed as dist
    import torch.nn as nn
    run = build_run(S, c, dev, dd)
    try:
        if dev.type == "cpu":  # no SyncBatchNorm on a CPU: BatchNorm on its running statistics, on both sides
            for mod in run.net.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.eval()
        x, y = synthetic_batch(S, c, c["batch_size"], dev, seed=1)
        if dd.enabled:
            part = slice(dd.rank * len(y) // dd.world_size, (dd.rank + 1) * len(y) // dd.world_size)
            x, y = x[part], y[part]
        loss = run.kind.step(run, (x, y), torch.zeros(5, device=dev, dtype=torch.float64))
        if dd.enabled:  # the task loss is this rank's mean (SES's is the global batch's already): their mean
            dist.all_reduce(loss)
            loss /= dd.world_size
        return float(loss), [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu()
                             for p in run.net.parameters()]
    finally:
        S.training._release(run)


def ddp_worker(rank, port, backend, jobs, out):
    """One of the 2 processes torch.multiprocessing.spawn starts (as tests/test_ddp.py does): ddp_equal's step on its
    half of the batch, then ddp_efficiency's timed steps on its half; its figures to out/rank{rank}.pt."""
    import torch.distributed as dist
    sys.path.insert(0, str(ROOT))
    import seslib as S
    if backend == "gloo":  # the dry run: the loopback, one thread per rank (2 ranks on a 2-core CI box)
        quiet_dry_run()
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        torch.set_num_threads(1)
        dev = torch.device("cpu")
    else:
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(minutes=3))
    dd = S.DistInfo(rank, 2, rank, backend)
    try:
        loss, grads = equality_step(S, jobs["equal"], dev, dd)
        c = jobs["throughput"]
        run = build_run(S, c, dev, dd)
        try:
            batch = synthetic_batch(S, c, c["batch_size"] // 2, dev, seed=rank)
            seconds = timed_steps(run, batch, jobs["warmup"], jobs["timed"])[0]  # each step all-reduces: in step
        finally:
            S.training._release(run)
        torch.save({"loss": loss, "grads": grads, "seconds": seconds}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def ddp_jobs(S, ctx, recs):
    """ddp_equal's config (a small ResNet-18 of Exp 1's SES recipe, fp32, TF32 off, deterministic cuDNN, lambda 1 so
    SES's gradient counts) and ddp_efficiency's (Exp 11's SES config at its recipe batch, the row's precision)."""
    dry = {"sync_bn": False} if ctx.dry else {}  # the CPU has no SyncBatchNorm: say so once here, not as a warning
    eq = measured_cfg(S, recipe_of(recs, EQUAL_NOTEBOOK)[1]["ses"], "fp32", 8 if ctx.dry else 64, ctx.dev,
                      width=0.125 if ctx.dry else 0.25, tf32=False, cudnn_deterministic=True, ses_lambda=1.0, **dry)
    c = recipe_of(recs, DDP_NOTEBOOK)[1]["ses"]
    precision = S.resolve_precision(c["amp"], "cuda", S.GPU_MEMORY[PAPER_GPU][1])[0]
    tp = measured_cfg(S, c, precision, 8 if ctx.dry else c["batch_size"], ctx.dev, **dry)
    return {"equal": eq, "throughput": tp, "warmup": ctx.w, "timed": ctx.m}


def ddp_figures(S, ctx, jobs, ranks, steps) -> dict:
    """The 2 ranks' figures against one process: loss and gradients against the reference step run here, images/s
    against the ResNet-50 row's seconds per step (its one-GPU batch); efficiency = the ratio / 2."""
    ref_loss, ref_grads = equality_step(S, jobs["equal"], ctx.dev, S.DistInfo())
    tp = jobs["throughput"]
    one = next((s for s in steps if s["notebook"] == DDP_NOTEBOOK and s["precision"] == tp["precision"]), None)
    two_ips = tp["batch_size"] / max(r["seconds"] for r in ranks)
    one_ips = one["measured_batch"] / one["seconds_per_step"]["ses"] if one else None
    return {"max_loss_diff": max(abs(r["loss"] - ref_loss) / abs(ref_loss) for r in ranks),
            "max_grad_diff": max(max_rel_diff(r["grads"], ref_grads) for r in ranks),
            "efficiency": two_ips / (2 * one_ips) if one else None, "images_per_s_2": two_ips,
            "images_per_s_1": one_ips}


def check_ddp(S, ctx, recs, steps, tmp):
    """ddp_equal and ddp_efficiency (2 GPUs with NCCL; the dry run: 2 gloo processes on the CPU), and the JSON's "ddp"
    (None on one GPU): its status is ddp_equal's, and its efficiency is kept when it FAILs its floor (the planner plans
    with what was measured), none from the dry run (gloo on a CPU measures no GPU)."""
    n = torch.cuda.device_count()
    if not ctx.dry and n < 2:
        why = f"needs 2 GPUs, this machine shows {n} (its CPU twin: --cpu-dry-run, 2 gloo processes)"
        return None, [line("SKIP", "ddp_equal", why), line("SKIP", "ddp_efficiency", why)]
    import torch.multiprocessing as mp
    backend, t0 = "gloo" if ctx.dry else "nccl", time.time()
    ddp = {"gpus": 2, "backend": backend, "efficiency": None, "max_loss_diff": None, "max_grad_diff": None}
    try:
        jobs = ddp_jobs(S, ctx, recs)
        tmp.mkdir(parents=True, exist_ok=True)
        if ctx.dev.type == "cuda":
            torch.cuda.empty_cache()  # this process's cached blocks would crowd rank 0 on GPU 0
        mp.spawn(ddp_worker, args=(free_port(), backend, jobs, str(tmp)), nprocs=2, join=True)
        f = ddp_figures(S, ctx, jobs, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)], steps)
    except Exception as e:  # noqa: BLE001 - reported as the two lines
        last = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or [""]  # a rank's error: its traceback's end
        why = f"{type(e).__name__}: {last[0][:300]}"
        return {**ddp, "status": "FAIL"}, [line("FAIL", "ddp_equal", why, time.time() - t0, {"error": str(e)[-3000:]}),
                                           line("FAIL", "ddp_efficiency", why)]
    eq, tp, eff = jobs["equal"], jobs["throughput"], f["efficiency"]
    status = within(max(f["max_loss_diff"], f["max_grad_diff"]), hi=DDP_RTOL)
    lines = [line(status, "ddp_equal", f"2 processes ({backend}) vs one, a width-{eq['width']} ResNet-18 at global "
                  f"batch {eq['batch_size']}, fp32, TF32 off, SES (lambda 1) over the gathered batch, "
                  + ("BatchNorm on running statistics (no SyncBatchNorm on a CPU)" if ctx.dry else "SyncBatchNorm")
                  + f": loss {f['max_loss_diff']:.1e}, gradients {f['max_grad_diff']:.1e} max relative difference "
                  f"(threshold <= {DDP_RTOL:g} each)", time.time() - t0, f)]
    said = (f"Exp 11's SES step ({tp['precision']}) at global batch {tp['batch_size']} over 2 processes "
            f"{f['images_per_s_2']:.1f} images/s vs 1 process {f['images_per_s_1']:.1f} at its row's batch: "
            f"efficiency {eff:.2f}" if eff is not None else "no one-process ResNet-50 row to compare (it failed)")
    lines.append(line("SKIP", "ddp_efficiency", f"CPU dry run, gloo on a shared CPU says nothing of NCCL ({said})")
                 if ctx.dry else line(within(eff, lo=DDP_MIN_EFFICIENCY) if eff is not None else "FAIL",
                                      "ddp_efficiency", f"{said} (threshold >= {DDP_MIN_EFFICIENCY}; the planner "
                                      f"assumes {S.DDP_EFFICIENCY})"))
    ddp.update(max_loss_diff=f["max_loss_diff"], max_grad_diff=f["max_grad_diff"], status=status,
               efficiency=None if ctx.dry else eff)
    return ddp, lines


def check_context(S, ctx, memory):
    """The CUDA context after init, and with cuBLAS/cuDNN's handles loaded (the GPU's used memory less what torch's
    allocator holds, now), against MEM_CONTEXT_GB, what the placement subtracts from every GPU."""
    if ctx.dry:
        return line("SKIP", "cuda_context", "no CUDA context on the CPU")
    free, total = torch.cuda.mem_get_info(0)
    loaded = (total - free - torch.cuda.memory_reserved(0)) / 1e9
    status = "PASS" if loaded <= S.MEM_CONTEXT_GB else "FAIL"
    return line(status, "cuda_context", f"{memory['context_gb']:.3f} GB after CUDA init, {loaded:.3f} GB with "
                f"cuBLAS/cuDNN loaded (threshold <= {S.MEM_CONTEXT_GB} GB, estimates.MEM_CONTEXT_GB)", 0.0,
                {"context_gb": memory["context_gb"], "loaded_gb": round(loaded, 3)})


# ── running them, writing the figures ────────────────────────────────────────────────────────────

def run_checks(S, data_root, dev, tmp):
    checks = {
        "fp16_train_resnet18": lambda: check_fp16_train(S, data_root, dev, tmp),
        "fp16_train_vit_attn": lambda: check_fp16_train(S, data_root, dev, tmp, **VIT),
        "hooks_on_cuda": lambda: check_hooks_on_cuda(S, dev),
        "corruptions_on_cuda": lambda: check_corruptions_on_cuda(S, data_root, dev),
        "ddp_two_gpus": lambda: check_ddp_two_gpus(S, data_root, dev, tmp),
        "slots_two_gpus": lambda: check_gpu_slots(S, data_root, dev, tmp),
        "bert_peak_memory": lambda: check_bert_peak_memory(S, dev),
    }
    rows = []
    for name, fn in checks.items():
        t0 = time.time()
        try:
            figures = fn()
            gb = ", ".join(f"{k} {v}" for k, v in figures.items() if "_gb" in k and v is not None)  # BERT's
            status, text = ("SKIP", figures["skipped"]) if "skipped" in figures else \
                ("PASS", f"its assertions held{': ' + gb if gb else ''} (threshold: every assertion holds)")
        except Exception as e:  # noqa: BLE001 - every check runs; a failure is reported with its traceback
            figures = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
            status, text = "FAIL", f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(line(status, name, text, time.time() - t0, figures))
    return rows


VIT = dict(model="vit_small", ses_layers="last4", ses_beta=0.5, ses_targets=["block", "attn_out", "attn_weights"])


def quiet_dry_run():
    """The dry run's tiny batches make every SES target unreachable: seslib's warning says so once per layer shape."""
    import warnings
    warnings.filterwarnings("ignore", message="SES target effective rank")


def cuda_memory_at_start():
    """The GPU's memory and the CUDA context: total less free right after CUDA init (mem_get_info creates the context
    and allocates no tensor); other processes on the GPU count in it too."""
    free, _ = torch.cuda.mem_get_info(0)
    total = torch.cuda.get_device_properties(0).total_memory
    return {"total_gb": round(total / 1e9, 3), "context_gb": round((total - free) / 1e9, 3)}


def measure(S, a, dev, memory):
    """Every line: the checks, the decisions, the DDP pair, the context; the rows and the DDP figures."""
    dry = dev.type == "cpu"
    ctx = types.SimpleNamespace(dev=dev, dry=dry, w=DRY_W if dry else W, m=DRY_M if dry else M,
                                mem_kind=PAPER_GPU if dry else S.memory_gpu_kind(dev),
                                time_kind=PAPER_GPU if dry else S.gpu_kind(S.device_label(dev)),
                                configs={key: {"baseline": key[1], "ses": key[2]} for key in DECISIONS})
    steps, ddp = [], None
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        rows = run_checks(S, a.data_root, dev, Path(tmp))
        t0 = time.time()
        try:
            recs = recipes(S, tmp)
        except Exception as e:  # noqa: BLE001 - no recipe, no decision: one line says why
            return rows + [line("FAIL", "recipes", f"{type(e).__name__}: {e}", time.time() - t0)], steps, ddp
        steps, lines = run_decisions(S, ctx, recs)
        ddp, ddp_lines = check_ddp(S, ctx, recs, steps, Path(tmp) / "ddp")
    return rows + lines + ddp_lines + [check_context(S, ctx, memory)], steps, ddp


def markdown(report):
    lines = [f"# GPU check — {report['device']} × {report['gpus']}, torch {report['torch']}, {report['time']}", "",
             "| check | status | s | line |", "| --- | --- | ---: | --- |"]
    for r in report["checks"]:
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | {r['line'].replace('|', '/')} |")
    lines += ["", "Rows (synthetic batches): `" + json.dumps(report["steps"]) + "`", "",
              "DDP: `" + json.dumps(report["ddp"]) + "`"]
    return "\n".join(lines) + "\n"


def out_problem(out) -> str | None:
    """Why the folder `out` cannot take gpu_check.json (a file, or not writable), or None: known before minutes of
    measuring, not after them."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file: give a folder (it is created when missing)"
    try:  # made now (it will be written to), and a file tried in it: the one test that holds for root too
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        return f"--out {out} is not writable ({e.strerror or e}): give a writable folder"
    return None


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not a.cpu_dry_run:  # first: without a GPU nothing is made or written
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here): run it on a machine "
              "with one", file=sys.stderr)
        return 2
    if (a.out or not a.cpu_dry_run) and (why := out_problem(a.out or ROOT / "bench" / "gpu_check")):
        print(f"bench/gpu_check.py: {why}", file=sys.stderr)
        return 2
    dev, t0 = torch.device("cpu" if a.cpu_dry_run else "cuda"), time.time()
    if a.cpu_dry_run:
        quiet_dry_run()
    memory = cuda_memory_at_start() if dev.type == "cuda" else {"total_gb": None, "context_gb": None}
    sys.path.insert(0, str(ROOT))
    import seslib as S
    memory["usable_gb"] = (round((memory["total_gb"] - memory["context_gb"]) * (1 - S.MEM_FRAGMENTATION), 3)
                           if dev.type == "cuda" else None)
    rows, steps, ddp = measure(S, a, dev, memory)
    report = {"schema": "ses-gpu-check/2", "dry_run": a.cpu_dry_run, "device": S.device_label(dev),
              "gpu_kind": S.gpu_kind(S.device_label(dev)) if dev.type == "cuda" else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "time": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t0, 1), "memory": memory,
              "steps": steps, "ddp": ddp, "checks": rows}
    failed = any(r["status"] == "FAIL" for r in rows)
    print(f"{sum(r['status'] == 'FAIL' for r in rows)} FAIL, {sum(r['status'] == 'PASS' for r in rows)} PASS, "
          f"{sum(r['status'] == 'SKIP' for r in rows)} SKIP in {report['seconds']} s", flush=True)
    if a.out is None and a.cpu_dry_run:  # a dry run writes only where it is told to
        return 1 if failed else 0
    out = Path(a.out or ROOT / "bench" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    S.atomic_write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
