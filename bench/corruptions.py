"""Corruption throughput: seslib.corrupt (batched torch) vs the original generator's approach (a per-image
NumPy/PIL/SciPy loop with the same make_cifar_c.py parameters), 15 corruptions x 5 severities, same process.

    python bench/corruptions.py [--n 1000] [--baseline-n 1000] [--device cpu|cuda] [--threads T]
                                [--original /path/to/make_cifar_c.py]

--original also times Hendrycks' own distortion functions, exec'd unchanged from that file (it needs the original's
dependencies: scikit-image < 0.20 for `multichannel=`, Wand + ImageMagick, OpenCV), in this process, per image.

On a loaded 2-core machine pass --threads 1: torch's intra-op threads then fight the other processes
(measured 5x slower per op at load 5 with 2 threads).

Images/s counts corrupted images produced (an image at one severity = one image). Real CIFAR-10 test
images from $SES_DATA (or ../shared/data)."""
import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import seslib as S  # noqa: E402

# ─── the baseline: make_cifar_c.py's functions, per image (ImageMagick/cv2 parts in NumPy/SciPy) ────
from scipy.ndimage import affine_transform, correlate, map_coordinates, zoom as scizoom  # noqa: E402
from skimage.color import hsv2rgb, rgb2hsv  # noqa: E402
from skimage.filters import gaussian  # noqa: E402

P = {n: [S.corruption_params(n, s, 32) for s in range(1, 6)] for n in S.CORRUPTIONS}


def clipped_zoom(img, z):
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    t = (img.shape[0] - h) // 2
    return img[t:t + h, t:t + h]


def motion(x, radius, sigma, angle):  # ImageMagick's MotionBlurImage kernel, NumPy (as imagecorruptions does)
    width = 2 * int(np.ceil(radius)) + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    H, W = x.shape[:2]
    out = np.zeros(x.shape, np.float64)
    for i in range(width):
        oy, ox = int(np.ceil(i * np.sin(np.deg2rad(angle)) - .5)), int(np.ceil(i * np.cos(np.deg2rad(angle)) - .5))
        out += k[i] * x[np.clip(np.arange(H) + oy, 0, H - 1)][:, np.clip(np.arange(W) + ox, 0, W - 1)]
    return np.floor(np.round(out * 257) / 257)  # ImageMagick Q16's 8-bit output: the 16-bit quantum truncated


def plasma_fractal(mapsize=32, wibbledecay=3):
    m = np.zeros((mapsize, mapsize))
    step, wib = mapsize, 100.
    while step >= 2:
        h = step // 2
        c = m[0::step, 0::step]
        sq = c + np.roll(c, -1, 0)
        sq += np.roll(sq, -1, 1)
        m[h::step, h::step] = sq / 4 + wib * np.random.uniform(-wib, wib, sq.shape)
        dr, ul = m[h::step, h::step], m[0::step, 0::step]
        t = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
        m[0::step, h::step] = t / 4 + wib * np.random.uniform(-wib, wib, t.shape)
        t = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
        m[h::step, 0::step] = t / 4 + wib * np.random.uniform(-wib, wib, t.shape)
        step //= 2
        wib /= wibbledecay
    m -= m.min()
    return m / m.max()


FROST = None


def frost_images():
    global FROST
    if FROST is None:
        import importlib.util  # the texture photos of the imagecorruptions package (never imported)
        d = Path(list(importlib.util.find_spec("imagecorruptions").submodule_search_locations)[0]) / "frost"
        FROST = [np.asarray(Image.open(d / f).convert("RGB").resize(
            (round(Image.open(d / f).size[0] * .2), round(Image.open(d / f).size[1] * .2)), Image.BILINEAR))
            for f in ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")]
    return FROST


def disk(radius, alias_blur):
    L = np.arange(-8, 9)
    X, Y = np.meshgrid(L, L)
    d = np.array((X ** 2 + Y ** 2) <= radius ** 2, dtype=np.float32)
    d /= d.sum()
    k = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))
    return correlate(d, np.outer(k, k) / k.sum() ** 2, mode="mirror")


