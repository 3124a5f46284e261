"""The recipe each notebook really runs, pinned: for the main config of each of the 20 notebooks, the resolved
config (validate_config(run_config(BASE, GRID[name])), what result.json stores) must hold these values. Each row
names where its values come from: [table] = the author's setup table ("Setup tecnico di riferimento" in
shared/reference/ses_context.md), [tex] = the paper's section, a .py name = the author's script
(akira-n-28/Spectral-Entropy-Shaping), [ours] = not stated by the author (our documented choice).
The recipe table of docs/recipes.md is generated from RECIPES too (recipe_table_rows) and must match it."""
import ast
from pathlib import Path

import pytest
import torch

import seslib as S

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616])
CIFAR100 = ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761])
SGD = dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="multistep", lr_gamma=0.2,
           warmup_epochs=0, grad_clip=None)
ADAMW = dict(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=5, min_lr=1e-5,
             grad_clip=1.0, drop_path=0.1)
STD_AUG = dict(augment="standard", crop_padding=4, hflip=True, color_jitter=None, mix="none",
               randaugment_num_ops=None, randaugment_magnitude=None)


def cnn(dataset, epochs, batch, amp, norm, **kw):
    return dict(model="resnet18", dataset=dataset, epochs=epochs, batch_size=batch, amp=amp, milestones=[20, 35, 45],
                norm_mean=norm[0], norm_std=norm[1], ses_lambda=0.01, ses_beta=0.7, cudnn_deterministic=True, **SGD,
                **STD_AUG) | kw  # cudnn.deterministic = True, benchmark = False: every script but Exp 11's


def vit(**kw):  # vit_impl "author": the author's ViT (seslib.SESViT, tests/test_author_vit.py), not timm's
    return dict(model="vit_small", vit_impl="author", dataset="cifar100", epochs=50, batch_size=512, amp="fp16",
                norm_mean=CIFAR100[0], norm_std=CIFAR100[1], ses_lambda=0.01, ses_beta=0.7, cudnn_deterministic=True,
                **ADAMW, **STD_AUG) | kw


