"""Exp 28 (issue 23): the recipe of ses_erank_dynamics.py as the suite runs it. Its own ResNet-18 ('resnet18_erank')
against tests/fixtures/author_resnet18_erank.json (recorded from the script's classes and functions run as written in a
scratch folder, akira-n-28/Spectral-Entropy-Shaping@4abfcca; the author's code is not in this repository): weights,
logits, hooks, the erank it measured and its SES loss. Then the learning rates of both runs, the ViT config of the
notebook, the paper's numbers read from the author's files (and the notebook's typed copy of them), and the erank
metrics its claims use."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import seslib as S
from test_recipes import notebook_definitions

ROOT = Path(__file__).resolve().parents[1]
REF = json.loads((Path(__file__).parent / "fixtures" / "author_resnet18_erank.json").read_text())
NOTEBOOK = ROOT / "notebooks" / "28_erank_dynamics.ipynb"
FILES = {"resnet18": "erank_resnet18.json", "vit_small": "erank_vit_small.json"}


def fixed_input(b=4, img=32):
    """The fixture's input: sin(0.37 * arange) * 1.5 in float32, no RNG."""
    n = b * 3 * img * img
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.37).float().reshape(b, 3, img, img) * 1.5


def author_seeded():
    S.set_seed(42)  # the script: set_seed(CFG.SEED) then ResNet18(num_classes=100)
    return S.build_model("resnet18_erank", 100)


def test_the_authors_resnet_weights_and_logits():
    ref = REF["model"]
    model = author_seeded()
    assert isinstance(model, S.ErankResNet18) and S.count_params(model) == ref["param_count"]
    assert [n for n, _ in model.named_buffers()] == ref["buffers"]
    got = dict(model.named_parameters())
    assert list(got) == list(ref["params"])  # same names, same order: the author's state dict loads as it is
    for n, r in ref["params"].items():
        assert list(got[n].shape) == r["shape"], n
        assert got[n].detach().flatten()[:3].tolist() == pytest.approx(r["first"], abs=1e-8), n
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(fixed_input()), torch.tensor(ref["eval_logits"]), atol=1e-5, rtol=0)


def test_it_differs_from_torchvisions_resnet18_only_in_init_and_names():
    """Why it is its own model: same layers and count as 'resnet18', other init (torchvision's kaiming-normal
    fan-out convolutions have 2.4x the SD of PyTorch's default)."""
    ours, tv = author_seeded(), S.build_model("resnet18", 100)
    assert S.count_params(ours) == S.count_params(tv)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in tv.parameters()]
    sd = ours.layer1[0].conv1.weight.std().item(), tv.layer1[0].conv1.weight.std().item()
    assert sd[0] == pytest.approx(1 / math.sqrt(3 * 576), rel=0.05) and sd[1] == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert isinstance(ours.layer2[0].shortcut[0], nn.Conv2d) and not hasattr(ours.layer2[0], "downsample")


def test_hooks_erank_and_ses_loss_are_the_authors():
    """The 9 hooks of get_resnet_hook_points / ResNetCollector (8 blocks + avgpool), the erank of measure_erank (eval
    mode, mean-pooled, one spectrum of the [N, d] covariance) and ses_regularizer's value, on the fixture's input."""
    model = author_seeded()
    ses = S.SES(model, "auto", beta=0.7, lam=1.0)
    assert ses.names == list(REF["measure_erank"]["layers"])
    x = fixed_input(64)
    stats = S.training._erank_author_view(model, ses.collector, x, 0.7, 32, None)
    for name, r in REF["measure_erank"]["layers"].items():
        assert stats[name]["d"] == r["dim"] and stats[name]["erank"] == pytest.approx(r["erank"], rel=1e-4), name
    model.train()
    with torch.no_grad(), pytest.warns(UserWarning, match="exceeds B-1"):  # 64 images: the targets are out of reach
        model(x)
        loss = ses().item()
    assert loss == pytest.approx(REF["ses_regularizer"]["value"], rel=1e-4)


def _lrs(cfg):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, S.training._lr_factor(cfg))
    out = []
    for _ in range(cfg["epochs"]):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def _notebook_cfg(name):
    d = notebook_definitions(NOTEBOOK)
    return S.validate_config(S.run_config(d["BASE"], d["GRID"][name]))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no optimiser step: only its lr is read
@pytest.mark.parametrize("name,kind", [("resnet18_ses", "resnet"), ("resnet18_baseline", "resnet"),
                                       ("vit_small_ses", "vit"), ("vit_small_baseline", "vit")])
def test_every_epochs_learning_rate_is_the_scripts(name, kind):
    """The ViT's schedule steps at the end of each epoch with the epoch's index (lr_lag=1): epoch 0 at the full 1e-3."""
    got = _lrs(_notebook_cfg(name))
    assert got == pytest.approx(REF["lr_per_epoch"][kind], rel=1e-9, abs=1e-12)


def test_the_vit_runs_are_the_vit_recipe_at_beta_05():
    cfg = _notebook_cfg("vit_small_ses")
    want = dict(model="vit_small", vit_impl="author", dataset="cifar100", epochs=50, batch_size=512, amp="fp16",
                optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=5, min_lr=1e-5,
                lr_lag=1, grad_clip=1.0, drop_path=0.1, ses=True, ses_lambda=0.01, ses_beta=0.5, ses_layers="all",
                augment="standard", crop_padding=4, hflip=True, mix="none", erank_eval_samples=2048, seed=42)
    assert {k: cfg[k] for k in want} == want
    base = _notebook_cfg("vit_small_baseline")
    assert (base["ses"], base["ses_beta"], base["lr_lag"]) == (False, 0.5, 1)  # its erank is measured against d^0.5
    model = S.build_model("vit_small", 100)
    assert [n for n, _, _ in S.hook_targets(model, cfg["ses_layers"])] == [f"blocks.{i}" for i in range(12)]
    assert S.config_value({}, "lr_lag") == 0  # results made before lr_lag existed ran on time: not stale


