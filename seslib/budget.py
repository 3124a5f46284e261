"""What seeds buy: the power of every claim before any run (`python sesrun.py power`), and the runs that settle the
most claims within a Kaggle budget (`python sesrun.py plan --budget 30h`), each identical run counted once."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .util import atomic_write_bytes, format_hours
from .runs import normal_form
from .estimates import gpu_speed, run_estimate
from .results import plan_results
from .claims import IMPLEMENTATION_METRICS, claim_configs
from .power import MAX_SEEDS, claim_power, model_family, power_cells, seed_sd, seeds_needed
from .reports import summary_claims
from .notebook import PAPER_SEEDS
from .batch import find_notebooks, preset_folder
from .calibration import calibrated
from .planning import (KAGGLE, format_schedule, kaggle_weeks, makespan, notebook_plan, placed_seconds,
                       run_placements)

# Seeds beyond the paper's three, in the order a plan adds them (fixed before any result is seen).
EXTRA_SEEDS = tuple(s for s in range(1, 200) if s not in PAPER_SEEDS)
ACROSS = "across notebooks"


def seed_list(n, first=()) -> list:
    """The first n seeds: a notebook's own (`first`, its parameters cell's: Exp 4's 42, 43, 44), then the paper's 42,
    123, 7, then 1, 2, 3, ...: its runs already done are the plan's first seeds, not runs it would leave unused."""
    return list(dict.fromkeys([*first, *PAPER_SEEDS, *EXTRA_SEEDS]))[:n]


@dataclasses.dataclass
class NotebookCost:
    """What one seed of each of a notebook's configs costs, and what makes two runs the same run."""
    stem: str
    runs: dict  # config -> (wall seconds, GPUs held) of one seed on the planned GPU
    keys: dict  # config -> its normal form without the seed (runs.normal_form): equal keys, equal runs
    families: dict  # config -> model family (its seed SDs)
    df: object  # our results (the measured seed SDs)
    done: set  # (config, seed) of the runs done under the outputs root: they cost nothing more
    first_seeds: tuple = ()  # the notebook's own seeds (its parameters cell), the first a plan gives it

    def seed_list(self, n) -> list:
        return seed_list(n, self.first_seeds)


@dataclasses.dataclass
class ClaimNeed:
    """One claim and the (notebook, config) pairs it reads."""
    where: str
    claim: dict
    configs: list
    family: str
    df: object


def catalogue(notebooks="all", gpu="t4", gpus=2, out="outputs", preset="paper", cal=None):
    """({stem: NotebookCost}, [ClaimNeed]) over the notebooks' claims, then SUMMARY_CLAIMS whose notebooks are all
    among them (their values: each notebook's results, configs as 'NN_notebook/config'); cal: a Calibration whose
    measured times, DDP efficiency and usable memory replace the assumed ones."""
    import pandas as pd
    gpu_speed(gpu)
    costs, needs = {}, []
    for nb in find_notebooks(notebooks):
        plan = notebook_plan(nb, preset=preset, out_dir=str(preset_folder(Path(out).resolve(), preset) / nb.stem))
        costs[nb.stem] = _notebook_cost(nb.stem, plan, gpu, gpus, cal)
        cost = costs[nb.stem]
        for c in plan.claims or []:
            fam = next((cost.families[x] for x in claim_configs(c) if x in cost.families), "cnn")
            needs.append(ClaimNeed(nb.stem, c, [(nb.stem, x) for x in claim_configs(c)], fam, cost.df))
    values = pd.concat([k.df.assign(config=k.stem + "/" + k.df["config"].astype(str)) for k in costs.values()
                        if len(k.df)] or [pd.DataFrame()], ignore_index=True)
    for c in summary_claims():
        pairs = [tuple(x.split("/", 1)) for x in claim_configs(c)]
        if all(stem in costs for stem, _ in pairs):
            fam = costs[pairs[0][0]].families.get(pairs[0][1], "cnn")
            needs.append(ClaimNeed(ACROSS, c, pairs, fam, values))
    return costs, needs


def _notebook_cost(stem, plan, gpu, gpus, cal=None) -> NotebookCost:
    places = run_placements(plan.runs, gpu, gpus, cal)
    runs, keys, families = {}, {}, {}
    for r in plan.runs:
        if r.config in runs or r.cfg is None:
            continue
        est = run_estimate(dataclasses.replace(r, status="todo"), plan.paper, plan.paper_gpu, gpu, calibrated(cal, gpu))
        runs[r.config] = placed_seconds(est, places.get(r.config), cal)
        keys[r.config] = json.dumps({k: v for k, v in normal_form(r.cfg).items() if k != "seed"}, sort_keys=True,
                                    default=str)
        families[r.config] = model_family(r.cfg.get("model"))
    df, _ = plan_results(plan)
    return NotebookCost(stem, runs, keys, families, df, {(r.config, r.seed) for r in plan.runs if r.done},
                        tuple(dict.fromkeys(r.seed for r in plan.runs)))


