"""The cost plan (`python sesrun.py plan`): each notebook's runs, their T4 hours, placement, Kaggle versions and weeks."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from .util import format_hours, parse_duration, read_only
from .data import dataset_info
from .models import build_model, text_model_bytes
from .runs import run_key
from .estimates import checkpoint_bytes, gpu_speed, placeable, placement, run_estimate
from .notebook import resolve_seeds
from .batch import find_notebooks, preset_folder, read_notebook
from .calibration import calibrated, calibration_lines, ddp_efficiency, usable_memory


# python sesrun.py plan

KAGGLE = read_only({"version_hours": 12.0, "quota_hours": 30.0, "working_gb": 20.0,  # a version's limit, GPU quota
                    "overhead_hours": 0.25})  # per week, /kaggle/working's size; per version: setup, installs, reports
# What one hour of a T4 x2 session costs of the weekly quota. Assumed once: Kaggle's quota counts the time a session
# holds its accelerator ("the counter starts the moment you initialize your Notebook", The Kaggle Book, ch. 4;
# Kaggle's own settings page shows one "GPU" quota for P100 and T4 x2 alike). If your account shows it draining twice
# as fast on T4 x2, plan with --quota-counts per-gpu.
QUOTA_COUNTS = read_only({"once": 1.0, "per-gpu": None})  # None: charged once per GPU of the session


def notebook_plan(nb, **params):
    """A notebook's own RunPlan: its parameters cell, `params` injected after it as papermill would, then its cells
    up to the S.plan_runs call, executed here (nothing trains, nothing is written)."""
    import io
    ns = {"__name__": "__notebook_plan__"}
    started = False
    with contextlib.redirect_stdout(io.StringIO()):
        for source, tags in read_notebook(nb).cells:
            if "parameters" in tags:
                started = True
                exec(source, ns)  # noqa: S102 - the notebook's own code, as papermill would run it
                ns.update(params)
                continue
            if started:
                exec(source, ns)  # noqa: S102
                if type(ns.get("plan")).__name__ == "RunPlan":
                    return ns["plan"]
    raise ValueError(f"{Path(nb).name}: no cell after the parameters cell creates `plan` with S.plan_runs")


def makespan(durations, slots) -> float:
    """Makespan of jobs on `slots` machines, longest first onto the least loaded (as the batch runner starts them).
    A job is seconds, or (seconds, k): a DDP run holding k machines at once, from when the k least loaded are free."""
    loads = [0.0] * max(1, slots)
    jobs = [d if isinstance(d, tuple) else (d, 1) for d in durations]
    for d, k in sorted(jobs, key=lambda j: j[0] * j[1], reverse=True):
        free = sorted(range(len(loads)), key=loads.__getitem__)[:min(k, len(loads))]
        start = max(loads[i] for i in free)
        for i in free:
            loads[i] = start + d
    return max(loads)


def run_placements(runs, gpu, gpus, cal=None) -> dict:
    """{config: placement} of the runs estimate_memory knows (one per config: the seed changes no memory); with a
    calibration measured on this GPU kind, at its measured usable memory."""
    out = {}
    for r in runs:
        c = r.cfg or {}
        if r.config not in out and placeable(c):
            out[r.config] = placement(c, gpu, gpus, usable_memory(cal, gpu))
    return out


def placed_seconds(est, where, cal=None):
    """A run's (wall seconds, GPUs it holds): a DDP run over k GPUs at DDP's efficiency (the calibration's measured
    one, else DDP_EFFICIENCY, assumed)."""
    k = where["gpus"] if where else 1
    return (est["seconds"] / (k * ddp_efficiency(cal)), k) if k > 1 else (est["seconds"], 1)


def _where_text(places) -> str:
    """A notebook's placements in a few words: '1 × t4 each', or each config that needs more (or does not fit)."""
    if not places:
        return "-"
    odd = {}
    for c, p in places.items():
        if p["gpus"] != 1:
            odd.setdefault(p["text"], []).append(c)
    return "; ".join(f"{', '.join(cs)}: {t}" for t, cs in odd.items()) if odd else \
        f"{next(iter(places.values()))['text']} each"


_PARAMS_CACHE = {}


def _model_bytes(c) -> int:
    """The float32 weights of c's model (model_final.pt), counted once per (model, classes, width)."""
    key = (c["model"], c.get("dataset"), c.get("width", 1.0), bool(c.get("spectral_norm")))
    if key not in _PARAMS_CACHE:
        if c["model"] == "mlp_toy":
            _PARAMS_CACHE[key] = 4 * 2000
        else:
            info = dataset_info(c["dataset"])
            with torch.device("meta"):  # shapes only: no memory, no time
                m = build_model(c["model"], info["num_classes"], info["img_size"], c.get("spectral_norm", False),
                                c.get("width", 1.0))
            _PARAMS_CACHE[key] = 4 * sum(p.numel() for p in m.state_dict().values())
    return _PARAMS_CACHE[key]


