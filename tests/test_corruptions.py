"""Corruptions: the CIFAR-C / Tiny-ImageNet-C protocol in torch, checked against what Hendrycks' original generators
produced when run as written (tests/fixtures/corruptions/, see the block comment below) and against independent
NumPy/PIL/SciPy/scikit-image re-implementations of make_cifar_c.py's formulas written here (none calls seslib)."""
import importlib.util
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import seslib as S

ALL = S.CORRUPTIONS + S.EXTRA_CORRUPTIONS
# frost reads the texture photos shipped by the imagecorruptions package (requirements.txt)
HAVE_FROST = importlib.util.find_spec("imagecorruptions") is not None


@pytest.fixture(scope="module")
def cifar(data_root):
    """The first 200 real CIFAR-10 test images (uint8 [N, 3, 32, 32]) and labels, read from the pickle."""
    with open(data_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = np.asarray(d["data"][:200], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(x), torch.tensor(d["labels"][:200])


def _hwc(x):  # torch [N, 3, H, W] -> list of numpy HxWx3 uint8
    return [im.permute(1, 2, 0).numpy() for im in x]


# ─── API contract ───────────────────────────────────────────────────────────────────────────────
def test_names():
    assert len(S.CORRUPTIONS) == 15 and len(S.EXTRA_CORRUPTIONS) == 4 and len(set(ALL)) == 19
    sets = S.CORRUPTION_SETS  # the one definition of the set names: evaluations and run configs take the same
    assert dict(sets) == {"all15": S.CORRUPTIONS, "extra": S.EXTRA_CORRUPTIONS, "all19": ALL, "paper5": sets["paper5"]}
    assert set(sets["paper5"]) == {"gaussian_noise", "gaussian_blur", "contrast", "brightness", "shot_noise"}
    assert S.PAPER5 == sets["paper5"] and S.ROBUSTNESS_PRESETS == tuple(sets)  # the old name still works
    for name, names in sets.items():
        assert S.resolve_corruptions(name) == list(names)
    with pytest.raises(TypeError):
        sets["mine"] = ("fog",)  # read-only: a notebook cannot change what "all15" means for later runs


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_device_and_seed(name):
    if name == "frost" and not HAVE_FROST:
        pytest.skip("imagecorruptions (frost textures) not installed")
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = S.corrupt(x, name, 3, generator=torch.Generator().manual_seed(7))
    b = S.corrupt(x, name, 3, generator=torch.Generator().manual_seed(7))
    assert a.shape == x.shape and a.dtype == torch.uint8 and a.device == x.device
    assert torch.equal(a, b)
    y = S.corrupt(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), name, 5,
                  generator=torch.Generator().manual_seed(0))
    assert y.shape == (2, 3, 64, 64) and y.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_cuda_device_kept(name):
    if name == "frost" and not HAVE_FROST:
        pytest.skip("imagecorruptions (frost textures) not installed")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    y = S.corrupt(x, name, 2, generator=g)
    assert y.device == x.device and y.dtype == torch.uint8 and y.shape == x.shape


def test_bad_input_rejected():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    for sev in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="1..5"):
            S.corrupt(x, "contrast", sev)
    with pytest.raises(ValueError, match="gaussian_noise"):  # lists the valid names
        S.corrupt(x, "fish_eye", 1)
    with pytest.raises(ValueError, match="params"):
        S.corrupt(torch.zeros(1, 3, 40, 40, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(ValueError, match="uint8"):
        S.corrupt(x.float(), "contrast", 1)
    out = S.corrupt(torch.full((1, 3, 40, 40), 200, dtype=torch.uint8), "contrast", 1, params=0.5)
    assert out.shape == (1, 3, 40, 40)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(ValueError, match="1..5"):
        S.evaluate_corruptions(model, x, torch.zeros(2), severities=(0, 1))
    with pytest.raises(ValueError, match="unknown corruption"):
        S.evaluate_corruptions(model, x, torch.zeros(2), corruptions=["blur"])


# ─── severity ordering on real images ───────────────────────────────────────────────────────────
# The mean |corrupted - clean| rises with severity where the generator's parameters grow monotonically.
# Where they don't, the expected order follows from the parameters themselves:
#   motion_blur 3 vs 4: radius 6 vs 8 at sigma 2; ImageMagick's one-sided Gaussian is ~0 past 6 px, so a tie.
#   glass_blur: one shuffle pass at sigma .05 / .25 / .4 (1-3) moves the image about equally far (more blur, but it
#     also smooths the copied pixels back), two passes (4, 5) clearly further: the original run as written gives
#     11.6, 11.7, 11.6, 18.7, 18.0 (tests/fixtures/corruptions/mac_32.json).
#   frost: (scale of x, weight of frost) = (1,.2) (1,.3) (.9,.4) (.85,.4) (.75,.45): 4 and 5 darken x while
#     frost brightens it, so only 1 < 2 < 3 and 3 > 4 hold.
#   elastic_transform: the affine jitter shrinks (2.56 -> 0.96 px) while the elastic field grows.
#   saturate: factors .3, .1 (desaturate), 1.5, 2, 2.5 (+0.1, +0.2): 1 < 2, 3 < 4 < 5, 3 < 2.
#   spatter: 1-3 are water (stronger with the noise sigma), 4-5 mud (5 has more blur, fewer blobs).
SPECIAL = {
    "motion_blur": [(1, 2), (2, 3), (4, 5), ("tie", 3, 4)],
    "glass_blur": [("tie", 1, 2), ("tie", 2, 3), (3, 4), (3, 5)],
    "frost": [(1, 2), (2, 3), (4, 3)],
    "elastic_transform": [(5, 4), (4, 3), (3, 2), (2, 1)],
    "saturate": [(1, 2), (3, 4), (4, 5), (3, 2)],
    "spatter": [(1, 2), (2, 3)],
}


def test_distance_rises_with_severity(cifar):
    x, _ = cifar
    for name in ALL:
        if name == "frost" and not HAVE_FROST:
            continue
        g = torch.Generator().manual_seed(0)
        d = {s: (S.corrupt(x, name, s, generator=g).float() - x.float()).abs().mean().item() for s in range(1, 6)}
        for pair in SPECIAL.get(name, [(s, s + 1) for s in range(1, 5)]):
            if pair[0] == "tie":
                assert abs(d[pair[1]] - d[pair[2]]) < 0.05 * d[pair[1]], (name, d)
            else:
                assert d[pair[0]] < d[pair[1]], (name, d)


# ─── fidelity: independent implementations of make_cifar_c.py ───────────────────────────────────
def ref_contrast(x, c):
    x = x / 255.
    m = x.mean(axis=(0, 1), keepdims=True)
    return np.clip((x - m) * c + m, 0, 1) * 255


def ref_brightness(x, c):
    from skimage.color import hsv2rgb, rgb2hsv
    h = rgb2hsv(x / 255.)
    h[:, :, 2] = np.clip(h[:, :, 2] + c, 0, 1)
    return np.clip(hsv2rgb(h), 0, 1) * 255


def ref_saturate(x, c):
    from skimage.color import hsv2rgb, rgb2hsv
    h = rgb2hsv(x / 255.)
    h[:, :, 1] = np.clip(h[:, :, 1] * c[0] + c[1], 0, 1)
    return np.clip(hsv2rgb(h), 0, 1) * 255


def ref_pixelate(x, c):
    im = Image.fromarray(x).resize((int(32 * c), int(32 * c)), Image.BOX)
    return np.asarray(im.resize((32, 32), Image.BOX))


def ref_jpeg_compression(x, c):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=c)
    return np.asarray(Image.open(buf))


def ref_gaussian_blur(x, c):
    from skimage.filters import gaussian
    return np.clip(gaussian(x / 255., sigma=c, channel_axis=-1), 0, 1) * 255


def ref_defocus_blur(x, c):
    from scipy.ndimage import correlate
    radius, alias_blur = c
    L = np.arange(-8, 8 + 1)
    X, Y = np.meshgrid(L, L)
    disk = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.float32)
    disk /= disk.sum()
    k = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    k /= k.sum()  # cv2.GaussianBlur(ksize=(3, 3), sigmaX=alias_blur), border reflect-101 = scipy 'mirror'
    disk = correlate(disk, np.outer(k, k), mode="mirror")
    x = x / 255.
    out = np.stack([correlate(x[:, :, d], disk, mode="mirror") for d in range(3)], -1)  # cv2.filter2D
    return np.clip(out, 0, 1) * 255


