"""Settling the paper within a budget (issue 30): each identical run trained once (the normal form, the plan, the
batch runner, the report), Kaggle versions packed by the real limits, the plan that buys the most claims per
GPU-hour, and the `power` command."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]


# ── one run, however many notebooks need it ──

def test_equivalent_spellings_are_one_run():
    base = S.resolve_config(dict(model="vit_small", dataset="cifar100", ses=True, ses_beta=0.7, ses_layers="auto"))
    assert S.run_key(base) == S.run_key(dict(base, ses_layers="all"))  # 'auto' hooks every ViT block
    assert S.run_key(base) == S.run_key(dict(base, ses_beta=0.5, ses_beta_schedule="fixed:0.7"))
    assert S.run_key(base) == S.run_key(dict(base, out_dir="elsewhere", log="none", preset="x"))  # not computed
    assert S.run_key(base) != S.run_key(dict(base, seed=7)) != S.run_key(dict(base, ses_lambda=0.05))
    off = dict(base, ses=False)
    assert S.run_key(off) == S.run_key(dict(off, ses_beta=0.3, ses_layers="last4"))  # SES knobs without SES
    cnn = S.resolve_config(dict(model="resnet18", dataset="cifar10", ses=True))
    assert S.run_key(cnn) == S.run_key(dict(cnn, ses_layers="blocks+pool")) != S.run_key(dict(cnn, ses_layers="last3"))


def _plan(stem, out):
    return R.notebook_plan(ROOT / "notebooks" / f"{stem}.ipynb", preset="paper", out_dir=str(out / stem))


def test_a_run_another_notebook_trained_is_read_not_trained_again(tmp_path):
    """Exp 9's 'all9' is Exp 5's 'ses' (seed 42): once Exp 5 has it, Exp 9's plan counts it done, reads it from
    there, and its report says where it was trained."""
    five = next(r for r in _plan("05_multiseed_cifar10", tmp_path).runs if r.config == "ses" and r.seed == 42)
    five.run_dir.mkdir(parents=True)
    (five.run_dir / "result.json").write_text(json.dumps({"config": five.cfg, "final": {"test_acc": 93.0}}))
    nine = _plan("09_layer_ablation", tmp_path)
    all9 = next(r for r in nine.runs if r.config == "all9")
    assert all9.done and all9.trained_in == "05_multiseed_cifar10" and all9.run_dir == five.run_dir
    assert not next(r for r in nine.runs if r.config == "last3").done
    df, left_out = S.plan_results(nine)
    assert list(df["config"]) == ["all9"] and Path(df["run_dir"][0]) == five.run_dir and not left_out
    assert S.reports._shared_notes(df, nine.out_dir) == [
        "runs trained by another notebook (the same config and seed): all9 seed 42 (05_multiseed_cifar10)"]


def test_the_batch_starts_a_shared_run_once(tmp_path):
    """Two notebooks' listings name the same run: one job trains it; the second notebook records it 'shared' and
    its report waits for the first notebook's job."""
    cfg = S.resolve_config(dict(model="resnet18", dataset="cifar10", ses=True))
    lists, overrides, nb_out = [], {}, {}
    for stem, config in (("05_multiseed_cifar10", "ses"), ("09_layer_ablation", "all9")):
        nb = ROOT / "notebooks" / f"{stem}.ipynb"
        listing = tmp_path / f"{stem}.json"
        listing.write_text(json.dumps([{"config": config, "seed": 42, "cost": 1.0, "done": False, "status": "todo",
                                        "stale": "", "run_dir": str(tmp_path / stem / "runs" / f"{config}_seed42"),
                                        "cfg": cfg, "est": None}]))
        lists.append(types.SimpleNamespace(nb=nb, result=listing, log=tmp_path / "log"))
        overrides[nb], nb_out[nb] = {}, str(tmp_path / stem)
    records, jobs = R.batch._plan_jobs(lists, overrides, nb_out, tmp_path, True, lambda *_: None)
    runs = [j for j in jobs if j.kind == "run"]
    assert [(j.nb.stem, j.config) for j in runs] == [("05_multiseed_cifar10", "ses")]
    assert [(r["notebook"], r["status"]) for r in records] == [("09_layer_ablation", "shared")]
    assert "05_multiseed_cifar10/ses seed 42" in records[0]["error"]
    report9 = next(j for j in jobs if j.kind == "report" and j.nb.stem == "09_layer_ablation")
    assert report9.after == (0,)  # waits for Exp 5's job


# ── Kaggle versions packed by the real limits ──

def test_versions_are_packed_into_weeks_of_the_quota():
    """Worked by hand: 35.2 h of work, versions of at most 11.5 h + 0.25 h overhead, 30 quota-hours a week."""
    weeks = R.kaggle_weeks(35.2, 11.5)
    assert [[round(h, 2) for h in w] for w in weeks] == [[11.5, 11.5, 6.25], [5.95]]
    per_gpu = R.kaggle_weeks(20.0, 11.5, charge=2.0)  # 15 session-hours a week
    assert [[round(h, 2) for h in w] for w in per_gpu] == [[11.5, 3.0], [5.5]]
    assert R.kaggle_weeks(0.0, 11.5) == []
    assert R.budget.quota_hours(35.2, 1.0) == pytest.approx(35.2 + 4 * 0.25)


# ── the plan within a budget, on a catalogue made by hand ──

def _need(where, text, configs, paper, sd_paper=None):
    c = S.check_claim({"text": text, "a": configs[0][1] if where != "x" else "a", "b": "b", "paper": paper,
                       **({"paper_sd": sd_paper} if sd_paper else {})}, {"a": {}, "b": {}, configs[0][1]: {}})
    return R.ClaimNeed(where, c, configs, "cnn", None)


