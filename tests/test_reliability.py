"""Nothing lost, nothing misleading: inputs and output folders checked before any work, outputs
locked and never replaced unless this project wrote them, Ctrl-C and SIGTERM stop cleanly
leaving an earlier run's files whole, a run never appends to another run's log, an artifact
is evaluated only under the settings it was trained with, a failed write or a diverged run
says what was kept, and one failing rank ends a distributed run promptly with its message.

Whole-script subprocesses only for signals and torchrun; the rest calls train_gpt.main in
this process (tests/test_pipeline.py: main_in_process)."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from tests.conftest import script_command
from tests.test_pipeline import DEMO, ROOT, SCRIPT, main_in_process, tiny_env
from tools._files import read_shard, shard_bytes

PATCHED = ROOT / "tests" / "patched_run.py"
OUTPUTS = ("final_model.pt", "final_model.int6.ptz", "final_model.int6.ptz.json")


def launch(cwd: Path, env: dict, script: Path = SCRIPT, torchrun: int = 0) -> subprocess.Popen:
    cmd = script_command(script, torchrun)
    # SIGINT back to its default: a shell's background job starts with it ignored, and Python then
    # keeps ignoring it.
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)  # a hang guard, not a speed test
    return p.returncode, out, err


def one_error(err: str) -> str:
    """The single stderr line of a refused run."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def copy_outputs(finished: Path, cwd: Path) -> dict[str, bytes]:
    """The finished run's artifact, sidecar and weights copied into cwd: files this project
    wrote, which a new run may replace. Returns their bytes."""
    for name in OUTPUTS:
        shutil.copy(finished / name, cwd / name)
    return {name: (cwd / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def finished(finished_run):
    """The session's finished run (tests/conftest.py): (folder, env), after checking it passed."""
    cwd, env, status, out, err = finished_run
    assert status == 0, out[-2000:] + err[-2000:]
    return cwd, env


def test_unwritable_artifact_folder_stops_before_training(small_root, tmp_path):
    """An ARTIFACT in a folder nobody can write (/proc refuses even root): one line naming it,
    exit 2, before any log or training."""
    env = {**tiny_env(small_root, "unwritable"), "ARTIFACT": "/proc/final_model.int6.ptz"}
    t0 = time.perf_counter()
    status, out, err = main_in_process(tmp_path, env)
    assert status == 2, err
    line = one_error(err)
    assert (
        line.startswith("error: ARTIFACT='/proc/final_model.int6.ptz'")
        and "writable folder" in line
    )
    assert list(tmp_path.iterdir()) == []
    assert time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_interrupt_mid_training_stops_cleanly(small_root, finished, tmp_path):
    """Stopped mid-training by SIGINT (Ctrl-C) or SIGTERM (torchrun, a scheduler): one console
    line, the log ends with `interrupted at step N/M`, exit 130, no traceback, the previous run's
    model files are there byte for byte (a run writes each under a temporary name and renames it
    only when whole) and the output locks are released. The two runs go side by side (one core
    each)."""
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        cwd = tmp_path / sig.name
        cwd.mkdir()
        before = copy_outputs(finished[0], cwd)
        env = {**tiny_env(small_root, "stopped"), "ITERATIONS": "100000", "WARMDOWN_ITERS": "0"}
        runs[sig] = cwd, launch(cwd, env), before
    deadline = time.time() + 120
    for sig, (cwd, p, _) in runs.items():
        log = cwd / "logs" / "stopped.txt"
        while time.time() < deadline and not (
            log.exists() and re.search(r"^step:3/", log.read_text(), re.M)
        ):
            time.sleep(0.2)
        p.send_signal(sig)
    for sig, (cwd, p, before) in runs.items():
        rc, out, err = finish(p, timeout=60)
        assert rc == 130, (sig.name, err)
        assert "Traceback" not in err and "Traceback" not in out
        last = (cwd / "logs" / "stopped.txt").read_text().strip().splitlines()[-1]
        m = re.fullmatch(r"interrupted at step (\d+)/100000", last)
        assert m and int(m.group(1)) >= 3, (sig.name, last)
        assert out.strip().splitlines()[-1] == last  # the one console line
        assert {name: (cwd / name).read_bytes() for name in OUTPUTS} == before
        assert not list(cwd.glob(".*.lock")) and not list(cwd.glob(".*.tmp"))


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_released(finished):
    """The finished run started over a lock left by a process that is gone: it took the lock
    over, and released all three (artifact, sidecar, weights) at the end."""
    cwd, _ = finished
    assert (cwd / "logs" / "shared.txt").is_file() and (cwd / "final_model.int6.ptz").is_file()
    assert not list(cwd.glob(".*.lock"))


@pytest.mark.slow
def test_a_run_never_appends_to_another_runs_log(finished):
    """EVAL_ONLY with the same RUN_ID writes logs/shared-2.txt and leaves the training log as it
    was:
    the submission builder still reads the training log's own figures."""
    cwd, env = finished
    first = (cwd / "logs" / "shared.txt").read_text()
    status, out, err = main_in_process(cwd, {**env, "EVAL_ONLY": "1"})
    assert status == 0, err
    assert "log: logs/shared-2.txt" in out
    assert (cwd / "logs" / "shared.txt").read_text() == first
    second = (cwd / "logs" / "shared-2.txt").read_text()
    assert "\neval_only artifact:" in second and "\neval_only artifact:" not in first
    assert "\neval_only: model settings match final_model.int6.ptz.json\n" in second
    from tools.submission import parse_log

    assert parse_log(cwd / "logs" / "shared.txt").steps == 4


@pytest.mark.slow
def test_thread_count_and_preset_are_logged(finished):
    """One CPU thread per process unless CPU_THREADS says otherwise, logged with the preset."""
    cwd, _ = finished
    assert re.search(
        r"^preset:none cpu_threads:1$", (cwd / "logs" / "shared.txt").read_text(), re.M
    )


@pytest.mark.slow
def test_eval_only_refuses_other_model_settings(finished, tmp_path):
    """XSA_LAST_N=1 on an artifact trained with 2 loads without complaint (same tensors) and
    would score garbage: the sidecar names the setting and both values; nothing is written."""
    cwd, env = finished
    artifact = cwd / "final_model.int6.ptz"
    status, out, err = main_in_process(
        tmp_path, {**env, "EVAL_ONLY": "1", "XSA_LAST_N": "1", "ARTIFACT": str(artifact)}
    )
    assert status == 2
    line = one_error(err)
    assert line.startswith(
        f"error: ARTIFACT={str(artifact)!r} was trained with other model settings"
    )
    assert "XSA_LAST_N=1 (artifact: 2)" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_eval_only_without_a_sidecar_says_the_settings_are_unchecked(finished, tmp_path):
    cwd, env = finished
    shutil.copy(cwd / "final_model.int6.ptz", tmp_path / "m.ptz")
    env = {**env, "EVAL_ONLY": "1", "ARTIFACT": "m.ptz", "EVAL_STRIDE": "0", "RUN_ID": "bare"}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 0, err
    log = (tmp_path / "logs" / "bare.txt").read_text()
    assert (
        "\neval_only: no m.ptz.json beside the artifact; its model settings are unchecked\n" in log
    )
    assert re.search(r"^final_int6_roundtrip_exact val_loss:\S+ val_bpb:\S+$", log, re.M)


@pytest.mark.slow
def test_export_only_makes_the_training_runs_artifact(finished, tmp_path):
    """EXPORT_ONLY=1 from the kept final_model.pt alone: the same artifact bytes as the run that
    trained it, its sidecar, and the evaluations; no training."""
    cwd, env = finished
    shutil.copy(cwd / "final_model.pt", tmp_path / "final_model.pt")
    status, out, err = main_in_process(tmp_path, {**env, "EXPORT_ONLY": "1", "RUN_ID": "export"})
    assert status == 0, err
    assert (tmp_path / "final_model.int6.ptz").read_bytes() == (
        cwd / "final_model.int6.ptz"
    ).read_bytes()
    assert (tmp_path / "final_model.int6.ptz.json").read_bytes() == (
        cwd / "final_model.int6.ptz.json"
    ).read_bytes()
    log = (tmp_path / "logs" / "export.txt").read_text()
    assert re.search(r"^export_only weights:final_model.pt bytes:\d+$", log, re.M)
    assert not re.search(r"^step:\d+/\d+ train_loss", log, re.M)
    assert re.search(r"^final_int6_roundtrip_exact val_loss:\S+ val_bpb:\S+$", log, re.M)


@pytest.mark.slow
def test_a_failed_artifact_write_says_the_weights_are_kept(small_root, tmp_path, monkeypatch):
    """The disk fills as the artifact is written: one logged `error:` line says the trained
    weights are kept in final_model.pt (which loads), exit 2, no artifact."""
    write = tg.write_atomic

    def full_disk(path, data):
        if Path(path).name.startswith("final_model.int6.ptz"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(tg, "write_atomic", full_disk)
    env = {**tiny_env(small_root, "full"), "ITERATIONS": "2", "SLOT_ENABLED": "0"}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 2
    line = one_error(err)
    log = (tmp_path / "logs" / "full.txt").read_text()
    errors = [x for x in log.splitlines() if x.startswith("error:")]
    assert errors == [line] and log.rstrip().endswith(line)
    assert "No space left on device" in line and "weights are kept in final_model.pt" in line
    assert not (tmp_path / "final_model.int6.ptz").exists()
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(state) == set(
        tg.build_model(tg.Config.from_env(env).model, torch.device("cpu")).state_dict()
    )


@pytest.mark.slow
def test_a_diverged_run_stops_and_exports_nothing(small_root, tmp_path):
    """SCALAR_LR=1e9 without clipping: the loss turns nan within a few steps; the run stops at
    the first logged non-finite loss (exit 1), exporting nothing."""
    env = {
        **tiny_env(small_root, "nan"),
        "ITERATIONS": "8",
        "WARMUP_STEPS": "0",
        "SLOT_ENABLED": "0",
        "SCALAR_LR": "1e9",
        "GRAD_CLIP_NORM": "0",
    }
    status, out, err = main_in_process(tmp_path, env)
    assert status == 1
    line = one_error(err)
    m = re.fullmatch(
        r"error: training diverged: train_loss at step (\d+) is nan; nothing was exported", line
    )
    assert m and int(m.group(1)) < 8, line
    log = (tmp_path / "logs" / "nan.txt").read_text()
    assert log.rstrip().endswith(line) and f"step:{m.group(1)}/8 train_loss:nan" in log
    assert not any((tmp_path / name).exists() for name in OUTPUTS)


@pytest.mark.slow
def test_a_rank_failing_in_evaluation_ends_the_run(finished, tmp_path):
    """torchrun, 2 processes (gloo): rank 1 raises in evaluation while rank 0 goes on into its
    collectives. The run ends promptly (no rank waits in a barrier while the other is gone) and the
    error is on the console. (EXPORT_ONLY from the finished run's weights: no training first.)"""
    cwd, env = finished
    shutil.copy(cwd / "final_model.pt", tmp_path / "final_model.pt")
    env = {**env, "RUN_ID": "fail", "EXPORT_ONLY": "1", "TEST_FAIL_RANK": "1"}
    p = launch(tmp_path, env, script=PATCHED, torchrun=2)
    log = tmp_path / "logs" / "fail.txt"
    rc, out, err = finish(p, timeout=120)
    assert rc != 0
    assert "injected failure on rank 1" in out + err
    assert "\nexport_only weights:final_model.pt" in log.read_text()
    # From the end of the export to the end of the run: no NCCL/gloo-style timeout wait.
    assert time.time() - log.stat().st_mtime < 60, "the surviving rank waited"


def test_a_bad_setting_is_reported_by_the_first_local_rank_only(small_root, tmp_path):
    """Under torchrun every rank meets the same bad setting, before any process group: the
    console shows its error line once (LOCAL_RANK 0's); every rank exits 2."""
    env = {**tiny_env(small_root, "bad"), "SLOT_MODE": "sometimes"}
    for local_rank, printed in (("0", True), ("1", False)):
        status, out, err = main_in_process(tmp_path, {**env, "LOCAL_RANK": local_rank})
        assert status == 2 and out == ""
        line = ("error: SLOT_MODE='sometimes' is not allowed; expected one of 'scored', 'context', "
                "'both'")
        assert err == (line + "\n" if printed else "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("var", ["TOKENIZER_PATH", "ARTIFACT"])
def test_a_directory_given_for_a_file_says_so(small_root, tmp_path, var):
    env = {**tiny_env(small_root, "dir"), var: str(tmp_path), "EVAL_ONLY": "1"}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 2
    expected = "a SentencePiece .model file" if var == "TOKENIZER_PATH" else "an artifact file"
    assert (
        err.strip() == f"error: {var}={str(tmp_path)!r}: is a directory; expected {expected}"
    ), err


def test_missing_codec_stops_before_training(small_root, tmp_path, monkeypatch):
    """COMPRESSOR=brotli without the brotli package: one line naming the setting and the package,
    before any log or training (the export at the end would otherwise fail after the run)."""
    monkeypatch.setitem(sys.modules, "brotli", None)  # import fails as if not installed
    env = {**tiny_env(small_root, "codec"), "COMPRESSOR": "brotli"}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 2
    assert err.strip() == (
        "error: COMPRESSOR='brotli' needs the Python package brotli; install it or use "
        "COMPRESSOR=lzma"
    ), err
    assert list(tmp_path.iterdir()) == []


def test_logs_as_a_file_is_refused(small_root, tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    status, out, err = main_in_process(tmp_path, tiny_env(small_root, "logs"))
    assert status == 2
    assert (
        one_error(err)
        == "error: logs: is a file; expected a folder for the run logs (move the file away)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs"]


def dataset_with_train_shard(small_root: Path, folder: Path, tokens: np.ndarray) -> Path:
    """The small corpus's validation split and manifest beside one given training shard."""
    folder.mkdir()
    for name in ("manifest.json", "fineweb_val_000000.bin"):
        shutil.copy(small_root / DEMO / name, folder / name)
    (folder / "fineweb_train_000000.bin").write_bytes(shard_bytes(tokens))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty", "out_of_range"])
def test_bad_training_split_stops_before_anything_is_deleted(small_root, finished, tmp_path, case):
    """A training split of 0 tokens (a valid header), or a shard with an id past VOCAB_SIZE:
    one line naming DATA_PATH or the shard, exit 2, before the previous run's files are
    deleted or a log is opened."""
    train = np.asarray(read_shard(small_root / DEMO / "fineweb_train_000000.bin"))[:5000].copy()
    if case == "empty":
        train = train[:0]
    else:
        train[1234] = 1500
    data = dataset_with_train_shard(small_root, tmp_path / "data", train)
    cwd = tmp_path / "run"
    cwd.mkdir()
    before = copy_outputs(finished[0], cwd)
    status, out, err = main_in_process(cwd, {**tiny_env(small_root, "bad"), "DATA_PATH": str(data)})
    assert status == 2
    line = one_error(err)
    if case == "empty":
        assert line.startswith(
            f"error: DATA_PATH={str(data)!r}: the training split (1 shards) holds 0 tokens"
        )
    else:
        shard = data / "fineweb_train_000000.bin"
        assert line == f"error: {shard}: token id 1500 is out of range for VOCAB_SIZE=1024"
    assert {name: (cwd / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in cwd.iterdir()) == sorted(OUTPUTS)


def test_a_foreign_file_at_artifact_is_refused_untouched(small_root, tmp_path):
    """ARTIFACT naming a file this project did not write (a README): refused by name, kept."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    before = (tmp_path / "README.md").read_bytes()
    status, out, err = main_in_process(
        tmp_path, {**tiny_env(small_root, "foreign"), "ARTIFACT": "README.md"}
    )
    assert status == 2
    assert one_error(err).startswith(
        "error: ARTIFACT='README.md' names an existing file that is not"
    )
    assert (tmp_path / "README.md").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.slow
def test_outputs_in_use_by_a_live_run_are_refused(small_root, finished, tmp_path):
    """A lock beside the artifact held by a live process (this one, standing in for a first run):
    a second run refuses, naming the first's RUN_ID and process id, and touches nothing."""
    before = copy_outputs(finished[0], tmp_path)
    lock = tmp_path / ".final_model.int6.ptz.lock"
    with tg.output_lock([str(tmp_path / "final_model.int6.ptz")], "first"):
        status, out, err = main_in_process(tmp_path, tiny_env(small_root, "second"))
        held = json.loads(lock.read_text())
    assert status == 2
    line = one_error(err)
    assert (
        "final_model.int6.ptz is in use by run 'first'" in line
        and f"(process {os.getpid()}," in line
    )
    assert held == {"run_id": "first", "pid": os.getpid()}
    assert {name: (tmp_path / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)