def ref_zoom_blur(x, c):
    from scipy.ndimage import zoom

    def clipped_zoom(img, z):
        h = img.shape[0]
        ch = int(np.ceil(h / z))
        top = (h - ch) // 2
        img = zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        t = (img.shape[0] - h) // 2
        return img[t:t + h, t:t + h]
    x = (x / 255.).astype(np.float32)
    out = np.zeros_like(x)
    for z in c:
        out += clipped_zoom(x, z)
    return np.clip((x + out) / (len(c) + 1), 0, 1) * 255


ZOOMS = [np.arange(1, e, 0.01) for e in (1.06, 1.11, 1.16, 1.21, 1.26)]
FIDELITY = {  # name -> (reference, the make_cifar_c.py parameters per severity, typed in again here)
    "contrast": (ref_contrast, [.75, .5, .4, .3, 0.15]),
    "brightness": (ref_brightness, [.05, .1, .15, .2, .3]),
    "saturate": (ref_saturate, [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)]),
    "pixelate": (ref_pixelate, [0.95, 0.9, 0.85, 0.75, 0.65]),
    "jpeg_compression": (ref_jpeg_compression, [80, 65, 58, 50, 40]),
    "defocus_blur": (ref_defocus_blur, [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)]),
    "zoom_blur": (ref_zoom_blur, ZOOMS),
    "gaussian_blur": (ref_gaussian_blur, [.4, .6, 0.7, .8, 1]),
}


