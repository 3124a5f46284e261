"""Batch runner, run plan and Kaggle packaging. The batch tests drive the real CLI (papermill subprocesses,
2 CPU slots) over tests/notebooks/91_runner_sleep.ipynb and 92_runner_fail.ipynb: each run records the
CUDA_VISIBLE_DEVICES / SES_SLOT / pid / start-end times it saw into its result.json."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

import seslib as S
import sesrun as R

NB_DIR = Path(__file__).parent / "notebooks"
NB_SLEEP, NB_FAIL = NB_DIR / "91_runner_sleep.ipynb", NB_DIR / "92_runner_fail.ipynb"


def _batch_cmd(out, params, *notebooks, extra=()):
    return [sys.executable, R.__file__, "batch", *map(str, notebooks), "--params", str(params),
            "--gpus", "cpu", "--workers", "2", "--out", str(out), *extra]


def _run_cli(cmd, cwd, timeout=240):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _results(out, stem):
    return {p.parent.name: json.loads(p.read_text()) for p in (out / stem / "runs").glob("*/result.json")}


# ─── notebook side ─────────────────────────────────────────────────────────────────────────────

def test_plan_runs_lists_marks_done_and_validates(tmp_path):
    grid = {"baseline": {}, "ses": {"beta": 0.5}}
    with pytest.raises(ValueError, match=r"unknown config.*'sess'.*valid: \['baseline', 'ses'\]"):
        S.plan_runs(grid, ["sess"], [0], tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        S.plan_runs(grid, "all", ["x"], tmp_path)

    done_dir = tmp_path / "runs" / "ses_seed1"
    S.atomic_write_json(done_dir / "result.json", {"final": {}})
    (tmp_path / "runs" / "baseline_seed1").mkdir(parents=True)
    (tmp_path / "runs" / "baseline_seed1" / "result.json").write_text('{"final": ')  # half-written: not done

    listing = tmp_path / "list.json"
    plan = S.plan_runs(grid, "all", [0, 1], tmp_path, str(listing), cost={"ses": 3.0})
    assert plan.listing and plan.todo == [] and plan.report is False
    rows = json.loads(listing.read_text())
    assert [(r["config"], r["seed"], r["done"], r["cost"]) for r in rows] == [
        ("baseline", 0, False, 1.0), ("baseline", 1, False, 1.0), ("ses", 0, False, 3.0), ("ses", 1, True, 3.0)]
    assert rows[3]["run_dir"] == str(done_dir)
    assert set(rows[0]) == {"config", "seed", "cost", "done", "status", "stale", "run_dir", "cfg", "est"}
    assert [r["status"] for r in rows] == ["todo", "todo", "todo", "done"] and rows[0]["cfg"] is None  # no recipe

    plan = S.plan_runs(grid, "ses", 1, tmp_path, cost=lambda c, o: 10 * o.get("beta", 1))
    assert [(r.config, r.seed, r.done, r.cost, r.overrides) for r in plan.runs] == [("ses", 1, True, 5.0, {"beta": 0.5})]
    assert plan.todo == [] and plan.report and not plan.listing
    assert S.plan_runs(grid, "all", [1], tmp_path, report_only=True).todo == []
    todo = S.plan_runs(grid, "all", [1], tmp_path, report=False)
    assert [r.config for r in todo.todo] == ["baseline"] and todo.todo[0].result_path == tmp_path / "runs/baseline_seed1/result.json"
    assert not todo.report


def test_validate_params_and_batch_params(tmp_path):
    with pytest.raises(ValueError, match=r"'epoch' \(did you mean 'epochs'\?\)"):
        S.validate_params({"epoch": 3}, {"epochs", "seeds"})
    assert R.find_notebooks(["91", "92_runner_fail"], dirs=[NB_DIR]) == [NB_SLEEP.resolve(), NB_FAIL.resolve()]
    with pytest.raises(ValueError, match="not found"):
        R.find_notebooks(["7"], dirs=[NB_DIR])

    nbs = [NB_SLEEP.resolve(), NB_FAIL.resolve()]
    p = tmp_path / "p.yaml"
    p.write_text("all: {sleep: 1, seeds: [0, 1]}\n92: {fail_config: bad}\n92_runner_fail: {sleep: 2}\n")
    got = R.load_batch_params(p, nbs)
    assert got[nbs[0]] == {"sleep": 1, "seeds": [0, 1]}
    assert got[nbs[1]] == {"sleep": 2, "seeds": [0, 1], "fail_config": "bad"}
    with pytest.raises(ValueError, match=r"'slep' \(did you mean 'sleep'\?\)"):
        R.load_batch_params({"91": {"slep": 1}}, nbs)
    with pytest.raises(ValueError, match="set by the batch runner"):
        R.load_batch_params({"all": {"list_runs": "x"}}, nbs)


def test_batch_slots():
    cpu = R.batch_slots("cpu", workers=2)
    assert [s["name"] for s in cpu] == ["cpu0", "cpu1"]
    assert [(s["env"]["CUDA_VISIBLE_DEVICES"], s["env"]["SES_SLOT"]) for s in cpu] == [("", "0"), ("", "1")]
    import torch
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="CUDA device"):
            R.batch_slots("0,7")


def test_setup_cell_finds_seslib_from_a_subfolder():
    root = Path(S.__file__).resolve().parent
    code = R.SETUP_CELL + "\nprint(sys.path[0]); print(sorted(k for k in dir() if not k.startswith('_')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root / "tests", capture_output=True, text=True, check=True).stdout
    first, names = out.splitlines()
    assert first == str(root)
    assert set(eval(names)) <= {"sys", "os", "glob", "importlib"}  # only modules: no stray notebook parameters


def test_setup_cell_says_what_to_do_where_seslib_is_not_importable(tmp_path):
    """A plain Jupyter kernel started outside the repository (not Colab, not Kaggle): one clear error, not a bare
    ModuleNotFoundError in the next cell."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", R.SETUP_CELL], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 1
    assert f"RuntimeError: seslib.py is not importable: looked in {tmp_path}, its parent" in p.stderr
    assert "sys.path.insert(0, '/path/to/the/repository')" in p.stderr