T4, AMPERE = (7, 5), (8, 0)  # compute capabilities: Kaggle's T4; an A100 / L40S (8.9) has native bf16
# notebook -> (main config, expected resolved values, hooks, precision on a T4, precision on Ampere+, source)
RECIPES = {
    "01": ("ses", cnn("cifar10", 60, 256, "off", CIFAR10), 9, "fp32", "fp32",
           "[tex] Exp 1: 60 epochs, seed 42; [table] CIFAR Exp 1-10: batch 256, SGD, MultiStep [20,35,45], FP32, 9 hooks"),
    "02": ("beta_0.5", cnn("cifar10", 40, 256, "off", CIFAR10, ses_beta=0.5), 9, "fp32", "fp32",
           "[tex] Exp 2: 40 epochs, beta in {0.3,0.5,0.7,0.9}; [table] the rest (45 is never reached in 40 epochs)"),
    "03": ("ses", cnn("cifar10", 60, 256, "off", CIFAR10), 9, "fp32", "fp32", "[tex] Exp 1's runs; [table] the rest"),
    "04": ("ses", dict(epochs=300, batch_size=128, lr=3e-3, ses_lambda=0.1, ses_beta=0.6), 5,
           "fp32", "fp32", "[tex] beta 0.6, 5 x 16 MLP; [ours] everything else (seslib.TOY_DEFAULTS)"),
    "05": ("ses", cnn("cifar10", 50, 256, "off", CIFAR10), 9, "fp32", "fp32", "[tex] Exp 5: 3 seeds, 50 epochs, batch 256; [table]"),
    "06": ("ses", cnn("cifar100", 50, 256, "off", CIFAR100), 9, "fp32", "fp32", "[tex] Exp 6; [table] CIFAR Exp 1-10"),
    "07": ("lam_0.05", cnn("cifar10", 50, 256, "off", CIFAR10, ses_lambda=0.05), 9, "fp32", "fp32", "[tex] Exp 7; [table]"),
    "08": ("ses", cnn("cifar100", 50, 256, "off", CIFAR100), 9, "fp32", "fp32", "[tex] Exp 8; [table]"),
    "09": ("last3", cnn("cifar10", 50, 256, "off", CIFAR10, ses_layers="last3"), 3, "fp32", "fp32", "[tex] Exp 9; [table]"),
    "10": ("k10", cnn("cifar100", 50, 128, "off", CIFAR100, ses_every_k=10), 9, "fp32", "fp32",
           "ses_phase3.py: batch 128, FP32, MultiStep [20,35,45] x0.2, SES every k steps"),
    "11": ("ses", dict(model="resnet50", dataset="tinyimagenet", epochs=60, batch_size=256, amp="bf16", tf32=True,
                       cudnn_deterministic=False,  # its script: cudnn.benchmark = True
                       milestones=[25, 40, 52], norm_mean=[0.4802, 0.4481, 0.3975], norm_std=[0.2302, 0.2265, 0.2262],
                       augment="standard", crop_padding=8, hflip=True, mix="none",
                       color_jitter={"brightness": 0.1, "contrast": 0.1, "saturation": 0.1},
                       ses_lambda=0.01, ses_beta=0.7, ses_layers="layer4+pool", **SGD), 4, "fp16", "bf16",
           "ses_resnet50_tinyimagenet .py (all of it)"),
    "12": ("ses_cutmix", cnn("cifar100", 50, 512, "fp16", CIFAR100, mix="cutmix", mix_alpha=1.0), 9, "fp16", "fp16",
           "[tex]/[table] Exp 12: batch 512, FP16; ses_kaggle_dual_gpu.py: mixup/cutmix alpha 1.0"),
    "13": ("ses", cnn("cifar100", 50, 512, "fp16", CIFAR100, model="wrn28_10"), 13, "fp16", "fp16",
           "[tex]/[table] Exp 13: batch 512, FP16, 13 hooks; ses_kaggle_dual_gpu.py: the rest"),
    "14": ("vit_small_ses", vit(ses_layers="all"), 12, "fp16", "fp16", "ses_vit_experiment.py; [table] ViT (Exp 14)"),
    "15": ("ses_mixup", vit(augment="randaugment", randaugment_num_ops=2, randaugment_magnitude=9, mix="mixup",
                            mix_alpha=1.0), 12, "fp16", "fp16", "ses_vit_augmentation.py: RandAugment(2, 9), Mixup 1.0"),
    "16": ("linear", cnn("cifar100", 50, 512, "fp16", CIFAR100, ses_beta_schedule="linear:0.3:0.9"), 9, "fp16", "fp16",
           "ses_adaptive_beta.py; [table] beta schedules (Exp 16)"),
    "17": ("last4", vit(ses_layers="last4"), 4, "fp16", "fp16", "ses_vit_ablations.py; [table] ViT Abl (Exp 17)"),
    "18": ("triple_l4", vit(ses_beta=0.5, ses_layers="last4", ses_targets=["block", "attn_out", "attn_weights"]), 12,
           "fp16", "fp16", "ses_vit_attention.py: beta 0.5, last 4 blocks x 3 targets"),
    # text (seslib.resolve_text_config): the author's recipe on MRPC; SST-2 differs by task only (tests/test_text.py)
    "22": ("mrpc_ses_all", dict(model="bert-base-uncased", task="mrpc", text_data="glue", max_len=128,
                                token_type_ids=False, epochs=3, batch_size=32, lr=2e-5, weight_decay=0.01,
                                warmup_ratio=0.06, grad_clip=1.0, amp="fp16", ses_lambda=0.01, ses_beta=0.5,
                                ses_layers="all", ses_pool="tokens"), 12, "fp16", "fp16",
           "ses_bert_nlp.py (all of it); [tex] Exp 22"),
    # the ViT runs of 28 (vit_small, beta 0.5, lr_lag 1): tests/test_erank_dynamics.py
    "28": ("resnet18_ses", cnn("cifar100", 50, 512, "fp16", CIFAR100, model="resnet18_erank", lr_gamma=0.1, lr_lag=0),
           9, "fp16", "fp16", "ses_erank_dynamics.py: its own ResNet-18 (PyTorch default init), batch 512, FP16, "
           "MultiStep [20,35,45] x0.1, 9 hooks"),
}