@pytest.mark.parametrize("name", list(FIDELITY))
def test_matches_make_cifar_c(cifar, name):
    pytest.importorskip("skimage")
    pytest.importorskip("scipy")
    x = cifar[0][:64]
    ref, params = FIDELITY[name]
    for sev in range(1, 6):
        ours = S.corrupt(x, name, sev).permute(0, 2, 3, 1).numpy().astype(np.float64)
        theirs = np.stack([np.uint8(ref(im, params[sev - 1])) for im in _hwc(x)]).astype(np.float64)
        mad = np.abs(ours - theirs).mean()
        assert mad <= 1.0, (name, sev, mad)
        if name not in ("jpeg_compression",):  # same formula: nearly every pixel identical
            assert (ours == theirs).mean() > 0.95, (name, sev, (ours == theirs).mean())


def _mid(x, lo, hi):
    return (x >= lo) & (x <= hi)


@pytest.mark.parametrize("sev", [1, 3, 5])
def test_noise_statistics(cifar, sev):
    x = cifar[0]
    xf = x.double()
    g = torch.Generator().manual_seed(sev)
    # gaussian: y = x + N(0, c) (in [0, 1] units) away from the clip
    c = S.corruption_params("gaussian_noise", sev, 32)
    y = S.corrupt(x, "gaussian_noise", sev, generator=g).double()
    m = _mid(xf, 0.35 * 255, 0.65 * 255)
    assert abs(((y - xf)[m] / 255).std().item() / c - 1) < 0.05
    # shot: Poisson(x c) / c has variance x / c
    c = S.corruption_params("shot_noise", sev, 32)
    y = S.corrupt(x, "shot_noise", sev, generator=g).double()
    m = _mid(xf, 0.2 * 255, 0.6 * 255)
    ratio = (((y - xf) / 255) ** 2)[m].mean() / (xf[m] / 255 / c).mean()
    assert abs(ratio.item() - 1) < 0.05
    # speckle: y = x (1 + N(0, c))
    c = S.corruption_params("speckle_noise", sev, 32)
    y = S.corrupt(x, "speckle_noise", sev, generator=g).double()
    m = _mid(xf, 60, 150)
    assert abs(((y - xf)[m] / xf[m]).std().item() / c - 1) < 0.05
    # impulse: a fraction c of the values set to 0 or 255, half each
    c = S.corruption_params("impulse_noise", sev, 32)
    y = S.corrupt(x, "impulse_noise", sev, generator=g)
    m = _mid(xf, 1, 254)
    salt, pepper = ((y == 255) & m).sum().item() / m.sum().item(), ((y == 0) & m).sum().item() / m.sum().item()
    assert abs((salt + pepper) / c - 1) < 0.05 and abs(salt / pepper - 1) < 0.15


