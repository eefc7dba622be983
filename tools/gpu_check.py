"""The one-shot GPU proof: on one CUDA GPU, inside 420 s, what the record's configuration must
show before a real run, and the figures a fix would need without a second run.

From the repository root, with a 480 s limit on the command (it needs what train_gpt.py
imports and nothing else: no network, FlashAttention 3, brotli or zstandard):

    python3 -m tools.data demo && python3 -m tools.gpu_check --out "$OUT/gpu_check.json"

Five stages, each a process of its own with a deadline inside the total (--budget, 420 s),
side by side where they can be (compiling is mostly host work), so that one that fails or
hangs leaves the others' results:

  probes      the GPU; GPTQ on it (one Hessian, one solve of a 512x1536 matrix) against the
              CPU; the eager SDPA call under each backend; a profiler trace of one compiled
              training micro-step of the 11-layer model: the attention kernel the graph runs
  training    train_gpt.py, the 11-layer model at 786,432 tokens per step (8 micro-steps of
              48 rows): every loss finite, the first near ln(vocab), falling; compile seconds
              per graph, none in the timed loop; ms/step; peak memory; export and round trip
  eval_model  the evaluations' own 11-layer artifact: a few eager steps, exported
  eval_slot   EVAL_ONLY on that artifact: round trip, sliding s96 and s64, SLOT both modes
  eval_ttt    EVAL_ONLY on it: round trip, sliding, legal TTT

The evaluations start once eval_model has written its artifact; each must be finite and near
its round trip (SLOT scored below it), and gives its steady-state seconds per batch and the
time it would take on 8xH100 over the record's whole validation split. While training runs
its timed steps the other stages are paused (SIGSTOP): its ms/step is its own.

Beside --out (default: gpu_check.json in $OUT when set, else here) go its text copy (.txt)
and one log per stage (<stem>_<stage>.log: each line after the second it arrived). All are
written as results come in (the summary atomically): a kill at any moment leaves what was
measured. Exit status 0 when every stage passed, 1 otherwise, 2 for bad arguments.

    python -m tools.gpu_check --dry-run    # on a CPU: the same processes, deadlines and
                                           # checks on a tiny model, in one to two minutes

--dry-run compiles with dynamo's eager backend (the same graphs, guards and recompilations;
inductor's code generation would take minutes on a CPU). Without it a machine with no CUDA
device is refused.
"""

from __future__ import annotations

import argparse
import datetime
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tools import runlog
from tools._files import read_shard, shard_bytes, write_atomic
from tools.runlog import EVAL_TAGS, PART_PREFIX, POST_EMA
from tools.runlog import Log, find, last, match

# ---------------------------------------------------------------- moved from tools/runlog.py
# (the reader keeps what submission and bench_train read; these are the GPU check's own)

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = ROOT / "data" / "tokenizers" / "demo_1024_bpe.model"

# The record on 8xH100 (published): 786,432 tokens per step, one micro-step of 48 rows per GPU.
ORIGINAL_MS_PER_STEP = 91.25
ORIGINAL_PEAK_MIB = 22524
RECORD_VAL_TARGETS = 62_021_632  # targets in the record's validation split
RECORD_EVAL_S = {"final_int6_sliding_window": 54.5, "final_slot": 408.7}  # eval_time on 8xH100


def ensure_demo_data(data: Path) -> None:
    """The demo corpus is built offline in seconds by `python -m tools.data demo`."""
    if data == DEMO_DATA and not DEMO_DATA.exists():
        command = [sys.executable, "-m", "tools.data", "demo", "--root", str(ROOT)]
        subprocess.run(command, check=True, cwd=ROOT)


def train_losses(log: Log) -> list[tuple[int, float]]:
    """(step, train_loss) of every logged step; nan and inf parse as such."""
    return [(int(m["step"]), float(m["train_loss"])) for m in find("train_step", log)]


def val_losses(log: Log) -> list[tuple[int, float, float]]:
    """(step, val_loss, val_bpb) of every in-loop validation line."""
    return [(int(m["step"]), float(m["val_loss"]), float(m["val_bpb"]))
            for m in find("val_step", log)]


def ttt_chunk_lines(log: Log) -> list[tuple[int, int, float]]:
    """(chunk, chunks, elapsed seconds) of every legal_ttt:chunk line."""
    return [(int(m["chunk"]), int(m["chunks"]), float(m["elapsed"]))
            for m in find("ttt_chunk", log)]


def progress_lines(log: Log, label: str) -> list[tuple[float, float]]:
    """(fraction done, elapsed seconds) of the eval_progress lines of one pass."""
    return [(float(m["percent"]) / 100, float(m["elapsed"])) for m in find("progress", log)
            if m["label"] == label]


def eval_timing(log: Log) -> dict[str, dict]:
    """The eval_timing lines by evaluation name."""
    return {m["name"]: dict(batches=int(m["batches"]), first_batch_s=float(m["first"]),
                            steady_batch_s=float(m["steady"])) for m in find("timing", log)}


def memory_peaks(log: Log) -> dict | None:
    """The last gpu_check:memory line: peak resident memory and CUDA peaks (None off CUDA)."""
    m = last("memory", log)
    if m is None:
        return None
    rss, alloc, reserved = (int(m[k]) for k in ("rss", "allocated", "reserved"))
    return dict(rss_peak_mib=rss, cuda_allocated_peak_mib=alloc if alloc >= 0 else None,
                cuda_reserved_peak_mib=reserved if reserved >= 0 else None)


# ---------------------------------------------------------------- captured logs

CAPTURED = re.compile(r"^ *(\d+\.\d+)\| ?(.*)$")  # written by capture_line


def capture_line(t: float, line: str) -> str:
    """A line as gpu_check stores it: seconds since the check started, then the line."""
    return f"{t:9.3f}| {line.rstrip(chr(10))}\n"


def read_captured(text: str) -> tuple[list[float], list[str]]:
    """Arrival times and lines of a captured log (a line without a prefix takes the last time)."""
    times, lines, t = [], [], 0.0
    for raw in text.splitlines():
        m = CAPTURED.match(raw)
        if m:
            t, raw = float(m[1]), m[2]
        times.append(t)
        lines.append(raw)
    return times, lines


# ---------------------------------------------------------------- dynamo's compilations

# torch's own lines under TORCH_LOGS (glog format), not train_gpt.py's.
GLOG_LINE = re.compile(r"^(?:\[rank\d+\]:)?[IWEVDC]\d{4} (\d\d):(\d\d):(\d\d\.\d+) +\d+ \S+:\d+\] ")
COMPILE_ID = re.compile(r"\] \[(\d+)/(\d+)(?:_\d+)?\] ")
START_TRACING = re.compile(r"torchdynamo start tracing (\S+) (\S+)")
RECOMPILING = re.compile(r"Recompiling function (\S+) in (\S+)")
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- \d+/\d+: (.*)")
LIMIT_HIT = re.compile(r"hit config\.(?:recompile|cache_size)_limit|FailOnRecompileLimitHit")
FORWARD_DONE = "Step 2: done compiler function"
BACKWARD_START = "Step 3: torchinductor compiling BACKWARDS graph"
BACKWARD_DONE = "Step 3: torchinductor done compiling BACKWARDS graph"

# Phases of a training log; WARMUP is everything before the training timer starts.
WARMUP, TRAINING, VALIDATION, EVALUATION = "warmup", "training", "validation", "evaluation"
PHASES = (WARMUP, TRAINING, VALIDATION, EVALUATION)


def glog_seconds(lines: list[str]) -> list[float | None]:
    """Each glog line's wall-clock time in seconds (a day boundary adds 86,400), None elsewhere."""
    out, offset, prev = [], 0.0, None
    for line in lines:
        m = GLOG_LINE.match(line)
        if not m:
            out.append(None)
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) + offset
        if prev is not None and t < prev - 43200:
            offset += 86400
            t += 86400
        out.append(t)
        prev = t
    return out


def compile_seconds(entries: list[tuple[float, str]]) -> tuple[float, bool]:
    """(seconds, finished) of one compilation from its lines (time, text) in log order: the
    forward from its first line to dynamo's `done compiler function`, and each backward from
    inductor's `compiling BACKWARDS` to its `done` line. Inductor may compile a backward lazily,
    at the first backward call: the time between belongs to the program, not the compiler."""
    total, start, state = 0.0, entries[0][0], "forward"
    for t, text in entries:
        if state == "forward" and FORWARD_DONE in text:
            total, state = total + t - start, "idle"
        elif BACKWARD_START in text and state != "backward":
            if state == "forward":  # no done line before the backward: the forward ends here
                total += t - start
            start, state = t, "backward"
        elif state == "backward" and BACKWARD_DONE in text:
            total, state = total + t - start, "idle"
    if state != "idle":  # cut mid-compilation: count up to its last line
        total += entries[-1][0] - start
    return total, state == "idle"


