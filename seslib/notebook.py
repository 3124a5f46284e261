"""The notebook side: parameters, presets, the run plan a notebook makes (plan_runs) and runs (run_plan)."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from pathlib import Path

import torch

from .ses import is_int
from .util import (BUDGET_ENV, MARK_BUDGET, MARK_LOCKED, MARK_PAUSED, PreflightError, ROOT, RunLocked, RunPaused,
                   TORCHRUN_ENV, atomic_write_json, deadline, format_hours, parse_duration, read_only)
from .runs import (describe_diff, fits_budget, read_result, result_status, run_cost, run_key, set_aside,
                   shared_runs)
from .estimates import gpu_kind, placeable, placement, run_estimate
from .configs import TEXT_PRESETS, TOY_PRESETS, resolve_config, run_kind
from .training import train, train_torchrun, torchrun_processes
from .claims import check_claim


# ─── notebook side: parameters and the run plan ────────────────────────────────────────────────

def validate_params(params, allowed, where="notebook"):
    """Raise ValueError naming every key of `params` not in `allowed` (with a did-you-mean).
    The runner checks the params YAML with it against each notebook's declared parameters."""
    bad = sorted(set(params) - set(allowed))
    if bad:
        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else "")
                 for k in bad]
        raise ValueError(f"unknown parameter(s) for {where}: {', '.join(hints)}; valid: {sorted(allowed)}")
    return params


PRESETS = read_only({
    # the published setup: each notebook's base recipe as is
    "paper": {},
    # every code path of a notebook on a tiny real-data subset, in seconds per run on a laptop CPU: 1 epoch of 2
    # steps, the models narrowed to a quarter of their width (same depth, modules and hooks: ResNet-50 1.5 M
    # parameters instead of 24 M, WRN-28-10 2.3 M instead of 36.5 M), 32 test images, robustness (both protocols)
    # on 8 images at one severity, no saved weights. Proves the pipeline end to end; its numbers mean nothing.
    "smoke": dict(epochs=1, batch_size=32, train_subset=256, test_subset=32, max_steps_per_epoch=2, width=0.25,
                  robustness_subset=8, robustness_severities=[3], warmup_epochs=0, erank_batches=1,
                  erank_eval_samples=32, save_model=False),
})
# each kind's presets: the toy study's and Exp 22's smoke runs shrink other knobs than an image run's
KIND_PRESETS = read_only({"image": PRESETS, "text": TEXT_PRESETS, "toy": TOY_PRESETS})
PAPER_SEEDS = (42, 123, 7)  # the paper's three seeds, in its order (Exp 5/6: "3 random seeds (42, 123, 7)")
SEED_PRESETS = read_only({"paper3": PAPER_SEEDS})  # seeds="paper3" in a notebook, plan_runs, a batch's params
NOTEBOOK_PARAMS = ("configs", "seeds", "epochs", "batch_size", "data_root", "out_dir", "device", "amp",
                   "preset", "resume", "report_only", "report", "list_runs", "torchrun")


def check_notebook_params(namespace: dict, defined_before: set, extra=()):
    """Reject misspelled papermill parameters (papermill itself only warns) and bad values, up front.

    `defined_before` is the set of globals at the end of the parameters cell: papermill's injected cell
    comes after it, so any new public name is a parameter the notebook does not know.
    """
    known = set(NOTEBOOK_PARAMS) | set(extra)
    injected = {k for k, v in namespace.items() if not k.startswith("_") and k not in defined_before
                and not isinstance(v, type(json))}  # modules imported after the parameters cell are not parameters
    unknown = sorted(injected - known - {"In", "Out", "get_ipython", "exit", "quit", "open"})
    if unknown:
        raise ValueError(f"unknown notebook parameter(s) {unknown}; known: {', '.join(sorted(known))}")
    if "preset" in namespace and namespace.get("preset") not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}; got {namespace.get('preset')!r}")
    if "seeds" in namespace:  # a seed preset ("paper3") becomes its list here: the notebook shows the seeds it runs
        namespace["seeds"] = resolve_seeds(namespace["seeds"])
    for k in ("epochs", "batch_size"):
        v = namespace.get(k)
        if v is not None and (not is_int(v) or v < 1):
            raise ValueError(f"{k} must be None (the preset's value) or a positive int; got {v!r}")
    _check_device_name(namespace.get("device", "auto"))


