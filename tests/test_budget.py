"""Finishing the suite on Kaggle (issue 15): the time budget (runs not started, runs paused at an epoch boundary and
resumed exactly), continuation across kernel versions, and the cost plan that the README's runtime column (and the
plan block of docs/kaggle.md) follows."""
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

if __name__ == "__main__":  # run as a script from any folder: the package is the one beside tests/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import seslib as S  # noqa: E402
import sesrun as R  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = Path(__file__).parent / "notebooks"
NB_BUDGET, NB_SLEEP = NB_DIR / "93_runner_budget.ipynb", NB_DIR / "91_runner_sleep.ipynb"


def _tiny(data_root, out_dir, epochs=3, **kw):
    return dict(model="resnet18", width=0.25, dataset="cifar10", data_root=str(data_root), batch_size=32,
                train_subset=64, test_subset=32, max_steps_per_epoch=2, erank_batches=1, erank_eval_samples=32,
                robustness=None, log="none", device="cpu", ses=True, epochs=epochs, out_dir=str(out_dir), **kw)


def _same_history(a, b):
    keys = ("train_loss", "train_acc", "test_acc", "test_loss", "ses_loss", "lr", "beta")
    return [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]


# ── the rules ──────────────────────────────────────────────────────────────────────────────────

def test_the_params_file_carries_the_budget(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("time_budget: 11.5h\nall: {sleep: 1}\n")
    assert R.load_batch_params(p, [NB_SLEEP.resolve()]) == {NB_SLEEP.resolve(): {"sleep": 1}}  # not a notebook key
    said = []
    R.run_batch([NB_SLEEP], p, gpus="cpu", workers=1, out=tmp_path / "out", dry_run=True, log=said.append)
    assert "time budget 11.5 h" in said[0]


def test_durations_and_the_start_rule():
    assert S.parse_duration("11.5h") == 41400 and S.parse_duration("90m") == 5400 and S.parse_duration("1h30m") == 5400
    assert S.parse_duration(3600) == 3600 and S.parse_duration(None) is None and S.parse_duration("0") is None
    with pytest.raises(ValueError, match="e.g. 11.5h"):
        S.parse_duration("eleven hours")
    now = time.time()
    assert S.fits_budget({"seconds": 50}, now + 100, 200)
    assert not S.fits_budget({"seconds": 150}, now + 100, 200)  # would not finish: not started
    assert S.fits_budget({"seconds": 500}, now + 150, 200)  # longer than any budget: starts with half of it left
    assert not S.fits_budget({"seconds": 500}, now + 50, 200)
    assert S.fits_budget({"seconds": 10 ** 9}, None) and S.fits_budget(None, now)


def test_estimates_prefer_measured_times_and_scale_by_gpu(tmp_path):
    c = S.validate_config(dict(model="resnet18", dataset="cifar100", epochs=50, ses=True, robustness=None))
    paper = S.estimate_run(c, "t4", {"epoch_s": 28.0}, "Tesla T4")
    assert paper["seconds"] == pytest.approx(50 * 28.0) and paper["source"] == "paper (Tesla T4)"
    assert S.estimate_run(c, "a100", {"epoch_s": 28.0}, "Tesla T4")["seconds"] == pytest.approx(50 * 28.0 / 4.0)
    l40s = S.estimate_run(c, "t4", {"epoch_s": 100.0}, "L40S")  # the paper's GPU converts to the one planned
    assert l40s["epoch_s"] == pytest.approx(100.0 * S.GPU_SPEED["l40s"])
    measured = S.estimate_run(c, "t4", {"epoch_s": 28.0}, "Tesla T4", measured={"epoch_s": 20.0, "eval_s": 60.0, "gpu": "Tesla T4"})
    assert measured["seconds"] == pytest.approx(50 * 20.0 + 60.0) and measured["source"] == "measured (Tesla T4)"
    own = S.estimate_run(c, "t4", {"epoch_s": 28.0}, measured=None,
                         progress={"epochs_done": 30, "epoch_seconds": [10.0, 12.0], "device": "Tesla T4"})
    assert own["seconds"] == pytest.approx(20 * 11.0) and own["epochs_left"] == 20
    rob = S.validate_config(dict(c, robustness="all15"))  # + the final evaluation: 15x5 + 2x(5x3) cells of 10k images
    assert S.estimate_run(rob, "t4", {"epoch_s": 30.0})["seconds"] == pytest.approx(50 * 30.0 + 30.0 * 105 * 10000 / 150000)
    assert S.gpu_kind("Tesla T4") == "t4" and S.gpu_kind("NVIDIA L40S") == "l40s" and S.gpu_kind("AMD EPYC 7B12") == "cpu"


# ── pause and resume ──────────────────────────────────────────────────────────────────────────

def test_a_run_pauses_at_an_epoch_boundary_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    reference = S.train(_tiny(data_root, tmp_path / "ref"))
    monkeypatch.setenv(S.DEADLINE_ENV, repr(time.time() + 0.01))  # over once the first epoch is measured
    run = tmp_path / "run"
    with pytest.raises(S.RunPaused, match="paused before epoch 2/3"):
        S.train(_tiny(data_root, run))
    prog = json.loads((run / "progress.json").read_text())
    assert prog["paused"] and prog["epochs_done"] == 1 and len(prog["epoch_seconds"]) == 1
    assert (run / "checkpoint.pt").is_file() and not (run / "result.json").exists()
    monkeypatch.delenv(S.DEADLINE_ENV)
    resumed = S.train(_tiny(data_root, run))
    assert _same_history(resumed["history"], reference["history"])
    assert resumed["final"]["test_acc"] == reference["final"]["test_acc"] and "eval_seconds" in resumed["final"]


def _batch(out, params, budget=None, timeout=600):
    cmd = [sys.executable, R.__file__, "batch", str(NB_BUDGET), "--params", str(params), "--gpus", "cpu",
           "--workers", "2", "--out", str(out), *(["--time-budget", budget] if budget else [])]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_batch_with_a_budget_pauses_then_the_next_invocation_finishes_as_if_uninterrupted(data_root, tmp_path):
    """Budget 25 s: `c` (estimated 24 s, never fits once the listing has run) is not started; `a` and `b` (estimated
    1 s, really 150 epochs of 0.25-1 s: they outlast the budget on an idle machine too, where 40 epochs did not)
    start and pause at an epoch boundary; exit 0. The second invocation (no budget, the "next Kaggle version")
    resumes a and b and runs c; every result equals an uninterrupted batch's."""
    params = tmp_path / "p.yaml"
    params.write_text(f"all: {{data_root: {data_root}, epochs: 150, c_seconds: 24}}\n")
    out = tmp_path / "out"
    rc, log = _batch(out, params, "25s")
    assert rc == 0, log
    summary = pd.read_csv(out / "batch_summary.csv")
    status = dict(zip(summary["config"].fillna("report"), summary["status"]))
    assert status == {"a": "paused", "b": "paused", "c": "to do", "report": "done"}, log
    assert "2 paused, 1 to do" in log and "run the same batch again" in log
    runs = out / "93_runner_budget" / "runs"
    for r in ("a", "b"):
        prog = json.loads((runs / f"{r}_seed0" / "progress.json").read_text())
        assert prog["paused"] and 0 < prog["epochs_done"] < 150 and (runs / f"{r}_seed0" / "checkpoint.pt").is_file()
    assert not (runs / "c_seed0").exists() or not (runs / "c_seed0" / "result.json").exists()
    assert (summary.loc[summary["status"] != "done", "hours_left"] > 0).all()

    rc, log = _batch(out, params)  # the next version
    assert rc == 0, log
    rc, ref_log = _batch(tmp_path / "ref", params)  # uninterrupted
    assert rc == 0, ref_log
    for r in ("a", "b", "c"):
        got = json.loads((runs / f"{r}_seed0" / "result.json").read_text())
        want = json.loads((tmp_path / "ref" / "93_runner_budget" / "runs" / f"{r}_seed0" / "result.json").read_text())
        assert _same_history(got["history"], want["history"]), r
        assert got["final"]["test_acc"] == want["final"]["test_acc"]


# ── continuation across Kaggle versions ───────────────────────────────────────────────────────

def test_kaggle_bundle_continues_from_the_previous_versions_outputs(tmp_path, monkeypatch):
    bundle = R.kaggle_package(tmp_path / "pkg", ["1", "4"], username="alice", continue_from="self", time_budget="11h")
    meta = R.validate_kaggle_metadata(bundle / "kernel-metadata.json")
    assert meta["kernel_sources"] == ["alice/ses-batch-t4x2"] and meta["machine_shape"] == "NvidiaTeslaT4"
    assert R.kaggle_package(tmp_path / "pkg2", ["1"], username="alice", continue_from="bob/old-run").name == "pkg2"
    assert json.loads((tmp_path / "pkg2" / "kernel-metadata.json").read_text())["kernel_sources"] == ["bob/old-run"]
    with pytest.raises(ValueError, match="time budget"):
        R.kaggle_package(tmp_path / "pkg3", ["1"], username="alice", time_budget="soon")
    with pytest.raises(ValueError, match=r"a Kaggle version stops at 12 h.*give at most 11.75h"):  # not only the CLI's
        R.kaggle_package(tmp_path / "pkg3", ["1"], username="alice", time_budget="12h")
    assert not (tmp_path / "pkg3").exists()
    driver = nbformat.read(bundle / meta["code_file"], as_version=4)
    code = "\n".join(c.source for c in driver.cells if c.cell_type == "code")
    assert "TIME_BUDGET = '11h'" in code and "time_budget=TIME_BUDGET" in code
    assert code.index("R.copy_previous_outputs(OUT)") < code.index("R.run_batch(")

    # the previous version: a real batch whose output Kaggle then mounts under /kaggle/input/<slug>/outputs
    params = tmp_path / "p.yaml"
    params.write_text("all: {sleep: 0.1}\n")
    inputs = tmp_path / "kaggle" / "input"
    prev = inputs / "ses-batch-t4x2" / "outputs"
    rc = subprocess.run([sys.executable, R.__file__, "batch", str(NB_SLEEP), "--params", str(params), "--gpus", "cpu",
                         "--workers", "2", "--out", str(prev)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stdout + rc.stderr
    run_a = prev / "91_runner_sleep" / "runs" / "a_seed0"
    (run_a / "checkpoint.pt").write_bytes(b"weights")  # a paused run's files, and a cut-short write
    (run_a / ".checkpoint.pt.123.tmp").write_bytes(b"half")
    (prev / "smoke").mkdir()  # a preset folder of that outputs root: copied with it, not as a root of its own
    (prev / "smoke" / R.OUTPUTS_MARKER).write_text("marker")
    working = tmp_path / "kaggle" / "working" / "outputs"
    (working / "91_runner_sleep").mkdir(parents=True)
    (working / "91_runner_sleep" / "report.csv").write_text("newer")  # never overwritten
    roots = R.copy_previous_outputs(working, inputs, log=lambda m: None)
    assert roots == [prev.resolve()]
    got = working / "91_runner_sleep" / "runs" / "a_seed0"
    assert (got / "result.json").read_text() == (run_a / "result.json").read_text()
    assert (got / "checkpoint.pt").read_bytes() == b"weights" and not (got / ".checkpoint.pt.123.tmp").exists()
    assert (working / "91_runner_sleep" / "report.csv").read_text() == "newer"
    recs = R.run_batch([NB_SLEEP], params, gpus="cpu", workers=1, out=working, dry_run=True, log=lambda m: None)
    assert {r["status"] for r in recs if r["kind"] == "run"} == {"skipped"}  # done runs are not run again


# ── the cost plan and the README ───────────────────────────────────────────────────────────────

README_ROW = re.compile(r"(\| (\d+) \| \[`(\d\d_\w+)`\].*\| )(≈ [\d.]+ (?:h|min)|0 \(shared runs\)|done \(in `outputs/`\)) \| ([^|]+) \|$")
PLAN_ELIDED = "(... one line per notebook ...)"


def _readme_runtimes():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if m := README_ROW.match(line):
            rows[m.group(3)] = (m.group(4), m.group(5))
    return rows


def _approx(hours):
    return S.format_hours(hours * 3600, approx=True)  # the cost plan's format


def fresh_clone_outputs(root):
    """The outputs folder a fresh clone has: .gitignore keeps outputs/04_* (notebook 4's paper preset, run on a CPU),
    so `plan` and `power` there count those runs done and their seed SDs measured. The docs quote what these
    commands print in a fresh clone; copied from this checkout's results (never its other, untracked outputs)."""
    for f in (ROOT / "outputs").glob("04_*/runs/*/result.json"):
        dst = root / f.relative_to(ROOT / "outputs")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    assert len(list(root.glob("04_*/runs/*/result.json"))) == 6, "the repository's Exp 4 runs are missing"
    return root


def _cost_cell(row):
    """A notebook's T4 time in the README: what is left of it (a run another notebook trains first counts there)."""
    if row.gpu_hours > 0:
        return _approx(row.gpu_hours)
    return "0 (shared runs)" if row.shared else "done (in `outputs/`)"


def plan_figures(out):
    """What the README's experiment table, its totals and docs/kaggle.md's plan block say, from the plan itself (paper
    preset, every notebook, T4 x2, in a fresh clone): ({notebook: (T4 GPU-hours, memory cell)}, [README sentences],
    docs/kaggle.md's block, (df, totals))."""
    df, t = R.cost_plan("all", gpus=2, gpu="t4", out=out)
    cells = {r.notebook: (_cost_cell(r), R.memory_cell(r)) for r in df.itertuples()}
    sentences = [f"{_approx(t['gpu_hours'])} of T4 time, {_approx(t['wall_hours'])} of wall time on a T4 ×2, "
                 f"{t['versions']} Kaggle versions of at most 11.5 h in {t['weeks']} weeks of the 30-h quota",
                 f"config and seed: {t['shared_runs']} of them, {_approx(t['shared_hours'])})",
                 f"{t['disk_gb']:.1f} GB of files at most"]
    lines = R.format_plan(df, t).splitlines()
    block = "\n".join([lines[0], PLAN_ELIDED, *lines[-4:]])  # what it rests on; total, shared, Kaggle, disk
    return cells, sentences, block, (df, t)


def test_plan_matches_the_readme(tmp_path):
    """The README's experiment table (cost and memory columns), its totals and docs/kaggle.md's plan block are the
    plan's output: `python tests/test_budget.py docs` rewrites them from it."""
    cells, sentences, block, (df, t) = plan_figures(fresh_clone_outputs(tmp_path / "outputs"))
    toy = df["notebook"] == "04_toy_jacobian"  # its 6 runs are in the repository: done, nothing left
    assert len(df) == 20 and (df["left"] + df["shared"] == df["runs"])[~toy].all()  # a shared run is left once
    assert df.loc[toy, ["runs", "left", "gpu_hours"]].values.tolist() == [[6, 0, 0.0]]
    readme = (ROOT / "README.md").read_text().replace("\n", " ")
    fix = "; run `python tests/test_budget.py docs`"
    assert _readme_runtimes() == cells, "the README's experiment table is out of date" + fix
    for sentence in sentences:
        assert sentence in readme, f"the README lacks {sentence!r}{fix}"
    assert block in (ROOT / "docs" / "kaggle.md").read_text(), "docs/kaggle.md's plan block is out of date" + fix
    assert t["shared_runs"] >= 11 and t["shared_hours"] >= 7.4  # the paper preset's duplicates, counted once
    assert t["wall_hours"] >= t["gpu_hours"] / 2 and t["versions"] >= math.ceil(t["wall_hours"] / 11.5)
    for week in t["schedule"]:  # the real limits: versions of at most the budget, a week within the quota
        assert max(week) <= 11.5 + 1e-9 and sum(week) + 0.25 * len(week) <= 30.0 + 1e-9
    assert sum(map(sum, t["schedule"])) == pytest.approx(t["wall_hours"])
    assert t["disk_ok"]
    exp11 = cells["11_resnet50_tinyimagenet"][1]  # says plainly what has to fit on each GPU
    assert re.fullmatch(r"DDP over 2 T4s: [\d.]+ GB must fit on each \([\d.]+ GB on one\)", exp11), exp11
    ses = next(r for r in R.notebook_plan(ROOT / "notebooks" / "11_resnet50_tinyimagenet.ipynb",
                                          out_dir=str(tmp_path / "11")).runs if r.config == "ses")
    m = S.placement(ses.cfg, "t4", 2)["memory"]  # docs/memory.md's Exp 11 figures are the plan's
    memory_md = " ".join((ROOT / "docs" / "memory.md").read_text().split())
    for said in (f"**{m['need_per_gpu_gb'][2]:.1f} GB on each of the two**", f"{m['per_gpu_gb'][2]:.1f} GB is each GPU's",
                 f"it would need {m['need_gb']:.1f} GB ({m['peak_gb']:.1f} GB peak)",
                 f"needs {m['need_gb']:.1f} GB on one t4 ({m['usable_gb']:.1f} usable)"):
        assert said in memory_md, f"docs/memory.md's Exp 11 figures are out of date: {said!r}"

    p = subprocess.run([sys.executable, R.__file__, "plan", "all", "--gpus", "2", "--gpu", "t4", "--out",
                        str(tmp_path / "outputs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert R.format_plan(df, t) in p.stdout


POWER_HEAD = "| plan | T4-hours | wall on T4 ×2 | Kaggle | claims at ≥ 80 % power |"
REST = re.compile(r"The rest cannot be bought with seeds at any practical count: \d+ claims stay below 80 % at 20 "
                  r"seeds, and \d+ have no\s+power")


def _kaggle_cell(versions, weeks):
    return f"{versions} version{'s' * (versions != 1)}, {weeks} week{'s' * (weeks != 1)}"


def power_figures(out):
    """The power table's three rows (each notebook's seeds, paper3, one week's budget) and the sentence after it,
    as `plan`, `plan --seeds paper3`, `power --seeds 3` and `plan --budget 30h` print them (paper preset, T4 x2)."""
    _, own = R.cost_plan("all", gpus=2, gpu="t4", out=out)
    _, three = R.cost_plan("all", gpus=2, gpu="t4", out=out, seeds="paper3")
    costs, needs = R.catalogue("all", "t4", 2, out, "paper")
    power = R.power_table(costs, needs, 3)
    plan = R.budget_plan(costs, needs, 30.0, 2, 1.0, 10)
    settled, n80 = power["power"].fillna(0), power["seeds for 80 %"]
    rows = [f"| each notebook's own seeds | {_approx(own['gpu_hours'])} | {_approx(own['wall_hours'])} | "
            f"{_kaggle_cell(own['versions'], own['weeks'])} | — | — |",
            f"| `--seeds paper3` | {_approx(three['gpu_hours'])} | {_approx(three['wall_hours'])} | "
            f"{_kaggle_cell(three['versions'], three['weeks'])} | {(settled >= 0.8).sum()} of {len(power)} | "
            f"≈ {settled.sum():.0f} |",
            f"| `--budget 30h` (one week) | {_approx(R.budget.gpu_hours(plan.runs))} | {_approx(plan.wall_h)} | "
            f"{_kaggle_cell(sum(map(len, plan.weeks)), len(plan.weeks))} | {len(plan.chosen)} chosen | "
            f"≈ {plan.expected:.0f} |"]
    rest = (f"The rest cannot be bought with seeds at any practical count: "
            f"{(n80 == f'not reachable below {R.budget.MAX_SEEDS}').sum()} claims stay below 80 % at 20 seeds, and "
            f"{(n80 == '—').sum()} have no power")
    return rows, rest


def _power_block(md):
    """(start, end) of the power table's three rows in a markdown text."""
    start = md.index("\n", md.index("\n", md.index(POWER_HEAD)) + 1) + 1  # after the header and its rule
    end = start
    for _ in range(3):
        end = md.index("\n", end) + 1
    return start, end


@pytest.mark.parametrize("doc", ["README.md", "docs/kaggle.md"])
def test_the_power_and_budget_figures_are_the_plans(doc, tmp_path):
    rows, rest = power_figures(fresh_clone_outputs(tmp_path / "outputs"))
    md = (ROOT / doc).read_text()
    start, end = _power_block(md)
    fix = f"; {doc} is out of date: run `python tests/test_budget.py docs`"
    assert md[start:end].splitlines() == rows, "the power table" + fix
    assert rest in " ".join(md.split()), rest + fix


def test_the_power_figures_of_docs_claims_md_are_the_commands(tmp_path):
    """docs/claims.md quotes `power all --seeds 3` and `--seeds 5` (paper preset, a fresh clone): it disagreed with the
    README (69 vs 70 claims) when one was made with Exp 4's committed runs and the other without."""
    costs, needs = R.catalogue("all", "t4", 2, fresh_clone_outputs(tmp_path / "outputs"), "paper")
    said = " ".join((ROOT / "docs" / "claims.md").read_text().split())
    at = {n: R.power_table(costs, needs, n) for n in (3, 5)}
    p3, p5 = (at[n]["power"].fillna(0) for n in (3, 5))
    n80 = at[3]["seeds for 80 %"]
    unreachable = (n80 == f"not reachable below {R.budget.MAX_SEEDS}").sum()
    for want in (f"all {len(p3)} claims",
                 f"at the paper's **3 seeds**: {(p3 >= 0.8).sum()} claims have ≥ 80 % power, and if the paper were "
                 f"right everywhere about {p3.sum():.0f} would read \"reproduced\"; **5 seeds**: {(p5 >= 0.8).sum()} "
                 f"claims, about {p5.sum():.0f};",
                 f"{len(n80) - unreachable - (n80 == '—').sum()} claims reach 80 % within 20 seeds, {unreachable} do "
                 f"not", f"{(n80 == '—').sum()} have no power ("):
        assert want in said, f"docs/claims.md lacks {want!r}: the power command prints it now"


def regenerate_docs():
    """Rewrite the README's table cells and totals and docs/kaggle.md's plan block from the plan (their old figures
    found by the same patterns the test reads)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cells, sentences, block, _ = plan_figures(fresh_clone_outputs(Path(d) / "outputs"))
    readme = ROOT / "README.md"
    lines = [README_ROW.sub(lambda m: f"{m.group(1)}{cells[m.group(3)][0]} | {cells[m.group(3)][1]} |", line)
             for line in readme.read_text().split("\n")]
    text = "\n".join(lines)
    patterns = [r"≈ [\d.]+ h of T4 time, ≈ [\d.]+ h of wall time on a T4 ×2,\s+\d+ Kaggle versions of at most 11\.5 h "
                r"in \d+ weeks of the 30-h quota", r"config and seed: \d+ of them, ≈ [\d.]+ (?:h|min)\)",
                r"[\d.]+ GB of files at most"]
    for pat, new in zip(patterns, sentences):
        text, n = re.subn(pat.replace(" ", r"\s+"), new, text, count=1)
        assert n == 1, pat
    readme.write_text(text)
    kaggle = ROOT / "docs" / "kaggle.md"
    md = kaggle.read_text()
    start = md.index("```\n", md.index("### The cost plan")) + 4
    md = md[:start] + block + md[md.index("\n```", start):]
    kaggle.write_text(md)
    with tempfile.TemporaryDirectory() as d:
        rows, rest = power_figures(fresh_clone_outputs(Path(d) / "outputs"))
    for doc in (readme, kaggle):
        md = doc.read_text()
        start, end = _power_block(md)
        md = md[:start] + "\n".join(rows) + "\n" + md[end:]
        # the figures replaced, the line break kept where it was (before "power")
        md, n = REST.subn(lambda m: rest[:-len(" power")] + m.group(0)[m.group(0).rindex("no") + 2:-5] + "power",
                          md, count=1)
        assert n == 1, doc
        doc.write_text(md)


def test_plan_counts_done_runs_and_measured_times(tmp_path):
    out = tmp_path / "outputs"
    df, _ = R.cost_plan(["10"], gpus=1, gpu="t4", out=out)
    plan = R.notebook_plan(ROOT / "notebooks" / "10_periodic_ses.ipynb", out_dir=str(out / "10_periodic_ses"))
    base = next(r for r in plan.runs if r.config == "baseline")
    # baseline done, measured on a T4 at 20 s/epoch: no longer counted; another seed of it would use the measurement
    S.atomic_write_json(base.result_path, {"config": base.cfg, "env": {"device_name": "Tesla T4"},
                                           "final": {"epoch_seconds_mean": 20.0, "eval_seconds": 100.0}})
    df2, _ = R.cost_plan(["10"], gpus=1, gpu="t4", out=out)
    assert df2.loc[0, "left"] == df.loc[0, "left"] - 1
    assert df.loc[0, "gpu_hours"] - df2.loc[0, "gpu_hours"] == pytest.approx(
        S.run_estimate(base, plan.paper, plan.paper_gpu, "t4")["seconds"] / 3600)
    other = S.Run("baseline", 7, {}, base.run_dir.parent / "baseline_seed7", base.run_dir.parent / "baseline_seed7" / "result.json",
                  "todo", cfg=dict(base.cfg, seed=7))
    est = S.run_estimate(other, plan.paper, plan.paper_gpu, "t4")
    assert est["source"] == "measured (Tesla T4)" and est["seconds"] == pytest.approx(50 * 20.0 + 100.0)


if __name__ == "__main__":  # `python tests/test_budget.py docs`: rewrite the plan's figures in README.md, docs/kaggle.md
    if sys.argv[1:] == ["docs"]:
        regenerate_docs()
    else:
        print("usage: python tests/test_budget.py docs")
