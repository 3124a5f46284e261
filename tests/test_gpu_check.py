"""bench/gpu_check.py on the CPU: its dry run (every code path of the GPU measurements at tiny shapes, 2 gloo processes
for the DDP pair) prints one PASS/FAIL/SKIP line per check and writes the calibration JSON the planner reads, with the
keys it reads; its thresholds at their boundaries; GradScaler's skipped steps counted from a real inf gradient. No
assertion depends on this machine's speed (the dry run SKIPs every timing and memory verdict)."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
LINE = re.compile(r"^(PASS|FAIL|SKIP) ([A-Za-z0-9_.]+): (.+)$")
ROW_KEYS = {"name", "notebook", "model", "dataset", "task", "precision", "recipe_batch", "measured_batch", "max_len",
            "configs", "seconds_per_step", "ses_overhead", "peak_gb", "estimate_gb", "skipped_steps", "timed_steps",
            "warmup_steps"}
ROWS = {"resnet18_cifar10_fp32", "resnet18_cifar100_fp16", "resnet50_tinyimagenet_fp16", "resnet50_tinyimagenet_bf16",
        "wrn28_10_cifar100_fp16", "vit_small_cifar100_fp16", "vit_tiny_cifar100_fp16", "bert_sst2_fp16"}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


G = load_script()


@pytest.fixture(scope="module")
def dry_run(data_root, tmp_path_factory):
    """The dry run once for this module: (its process, its printed check lines, its gpu_check.json)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "SES_DATA": str(data_root),
                               "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [LINE.match(s) for s in proc.stdout.splitlines()]
    return proc, [m for m in lines if m], json.loads((out / "gpu_check.json").read_text())


def test_gpu_check_runs_its_checks_on_the_cpu_in_a_dry_run(dry_run):
    """Every line is a PASS/FAIL/SKIP line (or the summary and where it wrote): the checks that need a GPU pass on the
    CPU (cpu_amp, tiny sizes) or, needing 2 GPUs, skip; none FAILs."""
    proc, lines, _ = dry_run
    # a busy machine's one-line thread advice (seslib.cpu_thread_advice) may come too: it depends on the load
    other = [s for s in proc.stdout.splitlines() if not LINE.match(s) and not s.startswith("[threads]")]
    assert len(other) == 2 and re.match(r"0 FAIL, \d+ PASS, \d+ SKIP in [\d.]+ s$", other[0]), other
    assert other[1].startswith("written: ")
    status = {m[2]: m[1] for m in lines}
    assert {k: status[k] for k in ("fp16_train_resnet18", "fp16_train_vit_attn", "hooks_on_cuda", "corruptions_on_cuda",
                                   "ddp_two_gpus", "slots_two_gpus", "bert_peak_memory")} == {
        "fp16_train_resnet18": "PASS", "fp16_train_vit_attn": "PASS", "hooks_on_cuda": "PASS",
        "corruptions_on_cuda": "PASS", "ddp_two_gpus": "SKIP", "slots_two_gpus": "SKIP", "bert_peak_memory": "PASS"}
    assert "FAIL" not in status.values()
    for row in ROWS:  # the GPU verdicts skip on the CPU; the fp16 rows' GradScaler counts still decide
        assert status[f"time_{row}"] == status[f"memory_{row}"] == "SKIP"
        assert status[f"skipped_{row}"] == ("PASS" if row.endswith("fp16") else "SKIP")
    assert status["ddp_equal"] == "PASS" and status["ddp_efficiency"] == status["cuda_context"] == "SKIP"
    assert all("threshold" in m[3] for m in lines if m[1] != "SKIP")  # a verdict names its threshold