# ─── against the original generators, run as written ───────────────────────────────────────────
# tests/fixtures/corruptions/ holds what hendrycks/robustness@8190fe3 (make_cifar_c.py, make_tinyimagenet_c.py)
# produced when its distortion functions were run unchanged (their source exec'd as is; scikit-image 0.19.3, NumPy
# 1.24, OpenCV 4.8, ImageMagick 6.9.11-60 Q16 through Wand) in a scratch folder outside this project, on the shared
# real images, and stored as each generator stores: CIFAR np.uint8, Tiny-ImageNet JPEG quality 85.
#   glass_{32,64}.npz: clean images, the (dx, dy) draws glass_blur made (np.random.randint, recorded), its output
#   motion_imagemagick.npz: ImageMagick's MotionBlurImage output (PNG in, 8-bit PNG out) and the angles used
#   mac_{32,64}.json: mean |stored - clean| per corruption and severity over the first 64 CIFAR-10 test / 48
#     Tiny-ImageNet val images, with the original's own random draws
FIX = Path(__file__).parent / "fixtures" / "corruptions"


@pytest.mark.parametrize("size", [32, 64])
def test_glass_blur_reproduces_the_original_loop_with_its_own_draws(size):
    """The original's "swap" on NumPy views is a one-way copy x[h, w] <- x[h+dy, w+dx]. With the draws it made, our
    batched wavefront gives its stored images (float32 vs float64 blurs flip a few truncations by one level; the
    64-px JPEG-85 spreads those inside an 8x8 block). A true two-way swap would be far off (checked below)."""
    f = np.load(FIX / f"glass_{size}.npz")
    x = torch.from_numpy(f["clean"]).permute(0, 3, 1, 2).contiguous()
    for sev in range(1, 6):
        c = S.corruption_params("glass_blur", sev, size)
        draws = f[f"draws_{sev}"]
        per_pass = draws.shape[1] // c[2]
        ours = S.corruptions._glass_blur(x, c, None, offsets=[draws[:, k * per_pass:(k + 1) * per_pass] for k in range(c[2])])
        if size == 64:
            ours = S.corruptions._jpeg_compression(ours, S.TINY_C_JPEG_QUALITY, None)
        ours, theirs = ours.permute(0, 2, 3, 1).numpy().astype(int), f[f"out_{sev}"].astype(int)
        assert (ours == theirs).mean() >= 0.97 and np.abs(ours - theirs).mean() <= 0.03, (size, sev)
    # the fixture tells a swap from a copy: the literal loop with .copy() (a true swap) on the same draws
    im, c = f["clean"][0].copy(), S.corruption_params("glass_blur", 1, size)
    _, d, _ = c
    blurred = S.corruptions._gaussian(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, c[0])
    im = (blurred.clamp(0, 1) * 255).to(torch.uint8)[0].permute(1, 2, 0).numpy().copy()
    j = 0
    for h in range(size - d, d, -1):
        for w in range(size - d, d, -1):
            dx, dy = f["draws_1"][0, j]
            j += 1
            im[h, w], im[h + dy, w + dx] = im[h + dy, w + dx].copy(), im[h, w].copy()
    swapped = np.uint8(np.clip(S.corruptions._gaussian(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, c[0]), 0, 1)
                       .mul(255).to(torch.uint8)[0].permute(1, 2, 0).numpy())
    if size == 64:
        swapped = S.corruptions._jpeg_compression(torch.from_numpy(swapped).permute(2, 0, 1)[None].contiguous(), 85, None)[0] \
            .permute(1, 2, 0).numpy()
    assert np.abs(swapped.astype(int) - f["out_1"][0].astype(int)).mean() > 1.0


@pytest.mark.parametrize("size", ["32", "64"])
def test_motion_blur_equals_imagemagick_output(size):
    """ImageMagick's kernel in torch, and its 8-bit output: the 16-bit quantum truncated, pixel for pixel."""
    f = np.load(FIX / "motion_imagemagick.npz")
    clean, out, angles, params = (f[f"{k}_{size}"] for k in ("clean", "out", "angle", "params"))
    x = torch.from_numpy(clean).permute(0, 3, 1, 2).float()
    for i, (ang, (radius, sigma)) in enumerate(zip(angles, params)):
        im = x[[i % len(x)]]
        ours = S.corruptions._imagemagick_motion_blur(im, radius, sigma, torch.tensor([ang]))
        assert np.array_equal(ours[0].permute(1, 2, 0).numpy().astype(np.uint8), out[i]), (size, i)


# Random corruptions can only match in distribution: the mean |stored - clean| per severity of ours (two draws)
# against the original's (its own draws), in %. Tolerances from the sampling error of 48-64 images: frost picks
# one of 5 photos per image, so its mean moves more than the others'.
MAC_TOLERANCE = {"frost": 12.0, "motion_blur": 6.0, "snow": 6.0, "fog": 6.0, "elastic_transform": 6.0,
                 "spatter": 6.0}