def test_erank_summary_is_the_papers_arithmetic():
    layers = {"a": {"erank": 2.0, "ratio": 0.5}, "b": {"erank": 8.0, "ratio": 1.5}}
    assert S.erank_summary(layers) == {"erank_ratio_mean": 1.0, "erank_absdev_mean": 0.5, "erank_spread": 4.0}
    assert all(math.isnan(v) for v in S.erank_summary({}).values())
    row = S.results._result_row("x", {"history": [{"epoch": 1, "erank_author": layers}]}, "runs/x")
    assert (row["erank_ratio_mean"], row["erank_absdev_mean"], row["erank_spread"]) == (1.0, 0.5, 4.0)


@pytest.fixture
def reference():
    folder = S.reference_dir()
    if folder is None or not all((folder / f).is_file() for f in FILES.values()):
        pytest.skip("the author's result files are not at hand (../shared/reference/paper_results, $SES_REFERENCE)")
    return folder


def test_the_papers_numbers_come_from_the_authors_files(reference):
    """The published Exp 28 numbers, recomputed from the files: 0.85 -> 1.04, 40.9 %, 7.1x -> 2.4x, +0.37 / +3.95."""
    p = S.paper_erank_results(FILES, reference)
    r0, r1, v0, v1 = (p[k] for k in ("resnet18_baseline", "resnet18_ses", "vit_small_baseline", "vit_small_ses"))
    assert (round(r0["erank_ratio_mean"], 2), round(r1["erank_ratio_mean"], 2)) == (0.85, 1.04)
    assert round(100 * (1 - r1["erank_absdev_mean"] / r0["erank_absdev_mean"]), 1) == 40.9
    assert (round(v0["erank_spread"], 1), round(v1["erank_spread"], 1)) == (7.1, 2.4)
    assert (round(v0["erank_ratio_mean"], 2), round(v1["erank_ratio_mean"], 2)) == (1.66, 1.52)
    assert (round(r1["acc"] - r0["acc"], 2), round(v1["acc"] - v0["acc"], 2)) == (0.37, 3.95)
    assert len(r0["erank_layers"]) == 9 and len(v0["erank_layers"]) == 12


def test_the_notebooks_typed_copy_equals_the_files(reference):
    typed = notebook_definitions(NOTEBOOK)["PAPER"]  # the assignments only: the typed copy
    files = S.paper_erank_results(FILES, reference)
    assert set(typed) == set(files)
    for config, numbers in typed.items():
        for k, v in numbers.items():
            assert v == pytest.approx(files[config][k], abs=1e-4), (config, k)


def test_without_the_files_the_typed_copy_stays(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(S.REFERENCE_ENV, raising=False)
    assert S.paper_erank_results(FILES, tmp_path) == {}
    assert "typed copy" in capsys.readouterr().out
    with pytest.raises(ValueError, match="is not a folder"):
        S.reference_dir(tmp_path / "nowhere")
    monkeypatch.setattr(S.results, "ROOT", tmp_path / "repo")  # no ../shared beside this "repository"
    assert S.reference_dir() is None


def _synthetic_run(config, model, beta, dims, scale, epochs=3):
    """A made-up result (labelled as such: no training) with the author's erank view per epoch."""
    hist = [{"epoch": e + 1, "test_acc": 50.0 + e, "erank_author": {
        f"l{i}": {"erank": scale * (i + 1) * (e + 1), "d": d, "target": d ** beta,
                  "ratio": scale * (i + 1) * (e + 1) / d ** beta, "samples": 2048} for i, d in enumerate(dims)}}
            for e in range(epochs)]
    return {"config": {"seed": 42, "model": model}, "history": hist, "final": {"test_acc": 52.0}}


def test_exp28_figures_draw_ours_and_the_papers(tmp_path):
    import pandas as pd
    runs = [("r_base", "resnet18_erank", 0.7, [64, 128], 3.0), ("r_ses", "resnet18_erank", 0.7, [64, 128], 5.0),
            ("v_base", "vit_small", 0.5, [384] * 3, 2.0), ("v_ses", "vit_small", 0.5, [384] * 3, 6.0)]
    df = pd.DataFrame([S.results._result_row(c, _synthetic_run(c, m, b, d, k), f"runs/{c}") for c, m, b, d, k in runs])
    paper = {"v_ses": {"erank_layers": {f"block_{i}": {"erank": 10.0 + i, "ratio": (10.0 + i) / 384 ** 0.5}
                                        for i in range(3)}}}
    paths = [S.fig_erank_dynamics(df, tmp_path, show=False),
             S.fig_erank_final(df, tmp_path, paper=paper, show=False),
             S.fig_erank_spread(df, tmp_path, paper=paper, show=False)]
    assert all(p is not None and p.stat().st_size > 5000 for p in paths)
    assert df.set_index("config").loc["v_ses", "erank_spread"] == pytest.approx(3.0)  # 18 / 6 at the last epoch