def _check_device_name(device):
    """A notebook's `device` names a torch device, whether or not its runs use it (the toy study runs on the CPU):
    a typo fails the same way in every notebook, before anything runs."""
    try:
        torch.device("cpu" if device in (None, "auto") else device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"device must be 'auto' or a torch device ('cpu', 'cuda', 'cuda:1'); got {device!r} "
                         f"({e})") from None


def run_config(base: dict, overrides: dict, *, preset="paper", seed=42, run_dir=None, epochs=None,
               batch_size=None, presets=None, **common) -> dict:
    """The train() config of one run: base recipe < experiment overrides < preset < explicit knobs.
    When the epochs differ from the recipe's (an epochs knob, the smoke preset), milestones the recipe states in
    epochs are scaled with them: [20, 35, 45] of 50 -> [8, 14, 18] of 20 (else they would never be reached)."""
    presets = presets or KIND_PRESETS[run_kind({**base, **overrides})]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; known: {list(presets)}")
    recipe = {**base, **overrides}
    cfg = {**recipe, **presets[preset]}
    if epochs is not None:
        cfg["epochs"] = epochs
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    if cfg.get("milestones") and "epochs" in recipe and cfg.get("epochs") != recipe["epochs"]:
        cfg["milestones"] = sorted({max(1, round(m * cfg["epochs"] / recipe["epochs"])) for m in cfg["milestones"]})
    cfg.update({k: v for k, v in common.items() if v is not None})
    cfg.update(seed=seed, out_dir=str(run_dir) if run_dir is not None else cfg.get("out_dir"))
    cfg["preset"] = preset  # a label: reports and the stale rule name it
    return cfg


@dataclasses.dataclass
class Run:
    """One (config, seed) run of a notebook; `overrides` are the grid's settings for `config`.
    status: "done" (a result made with the config planned now), "stale" (a result made with other settings:
    `diff` says which; it is set aside and redone), "todo" (no result yet; a checkpoint resumes)."""
    config: str
    seed: int
    overrides: dict
    run_dir: Path
    result_path: Path
    status: str
    cost: float = 1.0
    cfg: dict = None  # the resolved config this plan runs (None for a plan without a base recipe)
    diff: list = dataclasses.field(default_factory=list)
    est: dict = None  # estimate_run on this machine: seconds left, epoch_s, epochs_left, source
    trained_in: str = None  # another notebook's folder whose identical run this one reads (runs.run_key)

    @property
    def done(self) -> bool:
        return self.status == "done"


@dataclasses.dataclass
class RunPlan:
    """What a notebook does: `S.run_plan(plan)` then `if plan.report: S.report(plan)`.

    In listing mode (list_runs set) the run list is written as JSON, `todo` is empty and `report`
    False, so the rest of the notebook does nothing; with report_only, `todo` is empty too.
    The plan also holds what its report needs: the resolved config of every grid config (for every seed),
    the paper's numbers and claims."""
    runs: list
    listing: bool
    todo: list
    report: bool
    out_dir: Path = None
    name: str = ""
    grid: dict = None
    seeds: list = None
    preset: str = "paper"
    resolved: dict = None  # {(config, seed): resolved cfg} over the WHOLE grid, for the report
    paper: dict = None
    claims: list = None
    paper_gpu: str = None
    train_fn: object = None
    notes: list = dataclasses.field(default_factory=list)  # non-paper settings, for the report's title