def notebook_definitions(path):
    """BASE, GRID, PAPER, CLAIMS as the notebook's definition cell writes them (assignments only, nothing run)."""
    import nbformat
    nb = nbformat.read(str(path), as_version=4)
    ns = {}
    for cell in nb.cells:
        if cell.cell_type != "code" or "BASE = " not in cell.source:
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and node.targets[0].id in ("BASE", "GRID", "PAPER", "CLAIMS"):
                exec(compile(ast.Module([node], []), str(path), "exec"), {"dict": dict}, ns)
    return ns


def resolved(num):
    path = next((ROOT / "notebooks").glob(f"{num}_*.ipynb"))
    d = notebook_definitions(path)
    name = RECIPES[num][0]
    if num == "04":
        return S.resolve_toy_config(S.run_config(d["BASE"], d["GRID"][name], presets=S.TOY_PRESETS)), d
    if num == "22":
        return S.resolve_text_config(S.run_config(d["BASE"], d["GRID"][name], presets=S.TEXT_PRESETS)), d
    return S.validate_config(S.run_config(d["BASE"], d["GRID"][name])), d


def hook_count(cfg):
    if "task" in cfg:  # BERT-base's shapes only (meta tensors: no weights, no download)
        from transformers import BertConfig, BertForSequenceClassification
        with torch.device("meta"):
            return len(S.bert_hook_targets(BertForSequenceClassification(BertConfig()), cfg["ses_layers"]))
    info = S.dataset_info(cfg["dataset"])
    model = S.build_model(cfg["model"], info["num_classes"], info["img_size"])
    return len(S.hook_targets(model, cfg["ses_layers"], cfg["ses_targets"]))


@pytest.mark.parametrize("num", sorted(RECIPES))
def test_notebook_runs_the_authors_recipe(num):
    name, want, hooks, on_t4, on_ampere, _source = RECIPES[num]
    cfg, d = resolved(num)
    assert name in d["GRID"]
    got = {k: cfg.get(k) for k in want}
    assert got == want
    if num == "04":
        return
    if num != "22":  # text runs schedule per step (warmup_ratio), not by epoch milestones
        assert cfg["milestones"] == (want.get("milestones") or cfg["milestones"]) and isinstance(cfg["milestones"], list)
    assert cfg["precision"] in S.PRECISIONS and cfg["amp"] != "auto"  # the recipe states its precision
    assert S.resolve_precision(cfg["amp"], "cuda", T4)[0] == on_t4
    assert S.resolve_precision(cfg["amp"], "cuda", AMPERE)[0] == on_ampere
    assert S.resolve_precision(cfg["amp"], "cpu")[0] == "fp32"
    assert hook_count(cfg) == hooks


def test_every_notebook_has_a_pinned_recipe():
    nums = sorted(p.name[:2] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if p.name[:2] != "00")
    assert nums == sorted(RECIPES) and len(nums) == 20


def _precision(amp, on_t4, on_ampere):
    return on_t4 if on_t4 == on_ampere else f"{on_ampere} ({on_t4} on a T4)"


