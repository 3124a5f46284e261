"""What one notebook cell or one run leaves behind for the next: module tables a cell cannot change by accident,
figures that stay off screen when asked, measuring forwards that leave the model as they found it, and the commands
that moved from seslib.py to sesrun.py."""
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("table", ["PRESETS", "TOY_PRESETS", "TOY_DEFAULTS", "GPU_SPEED", "DATASETS", "FIGURES",
                                   "CLAIM_METRICS", "MODEL_COST"])
def test_module_tables_are_read_only_views_nested_dicts_too(table):
    t = getattr(S, table)
    with pytest.raises(TypeError):
        t["x"] = 1
    for v in t.values():
        if isinstance(v, types.MappingProxyType):
            with pytest.raises(TypeError):
                v["epochs"] = 5
    assert R.KAGGLE["version_hours"] == 12.0
    with pytest.raises(TypeError):
        R.KAGGLE["version_hours"] = 24.0


def test_a_copy_of_a_preset_still_changes_freely_and_plans_the_same():
    smoke = {**S.PRESETS["smoke"], "epochs": 3}
    assert smoke["epochs"] == 3 and S.PRESETS["smoke"]["epochs"] == 1
    cfg = S.run_config(dict(model="resnet18", dataset="cifar10", epochs=40), {}, preset="smoke")
    assert cfg["epochs"] == 1 and cfg["robustness_severities"] == [3] and isinstance(cfg["robustness_severities"], list)


class _Recorder:
    def __init__(self):
        self.shown = []

    def __call__(self, obj, *a, **k):
        self.shown.append(obj)


def test_report_show_false_draws_no_figure_inline_and_still_saves_them(data_root, tmp_path, monkeypatch):
    import IPython.display
    plan = S.plan_runs({"baseline": dict(ses=False)}, "all", [42], tmp_path / "nb", name="t", device="cpu",
                       data_root=str(data_root), base=dict(model="resnet18", dataset="cifar10", batch_size=32, epochs=1,
                                                           train_subset=64, test_subset=32, max_steps_per_epoch=1,
                                                           erank_batches=1, erank_eval_samples=32, log="none"))
    S.run_plan(plan)
    shown = _Recorder()
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # as inside a notebook
    monkeypatch.setattr(IPython.display, "display", shown)
    rep = S.report(plan, figures=("bars", "curves"), show=False)
    assert shown.shown == [] and len(rep.figures) == 2 and all(Path(f).is_file() for f in rep.figures)
    S.report(plan, figures=("bars", "curves"))
    assert len(shown.shown) == 2  # the default still shows them inline


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


@pytest.mark.parametrize("start_training", [True, False])
def test_measuring_restores_the_mode_and_in_train_mode_the_batchnorm_buffers(start_training):
    net = _bn_net().train(start_training)
    before = [b.clone() for b in net.buffers()]
    x = torch.randn(8, 3, 6, 6)
    with S.measuring(net, "train") as m:
        y = m(x)
        assert m.training and not y.requires_grad
    assert net.training == start_training
    assert all(torch.equal(a, b) for a, b in zip(before, net.buffers()))  # running stats untouched
    with S.measuring(net) as m:
        assert not m.training
    assert net.training == start_training
    net.train()
    net(x)  # a plain training forward does move them: the restore above is what kept them
    assert not torch.equal(before[0], net[1].running_mean)


def test_autocast_is_a_no_op_for_fp32_and_autocasts_on_the_devices_own_type():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with S.autocast(cpu, None):
        assert (a @ b).dtype == torch.float32
    with S.autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_normalize_u8_is_totensor_then_normalize():
    import torchvision.transforms.v2.functional as TF
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(mean), list(std))
    assert torch.allclose(S.normalize_u8(x, mean, std), ref, atol=1e-6)
    assert torch.equal(S.normalize_u8(x), x.float() / 255)


@pytest.mark.parametrize("command", S.MOVED_COMMANDS)
def test_a_moved_seslib_command_names_its_sesrun_replacement_in_one_line(command):
    p = subprocess.run([sys.executable, "-m", "seslib", command, "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"error: `python -m seslib {command}` is the runner's: run `python sesrun.py {command} 1` instead"


def test_sesrun_refuses_a_seslib_of_another_contract_in_one_line(tmp_path):
    (tmp_path / "seslib.py").write_text("CONTRACT_VERSION = 0\n")
    (tmp_path / "sesrun.py").write_text((ROOT / "sesrun.py").read_text())
    p = subprocess.run([sys.executable, "sesrun.py", "plan", "1"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"speaks run contract 0, this sesrun.py speaks {S.CONTRACT_VERSION}" in p.stderr
    (tmp_path / "seslib.py").write_text("x = 1\n")  # a seslib from before the contract existed
    p = subprocess.run([sys.executable, "-c", "import sesrun"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "ImportError: " in p.stderr and "speaks run contract none (older)" in p.stderr


@pytest.mark.parametrize("key, value", [("epochs", True), ("batch_size", False), ("epochs", 0), ("batch_size", 2.0)])
def test_notebook_params_reject_a_bool_or_non_int_count(key, value):
    ns = {"epochs": None, "batch_size": None, "preset": "smoke"}
    S.check_notebook_params(dict(ns), set(ns))  # the defaults pass
    with pytest.raises(ValueError, match=f"{key} must be None .* or a positive int; got {value!r}"):
        S.check_notebook_params(dict(ns, **{key: value}), set(ns))


@pytest.mark.parametrize("device", ["banana", "cuda:x", 3.5])
def test_every_notebook_rejects_a_device_that_is_no_torch_device(device):
    """Notebook 04 (the toy study, CPU only) used to accept device='banana' where notebook 01 rejected it."""
    ns = {"device": "auto", "preset": "paper"}
    S.check_notebook_params(dict(ns), set(ns))
    S.check_notebook_params(dict(ns, device="cuda:1"), set(ns))  # a name: whether this machine has it is train's check
    with pytest.raises(ValueError, match=r"device must be 'auto' or a torch device .* got " + re.escape(repr(device))):
        S.check_notebook_params(dict(ns, device=device), set(ns))


def test_notebook_04_rejects_device_banana_under_papermill(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match="device must be 'auto' or a torch device"):
        pm.execute_notebook(str(ROOT / "notebooks" / "04_toy_jacobian.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"device": "banana", "preset": "smoke", "out_dir": str(tmp_path / "o")},
                            cwd=str(ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
