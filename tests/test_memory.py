"""seslib.estimate_memory: a run's peak GPU memory known before it starts, on the CPU (fake-tensor traces of the real
model, a few seconds per model, cached), checked against every peak the author published (bench/memory_estimates.py
holds the table of runs and writes bench/RESULTS.md's); whether a run fits a GPU and on how many; result.json's
measured and estimated peaks."""
import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seslib as S

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("memory_estimates", ROOT / "bench" / "memory_estimates.py")
MB = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MB)
HAVE_REFERENCE = (MB.SHARED / "reference" / "paper_results").is_dir()
ALL_PEAKS = [(r[1], r[2], r[0]) for r in MB.published_runs()] if HAVE_REFERENCE else []
PEAKS = [(f, k) for f, k, nb in ALL_PEAKS if nb not in MB.UNEXPLAINED] or [("absent", "absent")]
BERT_PEAKS = [(f, k) for f, k, nb in ALL_PEAKS if nb == "22_bert_glue"]
KEYS = {"gpu", "precision", "peak_gb", "need_gb", "total_gb", "usable_gb", "fits", "gpus_needed", "per_gpu_gb",
        "need_per_gpu_gb", "train_per_gpu_gb", "data_gb", "step_gb", "terms", "why"}


def cfg(**kw):
    return S.validate_config({"robustness": "all15", "device": "cpu", **kw})


R18 = dict(model="resnet18", dataset="cifar100", batch_size=512, amp="fp16", ses=True)  # Exp 12's SES run
R50 = dict(model="resnet50", dataset="tinyimagenet", batch_size=256, amp="fp16", ses=True)  # Exp 11 on a T4


# ── against the author's published peaks ────────────────────────────────────────────────────────

@pytest.mark.skipif(not HAVE_REFERENCE, reason="../shared/reference/paper_results (the author's result files) absent")
@pytest.mark.parametrize("file,key", PEAKS, ids=[f"{f}:{k}" for f, k in PEAKS])
def test_each_published_peak_is_estimated_within_the_tolerance(file, key):
    """estimate - our on-device data (the author's DataLoader had none), as the author measured it (the highest of
    his process so far), within TOLERANCE of his vram_peak_gb; the notebook's own config for each run."""
    row = next(r for r in MB.rows() if (r["file"], r["key"]) == (file, key))
    assert abs(row["ratio"] - 1) <= MB.TOLERANCE, row


@pytest.mark.skipif(not HAVE_REFERENCE, reason="../shared/reference/paper_results (the author's result files) absent")
def test_the_published_runs_cover_every_vram_peak_the_author_published():
    """Every result file with vram_peak_gb is in the table, each key once: 38 image peaks within the tolerance, and
    Exp 22's 6 BERT peaks in their own table (bench/RESULTS.md: not explained)."""
    ref = MB.SHARED / "reference" / "paper_results"
    listed = {f for f, _, _ in ALL_PEAKS}
    workers = {w for _, _, procs, _, _ in MB.PUBLISHED for w in procs or ()}
    with_vram = {p.name for p in ref.glob("*.json") if "vram_peak_gb" in p.read_text()}
    summaries = {p.name for p in ref.glob("*summary.json")}  # copies of the *_results files
    full = {p.name for p in ref.glob("*_full.json")}  # the BERT workers' files with their histories
    assert with_vram - listed - workers - summaries - full == set()
    assert len(PEAKS) == len(set(PEAKS)) == 38 and len(BERT_PEAKS) == 6
    assert set(MB.UNEXPLAINED) == {"22_bert_glue"}


@pytest.mark.skipif(not HAVE_REFERENCE, reason="../shared/reference/paper_results (the author's result files) absent")
def test_results_md_holds_the_tables_the_script_prints_now():
    """bench/RESULTS.md's memory tables are this code's: every row bench/memory_estimates.py prints is there."""
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    rows = [line for line in MB.table().splitlines() if line.startswith("| ") or line.startswith("ratio =")]
    assert len(rows) > 44 and [r for r in rows if r not in results] == []


