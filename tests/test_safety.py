"""Run safety, the adversarial pass's faults: two runs racing for an output lock, a lock whose
holder is alive, shards without a manifest, EVAL_ONLY's artifact read once and held, output
names too long for the run's temporary names, a full disk under logs/, a rank killed or stalled
under torchrun, a malformed sidecar, WORLD_SIZE without torchrun, outputs that collide, a bad
token id in a later shard, and a run stopped mid-training or mid-export beside an earlier
run's files. Each test reproduces its fault; whole-script runs (torchrun) are marked slow.

In this process (tests/test_pipeline.py: main_in_process) wherever the fault allows."""

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
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
from tests.conftest import dead_pid
from tests.test_pipeline import DEMO, ROOT, main_in_process, tiny_env
from tests.test_reliability import OUTPUTS, PATCHED, copy_outputs, one_error
from tools._files import read_shard, shard_bytes

ARTIFACT, SIDECAR = OUTPUTS[1], OUTPUTS[2]


@pytest.fixture(scope="module")
def finished(finished_run):
    """The session's finished run (tests/conftest.py): (folder, env)."""
    cwd, env, status, out, err = finished_run
    assert status == 0, out[-2000:] + err[-2000:]
    return cwd, env


def left_behind(folder: Path) -> list[str]:
    """Temporary files and locks a run left in folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock")))


# --- output locks (issue 31, item 2) ---


def contend(folder: Path, seed: int, who: int, barrier, won) -> None:
    """One of two processes taking the same output lock, at seeded moments: a random start,
    and a random pause before each step of taking it (after an open, before a link, a rename or
    a flock). A winner holds the lock until both have tried."""
    rng = random.Random(seed * 2 + who)

    def paused(fn, after=False):
        def call(*args, **kwargs):
            if not after:
                time.sleep(rng.uniform(0, 0.002))
            result = fn(*args, **kwargs)
            if after:
                time.sleep(rng.uniform(0, 0.002))
            return result
        return call

    # This child's own modules (a forked copy): the parent's are untouched.
    os.link, os.replace, fcntl.flock = paused(os.link), paused(os.replace), paused(fcntl.flock)
    tg.open = paused(open, after=True)
    barrier.wait(timeout=20)  # both started (forks take longer than the moments drawn)
    time.sleep(rng.uniform(0, 0.003))
    try:
        with tg.output_lock([str(folder / "out")], f"run{who}"):
            won[who] = 1
            barrier.wait(timeout=20)
    except tg.ConfigError:
        won[who] = 0
        barrier.wait(timeout=20)
    os._exit(0)


def test_two_runs_racing_for_a_lock_never_both_hold_it(tmp_path):
    """Two processes take one output lock at once, 40 times with seeded moments, half of them
    over a stale lock (its process gone): exactly one holds it each time, and nothing is left
    once it is released. (Before: a lock was created empty and then written; the other run read
    it empty, called it stale, deleted it and took its own.)"""
    ctx = multiprocessing.get_context("fork")
    stale = json.dumps({"run_id": "crashed", "pid": dead_pid()})
    doubled = []
    for seed in range(40):
        folder = tmp_path / str(seed)
        folder.mkdir()
        if seed % 2:
            (folder / ".out.lock").write_text(stale)
        barrier, won = ctx.Barrier(2), ctx.Array("i", [-1, -1])
        procs = [ctx.Process(target=contend, args=(folder, seed, who, barrier, won))
                 for who in (0, 1)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0, 0], seed
        if sum(won) != 1:
            doubled.append((seed, list(won)))
        assert list(folder.iterdir()) == [], seed
    assert doubled == []


def test_a_lock_whose_holder_lives_is_refused_whatever_pid_it_names(small_root, tmp_path):
    """A lock held (flock) by a live run is never taken over, even when the process it names is
    gone (a recycled or foreign id); the same file unheld is taken over and released."""
    lock = tmp_path / ".final_model.int6.ptz.lock"
    content = json.dumps({"run_id": "first", "pid": dead_pid()})
    lock.write_text(content)
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        status, out, err = main_in_process(tmp_path, tiny_env(small_root, "second"))
    assert status == 2
    assert "final_model.int6.ptz is in use by run 'first'" in one_error(err)
    assert lock.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.name]
    with tg.output_lock([str(tmp_path / "final_model.int6.ptz")], "third"):
        taken = json.loads(lock.read_text())
    assert taken == {"run_id": "third", "pid": os.getpid()} and not lock.exists()


# --- the tokenizer without a manifest (item 3) ---


def test_shards_without_a_manifest_say_the_tokenizer_is_unchecked(small_root, tmp_path):
    """The challenge's shards come without manifest.json: the run logs one line saying the
    tokenizer is unchecked (a wrong one of the same size scores silently wrong). With the
    manifest, no such line."""
    data = tmp_path / "data"
    shutil.copytree(small_root / DEMO, data)
    cfg = tg.Config.from_env({**tiny_env(small_root, "x"), "DATA_PATH": str(data)})
    _, warnings = tg.load_data(cfg, tg.Runtime(), training=True)
    assert warnings == []
    (data / "manifest.json").unlink()
    _, warnings = tg.load_data(cfg, tg.Runtime(), training=True)
    assert warnings == [f"WARNING: TOKENIZER_PATH is unchecked: no tokenizer sha256 in "
                        f"{data / 'manifest.json'}"]


# --- EVAL_ONLY: the bytes evaluated, hashed and held (item 4) ---


def test_eval_only_hashes_the_bytes_it_reads_once_and_holds_the_artifact(finished, tmp_path,
                                                                         monkeypatch):
    """EVAL_ONLY reads the artifact once, logs the sha256 of those bytes, and holds the artifact
    while it is evaluated: a training run started meanwhile on the same ARTIFACT is refused
    with "in use by run <the evaluation's>" and replaces nothing."""
    cwd, env = finished
    before = copy_outputs(cwd, tmp_path)
    reads, read_bytes = [], Path.read_bytes

    def counted(path):
        reads.append(Path(path).name)
        return read_bytes(path)

    second = {}

    def evaluate_meanwhile(cfg, rt, model, data):  # a training run starts mid-evaluation
        second["reads"] = reads.count(ARTIFACT)
        second["result"] = main_in_process(tmp_path, {**env, "RUN_ID": "second"})

    monkeypatch.setattr(Path, "read_bytes", counted)
    monkeypatch.setattr(tg, "evaluate", evaluate_meanwhile)
    status, out, err = main_in_process(tmp_path, {**env, "EVAL_ONLY": "1", "RUN_ID": "evaluating"})
    assert status == 0, err
    assert second["reads"] == 1
    log = (tmp_path / "logs" / "evaluating.txt").read_text()
    sha = hashlib.sha256(before[ARTIFACT]).hexdigest()
    assert re.search(rf"^eval_only artifact:{ARTIFACT} bytes:{len(before[ARTIFACT])}\n"
                     rf"eval_only sha256:{sha}\n", log, re.M)
    status2, _, err2 = second["result"]
    assert status2 == 2
    assert one_error(err2).startswith(f"error: {ARTIFACT} is in use by run 'evaluating' (process "
                                      f"{os.getpid()}, lock ")
    assert {name: (tmp_path / name).read_bytes() for name in OUTPUTS} == before
    assert not (tmp_path / "logs" / "second.txt").exists() and left_behind(tmp_path) == []


# --- output names too long for the run's temporary names (items 5, 9) ---


@pytest.mark.parametrize("length", [242, 250])
def test_an_artifact_name_too_long_for_its_temporaries_is_refused_up_front(small_root, tmp_path,
                                                                           length):
    """An ARTIFACT name of 240-244 bytes fits, but its sidecar's temporary does not (before: it
    trained, then failed at export leaving an artifact without a sidecar); of 245 or more its
    lock does not (before: an Errno 36 traceback). Both: one line before any work."""
    name = "a" * (length - 4) + ".ptz"
    status, out, err = main_in_process(tmp_path, {**tiny_env(small_root, "long"),
                                                  "ARTIFACT": name})
    assert status == 2 and out == ""
    line = one_error(err)
    assert line.startswith(f"error: ARTIFACT={name!r}: cannot write ") and line.endswith(
        "(File name too long); expected a writable folder and a shorter name")
    assert list(tmp_path.iterdir()) == []


# --- a full disk under logs/ (item 6) ---


def test_a_full_disk_under_logs_says_what_was_kept(small_root, tmp_path, monkeypatch):
    """The log's disk fills at the round-trip evaluation (the outputs are on another disk):
    one line on stderr naming the log, the error and the outputs kept (all three, whole: the
    artifact loads, its sidecar matches); exit 1, no traceback."""
    full = {"now": False}

    class FillingLog:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text: str) -> int:
            full["now"] = full["now"] or text.startswith("final_int6_roundtrip")
            if full["now"]:
                self.f.write(text[:5])  # the log is cut mid-line, as on a real disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(text)

    def log_open(path, mode="r", **kwargs):
        f = open(path, mode, **kwargs)
        return FillingLog(f) if re.fullmatch(r"logs/.*\.txt", str(path)) and mode == "a" else f

    monkeypatch.setattr(tg, "open", log_open, raising=False)
    env = {**tiny_env(small_root, "full"), "ITERATIONS": "2", "SLOT_ENABLED": "0"}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 1 and "Traceback" not in err
    assert err.strip() == ("error: logs/full.txt: No space left on device; the run stopped, "
                           f"keeping {', '.join(OUTPUTS)}")
    blob = (tmp_path / ARTIFACT).read_bytes()
    assert json.loads((tmp_path / SIDECAR).read_text())["sha256"] == hashlib.sha256(
        blob).hexdigest()
    cfg = tg.Config.from_env(env)
    tg.eval_model(cfg.model, tg.read_artifact(tmp_path / ARTIFACT), torch.device("cpu"), ARTIFACT)
    assert (tmp_path / "logs" / "full.txt").read_text().endswith("\nfinal")
    assert left_behind(tmp_path) == []


# --- a rank killed or stalled under torchrun (item 7) ---


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_rank_killed_or_stalled_ends_the_run_with_one_line(small_root, tmp_path, how):
    """torchrun, 2 processes (gloo): rank 1 is killed (SIGKILL) or stalls at its third training
    step. Rank 0 prints one `error:` line naming itself and the stage, logged too, instead of
    gloo's RuntimeError traceback (the stall after COLLECTIVE_TIMEOUT_SECONDS)."""
    env = {**tiny_env(small_root, "lost"), "ITERATIONS": "40", "SLOT_ENABLED": "0",
           "TEST_LOSE_RANK": f"1:{how}", "COLLECTIVE_TIMEOUT_SECONDS": "10"}
    # torchrun's agent checks its workers every 5 s (not 0.1 s): rank 0 meets the failed
    # collective before the agent stops it (then its line would be `interrupted during ...`).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=5", str(PATCHED)]
    p = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    log = (tmp_path / "logs" / "lost.txt").read_text().strip().splitlines()
    assert log[-1].startswith("error: rank 0 lost another rank during training (killed or "
                              "stalled): "), log[-3:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [log[-1]]
    assert "train_gpt.py" not in p.stderr  # no traceback through the script
    assert not (tmp_path / "final_model.pt").exists() and left_behind(tmp_path) == []


# --- a malformed sidecar (item 8) ---


@pytest.mark.parametrize("settings", [["NUM_LAYERS", 11], "NUM_LAYERS=11", None])
def test_a_sidecar_whose_settings_are_not_a_table_is_one_error(finished, tmp_path, settings):
    cwd, env = finished
    copy_outputs(cwd, tmp_path)
    meta = json.loads((tmp_path / SIDECAR).read_text())
    (tmp_path / SIDECAR).write_text(json.dumps({**meta, "settings": settings}))
    status, out, err = main_in_process(tmp_path, {**env, "EVAL_ONLY": "1"})
    assert status == 2
    assert one_error(err) == (f"error: {SIDECAR}: unreadable sidecar; expected the JSON written "
                              f"with the artifact (remove it to evaluate unchecked)")
    assert not (tmp_path / "logs").exists()


# --- WORLD_SIZE without torchrun (item 10) ---


def test_world_size_without_torchrun_is_one_error(small_root, tmp_path, monkeypatch):
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    status, out, err = main_in_process(tmp_path, {**tiny_env(small_root, "ws"), "WORLD_SIZE": "2"})
    assert status == 2
    assert one_error(err) == ("error: WORLD_SIZE=2 is set without torchrun (no MASTER_ADDR, "
                              "MASTER_PORT, RANK); expected a torchrun launch or WORLD_SIZE unset")
    assert list(tmp_path.iterdir()) == []


# --- outputs that collide (item 14) ---


@pytest.mark.parametrize("model_path", ["x.ptz", "x.ptz.json", "./x.ptz.json"])
def test_outputs_that_collide_are_named(model_path):
    """MODEL_PATH naming the artifact's sidecar (before: "in use by run <its own id>")."""
    with pytest.raises(tg.ConfigError) as e:
        tg.Config.from_env({"ARTIFACT": "x.ptz", "MODEL_PATH": model_path})
    assert str(e.value) == (f"ARTIFACT='x.ptz' is not allowed; expected outputs that do not "
                            f"collide with MODEL_PATH={model_path!r} (it and x.ptz.json)")
    tg.Config.from_env({"ARTIFACT": "x.ptz", "MODEL_PATH": "x.pt"})


# --- a bad token id in a later training shard (item 15) ---


def test_a_bad_id_in_a_later_shard_stops_before_training(small_root, finished, tmp_path):
    """Two training shards, an id past VOCAB_SIZE in the second (before: the run trained through
    the first, then stopped without keeping anything): one line naming the shard before any work,
    the earlier run's files untouched."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("manifest.json", "fineweb_val_000000.bin"):
        shutil.copy(small_root / DEMO / name, data / name)
    train = np.asarray(read_shard(small_root / DEMO / "fineweb_train_000000.bin"))
    later = train[100_000:150_000].copy()
    later[-1] = 1500
    (data / "fineweb_train_000000.bin").write_bytes(shard_bytes(train[:100_000]))
    (data / "fineweb_train_000001.bin").write_bytes(shard_bytes(later))
    cwd = tmp_path / "run"
    cwd.mkdir()
    before = copy_outputs(finished[0], cwd)
    status, out, err = main_in_process(cwd, {**tiny_env(small_root, "bad"), "DATA_PATH": str(data)})
    assert status == 2
    assert one_error(err) == (f"error: {data / 'fineweb_train_000001.bin'}: token id 1500 is out "
                              f"of range for VOCAB_SIZE=1024")
    assert {name: (cwd / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in cwd.iterdir()) == sorted(OUTPUTS)


# --- a run stopped beside an earlier run's files (issue 29, item 8) ---


@pytest.mark.parametrize("when", ["training", "export"])
def test_a_stopped_run_leaves_the_earlier_runs_files_whole(finished, tmp_path, monkeypatch, when):
    """Ctrl-C at step 3 of training, or as the artifact's temporary is complete but not yet
    renamed: the earlier run's artifact and sidecar are there byte for byte (before: deleted at
    the start), no temporary or lock is left, exit 130. Stopped in export, the weights
    are this run's (5 steps, renamed whole), the artifact still the earlier one's (4 steps)."""
    cwd, env = finished
    before = copy_outputs(cwd, tmp_path)
    if when == "training":
        log_train_step = tg.log_train_step

        def ctrl_c_at_step_3(t, rt, step, *args):
            if step == 3:
                raise KeyboardInterrupt
            return log_train_step(t, rt, step, *args)

        monkeypatch.setattr(tg, "log_train_step", ctrl_c_at_step_3)
    else:
        replace = os.replace

        def ctrl_c_before_the_artifact(src, dst):
            if Path(dst).name == ARTIFACT:
                assert tg.read_artifact(src)  # its temporary is complete
                raise KeyboardInterrupt
            return replace(src, dst)

        monkeypatch.setattr(os, "replace", ctrl_c_before_the_artifact)
    status, out, err = main_in_process(tmp_path, {**env, "RUN_ID": "stopped", "ITERATIONS": "5"})
    assert status == 130, err
    last = (tmp_path / "logs" / "stopped.txt").read_text().strip().splitlines()[-1]
    assert last == ("interrupted at step 3/5" if when == "training" else
                    "interrupted during export")
    kept = OUTPUTS if when == "training" else OUTPUTS[1:]
    assert {name: (tmp_path / name).read_bytes() for name in kept} == {
        name: before[name] for name in kept}
    if when == "export":
        assert (tmp_path / "final_model.pt").read_bytes() != before["final_model.pt"]
        weights = str(tmp_path / "final_model.pt")
        tg.load_weights(tg.Config.from_env({**env, "MODEL_PATH": weights}), tg.Runtime())
    assert left_behind(tmp_path) == []
