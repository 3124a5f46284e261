"""Cost of the SES loss: seslib's batched/Gram ses_loss vs the straightforward reference method
(per-layer d x d covariance + eigvalsh in a Python loop, as the published SES scripts do), and the
overhead of SES on a full training step. Everything runs in this one process on the same device.

    python bench/ses_cost.py                 # auto device
    python bench/ses_cost.py --device cpu --step-batch 64
"""
import argparse
import contextlib
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import seslib as S  # noqa: E402

warnings.filterwarnings("ignore", message="SES target")

SHAPES = {  # hook shapes of the paper's setups: (batch, [d_l])
    "ResNet-18 (9 hooks, B=512)": (512, [64, 64, 128, 128, 256, 256, 512, 512, 512]),
    "ViT-S/4 (12 x 384, B=512)": (512, [384] * 12),
    "ResNet-50 (4 x 2048, B=256)": (256, [2048] * 4),
}


def reference_ses_loss(acts_list, beta):
    """The reference scripts' method (d x d covariance and one eigvalsh per layer): seslib's impl="author", the one
    the suite times the paper's time claims with."""
    return S.ses_loss(acts_list, beta, impl="author")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def loss_fwd_bwd(loss_fn, B, dims, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    acts = [(torch.randn(B, d, generator=g) @ torch.randn(d, d, generator=g) / math.sqrt(d)).to(device)
            .requires_grad_() for d in dims]

    def step():
        loss_fn(acts, 0.7).backward()
    return step


def bench_losses(device, reps):
    rows = []
    for name, (B, dims) in SHAPES.items():
        t_ref = timeit(loss_fwd_bwd(reference_ses_loss, B, dims, device), device, reps)
        t_ses = timeit(loss_fwd_bwd(S.ses_loss, B, dims, device), device, reps)
        rows.append((name, t_ref * 1e3, t_ses * 1e3, t_ref / t_ses))
    print(f"\nSES loss forward+backward on {device_name(device)}")
    print(f"{'hook shapes':32s} {'reference ms':>13s} {'seslib ms':>10s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r[0]:32s} {r[1]:13.2f} {r[2]:10.2f} {r[3]:8.1f}x")
    return rows


def bench_steps(device, batch, reps):
    rows = []
    dtype = S.amp_dtype_of("auto", device)  # training's own rule: fp16 on a T4, bf16 from Ampere on, fp32 on CPU
    amp = dtype is not None
    for name, preset in (("resnet18", "blocks+pool"), ("vit_small", "all")):
        model = S.build_model(name, num_classes=100, img_size=32).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        col = S.ActivationCollector(model, preset)

        def step(ses_fn):
            col.clear()
            opt.zero_grad(set_to_none=True)
            with col.paused() if ses_fn is None else contextlib.nullcontext(), \
                    torch.autocast(device.type, dtype=dtype or torch.float32, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            if ses_fn is not None:
                loss = loss.float() + 0.01 * ses_fn(col.activations, 0.7)
            loss.backward()
            opt.step()

        # interleaved rounds, median per variant: a CPU's background noise hits all three alike
        fns = [lambda: step(None), lambda: step(reference_ses_loss), lambda: step(S.ses_loss)]
        for f in fns:
            f()
        times = [[timeit(f, device, 1, warmup=0) for f in fns] for _ in range(reps)]
        t_base, t_ref, t_ses = (statistics.median(ts) for ts in zip(*times))
        rows.append((name, t_base * 1e3, t_ref * 1e3, t_ses * 1e3, 100 * (t_ref / t_base - 1),
                     100 * (t_ses / t_base - 1)))
        col.remove()
    print(f"\nTraining step (batch {batch}, {'AMP ' + str(dtype).split('.')[-1] if amp else 'fp32'}) on {device_name(device)}")
    print(f"{'model':12s} {'baseline ms':>12s} {'ref SES ms':>11s} {'SES ms':>9s} {'ref overhead':>13s} {'overhead':>9s}")
    for r in rows:
        print(f"{r[0]:12s} {r[1]:12.1f} {r[2]:11.1f} {r[3]:9.1f} {r[4]:12.1f}% {r[5]:8.1f}%")
    return rows


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 GPU / 3 CPU; steps: 10 GPU / 5 CPU)")
    ap.add_argument("--step-batch", type=int, default=None, help="training-step batch (default 512 GPU / 32 CPU)")
    ap.add_argument("--skip-steps", action="store_true", help="only the loss benchmark")
    args = ap.parse_args()
    dev = S.pick_device(args.device)
    gpu = dev.type == "cuda"
    bench_losses(dev, args.reps or (20 if gpu else 3))
    if not args.skip_steps:
        bench_steps(dev, args.step_batch or (512 if gpu else 32), args.reps or (10 if gpu else 5))
