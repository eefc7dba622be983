"""The one-shot GPU proof: on one CUDA GPU, in under 8 minutes, everything the record's
configuration needs to show before a real run.

A session with a GPU runs this one line from the repository root (about 8 minutes: give
the command a 540 s limit). It needs the repo and what train_gpt.py imports (torch, numpy,
sentencepiece) and nothing else: no network, no FlashAttention 3, brotli or zstandard; the
demo corpus is built offline in seconds (gpu_check also builds it when missing):

    python3 -m tools.data demo && python3 -m tools.gpu_check --out "$OUT/gpu_check.json"

Stages, each isolated (one failing does not stop the others) and each within its own
share of the time budget (--budget, 450 s by default):

  versions    python, torch, CUDA, cuDNN, triton, the GPU, FlashAttention 3 importable or not
  sdpa        the record's per-GPU attention call (48 rows x 2048, 8 query / 4 kv heads,
              head dim 64, bf16, causal, enable_gqa, as train_gpt.causal_attention makes it):
              the backend PyTorch picks (read from the kernel names of a profiler trace),
              then forward+backward time under each backend forced, or why it refuses
  compile     one run of train_gpt.py (TORCH_LOGS=recompiles,dynamo): every dynamo
              compilation, by phase: warm-up, training steps, in-loop validation, each
              evaluation. A compilation during the training steps, a recompilation before
              `ema:`, or a recompile-limit hit fails the stage
  training    the default 11-layer model at 786,432 tokens per step (8 micro-steps of 48 rows
              on one GPU): ms/step, tokens/s, peak memory, against the record's 8xH100 figures
  evaluation  every evaluation's eval_time (round trip, sliding s96 and s64, SLOT scored and
              context, TTT when the script has TTT_ENABLED) on the demo corpus

The same run feeds compile, training and evaluation. Writes a JSON summary, a text copy
(.txt) and the run's log (_train.log) beside it: by default gpu_check_summary.json in $OUT
when that is set, else in the working directory. Exit status 1 when a stage failed (the
summary still holds what the others found); 2 for bad arguments.

    python -m tools.gpu_check --dry-run    # on a CPU: the same stages on a tiny model

--dry-run runs a tiny configuration on the CPU so the parsing and the report can be
checked anywhere: dynamo traces every graph as it would on the GPU (same guards, same
recompilations) with its eager backend, since inductor's code generation would take
minutes on a CPU. Without --dry-run a machine with no CUDA device is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

from tools import bench_train

RECORD_SINGLE_GPU_MS = 8 * bench_train.ORIGINAL_MS_PER_STEP  # one GPU does the 8 ranks' micro-steps in turn
RECORD_TOKENS_PER_S_PER_GPU = 786432 / (bench_train.ORIGINAL_MS_PER_STEP / 1000) / 8
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
# The aten op each SDPA backend dispatches to (the CPU's flash kernel has its own name).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
}
EXPECTED_EVALS = ("DIAGNOSTIC post_ema", "final_int6_roundtrip", "final_int6_sliding_window",
                  "final_int6_sliding_window_s64", "final_slot", "final_slot_context")
# Runs train_gpt.py as __main__ with every torch.compile on dynamo's eager backend (dry run).
EAGER_BOOTSTRAP = ("import functools, runpy, sys, torch; "
                   "torch.compile = functools.partial(torch.compile, backend='eager'); "
                   "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
# Phases of a training log; WARMUP is everything before the training timer starts.
WARMUP, TRAINING, VALIDATION, EVALUATION = "warmup", "training", "validation", "evaluation"
PHASES = (WARMUP, TRAINING, VALIDATION, EVALUATION)

GLOG_LINE = re.compile(r"^(?:\[rank\d+\]:)?[IWEVDC]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
COMPILE_ID = re.compile(r"\] \[(\d+)/(\d+)(?:_\d+)?\] ")
START_TRACING = re.compile(r"torchdynamo start tracing (\S+) (\S+)")
RECOMPILING = re.compile(r"Recompiling function (\S+) in (\S+)")
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- \d+/\d+: (.*)")
LIMIT_HIT = re.compile(r"hit config\.(?:recompile|cache_size)_limit|FailOnRecompileLimitHit")
WARMUP_LINE = re.compile(r"^warmup_step:\d+/\d+")
CONFIG_END = re.compile(r"^seed:\d+")
TRAIN_STEP = re.compile(r"^step:\d+/\d+ train_loss:")
VAL_STEP = re.compile(r"^step:\d+/\d+ val_loss:")
EMA_LINE = re.compile(r"^ema:applying")
LATE_QAT = re.compile(r"^late_qat:enabled step:(\d+)", re.M)
# The dry run's validation split: SLOT's cost grows with every scored token, and the demo's
# 95k would make the evaluations most of a CPU minute.
DRY_RUN_VAL_TOKENS = 16384


class CheckError(Exception):
    """A bad argument: printed as one line."""


# ---------------------------------------------------------------- configurations

@dataclasses.dataclass(frozen=True)
class CheckConfig:
    mode: str  # gpu | dry-run
    device: str
    sdpa_shape: tuple[int, int, int, int, int]  # B, T, query heads, kv heads, head dim
    sdpa_dtype: str
    train_env: dict
    bootstrap: str | None  # python -c code that runs train_gpt.py; None: run it directly
    skip_steps: int
    budget_s: float
    sdpa_budget_s: float
    sdpa_target_s: float  # timing per backend
    expected_evals: tuple[str, ...]
    val_tokens: int | None = None  # run on the first N validation tokens only


def record_attention_shape(tg) -> tuple[int, int, int, int, int]:
    """The record's per-GPU micro-batch: TRAIN_BATCH_TOKENS over 8 ranks x 1 micro-step, which
    is also 1 GPU x 8 micro-steps."""
    h, world = tg.Hyperparameters(), 1
    rows = h.train_batch_tokens // (world * h.grad_accum_steps(world)) // h.train_seq_len
    return rows, h.train_seq_len, h.num_heads, h.num_kv_heads, h.head_dim


def schedule_env(iterations: int, warmup: int, late_qat_threshold: float) -> dict[str, str]:
    """A short run whose late QAT switches on halfway: the warm-down spans iterations / (2 x
    threshold) steps, so the LR scale falls under the threshold just past the middle and the
    QAT graph (compiled in the warm-up) is used by the timed loop."""
    return dict(ITERATIONS=str(iterations), WARMUP_STEPS=str(warmup),
                WARMDOWN_ITERS=str(math.ceil(iterations / (2 * late_qat_threshold))),
                MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", SLOT_MODE="both")


def has_setting(tg, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(tg.Hyperparameters))


def _given(value, default):
    return default if value is None else value


def build_config(args, tg) -> CheckConfig:
    threshold = tg.Hyperparameters().late_qat_threshold
    data = dict(DATA_PATH=str(bench_train.DEMO_DATA), TOKENIZER_PATH=str(bench_train.DEMO_TOKENIZER))
    expected = EXPECTED_EVALS
    if args.dry_run:
        env = dict(PRESET="demo", DEVICE="cpu", COMPILE="1", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
                   NUM_KV_HEADS="2", VE_LAYERS="0,1", XSA_LAST_N="2", BIGRAM_DIM="16", VE_DIM="16",
                   TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", TRAIN_BATCH_TOKENS="1024", VAL_BATCH_SIZE="65536",
                   SLOT_STEPS="2", EVAL_STRIDE="96", RUN_ID="gpu_check_dry_run",
                   **schedule_env(_given(args.steps, 8), _given(args.warmup, 2), threshold))
        shape, dtype, device, bootstrap, skip = (2, 128, 8, 4, 64), "float32", "cpu", EAGER_BOOTSTRAP, 2
    else:
        env = dict(RUN_ID="gpu_check", **schedule_env(_given(args.steps, 36), _given(args.warmup, 4), threshold))
        shape, dtype, device, bootstrap, skip = record_attention_shape(tg), "bfloat16", "cuda", None, 5
    if has_setting(tg, "ttt_enabled"):
        env["TTT_ENABLED"] = "1"
        expected += ("ttt",)  # any evaluation named with ttt
    env.update(data)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CheckError(f"--set {item!r} is not allowed; expected VAR=VALUE")
        env[key] = value
    budget = _given(args.budget, 120.0 if args.dry_run else 450.0)
    return CheckConfig(mode="dry-run" if args.dry_run else "gpu", device=device, sdpa_shape=shape, sdpa_dtype=dtype,
                       train_env=env, bootstrap=bootstrap, skip_steps=skip, budget_s=budget,
                       sdpa_budget_s=min(60.0, budget / 6), sdpa_target_s=0.2 if args.dry_run else 1.0,
                       expected_evals=expected, val_tokens=DRY_RUN_VAL_TOKENS if args.dry_run else None)


# ---------------------------------------------------------------- log reading (pure)

def own_lines(lines: list[str]) -> list[int]:
    """Indices of the script's own lines (not torch's logging)."""
    return [i for i, line in enumerate(lines) if not GLOG_LINE.match(line)]


def line_phases(lines: list[str]) -> list[tuple[str, str | None]]:
    """(phase, evaluation name) of every line. Up to the last warm-up line (or the end of the
    config when there is no warm-up): warm-up. Then, until `ema:`, a line belongs to the
    training step or the validation whose log line closes it (TRAIN_LOG_EVERY=1 logs every
    step). After `ema:`, to the evaluation whose eval_time line closes it."""
    own = own_lines(lines)
    marks = [i for i in own if WARMUP_LINE.match(lines[i])] or [i for i in own if CONFIG_END.match(lines[i])]
    warm_end = marks[-1] if marks else -1
    labels: list[tuple[str, str | None]] = [(WARMUP, None)] * (warm_end + 1)
    pending, region = 0, TRAINING
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
            ev = bench_train.EVAL_LINE.match(line)
            if ev:
                labels += [(EVALUATION, ev["name"])] * pending
                pending = 0
    labels += [(region, None if region == TRAINING else "(unfinished)")] * pending
    return labels


def parse_compiles(log: str) -> dict:
    """Every dynamo compilation in the log (one per compile id [frame/n]; n > 0 is a
    recompilation of frame `frame`), with its phase, function, and the guard that failed."""
    lines = log.splitlines()
    phases = line_phases(lines)
    compiles: dict[tuple[int, int], dict] = {}
    limit_hits = []
    for i, line in enumerate(lines):
        if LIMIT_HIT.search(line):
            limit_hits.append(line.strip()[-300:])
        m = COMPILE_ID.search(line) if GLOG_LINE.match(line) else None
        if not m:
            continue
        key = (int(m[1]), int(m[2]))
        entry = compiles.get(key)
        if entry is None:
            phase, name = phases[i]
            entry = compiles[key] = dict(id=f"{key[0]}/{key[1]}", function=None, location=None, phase=phase,
                                         evaluation=name, recompile=key[1] > 0, reason=None)
        fn = START_TRACING.search(line) or RECOMPILING.search(line)
        if fn and entry["function"] is None:
            entry["function"], entry["location"] = fn[1], Path(fn[2]).name
        guard = GUARD_FAILURE.search(line)
        if guard and entry["reason"] is None:
            entry["reason"] = guard[1].split("  #")[0].strip()[:200]
    ordered = list(compiles.values())  # in the order of their first log line
    counts = {p: dict(compilations=0, recompilations=0) for p in PHASES}
    by_eval: dict[str, dict] = {}
    frames: dict[int, dict] = {}
    for c in ordered:
        counts[c["phase"]]["compilations"] += 1
        counts[c["phase"]]["recompilations"] += c["recompile"]
        if c["phase"] == EVALUATION:
            e = by_eval.setdefault(c["evaluation"], dict(compilations=0, recompilations=0))
            e["compilations"] += 1
            e["recompilations"] += c["recompile"]
        frame = int(c["id"].split("/")[0])
        f = frames.setdefault(frame, dict(function=c["function"], location=c["location"], entries=0))
        f["entries"] += 1
        f["function"] = f["function"] or c["function"]
        f["location"] = f["location"] or c["location"]
    return dict(total=len(ordered), recompilations=sum(c["recompile"] for c in ordered), by_phase=counts,
                by_evaluation=by_eval, functions=list(frames.values()), compilations=ordered, limit_hits=limit_hits)


def compile_failures(parsed: dict, log: str, expect_compile: bool) -> list[str]:
    failures = []
    for c in parsed["compilations"]:
        what = f"{'recompilation' if c['recompile'] else 'compilation'} {c['id']} of {c['function']}"
        why = f" ({c['reason']})" if c["reason"] else ""
        if c["phase"] == TRAINING:
            failures.append(f"{what} during the timed training steps{why}")
        elif c["phase"] == VALIDATION and c["recompile"]:
            failures.append(f"{what} after the warm-up, in the in-loop validation before ema:{why}")
    failures += [f"recompile limit hit: {line}" for line in dict.fromkeys(parsed["limit_hits"])]
    if expect_compile and parsed["total"] == 0:
        failures.append("no dynamo compilation in the log (TORCH_LOGS output missing?)")
    if not re.search(TRAIN_STEP.pattern, log, re.M):
        failures.append("the run never reached the timed training loop: compile counts incomplete")
    return failures


def parse_training(log: str, skip: int) -> dict:
    """Step time over the logged steps after `skip`, and before / after late QAT."""
    steps = bench_train.step_times(log)
    ms, s0, s1 = bench_train.mean_step_ms(steps, skip)
    tokens = int(re.search(r"^train_batch_tokens:(\d+)", log, re.M)[1])
    world = int(re.search(r"^world_size:(\d+)", log, re.M)[1])
    accum = int(re.search(r"^world_size:\d+ grad_accum_steps:(\d+)", log, re.M)[1])
    out = dict(steps_logged=len(steps), last_step=steps[-1][0], ms_per_step=ms, averaged_steps=[s0, s1],
               tokens_per_step=tokens, world_size=world, grad_accum_steps=accum,
               tokens_per_s_per_gpu=tokens / (ms / 1000) / world)
    qat = LATE_QAT.search(log)
    if qat:  # the step logged as late_qat:enabled step:S is the first with QAT on (step S + 1 in the log)
        on = int(qat[1])
        before = [s for s in steps if s[0] <= on]
        after = [s for s in steps if s[0] >= on]
        out["late_qat_from_step"] = on + 1
        out["ms_per_step_before_qat"] = _span_ms(before[min(skip, len(before) - 2):]) if len(before) >= 2 else None
        out["ms_per_step_with_qat"] = _span_ms(after) if len(after) >= 2 else None
    peak = bench_train.PEAK_LINE.search(log)
    out["peak_allocated_mib"], out["peak_reserved_mib"] = (int(peak[1]), int(peak[2])) if peak else (None, None)
    return out


def _span_ms(steps: list[tuple[int, float]]) -> float:
    (s0, t0), (s1, t1) = steps[0], steps[-1]
    return (t1 - t0) / (s1 - s0)


def record_comparison(training: dict) -> dict:
    """The record ran 8 ranks x 1 micro-step of 48 rows in 91.25 ms; one GPU runs the same
    8 micro-steps in turn, plus every rank's share of Muon, without the all-reduces."""
    ms = training["ms_per_step"]
    out = dict(record_ms_per_step_8xh100=bench_train.ORIGINAL_MS_PER_STEP,
               record_single_gpu_equivalent_ms=RECORD_SINGLE_GPU_MS,
               ratio_to_single_gpu_equivalent=ms / RECORD_SINGLE_GPU_MS,
               record_tokens_per_s_per_gpu=RECORD_TOKENS_PER_S_PER_GPU,
               record_peak_allocated_mib=bench_train.ORIGINAL_PEAK_MIB)
    if training.get("peak_allocated_mib") is not None:
        out["peak_ratio_to_record"] = training["peak_allocated_mib"] / bench_train.ORIGINAL_PEAK_MIB
    return out