def base(name, x, s):  # x: HxWx3 uint8 -> HxWx3 uint8, one image
    c = P[name][s - 1]
    f = x / 255.
    if name == "gaussian_noise":
        r = f + np.random.normal(size=f.shape, scale=c)
    elif name == "shot_noise":
        r = np.random.poisson(f * c) / c
    elif name == "impulse_noise":
        flip, salt = np.random.random(f.shape) <= c, np.random.random(f.shape) <= .5
        r = f.copy()
        r[flip & salt], r[flip & ~salt] = 1, 0
    elif name == "defocus_blur":
        k = disk(*c)
        r = np.stack([correlate(f[:, :, d], k, mode="mirror") for d in range(3)], -1)
    elif name == "glass_blur":
        y = np.uint8(gaussian(f, sigma=c[0], channel_axis=-1) * 255)
        for _ in range(c[2]):
            for h in range(32 - c[1], c[1], -1):
                for w in range(32 - c[1], c[1], -1):
                    dx, dy = np.random.randint(-c[1], c[1], size=(2,))
                    # the original's line, on NumPy views: a one-way copy y[h, w] <- y[h + dy, w + dx]
                    y[h, w], y[h + dy, w + dx] = y[h + dy, w + dx], y[h, w]
        r = gaussian(y / 255., sigma=c[0], channel_axis=-1)
    elif name == "motion_blur":
        return np.clip(motion(x.astype(np.float64), c[0], c[1], np.random.uniform(-45, 45)), 0, 255).astype(np.uint8)
    elif name == "zoom_blur":
        f = f.astype(np.float32)
        r = (f + sum(clipped_zoom(f, z) for z in c)) / (len(c) + 1)
    elif name == "snow":
        f = f.astype(np.float32)
        layer = clipped_zoom(np.random.normal(size=(32, 32, 1), loc=c[0], scale=c[1]), c[2])
        layer[layer < c[3]] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
        layer = motion(layer.astype(np.float64), c[4], c[5], np.random.uniform(-135, -45)) / 255.
        grey = (f @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        f = c[6] * f + (1 - c[6]) * np.maximum(f, grey * 1.5 + 0.5)
        r = f + layer + np.rot90(layer, k=2)
    elif name == "frost":
        fr = frost_images()[np.random.randint(5)]
        x0, y0 = np.random.randint(0, fr.shape[0] - 32), np.random.randint(0, fr.shape[1] - 32)
        return np.uint8(np.clip(c[0] * x + c[1] * fr[x0:x0 + 32, y0:y0 + 32], 0, 255))
    elif name == "fog":
        mx = f.max()
        r = (f + c[0] * plasma_fractal(wibbledecay=c[1])[:32, :32, None]) * mx / (mx + c[0])
    elif name == "brightness":
        h = rgb2hsv(f)
        h[:, :, 2] = np.clip(h[:, :, 2] + c, 0, 1)
        r = hsv2rgb(h)
    elif name == "contrast":
        m = f.mean((0, 1), keepdims=True)
        r = (f - m) * c + m
    elif name == "elastic_transform":
        f = f.astype(np.float32)
        cs, sq = np.float32([16, 16]), 10
        p1 = np.float32([cs + sq, [cs[0] + sq, cs[1] - sq], cs - sq])
        p2 = p1 + np.random.uniform(-c[2], c[2], size=p1.shape).astype(np.float32)
        A = np.linalg.solve(np.c_[p1, np.ones(3)], p2)  # cv2.getAffineTransform
        Minv = np.linalg.inv(np.r_[A.T, [[0, 0, 1]]])
        M = Minv[[1, 0]][:, [1, 0, 2]]  # to (row, col) order for scipy
        f = np.stack([affine_transform(f[:, :, d], M[:, :2], M[:, 2], order=1, mode="mirror") for d in range(3)], -1)
        dx = gaussian(np.random.uniform(-1, 1, size=(32, 32)), c[1], mode="reflect", truncate=3) * c[0]
        dy = gaussian(np.random.uniform(-1, 1, size=(32, 32)), c[1], mode="reflect", truncate=3) * c[0]
        yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
        r = np.stack([map_coordinates(f[:, :, d], (yy + dy, xx + dx), order=1, mode="reflect") for d in range(3)], -1)
    elif name == "pixelate":
        im = Image.fromarray(x).resize((int(32 * c), int(32 * c)), Image.BOX)
        return np.asarray(im.resize((32, 32), Image.BOX))
    elif name == "jpeg_compression":
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=c)
        return np.asarray(Image.open(buf))
    return np.uint8(np.clip(r, 0, 1) * 255)


