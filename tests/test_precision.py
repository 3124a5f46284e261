"""Every precision path run on the CPU (issue 22): cpu_amp=True makes a CPU run use the recipe's fp16 (autocast +
GradScaler("cpu")) or bf16 (autocast, no scaler) exactly as a GPU would, so the GPU's training path executes here.
Each run is tiny (quarter-width models, 1-3 steps of real CIFAR-10): train() in fp16 and bf16 for a CNN and a ViT
with SES on, attention-weight hooks included; a step whose gradients overflow (skipped by the scaler, the run goes
on); SES's eigen-solves outside autocast in float32/64; the paper protocol under autocast close to fp32; resume of
an fp16 run with the scaler state restored, equal to an uninterrupted run. Also the CPU twins of CUDA-only branches:
the cuDNN and TF32 flags (set for the run, restored after) and bench/gpu_check.py's refusal without a GPU."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seslib as S

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "paper_protocol"
TIMING_KEYS = ("train_seconds", "epoch_seconds", "peak_mem_mb")
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def tiny(data_root, **kw):
    """An eighth-width ResNet-18 (fp16 convolutions run several times slower than fp32 on a CPU) with SES, 2 steps of
    16 real CIFAR-10 images, fp16 on the CPU (cpu_amp)."""
    return dict(dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=16,
                     train_subset=32, test_subset=32, max_steps_per_epoch=2, erank_batches=1, erank_eval_samples=32,
                     width=0.125, log="none", device="cpu", amp="fp16", cpu_amp=True, ses=True, save_model=False), **kw)


VIT_TINY = dict(model="vit_tiny", width=0.25, ses_layers="last4")  # the quickest fp16 model on a CPU


def spy_on(monkeypatch, name, after):
    """Wrap the training step `name` (a step of the image kind, or one the driver calls by name): after(run) sees the
    run once the step is done."""
    field = KIND_FIELDS.get(name)
    real = getattr(S.RUN_KIND_STEPS["image"], field) if field else getattr(S.training, name)

    def wrapped(run, *a, **kw):
        out = real(run, *a, **kw)
        after(run)
        return out
    if field:
        kind = dataclasses.replace(S.RUN_KIND_STEPS["image"], **{field: wrapped})
        monkeypatch.setitem(S.training.RUN_KIND_STEPS, "image", kind)
    else:
        monkeypatch.setattr(S.training, name, wrapped)


# the steps an image run's kind supplies to the driver (seslib.training.RunKind)
KIND_FIELDS = {"_build_model_and_ses": "build_model", "_build_data": "build_data",
               "_build_optimisation": "build_optimisation"}


def huge_scale_scaler(run, growth_interval=2000):
    """A scaler whose first scale (2^60) overflows every fp16 gradient: that step is skipped and the scale falls to
    2^10 (backoff 2^-50), so the next steps train. Replaces the run's own (as built for fp16)."""
    assert run.scaler.is_enabled()
    run.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=2.0 ** -50,
                                      growth_interval=growth_interval)


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


# ── the precision a CPU run resolves to ─────────────────────────────────────────────────────────────

def test_cpu_amp_runs_the_requested_precision_and_is_off_by_default():
    assert S.resolve_precision("fp16", "cpu") == ("fp32", "amp='fp16' is a GPU setting: fp32 on cpu")
    assert S.resolve_precision("fp16", "cpu", cpu_amp=True) == ("fp16", None)
    assert S.resolve_precision("bf16", "cpu", cpu_amp=True) == ("bf16", None)
    assert S.resolve_precision("auto", "cpu", cpu_amp=True)[0] == "fp32"  # auto: the CPU's own choice
    assert S.resolve_precision("off", "cpu", cpu_amp=True)[0] == "fp32"
    assert S.resolve_precision("bf16", "cuda", (7, 5), cpu_amp=True)[0] == "fp16"  # a GPU ignores cpu_amp
    vit = S.validate_config(dict(model="vit_small", device="cpu"))
    assert (vit["cpu_amp"], vit["amp"], vit["precision"]) == (False, "fp16", "fp32")  # CPU runs stay fp32
    assert S.validate_config(dict(model="vit_small", device="cpu", cpu_amp=True))["precision"] == "fp16"
    with pytest.raises(ValueError, match="'cpu_amp' must be True or False"):
        S.validate_config(dict(cpu_amp="yes"))