def parse_evaluations(log: str, expected: tuple[str, ...]) -> tuple[list[dict], list[str]]:
    """Each evaluation's time; the expected ones absent from the log ("ttt": any name with ttt)."""
    evals = bench_train.eval_times(log)
    names = [e["name"] for e in evals]
    missing = [n for n in expected if not (n in names if n != "ttt" else any("ttt" in x.lower() for x in names))]
    return evals, missing


# ---------------------------------------------------------------- stages

def stage_versions(tg) -> dict:
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               triton=_package_version("triton"), numpy=_package_version("numpy"),
               sentencepiece=_package_version("sentencepiece"), gpu=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = dict(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                          capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                          count=torch.cuda.device_count())
    try:
        import flash_attn_interface  # noqa: F401
        out["fa3"] = dict(importable=True, error=None)
    except Exception as e:  # an ImportError, or a broken build's own error
        out["fa3"] = dict(importable=False, error=f"{type(e).__name__}: {e}"[:200])
    out["script_attention"] = "flash_attn_3" if tg.flash_attn_3 is not None and torch.cuda.is_available() else "sdpa"
    return dict(data=out, failures=[])


def _package_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def classify_sdpa(op_names: list[str], kernel_names: list[str]) -> tuple[str | None, str | None]:
    """(backend by the aten op dispatched, backend by the device kernels' names). cuDNN's
    kernels mention flash too: test for cudnn first."""
    by_op = next((SDPA_OPS[n] for n in op_names if n in SDPA_OPS), None)
    by_kernel = None
    for name in kernel_names:
        low = name.lower()
        if "cudnn" in low:
            by_kernel = "CUDNN_ATTENTION"
        elif "flash" in low:
            by_kernel = "FLASH_ATTENTION"
        elif "fmha" in low or "efficient" in low or "cutlassf" in low:
            by_kernel = "EFFICIENT_ATTENTION"
        if by_kernel:
            break
    if by_kernel is None and kernel_names and any("softmax" in n.lower() for n in kernel_names):
        by_kernel = "MATH"  # no fused kernel: bmm + softmax
    return by_op, by_kernel