def test_the_dry_run_writes_the_calibration_with_the_keys_the_planner_reads(dry_run):
    _, lines, d = dry_run
    assert d["schema"] == "ses-gpu-check/2" and d["dry_run"] is True and d["gpu_kind"] == "cpu" and d["gpus"] == 0
    assert set(d) == {"schema", "dry_run", "device", "gpu_kind", "gpus", "torch", "cuda", "time", "seconds", "memory",
                      "steps", "ddp", "checks"}
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d$", d["time"]) and d["seconds"] > 0
    assert d["memory"] == {"total_gb": None, "context_gb": None, "usable_gb": None}  # no GPU, nothing measured
    assert {r["name"] for r in d["steps"]} == ROWS
    for r in d["steps"]:
        assert set(r) == ROW_KEYS, r["name"]
        for k in ("seconds_per_step", "peak_gb", "estimate_gb", "skipped_steps", "warmup_steps"):
            assert set(r[k]) == {"baseline", "ses"}, (r["name"], k)
        assert all(math.isfinite(v) and v > 0 for v in r["seconds_per_step"].values()), r
        assert all(v > 0 for v in r["estimate_gb"].values()) and r["peak_gb"] == {"baseline": None, "ses": None}
        assert isinstance(r["measured_batch"], int) and r["timed_steps"] == G.DRY_M
        assert (r["skipped_steps"]["ses"] is None) == (r["precision"] != "fp16")
    rows = {r["name"]: r for r in d["steps"]}
    bert, r50 = rows["bert_sst2_fp16"], rows["resnet50_tinyimagenet_fp16"]
    assert (bert["model"], bert["dataset"], bert["task"], bert["max_len"]) == ("bert-base-uncased", None, "sst2", 16)
    assert (r50["model"], r50["dataset"], r50["recipe_batch"], r50["notebook"]) == \
        ("resnet50", "tinyimagenet", 256, "11_resnet50_tinyimagenet")
    assert rows["vit_small_cifar100_fp16"]["configs"] == {"baseline": "vit_small_baseline", "ses": "vit_small_ses"}
    ddp = d["ddp"]  # the DDP pair ran on 2 gloo processes; their efficiency measures no GPU, so none is written
    assert ddp["status"] == "PASS" and ddp["backend"] == "gloo" and ddp["gpus"] == 2 and ddp["efficiency"] is None
    assert ddp["max_loss_diff"] <= G.DDP_RTOL and ddp["max_grad_diff"] <= G.DDP_RTOL
    assert [c["line"] for c in d["checks"]] == [m[0] for m in lines]  # each printed line is one entry
    assert all(set(c) == {"check", "status", "line", "seconds", "figures"} for c in d["checks"])


def test_the_planner_reads_what_the_script_writes(dry_run, tmp_path):
    """The contract between the two: the script's file, as a GPU would write it, calibrates the plan's runs (the
    planner refuses the dry run's own file: it measured no GPU)."""
    import sesrun as R
    _, _, d = dry_run
    (tmp_path / "dry.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="CPU dry run"):
        R.read_calibration(tmp_path / "dry.json")
    (tmp_path / "t4.json").write_text(json.dumps(dict(d, dry_run=False, device="Tesla T4", gpu_kind="t4")))
    cal = R.read_calibration(tmp_path / "t4.json")
    assert len(cal.steps) == len(ROWS) and cal.gpu == "t4"
    plan = R.notebook_plan(ROOT / "notebooks" / "11_resnet50_tinyimagenet.ipynb", out_dir=str(tmp_path / "11"))
    ses = next(r for r in plan.runs if r.config == "ses")
    row = next(r for r in d["steps"] if r["name"] == "resnet50_tinyimagenet_fp16")
    got = R.calibrated_epoch(cal, ses.cfg, "t4")  # bf16 asked, fp16 on a T4: the fp16 row's SES step
    assert got["source"] == "measured step (Tesla T4)" and got["epoch_s"] == pytest.approx(
        row["seconds_per_step"]["ses"] / row["measured_batch"] * (100000 + 10000 / 3))
    bert = next(r for r in R.notebook_plan(ROOT / "notebooks" / "22_bert_glue.ipynb", out_dir=str(tmp_path / "22"))
                .runs if r.config == "sst2_ses_all")
    assert R.calibrated_epoch(cal, bert.cfg, "t4") is None  # the dry run's BERT ran 16 tokens, the recipe 128


def test_a_dry_run_without_out_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(G, "ROOT", tmp_path)  # where the default out folder would go
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts ROOT on it
    monkeypatch.setattr(G, "measure", lambda S, a, dev, memory: ([G.line("PASS", "x", "y (threshold z)")], [], None))
    assert G.main(["--cpu-dry-run"]) == 0
    assert not list(tmp_path.iterdir()) and "written" not in capsys.readouterr().out
    assert G.main(["--cpu-dry-run", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "gpu_check.json").read_text())["checks"][0]["line"] == "PASS x: y (threshold z)"


# ── the thresholds ──────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("estimate, measured, status", [
    (0.90, 1.0, "PASS"), (0.89, 1.0, "FAIL"), (1.25, 1.0, "PASS"), (1.26, 1.0, "FAIL"),
    (9.0, 10.0, "PASS"), (12.5, 10.0, "PASS"), (8.9, 10.0, "FAIL"), (12.6, 10.0, "FAIL"), (4.0, 4.0, "PASS")])
