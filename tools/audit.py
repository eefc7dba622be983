"""The community flip test (docs/evaluation.md) on every evaluation mode of train_gpt.py: score
every target of a random stream with a small random model, change the target at p, score
again; in a causal mode no target before p moves. The scored SLOT fits the very targets it
scores and fails; the context SLOT and legal score-first TTT pass.

    python -m tools.audit                       # all five modes, exit 0 if as expected
    python -m tools.audit --strict              # exit 1 if any mode is not causal
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch

from tools._common import import_train_gpt, perturbed_model, torch_threads, unit_luts

# mode: (its label, the verdict expected)
MODES = {"standard": ("standard", "causal"), "sliding": ("sliding window", "causal"),
         "scored": ("SLOT scored", "NOT causal"), "context": ("SLOT context", "causal"),
         "ttt": ("legal TTT", "causal")}
THRESHOLD = 1e-6  # float32 on the CPU: a causal mode repeats earlier targets' nll bit for bit
WEIGHT_NOISE = 0.05  # added to every parameter so the tiny model's predictions depend on its input


@dataclass(frozen=True)
class AuditSettings:
    seed: int = 0
    positions: int = 8
    seq_len: int = 64
    stride: int = 16
    targets: int = 320
    slot_steps: int = 48
    modes: tuple[str, ...] = tuple(MODES)


@dataclass
class ModeResult:
    mode: str
    threshold: float = THRESHOLD
    flips: int = 0
    max_earlier: float = 0.0  # largest |change| of the nll of a target before a flipped one
    min_effect: float = float("inf")  # smallest, over flips, of the largest |change| at or after p
    worst_position: int = -1  # the flip that moved an earlier target most
    worst_target: int = -1  # and the earlier target it moved

    def record(self, p: int, diff: torch.Tensor) -> None:
        """One flip at target p; diff = |change| of every target's nll."""
        self.flips += 1
        if p > 0 and diff[:p].max().item() > self.max_earlier:
            self.max_earlier, self.worst_position = diff[:p].max().item(), p
            self.worst_target = int(diff[:p].argmax())
        self.min_effect = min(self.min_effect, diff[p:].max().item())

    @property
    def verdict(self) -> str:
        if self.max_earlier > self.threshold:
            return "NOT causal"
        # A flip that changes nothing anywhere proves nothing about causality.
        return "causal" if self.min_effect > self.threshold else "inconclusive"

    @property
    def as_expected(self) -> bool:
        return self.verdict == MODES[self.mode][1]

    def fails(self, strict: bool) -> bool:
        """With strict, every mode not causal fails the run; else every unexpected verdict."""
        return self.verdict != "causal" if strict else not self.as_expected


AuditReport = namedtuple("AuditReport", "settings positions results")  # results: [ModeResult]


def tiny_config(tg, s: AuditSettings):
    """A small model with every feature of the record's and its SLOT settings; batches and TTT
    chunks of two sequences, so that batching runs and several chunks are trained on."""
    env = dict(VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=2,
               BIGRAM_VOCAB_SIZE=64, BIGRAM_DIM=16, VE_DIM=8, VE_LAYERS=1, XSA_LAST_N=2,
               TRAIN_SEQ_LEN=s.seq_len, EVAL_SEQ_LEN=s.seq_len, EVAL_STRIDE=s.stride,
               VAL_BATCH_SIZE=8 * 2 * s.seq_len, SLOT_STEPS=s.slot_steps,
               RUN_ID="audit", SEED=s.seed, TTT_CHUNK_TOKENS=2 * s.seq_len)
    return tg.Config.from_env({k: str(v) for k, v in env.items()})


def flip_positions(plan, k: int, seed: int) -> list[int]:
    """K targets inside later windows' scored spans, each with an earlier target in the same span
    (else a mode that only looks within its span could not show a dependence)."""
    rng = np.random.default_rng(seed)
    candidates = [w for w in range(1, len(plan)) if plan.length[w] - plan.score_from[w] >= 2]
    windows = rng.choice(candidates, size=k, replace=k > len(candidates))
    return sorted({int(plan.start[w] + rng.integers(plan.score_from[w] + 1, plan.length[w]))
                   for w in windows})