def test_cpu_amp_is_a_real_setting_for_the_stale_rule():
    """cpu_amp changes what a CPU run computes: a result made with the other value is stale. A result stored before
    the key existed ran fp32 on a CPU, i.e. cpu_amp False."""
    cfg = S.validate_config(dict(device="cpu"))
    assert S.config_diff(dict(cfg, cpu_amp=True), cfg) == [("cpu_amp", False, True)]
    assert S.config_diff(cfg, {k: v for k, v in cfg.items() if k != "cpu_amp"}) == []
    assert S.config_diff(dict(cfg, cudnn_deterministic=False), cfg) == []  # kernels, not the computation


# ── train() in fp16 and bf16, CNN and ViT, SES on ───────────────────────────────────────────────────

MODELS = {
    "resnet18": {},
    # the smoke preset's width; block outputs and attention weights (Exp 18's dual target) in one run
    "vit_small_attn_weights": dict(model="vit_small", width=0.25, ses_layers="last4",
                                   ses_targets=["block", "attn_weights"]),
}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("which", list(MODELS))
def test_train_runs_the_gpu_precision_on_the_cpu(data_root, monkeypatch, which, precision):
    seen = {"out": []}
    spy_on(monkeypatch, "_build_optimisation", lambda run: seen.update(scaler=run.scaler))
    real_step = S.training.image_step

    def step(run, x, y, sums):  # the logits' dtype of each training step's forward
        hook = run.net.register_forward_hook(lambda m, i, out: seen["out"].append(out.dtype))
        try:
            return real_step(run, x, y, sums)
        finally:
            hook.remove()
    monkeypatch.setattr(S.training, "image_step", step)
    res = S.train(tiny(data_root, amp=precision, **MODELS[which]))
    c, (row,) = res["config"], res["history"]
    assert (c["precision"], c["cpu_amp"], c["amp"]) == (precision, True, precision)
    assert seen["scaler"].is_enabled() == (precision == "fp16")  # GradScaler("cpu") for fp16 only
    if precision == "fp16":
        assert seen["scaler"]._device == "cpu" and seen["scaler"].get_scale() == 65536.0  # no overflow: no skip
    assert seen["out"] and set(seen["out"]) == {HALF[precision]}  # the training forwards ran under autocast
    assert all(math.isfinite(row[k]) for k in ("train_loss", "test_loss", "ses_loss", "ses_term", "train_loss_total"))
    assert row["ses_loss"] > 0 and row["ses_term"] == pytest.approx(c["ses_lambda"] * row["ses_loss"])
    hooks = set(row["erank"])
    if which == "vit_small_attn_weights":  # the attention-weight hooks (blocks.i.attn_probs) fired under autocast too
        assert hooks == {f"blocks.{i}{t}" for i in range(8, 12) for t in ("", ".attn_probs")}
    assert all(math.isfinite(v["erank"]) and v["erank"] > 0 for v in row["erank"].values())


def test_an_overflowing_fp16_step_is_skipped_and_the_run_goes_on(data_root, monkeypatch):
    steps = []
    spy_on(monkeypatch, "_build_optimisation", huge_scale_scaler)
    real_step = S.training.image_step

    def step(run, x, y, sums):
        before = [p.detach().clone() for p in run.net.parameters()]
        s0 = run.scaler.get_scale()
        loss = real_step(run, x, y, sums)
        same = all(torch.equal(a, p) for a, p in zip(before, run.net.parameters()))
        steps.append((s0, run.scaler.get_scale(), same, loss.item()))
        return loss
    monkeypatch.setattr(S.training, "image_step", step)
    res = S.train(tiny(data_root, **VIT_TINY))
    (s0, s1, same1, loss1), *rest = steps
    assert (s0, s1, same1) == (2.0 ** 60, 2.0 ** 10, True)  # inf gradients: step skipped, weights unchanged
    assert math.isfinite(loss1)  # the loss itself was finite: only its scaled gradients overflowed
    assert len(rest) == 1 and all(s == 2.0 ** 10 and not same for s, _, same, _ in rest)  # then it trains
    assert len(res["history"]) == 1 and math.isfinite(res["history"][0]["train_loss"])


