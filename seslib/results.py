"""Results: result.json files as rows, erank summaries, and the paper's numbers from the author's published files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .ses import is_real
from .util import ROOT, read_only
from .runs import config_diff, describe_diff, read_result, run_key, shared_runs


# One run = one result.json (see train); a notebook's report reads whatever results exist under
# {out_dir}/runs/*/result.json, aggregates over seeds, puts the paper's number beside ours, and draws
# the figures the reference published for that experiment into {out_dir}/figures/.

def _num(v):
    return float(v) if is_real(v) else float("nan")


def _rob_mean(final: dict, key="robustness"):
    return _num((final.get(key) or {}).get("mean_corruption_acc"))


def _result_row(config, result, run_dir):
    """The per-run numbers every report and claim works from (NaN where a run has none)."""
    cfg, fin, env = result.get("config", {}), result.get("final", {}), result.get("env", {})
    return dict(
        config=config, seed=cfg.get("seed"), model=cfg.get("model"),
        ses_impl=(cfg.get("ses_impl") or "suite") if cfg.get("ses") else None,  # whose SES computation was timed
        acc_final=_num(fin.get("test_acc")), acc_best=_num(fin.get("best_test_acc_over_epochs")),
        gap=_num(fin.get("gap")), rob=_rob_mean(fin), rob_paper=_rob_mean(fin, "robustness_paper"),
        rob_paper_best=_rob_mean(fin, "robustness_paper_best"), epoch_s=_num(fin.get("epoch_seconds_mean")),
        train_s=_num(fin.get("train_seconds_mean")),  # the training loop alone (NaN in results made before it)
        eval_s=_num(fin.get("epoch_seconds_mean")) - _num(fin.get("train_seconds_mean")),  # the rest of an epoch
        peak_mem_mb=_num(fin.get("peak_mem_mb")), kappa_mean=_num(fin.get("kappa_mean")),
        # GPU runs: the measured max_memory_allocated and estimate_memory's figure, decimal GB (NaN elsewhere)
        peak_mem_gb=_num(fin.get("peak_mem_gb")), peak_mem_est_gb=_num(fin.get("peak_mem_estimate_gb")),
        erank_dev=_erank_dev(result), device_name=env.get("device_name"),
        on_gpu=str(env.get("device", "")).startswith("cuda"),  # device memory means GPU memory only there
        **_claim_extras(result),
        run_dir=str(run_dir), result=result)


def _erank_dev(result):
    """Largest |erank / d^β − 1| over the hooked layers at the last epoch, in % (as SES sees the layers)."""
    last = (result.get("history") or [{}])[-1].get("erank") or {}
    ratios = [st["ratio"] for st in last.values() if isinstance(st, dict) and "ratio" in st]
    return 100 * max(abs(r - 1) for r in ratios) if ratios else float("nan")


ERANK_SUMMARY = ("erank_ratio_mean", "erank_absdev_mean", "erank_spread")  # Exp 28's numbers (erank_summary)


def erank_summary(stats: dict) -> dict:
    """Exp 28's numbers over layers {name: {erank, ratio, ...}} (erank_stats' form): the mean of erank / d^β
    (erank_ratio_mean), the mean distance to the target |erank / d^β − 1| (erank_absdev_mean: the paper's "40.9 %
    reduction in distance to target") and the spread of erank across the layers, max / min (erank_spread: the ViT's
    "7.1x -> 2.4x"). One definition for our runs and the author's files, so both are computed alike."""
    st = [s for s in (stats or {}).values() if isinstance(s, dict) and "ratio" in s and "erank" in s]
    if not st:
        return dict.fromkeys(ERANK_SUMMARY, float("nan"))
    ratios, eranks = np.array([s["ratio"] for s in st], float), np.array([s["erank"] for s in st], float)
    return {"erank_ratio_mean": float(ratios.mean()), "erank_absdev_mean": float(np.abs(ratios - 1).mean()),
            "erank_spread": float(eranks.max() / eranks.min()) if eranks.min() > 0 else float("nan")}