def _as_list(x, what):
    if isinstance(x, str):
        x = [s.strip() for s in x.split(",") if s.strip()]
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        x = [x]
    x = list(dict.fromkeys(x))  # dedupe, keep order
    if not x:
        raise ValueError(f"{what} is empty")
    return x


def resolve_seeds(seeds) -> list:
    """A seeds parameter as a list of ints: an int, a list of ints, "42,123" or a SEED_PRESETS name ("paper3":
    the paper's PAPER_SEEDS [42, 123, 7]). Anything else is refused in one line naming what is accepted."""
    if isinstance(seeds, str) and seeds.strip() in SEED_PRESETS:
        return list(SEED_PRESETS[seeds.strip()])
    accepted = (f"seeds must be an int, a list of ints, 'a,b,c' or one of {', '.join(map(repr, SEED_PRESETS))} "
                f"({', '.join(f'{k} = {list(v)}' for k, v in SEED_PRESETS.items())})")
    try:
        items = _as_list(seeds, "seeds")
    except (TypeError, ValueError):
        raise ValueError(f"{accepted}; got {seeds!r}") from None
    if not all(is_int(s) or (isinstance(s, str) and s.isdigit()) for s in items):
        raise ValueError(f"{accepted}; got {seeds!r}")
    return list(dict.fromkeys(int(s) for s in items))


def plan_runs(grid, configs="all", seeds=(42,), out_dir=None, list_runs="", cost=None, report=True,
              report_only=False, *, base=None, preset="paper", epochs=None, batch_size=None, presets=None,
              resolve=None, train_fn=None, paper=None, claims=None, paper_gpu=None, name="", **common):
    """Expand a notebook's grid {config: overrides} into its (config, seed) runs, and decide which are done.

    configs: "all", a list of names or "a,b"; seeds: int, list or "paper3" (resolve_seeds); out_dir: the
    notebook's output folder (runs live in {out_dir}/runs/{config}_seed{seed}/); list_runs: "" or a path where the run list is
    written as JSON for the batch runner (listing mode); cost: None (run_cost of the config, or 1),
    {config: cost} or callable(config, overrides) -> relative cost (the runner starts the costliest first).
    base (+ preset, epochs, batch_size, common knobs such as data_root/device/amp): the recipe; every run's
    config is resolved now (resolve: resolve_config, by the recipe's kind), so bad settings
    fail here, before anything runs, and a run is done only when its result.json was made with the config
    planned now (config_diff; keys in _NOT_COMPUTED aside). paper / claims: the published numbers and the
    claims the report checks (claim configs are checked against the grid here)."""
    names, seeds = _planned_selection(grid, configs, seeds, out_dir)
    claims = [check_claim(c, grid, paper) for c in (claims or [])]
    out_dir = Path(out_dir)
    knobs = dict(preset=preset, epochs=epochs, batch_size=batch_size, presets=presets, **common)
    resolved = {} if base is None else _resolve_grid(grid, seeds, out_dir, base, resolve or resolve_config, knobs)
    runs = _planned_runs(names, seeds, grid, out_dir, resolved, _cost_of(cost, grid, resolved, seeds), paper, paper_gpu)
    listing = bool(list_runs)
    if listing:
        _write_run_list(list_runs, runs)
    _print_plan(runs, listing, report_only)
    first = next(iter(resolved.values()), None)
    return RunPlan(runs=runs, listing=listing, todo=[] if listing or report_only else [r for r in runs if not r.done],
                   report=not listing and (report or report_only), out_dir=out_dir, name=name, grid=dict(grid),
                   seeds=seeds, preset=preset, resolved=resolved, paper=paper or {}, claims=claims,
                   paper_gpu=paper_gpu, train_fn=train_fn,
                   notes=_non_paper_notes(base, grid, first, preset, epochs, batch_size, presets) if first else [])


