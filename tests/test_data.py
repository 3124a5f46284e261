"""Data: the three real loaders (against the files read independently), root resolution and its errors,
the on-device pipeline (crop/flip vs torchvision's functional ops, per-sample randomness, normalisation,
seeded shuffle, drop_last, rank slices) and per-image RandAugment."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import seslib as S


def _pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


# ── loaders on the shared (real, shortened) data ────────────────────────────────────────────────

def test_cifar10_loader_matches_the_pickles(data_root):
    d = Path(data_root) / "cifar-10-batches-py"
    x, y = S.load_dataset("cifar10", data_root, "train")
    batches = [_pickle(d / f"data_batch_{i}") for i in range(1, 6)]
    assert x.shape == (sum(len(b["labels"]) for b in batches), 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    assert y[:20].tolist() == batches[0]["labels"][:20]
    assert np.array_equal(x[0].numpy().reshape(-1), np.asarray(batches[0]["data"][0]))
    n1 = len(batches[0]["labels"])  # batches are concatenated in the official order
    assert y[n1:n1 + 10].tolist() == batches[1]["labels"][:10]
    xt, yt = S.load_dataset("cifar10", data_root, "test")
    test = _pickle(d / "test_batch")
    assert xt.shape == (len(test["labels"]), 3, 32, 32) and yt[:20].tolist() == test["labels"][:20]


def test_cifar100_loader_uses_fine_labels(data_root):
    d = Path(data_root) / "cifar-100-python"
    for split in ("train", "test"):
        x, y = S.load_dataset("cifar100", data_root, split)
        raw = _pickle(d / split)
        assert x.shape == (len(raw["fine_labels"]), 3, 32, 32) and x.dtype == torch.uint8
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 99
        assert y[:20].tolist() == raw["fine_labels"][:20]
        assert np.array_equal(x[-1].numpy().reshape(-1), np.asarray(raw["data"][-1]))


def test_tinyimagenet_loader_layout_labels_and_greyscale(data_root):
    d = Path(data_root) / "tiny-imagenet-200"
    wnids = sorted((d / "wnids.txt").read_text().split())
    files = {w: sorted((d / "train" / w / "images").glob("*.JPEG")) for w in wnids}
    x, y = S.load_dataset("tinyimagenet", data_root, "train")
    assert x.shape == (sum(map(len, files.values())), 3, 64, 64) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 199
    assert y[:400].tolist() == list(range(200)) * 2  # round-robin over the sorted wnids: prefixes are balanced
    decoded = lambda p: torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)  # noqa: E731
    assert torch.equal(x[0], decoded(files[wnids[0]][0])) and torch.equal(x[201], decoded(files[wnids[1]][1]))
    xv, yv = S.load_dataset("tinyimagenet", data_root, "val")
    rows = [ln.split("\t") for ln in (d / "val" / "val_annotations.txt").read_text().splitlines() if ln.strip()]
    assert len(xv) == len(rows) and yv[:20].tolist() == [wnids.index(r[1]) for r in rows[:20]]
    assert torch.equal(xv[0], decoded(d / "val" / "images" / rows[0][0]))
    # a greyscale JPEG becomes 3 equal channels
    w, j = next((w, j) for w in wnids for j, p in enumerate(files[w]) if Image.open(p).mode == "L")
    g = x[j * 200 + wnids.index(w)]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    # subset: the first n only
    xs, ys = S.load_dataset("tinyimagenet", data_root, "train", subset=300)
    assert torch.equal(xs, x[:300]) and torch.equal(ys, y[:300])


def test_dataset_metadata():
    assert S.dataset_info("cifar10")["num_classes"] == 10 and S.dataset_info("cifar100")["num_classes"] == 100
    assert S.dataset_info("tinyimagenet")["num_classes"] == 200 and S.dataset_info("tinyimagenet")["img_size"] == 64
    with pytest.raises(ValueError, match="known: cifar10, cifar100, tinyimagenet"):
        S.dataset_info("imagenet")
    with pytest.raises(ValueError, match="split"):
        S.load_dataset("cifar10", split="validation")


# ── root resolution ─────────────────────────────────────────────────────────────────────────────

@pytest.fixture
def no_data_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SES_DATA", raising=False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.chdir(tmp_path)  # so ./data is empty too
    return tmp_path


def test_missing_root_error_names_every_path_and_the_remedies(no_data_env):
    with pytest.raises(FileNotFoundError) as e:  # no root given: every place searched is named
        S.load_dataset("tinyimagenet")
    msg = str(e.value)
    assert str(no_data_env / "data") in msg
    assert "SES_DATA" in msg and "data_root" in msg and "Kaggle" in msg and "tiny-imagenet-200" in msg


def test_explicit_missing_root_is_an_error_naming_it_not_a_silent_search_elsewhere(no_data_env, monkeypatch, data_root):
    monkeypatch.setenv("SES_DATA", str(data_root))  # the data exists elsewhere, but the user named another folder
    missing = no_data_env / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        S.load_dataset("cifar10", missing)
    assert str(missing) in str(e.value) and "fix the path" in str(e.value)


def test_a_tiny_imagenet_folder_missing_one_file_names_that_file(tmp_path):
    """The folder is there and whole but for val/val_annotations.txt: the error names that file, not the folder."""
    d = tmp_path / "tiny-imagenet-200"
    (d / "train").mkdir(parents=True)
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("n01443537\n")
    for split in ("train", "test"):
        with pytest.raises(FileNotFoundError) as e:
            S.load_dataset("tinyimagenet", tmp_path, split=split)
        assert f"{d} lacks val/val_annotations.txt" in str(e.value) and "re-extract" in str(e.value)


def test_missing_cifar_without_download_is_an_error_not_fake_data(no_data_env, monkeypatch):
    monkeypatch.setenv("SES_DATA", str(no_data_env / "empty"))
    with pytest.raises(FileNotFoundError, match="SES_DATA"):
        S.load_dataset("cifar10", download=False)


def test_ses_data_env_and_nested_layout_are_found(no_data_env, monkeypatch, data_root):
    nested = no_data_env / "inputs" / "some-kaggle-dataset"
    nested.mkdir(parents=True)
    (nested / "cifar-100-python").symlink_to(Path(data_root).resolve() / "cifar-100-python")
    monkeypatch.setenv("SES_DATA", str(no_data_env / "inputs"))
    assert S.resolve_data_dir("cifar100") == nested / "cifar-100-python"
    # an explicit root comes first
    assert S.resolve_data_dir("cifar10", data_root) == Path(data_root) / "cifar-10-batches-py"


# ── CIFAR batches: untrusted, damaged or inconsistent files ────────────────────────────────────────

def _batch(n=4, labels=None, data=None, key="labels"):
    """A CIFAR python batch as the official files hold it: uint8 rows of 3072 values and a list of int labels."""
    data = np.random.default_rng(n).integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data
    return {"batch_label": "fake", key: list(range(n)) if labels is None else labels, "data": data}


def _fake_cifar(root, name="cifar10", broken=None, content=None):
    """root/<official folder>/ with every batch small and valid except `broken`, which holds `content` (bytes as
    they are, anything else pickled with protocol 2, as the official files are). Returns the broken file's path."""
    d = Path(root) / S.dataset_info(name)["folder"]
    d.mkdir(parents=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]) if name == "cifar10" else ["train", "test"]
    for f in files:
        obj = content if f == broken else _batch(key=key)
        (d / f).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
    return d / (broken or files[0])


