"""What only a GPU can check, in one command (a few minutes on one GPU; docs/memory.md "What only a GPU can check").

    python bench/gpu_check.py [--out bench/gpu_check] [--data-root DIR]
    python bench/gpu_check.py --cpu-dry-run   # the script itself on the CPU (cpu_amp): no GPU figure, nothing written

Each check is one row of {out}/gpu_check.json and {out}/gpu_check.md (both printed at the end):
  fp16_train_resnet18    train() on cuda:0 in the recipe's fp16 (autocast + GradScaler("cuda")), SES on, cuDNN
  fp16_train_vit_attn    deterministic: a quarter-width ResNet-18, and a ViT-Small with Exp 18's three hook targets
                         (block + attn_out + attention weights); a few steps of real CIFAR-100
  hooks_on_cuda          SES's hooks store CUDA activations under fp16 autocast, the attention weights included, and
                         every eigen-solve runs in float32/64 outside autocast; one GradScaler step
  corruptions_on_cuda    the paper protocol and a generated corruption, their noise from a CUDA generator
  ddp_two_gpus           a 2-process torchrun DDP run, one GPU each (NCCL, SyncBatchNorm): skipped on one GPU
  slots_two_gpus         the batch runner's placement: two runs at once, one process per GPU, each with the
                         CUDA_VISIBLE_DEVICES of sesrun.batch_slots("0,1"): skipped on one GPU
  peak_memory            torch.cuda.max_memory_allocated of a full-width recipe's steps (ResNet-18, CIFAR-100, batch
                         512, fp16: Exp 12/16's) vs seslib.estimate_memory, when seslib has it
  bert_peak_memory       the same for Exp 22's step: BERT-base (random weights, no download) at batch 32 x 128 tokens,
                         fp16, SES on all 12 layers, with transformers' SDPA and eager attention, beside the estimate
                         and the author's 13.71 GB (which the estimate does not explain: bench/RESULTS.md)
CIFAR-100 comes from --data-root, $SES_DATA or ./data (downloaded by torchvision when absent). Exit 0 when every check
passes (or is skipped), 1 when one fails; without a CUDA GPU: exit 2 and one line, before anything is written."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "gpu_check"), help="folder for gpu_check.json / .md")
    p.add_argument("--data-root", default=None, help="folder holding cifar-100-python/ (default: $SES_DATA, ./data)")
    p.add_argument("--cpu-dry-run", action="store_true", help="run the checks on the CPU with cpu_amp (the GPU-only "
                   "ones skip): tests this script, measures nothing about a GPU, writes nothing")
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


def check_peak_memory(S, data_root, dev, tmp):
    """A full-width Exp 12/16-style run (ResNet-18, CIFAR-100, batch 512, fp16, SES on 9 hooks, the whole training
    set on the GPU) for a few steps: its measured peak beside the estimate."""
    if dev.type != "cuda":
        return {"skipped": "GPU memory: CUDA only"}
    cfg = tiny_cfg(data_root, dev, width=1.0, batch_size=512, train_subset=None, test_subset=1024, max_steps_per_epoch=4,
                   erank_batches=4, erank_eval_samples=2048, out_dir=str(tmp / "peak"))
    torch.cuda.reset_peak_memory_stats()
    res = S.train(cfg)
    measured = torch.cuda.max_memory_allocated() / 1e9  # decimal GB, as the author's vram_peak_gb
    out = {"config": "resnet18 cifar100 batch 512 fp16 SES, 4 steps", "measured_gb": round(measured, 3),
           "published_gb": "1.43 (baseline) / 1.67 (SES), author's full run",
           # what the run itself recorded in result.json, where this seslib records it
           "recorded": {k: res["final"].get(k) for k in ("peak_mem_gb", "peak_mem_estimate_gb")}}
    estimate = getattr(S, "estimate_memory", None)
    if estimate is None:
        out["estimate"] = "skipped: this seslib has no estimate_memory"
        return out
    est = estimate(res["config"], S.gpu_kind(torch.cuda.get_device_name(0)))
    out.update(estimate_gb=round(est["peak_gb"], 3), ratio=round(est["peak_gb"] / measured, 3))
    return out


def check_bert_peak_memory(S, dev):
    """Exp 22's training step (seslib's own steps.text_step: fp16 autocast, GradScaler, clip 1.0, AdamW in the author's two
    groups) on a randomly initialised BERT-base at the recipe's batch 32 x 128 tokens, SES on all 12 layers, 3 steps
    per attention implementation: max_memory_allocated beside estimate_memory less its data (this step holds none).
    The CPU dry run takes the same path at batch 2 x 16 tokens and measures nothing."""
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed"}
    from transformers import BertConfig, BertForSequenceClassification
    cuda = dev.type == "cuda"
    batch, tokens = (32, 128) if cuda else (2, 16)
    c = S.resolve_text_config(dict(task="sst2", ses=True, ses_layers="all", device=dev.type, cpu_amp=not cuda,
                                   batch_size=batch, max_len=tokens))
    kind = S.gpu_kind(torch.cuda.get_device_name(0)) if cuda else "t4"
    est = S.estimate_memory(c, kind if kind in S.GPU_MEMORY else "t4")
    out = {"config": f"bert-base sst2 batch {batch} x {tokens} fp16 SES all-12, 3 steps", "published_gb": 13.71,
           "estimate_gb": round(est["peak_gb"] - est["data_gb"], 3)}
    for impl in ("sdpa", "eager"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run = S.training._Run(c, S.DistInfo(), dev, kind=S.RUN_KIND_STEPS["text"], amp_dtype=torch.float16, steps=3)
        run.net = run.model = BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation=impl)).to(dev)
        run.ses = S.SES(run.model, S.bert_hook_targets(run.model, "all"), beta=0.5, lam=0.01)
        S.build_text_optimisation(run)
        ids = torch.randint(1000, 30000, (batch, tokens), device=dev)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch,), device=dev)}
        sums = torch.zeros(5, device=dev, dtype=torch.float64)
        for _ in range(3):
            S.text_step(run, data, sums)
        if cuda:
            torch.cuda.synchronize()
        out[f"measured_gb_{impl}"] = round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None
        run.ses.remove()
        del run
    if cuda:
        out["ratio"] = round(out["estimate_gb"] / out["measured_gb_sdpa"], 3)
    return out


# ── running them, writing the figures ────────────────────────────────────────────────────────────

def run_checks(S, data_root, dev, tmp):
    vit = dict(model="vit_small", ses_layers="last4", ses_beta=0.5, ses_targets=["block", "attn_out", "attn_weights"])
    checks = {
        "fp16_train_resnet18": lambda: check_fp16_train(S, data_root, dev, tmp),
        "fp16_train_vit_attn": lambda: check_fp16_train(S, data_root, dev, tmp, **vit),
        "hooks_on_cuda": lambda: check_hooks_on_cuda(S, dev),
        "corruptions_on_cuda": lambda: check_corruptions_on_cuda(S, data_root, dev),
        "ddp_two_gpus": lambda: check_ddp_two_gpus(S, data_root, dev, tmp),
        "slots_two_gpus": lambda: check_gpu_slots(S, data_root, dev, tmp),
        "peak_memory": lambda: check_peak_memory(S, data_root, dev, tmp),
        "bert_peak_memory": lambda: check_bert_peak_memory(S, dev),
    }
    rows = []
    for name, fn in checks.items():
        t0 = time.time()
        try:
            figures = fn()
            status = "skip" if "skipped" in figures else "pass"
        except Exception as e:  # noqa: BLE001 - every check runs; a failure is reported with its traceback
            figures, status = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}, "fail"
        rows.append({"check": name, "status": status, "seconds": round(time.time() - t0, 1), "figures": figures})
        print(f"[{status}] {name} ({rows[-1]['seconds']} s)", flush=True)
    return rows


def markdown(report):
    lines = [f"# GPU check — {report['device']} × {report['gpus']}, torch {report['torch']}, {report['time']}", "",
             "| check | status | s | figures |", "| --- | --- | ---: | --- |"]
    for r in report["checks"]:
        figs = {k: v for k, v in r["figures"].items() if k != "traceback"}
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | `{json.dumps(figs, default=str)}` |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available() and not a.cpu_dry_run:
        print("bench/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False here): run it on a machine "
              "with one", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    import seslib as S
    dev, t0 = torch.device("cpu" if a.cpu_dry_run else "cuda"), time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        rows = run_checks(S, a.data_root, dev, Path(tmp))
    report = {"device": S.device_label(dev), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "time": time.strftime("%Y-%m-%d %H:%M"),
              "seconds": round(time.time() - t0, 1), "checks": rows}
    if a.cpu_dry_run:  # no GPU figure to keep
        print(markdown(report))
        return 1 if any(r["status"] == "fail" for r in rows) else 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    S.atomic_write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report) + f"\nwritten: {out / 'gpu_check.json'}, {out / 'gpu_check.md'} ({report['seconds']} s)")
    return 1 if any(r["status"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
