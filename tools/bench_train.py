"""Training speed of train_gpt.py, measured on its real loop: runs the script in a
subprocess for a few steps and reads its own log lines.

    python -m tools.bench_train                 # a config that fits the device found
    python -m tools.bench_train --end-to-end    # also every evaluation, with its time

Prints step time, tokens per second, peak memory and, on CUDA, model FLOPs
utilisation; on the CPU also the seconds from launch to the first step (start-up
cost: compilation is off there by default). Needs shards: by default the demo
corpus (`python -m tools.data demo`), built when missing. The log lines are read
through tools/runlog.py's formats.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import runlog
from tools.runlog import (DEMO_DATA, DEMO_TOKENIZER, ORIGINAL_MS_PER_STEP, ORIGINAL_PEAK_MIB, ROOT,
                          ensure_demo_data, eval_times, mean_step_ms, step_times)

H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM

# The record's own model on CUDA; a small one on the CPU (its start-up is what matters there).
CUDA_ENV = dict(TRAIN_BATCH_TOKENS="786432")
CPU_ENV = dict(PRESET="demo")


def bench_env(args, cuda: bool) -> dict[str, str]:
    env = dict(CUDA_ENV if cuda else CPU_ENV)
    env.update(ITERATIONS=str(args.steps), WARMUP_STEPS=str(args.warmup),
               MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
               WARMDOWN_ITERS="0", RUN_ID="bench", DATA_PATH=str(args.data),
               TOKENIZER_PATH=str(args.tokenizer))
    for item in args.set:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def model_flops_per_token(log: str, env: dict[str, str]) -> float:
    """6 x parameters in matmuls (forward + backward), plus causal attention's 6 x L x T x d."""
    params = int(runlog.config(log)["model_params"])
    layers, dim = int(env.get("NUM_LAYERS", 11)), int(env.get("MODEL_DIM", 512))
    seq = int(env.get("TRAIN_SEQ_LEN", 2048))
    return 6 * params + 6 * layers * seq * dim


def run(args) -> int:
    import torch

    cuda = torch.cuda.is_available()
    ensure_demo_data(args.data)
    env = bench_env(args, cuda)
    work = tempfile.mkdtemp(prefix="bench_train_")
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if args.nproc > 1:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}",
               str(ROOT / "train_gpt.py")]
    started, first_step = time.perf_counter(), None
    proc = subprocess.Popen(cmd, cwd=work, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        step = runlog.match("train_step", line)
        if first_step is None and step and step["step"] == "1":
            first_step = time.perf_counter() - started
        if args.verbose:
            print(line, end="")
        if not args.end_to_end and runlog.match("ema", line):  # training is over: no evaluations
            proc.terminate()
            break
    # 130: stopped by our SIGTERM, which the script logs as an interrupt
    if proc.wait() not in (0, 130):
        print("".join(lines[-20:]), file=sys.stderr)
        print(f"error: train_gpt.py exited {proc.returncode}", file=sys.stderr)
        return 1
    log = "".join(lines)
    report(log, env, cuda, first_step, args)
    return 0


def report(log: str, env: dict[str, str], cuda: bool, first_step: float | None, args) -> None:
    ms_per_step, s0, s1 = mean_step_ms(step_times(log), args.skip)
    config = runlog.config(log)
    tokens, world = int(config["train_batch_tokens"]), int(config["world_size"])
    tok_s_gpu = tokens / (ms_per_step / 1000) / world
    device = "cuda" if cuda else "cpu"
    settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if "PATH" not in k)
    print(f"device: {device} x{world}   config: {settings}")
    print(f"step time: {ms_per_step:.2f} ms (steps {s0}..{s1})   "
          f"tokens/s per process: {tok_s_gpu:,.0f}")
    if first_step is not None:
        print(f"launch to first step: {first_step:.1f} s")
    peak = runlog.first("peak", log)
    if peak:
        print(f"peak memory: {peak['allocated']} MiB (original: {ORIGINAL_PEAK_MIB} MiB per GPU)")
    if cuda:
        mfu = model_flops_per_token(log, env) * tok_s_gpu / H100_BF16_FLOPS
        original_tok_s = 786432 / (ORIGINAL_MS_PER_STEP / 1000) / 8
        print(f"MFU (vs H100 dense bf16 peak): {mfu:.1%}   tokens/s per GPU vs original "
              f"{original_tok_s:,.0f}: {tok_s_gpu / original_tok_s:.2f}x")
    for ev in eval_times(log):
        print(f"eval {ev['name']}: {ev['ms'] / 1000:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps to run (default 30)")
    p.add_argument("--warmup", type=int, default=5,
                   help="compile warm-up steps (WARMUP_STEPS, default 5)")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the average (default 5)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) (default 1)")
    p.add_argument("--end-to-end", action="store_true",
                   help="also run every evaluation and print its time")
    p.add_argument("--data", type=Path, default=DEMO_DATA,
                   help="shard folder (default: the demo corpus)")
    p.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER)
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                   help="override a setting")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the run's output")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
