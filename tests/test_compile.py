"""Compiled graphs, counted as dynamo builds them (its "eager" backend: the same tracing and guards
as on CUDA, no C++ compiler): nothing compiles once the training timer runs, late QAT included,
and the evaluations build a bounded number of graphs whatever the validation length and the
number of processes.

One process runs train_gpt.main in this process with the counting patches applied by
monkeypatch; two processes run tests/patched_run.py under torchrun, which applies the same
patches (TEST_COMPILE_COUNTS). The pair is this module's fixture (compiled_runs), run side by
side; the last test compares their figures."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo

import train_gpt as tg
from tests.test_pipeline import (DEMO, LOG_FORMATS, ROOT, SCRIPT, figures, main_in_process,
                                 tiny_env)
from tools._files import read_shard, shard_bytes

PATCHED = ROOT / "tests" / "patched_run.py"
EVAL_GRAPH_LIMIT = 6  # dynamo's default recompile limit is 8 per function
pytestmark = pytest.mark.slow  # every test here counts the graphs of whole runs


def compiled_env(root: Path, run_id: str, data: Path | None) -> dict:
    # SLOT batches of 8 windows: both validation lengths below fill several batches per list.
    # LATE_QAT=on: compiled, the record's setting would not fake-quantise at all.
    env = {
        **tiny_env(root, run_id),
        "COMPILE": "1",
        "WARMUP_STEPS": "2",
        "VAL_LOSS_EVERY": "4",
        "LATE_QAT_THRESHOLD": "0.5",
        "LATE_QAT": "on",
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
def compiled_runs(small_root, tmp_path_factory):
    """The same compiled run in one process (train_gpt.main here) and under torchrun with two
    (tests/patched_run.py), side by side; each counts the graphs compiled at every log line.
    {"one": (folder, records), "two": (folder, [records of each rank])}; the logs are
    logs/c1.txt and logs/c2.txt."""
    one, two = tmp_path_factory.mktemp("compiled_one"), tmp_path_factory.mktemp("compiled_two")
    p = torchrun_counted(two, small_root, "c2", nproc=2)
    monkeypatch = pytest.MonkeyPatch()
    try:
        records = counted_in_process(one, small_root, "c1", monkeypatch)
    except BaseException:
        p.kill()
        p.communicate()
        raise
    finally:
        monkeypatch.undo()
    return {"one": (one, records), "two": (two, torchrun_records(p, two, nproc=2))}


@pytest.fixture(scope="module")
def one_process(compiled_runs):
    """The one-process records of the compiled pair."""
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


def test_two_processes_match_one(compiled_runs):
    """torchrun --nproc_per_node=2 (gloo) with the same global batch: the same data in a
    different micro-step order, so the final validation loss agrees within 1e-3; SLOT's
    grouping makes its figures agree too. The one-process run's log has the original's line
    formats (lzma, the default compressor), with the scored and context SLOT lines labelled,
    and the submission builder reads its own figures; the script's log opens with its source.
    (The compiled pair of this module's fixture; their graphs are counted below.)"""
    one, two = compiled_runs["one"][0], compiled_runs["two"][0]
    log1 = (one / "logs" / "c1.txt").read_text()
    log2 = (two / "logs" / "c2.txt").read_text()
    assert "device:cpu compile:True" in log1 and "device:cpu compile:True" in log2
    assert "world_size:2 grad_accum_steps:4" in log2
    for name in (
        "step:12/12",
        "final_int6_roundtrip_exact",
        "final_slot_exact",
        "final_slot_context_exact",
    ):
        a, b = figures(log1, name), figures(log2, name)
        assert abs(a[0] - b[0]) < 1e-3, (name, a, b)

    assert (one / "final_model.pt").is_file()
    assert (
        (one / "final_model.int6.ptz").read_bytes().startswith(b"\xfd7zXZ\x00")
    )  # lzma's xz container
    for pattern in LOG_FORMATS:
        assert re.search(pattern, log1, re.M), pattern
    source = SCRIPT.read_text()
    assert log1.startswith(source + "\n") and log2.startswith(source + "\n")  # the full source
    # Two roundtrip_exact lines: the round trip, then the sliding result repeated (no s64 pass:
    # EVAL_SEQ_LEN is 64).
    assert len(re.findall(r"^final_int6_roundtrip_exact ", log1, re.M)) == 2

    from tools.submission import parse_log

    record = parse_log(one / "logs" / "c1.txt")
    assert (record.steps, record.seed, record.num_gpus, record.gpu_type) == (12, 3, 0, "cpu")
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", log1, re.M).group(1))
    assert record.artifact_bytes == total
    assert (record.evals["slot"].val_loss, record.evals["slot"].val_bpb) == figures(
        log1, "final_slot_exact"
    )
    assert record.evals["slot_context"].val_bpb == figures(log1, "final_slot_context_exact")[1]


# -----------------------------
# issue 29: TTT's timer, late QAT as the record ran it
# -----------------------------


@pytest.mark.parametrize("world", [1, 8])
def test_ttt_compiles_nothing_inside_its_timer(world, monkeypatch):
    """Compiled legal TTT as rank 0 of `world` (collectives stubbed): its scoring forward and each
    shape of its training step are compiled before `legal_ttt:start` (the timer starts after
    it); from there to `legal_ttt:done` no graph is built. Scoring uses the sliding
    evaluation's row count on any world size."""
    from tests.test_ttt import config, perturbed_model

    cfg = config(ttt_chunk_tokens=160, ttt_batch_seqs=3)
    model = perturbed_model(cfg.model, 0, 0.3).eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (301,), generator=gen)
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool),
            torch.zeros(64, dtype=torch.bool))
    records, shapes, real_compile, compiled = [], set(), torch.compile, tg.Runtime.compiled

    def spy_compiled(self, fn):  # the scoring forward's input shapes, outside the graph
        graph = compiled(self, fn)
        if getattr(fn, "__name__", "") != "hidden":
            return graph
        return lambda ids, **kw: shapes.add(tuple(ids.shape)) or graph(ids, **kw)

    def counting_log(self, msg, console=True):
        records.append({"graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
                        "line": msg})

    monkeypatch.setattr(torch, "compile",
                        lambda *a, **k: real_compile(*a, **{**k, "backend": "eager"}))
    monkeypatch.setattr(tg.Runtime, "log", counting_log)
    monkeypatch.setattr(tg.Runtime, "compiled", spy_compiled)
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, op=None: None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        tg.eval_ttt(cfg.eval, tg.Runtime(world_size=world, compile=True), model, tokens, luts)
    finally:
        torch._dynamo.reset()
    start, done = graphs_at(records, "legal_ttt:start"), graphs_at(records, "legal_ttt:done")
    assert start >= 2 and done == start
    assert shapes == {(cfg.eval.slot.batch_seqs, 32)}


