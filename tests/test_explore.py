"""Exploring SES by hand (issue 16): the SES object on models build_model does not make, load_run, layer_spectra,
the own-loop example of docs/ses-in-your-loop.md, and notebooks/00_explore.ipynb under papermill."""
import re
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch
import torch.nn.functional as F
import torchvision

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]


def _manual_loss(model, names, x, beta, attn=False):
    """ses_loss on activations collected by hand (plain forward hooks, pooled as SES pools), no SES object."""
    mods, acts, handles = dict(model.named_modules()), {}, []
    for n in names:
        kind = "attn_weights" if n.endswith("attn_drop") else "output"
        handles.append(mods[n].register_forward_hook(
            lambda m, i, o, n=n, kind=kind: acts.__setitem__(n, S.pool_activation(i[0] if kind == "attn_weights" else o, kind))))
    model(x)
    for h in handles:
        h.remove()
    return S.ses_loss([acts[n] for n in names], beta)


def test_ses_object_on_a_torchvision_resnet_equals_ses_loss():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()  # ImageNet stem: not a build_model model
    x, y = torch.randn(16, 3, 64, 64), torch.randint(0, 10, (16,))
    ses = S.SES(model, beta=0.6, lam=0.02)
    assert len(ses.names) == 9 and ses.names[-1] == "avgpool"
    loss_task = F.cross_entropy(model(x), y)
    got = ses()
    torch.manual_seed(0)
    want = 0.02 * _manual_loss(model, ses.names, x, 0.6)  # BatchNorm in train mode: same batch, same statistics
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (loss_task + got).backward()  # differentiable, in the user's loop
    assert all(p.grad is not None for p in model.layer1.parameters())
    rep = ses.report()
    assert list(rep.index) == ses.names and np.allclose(rep["ratio"], rep["erank"] / rep["target"])


def test_ses_object_on_a_timm_vit_with_attention_weights():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10,
                              drop_path_rate=0.0).train()
    x = torch.randn(8, 3, 32, 32)
    ses = S.SES(model, layers="last4", targets=("block", "attn_weights"), beta=0.5, lam=0.1)
    assert len(ses.names) == 8
    model(x)
    got = ses()
    want = 0.1 * _manual_loss(model, ses.names, x, 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_periodic_ses_stores_nothing_on_skipped_steps_and_eval_stores_nothing():
    model = S.build_model("resnet18", 10, width=0.25).train()
    ses = S.SES(model, lam=0.01, every_k=3)
    x = torch.randn(8, 3, 32, 32)
    vals = []
    for _ in range(6):
        model(x)
        assert (ses.collector._acts != {}) == (ses.step % 3 == 0)  # the hooks consult the step before the forward
        vals.append(ses().item())
    assert [v != 0 for v in vals] == [True, False, False, True, False, False]
    model.eval()
    model(x)
    assert ses.collector._acts == {}
    with pytest.raises(RuntimeError, match="train mode"):
        ses.step = 0
        ses()


def test_bad_layers_and_outputs_are_clear_errors():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"no module named \['layer9'\] in ResNet; valid names: conv1, bn1, relu"):
        S.SES(model, layers=["layer9"])
    with pytest.raises(ValueError, match="no layer presets for Sequential: pass a list of module names"):
        S.SES(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4)))

    class FiveD(torch.nn.Module):
        def forward(self, x):
            return x[:, :, None, :, :]
    net = torch.nn.Sequential(FiveD(), torch.nn.Flatten(), torch.nn.Linear(3 * 16, 2))
    ses = S.SES(net, layers=["0"])
    with pytest.raises(ValueError, match=r"layer '0': cannot pool an activation of shape \(4, 3, 1, 4, 4\)"):
        net(torch.randn(4, 3, 4, 4))


def test_layer_spectra_equal_a_float64_eigendecomposition():
    torch.manual_seed(0)
    model = S.build_model("resnet18", 10, width=0.25).eval()
    x = torch.randn(40, 3, 32, 32)
    spectra = S.layer_spectra(model, x, layers=["layer2.1", "avgpool"])
    pooled = {}
    hooks = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: pooled.__setitem__(n, o.detach().double().mean((2, 3)).numpy())) for n in spectra]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n, eig in spectra.items():
        want = np.sort(np.linalg.eigvalsh(np.cov(pooled[n], rowvar=False)))[::-1]
        # the pooling runs in float32 (as in training), the covariance in float64: float32-level agreement
        assert eig.dtype == torch.float64 and np.allclose(eig.numpy(), want, rtol=1e-5, atol=1e-6 * want[0]), n
    assert S.spectral_erank(spectra["avgpool"]) <= 39 + 1e-6  # 40 samples: rank <= 39


def test_load_run_gives_the_trained_model(data_root, tmp_path):
    cfg = dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=32,
               train_subset=64, test_subset=32, max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32,
               width=0.25, log="none", device="cpu", ses=True, out_dir=str(tmp_path / "run"))
    res = S.train(cfg)
    model, c, history = S.load_run(tmp_path / "run")
    assert c == res["config"] and history == res["history"] and not model.training
    x, y = S.load_dataset("cifar10", data_root, "test", subset=32)
    xn = (x.float() / 255 - torch.tensor(c["norm_mean"]).view(1, 3, 1, 1)) / torch.tensor(c["norm_std"]).view(1, 3, 1, 1)
    acc = (model(xn).argmax(1) == y).float().mean().item() * 100
    assert acc == pytest.approx(res["final"]["test_acc"])  # the final weights, exactly
    (tmp_path / "run" / "model_final.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no saved weights"):
        S.load_run(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="neither result.json nor checkpoint.pt"):
        S.load_run(tmp_path)


def test_the_docs_own_loop_example_runs():
    page = (ROOT / "docs" / "ses-in-your-loop.md").read_text()
    section = page[page.index("## SES in your own training loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    ns = {}
    exec(code, ns)  # noqa: S102 - the documented example, as a user would paste it
    assert ns["loss"].requires_grad and ns["ses"].last_loss is not None
    core = page[page.index("## The SES core (room `ses`)"):]  # it used F, x and y without defining them
    ns = {}
    exec(re.search(r"```python\n(.*?)```", core, re.S).group(1), ns)  # noqa: S102
    assert ns["loss"].requires_grad and len(ns["collector"].activations) == 9


def test_explore_notebook_runs_and_draws(data_root, tmp_path):
    run = tmp_path / "run"
    S.train(dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=32,
                 train_subset=64, test_subset=32, max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32,
                 width=0.25, log="none", device="cpu", ses=True, out_dir=str(run)))
    out = tmp_path / "out"
    nb = pm.execute_notebook(str(ROOT / "notebooks" / "00_explore.ipynb"), str(tmp_path / "x.ipynb"),
                             parameters=dict(data_root=str(data_root), n_train=128, n_test=64, width=0.25, epochs=1,
                                             batch_size=32, device="cpu", run_dir=str(run), out_dir=str(out)),
                             kernel_name="python3", cwd=str(ROOT), progress_bar=False)
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["explore_erank.png", "explore_spectra.png", "run_erank.png", "run_spectra.png"]
    shown = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 4  # drawn inline
    assert "00_explore" not in [p.stem for p in R.find_notebooks("all")]  # not part of `batch all`
