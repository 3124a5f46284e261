"""Text runs (Exp 22): BERT fine-tuned on GLUE SST-2 / MRPC with the author's recipe. This room supplies what a text
run brings to the one training driver (training._train): its model and SES hooks, its tokenised data, its optimisation,
its evaluation, its memory check and its environment record; the driver does the rest, as for an image run."""
from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import socket
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .ses import MaskedTokenPool, SES, autocast, layer_erank_stats
from .util import PreflightError, device_label, measuring
from .data import (GLUE_TASKS, HF_HUB_ID, SYNTHETIC_SIZES, candidate_roots, hub_reachable, load_glue,
                   resolve_glue_dir, synthetic_glue)
from .models import TINY_BERT, bert_hook_targets, text_param_groups, tiny_bert, tiny_tokenizer
from .steps import model_inputs, rows
from .estimates import GPU_MEMORY, guard_estimate, guard_target, placeable


# Exp 22 as the author ran it (ses_bert_nlp.py): BERT-base-uncased fine-tuned on GLUE SST-2 and MRPC, baseline vs SES
# on the last 4 / all 12 encoder layers' outputs, beta 0.5, lambda 0.01; AdamW 2e-5 (no decay on biases and LayerNorm
# weights) wd 0.01, linear warm-up over 6 % of the steps then linear decay to 0, 3 epochs, batch 32 (last partial batch
# dropped), FP16 + GradScaler, gradient clip 1.0, 128 tokens padded to max_length, seed 42; acc = dev accuracy, gap =
# the last epoch's running train accuracy (dropout on) minus its dev accuracy. Its loaders keep only input_ids,
# attention_mask and label, so sentence pairs run with token type 0 throughout (token_type_ids=False here), and its
# hooks mean-pool over all 128 positions, padding included (ses_pool="tokens"; "mask": over the real tokens only).
# A text run writes the same run folder (result.json: config / env / history / final) as an image run.

# ── the model ──

def _local_text_model(name, root=None):
    """A folder holding `name` (config.json and a tokenizer): `name` itself when it is one, else the first folder under
    data_root / $SES_DATA / Kaggle inputs / ./data whose path names it (an attached copy), else None."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    key = name.rstrip("/").split("/")[-1].lower()
    for _, base, depth in candidate_roots(root):
        if not base.is_dir():
            continue
        for dirpath, dirnames, files in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
            dirnames.sort()
            d = Path(dirpath)
            if "config.json" in files and {"vocab.txt", "tokenizer.json"} & set(files) and key in str(d).lower():
                return d
            if len(d.relative_to(base).parts) >= depth + 2:
                dirnames[:] = []
    return None


def load_pretrained_text(name, num_labels=2, root=None):
    """(model, tokenizer, where from) of a pretrained sequence classifier: an attached copy (_local_text_model), else
    the Hugging Face cache, else a download when the hub answers. None of these: FileNotFoundError in one line naming
    what to attach (offline, transformers would retry for a minute and then say little)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    local = _local_text_model(name, root)
    src, kw = (str(local), {}) if local is not None else (name, {"local_files_only": not hub_reachable()})
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels, **kw)
    except OSError:
        if not kw.get("local_files_only"):
            raise
        from huggingface_hub.constants import HF_HUB_CACHE
        raise FileNotFoundError(
            f"{name} is not in the Hugging Face cache ({HF_HUB_CACHE}) and huggingface.co is unreachable (offline): "
            f"attach a Kaggle dataset or model holding its files (config.json, vocab.txt, model.safetensors or "
            f"pytorch_model.bin; found under /kaggle/input, data_root or SES_DATA when a folder's path names "
            f"{name.rstrip('/').split('/')[-1]!r}) "
            f"or set HF_HOME to a cache holding it; online, it downloads itself") from None
    return model, tok, str(local) if local is not None else f"Hugging Face: {name}"


