"""Issue 21: (1) time per epoch is the training loop alone, as the author's avg_epoch_time (evaluation and erank
passes shown apart, as 'eval s/epoch'); (2) a report's Δ / overhead columns compare the pairs the notebook's claims
compare; (3) seeds="paper3" is the paper's three seeds wherever seeds are accepted. The report-table tests use
SYNTHETIC result dicts (no training); one test trains a tiny real run on the CPU."""
import math
from pathlib import Path

import pandas as pd
import pytest

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]


def _synthetic_result(config, seed, acc, train_s=None, epoch_s=30.0):
    """A SYNTHETIC result.json (made up numbers): final metrics only; train_s None = a result made before
    train_seconds_mean was recorded."""
    final = dict(test_acc=acc, best_test_acc_over_epochs=acc + 0.2, gap=2.0, epoch_seconds_mean=epoch_s,
                 robustness=None)
    if train_s is not None:
        final["train_seconds_mean"] = train_s
    return dict(config=dict(seed=seed), history=[], final=final, env=dict(device_name="cpu"))


def _frame(rows):
    """SYNTHETIC rows (config, seed, acc, train_s, epoch_s) as the report's frame."""
    return pd.DataFrame([S.results._result_row(c, _synthetic_result(c, s, acc, tr, ep), f"runs/{c}_seed{s}")
                         for c, s, acc, tr, ep in rows])


def notebook_definitions(stem):
    """GRID, PAPER, CLAIMS of a notebook (test_recipes' reader: assignments only, nothing run)."""
    from test_recipes import notebook_definitions as read
    return read(ROOT / "notebooks" / f"{stem}.ipynb")


# ── 1. time = the training loop only ────────────────────────────────────────────────────────────

def test_a_real_run_times_its_training_loop_apart_and_the_table_shows_it(data_root, tmp_path):
    cfg = {"model": "resnet18", "dataset": "cifar10", "data_root": str(data_root), "epochs": 2, "batch_size": 32,
           "train_subset": 128, "test_subset": 128, "max_steps_per_epoch": 2, "erank_batches": 1,
           "erank_eval_samples": 64, "log": "none", "eval_batch_size": 128, "device": "cpu",
           "out_dir": str(tmp_path / "run")}
    res = S.train(cfg)
    fin = res["final"]
    assert all(0 < r["train_seconds"] < r["epoch_seconds"] for r in res["history"])
    assert 0 < fin["train_seconds_mean"] < fin["epoch_seconds_mean"]
    df = pd.DataFrame([S.results._result_row("baseline", res, tmp_path / "run")])
    assert df.loc[0, "train_s"] == fin["train_seconds_mean"]
    table = S.summary_table(df)
    assert table.loc["baseline", "s/epoch"] == round(fin["train_seconds_mean"], 1)
    assert table.loc["baseline", "eval s/epoch"] == round(fin["epoch_seconds_mean"] - fin["train_seconds_mean"], 1)


def test_overhead_and_the_epoch_s_claim_use_the_training_loop():
    """SYNTHETIC: SES's loop takes 15 s vs 10 s (+50 %); whole epochs 31 vs 30 s would say +3.3 %."""
    assert S.CLAIM_METRICS["epoch_s"][:3] == ("train_s", "train_s", "epoch_s")
    df = _frame([("baseline", 1, 70.0, 10.0, 30.0), ("baseline", 2, 70.2, 10.0, 30.0),
                 ("ses", 1, 71.0, 15.0, 31.0), ("ses", 2, 71.2, 15.0, 31.0)])
    t = S.summary_table(df, {"baseline": {"epoch_s": 16.9}, "ses": {"epoch_s": 28.0}})
    assert t.loc["ses", "s/epoch"] == 15.0 and t.loc["baseline", "s/epoch"] == 10.0
    assert t.loc["ses", "eval s/epoch"] == 16.0 and t.loc["baseline", "eval s/epoch"] == 20.0
    assert t.loc["ses", "SES overhead %"] == 50.0 and t.loc["ses", "paper overhead %"] == pytest.approx(65.7)
    cost = S.tables._split_table(t)["cost"]
    assert list(cost.columns[:4]) == ["seeds", "s/epoch", "paper s/epoch", "eval s/epoch"]