def _planned_selection(grid, configs, seeds, out_dir):
    """plan_runs' arguments checked: the grid's shape, out_dir given, the configs named (-> their names) and the
    seeds (-> ints)."""
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, dict) for v in grid.values()):
        raise ValueError("grid must be a non-empty dict {config_name: {overrides}}")
    if not out_dir:
        raise ValueError("out_dir is required")
    names = list(grid) if configs == "all" else _as_list(configs, "configs")
    unknown = [c for c in names if c not in grid]
    if unknown:
        raise ValueError(f"unknown config(s) {unknown}; valid: {list(grid)}")
    return names, resolve_seeds(seeds)


def _planned_run_dir(out_dir, config, seed) -> Path:
    return out_dir / "runs" / f"{config}_seed{seed}"


def _resolve_grid(grid, seeds, out_dir, base, resolve, knobs) -> dict:
    """{(config, seed): resolved config} for EVERY grid config and seed, not only those selected: the report matches
    results against these. A bad setting fails here, before anything runs, naming its config."""
    resolved = {}
    for c in grid:
        for s in seeds:
            rd = _planned_run_dir(out_dir, c, s)
            try:
                resolved[c, s] = resolve(run_config(base, grid[c], seed=s, run_dir=rd, **knobs))
            except ValueError as e:
                raise ValueError(f"config {c!r}: {e}") from None
    return resolved


def _cost_of(cost, grid, resolved, seeds):
    """config -> its relative cost, from plan_runs' `cost`: None (run_cost of the resolved config, 1 without a
    recipe), {config: cost} or callable(config, overrides)."""
    def cost_of(c):
        if cost is None:
            return run_cost(resolved[c, seeds[0]]) if resolved else 1.0
        return float(cost(c, grid[c]) if callable(cost) else cost.get(c, 1.0))
    return cost_of


def _planned_runs(names, seeds, grid, out_dir, resolved, cost_of, paper, paper_gpu) -> list:
    """Each selected (config, seed) as a Run whose status its result.json decides (done, stale or todo); the runs
    not done get their time estimate (the time budget and the cost plan use it)."""
    runs = []
    for c in names:
        for s in seeds:
            run_dir = _planned_run_dir(out_dir, c, s)
            cfg = resolved.get((c, s))
            status, diff = result_status(run_dir / "result.json", cfg)
            runs.append(Run(config=c, seed=s, overrides=dict(grid[c]), run_dir=run_dir,
                            result_path=run_dir / "result.json", status=status, cost=cost_of(c), cfg=cfg, diff=diff))
    _read_shared_runs(runs, out_dir)
    for r in runs:
        if r.cfg is not None and not r.done:
            r.est = run_estimate(r, paper, paper_gpu)
    return runs


def _read_shared_runs(runs, out_dir):
    """A run another notebook under the same outputs root already trained (same run_key) is done here too: it is
    read from there, not trained again."""
    todo = [r for r in runs if r.cfg is not None and not r.done]
    index = shared_runs(out_dir) if todo else {}
    for r in todo:
        where = index.get(run_key(r.cfg))
        if where is not None:
            r.status, r.run_dir, r.result_path, r.diff = "done", where, where / "result.json", []
            r.trained_in = where.parent.parent.name


def _write_run_list(path, runs):
    """Listing mode: the run list the batch runner reads (one entry per run; keys are part of the run contract)."""
    atomic_write_json(path, [{"config": r.config, "seed": r.seed, "cost": r.cost, "done": r.done,
                              "status": r.status, "stale": describe_diff(r.diff), "run_dir": str(r.run_dir),
                              "cfg": r.cfg, "est": r.est} for r in runs])


def _print_plan(runs, listing, report_only):
    """The plan in a line (runs, done, to do, stale), then one line per stale run saying what differs."""
    counts = {k: sum(r.status == k for r in runs) for k in ("done", "stale", "todo")}
    print(f"{len(runs)} run(s): {counts['done']} done, {counts['stale'] + counts['todo']} to do"
          + (f" ({counts['stale']} stale)" if counts["stale"] else "")
          + (" (listing only)" if listing else " (report only)" if report_only else ""))
    for r in runs:
        if r.status == "stale":
            print(f"  stale: {r.config} seed {r.seed}: {describe_diff(r.diff)}"
                  + ("" if listing or report_only else " (set aside and redone)"))


