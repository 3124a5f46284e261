"""Run configs of every kind (image, text, toy): each kind's defaults and presets, the rules every key is checked by
(the rules the kinds share written once), and resolve_config, the one resolver (cfg["kind"] picks the kind's)."""
from __future__ import annotations

import os
import re

import torch

from .ses import BetaSchedule, check_beta, is_int, is_num
from .util import check_config_keys, check_value, device_capability, pick_device, read_only, resolve_precision
from .data import GLUE_TASKS, JITTER_KEYS, dataset_info
from .models import MODELS, TINY_BERT, VIT_MODELS, vit_impl
from .corruptions import CORRUPTION_SETS
from .distributed import dist_device, torchrun_env


ROBUSTNESS_PRESETS = tuple(CORRUPTION_SETS)
# MultiStep milestones when a config gives none: fractions of the epochs that reproduce the reference's
# [20, 35, 45] of 50 (CIFAR) and [25, 40, 52] of 60 (Tiny-ImageNet) exactly; gamma 0.2 as ses_phase3.py and the
# Tiny-ImageNet script (assumed for Exp 1-9, see docs/recipes.md; ses_erank_dynamics.py uses 0.1).
# The notebooks state the author's absolute milestones (see run_config for an epochs override).
_MILESTONE_FRACTIONS = {"tinyimagenet": (25 / 60, 40 / 60, 52 / 60)}
_DEFAULT_FRACTIONS = (0.4, 0.7, 0.9)

_BASE_CONFIG = {
    "kind": "image",  # the run kind (image | text | toy): which resolver and which model, data and step
    "model": "resnet18", "dataset": "cifar10", "data_root": None,
    "epochs": 50, "batch_size": 256, "eval_batch_size": None,
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "schedule": "multistep", "milestones": None, "lr_gamma": 0.2, "warmup_epochs": 0, "min_lr": 1e-5,
    # epochs the LR schedule runs behind: 1 = ses_erank_dynamics.py's ViT, which steps its warm-up + cosine at the END
    # of each epoch with that epoch's index (scheduler.step(epoch)), so epoch 0 trains at the base lr, epoch e at e-1's
    "lr_lag": 0,
    "grad_clip": None,
    "seed": 42, "device": "auto",
    "amp": "auto",  # asked for: auto | fp16 | bf16 | off
    "precision": None,  # derived: what this device runs (fp32 | fp16 | bf16); see resolve_precision
    "cpu_amp": False,  # True: a CPU run uses amp's fp16/bf16 as a GPU would (to test those paths; slower than fp32)
    "tf32": False,  # TF32 matmuls/convs on Ampere+ (the Tiny-ImageNet script turns it on)
    # cuDNN: deterministic kernels, no autotuning (the author's scripts); False: autotuned (benchmark), faster
    "cudnn_deterministic": True,
    # input pipeline: normalisation (None: the dataset's statistics) and every augmentation parameter
    "norm_mean": None, "norm_std": None,
    "augment": "standard", "crop_padding": 4, "hflip": True, "color_jitter": None,
    "randaugment_num_ops": None, "randaugment_magnitude": None,  # None: RandAugment(2, 9) when augment="randaugment"
    "mix": "none", "mix_alpha": None,  # None: 1.0 with mixup/cutmix
    "spectral_norm": False, "width": 1.0,  # width < 1: narrowed model (the smoke preset's; see build_model)
    "ses": False, "ses_lambda": 0.01, "ses_beta": 0.7, "ses_beta_schedule": None,
    "ses_layers": "auto", "ses_targets": ["block"], "ses_every_k": 1,
    "ses_scope": "global", "sync_bn": None,  # multi-GPU (torchrun) only; see the distributed room
    "ses_impl": "suite",  # "author": the author's SES computation, to time SES like for like (ses.SES_IMPLS)
    "drop_path": None,  # ViTs: stochastic-depth rate (None: the recipe's 0.1)
    "vit_impl": None,  # derived from model: "author" (SESViT: vit_tiny, vit_small) | "timm" (vit_*_timm) | None
    # per-epoch effective rank, measured two ways (see _erank_ses_view / _erank_author_view)
    "erank_batches": 4, "erank_eval_samples": 2048,
    "out_dir": None, "resume": False, "save_model": True, "keep_checkpoint": False,  # a finished run keeps result.json; True: checkpoint.pt too
    "train_subset": None, "test_subset": None, "max_steps_per_epoch": None, "val_split": 0.0,
    "robustness": None, "robustness_severities": [1, 2, 3, 4, 5], "robustness_subset": None,
    "preset": None,  # label set by run_config ("paper", "smoke", ...): reports and the stale rule name it
    "log": "auto",
}