def _costs():
    """Two notebooks; nbB's 'b' is nbA's 'b' (the same key): trained once. One seed: 1 GPU-hour each."""
    a = R.NotebookCost("nbA", {"a": (3600.0, 1), "b": (3600.0, 1)}, {"a": "A", "b": "B"}, {}, None, set())
    b = R.NotebookCost("nbB", {"c": (3600.0, 1), "b": (3600.0, 1)}, {"c": "C", "b": "B"}, {}, None, set())
    return {"nbA": a, "nbB": b}


def test_the_budget_plan_buys_the_most_power_per_gpu_hour_and_counts_shared_runs_once():
    costs = _costs()
    big = _need("nbA", "big effect", [("nbA", "a"), ("nbA", "b")], 3.0, 0.2)  # 2 seeds suffice
    shares = _need("nbB", "shares b", [("nbB", "c"), ("nbB", "b")], 3.0, 0.2)
    tiny = _need("nbA", "tiny effect", [("nbA", "a"), ("nbA", "b")], 0.05, 0.6)  # never reachable
    plan = R.budget_plan(costs, [big, shares, tiny], budget_h=12.0, gpus=2)
    assert [n.claim["text"] for n, _, _ in plan.chosen] == ["big effect", "shares b"]
    assert dict(plan.picks) == {("nbA", "a"): 2, ("nbA", "b"): 2, ("nbB", "c"): 2, ("nbB", "b"): 2}
    assert R.gpu_hours(plan.runs) == pytest.approx(6.0)  # a, b, c x 2 seeds: nbB's b is nbA's b
    assert plan.wall_h == pytest.approx(3.0) and R.budget.quota_hours(plan.wall_h, 1.0) <= 12.0
    from test_verdicts import _direct_share  # scipy's Welch test per simulated experiment, independent of seslib
    want = 2 * _direct_share(3.0, 0.2, 2, 3.0)  # both claims: +3.0 at seed SD 0.2, 2 seeds
    assert plan.expected == pytest.approx(want, abs=0.06)
    assert [(n.claim["text"], why.split(" (")[0]) for n, why in plan.left] == [("tiny effect",
                                                                                 "not reachable at 10 seeds")]
    assert R.budget_params(plan) == {"nbA": {"configs": ["a", "b"], "seeds": [42, 123]},
                                     "nbB": {"configs": ["b", "c"], "seeds": [42, 123]}}
    small = R.budget_plan(costs, [big, shares], budget_h=3.0, gpus=2)  # room for one claim only
    assert len(small.chosen) == 1 and "does not fit the budget" in small.left[0][1]


def test_a_notebooks_own_seeds_come_first_so_its_done_runs_are_used():
    """Exp 4's parameters cell runs seeds 42, 43, 44 (and the repository holds those runs); a budget plan gave it
    42, 123, 7, ...: two done runs left unused and paid for again."""
    toy = R.NotebookCost("toy", {"a": (3600.0, 1)}, {"a": "A"}, {}, None, {("a", 42), ("a", 43), ("a", 44)},
                         first_seeds=(42, 43, 44))
    need = _need("toy", "toy effect", [("toy", "a"), ("toy", "a")], 3.0, 0.2)
    plan = R.budget_plan({"toy": toy}, [need], budget_h=12.0, gpus=2)
    n = plan.picks["toy", "a"]
    assert R.budget_params(plan)["toy"]["seeds"] == [42, 43, 44, 123, 7, 1, 2][:n]
    assert R.gpu_hours(plan.runs) == pytest.approx(max(0, n - 3))  # the three done runs cost nothing
    assert R.seed_list(6, (42, 43, 44)) == [42, 43, 44, 123, 7, 1] and R.seed_list(4) == [42, 123, 7, 1]


def test_plan_budget_and_power_commands(tmp_path):
    """The commands on real notebooks: the params file the budget plan writes is one the batch runner accepts, and
    the power command's figure for Exp 5's robustness claim is the simulation's."""
    params = tmp_path / "plan.yaml"
    p = subprocess.run([sys.executable, "sesrun.py", "plan", "5", "6", "--budget", "8h", "--out",
                        str(tmp_path / "none"), "--write-params", str(params)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "within 8 h of the weekly GPU quota on 2 x t4" in p.stdout and "claims left" in p.stdout
    plan = yaml.safe_load(params.read_text())
    nbs = [ROOT / "notebooks" / f"{stem}.ipynb" for stem in plan]
    assert set(plan) <= {"05_multiseed_cifar10", "06_multiseed_cifar100"}
    loaded = R.load_batch_params(params, nbs)
    assert all(v["seeds"][:2] == [42, 123] for v in loaded.values())
    p = subprocess.run([sys.executable, "sesrun.py", "power", "5", "--seeds", "3", "--out", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if "SES improves robustness (+0.45 pp)" in x)
    c = S.check_claim({"text": "SES improves robustness (+0.45 pp)", "a": "ses", "b": "baseline", "metric": "rob"},
                      {"ses": {}, "baseline": {}}, {"ses": {"rob": 68.67, "rob_std": 0.26},
                                                     "baseline": {"rob": 68.22, "rob_std": 0.6}})
    assert f"{100 * S.claim_power(c, 0.6, 3):.0f} %" in line and ">20" in line
    bad = subprocess.run([sys.executable, "sesrun.py", "plan", "5", "--budget", "0h"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "argument --budget: must be a positive duration" in bad.stderr