@pytest.mark.parametrize("size", [32, 64])
def test_generated_corruptions_match_the_original_generator_in_distribution(data_root, size):
    ref = json.loads((FIX / f"mac_{size}.json").read_text())["mac"]
    if size == 64:
        rows = [ln.split("\t") for ln in (data_root / "tiny-imagenet-200/val/val_annotations.txt").read_text()
                .splitlines()[:48]]
        x = torch.stack([torch.from_numpy(np.array(Image.open(data_root / "tiny-imagenet-200/val/images" / r[0])
                                                   .convert("RGB"))).permute(2, 0, 1) for r in rows])
    else:
        with open(data_root / "cifar-10-batches-py" / "test_batch", "rb") as fh:
            x = torch.from_numpy(np.asarray(pickle.load(fh, encoding="latin1")["data"][:64], np.uint8)
                                 .reshape(-1, 3, 32, 32))
    for name, per_sev in ref.items():
        if name == "frost" and not HAVE_FROST:
            continue
        for sev in range(1, 6):
            ours = np.mean([(S.corrupt(x, name, sev, generator=torch.Generator().manual_seed(r)).double()
                             - x.double()).abs().mean().item() for r in range(2)])
            rel = 100 * abs(ours / per_sev[str(sev)] - 1)
            assert rel <= MAC_TOLERANCE.get(name, 3.0), (size, name, sev, round(rel, 1))


def test_frost_needs_the_texture_package():
    if not HAVE_FROST:
        with pytest.raises(RuntimeError, match="imagecorruptions"):
            S.corrupt(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "frost", 1)
    else:
        y = S.corrupt(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), "frost", 1)
        assert y.float().mean() > 10  # frost on black: only the texture (times 0.2) remains


# ─── the operator cache ─────────────────────────────────────────────────────────────────────────
def test_clear_corruption_cache_drops_every_cached_operator():
    S.clear_corruption_cache()
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    before = {name: S.corrupt(x, name, 3) for name in ("zoom_blur", "gaussian_blur")}
    assert any(isinstance(v, torch.Tensor) for v in S.corruptions._CACHE.values())  # the zoom operator, the filter matrices
    S.clear_corruption_cache()
    assert S.corruptions._CACHE == {}
    for name, y in before.items():  # rebuilt on demand, the same operators
        assert torch.equal(S.corrupt(x, name, 3), y)
    S.clear_corruption_cache()


def test_a_run_leaves_no_corruption_operators_behind(patch_seslib, data_root, monkeypatch):
    """The cache holds device tensors (64-px zoom blur alone ~335 MB): the cleanup that frees a run's device memory
    empties it too, or every later run of the kernel would start with them still allocated."""
    sizes = []  # the cache's size each time the run's cleanup clears it
    clear = S.clear_corruption_cache
    patch_seslib("clear_corruption_cache", lambda: (sizes.append(len(S.corruptions._CACHE)), clear()))
    clear()
    S.train(dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=32,
                 train_subset=64, test_subset=32, max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32,
                 width=0.25, log="none", device="cpu", robustness=["gaussian_blur"], robustness_severities=[1]))
    assert sizes and sizes[0] > 0  # the robustness pass cached gaussian_blur's filter matrices...
    assert S.corruptions._CACHE == {}  # ...and the run's cleanup dropped them


