"""Compiled graphs, counted as dynamo builds them (its "eager" backend: the same tracing and guards
as on CUDA, no C++ compiler): nothing compiles once the training timer runs, late QAT included,
and the evaluations build a bounded number of graphs whatever the validation length and the
number of processes.

One process runs train_gpt.main in this process with the counting patches applied by
monkeypatch; two processes run tests/patched_run.py under torchrun, which applies the same
patches (TEST_COMPILE_COUNTS). The pair is a session fixture (tests/conftest.py:
compiled_runs): tests/test_pipeline.py compares their figures."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

import train_gpt as tg
from tests.test_pipeline import DEMO, ROOT, main_in_process, tiny_env
from tools._files import read_shard, shard_bytes

PATCHED = ROOT / "tests" / "patched_run.py"
EVAL_GRAPH_LIMIT = 6  # dynamo's default recompile limit is 8 per function


def compiled_env(root: Path, run_id: str, data: Path | None) -> dict:
    # SLOT batches of 8 windows: both validation lengths below fill several batches per list.
    env = {
        **tiny_env(root, run_id),
        "COMPILE": "1",
        "WARMUP_STEPS": "2",
        "VAL_LOSS_EVERY": "4",
        "LATE_QAT_THRESHOLD": "0.5",
        "SLOT_BATCH_SEQS": "8",
    }
    if data is not None:
        env["DATA_PATH"] = str(data)
    return env


def counted_in_process(cwd: Path, root: Path, run_id: str, monkeypatch, data: Path | None = None):
    """A compiled run in this process; (graphs compiled so far, first line) at each log line."""
    records, real_compile, real_log = [], torch.compile, tg.Runtime.log

    def counting_log(self, msg, console=True):
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        records.append({"graphs": graphs, "line": msg.splitlines()[0] if msg else ""})
        real_log(self, msg, console)

    with monkeypatch.context() as m:
        m.setattr(torch, "compile", lambda *a, **k: real_compile(*a, **{**k, "backend": "eager"}))
        m.setattr(tg.Runtime, "log", counting_log)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        try:
            status, out, err = main_in_process(cwd, compiled_env(root, run_id, data))
        finally:
            torch._dynamo.reset()
    assert status == 0, out[-2000:] + err[-2000:]
    return records


def torchrun_counted(cwd: Path, root: Path, run_id: str, nproc: int) -> subprocess.Popen:
    """A compiled run through tests/patched_run.py under torchrun, started; torchrun_records
    reads what each rank counted once it has finished."""
    env = {
        **os.environ,
        **compiled_env(root, run_id, None),
        "TEST_COMPILE_COUNTS": str(cwd / "counts.jsonl"),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(PATCHED),
    ]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def torchrun_records(p: subprocess.Popen, cwd: Path, nproc: int) -> list[list[dict]]:
    """Per rank, (graphs compiled so far, first line) at each log line."""
    out, err = p.communicate(timeout=300)  # a hang guard: about 30 s
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    counts = cwd / "counts.jsonl"
    paths = [counts] + [Path(f"{counts}.{r}") for r in range(1, nproc)]
    return [[json.loads(line) for line in path.read_text().splitlines()] for path in paths]


def graphs_at(records: list[dict], prefix: str, last: bool = False) -> int:
    hits = [r["graphs"] for r in records if r["line"].startswith(prefix)]
    assert hits, f"no log line starting with {prefix!r}"
    return hits[-1] if last else hits[0]


def phases(records: list[dict]) -> tuple[int, int, int]:
    """Graphs compiled by the end of the warm-up, during the timed loop, and by the evaluations."""
    warm = graphs_at(records, "warmup_step:", last=True)
    trained = graphs_at(records, "ema:applying EMA weights")
    return warm, trained - warm, records[-1]["graphs"] - trained


@pytest.fixture(scope="module")
def short_val_data(small_root, tmp_path_factory) -> Path:
    """The small corpus with its validation split cut to a quarter: a different number of
    windows, batches and a different last batch."""
    src = small_root / DEMO
    dst = tmp_path_factory.mktemp("short_val") / "demo_sp1024"
    shutil.copytree(src, dst)
    val = np.asarray(read_shard(src / "fineweb_val_000000.bin"))
    (dst / "fineweb_val_000000.bin").write_bytes(shard_bytes(val[: val.size // 4 + 37]))
    return dst


@pytest.fixture(scope="module")
def one_process(compiled_runs):
    """The one-process records of the session's compiled runs (tests/conftest.py)."""
    return compiled_runs["one"][1]


def test_nothing_compiles_after_the_training_timer_starts(one_process):
    """The warm-up builds the training step without and with late QAT and the validation graph;
    the timed loop (validation every 4 steps, late QAT switching on) adds none."""
    warm, during, _ = phases(one_process)
    assert any(r["line"].startswith("late_qat:enabled") for r in one_process)
    assert warm >= 3  # training step without QAT, with QAT, validation
    assert during == 0


def test_evaluation_graphs_are_bounded_and_independent_of_the_data(
    one_process, small_root, short_val_data, tmp_path, monkeypatch
):
    _, _, evals = phases(one_process)
    short = counted_in_process(tmp_path, small_root, "c3", monkeypatch, data=short_val_data)
    assert phases(short)[1] == 0
    assert 0 < evals <= EVAL_GRAPH_LIMIT
    assert phases(short)[2] == evals


def test_two_processes_compile_nothing_after_the_timer_and_few_eval_graphs(compiled_runs):
    """World size 2 (gloo): on every rank, nothing compiles in the timed loop and the evaluations
    stay
    within the bound. (Ranks may differ by a graph or two: Muon orthogonalises different matrices on
    each, and the batch holding the first window pads SLOT's fit to the larger of its two sizes.)"""
    ranks = compiled_runs["two"][1]
    for records in ranks:
        warm, during, evals = phases(records)
        assert warm >= 3 and during == 0
        assert 0 < evals <= EVAL_GRAPH_LIMIT