def test_ses_eigen_solves_run_outside_autocast_in_float32_or_64(data_root, monkeypatch):
    """Every eigvalsh of an fp16 run (SES's, the erank measurements') sees float32/64 with autocast off; and SES
    called inside an fp16 autocast block (a user's own loop) on half activations turns autocast off and upcasts."""
    solves = []
    real_eig = torch.linalg.eigvalsh

    def eig(m, *a, **kw):
        solves.append((m.dtype, torch.is_autocast_enabled("cpu")))
        return real_eig(m, *a, **kw)
    monkeypatch.setattr(torch.linalg, "eigvalsh", eig)
    S.train(tiny(data_root, max_steps_per_epoch=1))
    assert solves and {dt for dt, _ in solves} <= {torch.float32, torch.float64}
    assert not any(on for _, on in solves)
    solves.clear()
    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(16, d, generator=g).half().requires_grad_() for d in (8, 8, 32)]
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.is_autocast_enabled("cpu")
        loss = S.ses_loss(acts, 0.7)
    assert solves == [(torch.float32, False)] * 2  # two sizes: two batched solves, float32, autocast off
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(S.ses_loss([a.detach().float() for a in acts], 0.7).item(), rel=1e-6)
    loss.backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in acts)


@pytest.fixture(scope="module")
def protocol_run(data_root):
    """evaluate_paper_protocol(amp, **kw) on the fixtures' trained small CNN and 500 real test images; and its fp32."""
    from test_paper_protocol import tiny_cnn
    model = tiny_cnn()
    model.load_state_dict(torch.load(FIX / "tiny_cnn.pt", weights_only=True))
    rec = json.loads((FIX / "author_evaluate_robustness.json").read_text())
    x, y = S.load_dataset("cifar10", data_root, "test", subset=500)
    args = dict(normalize=rec["normalize"], batch_size=rec["batch_size"], device="cpu", seed=rec["torch_manual_seed"])
    run = lambda amp, **kw: S.evaluate_paper_protocol(model.eval(), x, y, amp=amp, **args, **kw)  # noqa: E731
    return run, run("fp16")  # cpu_amp off: fp16 is a GPU setting, fp32 on the CPU


@pytest.mark.parametrize("precision, tol", [("fp16", 0.6), ("bf16", 1.2)])
def test_paper_protocol_under_cpu_autocast_is_close_to_fp32(protocol_run, precision, tol):
    """The paper's robustness protocol under autocast on the CPU (the same noise draws): only near-tied predictions
    flip, so each cell is within tol pp of fp32 over 500 images (3 images in fp16, 6 in bf16, whose mantissa is 3
    bits shorter; measured: at most 0.2 and 0.4 pp), the mean within tol / 2."""
    run, fp32 = protocol_run
    half = run(precision, cpu_amp=True)
    assert (fp32["precision"], half["precision"]) == ("fp32", precision)
    assert half["detail"].keys() == fp32["detail"].keys() and len(fp32["detail"]) == 15
    for k, v in fp32["detail"].items():
        assert abs(half["detail"][k] - v) <= tol, k
    assert abs(half["mean_corruption_acc"] - fp32["mean_corruption_acc"]) <= tol / 2