def _warm_end(lines: list[str], own: list[int]) -> tuple[int, bool]:
    """The last line of the warm-up (the eval_only line, else the last warm-up line, else the
    seed line that ends the config; -1: none) and whether the log is an EVAL_ONLY run's."""
    eval_only = [i for i in own if match("eval_only", lines[i])]
    marks = eval_only or [i for i in own if match("warmup", lines[i])] or [
        i for i in own if match("seed", lines[i])]
    return (marks[-1] if marks else -1), bool(eval_only)


def line_phases(lines: list[str]) -> list[tuple[str, str | None]]:
    """(phase, evaluation name) of every line. Up to the last warm-up line (or the end of the
    config when there is no warm-up): warm-up. Then, until `ema:`, a line belongs to the
    training step or the validation whose log line closes it (TRAIN_LOG_EVERY=1 logs every
    step). After `ema:` (an EVAL_ONLY run: after its `eval_only` line), to the evaluation whose
    eval_time line closes it."""
    own = [i for i, line in enumerate(lines) if not GLOG_LINE.match(line)]
    warm_end, eval_only = _warm_end(lines, own)
    labels: list[tuple[str, str | None]] = [(WARMUP, None)] * (warm_end + 1)
    pending, region = 0, EVALUATION if eval_only else TRAINING
    for i in range(warm_end + 1, len(lines)):
        line = lines[i]
        glog = bool(GLOG_LINE.match(line))
        if region == TRAINING and not glog and match("ema", line):
            labels += [(TRAINING, None)] * (pending + 1)
            pending, region = 0, EVALUATION
            continue
        pending += 1
        if glog:
            continue
        if region == TRAINING and (match("train_step", line) or match("val_step", line)):
            labels += [(TRAINING if match("train_step", line) else VALIDATION, None)] * pending
            pending = 0
        elif region == EVALUATION:
            ev = match("result", line)
            if ev:
                labels += [(EVALUATION, ev["name"])] * pending
                pending = 0
    labels += [(region, None if region == TRAINING else "(unfinished)")] * pending
    return labels


def _compile_entries(lines: list[str]) -> tuple[dict, list[str]]:
    """Every compile id's first line index and (time, text) lines; and the recompile-limit hits."""
    times = glog_seconds(lines)
    found: dict[tuple[int, int], dict] = {}
    limit_hits = []
    for i, line in enumerate(lines):
        if LIMIT_HIT.search(line):
            limit_hits.append(line.strip()[-300:])
        m = COMPILE_ID.search(line) if times[i] is not None else None
        if m:
            entry = found.setdefault((int(m[1]), int(m[2])), dict(first=i, lines=[]))
            entry["lines"].append((times[i], line))
    return found, limit_hits


def parse_compiles(log: Log) -> dict:
    """Every dynamo compilation in the log (one per compile id [frame/n]; n > 0 is a
    recompilation of frame `frame`): its phase, function, the guard that failed and its seconds."""
    lines = log.splitlines() if isinstance(log, str) else log
    phases = line_phases(lines)
    found, limit_hits = _compile_entries(lines)
    ordered = []
    for (frame, n), entry in sorted(found.items(), key=lambda kv: kv[1]["first"]):
        phase, name = phases[entry["first"]]
        seconds, finished = compile_seconds(entry["lines"])
        c = dict(id=f"{frame}/{n}", function=None, location=None, phase=phase, evaluation=name,
                 recompile=n > 0, reason=None, seconds=round(seconds, 3), finished=finished)
        for _, text in entry["lines"]:
            fn = START_TRACING.search(text) or RECOMPILING.search(text)
            if fn and c["function"] is None:
                c["function"], c["location"] = fn[1], Path(fn[2]).name
            guard = GUARD_FAILURE.search(text)
            if guard and c["reason"] is None:
                c["reason"] = guard[1].split("  #")[0].strip()[:200]
        ordered.append(c)
    return dict(total=len(ordered), recompilations=sum(c["recompile"] for c in ordered),
                seconds=round(sum(c["seconds"] for c in ordered), 3),
                by_phase=_count_phases(ordered), by_evaluation=_count_evaluations(ordered),
                functions=_count_functions(ordered), compilations=ordered, limit_hits=limit_hits)


def _count_phases(ordered: list[dict]) -> dict:
    counts = {p: dict(compilations=0, recompilations=0, seconds=0.0) for p in PHASES}
    for c in ordered:
        _add(counts[c["phase"]], c)
    return counts


def _count_evaluations(ordered: list[dict]) -> dict:
    by_eval: dict[str, dict] = {}
    for c in ordered:
        if c["phase"] == EVALUATION:
            empty = dict(compilations=0, recompilations=0, seconds=0.0)
            _add(by_eval.setdefault(c["evaluation"], empty), c)
    return by_eval


def _count_functions(ordered: list[dict]) -> list[dict]:
    frames: dict[str, dict] = {}
    for c in ordered:
        frame = c["id"].split("/")[0]
        f = frames.setdefault(frame, dict(function=c["function"], location=c["location"],
                                          entries=0, seconds=0.0))
        f["entries"] += 1
        f["seconds"] = round(f["seconds"] + c["seconds"], 3)
        f["function"] = f["function"] or c["function"]
        f["location"] = f["location"] or c["location"]
    return list(frames.values())


def _add(count: dict, c: dict) -> None:
    count["compilations"] += 1
    count["recompilations"] += c["recompile"]
    count["seconds"] = round(count["seconds"] + c["seconds"], 3)


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


STAGES = ("probes", "training", "eval_model", "eval_slot", "eval_ttt")
SCRIPT_STAGES = STAGES[1:]  # the stages that run train_gpt.py
# Each stage's deadline as a share of the total. What follows the last is for cutting a stage
# that overran and writing the summary; eval_model gates the evaluations, so it comes early.
DEADLINE_SHARE = dict(probes=0.75, training=0.95, eval_model=0.4, eval_slot=0.95, eval_ttt=0.95)
MAX_PAUSE_SHARE = 0.25  # the others wait at most this share of the total for training's steps
CUT_GRACE_S = 3.0  # after SIGTERM (train_gpt then logs where it was stopped), SIGKILL
WRITE_EVERY_S = 1.0
TORCH_LOGS = "recompiles,dynamo,torch._inductor.compile_fx"  # compile ids, guards, start/end
# train_gpt.py's defaults for the settings read here (names and defaults are stable).
DEFAULTS = dict(VOCAB_SIZE="1024", TRAIN_SEQ_LEN="2048", EVAL_SEQ_LEN="2048", EVAL_STRIDE="96",
                VAL_BATCH_SIZE="524288", SLOT_ENABLED="1", SLOT_MODE="scored", SLOT_STEPS="48",
                SLOT_BATCH_SEQS="32", SLOT_INTERLEAVE="8", TTT_ENABLED="0",
                TTT_CHUNK_TOKENS="32768", ITERATIONS="20000", LATE_QAT_THRESHOLD="0.15")
