"""The SES method: spectral entropy, effective rank, the SES loss, beta schedules, the hooks that pool a layer's
activations, ActivationCollector and the SES object for any nn.Module.

This room imports nothing else of the suite (torch and numpy only), so it can be copied into anyone's training loop:

    ses = SES(model, beta=0.7, lam=0.01)          # hooks the residual blocks (or `layers=`)
    loss = F.cross_entropy(model(x), y) + ses.loss()"""
from __future__ import annotations

import contextlib
import math
import re
import warnings

import numpy as np
import torch
import torch.nn as nn


# ── value checks and autocast: the suite's lowest helpers, kept here so that this room imports nothing else ──

def is_int(v):
    """An int and not a bool (True is an int to Python): every integer setting is checked with this."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_real(v):
    """A real number and not a bool (True is an int to Python, never a value a user means)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_num(v):
    """A finite real number and not a bool."""
    return is_real(v) and math.isfinite(v)


def autocast(device, amp_dtype):
    """torch.autocast on the device's own type at amp_dtype (torch.float16 / bfloat16), or a no-op for fp32 (None)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# ── spectral entropy and the SES loss ──

SES_EPS = 1e-12  # eigenvalue floor, as the reference; keeps log finite on rank-deficient spectra
warned_unreachable: set = set()


def check_beta(beta):
    if not is_real(beta) or not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta must be a number in (0, 1) (the target normalised entropy); got {beta!r}")
    return float(beta)


def _as_matrix(acts: torch.Tensor) -> torch.Tensor:
    if acts.dim() != 2:
        raise ValueError(f"activations must be pooled to [B, d]; got shape {tuple(acts.shape)}")
    if acts.shape[0] < 2:
        raise ValueError(f"spectral entropy needs a batch of at least 2 samples; got B={acts.shape[0]}")
    # float32 at least (half/bf16 eigvalsh is inaccurate or unsupported); float64 stays float64
    return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts


def _second_moment(acts: torch.Tensor) -> torch.Tensor:
    """Centred second-moment matrix whose eigenvalues are the covariance spectrum.

    When B < d we use the B x B Gram matrix Hc Hc^T instead of the d x d covariance Hc^T Hc: both
    have the same non-zero eigenvalues, and eigvalsh is O(k^3), so at d = 2048, B = 256 this is
    (2048/256)^3 = 512x less work, and float32 has fewer near-zero noise eigenvalues to smear H.
    """
    h = _as_matrix(acts)
    h = h - h.mean(dim=0, keepdim=True)
    B, d = h.shape
    m = h @ h.T if B < d else h.T @ h
    return m / (B - 1)


def entropy_from_eigs(eigs: torch.Tensor) -> torch.Tensor:
    lam = eigs.clamp(min=SES_EPS)
    p = lam / lam.sum(dim=-1, keepdim=True)
    return -(p * p.log()).sum(dim=-1)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# How the entropies are computed: "suite" (batched, the Gram trick below) or "author", the computation of the author's
# ses_phase3.py (per layer: the d x d covariance and one eigvalsh call each), the same numbers more slowly. The suite
# times its SES step with "author" only to judge the paper's time claims like for like (docs/claims.md).
SES_IMPLS = ("suite", "author")


def _author_entropies(acts_list) -> torch.Tensor:
    """The author's computation: for each layer, centre, the d x d covariance Hc^T Hc / (B - 1), its own eigvalsh."""
    out = []
    for a in acts_list:
        h = _as_matrix(a)
        h = h - h.mean(dim=0, keepdim=True)
        out.append(entropy_from_eigs(torch.linalg.eigvalsh((h.T @ h) / (h.shape[0] - 1))))
    return torch.stack(out)


