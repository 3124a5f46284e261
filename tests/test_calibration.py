"""The plan calibrated by a GPU's measurements (issue 31): bench/gpu_check.py's JSON read, its step times, SES
overhead, DDP efficiency and usable memory replacing the assumed factors, each checked against hand arithmetic on a
hand-written file; what stays assumed said in the plan's first lines; a bad file refused in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]
BASE_S, SES_S, BATCH = 0.128, 0.160, 256  # ResNet-18 CIFAR-100 fp32: seconds per step at batch 256
BERT_BASE_S, BERT_SES_S = 0.15, 0.18  # BERT-base SST-2 fp16 at batch 32 x 128


def write_cal(path, efficiency=0.8, usable=14.75, device="Tesla T4", **kw):
    d = {"schema": "ses-gpu-check/2", "device": device, "gpu_kind": S.gpu_kind(device), "gpus": 2,
         "time": "2026-12-07 10:00", "memory": {"total_gb": 15.83, "context_gb": 0.3, "usable_gb": usable},
         "steps": [{"name": "resnet18_cifar100_fp32", "model": "resnet18", "dataset": "cifar100", "task": None,
                    "precision": "fp32", "recipe_batch": BATCH, "measured_batch": BATCH, "max_len": None,
                    "seconds_per_step": {"baseline": BASE_S, "ses": SES_S}},
                   {"name": "bert_sst2_fp16", "model": "bert-base-uncased", "dataset": None, "task": "sst2",
                    "precision": "fp16", "recipe_batch": 32, "measured_batch": 32, "max_len": 128,
                    "seconds_per_step": {"baseline": BERT_BASE_S, "ses": BERT_SES_S}}],
         "ddp": {"gpus": 2, "efficiency": efficiency, "status": "PASS"} if efficiency else None, **kw}
    Path(path).write_text(json.dumps(d))
    return R.read_calibration(path)


def plan_runs(nb, tmp_path):
    return R.notebook_plan(ROOT / "notebooks" / f"{nb}.ipynb", out_dir=str(tmp_path / nb))


def test_a_measured_step_gives_the_epoch_by_hand_arithmetic(tmp_path):
    cal = write_cal(tmp_path / "cal.json")
    plan = plan_runs("10_periodic_ses", tmp_path)
    images = 50000 + 10000 / 3  # CIFAR-100: the training set, and the test set at a third of a training image
    runs = {r.config: r for r in plan.runs}
    for config, per_image in (("baseline", BASE_S / BATCH), ("k1", SES_S / BATCH),
                              ("k3", BASE_S / BATCH + (SES_S - BASE_S) / BATCH / 3)):  # SES every 3rd step
        r = runs[config]
        est = S.run_estimate(r, plan.paper, plan.paper_gpu, "t4", R.calibrated(cal, "t4"))
        epoch = per_image * images
        assert est["source"] == "measured step (Tesla T4)" and est["epoch_s"] == pytest.approx(epoch)
        assert est["seconds"] == pytest.approx(r.cfg["epochs"] * epoch + S.estimate_eval_seconds(r.cfg, epoch))


def test_bert_and_other_kinds_match_on_model_data_and_precision(tmp_path):
    cal = write_cal(tmp_path / "cal.json")
    bert = next(r for r in plan_runs("22_bert_glue", tmp_path).runs if r.config == "sst2_ses_all")
    n_train, n_dev = S.GLUE_TASKS["sst2"]["sizes"]
    got = R.calibrated_epoch(cal, bert.cfg, "t4")
    assert got["epoch_s"] == pytest.approx(BERT_SES_S / 32 * (n_train + n_dev / 3))
    mrpc = next(r for r in plan_runs("22_bert_glue", tmp_path).runs if r.cfg["task"] == "mrpc")
    fp16 = next(r for r in plan_runs("12_mixup_cutmix", tmp_path).runs if r.config == "ses")  # ResNet-18 in fp16
    assert R.calibrated_epoch(cal, mrpc.cfg, "t4") is None and R.calibrated_epoch(cal, fp16.cfg, "t4") is None
    author = dict(next(r for r in plan_runs("10_periodic_ses", tmp_path).runs if r.config == "k1").cfg,
                  ses_impl="author")
    assert R.calibrated_epoch(cal, author, "t4") is None  # the author's SES was not measured
    assert R.calibrated_epoch(cal, dict(author, ses_impl="suite"), "cpu") is None  # a GPU's step: not a CPU's
    exp1 = next(r for r in plan_runs("01_training_dynamics", tmp_path).runs if r.config == "ses").cfg  # CIFAR-10
    got = R.calibrated_epoch(cal, exp1, "t4")  # the same 32-px step as CIFAR-100's (only the classifier differs)
    assert got["epoch_s"] == pytest.approx(SES_S / BATCH * (50000 + 10000 / 3))
    assert got["source"] == "measured step (Tesla T4; its cifar100 step)"
    k1 = next(r for r in plan_runs("10_periodic_ses", tmp_path).runs if r.config == "k1").cfg
    a100 = R.calibrated_epoch(cal, k1, "a100")  # measured on a T4, planned for an A100: the assumed speed ratio
    assert a100["epoch_s"] == pytest.approx(R.calibrated_epoch(cal, k1, "t4")["epoch_s"] * S.GPU_SPEED["t4"] /
                                            S.GPU_SPEED["a100"]) and "scaled to a100" in a100["source"]


def test_the_measured_ddp_efficiency_and_usable_memory_replace_the_assumed(tmp_path):
    cal = write_cal(tmp_path / "cal.json", efficiency=0.8)
    df0, t0 = R.cost_plan(["11"], gpus=2, gpu="t4", out=tmp_path / "o")
    df1, t1 = R.cost_plan(["11"], gpus=2, gpu="t4", out=tmp_path / "o", cal=cal)
    # Exp 11 (ResNet-50, bf16 -> fp16 on a T4) is not among the measured steps: only DDP's efficiency changes
    assert df1.loc[0, "gpu_hours"] == pytest.approx(df0.loc[0, "gpu_hours"] * S.DDP_EFFICIENCY / 0.8)
    assert t1["wall_hours"] == pytest.approx(t0["wall_hours"] * S.DDP_EFFICIENCY / 0.8)
    cal = write_cal(tmp_path / "small.json", usable=8.0)
    vit = R.cost_plan(["14"], gpus=2, gpu="t4", out=tmp_path / "o", cal=cal)[0]  # ViT-S needs > 8 GB with the margin
    assert "DDP" in vit.loc[0, "where"] and "holds 8.0" in vit.loc[0, "where"]
    assert "DDP" not in R.cost_plan(["14"], gpus=2, gpu="t4", out=tmp_path / "o")[0].loc[0, "where"]
    other = R.cost_plan(["14"], gpus=2, gpu="a100", out=tmp_path / "o", cal=cal)[0]  # a T4's memory is not an A100's
    assert "DDP" not in other.loc[0, "where"]
    assert R.cost_plan(["11"], gpus=2, gpu="t4", out=tmp_path / "o",
                       cal=write_cal(tmp_path / "one.json", efficiency=None))[0].loc[0, "gpu_hours"] == \
        pytest.approx(df0.loc[0, "gpu_hours"])  # one GPU measured: DDP stays assumed


def test_the_plan_says_first_what_is_measured_and_what_is_assumed(tmp_path):
    df, t = R.cost_plan(["10", "11"], gpus=2, gpu="t4", out=tmp_path / "o")
    first = R.format_plan(df, t).splitlines()[0]
    assert first.startswith("times: the paper's epoch times") and "UNMEASURED" in first and "--calibration" in first
    cal = write_cal(tmp_path / "cal.json")
    df, t = R.cost_plan(["10", "11"], gpus=2, gpu="t4", out=tmp_path / "o", cal=cal)
    lines = R.format_plan(df, t).splitlines()
    assert lines[0] == f"calibration: {tmp_path / 'cal.json'}, measured on Tesla T4 (2026-12-07 10:00)"
    assert lines[1] == ("  measured: seconds per step with SES off and on of bert-base-uncased, resnet18; DDP "
                        "efficiency 0.80; usable memory 14.8 GB per GPU")
    assert lines[2].startswith("  still assumed: times of resnet50 (the paper's)")
    assert "measured step (Tesla T4)" in lines[4] and "paper (L40S)" in lines[5]  # Exp 10's rows, then Exp 11's


@pytest.mark.parametrize("content,why", [(None, "no such file"), (b"\xe9t\xe9", "not a JSON file"),
                                         (b'{"schema": "ses-gpu-check/1"}', "not a gpu_check.json of schema"),
                                         (b'{"schema": "ses-gpu-check/2", "dry_run": true, "device": "cpu"}',
                                          "written by a CPU dry run")])
def test_a_bad_calibration_file_is_one_line_naming_it(tmp_path, content, why):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as e:
        R.read_calibration(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "bench/gpu_check.py" in str(e.value)
    p = subprocess.run([sys.executable, str(ROOT / "sesrun.py"), "plan", "10", "--calibration", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and why in p.stderr and not p.stdout


def test_the_batch_runner_times_and_places_runs_by_the_calibration(tmp_path):
    cal = write_cal(tmp_path / "cal.json", usable=8.0)
    k1 = next(r for r in plan_runs("10_periodic_ses", tmp_path).runs if r.config == "k1")
    vit = next(r for r in plan_runs("14_vit", tmp_path).runs if r.cfg["model"] == "vit_small")
    job = lambda r, est: R.batch._Job("run", Path("nb.ipynb"), {}, tmp_path / "nb.ipynb", tmp_path / "log.txt",  # noqa
                                      r.config, 42, tmp_path / "result.json", 1.0, cfg=r.cfg, est=est)
    jobs = [job(k1, {"seconds": 1.0, "epoch_s": 1.0, "source": "paper (Tesla T4)"}),
            job(k1, {"seconds": 2.0, "epoch_s": 2.0, "source": "measured (this run)"}), job(vit, None)]
    slots = [{"name": "gpu0", "env": {"CUDA_VISIBLE_DEVICES": "0"}}, {"name": "gpu1", "env": {"CUDA_VISIBLE_DEVICES": "1"}}]
    R.calibrate_jobs(jobs, slots, cal, kind="t4")
    assert jobs[0].est["source"] == "measured step (Tesla T4)"
    assert jobs[0].est["epoch_s"] == pytest.approx(R.calibrated_epoch(cal, k1.cfg, "t4")["epoch_s"])
    assert jobs[1].est["seconds"] == 2.0  # its own measured epochs stay
    R.place_jobs(jobs[2:], slots, [].append, kind="t4", cal=cal)
    assert jobs[2].gpus == 2  # 8 GB measured usable: ViT-S with the margin needs DDP
    R.calibrate_jobs(jobs[:1], [{"name": "cpu0", "env": {}}], write_cal(tmp_path / "c2.json"), kind="t4")
    assert jobs[0].est["source"] == "measured step (Tesla T4)"  # CPU slots: nothing recalibrated (and no error)
    out = tmp_path / "outputs"
    out.mkdir()
    assert R.batch._batch_calibration(None, out, print) is None
    write_cal(out / "gpu_check.json")
    said = []
    assert R.batch._batch_calibration(None, out, said.append).device == "Tesla T4" and "calibration:" in said[0]
    (out / "gpu_check.json").write_text(json.dumps({"schema": "ses-gpu-check/2", "dry_run": True, "device": "cpu"}))
    with pytest.raises(ValueError, match=r"^found .*gpu_check.json, which the batch would use .* written by a CPU dry "
                                         r"run .*: move it away, or give --calibration FILE$"):
        R.batch._batch_calibration(None, out, said.append)  # not a --calibration the user gave: says where it came from


def _changed(d, change):
    """d with one field changed: change = (dotted path, new value); steps.0.x is the first step row's x."""
    import copy
    d = copy.deepcopy(d)
    path, value = change
    keys = path.split(".")
    target = d
    for k in keys[:-1]:
        target = target[int(k)] if isinstance(target, list) else target[k]
    target[int(keys[-1]) if isinstance(target, list) else keys[-1]] = value
    return d


