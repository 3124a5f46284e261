"""The power of a claim: how often the verdict rule reads "reproduced" when the paper is right, by simulating the
very rule the reports use (claims.claim_verdict on Welch intervals) on thousands of experiments at once; the seed SD
that simulation assumes, and where it comes from; the seeds a claim needs for 80 % power."""
from __future__ import annotations

import math
import zlib

import numpy as np

from .util import read_only
from .claims import (CLAIM_METRICS, DETERMINISTIC_METRICS, IMPLEMENTATION_METRICS, LOG_KINDS, VERDICTS,
                     _seed_values, claim_configs, claim_verdict, f_interval, per_seed_contrast, t_interval, welch)


POWER_TRIALS = 2000  # simulated experiments per (claim, seeds): the share's Monte-Carlo SE is <= 1.1 pp
POWER_TARGET = 0.80
MAX_SEEDS = 20  # "not reachable below 20 seeds"
# The seed SD a claim's simulation assumes where the paper published none for its configs, per metric and model
# family, with where the number comes from. A family missing here borrows the CNN figure and says so.
POOLED_SD = read_only({
    "acc": {"cnn": (0.19, "RMS of the paper's 4 accuracy seed SDs (Exp 5: 0.10, 0.23; Exp 6: 0.26, 0.10)")},
    "rob": {"cnn": (0.34, "RMS of the paper's 4 robustness seed SDs (Exp 5: 0.60, 0.26; Exp 6: 0.09, 0.13)")},
    "gap": {"cnn": (0.24, "RMS of the paper's 2 gap seed SDs (Exp 6: 0.31, 0.14)")},
})
_REUSED_SD = {"rob_": "rob"}  # per-corruption robustness: the mean's pool (per-corruption SDs are larger: optimistic)


def model_family(model) -> str:
    """'cnn', 'vit', 'bert' or 'toy': the family whose seed SDs a model's claims borrow."""
    m = str(model or "")
    return "vit" if m.startswith("vit") else "bert" if "bert" in m else "toy" if m == "mlp_toy" else "cnn"


def seed_sd(c, df=None, family="cnn"):
    """(seed SD, where it comes from) for a checked claim, on the scale its statistic is judged (log for ratios; an
    SD ratio's simulation is scale-free): ours where >= 2 seeds of its configs exist in df, else the paper's own,
    else POOLED_SD for the metric and family; (None, why) when none is known."""
    if c["metric"] in DETERMINISTIC_METRICS:
        return 0.0, "deterministic: one run decides"
    if c["kind"] == "sd_ratio":
        return 1.0, "an SD ratio's interval does not depend on the scale"
    log = c["kind"] in LOG_KINDS
    measured = _measured_sd(c, df, log) if df is not None else None
    if measured:
        return measured
    if c["paper_sd"] is not None:
        sd, why = c["paper_sd"], "the paper's own (its seed table)"
    else:
        pool = POOLED_SD.get(next((v for k, v in _REUSED_SD.items() if c["metric"].startswith(k)), c["metric"]), {})
        if not pool:
            return None, f"no seed SD is published for {c['metric']}: known once our runs have 2 seeds"
        sd, why = pool.get(family) or pool["cnn"]
        why = why if family in pool else f"assumed: no {family} SD is published, the CNN one ({why})"
    if log:
        if not c.get("level"):
            return None, f"{why}, but no paper level to make it relative"
        return sd / abs(c["level"]), f"{why}, relative to the paper's {c['level']:g}"
    return sd, why


def _measured_sd(c, df, log):
    """Our pooled seed SD over the claim's configs that ran >= 2 seeds, on the paper's metric definition."""
    col = CLAIM_METRICS[c["metric"]][0]
    variances, n = [], 0
    for name in claim_configs(c):
        vals = [v for v in _seed_values(df, name, col).values() if not log or v > 0]
        if len(vals) >= 2:
            variances.append(float(np.var(np.log(vals) if log else vals, ddof=1)))
            n = max(n, len(vals))
    if not variances:
        return None
    return math.sqrt(float(np.mean(variances))), f"ours, measured over {n} seeds"


def _simulated_terms(c):
    """[weight, ...] of the configs the simulation draws; the first carries the true effect. A best / near_best
    claim is simulated against its nearest rival only, a spread as its two extreme configs."""
    if c["terms"]:
        return list(c["terms"].values())
    higher = CLAIM_METRICS[c["metric"]][3]
    if c["kind"] in ("best", "near_best"):
        sign = 1.0 if higher else -1.0
        return [sign, -sign]
    if c["kind"] in ("at_most", "tie") and not c["b"]:
        return [1.0]
    return [1.0, -1.0]