def test_results_without_the_training_loop_time_are_not_mixed_in():
    """SYNTHETIC old results (no train_seconds_mean): no s/epoch, no overhead, rather than whole-epoch times."""
    df = _frame([("baseline", 1, 70.0, None, 30.0), ("ses", 1, 71.0, None, 40.0)])
    assert df["train_s"].isna().all() and df["eval_s"].isna().all()
    t = S.summary_table(df)
    assert t["s/epoch"].isna().all() and t["eval s/epoch"].isna().all()
    assert "SES overhead %" not in t.columns or t["SES overhead %"].isna().all()


# ── 2. report tables compare the claims' pairs ──────────────────────────────────────────────────

def test_claim_baselines_takes_the_first_pair_of_comparing_kinds():
    claims = [{"text": "x", "a": "ses", "b": "baseline"}, {"text": "y", "a": "ses", "b": "other"},
              {"text": "z", "a": "k10", "b": "baseline", "kind": "ratio"},
              {"text": "w", "a": "r", "b": "fixed", "kind": "tie"},
              {"text": "v", "a": "best_one", "kind": "best", "among": ["best_one", "r"]},
              {"text": "u", "a": "s", "b": "baseline", "kind": "at_most"},
              {"text": "t", "a": "q", "b": "14_vit/vit_small_ses"}]
    assert S.claim_baselines(claims) == {"ses": "baseline", "k10": "baseline", "r": "fixed"}
    assert S.claim_baselines(None) == {}


def _synthetic_grid_frame(grid):
    """SYNTHETIC results for every config of a real grid, 2 seeds each: accuracy 70 + its index."""
    return _frame([(c, s, 70.0 + i + 0.1 * s, 10.0 + i, 20.0 + i) for i, c in enumerate(grid) for s in (1, 2)])


def test_14_vit_table_compares_each_vit_with_its_own_baseline(patch_seslib, tmp_path, monkeypatch):
    """The real notebook's GRID / PAPER / CLAIMS through report(), on SYNTHETIC result files: no config is named
    'baseline', and each SES ViT still gets its Δ and overhead (the claims' pairs)."""
    d = notebook_definitions("14_vit")
    grid, paper = d["GRID"], d["PAPER"]
    df = _synthetic_grid_frame(grid)
    resolved = {}
    for row in df.itertuples():
        cfg = {"seed": row.seed, "name": row.config}
        S.atomic_write_json(tmp_path / "runs" / f"{row.config}_seed{row.seed}" / "result.json",
                            {**row.result, "config": cfg})
        resolved[row.config, row.seed] = cfg
    plan = S.RunPlan(runs=[], listing=False, todo=[], report=True, out_dir=tmp_path, name="14_vit", grid=grid,
                     seeds=[1, 2], resolved=resolved, paper=paper, claims=d["CLAIMS"])
    patch_seslib("claims_table", lambda *a, **k: None)  # the verdicts are not what this test is about
    t = S.report(plan, figures=(), show=False).table
    for ses, base in (("vit_small_ses", "vit_small_baseline"), ("vit_tiny_ses", "vit_tiny_baseline")):
        assert t.loc[ses, "vs"] == base
        assert t.loc[ses, "Δ acc final"] == round(_mean(df, ses, "acc_final") - _mean(df, base, "acc_final"), 2)
        assert t.loc[ses, "paper Δ acc"] == pytest.approx(paper[ses]["acc"] - paper[base]["acc"])
        assert t.loc[ses, "SES overhead %"] == round(100 * (_mean(df, ses, "train_s") / _mean(df, base, "train_s") - 1), 1)
    pairs = S.claim_baselines(d["CLAIMS"])  # the claims may also pair the two baselines (ViT-S vs ViT-T)
    for base in ("vit_small_baseline", "vit_tiny_baseline"):
        want = pairs.get(base)
        got = t.loc[base, "vs"]
        assert got == want if want else isinstance(got, float) and math.isnan(got)  # no config named "baseline"


def _mean(df, config, col):
    return float(df.loc[df["config"] == config, col].mean())