def _load_error(root, name="cifar10", split="train") -> str:
    with pytest.raises(ValueError) as e:
        S.load_dataset(name, root, split, download=False)
    msg = str(e.value)
    assert "\n" not in msg  # the command line prints a ValueError as one line
    return msg


class _RunsCode:
    """Unpickling this calls fn(arg): what a malicious attached 'data set' would do."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "eval"])
def test_a_cifar_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = (_RunsCode(os.system, f"echo pwned > {marker}") if how == "os.system"
               else _RunsCode(eval, f"open({str(marker)!r}, 'w').write('pwned')"))
    bad = _fake_cifar(tmp_path / "data", broken="data_batch_3", content={"data": payload, "labels": [0]})
    msg = _load_error(tmp_path / "data")
    assert msg.startswith(f"{bad}: refused ")
    assert ("posix.system" if how == "os.system" else "__builtin__.eval") in msg  # protocol 2's name for builtins
    assert not marker.exists()


@pytest.mark.parametrize("content", ["truncated", "empty", "garbage"])
def test_a_damaged_cifar_pickle_is_an_error_naming_the_file_and_the_remedy(tmp_path, content):
    whole = pickle.dumps(_batch(), protocol=2)
    data = {"truncated": whole[:len(whole) // 2], "empty": b"", "garbage": b"<html>404 Not Found</html>"}[content]
    bad = _fake_cifar(tmp_path, broken="data_batch_3", content=data)
    msg = _load_error(tmp_path)
    assert msg.startswith(f"{bad}: truncated or not a CIFAR python batch (")
    assert msg.endswith("re-download or re-extract the data set")


BAD_BATCHES = {  # what is wrong: (dataset, the batch, what the error says)
    "fewer labels than images": ("cifar10", _batch(8, labels=[0] * 7), "8 images but 7 labels"),
    "rows not 3x32x32": ("cifar10", _batch(data=np.zeros((4, 3000), np.uint8)), "rows of 3000 values, not 3072"),
    "pixels beyond uint8": ("cifar10", _batch(data=np.full((4, 3072), 300)), "pixels are not uint8 0..255"),
    "fractional pixels": ("cifar10", _batch(data=np.full((4, 3072), 0.5)), "pixels are not uint8 0..255"),
    "label 10 in cifar10": ("cifar10", _batch(labels=[0, 1, 2, 10]), "'labels' outside [0, 10): 10"),
    "negative label": ("cifar10", _batch(labels=[0, -1, 2, 3]), "'labels' outside [0, 10): -1"),
    "label 100 in cifar100": ("cifar100", _batch(labels=[0, 1, 2, 100], key="fine_labels"),
                              "'fine_labels' outside [0, 100): 100"),
    "fractional labels": ("cifar10", _batch(labels=[0, 1.5, 2, 3]), "'labels' are not integers"),
    "a cifar10 batch as cifar100": ("cifar100", _batch(), "no 'fine_labels'"),
    "not a dict": ("cifar10", [1, 2, 3], "a list, not a dict"),
}


@pytest.mark.parametrize("what", list(BAD_BATCHES))
def test_an_inconsistent_cifar_batch_is_an_error_naming_the_file_and_the_mismatch(tmp_path, what):
    name, batch, says = BAD_BATCHES[what]
    bad = _fake_cifar(tmp_path, name, broken="data_batch_3" if name == "cifar10" else "train", content=batch)
    msg = _load_error(tmp_path, name)
    assert msg.startswith(f"{bad}: ") and says in msg and msg.endswith("re-download or re-extract the data set")


def test_lossless_pixel_and_label_types_load_as_the_official_ones(tmp_path):
    ref = _batch()
    _fake_cifar(tmp_path / "a", broken="test_batch", content=ref)
    wider = _batch(labels=np.arange(4), data=ref["data"].astype(np.int64))  # int64 pixels 0..255, numpy labels
    _fake_cifar(tmp_path / "b", broken="test_batch", content=wider)
    xa, ya = S.load_dataset("cifar10", tmp_path / "a", "test", download=False)
    xb, yb = S.load_dataset("cifar10", tmp_path / "b", "test", download=False)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xb.dtype == torch.uint8 and yb.dtype == torch.int64


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_valid_batch_re_pickled_by_python3_still_loads(tmp_path, protocol):
    ref = _batch(6)  # protocol 2 spells bytes as _codecs.encode, protocol 5 arrays as numpy's _frombuffer
    _fake_cifar(tmp_path, broken="test_batch", content=pickle.dumps(ref, protocol=protocol))
    x, y = S.load_dataset("cifar10", tmp_path, "test", download=False)
    assert torch.equal(x, torch.from_numpy(ref["data"]).reshape(-1, 3, 32, 32)) and y.tolist() == ref["labels"]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_cifar_batches_load_exactly_as_plain_pickle_reads_them(data_root, name):
    d = Path(data_root) / S.dataset_info(name)["folder"]
    key, files = (("labels", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]})
                  if name == "cifar10" else ("fine_labels", {"train": ["train"], "test": ["test"]}))
    for split in ("train", "test"):
        x, y = S.load_dataset(name, data_root, split)
        raw = [_pickle(d / f) for f in files[split]]
        assert torch.equal(x, torch.from_numpy(np.concatenate([r["data"] for r in raw]).reshape(-1, 3, 32, 32)))
        assert torch.equal(y, torch.tensor([lab for r in raw for lab in r[key]], dtype=torch.int64))


# ── on-device pipeline ──────────────────────────────────────────────────────────────────────────

MEAN, STD = S.dataset_info("cifar10")["mean"], S.dataset_info("cifar10")["std"]


def _reference_normalize(x_uint8):
    return TF.normalize(TF.to_dtype(x_uint8, torch.float32, scale=True), MEAN, STD)


def test_crop_flip_equals_torchvision_functional(data_root):
    x, _ = S.load_dataset("cifar10", data_root, "test")
    x = x[:16]
    g = torch.Generator().manual_seed(0)
    oy, ox = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    ours = S.random_crop_flip(x, oy, ox, flip, pad=4)
    for i in range(16):  # RandomCrop(32, padding=4) = zero pad 4, then crop at (oy, ox); then hflip
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(oy[i]), int(ox[i]), 32, 32)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(ours[i], ref)


def test_augmentation_randomness_is_per_sample(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    same = x[:1].repeat(256, 1, 1, 1)  # one real image, 256 times: any difference comes from the augmentation
    loader = S.DeviceLoader(same, y[:1].repeat(256), 256, mean=MEAN, std=STD, seed=1)
    xb, _ = next(iter(loader))
    padded = TF.pad(x[0], [4], fill=0)
    candidates = {}
    for oy in range(9):
        for ox in range(9):
            c = TF.crop(padded, oy, ox, 32, 32)
            candidates[(oy, ox, False)] = _reference_normalize(c)
            candidates[(oy, ox, True)] = _reference_normalize(TF.horizontal_flip(c))
    keys = list(candidates)
    stack = torch.stack([candidates[k] for k in keys])
    seen = []
    for img in xb:  # every output is exactly one of the 162 crop/flip variants...
        err = (stack - img).abs().flatten(1).amax(1)
        j = int(err.argmin())
        assert err[j] < 1e-5
        seen.append(keys[j])
    # ...and the batch uses many of them (a per-batch draw would give a single one)
    assert len(set(seen)) > 60
    flips = sum(k[2] for k in seen)
    assert 80 < flips < 176
    assert len({k[0] for k in seen}) == 9 and len({k[1] for k in seen}) == 9


def test_eval_loader_normalises_in_order_without_augmentation(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    loader = S.DeviceLoader(x[:100], y[:100], 32, mean=MEAN, std=STD, train=False)
    assert len(loader) == 4  # last partial batch kept
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(ys), y[:100])
    assert torch.allclose(torch.cat(xs), _reference_normalize(x[:100]), atol=1e-5)


def test_training_shuffle_is_seeded_and_drops_last(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    lab = torch.arange(100)  # labels carry the sample id

    def order(seed):
        ld = S.DeviceLoader(x[:100], lab, 32, mean=MEAN, std=STD, seed=seed)
        assert len(ld) == 3
        return torch.cat([b for _, b in ld])
    a, b, c = order(0), order(0), order(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(a) == 96 and len(set(a.tolist())) == 96  # no repeats, last 4 dropped


def test_loader_state_dict_replays_the_epoch(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    ld = S.DeviceLoader(x[:64], y[:64], 16, mean=MEAN, std=STD, seed=3)
    list(ld)
    state = ld.state_dict()
    first = [b for b, _ in ld]
    ld.load_state_dict(state)
    again = [b for b, _ in ld]
    assert all(torch.equal(p, q) for p, q in zip(first, again))


def test_rank_slices_reassemble_the_global_batch(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    full = S.DeviceLoader(x[:64], y[:64], 16, mean=MEAN, std=STD, seed=5)
    parts = [S.DeviceLoader(x[:64], y[:64], 16, mean=MEAN, std=STD, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for (xf, yf), (x0, y0), (x1, y1) in zip(full, *parts):
        assert torch.equal(torch.cat([x0, x1]), xf) and torch.equal(torch.cat([y0, y1]), yf)


def test_randaugment_is_drawn_per_image(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    same = x[5:6].repeat(64, 1, 1, 1)
    ld = S.DeviceLoader(same, y[:64], 64, mean=MEAN, std=STD, seed=0, augment="randaugment", pad=0)
    xb, _ = next(iter(ld))  # pad=0: the crop is the identity, only flips and RandAugment vary
    canon = [img if img[..., 0].sum() <= img[..., -1].sum() else img.flip(-1) for img in xb]
    distinct = {tuple(img.flatten()[::97].tolist()) for img in canon}
    assert len(distinct) > 20
    # contrast: torchvision's v2.RandAugment on the batched tensor applies one op to all images
    torch.manual_seed(0)
    batched = v2.RandAugment(2, 9)(same)
    assert all(torch.equal(batched[0], b) for b in batched)


def test_loader_rejects_bad_input(data_root):
    x, y = S.load_dataset("cifar10", data_root, "test")
    with pytest.raises(ValueError, match="uint8"):
        S.DeviceLoader(x[:10].float(), y[:10], 4, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="augment"):
        S.DeviceLoader(x[:10], y[:10], 4, mean=MEAN, std=STD, augment="autoaugment")
    with pytest.raises(ValueError, match="no full batch"):
        S.DeviceLoader(x[:10], y[:10], 16, mean=MEAN, std=STD)


def test_batched_randaugment_ops_equal_their_per_image_application(data_root):
    # the grouping relies on torchvision's ops treating a batch image by image (histograms, min/max...)
    x, _ = S.load_dataset("cifar10", data_root, "test")
    ra = S.BatchRandAugment(2, 9)
    assert ra.grouped and len(ra.ops) == 14
    batch = x[:6]
    for k in range(len(ra.ops)):
        for neg in (False, True):
            together = ra.apply_op(batch, k, neg)
            for i in range(len(batch)):
                assert torch.equal(together[i], ra.apply_op(batch[i:i + 1], k, neg)[0]), ra.ops[k][0]


def test_batched_randaugment_draws_each_op_per_image():
    ra = S.BatchRandAugment(2, 9)
    ops, signs = ra.draw(4096, torch.Generator().manual_seed(0))
    assert ops.shape == signs.shape == (2, 4096)
    counts = torch.bincount(ops.flatten(), minlength=14).float()
    assert counts.min() > 0.8 * 8192 / 14 and counts.max() < 1.2 * 8192 / 14  # uniform over the 14 ops
    assert 0.45 < signs.float().mean() < 0.55


def test_color_jitter_matches_torchvision_on_pil_images_per_sample(data_root):
    """The Tiny-ImageNet recipe's ColorJitter(0.1, 0.1, 0.1), batched on the device, against torchvision's own
    functional ops on PIL images (what T.ColorJitter calls), with each image's own factors and op order:
    bit-exact, also at extreme factors (0, > 2) where clipping and truncation decide."""
    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image
    x, _ = S.load_dataset("tinyimagenet", data_root, "test", subset=48)
    g = torch.Generator().manual_seed(0)
    factors, order = S.draw_color_jitter(len(x), {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1}, g)
    assert ((factors >= 0.9) & (factors <= 1.1)).all() and (order.sort(1).values == torch.arange(3)).all()
    factors[:6] = torch.tensor([[0.0, 0.0, 0.0], [2.5, 0.2, 3.0], [0.5, 2.0, 0.0], [1.0, 1.0, 1.0],
                                [1.7, 1.7, 1.7], [0.3, 0.3, 0.3]])
    ours = S.color_jitter(x, factors, order)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(len(x)):
        im = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        for k in order[i].tolist():
            im = ops[k](im, float(factors[i, k]))
        assert torch.equal(torch.from_numpy(np.array(im)).permute(2, 0, 1), ours[i]), i


def test_device_loader_applies_the_recipe_pipeline(data_root):
    """pad 8 + ColorJitter (Exp 11's pipeline) changes pixels per sample, deterministically per seed; no hflip and
    no jitter with pad 0 leaves the images as they are."""
    x, y = S.load_dataset("cifar10", data_root, "test", subset=64)
    norm = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # identity on the 0..255 scale
    xb, _ = next(iter(S.DeviceLoader(x, y, 64, train=True, pad=0, hflip=False, seed=0, **norm)))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))  # the loader's shuffle: its first draw
    assert torch.equal(xb.round().to(torch.uint8), x[perm])
    cj = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1}
    a = next(iter(S.DeviceLoader(x, y, 64, train=True, pad=8, color_jitter=cj, seed=3, **norm)))[0]
    b = next(iter(S.DeviceLoader(x, y, 64, train=True, pad=8, color_jitter=cj, seed=3, **norm)))[0]
    c = next(iter(S.DeviceLoader(x, y, 64, train=True, pad=8, seed=3, **norm)))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