def cost_plan(notebooks="all", gpus=2, gpu="t4", out="outputs", preset="paper", budget="11.5h", seeds=None,
              quota_counts="once", cal=None):
    """Per notebook: runs (all / left), the GPU-hours left on `gpu` and where the estimate comes from; for the
    selection: wall time on `gpus` GPUs (longest first), Kaggle versions of `budget`, weeks of the 30-h quota, the
    disk footprint. Done runs (under `out`) count as done; cal: a Calibration (read_calibration) whose measured
    figures replace the assumed ones. Returns (per-notebook DataFrame, totals dict)."""
    import pandas as pd
    gpu_speed(gpu)
    seeds = resolve_seeds(seeds) if seeds else None  # every notebook's seeds ("paper3": 42, 123, 7), else its own
    budget_h = parse_duration(budget) / 3600
    rows, ests, final_bytes, ckpt_bytes, first, shared_h, models = [], [], 0, 0, {}, 0.0, set()
    for nb in find_notebooks(notebooks):
        out_dir = preset_folder(Path(out).resolve(), preset) / nb.stem
        plan = notebook_plan(nb, preset=preset, out_dir=str(out_dir), **({"seeds": seeds} if seeds else {}))
        left, shared = _first_needs(plan, nb.stem, first)  # a run another notebook also needs is counted once
        timed = calibrated(cal, gpu)
        est = [run_estimate(r, plan.paper, plan.paper_gpu, gpu, timed) for r in left]
        shared_h += sum(run_estimate(r, plan.paper, plan.paper_gpu, gpu, timed)["seconds"] for r in shared) / 3600
        places = run_placements(plan.runs, gpu, gpus, cal)
        placed = [placed_seconds(e, places.get(r.config), cal) for e, r in zip(est, left)]
        models |= {(r.cfg or {}).get("model") for r in left if placeable(r.cfg or {})}
        ests += [p for p in placed if p[1] > 0]  # a run that fits nowhere here is named, not scheduled
        for r in plan.runs:
            c = r.cfg or {}
            if c.get("kind") == "text" and (n := text_model_bytes(c)):  # Exp 22: weights + AdamW's 2 moments
                final_bytes += n if c.get("save_model") else 0
                ckpt_bytes = max(ckpt_bytes, 3 * n)
            elif placeable(c):
                final_bytes += _model_bytes(c) if c.get("save_model", True) else 0
                ckpt_bytes = max(ckpt_bytes, checkpoint_bytes(_model_bytes(c), c))
        rows.append({"notebook": nb.stem, "runs": len(plan.runs), "left": len(left), "shared": len(shared),
                     "gpu_hours": sum(sec * k for sec, k in placed) / 3600,
                     "source": ", ".join(sorted({e["source"] for e in est})) or "-",
                     "peak_gb": max((p["memory"]["peak_gb"] for p in places.values()), default=float("nan")),
                     "where": _where_text(places), "fits": all(p["gpus"] for p in places.values()),
                     "gpus_max": max((p["gpus"] for p in places.values()), default=1),
                     "need_each_gb": max((p["memory"]["need_per_gpu_gb"][p["gpus"]] for p in places.values()
                                          if p["gpus"] > 1), default=float("nan"))})
    df = pd.DataFrame(rows)
    wall_h = makespan(ests, gpus) / 3600
    charge = QUOTA_COUNTS[quota_counts] or float(gpus)
    weeks = kaggle_weeks(wall_h, max(budget_h, 1e-3), charge)
    disk_gb = (final_bytes + gpus * ckpt_bytes) / 1e9
    totals = {"gpu": gpu, "gpus": gpus, "gpu_hours": float(df["gpu_hours"].sum()) if len(df) else 0.0,
              "wall_hours": wall_h, "budget_hours": budget_h, "versions": sum(map(len, weeks)),
              "weeks": len(weeks), "schedule": weeks, "quota_counts": quota_counts, "charge": charge,
              "disk_gb": disk_gb, "disk_ok": disk_gb <= KAGGLE["working_gb"], "seeds": seeds,
              "shared_runs": int(df["shared"].sum()) if len(df) else 0, "shared_hours": shared_h,
              "calibration": calibration_lines(cal, gpu, sorted(m for m in models if m))}
    return df, totals


