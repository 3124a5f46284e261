"""Does pairing by seed gain? Two configs' runs of the same seed share the init and the data order; pairing the
verdict's interval by seed gains power only if that makes their results correlated. Measured on the toy study
(Exp 4, its paper recipe, CPU, minutes): baseline and SES at N seeds each, then, per claim metric, Pearson's r of the
seed-matched values (log scale for the ratio metrics) with its 95 % interval (Fisher z), and the variance of the
per-seed difference against the sum of the variances Welch uses (pairing helps where this is well below 1).

    python bench/pairing.py --seeds 24 --out /tmp/pairing_out     # runs the missing seeds, then measures
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import seslib as S  # noqa: E402
import sesrun as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"kappa_mean": True, "kappa_std": True, "erank_dev": False}  # column -> judged on the log scale


def seed_values(df, config, col, log):
    sub = df[df["config"] == config].dropna(subset=[col]).set_index("seed")[col]
    return np.log(sub) if log else sub


def correlation(a, b):
    """(r, 95 % interval, n, var(a - b) / (var a + var b)) of the seed-matched values."""
    seeds = sorted(set(a.index) & set(b.index))
    x, y = a.loc[seeds].to_numpy(float), b.loc[seeds].to_numpy(float)
    n = len(seeds)
    r = float(np.corrcoef(x, y)[0, 1])
    half = 1.96 / math.sqrt(n - 3)
    lo, hi = math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)
    ratio = float(np.var(x - y, ddof=1) / (np.var(x, ddof=1) + np.var(y, ddof=1)))
    return r, (lo, hi), n, ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--out", default="/tmp/pairing_out")
    a = ap.parse_args()
    nb = ROOT / "notebooks" / "04_toy_jacobian.ipynb"
    R.run_batch([nb], params={"all": {"seeds": list(range(42, 42 + a.seeds))}}, gpus="cpu", workers=2, out=a.out,
                log=lambda m: None)
    df = S.load_results(Path(a.out) / "04_toy_jacobian")
    print(f"| metric (toy study, {a.seeds} seeds) | r (same seed) | 95 % interval | var(paired diff) / var sum |")
    print("|---|---|---|---|")
    for col, log in METRICS.items():
        r, (lo, hi), n, ratio = correlation(seed_values(df, "ses", col, log), seed_values(df, "baseline", col, log))
        print(f"| {col}{' (log)' if log else ''} | {r:+.2f} | [{lo:+.2f}, {hi:+.2f}] | {ratio:.2f} |")


if __name__ == "__main__":
    main()