def encode_text(tokenizer, a, b, max_len) -> dict:
    """The tokenizer's input_ids, attention_mask, token_type_ids for texts a (and pairs b), truncated and padded to
    max_len tokens, as the author's map (padding="max_length": the mean over tokens includes the padding)."""
    enc = tokenizer(a, b, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def text_lr_factor(warmup, total):
    """The author's LinearWarmupScheduler as a LambdaLR factor of the optimiser steps taken: it sets the rate after
    each step, so the first step runs at the base rate, step i >= 1 at i / warmup of it during the warm-up, then the
    rate falls linearly to 0 at `total`."""
    def factor(i):
        if i == 0:
            return 1.0
        if i <= warmup:
            return i / max(1, warmup)
        return max(0.0, 1.0 - (i - warmup) / max(1, total - warmup))
    return factor


# ── what a text run brings to the driver ──

def text_memory_preflight(c, gpu, total_gb=None) -> dict | None:
    """Before a text run loads anything: its guard estimate (estimates.guard_estimate) on this GPU kind of total_gb
    (GPU_MEMORY's when None); PreflightError in one line when the run cannot fit it (Exp 22 runs on one GPU), else
    {gpu, peak_gb, train_gb, usable_gb} for result.json and the memory guard; None for a model it does not know."""
    if not placeable(c):
        return None
    try:
        return guard_estimate(c, gpu, total_gb or GPU_MEMORY[gpu][0], must_fit=True)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def check_text_memory(run):
    """CUDA only (guard_target is None on the CPU; the CPU twin is text_memory_preflight, tests/test_memory.py): the
    run's estimate on this GPU, or PreflightError when it cannot fit."""
    if (target := guard_target(run.device)) is not None:
        run.mem_estimate = text_memory_preflight(run.c, *target)


def build_text_model(run):
    """The model and tokenizer on the device, and the SES object on its encoder layers (lam 0 for a baseline: its
    hooks then serve the erank measurement alone)."""
    c = run.c
    if importlib.util.find_spec("transformers") is None:
        raise PreflightError("this run cannot start:\n  - the package 'transformers' is missing (Exp 22's "
                             "tokenizers and BERT): pip install transformers")
    if c["model"] == TINY_BERT and run.device.type == "cpu":  # its 64-wide ops: handing them to a second thread
        run.threads_before = torch.get_num_threads()  # costs more than the op (35x slower on a busy 2-core machine)
        torch.set_num_threads(1)
    if c["model"] == TINY_BERT:
        run.tokenizer = tiny_tokenizer()
        run.net, run.source = tiny_bert(len(run.tokenizer), c["max_len"]), f"{TINY_BERT} (random init, smoke only)"
    else:
        run.net, run.tokenizer, run.source = load_pretrained_text(c["model"], 2, c["data_root"])
    attach_text_ses(run)


def attach_text_ses(run):
    """run.net on the run's device, with the SES object on its encoder layers (and the token pooling of
    ses_pool="mask"): what a text run's model gets, whatever its weights (bench/gpu_check.py's random BERT too)."""
    c = run.c
    run.net.to(run.device)
    run.pool = MaskedTokenPool() if c["ses_pool"] == "mask" else None
    run.ses = SES(run.net, bert_hook_targets(run.net, c["ses_layers"]), beta=c["ses_beta"],
                  lam=c["ses_lambda"] if c["ses"] else 0.0, pool=run.pool or "auto", impl=c["ses_impl"])


def _text_split(c, split):
    """(a, b, labels) of one split: GLUE's, cut to train_subset / test_subset, or SYNTHETIC (smoke only)."""
    n = c["train_subset"] if split == "train" else c["test_subset"]
    if c["text_data"] == "synthetic":  # fixed seeds: every run sees the same synthetic sets
        return synthetic_glue(c["task"], n or SYNTHETIC_SIZES[split != "train"], seed=1 if split == "train" else 2)
    a, b, y = load_glue(c["task"], split, c["data_root"])
    return a[:n], b[:n] if b is not None else None, y[:n]


class TextBatches:
    """A tokenised training set on the device as the driver's loader: each epoch its shuffled full batches (the last
    partial batch dropped, as the author's), capped at max_steps; the shuffle's generator is its checkpointed state."""

    def __init__(self, data, batch_size, seed, max_steps=None):
        self.data, self.batch_size = data, batch_size
        n = len(data["labels"])
        self.steps = min(n // batch_size, max_steps or n)
        self.order = torch.Generator().manual_seed(seed)

    def __len__(self):
        return self.steps

    def __iter__(self):
        B, labels = self.batch_size, self.data["labels"]
        perm = torch.randperm(len(labels), generator=self.order).to(labels.device)
        for step in range(self.steps):
            yield rows(self.data, perm[step * B:(step + 1) * B])

    def state_dict(self) -> dict:
        return {"order": self.order.get_state()}

    def load_state_dict(self, state):
        self.order.set_state(state["order"])


def build_text_data(run):
    """Both splits tokenised once into tensors on the device, the fixed erank batches, the steps per epoch."""
    c, dev = run.c, run.device
    sets = {}
    for split in ("train", "dev"):
        a, b, y = _text_split(c, split)
        enc = encode_text(run.tokenizer, a, b, c["max_len"])
        sets[split] = {**{k: v.to(dev) for k, v in enc.items()}, "labels": torch.tensor(y, device=dev)}
    glue_dir = resolve_glue_dir(c["task"], c["data_root"])[0] if c["text_data"] == "glue" else None
    run.data_source = ("SYNTHETIC text (smoke only)" if c["text_data"] == "synthetic" else
                       f"{GLUE_TASKS[c['task']]['name']}: {glue_dir or HF_HUB_ID}")
    n, B = len(sets["train"]["labels"]), c["batch_size"]
    if n < B:
        raise ValueError(f"batch_size {B} is larger than the {n} training examples: the last partial batch is dropped, "
                         "so no step would run; lower batch_size")
    run.loader = TextBatches(sets["train"], B, c["seed"], c["max_steps_per_epoch"])
    run.evals = {"test": sets["dev"]}  # GLUE's dev set: the author's val set, our "test" columns
    run.steps = len(run.loader)
    run.erank_batches = [rows(sets["train"], slice(i * B, (i + 1) * B)) for i in range(min(c["erank_batches"], n // B))]


def build_text_optimisation(run):
    """AdamW in two groups (no decay on NO_DECAY), the author's warm-up schedule per step, the FP16 gradient scaler."""
    c = run.c
    run.optimizer = torch.optim.AdamW(text_param_groups(run.net, c["weight_decay"]), lr=c["lr"])
    total = run.steps * c["epochs"]
    warmup = int(total * c["warmup_ratio"])  # the author's int(total_steps * WARMUP_RATIO)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, text_lr_factor(warmup, total))
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.amp_dtype == torch.float16)


def _text_evaluate(run):
    """(accuracy %, mean loss) on the dev set, eval mode, under the run's autocast, hooks paused."""
    data, eb = run.evals["test"], run.c["eval_batch_size"] or run.c["batch_size"]
    sums = torch.zeros(3, device=run.device, dtype=torch.float64)
    with measuring(run.net, "eval"), run.ses.paused():
        for i in range(0, len(data["labels"]), eb):
            batch = rows(data, slice(i, i + eb))
            with autocast(run.device, run.amp_dtype):
                logits = run.net(**model_inputs(run, batch)).logits
            sums[0] += (logits.argmax(-1) == batch["labels"]).sum()
            sums[1] += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").double()
            sums[2] += len(batch["labels"])
    hits, loss, n = sums.tolist()
    return 100.0 * hits / n, loss / n


def _text_erank(run) -> dict:
    """Per-layer effective rank as SES sees it (train mode, the first erank_batches training batches of the batch
    size, the run's pooling), averaged over the batches; the RNG is forked, so the measurement changes nothing."""
    per = []
    devices = [run.device] if run.device.type == "cuda" else []
    with run.ses.measuring(), measuring(run.net, "train"), torch.random.fork_rng(devices=devices):
        for batch in run.erank_batches:
            run.ses.collector.clear()
            with autocast(run.device, run.amp_dtype):
                run.net(**model_inputs(run, batch))
            per.append(layer_erank_stats(run.ses.collector, run.c["ses_beta"]))
        run.ses.collector.clear()
    out = {}
    for name, st in per[0].items():
        erank = float(np.mean([p[name]["erank"] for p in per]))
        out[name] = {"erank": erank, "d": st["d"], "target": st["target"], "ratio": erank / st["target"],
                     "samples": run.c["batch_size"]}
    return out


def evaluate_text_epoch(run, row, beta):
    """The epoch's evaluation, into row: dev accuracy and loss (as test_acc / test_loss), the gap to the running train
    accuracy (dropout on, as the author's), each hooked layer's effective rank."""
    row["test_acc"], row["test_loss"] = _text_evaluate(run)
    row["gap"] = row["train_acc"] - row["test_acc"]
    row["erank"] = _text_erank(run)


def text_tag(run) -> str:
    """The run's name in its log lines."""
    c = run.c
    return f"{c['task']}/{c['model']}" + (f"+SES {c['ses_layers']}" if c["ses"] else "") + f" seed {c['seed']}"


def text_env(run) -> dict:
    """result.json's env of a text run: versions, device, where the model and the data came from."""
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(run.device), "device_name": device_label(run.device),
            "cuda": torch.version.cuda, "model_source": run.source, "data": run.data_source,
            "hostname": socket.gethostname(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
