"""Data: the data sets on disk (CIFAR-10/100 pickles, Tiny-ImageNet folders), loading, the on-device loader and its
augmentations; GLUE text for Exp 22 and the synthetic smoke text."""
from __future__ import annotations

import importlib.util
import math
import os
import pickle
import random
import re
import shutil
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from .ses import is_int
from .util import DATA_ENV, read_only


# Per-channel pixel statistics of each training set (in [0, 1] units, as torchvision Normalize).
DATASETS = read_only({
    "cifar10": {"num_classes": 10, "img_size": 32, "folder": "cifar-10-batches-py", "sizes": (50000, 10000),
                "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "cifar100": {"num_classes": 100, "img_size": 32, "folder": "cifar-100-python", "sizes": (50000, 10000),
                 "mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)},
    "tinyimagenet": {"num_classes": 200, "img_size": 64, "folder": "tiny-imagenet-200", "sizes": (100000, 10000),
                     "mean": (0.4802, 0.4481, 0.3975), "std": (0.2770, 0.2691, 0.2821)},
})
# files whose presence identifies each official layout
_LAYOUT = {"cifar10": ("data_batch_1", "test_batch"), "cifar100": ("train", "test"),
           "tinyimagenet": ("wnids.txt", "train", "val/val_annotations.txt")}
_KAGGLE_HINT = {"cifar10": "a CIFAR-10 python-version dataset", "cifar100": "a CIFAR-100 python-version dataset",
                "tinyimagenet": "a Tiny-ImageNet-200 dataset (the official tiny-imagenet-200/ folder)"}
IMG_SUFFIXES = (".jpeg", ".jpg", ".png")


def dataset_info(name) -> dict:
    """num_classes, img_size, mean, std (and the official folder name) of a known dataset."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return dict(DATASETS[name])


def _has_layout(name, folder: Path) -> bool:
    return all((folder / f).exists() for f in _LAYOUT[name])


def _search(name, base: Path, max_depth: int):
    """The folder under base (base/<official name>, base itself, then up to max_depth levels) with the layout."""
    if not base.is_dir():
        return None
    for d in (base / DATASETS[name]["folder"], base):
        if _has_layout(name, d):
            return d
    for dirpath, dirnames, _ in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
        dirnames.sort()
        if _has_layout(name, Path(dirpath)):
            return Path(dirpath)
        if len(Path(dirpath).relative_to(base).parts) >= max_depth:
            dirnames[:] = []
    return None


def candidate_roots(root):
    """(label, path, search depth) in resolution order: an explicit root alone (it is authoritative: the user said
    where the data is), else SES_DATA, Kaggle inputs, ./data."""
    if root is not None:
        return [("data_root", Path(root).expanduser(), 2)]
    cands = []
    if os.environ.get(DATA_ENV):
        cands.append((DATA_ENV, Path(os.environ[DATA_ENV]).expanduser(), 2))
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        cands.append(("Kaggle inputs", Path("/kaggle/input"), 4))  # attached datasets nest a level or two
    cands.append(("./data", Path("data").resolve(), 2))
    return cands


def resolve_data_dir(name, root=None, download=True) -> Path:
    """The folder holding `name`'s official layout. An explicit root is searched alone (and must exist); without
    one: $SES_DATA, /kaggle/input/** (on Kaggle), ./data. CIFAR is downloaded with torchvision when found nowhere
    (a failed download leaves nothing behind); otherwise a FileNotFoundError names every place tried and how to
    provide the data. Never falls back to fake data."""
    dataset_info(name)
    if root is not None and not Path(root).expanduser().exists():
        raise FileNotFoundError(f"data_root {root} does not exist (an explicit data_root is used as given: fix the "
                                "path, or leave it None to search $SES_DATA, Kaggle inputs and ./data)")
    tried = []
    for label, base, depth in candidate_roots(root):
        found = _search(name, base, depth)
        if found is not None:
            return found
        tried.append(f"{label}: {base}")
    folder = DATASETS[name]["folder"]
    how = (f"Provide it with SES_DATA=/path/holding/{folder}/ (or its parent), the data_root=... argument/"
           f"notebook parameter, or on Kaggle by attaching {_KAGGLE_HINT[name]} to the notebook.")
    if name in ("cifar10", "cifar100") and download:
        target = Path(root).expanduser() if root is not None else Path("data").resolve()
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        existed = target.exists()
        before = set(target.iterdir()) if existed else set()
        try:
            for train in (True, False):
                cls(root=str(target), train=train, download=True)
        except Exception as e:  # no network, disk full, bad checksum...: remove what the attempt created
            for f in (set(target.iterdir()) if target.exists() else set()) - before:
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
            if not existed and target.exists() and not any(target.iterdir()):
                target.rmdir()
            raise FileNotFoundError(f"{name} not found in: {'; '.join(tried)}; downloading it into {target} "
                                    f"failed ({type(e).__name__}: {e}). {how}") from e
        if _has_layout(name, target / folder):
            return target / folder
        tried.append(f"download target: {target}")
    partial = [(d, missing) for _, base, _ in candidate_roots(root) for d, missing in [_partial_layout(name, base)] if d]
    if partial:  # the folder is there, a file of it is not: name the file, not the folder
        d, missing = partial[0]
        raise FileNotFoundError(f"{name}: {d} lacks {', '.join(missing)} (the official layout has "
                                f"{', '.join(_LAYOUT[name])}): re-extract the data set there, or point to a complete "
                                f"copy. {how}")
    raise FileNotFoundError(f"{name} ({folder}/) not found in: {'; '.join(tried)}. {how}")


def _partial_layout(name, base: Path):
    """(the official folder under base, the layout files it lacks) when that folder exists but is incomplete."""
    for d in (base / DATASETS[name]["folder"], base):
        if d.is_dir() and d.name == DATASETS[name]["folder"]:
            missing = [f for f in _LAYOUT[name] if not (d / f).exists()]
            if missing and len(missing) < len(_LAYOUT[name]):
                return d, missing
    return None, None


# ── CIFAR python batches: an attached data set is untrusted input ────────────────────────────────
# Unpickling can call any importable function; the official batches reference only numpy's array reconstruction, so
# nothing else is resolved (plus the bytes and protocol-5 forms of the same arrays, for batches re-pickled by Python 3).
# numpy's functions are taken from numpy itself: their module moved (numpy.core -> numpy._core in numpy 2) and files
# written by either spell it their way.
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]


def _latin1_bytes(text, encoding):
    """_codecs.encode as a batch re-pickled by Python 3 at protocol 2 uses it (for bytes), and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


_CIFAR_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
                         ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
                         ("numpy.core.numeric", "_frombuffer"): _NP_FROMBUFFER,
                         ("numpy._core.numeric", "_frombuffer"): _NP_FROMBUFFER,
                         ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                         ("_codecs", "encode"): _latin1_bytes}
_CIFAR_REMEDY = "re-download or re-extract the data set"


class _RefusedGlobal(ValueError):
    """A global outside _CIFAR_PICKLE_GLOBALS; its message names the file already."""


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only _CIFAR_PICKLE_GLOBALS (lists, dicts, ints and strings need no global)."""

    def __init__(self, fh, path):
        super().__init__(fh, encoding="latin1")  # as pickle.load(fh, encoding="latin1") read them before
        self.path = path

    def find_class(self, module, name):  # also reached by the EXT opcodes: no other way to a global
        found = _CIFAR_PICKLE_GLOBALS.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{self.path}: refused to load {module}.{name}: a CIFAR python batch references "
                                 "only numpy arrays, so this file is not one and could run code; use the official "
                                 "data set")
        return found


def _bad_batch(path, what, cause=None) -> ValueError:
    """One line naming the file, what is wrong (and the exception behind it) and what to do."""
    if cause is not None:
        what += f" ({str(cause).splitlines()[0] if str(cause) else type(cause).__name__})"
    return ValueError(f"{path}: {what}: {_CIFAR_REMEDY}")


def _unpickle_cifar_batch(path: Path):
    """The object a batch file holds; a truncated, empty or foreign file is a ValueError naming it."""
    try:
        with open(path, "rb") as fh:  # the official pickles, read directly: no md5 check on shortened copies
            return _CifarUnpickler(fh, path).load()
    except _RefusedGlobal:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError) as e:  # what the unpickler raises on bytes it cannot read
        raise _bad_batch(path, "truncated or not a CIFAR python batch", e) from None


def _batch_array(path, value, what) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged lists and the like
        raise _bad_batch(path, f"{what} is not an array", e) from None


def _cifar_pixels(path, data) -> np.ndarray:
    """`data` as uint8 [N, 3, 32, 32]: N rows of 3*32*32 values, converted only where nothing is lost."""
    data = _batch_array(path, data, "'data'")
    if data.ndim < 2 or math.prod(data.shape[1:]) != 3 * 32 * 32:
        got = f"rows of {math.prod(data.shape[1:])} values" if data.ndim >= 2 else f"shape {data.shape}"
        raise _bad_batch(path, f"'data' has {got}, not 3072 (3x32x32) per image")
    if data.dtype != np.uint8:  # another integer or float type is fine when every value is a whole 0..255
        lossless = data.dtype.kind in "iuf" and bool(np.all((data >= 0) & (data <= 255) & (data == np.round(data))))
        if not lossless:
            raise _bad_batch(path, f"the pixels are not uint8 0..255 ('data' is {data.dtype} and does not "
                                   "convert without loss)")
    return data.astype(np.uint8, copy=False).reshape(len(data), 3, 32, 32)


def _cifar_labels(path, labels, key, n, num_classes) -> np.ndarray:
    """`labels` as int64 [n], every one a class index: a short or foreign list would mislabel the batches after it."""
    labels = _batch_array(path, labels, f"{key!r}")
    if labels.ndim != 1:
        raise _bad_batch(path, f"{key!r} has shape {labels.shape}, not a list of {n} labels")
    if len(labels) != n:
        raise _bad_batch(path, f"{n} images but {len(labels)} labels in {key!r}")
    if n and labels.dtype.kind not in "iu":
        raise _bad_batch(path, f"{key!r} are not integers ({labels.dtype})")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise _bad_batch(path, f"{key!r} outside [0, {num_classes}): {int(bad[0])} ({bad.size} of {n} labels)")
    return labels.astype(np.int64, copy=False)


def _read_cifar_batch(name, path: Path, key):
    """(uint8 images [N, 3, 32, 32], int64 labels [N]) of one batch file, checked as read: a damaged or foreign
    file fails here naming itself, not later as a bare IndexError mid-training."""
    entry = _unpickle_cifar_batch(path)
    if not isinstance(entry, dict):
        raise _bad_batch(path, f"a {type(entry).__name__}, not a dict with 'data' and {key!r}: not a {name} batch")
    missing = [k for k in ("data", key) if k not in entry]
    if missing:
        keys = ", ".join(map(repr, list(entry)[:8]))
        raise _bad_batch(path, f"no {' or '.join(map(repr, missing))} (its keys: {keys}): not a {name} batch")
    x = _cifar_pixels(path, entry["data"])
    return x, _cifar_labels(path, entry[key], key, len(x), DATASETS[name]["num_classes"])


def _load_cifar(name, d: Path, split):
    if name == "cifar10":
        files, key = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]), "labels"
    else:
        files, key = (["train"] if split == "train" else ["test"]), "fine_labels"
    xs, ys = [], []
    for f in files:
        if not (d / f).exists():
            raise FileNotFoundError(f"{name}: {d / f} is missing (incomplete copy of {d.name}/?)")
        x, y = _read_cifar_batch(name, d / f, key)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def tinyimagenet_classes(d) -> list:
    """The wnids in class-index order: sorted, as torchvision ImageFolder (and Tiny-ImageNet-C folders) order them."""
    return sorted(w.strip() for w in (Path(d) / "wnids.txt").read_text().split() if w.strip())


def tinyimagenet_val_files(d) -> list:
    """The val image file names in val_annotations.txt order: load_dataset(..., "test") and Tiny-ImageNet-C's
    <corruption>/<severity>/<wnid>/<file> share them, so official corrupted images can be matched one to one."""
    return [ln.split("\t")[0] for ln in (Path(d) / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]


def _decode_rgb(path):
    # PIL, not torchvision.io (its decoders are deprecated since torchvision 0.29 in favour of TorchCodec)
    from PIL import Image
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # greyscale JPEGs -> 3 channels
    except (OSError, ValueError, SyntaxError) as e:  # truncated, empty or not an image: name the file
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); re-copy or remove it") from None


def decode_images(paths) -> list:
    """The images as uint8 [3, H, W] tensors (RGB). PIL releases the GIL while decoding: threads cut the
    ~100k-image Tiny-ImageNet train set's load time."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        return list(ex.map(_decode_rgb, paths))


def _load_tinyimagenet(d: Path, split, subset=None):
    wnids = tinyimagenet_classes(d)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        per_class = [sorted(p for p in (d / "train" / w / "images").glob("*") if p.suffix.lower() in IMG_SUFFIXES)
                     for w in wnids]
        # round-robin over classes (1st image of every class, then the 2nd, ...): every prefix, e.g. a
        # smoke subset or the erank batch, is class-balanced instead of holding class 0 only
        order = sorted((j, c) for c, files in enumerate(per_class) for j in range(len(files)))
        paths, labels = [per_class[c][j] for j, c in order], [c for _, c in order]
    else:  # the labelled val split is the test set (the official test/ folder has no labels)
        rows = [ln.split("\t") for ln in (d / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]
        paths = [d / "val" / "images" / r[0] for r in rows]
        labels = [index[r[1]] for r in rows]
    paths, labels = paths[:subset], labels[:subset]  # decode only what is used
    if not paths:
        raise FileNotFoundError(f"tinyimagenet: no {split} images under {d}")
    imgs = decode_images(paths)
    bad = [str(p) for p, im in zip(paths, imgs) if tuple(im.shape) != (3, 64, 64)]
    if bad:
        raise ValueError(f"tinyimagenet: {len(bad)} images are not 64x64, e.g. {bad[0]}")
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)


def load_dataset(name, root=None, split="train", download=True, subset=None):
    """(uint8 images [N, 3, H, W], int64 labels [N]) of cifar10 | cifar100 | tinyimagenet, split train | test
    ("val" = "test" for Tiny-ImageNet, whose labelled val set is the test set); subset: the first n images.
    Order: CIFAR as in the official batches; Tiny-ImageNet train round-robin over the classes (sorted wnids),
    val as in val_annotations.txt. See resolve_data_dir for how root is found."""
    dataset_info(name)
    if subset is not None and (not is_int(subset) or subset < 1):
        raise ValueError(f"subset must be None or an int >= 1; got {subset!r}")
    if split == "val" and name == "tinyimagenet":
        split = "test"
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    d = resolve_data_dir(name, root, download)
    if name == "tinyimagenet":
        x, y = _load_tinyimagenet(d, split, subset)
    else:
        x, y = _load_cifar(name, d, split)
        x, y = x[:subset], y[:subset]
    if subset is not None and len(y) < subset:  # a cut-down copy (or a small data set): say so, do not pretend
        warnings.warn(f"{name} {split}: asked for {subset} images, {d} holds {len(y)}: using all {len(y)}",
                      stacklevel=2)
    return x, y


def normalize_u8(x, mean=None, std=None):
    """uint8 images [N, C, H, W] -> the model's float input on x's device: ToTensor's /255, then Normalize(mean, std)
    when given, exactly as torchvision computes them (the evaluations and the paper protocol replay rely on that).
    DeviceLoader folds the same two steps into one multiply-add per batch (its hot path)."""
    x = x.float() / 255
    if mean is None:
        return x
    m, s = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - m) / s


def random_crop_flip(x, oy, ox, flip, pad=4):
    """Per-sample random crop (zero padding, as torchvision RandomCrop(size, padding=pad)) + horizontal flip
    of a uint8 batch [B, C, H, W], vectorised. oy, ox in [0, 2*pad]: crop offsets in the padded image;
    flip: bool [B]. unfold makes a [B, C, 2p+1, 2p+1, H, W] view of every possible crop (no copy); one
    advanced-indexing gather picks each sample's own (10x faster on CPU than gathering pixel indices)."""
    B, C, H, W = x.shape
    crops = F.pad(x, (pad, pad, pad, pad)).unfold(2, H, 1).unfold(3, W, 1)
    out = crops[torch.arange(B, device=x.device), :, oy, ox]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


JITTER_KEYS = ("brightness", "contrast", "saturation")  # ColorJitter's ops, in color_jitter's factor order


def _pil_luma(x):
    """PIL's RGB -> L conversion (ImagingConvert rgb2l: fixed-point ITU-R 601-2 luma, rounded) of a uint8-valued
    float batch [B, 3, H, W] -> [B, 1, H, W]."""
    r, g, b = x.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)[:, None].to(x.dtype)


def _pil_blend(degenerate, img, factor):
    """Image.blend(degenerate, img, factor) on uint8-valued floats: float32 maths, then C's (UINT8) truncation
    (Pillow's ImagingBlend), which ImageEnhance uses for every adjustment."""
    return (degenerate + factor * (img - degenerate)).clamp(0, 255).floor()


def color_jitter(x, factors, order):
    """torchvision ColorJitter(brightness, contrast, saturation) on PIL images, per sample, for a uint8 batch
    [B, 3, H, W] on any device: factors [B, 3] (brightness, contrast, saturation; 1 = unchanged) and order
    [B, 3] (each row a permutation of 0, 1, 2: ColorJitter applies its ops in a random order per image).
    PIL's ImageEnhance.Brightness / Contrast / Color exactly (what torchvision's functional ops call on PIL
    images, as the Tiny-ImageNet script does): blend with black, with the rounded mean luma, with the luma image.
    Batched (each step computes all three ops and keeps each image's own), since a per-image PIL loop would be
    the input pipeline's bottleneck on a GPU box with few CPU cores."""
    y = x.float()
    f = factors.to(device=x.device, dtype=torch.float32)
    rows = torch.arange(len(y), device=x.device)
    for step in range(3):
        op = order[:, step].to(x.device)
        luma = _pil_luma(y)
        mean = torch.floor(luma.mean((1, 2, 3), keepdim=True, dtype=torch.float64) + 0.5).float()
        # one blend per image with its own op's degenerate image (computing all three and picking cost 3x):
        # black (Brightness), its rounded mean luma (Contrast), its luma image (Color, i.e. saturation)
        degenerate = torch.where((op == 0).view(-1, 1, 1, 1), 0.0,
                                 torch.where((op == 1).view(-1, 1, 1, 1), mean, luma)).expand_as(y)
        y = _pil_blend(degenerate, y, f[rows, op].view(-1, 1, 1, 1))
    return y.to(torch.uint8)


def draw_color_jitter(n, strengths, generator):
    """Per-sample (factors [n, 3], order [n, 3]) for color_jitter: factor ~ U[1 - s, 1 + s] per op (s = 0: the op
    is skipped by torchvision; factor 1 is the identity here), op order a uniform random permutation."""
    s = torch.tensor([strengths[k] for k in JITTER_KEYS])
    factors = 1 + s * (2 * torch.rand(n, 3, generator=generator) - 1)
    return factors, torch.argsort(torch.rand(n, 3, generator=generator), dim=1)


class BatchRandAugment:
    """RandAugment(num_ops, magnitude) drawn PER IMAGE for a uint8 batch [B, C, H, W], on its device.

    torchvision's v2.RandAugment draws one op for a whole batched tensor, and calling it image by image is
    a Python loop of B x num_ops small ops (slow: see bench/data_pipeline.py). Here each image draws its
    own (op, sign) for every slot, exactly as v2.RandAugment does per call, and the images that drew the
    same (op, sign) go through torchvision's own op implementation together (<= 23 calls per slot): same
    ops, magnitudes and per-image distribution, far fewer launches. If this torchvision lacks the
    (private) per-op entry point, it falls back to the per-image loop."""

    def __init__(self, num_ops=2, magnitude=9):
        from torchvision.transforms import v2
        self.ra = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.ops = list(self.ra._AUGMENTATION_SPACE.items())
        self.signed = torch.tensor([int(signed) for _, (_, signed) in self.ops])
        self.grouped = hasattr(self.ra, "_apply_image_or_video_transform")

    def draw(self, n, generator):
        """(op index, sign) per slot and image: two int tensors [num_ops, n] (CPU)."""
        return (torch.randint(len(self.ops), (self.ra.num_ops, n), generator=generator),
                torch.randint(2, (self.ra.num_ops, n), generator=generator))

    def apply_op(self, x, k, negative=False):
        """Op k of the RandAugment table at the set magnitude (negated if negative and the op is signed)."""
        name, (mags_fn, signed) = self.ops[k]
        mags = mags_fn(self.ra.num_magnitude_bins, x.shape[-2], x.shape[-1])
        m = float(mags[self.ra.magnitude]) if mags is not None and mags.ndim > 0 else 0.0
        m = -m if (signed and negative) else m
        return self.ra._apply_image_or_video_transform(x, name, m, interpolation=self.ra.interpolation,
                                                       fill=self.ra._fill)

    def __call__(self, x, ops, signs):
        if not self.grouped:  # per-image loop (torch's global RNG draws the ops then)
            return torch.stack([self.ra(img) for img in x])
        x = x.clone()
        for slot in range(len(ops)):
            key = ops[slot] * 2 + signs[slot] * self.signed[ops[slot]]  # unsigned ops ignore the sign
            for g in key.unique().tolist():
                idx = (key == g).nonzero().flatten().to(x.device)
                x[idx] = self.apply_op(x.index_select(0, idx), g // 2, bool(g % 2))
        return x


class DeviceLoader:
    """Batches from a uint8 dataset kept whole on the training device.

    Per batch, on the device: random crop (zero padding `pad`) + horizontal flip with per-sample randomness,
    optional ColorJitter per sample (color_jitter: {brightness, contrast, saturation} strengths, PIL-exact),
    optional RandAugment(num_ops, magnitude) drawn per image (BatchRandAugment), normalisation to float32. Every
    random draw (shuffle, crops, flips, jitter, RandAugment ops) comes from one seeded CPU torch.Generator (identical on
    every device, checkpointable via state_dict). Training: shuffled, drop_last; eval (train=False): in
    order, no augmentation, last partial batch kept.

    Ready for data parallelism: batch_size is the GLOBAL batch; with world_size > 1 each rank takes its
    contiguous slice of every global batch of the shared permutation, and the augmentation draws are
    made for the whole global batch, so the union over ranks equals the single-process batch.
    """

    def __init__(self, images, labels, batch_size, *, mean, std, device="cpu", train=True, augment="standard",
                 pad=4, hflip=True, color_jitter=None, randaugment=(2, 9), seed=0, max_steps=None, rank=0,
                 world_size=1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}")
        if augment not in ("standard", "randaugment", "none"):
            raise ValueError(f"augment must be 'standard', 'randaugment' or 'none'; got {augment!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.train, self.pad, self.hflip, self.max_steps = batch_size, train, pad, hflip, max_steps
        self.augment = augment if train else "none"
        self.jitter = color_jitter if train and color_jitter and any(color_jitter.values()) else None
        self.rank, self.world_size = rank, world_size
        m, s = (torch.tensor(v, device=self.device, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        # normalize_u8 folded into one multiply-add per batch (the hot path): (x/255 - mean)/std = x * scale + bias
        self.scale, self.bias = 1.0 / (255.0 * s), -m / s
        self.generator = torch.Generator().manual_seed(seed)
        self._randaug = BatchRandAugment(*randaugment) if self.augment == "randaugment" else None
        if len(self) == 0:
            raise ValueError(f"{len(images)} images give no full batch of {batch_size} (drop_last)")

    def __len__(self):
        n, b = len(self.images), self.batch_size
        steps = n // b if self.train else -(-n // b)
        return min(steps, self.max_steps) if self.max_steps else steps

    def normalize(self, x_uint8):
        return x_uint8.float().mul_(self.scale).add_(self.bias)  # in place: one pass less than (x - m) / s

    def __iter__(self):
        n, b = len(self.images), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for s in range(len(self)):
            idx = order[s * b:(s + 1) * b]
            if self.augment != "none":  # draws for the whole global batch, then sliced: rank-count invariant
                off = torch.randint(0, 2 * self.pad + 1, (2, len(idx)), generator=self.generator)
                flip = (torch.rand(len(idx), generator=self.generator) < 0.5) & self.hflip
            if self.jitter is not None:
                cj_factors, cj_order = draw_color_jitter(len(idx), self.jitter, self.generator)
            if self._randaug is not None:
                ra_ops, ra_signs = self._randaug.draw(len(idx), self.generator)
            lo, hi = self.rank * len(idx) // self.world_size, (self.rank + 1) * len(idx) // self.world_size
            sl = slice(lo, hi)
            i = idx[sl].to(self.device, non_blocking=True)
            x, y = self.images.index_select(0, i), self.labels.index_select(0, i)
            if self.augment != "none":
                x = random_crop_flip(x, off[0, sl].to(self.device), off[1, sl].to(self.device),
                                     flip[sl].to(self.device), self.pad)
            if self.jitter is not None:  # after crop + flip, as in the Tiny-ImageNet script's Compose
                x = color_jitter(x, cj_factors[sl], cj_order[sl])
            if self._randaug is not None:  # per-image op draws (v2.RandAugment on a batch would pick one op)
                x = self._randaug(x, ra_ops[:, sl], ra_signs[:, sl])
            yield self.normalize(x), y

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ── GLUE text (Exp 22): SST-2 and MRPC as GLUE distributes them (TSV files), or the `datasets` library's copy ──
# GLUE's files: SST-2/{train,dev}.tsv with a "sentence<TAB>label" header; MRPC/{train,dev}.tsv with "Quality<TAB>#1 ID
# <TAB>#2 ID<TAB>#1 String<TAB>#2 String" (label = Quality). "dev" is GLUE's validation split, the author's val set.
GLUE_TASKS = read_only({
    "sst2": {"name": "GLUE SST-2", "folder": "SST-2", "sizes": (67349, 872), "text": ("sentence", None),
             "label": "label", "hf": ("sentence", None)},
    "mrpc": {"name": "GLUE MRPC", "folder": "MRPC", "sizes": (3668, 408), "text": ("#1 String", "#2 String"),
             "label": "Quality", "hf": ("sentence1", "sentence2")},
})
GLUE_SPLITS = read_only({"train": ("train.tsv", "train"), "dev": ("dev.tsv", "validation")})  # -> (GLUE file, datasets')
HF_HUB_ID = "nyu-mll/glue"  # the `datasets` id of GLUE (the author's load_dataset("glue", task); same data)


def hub_reachable(timeout=3.0) -> bool:
    """Whether the Hugging Face hub answers (HF_ENDPOINT, default huggingface.co), in at most `timeout` seconds: offline,
    a download attempt would retry for about a minute before failing. HF_HUB_OFFLINE=1 means no."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = re.sub(r"^\w+://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout).close()
        return True
    except OSError:
        return False


def glue_task(task) -> dict:
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
    return dict(GLUE_TASKS[task])


def _glue_search(task, base: Path, max_depth: int):
    """The folder under base named as GLUE names the task's (SST-2, MRPC; or sst2, mrpc) holding train.tsv and dev.tsv."""
    names = {GLUE_TASKS[task]["folder"].lower(), task}
    if not base.is_dir():
        return None
    for dirpath, dirnames, files in os.walk(base, followlinks=True):  # depth-capped, so link cycles end
        dirnames.sort()
        d = Path(dirpath)
        if d.name.lower() in names and {"train.tsv", "dev.tsv"} <= set(files):
            return d
        if len(d.relative_to(base).parts) >= max_depth:
            dirnames[:] = []
    return None


def resolve_glue_dir(task, root=None):
    """(the folder holding the task's GLUE TSV files or None, the places tried): under data_root, else $SES_DATA,
    Kaggle inputs, ./data (as the image data sets are found)."""
    glue_task(task)
    tried = []
    for label, base, depth in candidate_roots(root):
        found = _glue_search(task, base, depth + 1)  # one more level: GLUE's own glue_data/
        if found is not None:
            return found, tried
        tried.append(f"{label}: {base}")
    return None, tried


def read_glue_tsv(path, task):
    """(first texts, second texts or None, int labels) of one GLUE TSV file, columns found by the header's names. GLUE's
    files hold unbalanced quotes, so no quoting is parsed (QUOTE_NONE, as `datasets` reads them); a BOM is dropped
    (MRPC's header has one). A row with a missing column or a label not 0/1 is an error naming the file and line."""
    import csv
    info = glue_task(task)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: empty file; re-download or re-extract the GLUE data")
    head = [h.strip() for h in rows[0]]
    want = [c for c in (*info["text"], info["label"]) if c]
    if any(c not in head for c in want):
        raise ValueError(f"{path}: header {head} lacks {[c for c in want if c not in head]} ({info['name']}'s columns "
                         f"are {want}): not GLUE's {info['folder']}/{Path(path).name}")
    idx = [head.index(c) if c else None for c in (*info["text"], info["label"])]
    a, b, y = [], [] if idx[1] is not None else None, []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(i for i in idx if i is not None) or row[idx[2]].strip() not in ("0", "1"):
            raise ValueError(f"{path}, line {line}: expected {len(head)} tab-separated columns with a 0/1 "
                             f"{info['label']}; got {row!r}")
        a.append(row[idx[0]])
        if b is not None:
            b.append(row[idx[1]])
        y.append(int(row[idx[2]]))
    return a, b, y


def _glue_from_datasets(task, split):
    """The split from the `datasets` library (downloads it once, then its cache); None when it cannot."""
    if importlib.util.find_spec("datasets") is None or not hub_reachable():
        return None
    from datasets import load_dataset
    ds = load_dataset(HF_HUB_ID, task, split=GLUE_SPLITS[split][1])
    ka, kb = GLUE_TASKS[task]["hf"]
    return list(ds[ka]), list(ds[kb]) if kb else None, [int(v) for v in ds["label"]]


def load_glue(task, split="train", root=None, download=True):
    """(first texts, second texts or None, labels) of a GLUE task's split ("train" | "dev"): GLUE's TSV files found
    under data_root / $SES_DATA / Kaggle inputs / ./data, else (download) the `datasets` library's copy when the hub
    answers. Neither: FileNotFoundError in one line saying what to attach. Never synthetic (that is the smoke
    preset's own, labelled, text)."""
    info = glue_task(task)
    if split not in GLUE_SPLITS:
        raise ValueError(f"unknown GLUE split {split!r}; known: {', '.join(GLUE_SPLITS)}")
    d, tried = resolve_glue_dir(task, root)
    if d is not None:
        return read_glue_tsv(d / GLUE_SPLITS[split][0], task)
    got = _glue_from_datasets(task, split) if download else None
    if got is not None:
        return got
    online = ("online, `datasets` downloads it" if importlib.util.find_spec("datasets") else
              "online, `pip install datasets` and it downloads it")
    raise FileNotFoundError(
        f"{info['name']} not found under {'; '.join(tried)}: attach a Kaggle dataset holding GLUE's "
        f"{info['folder']}/train.tsv and dev.tsv (the official GLUE files, e.g. glue_data/{info['folder']}/) or put "
        f"{info['folder']}/train.tsv and dev.tsv there (data_root or SES_DATA); {online}")


# ── SYNTHETIC text: smoke only ──
# Sentences from a few dozen words, labelled by a rule: they take the tokenizer, the model, the hooks and the loop
# through their paths offline in seconds. SYNTHETIC: smoke only; nothing about GLUE can be learnt from them.
_SYN_WORDS = read_only({
    "pos": ("good", "great", "fine", "superb", "lovely", "moving", "fun", "clever"),
    "neg": ("bad", "dull", "awful", "weak", "boring", "poor", "flat", "silly"),
    "fill": ("the", "a", "film", "movie", "plot", "story", "cast", "acting", "was", "is", "very", "quite", "and",
             "but", "it", "this", "its", "music", "ending", "script", "really", "so")})
SYNTHETIC_VOCAB = tuple(w for ws in _SYN_WORDS.values() for w in ws)
SYNTHETIC_SIZES = (512, 128)  # (train, dev) examples of the synthetic sets when no subset is asked for


def synthetic_glue(task, n, seed=0):
    """SYNTHETIC: smoke only. (first texts, second texts or None, labels) shaped like the task's: SST-2-like sentences
    labelled by the polarity of the sentiment words they hold; MRPC-like pairs whose second sentence is the first
    shuffled (label 1) or another sentence (label 0). Its own RNG: the global streams are left alone."""
    glue_task(task)
    rng = random.Random(seed)

    def sentence(pol):
        words = [rng.choice(_SYN_WORDS["fill"]) for _ in range(rng.randint(4, 10))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(_SYN_WORDS[pol]))
        return " ".join(words)
    a, b, y = [], [] if task == "mrpc" else None, []
    for _ in range(n):
        label = rng.randint(0, 1)
        if b is None:
            a.append(sentence("pos" if label else "neg"))
        else:
            a.append(sentence(rng.choice(("pos", "neg"))))
            b.append(" ".join(rng.sample(a[-1].split(), len(a[-1].split()))) if label else
                     sentence(rng.choice(("pos", "neg"))))
        y.append(label)
    return a, b, y