@pytest.mark.skipif(not HAVE_REFERENCE, reason="../shared/reference/paper_results (the author's result files) absent")
def test_exp22_fits_one_t4_by_the_estimate_and_by_the_authors_own_peak():
    """The BERT peaks the estimate does not explain (0.27 of them) still place Exp 22 as the estimate does: one run
    per T4, whichever number is right (13.72 GB < a T4's 14.54 usable)."""
    rows = [r for r in MB.rows() if r["notebook"] == "22_bert_glue"]
    assert len(rows) == 6 and all(not r["explained"] for r in rows)
    for r in rows:
        est = S.estimate_memory(MB.notebook_configs("22_bert_glue")[r["config"]], "t4")
        assert est["fits"] and est["gpus_needed"] == 1 and r["published"] < est["usable_gb"]
        assert 0.2 < r["ratio"] < 0.35, r  # the table's figure; moved, the README and RESULTS.md say it wrong


# ── fits, GPUs needed, the dict ─────────────────────────────────────────────────────────────────

def test_resnet50_tinyimagenet_at_batch_256_needs_two_t4s():
    est = S.estimate_memory(cfg(**R50), "t4")
    assert est["precision"] == "fp16" and not est["fits"] and est["gpus_needed"] == 2
    assert est["per_gpu_gb"][2] <= est["usable_gb"] < est["need_gb"]
    assert "activations" in est["why"] and est["terms"]["activations"] > 10


def test_resnet18_cifar_fits_one_t4_and_the_dict_is_the_documented_one():
    est = S.estimate_memory(cfg(**R18), "t4")
    assert set(est) == KEYS and est["fits"] and est["gpus_needed"] == 1
    assert 1.0 < est["peak_gb"] < 3.0 and est["usable_gb"] == pytest.approx(14.54, abs=0.01)
    assert math.isclose(sum(est["terms"].values()), est["peak_gb"], abs_tol=0.01)
    margin = (est["peak_gb"] - est["data_gb"]) * (1 + S.MEM_MARGIN) + est["data_gb"]  # no autotuning: deterministic
    assert est["terms"]["SES"] > 0 and est["need_gb"] == pytest.approx(margin, abs=2e-3)
    assert est["step_gb"] == pytest.approx(est["peak_gb"] - est["data_gb"], abs=2e-3)  # the training step sets it
    ks = list(est["per_gpu_gb"])
    assert ks == [1, 2, 4, 8] and all(est["per_gpu_gb"][a] >= est["per_gpu_gb"][b] for a, b in zip(ks, ks[1:]))


def test_data_on_the_gpu_is_the_uint8_sets_and_the_erank_inputs():
    est = S.estimate_memory(cfg(**R18), "t4")
    cifar = (50000 + 10000) * (3 * 32 * 32 + 8) + (4 * 512 + 2048) * 3 * 32 * 32 * 4
    assert est["data_gb"] == pytest.approx(cifar / 1e9, abs=1e-3)
    tiny = (100000 + 10000) * (3 * 64 * 64 + 8) + (4 * 256 + 2048) * 3 * 64 * 64 * 4  # the train set alone 1.23 GB
    assert S.estimate_memory(cfg(**R50), "t4")["data_gb"] == pytest.approx(tiny / 1e9, abs=1e-3)


def test_every_gpu_the_suite_knows_is_accepted_and_an_unknown_one_is_named():
    c = cfg(**R18)
    for gpu in S.GPU_SPEED:
        assert S.estimate_memory(c, gpu)["gpu"] == gpu
    assert {"t4", "l4", "a100-40", "a100-80", "l40s", "h100", "h200"} <= set(S.GPU_MEMORY)
    with pytest.raises(ValueError, match=r"unknown GPU 'rtx9090'; known: .*h200.*t4"):
        S.estimate_memory(c, "rtx9090")


def test_precision_follows_the_gpu():
    bf16 = cfg(**dict(R50, amp="bf16"))
    assert S.estimate_memory(bf16, "t4")["precision"] == "fp16"  # no native bf16 on a T4
    assert S.estimate_memory(bf16, "l40s")["precision"] == "bf16"
    assert S.estimate_memory(cfg(**R18), "cpu")["precision"] == "fp32"
    fp32 = S.estimate_memory(cfg(**dict(R18, amp="off")), "t4")
    assert fp32["terms"]["activations"] > 1.5 * S.estimate_memory(cfg(**R18), "t4")["terms"]["activations"]