def simulate_claim(c, sd, seeds, true=None, trials=POWER_TRIALS, seed=None, paired=False):
    """The verdict codes (indices into VERDICTS) of `trials` simulated experiments of claim c at `seeds` seeds each,
    normal seed noise of SD sd on the judged scale, the statistic's true value `true` (default: the paper's own
    value). The same interval and rule code judge_claim uses."""
    true = c["observed"] if true is None else true
    if true is None:
        true = c["paper"]  # a bound without the paper's own value: simulated at the bound
    rng = np.random.default_rng(zlib.crc32(c["text"].encode()) if seed is None else seed)
    w = np.array(_simulated_terms(c))
    means, sds = np.zeros(len(w)), np.full(len(w), float(sd))
    if c["kind"] == "sd_ratio":
        sds[0] *= true
    else:
        means[0] = (math.log(true) if c["kind"] in LOG_KINDS else true) / w[0]
    x = rng.normal(means[:, None], sds[:, None], size=(trials, len(w), seeds))
    if c["kind"] == "sd_ratio":
        iv = f_interval(x[:, 0].var(-1, ddof=1), x[:, 1].var(-1, ddof=1), seeds, seeds)
    elif paired:
        iv = t_interval(*per_seed_contrast((w[None, :, None] * x).sum(1)), seeds, True)
    else:
        iv = t_interval(*welch(x.mean(-1), x.var(-1, ddof=1) if seeds > 1 else np.full(x.shape[:2], np.nan),
                                np.full(len(w), seeds), w), seeds)
    return claim_verdict(c, iv)


def verdict_shares(codes) -> dict:
    """{verdict: share} of simulated verdict codes."""
    counts = np.bincount(np.asarray(codes).ravel(), minlength=len(VERDICTS))
    return {v: float(k) / max(1, counts.sum()) for v, k in zip(VERDICTS, counts)}


def claim_power(c, sd, seeds, **kw) -> float | None:
    """The share of simulated experiments that read "reproduced" when the paper is right; None when the claim is not
    judged on our runs (time: implementation differs) or no SD is known."""
    if sd is None or c["metric"] in IMPLEMENTATION_METRICS:
        return None
    if c["metric"] in DETERMINISTIC_METRICS:
        seeds = max(seeds, 2)  # judge_claim needs no second seed where nothing varies
    return verdict_shares(simulate_claim(c, sd, seeds, **kw))["reproduced"]


def seeds_needed(c, sd, target=POWER_TARGET, max_seeds=MAX_SEEDS) -> int | None:
    """The fewest seeds (per config) with power >= target, or None when not reachable at max_seeds."""
    if sd is None or c["metric"] in IMPLEMENTATION_METRICS:
        return None
    if c["metric"] in DETERMINISTIC_METRICS:
        return 1 if claim_power(c, sd, 2) >= target else None
    if claim_power(c, sd, max_seeds) < target:
        return None
    lo, hi = 1, max_seeds  # power grows with seeds: bisect (lo fails, hi meets the target)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if claim_power(c, sd, mid) >= target else (mid, hi)
    return hi


def power_cells(c, seeds, df=None, family="cnn") -> dict:
    """The power columns of a claim's row: at `seeds` seeds, the seeds for 80 %, and the SD with its source."""
    sd, source = seed_sd(c, df, family)
    if c["metric"] in IMPLEMENTATION_METRICS:
        return {"power": None, "seeds for 80 %": "—", "seed SD used": "not comparable: implementation differs"}
    need = seeds_needed(c, sd)
    return {"power": None if sd is None else round(float(claim_power(c, sd, max(1, int(seeds)))), 3),
            "seeds for 80 %": "—" if sd is None else need if need else f"not reachable below {MAX_SEEDS}",
            "seed SD used": source if sd is None else f"{sd:.3g} ({source})"}


def with_power(table, claims, df):
    """The claims table with each claim's power beside its verdict: at the seeds it was judged on (at least the
    paper's 3 where it has fewer, so a 1-seed smoke report still says what 3 seeds would give), the seeds for 80 %,
    and the seed SD used. An "inconclusive" then says whether more seeds could settle it."""
    if table is None or not len(table):
        return table
    families = {}
    if "model" in df:
        families = {c: model_family(m) for c, m in df.dropna(subset=["model"]).groupby("config")["model"].first().items()}
    rows = []
    for c, seeds in zip(claims, table["seeds"]):
        family = next((families[x] for x in (c["a"], c["b"], *(c["terms"] or {})) if x in families), "cnn")
        rows.append(power_cells(c, max(3, int(seeds or 0)), df, family))
    out = table.copy()
    at = list(out.columns).index("verdict (headline)") + 1
    for i, key in enumerate(("power", "seeds for 80 %", "seed SD used")):
        out.insert(at + i, key if key != "power" else "power (at max(seeds, 3))", [r[key] for r in rows])
    return out
