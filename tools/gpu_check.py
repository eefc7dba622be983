"""The one-shot GPU check: on one CUDA GPU within --budget (330 s; run it under a 380 s limit,
so that two tries fit in 15 minutes), what the record's configuration must show before a real
run, and the figures a fix would need (docs/gpu-check.md: stages, checks, figures):

    python3 -m tools.data demo && python3 -m tools.gpu_check --out "$OUT/gpu_check.json"

Exit 0: every stage passed, 1 otherwise, 2: bad arguments. --dry-run: a 2-layer CPU run, eager.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime
from importlib import metadata, util
from pathlib import Path

from tools._files import read_shard, shard_bytes, write_atomic

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = ROOT / "data" / "tokenizers" / "demo_1024_bpe.model"
CACHE = Path(tempfile.gettempdir()) / "gpu_check_inductor"  # kept: a second try compiles less
STAGES = ("probes", "training", "evaluation", "ttt")
RECORD_MS_PER_STEP, RECORD_VAL_TARGETS, EVAL_LIMIT_S = 91.25, 62_021_632, 600.0
TOLERANCE_BPB, CUT_GRACE_S = 0.05, 3.0
ROUND_TRIP, TTT = "final_int6_roundtrip", "legal_ttt"
BANDS = {"final_int6_sliding_window": "near", "final_int6_sliding_window_s64": "near",
         "final_slot": "below", "final_slot_context": "not above", TTT: "not above"}
# Graphs each stage compiles (forward+backward of the model: training's without and with late
# QAT, TTT's step; forward only; small: Newton-Schulz per shape, SLOT's loss), each one's worst
# seconds from a cold cache (GPU: inductor, 11 layers; dry: eager backend, 2 layers, a busy 2-core
# machine), and each stage's start-up (imports, CUDA, data) and work.
GRAPHS = dict(probes=(0, 0, 0), training=(2, 1, 6), evaluation=(0, 2, 2), ttt=(1, 1, 0))
GRAPH_S = dict(gpu=(50, 20, 4), dry=(12, 5, 2))
OTHER_S = dict(gpu=dict(probes=(15, 25), training=(15, 45), evaluation=(15, 30), ttt=(15, 15)),
               dry=dict(probes=(10, 15), training=(10, 25), evaluation=(10, 25), ttt=(10, 15)))
STEPS = dict(gpu=16, dry=8)
DRY_ENV = dict(DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
               VE_LAYERS="0,1", XSA_LAST_N="2", BIGRAM_DIM="16", VE_DIM="16", TRAIN_SEQ_LEN="128",
               EVAL_SEQ_LEN="128", TRAIN_BATCH_TOKENS="1024", VAL_BATCH_SIZE="65536",
               SLOT_STEPS="2", TTT_CHUNK_TOKENS="4096")  # the record's architecture, smaller
STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:([\d.]+)ms")
RESULT = re.compile(r"^(\w+) val_loss:(\S+) val_bpb:(\S+).* eval_time:(\d+)ms")
TIMING = re.compile(r"^eval_timing:(\w+) batches:(\d+) first_batch:\S+s steady_batch:(\S+)s$")
CHUNK = re.compile(r"^legal_ttt:chunk (\d+)/(\d+) ")
SDPA_OPS = {"flash_attention": "FLASH_ATTENTION", "efficient_attention": "EFFICIENT_ATTENTION",
            "cudnn_attention": "CUDNN_ATTENTION", "attention_math": "MATH"}
KERNEL_WORDS = (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),  # cuDNN's say flash
                ("fmha", "EFFICIENT_ATTENTION"), ("cutlassf", "EFFICIENT_ATTENTION"))


# ---------------------------------------------------------------- checks and figures (pure)

def reserves(mode: str, budget: float) -> dict[str, float]:
    """Each stage's worst-case estimate, scaled down alike when together they exceed budget."""
    est = {s: sum(OTHER_S[mode][s]) + sum(n * t for n, t in zip(GRAPHS[s], GRAPH_S[mode]))
           for s in STAGES}
    return {s: round(e * min(1.0, budget / sum(est.values())), 1) for s, e in est.items()}


