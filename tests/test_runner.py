"""Batch runner, run plan and Kaggle packaging. The batch tests drive the real CLI (papermill subprocesses,
2 CPU slots) over tests/notebooks/91_runner_sleep.ipynb and 92_runner_fail.ipynb: each run records the
CUDA_VISIBLE_DEVICES / SES_SLOT / pid / start-end times it saw into its result.json."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
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


def test_a_misspelled_params_key_is_refused_with_a_did_you_mean(tmp_path, capsys):
    """A misspelled notebook name would leave that notebook on its defaults (the paper preset) with only a note; a
    misspelled batch setting got a message that did not name it."""
    nbs = [NB_SLEEP.resolve()]
    with pytest.raises(ValueError, match=r"params key '01_trainig_dynamics' names no notebook \(did you mean "
                                         r"'01_training_dynamics'\?\)"):
        R.load_batch_params({"01_trainig_dynamics": {"preset": "smoke"}}, nbs)
    with pytest.raises(ValueError, match=r"params key '91_runner_slep' names no notebook \(did you mean "
                                         r"'91_runner_sleep'\?\)"):
        R.load_batch_params({"91_runner_slep": {"sleep": 1}}, nbs)
    with pytest.raises(ValueError, match="params key '77' names no notebook"):
        R.load_batch_params({"77": {"sleep": 1}}, nbs)
    p = tmp_path / "p.yaml"
    p.write_text("time_budgt: 1h\nall: {sleep: 1}\n")
    with pytest.raises(ValueError, match=r"params key 'time_budgt': unknown batch setting \(did you mean "
                                         r"'time_budget'\?\)"):
        R.load_batch_params(p, nbs)
    with pytest.raises(ValueError, match=r"params key '91': 3 is not a dict of overrides"):
        R.load_batch_params({"91": 3}, nbs)
    # a notebook of the suite that is not in this batch is still only a note (one params file serves many batches)
    assert R.load_batch_params({"01_training_dynamics": {"preset": "smoke"}, "4": {}}, nbs) == {nbs[0]: {}}
    assert "note: params for '01_training_dynamics' match no notebook of this batch" in capsys.readouterr().out


def test_batch_slots():
    cpu = R.batch_slots("cpu", workers=2)
    assert [s["name"] for s in cpu] == ["cpu0", "cpu1"]
    assert [(s["env"]["CUDA_VISIBLE_DEVICES"], s["env"]["SES_SLOT"]) for s in cpu] == [("", "0"), ("", "1")]
    import torch
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="CUDA device"):
            R.batch_slots("0,7")


def test_setup_cell_finds_seslib_from_a_subfolder():
    root = S.ROOT
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
    assert f"RuntimeError: seslib is not importable: looked in {tmp_path}, its parent" in p.stderr
    assert "sys.path.insert(0, '/path/to/the/repository')" in p.stderr


def test_every_notebook_starts_with_the_current_setup_cell():
    import nbformat
    for path in sorted((S.ROOT / "notebooks").glob("*.ipynb")):
        assert nbformat.read(str(path), as_version=4).cells[1].source.strip() == R.SETUP_CELL.strip(), path.name


# ─── the runner's pure steps: a finished job's outcome, a notebook's source, durations ─────────

def _outcome(rc, result_ok, log, kind="run", attempt=1, retries=1, timeout=None):
    return R.job_outcome(kind, rc, result_ok, log, attempt, retries, timeout)


def test_job_outcome_decides_every_exit_from_plain_values():
    ran = "[run] a seed 0 -> outputs/nb/runs/a_seed0\n"
    assert _outcome(0, True, ran) == ("done", "", False)
    assert _outcome(0, False, "report: 2 result(s)\n", kind="report") == ("done", "", False)  # only runs write results
    # a run's kernel that exits cleanly without a result.json says why with a marker, else it failed
    assert _outcome(0, False, ran + "[locked] a seed 0: held by pid 7\nSES-RUN-LOCKED\n") == (
        "skipped", "locked by another process", False)
    assert _outcome(0, False, ran + "[paused] a seed 0: paused before epoch 2/3\nSES-RUN-PAUSED\n") == (
        "paused", "time budget: checkpoint kept, resumes next time", False)
    assert _outcome(0, False, "[budget] a seed 0: not started, needs ~2.0 h\nSES-RUN-BUDGET\n") == (
        "to do", "time budget: not started", False)
    assert _outcome(0, False, "SES-RUN-PAUSED\nSES-RUN-LOCKED\n")[0] == "skipped"  # locked is looked for first
    assert _outcome(0, False, "SES-RUN-BUDGET\nSES-RUN-PAUSED\n")[0] == "paused"
    assert _outcome(0, True, ran + "SES-RUN-PAUSED\n") == ("done", "", False)  # a result written wins over a marker
    assert _outcome(0, False, ran) == ("failed", "the notebook finished but wrote no result.json", False)
    assert _outcome("timeout", False, ran + "SES-RUN-ERROR: KeyboardInterrupt\n", timeout=30) == (
        "failed", "timeout after 30s", False)
    # failed: what follows the LAST SES-RUN-ERROR, else the log's last line (200 characters at most)
    log = ("SES-RUN-ERROR: ValueError: an earlier one\n"
           "PapermillExecutionError: ...\nSES-RUN-ERROR:  RuntimeError: bad fails on purpose \nTraceback (most recent "
           "call last):\n  File \"driver\", line 12\n")
    assert _outcome(1, False, log) == ("failed", "RuntimeError: bad fails on purpose", False)
    assert _outcome(1, False, log, kind="list") == ("failed", "RuntimeError: bad fails on purpose", False)
    assert _outcome(-9, False, "starting\n" + "x" * 300 + "\n") == ("failed", "x" * 200, False)
    assert _outcome(1, False, "") == ("failed", "", False)
    # a kernel-start race: retried while a retry is left; never after a timeout
    race = "RuntimeError: Kernel didn't respond in 60 seconds\n"
    assert _outcome(1, False, race, attempt=1, retries=1) == ("failed", race.strip(), True)
    assert _outcome(1, False, race, attempt=2, retries=1) == ("failed", race.strip(), False)
    assert _outcome(1, False, "zmq.error.ZMQError: Address already in use\n", kind="list", retries=0)[2] is False
    assert _outcome(1, False, "zmq.error.ZMQError: Address already in use\n", kind="list", retries=2)[2] is True
    assert _outcome(0, False, "Kernel died before replying to kernel_info\n") == (
        "failed", "the notebook finished but wrote no result.json", True)
    assert _outcome("timeout", False, race, timeout=5) == ("failed", "timeout after 5s", False)
    assert _outcome(1, False, "RuntimeError: a plain failure\n", attempt=1, retries=5)[2] is False


def _notebook(path, *cells, params="configs = 'all'\nseeds = [0]  # one = 'run'\n_defined = set(globals())\n"):
    import nbformat
    v4 = nbformat.v4
    book = v4.new_notebook(cells=[v4.new_markdown_cell("GRID = {'a markdown': 'cell, not code'}"),
                                  v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                                  *(v4.new_code_cell(c) for c in cells)])
    nbformat.write(book, str(path))
    return path


def test_notebook_source_reads_grid_model_and_data_set_however_they_are_written(tmp_path):
    one_line = _notebook(tmp_path / "1.ipynb", "GRID = {'a': dict(ses=False), 'b': dict(ses=True)}")
    as_call = _notebook(tmp_path / "2.ipynb", "GRID = dict(a=dict(ses=False), b=dict(ses=True))")
    split = _notebook(tmp_path / "3.ipynb", "GRID = {\n    'a':\n        dict(ses=False), \"b\": {'ses': True},\n"
                                             "  'c': dict(\n ses=True)\n        }\nplan = None")
    mixed = _notebook(tmp_path / "4.ipynb", "GRID = dict({'a': {}}, b={})")
    for path, configs in ((one_line, ["a", "b"]), (as_call, ["a", "b"]), (split, ["a", "b", "c"]), (mixed, ["a", "b"])):
        assert R.read_notebook(path).grid_configs() == configs, path.name
        assert R.batch._notebook_cost(path) == len(configs) * S.run_cost({"model": "resnet18", "epochs": 1}), path.name
    computed = _notebook(tmp_path / "5.ipynb", "GRID = {f'k{k}': {} for k in range(3)}", "!pip install nothing")
    assert R.read_notebook(computed).grid_configs() is None and R.batch._notebook_cost(computed) == 1.0  # unknowable: 1

    recipe = _notebook(tmp_path / "6.ipynb", "# BASE = dict(model='resnet50', dataset='tinyimagenet')\n"
                       "BASE = dict(\n    model='wrn28_10', dataset=\"cifar100\", epochs=50)\nnote = \"model='mlp_toy'\"",
                       "GRID = {'x': {'model': 'vit_tiny'}, 'y': dict(ses=True)}\ndataset = 'tinyimagenet'")
    src = R.read_notebook(recipe)
    assert src.strings("model") == ["wrn28_10", "vit_tiny"] and src.strings("dataset") == ["cifar100", "tinyimagenet"]
    assert R.cli._notebook_datasets(recipe) == {"cifar100", "tinyimagenet"}
    assert R.batch._notebook_cost(recipe) == 2 * S.run_cost({"model": "wrn28_10", "dataset": "cifar100", "epochs": 1})
    assert src.declared_params() == {"configs", "seeds"}

    with pytest.raises(ValueError, match="not plain Python"):
        R.read_notebook(_notebook(tmp_path / "7.ipynb", params="configs = 'all'\n%matplotlib inline\n")).declared_params()
    import nbformat
    untagged = tmp_path / "8.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), str(untagged))
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        R.read_notebook(untagged).declared_params()


def test_the_source_reader_agrees_with_running_each_notebooks_cells(tmp_path):
    """Every experiment notebook: GRID's configs, its recipe's model and its data set as read with ast are those its
    executed cells plan."""
    for nb in R.find_notebooks("all"):
        plan, src = R.notebook_plan(nb, out_dir=str(tmp_path / nb.stem)), R.read_notebook(nb)
        assert src.grid_configs() == list(plan.grid), nb.name
        planned = plan.resolved.values()
        assert set(src.strings("model")) == {c["model"] for c in planned if "model" in c}, nb.name
        assert R.cli._notebook_datasets(nb) == {c["dataset"] for c in planned if "dataset" in c}, nb.name


def test_one_duration_format():
    assert [S.format_hours(s) for s in (41400, 3600, 1500, 120, 119, 40)] == ["11.5 h", "1.0 h", "25 min", "2 min", "119 s",
                                                                      "40 s"]
    assert [S.format_hours(s, approx=True) for s in (41400, 3600, 1500, 90, 10, 0)] == ["≈ 11.5 h", "≈ 1.0 h", "≈ 25 min",
                                                                                  "≈ 2 min", "≈ 1 min", "0"]


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
    assert {"seslib", "sesrun.py", "requirements.txt", NB_SLEEP.name, NB_FAIL.name} <= {f.name for f in ds.iterdir()}
    assert (ds / "seslib" / "__init__.py").is_file() and not list(ds.rglob("__pycache__"))
    import nbformat
    driver = nbformat.read(str(out / meta["code_file"]), as_version=4)
    src = "\n".join(c.source for c in driver.cells)
    assert "/kaggle/input" in src and "run_batch(" in src and "/kaggle/working/outputs" in src
    # the first version measures the GPU (the batch reads OUT/gpu_check.json): the script travels with the code
    assert (ds / "bench" / "gpu_check.py").is_file() and "GPU_CHECK = True" in src and "gpu_check.py" in src
    from IPython.core.inputtransformer2 import TransformerManager
    for cell in driver.cells:  # every code cell compiles as IPython runs it (its `!` lines included)
        if cell.cell_type == "code":
            compile(TransformerManager().transform_cell(cell.source), "driver cell", "exec")

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
    the reason while Exps 1 and 4 run their smoke preset and their reports; says where the figures are; exits 3
    (exit 0 read "most notebooks skipped" as success), 0 with --allow-missing-data."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-batches-py").symlink_to(data_root / "cifar-10-batches-py")
    env = {k: v for k, v in os.environ.items() if k not in ("SES_DATA", "KAGGLE_KERNEL_RUN_TYPE")}
    cmd = [sys.executable, R.__file__, "quick", "1", "4", "11", "--gpus", "cpu", "--workers", "2",
           "--data-root", str(root), "--out", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == R.cli.QUICK_SKIPPED, log
    assert log.strip().splitlines()[-1] == ("exit 3: 1 notebook(s) skipped for missing data (--allow-missing-data "
                                            "exits 0 when that is expected)")
    assert "[skip] 11_resnet50_tinyimagenet: needs tinyimagenet" in log and "SES_DATA" in log
    assert "quick job: ONLY 2 of 3 notebooks: 1 SKIPPED for missing data (tinyimagenet); 2 ran, 0 failed" in log
    smoke = tmp_path / "out" / "smoke"  # the smoke preset never writes into the paper folders
    for stem in ("01_training_dynamics", "04_toy_jacobian"):
        assert _results(smoke, stem), stem
        assert (smoke / stem / "report.csv").is_file()
        assert list((smoke / stem / "figures").glob("*.png"))
    assert not (smoke / "11_resnet50_tinyimagenet" / "runs").exists()
    assert f"figures: {smoke}/NN_name/figures" in log
    p = subprocess.run(cmd + ["--allow-missing-data"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "1 SKIPPED for missing data" in p.stdout, p.stdout + p.stderr
    p = subprocess.run(cmd + ["--allow-missing-data", "--require-data"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "contradict each other" in p.stderr, p.stdout + p.stderr


def test_the_committed_exp4_report_and_summary_are_what_the_report_pass_writes_now(tmp_path):
    """The repository ships notebook 4's paper-preset runs with their report and outputs/SUMMARY.md; those once kept an
    old verdict rule (paired by seed, a ±0.5 tie, no power) after the rule changed. The report pass over the
    committed runs must write them again, word for word."""
    import shutil
    committed = S.ROOT / "outputs"
    for f in committed.glob("04_toy_jacobian/runs/*/result.json"):
        (tmp_path / f.relative_to(committed)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, tmp_path / f.relative_to(committed))
    recs = R.run_batch([S.ROOT / "notebooks" / "04_toy_jacobian.ipynb"], gpus="cpu", workers=1, out=tmp_path,
                       log=lambda m: None)
    assert [r["status"] for r in recs if r["kind"] == "run"] == ["skipped"] * 6  # nothing trains: the runs are done
    fix = " is stale: python sesrun.py batch 4 --gpus cpu && python sesrun.py summary, and commit them"
    for name in ("04_toy_jacobian/report.md", "04_toy_jacobian/claims.csv", "04_toy_jacobian/values.csv", "SUMMARY.md",
                 "SUMMARY.csv"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"outputs/{name}{fix}"


def test_hours_of_cpu_training_are_refused_before_any_run_starts(tmp_path):
    """A paper-preset batch where no GPU is visible falls back to CPU slots: days of work, refused with its estimate
    unless asked for; short CPU work (smoke, the toy study's paper runs) is not asked about."""
    cpu, gpu = R.batch_slots("cpu", workers=2), [{"name": "gpu0", "env": {"CUDA_VISIBLE_DEVICES": "0", "SES_SLOT": "0"}}]
    job = lambda seconds: R.batch._Job("run", NB_SLEEP, {}, tmp_path / "o.ipynb", tmp_path / "log.txt",  # noqa: E731
                                 est={"seconds": seconds})
    long, toy = [job(3 * 3600), job(2 * 3600)], [job(60), job(60)]
    with pytest.raises(ValueError, match=r"2 run\(s\) would train on the CPU \(no GPU slot\) for ≈ 5.0 h \(estimate"):
        R.batch._refuse_a_long_cpu_batch(long, cpu, allow=False)
    R.batch._refuse_a_long_cpu_batch(long, cpu, allow=True)
    R.batch._refuse_a_long_cpu_batch(long, gpu, allow=False)
    R.batch._refuse_a_long_cpu_batch(toy, cpu, allow=False)

    out = tmp_path / "out"  # the real notebook 1 at the paper preset on CPU slots: refused, nothing started
    rc, log = _run_cli([sys.executable, R.__file__, "batch", "1", "--gpus", "cpu", "--workers", "2", "--out", str(out)],
                       tmp_path)
    assert rc == 2 and "would train on the CPU (no GPU slot)" in log and "--allow-cpu" in log, log
    assert not list((out / "01_training_dynamics").glob("runs/*/log.txt"))


def test_a_second_batch_on_the_same_outputs_root_is_refused_in_one_line(tmp_path):
    """Two batches on one --out trained nothing twice but mixed their logs and batch_summary.csv (a finished run was
    listed as 'skipped, locked'): the second is now refused while the first holds the root, a dry run still reads."""
    out = tmp_path / "out"
    params = tmp_path / "p.yaml"
    params.write_text("all: {sleep: 0}\n")
    with S.run_lock(out / ".batch"):  # the first batch, as far as the second can tell
        rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP), tmp_path)
        assert rc == 2 and f"error: another batch is running on {out} (pid {os.getpid()}" in log, log
        assert "give this batch another --out" in log and "Traceback" not in log
        assert not (out / "91_runner_sleep").exists() and not (out / "batch_summary.csv").exists()
        rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP, extra=["--dry-run"]), tmp_path)
        assert rc == 0, log
    rc, log = _run_cli(_batch_cmd(out, params, NB_SLEEP, extra=["--no-report"]), tmp_path)  # the root is free again
    assert rc == 0 and (out / "batch_summary.csv").is_file(), log


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_bytes("all: {note: caf\u00e9}\n".encode("latin-1"))  # 0xe9: 'utf-8' codec can't decode byte 0xe9
    with pytest.raises(ValueError, match=r"--params .*p.yaml: not UTF-8 text \(byte 0xe9 at position 15\): save it as"):
        R.load_batch_params(p, [NB_SLEEP.resolve()])