TOLERANCE_BPB = 0.05  # an evaluation vs its round trip, on the demo corpus
EAGER_TOLERANCE_BPB = 0.01  # a compiled round trip vs the eager one of the same artifact
H100_MEMORY_BOUND = 4.8 / 3.35  # H200 / H100 memory bandwidth: the most an H100 can be slower
DRY_RUN_VAL_TOKENS = 16384  # SLOT's cost grows with every scored token: a CPU needs fewer
# The dry run's model: the record's architecture, 2 layers of 64.
DRY_MODEL = dict(PRESET="demo", DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
                 NUM_KV_HEADS="2", VE_LAYERS="0,1", XSA_LAST_N="2", BIGRAM_DIM="16", VE_DIM="16",
                 TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128")
ROUND_TRIP, SLIDING, S64 = EVAL_TAGS["roundtrip"], EVAL_TAGS["sliding"], EVAL_TAGS["sliding_s64"]
SLOT, SLOT_CONTEXT, TTT = EVAL_TAGS["slot"], EVAL_TAGS["slot_context"], EVAL_TAGS["legal_ttt"]
SLOT_EVALS = (SLOT, SLOT_CONTEXT)
REQUIRED_EVALS = dict(training=(POST_EMA, ROUND_TRIP, SLIDING),
                      eval_model=(POST_EMA, ROUND_TRIP, SLIDING),
                      eval_slot=(ROUND_TRIP, SLIDING, S64, *SLOT_EVALS),
                      eval_ttt=(ROUND_TRIP, SLIDING, S64, TTT))
# Where each evaluation must sit against the round trip of the same run.
BANDS = {POST_EMA: "near", SLIDING: "near", S64: "near", SLOT: "below",
         SLOT_CONTEXT: "not above", TTT: "not above"}
BAND_TEXT = dict(near=f"within {TOLERANCE_BPB}", below="below it",
                 **{"not above": f"at most {TOLERANCE_BPB} above it"})
PROBE_PARTS = ("device", "gptq", "sdpa", "kernel")


class CheckError(Exception):
    """A bad argument: printed as one line."""


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass
class StageSpec:
    name: str
    command: list[str]
    env: dict[str, str]  # train_gpt settings (or the probes' JSON), added to the environment
    cwd: Path
    deadline_s: float  # seconds after the check's start
    after: tuple[str, ...] = ()  # stages that must pass first


@dataclasses.dataclass
class Plan:
    mode: str  # gpu | dry-run
    budget_s: float
    stages: dict[str, StageSpec]
    skipped: dict[str, str]  # stage -> why it does not run
    work: Path
    sets: dict[str, dict[str, str]]  # --set, by stage


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """--set [STAGE:]VAR=VALUE: for one train_gpt stage, or (no STAGE) for all of them."""
    out: dict[str, dict[str, str]] = {s: {} for s in SCRIPT_STAGES}
    for item in items:
        head, eq, value = item.partition("=")
        target, colon, key = head.rpartition(":")
        if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) or (colon and target not in out):
            raise CheckError(f"--set {item!r} is not allowed; expected VAR=VALUE or "
                             f"STAGE:VAR=VALUE with STAGE one of {', '.join(SCRIPT_STAGES)}")
        for stage in [target] if colon else SCRIPT_STAGES:
            out[stage][key] = value
    return out


def parse_deadlines(items: list[str], budget: float) -> dict[str, float]:
    out = {s: round(DEADLINE_SHARE[s] * budget, 1) for s in STAGES}
    for item in items:
        stage, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if stage not in STAGES or not 0 < seconds <= budget:
            raise CheckError(f"--deadline {item!r} is not allowed; expected STAGE=SECONDS with "
                             f"STAGE one of {', '.join(STAGES)} and 0 < SECONDS <= the budget "
                             f"({budget:g})")
        out[stage] = seconds
    return out


