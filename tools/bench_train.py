"""Training speed of train_gpt.py on its real loop, read from its own log lines: step time,
tokens/s, peak memory, MFU on CUDA, launch to the first step (evaluations: tools.bench_eval).

    python -m tools.bench_train [--nproc 8]   # shards: by default the demo's, built when missing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools import data, runlog

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = ROOT / "data" / "tokenizers" / "demo_1024_bpe.model"
# The record on 8xH100 (published: 786,432 tokens per 91.25 ms step): per GPU, tokens/s and MiB.
ORIGINAL_TOK_S, ORIGINAL_PEAK_MIB = 786432 / 0.09125 / 8, 22524
H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM


def run(args) -> int:
    """args.steps steps of the record's model on CUDA, the demo's on the CPU; no evaluations."""
    import torch

    cuda = torch.cuda.is_available()
    if args.data == DEMO_DATA and not DEMO_DATA.exists():
        data.build_demo(ROOT)
    env = dict(TRAIN_BATCH_TOKENS="786432") if cuda else dict(PRESET="demo")
    env.update(ITERATIONS=str(args.steps), WARMUP_STEPS=str(args.warmup),
               MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
               WARMDOWN_ITERS="0", RUN_ID="bench", DATA_PATH=str(args.data),
               TOKENIZER_PATH=str(args.tokenizer))
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if args.nproc > 1:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={args.nproc}", cmd[1]]
    started, first_step, lines = time.perf_counter(), None, []
    proc = subprocess.Popen(cmd, cwd=tempfile.mkdtemp(prefix="bench_train_"),
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append(line)
        if (step := runlog.match("train_step", line)) and step["step"] == "1":
            first_step = time.perf_counter() - started
        if runlog.match("ema", line):  # training is over: no evaluations
            proc.terminate()
            break
    if proc.wait() not in (0, 130):  # 130: our SIGTERM, which the script logs as an interrupt
        print("".join(lines[-20:]), file=sys.stderr)
        print(f"error: train_gpt.py exited {proc.returncode}", file=sys.stderr)
        return 1
    report("".join(lines), env, cuda, first_step, args.skip)
    return 0


def report(log: str, env: dict[str, str], cuda: bool, first_step: float, skip: int) -> None:
    ms_per_step, s0, s1 = runlog.mean_step_ms(runlog.step_times(log), skip)
    config = runlog.config(log)
    world = int(config["world_size"])
    tok_s = int(config["train_batch_tokens"]) / (ms_per_step / 1000) / world
    settings = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if "PATH" not in k)
    print(f"device: {'cuda' if cuda else 'cpu'} x{world}   config: {settings}")
    print(f"step time: {ms_per_step:.2f} ms (steps {s0}..{s1})   "
          f"tokens/s per process: {tok_s:,.0f}")
    print(f"launch to first step: {first_step:.1f} s")
    if peak := runlog.first("peak", log):
        print(f"peak memory: {peak['allocated']} MiB (original: {ORIGINAL_PEAK_MIB} MiB per GPU)")
    if cuda:
        # 6 x parameters in matmuls (forward + backward), plus causal attention's 6 x L x T x d.
        s = json.loads(runlog.first("settings", log)["json"])  # every setting as the run read it
        attention = 6 * s["NUM_LAYERS"] * s["TRAIN_SEQ_LEN"] * s["MODEL_DIM"]
        flops = 6 * int(config["model_params"]) + attention
        print(f"MFU (vs H100 dense bf16 peak): {flops * tok_s / H100_BF16_FLOPS:.1%}   tokens/s "
              f"per GPU vs original {ORIGINAL_TOK_S:,.0f}: {tok_s / ORIGINAL_TOK_S:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps to run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="WARMUP_STEPS, compiling (default 5)")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the average (default 5)")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) (default 1)")
    p.add_argument("--data", type=Path, default=DEMO_DATA, help="shards (default: the demo's)")
    p.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