def stage_sdpa(tg, cfg: CheckConfig) -> dict:
    import torch

    deadline = time.monotonic() + cfg.sdpa_budget_s
    B, T, H, Hkv, D = cfg.sdpa_shape
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.sdpa_dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    # The script's layout: [B, T, heads, D]; causal_attention transposes to SDPA's [B, heads, T, D].
    q, k, v = (torch.randn(B, T, n, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for n in (H, Hkv, Hkv))
    grad = torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    script_uses_fa3 = tg.flash_attn_3 is not None and device.type == "cuda"

    def attend():
        return tg.causal_attention(q, k, v)

    def fwd_bwd(fn):
        fn().backward(grad)
        q.grad = k.grad = v.grad = None

    data = dict(shape=dict(batch=B, seq_len=T, query_heads=H, kv_heads=Hkv, head_dim=D, dtype=cfg.sdpa_dtype,
                           causal=True, enable_gqa=H != Hkv, layout="[B,T,H,D] transposed (train_gpt.causal_attention)"),
                script_attention="flash_attn_3" if script_uses_fa3 else "sdpa", backends={})
    failures = []
    try:
        data["default"] = dict(profile_default(attend, fwd_bwd, device),
                               **time_fwd_bwd(attend, fwd_bwd, sync, cfg.sdpa_target_s))
        if script_uses_fa3:
            data["default"]["backend"] = "FLASH_ATTENTION_3"
    except Exception as e:
        failures.append(f"the default attention call failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with mock.patch.object(tg, "flash_attn_3", None):  # the script's SDPA call, FA3 installed or not
        for name in SDPA_BACKENDS:
            if time.monotonic() > deadline:
                data["backends"][name] = dict(status="skipped", reason="stage time budget spent")
                continue
            with sdpa_kernel([getattr(SDPBackend, name)]):
                data["backends"][name] = forced_backend(attend, fwd_bwd, sync, cfg.sdpa_target_s)
    default = data.get("default", {})
    if "default" in data and not default.get("backend"):
        failures.append("the default call's backend could not be told from its trace")
    if not any(b["status"] == "ok" for b in data["backends"].values()):
        failures.append("no SDPA backend accepts the record's attention shape")
    del q, k, v, grad
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the training run
    return dict(data=data, failures=failures)


def profile_default(attend, fwd_bwd, device) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fwd_bwd(attend)  # first call: kernel selection, lazy initialisation
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fwd_bwd(attend)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    ops = sorted({e.name for e in events if e.name.startswith("aten::")})
    kernels: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total
    kernel_names = sorted(kernels, key=kernels.get, reverse=True)
    by_op, by_kernel = classify_sdpa(ops, kernel_names)
    return dict(backend=by_kernel if device.type == "cuda" else by_op, backend_by_aten_op=by_op,
                backend_by_kernels=by_kernel, attention_ops=[o for o in ops if "attention" in o],
                kernels=[n[:160] for n in kernel_names[:8]])


def time_fwd_bwd(fn, fwd_bwd, sync, target_s: float) -> dict:
    """Mean forward+backward ms over as many calls as fit in about target_s (1 to 20)."""
    fwd_bwd(fn)
    sync()
    t0 = time.perf_counter()
    fwd_bwd(fn)
    sync()
    once = time.perf_counter() - t0
    iters = max(1, min(20, int(target_s / max(once, 1e-6))))
    t0 = time.perf_counter()
    for _ in range(iters):
        fwd_bwd(fn)
    sync()
    return dict(ms_fwd_bwd=1000 * (time.perf_counter() - t0) / iters, iters=iters)


def forced_backend(fn, fwd_bwd, sync, target_s: float) -> dict:
    """One backend's time, or why it refuses: SDPA warns each reason, then raises."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return dict(status="ok", **time_fwd_bwd(fn, fwd_bwd, sync, target_s))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return dict(status="error", reason="out of memory")
        except RuntimeError as e:
            reasons = list(dict.fromkeys(str(w.message).strip() for w in caught))
            reason = "; ".join(reasons) if reasons else str(e).strip().splitlines()[0]
            return dict(status="refused", reason=reason[:400])


@dataclasses.dataclass
class TrainRun:
    log: str = ""
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0
    error: str | None = None


def run_training(cfg: CheckConfig, timeout_s: float, log_path: Path, echo: bool) -> TrainRun:
    """train_gpt.py in a scratch folder with dynamo's compile log on; its stdout and stderr
    in one stream (both flushed per line, so their order is kept), cut at timeout_s."""
    run = TrainRun()
    t0 = time.perf_counter()
    try:
        bench_train.ensure_demo_data(Path(cfg.train_env["DATA_PATH"]))
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(cfg.train_env, TORCH_LOGS="recompiles,dynamo", PYTHONUNBUFFERED="1")
        script = str(bench_train.ROOT / "train_gpt.py")
        cmd = [sys.executable, "-c", cfg.bootstrap, script] if cfg.bootstrap else [sys.executable, script]
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            if cfg.val_tokens:
                source = Path(cfg.train_env["DATA_PATH"])
                env["DATA_PATH"] = trimmed_data(source, Path(work) / source.name, cfg.val_tokens)
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", start_new_session=True)
            lines: list[str] = []
            reader = threading.Thread(target=_collect, args=(proc.stdout, lines, echo), daemon=True)
            reader.start()
            try:
                run.returncode = proc.wait(timeout=max(timeout_s, 1.0))
            except subprocess.TimeoutExpired:
                run.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                run.returncode = proc.wait()
            reader.join(timeout=30)
            run.log = "".join(lines)
    except Exception as e:
        run.error = f"{type(e).__name__}: {e}"
    run.seconds = time.perf_counter() - t0
    write_atomic(log_path, run.log)
    return run


def trimmed_data(source: Path, dest: Path, val_tokens: int) -> str:
    """A copy of a shard folder whose validation split keeps its first val_tokens tokens."""
    from tools import data

    dest.mkdir()
    for shard in sorted(source.glob("fineweb_train_*.bin")):
        (dest / shard.name).symlink_to(shard.resolve())
    val = sorted(source.glob("fineweb_val_*.bin"))
    data.write_shard(dest / val[0].name, np.concatenate([data.read_shard(f) for f in val])[:val_tokens])
    return str(dest)


def _collect(stream, lines: list[str], echo: bool) -> None:
    for line in stream:
        lines.append(line)
        if echo and not GLOG_LINE.match(line):
            print(f"  | {line}", end="", flush=True)


def run_problem(run: TrainRun) -> str | None:
    """Why the run gave no complete log: its error, the timeout, or its exit status with the
    last lines of its own output (the traceback)."""
    if run.error:
        return f"the training run could not start: {run.error}"
    if run.timed_out:
        return f"the training run was stopped at its time budget ({run.seconds:.0f} s)"
    if run.returncode:
        lines = run.log.splitlines()
        tail = [lines[i] for i in own_lines(lines)][-6:]
        return f"train_gpt.py exited {run.returncode}: " + " | ".join(t.strip() for t in tail)[-600:]
    return None


def stage_compile(run: TrainRun, cfg: CheckConfig) -> dict:
    parsed = parse_compiles(run.log)
    import torch._dynamo

    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", None)
    warnings_ = [f"{f['function']} ({f['location']}) holds {f['entries']} graphs = dynamo's recompile limit: "
                 f"one more shape fails" for f in parsed["functions"] if limit and f["entries"] >= limit]
    failures = compile_failures(parsed, run.log, expect_compile=True)
    problem = run_problem(run)
    if problem:  # after ema: the warm-up and training counts are whole, only the evaluations' are cut
        (warnings_ if re.search(EMA_LINE.pattern, run.log, re.M) else failures).append(problem)
    return dict(data=dict(parsed, recompile_limit=limit, warnings=warnings_), failures=failures)


def stage_training(run: TrainRun, cfg: CheckConfig) -> dict:
    data = parse_training(run.log, cfg.skip_steps)
    data["record"] = record_comparison(data)
    failures = []
    planned = int(cfg.train_env["ITERATIONS"])
    if data["last_step"] < planned:
        failures.append(f"{data['last_step']} of {planned} steps logged: " + (run_problem(run) or "log incomplete"))
    if cfg.device == "cuda" and data["peak_allocated_mib"] is None:
        failures.append("no peak memory line in the log")
    return dict(data=data, failures=failures)


def stage_evaluation(run: TrainRun, cfg: CheckConfig) -> dict:
    evals, missing = parse_evaluations(run.log, cfg.expected_evals)
    compiles = parse_compiles(run.log)["by_evaluation"]
    for e in evals:
        e["compilations"] = compiles.get(e["name"], dict(compilations=0, recompilations=0))
    failures = [f"no {name} evaluation in the log" for name in missing]
    problem = run_problem(run)
    if problem:
        failures.append(problem)
    return dict(data=dict(evaluations=evals, total_seconds=sum(e["ms"] for e in evals) / 1000), failures=failures)


def run_stage(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = fn(*args)
        stage = dict(ok=not result["failures"], failures=result["failures"], **result["data"])
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        stage = dict(ok=False, failures=[f"{type(e).__name__}: {e}"[:400]], traceback=tb[-8:])
    stage["seconds"] = round(time.perf_counter() - t0, 2)
    print("\n".join(stage_text(name, stage)), flush=True)  # now: a check cut short still shows it
    return stage


# ---------------------------------------------------------------- report

def render_text(summary: dict) -> str:
    st = summary["stages"]
    failed = [n for n, s in st.items() if not s["ok"]]
    out = [f"gpu_check ({summary['mode']}), {summary['started']}, {summary['seconds']:.0f} s: "
           + ("every stage passed" if not failed else "FAILED: " + ", ".join(failed))]
    for name, stage in st.items():
        out += ["", *stage_text(name, stage)]
    run = summary["train_run"]
    out += ["", f"training run: exit {run['returncode']}, {run['seconds']:.0f} s of {run['timeout_s']:.0f} s allowed"
            f"{', stopped at its time budget' if run['timed_out'] else ''}; log: {run['log']}",
            "settings: " + " ".join(f"{k}={v}" for k, v in sorted(run["env"].items()) if "PATH" not in k)]
    return "\n".join(out) + "\n"


def stage_text(name: str, stage: dict) -> list[str]:
    out = [f"[{name}] {'ok' if stage['ok'] else 'FAILED'} ({stage['seconds']:.1f} s)"]
    out += [f"  failure: {f}" for f in stage["failures"]]
    # A failed stage may hold only part of its fields: show what renders.
    with contextlib.suppress(*(() if stage["ok"] else (KeyError, TypeError, ValueError, AttributeError))):
        out += STAGE_TEXT[name](stage)
    return out


def _text_versions(s: dict) -> list[str]:
    gpu = s["gpu"]
    return [f"  python {s['python']}  torch {s['torch']}  CUDA {s['cuda']}  cuDNN {s['cudnn']}  triton {s['triton']}",
            f"  GPU: " + (f"{gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}, {gpu['count']} device(s)"
                          if gpu else "none"),
            f"  FlashAttention 3: {'importable' if s['fa3']['importable'] else 'not importable'}"
            + (f" ({s['fa3']['error']})" if s["fa3"]["error"] else "") + f"; train_gpt uses {s['script_attention']}"]


def _text_sdpa(s: dict) -> list[str]:
    sh, d = s["shape"], s.get("default", {})
    out = [f"  shape: q [{sh['batch']}, {sh['seq_len']}, {sh['query_heads']}, {sh['head_dim']}], k/v "
           f"{sh['kv_heads']} heads, {sh['dtype']}, causal, enable_gqa={sh['enable_gqa']}"]
    if d:
        out.append(f"  default call: {d.get('backend')} ({d.get('ms_fwd_bwd', float('nan')):.3f} ms fwd+bwd); "
                   f"aten op says {d.get('backend_by_aten_op')}, kernels say {d.get('backend_by_kernels')}")
        out += [f"    kernel: {k}" for k in d.get("kernels", [])[:4]]
    for name, b in s["backends"].items():
        line = f"{b['ms_fwd_bwd']:.3f} ms fwd+bwd ({b['iters']} calls)" if b["status"] == "ok" \
            else f"{b['status']}: {b.get('reason')}"
        out.append(f"  {name:<20} {line}")
    return out


def _text_compile(s: dict) -> list[str]:
    p = s["by_phase"]
    out = [f"  {s['total']} compilations ({s['recompilations']} recompilations); "
           + ", ".join(f"{ph}: {p[ph]['compilations']} ({p[ph]['recompilations']} re)" for ph in PHASES)]
    out += [f"  {f['function']} ({f['location']}): {f['entries']} graph(s)" for f in s["functions"]]
    out += [f"  evaluation {n}: {c['compilations']} ({c['recompilations']} re)" for n, c in s["by_evaluation"].items()]
    out += [f"  {c['id']} {c['function']} [{c['phase']}{' ' + c['evaluation'] if c['evaluation'] else ''}]"
            + (f" guard: {c['reason']}" if c["reason"] else "") for c in s["compilations"] if c["recompile"]]
    out += [f"  warning: {w}" for w in s.get("warnings", [])]
    return out


def _text_training(s: dict) -> list[str]:
    r = s["record"]
    out = [f"  {s['ms_per_step']:.1f} ms/step (steps {s['averaged_steps'][0]}..{s['averaged_steps'][1]}), "
           f"{s['tokens_per_s_per_gpu']:,.0f} tokens/s per process, {s['tokens_per_step']:,} tokens/step = "
           f"{s['world_size']} process(es) x {s['grad_accum_steps']} micro-steps"]
    if s.get("late_qat_from_step"):
        before, after = s.get("ms_per_step_before_qat"), s.get("ms_per_step_with_qat")
        out.append(f"  late QAT from step {s['late_qat_from_step']}: "
                   f"{before and f'{before:.1f}'} ms/step before, {after and f'{after:.1f}'} with")
    if s["peak_allocated_mib"] is not None:
        out.append(f"  peak memory: {s['peak_allocated_mib']:,} MiB allocated, {s['peak_reserved_mib']:,} MiB reserved "
                   f"(record: {r['record_peak_allocated_mib']:,} MiB allocated per GPU)")
    out.append(f"  record: {r['record_ms_per_step_8xh100']} ms/step on 8xH100, each GPU one micro-step of the same "
               f"rows; one GPU running all 8 in turn would need about {r['record_single_gpu_equivalent_ms']:.0f} ms "
               f"(less the all-reduces, plus 8x the Muon work): measured/that = "
               f"{r['ratio_to_single_gpu_equivalent']:.2f}; record tokens/s per GPU "
               f"{r['record_tokens_per_s_per_gpu']:,.0f}")
    return out


def _text_evaluation(s: dict) -> list[str]:
    out = [f"  {e['name']:<32} {e['ms'] / 1000:8.1f} s  val_bpb {e['val_bpb']:.4f}  {e['detail']}"
           f"  compilations {e['compilations']['compilations']}" for e in s["evaluations"]]
    return out + [f"  total {s['total_seconds']:.1f} s"]


STAGE_TEXT = dict(versions=_text_versions, sdpa=_text_sdpa, compile=_text_compile, training=_text_training,
                  evaluation=_text_evaluation)


def write_atomic(path: Path, text: str) -> None:
    from tools._common import import_train_gpt
    import_train_gpt().write_atomic(path, text.encode("utf-8"))


def output_paths(out: str | None) -> tuple[Path, Path, Path]:
    if out is None:
        folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
        path = folder / "gpu_check_summary.json"
    else:
        path = Path(out)
    if path.suffix != ".json":
        raise CheckError(f"--out {str(path)!r} is not allowed; expected a .json path (the text copy goes beside it)")
    if not path.parent.is_dir():
        raise CheckError(f"--out {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return path, path.with_suffix(".txt"), path.with_name(path.stem + "_train.log")


def check(cfg: CheckConfig, tg, paths: tuple[Path, Path, Path], echo: bool) -> dict:
    started = time.monotonic()
    deadline = started + cfg.budget_s
    summary = dict(tool="tools.gpu_check", mode=cfg.mode, started=datetime.datetime.now().isoformat(timespec="seconds"),
                   budget_s=cfg.budget_s, sdpa_budget_s=cfg.sdpa_budget_s, stages={})
    stages = summary["stages"]
    stages["versions"] = run_stage("versions", stage_versions, tg)
    stages["sdpa"] = run_stage("sdpa", stage_sdpa, tg, cfg)
    reserve = 15.0  # parsing and writing the summary
    timeout = deadline - time.monotonic() - reserve
    run = run_training(cfg, timeout, paths[2], echo)
    summary["train_run"] = dict(returncode=run.returncode, timed_out=run.timed_out, seconds=round(run.seconds, 1),
                                timeout_s=round(timeout, 1), error=run.error, log=str(paths[2]), env=cfg.train_env,
                                command="train_gpt.py" + (" (dynamo eager backend)" if cfg.bootstrap else ""))
    stages["compile"] = run_stage("compile", stage_compile, run, cfg)
    stages["training"] = run_stage("training", stage_training, run, cfg)
    stages["evaluation"] = run_stage("evaluation", stage_evaluation, run, cfg)
    summary["ok"] = all(s["ok"] for s in stages.values())
    summary["failed_stages"] = [n for n, s in stages.items() if not s["ok"]]
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="summary JSON path (default: gpu_check_summary.json in $OUT or here)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: the same stages on a tiny model")
    p.add_argument("--steps", type=int, help="training steps (default 36; dry run 8)")
    p.add_argument("--warmup", type=int, help="compile warm-up steps (default 4; dry run 2)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (default 450; dry run 120)")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="override a train_gpt setting")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the training run's output")
    args = p.parse_args(argv)
    try:
        for name in ("steps", "warmup", "budget"):
            value = getattr(args, name)
            if value is not None and (value < (2 if name == "steps" else 0) or not math.isfinite(value)):
                raise CheckError(f"--{name}={value} is not allowed; expected "
                                 + ("at least 2 steps" if name == "steps" else "a number >= 0"))
        paths = output_paths(args.out)
        import torch

        if not args.dry_run and not torch.cuda.is_available():
            print("error: no CUDA device; this check needs a GPU (on a CPU: `python -m tools.gpu_check --dry-run`, "
                  "or `python -m tools.bench_train`)", file=sys.stderr)
            return 1
        from tools._common import import_train_gpt
        tg = import_train_gpt()
        cfg = build_config(args, tg)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = check(cfg, tg, paths, echo=not args.quiet)
    write_atomic(paths[0], json.dumps(summary, indent=1, default=str) + "\n")
    text = render_text(summary)
    write_atomic(paths[1], text)
    print(f"\n{text.splitlines()[0]}\nsummary: {paths[0]} (text: {paths[1].name}, run log: {paths[2].name})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