def late_qat_run(root: Path, setting: str, compiled: bool, monkeypatch) -> tuple[list, list]:
    """train() on the small corpus as a compiled or an eager run (torch.compile stubbed out: the
    decision is the point); returns its log lines and, per training forward, whether the
    linears fake-quantised."""
    cfg = tg.Config.from_env({**tiny_env(root, "q"), "LATE_QAT": setting, "ITERATIONS": "8",
                              "WARMDOWN_ITERS": "4"})
    lines, qat_calls, forward = [], [], tg.CastedLinear.forward

    def spy(self, x, qat=False):
        if self.training and self is model.blocks[0].attn.c_q:
            qat_calls.append(bool(qat))
        return forward(self, x, qat)

    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)
    monkeypatch.setattr(tg.CastedLinear, "forward", spy)
    rt = tg.Runtime(compile=compiled)
    monkeypatch.setattr(tg.Runtime, "log", lambda self, msg, console=True: lines.append(msg))
    data, _ = tg.load_data(cfg, rt, training=True)
    model = tg.build_model(cfg.model, rt.device, seed=cfg.run.seed)
    tg.train(cfg, rt, model, data, 0.0)
    return lines, qat_calls


@pytest.mark.parametrize("setting, compiled, applied", [
    ("record", False, True), ("record", True, False), ("on", False, True), ("on", True, True),
    ("off", False, False), ("off", True, False)])
def test_late_qat_setting(small_root, monkeypatch, setting, compiled, applied):
    """LATE_QAT=record fake-quantises as the original did: in an eager run, not in a compiled
    one (whose graph had folded the class switch in); on: both; off: never. At the switch the
    log says which and why; the original's `late_qat:enabled` line only when it applies. The
    warm-up runs the quantised step only when the loop will."""
    lines, qat_calls = late_qat_run(small_root, setting, compiled, monkeypatch)
    switch = [line for line in lines if line.startswith("late_qat:")]
    why = f"LATE_QAT={setting} compile:{compiled}"
    if applied:
        assert re.fullmatch(r"late_qat:enabled step:(\d+) scale:\d\.\d{4}", switch[0])
        assert switch[1:] == [f"late_qat:applied {why}"]
    else:
        assert switch == [f"late_qat:skipped {why}"]
    # Warm-up: 2 steps x 8 micro-steps (the second half quantised if the loop will), then 8 steps.
    warm, timed = qat_calls[:16], qat_calls[16:]
    assert warm == [False] * 8 + [applied] * 8 and len(timed) == 8 * 8
    step = int(re.search(r"step:(\d+)", switch[0]).group(1)) if applied else 8
    assert timed == [False] * (8 * step) + [True] * (8 * (8 - step))