def recipe_table_rows():
    """docs/recipes.md's recipe table rows, made from RECIPES (print them to update the page)."""
    rows = []
    for num, (name, w, hooks, on_t4, on_ampere, source) in sorted(RECIPES.items()):
        if num == "04":
            rows.append(f"| 4 | mlp_toy | rings (2-D) | 300 | 128 | Adam 3e-3 | constant | fp32 | none | 0.1 | 0.6 | "
                        f"5 (all hidden) | {source} |")
            continue
        if num == "22":
            rows.append(f"| 22 | {w['model']} | GLUE SST-2, MRPC ({w['max_len']} tokens) | {w['epochs']} | "
                        f"{w['batch_size']} | AdamW {w['lr']} wd {w['weight_decay']} (none on biases, LayerNorm) "
                        f"clip {w['grad_clip']} | {w['warmup_ratio']:.0%} warm-up + linear to 0, per step | "
                        f"{_precision(w['amp'], on_t4, on_ampere)} | none | {w['ses_lambda']} | {w['ses_beta']} | "
                        f"{hooks} ({name}) | {source} |")
            continue
        opt = (f"SGD {w['lr']} m {w['momentum']} wd {w['weight_decay']}" if w["optimizer"] == "sgd" else
               f"AdamW {w['lr']} wd {w['weight_decay']} clip {w['grad_clip']}")
        sched = (f"MultiStep {w['milestones']} ×{w['lr_gamma']}" if w["schedule"] == "multistep" else
                 f"{w['warmup_epochs']} warm-up + cosine to {w['min_lr']}")
        aug = [f"crop pad {w['crop_padding']}", "flip"]
        if w.get("color_jitter"):
            aug.append("ColorJitter(" + ", ".join(str(v) for v in w["color_jitter"].values()) + ")")
        if w["augment"] == "randaugment":
            aug.append(f"RandAugment({w['randaugment_num_ops']}, {w['randaugment_magnitude']})")
        if w["mix"] != "none":
            aug.append(f"{w['mix']} α {w['mix_alpha']}")
        if w.get("drop_path"):
            aug.append(f"drop path {w['drop_path']}")
        beta = w.get("ses_beta_schedule") or w["ses_beta"]
        rows.append(f"| {int(num)} | {w['model']} | {w['dataset']} | {w['epochs']} | {w['batch_size']} | {opt} | "
                    f"{sched} | {_precision(w['amp'], on_t4, on_ampere)} | {', '.join(aug)} | {w['ses_lambda']} | "
                    f"{beta} | {hooks} ({name}) | {source} |")
    return rows


def test_docs_recipe_table_comes_from_the_same_values():
    page = (ROOT / "docs" / "recipes.md").read_text()
    missing = [r for r in recipe_table_rows() if r not in page]
    assert not missing, "docs/recipes.md recipe table out of date; expected rows:\n" + "\n".join(missing)


def test_claims_name_configs_of_their_grid():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        if path.name.startswith("00"):
            continue
        d = notebook_definitions(path)
        assert d.get("CLAIMS"), path.name
        for c in d["CLAIMS"]:
            S.check_claim(c, d["GRID"], d["PAPER"])


def test_bad_claims_fail_when_the_notebook_is_loaded(tmp_path):
    grid, paper = {"baseline": {}, "ses": {}}, {"baseline": {"acc": 70.0}, "ses": {"acc": 71.0}}
    with pytest.raises(ValueError, match=r"names config\(s\) \['sess'\] that the grid lacks"):
        S.plan_runs(grid, "all", [1], tmp_path, paper=paper, claims=[{"text": "x", "a": "sess", "b": "baseline"}])
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        S.check_claim({"text": "x", "a": "ses", "b": "baseline", "metric": "accuracy"}, grid, paper)
    with pytest.raises(ValueError, match="the paper's rob for .* is not in PAPER"):
        S.check_claim({"text": "x", "a": "ses", "b": "baseline", "metric": "rob"}, grid, paper)
    assert S.check_claim({"text": "x", "a": "ses", "b": "baseline"}, grid, paper)["paper"] == 1.0


# The verdict rule and its error rates: tests/test_verdicts.py.
