"""Readers of train_gpt.py's console output, shared by the tools that run the script
(bench_train, gpu_check), and the record's reference figures they compare with. Pure text:
no torch, no train_gpt import.

A log holds three kinds of lines: the script's own (`step:`, `... val_bpb:... eval_time:`,
`legal_ttt:chunk`, ...; README "Evaluation log lines"), the glog-style lines torch prints under
TORCH_LOGS (dynamo's compilations, each tagged with its compile id `[frame/n]` and a wall-clock
time), and, in a log captured by gpu_check, an arrival-time prefix on every line.
"""

from __future__ import annotations

import datetime
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = ROOT / "data" / "tokenizers" / "demo_1024_bpe.model"

# The record on 8xH100 (published): 786,432 tokens per step, one micro-step of 48 rows per GPU.
ORIGINAL_MS_PER_STEP = 91.25
ORIGINAL_PEAK_MIB = 22524
RECORD_VAL_TARGETS = 62_021_632  # targets in the record's validation split
RECORD_EVAL_S = {"final_int6_sliding_window": 54.5, "final_slot": 408.7}  # eval_time on 8xH100

STEP_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", re.M)
TRAIN_LOSS = re.compile(r"^step:(\d+)/(\d+) train_loss:(\S+) ", re.M)
VAL_LINE = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+) ", re.M)
EVAL_LINE = re.compile(r"^(?P<name>\S.*?) val_loss:(?P<loss>\S+) val_bpb:(?P<bpb>\S+)"
                       r"(?P<extra>.*?) eval_time:(?P<ms>\d+)ms(?P<suffix>.*)$", re.M)
PEAK_LINE = re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB", re.M)
TTT_CHUNK = re.compile(r"^legal_ttt:chunk (\d+)/(\d+) bpb:\S+ elapsed:([\d.]+)s", re.M)
PROGRESS = re.compile(r"^eval_progress:(\S+) ([\d.]+)% elapsed:(\d+)s", re.M)
# train_gpt.py prints one after each window evaluation's result (sliding, SLOT): the batches
# this rank ran, its first batch's seconds and the mean seconds of the batches after it.
EVAL_TIMING = re.compile(r"^eval_timing:(.+?) batches:(\d+) first_batch:([\d.]+)s "
                         r"steady_batch:(\S+?)s$", re.M)
# gpu_check's child processes report themselves in lines of this form.
MEMORY_LINE = re.compile(r"^gpu_check:memory rss_peak_mib:(\d+) cuda_allocated_peak_mib:(-?\d+) "
                         r"cuda_reserved_peak_mib:(-?\d+)", re.M)

GLOG_LINE = re.compile(r"^(?:\[rank\d+\]:)?[IWEVDC]\d{4} (\d\d):(\d\d):(\d\d\.\d+) +\d+ \S+:\d+\] ")
COMPILE_ID = re.compile(r"\] \[(\d+)/(\d+)(?:_\d+)?\] ")
START_TRACING = re.compile(r"torchdynamo start tracing (\S+) (\S+)")
RECOMPILING = re.compile(r"Recompiling function (\S+) in (\S+)")
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- \d+/\d+: (.*)")
LIMIT_HIT = re.compile(r"hit config\.(?:recompile|cache_size)_limit|FailOnRecompileLimitHit")
FORWARD_DONE = "Step 2: done compiler function"
BACKWARD_START = "Step 3: torchinductor compiling BACKWARDS graph"
BACKWARD_DONE = "Step 3: torchinductor done compiling BACKWARDS graph"
WARMUP_LINE = re.compile(r"^warmup_step:(\d+)/(\d+)", re.M)
CONFIG_END = re.compile(r"^seed:\d+", re.M)
TRAIN_STEP = re.compile(r"^step:\d+/\d+ train_loss:", re.M)
VAL_STEP = re.compile(r"^step:\d+/\d+ val_loss:", re.M)
EMA_LINE = re.compile(r"^ema:applying", re.M)
EVAL_ONLY_LINE = re.compile(r"^eval_only artifact:", re.M)
LATE_QAT = re.compile(r"^late_qat:enabled step:(\d+)", re.M)
CAPTURED = re.compile(r"^ *(\d+\.\d+)\| ?(.*)$")

# Phases of a training log; WARMUP is everything before the training timer starts.
WARMUP, TRAINING, VALIDATION, EVALUATION = "warmup", "training", "validation", "evaluation"
PHASES = (WARMUP, TRAINING, VALIDATION, EVALUATION)


def ensure_demo_data(data: Path) -> None:
    """The demo corpus is built offline in seconds by `python -m tools.data demo`."""
    if data == DEMO_DATA and not DEMO_DATA.exists():
        command = [sys.executable, "-m", "tools.data", "demo", "--root", str(ROOT)]
        subprocess.run(command, check=True, cwd=ROOT)


# ---------------------------------------------------------------- the script's own lines

def step_times(log: str) -> list[tuple[int, float]]:
    """(step, cumulative train_time ms) of every logged training step."""
    return [(int(s), float(t)) for s, t in STEP_LINE.findall(log)]


