"""What a careless user and a crashing machine do (issue 14), each injected for real: corrupt and half-written
files, two runners on one folder, missing packages and textures, bad paths and values. Every case must end in
one clear line naming the file or value and the fix, before any training, and lose nothing already written."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seslib as S
import sesrun as R

ROOT = Path(__file__).resolve().parents[1]


def tiny(data_root, **kw):
    return dict(dict(model="resnet18", dataset="cifar10", data_root=str(data_root), epochs=1, batch_size=32,
                     train_subset=64, test_subset=32, max_steps_per_epoch=1, erank_batches=1, erank_eval_samples=32,
                     width=0.25, log="none", device="cpu"), **kw)


# ─── files that survive ──────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("content", [b"", b"PK\x03\x04trunc", b"garbage that is not a checkpoint"],
                         ids=["empty", "truncated", "garbage"])
def test_bad_checkpoint_is_moved_aside_and_the_run_starts_over(data_root, tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(content)
    res = S.train(tiny(data_root, out_dir=str(run), resume=True))
    assert len(res["history"]) == 1 and (run / "result.json").is_file()
    assert (run / "checkpoint.pt.corrupt").read_bytes() == content  # kept, never deleted
    out = capsys.readouterr().out
    assert f"[corrupt] {run / 'checkpoint.pt'} is unreadable" in out and "checkpoint.pt.corrupt" in out


@pytest.mark.parametrize("content", ["", '{"config": {"epochs"', "not json"], ids=["empty", "truncated", "garbage"])
def test_bad_result_json_is_moved_aside_and_a_plan_retrains_the_run(data_root, tmp_path, capsys, content):
    grid = {"a": {}}
    base = tiny(data_root)
    run = tmp_path / "runs" / "a_seed42"
    run.mkdir(parents=True)
    (run / "result.json").write_text(content)
    plan = S.plan_runs(grid, "all", [42], tmp_path, base=base)
    assert [r.status for r in plan.runs] == ["todo"]  # never "done", never a failure on every re-run
    S.run_plan(plan)
    assert json.loads((run / "result.json").read_text())["final"]["test_acc"] is not None
    assert (run / "result.json.corrupt").read_text() == content
    assert "result.json is unreadable" in capsys.readouterr().out


def test_an_interrupted_checkpoint_write_leaves_no_temporary_behind(data_root, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".checkpoint.pt.x8k2p.tmp"  # what a kill during atomic_torch_save leaves
    stale.write_bytes(b"\0" * 4096)
    S.train(tiny(data_root, out_dir=str(run)))
    assert not list(run.glob(".*.tmp")) and (run / "result.json").is_file()


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    S.atomic_write_json(target, {"v": 1})

    def boom(f):
        f.write(b'{"v": 2')
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        S.atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"v": 1} and not list(tmp_path.glob(".*.tmp"))


def test_written_files_keep_the_umask_mode(tmp_path, data_root):
    old = os.umask(0o022)
    try:
        S.atomic_write_json(tmp_path / "a.json", {})
        S.atomic_torch_save({"x": 1}, tmp_path / "b.pt")
        mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert mode == {"a.json": 0o644, "b.pt": 0o644}  # mkstemp alone would give 0600: unreadable by others


def test_no_checkpoint_is_kept_for_a_finished_run_unless_asked(data_root, tmp_path):
    S.train(tiny(data_root, out_dir=str(tmp_path / "a")))
    S.train(tiny(data_root, out_dir=str(tmp_path / "b"), keep_checkpoint=True))
    assert not (tmp_path / "a" / "checkpoint.pt").exists() and (tmp_path / "b" / "checkpoint.pt").exists()


def _hold_lock(folder):
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import seslib as S\n"
            f"with S.run_lock({str(folder)!r}):\n    print('held', flush=True)\n    time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_two_runners_on_one_folder_never_train_the_same_run_twice(data_root, tmp_path, capsys):
    grid = {"a": {}, "b": {}}
    plan = S.plan_runs(grid, "all", [42], tmp_path, base=tiny(data_root))
    proc = _hold_lock(tmp_path / "runs" / "a_seed42")  # another live runner is training "a"
    try:
        with pytest.raises(S.RunLocked, match=r"a_seed42 is being trained by another live process \(pid \d+"):
            S.train(dict(plan.runs[0].cfg, resume=True))
        table = S.run_plan(plan)  # the notebook side skips it, trains the rest, and is not a failure
        assert S.is_locked(tmp_path / "runs" / "a_seed42")
    finally:
        proc.kill()
        proc.wait()
    assert list(table["status"]) == ["locked by another process", "ran"]
    assert "[locked] a seed 42" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "a_seed42" / "result.json").exists()
    assert not S.is_locked(tmp_path / "runs" / "a_seed42")  # the lock died with its process


# ─── preflight: what the run will need, checked before anything runs ─────────────────────────────

def test_preflight_names_a_hidden_package_before_any_training(data_root, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchmetrics" else real(name, *a))
    t0 = time.time()
    with pytest.raises(S.PreflightError, match=r"the package 'torchmetrics' is missing \(needed for the robustness "
                                               r"pass's calibration error\): pip install torchmetrics"):
        S.train(tiny(data_root, out_dir=str(tmp_path / "r"), robustness=["contrast"]))
    assert time.time() - t0 < 30 and not (tmp_path / "r" / "checkpoint.pt").exists()


def test_preflight_names_missing_frost_textures(data_root, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "imagecorruptions" else real(name, *a))
    with pytest.raises(S.PreflightError, match=r"robustness includes frost.*pip install --no-deps imagecorruptions"):
        S.train(tiny(data_root, robustness="all15"))
    S.preflight(S.validate_config(tiny(data_root, robustness=["contrast"])))  # no frost: nothing missing


def test_preflight_names_an_unwritable_out_dir(data_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(S.PreflightError, match=r"out_dir .*a_file/run is not writable.*choose another out_dir"):
        S.train(tiny(data_root, out_dir=str(blocker / "run")))


# ─── clear errors, one line each ─────────────────────────────────────────────────────────────────

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_on_a_machine_without_gpu(data_root):
    with pytest.raises(ValueError, match=r"'device' is 'cuda' but this machine has no usable CUDA GPU.*device='auto'"):
        S.validate_config(tiny(data_root, device="cuda"))


def test_batch_size_larger_than_the_data_names_what_the_user_set(data_root):
    n = len(S.load_dataset("cifar10", data_root, "train")[1])
    with pytest.raises(ValueError, match=rf"^batch_size 8192 is larger than the {n} training images of cifar10 in "
                                         r".*cifar-10-batches-py: .*lower batch_size$"):
        S.train(tiny(data_root, batch_size=8192, train_subset=None))  # train_subset was never set: not named
    with pytest.raises(ValueError, match=r"'train_subset' must be >= batch_size \(64\)"):  # set by the user: named
        S.train(tiny(data_root, batch_size=64, train_subset=40))


def test_an_explicit_data_root_is_authoritative_and_recorded(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SES_DATA", str(data_root))  # would have been found here: an explicit root must not fall back
    with pytest.raises(FileNotFoundError, match=r"data_root .*nowhere does not exist \(an explicit data_root is used"):
        S.load_dataset("cifar10", tmp_path / "nowhere")
    res = S.train(tiny(data_root))
    assert res["env"]["data_dir"] == str(data_root / "cifar-10-batches-py")


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision

    class NoNetwork:
        def __init__(self, root, **kw):
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"partial")  # what a broken download leaves
            raise RuntimeError("Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    monkeypatch.delenv("SES_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="downloading it into .*failed.*name resolution"):
        S.resolve_data_dir("cifar10")
    assert not (tmp_path / "data").exists()


def _cli(*args, cwd):
    p = subprocess.run([sys.executable, str(ROOT / "sesrun.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def test_params_file_errors_are_one_line(tmp_path):
    rc, log = _cli("batch", "4", "--params", tmp_path / "nope.yaml", "--gpus", "cpu", "--dry-run", cwd=tmp_path)
    assert rc == 2 and "error: --params" in log and "nope.yaml: no such file" in log and "Traceback" not in log
    bad = tmp_path / "bad.yaml"
    bad.write_text("all: {preset: smoke\n  seeds: [1, 2\n")
    rc, log = _cli("batch", "4", "--params", bad, "--gpus", "cpu", "--dry-run", cwd=tmp_path)
    assert rc == 2 and f"error: --params {bad}: not valid YAML" in log and "Traceback" not in log


def test_kaggle_bundle_rejects_a_bad_user_name_and_never_leaves_half_a_folder(tmp_path):
    with pytest.raises(ValueError, match=r"--username 'jane doe' is not a Kaggle user name"):
        R.kaggle_package(tmp_path / "k", ["04"], "jane doe")
    assert not (tmp_path / "k").exists()
    with pytest.raises(ValueError, match="slug"):  # fails validation after the files were being written
        R.kaggle_package(tmp_path / "k", ["04"], "jane", slug="Bad Slug!")
    assert not (tmp_path / "k").exists() and not list(tmp_path.glob(".k.*"))
    R.kaggle_package(tmp_path / "k", ["04"], "jane")
    assert (tmp_path / "k" / "kernel-metadata.json").is_file()


@pytest.mark.parametrize("ref", ["jane doe/ses-data", "j/ses-data", "jane!/ses-data"])
def test_kaggle_bundle_checks_the_data_datasets_owner_not_only_its_slug(tmp_path, ref):
    owner = ref.split("/")[0]
    with pytest.raises(ValueError, match=f"reference {ref!r}: the owner {owner!r} is not a Kaggle user name"):
        R.kaggle_package(tmp_path / "k", ["04"], "jane", data_dataset=ref)
    assert not (tmp_path / "k").exists()


def test_quick_job_without_data_says_so_once_and_fails(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("SES_DATA", "KAGGLE_KERNEL_RUN_TYPE")}
    p = subprocess.run([sys.executable, str(ROOT / "sesrun.py"), "quick", "1", "2", "11", "--gpus", "cpu",
                        "--data-root", str(tmp_path)], cwd=tmp_path, env=dict(env, TORCH_HOME=str(tmp_path)),
                       capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    assert p.returncode == 1, log
    assert "quick job: ONLY 0 of 3 notebooks: 3 SKIPPED for missing data (cifar10, tinyimagenet); 0 ran" in log
    assert "nothing ran" in log
    assert log.count("[skip]") == 3 and log.count("how to provide") == 2  # once per missing data set, not per notebook
    assert "how to provide cifar10: " in log and "how to provide tinyimagenet: " in log  # not CIFAR-10's hint alone


def _disk_full_save(obj, f):
    f.write(b"PK\x03\x04" + b"\0" * 64)  # part of a zip, then the device is full: what torch reports
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")


def test_a_full_disk_says_so_in_one_line_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch reports a full disk as '[enforce fail at inline_container.cc:672] … unexpected pos' (the cause only in the
    log); the save now names the device's free space, what the file needs and what to do."""
    path = tmp_path / "checkpoint.pt"
    S.atomic_torch_save({"w": torch.zeros(4)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    with pytest.raises(OSError, match=r"No space left on device: checkpoint.pt needs ~0.00 GiB and .* has 0.00 GiB "
                                      r"free: free some space or choose another out_dir") as e:
        S.atomic_torch_save({"w": torch.zeros(1 << 12)}, path)
    assert e.value.errno == 28 and "\n" not in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40})())
    with pytest.raises(RuntimeError, match="unexpected pos"):  # not a full disk: torch's own error, unchanged
        S.atomic_torch_save({"w": torch.zeros(1 << 12)}, path)