_CHOICES = {"optimizer": ("sgd", "adamw"), "schedule": ("multistep", "cosine", "constant"),
            "amp": ("auto", "fp16", "bf16", "off"), "augment": ("standard", "randaugment", "none"),
            "mix": ("none", "mixup", "cutmix"), "log": ("auto", "tqdm", "plain", "none"),
            "ses_scope": ("global", "local"), "ses_impl": ("suite", "author")}
# ses_resnet50_tinyimagenet .py: Normalize((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)) (its std is not the
# data set's pixel std in DATASETS), RandomCrop(64, padding=8), flip, ColorJitter(0.1, 0.1, 0.1), BF16 + TF32,
# cudnn.benchmark = True (the one script that autotunes instead of setting cudnn.deterministic).
_TINY_RECIPE = dict(epochs=60, norm_mean=[0.4802, 0.4481, 0.3975], norm_std=[0.2302, 0.2265, 0.2262],
                    crop_padding=8, color_jitter={"brightness": 0.1, "contrast": 0.1, "saturation": 0.1},
                    amp="bf16", tf32=True, cudnn_deterministic=False)


def default_config(model="resnet18", dataset="cifar10") -> dict:
    """The reference recipe for (model, dataset) as a full cfg dict ("Setup tecnico di riferimento").
    CNNs: SGD lr 0.1 mom 0.9 wd 5e-4, MultiStep x0.2 at 40/70/90% = [20, 35, 45] of 50 epochs, batch 256.
    Tiny-ImageNet: 60 epochs, [25, 40, 52], and ses_resnet50_tinyimagenet .py's pipeline (_TINY_RECIPE).
    ViTs: AdamW lr 1e-3 wd 0.05, 5 warm-up epochs + cosine to 1e-5, grad clip 1.0, batch 512, FP16 (every ViT script)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    dataset_info(dataset)
    cfg = dict(_BASE_CONFIG, model=model, dataset=dataset, ses_targets=["block"],
               robustness_severities=[1, 2, 3, 4, 5])
    if dataset == "tinyimagenet":
        cfg.update(_TINY_RECIPE)
    if model in VIT_MODELS:
        cfg.update(optimizer="adamw", lr=1e-3, weight_decay=0.05, schedule="cosine", warmup_epochs=5,
                   grad_clip=1.0, batch_size=512, amp="fp16")
    return cfg


def _derived_milestones(dataset, epochs):
    fr = _MILESTONE_FRACTIONS.get(dataset, _DEFAULT_FRACTIONS)
    return sorted({max(1, round(f * epochs)) for f in fr})


def _resolve_pipeline(c, info):
    """Check and fill in the input pipeline keys, so that the resolved config says exactly how inputs were made."""
    for k, default in (("norm_mean", info["mean"]), ("norm_std", info["std"])):
        v = default if c[k] is None else c[k]
        check_value(isinstance(v, (list, tuple)) and len(v) == 3 and all(is_num(x) for x in v)
               and (k == "norm_mean" or all(x > 0 for x in v)), k, c[k], "None or 3 numbers (std > 0)")
        c[k] = [float(x) for x in v]
    check_value(is_int(c["crop_padding"]) and c["crop_padding"] >= 0, "crop_padding", c["crop_padding"], "an int >= 0")
    check_value(isinstance(c["hflip"], bool), "hflip", c["hflip"], "True or False")
    cj = c["color_jitter"]
    check_value(cj is None or (isinstance(cj, dict) and set(cj) <= set(JITTER_KEYS)
                          and all(is_num(v) and 0 <= v < 1 for v in cj.values())), "color_jitter", cj,
           f"None or a dict of {', '.join(JITTER_KEYS)} strengths in [0, 1) (torchvision ColorJitter)")
    c["color_jitter"] = None if not cj else {k: float(cj.get(k, 0.0)) for k in JITTER_KEYS}
    if c["augment"] == "randaugment":
        n, m = c["randaugment_num_ops"], c["randaugment_magnitude"]
        c["randaugment_num_ops"], c["randaugment_magnitude"] = 2 if n is None else n, 9 if m is None else m
        check_value(is_int(c["randaugment_num_ops"]) and c["randaugment_num_ops"] >= 1, "randaugment_num_ops", n, "an int >= 1")
        check_value(is_int(c["randaugment_magnitude"]) and 0 <= c["randaugment_magnitude"] <= 30, "randaugment_magnitude", m,
               "an int in 0..30")
    else:  # not used: say so rather than carry numbers that did nothing
        c["randaugment_num_ops"] = c["randaugment_magnitude"] = None
    if c["mix"] == "none":
        c["mix_alpha"] = None
    else:
        c["mix_alpha"] = 1.0 if c["mix_alpha"] is None else c["mix_alpha"]
        check_value(is_num(c["mix_alpha"]) and c["mix_alpha"] > 0, "mix_alpha", c["mix_alpha"], "a number > 0")


def _with_recipe_defaults(cfg) -> dict:
    """cfg over the reference recipe of its (model, dataset); a non-dict, unknown keys, models or data sets fail first."""
    check_config_keys(cfg, _BASE_CONFIG)
    model, dataset = cfg.get("model", "resnet18"), cfg.get("dataset", "cifar10")
    recipe = default_config(model, dataset)  # rejects an unknown model or dataset
    if model == "mlp_toy":
        raise ValueError("model 'mlp_toy' is the toy 2-D study's network: it does not train on image datasets")
    return dict(recipe, **cfg)


def _resolve_milestones(c):
    c["milestones"] = list(c["milestones"]) if c["milestones"] is not None else \
        _derived_milestones(c["dataset"], c["epochs"])


def _resolve_inputs(c):
    _resolve_pipeline(c, dataset_info(c["dataset"]))


def _resolve_drop_path(c):
    if c["model"] in VIT_MODELS and c["drop_path"] is None:
        c["drop_path"] = 0.1  # the reference ViT/4's stochastic depth


def _resolve_vit_impl(c):
    c["vit_impl"] = vit_impl(c["model"])  # which ViT the name builds: the stale rule tells results of each apart


def _check_cuda_visible(spec, device):
    """A CUDA device this machine shows: a config made for a GPU fails here, not at the first tensor moved."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"config 'device' is {spec!r} but this machine has no usable CUDA GPU "
                         "(torch.cuda.is_available() is False): use device='auto' (GPU when there is one) or 'cpu'")
    if (device.index or 0) >= n:
        raise ValueError(f"config 'device' is {spec!r} but only {n} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{n - 1}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")