def mean_step_ms(steps: list[tuple[int, float]], skip: int) -> tuple[float, int, int]:
    """Mean ms per step from the `skip`-th logged step to the last (the first steps include
    compilation for new shapes): (ms, first step, last step)."""
    if len(steps) < 2:
        raise ValueError(f"{len(steps)} training step line(s) in the log; expected at least 2")
    skip = min(skip, len(steps) - 2)
    (s0, t0), (s1, t1) = steps[skip], steps[-1]
    return (t1 - t0) / (s1 - s0), s0, s1


def eval_times(log: str) -> list[dict]:
    """Every evaluation line with an eval_time, in log order: name, ms, val_loss, val_bpb and the
    rest of the line (stride, steps, mode)."""
    return [dict(name=m["name"], ms=int(m["ms"]), val_loss=float(m["loss"]),
                 val_bpb=float(m["bpb"]), detail=(m["extra"] + m["suffix"]).strip())
            for m in EVAL_LINE.finditer(log)]


def train_losses(log: str) -> list[tuple[int, float]]:
    """(step, train_loss) of every logged step; nan and inf parse as such."""
    return [(int(s), float(v)) for s, _, v in TRAIN_LOSS.findall(log)]


def val_losses(log: str) -> list[tuple[int, float, float]]:
    """(step, val_loss, val_bpb) of every in-loop validation line."""
    return [(int(s), float(a), float(b)) for s, a, b in VAL_LINE.findall(log)]


def logged_int(log: str, pattern: str) -> int | None:
    """The integer captured by `pattern` (one group) on its first line, or None."""
    m = re.search(pattern, log, re.M)
    return int(m[1]) if m else None


def ttt_chunk_lines(log: str) -> list[tuple[int, int, float]]:
    """(chunk, chunks, elapsed seconds) of every legal_ttt:chunk line."""
    return [(int(c), int(n), float(e)) for c, n, e in TTT_CHUNK.findall(log)]


def progress_lines(log: str, label: str) -> list[tuple[float, float]]:
    """(fraction done, elapsed seconds) of the eval_progress lines of one pass."""
    return [(float(p) / 100, float(e)) for name, p, e in PROGRESS.findall(log) if name == label]


def eval_timing(log: str) -> dict[str, dict]:
    """The eval_timing lines by evaluation name."""
    return {m[1]: dict(batches=int(m[2]), first_batch_s=float(m[3]), steady_batch_s=float(m[4]))
            for m in EVAL_TIMING.finditer(log)}


def memory_peaks(log: str) -> dict | None:
    """The last gpu_check:memory line: peak resident memory and CUDA peaks (None off CUDA)."""
    found = MEMORY_LINE.findall(log)
    if not found:
        return None
    rss, alloc, reserved = (int(x) for x in found[-1])
    return dict(rss_peak_mib=rss, cuda_allocated_peak_mib=alloc if alloc >= 0 else None,
                cuda_reserved_peak_mib=reserved if reserved >= 0 else None)


def is_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- captured logs

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

def glog_seconds(lines: list[str]) -> list[float | None]:
    """Each glog line's wall-clock time in seconds (a day boundary adds 86,400), None elsewhere."""
    out, offset, last = [], 0.0, None
    for line in lines:
        m = GLOG_LINE.match(line)
        if not m:
            out.append(None)
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) + offset
        if last is not None and t < last - 43200:
            offset += 86400
            t += 86400
        out.append(t)
        last = t
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


def line_phases(lines: list[str]) -> list[tuple[str, str | None]]:
    """(phase, evaluation name) of every line. Up to the last warm-up line (or the end of the
    config when there is no warm-up): warm-up. Then, until `ema:`, a line belongs to the
    training step or the validation whose log line closes it (TRAIN_LOG_EVERY=1 logs every
    step). After `ema:` (an EVAL_ONLY run: after its `eval_only` line), to the evaluation whose
    eval_time line closes it."""
    own = [i for i, line in enumerate(lines) if not GLOG_LINE.match(line)]
    eval_only = [i for i in own if EVAL_ONLY_LINE.match(lines[i])]
    marks = eval_only or [i for i in own if WARMUP_LINE.match(lines[i])] or [
        i for i in own if CONFIG_END.match(lines[i])]
    warm_end = marks[-1] if marks else -1
    labels: list[tuple[str, str | None]] = [(WARMUP, None)] * (warm_end + 1)
    pending, region = 0, EVALUATION if eval_only else TRAINING
    for i in range(warm_end + 1, len(lines)):
        line = lines[i]
        glog = bool(GLOG_LINE.match(line))
        if region == TRAINING and not glog and EMA_LINE.match(line):
            labels += [(TRAINING, None)] * (pending + 1)
            pending, region = 0, EVALUATION
            continue
        pending += 1
        if glog:
            continue
        if region == TRAINING and (TRAIN_STEP.match(line) or VAL_STEP.match(line)):
            labels += [(TRAINING if TRAIN_STEP.match(line) else VALIDATION, None)] * pending
            pending = 0
        elif region == EVALUATION:
            ev = EVAL_LINE.match(line)
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


def parse_compiles(log: str | list[str]) -> dict:
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
