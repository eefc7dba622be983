"""Time train_gpt.py's evaluations on a random-weight model with 2048-token windows.

    python -m tools.bench_eval [--strict]       # CPU-sized defaults, a random stream

(a) the sliding window, (b) SLOT, (c) the whole suite (train_gpt.evaluate), (d) an
original-style SLOT (logits everywhere; timed on a few windows, extrapolated), (e) legal TTT;
then the ratios to (a), one over its target marked MISSES TARGET (--strict: exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from tools._common import import_train_gpt, unit_luts
from tools.slot_tf32 import SlotBatch, slot_nll

tg = import_train_gpt()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_eval",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for option, default, help_text in (
            ("layers", 2, "NUM_LAYERS"), ("dim", 128, "MODEL_DIM (4 heads, 2 kv heads)"),
            ("seq-len", 2048, "EVAL_SEQ_LEN = TRAIN_SEQ_LEN"), ("stride", 96, "EVAL_STRIDE"),
            ("slot-steps", 48, "SLOT_STEPS"), ("tokens", 16384, "validation targets")):
        p.add_argument(f"--{option}", type=int, default=default, help=help_text)
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when a ratio misses its target (every ratio is printed first)")
    return p.parse_args(argv)


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    target: float | None = None  # the most it may be
    original: float | None = None  # the original's figure, for comparison
    note: str = ""  # printed after the value instead of the two

    @property
    def misses(self) -> bool:
        # The figure printed is judged (1.504 prints 1.50, meets <= 1.5); NaN meets no target.
        return self.target is not None and not round(self.value, 2) <= self.target


def ratio_line(r: Ratio) -> str:
    """The ratio's row of the table, with a marker at the end when it misses its target."""
    if r.note:
        return f"{r.name:<46}{r.value:>10.2f}   {r.note}"
    target = "" if r.target is None else f"<= {r.target:g}"
    original = "" if r.original is None else f"{r.original:g}"
    line = f"{r.name:<46}{r.value:>10.2f}{target:>10}{original:>10}"
    return f"{line}  MISSES TARGET (<= {r.target:g})" if r.misses else line.rstrip()


def report_ratios(ratios: list[Ratio], strict: bool) -> int:
    """Print every ratio's row; the exit status: 1 with strict when any misses its target."""
    print("\n".join(map(ratio_line, ratios)))
    missed = [r.name.strip() for r in ratios if r.misses]
    if missed and strict:
        count = "1 ratio" if len(missed) == 1 else f"{len(missed)} ratios"
        print(f"error: {count} over target ({', '.join(missed)}); --strict fails the run",
              file=sys.stderr)
        return 1
    return 0


def setup(a: argparse.Namespace):
    """The Config and the Scoring of a random-matrix model (nothing trivially cheap)."""
    ve_layers = ",".join(str(i) for i in range(max(a.layers - 2, 0), a.layers))
    env = dict(TRAIN_SEQ_LEN=a.seq_len, EVAL_SEQ_LEN=a.seq_len, EVAL_STRIDE=a.stride,
               SLOT_STEPS=a.slot_steps, SLOT_MODE="scored", RUN_ID="bench_eval",
               NUM_LAYERS=a.layers, MODEL_DIM=a.dim, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=3,
               BIGRAM_DIM=32, VE_DIM=32, VE_LAYERS=ve_layers, XSA_LAST_N=a.layers,
               TTT_CHUNK_TOKENS=max(4096, a.seq_len))  # TTT's chunks: at least a window
    cfg = tg.Config.from_env({k: str(v) for k, v in env.items()})
    if a.tokens < cfg.eval.seq_len:
        raise tg.ConfigError(f"--tokens={a.tokens}: expected more than one window of "
                             f"{cfg.eval.seq_len}")
    rt = tg.start_runtime(cfg.run)  # TF32 on CUDA, as a run; compiled on CUDA
    model = tg.build_model(cfg.model, rt.device, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.size(1) ** -0.5)
    tokens = torch.randint(0, cfg.model.vocab_size, (a.tokens + 1,), generator=g)  # any text
    luts = unit_luts(cfg.model.vocab_size, rt.device)
    return cfg, tg.Scoring(model, rt.compiled(model.hidden), tokens, luts, rt)


def timed(rt, fn):
    """(fn's result, its seconds): CPU seconds of this process on a CPU (steadier on a shared
    machine: waiting for a core is not in them), wall seconds on a GPU."""
    clock = time.process_time if rt.device.type == "cpu" else time.perf_counter
    rt.sync()
    start = clock()
    out = fn()
    rt.sync()
    return out, clock() - start


def compare_slot_styles(s, e, k: int = 2):
    """Per-window seconds of the fast SLOT (the script's scorer, its loss uncompiled) and the
    original-style one (tools.slot_tf32's) on the hidden states of full windows 1..k."""
    plain = tg.Scoring(s.model, s.hidden_fn, s.tokens, s.luts, tg.Runtime(device=s.rt.device))
    plan = tg.sliding_windows(s.n_targets, e.seq_len, e.stride, e.tail)
    idx = np.arange(1, min(k, len(plan) - 1) + 1)
    scorer = tg.SlotScorer("scored", e.slot, plain, plan, [idx], len(idx))
    b = next(tg.window_pass(plain, plan, [idx], len(idx), e.seq_len, collect=False))
    hid, scored = b.hid.float(), torch.from_numpy(b.scored).to(s.rt.device)
    fast, t_fast = timed(s.rt, lambda: scorer.fit_and_score(hid, b.y, b.scored, b.scored, 0))
    batch = SlotBatch(hid, b.y, scored, fast)
    orig, t_orig = timed(s.rt, lambda: slot_nll(batch, scorer.weight, e.slot,
                                                s.model.cfg.logit_softcap, everywhere=True))
    gap = float(((fast - orig).abs() / orig.abs().clamp_min(1e-6)).max())
    return t_fast / len(idx), t_orig / len(idx), len(idx), gap