def _non_paper_notes(base, grid, cfg, preset, epochs, batch_size, presets=None):
    values = (presets or KIND_PRESETS[run_kind(base)]).get(preset, {})  # the kind's presets
    notes = [] if preset == "paper" else [f"Not the published setup: the {preset!r} preset "
                                          f"({', '.join(f'{k}={v}' for k, v in values.items())})."]
    recipe = {**base, **next(iter(grid.values()))}
    for k, v in (("epochs", epochs), ("batch_size", batch_size)):
        if v is not None and v != recipe.get(k):
            notes.append(f"Not the published setup: {k} {v} (recipe: {recipe.get(k)}).")
    return notes


def _visible_gpus():
    """(kind, count) of the CUDA devices this process sees; (None, 0) without CUDA."""
    if not torch.cuda.is_available():  # CUDA-only: memory placement places runs on GPUs (CPU twin: tests pass gpus)
        return None, 0
    return gpu_kind(torch.cuda.get_device_name(0)), torch.cuda.device_count()


def placed_train_fn(cfg, torchrun=None, gpus=None):
    """The train function memory placement picks for the run cfg in this process, or None (train it as asked):
    a run that does not fit one of this machine's GPUs but fits k of them runs as ONE DDP run over k (train_torchrun);
    one that fits nowhere here raises PreflightError, one line, before its data loads. Nothing to place when the caller
    chose torchrun, on a CPU, or for a model estimate_memory does not know. gpus: (kind, count), else this process's."""
    if torchrun not in (None, "", 0, "0", False) or not placeable(cfg):
        return None
    kind, n = gpus or _visible_gpus()
    device = str(cfg.get("device") or "auto")
    if not n or not (device == "auto" or device.startswith("cuda")):
        return None
    p = placement(resolve_config(cfg), kind, n)
    if p["gpus"] == 0:
        raise PreflightError(f"{p['text']} ({p['memory']['why']})")
    if p["gpus"] == 1:
        return None
    print(f"[place] {p['text']}", flush=True)
    return lambda c: train_torchrun(c, p["gpus"])


