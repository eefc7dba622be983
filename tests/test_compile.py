"""Compiled graphs, counted as dynamo builds them (its "eager" backend: the same tracing and guards
as on CUDA, no C++ compiler): nothing compiles once the training timer runs, late QAT included,
and the evaluations build a bounded number of graphs whatever the validation length and the
number of processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline import ROOT, tiny_data, tiny_env  # noqa: F401  (tiny_data is a fixture)
from tools.data import read_shard, write_shard

PATCHED = ROOT / "tests" / "patched_run.py"
EVAL_GRAPH_LIMIT = 6  # dynamo's default recompile limit is 8 per function


def counted_run(cwd: Path, root: Path, run_id: str, nproc: int = 1, data: Path | None = None,
                **extra) -> list[list[dict]]:
    """A compiled run through tests/patched_run.py; per rank, (graphs so far, log line) at each line."""
    counts = cwd / "counts.jsonl"
    env = {**os.environ, **tiny_env(root, run_id), "COMPILE": "1", "TEST_COMPILE_COUNTS": str(counts),
           "WARMUP_STEPS": "2", "VAL_LOSS_EVERY": "4", "LATE_QAT_THRESHOLD": "0.5", "OMP_NUM_THREADS": "1",
           **extra}
    if data is not None:
        env["DATA_PATH"] = str(data)
    cmd = [sys.executable, str(PATCHED)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(PATCHED)]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
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
def short_val_data(tiny_data, tmp_path_factory) -> Path:
    """The demo corpus with its validation split cut to a quarter: a different number of windows,
    batches and a different last batch."""
    src = tiny_data / "data" / "datasets" / "demo_sp1024"
    dst = tmp_path_factory.mktemp("short_val") / "demo_sp1024"
    shutil.copytree(src, dst)
    val = np.asarray(read_shard(src / "fineweb_val_000000.bin"))
    write_shard(dst / "fineweb_val_000000.bin", val[: val.size // 4 + 37])
    return dst


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("compile_one")
    return counted_run(cwd, tiny_data, "c1")[0]


def test_nothing_compiles_after_the_training_timer_starts(one_process):
    """The warm-up builds the training step without and with late QAT and the validation graph;
    the timed loop (validation every 4 steps, late QAT switching on) adds none."""
    warm, during, _ = phases(one_process)
    assert any(r["line"].startswith("late_qat:enabled") for r in one_process)
    assert warm >= 3  # training step without QAT, with QAT, validation
    assert during == 0


def test_evaluation_graphs_are_bounded_and_independent_of_the_data(one_process, tiny_data, short_val_data,
                                                                   tmp_path):
    _, _, evals = phases(one_process)
    short = counted_run(tmp_path, tiny_data, "c2", data=short_val_data)[0]
    assert phases(short)[1] == 0
    assert 0 < evals <= EVAL_GRAPH_LIMIT
    assert phases(short)[2] == evals


def test_two_processes_compile_nothing_after_the_timer_and_few_eval_graphs(tiny_data, tmp_path):
    """World size 2 (gloo): on every rank, nothing compiles in the timed loop and the evaluations stay
    within the bound. (Ranks may differ by a graph or two: Muon orthogonalises different matrices on
    each, and the batch holding the first window pads SLOT's fit to the larger of its two sizes.)"""
    ranks = counted_run(tmp_path, tiny_data, "c3", nproc=2)
    for records in ranks:
        warm, during, evals = phases(records)
        assert warm >= 3 and during == 0
        assert 0 < evals <= EVAL_GRAPH_LIMIT
