"""Training loop: config validation (one test per rejected knob, all raised before any data is read),
the reference recipes, a short real run that learns, results JSON, resume after a real SIGKILL
reproducing the uninterrupted history exactly, and a genuinely diverging run stopping cleanly."""
import json
from pathlib import Path

import pytest
import torch

import seslib as S

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("train_seconds", "epoch_seconds", "peak_mem_mb")


# ── validation ──────────────────────────────────────────────────────────────────────────────────

@pytest.fixture
def no_data(monkeypatch, tmp_path):
    """No data anywhere: if validation ran after loading, these tests would see FileNotFoundError instead."""
    monkeypatch.delenv("SES_DATA", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.chdir(tmp_path)
    return {"dataset": "tinyimagenet", "data_root": str(tmp_path / "absent"), "log": "none"}


BAD = [
    ({"epoch": 3}, "unknown config key.*'epoch'.*did you mean 'epochs'"),
    ({"epochs": 0}, "'epochs' must be an int >= 1"),
    ({"epochs": "10"}, "'epochs' must be an int"),
    ({"epochs": 2.0}, "'epochs' must be an int"),
    ({"batch_size": 1}, "'batch_size'"),
    ({"lr": "0.1"}, "'lr' must be a number"),
    ({"lr": 0}, "'lr' must be a number > 0"),
    ({"weight_decay": -1e-4}, "'weight_decay'"),
    ({"momentum": 1.0}, "'momentum'"),
    ({"ses": "yes"}, "'ses' must be True or False"),
    ({"ses_beta": 0.0}, r"'ses_beta' must be a number in \(0, 1\)"),
    ({"ses_beta": 1.0}, r"'ses_beta' must be a number in \(0, 1\)"),
    ({"ses_beta": 1.5}, r"'ses_beta'"),
    ({"ses_lambda": -0.01}, "'ses_lambda' must be a number >= 0"),
    ({"ses_every_k": 0}, "'ses_every_k'"),
    ({"ses_beta_schedule": "linear:0.3:1.2"}, "'ses_beta_schedule'"),
    ({"ses_beta_schedule": "zigzag:0.3"}, "'ses_beta_schedule'"),
    ({"ses_targets": []}, "'ses_targets'"),
    ({"model": "resnet34"}, "unknown model 'resnet34'; known: resnet18"),
    ({"model": "mlp_toy"}, "toy"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; known: cifar10"),
    ({"augment": "autoaugment"}, "'augment' must be one of"),
    ({"mix": "cutout"}, "'mix' must be one of"),
    ({"optimizer": "adam"}, "'optimizer' must be one of"),
    ({"schedule": "onecycle"}, "'schedule' must be one of"),
    ({"amp": "fp8"}, "'amp' must be one of"),
    ({"log": "verbose"}, "'log' must be one of"),
    ({"milestones": [35, 20]}, "'milestones'"),
    ({"grad_clip": 0}, "'grad_clip'"),
    ({"val_split": 1.0}, "'val_split'"),
    ({"robustness": "all16"}, "'robustness'"),
    ({"robustness_severities": [0, 6]}, "'robustness_severities'"),
    ({"resume": True}, "'resume' must be False when out_dir is None"),
    ({"train_subset": 100, "batch_size": 128}, "'train_subset'"),
    ({"mix": "mixup", "batch_size": 255}, "even with mixup"),
    ({"device": "gpu0"}, "'device'"),
    ({"seed": None}, "'seed' must be an int"),
]


@pytest.mark.parametrize("override,match", BAD, ids=[next(iter(o)) + "=" + repr(o[next(iter(o))]) for o, _ in BAD])
def test_bad_config_is_rejected_before_any_data(no_data, override, match):
    with pytest.raises(ValueError, match=match):
        S.train({**no_data, **override})


def test_bad_layer_preset_is_rejected_before_any_data(no_data):
    with pytest.raises(ValueError, match="preset"):
        S.train({**no_data, "ses": True, "ses_layers": "blocks_and_pool"})


def test_cfg_must_be_a_dict():
    with pytest.raises(ValueError, match="dict"):
        S.validate_config([("model", "resnet18")])


def test_reference_recipes():
    cnn = S.validate_config({"model": "resnet18", "dataset": "cifar100"})
    assert (cnn["optimizer"], cnn["lr"], cnn["momentum"], cnn["weight_decay"]) == ("sgd", 0.1, 0.9, 5e-4)
    assert (cnn["schedule"], cnn["lr_gamma"], cnn["epochs"], cnn["batch_size"]) == ("multistep", 0.2, 50, 256)
    assert (cnn["ses_lambda"], cnn["ses_beta"], cnn["ses_every_k"], cnn["amp"]) == (0.01, 0.7, 1, "auto")
    vit = S.default_config("vit_small", "cifar100")
    assert (vit["optimizer"], vit["lr"], vit["weight_decay"], vit["schedule"]) == ("adamw", 1e-3, 0.05, "cosine")
    assert (vit["warmup_epochs"], vit["grad_clip"], vit["batch_size"]) == (5, 1.0, 512)
    assert S.default_config("resnet50", "tinyimagenet")["epochs"] == 60
    full = S.validate_config({})
    assert set(full) == set(S.default_config()) and full["model"] == "resnet18"


# ── real runs (tiny: a few steps of ResNet-18 on real CIFAR-10 images) ───────────────────────────

def tiny_cfg(data_root, **kw):
    cfg = {"model": "resnet18", "dataset": "cifar10", "data_root": str(data_root), "epochs": 2, "batch_size": 32,
           "train_subset": 256, "test_subset": 128, "max_steps_per_epoch": 4, "erank_batches": 1, "erank_eval_samples": 64, "log": "none",
           "eval_batch_size": 128}
    cfg.update(kw)
    return cfg


def strip_timing(history):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in history]


def test_short_run_learns_and_writes_the_result_json(data_root, tmp_path):
    cfg = tiny_cfg(data_root, lr=0.02, train_subset=512, max_steps_per_epoch=None, batch_size=64, ses=True,
                   ses_every_k=2, out_dir=str(tmp_path / "run"))
    res = S.train(cfg)
    h = res["history"]
    assert len(h) == 2 and h[1]["train_loss"] < h[0]["train_loss"]
    assert h[0]["lr"] == 0.02 and h[1]["lr"] == pytest.approx(0.02 * 0.2)  # MultiStep x0.2 (milestones 1, 2 of 2)
    assert all(r["ses_loss"] is not None and r["beta"] == 0.7 and r["steps"] == 8 for r in h)
    assert set(h[0]["erank"]) == {"layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                  "layer4.0", "layer4.1", "avgpool"}
    assert all(0 < v["erank"] <= 32 and v["ratio"] == pytest.approx(v["erank"] / v["d"] ** 0.7)
               for v in h[0]["erank"].values())
    assert h[0]["gap"] == pytest.approx(h[0]["train_acc"] - h[0]["test_acc"])
    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(on_disk) == {"config", "env", "history", "final"}
    f = on_disk["final"]
    assert f["test_acc"] == h[-1]["test_acc"] and f["best_test_acc_over_epochs"] == max(r["test_acc"] for r in h)
    assert f["params_m"] == pytest.approx(11.17, abs=0.01) and f["robustness"] is None
    assert f["peak_mem_gb"] is None and f["peak_mem_estimate_gb"] is None  # CPU: no GPU peak, no estimate made
    assert on_disk["env"]["seed"] == 42 and on_disk["env"]["torch"] == torch.__version__
    assert on_disk["config"]["ses"] is True
    # resume=True on a finished run returns its result without training again
    assert S.train(dict(cfg, resume=True))["history"] == on_disk["history"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_history(data_root, tmp_path, killed_after_first_checkpoint):
    # RandAugment (torch RNG), mixup (numpy RNG), periodic SES and the loader's generator all have to resume
    cfg = tiny_cfg(data_root, epochs=3, max_steps_per_epoch=3, augment="randaugment", mix="mixup", ses=True,
                   ses_every_k=2, val_split=0.02)
    killed = tmp_path / "killed"
    assert 1 <= killed_after_first_checkpoint(dict(cfg, out_dir=str(killed))) < 3

    resumed = S.train(dict(cfg, out_dir=str(killed), resume=True))
    straight = S.train(dict(cfg, out_dir=str(tmp_path / "straight")))
    assert len(resumed["history"]) == 3
    assert strip_timing(resumed["history"]) == strip_timing(straight["history"])
    assert resumed["final"]["test_acc"] == straight["final"]["test_acc"]


def test_a_checkpoint_made_with_other_settings_is_set_aside_and_the_run_starts_over(data_root, tmp_path):
    cfg = tiny_cfg(data_root, epochs=1, max_steps_per_epoch=1, out_dir=str(tmp_path / "runs" / "r_seed42"),
                   keep_checkpoint=True)
    S.train(cfg)
    run = tmp_path / "runs" / "r_seed42"
    (run / "result.json").unlink()  # an unfinished run, as far as resume can tell
    old = torch.load(run / "checkpoint.pt", weights_only=True)
    res = S.train(dict(cfg, resume=True, lr=0.05))
    assert res["config"]["lr"] == 0.05 and res["history"][0]["lr"] == 0.05  # trained anew, not resumed
    aside = list((tmp_path / "stale").glob("r_seed42.*"))
    assert len(aside) == 1 and "lr 0.1 → 0.05" in (aside[0] / "why.txt").read_text()
    kept = torch.load(aside[0] / "checkpoint.pt", weights_only=True)  # moved, not deleted
    assert kept["config"]["lr"] == 0.1 and kept["epoch"] == old["epoch"]


def test_a_finished_result_made_with_other_settings_is_set_aside_and_redone(data_root, tmp_path):
    run = tmp_path / "runs" / "r_seed42"
    cfg = tiny_cfg(data_root, epochs=1, max_steps_per_epoch=1, out_dir=str(run))
    first = S.train(cfg)
    again = S.train(dict(cfg, resume=True))  # same settings: the finished result is handed back
    assert again["history"] == first["history"]
    redone = S.train(dict(cfg, resume=True, epochs=2))
    assert len(redone["history"]) == 2
    (aside,) = (tmp_path / "stale").glob("r_seed42.*")
    assert json.loads((aside / "result.json").read_text())["config"]["epochs"] == 1
    assert "epochs 1 → 2" in (aside / "why.txt").read_text()


def test_resumed_run_keeps_the_best_epoch_weights(data_root, tmp_path, killed_after_first_checkpoint):
    """The paper's robustness is measured on the best test-accuracy epoch's weights: a run killed after that epoch
    must still evaluate those weights after resuming. A ViT (no BatchNorm) with lr ~ 0 after epoch 1 keeps its
    weights, so epoch 1 stays the best (ties never replace it) and must come back from the checkpoint."""
    cfg = tiny_cfg(data_root, model="vit_tiny", epochs=3, max_steps_per_epoch=2, warmup_epochs=0, schedule="multistep",
                   milestones=[1], lr_gamma=1e-30, robustness=["contrast"], robustness_severities=[1],
                   robustness_subset=16, ses=True, ses_layers="last4")
    killed = tmp_path / "killed"
    killed_after_first_checkpoint(dict(cfg, out_dir=str(killed)))
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ck["best"]["epoch"] == 1 and ck["epoch"] < 3
    assert all(torch.equal(ck["best"]["model"][k], v) for k, v in ck["model"].items() if ck["epoch"] == 1)
    resumed = S.train(dict(cfg, out_dir=str(killed), resume=True))
    straight = S.train(dict(cfg, out_dir=str(tmp_path / "straight")))
    for res in (resumed, straight):
        best = res["final"]["robustness_paper_best"]
        assert best["epoch"] == 1 and best["weights"].startswith("best test-accuracy epoch")
    assert resumed["final"]["robustness_paper_best"]["detail"] == straight["final"]["robustness_paper_best"]["detail"]
    assert resumed["final"]["robustness_paper"]["detail"] == straight["final"]["robustness_paper"]["detail"]


@pytest.mark.skipif(not hasattr(S, "evaluate_corruptions"), reason="corruptions section not present")
def test_robustness_is_measured_on_the_final_model(data_root):
    res = S.train(tiny_cfg(data_root, epochs=1, max_steps_per_epoch=1, robustness=["contrast", "gaussian_noise"],
                           robustness_severities=[2], robustness_subset=32))
    rob = res["final"]["robustness"]
    assert set(rob["accuracy"]) == {"contrast", "gaussian_noise"} and 0 <= rob["mean_corruption_acc"] <= 100
    for key in ("robustness_paper", "robustness_paper_best"):  # the paper's protocol, final and test-selected weights
        paper = res["final"][key]
        assert paper["protocol"] == "paper" and paper["n_images"] == 32 and len(paper["detail"]) == 15
        assert set(paper["detail"]) == {f"{c}_s{s}" for c in S.PAPER_PROTOCOL["corruptions"] for s in (1, 3, 5)}
    json.dumps(res)  # JSON-ready


def test_diverging_run_stops_cleanly_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    # honest divergence, no mocks: epoch 2 runs at lr 0.1 * 1e12, and the loss really goes non-finite
    run = tmp_path / "nan"
    cfg = tiny_cfg(data_root, epochs=3, milestones=[1], lr_gamma=1e12, out_dir=str(run))
    with pytest.raises(S.NonFiniteLossError, match=r"epoch 2, step \d+/4.*checkpoint kept.*epoch 1"):
        S.train(cfg)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1 and ck["history"][0]["lr"] == 0.1
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert not (run / "result.json").exists()
    model = S.build_model("resnet18", 10)
    model.load_state_dict(ck["model"])  # the kept state is a usable model


def test_divergence_through_an_epochs_last_step_stops_as_the_others_do(data_root, tmp_path):
    """One step per epoch: epoch 2's only step runs at lr 0.1 * 1e12; its loss is finite (computed before the update)
    but the update leaves the weights non-finite. The stop is the same one line, before the end-of-epoch erank pass
    (which would die on the non-finite activations), and epoch 1's checkpoint is kept."""
    run = tmp_path / "nan_last"
    cfg = tiny_cfg(data_root, epochs=3, milestones=[1], lr_gamma=1e12, max_steps_per_epoch=1, out_dir=str(run))
    with pytest.raises(S.NonFiniteLossError, match=r"non-finite training loss at epoch 2: the model diverged through "
                                                   r"its last optimizer step.*checkpoint kept.*epoch 1"):
        S.train(cfg)
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