def test_a_multi_line_error_reaches_the_batch_table_whole():
    """The preflight's reason ('0.00 GiB free; a checkpoint needs …') sat on its second line, which the table cut off:
    the driver now prints the whole message as one line."""
    code = R.batch._DRIVER.split("except BaseException as e:\n", 1)[1].rsplit("    raise", 1)[0]
    e = S.PreflightError("this run cannot start:\n  - 0.00 GiB free in /out; a checkpoint needs 0.05 GiB")
    out = subprocess.run([sys.executable, "-c", "import sys\ne = sys.argv[1]\nspec = {'mark_error': 'SES-RUN-ERROR:'}\n"
                          "class E(Exception):\n    ename = 'PreflightError'\n    evalue = e\ne = E()\n"
                          + "\n".join(ln[4:] for ln in code.splitlines()), str(e)], capture_output=True, text=True)
    line = R.last_error_line(out.stdout)
    assert line == "PreflightError: this run cannot start: - 0.00 GiB free in /out; a checkpoint needs 0.05 GiB", out


# ── a busy machine (issue 32) ──

def test_a_cpu_run_on_a_busy_machine_says_so_and_how_to_fix_it(monkeypatch):
    """The quick job ran 4x slower than the README said on a machine loaded 5-7: torch's 2 threads fought two other
    busy processes. A run outside the batch runner now says so in one line (it does not change the threads: a resumed
    run must reproduce its history bit for bit)."""
    assert S.thread_advice(2, 0.1, 2, omp_set=False) is None  # idle: nothing to say
    line = S.thread_advice(2, 1.9, 2, omp_set=False)
    assert "2 cores are 1.9 busy" in line and "OMP_NUM_THREADS=1" in line
    assert S.thread_advice(16, 3.0, 8, omp_set=False) is None  # 13 cores free for 8 threads
    assert S.thread_advice(2, 1.9, 2, omp_set=True) is None  # the user (or the batch runner) chose
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert S.cpu_thread_advice() is None