def run_suite(cfg, s):
    """train_gpt.evaluate on this model's artifact, as the record runs it (its loading timed
    too), its log lines silenced; returns (its seconds, [(score name, its wall seconds)])."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.int6.ptz")
        container = tg.quantize_state_dict(s.model.state_dict(), s.model.roles)
        tg.write_atomic(path, tg.pack_artifact(container, cfg.export.compressor))

        def suite():
            loaded = tg.eval_model(cfg.model, tg.read_artifact(path), s.rt.device, path)
            return tg.evaluate(cfg, s.rt, loaded, tg.Data(s.tokens, s.luts, [], 0))

        with contextlib.redirect_stdout(io.StringIO()):
            scores, seconds = timed(s.rt, suite)
    return seconds, [(name, score.seconds) for name, score in scores.items()]


def time_evaluations(cfg, s, n_windows: int):
    """Every timing of the table: its rows (name, seconds, val_bpb) and the ratios."""
    e, rt = cfg.eval, s.rt
    warm = tg.Scoring(s.model, s.hidden_fn, s.tokens[:e.seq_len + e.stride + 1], s.luts, rt)
    tg.sliding_pass(e, warm, e.stride, "sliding", ("scored",))  # kernels (and compilation) warm
    (sliding,), t_a = timed(rt, lambda: tg.sliding_pass(e, s, e.stride, "sliding"))
    (slot,), t_b = timed(rt, lambda: tg.sliding_pass(e, s, e.stride, "", ("scored",)))
    rows = [(f"(a) sliding s{e.stride}", t_a, sliding.sums.result(rt)[1]),
            (f"(b) SLOT-{e.slot.steps} (fast)", t_b, slot.sums.result(rt)[1])]
    ratios = [Ratio("SLOT / sliding", t_b / t_a, 1.5, 7.5)]

    def ttt(stream):  # on a copy: TTT adapts the model it runs on
        with contextlib.redirect_stdout(io.StringIO()):
            return tg.eval_ttt(e, rt, copy.deepcopy(s.model), stream, s.luts)

    ttt(s.tokens[:2 * e.ttt.chunk_tokens + 1])  # a trained chunk and a scored one: compiled
    (sums, _), t_e = timed(rt, lambda: ttt(s.tokens))
    n_chunks = -(-s.n_targets // e.ttt.chunk_tokens)
    rows.append((f"(e) legal TTT ({n_chunks - 1} of {n_chunks} chunks trained)", t_e,
                 sums.result(rt)[1]))
    ratios.append(Ratio("TTT / sliding", t_e / t_a, 1.5))
    t_c, parts = run_suite(cfg, s)
    rows += [("(c) suite (evaluate)", t_c, None)] + [(f"    {n}", sec, None) for n, sec in parts]
    ratios.append(Ratio("suite / sliding", t_c / t_a, 3, 10))
    fast_w, orig_w, k, gap = compare_slot_styles(s, e)
    t_d = t_b + (orig_w - fast_w) * n_windows
    rows.append((f"(d) original-style SLOT (est. from {k} windows)", t_d, None))
    ratios += [Ratio("original-style SLOT / fast SLOT", t_d / t_b),
               Ratio("  SLOT fit per window: original / fast", orig_w / fast_w,
                     note=f"({orig_w:.3f}s vs {fast_w:.3f}s; max rel. nll gap {gap:.1e})")]
    return rows, ratios


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg, s = setup(a)
        m, e, cpu = cfg.model, cfg.eval, s.rt.device.type == "cpu"
        n_windows = len(tg.sliding_windows(s.n_targets, e.seq_len, e.stride, e.tail))
        print(f"device:{s.rt.device} threads:{torch.get_num_threads()} layers:{m.num_layers} "
              f"dim:{m.model_dim} vocab:{m.vocab_size} "
              f"params:{sum(p.numel() for p in s.model.parameters()):,} L:{e.seq_len} "
              f"targets:{s.n_targets:,} windows:{n_windows} slot_batch:{e.slot.batch_seqs}")
        rows, ratios = time_evaluations(cfg, s, n_windows)
    except tg.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\n{'evaluation':<46}{'cpu s' if cpu else 'wall s':>10}{'val_bpb':>10}")
    for name, sec, bpb in rows:
        print(f"{name:<46}{sec:>10.2f}{'' if bpb is None else f'{bpb:.4f}':>10}".rstrip())
    title = f"ratio (of {'CPU' if cpu else 'wall'} seconds)"
    print(f"\n{title:<46}{'value':>10}{'target':>10}{'original':>10}")
    return report_ratios(ratios, a.strict)


if __name__ == "__main__":
    sys.exit(main())