@pytest.mark.parametrize("change,why", [
    (("steps", "abc"), "'steps' must be a list"),
    (("steps.0", 3), r"steps\[0\] must be an object"),
    (("steps.0.seconds_per_step", [1, 2]), "'seconds_per_step' must be an object"),
    (("steps.0.seconds_per_step.baseline", True), r"seconds_per_step\['baseline'\] must be a number > 0; got True"),
    (("steps.0.seconds_per_step.ses", "0.2"), r"seconds_per_step\['ses'\] must be a number"),
    (("steps.0.seconds_per_step.ses", -1.0), r"seconds_per_step\['ses'\] must be a number > 0; got -1.0"),
    (("steps.0.measured_batch", 256.0), "'measured_batch' must be a whole number > 0"),
    (("steps.0.dataset", ["x"]), "'dataset' must be a string or null"),
    (("memory", [1]), "'memory' must be an object or null"),
    (("memory.usable_gb", 1e9), r"memory\['usable_gb'\] must be a number in \(0, 15.83\]"),
    (("ddp", "PASS"), "'ddp' must be an object or null"),
    (("ddp.efficiency", "x"), r"ddp\['efficiency'\] must be a number in \(0, 1.5\]"),
    (("device", "NVIDIA Foo 9000"), "device 'NVIDIA Foo 9000' is no GPU kind this suite knows"),
    (("device", None), r"'device' \(the GPU's name\) must be a string"),
])
def test_a_malformed_calibration_is_refused_in_one_line_naming_the_field(tmp_path, change, why):
    write_cal(tmp_path / "good.json")
    d = _changed(json.loads((tmp_path / "good.json").read_text()), change)
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=why) as e:
        R.read_calibration(tmp_path / "bad.json")
    assert "\n" not in str(e.value) and str(tmp_path / "bad.json") in str(e.value)


def test_a_folder_is_not_a_calibration(tmp_path):
    with pytest.raises(ValueError, match="is a folder: give its gpu_check.json"):
        R.read_calibration(tmp_path)