def _erank_shape(result):
    """erank_summary at the last epoch, as the author measured the layers (erank_author: eval mode, the first 2048
    test images; his Exp 28 tables and figures), not as SES sees them on training batches."""
    return erank_summary((result.get("history") or [{}])[-1].get("erank_author"))


CLAIM_CORRUPTIONS = (("contrast", 3), ("contrast", 5), ("brightness", 5), ("gaussian_noise", 1), ("gaussian_noise", 5))


def _claim_extras(result):
    """The numbers only some claims use: kappa(J)'s spread over points, the SES loss's last/first-epoch ratio,
    parameters (M), Exp 28's erank numbers (erank_summary), and the per-corruption accuracies the paper quotes
    (CLAIM_CORRUPTIONS), on its protocol (test-selected weights) and on the standard one (final epoch)."""
    fin, hist = result.get("final", {}), result.get("history") or []
    ses = [_num(r.get("ses_loss")) for r in (hist[0], hist[-1])] if hist else [float("nan")] * 2
    out = {"kappa_std": _num(fin.get("kappa_std")), "params_m": _num(fin.get("params_m")),
           "ses_loss_ratio": ses[1] / ses[0] if ses[0] == ses[0] and ses[0] > 0 else float("nan"),
           **_erank_shape(result)}
    paper = (fin.get("robustness_paper_best") or {}).get("detail") or {}
    std = (fin.get("robustness") or {}).get("accuracy") or {}
    for name, sev in CLAIM_CORRUPTIONS:
        out[f"rob_{name}_s{sev}_paper"] = _num(paper.get(f"{name}_s{sev}"))
        out[f"rob_{name}_s{sev}"] = _num((std.get(name) or {}).get(str(sev)))
    return out


def load_results(out_dir):
    """One row per parseable {out_dir}/runs/*/result.json, whatever made it (the raw result in column `result`).
    Reports use plan_results instead, which keeps only the runs made with the settings planned now."""
    import pandas as pd
    rows = []
    for path in sorted(Path(out_dir).glob("runs/*/result.json")):
        r = read_result(path)
        if r is not None:
            rows.append(_result_row(path.parent.name.rsplit("_seed", 1)[0], r, path.parent))
    return pd.DataFrame(rows)


def plan_results(plan):
    """(rows of the results made with the plan's settings, [(run folder, why it was left out)]).

    Every grid config (not only the selected ones) at the plan's seeds: a report of a re-run of one config still
    shows its baseline. A run another notebook trained with the same settings (runs.run_key) is read from there (its
    run_dir says where). A result made with other settings (config_diff) is left out and named."""
    import pandas as pd
    rows, left_out, shared = [], [], None
    for (config, seed), cfg in plan.resolved.items():
        run_dir = Path(plan.out_dir) / "runs" / f"{config}_seed{seed}"
        r = read_result(run_dir / "result.json")
        diff = config_diff(cfg, r.get("config") or {}) if r is not None else []
        if r is None or diff:  # trained by another notebook, with the same settings?
            shared = shared_runs(plan.out_dir) if shared is None else shared
            if run_key(cfg) in shared:
                run_dir, diff = shared[run_key(cfg)], []
                r = read_result(run_dir / "result.json")
        if r is None:
            continue
        if diff:
            left_out.append((str(run_dir), f"made with other settings: {describe_diff(diff)}"))
        else:
            rows.append(_result_row(config, r, run_dir))
    return pd.DataFrame(rows), left_out


# ── the paper's numbers from the author's published result files ─────────────────────────────────
REFERENCE_ENV = "SES_REFERENCE"  # the folder of the author's result files (erank_*.json, ...)


