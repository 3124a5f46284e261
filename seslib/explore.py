"""Explore: a finished run's model and its layers' eigenvalue spectra."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .ses import entropy_from_eigs, hook_targets, pooled_activations, use_attention_weights
from .util import MAX_FIG_INCHES, measuring, save_figure
from .data import dataset_info, normalize_u8
from .models import TIMM_VIT_MODELS, build_model
from .runs import config_value, read_result


# ── explore: a finished run's model, and its layers' spectra ────────────────────────────────────

def load_run(run_dir, device="cpu"):
    """(model with the run's final weights, its resolved config, its per-epoch history) of a train() run folder
    (runs/<config>_seed<seed>/): weights from model_final.pt (written at the end of every run with save_model)
    or else checkpoint.pt (a run still in progress, or kept with keep_checkpoint). The model is in eval mode."""
    run_dir = Path(run_dir)
    r = read_result(run_dir / "result.json")
    ck = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True) \
        if (run_dir / "checkpoint.pt").is_file() else None
    if r is None and ck is None:
        raise FileNotFoundError(f"{run_dir}: neither result.json nor checkpoint.pt (a run folder is "
                                "outputs/NN_name/runs/<config>_seed<seed>/)")
    cfg, history = (r["config"], r["history"]) if r is not None else (ck["config"], ck["history"])
    if "model" not in cfg:
        raise ValueError(f"{run_dir} is not a train() run (the toy study's runs keep no model)")
    if (run_dir / "model_final.pt").is_file():
        state = torch.load(run_dir / "model_final.pt", map_location="cpu", weights_only=True)
    elif ck is not None:
        state = ck["model"]
    else:
        raise FileNotFoundError(f"{run_dir}: no saved weights (neither model_final.pt nor checkpoint.pt: the run was "
                                "made with save_model=False and keep_checkpoint=False)")
    info = dataset_info(cfg["dataset"])
    name = cfg["model"]  # a ViT run made before vit_impl existed was timm's: rebuild that
    name = f"{name}_timm" if config_value(cfg, "vit_impl") == "timm" and name not in TIMM_VIT_MODELS else name
    model = build_model(name, info["num_classes"], info["img_size"], cfg.get("spectral_norm", False),
                        cfg.get("width", 1.0))
    model.load_state_dict(state)
    return model.to(device).eval(), cfg, history


def layer_spectra(model, images, layers="auto", targets=("block",), normalize=None, batch_size=256, mode="eval"):
    """{layer: eigenvalues (descending, float64) of the covariance of its pooled activations} on `images` (a
    normalised float batch, or uint8 with normalize=(mean, std)). mode "eval" (the model as it predicts, default)
    or "train" (as SES sees it: batch statistics; BatchNorm buffers are restored afterwards). The covariance is the
    d x d one in float64, so the spectrum is exact whatever the number of images (below d, the extra eigenvalues
    are 0: a batch of N centred samples has rank <= N - 1)."""
    if images.dtype == torch.uint8:
        if normalize is None:
            raise ValueError("uint8 images need normalize=(mean, std), as the model was trained with")
        images = normalize_u8(images, *normalize)
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
    dev = next(model.parameters()).device
    if "attn_weights" in targets and hasattr(model, "blocks"):
        use_attention_weights(model)
    triples = hook_targets(model, layers, targets) if isinstance(layers, (str, list, tuple)) else layers
    with measuring(model, mode):
        acts = pooled_activations(model, [(n, k) for n, _, k in triples], images.to(dev), batch_size)
    out = {}
    for name, a in acts.items():
        h = a.double()
        h = h - h.mean(0, keepdim=True)
        out[name] = torch.linalg.eigvalsh(h.T @ h / (len(h) - 1)).flip(0)
    return out


def spectral_erank(eigs) -> float:
    """exp of the spectral entropy of an eigenvalue vector (the effective rank SES shapes)."""
    return float(entropy_from_eigs(torch.as_tensor(eigs, dtype=torch.float64)).exp())


def fig_spectra(spectra: dict, beta, out_dir, name="spectra", show=True):
    """Per layer, each run's normalised eigenvalue spectrum p_i (log-log), with the effective-rank target d^beta
    (dashed) and each run's own effective rank exp(H) (dotted, its colour): baseline vs SES side by side."""
    import matplotlib.pyplot as plt
    labels = list(spectra)
    layers = list(spectra[labels[0]])
    ncol = min(4, len(layers))
    nrow = -(-len(layers) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(min(MAX_FIG_INCHES, 3.4 * ncol), 2.8 * nrow + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes.flat, layers):
        for k, lab in enumerate(labels):
            eig = spectra[lab][layer].clamp(min=0)
            p = (eig / eig.sum()).numpy()
            rank = np.arange(1, len(p) + 1)
            ax.loglog(rank[p > 0], p[p > 0], color=colors[k % len(colors)], lw=1.2, label=lab)
            ax.axvline(spectral_erank(eig), color=colors[k % len(colors)], ls=":", lw=1)
        d = len(spectra[labels[0]][layer])
        ax.axvline(d ** beta, color="k", ls="--", lw=1, label=f"target effective rank d^β (β = {beta:g})")
        ax.set_title(f"{layer} (d = {d}, d^β = {d ** beta:.1f})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=len(labs), fontsize=8, frameon=False)
    fig.suptitle("eigenvalue spectrum per layer (normalised, log-log); dotted: each run's effective rank", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return save_figure(fig, out_dir, name, show)