def _first_needs(plan, stem, first):
    """(this notebook's runs left to train, those an earlier notebook of the plan trains): `first` maps each
    runs.run_key to the notebook that needs it first (updated here)."""
    left, shared = [], []
    for r in plan.runs:
        if r.done:
            continue
        key = run_key(r.cfg)
        if key and first.setdefault(key, stem) != stem:
            shared.append(r)
        else:
            left.append(r)
    return left, shared


def kaggle_weeks(wall_h, budget_h, charge=1.0) -> list:
    """The work hours of each Kaggle version, week by week: versions of at most budget_h (+ the per-version
    overhead), packed into weeks of the GPU quota at `charge` quota hours per session hour; a week's last version is
    as long as the quota it has left allows (then --time-budget is that long), not a fixed two a week."""
    quota, overhead = KAGGLE["quota_hours"] / charge, KAGGLE["overhead_hours"]
    weeks, left = [], wall_h
    while left > 1e-6:
        week, room = [], quota
        while left > 1e-6 and room - overhead >= min(left, 0.5):  # a version shorter than 30 min is not worth it
            work = min(budget_h, left, room - overhead)
            week.append(work)
            left, room = left - work, room - work - overhead
        weeks.append(week)
    return weeks


def memory_cell(row, gpu="T4") -> str:
    """A notebook's peak memory and placement in a few words (the README's experiment table)."""
    if row.peak_gb != row.peak_gb:
        return "—"
    if not row.fits:
        return f"{row.peak_gb:.1f} GB: does not fit"
    k = row.gpus_max
    return f"{row.peak_gb:.1f} GB, 1 {gpu}" if k == 1 else \
        f"DDP over {k} {gpu}s: {row.need_each_gb:.1f} GB must fit on each ({row.peak_gb:.1f} GB on one)"


def format_schedule(weeks) -> str:
    """'week 1: 11.5 + 11.5 + 6.2 h; week 2: 6.0 h'."""
    return "; ".join(f"week {i}: " + " + ".join(f"{h:.1f}" for h in w) + " h" for i, w in enumerate(weeks, 1)) or "-"


def _charge_text(t) -> str:
    return "once, assumed: --quota-counts per-gpu if yours counts each GPU" if t["quota_counts"] == "once" else \
        f"{t['charge']:g} times (--quota-counts {t['quota_counts']})"


def format_plan(df, t) -> str:
    lines = list(t.get("calibration") or [])  # first: what the figures rest on, measured or assumed
    lines += [f"seeds {list(t['seeds'])} in every notebook"] if t.get("seeds") else []
    lines += [f"{'notebook':<28} {'runs':>4} {'left':>4} {'shared':>6} {'GPU-h left':>10} {'peak GB':>7}  "
              "estimate from; where"]
    for r in df.itertuples():
        gpu_h = format_hours(r.gpu_hours * 3600, approx=True)
        peak = f"{r.peak_gb:.1f}" if r.peak_gb == r.peak_gb else "-"
        lines.append(f"{r.notebook:<28} {r.runs:>4} {r.left:>4} {r.shared:>6} {gpu_h:>10} {peak:>7}  {r.source}; "
                     f"{r.where}")
    if len(df) and not df["fits"].all():
        lines.append("NOT ON THIS MACHINE: " + ", ".join(df.loc[~df["fits"], "notebook"]) + " (see 'where'; a bigger "
                     "GPU, or more of them: --gpus / --gpu)")
    lines += [
        f"total: {format_hours(t['gpu_hours'] * 3600, approx=True)} of {t['gpu']} GPU time; wall time on {t['gpus']} x "
        f"{t['gpu']}: {format_hours(t['wall_hours'] * 3600, approx=True)} (longest runs first)",
        *([f"shared: {t['shared_runs']} run(s) that two notebooks need are trained once (the first notebook trains, "
           f"the others read its result): {format_hours(t['shared_hours'] * 3600, approx=True)} of {t['gpu']} time "
           "not counted twice"] if t["shared_runs"] else []),
        f"Kaggle: {t['versions']} version(s) of at most --time-budget {t['budget_hours']:g}h (a version stops at "
        f"{KAGGLE['version_hours']:g} h) in {t['weeks']} week(s) of the {KAGGLE['quota_hours']:g}-h GPU quota "
        f"({format_schedule(t['schedule'])}; a {t['gpus']}-GPU session-hour counted {_charge_text(t)})",
        f"disk: {t['disk_gb']:.1f} GB (model_final.pt of every run + one checkpoint per GPU in flight or paused; "
        f"/kaggle/working holds {KAGGLE['working_gb']:g} GB{'' if t['disk_ok'] else ': TOO MUCH, set save_model=False'})"]
    return "\n".join(lines)
