"""Run folders and the stale rule: when a result counts as done (the same settings), setting stale ones aside."""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import time
from pathlib import Path

from .util import JOB_FILES_ENV, read_only
from .data import DATASETS, GLUE_TASKS
from .models import TINY_BERT, VIT_MODELS


# ── "done" means: the same settings ──
# Keys that cannot change what a run computes: a result made with other values still counts as done.
_NOT_COMPUTED = ("resume", "log", "data_root", "out_dir", "device", "keep_checkpoint", "save_model", "eval_batch_size",
                 "precision", "preset",  # precision follows from amp + the device (+ cpu_amp); preset is a label
                 # which cuDNN kernels compute the same convolutions (rounding only, as another GPU would)
                 "cudnn_deterministic")
# A checkpoint may also be resumed under other robustness settings: they act only after the last epoch.
RESUME_FREE = _NOT_COMPUTED + ("robustness", "robustness_severities", "robustness_subset")


# Keys added after results were stored whose value there is known: a config without one reads as that value.
# vit_impl: before it, 'vit_tiny' / 'vit_small' were timm's VisionTransformer (now the author's SESViT; timm's is
# 'vit_*_timm'), so an old ViT result differs ("vit_impl timm → author") and an old CNN result does not.
_IMPLIED = {"vit_impl": lambda cfg: "timm" if cfg.get("model") in VIT_MODELS else None,
            "cpu_amp": lambda cfg: False,  # before cpu_amp every CPU run was fp32: what cpu_amp=False runs
            "lr_lag": lambda cfg: 0,  # before lr_lag every schedule ran on time
            "ses_impl": lambda cfg: "suite",  # before ses_impl every run used the suite's SES computation
            # before kind, a text config was the one with a task and no dataset, a toy config the one with radii
            "kind": lambda cfg: "text" if "task" in cfg and "dataset" not in cfg else "toy" if "radii" in cfg else "image"}


def config_value(cfg: dict, key):
    """cfg[key], else the value a config made before the key existed implied (_IMPLIED), else "<absent>"."""
    return cfg[key] if key in cfg else _IMPLIED[key](cfg) if key in _IMPLIED else "<absent>"


def config_diff(now: dict, then: dict, ignore=_NOT_COMPUTED) -> list:
    """[(key, then, now)] for every key that differs between a stored run's config and the one planned now
    (a key missing from the older config counts as different: the suite's recipe grew since; except the keys
    of _IMPLIED, read as the value they had). 'preset' is listed too when anything else differs, so a message
    can say "preset smoke -> paper"."""
    diff = [(k, config_value(then, k), config_value(now, k)) for k in sorted(set(now) | set(then))
            if k not in ignore and config_value(then, k) != config_value(now, k)]
    if diff and now.get("preset") != then.get("preset") and "preset" in ignore:
        diff.append(("preset", then.get("preset"), now.get("preset")))
    return diff


# ── one run, however many notebooks need it ──
# Two planned runs whose resolved configs and seeds are equal in the stale rule's sense are one run: the first
# notebook to need it trains it, the others read its result (the batch runner starts it once; plan_runs and the
# report find it in the other notebook's folder; the cost plan counts it once). Equivalent spellings are made one:
_AUTO_LAYERS = {"resnet50": "layer4+pool", "vit_tiny": "all", "vit_small": "all", "vit_tiny_timm": "all",
                "vit_small_timm": "all"}  # ses_layers='auto' per model (others: every block + the pool)


def normal_form(cfg: dict) -> dict:
    """A config as what it computes: no _NOT_COMPUTED key, _IMPLIED keys filled, no SES settings without SES, a
    fixed beta schedule as its plain beta, ses_layers 'auto' as the preset it means for the model."""
    c = {k: config_value(cfg, k) for k in set(cfg) | set(_IMPLIED) if k not in _NOT_COMPUTED}
    if not c.get("ses"):
        c = {k: v for k, v in c.items() if not k.startswith("ses_")}
    sched = c.get("ses_beta_schedule")
    if isinstance(sched, str) and sched.startswith("fixed:"):
        c["ses_beta"], c["ses_beta_schedule"] = float(sched.split(":", 1)[1]), None
    if c.get("ses_layers") == "auto":
        c["ses_layers"] = _AUTO_LAYERS.get(c.get("model"), "auto" if c.get("model") == "mlp_toy" else "blocks+pool")
    return c


def run_key(cfg) -> str | None:
    """The identity of a run across notebooks (its normal form, seed included); None without a config."""
    return json.dumps(normal_form(cfg), sort_keys=True, default=str) if cfg else None


_NOTEBOOK_FOLDER = re.compile(r"\d\d_\w+")  # a notebook's folder in an outputs root: its stem, NN_name


