"""A result counts only for the settings that made it (issue 17): stale results are named, set aside (never
deleted) and redone; presets never share a folder; reports aggregate only matching runs."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(model="resnet18", dataset="cifar10", batch_size=32, train_subset=64, test_subset=32,
            max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32, log="none", epochs=1)
GRID = {"baseline": dict(ses=False), "ses": dict(ses=True)}


def plan(out, configs="all", **kw):
    return S.plan_runs(GRID, configs, [42], out, base=BASE, device="cpu", name="t", **kw)


def test_config_diff_ignores_only_what_cannot_change_a_result():
    a = S.validate_config(dict(BASE, device="cpu", out_dir="/x", preset="paper"))
    b = dict(a, out_dir="/elsewhere", data_root="/data", log="plain", resume=True, keep_checkpoint=False)
    assert S.config_diff(a, b) == []
    diff = S.config_diff(dict(a, epochs=50), dict(a, epochs=2, preset="smoke"))
    assert diff == [("epochs", 2, 50), ("preset", "smoke", "paper")]
    assert S.describe_diff(diff) == "epochs 2 → 50, preset smoke → paper"
    assert S.config_diff(a, {k: v for k, v in a.items() if k != "tf32"}) == [("tf32", "<absent>", False)]


def test_stale_result_is_named_set_aside_and_redone_and_the_report_uses_only_matching_runs(data_root, tmp_path, capsys):
    out = tmp_path / "nb"
    first = plan(out, data_root=str(data_root))
    S.run_plan(first)
    assert all(r.done for r in plan(out, data_root=str(data_root)).runs)  # same settings: done

    later = plan(out, data_root=str(data_root), epochs=2)  # the user asks for other epochs
    # (the milestones follow the epochs when the recipe gives none)
    assert [(r.status, S.describe_diff(r.diff)) for r in later.runs] == [("stale", "epochs 1 → 2, milestones [1] → [1, 2]")] * 2
    assert "stale: baseline seed 42: epochs 1 → 2" in capsys.readouterr().out
    # the report built now shows neither (both were made with other settings) and names them
    df, left = S.plan_results(later)
    assert df.empty and sorted(Path(d).name for d, _ in left) == ["baseline_seed42", "ses_seed42"]

    # redo one config only: the other stays stale, and the report aggregates the matching one alone
    S.run_plan(plan(out, data_root=str(data_root), epochs=2, configs=["ses"]))
    aside = list((out / "stale").glob("ses_seed42.*"))
    assert len(aside) == 1 and json.loads((aside[0] / "result.json").read_text())["config"]["epochs"] == 1
    assert json.loads((out / "runs/ses_seed42/result.json").read_text())["config"]["epochs"] == 2
    rep = S.report(plan(out, data_root=str(data_root), epochs=2), figures=())
    assert list(rep.table.index) == ["ses"]
    assert [Path(d).name for d, _ in rep.left_out] == ["baseline_seed42"] and "epochs 1 → 2" in rep.left_out[0][1]
    md = (out / "report.md").read_text()
    assert "left out" in md and "baseline_seed42" in md and "2 epochs" in md and "epochs 2 (recipe: 1)" in md


def test_non_paper_settings_are_in_the_report_title(data_root, tmp_path):
    out = tmp_path / "nb"
    p = plan(out, data_root=str(data_root), preset="smoke")
    S.run_plan(p)
    rep = S.report(p, figures=())
    assert rep.title.startswith("t: preset smoke, 1 epoch, 1 seed [42]")
    assert any("Not the published setup: the 'smoke' preset" in n for n in rep.notes)


def _cli(*args, cwd):
    p = subprocess.run([sys.executable, R.__file__, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_smoke_batch_through_a_params_file_lands_under_outputs_smoke_and_a_dry_run_never_counts_stale(tmp_path):
    out = tmp_path / "outputs"
    params = tmp_path / "p.yaml"
    params.write_text("all: {preset: smoke, seeds: [1]}\n")  # the smoke preset through a params file, no --preset
    rc, log = _cli("batch", "4", "--params", params, "--gpus", "cpu", "--workers", "2", "--out", out, cwd=tmp_path)
    assert rc == 0, log
    assert sorted(p.parent.name for p in (out / "smoke" / "04_toy_jacobian" / "runs").glob("*/result.json")) == \
        ["baseline_seed1", "ses_seed1"]
    assert not (out / "04_toy_jacobian").exists()  # the paper folder stays untouched
    assert (out / "smoke" / "SUMMARY.md").is_file() and (out / "smoke" / "batch_summary.csv").is_file()

    # the same smoke results with other epochs are stale: the dry run lists them as to do, never as done
    params.write_text("all: {preset: smoke, seeds: [1], epochs: 7}\n")
    rc, log = _cli("batch", "4", "--params", params, "--gpus", "cpu", "--out", out, "--dry-run", cwd=tmp_path)
    assert rc == 0, log
    assert "2 run(s) to do, 0 already done" in log and "stale: baseline seed 1: epochs 20 → 7" in log
    # redone through the runner: the new run's log and executed notebook stay in the run folder (the summary points
    # there), the old run's files, its log kept as log.1.txt among them, move to stale/
    rc, log = _cli("batch", "4", "--params", params, "--gpus", "cpu", "--workers", "2", "--out", out, cwd=tmp_path)
    assert rc == 0, log
    nb_out = out / "smoke" / "04_toy_jacobian"
    for run in ("baseline_seed1", "ses_seed1"):
        assert (nb_out / "runs" / run / "log.txt").is_file() and (nb_out / "runs" / run / "notebook.ipynb").is_file()
        assert json.loads((nb_out / "runs" / run / "result.json").read_text())["config"]["epochs"] == 7
        (aside,) = (nb_out / "stale").glob(f"{run}.*")
        assert (aside / "log.1.txt").is_file() and not (aside / "log.txt").exists()
        assert json.loads((aside / "result.json").read_text())["config"]["epochs"] == 20
    summary = pd.read_csv(out / "smoke" / "batch_summary.csv")
    assert all(Path(p).is_file() for p in summary.loc[summary["kind"] == "run", "log"])
    # --preset paper over the same root plans the paper folder (nothing there yet), not the smoke results
    rc, log = _cli("batch", "4", "--params", params, "--preset", "paper", "--gpus", "cpu", "--out", out, "--dry-run",
                   cwd=tmp_path)
    assert rc == 0 and "04_toy_jacobian: 2 run(s), 0 done" in log, log