def test_every_notebook_starts_with_the_current_setup_cell():
    import nbformat
    for path in sorted((Path(S.__file__).parent / "notebooks").glob("*.ipynb")):
        assert nbformat.read(str(path), as_version=4).cells[1].source.strip() == R.SETUP_CELL.strip(), path.name


# ─── batch runner (CLI, real papermill subprocesses) ───────────────────────────────────────────

def test_batch_parallel_slots_failure_then_resume(tmp_path):
    out = tmp_path / "outputs"
    params = tmp_path / "params.yaml"
    params.write_text("all: {sleep: 4}\n92: {fail_config: bad}\n")
    rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP, NB_FAIL), tmp_path)
    assert rc != 0, log

    summary = pd.read_csv(out / "batch_summary.csv", keep_default_na=False)
    runs = summary[summary.kind == "run"].set_index("config")
    assert runs.status.to_dict() == {"b": "done", "a": "done", "ok": "done", "bad": "failed"}, log
    assert list(runs.index[:2]) == ["b", "a"]  # costliest first
    assert "fails on purpose" in runs.loc["bad", "error"]
    assert "RuntimeError: bad fails on purpose" in Path(runs.loc["bad", "log"]).read_text()
    assert set(summary[summary.kind == "report"].status) == {"done"}

    res = {**_results(out, "91_runner_sleep"), **_results(out, "92_runner_fail")}
    assert set(res) == {"a_seed0", "b_seed0", "ok_seed0"}
    assert {r["python"] for r in res.values()} == {sys.executable}  # the kernel runs the runner's interpreter
    assert {r["cuda_visible_devices"] for r in res.values()} == {""}  # CPU slots hide the GPUs
    assert {r["slot"] for r in res.values()} == {"0", "1"}
    overlapping = [(x, y) for x in res.values() for y in res.values()
                   if x["pid"] < y["pid"] and x["start"] < y["end"] and y["start"] < x["end"]]
    assert overlapping, "the two slots never ran at the same time"
    assert all(x["slot"] != y["slot"] for x, y in overlapping)  # concurrent runs are in different slots
    for stem, n in (("91_runner_sleep", 2), ("92_runner_fail", 1)):
        assert len(pd.read_csv(out / stem / "report.csv")) == n
        assert (out / stem / "report.ipynb").is_file()
    for run in ("a_seed0", "b_seed0"):
        assert (out / "91_runner_sleep" / "runs" / run / "notebook.ipynb").is_file()
        assert (out / "91_runner_sleep" / "runs" / run / "log.txt").is_file()

    # second invocation: done runs are skipped, the failed one runs again (now without the failure)
    params.write_text("all: {sleep: 1}\n")
    rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP, NB_FAIL), tmp_path)
    assert rc == 0, log
    summary = pd.read_csv(out / "batch_summary.csv", keep_default_na=False)
    assert summary[summary.kind == "run"].set_index("config").status.to_dict() == {
        "a": "skipped", "b": "skipped", "ok": "skipped", "bad": "done"}, log
    again = {**_results(out, "91_runner_sleep"), **_results(out, "92_runner_fail")}
    assert all(again[k]["start"] == res[k]["start"] for k in res)  # not re-run
    assert len(pd.read_csv(out / "92_runner_fail" / "report.csv")) == 2
    bad = out / "92_runner_fail" / "runs" / "bad_seed0"  # the failed attempt's log is kept beside the new one
    assert "bad fails on purpose" in (bad / "log.1.txt").read_text()
    assert "bad fails on purpose" not in (bad / "log.txt").read_text()