def test_memory_passes_from_10_percent_under_to_25_percent_over(estimate, measured, status):
    assert G.memory_verdict(estimate, measured) == (status, pytest.approx(estimate / measured))


@pytest.mark.parametrize("planned, measured, status", [
    (0.5, 1.0, "PASS"), (0.49, 1.0, "FAIL"), (2.0, 1.0, "PASS"), (2.01, 1.0, "FAIL"), (0.43, 0.41, "PASS")])
def test_the_plans_step_time_passes_within_a_factor_2(planned, measured, status):
    assert G.time_verdict(planned, measured)[0] == status


def test_the_other_thresholds_at_their_boundaries():
    assert G.within(1, hi=G.MAX_SKIPPED) == "PASS" and G.within(2, hi=G.MAX_SKIPPED) == "FAIL"
    assert G.within(1e-3, hi=G.DDP_RTOL) == "PASS" and G.within(1.01e-3, hi=G.DDP_RTOL) == "FAIL"
    assert G.within(0.75, lo=G.DDP_MIN_EFFICIENCY) == "PASS" and G.within(0.749, lo=G.DDP_MIN_EFFICIENCY) == "FAIL"
    ref = [torch.tensor([1.0, -4.0], dtype=torch.float64), torch.tensor([0.0, 1e-9], dtype=torch.float64)]
    got = [torch.tensor([1.0, -4.002], dtype=torch.float64), torch.tensor([0.0, 2e-9], dtype=torch.float64)]
    assert G.max_rel_diff(got[:1], ref[:1]) == pytest.approx(5e-4)  # |diff|max over |ref|max, per tensor
    assert G.max_rel_diff(got, ref) == pytest.approx(5e-4)  # 1e-9 off on a scale floored at 1e-6 x 4: 2.5e-4
    assert G.max_rel_diff(ref, ref) == 0.0


# ── GradScaler's skipped steps ──────────────────────────────────────────────────────────────────

def scaler_step(model, opt, scaler, scale_by):
    opt.zero_grad()
    scaler.scale((model(torch.ones(1, 2)) * scale_by).sum()).backward()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale()


def test_a_step_with_an_inf_gradient_is_counted_as_skipped():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu")
    scales = [scaler.get_scale(), scaler_step(model, opt, scaler, 1.0)]
    before = [p.detach().clone() for p in model.parameters()]
    scales.append(scaler_step(model, opt, scaler, float("inf")))  # an inf gradient: no update, the scale halves
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    scales.append(scaler_step(model, opt, scaler, 1.0))
    assert scales[2] == scales[1] / 2 and G.skipped_steps(scales) == 1
    assert G.skipped_steps([65536.0] * 6) == 0 and G.skipped_steps([4.0, 2.0, 1.0, 1.0]) == 2


def test_the_warm_up_goes_on_while_the_scaler_backs_off():
    """GradScaler's own calibration (its first overflows from 2^16) ends inside the warm-up, so the timed steps count
    only the overflows a run keeps meeting; at most `extra` steps more."""
    def fake_run(falls):
        state = {"scale": 65536.0, "falls": falls}

        def step(run, batch, sums):
            if state["falls"]:
                state["falls"] -= 1
                state["scale"] /= 2
        scaler = types.SimpleNamespace(is_enabled=lambda: True, get_scale=lambda: state["scale"])
        return types.SimpleNamespace(scaler=scaler, kind=types.SimpleNamespace(step=step))
    assert G.warm_up(fake_run(0), None, None, 3) == 3
    assert G.warm_up(fake_run(4), None, None, 1) == 5  # 4 backoffs, then one step that keeps the scale
    assert G.warm_up(fake_run(4), None, None, 6) == 6
    assert G.warm_up(fake_run(99), None, None, 3, extra=4) == 7


def test_an_out_that_cannot_take_the_file_is_one_line_before_any_measurement(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for out, why in ((tmp_path / "a_file", "is a file: give a folder"), (Path("/proc/gpu_check"), "is not writable")):
        p = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out)], capture_output=True,
                           text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 2 and why in p.stderr and p.stderr.count("\n") == 1 and not p.stdout, p.stderr