def schedule_env(iterations: int, warmup: int, late_qat_threshold: float) -> dict[str, str]:
    """A short run whose late QAT switches on halfway: the warm-down spans iterations / (2 x
    threshold) steps, so the LR scale falls under the threshold just past the middle and the
    QAT graph (compiled in the warm-up) is used by the timed loop."""
    return dict(ITERATIONS=str(iterations), WARMUP_STEPS=str(warmup),
                WARMDOWN_ITERS=str(math.ceil(iterations / (2 * late_qat_threshold))),
                MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1")


def script_envs(dry: bool, steps: int, warmup: int, artifact: Path) -> dict[str, dict[str, str]]:
    """Each train_gpt stage's settings. Training stops after its export and round trip (one
    sliding pass, at stride 64): SLOT and TTT are the evaluation stages' work."""
    # The demo preset's stride is 64, which would leave out the s64 pass: the record's 96. Its
    # TTT chunks of 1,024 make 16 chunks here: 4 are enough.
    small = dict(DRY_MODEL, TRAIN_BATCH_TOKENS="1024", VAL_BATCH_SIZE="65536", SLOT_STEPS="2",
                 EVAL_STRIDE="96", TTT_CHUNK_TOKENS="4096") if dry else {}
    base = dict(small, DATA_PATH=str(DEMO_DATA), TOKENIZER_PATH=str(DEMO_TOKENIZER),
                COMPILE="1" if dry else "auto")
    no_evals = dict(SLOT_ENABLED="0", TTT_ENABLED="0", EVAL_STRIDE="64")
    threshold = float(DEFAULTS["LATE_QAT_THRESHOLD"])
    training = dict(base, RUN_ID="gpu_check_training", **schedule_env(steps, warmup, threshold),
                    **no_evals)
    # Eager (no compile: ready in seconds), the full learning rate, no EMA: weights that
    # already predict, so that the evaluations' numbers and bands mean something.
    eval_model = dict(base, RUN_ID="gpu_check_eval_model", ITERATIONS="8" if dry else "10",
                      WARMUP_STEPS="0", COMPILE="0", WARMDOWN_ITERS="0", EMA_DECAY="0",
                      MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
                      ARTIFACT=str(artifact), **no_evals)
    if not dry:
        eval_model["TRAIN_BATCH_TOKENS"] = "131072"  # 8 micro-steps of 8 rows
    evals = dict(base, EVAL_ONLY="1", ARTIFACT=str(artifact))
    return dict(training=training, eval_model=eval_model,
                eval_slot=dict(evals, RUN_ID="gpu_check_eval_slot", SLOT_ENABLED="1",
                               SLOT_MODE="both", TTT_ENABLED="0"),
                eval_ttt=dict(evals, RUN_ID="gpu_check_eval_ttt", SLOT_ENABLED="0",
                              TTT_ENABLED="1"))


def probe_settings(dry: bool) -> dict:
    """What the probes child runs: shapes (the record's per-GPU ones on the GPU) and its model."""
    if dry:
        return dict(device="cpu", dtype="float32", gptq_shape=[64, 192],
                    sdpa_shape=[2, 128, 8, 4, 64], trace_rows=8, trace_seq=128, eager=True,
                    model_env=dict(DRY_MODEL))
    return dict(device="cuda", dtype="bfloat16", gptq_shape=[512, 1536],
                sdpa_shape=[48, 2048, 8, 4, 64], trace_rows=48, trace_seq=2048, eager=False,
                model_env={})


def chosen_stages(only: str | None) -> set[str]:
    chosen = set(only.split(",")) if only else set(STAGES)
    if chosen - set(STAGES):
        raise CheckError(f"--only {only!r} is not allowed; expected stages among "
                         f"{', '.join(STAGES)}")
    if chosen & {"eval_slot", "eval_ttt"} and "eval_model" not in chosen:
        raise CheckError(f"--only {only!r}: eval_slot and eval_ttt evaluate eval_model's artifact; "
                         "add eval_model")
    return chosen


def build_plan(args, work: Path) -> Plan:
    dry = args.dry_run
    budget = args.budget if args.budget is not None else (170.0 if dry else 420.0)
    deadlines = parse_deadlines(args.deadline, budget)
    sets = parse_sets(args.set)
    chosen = chosen_stages(args.only)
    steps = args.steps if args.steps is not None else (8 if dry else 36)
    warmup = args.warmup if args.warmup is not None else (2 if dry else 4)
    envs = script_envs(dry, steps, warmup, work / "eval_model" / "final_model.int6.ptz")
    probes = [sys.executable, "-m", "tools._gpu_probes", "probes"]
    stages = {"probes": StageSpec("probes", probes, dict(GPU_CHECK_PROBES=json.dumps(
        probe_settings(dry))), ROOT, deadlines["probes"])}
    boot = [sys.executable, "-m", "tools._gpu_probes", "boot", str(ROOT / "train_gpt.py")]
    for name in SCRIPT_STAGES:
        after = ("eval_model",) if name in ("eval_slot", "eval_ttt") else ()
        stages[name] = StageSpec(name, boot, dict(envs[name], **sets[name]), work / name,
                                 deadlines[name], after)
    skipped = {name: "not asked for (--only)" for name in STAGES if name not in chosen}
    for name in skipped:
        del stages[name]
    return Plan(mode="dry-run" if dry else "gpu", budget_s=budget, stages=stages, skipped=skipped,
                work=work, sets=sets)


def settings_of(env: dict[str, str]) -> dict[str, str]:
    """A stage's effective train_gpt settings: the defaults, its preset's, then its own."""
    preset = {}
    if env.get("PRESET"):
        path = ROOT / "presets" / f"{env['PRESET']}.env"
        text = path.read_text(encoding="utf-8")
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        preset = dict(line.split("=", 1) for line in lines if "=" in line)
    return {**DEFAULTS, **preset, **env}


def trimmed_data(source: Path, dest: Path, val_tokens: int) -> str:
    """A copy of a shard folder whose validation split keeps its first val_tokens tokens."""
    dest.mkdir(parents=True)
    for shard in sorted(source.glob("fineweb_train_*.bin")):
        (dest / shard.name).symlink_to(shard.resolve())
    val = sorted(source.glob("fineweb_val_*.bin"))
    tokens = np.concatenate([read_shard(f) for f in val])[:val_tokens]
    write_atomic(dest / val[0].name, shard_bytes(tokens))
    return str(dest)


# ---------------------------------------------------------------- plan arithmetic (train_gpt's)

def n_windows(n_targets: int, seq_len: int, stride: int) -> int:
    """Sliding windows under EVAL_TAIL=once: one every `stride` targets while a whole window
    fits, and one more, last, for the targets left over."""
    if n_targets <= seq_len:
        return 1
    k = (n_targets - seq_len) // stride + 1
    return k + (n_targets - ((k - 1) * stride + seq_len) > 0)


def pass_batches(windows: int, batch_seqs: int, interleave: int, world: int) -> int:
    """Batches rank 0 runs in a windowed pass: the windows dealt round-robin into `interleave`
    lists, each cut into batches of batch_seqs, the batches dealt over the ranks."""
    total = sum(-(-len(range(v, windows, interleave)) // batch_seqs) for v in range(interleave))
    return -(-total // world)


def roundtrip_batches(n_targets: int, seq_len: int, val_batch_size: int, world: int) -> int:
    """Batches rank 0 runs in the non-overlapping pass (eval_standard)."""
    n_seqs = n_targets // seq_len
    batch = max(min(val_batch_size // 8 // seq_len, -(-n_seqs // world)), 1)
    return -(-(n_seqs // world) // batch)


def eval_seq_len(s: dict[str, str]) -> int:
    return int(s["EVAL_SEQ_LEN"]) if int(s["EVAL_SEQ_LEN"]) > 0 else int(s["TRAIN_SEQ_LEN"])


def eval_batches(name: str, n_targets: int, s: dict[str, str], world: int) -> int | None:
    """Batches (legal_ttt: chunks) rank 0 runs for one evaluation under settings s."""
    L, stride, seqs = eval_seq_len(s), int(s["EVAL_STRIDE"]), int(s["SLOT_BATCH_SEQS"])
    window_stride = stride if stride > 0 else 64
    slot_on = s["SLOT_ENABLED"] not in ("0", "false", "no", "off")
    interleave = int(s["SLOT_INTERLEAVE"])
    if name in (ROUND_TRIP, POST_EMA):
        seq_len = L if name == ROUND_TRIP else int(s["TRAIN_SEQ_LEN"])
        return roundtrip_batches(n_targets, seq_len, int(s["VAL_BATCH_SIZE"]), world)
    if name == SLIDING:  # the pass SLOT shares (at its stride) deals its windows as SLOT does
        shared = slot_on and window_stride == stride
        windows = n_windows(n_targets, L, stride)
        return pass_batches(windows, seqs, interleave if shared else 1, world)
    if name == S64:
        return pass_batches(n_windows(n_targets, L, 64), seqs, 1, world)
    if name in SLOT_EVALS:
        return pass_batches(n_windows(n_targets, L, window_stride), seqs, interleave, world)
    if name == TTT:
        return -(-n_targets // int(s["TTT_CHUNK_TOKENS"]))
    return None


def record_seconds(name: str, s: dict[str, str]) -> float | None:
    """The record's published eval time for this evaluation, where this run's settings are the
    record's (stride 96, 2048-token windows, SLOT's 48 steps)."""
    same = s["EVAL_STRIDE"] == "96" and eval_seq_len(s) == 2048
    if name in SLOT_EVALS:
        same = same and s["SLOT_STEPS"] == "48"
    return RECORD_EVAL_S.get(name) if same else None


# ---------------------------------------------------------------- checks on the numbers (pure)

def loss_failures(losses: list[tuple[int, float]], vocab: int, default_init: bool,
                  falling: bool) -> list[str]:
    """Every train loss finite; the first (step 1, before any update) within 0.3 of ln(vocab)
    at the default init; the mean of the last third at least 0.05 under the first."""
    if not losses:
        return ["no train_loss line in the log"]
    bad = [(s, v) for s, v in losses if not math.isfinite(v)]
    if bad:
        return [f"train_loss {bad[0][1]} at step {bad[0][0]} (the first non-finite; {len(bad)} of "
                f"{len(losses)} logged steps non-finite)"]
    out, ln_v = [], math.log(vocab)
    s0, first = losses[0]
    if default_init and s0 == 1 and abs(first - ln_v) > 0.3:
        out.append(f"first train_loss {first:.4f} is {first - ln_v:+.4f} from ln({vocab}) = "
                   f"{ln_v:.4f}; expected within 0.3 at the default init")
    tail = losses[-max(1, len(losses) // 3):]
    mean = sum(v for _, v in tail) / len(tail)
    if falling and len(losses) >= 3 and not mean <= first - 0.05:
        out.append(f"train_loss not falling: step {s0} {first:.4f}, mean of steps "
                   f"{tail[0][0]}..{tail[-1][0]} {mean:.4f}; expected at least 0.05 lower")
    return out


def val_failures(vals: list[tuple[int, float, float]]) -> list[str]:
    return [f"validation at step {s}: val_loss {a} val_bpb {b}: not finite" for s, a, b in vals
            if not (math.isfinite(a) and math.isfinite(b))]


def band_failure(name: str, x: float, rt: float) -> str | None:
    band = BANDS.get(name)
    if band is None or not math.isfinite(x):
        return None
    ok = {"near": abs(x - rt) <= TOLERANCE_BPB, "below": x < rt,
          "not above": x <= rt + TOLERANCE_BPB}[band]
    return None if ok else (f"{name} val_bpb {x:.4f} vs round trip {rt:.4f} ({x - rt:+.4f}); "
                            f"expected {BAND_TEXT[band]}")


def eval_failures(evals: list[dict], required: tuple[str, ...], finished: bool,
                  eager_rt: float | None) -> list[str]:
    """Every evaluation finite and in its band around the round trip; the required ones
    present (once the run finished); a compiled round trip equal to the eager one."""
    out = [f"{e['name']} val_loss {e['val_loss']} val_bpb {e['val_bpb']}: not finite" for e in evals
           if not (math.isfinite(e["val_bpb"]) and math.isfinite(e["val_loss"]))]
    names = [e["name"] for e in evals]
    if finished:
        out += [f"no {name} evaluation in the log" for name in required if name not in names]
    rt = next((e["val_bpb"] for e in evals if e["name"] == ROUND_TRIP), None)
    if rt is None or not math.isfinite(rt):
        return out
    out += [f for f in (band_failure(e["name"], e["val_bpb"], rt) for e in evals) if f]
    eager_off = eager_rt is not None and math.isfinite(eager_rt) and abs(rt - eager_rt)
    if eager_off and eager_off > EAGER_TOLERANCE_BPB:
        out.append(f"compiled round trip val_bpb {rt:.4f} vs {eager_rt:.4f} eager on the same "
                   f"artifact ({rt - eager_rt:+.4f}); expected within {EAGER_TOLERANCE_BPB}")
    return out


def compile_failures(parsed: dict, log: str) -> list[str]:
    """A compilation once the training timer runs, a recompilation in the in-loop validation,
    a recompile-limit hit."""
    failures = []
    for c in parsed["compilations"]:
        kind = "recompilation" if c["recompile"] else "compilation"
        what = f"{kind} {c['id']} of {c['function']}"
        why = f" ({c['reason']})" if c["reason"] else ""
        if c["phase"] == TRAINING:
            failures.append(f"{what} during the timed training steps{why}")
        elif c["phase"] == VALIDATION and c["recompile"]:
            failures.append(f"{what} after the warm-up, in the in-loop validation before ema:{why}")
    failures += [f"recompile limit hit: {line}" for line in dict.fromkeys(parsed["limit_hits"])]
    if not runlog.first("train_step", log):
        failures.append("the run never reached the timed training loop: compile counts incomplete")
    return failures


# ---------------------------------------------------------------- figures (pure)

def overlap_s(t0: float, t1: float, pauses: list[list]) -> float:
    """Seconds of [t0, t1] inside the pauses ([from, to or None while it lasts, note])."""
    return sum(max(0.0, min(t1, t1 if b is None else b) - max(t0, a)) for a, b, _ in pauses)


def eval_compile_seconds(compiles: list[dict], names: list[str]) -> dict[str, float]:
    """Compile seconds inside each evaluation. SLOT's graphs compile inside the sliding pass it
    shares: they go to the SLOT modes run, in equal shares; the others to the evaluation whose
    result line closes the lines they were logged among."""
    out = dict.fromkeys(names, 0.0)
    slot = [n for n in names if n in SLOT_EVALS]
    for c in compiles:
        if c["function"] == "slot_loss" and slot:
            for n in slot:
                out[n] += c["seconds"] / len(slot)
        elif c["phase"] == EVALUATION and c["evaluation"] in out:
            out[c["evaluation"]] += c["seconds"]
    return {k: round(v, 3) for k, v in out.items()}


def steady_state(e: dict, text: str, batches: int | None) -> tuple[float | None, str]:
    """Seconds per batch once compiled, timed from the second batch where the log allows: the
    eval_timing line (once train_gpt prints it); legal_ttt's chunk lines (chunks 2..n); two
    eval_progress lines; else the eval time less its pauses and compile seconds, per batch."""
    timing = eval_timing(text).get(e["name"])
    if timing and timing["batches"] > 1 and math.isfinite(timing["steady_batch_s"]):
        return timing["steady_batch_s"], "measured: eval_timing line, batches 2..n"
    if e["name"] == TTT:
        chunks = ttt_chunk_lines(text)
        if len(chunks) >= 2 and chunks[-1][0] > chunks[0][0]:
            (c0, _, e0), (c1, _, e1) = chunks[0], chunks[-1]
            return (e1 - e0) / (c1 - c0), f"measured: legal_ttt:chunk lines, chunks {c0 + 1}..{c1}"
    progress = progress_lines(text, e["name"])
    if len(progress) >= 2 and batches and progress[-1][0] > progress[0][0]:
        (f0, e0), (f1, e1) = progress[0], progress[-1]
        return (e1 - e0) / ((f1 - f0) * batches), "measured: eval_progress lines"
    if not batches:
        return None, "no batch count"
    net = e["seconds"] - e["paused_s"] - e["compile_s"]
    return max(net, 0.0) / batches, "derived: eval_time less pauses and compile seconds, per batch"


def projection(e: dict, s: dict[str, str]) -> dict:
    """The record's validation split on 8 GPUs at this run's settings: rank 0's batches there
    times the steady seconds per batch here (an 8xH100 rank runs the batch shape this one GPU
    runs). legal_ttt: each chunk's windows and steps split over 8 ranks, ideally an eighth of a
    chunk here (the gradient all-reduce not counted). An H100 has the H200's compute: the same
    speed where compute bounds the work, up to 4.8/3.35 slower where memory bandwidth does (the
    upper figure). Compilation is not included (compile_s gives it)."""
    L = max(eval_seq_len(s), int(s["TRAIN_SEQ_LEN"]))
    full = RECORD_VAL_TARGETS // L * L  # trimmed to whole sequences, as train_gpt does
    ttt = e["name"] == TTT
    batches = eval_batches(e["name"], full, s, 1 if ttt else 8)
    steady = e.get("steady_s_per_batch")
    out = dict(projected_batches=batches, projected_8xh100_s=None, projected_8xh100_upper_s=None,
               record_8xh100_s=record_seconds(e["name"], s))
    if steady is not None and batches is not None:
        seconds = steady * batches / (8 if ttt else 1)
        out.update(projected_8xh100_s=round(seconds, 1),
                   projected_8xh100_upper_s=round(seconds * H100_MEMORY_BOUND, 1))
    return out


def evaluation_figures(run: StageRun, compiles: dict, pauses: list[list]) -> list[dict]:
    """Every evaluation of a run with its timing figures and projection."""
    text, s = run.text, settings_of(run.spec.env)
    evals = runlog.eval_times(text)
    arrivals = [run.times[i] for i, line in enumerate(run.lines) if runlog.match("result", line)]
    n_targets = int(runlog.config(run.lines).get("val_tokens", 0))
    compile_s = eval_compile_seconds(compiles["compilations"], [e["name"] for e in evals])
    for e, arrived in zip(evals, arrivals):
        e["seconds"] = e["ms"] / 1000
        e["paused_s"] = round(overlap_s(arrived - e["seconds"], arrived, pauses), 3)
        e["compile_s"] = compile_s[e["name"]]
        e["batches"] = eval_batches(e["name"], n_targets, s, 1) if n_targets else None
        steady, e["steady_basis"] = steady_state(e, text, e["batches"])
        e["steady_s_per_batch"] = None if steady is None else round(steady, 5)
        e.update(projection(e, s))
    return evals


def training_figures(text: str) -> dict:
    """Step time after the first steps, before / with late QAT, tokens/s; the record's figure."""
    steps = runlog.step_times(text)
    out: dict = dict(steps_logged=len(steps), last_step=steps[-1][0] if steps else 0)
    if len(steps) < 2:
        return out
    skip = 2 if len(steps) <= 10 else 5  # the first steps include the allocator's growth
    ms, s0, s1 = runlog.mean_step_ms(steps, skip)
    config = runlog.config(text)
    tokens, world = int(config.get("train_batch_tokens", 0)), int(config.get("world_size", 1))
    accum = config.get("grad_accum_steps")
    out.update(ms_per_step=round(ms, 2), averaged_steps=[s0, s1], tokens_per_step=tokens,
               world_size=world, tokens_per_s_per_gpu=round(tokens / (ms / 1000) / world),
               grad_accum_steps=int(accum) if accum else None)
    qat = runlog.first("late_qat", text)
    if qat:  # late_qat:enabled step:S is logged before step S + 1, the first with QAT on
        on = int(qat["step"])
        before, after = [s for s in steps if s[0] <= on], [s for s in steps if s[0] >= on]
        out["late_qat_from_step"] = on + 1
        out["ms_per_step_before_qat"] = _span_ms(before[min(skip, len(before) - 2):])
        out["ms_per_step_with_qat"] = _span_ms(after)
    one_gpu = 8 * ORIGINAL_MS_PER_STEP  # one GPU runs the record's 8 ranks' micro-steps
    out["record"] = dict(ms_per_step_8xh100=ORIGINAL_MS_PER_STEP,
                         single_gpu_equivalent_ms=one_gpu, ratio=round(ms / one_gpu, 3),
                         peak_allocated_mib=ORIGINAL_PEAK_MIB)
    return out


def _span_ms(steps: list[tuple[int, float]]) -> float | None:
    if len(steps) < 2:
        return None
    (s0, t0), (s1, t1) = steps[0], steps[-1]
    return round((t1 - t0) / (s1 - s0), 2)


def memory_figures(text: str) -> dict:
    peaks = memory_peaks(text) or {}
    line = runlog.first("peak", text)  # train_gpt's own, after training
    if line:
        peaks.update(logged_allocated_mib=int(line["allocated"]),
                     logged_reserved_mib=int(line["reserved"]))
    return peaks


# ---------------------------------------------------------------- analysis of one stage

@dataclasses.dataclass
class StageRun:
    spec: StageSpec
    log_path: Path
    status: str = "pending"  # pending | running | ok | failed | cut | skipped
    proc: subprocess.Popen | None = None
    started_s: float | None = None
    ended_s: float | None = None
    returncode: int | None = None
    cut: str | None = None  # why it was stopped
    term_sent_s: float | None = None
    exited_s: float | None = None
    paused: bool = False
    error: str | None = None
    times: list = dataclasses.field(default_factory=list)
    lines: list = dataclasses.field(default_factory=list)
    parts: dict = dataclasses.field(default_factory=dict)
    reader: threading.Thread | None = None
    result: dict = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def analyse(run: StageRun, ctx: dict, ended: bool) -> dict:
    """The figures and failures of a stage from what it printed so far (at any moment: a stage
    still running or cut shows what it measured); `ended`: its process is gone."""
    if run.spec.name == "probes":
        return analyse_probes(run, ctx, ended)
    return analyse_script(run, ctx, ended)


def analyse_probes(run: StageRun, ctx: dict, ended: bool) -> dict:
    """The probes' parts as they came; a part that ran while the stage was paused for training's
    timed steps says for how long (its timings include that time)."""
    parts = {}
    for name, part in run.parts.items():
        start = part["arrived_s"] - part.get("seconds", 0.0)
        paused = overlap_s(start, part["arrived_s"], ctx["pauses"])
        parts[name] = dict(part, paused_s=round(paused, 2))
    failures = [f"{name}: {f}" for name, part in parts.items() for f in part.get("failures", [])]
    if ended:
        failures += [f"{name}: not reached" for name in PROBE_PARTS if name not in parts]
    return dict(parts=parts, failures=failures)


def analyse_script(run: StageRun, ctx: dict, ended: bool) -> dict:
    name, text, s = run.spec.name, run.text, settings_of(run.spec.env)
    compiles = parse_compiles(run.lines)
    settings = {k: v for k, v in run.spec.env.items() if "PATH" not in k and k != "ARTIFACT"}
    out = dict(settings=settings, compile=compiles, memory=memory_figures(text),
               evaluations=evaluation_figures(run, compiles, ctx["pauses"]))
    finished = ended and run.returncode == 0 and not run.cut
    failures = val_failures(val_losses(text))
    if name in ("training", "eval_model"):
        losses, vocab = train_losses(text), int(s["VOCAB_SIZE"])
        out["loss"] = dict(first=losses[0] if losses else None, last=losses[-1] if losses else None,
                           ln_vocab=round(math.log(vocab), 4), logged=len(losses))
        default_init = not any("INIT" in k for k in ctx["sets"][name])
        failures += loss_failures(losses, vocab, default_init, falling=name == "training")
    if name == "training":
        out["speed"] = training_figures(text)
        if runlog.first("train_step", text) or ended:
            failures += compile_failures(compiles, text)
        planned = int(s["ITERATIONS"])
        if finished and out["speed"]["last_step"] < planned:
            failures.append(f"{out['speed']['last_step']} of {planned} steps logged")
        if finished and ctx["mode"] == "gpu" and "logged_allocated_mib" not in out["memory"]:
            failures.append("no peak memory line in the log")
    if name == "eval_model" and finished and not Path(run.spec.env["ARTIFACT"]).is_file():
        failures.append("no artifact written")
    eager = ctx["eager_roundtrip"] if name in ("eval_slot", "eval_ttt") else None
    out["failures"] = failures + eval_failures(out["evaluations"], REQUIRED_EVALS[name], finished,
                                               eager)
    return out


def run_problem(run: StageRun) -> str | None:
    """Why an ended run is not a complete one: its exit status and its last own lines."""
    if run.error:
        return f"could not start: {run.error}"
    if run.returncode not in (0, None) and not run.cut:
        own = [line for line in run.lines if not GLOG_LINE.match(line)][-6:]
        return f"exited {run.returncode}: " + " | ".join(t.strip() for t in own)[-600:]
    return None


# ---------------------------------------------------------------- running the stages

class Check:
    """Starts the stages, enforces their deadlines, pauses the others during training's timed
    steps, and rewrites the summary as results come in. Everything that spawns, signals or
    writes runs on the main thread; the reader threads only collect lines (under the lock)."""

    def __init__(self, plan: Plan, paths: dict[str, Path], echo: bool):
        self.plan, self.paths, self.echo = plan, paths, echo
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.runs = {n: StageRun(spec, paths[n]) for n, spec in plan.stages.items()}
        self.pauses: list[list] = []  # [from, to (None while it lasts), note]
        self.timed = "before"  # training: before | inside | after its timed steps
        self.scanned = 0  # training's lines read for that
        self.stopping: str | None = None
        self.last_write = -1e9
        self.started = now_iso()
        self.host = host_info()

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> dict:
        self.write(force=True)
        while any(r.status in ("pending", "running") for r in self.runs.values()):
            now = self.clock()
            if self.stopping:
                self.stop_all(now)
            self.update_pause(now)
            for run in self.runs.values():
                if run.status == "pending":
                    self.maybe_start(run, now)
                elif run.status == "running":
                    self.poll(run, now)
            self.write()
            time.sleep(0.1)
        self.resume(self.clock())
        return self.write(force=True, final=True)

    def maybe_start(self, run: StageRun, now: float) -> None:
        before = [self.runs.get(n) for n in run.spec.after]
        bad = ("failed", "cut", "skipped")
        blocked = [n for n, r in zip(run.spec.after, before) if r is None or r.status in bad]
        if blocked:
            self.finish(run, now, "skipped", f"needs {', '.join(blocked)}, which did not pass")
        elif now >= run.spec.deadline_s:
            self.finish(run, now, "skipped",
                        f"its deadline ({run.spec.deadline_s:.0f} s) passed before it could start")
        elif all(r.status == "ok" for r in before) and not self.paused_now():
            self.spawn(run, now)

    def spawn(self, run: StageRun, now: float) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(run.spec.env, TORCH_LOGS=TORCH_LOGS, PYTHONUNBUFFERED="1", PYTHONPATH=path,
                   GPU_CHECK_PARENT=str(os.getpid()))
        if self.plan.mode == "dry-run":
            env["GPU_CHECK_EAGER"] = "1"
        run.spec.cwd.mkdir(parents=True, exist_ok=True)
        run.started_s, run.status = now, "running"
        run.log_path.write_text("")
        try:  # a session of its own: signals reach its whole process group, never ours
            run.proc = subprocess.Popen(run.spec.command, cwd=run.spec.cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        errors="replace", start_new_session=True)
        except OSError as e:
            run.error = f"{type(e).__name__}: {e}"
            self.finish(run, now, "failed")
            return
        run.reader = threading.Thread(target=self.collect, args=(run,), daemon=True)
        run.reader.start()
        self.say(f"[{run.spec.name}] started (deadline {run.spec.deadline_s:.0f} s)")

    def collect(self, run: StageRun) -> None:
        with open(run.log_path, "a", encoding="utf-8") as log:
            for line in run.proc.stdout:
                t, line = self.clock(), line.rstrip("\n")
                log.write(capture_line(t, line))
                log.flush()  # a kill at any moment leaves the log up to here
                with self.lock:
                    run.times.append(t)
                    run.lines.append(line)
                    if line.startswith(PART_PREFIX):
                        self.add_part(run, line, t)
                own = not GLOG_LINE.match(line) and not line.startswith("gpu_check:")
                if self.echo and own:
                    print(f"  {run.spec.name} | {line}", flush=True)

    def add_part(self, run: StageRun, line: str, t: float) -> None:
        try:
            part = json.loads(line[len(PART_PREFIX):])
            run.parts[part.pop("name")] = dict(part, arrived_s=round(t, 2))
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            run.parts["unreadable"] = dict(failures=[f"a part line gpu_check could not read: {e}"],
                                           arrived_s=round(t, 2))

    def poll(self, run: StageRun, now: float) -> None:
        rc = run.proc.poll()
        if rc is not None:
            # Its last lines may still be in the pipe: wait for the reader, briefly (a compile
            # worker left behind can hold the pipe open; its process group is killed below).
            run.exited_s = now if run.exited_s is None else run.exited_s
            if run.reader.is_alive() and now - run.exited_s < 2.0:
                return
            self.signal(run, signal.SIGKILL)  # whatever the stage left in its process group
            run.returncode = rc
            self.finish(run, now, "cut" if run.cut else None)
        elif now >= run.spec.deadline_s and run.term_sent_s is None:
            run.cut = (f"stopped at its deadline ({run.spec.deadline_s:.0f} s after the start), "
                       f"{now - run.started_s:.0f} s in")
            self.terminate(run, now)
        elif run.term_sent_s is not None and now - run.term_sent_s > CUT_GRACE_S:
            self.signal(run, signal.SIGKILL)

    def terminate(self, run: StageRun, now: float) -> None:
        self.signal(run, signal.SIGCONT)  # a paused stage must run to act on its SIGTERM
        self.signal(run, signal.SIGTERM)  # train_gpt logs where it was, then exits
        run.term_sent_s = now

    def signal(self, run: StageRun, sig: int) -> None:
        try:
            os.killpg(run.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, run: StageRun, now: float, status: str | None, why: str | None = None) -> None:
        """A stage's end: its final analysis decides ok / failed unless it was cut or skipped."""
        run.ended_s = now
        result = self.analysis(run, ended=True)
        problem = run_problem(run)
        first = [x for x in (why, run.cut, problem) if x]
        result["failures"] = first + result.get("failures", [])
        run.result = result
        run.status = status or ("failed" if result["failures"] else "ok")
        tail = f": {result['failures'][0]}" if result["failures"] else ""
        self.say(f"[{run.spec.name}] {run.status} at {now:.0f} s{tail}")
        self.write(force=True)

    def analysis(self, run: StageRun, ended: bool) -> dict:
        ctx = dict(pauses=[list(p) for p in self.pauses], mode=self.plan.mode, sets=self.plan.sets,
                   eager_roundtrip=self.eager_roundtrip())
        with self.lock:
            snapshot = dataclasses.replace(run, times=list(run.times), lines=list(run.lines),
                                           parts=dict(run.parts))
        try:
            return analyse(snapshot, ctx, ended)
        except Exception as e:  # a log cut mid-line must not cost the summary
            return dict(failures=[f"gpu_check could not read this stage's log: "
                                  f"{type(e).__name__}: {e}"])

    def eager_roundtrip(self) -> float | None:
        run = self.runs.get("eval_model")
        evals = run.result.get("evaluations", []) if run else []
        return next((e["val_bpb"] for e in evals if e["name"] == ROUND_TRIP), None)

    # -- pausing the others while training times its steps

    def training_timed(self) -> bool:
        """Training is inside its timed loop: after its last warm-up line (its first step
        without warm-up), until `ema:` or its end."""
        run = self.runs.get("training")
        if run is None or run.status != "running" or self.timed == "after":
            return False
        warmup = int(run.spec.env["WARMUP_STEPS"]) > 0
        with self.lock:
            new, self.scanned = run.lines[self.scanned:], len(run.lines)
        for line in new:
            warm = runlog.match("warmup", line)
            if self.timed == "before" and (warm and warm["step"] == warm["steps"] if warmup
                                           else runlog.match("train_step", line)):
                self.timed = "inside"
            elif self.timed == "inside" and runlog.match("ema", line):
                self.timed = "after"
        return self.timed == "inside"

    def paused_now(self) -> bool:
        return bool(self.pauses) and self.pauses[-1][1] is None

    def update_pause(self, now: float) -> None:
        timed = self.training_timed()
        if self.paused_now():
            over = now - self.pauses[-1][0] > MAX_PAUSE_SHARE * self.plan.budget_s
            if over or not timed or self.stopping:
                self.pauses[-1][2] = "its longest allowed, then resumed" if over else "ok"
                self.resume(now)
        elif timed and not self.pauses and not self.stopping:  # once: a pause cut short stays so
            self.pauses.append([now, None, "ok"])
            for run in self.runs.values():
                if run.spec.name != "training" and run.status == "running":
                    self.signal(run, signal.SIGSTOP)
                    run.paused = True
            self.say("pausing the other stages for training's timed steps")

    def resume(self, now: float) -> None:
        if self.paused_now():
            self.pauses[-1][1] = now
            self.say(f"resuming the other stages after {now - self.pauses[-1][0]:.1f} s")
        for run in self.runs.values():
            if run.paused:
                self.signal(run, signal.SIGCONT)
                run.paused = False

    def stop_all(self, now: float) -> None:
        for run in self.runs.values():
            if run.status == "pending":
                self.finish(run, now, "skipped", f"gpu_check was stopped ({self.stopping})")
            elif run.status == "running" and run.term_sent_s is None:
                run.cut = f"gpu_check was stopped ({self.stopping}), {now - run.started_s:.0f} s in"
                self.terminate(run, now)

    # -- the summary

    def write(self, force: bool = False, final: bool = False) -> dict | None:
        now = self.clock()
        if not force and now - self.last_write < WRITE_EVERY_S:  # the running stages' figures too
            return None
        summary = self.summary(now, final)
        data = json.dumps(summary, indent=1, default=str) + "\n"
        write_atomic(self.paths["summary"], data.encode())
        write_atomic(self.paths["text"], render_text(summary).encode())
        self.last_write = now
        return summary

    def stage_summary(self, name: str) -> dict:
        run = self.runs.get(name)
        if run is None:
            return dict(status="skipped", why=self.plan.skipped.get(name), failures=[])
        if run.status == "running":
            result = self.analysis(run, ended=False)
        else:
            result = run.result
        out = dict(status=run.status, deadline_s=run.spec.deadline_s, started_s=_r(run.started_s),
                   ended_s=_r(run.ended_s), pid=run.proc.pid if run.proc else None,
                   exit=run.returncode, log=run.log_path.name, **result)
        out.setdefault("failures", [])
        return out

    def summary(self, now: float, final: bool) -> dict:
        stages = {name: self.stage_summary(name) for name in STAGES}
        failed = [n for n, s in stages.items() if n in self.runs and s["status"] != "ok"]
        state = "finished" if final else ("stopping" if self.stopping else "running")
        pauses = [dict(from_s=_r(a), to_s=_r(b), note=c) for a, b, c in self.pauses]
        return dict(tool="tools.gpu_check", mode=self.plan.mode, started=self.started,
                    budget_s=self.plan.budget_s, state=state, elapsed_s=_r(now),
                    ok=(not failed) if final else None, failed_stages=failed if final else [],
                    host=self.host, pauses=pauses, figures=digest(stages, self.host), stages=stages)

    def say(self, msg: str) -> None:
        print(f"gpu_check {self.clock():6.1f} s  {msg}", flush=True)


def _r(x: float | None) -> float | None:
    """Every time in a summary at one rounding, so no stage reads as ending after the summary."""
    return None if x is None else round(x, 2)


def host_info() -> dict:
    """What the parent can tell without touching the GPU: versions, the driver, the CPUs."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=_package_version("triton"), numpy=np.__version__,
               sentencepiece=_package_version("sentencepiece"), cpu_count=os.cpu_count(),
               cpu_usable=usable, platform=platform.platform(), driver=None, gpus=None)
    if not shutil.which("nvidia-smi"):
        return out
    query = ["nvidia-smi", "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"]
    try:
        res = subprocess.run(query, capture_output=True, text=True, timeout=20)
        rows = [[c.strip() for c in line.split(",")] for line in res.stdout.strip().splitlines()]
        out["driver"] = rows[0][0] if rows else None
        out["gpus"] = [dict(name=r[1], memory=r[2]) for r in rows if len(r) >= 3]
    except (OSError, subprocess.SubprocessError) as e:
        out["driver"] = f"nvidia-smi failed: {e}"[:200]
    return out


def _package_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def digest(stages: dict, host: dict) -> dict:
    """The figures issue 21 asks for, gathered from the stages (None where not measured yet)."""
    parts = stages["probes"].get("parts", {})
    kernel, gptq = parts.get("kernel", {}), parts.get("gptq", {})
    keys = ("shape", "device", "hessian_ms", "solve_ms", "cpu_solve_ms", "codes_equal",
            "error_ratio")
    out = dict(driver=host.get("driver"), cpu_count=host.get("cpu_count"),
               attention_kernel=kernel.get("attention_kernel"),
               gptq={k: gptq.get(k) for k in keys} if "solve_ms" in gptq else None,
               ms_per_step=stages["training"].get("speed", {}).get("ms_per_step"),
               compile_s={}, peak_mib={}, steady_s_per_batch={}, projected_8xh100_s={})
    if kernel.get("peak_allocated_mib") is not None:
        out["peak_mib"]["kernel_trace"] = kernel["peak_allocated_mib"]
    for name in SCRIPT_STAGES:
        st = stages[name]
        if "compile" in st:
            graphs = [dict(id=c["id"], function=c["function"], where=c["evaluation"] or c["phase"],
                           seconds=c["seconds"]) for c in st["compile"]["compilations"]]
            out["compile_s"][name] = dict(total=st["compile"]["seconds"], graphs=graphs)
        mem = st.get("memory") or {}
        peak = next((mem[k] for k in ("cuda_allocated_peak_mib", "logged_allocated_mib",
                                      "rss_peak_mib") if mem.get(k) is not None), None)
        if peak is not None:
            out["peak_mib"][name] = peak
        for e in st.get("evaluations", []) if name in ("eval_slot", "eval_ttt") else []:
            out["steady_s_per_batch"][f"{name}/{e['name']}"] = e.get("steady_s_per_batch")
            out["projected_8xh100_s"][f"{name}/{e['name']}"] = e.get("projected_8xh100_s")
    return out


# ---------------------------------------------------------------- the text report

def render_text(summary: dict) -> str:
    failed, h = summary["failed_stages"], summary["host"]
    state = f"{summary['state']} (incomplete)"
    if summary["state"] == "finished":
        state = "every stage passed" if not failed else "FAILED: " + ", ".join(failed)
    out = [f"gpu_check ({summary['mode']}) {summary['started']}: {summary['elapsed_s']:.0f} s of "
           f"{summary['budget_s']:.0f}: {state}",
           f"host: python {h['python']}, torch {h['torch']}, CUDA {h['cuda']}, triton "
           f"{h['triton']}; driver {h['driver']}; {h['cpu_count']} CPUs ({h['cpu_usable']} usable)"]
    for p in summary["pauses"]:
        out.append(f"paused the other stages {p['from_s']:.0f}-{_fmt(p['to_s'], '.0f', '…')} s for "
                   f"training's timed steps" + ("" if p["note"] == "ok" else f" ({p['note']})"))
    for name, stage in summary["stages"].items():
        out += ["", *stage_text(name, stage)]
    return "\n".join(out) + "\n"


def stage_text(name: str, s: dict) -> list[str]:
    when = ""
    if s.get("started_s") is not None:
        when = (f" {s['started_s']:.0f}-{_fmt(s.get('ended_s'), '.0f', '…')} s "
                f"(deadline {s['deadline_s']:.0f})")
    out = [f"[{name}] {s['status']}{when}" + (f" ({s['why']})" if s.get("why") else "")]
    out += [f"  failure: {f}" for f in s["failures"]]
    try:  # a stage cut early holds only part of its figures: show what renders
        out += _text_probes(s) if name == "probes" else _text_script(name, s)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        pass
    return out


def _fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _paused(part: dict) -> str:
    if not part.get("paused_s"):
        return ""
    return f" [paused {part['paused_s']:.0f} s inside: timings include it]"


def _text_probes(s: dict) -> list[str]:
    p, out = s.get("parts", {}), []
    if "device" in p and "torch" in p["device"]:
        d, gpu = p["device"], p["device"].get("gpu")
        where = (f"{gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}, "
                 f"{gpu['multiprocessors']} SMs" if gpu else "no GPU")
        fa3 = "importable" if d.get("fa3", {}).get("importable") else "not importable"
        out.append(f"  device: {where}; cuDNN {d.get('cudnn')}; FlashAttention 3 {fa3}")
    if "solve_ms" in p.get("gptq", {}):
        g = p["gptq"]
        out.append(f"  gptq: {g['shape'][0]}x{g['shape'][1]} on {g['device']}: Hessian "
                   f"{g['hessian_ms']:.1f} ms, solve {g['solve_ms']:.0f} ms (CPU "
                   f"{g['cpu_solve_ms']:.0f} ms); vs the CPU: output error "
                   f"x{g['error_ratio']:.4f}, codes equal {g['codes_equal']:.2%}, Hessian "
                   f"{g['hessian_max_rel_diff']:.1e}"
                   f"{_paused(g)}")
    if "default" in p.get("sdpa", {}):
        d, b = p["sdpa"]["default"], p["sdpa"]["backends"]
        each = ", ".join(f"{n.split('_')[0]} " + (f"{v['ms']:.2f} ms" if v["status"] == "ok"
                                                   else v["status"]) for n, v in b.items())
        out.append(f"  sdpa (eager): default {d['backend']} {d['ms']:.2f} ms fwd+bwd; {each}"
                   f"{_paused(p['sdpa'])}")
    if "attention_kernel" in p.get("kernel", {}):
        k = p["kernel"]
        names = (k["attention_kernels"] or k["attention_ops"] or ["-"])[0][:80]
        out.append(f"  kernel (compiled training micro-step, {k['rows']}x{k['seq_len']}): "
                   f"attention {k['attention_kernel']} ({names}); first call "
                   f"{k['first_call_s']:.1f} s, {k['ms_per_micro_step']:.1f} ms, peak "
                   f"{_fmt(k['peak_allocated_mib'], ',')} MiB"
                   f"{_paused(k)}")
    return out


def _text_script(name: str, s: dict) -> list[str]:
    out = []
    lo = s.get("loss") or {}
    if lo.get("first"):
        out.append(f"  loss: step {lo['first'][0]} {lo['first'][1]:.4f} (ln vocab "
                   f"{lo['ln_vocab']:.4f}), step {lo['last'][0]} {lo['last'][1]:.4f}; "
                   f"{lo['logged']} steps logged")
    sp = s.get("speed", {})
    if sp.get("ms_per_step"):
        r = sp["record"]
        out.append(f"  speed: {sp['ms_per_step']:.1f} ms/step (steps {sp['averaged_steps'][0]}.."
                   f"{sp['averaged_steps'][1]}; late QAT from step {sp.get('late_qat_from_step')}: "
                   f"{_fmt(sp.get('ms_per_step_before_qat'))} before, "
                   f"{_fmt(sp.get('ms_per_step_with_qat'))} with), {sp['tokens_per_s_per_gpu']:,} "
                   f"tokens/s; the record's 8 micro-steps: {r['single_gpu_equivalent_ms']:.0f} ms "
                   f"(ratio {r['ratio']:.2f})")
    m = s.get("memory") or {}
    if m:
        out.append(f"  memory: CUDA peak {_fmt(m.get('cuda_allocated_peak_mib'), ',')} MiB "
                   f"allocated, {_fmt(m.get('cuda_reserved_peak_mib'), ',')} reserved (record "
                   f"{ORIGINAL_PEAK_MIB:,} per GPU); host RSS "
                   f"{_fmt(m.get('rss_peak_mib'), ',')} MiB")
    c = s.get("compile")
    if c:
        graphs = ", ".join(f"{x['id']} {x['function']} [{x['evaluation'] or x['phase']}] "
                           f"{x['seconds']:.1f} s" for x in c["compilations"])
        out.append(f"  compile: {c['total']} graphs ({c['recompilations']} recompilations), "
                   f"{c['seconds']:.1f} s" + (f": {graphs}" if graphs else ""))
    for e in s.get("evaluations", []):
        out.append(_text_eval(e, full=name in ("eval_slot", "eval_ttt")))
    return out


def _text_eval(e: dict, full: bool) -> str:
    line = (f"  {e['name']:<30} bpb {e['val_bpb']:.4f} {e['seconds']:7.1f} s, compile "
            f"{e['compile_s']:.1f} s")
    if not full:
        return line
    unit = "chunks" if e["name"] == TTT else "batches"
    record = f" (record {e['record_8xh100_s']} s)" if e.get("record_8xh100_s") else ""
    return (line + f", {_fmt(e['batches'], 'd')} {unit}, steady "
            f"{_fmt(e['steady_s_per_batch'], '.4f')} s each [{e['steady_basis'].split(':')[0]}]; "
            f"8xH100 whole split "
            f"{_fmt(e['projected_8xh100_s'], '.0f')}-{_fmt(e['projected_8xh100_upper_s'], '.0f')} s"
            + record)


# ---------------------------------------------------------------- the command

def output_paths(out: str | None) -> dict[str, Path]:
    if out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
        path = folder / "gpu_check.json"
    else:
        path = Path(out)
    if path.suffix != ".json":
        raise CheckError(f"--out {str(path)!r} is not allowed; expected a .json path (the text "
                         "copy goes beside it)")
    if not path.parent.is_dir():
        raise CheckError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not exist")
    logs = {name: path.with_name(f"{path.stem}_{name}.log") for name in STAGES}
    return dict(summary=path, text=path.with_suffix(".txt"), **logs)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="summary JSON path (default: gpu_check.json in $OUT or here)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: the same stages, tiny model")
    p.add_argument("--budget", type=float,
                   help="seconds for the whole check (default 420; dry run 170)")
    p.add_argument("--steps", type=int, help="training steps (default 36; dry run 8)")
    p.add_argument("--warmup", type=int, help="training's compile warm-up steps (default 4; dry 2)")
    p.add_argument("--set", action="append", default=[], metavar="[STAGE:]VAR=VALUE",
                   help="a train_gpt setting for every script stage, or for one")
    p.add_argument("--deadline", action="append", default=[], metavar="STAGE=SECONDS",
                   help="one stage's deadline, in seconds after the start")
    p.add_argument("--only", metavar="STAGE,...", help="run these stages only")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the stages' output")
    args = p.parse_args(argv)
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise CheckError(f"--budget={args.budget} is not allowed; expected seconds > 0")
    if args.steps is not None and args.steps < 3:
        raise CheckError(f"--steps={args.steps} is not allowed; expected at least 3 steps "
                         "(the loss must be seen falling)")
    if args.warmup is not None and args.warmup < 0:
        raise CheckError(f"--warmup={args.warmup} is not allowed; expected a count >= 0")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        paths = output_paths(args.out)
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            print("error: no CUDA device; this check needs a GPU (on a CPU: `python -m "
                  "tools.gpu_check --dry-run`, or `python -m tools.bench_train`)", file=sys.stderr)
            return 1
        work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        try:
            plan = build_plan(args, work)
        except CheckError:
            shutil.rmtree(work, ignore_errors=True)
            raise
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return run_plan(plan, paths, echo=not args.quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_plan(plan: Plan, paths: dict[str, Path], echo: bool) -> int:
    ensure_demo_data(DEMO_DATA)
    if plan.mode == "dry-run":  # the dry run's shorter validation split, for every script stage
        data = trimmed_data(DEMO_DATA, plan.work / "data", DRY_RUN_VAL_TOKENS)
        for spec in plan.stages.values():
            if spec.env.get("DATA_PATH") == str(DEMO_DATA):
                spec.env["DATA_PATH"] = data
    check = Check(plan, paths, echo)

    def stop(signum, frame):  # SIGTERM or Ctrl-C: cut the stages, keep what they measured
        check.stopping = signal.Signals(signum).name

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = check.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("\n" + render_text(summary), end="")
    print(f"summary: {paths['summary']} (text: {paths['text'].name}; "
          f"logs: {paths['summary'].stem}_<stage>.log)")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