def test_batch_resumes_after_sigkill(tmp_path):
    out = tmp_path / "outputs"
    params = tmp_path / "params.yaml"
    params.write_text("91: {seeds: [0, 1], sleep: 2}\n")
    p = subprocess.Popen(_batch_cmd(out, params, NB_SLEEP, extra=["--no-report"]), cwd=tmp_path, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not _results(out, "91_runner_sleep") and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert _results(out, "91_runner_sleep"), "no run finished"
    family = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    _, alive = psutil.wait_procs(family, timeout=10)  # runs die with the runner (PDEATHSIG + kernel parent poll)
    assert not alive, [a.cmdline()[:3] for a in alive]
    n_before = len(_results(out, "91_runner_sleep"))
    assert n_before < 4

    rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP, extra=["--no-report"]), tmp_path)
    assert rc == 0, log
    assert set(_results(out, "91_runner_sleep")) == {"a_seed0", "a_seed1", "b_seed0", "b_seed1"}
    status = pd.read_csv(out / "batch_summary.csv").query("kind == 'run'").status.value_counts().to_dict()
    assert status == {"skipped": n_before, "done": 4 - n_before}, log


# ─── Kaggle ────────────────────────────────────────────────────────────────────────────────────

def test_kaggle_package_validates_and_broken_metadata_is_rejected(tmp_path):
    out = tmp_path / "kaggle"
    rc, log = _run_cli([sys.executable, R.__file__, "kaggle", "--out", str(out), "--username", "tester",
                        "--notebooks", str(NB_SLEEP), str(NB_FAIL), "--data-dataset", "tester/ses-data"], tmp_path)
    assert rc == 0, log
    meta = R.validate_kaggle_metadata(out)
    assert meta["id"] == "tester/ses-batch-t4x2" and meta["machine_shape"] == "NvidiaTeslaT4"
    assert meta["enable_gpu"] is True and meta["kernel_type"] == "notebook"
    assert meta["dataset_sources"] == ["tester/ses-data", "tester/seslib-code"]
    ds = out / "code-dataset"
    assert R.validate_kaggle_metadata(ds)["id"] == "tester/seslib-code"
    assert {"seslib.py", "sesrun.py", "requirements.txt", NB_SLEEP.name, NB_FAIL.name} <= {f.name for f in ds.iterdir()}
    import nbformat
    driver = nbformat.read(str(out / meta["code_file"]), as_version=4)
    src = "\n".join(c.source for c in driver.cells)
    assert "/kaggle/input" in src and "run_batch(" in src and "/kaggle/working/outputs" in src

    def broken(**change):
        bad = {**meta, **change}
        (out / "kernel-metadata.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError) as e:
            R.validate_kaggle_metadata(out / "kernel-metadata.json")
        return str(e.value)

    assert "slugify" in broken(title="Another Title")
    assert "slug" in broken(id="tester/Bad_Slug", title="Bad Slug")
    assert "5-50" in broken(id="tester/abc", title="abc")
    assert "not found" in broken(code_file="missing.ipynb")
    assert "kernel_type" in broken(kernel_type="notebok")
    assert "missing field" in broken(language="")
    (out / "kernel-metadata.json").write_text(json.dumps(meta))
    R.validate_kaggle_metadata(out)


def test_quick_job_runs_what_it_has_data_for_and_skips_the_rest(tmp_path, data_root):
    """The README's quick job on CPU: CIFAR-10 only in the data root, so Exp 11 (Tiny-ImageNet) is skipped with
    the reason while Exps 1 and 4 run their smoke preset and their reports; exit 0; says where the figures are."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-batches-py").symlink_to(data_root / "cifar-10-batches-py")
    env = {k: v for k, v in os.environ.items() if k not in ("SES_DATA", "KAGGLE_KERNEL_RUN_TYPE")}
    cmd = [sys.executable, R.__file__, "quick", "1", "4", "11", "--gpus", "cpu", "--workers", "2",
           "--data-root", str(root), "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert "[skip] 11_resnet50_tinyimagenet: needs tinyimagenet" in log and "SES_DATA" in log
    assert "quick job: 2 notebook(s) ran, 0 failed, 1 skipped" in log
    smoke = tmp_path / "out" / "smoke"  # the smoke preset never writes into the paper folders
    for stem in ("01_training_dynamics", "04_toy_jacobian"):
        assert _results(smoke, stem), stem
        assert (smoke / stem / "report.csv").is_file()
        assert list((smoke / stem / "figures").glob("*.png"))
    assert not (smoke / "11_resnet50_tinyimagenet" / "runs").exists()
    assert f"figures: {smoke}/NN_name/figures" in log
