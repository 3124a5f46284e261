"""Distributed runs: one run over many GPUs (torchrun + DistributedDataParallel), the rank's device and seeds."""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .util import check_value, pick_device


# ── distributed: one run over many GPUs / nodes (torchrun + DistributedDataParallel) ──────────────
# Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment), train() joins the process
# group itself (NCCL on CUDA, gloo on CPU), one process per GPU on cuda:LOCAL_RANK. What is global, what per rank:
#   batch_size is the GLOBAL batch: rank r trains on the r-th contiguous slice of every global batch of the
#     shared seeded permutation (DeviceLoader(rank, world_size)), augmentation drawn for the whole global batch;
#   gradients: DDP's all-reduce (mean over ranks); SES with ses_scope="global" sees the whole batch (below);
#   BatchNorm: per-rank batch statistics unless sync_bn (SyncBatchNorm: CUDA only, torch has no CPU kernel);
#   metrics: per-rank sums all-reduced; test/val evaluation sharded over the ranks and reduced; the erank pass
#     (one fixed batch) runs whole on every rank (SyncBatchNorm needs every rank in its forward);
#   rank 0 alone logs, writes checkpoint.pt / result.json and evaluates robustness; it returns the result,
#     the other ranks return None (they do not wait for rank 0's robustness pass);
#   the checkpoint holds the unwrapped model and the global loader/RNG state: any world size resumes it.
# With torchrun over several nodes, out_dir must be a folder every node sees (rank 0 writes, all read).

def eval_batch_size_of(c):
    """The evaluation batch: the config's, else twice the training batch (no gradients to hold)."""
    return c["eval_batch_size"] or 2 * c["batch_size"]


@dataclasses.dataclass
class DistInfo:
    """This process's place in the run: rank 0 of 1 when not distributed."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (plain single-process training)
    created: bool = False  # train() initialised the group, so train() destroys it

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> dict | None:
    """{rank, world_size, local_rank} set by torchrun (or any env:// launcher), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", 0))}
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None


def dist_device(spec, local_rank) -> torch.device:
    """One process per GPU: cuda:LOCAL_RANK ("auto" / "cuda"), or the CPU ("cpu"; "auto" without CUDA)."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec not in ("auto", "cuda"):
        raise ValueError(f"config 'device' must be 'auto', 'cuda' or 'cpu' under torchrun (each rank uses "
                         f"cuda:LOCAL_RANK); got {spec!r}")
    if not local_rank < torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                         "give torchrun --nproc_per_node <= the number of GPUs")
    return torch.device("cuda", local_rank)


def _has_batchnorm(model) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def dist_setup(c) -> tuple[DistInfo, torch.device]:
    """(DistInfo, device) for validated cfg c; joins the process group under torchrun. The cfg is checked
    against the world size (global batch divisible, ...) before the group is created."""
    env = torchrun_env()
    if dist.is_available() and dist.is_initialized():  # the caller built the group: use it, leave it alone
        info = DistInfo(dist.get_rank(), dist.get_world_size(), env["local_rank"] if env else 0, dist.get_backend())
    elif env is not None:
        info = DistInfo(**env)
    else:
        return DistInfo(), pick_device(c["device"])
    device = dist_device(c["device"], info.local_rank)
    R, B = info.world_size, c["batch_size"]
    check_value(B % R == 0, "batch_size", B, f"divisible by the number of ranks ({R}): it is the global batch")
    check_value(B // R >= 2, "batch_size", B, f">= 2 x the number of ranks ({R}): each rank needs 2 samples")
    ebs = eval_batch_size_of(c)
    check_value(ebs % R == 0, "eval_batch_size", ebs, f"divisible by the number of ranks ({R})")
    if c["mix"] != "none":
        check_value(B // R % 2 == 0, "batch_size", B, f"an even number per rank with mixup/cutmix ({R} ranks)")
    check_value(not (c["sync_bn"] and device.type == "cpu"), "sync_bn", c["sync_bn"],
           "False or None on CPU (torch's SyncBatchNorm runs on GPUs only)")
    if info.backend is None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        info.backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(info.backend)  # env:// rendezvous: torchrun's MASTER_ADDR / MASTER_PORT
        info.created = True
    return info, device


def dist_teardown(info: DistInfo):
    if info.created and dist.is_initialized():
        dist.destroy_process_group()


def use_sync_bn(c, model, device, info) -> bool:
    """SyncBatchNorm when asked, or by default under DDP on CUDA for models with BatchNorm: without it each
    rank normalises by its own B/R samples, so R ranks do not compute what one process on the batch would."""
    if not info.enabled or not _has_batchnorm(model):
        return False
    if c["sync_bn"] is None and device.type == "cpu" and info.world_size > 1 and info.is_main:
        warnings.warn(f"{c['model']} has BatchNorm and SyncBatchNorm needs GPUs: on CPU each of the "
                      f"{info.world_size} ranks normalises with its own batch statistics",
                      stacklevel=4)  # train()'s line: use_sync_bn <- _build_model_and_ses <- _train <- train
    return c["sync_bn"] if c["sync_bn"] is not None else device.type == "cuda"


def gather_activations(acts_list) -> list:
    """Each rank's pooled [B/R, d_l] activations -> the global [B, d_l] ones (rank order = the single-process
    batch order, as DeviceLoader slices it), differentiably: torch.distributed.nn.functional.all_gather.

    Gradient: every rank computes the same SES value S on the gathered batch; all_gather's backward SUMS
    the R ranks' gradients for rank r's slice (reduce-scatter), so rank r's activations receive R * dS/dA_r;
    DDP then AVERAGES the parameter gradients over the R ranks: (1/R) sum_r R dS/dA_r dA_r/dtheta = dS/dtheta,
    exactly the single-process gradient. So no rescaling: the sum and the mean cancel. (Task loss: each
    rank's mean over B/R, averaged over R = the mean over B.) One collective for all layers per step."""
    from torch.distributed.nn.functional import all_gather
    dims = [a.shape[1] for a in acts_list]
    # half -> float32 before the collective (ses_loss would upcast anyway; the gradient exchange stays fp32)
    flat = torch.cat([a.float() if a.dtype in (torch.float16, torch.bfloat16) else a for a in acts_list], dim=1)
    with warnings.catch_warnings():  # 2.x marks it deprecated for a private successor; it is the public, documented one
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        parts = all_gather(flat)
    return list(torch.cat(parts, dim=0).split(dims, dim=1))


def rank_seed(seed, epoch, rank) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def same_on_all_ranks(value, info: DistInfo, what: str):
    """Fail clearly (not hang) when ranks disagree on a decision, e.g. out_dir not shared between nodes."""
    if not info.enabled:
        return value
    seen = [None] * info.world_size
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        raise RuntimeError(f"ranks disagree on {what}: {seen} (with several nodes, out_dir must be a shared folder)")
    return value