def layer_entropies(acts_list, impl="suite") -> torch.Tensor:
    """Spectral entropy of each [B, d_l] activation matrix, as one float32 vector [L].

    Batched: matrices of equal size are stacked and sent to ONE eigvalsh call (a [L, k, k] batch),
    since per-layer calls pay a kernel launch + sync each and a small eigvalsh underuses the GPU;
    ResNet-18's 9 hooks become 2-3 calls. Sizes are grouped, not zero-padded, so the result is exact.
    impl="author": the author's per-layer computation instead (SES_IMPLS).
    """
    if len(acts_list) == 0:
        raise ValueError("no activations: was the forward pass run in train mode with the hooks active?")
    if impl not in SES_IMPLS:
        raise ValueError(f"unknown SES implementation {impl!r}; known: {', '.join(SES_IMPLS)}")
    device = acts_list[0].device  # all on one device (multi-GPU models: move, never assume cuda:0)
    if impl == "author":
        with _no_autocast(device):
            return _author_entropies([a.to(device) for a in acts_list])
    with _no_autocast(device):
        mats = [_second_moment(a.to(device)) for a in acts_list]
        groups: dict = {}
        for i, m in enumerate(mats):
            groups.setdefault(m.shape[-1], []).append(i)
        out = [None] * len(mats)
        for idx in groups.values():
            eigs = torch.linalg.eigvalsh(torch.stack([mats[i] for i in idx]))
            for i, h in zip(idx, entropy_from_eigs(eigs)):
                out[i] = h
        return torch.stack(out)


def spectral_entropy(acts: torch.Tensor) -> torch.Tensor:
    """H = -sum p_i log p_i of the normalised covariance spectrum of acts [B, d]; float32, differentiable."""
    return layer_entropies([acts])[0]


def effective_rank(acts: torch.Tensor) -> torch.Tensor:
    return spectral_entropy(acts).exp()


def _warn_if_unreachable(B: int, d: int, beta: float):
    target_rank = d ** beta
    key = (B, d, round(beta, 6))
    if target_rank > B - 1 and key not in warned_unreachable:
        warned_unreachable.add(key)
        warnings.warn(
            f"SES target effective rank d^beta = {d}^{beta:g} = {target_rank:.1f} exceeds B-1 = {B - 1}, the "
            f"largest rank a batch of {B} centred samples can have: the target is unreachable for this layer "
            f"(raise the batch size, lower beta, or hook fewer wide layers).", stacklevel=3)


def ses_loss(acts_list, beta, alphas=None, impl="suite") -> torch.Tensor:
    """sum_l alpha_l (H_l - beta log d_l)^2 in float32 (lambda is applied by the caller); impl: SES_IMPLS."""
    beta = check_beta(beta)
    H = layer_entropies(acts_list, impl)
    dims = [a.shape[1] for a in acts_list]
    for a, d in zip(acts_list, dims):
        _warn_if_unreachable(a.shape[0], d, beta)
    target = beta * torch.log(torch.tensor(dims, dtype=H.dtype, device=H.device))
    sq = (H - target) ** 2
    if alphas is not None:
        if len(alphas) != len(acts_list):
            raise ValueError(f"got {len(alphas)} alphas for {len(acts_list)} layers")
        sq = sq * torch.as_tensor(alphas, dtype=H.dtype, device=H.device)
    return sq.sum()


def ses_active(step: int, every_k: int = 1) -> bool:
    """Periodic SES: apply the regulariser on every k-th optimiser step (k = 1: every step)."""
    return step % every_k == 0


def erank_stats(acts_list, names, beta) -> dict:
    """Per-layer effective rank and its ratio to the target d^beta (for the per-epoch log)."""
    with torch.no_grad():
        H = layer_entropies(acts_list).double().cpu()
    stats = {}
    for name, a, h in zip(names, acts_list, H):
        d = a.shape[1]
        erank, target = math.exp(h.item()), d ** beta
        stats[name] = {"erank": erank, "d": d, "target": target, "ratio": erank / target}
    return stats


def layer_erank_stats(collector, beta) -> dict:
    return erank_stats(collector.activations, collector.names, beta)


# ── β schedules ──────────────────────────────────────────────────────────────────────────────────