def test_a_mismatched_torch_and_torchvision_is_one_line_saying_how_to_fix_it(tmp_path):
    """A CPU torch beside a CUDA torchvision died at `python sesrun.py --help` with a raw 'operator torchvision::nms
    does not exist'. Here a torchvision that fails to load as that one does (first on the path)."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    p = subprocess.run([sys.executable, str(ROOT / "sesrun.py"), "--help"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr  # one line, as a real mixed install now gets
    last = p.stderr.strip().splitlines()[-1]
    assert len(p.stderr.strip().splitlines()) == 1 and "torchvision does not load with torch" in last and "--index-url https://download.pytorch.org/whl/cpu" in last
    assert S.torch_pair_problem("2.14.1+cpu", "0.29.1+cpu") is None
    assert "goes with torchvision 0.29, not 0.21.0" in S.torch_pair_problem("2.14.1", "0.21.0")


# ── a newcomer's second pass (issue 32): flags that did nothing, files named by their temp names ────────

@pytest.mark.parametrize("args,why", [
    (["plan", "10", "--write-params", "p.yaml"], "--write-params needs --budget"),
    (["plan", "10", "--max-seeds", "4"], "--max-seeds needs --budget"),
    (["plan", "10", "--budget", "30h", "--seeds", "paper3"], "--seeds with --budget: the budget chooses"),
    (["plan", "10", "--budget", "30h", "--write-params", "."], "--write-params . is a folder: give a file name"),
    (["power", "10", "--csv", "."], "--csv . is a folder: give a file name"),
    (["kaggle", "--out", "k", "--username", "jane", "--time-budget", "13h"], "a Kaggle version stops at 12 h"),
    (["kaggle", "--out", "k", "--username", "jane", "--params", "."], "--params . is a folder: give the YAML file"),
    (["batch", "10", "--gpus", "cpu", "--dry-run", "--params", "."], "--params . is a folder"),
])
def test_a_flag_that_would_do_nothing_or_a_folder_for_a_file_is_one_line_before_any_work(tmp_path, args, why):
    rc, log = _cli(*args, cwd=tmp_path)
    assert rc == 2 and why in log and "Traceback" not in log and log.strip().count("\n") == 0, log
    assert not (tmp_path / "p.yaml").exists() and not (tmp_path / "k").exists()


def test_a_budget_that_buys_nothing_writes_no_params_file(tmp_path):
    rc, log = _cli("plan", "10", "--budget", "1m", "--write-params", "p.yaml", cwd=tmp_path)
    assert rc == 1 and "--budget 1m buys no claim" in log and "nothing written" in log, log
    assert not (tmp_path / "p.yaml").exists()  # an empty params file would run every notebook's whole grid


def test_a_kaggle_bundle_of_a_budget_plan_runs_the_plans_notebooks(tmp_path):
    (tmp_path / "plan.yaml").write_text("12_mixup_cutmix: {configs: [baseline, ses], seeds: [42, 123, 7]}\n")
    rc, log = _cli("kaggle", "--out", "k", "--username", "jane", "--params", "plan.yaml", cwd=tmp_path)
    assert rc == 0, log
    src = "\n".join(c["source"] if isinstance(c["source"], str) else "".join(c["source"])
                    for c in json.loads(next((tmp_path / "k").glob("*.ipynb")).read_text())["cells"])
    assert "NOTEBOOKS = ['12_mixup_cutmix']" in src  # not all 20 grids
    (tmp_path / "bad.yaml").write_text("12_mixup_cutmix: {configs: [nope]}\n")
    rc, log = _cli("kaggle", "--out", "k2", "--username", "jane", "--params", "bad.yaml", cwd=tmp_path)
    assert rc == 2 and "unknown config" in log and "nope" in log and not (tmp_path / "k2").exists(), log
    (tmp_path / "f").write_text("x")
    rc, log = _cli("kaggle", "--out", "f", "--username", "jane", cwd=tmp_path)
    assert rc == 2 and "--out f is a file: give a folder" in log


def test_a_config_file_that_is_not_one_object_and_a_closed_pipe(tmp_path):
    (tmp_path / "run.json").write_text("[1, 2]")
    p = subprocess.run([sys.executable, "-m", "seslib", "train", "--config", "run.json"], cwd=tmp_path,
                       env=S.with_package_on_path(os.environ), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--config run.json: must hold one JSON object (a run's config); got a list" in p.stderr
    head = subprocess.run(f"{sys.executable} {ROOT / 'sesrun.py'} plan 10 | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert "Broken pipe" not in head.stderr and "Traceback" not in head.stderr, head.stderr  # the reader stopped


def test_an_unreadable_claims_csv_is_named_with_the_fix(tmp_path):
    (tmp_path / "05_multiseed_cifar10").mkdir()
    (tmp_path / "05_multiseed_cifar10" / "claims.csv").write_text('"unterminated\n')
    with pytest.raises(ValueError, match=r"05_multiseed_cifar10/claims.csv: unreadable .*run that notebook's report "
                                         r"again") as e:
        S.build_summary(tmp_path)
    assert "\n" not in str(e.value)