# ─── official files and evaluation ──────────────────────────────────────────────────────────────
def test_load_corrupted_cifar_layout(tmp_path, cifar):
    x, y = cifar
    n = 40
    blocks = np.concatenate([x[:n].permute(0, 2, 3, 1).numpy() // (s + 1) for s in range(5)])  # [5n, 32, 32, 3]
    d = tmp_path / "CIFAR-10-C"
    d.mkdir()
    np.save(d / "contrast.npy", blocks)
    np.save(d / "labels.npy", np.tile(y[:n].numpy().astype(np.uint8), 5))
    for root in (tmp_path, d):
        imgs, labels = S.load_corrupted(root, "cifar10", "contrast", 3)
        assert imgs.dtype == torch.uint8 and imgs.shape == (n, 3, 32, 32)
        assert torch.equal(imgs, x[:n] // 3) and torch.equal(labels, y[:n])
    imgs, _ = S.load_corrupted(tmp_path, "CIFAR-10", "contrast", 5, limit=7)
    assert torch.equal(imgs, x[:7] // 5)
    with pytest.raises(FileNotFoundError):
        S.load_corrupted(tmp_path, "cifar10", "fog", 1)
    with pytest.raises(ValueError):
        S.load_corrupted(tmp_path, "cifar10", "contrast", 6)


def _fake_tiny_c(root, classes=("n01", "n02"), per_class=3, severities=(1, 2, 3, 4, 5), name="fog", size=64):
    """A Tiny-ImageNet-C layout with small real JPEGs, beside a clean tiny-imagenet-200/wnids.txt."""
    rng = np.random.default_rng(0)
    (root / "tiny-imagenet-200").mkdir(parents=True, exist_ok=True)
    (root / "tiny-imagenet-200" / "wnids.txt").write_text("\n".join(sorted(classes)) + "\n")
    for s in severities:
        for wnid in classes:
            p = root / "Tiny-ImageNet-C" / name / str(s) / wnid
            p.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p / f"val_{wnid}_{k}.JPEG")


def test_load_corrupted_tiny_imagenet_layout(tmp_path):
    _fake_tiny_c(tmp_path)
    imgs, labels = S.load_corrupted(tmp_path, "tinyimagenet", "fog", 2)  # classes from the clean wnids.txt
    assert imgs.shape == (6, 3, 64, 64) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    _, labels = S.load_corrupted(tmp_path, "tinyimagenet", "fog", 2, classes=["n02", "n01"])
    assert labels.tolist() == [1, 1, 1, 0, 0, 0]
    for limit, first in ((2, [0, 0]), (4, [0, 0, 0, 1])):  # the first `limit` images, never more
        imgs, labels = S.load_corrupted(tmp_path, "tinyimagenet", "fog", 2, limit=limit)
        assert imgs.shape == (limit, 3, 64, 64) and labels.tolist() == first
    # the clean subset being evaluated, image for image (file names in the clean order, their labels)
    files, ys = ["val_n02_1.JPEG", "val_n01_2.JPEG"], torch.tensor([1, 0])
    imgs, labels = S.load_corrupted(tmp_path, "tinyimagenet", "fog", 3, files=files, labels=ys)
    want = torch.from_numpy(np.array(Image.open(tmp_path / "Tiny-ImageNet-C/fog/3/n02/val_n02_1.JPEG"))).permute(2, 0, 1)
    assert labels.tolist() == [1, 0] and torch.equal(imgs[0], want)


def test_a_missing_class_folder_does_not_shift_the_labels(tmp_path):
    """One severity lacks class n02: counting the folders would label n03's images 1; the clean wnids say 2."""
    _fake_tiny_c(tmp_path, classes=("n01", "n02", "n03"))
    import shutil
    shutil.rmtree(tmp_path / "Tiny-ImageNet-C" / "fog" / "4" / "n02")
    _, labels = S.load_corrupted(tmp_path, "tinyimagenet", "fog", 4)
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    with pytest.raises(FileNotFoundError, match=r"no corrupted copy, e.g. .*fog/4/n02/val_n02_0.JPEG"):
        S.load_corrupted(tmp_path, "tinyimagenet", "fog", 4, files=["val_n02_0.JPEG"], labels=torch.tensor([1]))


def test_corrupted_available_needs_all_five_severities_with_images(tmp_path):
    _fake_tiny_c(tmp_path, severities=(1, 2, 3, 4))
    assert not S.corrupted_available(tmp_path, "tinyimagenet", "fog")
    (tmp_path / "Tiny-ImageNet-C" / "fog" / "5" / "n01").mkdir(parents=True)  # an empty folder is not enough
    assert not S.corrupted_available(tmp_path, "tinyimagenet", "fog")
    _fake_tiny_c(tmp_path, severities=(5,))
    assert S.corrupted_available(tmp_path, "tinyimagenet", "fog")


def _cifar_c(tmp_path, images=None, labels=None):
    d = tmp_path / "CIFAR-10-C"
    d.mkdir(exist_ok=True)
    if images is not None:
        np.save(d / "fog.npy", images)
    if labels is not None:
        np.save(d / "labels.npy", labels)
    return d


@pytest.mark.parametrize("case,match", [
    ("float", r"fog.npy: images must be uint8"), ("labels2d", r"labels.npy: expected one label per image"),
    ("size", r"fog.npy: expected uint8 \[5\*n, 32, 32, 3\]"), ("truncated", r"fog.npy: not a readable images .npy"),
    ("garbage", r"labels.npy: not a readable labels .npy")])
def test_bad_official_cifar_files_are_clear_errors_naming_the_file(tmp_path, case, match):
    good = np.zeros((10, 32, 32, 3), np.uint8)
    lab = np.zeros(10, np.int64)
    d = _cifar_c(tmp_path, good, lab)
    if case == "float":
        np.save(d / "fog.npy", good.astype(np.float32))
    elif case == "labels2d":
        np.save(d / "labels.npy", lab.reshape(5, 2))
    elif case == "size":
        np.save(d / "fog.npy", np.zeros((10, 28, 28, 3), np.uint8))
    elif case == "truncated":
        raw = (d / "fog.npy").read_bytes()
        (d / "fog.npy").write_bytes(raw[:len(raw) // 2])
    else:
        (d / "labels.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match=match):
        S.load_corrupted(tmp_path, "cifar10", "fog", 1)


def test_bad_official_tiny_files_are_clear_errors_naming_the_file(tmp_path):
    _fake_tiny_c(tmp_path, severities=(1,))
    bad = tmp_path / "Tiny-ImageNet-C" / "fog" / "1" / "n01" / "val_n01_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated JPEG
    with pytest.raises(ValueError, match=r"val_n01_0.JPEG: not a readable image"):
        S.load_corrupted(tmp_path, "tinyimagenet", "fog", 1)
    _fake_tiny_c(tmp_path, severities=(1,))  # repaired, then one image of the wrong size
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=r"val_n01_0.JPEG: a Tiny-ImageNet-C image must be 64x64"):
        S.load_corrupted(tmp_path, "tinyimagenet", "fog", 1)


def test_corruption_errors_and_baseline_normalised_mce():
    """mCE / relative mCE against a direct hand computation of Hendrycks & Dietterich's formulas."""
    base = {"clean_acc": 90.0, "accuracy": {"fog": {"1": 80.0, "2": 60.0}, "snow": {"1": 70.0, "2": 50.0}}}
    ours = {"clean_acc": 92.0, "accuracy": {"fog": {"1": 85.0, "2": 70.0}, "snow": {"1": 70.0, "2": 55.0}}}
    got = S.corruption_error_vs_baseline(ours, base)
    ce_fog, ce_snow = (15 + 30) / (20 + 40), (30 + 45) / (30 + 50)
    rel_fog, rel_snow = ((15 - 8) + (30 - 8)) / ((20 - 10) + (40 - 10)), ((30 - 8) + (45 - 8)) / ((30 - 10) + (50 - 10))
    assert got["ce"] == pytest.approx({"fog": 100 * ce_fog, "snow": 100 * ce_snow})
    assert got["mce"] == pytest.approx(100 * (ce_fog + ce_snow) / 2)
    assert got["relative_mce"] == pytest.approx(100 * (rel_fog + rel_snow) / 2)
    assert S.corruption_error_vs_baseline(base, base)["mce"] == pytest.approx(100.0)
    flat = {"clean_acc": 10.0, "accuracy": {"fog": {"1": 10.0}}}  # a baseline no corruption degrades (smoke runs)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's 'Mean of empty slice' was logged by 8 smoke reports
        got = S.corruption_error_vs_baseline(flat, flat)
    assert got["relative_mce"] != got["relative_mce"] and got["mce"] == pytest.approx(100.0)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def trained(data_root):
    """A tiny CNN trained for a few seconds on the real CIFAR-10 training prefix."""
    with open(data_root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.tensor(d["labels"])
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_evaluate_corruptions(cifar, trained):
    x, y = cifar
    model = trained.train()
    col = S.ActivationCollector(model, [("body.2", model.body[2])])
    r = S.evaluate_corruptions(model, x, y, corruptions="paper5", severities=(1, 3, 5), batch_size=64,
                               normalize=(MEAN, STD), collector=col, progress=False)
    assert model.training and col.activations == []  # mode restored, nothing accumulated
    col.remove()
    assert r["corruptions"] == list(S.PAPER5) and r["severities"] == [1, 3, 5]
    assert set(r) >= {"accuracy", "per_corruption", "per_severity", "mean_corruption_acc", "clean_acc",
                      "ece_clean", "ece", "ece_corrupted", "detail", "source"}
    import json
    assert json.loads(json.dumps(r)) == r  # plain JSON
    assert 20 < r["clean_acc"] <= 100  # a few seconds of training beats chance (10%)
    assert all(v == "generated" for v in r["source"].values())
    accs = [a for n in r["accuracy"] for a in r["accuracy"][n].values()]
    assert all(0 <= a <= 100 for a in accs) and len(accs) == 15 and len(r["detail"]) == 15
    assert r["mean_corruption_acc"] == pytest.approx(np.mean(list(r["per_corruption"].values())))
    assert r["mean_corruption_acc"] == pytest.approx(np.mean(accs))
    assert r["mean_corruption_acc"] < r["clean_acc"]
    assert r["accuracy"]["contrast"]["5"] < r["clean_acc"]
    assert 0 <= r["ece_clean"] <= 1 and 0 <= r["ece_corrupted"] <= 1
    # corruption errors: 100 - accuracy, their mean (the unnormalised mCE), and corrupted minus clean error
    assert r["error"]["fog" if "fog" in r["error"] else "contrast"]["3"] == pytest.approx(
        100 - r["accuracy"]["fog" if "fog" in r["error"] else "contrast"]["3"])
    assert r["mean_corruption_error"] == pytest.approx(100 - np.mean(accs))
    assert r["relative_degradation"] == pytest.approx(np.mean([(100 - a) - (100 - r["clean_acc"]) for a in accs]))
    # same seed, same numbers
    r2 = S.evaluate_corruptions(model, x, y, corruptions=["gaussian_noise"], severities=(5,), batch_size=64,
                                normalize=(MEAN, STD), progress=False)
    assert r2["accuracy"]["gaussian_noise"]["5"] == r["accuracy"]["gaussian_noise"]["5"]


def test_evaluate_prefers_official_files(tmp_path, cifar, trained):
    x, y = cifar
    n = 100
    d = tmp_path / "CIFAR-10-C"
    d.mkdir()
    np.save(d / "fog.npy", np.tile(x[:n].permute(0, 2, 3, 1).numpy(), (5, 1, 1, 1)))  # "corrupted" = clean
    np.save(d / "labels.npy", np.tile(y[:n].numpy().astype(np.uint8), 5))
    r = S.evaluate_corruptions(trained, x[:n], y[:n], corruptions=["fog", "contrast"], severities=(1, 2),
                               normalize=(MEAN, STD), data_root=tmp_path, dataset="cifar10", progress=False)
    assert r["source"] == {"fog": "official files", "contrast": "generated"}
    assert r["accuracy"]["fog"]["1"] == r["accuracy"]["fog"]["2"] == r["clean_acc"]


def test_evaluate_matches_official_tiny_imagenet_c_images_to_the_clean_subset(tmp_path):
    """With files=, official Tiny-ImageNet-C images are the clean images evaluated, one for one: here the
    "corrupted" files ARE the clean images, so every cell equals the clean accuracy, on exactly 4 images."""
    rng = np.random.default_rng(1)
    classes = ["n01", "n02", "n03"]
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("\n".join(classes))
    clean = {f"val_{k}.JPEG": (rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), k % 3) for k in range(9)}
    for s in range(1, 6):
        for name, (im, c) in clean.items():
            p = tmp_path / "Tiny-ImageNet-C" / "fog" / str(s) / classes[c]
            p.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(p / name, quality=100)
    files = ["val_4.JPEG", "val_0.JPEG", "val_8.JPEG", "val_5.JPEG"]  # the clean subset, in its own order
    xs = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "Tiny-ImageNet-C/fog/1" / classes[clean[f][1]] / f)))
                      .permute(2, 0, 1) for f in files])
    ys = torch.tensor([clean[f][1] for f in files])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    r = S.evaluate_corruptions(model, xs, ys, corruptions=["fog"], severities=(1, 5), data_root=tmp_path,
                               dataset="tinyimagenet", classes=classes, files=files, progress=False)
    assert r["source"] == {"fog": "official files"} and r["n_images"] == 4 and "n_scored" not in r
    assert r["accuracy"]["fog"]["1"] == r["accuracy"]["fog"]["5"] == r["clean_acc"]
    r = S.evaluate_corruptions(model, xs, ys, corruptions=["fog"], severities=(1,), data_root=tmp_path,
                               dataset="tinyimagenet", classes=classes, progress=False)
    assert r["n_scored"] == {"fog_s1": 9}  # without files the whole folder is scored, and the result says so