def loss_failures(steps: list, vocab: int) -> list[str]:
    """Every loss finite, step 1's within 0.3 of ln(vocab), the last third's mean 0.05 under."""
    bad = [(s, loss) for s, loss, _ in steps if not math.isfinite(loss)]
    if bad or not steps:
        return [f"train_loss {bad[0][1]} at step {bad[0][0]} (the first non-finite; {len(bad)} "
                f"of {len(steps)} logged steps)"] if bad else []
    (s0, first, _), ln_v = steps[0], math.log(vocab)
    tail = [loss for _, loss, _ in steps[-max(1, len(steps) // 3):]]
    out = [f"first train_loss {first:.4f} is {first - ln_v:+.4f} from ln({vocab}); expected "
           f"within 0.3"] if s0 == 1 and abs(first - ln_v) > 0.3 else []
    if len(steps) >= 3 and not sum(tail) / len(tail) <= first - 0.05:
        out.append(f"train_loss not falling: step {s0} {first:.4f}, mean of the last "
                   f"{len(tail)} {sum(tail) / len(tail):.4f}; expected at least 0.05 lower")
    return out


def speed(steps: list, iterations: int) -> dict:
    """ms/step from step 2 (the first grow the allocator) to the last before the traced one; on
    8xH100 each GPU runs one of the 8 micro-steps, and Muon's work, an eighth (less all-reduce)."""
    timed = [s for s in steps if 2 <= s[0] < iterations]
    if len(timed) < 2:
        return {}
    ms = (timed[-1][2] - timed[0][2]) / (timed[-1][0] - timed[0][0])
    return dict(ms_per_step=round(ms, 2), steps=[timed[0][0], timed[-1][0]],
                projected_8xh100_ms=round(ms / 8, 2), record_8xh100_ms=RECORD_MS_PER_STEP)


def eval_failures(evals: list[dict], ref: float | None = None,
                  ref_name: str = "round trip") -> list[str]:
    """Each evaluation finite and in its band around `ref` (default: the round trip)."""
    out = [f"{e['name']} val_loss {e['val_loss']} val_bpb {e['val_bpb']}: not finite"
           for e in evals if not (math.isfinite(e["val_loss"]) and math.isfinite(e["val_bpb"]))]
    rt = next((e["val_bpb"] for e in evals if e["name"] == ROUND_TRIP), math.nan)
    ref, tol = rt if ref is None else ref, TOLERANCE_BPB
    for name, x in ((e["name"], e["val_bpb"]) for e in evals if math.isfinite(ref + e["val_bpb"])):
        band = BANDS.get(name)
        ok = {None: True, "near": abs(x - ref) <= tol, "below": x < ref}.get(band, x <= ref + tol)
        if not ok:
            out.append(f"{name} val_bpb {x:.4f} vs {ref_name} {ref:.4f} ({x - ref:+.4f}); "
                       f"expected {band} it" + f" (tolerance {tol})" * (band != "below"))
    return out


def ttt_projection(adapted: list, unadapted: list, record_chunks: int) -> dict | None:
    """The record's chunks on 8 GPUs from this rank-0-of-8 run's chunk lines ([chunk, chunks,
    seconds]): the unadapted pass's chunks 2..n (chunk 1 compiles) give the scoring per chunk,
    the adapted pass's extra time the training of its chunks 2..n-1 (the last trains none)."""
    if min(len(adapted), len(unadapted)) < 2 or adapted[-1][1] < 3:
        return None
    n = adapted[-1][1]
    score = (unadapted[-1][2] - unadapted[0][2]) / (n - 1)
    train = max(adapted[-1][2] - adapted[0][2] - score * (n - 1), 0.0) / (n - 2)
    return dict(score_s_per_chunk=round(score, 4), train_s_per_chunk=round(train, 4),
                record_chunks=record_chunks,
                projected_8xh100_s=round(record_chunks * score + (record_chunks - 1) * train, 1))


def stage_failures(r: dict) -> list[str]:
    """The checks on what a stage reported so far (a stage cut short shows what it measured)."""
    g, sdpa, trace, runs = (r.get(k) or {} for k in ("gptq", "sdpa", "trace", "runs"))
    out = loss_failures(r.get("steps", []), r.get("vocab", 2))
    if g and not 0.98 <= g["error_ratio"] <= 1.02:
        out.append(f"gptq: output error {g['error_ratio']:.4f}x the CPU's (codes equal "
                   f"{g['codes_equal']:.2%}); expected within 2%")
    if sdpa and not any("ms" in sdpa[b] for b in SDPA_OPS.values()):
        out.append("sdpa: no backend accepts a micro-step's attention shape")
    if r.get("timed_loop_graphs"):
        out.append(f"{r['timed_loop_graphs']} graph(s) compiled once the training timer ran")
    if trace.get("attention_kernel") in (None, "MATH") and ("trace" in r or "train_s" in r):
        out.append(f"the traced step's attention runs {trace.get('attention_kernel')} "
                   f"{trace.get('top_kernels')}; expected flash, cuDNN or memory-efficient")
    out += eval_failures(r.get("evaluations", []))
    if {"adapted", "unadapted"} <= set(runs):
        out += eval_failures([runs["adapted"]], ref=runs["unadapted"]["val_bpb"],
                             ref_name="the same windows unadapted")
    return out


def eval_budget(stages: dict) -> dict:
    """Each evaluation's 8xH100 projection and compile seconds; the configuration's total."""
    ev, ttt = (stages[s]["result"] for s in ("evaluation", "ttt"))
    out = {e["name"]: [e.get("projected_8xh100_s"), e["compile_s"]]
           for e in ev.get("evaluations", [])}
    if ttt.get("runs"):
        out[TTT] = [(ttt.get("projection") or {}).get("projected_8xh100_s"),
                    ttt["runs"]["adapted"]["compile_s"]]
    counted = [s for name, (s, _) in out.items() if name != TTT or ttt.get("preset_runs_ttt")]
    return dict(projected_s_and_compile_s=out, limit_s=EVAL_LIMIT_S,
                total_s=round(sum(counted), 1) if counted and None not in counted else None)


def update(path: Path, change) -> dict:
    """The summary with change(summary) applied and what derives from its stages recomputed,
    written atomically (by gpu_check, or by the stage it waits for: one writer at a time)."""
    s = json.loads(path.read_text(encoding="utf-8"))
    change(s)
    for st in s["stages"].values():
        st["failures"] = st["notes"] + stage_failures(st["result"])
    s.update(elapsed_s=round(time.time() - s["start_time"], 2),
             evaluation_8xh100=eval_budget(s["stages"]))
    write_atomic(path, (json.dumps(s, indent=1) + "\n").encode())
    return s


# ---------------------------------------------------------------- running the stages

def run(args) -> dict:
    """The stages in order. Each may run until the budget's end less the later stages'
    estimates; then SIGTERM, and SIGKILL after a grace."""
    reserve = reserves(args.mode, args.budget)
    stages = {s: dict(status="pending", notes=[], failures=[], reserve_s=r, result={},
                      log=f"{args.out.stem}_{s}.log", **dict.fromkeys(
                          ("deadline_s", "started_s", "ended_s", "pid", "exit")))
              for s, r in reserve.items()}
    write_atomic(args.out, json.dumps(dict(
        tool="tools.gpu_check", mode=args.mode, preset=args.preset, budget_s=args.budget,
        started=datetime.now().isoformat("T", "seconds"), start_time=time.time(),
        state="running", ok=None, failed_stages=[], stages=stages)).encode())
    for i, name in enumerate(STAGES):
        deadline = round(args.budget - sum(list(reserve.values())[i + 1:]))
        now = update(args.out, lambda s: None)["elapsed_s"]
        s = run_stage(args, name, now, deadline) if deadline > now else update(
            args.out, lambda s: s["stages"][name].update(status="skipped", notes=["no time left"]))
        print(f"gpu_check {s['elapsed_s']:6.1f} s  [{name}] {s['stages'][name]['status']}")
    return update(args.out, lambda s: s.update(
        state="finished", ok=all(st["status"] == "ok" for st in s["stages"].values()),
        failed_stages=[n for n, st in s["stages"].items() if st["status"] != "ok"]))


def run_stage(args, name: str, start: float, deadline: float) -> dict:
    """One stage's process, in a session of its own (signals reach its whole process group,
    never gpu_check's): the demo corpus, the shared artifact, the preset, the stage's own."""
    env = dict(os.environ, DATA_PATH=str(args.data), TOKENIZER_PATH=str(DEMO_TOKENIZER),
               RUN_ID="gpu_check", ARTIFACT=str(args.work / "final_model.int6.ptz"),
               MODEL_PATH=str(args.work / "final_model.pt"), TTT_ENABLED=str(int(name == "ttt")),
               COMPILE="1" if args.dry_run else "auto", **(DRY_ENV if args.dry_run else {}),
               PYTHONUNBUFFERED="1", GPU_CHECK_SUMMARY=str(args.out),
               GPU_CHECK_DRY=str(args.dry_run), GPU_CHECK_PARENT=str(os.getpid()),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TORCHINDUCTOR_CACHE_DIR=str(CACHE),
               TORCHINDUCTOR_COMPILE_THREADS=str(len(os.sched_getaffinity(0))))
    env.update({"PRESET": args.preset} if args.preset else {}, WORLD_SIZE="1", RANK="0",
               LOCAL_RANK="0")
    if name == "training":  # EMA 0: the evaluations score trained weights, not ~90% initial
        env.update(ITERATIONS=str(STEPS[args.mode]), WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0",
                   VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", EMA_DECAY="0")
    with open(args.out.with_name(f"{args.out.stem}_{name}.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tools.gpu_check", "--child", name],
                                cwd=args.work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    update(args.out, lambda s: s["stages"][name].update(status="running", pid=proc.pid,
                                                        started_s=start, deadline_s=deadline))
    cut = None
    try:
        proc.wait(timeout=max(deadline - start, 0))
    except subprocess.TimeoutExpired:
        cut = f"stopped at its deadline ({deadline} s after the start), {deadline - start:.0f} s in"
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the SIGKILL: whatever the stage left behind
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=CUT_GRACE_S if cut else 0)

    for stray in args.out.parent.glob(f".{args.out.name}.*.tmp"):  # a write the cut stopped
        stray.unlink()

    def ended(s: dict) -> None:
        st, code = s["stages"][name], proc.wait()
        st["notes"] = [cut] * bool(cut) + st["notes"] + [
            f"exited {code} (its log says why)"] * bool(code and not cut and not st["notes"])
        bad = code or stage_failures(st["result"])
        st.update(status="cut" if cut else "failed" if bad else "ok", exit=code,
                  ended_s=round(time.time() - s["start_time"], 2))

    return update(args.out, ended)


# ---------------------------------------------------------------- inside a stage's process

class StageProcess:
    """One stage in its own process: train_gpt's functions called, the figures merged into the
    summary as they come, with those train_gpt only logs (its steps, results, eval_timing and
    legal_ttt:chunk lines, each read as it is logged)."""

    def __init__(self, stage: str, torch, tg):
        self.stage, self.torch, self.tg, self.iterations, self.cfg = stage, torch, tg, 0, None
        self.steps, self.evals, self.chunks, self.trace = [], [], [], None
        self.mark = self.warm = self.compiled()
        self.code = tg.Code(Path(tg.__file__).read_text(encoding="utf-8"),
                            Path(tg.__file__).stat().st_size)

    def emit(self, error: str | None = None, **figures) -> None:
        def merge(s: dict) -> None:
            s["stages"][self.stage]["result"].update(json.loads(json.dumps(figures)))
            s["stages"][self.stage]["notes"] += [error] * bool(error)

        update(Path(os.environ["GPU_CHECK_SUMMARY"]), merge)

    def memory(self) -> dict:
        cuda = self.torch.cuda if self.torch.cuda.is_initialized() else None
        return dict(rss_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                    cuda_peak_allocated_mib=cuda and cuda.max_memory_allocated() // 2**20,
                    cuda_peak_reserved_mib=cuda and cuda.max_memory_reserved() // 2**20)

    def compiled(self) -> dict:
        """torch's own accounting: dynamo's frame compilations (recompilations included) and
        the backward graphs compiled at their first backward, with their seconds."""
        utils = self.torch._dynamo.utils
        times = [t for k in ("_compile.compile_inner", "backward._backward_impl")
                 for t in utils.compilation_time_metrics.get(k, [])]
        return dict(count=len(times), seconds=round(sum(times), 3), graphs=[
            [str(m.compile_id), m.co_name or "backward", round(m.duration_us / 1e6, 3)]
            for m in utils.get_compilation_metrics()])

    def runtime(self, cfg, world: int):
        """train_gpt's Runtime as rank 0 of `world` without collectives; self.line reads its log."""
        base, line = self.tg.start_runtime(cfg.run), self.line

        class Watched(type(base)):
            distributed = property(lambda self: False)

            def log(self, msg: str, console: bool = True) -> None:
                super().log(msg, console)
                line(msg)

        return Watched(rank=0, world_size=world, device=base.device, compile=base.compile,
                       attention=base.attention)

    def line(self, msg: str) -> None:
        if re.fullmatch(r"warmup_step:(\d+)/\1", msg):
            self.warm = self.compiled()
        elif msg.startswith(("ema:", "late_qat:")):
            self.emit(**{msg.split(":")[0]: msg,
                         "timed_loop_graphs": self.compiled()["count"] - self.warm["count"]})
        elif m := STEP.match(msg):
            self.step(int(m[1]), float(m[2]), float(m[3]))
        elif m := RESULT.match(msg):
            state = self.compiled()
            self.evals.append(dict(name=m[1], val_loss=float(m[2]), val_bpb=float(m[3]),
                                   seconds=int(m[4]) / 1000,
                                   compile_s=round(state["seconds"] - self.mark["seconds"], 3)))
            self.mark = state
            if m[1] == ROUND_TRIP and self.cfg:
                self.project(self.evals[-1], None)
            self.emit(evaluations=self.evals)
        elif (m := TIMING.match(msg)) and self.cfg:
            self.project(next(e for e in self.evals[::-1] if e["name"] == m[1]),
                         (int(m[2]), float(m[3])))
            self.emit(evaluations=self.evals)
        elif m := CHUNK.match(msg):  # the line follows a sync (the chunk's score): time it here
            self.chunks.append([int(m[1]), int(m[2]), round(time.perf_counter(), 4)])

    def project(self, e: dict, logged: tuple | None) -> None:
        """Steady seconds per batch (logged: its eval_timing; the round trip logs none: its
        seconds less its compilation, per batch) times rank 0's batches on 8 GPUs over the
        record's split: its share of the sequences, or of the windows, in batches as here."""
        name, ev, L = e["name"], self.cfg.eval, self.cfg.eval.seq_len
        n, rows = self.n_targets // L, max(self.cfg.train.val_batch_size // 8 // L, 1)
        batches = -(-n // min(rows, n))
        batches, steady = logged or (batches, (e["seconds"] - e["compile_s"]) / batches)
        share = -(-(RECORD_VAL_TARGETS // L) // 8)
        if name != ROUND_TRIP:
            stride = {"final_int6_sliding_window": ev.stride}.get(name, ev.window_stride)
            stride = 64 if name.endswith("_s64") else stride
            plan = self.tg.sliding_windows(RECORD_VAL_TARGETS // L * L, L, stride, ev.tail)
            share, rows = -(-len(plan) // 8), ev.slot.batch_seqs
        record = -(-share // rows)
        e.update(batches=batches, steady_s_per_batch=round(steady, 5), record_batches=record,
                 projected_8xh100_s=round(steady * record, 1))

    def step(self, step: int, loss: float, ms: float) -> None:
        """A logged step; the profiler over the last one (the compiled step as it runs)."""
        self.steps.append([step, loss, ms])
        self.emit(steps=self.steps, speed=speed(self.steps, self.iterations),
                  compile=self.compiled(), memory=self.memory())
        if step == self.iterations - 1:
            from torch.profiler import ProfilerActivity, profile
            cuda = [ProfilerActivity.CUDA] if self.torch.cuda.is_available() else []
            self.trace = profile(activities=[ProfilerActivity.CPU, *cuda])
            self.trace.__enter__()
        elif self.trace is not None and step == self.iterations:
            self.trace.__exit__(None, None, None)
            self.emit(trace=trace_figures(self.torch, self.trace.events()))

    def probes(self) -> None:
        """The software and the machine; SDPA's backends; GPTQ on the device against the CPU."""
        torch, cfg = self.torch, self.tg.Config.from_env(os.environ)
        device = self.tg.start_runtime(cfg.run).device
        info = dict(torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                    cudnn=torch.backends.cudnn.version(), cpu_usable=len(os.sched_getaffinity(0)),
                    fa3=util.find_spec("flash_attn_interface") is not None, driver=None,
                    flash_attn=util.find_spec("flash_attn") is not None, gpu=None)
        with contextlib.suppress(metadata.PackageNotFoundError):
            info["triton"] = metadata.version("triton")
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        if device.type == "cuda":
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = dict(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                               capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        self.emit(device=info)
        self.emit(sdpa=self.sdpa(device, cfg))
        self.emit(gptq=self.gptq(device, cfg.model.model_dim, cfg.model.mlp_hidden))

    def sdpa(self, device, cfg) -> dict:
        """train_gpt's SDPA call (causal, GQA) forward and backward at a record GPU's
        micro-step under each backend forced, or why it refuses; the math backend at a small
        shape ([T, T] scores: ~20 GB at the large one), the memory peak reset after it."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        torch, m, L = self.torch, cfg.model, cfg.train.train_seq_len
        rows = max(cfg.train.train_batch_tokens // (8 * L), 1)
        out = dict(shape=[rows, L, m.num_heads, m.num_kv_heads, m.head_dim])
        for backend in SDPA_OPS.values():
            B, T = (1, min(L, 512)) if backend == "MATH" else (rows, L)
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            q, k, v = (torch.randn(B, h, T, m.head_dim, device=device, dtype=dtype).requires_grad_()
                       for h in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
            call = (lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=m.num_heads != m.num_kv_heads).sum().backward())
            forced = sdpa_kernel([getattr(SDPBackend, backend)])
            with forced, warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:  # as many calls as fit in ~0.3 s (1 to 20) after a first
                    n = max(1, min(20, int(300 / max(self.timed(device, call), 1e-3))))
                    out[backend] = dict(ms=round(self.timed(device, call, n) / n, 3), rows=B,
                                        seq_len=T)
                except Exception as e:  # SDPA warns each reason, then raises; out of memory too
                    why = "; ".join(dict.fromkeys(str(x.message).strip() for x in w)) or str(e)
                    out[backend] = dict(refused=why.strip().split("\n")[0][:300])
        if device.type == "cuda":
            out["peak_mib_before_reset"] = torch.cuda.max_memory_allocated() // 2**20
            torch.cuda.reset_peak_memory_stats()
        flash, cudnn = out["FLASH_ATTENTION"].get("ms"), out["CUDNN_ATTENTION"].get("ms")
        out["cudnn_over_flash"] = round(cudnn / flash, 3) if flash and cudnn else None
        return out

    def timed(self, device, fn, times: int = 1) -> float:
        """Milliseconds of `times` calls of fn, the device synchronised on both sides."""
        sync = self.torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(times):
            fn()
        sync()
        return 1000 * (time.perf_counter() - t0)

    def gptq(self, device, rows: int, cols: int) -> dict:
        """gptq_quantize on the device and on the CPU (TF32 off, as in the export), one Hessian
        of seeded squared-ReLU activations: the device must do as well on the error GPTQ
        minimises, trace(E H E^T)."""
        torch, quantize, gen, out = self.torch, self.tg.gptq_quantize, self.torch.Generator(), {}
        X = torch.randn(4 * cols, cols, generator=gen.manual_seed(0)).relu().square()
        W, H = torch.randn(rows, cols, generator=gen) * 0.02, (X.T @ X).double() / X.size(0)
        with self.tg.no_tf32():
            ms = [self.timed(device, lambda: out.update(dev=quantize(W.to(device),
                                                                     H.float().to(device)))),
                  self.timed(torch.device("cpu"), lambda: out.update(cpu=quantize(W, H.float())))]
        E = [W.double() - q.cpu().double() * s.cpu().double()[:, None]
             for q, s in (out["dev"], out["cpu"])]
        err = [float(((e @ H) * e).sum()) for e in E]
        return dict(shape=[rows, cols], device=device.type, solve_ms=round(ms[0], 1),
                    cpu_solve_ms=round(ms[1], 1), error_ratio=err[0] / err[1],
                    codes_equal=float((out["dev"][0].cpu() == out["cpu"][0]).float().mean()))

    def training(self) -> None:
        """train() as the record runs it, late QAT switching on halfway; export_artifact()."""
        tg, cfg = self.tg, self.tg.Config.from_env(os.environ)
        if cfg.train.late_qat_threshold > 0:  # the warm-down reaches it past the middle
            warmdown = math.ceil(cfg.train.iterations / (2 * cfg.train.late_qat_threshold))
            cfg = tg.Config.from_env(dict(os.environ, WARMDOWN_ITERS=str(warmdown)))
        rt, self.iterations = self.runtime(cfg, 1), cfg.train.iterations
        data, _ = tg.load_data(cfg, rt, training=True)
        model = tg.build_model(cfg.model, rt.device, cfg.run.seed, rt.attention)
        tg.log_config(cfg, rt, model, data)
        self.emit(vocab=cfg.model.vocab_size, iterations=cfg.train.iterations,
                  tokens_per_step=cfg.train.train_batch_tokens,
                  grad_accum=tg.grad_accum_steps(1))
        t0 = time.perf_counter()
        trained = tg.train(cfg, rt, model, data, 0.0)
        t1 = time.perf_counter()
        gptq = cfg.export.gptq_enabled  # the record's export has none; a preset may ask for it
        hessians = tg.calibrate(cfg, rt, model, data, trained.train_ms) if gptq else None
        tg.export_artifact(cfg, rt, model, hessians, 0, self.code)
        self.emit(train_s=round(t1 - t0, 2), export_s=round(time.perf_counter() - t1, 2),
                  artifact_bytes=Path(cfg.export.artifact).stat().st_size)

    def evaluated_model(self, world: int):
        """Config, runtime, data, the artifact's model (the initial weights' if none came)."""
        tg, cfg = self.tg, self.tg.Config.from_env(os.environ)
        rt = self.runtime(cfg, world)
        data, _ = tg.load_data(cfg, rt, training=False)
        path = cfg.export.artifact
        if not Path(path).is_file():
            model = tg.build_model(cfg.model, rt.device, cfg.run.seed, rt.attention)
            tg.export_artifact(cfg, rt, model, None, 0, self.code)
            self.emit(artifact="the initial weights (the training stage wrote no artifact)")
        model = tg.eval_model(cfg.model, tg.read_artifact(path), rt.device, path, rt.attention)
        return cfg, rt, data, model

    def evaluation(self) -> None:
        """evaluate(), each result projected as it comes."""
        cfg, rt, data, model = self.evaluated_model(1)
        self.cfg, self.n_targets, self.mark = cfg, data.val_tokens.numel() - 1, self.compiled()
        self.tg.evaluate(cfg, rt, model, data)

    def ttt(self) -> None:
        """eval_ttt() as rank 0 of 8, then the same windows scored with no TTT step."""
        cfg, rt, data, model = self.evaluated_model(8)
        preset = {k: v for k, v in os.environ.items() if k == "PRESET"}
        self.emit(preset_runs_ttt=self.tg.Config.from_env(preset).eval.ttt.enabled, world=8)
        unadapted = dataclasses.replace(cfg.eval, ttt=dataclasses.replace(cfg.eval.ttt, epochs=0))
        runs, chunks = {}, {}
        for name, eval_cfg in (("adapted", cfg.eval), ("unadapted", unadapted)):
            before, self.chunks = self.compiled()["seconds"], []
            sums, seconds = self.tg.eval_ttt(eval_cfg, rt, copy.deepcopy(model), data.val_tokens,
                                             data.luts)
            loss, bpb = sums.result(rt)
            runs[name] = dict(name=TTT, val_loss=loss, val_bpb=bpb, seconds=round(seconds, 3),
                              compile_s=round(self.compiled()["seconds"] - before, 3))
            chunks[name] = self.chunks
            self.emit(runs=runs, chunks=chunks)
        record_chunks = -(-RECORD_VAL_TARGETS // cfg.eval.ttt.chunk_tokens)
        self.emit(projection=ttt_projection(chunks["adapted"], chunks["unadapted"], record_chunks))


def child(stage: str) -> int:
    """The stage's process: it dies with gpu_check; the error that stops it is one line."""
    with contextlib.suppress(Exception):  # Linux: die with gpu_check, even by SIGKILL
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != os.environ.get("GPU_CHECK_PARENT", str(os.getppid())):
        return 1  # gpu_check died before prctl took hold
    import torch
    if os.environ.get("GPU_CHECK_DRY") == "True":  # dynamo's graphs, guards, recompilations
        torch.compile = functools.partial(torch.compile, backend="eager")
    from tools._common import import_train_gpt
    proc, status = StageProcess(stage, torch, import_train_gpt()), 0
    try:
        getattr(proc, stage)()
    except Exception as e:  # a bad setting, a diverged run, a CUDA error (its log: the rest)
        traceback.print_exc(file=sys.stdout)
        proc.emit(error=f"{type(e).__name__}: {e}"[:500])
        status = 1
    proc.emit(memory=proc.memory(), compile=proc.compiled())
    return status


def trace_figures(torch, events) -> dict:
    """The attention of a traced step: on CUDA by its kernels' names (no fused kernel but a
    softmax: the math path), on the CPU by the aten op it dispatched."""
    ops = sorted({e.name for e in events if e.name.startswith("aten::") and "attention" in e.name})
    kernels: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total
    names = sorted(kernels, key=kernels.get, reverse=True)  # by device time
    fused = [(n[:160], b) for n in names for w, b in KERNEL_WORDS if w in n.lower()]
    softmax = any("softmax" in n.lower() for n in names)
    kernel = fused[0][1] if fused else "MATH" if softmax else None
    by_op = next((b for k, b in SDPA_OPS.items() for op in ops if k in op), None)
    return dict(attention_kernel=kernel if names else by_op, aten_ops=ops,
                attention_kernels=list(dict(fused))[:4], top_kernels=[n[:160] for n in names[:5]])


# ---------------------------------------------------------------- the command

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = Parser(prog="python -m tools.gpu_check", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="summary path (default: gpu_check.json in $OUT or .)")
    p.add_argument("--dry-run", action="store_true", help="on the CPU: a 2-layer model")
    p.add_argument("--preset", choices=sorted(x.stem for x in (ROOT / "presets").glob("*.env")),
                   help="a train_gpt preset (default: the record's configuration)")
    p.add_argument("--budget", type=float, help="seconds for the whole check (330; dry run 240)")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.mode = "dry" if a.dry_run else "gpu"
    a.budget = a.budget if a.budget is not None else (240.0 if a.dry_run else 330.0)
    a.out = a.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    if not (math.isfinite(a.budget) and a.budget > 0):
        p.error(f"--budget {a.budget} is not allowed; expected seconds > 0")
    if a.out.suffix != ".json" or not a.out.parent.is_dir():
        p.error(f"--out {str(a.out)!r} is not allowed; expected a .json path in an existing "
                f"folder (the stages' logs go beside it)")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; this check needs a GPU (on a CPU: `python -m "
              "tools.gpu_check --dry-run`, or `python -m tools.bench_train`)", file=sys.stderr)
        return 1
    if not DEMO_DATA.exists():
        subprocess.run([sys.executable, "-m", "tools.data", "demo", "--root", str(ROOT)],
                       check=True, cwd=ROOT)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        args.work = Path(work)
        args.data = args.work if args.dry_run else DEMO_DATA
        for shard in DEMO_DATA.glob("fineweb_*.bin") if args.dry_run else ():
            keep = 16384 if "_val_" in shard.name else None  # a CPU scores fewer targets
            write_atomic(args.work / shard.name, shard_bytes(read_shard(shard)[:keep]))
        s = run(args)
    print(f"gpu_check ({s['mode']}): {s['elapsed_s']:.0f} s of {s['budget_s']:.0f}: "
          + ("every stage passed" if s["ok"] else "FAILED: " + ", ".join(s["failed_stages"])))
    for name, st in s["stages"].items():
        print("\n".join([f"[{name}] {st['status']}"] + [f"  failure: {f}" for f in st["failures"]]))
    print(f"evaluation on 8xH100: {json.dumps(s['evaluation_8xh100'])}\nsummary: {args.out}")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