def resolve_device(c):
    """A device this machine has, and the precision (fp32 | fp16 | bf16) c's amp request runs at on it."""
    try:
        torch.device("cpu" if c["device"] == "auto" else c["device"])
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"config 'device' is not a torch device: {c['device']!r} ({e})") from None
    if torchrun_env() is not None and c["device"] not in ("auto", "cuda", "cpu"):  # before the GPU check: a
        dist_device(c["device"], 0)  # 'cuda:1' under torchrun is wrong on every machine, so say that first
    device = pick_device(c["device"])
    if device.type == "cuda":
        _check_cuda_visible(c["device"], device)
    c["precision"] = resolve_precision(c["amp"], device.type, device_capability(device), c["cpu_amp"])[0]


def _resolve_paths(c):
    for k in ("data_root", "out_dir"):
        c[k] = None if c[k] is None else str(c[k])


def _resolve_beta_schedule(c):
    """A schedule BetaSchedule can parse: its own message, under the config key's name."""
    if c["ses_beta_schedule"] is not None:
        try:
            BetaSchedule.parse(c["ses_beta_schedule"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"config 'ses_beta_schedule' {c['ses_beta_schedule']!r}: {e}") from None


def _resolve_lists(c):
    """Tuples as lists, and lists copied: the resolved config shares no list with the caller's cfg."""
    for k in ("ses_layers", "ses_targets", "robustness", "robustness_severities"):
        if isinstance(c[k], (list, tuple)):
            c[k] = list(c[k])


def each_value(keys, test, want):
    return tuple((k, test, want) for k in keys)


# The rules every kind of run with an optimiser shares (image and text runs), written once.

def _counts(*more):
    return each_value(("epochs", "batch_size", *more), lambda v, c: is_int(v) and v >= 1, "an int >= 1")


_BATCH_OF_TWO = ("batch_size", lambda v, c: v >= 2, "an int >= 2 (the spectrum of one sample is empty)")


def _optional_counts(*more):
    return each_value(("eval_batch_size", "train_subset", "test_subset", "max_steps_per_epoch", *more),
                      lambda v, c: v is None or (is_int(v) and v >= 1), "None or an int >= 1")


_SEED = ("seed", lambda v, c: is_int(v), "an int")
_LR = ("lr", lambda v, c: is_num(v) and v > 0, "a number > 0")
_NON_NEGATIVE = each_value(("weight_decay", "ses_lambda"), lambda v, c: is_num(v) and v >= 0, "a number >= 0")
_GRAD_CLIP = ("grad_clip", lambda v, c: v is None or (is_num(v) and v > 0), "None or a number > 0")
_BETA = ("ses_beta", lambda v, c: is_num(v) and 0 < v < 1, "a number in (0, 1)")


def _flags(*more):
    return each_value(("ses", "resume", "keep_checkpoint", "save_model", "cpu_amp", *more),
                      lambda v, c: isinstance(v, bool), "True or False")


_RESUME_NEEDS_OUT_DIR = ("resume", lambda v, c: not v or c["out_dir"] is not None, "False when out_dir is None")
_PRESET = ("preset", lambda v, c: v is None or isinstance(v, str), "None or a preset name")


def _kind_is(kind):
    return ("kind", lambda v, c: v == kind, f"{kind!r} here (resolve_config picks the resolver by kind)")


# validate_config's steps, in order: a rule (key, test(value, cfg), what the value must be) fails with
# "config 'key' must be <want>; got <value>"; a resolver (a function of the cfg) checks what a row cannot say and
# fills in derived values, so the rules after it see them. The order decides which error a cfg with several gets.
_CONFIG_RULES = (
    _kind_is("image"),
    *((k, lambda v, c, opts=opts: v in opts, "one of " + ", ".join(map(repr, opts))) for k, opts in _CHOICES.items()),
    *_counts("ses_every_k", "erank_batches", "erank_eval_samples"),
    _BATCH_OF_TWO,
    *_optional_counts("robustness_subset"),
    _SEED,
    *each_value(("warmup_epochs", "lr_lag"), lambda v, c: is_int(v) and v >= 0, "an int >= 0"),
    _LR,
    ("min_lr", lambda v, c: is_num(v) and 0 <= v <= c["lr"], "a number in [0, lr]"),
    *_NON_NEGATIVE,
    ("momentum", lambda v, c: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("lr_gamma", lambda v, c: is_num(v) and v > 0, "a number > 0"),
    _GRAD_CLIP,
    _BETA,
    ("val_split", lambda v, c: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("milestones", lambda v, c: v is None or (isinstance(v, (list, tuple)) and all(is_int(m) and m >= 1 for m in v)
                                              and list(v) == sorted(set(v))),
     "None (40/70/90% of epochs) or an increasing list of epochs >= 1"),
    _resolve_milestones,
    _resolve_inputs,
    *_flags("spectral_norm", "tf32", "cudnn_deterministic"),
    ("sync_bn", lambda v, c: v is None or isinstance(v, bool), "None (auto: on under multi-GPU DDP), True or False"),
    ("drop_path", lambda v, c: v is None or (c["model"] in VIT_MODELS and is_num(v) and 0 <= v < 1),
     "None, or for a ViT a number in [0, 1)"),
    _resolve_drop_path,
    ("vit_impl", lambda v, c: v is None or v == vit_impl(c["model"]),
     lambda c: ("None" if vit_impl(c["model"]) is None else f"None or {vit_impl(c['model'])!r}")
     + f" (it follows from model {c['model']!r})"),
    _resolve_vit_impl,
    _PRESET,
    ("width", lambda v, c: is_num(v) and 0 < v <= 1, "a number in (0, 1] (1: the published model)"),
    ("device", lambda v, c: isinstance(v, str), "a string ('auto', 'cpu', 'cuda', 'cuda:1', ...)"),
    resolve_device,
    *each_value(("data_root", "out_dir"), lambda v, c: v is None or isinstance(v, (str, os.PathLike)), "None or a path"),
    _resolve_paths,
    _RESUME_NEEDS_OUT_DIR,
    ("ses_beta_schedule", lambda v, c: v is None or isinstance(v, (str, dict, float)),
     "None, a spec string ('linear:0.3:0.9') or a dict"),
    _resolve_beta_schedule,
    ("ses_layers", lambda v, c: isinstance(v, str) or (isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)),
     "a preset name or a list of module names"),
    ("ses_targets", lambda v, c: isinstance(v, (list, tuple)) and v and all(isinstance(s, str) for s in v),
     'a non-empty list like ["block"]'),
    ("robustness", lambda v, c: v is None or v in ROBUSTNESS_PRESETS or (isinstance(v, (list, tuple)) and v
                                                                         and all(isinstance(s, str) for s in v)),
     f"None, {', '.join(map(repr, ROBUSTNESS_PRESETS))} or a list of corruption names"),
    ("robustness_severities", lambda v, c: isinstance(v, (list, tuple)) and v and all(is_int(s) and 1 <= s <= 5 for s in v),
     "a non-empty list of ints in 1..5"),
    _resolve_lists,
    ("batch_size", lambda v, c: c["mix"] == "none" or v % 2 == 0, "even with mixup/cutmix (timm Mixup)"),
    ("train_subset", lambda v, c: v is None or v >= c["batch_size"],
     lambda c: f">= batch_size ({c['batch_size']}): training drops the last partial batch"),
)


def apply_rules(c, rules):
    """Run a kind's rules over c in order: a row (key, test(value, c), want) fails with "config 'key' must be <want>;
    got <value>"; a resolver (a function of c) checks what a row cannot say and fills in derived values."""
    for rule in rules:
        if callable(rule):
            rule(c)
        else:
            key, test, want = rule
            check_value(test(c[key], c), key, c[key], want(c) if callable(want) else want)
    return c


def validate_config(cfg) -> dict:
    """An image run's full cfg (defaults of default_config(model, dataset) filled in), or ValueError naming the bad
    key. Runs before any data is touched: the steps of _CONFIG_RULES, in order."""
    return apply_rules(_with_recipe_defaults(cfg), _CONFIG_RULES)


# ── text runs (Exp 22) ──

TEXT_DEFAULTS = read_only(dict(
    kind="text", task="sst2", text_data="glue", model="bert-base-uncased", max_len=128, token_type_ids=False,
    epochs=3, batch_size=32, eval_batch_size=None, lr=2e-5, weight_decay=0.01, warmup_ratio=0.06, grad_clip=1.0,
    amp="fp16", precision=None, cpu_amp=False,
    ses=False, ses_lambda=0.01, ses_beta=0.5, ses_layers="all", ses_pool="tokens", ses_impl="suite", erank_batches=4,
    seed=42, device="auto", data_root=None, out_dir=None, resume=False, save_model=False, keep_checkpoint=False,
    train_subset=None, test_subset=None, max_steps_per_epoch=None, preset=None, log="auto",
))
# smoke: the whole path offline in seconds on a CPU: TINY_BERT on SYNTHETIC text (smoke only), 2 epochs of 8 steps, at
# lr 1e-3 (a randomly initialised BERT moves nowhere in 16 steps at the fine-tuning rate 2e-5)
TEXT_PRESETS = read_only({"paper": {}, "smoke": dict(model=TINY_BERT, text_data="synthetic", epochs=2, max_len=32,
                                                     train_subset=256, test_subset=64, erank_batches=1, lr=1e-3)})
_TEXT_CHOICES = {"task": tuple(GLUE_TASKS), "text_data": ("glue", "synthetic"), "amp": ("auto", "fp16", "bf16", "off"),
                 "ses_pool": ("tokens", "mask"), "ses_impl": ("suite", "author"),
                 "log": ("auto", "tqdm", "plain", "none")}
_TEXT_RULES = (
    _kind_is("text"),
    *_counts("max_len", "erank_batches"),
    _BATCH_OF_TWO,
    *_optional_counts(),
    _SEED,
    _LR,
    *_NON_NEGATIVE,
    ("warmup_ratio", lambda v, c: is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    _GRAD_CLIP,
    _BETA,
    *_flags("token_type_ids"),
    _PRESET,
    ("model", lambda v, c: isinstance(v, str) and v, "a Hugging Face model name or a local folder"),
    ("model", lambda v, c: v != TINY_BERT or c["text_data"] == "synthetic",
     f"not {TINY_BERT!r} with GLUE data (its vocabulary is the synthetic text's)"),
    ("ses_layers", lambda v, c: isinstance(v, str) and re.fullmatch(r"all|(first|last)\d+", v),
     "'all', 'lastN' or 'firstN' (encoder layers)"),
    _RESUME_NEEDS_OUT_DIR,
)

def resolve_text_config(cfg) -> dict:
    """An Exp 22 run's full config (TEXT_DEFAULTS filled in, precision resolved for this device), or ValueError naming
    the bad key: the text counterpart of validate_config."""
    check_config_keys(cfg, TEXT_DEFAULTS, "text config")
    c = {**TEXT_DEFAULTS, **cfg}
    for k, opts in _TEXT_CHOICES.items():
        check_value(c[k] in opts, k, c[k], "one of " + ", ".join(map(repr, opts)))
    apply_rules(c, _TEXT_RULES)
    _resolve_paths(c)
    resolve_device(c)  # a device this machine has; precision: what the amp request runs at on it
    return c


# ── the toy 2-D study (Exp 4) ──

TOY_PRESETS = read_only({"paper": {}, "smoke": dict(epochs=20, n_per_class=100, log_every=5)})
TOY_DEFAULTS = read_only(dict(
    kind="toy", seed=42, ses=False, ses_beta=0.6, ses_lambda=0.1, n_per_class=500, radii=[1.0, 2.0, 3.0], noise=0.15,
    test_fraction=0.2, activation="tanh", epochs=300, batch_size=128, lr=3e-3, weight_decay=0.0,
    log_every=10, out_dir=None, resume=True, device="cpu", preset=None,
))


def resolve_toy_config(cfg):
    """An Exp 4 run's full config (TOY_DEFAULTS filled in), or ValueError naming the bad key."""
    unknown = sorted(set(cfg) - set(TOY_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown toy config key(s) {unknown}; known: {', '.join(sorted(TOY_DEFAULTS))}")
    c = apply_rules({**TOY_DEFAULTS, **cfg}, (_kind_is("toy"),))
    check_beta(c["ses_beta"])
    if c["ses_lambda"] < 0 or c["epochs"] < 1:
        raise ValueError("ses_lambda must be >= 0 and epochs >= 1")
    return c


# ── one resolver for every kind of run ──

RUN_KINDS = ("image", "text", "toy")


def run_kind(cfg) -> str:
    """The kind a config states (an image run when it states none), or ValueError naming it."""
    kind = cfg.get("kind", "image")
    check_value(kind in RUN_KINDS, "kind", kind, "one of " + ", ".join(map(repr, RUN_KINDS)))
    return kind


def resolve_config(cfg) -> dict:
    """A run's full config, resolved by its kind's rules: cfg["kind"] (default "image") picks validate_config (image
    runs: ResNets, WRN, ViTs on CIFAR / Tiny-ImageNet), resolve_text_config (Exp 22's BERT on GLUE) or
    resolve_toy_config (Exp 4's rings). ValueError naming the bad key, before any data is touched."""
    if not isinstance(cfg, dict):
        return validate_config(cfg)  # its one line for a non-dict
    return {"image": validate_config, "text": resolve_text_config, "toy": resolve_toy_config}[run_kind(cfg)](cfg)
