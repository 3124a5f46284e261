import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")


def _shared_data():
    env = os.environ.get("SES_DATA")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data"]:
        if (cand / "cifar-10-batches-py").is_dir():
            return cand.resolve()  # absolute: CI passes SES_DATA=../shared/data and some tests chdir
    return None


@pytest.fixture(scope="session")
def data_root():
    """The real (shortened) data sets; tests that need them skip when they are absent."""
    root = _shared_data()
    if root is None:
        why = "real data not found: set SES_DATA to a folder holding cifar-10-batches-py/ (CI uses ../shared/data)"
        if os.environ.get("SES_REQUIRE_DATA"):  # CI has the data: a test that cannot find it must not pass as skipped
            pytest.fail(why + " ($SES_REQUIRE_DATA is set)")
        pytest.skip(why)
    return root


@pytest.fixture
def patch_seslib(monkeypatch):
    """patch_seslib(name, value): replace a seslib name in the package and in every room that imported it (a room
    looks its names up in its own module), undone after the test."""
    import seslib

    def patch(name, value):
        real = getattr(seslib, name)
        rooms = [seslib] + [getattr(seslib, r) for r in seslib.LIBRARY_ROOMS]
        hits = [m for m in rooms if getattr(m, name, None) is real]
        assert hits, name
        for m in hits:
            monkeypatch.setattr(m, name, value)
    return patch


@pytest.fixture
def killed_after_first_checkpoint():
    """killed(cfg): train cfg (its out_dir set) in a child process and kill -9 it as soon as its first checkpoint.pt
    exists, as a power cut would; asserts it died so, with no result.json, and returns the checkpoint's epoch."""
    import json
    import signal
    import subprocess
    import time

    import torch

    def killed(cfg):
        out = Path(cfg["out_dir"])
        script = f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); import seslib as S; S.train(json.loads(sys.argv[1]))"
        proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg)],
                                env=dict(os.environ, PYTHONWARNINGS="ignore"))
        try:
            deadline = time.time() + 240
            while not (out / "checkpoint.pt").exists():
                assert proc.poll() is None, "the run ended before its first checkpoint"
                assert time.time() < deadline, "no checkpoint after 240 s"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (out / "result.json").exists()
        return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    return killed
