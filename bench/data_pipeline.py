"""Throughput of the training-data pipeline: seslib's on-device DeviceLoader (uint8 dataset on the device,
vectorised per-sample crop/flip + normalisation) vs the reference scripts' torchvision DataLoader with PIL
transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize; num_workers=2), on real CIFAR-10,
in this one process. Also the per-image RandAugment(2, 9) path of both, and Exp 11's Tiny-ImageNet pipeline
(RandomCrop(64, 8), flip, ColorJitter(0.1, 0.1, 0.1): PIL per image vs seslib's batched per-sample jitter).
Prints images/s and the ratios.

    SES_DATA=../shared/data python bench/data_pipeline.py [--device cpu|cuda] [--batch-size 256] [--epochs 3]
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import seslib as S  # noqa: E402


class PILCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: uint8 HWC array -> PIL image -> transform."""

    def __init__(self, images, labels, transform):
        self.data, self.labels, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), self.labels[i]


def throughput(make_iter, epochs, device, consume):
    """Images/s over `epochs` full passes, after one warm-up pass (worker start-up, allocator, caches)."""
    for xb, yb in make_iter():
        consume(xb, yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for xb, yb in make_iter():
            consume(xb, yb)
            n += len(yb)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--data-root", default=os.environ.get("SES_DATA") or str(shared))
    a = ap.parse_args()
    device = S.pick_device(a.device)
    x, y = S.load_dataset("cifar10", a.data_root, "train")
    info = S.dataset_info("cifar10")
    mean, std = info["mean"], info["std"]
    print(f"CIFAR-10 train: {len(x)} real images from {S.resolve_data_dir('cifar10', a.data_root)}; device {device}; "
          f"batch {a.batch_size}; {a.epochs} timed epochs after 1 warm-up; torch threads {torch.get_num_threads()}, "
          f"CPU cores {os.cpu_count()}")

    def to_device(xb, yb):  # both pipelines must end with the batch on the training device
        xb.to(device, non_blocking=True), yb.to(device, non_blocking=True) if torch.is_tensor(yb) else None

    rows = {}
    for name, ra in (("standard", False), ("randaugment(2,9)", True)):
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + ([T.RandAugment(2, 9)] if ra else [])
        tf = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])
        dl = DataLoader(PILCifar(x, y, tf), batch_size=a.batch_size, shuffle=True, drop_last=True,
                        num_workers=a.workers, persistent_workers=a.workers > 0, pin_memory=device.type == "cuda")
        base = throughput(lambda: dl, a.epochs, device, to_device)
        ours_loader = S.DeviceLoader(x, y, a.batch_size, mean=mean, std=std, device=device, seed=0,
                                     augment="randaugment" if ra else "standard")
        ours = throughput(lambda: ours_loader, a.epochs, device, lambda xb, yb: None)
        rows[name] = (base, ours)
        print(f"{name:18s} DataLoader+PIL ({a.workers} workers): {base:9.0f} img/s | DeviceLoader: {ours:9.0f} img/s"
              f" | ratio {ours / base:6.2f}x", flush=True)
    # Exp 11's pipeline (ses_resnet50_tinyimagenet .py) on real Tiny-ImageNet: RandomCrop(64, 8), flip, ColorJitter
    try:
        tx, ty = S.load_dataset("tinyimagenet", a.data_root, "train")
    except FileNotFoundError as e:
        print(f"tiny-imagenet pipeline skipped: {e}")
    else:
        c = S.default_config("resnet50", "tinyimagenet")
        tf = T.Compose([T.RandomCrop(64, padding=8), T.RandomHorizontalFlip(), T.ColorJitter(0.1, 0.1, 0.1),
                        T.ToTensor(), T.Normalize(c["norm_mean"], c["norm_std"])])
        dl = DataLoader(PILCifar(tx, ty, tf), batch_size=a.batch_size, shuffle=True, drop_last=True,
                        num_workers=a.workers, persistent_workers=a.workers > 0, pin_memory=device.type == "cuda")
        base = throughput(lambda: dl, a.epochs, device, to_device)
        tiny = S.DeviceLoader(tx, ty, a.batch_size, mean=c["norm_mean"], std=c["norm_std"], device=device, seed=0,
                              pad=8, color_jitter=c["color_jitter"])
        ours = throughput(lambda: tiny, a.epochs, device, lambda xb, yb: None)
        rows["tiny crop8+jitter"] = (base, ours)
        print(f"{'tiny crop8+jitter':18s} DataLoader+PIL ({a.workers} workers): {base:9.0f} img/s | DeviceLoader: "
              f"{ours:9.0f} img/s | ratio {ours / base:6.2f}x  ({len(tx)} Tiny-ImageNet train images, 64 px)", flush=True)
    # the plain per-image loop over v2.RandAugment (what the grouped version replaces), one timed epoch
    loop_loader = S.DeviceLoader(x, y, a.batch_size, mean=mean, std=std, device=device, seed=0, augment="randaugment")
    loop_loader._randaug.grouped = False
    loop = throughput(lambda: loop_loader, 1, device, lambda xb, yb: None)
    base_ra, ours_ra = rows["randaugment(2,9)"]
    print(f"{'randaugment loop':18s} DeviceLoader with a per-image v2.RandAugment loop: {loop:9.0f} img/s "
          f"(grouped per-image draws are {ours_ra / loop:.1f}x faster; vs DataLoader+PIL {loop / base_ra:.2f}x)")
    print(f"RESULT standard ratio {rows['standard'][1] / rows['standard'][0]:.2f}x (target >= 5x); "
          f"randaugment ratio {ours_ra / base_ra:.2f}x; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