def test_cudnn_autotuning_is_counted_in_the_peak_but_not_in_what_must_fit():
    c = cfg(**dict(R50, cudnn_deterministic=False))
    est = S.estimate_memory(c, "h100")
    tune = est["terms"]["cuDNN autotuning (benchmark)"]
    assert tune == pytest.approx(S.CUDNN_AUTOTUNE * est["terms"]["activations"], rel=1e-3)
    data = est["data_gb"]
    assert est["need_gb"] == pytest.approx((est["peak_gb"] - tune - data) * (1 + S.MEM_MARGIN) + data, abs=2e-3)
    vit = S.estimate_memory(cfg(model="vit_tiny", dataset="tinyimagenet", batch_size=16), "h100")  # the same recipe
    assert vit["terms"].get("cuDNN autotuning (benchmark)", 0) == 0  # its one conv (patch embedding) tunes in little


def test_a_partial_config_is_refused():
    with pytest.raises(ValueError, match="resolved config.*validate_config"):
        S.estimate_memory({"model": "resnet18"}, "t4")


# ── Exp 22's text runs ─────────────────────────────────────────────────────────────────────────

def text_cfg(**kw):
    return S.resolve_text_config({"device": "cpu", **kw})


def test_a_text_run_is_estimated_with_the_documented_dict_on_one_gpu():
    est = S.estimate_memory(text_cfg(task="sst2", ses=True), "t4")
    assert set(est) == KEYS and est["fits"] and est["gpus_needed"] == 1 and list(est["per_gpu_gb"]) == [1]
    assert est["precision"] == "fp16" and math.isclose(sum(est["terms"].values()), est["peak_gb"], abs_tol=0.01)
    assert S.placeable(text_cfg()) and not S.placeable(text_cfg(model="roberta-base"))
    fp32 = S.estimate_memory(text_cfg(amp="off"), "t4")["terms"]["activations"]  # autocast: fp32 LayerNorm, residuals
    assert fp32 > 1.3 * est["terms"]["activations"]


def test_bert_base_holds_four_four_and_eight_bytes_per_parameter():
    """Weights, gradients and AdamW's two moments of BERT-base with a 2-label head: 109,483,778 float32 parameters
    (the author's '109.5M params'), plus its two int64 [1, 512] position/token-type buffers."""
    t = S.estimate_memory(text_cfg(), "t4")["terms"]
    n = 109_483_778
    assert t["weights"] == pytest.approx((4 * n + 2 * 512 * 8) / 1e9, abs=2e-3)
    assert t["gradients"] == pytest.approx(4 * n / 1e9, abs=2e-3)
    assert t["optimizer state"] == pytest.approx(8 * n / 1e9, abs=2e-3)


def test_a_text_runs_data_on_the_gpu_is_its_tokenised_sets():
    """SST-2's 67,349 + 872 examples and MRPC's 3,668 + 408, each as input_ids, attention_mask and token_type_ids
    (int64, max_len tokens) and an int64 label: the two estimates differ by that alone."""
    sst2, mrpc = S.estimate_memory(text_cfg(task="sst2"), "t4"), S.estimate_memory(text_cfg(task="mrpc"), "t4")
    assert sst2["data_gb"] == pytest.approx((67349 + 872) * (3 * 128 * 8 + 8) / 1e9, abs=1e-3)
    assert mrpc["data_gb"] == pytest.approx((3668 + 408) * (3 * 128 * 8 + 8) / 1e9, abs=1e-3)
    assert sst2["peak_gb"] - sst2["data_gb"] == pytest.approx(mrpc["peak_gb"] - mrpc["data_gb"], abs=2e-3)


