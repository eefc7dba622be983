"""Nothing lost, nothing misleading: output folders checked before any work, Ctrl-C and SIGTERM
stop cleanly without leaving a stale model behind, a run never appends to another run's log, and
one failing rank ends a distributed run promptly with its message."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, SCRIPT, tiny_data, tiny_env  # noqa: F401  (tiny_data is a fixture)

PATCHED = ROOT / "tests" / "patched_run.py"


def launch(cwd: Path, env: dict, script: Path = SCRIPT, torchrun: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, str(script)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               str(script)]
    # SIGINT back to its default: a shell's background job starts with it ignored, and Python then
    # keeps ignoring it.
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(p: subprocess.Popen, timeout: float = 1200) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)  # a hang guard, not a speed test
    return p.returncode, out, err


def test_unwritable_artifact_folder_stops_before_training(tiny_data, tmp_path):
    """An ARTIFACT in a folder nobody can write (/proc refuses even root): one line naming it,
    exit 2, before any log or training."""
    env = {**tiny_env(tiny_data, "unwritable"), "ARTIFACT": "/proc/final_model.int6.ptz"}
    t0 = time.perf_counter()
    rc, out, err = finish(launch(tmp_path, env))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ARTIFACT='/proc/final_model.int6.ptz'"), err
    assert "writable folder" in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_training_stops_cleanly(tiny_data, tmp_path, sig):
    """Stopped mid-training: one console line, the log ends with `interrupted at step N/M`, exit 130,
    no traceback, and the previous run's model files are gone (a later EVAL_ONLY cannot evaluate an
    old model as this run's)."""
    for stale in ("final_model.pt", "final_model.int6.ptz"):
        (tmp_path / stale).write_bytes(b"an earlier run's output")
    env = {**tiny_env(tiny_data, "stopped"), "ITERATIONS": "100000", "WARMDOWN_ITERS": "0"}
    p = launch(tmp_path, env)
    log = tmp_path / "logs" / "stopped.txt"
    deadline = time.time() + 600
    while time.time() < deadline and not (log.exists() and re.search(r"^step:3/", log.read_text(), re.M)):
        time.sleep(0.2)
    p.send_signal(sig)
    rc, out, err = finish(p, timeout=120)
    assert rc == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    text = log.read_text()
    last = text.strip().splitlines()[-1]
    m = re.fullmatch(r"interrupted at step (\d+)/100000", last)
    assert m and int(m.group(1)) >= 3, last
    assert out.strip().splitlines()[-1] == last  # the one console line
    assert not (tmp_path / "final_model.pt").exists() and not (tmp_path / "final_model.int6.ptz").exists()


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """One short training run with RUN_ID=shared, in its own folder."""
    cwd = tmp_path_factory.mktemp("finished")
    env = {**tiny_env(tiny_data, "shared"), "ITERATIONS": "4", "SLOT_ENABLED": "0"}
    rc, out, err = finish(launch(cwd, env))
    assert rc == 0, err
    return cwd, env


def test_a_run_never_appends_to_another_runs_log(finished_run):
    """EVAL_ONLY with the same RUN_ID writes logs/shared-2.txt and leaves the training log as it was:
    the submission builder still reads the training log's own figures."""
    cwd, env = finished_run
    first = (cwd / "logs" / "shared.txt").read_text()
    rc, out, err = finish(launch(cwd, {**env, "EVAL_ONLY": "1"}))
    assert rc == 0, err
    assert "log: logs/shared-2.txt" in out
    assert (cwd / "logs" / "shared.txt").read_text() == first
    second = (cwd / "logs" / "shared-2.txt").read_text()
    assert "\neval_only artifact:" in second and "\neval_only artifact:" not in first
    from tools.submission import parse_log
    assert parse_log(cwd / "logs" / "shared.txt").steps == 4


def test_thread_count_and_preset_are_logged(finished_run):
    """One CPU thread per process unless CPU_THREADS says otherwise, logged with the preset."""
    cwd, _ = finished_run
    assert re.search(r"^preset:none cpu_threads:1$", (cwd / "logs" / "shared.txt").read_text(), re.M)


def test_a_rank_failing_in_evaluation_ends_the_run(tiny_data, tmp_path):
    """torchrun, 2 processes (gloo): rank 1 raises in evaluation while rank 0 goes on into its
    collectives. The run ends promptly (no rank waits in a barrier while the other is gone) and the
    error is on the console."""
    env = {**tiny_env(tiny_data, "fail"), "ITERATIONS": "2", "SLOT_ENABLED": "0", "TEST_FAIL_RANK": "1",
           "OMP_NUM_THREADS": "1"}
    p = launch(tmp_path, env, script=PATCHED, torchrun=2)
    log = tmp_path / "logs" / "fail.txt"
    rc, out, err = finish(p, timeout=1200)
    assert rc != 0
    assert "injected failure on rank 1" in out + err
    # From the end of training to the end of the run: no NCCL/gloo-style timeout wait.
    ended = time.time()
    assert ended - log.stat().st_mtime < 60, "the surviving rank waited"


def test_bad_setting_under_torchrun_is_reported_once(tiny_data, tmp_path):
    """Every rank meets the same bad setting; the console shows its error line once."""
    env = {**tiny_env(tiny_data, "bad"), "SLOT_MODE": "sometimes", "OMP_NUM_THREADS": "1"}
    rc, out, err = finish(launch(tmp_path, env, torchrun=2))
    assert rc != 0
    errors = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert errors == ["error: SLOT_MODE='sometimes' is not allowed; expected one of 'scored', 'context', 'both'"]


@pytest.mark.parametrize("var", ["TOKENIZER_PATH", "ARTIFACT"])
def test_a_directory_given_for_a_file_says_so(tiny_data, tmp_path, var):
    env = {**tiny_env(tiny_data, "dir"), var: str(tmp_path), "EVAL_ONLY": "1"}
    rc, out, err = finish(launch(tmp_path, env))
    assert rc == 2
    assert err.strip() == (f"error: {var}={str(tmp_path)!r}: is a directory; expected "
                           + ("a SentencePiece .model file" if var == "TOKENIZER_PATH" else "an artifact file")), err


def test_missing_codec_stops_before_training(tiny_data, tmp_path):
    """COMPRESSOR=brotli without the brotli package: one line naming the setting and the package,
    before any log or training (the export at the end would otherwise fail after the run)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "brotli.py").write_text("raise ImportError('no brotli here')\n")
    cwd = tmp_path / "run"
    cwd.mkdir()
    env = {**tiny_env(tiny_data, "codec"), "COMPRESSOR": "brotli", "PYTHONPATH": str(shadow)}
    rc, out, err = finish(launch(cwd, env))
    assert rc == 2
    assert err.strip() == ("error: COMPRESSOR='brotli' needs the Python package brotli; install it or use "
                           "COMPRESSOR=lzma"), err
    assert list(cwd.iterdir()) == []