def test_fp16_resume_restores_the_scaler_and_equals_an_uninterrupted_run(data_root, tmp_path, monkeypatch):
    """Interrupted after epoch 1's checkpoint, resumed: the scaler's state (scale, growth tracker) comes back from the
    checkpoint, and the history and final result equal an uninterrupted run's exactly. The scaler starts at 2^60
    (falling to 2^10 at the first step, skipped), so a resume that kept a fresh scaler would skip a step the straight
    run takes."""
    spy_on(monkeypatch, "_build_optimisation", lambda run: huge_scale_scaler(run, growth_interval=2))
    cfg = tiny(data_root, **VIT_TINY, epochs=2, schedule="constant", warmup_epochs=0)

    class Interrupted(Exception):
        pass
    real_save = S.training._save_checkpoint

    def save_then_stop(run, epoch):
        real_save(run, epoch)
        if epoch == 0:
            raise Interrupted
    monkeypatch.setattr(S.training, "_save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        S.train(dict(cfg, out_dir=str(tmp_path / "cut")))
    monkeypatch.setattr(S.training, "_save_checkpoint", real_save)
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["scaler"]
    assert saved["scale"] == 2.0 ** 10 and saved["_growth_tracker"] == 1  # a skipped step, then a good one
    restored = {}
    spy_on(monkeypatch, "_restore_checkpoint", lambda run: restored.update(run.scaler.state_dict()))
    resumed = S.train(dict(cfg, out_dir=str(tmp_path / "cut"), resume=True))
    assert restored == saved
    straight = S.train(dict(cfg, out_dir=str(tmp_path / "straight")))
    assert resumed["config"]["precision"] == "fp16" and len(resumed["history"]) == 2
    assert strip_timing(resumed["history"]) == strip_timing(straight["history"])
    assert resumed["final"]["test_acc"] == straight["final"]["test_acc"]


# ── CPU twins of CUDA-only branches ─────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("deterministic", [True, False])
def test_cudnn_and_tf32_flags_are_set_for_the_run_and_restored_after(data_root, monkeypatch, deterministic):
    """Only CUDA reads these process-wide flags; they are plain attributes, so the CPU checks train() sets them for
    the run (cudnn_deterministic: deterministic kernels, no autotuning; False: autotuned) and puts back what it
    found, also the TF32 ones."""
    cudnn, cuda = torch.backends.cudnn, torch.backends.cuda
    flags = lambda: (cudnn.deterministic, cudnn.benchmark, cuda.matmul.allow_tf32, cudnn.allow_tf32)  # noqa: E731
    saved = flags()
    cudnn.deterministic, cudnn.benchmark, cuda.matmul.allow_tf32, cudnn.allow_tf32 = \
        not deterministic, deterministic, False, False
    during = []
    spy_on(monkeypatch, "_build_data", lambda run: during.append(flags()))
    try:
        res = S.train(tiny(data_root, amp="off", cpu_amp=False, max_steps_per_epoch=1,
                           cudnn_deterministic=deterministic, tf32=True))
        after = flags()
    finally:
        cudnn.deterministic, cudnn.benchmark, cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved
    assert during == [(deterministic, not deterministic, True, True)]
    assert after == (not deterministic, deterministic, False, False)  # what the run found, put back
    assert res["config"]["cudnn_deterministic"] is deterministic  # recorded in result.json's config


def test_sync_bn_is_chosen_for_ddp_on_cuda_and_keeps_the_checkpoint_keys():
    """Under DDP on CUDA a BatchNorm model gets SyncBatchNorm by default; torch has no CPU kernel for it, so only its
    choice and the conversion (same state-dict keys: checkpoints stay interchangeable) are checked here."""
    ddp, cuda = S.DistInfo(rank=0, world_size=2, backend="nccl"), torch.device("cuda", 0)
    cnn, vit = S.build_model("resnet18", 10, width=0.125), S.build_model("vit_tiny", 10, width=0.25)
    assert S.use_sync_bn({"sync_bn": None, "model": "resnet18"}, cnn, cuda, ddp) is True
    assert S.use_sync_bn({"sync_bn": None, "model": "vit_tiny"}, vit, cuda, ddp) is False  # no BatchNorm
    assert S.use_sync_bn({"sync_bn": False, "model": "resnet18"}, cnn, cuda, ddp) is False
    assert S.use_sync_bn({"sync_bn": None, "model": "resnet18"}, cnn, cuda, S.DistInfo()) is False  # one process
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(S.build_model("resnet18", 10, width=0.125))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert synced.state_dict().keys() == cnn.state_dict().keys()


def test_recipes_default_to_the_authors_cudnn_setting():
    """Every script sets cudnn.deterministic = True, benchmark = False, except ses_resnet50_tinyimagenet .py
    (benchmark = True, no deterministic)."""
    assert all(S.default_config(m, "cifar100")["cudnn_deterministic"] for m in ("resnet18", "wrn28_10", "vit_small"))
    assert S.default_config("resnet50", "tinyimagenet")["cudnn_deterministic"] is False


def test_gpu_check_says_a_gpu_is_needed_and_exits_2_without_one(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "needs a CUDA GPU" in lines[0], out.stdout + out.stderr
    assert not (tmp_path / "o").exists()  # nothing written
# its dry run (every check on the CPU, the calibration JSON): tests/test_gpu_check.py
