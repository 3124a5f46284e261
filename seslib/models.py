"""Models: ResNet-18/50, WRN-28-10, the author's ViT and timm's, the toy MLP, the author's Exp 28 ResNet-18; BERT's
shapes, the smoke BERT and the encoder layers SES hooks."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .ses import is_int, is_real, select_items
from .data import SYNTHETIC_VOCAB


MODELS = ("resnet18", "resnet18_erank", "resnet50", "wrn28_10", "vit_tiny", "vit_small", "vit_tiny_timm",
          "vit_small_timm", "mlp_toy")
CNN_MODELS = ("resnet18", "resnet18_erank", "resnet50", "wrn28_10")
TINY_BERT = "bert-tiny-random"  # Exp 22's smoke model: a small BERT, randomly initialised, no download (text room)
VIT_MODELS = ("vit_tiny", "vit_small", "vit_tiny_timm", "vit_small_timm")  # all train with the ViT recipe
TIMM_VIT_MODELS = ("vit_tiny_timm", "vit_small_timm")  # timm's VisionTransformer; the others are the author's (SESViT)


class WideBasic(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv x2) as in the SES reference WRN (stride on conv2, 1x1 shortcut)."""

    def __init__(self, in_planes, planes, stride=1, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR (Zagoruyko & Komodakis): 3 stages of (depth-4)/6 WideBasic blocks, 16/16k/32k/64k."""

    def __init__(self, depth=28, widen_factor=10, num_classes=100, dropout=0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4; got {depth}")
        n, k = (depth - 4) // 6, widen_factor
        widths = [16, round(16 * k), round(32 * k), round(64 * k)]  # k may be fractional (a narrowed smoke model)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._stage(widths[2], widths[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(cin, cout, n, stride, dropout):
        return nn.Sequential(*[WideBasic(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                               for i in range(n)])

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.avgpool(F.relu(self.bn1(x)))  # a real module call: SES hooks it ("blocks+pool")
        return self.fc(torch.flatten(x, 1))


class ToyMLP(nn.Module):
    """The toy 2-D study's MLP: `depth` hidden layers of `width` units, each Linear + activation, then a head.
    The paper only says "5-layer MLP (16 hidden neurons per layer)"; tanh (smooth, so the input Jacobian
    and its condition number are well defined everywhere) is our choice, selectable."""

    ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

    def __init__(self, in_dim=2, num_classes=3, width=16, depth=5, activation="tanh"):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(self.ACTIVATIONS)}")
        act = self.ACTIVATIONS[activation]
        self.hidden = nn.ModuleList(nn.Sequential(nn.Linear(in_dim if i == 0 else width, width), act())
                                    for i in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.head(x)


class _NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every stage's planes scaled by `width` (64·w, 128·w, ...): same modules and names,
    so the hook presets and checkpoint keys are those of the full model. For the smoke preset and quick looks."""

    def __init__(self, block, layers, num_classes, width):
        self._scale, self._stages = width, 0
        super().__init__(block, layers, num_classes=num_classes)
        w = self.inplanes_first
        self.bn1 = nn.BatchNorm2d(w)
        self.fc = nn.Linear(round(512 * width) * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if self._stages == 0:  # the stem's output width feeds the first stage
            self.inplanes = self.inplanes_first = round(64 * self._scale)
        self._stages += 1
        return super()._make_layer(block, round(planes * self._scale), blocks, stride, dilate)


def _cifar_resnet(name, num_classes, width=1.0):
    if width == 1.0:
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    else:
        block, layers = {"resnet18": (torchvision.models.resnet.BasicBlock, [2, 2, 2, 2]),
                         "resnet50": (torchvision.models.resnet.Bottleneck, [3, 4, 6, 3])}[name]
        model = _NarrowResNet(block, layers, num_classes, width)
    model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)  # CIFAR stem
    model.maxpool = nn.Identity()
    return model


# ── the ResNet-18 of ses_erank_dynamics.py (Exp 28), ported (akira-n-28/Spectral-Entropy-Shaping@4abfcca) ──
# The common CIFAR ResNet-18 (3x3 stem, no max-pool, 1x1 conv + BN shortcut): the same layers and parameter count
# (11.22 M at 100 classes) as 'resnet18', but PyTorch's default init everywhere (kaiming-uniform a=sqrt(5): conv weight
# SD 0.024 in layer1, where torchvision's kaiming-normal fan-out gives 0.059) and the shortcut named `shortcut`. Same
# modules, names and construction order as the author's, so under the same seed it builds the author's weights
# (tests/test_author_resnet.py against tests/fixtures/author_resnet18_erank.json).
class ErankBasicBlock(nn.Module):
    """ses_erank_dynamics.py's BasicBlock: conv-BN-ReLU, conv-BN, + shortcut (identity, or 1x1 conv + BN), ReLU."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ErankResNet18(nn.Module):
    """ses_erank_dynamics.py's ResNet18 (build_model 'resnet18_erank'); width scales every stage (smoke preset)."""

    def __init__(self, num_classes=100, width=1.0):
        super().__init__()
        w = [round(c * width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, w[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layer1 = self._make_layer(w[0], w[0], 1)
        self.layer2 = self._make_layer(w[0], w[1], 2)
        self.layer3 = self._make_layer(w[1], w[2], 2)
        self.layer4 = self._make_layer(w[2], w[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    @staticmethod
    def _make_layer(in_p, out_p, stride):
        return nn.Sequential(ErankBasicBlock(in_p, out_p, stride), ErankBasicBlock(out_p, out_p, 1))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ── the author's ViT, ported from ses_vit_experiment.py (akira-n-28/Spectral-Entropy-Shaping@4abfcca; the same classes
# in ses_vit_ablations.py, ses_vit_augmentation.py, and ses_vit_attention.py with its store_attn flag) ──
# Same modules, names, construction order and init, so under the same seed it builds the author's weights bit for bit
# (tests/test_author_vit.py against tests/fixtures/author_vit.json, recorded from the script run as written):
# nn.MultiheadAttention (its own xavier-uniform in-projection, zero in-proj bias), trunc-normal(0.02) Linear weights
# (the out-projection included) with zero bias, cls token and pos embed trunc-normal(0.02), PyTorch's default Conv2d
# init for the patch projection, LayerNorm eps 1e-5, the author's per-sample drop path (torch.bernoulli mask).
class AuthorPatchEmbed(nn.Module):
    """ses_vit_experiment.py's PatchEmbedding: a patch x patch convolution of stride patch, as tokens [B, N, D]."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=384):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_size = (patch_size, patch_size)  # as timm's PatchEmbed says it
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class SESViTBlock(nn.Module):
    """The author's TransformerBlock: pre-norm, nn.MultiheadAttention (batch_first), GELU MLP, drop path per sample.
    store_attn (ses_vit_attention.py's flag; use_attention_weights sets it): the attention is called with
    need_weights=True, average_attn_weights=False and its per-head probabilities [B, heads, N, N] pass through
    self.attn_probs (an Identity: what SES's "attn_weights" target hooks). Otherwise the author's plain call, whose
    need_weights defaults to True as well: the same explicit-softmax path, so the block's output is the same either way."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop=0.0, drop_path=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=drop, batch_first=True)
        self.attn_probs = nn.Identity()  # no parameters: the state dict is the author's
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))
        self.drop_path_rate = drop_path
        self.store_attn = False

    def _drop_path(self, x):
        if self.drop_path_rate == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_path_rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.bernoulli(torch.full(shape, keep_prob, device=x.device, dtype=x.dtype))
        return x * mask / keep_prob

    def forward(self, x):
        normed = self.norm1(x)
        if self.store_attn:
            attn_out, probs = self.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
            self.attn_probs(probs)
        else:
            attn_out, _ = self.attn(normed, normed, normed)
        x = x + self._drop_path(attn_out)
        return x + self._drop_path(self.mlp(self.norm2(x)))


class SESViT(nn.Module):
    """The author's VisionTransformer for CIFAR-sized images: patch embedding, CLS token + learned positions, `depth`
    SESViTBlocks with stochastic depth linear in 0..drop_path_rate (torch.linspace, as the author), final LayerNorm,
    linear head on the CLS token. ViT-Tiny/4: 192 dim, 3 heads (5.38 M); ViT-Small/4: 384 dim, 6 heads (21.38 M)."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, num_classes=100, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1):
        super().__init__()
        self.embed_dim, self.depth = embed_dim, depth
        self.patch_embed = AuthorPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also when built on meta
        self.blocks = nn.ModuleList([SESViTBlock(embed_dim, num_heads, mlp_ratio, drop_rate, dpr[i])
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_drop_path(self, rate):
        """Stochastic depth at max rate `rate`, spaced over the blocks as the author's constructor does."""
        for blk, p in zip(self.blocks, torch.linspace(0, rate, len(self.blocks), device="cpu").tolist()):
            blk.drop_path_rate = p

    def forward(self, x):
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch_embed(x)], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _vit(name, num_classes, img_size, width=1.0):
    """vit_tiny / vit_small: the author's SESViT; vit_tiny_timm / vit_small_timm: timm's VisionTransformer with the same
    shape (patch 4, depth 12, mlp 4x, qkv bias, no dropout, stochastic depth 0.1, CLS-token head) and parameter count,
    but timm's init (qkv trunc-normal 0.02, cls token 1e-6) and LayerNorm eps 1e-6. width narrows the embed dim, same heads."""
    if img_size % 4:
        raise ValueError(f"ViT patch size 4 needs img_size divisible by 4; got {img_size}")
    dim, heads = {"vit_tiny": (192, 3), "vit_small": (384, 6)}[name.removesuffix("_timm")]
    dim = max(1, round(dim * width / heads)) * heads  # narrowed: the same heads, narrower each
    if name not in TIMM_VIT_MODELS:
        return SESViT(img_size=img_size, patch_size=4, num_classes=num_classes, embed_dim=dim, depth=12,
                      num_heads=heads, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1)
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=4, num_classes=num_classes, embed_dim=dim, depth=12,
                             num_heads=heads, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, drop_path_rate=0.1,
                             global_pool="token")


def vit_impl(model_name):
    """The resolved config's vit_impl: 'author' (SESViT) or 'timm' for a ViT model name, None for any other model."""
    return None if model_name not in VIT_MODELS else "timm" if model_name in TIMM_VIT_MODELS else "author"


def _apply_spectral_norm(model):
    from torch.nn.utils.parametrizations import spectral_norm as sn
    for m in [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))]:
        if isinstance(m, nn.MultiheadAttention):  # its stacked q, k, v projection: as timm's qkv Linear
            sn(m, name="in_proj_weight")
        else:
            sn(m)
    return model


def build_model(name, num_classes, img_size=32, spectral_norm=False, width=1.0):
    """resnet18 | resnet50 (torchvision, CIFAR stem) | resnet18_erank (ses_erank_dynamics.py's CIFAR ResNet-18,
    PyTorch's default init: ErankResNet18) | wrn28_10 | vit_tiny | vit_small (the author's ViT/4: SESViT) | vit_tiny_timm |
    vit_small_timm (timm's VisionTransformer, same shape, timm's init) | mlp_toy.
    spectral_norm=True wraps every Conv2d and Linear (and an nn.MultiheadAttention's in-projection) in
    torch.nn.utils.parametrizations.spectral_norm.
    width in (0, 1]: every channel width (ResNets: 64·w ... 512·w; WRN: widen factor 10·w; ViTs: embed dim) scaled,
    same depth, modules and hook points: the smoke preset's narrow models (width=1 is the published model)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if not is_int(num_classes) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    if not is_real(width) or not 0 < width <= 1:
        raise ValueError(f"width must be a number in (0, 1] (1: the published model); got {width!r}")
    if name in ("resnet18", "resnet50"):
        model = _cifar_resnet(name, num_classes, width)
    elif name == "resnet18_erank":
        model = ErankResNet18(num_classes, width)
    elif name == "wrn28_10":
        model = WideResNet(depth=28, widen_factor=10 * width, num_classes=num_classes)
    elif name in VIT_MODELS:
        model = _vit(name, num_classes, img_size, width)
    else:
        model = ToyMLP(num_classes=num_classes)
    return _apply_spectral_norm(model) if spectral_norm else model


def count_params(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ── BERT (Exp 22): the smoke model and tokenizer, and the encoder layers SES hooks ──

def tiny_tokenizer(words=SYNTHETIC_VOCAB):
    """A word-level BERT-style tokenizer over `words` built in memory (no download): lower-cased, whitespace split,
    [CLS] a [SEP] (b [SEP]), [UNK] for any other word; a transformers tokenizer, called as bert-base-uncased's is."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def tiny_bert(vocab_size, max_len=128, num_labels=2):
    """TINY_BERT: BertForSequenceClassification with 6 layers of width 64 (2 heads), randomly initialised (the global
    torch RNG: seed first). Six layers, so SES on the last 4 and on all of them hook different layers."""
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=6, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=max(64, max_len), num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def bert_hook_targets(model, preset="all"):
    """The (name, module, "output") triples of a BERT's encoder layers for SES: "all", "lastN", "firstN" (their output
    is the hidden states [B, N, D]; transformers 4 returns them as output[0], 5 as the tensor)."""
    prefix = getattr(model, "base_model_prefix", "bert")
    layers = list(getattr(model, prefix).encoder.layer)
    idx = select_items(list(range(len(layers))), preset, "encoder layers")
    if idx is None:
        raise ValueError(f"unknown encoder layer preset {preset!r}; known: all, lastN, firstN")
    return [(f"{prefix}.encoder.layer.{i}", layers[i], "output") for i in idx]


def text_skeleton(c):
    """An Exp 22 config's model on the meta device (shapes only: no memory, no download, no init work), or None for a
    model other than bert-base-uncased (the default BertConfig: its config.json's values) and TINY_BERT."""
    from transformers import BertConfig, BertForSequenceClassification
    if c.get("model") not in ("bert-base-uncased", TINY_BERT):
        return None
    with torch.device("meta"):
        return (tiny_bert(len(SYNTHETIC_VOCAB) + 5, c.get("max_len", 128)) if c["model"] == TINY_BERT else
                BertForSequenceClassification(BertConfig(num_labels=2)))


def text_model_bytes(c) -> int | None:
    """The float32 weights of a resolved Exp 22 config's model (model_final.pt; checkpoint.pt holds 3x: AdamW's two
    moments), counted on meta tensors; None where text_skeleton does not know the model."""
    m = text_skeleton(c)
    return None if m is None else 4 * sum(p.numel() for p in m.parameters())


NO_DECAY = ("bias", "LayerNorm.weight")  # the author's parameter names without weight decay


def text_param_groups(model, weight_decay) -> list:
    """The author's two AdamW groups: weight decay on all but NO_DECAY's parameters."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(k in n for k in NO_DECAY)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(k in n for k in NO_DECAY)], "weight_decay": 0.0}]