def reference_dir(path=None) -> Path | None:
    """The folder of the author's published result files: `path`, else $SES_REFERENCE (either must be a folder),
    else ../shared/reference/paper_results beside the repository when it exists, else None (no network, no copy:
    a notebook then keeps the paper's numbers typed in it)."""
    for p in (path, os.environ.get(REFERENCE_ENV)):
        if p:
            if not Path(p).expanduser().is_dir():
                raise ValueError(f"reference_dir {str(p)!r} is not a folder (the author's result files, e.g. "
                                 "erank_resnet18.json); None: the paper's numbers typed in the notebook")
            return Path(p).expanduser()
    default = ROOT.parent / "shared" / "reference" / "paper_results"
    return default if default.is_dir() else None


def paper_erank(path) -> dict:
    """{"baseline": {...}, "ses": {...}} from one of ses_erank_dynamics.py's result files (erank_resnet18.json,
    erank_vit_small.json): per run its best test accuracy over epochs (acc, the author's best_acc), erank_summary at
    the last epoch on the targets d^β of the run's β, and each layer's erank, d, target and ratio (erank_layers,
    in the file's order and with its names: block_i where our hooks say blocks.i)."""
    out = {}
    for key, run in json.loads(Path(path).read_text()).items():
        beta = float(run["beta"])
        last = run["erank_history"][-1]
        layers = {n: {"erank": s["erank"], "d": s["dim"], "target": s["dim"] ** beta,
                      "ratio": s["erank"] / s["dim"] ** beta} for n, s in last.items() if isinstance(s, dict)}
        out[key] = {"acc": float(run["best_acc"]), **erank_summary(layers), "erank_layers": layers}
    return out


def paper_erank_results(files: dict, reference=None) -> dict:
    """PAPER entries {"<prefix>_<run>": numbers} read from the author's erank files {prefix: file name} in
    reference_dir(reference); {} for what is not at hand (said in one line): the notebook keeps its typed copy."""
    folder = reference_dir(reference)
    if folder is None:
        print("paper numbers: the copy typed in this notebook (no folder of the author's result files: set "
              f"reference_dir or ${REFERENCE_ENV})")
        return {}
    out = {}
    for prefix, name in files.items():
        if (folder / name).is_file():
            out.update({f"{prefix}_{k}": v for k, v in paper_erank(folder / name).items()})
        else:
            print(f"paper numbers for {prefix}: the typed copy ({folder / name} not found)")
    if out:
        print(f"paper numbers: read from the author's files in {folder}")
    return out


# ses_bert_nlp.py's result keys -> PAPER's: best dev accuracy over epochs, the last epoch's train - dev gap, the training
# loop's seconds per epoch (a T4), torch.cuda.max_memory_allocated at the end (GB = 1e9 bytes; as MiB for claims)
GLUE_PAPER_FIELDS = read_only({"acc": ("best_val_acc", 1.0), "gap": ("final_gap", 1.0),
                               "epoch_s": ("avg_epoch_time", 1.0), "vram_gb": ("vram_peak_gb", 1.0),
                               "peak_mem_mb": ("vram_peak_gb", 1e9 / 2**20)})
GLUE_PAPER_FILES = ("bert_nlp_summary.json", "gpu0_sst2_results.json", "gpu1_mrpc_results.json")


def paper_glue_results(reference=None) -> dict:
    """Exp 22's PAPER entries {config (sst2_baseline, ...): numbers} read from ses_bert_nlp.py's result files in
    reference_dir(reference) (the summary, else the per-GPU files); {} when they are not at hand (said in one line):
    the notebook keeps its typed copy."""
    folder = reference_dir(reference)
    files = [folder / n for n in GLUE_PAPER_FILES if (folder / n).is_file()] if folder is not None else []
    if not files:
        print("paper numbers: the copy typed in this notebook (no bert_nlp_summary.json at hand: set reference_dir "
              f"or ${REFERENCE_ENV})")
        return {}
    runs = {}
    for f in reversed(files):  # the summary last: it wins where both hold a run
        runs.update(json.loads(f.read_text()))
    print(f"paper numbers: read from the author's files {', '.join(f.name for f in files)} in {folder}")
    return {k: {key: round(float(r[src]) * scale, 4) for key, (src, scale) in GLUE_PAPER_FIELDS.items() if src in r}
            for k, r in runs.items()}