def _measured_step_growth(c):
    """The bytes a real text training step (seslib.steps.text_step) allocates above what it starts with, by the CPU
    allocator's own events (torch.profiler, profile_memory): the second of two profiled steps, so every block it
    frees was allocated under the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function
    run = S.training._Run(c, S.DistInfo(), torch.device("cpu"), kind=S.RUN_KIND_STEPS["text"])
    S.set_seed(0)
    S.build_text_model(run)
    S.build_text_data(run)
    S.build_text_optimisation(run)
    run.model = run.net
    for m in run.model.modules():  # no attention dropout: the CPU's SDPA then takes its fused (flash) kernel
        if "Attention" in type(m).__name__ and isinstance(getattr(m, "dropout", None), torch.nn.Dropout):
            m.dropout.p = 0.0
    run.model.config.attention_probs_dropout_prob = 0.0
    batch, sums = S.rows(run.loader.data, slice(0, c["batch_size"])), torch.zeros(5, dtype=torch.float64)
    S.text_step(run, batch, sums)  # AdamW's state exists from here on
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        S.text_step(run, batch, sums)
        with record_function("second_step"):
            S.text_step(run, batch, sums)
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    start = next(e.start_ns() for e in events if e.name() == "second_step")
    live = peak = 0
    for e in events:
        if e.name() == "[memory]" and e.start_ns() >= start:
            live += e.nbytes()
            peak = max(peak, live)
    S.training._release(run)
    return peak


def test_a_text_runs_step_is_traced_as_the_cpu_allocator_measures_it():
    """The trace (fake tensors, the fused-attention stand-in) against a real step's allocations (CPU allocator events)
    of TINY_BERT on SYNTHETIC text, fp32, batch 64 x 128 tokens, SES on all 6 layers: the step's growth over what the
    run holds between steps (activations + SES) within 15 %. Traced through the math decomposition the stand-in
    replaces (each layer's [64, 2, 128, 128] attention probabilities kept) it reads 1.6x the measured growth."""
    c = text_cfg(model=S.TINY_BERT, text_data="synthetic", max_len=128, batch_size=64, amp="off", ses=True,
                 train_subset=128, test_subset=64)
    t = S.estimates._trace_memory(c, 64, 64, "fp32")
    ratio = (t["activations"] + t["ses"]) / _measured_step_growth(c)
    assert 0.85 < ratio < 1.15, ratio


def test_a_text_run_that_cannot_fit_fails_in_one_line_before_it_loads():
    c = text_cfg(batch_size=1024)
    with pytest.raises(S.PreflightError) as e:
        S.text_memory_preflight(c, "t4")
    assert "\n" not in str(e.value) and "needs" in str(e.value) and "one t4" in str(e.value)
    p = S.placement(c, "t4", 2)
    assert p["gpus"] == 0 and "one GPU (no DDP)" in p["text"]
    est = S.estimate_memory(text_cfg(), "t4")
    assert S.text_memory_preflight(text_cfg(), "t4") == {"gpu": "t4", "peak_gb": est["peak_gb"], "train_gb":
                                                         est["train_per_gpu_gb"][1], "usable_gb": est["usable_gb"]}
    assert S.text_memory_preflight(text_cfg(model="roberta-base"), "t4") is None  # unknown here: no estimate


# ── the tracer ──────────────────────────────────────────────────────────────────────────────────

def test_the_tracer_counts_each_storage_while_it_lives_and_runs_cuda_float32_ops_in_float32():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), S.estimates._live_bytes() as mem:
        x = torch.empty(1024, 1024)  # 4 MiB
        y = x * 2
        v = y.view(-1)  # a view: no new storage
        del y, v
        z = torch.empty(1000)  # 4000 bytes: one 4096-byte block
        assert mem.peak == 2 * 4 * 2**20 and mem.live == 4 * 2**20 + 4096
        with S.estimates._traced_autocast(mem, torch.float16):
            h = torch.nn.functional.linear(x, torch.empty(8, 1024))
            p = h.softmax(-1)
        assert h.dtype == torch.float16 and p.dtype == torch.float32  # CUDA autocast's softmax runs in float32
        del z


# ── result.json ─────────────────────────────────────────────────────────────────────────────────