def score_targets(tg, model, tokens, cfg, luts, modes) -> dict[str, torch.Tensor]:
    """Every target's nll (0 where a mode scores nothing) by the evaluation's own entry points."""
    rt = tg.Runtime()
    s = tg.Scoring(model, model.hidden, tokens, luts, rt)
    out = {}
    if "standard" in modes:
        sums = tg.score_sequences(s, cfg.eval.seq_len, cfg.train.val_batch_size, collect=True)
        out["standard"] = sums.per_target(rt)
    slot_modes = tuple(m for m in ("scored", "context") if m in modes)
    if "sliding" in modes or slot_modes:
        name = "sliding" if "sliding" in modes else ""  # "": SLOT's scorers alone
        scorers = tg.sliding_pass(cfg.eval, s, cfg.eval.stride, name, slot_modes, collect=True)
        out.update({sc.mode if isinstance(sc, tg.SlotScorer) else "sliding": sc.sums.per_target(rt)
                    for sc in scorers})
    if "ttt" in modes:  # on a copy (TTT adapts the model it runs on); its log lines are not ours
        with contextlib.redirect_stdout(io.StringIO()):
            sums, _ = tg.eval_ttt(cfg.eval, rt, copy.deepcopy(model), tokens, luts, collect=True)
        out["ttt"] = sums.per_target(rt)
    return out


def run_audit(s: AuditSettings = AuditSettings()) -> AuditReport:
    """Score every target, then again after each flip, and compare, mode by mode."""
    if not s.modes or set(s.modes) - set(MODES):
        raise ValueError(f"--modes {','.join(s.modes)!r}: expected a comma-separated subset of "
                         f"{','.join(MODES)}")
    if s.positions < 1:  # (SLOT_STEPS is checked by train_gpt.Config)
        raise ValueError(f"--positions {s.positions}: expected at least 1")
    tg = import_train_gpt()
    cfg = tiny_config(tg, s)
    vocab = cfg.model.vocab_size
    plan = tg.sliding_windows(s.targets, s.seq_len, s.stride, cfg.eval.tail)
    positions = flip_positions(plan, s.positions, s.seed)
    rng = np.random.default_rng(s.seed + 1)
    tokens = torch.from_numpy(rng.integers(0, vocab, s.targets + 1))
    luts = unit_luts(vocab)
    results = [ModeResult(m) for m in MODES if m in s.modes]
    with torch_threads(1):  # not no_grad: SLOT fits its delta and bias by gradient
        model = perturbed_model(tg, cfg.model, s.seed, WEIGHT_NOISE).eval()
        base = score_targets(tg, model, tokens, cfg, luts, s.modes)
        for p in positions:
            changed = tokens.clone()  # target p is token p + 1: another token there
            changed[p + 1] = (int(tokens[p + 1]) + int(rng.integers(1, vocab))) % vocab
            after = score_targets(tg, model, changed, cfg, luts, s.modes)
            for r in results:
                r.record(p, (after[r.mode] - base[r.mode]).abs())
    return AuditReport(s, positions, results)


def format_report(r: AuditReport) -> str:
    s = r.settings
    lines = [
        "flip test (docs/evaluation.md): change the target at p, look for a change before p",
        f"a small random model with the record's features, SLOT-{s.slot_steps}; {s.targets} random "
        f"targets, windows of {s.seq_len}, stride {s.stride}",
        f"flipped targets ({len(r.positions)}): {', '.join(map(str, r.positions))}", "",
        format_table(r.results), "",
        f"threshold {THRESHOLD:g}: a larger change of an earlier target's nll means the mode "
        "reads later tokens; 'at/after p' shows each flip did change something"]
    lines += [f"{MODES[x.mode][0]}: flipping target {x.worst_position} moved the nll of target "
              f"{x.worst_target} by {x.max_earlier:.3g}" for x in r.results
              if x.verdict == "NOT causal"]
    return "\n".join(lines)


def format_table(results: list[ModeResult]) -> str:
    header = ("mode", "verdict", "max |dnll| before p", "min |dnll| at/after p", "positions",
              "expected")
    rows = [header] + [(MODES[x.mode][0], x.verdict, f"{x.max_earlier:.3g}",
                        f"{x.min_effect:.3g}", str(x.flips), MODES[x.mode][1]) for x in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def exit_code(results: list[ModeResult], strict: bool) -> int:
    return 1 if any(x.fails(strict) for x in results) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = AuditSettings()
    p.add_argument("--positions", type=int, default=d.positions, help="targets to flip")
    p.add_argument("--slot-steps", type=int, default=d.slot_steps, help="SLOT steps (the record's)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset",
                   type=lambda text: tuple(m.strip() for m in text.split(",") if m.strip()))
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if any mode is not causal (else: if any verdict is unexpected)")
    a = p.parse_args(argv)
    try:
        report = run_audit(AuditSettings(**{k: v for k, v in vars(a).items() if k != "strict"}))
    except (ValueError, import_train_gpt().ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if bad := [MODES[x.mode][0] for x in report.results if x.fails(a.strict)]:
        print(f"result: FAIL ({', '.join(bad)}: {'not causal' if a.strict else 'not as expected'})")
        return 1
    why = "" if a.strict else " (verdicts as expected; SLOT scored fits the targets it scores)"
    print("result: PASS" + why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