class BetaSchedule:
    """beta as a function of the epoch, as in the reference's adaptive-beta experiment (Exp 16).

    fixed: start | linear: start -> end | cosine: start -> end, slow start (1 - cos) / 2 |
    reverse: linear with start > end (default 0.9 -> 0.3) | step: values[i] until milestone i
    (milestones as fractions of training: default 0.3 -> 0.7 -> 0.9 at 40% and 70%, i.e. epochs 20, 35 of 50).
    Progress t = epoch / (epochs - 1), so the last epoch uses exactly `end`.
    """
    KINDS = ("fixed", "linear", "cosine", "reverse", "step")
    DEFAULTS = {"fixed": (0.7, None), "linear": (0.3, 0.9), "cosine": (0.3, 0.9), "reverse": (0.9, 0.3)}

    def __init__(self, kind="fixed", start=None, end=None, values=(0.3, 0.7, 0.9), milestones=(0.4, 0.7)):
        if kind not in self.KINDS:
            raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(self.KINDS)}")
        d_start, d_end = self.DEFAULTS.get(kind, (None, None))
        self.kind = kind
        self.start = check_beta(d_start if start is None else start) if kind != "step" else None
        self.end = check_beta(d_end if end is None else end) if kind in ("linear", "cosine", "reverse") else None
        self.values = tuple(check_beta(v) for v in values) if kind == "step" else None
        self.milestones = tuple(float(m) for m in milestones) if kind == "step" else None
        if kind == "step" and len(self.values) != len(self.milestones) + 1:
            raise ValueError("step schedule needs len(values) == len(milestones) + 1")

    @classmethod
    def parse(cls, spec) -> "BetaSchedule":
        """0.7 | "fixed:0.7" | "linear:0.3:0.9" | "cosine:0.3:0.9" | "reverse:0.9:0.3" | "step:0.3,0.7,0.9"
        | {"kind": ..., ...} | a BetaSchedule."""
        if isinstance(spec, BetaSchedule):
            return spec
        if is_real(spec):
            return cls("fixed", start=spec)
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, str):
            kind, *args = spec.split(":")
            if kind == "step":
                return cls("step", values=[float(v) for v in args[0].split(",")]) if args else cls("step")
            nums = [float(a) for a in args]
            return cls(kind, *nums)
        raise ValueError(f"cannot parse beta schedule {spec!r}")

    def value(self, epoch: int, epochs: int) -> float:
        t = epoch / max(epochs - 1, 1)
        if self.kind == "fixed":
            return self.start
        if self.kind in ("linear", "reverse"):
            return self.start + (self.end - self.start) * t
        if self.kind == "cosine":
            return self.start + (self.end - self.start) * 0.5 * (1 - math.cos(math.pi * t))
        frac = epoch / epochs  # step: milestones are fractions of the epochs, as [20, 35] of 50
        return self.values[sum(frac >= m for m in self.milestones)]

    def __repr__(self):
        if self.kind == "step":
            return f"step:{','.join(map(str, self.values))}"
        return f"{self.kind}:{self.start}" + (f":{self.end}" if self.end is not None else "")


# ── hooks ────────────────────────────────────────────────────────────────────────────────────────