def test_a_cpu_run_skips_the_estimate_and_records_no_gpu_peak(patch_seslib, monkeypatch):
    """The CPU branch: no trace at the start (CPU tests stay fast), None in result.json (tests/test_train.py checks
    a real run's file); a CUDA run's record keeps the larger of the epochs' peaks and the final evaluation's."""
    import types
    patch_seslib("estimate_memory", lambda *a: pytest.fail("estimated on the CPU"))
    run = types.SimpleNamespace(device=torch.device("cpu"), dd=S.DistInfo(), c={}, history=[], mem_estimate=None)
    S.training.estimate_image_memory(run)
    assert S.peak_memory_fields(run) == {"peak_mem_gb": None, "peak_mem_estimate_gb": None, "peak_mem_estimate_gpu": None}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * 10**9)
    run = types.SimpleNamespace(device=torch.device("cuda"), history=[{"peak_mem_mb": 3e9 / 2**20}],
                                mem_estimate={"gpu": "t4", "peak_gb": 2.9})
    assert S.peak_memory_fields(run) == {"peak_mem_gb": pytest.approx(3.0), "peak_mem_estimate_gb": 2.9,
                                   "peak_mem_estimate_gpu": "t4"}


def test_the_cost_table_shows_the_measured_and_estimated_peaks_side_by_side():
    import pandas as pd
    res = {"config": {"seed": 1}, "env": {"device_name": "Tesla T4"},
           "final": {"test_acc": 70.0, "peak_mem_gb": 1.5, "peak_mem_estimate_gb": 1.6}, "history": []}
    t = S.summary_table(pd.DataFrame([S.results._result_row("ses", res, "runs/ses_seed1")]), {"ses": {"vram_gb": 1.67}})
    assert t.loc["ses", ["peak mem GB", "est. peak GB", "paper VRAM GB"]].tolist() == [1.5, 1.6, 1.67]
    cost = S.tables._split_table(t)["cost"]
    assert {"peak mem GB", "est. peak GB", "paper VRAM GB"} <= set(cost.columns)


# ── placement's safety margin ───────────────────────────────────────────────────────────────────

@pytest.mark.skipif(not HAVE_REFERENCE, reason="../shared/reference/paper_results (the author's result files) absent")
def test_the_margin_covers_every_published_peak_and_no_published_peak_lands_on_a_t4_it_overflows():
    """MEM_MARGIN comes from the estimator's spread: each explained published peak is at most (estimate - data) x
    (1 + margin); and every run the plan puts on one T4 would fit it even at the author's own peak plus our data."""
    rows = MB.rows()
    assert all(r["published"] <= r["compared"] * (1 + S.MEM_MARGIN) for r in rows if r["explained"])
    assert min(r["ratio"] for r in rows if r["explained"]) * (1 + S.MEM_MARGIN) > 1.0  # the spread it is derived from
    placed_on_one = 0
    for r in rows:
        p = S.placement(MB.notebook_configs(r["notebook"])[r["config"]], "t4", 2)
        if p["gpus"] == 1:
            placed_on_one += 1
            assert r["published"] + r["data"] <= p["memory"]["usable_gb"], r
    assert placed_on_one >= 40  # every published peak but Exp 11's two (DDP over 2 T4s)


def test_the_margin_sends_a_run_that_fits_only_without_it_to_ddp():
    c = cfg(model="vit_small", dataset="cifar100", batch_size=512, amp="fp16", ses=True)  # Exp 14: 7.6 GB
    est = S.estimate_memory(c, "t4", usable_gb=8.0)
    assert est["peak_gb"] < 8.0 < est["need_gb"]  # fits by the bare estimate, not with the margin
    data = est["data_gb"]
    assert est["need_gb"] == pytest.approx((est["peak_gb"] - data) * (1 + S.MEM_MARGIN) + data, abs=2e-3)
    p = S.placement(c, "t4", 2, usable_gb=8.0)
    assert p["gpus"] == 2 and "must fit on each" in p["text"] and "+ 25%" in p["text"]
    assert S.placement(c, "t4", 2)["gpus"] == 1  # a T4's 14.5 usable GB hold it with the margin


# ── the run-time memory guard ───────────────────────────────────────────────────────────────────