def _run_set(costs, picks) -> dict:
    """{(config key, seed): (wall seconds, GPUs)} of picks {(stem, config): seeds}: an identical run once."""
    out = {}
    for (stem, config), n in picks.items():
        for s in costs[stem].seed_list(n):
            done = (config, s) in costs[stem].done
            out.setdefault((costs[stem].keys[config], s), (0.0, 1) if done else costs[stem].runs[config])
    return out


def gpu_hours(runs: dict) -> float:
    return sum(sec * k for sec, k in runs.values()) / 3600


# ── python sesrun.py power ──

def power_table(costs, needs, seeds):
    """One row per claim: the paper's value, the seed SD used and its source, the power at `seeds` seeds, the seeds
    for 80 % and what those seeds cost in GPU-hours (the claim's configs; an identical run once)."""
    import pandas as pd
    rows = []
    for need in needs:
        cells = power_cells(need.claim, seeds, need.df, need.family)
        n = cells["seeds for 80 %"]
        hours = gpu_hours(_run_set(costs, {p: n for p in need.configs})) if isinstance(n, int) else None
        rows.append({"notebook": need.where, "claim": need.claim["text"], "kind": need.claim["kind"],
                     "paper": need.claim["paper"], "power": cells["power"], "seeds for 80 %": n,
                     "GPU-h for them": hours, "seed SD used": cells["seed SD used"]})
    return pd.DataFrame(rows)


def format_power(df, seeds, gpu) -> str:
    settled = df["power"].fillna(0)
    lines = [f"power of each claim at {seeds} seed(s) per config: how often the report would read 'reproduced' if "
             f"the paper is right (the verdict rule simulated, Welch; {len(df)} claims)",
             f"{'notebook':<26} {'power':>5} {'seeds 80%':>9} {gpu + '-h':>8}  claim  [seed SD used]"]
    for r in df.to_dict("records"):
        n, h = r["seeds for 80 %"], r["GPU-h for them"]
        p = "-" if r["power"] is None or r["power"] != r["power"] else f"{100 * r['power']:.0f} %"
        n = n if isinstance(n, int) else "-" if n == "—" else f">{MAX_SEEDS}"
        h = "-" if h is None or h != h else f"{h:.1f}"
        lines.append(f"{r['notebook'][:26]:<26} {p:>5} {n:>9} {h:>8}  {r['claim'][:90]}  [{r['seed SD used'][:60]}]")
    reach = df["seeds for 80 %"].map(lambda v: isinstance(v, int))
    lines.append(f"at {seeds} seeds: {(settled >= 0.8).sum()} of {len(df)} claims have >= 80 % power, "
                 f"{settled.sum():.1f} expected 'reproduced' if the paper is right everywhere; "
                 f"{reach.sum()} reach 80 % within {MAX_SEEDS} seeds; "
                 f"{(df['seeds for 80 %'] == f'not reachable below {MAX_SEEDS}').sum()} do not; "
                 f"{(df['seeds for 80 %'] == '—').sum()} have no power (time claims: implementation differs; "
                 "or no seed SD known yet)")
    return "\n".join(lines)


# ── python sesrun.py plan --budget 30h ──

@dataclasses.dataclass
class BudgetPlan:
    picks: dict  # (stem, config) -> seeds
    chosen: list  # [(ClaimNeed, seeds, power)]
    left: list  # [(ClaimNeed, why)]
    runs: dict  # _run_set(picks)
    expected: float  # expected claims read "reproduced" if the paper is right (sum of powers)
    wall_h: float
    weeks: list  # kaggle_weeks
    first_seeds: dict = dataclasses.field(default_factory=dict)  # stem -> NotebookCost.first_seeds


def quota_hours(wall_h, charge, version_h=11.5) -> float:
    """The weekly-quota hours a plan of wall_h work uses: every version's work and its overhead, at `charge`."""
    return charge * sum(h + KAGGLE["overhead_hours"] for week in kaggle_weeks(wall_h, version_h, charge)
                        for h in week)


