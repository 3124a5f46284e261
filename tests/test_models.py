"""Models: parameter counts (against the paper and a closed-form ViT count), the CIFAR stem, the structure
the SES layer presets rely on, forward shapes at 32 and 64 px, spectral norm, unknown names."""
import pytest
import torch
import torch.nn as nn

import seslib as S


def vit_params(dim, depth, classes, img, patch=4, mlp=4):
    """Closed-form parameter count of a ViT (qkv bias, CLS token, learned pos-embed, final LN, linear head)."""
    tokens = (img // patch) ** 2 + 1
    block = (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * (dim * mlp * dim) + mlp * dim + dim + 4 * dim
    return (3 * patch * patch * dim + dim) + tokens * dim + dim + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("name,classes,img,millions", [
    ("resnet18", 100, 32, 11.2),   # the paper's "11M" ResNet-18 (CIFAR stem, 100 classes)
    ("resnet18", 10, 32, 11.2),
    ("resnet50", 200, 64, 23.9),   # Tiny-ImageNet ResNet-50 ("25M" in the paper's prose)
    ("wrn28_10", 100, 32, 36.5),   # the paper's 36.5M
    ("vit_tiny", 100, 32, 5.4),    # "5.5M" in the paper's table, ~5.4M
])
def test_parameter_counts(name, classes, img, millions):
    assert round(S.count_params(S.build_model(name, classes, img)) / 1e6, 1) == millions


@pytest.mark.parametrize("name,dim,img", [("vit_tiny", 192, 32), ("vit_small", 384, 32), ("vit_small", 384, 64),
                                          ("vit_tiny_timm", 192, 32), ("vit_small_timm", 384, 32)])
def test_vit_counts_match_the_closed_form(name, dim, img):
    model = S.build_model(name, 100, img)
    assert S.count_params(model) == vit_params(dim, 12, 100, img)
    # ViT-S/4 at 32 px: 21.38M (the paper rounds to "22M")
    if name.startswith("vit_small") and img == 32:
        assert round(S.count_params(model) / 1e6, 2) == 21.38


def test_cifar_stem_and_presets_structure():
    r18 = S.build_model("resnet18", 100)
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and r18.conv1.padding == (1, 1)
    assert isinstance(r18.maxpool, nn.Identity) and isinstance(r18.avgpool, nn.AdaptiveAvgPool2d)
    assert len(S.hook_targets(r18)) == 9
    wrn = S.build_model("wrn28_10", 100)
    assert type(wrn).__name__ == "WideResNet"
    assert sum(type(m).__name__ == "WideBasic" for m in wrn.modules()) == 12
    assert len(S.hook_targets(wrn)) == 13
    assert len(S.hook_targets(S.build_model("resnet50", 200, 64))) == 4  # layer4 + pool (auto)
    vit = S.build_model("vit_small", 100)
    assert len(vit.blocks) == 12 and vit.patch_embed.patch_size == (4, 4) and vit.patch_embed.num_patches == 64
    assert S.build_model("vit_tiny", 200, 64).patch_embed.num_patches == 256
    assert len(S.hook_targets(vit)) == 12
    toy = S.build_model("mlp_toy", 3)
    assert type(toy).__name__ == "ToyMLP" and len(toy.hidden) == 5
    assert all(isinstance(h, nn.Sequential) and h[0].out_features == 16 for h in toy.hidden)
    assert toy.hidden[0][0].in_features == 2 and toy.head.in_features == 16 and toy.head.out_features == 3


def test_wrn_avgpool_is_really_called_and_feeds_the_head():
    torch.manual_seed(0)
    wrn = S.build_model("wrn28_10", 10).eval()
    seen = []
    wrn.avgpool.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        out = wrn(torch.randn(2, 3, 32, 32))
    assert seen == [(2, 640, 1, 1)] and out.shape == (2, 10)


@pytest.mark.parametrize("name,img", [("resnet18", 32), ("resnet50", 64), ("vit_tiny", 32), ("vit_tiny", 64)])
def test_forward_shapes(name, img):
    model = S.build_model(name, 7, img).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, img, img)).shape == (2, 7)


def test_toy_mlp_forward():
    assert S.build_model("mlp_toy", 3)(torch.randn(5, 2)).shape == (5, 3)


def test_spectral_norm_wraps_every_conv_and_linear():
    model = S.build_model("resnet18", 10, spectral_norm=True)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 21 and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    assert S.count_params(model) == S.count_params(S.build_model("resnet18", 10))
    # after power iterations in train mode, the normalised fc weight has spectral norm ~1
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(torch.randn(4, 3, 32, 32))
    model.eval()
    assert torch.linalg.matrix_norm(model.fc.weight, ord=2).item() == pytest.approx(1.0, rel=1e-2)
    vit = S.build_model("vit_tiny", 10, spectral_norm=True)
    assert all(torch.nn.utils.parametrize.is_parametrized(m, "weight")
               for m in vit.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18, resnet18_erank, resnet50, wrn28_10, vit_tiny, vit_small, vit_tiny_timm, "
                                         "vit_small_timm, mlp_toy"):
        S.build_model("resnet34", 10)
    with pytest.raises(ValueError, match="num_classes"):
        S.build_model("resnet18", 1)
