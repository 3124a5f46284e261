"""Steps: one optimiser step of each run kind (image, text), the very functions training runs and the GPU-memory
tracer traces (estimates), so an estimate follows the step as it is, not a copy of it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ses import autocast


def image_step(run, x, y, sums):
    """One optimiser step on the batch (x, y), its loss, SES, hits and samples added to sums; returns the loss."""
    target = y
    if run.mixer is not None:
        x, target = run.mixer(x, y)  # soft targets [B, C]
    with autocast(run.device, run.amp_dtype):
        out = run.model(x)
        task = run.criterion(out, target) if run.criterion else F.cross_entropy(out, target)
    # SES in float32 outside autocast, scaled with the rest below; 0 on the steps it skips (every_k).
    # Under DDP on the gathered global batch: no 1/R or R, see gather_activations
    loss = task.float() + run.ses(gather=run.gather)
    if run.ses.last_loss is not None:
        sums[1] += run.ses.last_loss.double()
        sums[4] += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.c["grad_clip"]:  # DDP's gradients are already averaged: every rank clips the same norm
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), run.c["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    with torch.no_grad():
        pred = out.argmax(1)
        # with mixed targets: the lam-weighted hit rate sum_i t_i[pred_i] (the reference's metric)
        hits = target.gather(1, pred[:, None]).sum() if run.mixer is not None else (pred == y).sum()
        sums[2] += hits.double()
        sums[0] += task.detach().double() * len(y)
        sums[3] += len(y)
    return loss.detach()


def rows(data, idx) -> dict:
    """The rows idx of a tokenised set (a dict of equally long tensors)."""
    return {k: v[idx] for k, v in data.items()}


def model_inputs(run, batch) -> dict:
    """The model's keyword inputs of a tokenised batch (token_type_ids only as the run's recipe passes them); with
    ses_pool="mask" the hooks are told this batch's real tokens."""
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if run.c["token_type_ids"] else ())
    if run.pool is not None:  # the hooks pool over this batch's real tokens
        run.pool.mask = batch["attention_mask"]
    return {k: batch[k] for k in keys if k in batch}


def text_step(run, batch, sums):
    """One optimiser step of a text run, the author's order: forward under autocast, SES in float32 outside it, scaled
    backward, unscale, clip, step, scaler update, then the per-step schedule."""
    with autocast(run.device, run.amp_dtype):
        out = run.model(**model_inputs(run, batch), labels=batch["labels"])
    loss = out.loss.float() + run.ses()  # lam * sum_l (H_l - beta log d_l)^2; 0 for a baseline
    if run.ses.last_loss is not None:
        sums[1] += run.ses.last_loss.double()
        sums[4] += 1
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.c["grad_clip"]:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.c["grad_clip"])
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    with torch.no_grad():
        n = len(batch["labels"])
        sums[0] += out.loss.detach().double() * n
        sums[2] += (out.logits.argmax(-1) == batch["labels"]).sum().double()
        sums[3] += n
    return loss.detach()
