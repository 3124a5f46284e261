"""Runs placed by their GPU memory estimate (issue 22): the plan, the batch runner's slots and the notebook kernel.
No GPU here: the CUDA side is exercised through its CPU twins (a GPU kind and count given instead of read)."""
from pathlib import Path

import pytest

import seslib as S
import sesrun as R


def _cfg(model="resnet50", dataset="tinyimagenet", batch_size=256, amp="fp16", **kw):
    return S.validate_config(dict(model=model, dataset=dataset, batch_size=batch_size, amp=amp, **kw))


def test_exp11_needs_both_t4s_and_a_cifar_resnet_one():
    one, two = S.placement(_cfg(), "t4", 1), S.placement(_cfg(), "t4", 2)
    assert two["gpus"] == 2 and two["text"].startswith("one DDP run over 2 × t4")
    assert one["gpus"] == 0 and one["text"].startswith("does not fit this machine: needs ")
    assert "\n" not in one["text"] and "this machine has 1" in one["text"]
    assert S.placement(_cfg("resnet18", "cifar100", 512), "t4", 2)["gpus"] == 1
    assert S.placement(_cfg(), "a100-80", 1)["gpus"] == 1  # a bigger GPU holds it alone


def test_the_kernel_places_a_run_over_its_gpus_or_refuses_it_in_one_line():
    cfg = _cfg()
    assert callable(S.placed_train_fn(cfg, gpus=("t4", 2)))  # one DDP run over both (train_torchrun)
    with pytest.raises(S.PreflightError, match="does not fit this machine: needs .* GB on one t4"):
        S.placed_train_fn(cfg, gpus=("t4", 1))
    assert S.placed_train_fn(cfg, gpus=(None, 0)) is None  # no GPU: nothing to place
    assert S.placed_train_fn(cfg, torchrun=2, gpus=("t4", 1)) is None  # the caller chose
    assert S.placed_train_fn(_cfg("resnet18", "cifar10", 256), gpus=("t4", 2)) is None  # fits one: train as is


def test_lpt_holds_k_machines_for_a_ddp_run():
    assert R.planning.makespan([(10.0, 2), 4.0, 4.0], 2) == 14.0  # the DDP run first on both, then one 4-s run on each
    assert R.planning.makespan([4.0, 4.0, 4.0], 2) == 8.0


def _gpu_slots(n, per=1):
    return [{"name": f"gpu{g}", "env": {"CUDA_VISIBLE_DEVICES": str(g), S.SLOT_ENV: str(k)}}
            for k, g in enumerate(g for g in range(n) for _ in range(per))]


def test_a_ddp_run_takes_slots_on_distinct_gpus_and_names_them_all():
    slots = _gpu_slots(2, per=2)  # gpu0, gpu0, gpu1, gpu1
    assert R.take_slots(1, [1, 3], slots) == [1]
    assert R.take_slots(2, [0, 1], slots) is None  # two slots, one GPU
    assert R.take_slots(2, [1, 2, 3], slots) == [1, 2]
    env = R.slots_env(slots, [1, 2])
    assert env["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and env["env"][S.TORCHRUN_ENV] == "2"
    assert env["name"] == "gpu0+gpu1" and R.slots_env(slots, [3]) is slots[3]


def _job(tmp_path, cfg, name="baseline"):
    return R.batch._Job("run", Path("11_resnet50_tinyimagenet.ipynb"), {}, tmp_path / "nb.ipynb", tmp_path / "log.txt",
                  name, 42, tmp_path / name / "result.json", 1.0, cfg=cfg)


def test_the_runner_places_runs_and_fails_one_that_fits_nowhere_before_it_starts(tmp_path):
    said = []
    jobs = [_job(tmp_path, _cfg())]
    R.place_jobs(jobs, _gpu_slots(2), said.append, kind="t4")
    assert jobs[0].gpus == 2 and "one DDP run over 2 × t4" in said[0]
    R.place_jobs(jobs, _gpu_slots(1), said.append, kind="t4")
    assert jobs[0].gpus == 0
    sched = R.batch._Scheduler(jobs, _gpu_slots(1), {}, str(tmp_path), "python3", said.append, 0.0, 0, 0.0, None, None, None)
    sched.launch_ready()  # nothing may start: the run is recorded as failed, with the placement's one line
    rec = sched.records[0]
    assert not sched.running and rec["status"] == "failed" and rec["error"].startswith("does not fit this machine")
    cpu = [_job(tmp_path, _cfg())]
    R.place_jobs(cpu, [{"name": "cpu0", "env": {}}], said.append)  # CPU slots: nothing to place
    assert cpu[0].gpus == 1


def test_plan_shows_exp11_as_one_ddp_run_over_both_t4s(tmp_path):
    df, t = R.cost_plan(["11"], gpus=2, gpu="t4", out=str(tmp_path))
    text = R.format_plan(df, t)
    assert "baseline: one DDP run over 2 × t4" in text and "ses: one DDP run over 2 × t4" in text
    assert df["peak_gb"].iloc[0] > 15 and "must fit on each" in text
    df1, t1 = R.cost_plan(["11"], gpus=1, gpu="t4", out=str(tmp_path))
    assert "NOT ON THIS MACHINE: 11_resnet50_tinyimagenet" in R.format_plan(df1, t1)
    assert t["wall_hours"] < t1["wall_hours"]  # two GPUs at DDP_EFFICIENCY, not one