def budget_plan(costs, needs, budget_h, gpus=2, charge=1.0, max_seeds=10) -> BudgetPlan:
    """The claims to settle within budget_h of quota: greedily, the claim with the most power per extra GPU-hour
    at the seeds it needs for 80 % (shared runs counted once), while the plan's wall time on `gpus` GPUs fits."""
    sources = {id(n): seed_sd(n.claim, n.df, n.family) for n in needs}
    sds = {k: sd for k, (sd, _) in sources.items()}
    want, left = [], []
    for need in needs:
        n = seeds_needed(need.claim, sds[id(need)], max_seeds=max_seeds)
        if n is None:
            left.append((need, _unreachable_why(need, *sources[id(need)], max_seeds)))
        else:
            want.append((need, n, claim_power(need.claim, sds[id(need)], n)))
    picks, chosen = {}, []
    while want:
        base = gpu_hours(_run_set(costs, picks))
        scored = []
        for i, (need, n, power) in enumerate(want):
            trial = _with(picks, need, n)
            scored.append((power / max(gpu_hours(_run_set(costs, trial)) - base, 1e-3), i, trial))
        for _, i, trial in sorted(scored, key=lambda x: -x[0]):
            if quota_hours(_wall(costs, trial, gpus), charge) <= budget_h:
                picks = trial
                chosen.append(want.pop(i))
                break
        else:
            break
    left += [(need, f"does not fit the budget (needs {n} seeds)") for need, n, _ in want]
    wall = _wall(costs, picks, gpus)
    expected = sum(claim_power(n.claim, sds[id(n)], _seeds_of(picks, n)) or 0.0 for n in needs if sds[id(n)]
                   is not None and _seeds_of(picks, n) >= 1)
    return BudgetPlan(picks, chosen, left, _run_set(costs, picks), expected, wall, kaggle_weeks(wall, 11.5, charge),
                      {stem: c.first_seeds for stem, c in costs.items()})


def _with(picks, need, n) -> dict:
    """picks with the claim's configs at >= n seeds; a notebook runs all its picked configs at one seed count (its
    params: configs x seeds), so raising one raises them all, and the cost counts what the batch will run."""
    out = dict(picks)
    for stem, config in need.configs:
        out[stem, config] = n
    for stem in {s for s, _ in need.configs}:
        top = max(v for (s, _), v in out.items() if s == stem)
        out.update({(s, c): top for (s, c) in out if s == stem})
    return out


def _wall(costs, picks, gpus) -> float:
    return makespan(list(_run_set(costs, picks).values()), gpus) / 3600 if picks else 0.0


def _seeds_of(picks, need) -> int:
    """The seeds a claim gets from a plan: its least-run config's."""
    return min(picks.get(p, 0) for p in need.configs)


def _unreachable_why(need, sd, source, max_seeds) -> str:
    if need.claim["metric"] in IMPLEMENTATION_METRICS:
        return "a time claim: our implementation differs from the author's (not comparable)"
    if sd is None:
        return source
    return f"not reachable at {max_seeds} seeds (power {100 * claim_power(need.claim, sd, max_seeds):.0f} %)"


def budget_params(plan: BudgetPlan) -> dict:
    """The plan as a batch params file: {notebook: {configs: [...], seeds: [...]}} (a notebook's seeds: the most any
    of its chosen claims needs; its other configs run them too, so every claim it reads gets them)."""
    out = {}
    for (stem, config), n in sorted(plan.picks.items()):
        nb = out.setdefault(stem, {"configs": [], "seeds": []})
        nb["configs"].append(config)
        nb["seeds"] = seed_list(max(len(nb["seeds"]), n), plan.first_seeds.get(stem, ()))
    return out


def format_budget(plan: BudgetPlan, budget_h, gpus, gpu, charge) -> str:
    n_runs, hours = len(plan.runs), gpu_hours(plan.runs)
    lines = [f"within {budget_h:g} h of the weekly GPU quota on {gpus} x {gpu} (a session-hour counted "
             f"{'once' if charge == 1 else f'{charge:g} times'}): {len(plan.chosen)} claims chosen, {n_runs} runs, "
             f"{format_hours(hours * 3600, approx=True)} of {gpu} time, wall {format_hours(plan.wall_h * 3600, approx=True)}"
             f" in {sum(map(len, plan.weeks))} version(s): {format_schedule(plan.weeks)}",
             f"expected 'reproduced' if the paper is right: {plan.expected:.1f} claims (the sum of their powers; "
             "claims whose configs the plan runs for other claims count too)", "runs (notebook: configs x seeds):"]
    for stem, p in budget_params(plan).items():
        lines.append(f"  {stem}: {', '.join(p['configs'])} x seeds {p['seeds']}")
    lines.append("claims it settles (seeds, power):")
    lines += [f"  {need.where}: {need.claim['text'][:100]} ({n}, {100 * power:.0f} %)"
              for need, n, power in plan.chosen]
    lines.append(f"claims left ({len(plan.left)}), and why:")
    lines += [f"  {need.where}: {need.claim['text'][:100]}: {why}" for need, why in plan.left]
    return "\n".join(lines)


def write_params(path, params: dict):
    """The plan as YAML, for `python sesrun.py batch all --params FILE` and the Kaggle driver's --params."""
    import yaml
    atomic_write_bytes(Path(path), yaml.safe_dump(params, sort_keys=False).encode())