def pool_activation(x: torch.Tensor, kind: str = "output", pool="auto") -> torch.Tensor:
    """Pool one hooked tensor to [B, d].

    auto: 4-D conv maps [B,C,H,W] -> mean over H,W; token sequences [B,N,D] -> mean over tokens;
    attention probabilities [B,heads,N,N] (kind "attn_weights") -> mean over queries -> [B, heads*N],
    as the SES reference (ses_vit_attention.py) does: each head's average attention each key receives.
    [B, d] outputs are cloned so that a following inplace op (ReLU(inplace=True)) can't change them
    before the loss reads them; the pooled means are new tensors already.
    """
    if callable(pool):
        return pool(x)
    if pool == "flatten":
        return x.flatten(1)
    if pool not in ("auto", "mean"):
        raise ValueError(f"unknown pool {pool!r}; use 'auto', 'mean', 'flatten' or a callable")
    if kind == "attn_weights":
        if x.dim() != 4:
            raise ValueError(f"attention weights must be [B, heads, N, N]; got {tuple(x.shape)}")
        return x.mean(dim=2).flatten(1)
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    if x.dim() == 2:
        return x.clone()
    raise ValueError(f"cannot pool an activation of shape {tuple(x.shape)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token states x [B, N, D] averaged over the positions mask [B, N] marks (1: a real token, 0: padding) -> [B, D],
    in float32 (a sum over N half-precision values loses digits)."""
    if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"masked_mean needs x [B, N, D] and mask [B, N]; got {tuple(x.shape)} and {tuple(mask.shape)}")
    m = mask.to(device=x.device, dtype=torch.float32).unsqueeze(-1)
    return (x.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


class MaskedTokenPool:
    """A `pool` for ActivationCollector / SES that mean-pools token sequences [B, N, D] over the real tokens of the
    current batch only (padding excluded): set `.mask` to the batch's attention mask [B, N] before each forward.
    Anything that is not a token sequence is pooled as pool_activation does."""

    def __init__(self):
        self.mask = None

    def __call__(self, x):
        if x.dim() != 3:
            return pool_activation(x)
        if self.mask is None:
            raise ValueError("MaskedTokenPool: set .mask to the batch's attention mask before the forward pass")
        return masked_mean(x, self.mask)


def _model_family(model) -> str:
    cls = type(model).__name__
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return "vit"
    if cls == "WideResNet":
        return "wrn"
    if hasattr(model, "layer4") and hasattr(model, "avgpool"):
        return "resnet"
    if hasattr(model, "hidden") and isinstance(model.hidden, nn.ModuleList):
        return "mlp"
    return "unknown"


_RESIDUAL_BLOCKS = ("BasicBlock", "Bottleneck", "WideBasic", "ErankBasicBlock")
VIT_TARGETS = ("block", "attn_out", "attn_weights")


def select_items(items, spec: str, what: str):
    m = re.fullmatch(r"(first|last)(\d+)", spec)
    if spec == "all":
        return list(items)
    if m:
        n = int(m.group(2))
        if not 1 <= n <= len(items):
            raise ValueError(f"preset {spec!r}: the model has {len(items)} {what}")
        return list(items[:n] if m.group(1) == "first" else items[-n:])
    return None


def hook_targets(model, preset="auto", targets=("block",)):
    """The (name, module, kind) triples SES hooks for a layer preset.

    CNNs (torchvision ResNet, WideResNet): "blocks+pool" (every residual block + avgpool: 9 for
    ResNet-18, 13 for WRN-28-10, 17 for ResNet-50), "layer4+pool" (ResNet-50's Tiny-ImageNet hooks, 4),
    "lastN"/"firstN" (of the blocks+pool list: Exp 9's last 5 / last 3), "pool". auto: ResNet-50
    (Bottleneck) -> layer4+pool, others -> blocks+pool.
    ViTs (the author's SESViT, timm's): "all" (12), "first4", "last4", any firstN/lastN; `targets` picks, per chosen
    block, "block" (block output), "attn_out" (attention sub-layer output, before the residual) and "attn_weights"
    (softmax probabilities [B, heads, N, N]: SESViT's blocks.i.attn_probs, fed when store_attn is set, as the author's
    ses_vit_attention.py; timm's attn.attn_drop input, with non-fused attention; see use_attention_weights).
    Toy MLP: "all" = its 5 hidden layers (after the activation).
    A list of module names (model.named_modules) selects them directly.
    """
    family = _model_family(model)
    if isinstance(preset, (list, tuple)):
        mods = dict(model.named_modules())
        missing = [n for n in preset if n not in mods]
        if missing:
            raise ValueError(f"no module named {missing} in {type(model).__name__}; valid names: {_name_list(mods)}")
        return [(n, mods[n], "attn_weights" if n.endswith(("attn_drop", "attn_probs")) and "attn_weights" in targets
                 else "output") for n in preset]
    if family in ("resnet", "wrn"):
        blocks = [(n, m, "output") for n, m in model.named_modules() if type(m).__name__ in _RESIDUAL_BLOCKS]
        pool = [("avgpool", model.avgpool, "output")]
        bottleneck = any(type(m).__name__ == "Bottleneck" for _, m, _ in blocks)
        if preset == "auto":
            preset = "layer4+pool" if bottleneck else "blocks+pool"
        if preset == "blocks+pool":
            return blocks + pool
        if preset == "layer4+pool" and family == "resnet":
            return [b for b in blocks if b[0].startswith("layer4.")] + pool
        if preset == "pool":
            return pool
        chosen = select_items(blocks + pool, preset, "hook points (blocks + pool)")
        if chosen is not None:
            return chosen
        raise ValueError(f"unknown CNN layer preset {preset!r}; known: blocks+pool, layer4+pool (ResNet), "
                         "pool, firstN, lastN, or a list of module names")
    if family == "vit":
        bad = [t for t in targets if t not in VIT_TARGETS]
        if bad or not targets:
            raise ValueError(f"unknown ViT hook target(s) {bad or targets}; known: {', '.join(VIT_TARGETS)}")
        idx = select_items(list(range(len(model.blocks))), "all" if preset == "auto" else preset, "blocks")
        if idx is None:
            raise ValueError(f"unknown ViT layer preset {preset!r}; known: all, first4, last4, firstN, lastN")
        out = []
        for t in targets:  # grouped by target: the loss is a sum, order only affects logs
            for i in idx:
                blk = model.blocks[i]
                if t == "block":
                    out.append((f"blocks.{i}", blk, "output"))
                elif t == "attn_out":  # timm's Attention returns the tensor, nn.MultiheadAttention (out, weights)
                    out.append((f"blocks.{i}.attn", blk.attn, "output"))
                elif hasattr(blk, "attn_probs"):  # the author's block (SESViT) with store_attn set
                    out.append((f"blocks.{i}.attn_probs", blk.attn_probs, "attn_weights"))
                else:
                    out.append((f"blocks.{i}.attn.attn_drop", blk.attn.attn_drop, "attn_weights"))
        return out
    if family == "mlp":
        items = [(f"hidden.{i}", m, "output") for i, m in enumerate(model.hidden)]
        chosen = select_items(items, "all" if preset in ("auto", "hidden") else preset, "hidden layers")
        if chosen is None:
            raise ValueError(f"unknown MLP layer preset {preset!r}; known: all, firstN, lastN")
        return chosen
    raise ValueError(f"no layer presets for {type(model).__name__}: pass a list of module names, e.g. from "
                     f"{_name_list(dict(model.named_modules()), depth=2)}")


def _name_list(mods, depth=None, limit=40) -> str:
    """Module names for an error message: all of them, or those up to `depth` dots, the first `limit`."""
    names = [n for n in mods if n and (depth is None or n.count(".") < depth)]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def use_attention_weights(model):
    """Make every block's softmax weights [B, heads, N, N] exist where SES hooks them ("attn_weights").

    The author's SESViT: store_attn on (ses_vit_attention.py's flag: the attention is called with need_weights=True,
    average_attn_weights=False and the per-head weights pass through blocks.i.attn_probs); its output is unchanged.
    timm: the non-fused path, since the fused one (F.scaled_dot_product_attention) never materialises the
    probabilities; it is faster and lighter, so only call this when SES hooks attention weights.
    """
    for blk in model.blocks:
        if hasattr(blk, "store_attn"):
            blk.store_attn = True
        else:
            blk.attn.fused_attn = False
    return model


class ActivationCollector:
    """Forward hooks that keep one pooled [B, d] activation per hooked module for the SES loss.

    layers: a preset name (see hook_targets), a list of module names, or (name, module[, kind]) tuples.
    Pooling happens inside the hook (memory stays O(B*d), and inplace ops that follow can't alter it).
    Nothing is stored while a hooked module is in eval mode or inside `with collector.paused():`, so
    evaluation never accumulates activations. Each forward overwrites the previous one (per name).
    """

    def __init__(self, model, layers="auto", pool="auto", targets=("block",)):
        if isinstance(layers, str) or (isinstance(layers, (list, tuple)) and layers and isinstance(layers[0], str)):
            triples = hook_targets(model, layers, targets)
        else:
            triples = [(t[0], t[1], t[2] if len(t) > 2 else "output") for t in layers]
        if not triples:
            raise ValueError("ActivationCollector needs at least one layer to hook")
        self.names = [n for n, _, _ in triples]
        self.kinds = {n: k for n, _, k in triples}
        self.pool = pool
        self.gate = None  # optional callable: the hooks store only while it returns True (periodic SES)
        self._acts: dict = {}
        self._paused = False
        self._handles = []
        for name, module, kind in triples:
            if kind == "attn_weights":
                attn = next((m for m in model.modules() if getattr(m, "attn_drop", None) is module), None)
                if attn is not None and getattr(attn, "fused_attn", False):
                    raise ValueError(
                        f"{name}: timm's fused attention never materialises the attention weights, so this hook "
                        "would never fire. Call seslib.use_attention_weights(model) (or "
                        "timm.layers.set_fused_attn(False) before building the model) first.")
                blk = next((m for m in model.modules() if getattr(m, "attn_probs", None) is module), None)
                if blk is not None and not getattr(blk, "store_attn", True):
                    raise ValueError(f"{name}: the block's store_attn is off, so its attention weights never reach "
                                     "this hook. Call seslib.use_attention_weights(model) first.")
                self._handles.append(module.register_forward_hook(self._make_hook(name, kind, use_input=True)))
            else:
                self._handles.append(module.register_forward_hook(self._make_hook(name, kind)))

    def _make_hook(self, name, kind, use_input=False):
        def hook(module, inputs, output):
            if self._paused or not module.training or (self.gate is not None and not self.gate()):
                return
            x = inputs[0] if use_input else output
            if isinstance(x, (tuple, list)) and x:
                x = x[0]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(x).__name__}, not a tensor SES can pool: hook one of "
                                 "its submodules instead")
            try:
                self._acts[name] = pool_activation(x, kind, self.pool)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from None
        return hook

    @property
    def activations(self) -> list:
        if self._acts and len(self._acts) != len(self.names):
            missing = [n for n in self.names if n not in self._acts]
            raise RuntimeError(f"hooks did not fire for {missing} (timm's fused attention on, or SESViT's store_attn "
                               "off? see use_attention_weights)")
        return [self._acts[n] for n in self.names if n in self._acts]

    @property
    def dims(self) -> list:
        return [a.shape[1] for a in self.activations]

    def clear(self):
        self._acts = {}

    @contextlib.contextmanager
    def paused(self):
        prev, self._paused = self._paused, True
        self.clear()
        try:
            yield self
        finally:
            self._paused = prev

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        return f"ActivationCollector({len(self.names)} hooks: {', '.join(self.names)})"


class SES:
    """Spectral Entropy Shaping on any nn.Module, in your own training loop:

        ses = SES(model, layers="auto", beta=0.7, lam=0.01)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + ses()   # lam * sum_l (H_l - beta log d_l)^2 of this batch
            opt.zero_grad(); loss.backward(); opt.step()

    layers: "auto" (the suite's presets for torchvision ResNets, WideResNet and the ViTs: every residual block
    + avgpool, ResNet-50's layer4 + avgpool, all 12 ViT blocks), a preset name (see hook_targets), or a list of
    module names. every_k: SES on every k-th step only; on the others the hooks store nothing and ses() returns 0.
    schedule: a beta schedule (BetaSchedule.parse spec), applied by ses.set_epoch(epoch, epochs). impl: "suite"
    (batched) or "author" (the author's per-layer computation, for like-for-like timing; SES_IMPLS).
    Hooks store nothing in eval mode or inside `with ses.paused():`. ses.erank() / ses.report(): per-layer effective
    rank, d, target d^beta and their ratio on the last SES batch. train() uses this same object."""

    def __init__(self, model, layers="auto", beta=0.7, lam=0.01, every_k=1, schedule=None, targets=("block",),
                 pool="auto", impl="suite"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"SES needs an nn.Module; got {type(model).__name__}")
        if not is_num(lam) or lam < 0:
            raise ValueError(f"lam must be a number >= 0; got {lam!r}")
        if not is_int(every_k) or every_k < 1:
            raise ValueError(f"every_k must be an int >= 1; got {every_k!r}")
        if impl not in SES_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(SES_IMPLS)}; got {impl!r}")
        self.model, self.beta, self.impl = model, check_beta(beta), impl
        self.lam, self.every_k = float(lam), every_k
        self.schedule = BetaSchedule.parse(schedule) if schedule is not None else None
        if "attn_weights" in targets and hasattr(model, "blocks"):
            use_attention_weights(model)  # SESViT: store_attn on; timm: its fused attention never materialises them
        self.collector = ActivationCollector(model, layers, pool=pool, targets=tuple(targets))
        self.collector.gate = lambda: self.active or self._measuring
        self.step = 0  # ses() calls so far: the optimiser step the next forward belongs to
        self._measuring = False
        self.last_loss = None  # sum_l (H_l - beta log d_l)^2 of the last SES batch (lambda not applied), detached
        self._last = None

    @property
    def names(self) -> list:
        return self.collector.names

    @property
    def active(self) -> bool:
        """Whether SES applies on the current step (every_k); lam = 0 switches it off."""
        return self.lam > 0 and ses_active(self.step, self.every_k)

    def set_epoch(self, epoch, epochs):
        """beta of the schedule for this epoch (no-op without a schedule); returns beta."""
        if self.schedule is not None:
            self.beta = self.schedule.value(epoch, epochs)
        return self.beta

    def __call__(self, gather=None) -> torch.Tensor:
        """lam * sum_l (H_l - beta log d_l)^2 for the batch of the last forward (0 on a step SES skips), and one step
        on. gather: maps the pooled activations before the loss (DDP: gather_activations, the global batch)."""
        active, self.step = self.active, self.step + 1
        acts = self.collector.activations if active else []
        self.collector.clear()
        if not acts:
            self.last_loss = None
            if active:
                raise RuntimeError(f"SES hooks stored nothing for {self.names}: was the forward pass run in train mode "
                                   "(model.train()) before calling ses()?")
            return torch.zeros((), device=next(self.model.parameters(), torch.empty(0)).device)
        acts = gather(acts) if gather is not None else acts
        reg = ses_loss(acts, self.beta, impl=self.impl)
        self.last_loss, self._last = reg.detach(), [a.detach() for a in acts]
        return self.lam * reg

    def erank(self) -> dict:
        """{layer: {erank, d, target, ratio}} of the last batch SES was computed on."""
        if self._last is None:
            raise RuntimeError("no SES batch yet: call ses() after a training forward pass first")
        return erank_stats(self._last, self.names, self.beta)

    def report(self):
        """erank() as a table (pandas), one row per hooked layer."""
        import pandas as pd
        return pd.DataFrame(self.erank()).T.rename_axis("layer")

    @contextlib.contextmanager
    def measuring(self):
        """Let the hooks store on any step (e.g. to measure erank on a fixed batch), whatever every_k says."""
        prev, self._measuring = self._measuring, True
        try:
            yield self.collector
        finally:
            self._measuring = prev

    def paused(self):
        return self.collector.paused()

    def remove(self):
        self.collector.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"SES(beta={self.beta:g}, lam={self.lam:g}, every_k={self.every_k}, {len(self.names)} layers: "
                f"{', '.join(self.names)})")


def pooled_activations(model, layers, x, batch_size=512, amp_dtype=None):
    """{layer name: pooled [N, d] float32 activations (CPU)} of `model` on the normalised images x, in the model's
    current mode, through temporary hooks (any mode: ActivationCollector stores only in train mode by design).
    layers: (name, kind) pairs, as ActivationCollector.names / .kinds."""
    modules = dict(model.named_modules())
    out = {name: [] for name, _ in layers}
    handles = []
    for name, kind in layers:
        def hook(module, inputs, output, name=name, kind=kind):
            t = inputs[0] if kind == "attn_weights" else output
            t = t[0] if isinstance(t, (tuple, list)) else t
            out[name].append(pool_activation(t, kind).float().cpu())
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                with autocast(x.device, amp_dtype):
                    model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}