def run_plan(plan, resume=True, torchrun=None, train_fn=None):
    """Run every planned (config, seed) that is not done; resume interrupted ones; set stale results aside first.

    torchrun: None / 0 (each run in this process), "auto" or N: each run as ONE DDP run over all GPUs
    (N processes) via train_torchrun; None reads $SES_TORCHRUN (set by `sesrun.py batch --torchrun`).
    A failing run does not stop the others; the first error is re-raised at the end so papermill and
    the batch runner still see the failure. Returns a compact table (pandas) of the runs and their headline
    numbers, not the result dicts (a notebook cell would print all of them)."""
    import pandas as pd
    if torchrun is None:
        torchrun = os.environ.get(TORCHRUN_ENV)
        if torchrun not in (None, "", "auto") and not str(torchrun).isdigit():
            raise ValueError(f"${TORCHRUN_ENV}={torchrun!r}: give 'auto' or a number of processes (or unset it)")
    train_fn = train_fn or plan.train_fn
    if train_fn is None and torchrun not in (None, "", 0, "0", False):
        nproc = torchrun_processes(torchrun)  # 'auto' without a GPU, a bad count: one line before any run starts
        train_fn = lambda cfg: train_torchrun(cfg, nproc)  # noqa: E731
    train_fn = train_fn or train
    rows = []
    for run in plan.runs:
        if run.done and not plan.listing:
            print(f"[skip] {run.config} seed {run.seed}: done ({run.result_path})")
            rows.append(_run_row(run, "done", read_result(run.result_path)))
    errors = []
    end, budget = deadline(), _env_duration(BUDGET_ENV)
    for run in plan.todo:
        if end is not None and not fits_budget(run.est, end, budget):
            print(f"[budget] {run.config} seed {run.seed}: not started, needs ~{format_hours(run.est['seconds'])} and the "
                  f"time budget has {format_hours(end - time.time())} left (to do in the next invocation)\n{MARK_BUDGET}",
                  flush=True)
            rows.append(_run_row(run, "to do (time budget)", None))
            continue
        if run.status == "stale":
            where = set_aside(run.run_dir, f"stale: {describe_diff(run.diff, limit=100)}")
            print(f"[stale] {run.config} seed {run.seed}: {describe_diff(run.diff)}; old files moved to {where}")
        if run.cfg is None:
            raise ValueError("run_plan needs a plan made with base=... (the recipe)")
        print(f"[run] {run.config} seed {run.seed} -> {run.run_dir}", flush=True)
        t0 = time.time()
        try:
            fn = train_fn if plan.train_fn else placed_train_fn(run.cfg, torchrun) or train_fn
            res = fn(dict(run.cfg, resume=resume))
            rows.append(_run_row(run, "ran", res, time.time() - t0))
        except RunLocked as e:  # another runner is training it right now: not a failure
            print(f"[locked] {run.config} seed {run.seed}: {e}\n{MARK_LOCKED}", flush=True)
            rows.append(_run_row(run, "locked by another process", None))
        except RunPaused as e:  # the time budget ends: checkpoint kept, the next invocation resumes it
            print(f"[paused] {run.config} seed {run.seed}: {e}\n{MARK_PAUSED}", flush=True)
            rows.append(_run_row(run, "paused", None, time.time() - t0))
        except Exception as e:  # noqa: BLE001 - reported and re-raised below
            print(f"[failed] {run.config} seed {run.seed}: {type(e).__name__}: {e}", flush=True)
            rows.append(_run_row(run, f"failed: {type(e).__name__}", None, time.time() - t0))
            errors.append(e)
    if errors:
        raise errors[0]
    return pd.DataFrame(rows, columns=["config", "seed", "status", "test acc (final)", "rob", "minutes"])


def _env_duration(name):
    """parse_duration of an environment variable; a bad value names the variable."""
    try:
        return parse_duration(os.environ.get(name))
    except ValueError as e:
        raise ValueError(f"${name}: {e} (it is set by `sesrun.py batch --time-budget`; unset it to run without)") \
            from None


def _run_row(run, status, result, seconds=None):
    fin = (result or {}).get("final") or {}
    rob = (fin.get("robustness") or {}).get("mean_corruption_acc")
    return {"config": run.config, "seed": run.seed, "status": status, "test acc (final)": fin.get("test_acc"),
            "rob": rob, "minutes": None if seconds is None else round(seconds / 60, 1)}


def resolve_out_dir(out_dir, preset="paper", name=None) -> str:
    """Where a notebook writes. None -> outputs/<name> for the paper preset, outputs/<preset>/<name> otherwise,
    so a smoke run's results can never pass for a paper run's. Relative paths resolve against /kaggle/working
    on Kaggle, else the repo root (the folder of the seslib package when it holds notebooks/), else the current
    directory: a notebook run from notebooks/ and a batch run from the root write to the same place."""
    if out_dir is None:
        if not name:
            raise ValueError("out_dir is None and no notebook name was given")
        out_dir = Path("outputs") / name if preset == "paper" else Path("outputs") / preset / name
    p = Path(out_dir)
    if p.is_absolute():
        return str(p)
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or Path("/kaggle/working").is_dir():
        return str(Path("/kaggle/working") / p)
    if (ROOT / "notebooks").is_dir() and os.access(ROOT, os.W_OK):
        return str(ROOT / p)
    return str(Path.cwd() / p)