def shared_runs(out_dir) -> dict:
    """{run_key: run folder} of the finished runs of the OTHER notebooks under out_dir's outputs root. Only a
    notebook's own folder (NN_name) shares, and only with its sibling notebook folders: a folder of another name is
    not part of the suite's outputs, and its siblings need not be either."""
    out_dir = Path(out_dir).resolve()
    index = {}
    if not _NOTEBOOK_FOLDER.fullmatch(out_dir.name):
        return index
    for res in sorted(out_dir.parent.glob("[0-9][0-9]_*/runs/*/result.json")):
        if res.parent.parent.parent.resolve() != out_dir and _NOTEBOOK_FOLDER.fullmatch(res.parent.parent.parent.name):
            key = run_key((read_result(res) or {}).get("config"))
            if key:
                index.setdefault(key, res.parent)
    return index


def describe_diff(diff, limit=6) -> str:
    """'epochs 2 → 50, preset smoke → paper' (the first `limit` keys)."""
    parts = [f"{k} {json.dumps(a, default=str) if not isinstance(a, str) else a} → "
             f"{json.dumps(b, default=str) if not isinstance(b, str) else b}" for k, a, b in diff[:limit]]
    return ", ".join(parts) + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def set_aside(run_dir, why: str) -> Path:
    """Move a run folder's files (not the folder, which a lock may hold) into {out_dir}/stale/<name>.<time>/,
    with why.txt: nothing is deleted. Returns the new folder. The files the batch runner is writing for the job that
    redoes this run ($SES_JOB_FILES: its log, its executed notebook) stay: they belong to the new run, not the old
    (whose log the runner kept as log.1.txt, which moves with it)."""
    run_dir = Path(run_dir)
    root = run_dir.parent.parent if run_dir.parent.name == "runs" else run_dir.parent
    dest = root / "stale" / f"{run_dir.name}.{datetime.datetime.now():%Y%m%d-%H%M%S-%f}"
    dest.mkdir(parents=True)
    current_job = {Path(f).resolve() for f in os.environ.get(JOB_FILES_ENV, "").split(os.pathsep) if f}
    for f in run_dir.iterdir():
        if f.name != ".lock" and f.resolve() not in current_job:
            shutil.move(str(f), str(dest / f.name))
    (dest / "why.txt").write_text(why + "\n")
    return dest


def result_is_ok(path):
    """A run's result.json exists and parses (train writes it atomically)."""
    return read_result(path) is not None


def read_result(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def result_status(result_path, cfg, ignore=_NOT_COMPUTED):
    """("done" | "stale" | "todo", diff) of a run folder's result.json against the config planned now."""
    r = read_result(result_path)
    if r is None:
        return "todo", []
    if cfg is None:  # a plan without a recipe (e.g. a custom grid): any parseable result counts
        return "done", []
    diff = config_diff(cfg, r.get("config") or {}, ignore)
    return ("stale" if diff else "done"), diff


def fits_budget(est, end, budget=None) -> bool:
    """Whether a run estimated at est["seconds"] may start with the deadline `end`: it must finish before it. A run
    longer than a whole budget can never do that, so it starts when at least half the budget is left (it pauses at an
    epoch boundary and the next invocation resumes it)."""
    if end is None or not est:
        return True
    left = end - time.time()
    if est["seconds"] <= left:
        return True
    return bool(budget) and est["seconds"] > budget and left >= budget / 2


MODEL_COST = read_only({"resnet18": 1.0, "resnet18_erank": 1.0, "resnet50": 4.0, "wrn28_10": 6.0, "vit_tiny": 0.8,
                          "vit_small": 1.6, "vit_tiny_timm": 0.8, "vit_small_timm": 1.6, "mlp_toy": 0.01,
                          # per SST-2 epoch (batch 32, 128 tokens, fp16): 301.7 s on a T4 in the author's
                          # bert_nlp_summary.json, vs 28.9 s for a ResNet-18 CIFAR epoch
                          "bert-base-uncased": 10.4, TINY_BERT: 0.001})


def run_cost(cfg: dict) -> float:
    """A run's relative cost (model x epochs x pixels, SES adds ~1/every_k); the batch runner starts the costliest first."""
    ses = 1.0 + (0.3 / cfg.get("ses_every_k", 1) if cfg.get("ses") else 0.0)
    return MODEL_COST.get(cfg.get("model"), 1.0) * cfg.get("epochs", 50) * data_scale(cfg) * ses


def data_scale(c) -> float:
    """A config's data per epoch in its model's MODEL_COST unit: pixels over CIFAR's 32 x 32 (Tiny-ImageNet: 4), or a
    GLUE task's training examples over SST-2's (a text model's unit is an SST-2 epoch)."""
    if c.get("task") in GLUE_TASKS:
        return GLUE_TASKS[c["task"]]["sizes"][0] / GLUE_TASKS["sst2"]["sizes"][0]
    return (DATASETS.get(c.get("dataset"), {}).get("img_size", 32) / 32) ** 2