@pytest.mark.parametrize("stem", ["12_mixup_cutmix", "15_vit_augmentation"])
def test_ses_on_top_of_an_augmentation_is_compared_with_that_augmentation(stem):
    d = notebook_definitions(stem)
    t = S.summary_table(_synthetic_grid_frame(d["GRID"]), d["PAPER"], list(d["GRID"]), claims=d["CLAIMS"])
    assert t.loc["ses_mixup", "vs"] == "mixup" and t.loc["ses", "vs"] == "baseline"
    assert t.loc["ses_cutmix", "vs"] == "cutmix" and t.loc["mixup", "vs"] == "baseline"
    assert t.loc["ses_mixup", "paper Δ acc"] == pytest.approx(d["PAPER"]["ses_mixup"]["acc"] - d["PAPER"]["mixup"]["acc"])


def test_an_explicit_baseline_of_still_wins():
    d = notebook_definitions("16_adaptive_beta")
    t = S.summary_table(_synthetic_grid_frame(d["GRID"]), d["PAPER"], list(d["GRID"]), baseline="fixed",
                        baseline_of={"baseline": "baseline", "fixed": "baseline"}, claims=d["CLAIMS"])
    assert t.loc["fixed", "vs"] == "baseline" and t.loc["linear", "vs"] == "fixed" and t.loc["step", "vs"] == "fixed"
    t = S.summary_table(_synthetic_grid_frame(d["GRID"]), d["PAPER"], list(d["GRID"]), claims=d["CLAIMS"],
                        baseline_of={"linear": "baseline"})
    assert t.loc["linear", "vs"] == "baseline" and t.loc["cosine", "vs"] == "fixed"


# ── 3. seeds="paper3" ──────────────────────────────────────────────────────────────────────────

def test_paper3_is_the_papers_three_seeds_in_its_order():
    assert S.PAPER_SEEDS == (42, 123, 7) and S.SEED_PRESETS["paper3"] == S.PAPER_SEEDS
    assert S.resolve_seeds("paper3") == [42, 123, 7]
    assert S.resolve_seeds(5) == [5] and S.resolve_seeds("42, 7") == [42, 7] and S.resolve_seeds([3, 3, 1]) == [3, 1]


def test_check_notebook_params_resolves_paper3_and_refuses_a_wrong_name():
    ns = {"seeds": "paper3", "preset": "paper", "device": "auto", "epochs": None}
    S.check_notebook_params(ns, set(ns))
    assert ns["seeds"] == [42, 123, 7]
    for bad in ("paper4", 4.5, [42, "x"], None):
        with pytest.raises(ValueError, match=r"seeds must be .*'paper3' \(paper3 = \[42, 123, 7\]\); got"):
            S.check_notebook_params({"seeds": bad}, {"seeds"})


def test_plan_runs_with_paper3_has_three_times_the_runs(tmp_path):
    grid = {"baseline": {}, "ses": {}}
    plan = S.plan_runs(grid, "all", "paper3", tmp_path)
    assert plan.seeds == [42, 123, 7] and len(plan.runs) == 3 * len(S.plan_runs(grid, "all", [42], tmp_path).runs)
    assert [r.seed for r in plan.runs if r.config == "ses"] == [42, 123, 7]
    with pytest.raises(ValueError, match="'paper3'"):
        S.plan_runs(grid, "all", "paper_3", tmp_path)


def test_the_cost_plan_with_paper3_counts_three_times_the_runs_and_time(tmp_path):
    one, t1 = R.cost_plan(["12"], gpus=1, gpu="t4", out=tmp_path)
    three, t3 = R.cost_plan(["12"], gpus=1, gpu="t4", out=tmp_path, seeds="paper3")
    assert three.loc[0, "runs"] == 3 * one.loc[0, "runs"] and three.loc[0, "gpu_hours"] == pytest.approx(
        3 * one.loc[0, "gpu_hours"])
    assert R.format_plan(three, t3).splitlines()[1] == "seeds [42, 123, 7] in every notebook"  # after what it rests on
    assert not R.format_plan(one, t1).splitlines()[1].startswith("seeds")
    with pytest.raises(ValueError, match="'paper3'"):
        R.load_batch_params({"all": {"seeds": "paper33"}}, R.find_notebooks(["12"]))