def test_the_guard_verdict_scales_the_estimate_by_what_it_missed():
    est = {"peak_gb": 10.0, "train_gb": 8.0, "usable_gb": 14.5}
    ok = S.memory_guard_verdict(8.0, est)  # as estimated: the run's 10 GB fit 14.5 x 0.95
    assert not ok["stop"] and ok["ratio"] == 1.0 and ok["projected_gb"] == 10.0
    low = S.memory_guard_verdict(6.0, est)  # over-estimated: never scaled down
    assert not low["stop"] and low["projected_gb"] == 10.0
    edge = 14.5 * (1 - S.GUARD_HEADROOM)
    assert not S.memory_guard_verdict(8.0 * edge / 10.0 - 1e-6, est)["stop"]  # projected just under the limit
    over = S.memory_guard_verdict(8.0 * edge / 10.0 + 1e-3, est)
    assert over["stop"] and over["projected_gb"] > edge == pytest.approx(over["limit_gb"])
    assert S.memory_guard_verdict(14.0, {"peak_gb": 1.0, "train_gb": 0.0, "usable_gb": 14.5})["stop"]  # measured alone


def _guarded_run(monkeypatch, measured_gb, rooms=("training",)):
    """A CPU run told it is on a T4 (guard_target) and fed a fake measured peak (step_peak_gb): what a CUDA run's
    guard sees. Returns the list of the steps' counts at which the peak was read."""
    reads = []
    for room in rooms:
        monkeypatch.setattr(getattr(S, room), "guard_target", lambda device: ("t4", 15.8))

    def fake_peak(device):
        reads.append(device.type)
        return measured_gb
    monkeypatch.setattr(S.training, "step_peak_gb", fake_peak)
    return reads


def test_the_guard_stops_an_oversized_image_run_after_its_first_steps(data_root, tmp_path, monkeypatch):
    reads = _guarded_run(monkeypatch, 20.0)
    steps = []
    real_step = S.training.RUN_KIND_STEPS["image"].step
    monkeypatch.setitem(S.training.RUN_KIND_STEPS, "image", dataclasses.replace(S.training.RUN_KIND_STEPS["image"],
        step=lambda run, batch, sums: (steps.append(1), real_step(run, batch, sums))[1]))
    c = dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=2, batch_size=16, train_subset=128,
             test_subset=32, max_steps_per_epoch=8, erank_batches=1, erank_eval_samples=32, width=0.125, log="none",
             device="cpu", out_dir=str(tmp_path / "run"))
    with pytest.raises(S.MemoryGuardError) as e:
        S.train(c)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory guard: after 3 steps this run holds 20.0 GB") and "DDP" in msg
    assert "epoch 1" in msg and "usable" in msg and "batch_size" in msg
    assert reads == ["cpu"] and len(steps) == S.GUARD_STEPS  # read once, after the third step: nothing more trained
    assert not (tmp_path / "run" / "result.json").exists()


def test_a_run_whose_first_steps_match_the_estimate_goes_on_and_records_it(data_root, tmp_path, monkeypatch):
    c = dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=16, train_subset=64,
             test_subset=32, max_steps_per_epoch=4, erank_batches=1, erank_eval_samples=32, width=0.125, log="none",
             device="cpu", out_dir=str(tmp_path / "run"))
    est = S.guard_estimate(S.validate_config(c), "t4", 15.8)
    reads = _guarded_run(monkeypatch, est["train_gb"])
    res = S.train(c)
    assert reads == ["cpu"] and res["final"]["peak_mem_estimate_gb"] == est["peak_gb"]


def test_the_guard_stops_an_oversized_bert_run_too(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    reads = _guarded_run(monkeypatch, 15.0, rooms=("training", "text"))
    c = S.run_config({"kind": "text"}, dict(task="sst2", ses=True, ses_layers="last4"), preset="smoke",
                     run_dir=tmp_path / "bert", device="cpu")
    with pytest.raises(S.MemoryGuardError, match="^memory guard: after 3 steps this run holds 15.0 GB"):
        S.train(dict(c, log="none"))
    assert reads == ["cpu"]


def test_the_memory_bench_without_the_authors_files_is_one_line(tmp_path):
    """From a clone with no ../shared beside it, bench/memory_estimates.py died in a FileNotFoundError traceback."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_estimates.py"), "--shared", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"--shared {tmp_path}: no reference/paper_results there" in p.stderr.splitlines()[-1]