def load_cifar(n):
    root = os.environ.get("SES_DATA") or ROOT.parent / "shared" / "data"
    try:
        x, _ = S.load_dataset("cifar10", root, "test", download=False)
    except FileNotFoundError as e:
        sys.exit(str(e))
    return x.repeat(-(-n // len(x)), 1, 1, 1)[:n].contiguous()  # repeat if the copy is shorter than n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--baseline-n", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--original", help="make_cifar_c.py of hendrycks/robustness, to time the original functions too")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    x = load_cifar(a.n).to(dev)
    xb = [im.permute(1, 2, 0).numpy() for im in x[:a.baseline_n].cpu()]
    np.random.seed(0)
    g = torch.Generator(device=dev).manual_seed(0)
    for n in S.CORRUPTIONS:  # warm-up: caches (zoom operator, frost textures, glass schedule), lazy inits
        S.corrupt(x[:8], n, 1, generator=g)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows, tot_t, tot_b = [], 0.0, 0.0
    print(f"{a.n} images (baseline on {a.baseline_n}), device {dev}, torch threads {torch.get_num_threads()}")
    print(f"{'corruption':18s} {'batched img/s':>14s} {'per-image img/s':>16s} {'speed-up':>9s}")
    for n in S.CORRUPTIONS:
        sync()
        t0 = time.perf_counter()
        for s in range(1, 6):
            S.corrupt(x, n, s, generator=g)
        sync()
        t = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(1, 6):
            for im in xb:
                base(n, im, s)
        b = time.perf_counter() - t0
        tot_t, tot_b = tot_t + t, tot_b + b
        rt, rb = 5 * a.n / t, 5 * a.baseline_n / b
        rows.append((n, rt, rb))
        print(f"{n:18s} {rt:14.0f} {rb:16.0f} {rt / rb:8.1f}x", flush=True)
    rt, rb = 75 * a.n / tot_t, 75 * a.baseline_n / tot_b
    print(f"{'15 x 5 sweep':18s} {rt:14.0f} {rb:16.0f} {rt / rb:8.1f}x")
    print(f"sweep time: batched {tot_t:.2f} s for {75 * a.n} images; per-image {tot_b:.2f} s for {75 * a.baseline_n}")
    if a.original:
        fns = original_functions(a.original)
        t0 = time.perf_counter()
        for n in S.CORRUPTIONS:
            for s in range(1, 6):
                for im in xb:
                    np.uint8(fns[n](Image.fromarray(im), s))  # what make_cifar_c.py stores
        ro = 75 * a.baseline_n / (time.perf_counter() - t0)
        print(f"{'original code':18s} {rt:14.0f} {ro:16.0f} {rt / ro:8.1f}x   (make_cifar_c.py's own functions, "
              f"per image; our NumPy stand-in above is {rb / ro:.1f}x faster than it)")


def original_functions(path):
    """The distortion functions of make_cifar_c.py, its source between 'Distortion Helpers' and 'End Distortions'
    exec'd unchanged (frost reads ./frost*.png: run from the file's folder)."""
    src = Path(path).read_text()
    body = src[src.index("# /////////////// Distortion Helpers"):src.index("# /////////////// End Distortions")]
    ns = {"np": np, "Image": Image, "os": os}
    cwd = os.getcwd()
    os.chdir(Path(path).resolve().parent)
    try:
        exec(compile(body, str(path), "exec"), ns)
    finally:
        os.chdir(cwd)
    names = {"gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
             "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"}
    fns = {n: ns[n] for n in names}

    def frost(x, s, _f=ns["frost"], _d=Path(path).resolve().parent):  # its relative './frost1.png' paths
        here = os.getcwd()
        os.chdir(_d)
        try:
            return _f(x, s)
        finally:
            os.chdir(here)
    fns["frost"] = frost
    return fns


if __name__ == "__main__":
    main()