def test_a_bad_environment_value_names_its_variable(tmp_path, monkeypatch):
    plan = S.plan_runs({"a": {}}, "all", [0], tmp_path, train_fn=lambda cfg: {"final": {}})
    monkeypatch.setenv(S.BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$SES_TIME_BUDGET: time budget 'soon'"):
        S.run_plan(plan)
    monkeypatch.delenv(S.BUDGET_ENV)
    monkeypatch.setenv(S.TORCHRUN_ENV, "two")
    with pytest.raises(ValueError, match=r"\$SES_TORCHRUN='two': give 'auto' or a number"):
        S.run_plan(plan)


def test_torchrun_auto_without_a_gpu_is_refused_before_any_run(data_root, tmp_path, monkeypatch):
    """torchrun='auto' on a machine without a GPU failed each run in turn (every one tried, the first error raised at
    the end); now one line before the first run."""
    base = dict(model="resnet18", dataset="cifar10", data_root=str(data_root))
    plan = S.plan_runs({"a": {}, "b": {}}, "all", [0], tmp_path, base=base, preset="smoke", device="cpu")
    started = []
    monkeypatch.setattr(S.notebook, "train_torchrun", lambda cfg, n: started.append(cfg))
    monkeypatch.setattr(S.training.torch.cuda, "device_count", lambda: 0)  # this machine has none; a GPU box too
    with pytest.raises(ValueError, match=r"^torchrun='auto' found no GPU; give a number of \(CPU\) processes"):
        S.run_plan(plan, torchrun="auto")
    assert started == []
    with pytest.raises(ValueError, match=r"torchrun must be 'auto' or an int >= 1; got 0.5"):
        S.run_plan(plan, torchrun=0.5)


def test_a_dry_run_writes_nothing_and_a_bad_out_is_one_line(tmp_path):
    """A dry run from another working directory created ./outputs/.batch/ there; an --out that is a file died on
    '[Errno 20] Not a directory: .../.batch/jupyter/kernels/...'."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    params = tmp_path / "p.yaml"
    params.write_text("all: {sleep: 0}\n")
    rc, log = _run_cli(_batch_cmd("outputs", params, NB_SLEEP.resolve(), extra=["--dry-run"]), elsewhere)
    assert rc == 0 and "todo" in log, log
    assert list(elsewhere.iterdir()) == []  # not even ./outputs
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    rc, log = _run_cli(_batch_cmd(a_file, params, NB_SLEEP), tmp_path)
    assert rc == 2 and f"error: --out {a_file} is a file: give the outputs folder" in log and "Errno" not in log, log
    if os.geteuid() != 0:  # root writes anywhere: the read-only case needs a user
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        rc, log = _run_cli(_batch_cmd(ro / "out", params, NB_SLEEP), tmp_path)
        ro.chmod(0o755)
        assert rc == 2 and "is read-only" in log and "Errno" not in log, log


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in R.CLI_COMMANDS])
def test_every_help_page_prints(argv, capsys):
    """A '%' in one command's help ("80 %, ...") made argparse's %-formatting crash `python sesrun.py --help`, the
    first command a newcomer types, and every subcommand's --help with it."""
    with pytest.raises(SystemExit) as stop:
        R.main(argv)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("usage: sesrun.py"), out
    if argv == ["--help"]:
        assert "the seeds it needs for 80 %, and" in " ".join(out.split())  # the help that crashed, printed


def test_the_training_entry_point_prints_its_help(capsys):
    with pytest.raises(SystemExit) as stop:
        S.command.main(["train", "--help"])
    assert stop.value.code == 0 and "--config" in capsys.readouterr().out


def test_cli_values_are_checked_in_one_line_naming_the_flag(tmp_path):
    """plan --time-budget 0 (a TypeError), plan --gpus 0 ('wall time on 0 x t4'), batch --timeout -1 (accepted),
    batch --time-budget -5h (argparse's 'expected one argument'), summary on a missing folder or on a file ('no such
    folder')."""
    cases = [(["plan", "5", "--time-budget", "0"], "argument --time-budget: must be a positive duration"),
             (["plan", "5", "--gpus", "0"], "argument --gpus: must be a whole number >= 1; got '0'"),
             (["batch", "5", "--timeout", "-1"], "argument --timeout: must be a number of seconds > 0; got '-1'"),
             (["batch", "5", "--time-budget", "-5h"], "argument --time-budget: must be a positive duration"),
             (["plan", "5", "--budget", "-3h"], "argument --budget: must be a positive duration"),
             (["summary", "--out", str(tmp_path / "none")], "no such folder"),
             (["summary", "--out", __file__], "is a file: give the outputs root")]
    for args, want in cases:
        rc, log = _run_cli([sys.executable, R.__file__, *args], tmp_path, timeout=120)
        assert rc == 2 and want in log and "Traceback" not in log, (args, log)
    smoke = tmp_path / "outputs" / "smoke" / "05_multiseed_cifar10"
    smoke.mkdir(parents=True)
    (smoke / "claims.csv").write_text("claim,verdict\n")
    rc, log = _run_cli([sys.executable, R.__file__, "summary", "--out", str(tmp_path / "outputs")], tmp_path)
    assert rc == 1 and f"summary --out {tmp_path / 'outputs' / 'smoke'}" in log, log
    rc, log = _run_cli([sys.executable, R.__file__, "batch", "0", "--dry-run"], tmp_path, timeout=120)
    assert rc == 2 and "00_explore.ipynb is not a notebook the batch runner can run" in log, log
    assert "interactive notebook, open it in Jupyter" in log


def test_a_whole_notebook_is_done_only_when_none_of_its_runs_stopped_short():
    """The quick job's mode (one kernel per notebook) reported a notebook "done" when runs inside it had paused at the
    time budget or never started."""
    ran = "[run] a seed 0 -> outputs/nb/runs/a_seed0\n[done] test_acc 10.00%\n"
    assert _outcome(0, False, ran, kind="notebook") == ("done", "", False)
    paused = ran + "[paused] b seed 0: budget\nSES-RUN-PAUSED\n[budget] c seed 0: not started\nSES-RUN-BUDGET\n"
    assert _outcome(0, False, paused, kind="notebook") == (
        "paused", "1 run(s): time budget: checkpoint kept, resumes next time", False)
    assert _outcome(0, False, ran + 2 * "[budget] x: not started\nSES-RUN-BUDGET\n", kind="notebook") == (
        "to do", "2 run(s): time budget: not started", False)
    assert _outcome(0, False, ran + "SES-RUN-LOCKED\n", kind="notebook")[0] == "skipped"
    assert _outcome(1, False, paused + "SES-RUN-ERROR: ValueError: bad\n", kind="notebook") == (
        "failed", "ValueError: bad", False)  # a failure is a failure, whatever else happened


def test_progress_text_from_a_runs_progress_json(tmp_path):
    path = tmp_path / "progress.json"
    assert R.progress_text(path, 30) == "starting (30 s in)"
    S.atomic_write_json(path, {"epochs_done": 12, "epochs": 50, "epoch_seconds": [40.0, 38.0], "time": time.time()})
    assert R.progress_text(path, 600) == "epoch 12/50, ~25 min left"
    S.atomic_write_json(path, {"epochs_done": 12, "epochs": 50, "epoch_seconds": [40.0], "time": time.time() - 3600})
    assert R.progress_text(path, 600) == "starting (10 min in)"  # a paused run's old progress: not this attempt's


def test_the_batch_console_beats_for_runs_in_flight(tmp_path, monkeypatch):
    """A batch printed only start/done lines: an hour-long run looked frozen. Now a line per run in flight every
    HEARTBEAT_SECONDS (60; 0.5 here)."""
    monkeypatch.setattr(R.batch, "HEARTBEAT_SECONDS", 0.5)
    said = []
    R.run_batch([NB_SLEEP], params={"all": {"sleep": 3}, "91": {"configs": ["a"]}}, gpus="cpu", workers=1,
                out=tmp_path / "out", report=False, log=said.append)
    beats = [s for s in said if "running 91_runner_sleep a seed0 on cpu0: starting (" in s]
    assert len(beats) >= 2, said


def test_a_run_under_the_batch_runner_logs_one_line_per_epoch_with_its_time_left(data_root, tmp_path, monkeypatch,
                                                                                capfd):
    """Each run's log.txt showed one 'ep k/N: 0%|' tqdm frame per epoch under the runner (its kernel has ipykernel):
    now a plain line per epoch with loss, accuracy, seconds and the time left."""
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))  # as in a kernel
    monkeypatch.setenv("SES_SLOT", "0")  # ... that the batch runner started
    S.train(dict(model="resnet18", width=0.25, dataset="cifar10", data_root=str(data_root), epochs=2, batch_size=32,
                 train_subset=64, test_subset=32, max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32,
                 robustness=None, device="cpu", save_model=False, out_dir=str(tmp_path / "r")))
    out = capfd.readouterr()
    lines = [ln for ln in out.out.splitlines() if "] ep " in ln]
    assert len(lines) == 2 and "%|" not in out.err, out
    assert re.search(r"ep 1/2 loss [\d.]+ train [\d.]+% test [\d.]+% .* [\d.]+s .* ~\d+ s left$", lines[0]), lines[0]
    assert lines[1].endswith("~0 s left")
