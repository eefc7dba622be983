"""How far this project's SLOT can move from the original's on CUDA, emulated on the CPU.

    python -m tools.slot_tf32 --artifact final_model.int6.ptz   # on the first 8 SLOT batches

Settings come from the environment, as for train_gpt.py (PRESET=demo for the demo's artifact).
CUDA's TF32 rounds h + delta in the original's (h + delta) W^T, h and delta apart in this
project's h W^T + delta W^T: both run here with and without emulated TF32.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tools._common import fit_slot, import_train_gpt, unit_luts

tg = import_train_gpt()
REPORT = """
{batches} SLOT batches, {targets:,} scored targets, SLOT_STEPS={steps}, mean loss {mean_nll:.4f}
relative change of the mean scored loss (= of val_bpb):
  float32: this project's split vs the original's (h + delta) W^T  {split_vs_full_f32:+.1e}
  the original itself, TF32 vs float32                             {tf32_vs_f32_original:+.1e}
  TF32: this project's split vs the original's (h + delta) W^T     {split_vs_full_tf32:+.1e}
largest per-target loss gap under TF32: {max_target_gap_tf32:.1e}
train_gpt's SLOT scorer vs this tool's float32 split: largest per-target gap {script_vs_tool:.1e}
""".strip()


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Float32 rounded to TF32's 10 mantissa bits, to nearest, ties to even (finite values)."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


class TF32Linear(torch.autograd.Function):
    """x W^T with both operands rounded to TF32, in the backward matmul too (W is frozen)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return round_tf32(x) @ round_tf32(weight).T

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return round_tf32(grad) @ round_tf32(weight), None


@dataclass
class SlotBatch:
    """One SLOT batch as the evaluation's window pass yields it, and the script's own result."""
    hid: torch.Tensor  # [rows, L, d] float32 final hidden states
    y: torch.Tensor  # [rows, L] targets
    scored: torch.Tensor  # [rows, L] bool: the positions each window scores
    script: torch.Tensor  # train_gpt's SLOT nll of those targets, in the mask's order


def slot_nll(b: SlotBatch, weight, slot, softcap: float, split: bool = False, tf32: bool = False,
             everywhere: bool = False) -> torch.Tensor:
    """SLOT (scored mode) written out, `split` as this project's h W^T + delta W^T, else as the
    original's (h + delta) W^T; logits at the scored positions (rows are independent), or,
    `everywhere`, at every position as the original (its cost, for tools.bench_eval)."""
    linear = TF32Linear.apply if tf32 else F.linear
    rows_b, cols = (torch.ones_like(b.scored) if everywhere else b.scored).nonzero(as_tuple=True)
    rows, targets, keep = b.hid[rows_b, cols], b.y[rows_b, cols], b.scored[rows_b, cols]
    delta = torch.zeros(b.hid.size(0), b.hid.size(-1), device=rows.device, requires_grad=True)
    bias = torch.zeros(b.hid.size(0), weight.size(0), device=rows.device, requires_grad=True)
    base = linear(rows, weight).detach() if split else None

    def nll():
        z = base + linear(delta, weight)[rows_b] if split else linear(rows + delta[rows_b], weight)
        logits = softcap * torch.tanh((z + bias[rows_b]) / softcap)
        return F.cross_entropy(logits, targets, reduction="none")

    fit_slot(delta, bias, slot, lambda: (nll() * keep).sum() / keep.sum())  # no sync: no [keep]
    with torch.no_grad():
        return nll()[keep]


def compare(batches: list[SlotBatch], weight, slot, softcap: float) -> dict[str, float]:
    """The relative changes of the mean scored loss, the largest per-target gap under TF32, and
    the gap of this tool's float32 split to the script's SLOT (which ties the two together)."""
    full_f32, full_tf32, split_f32, split_tf32 = (
        torch.cat([slot_nll(b, weight, slot, softcap, split, tf32).double() for b in batches])
        for split in (False, True) for tf32 in (False, True))
    script = torch.cat([b.script for b in batches])
    return dict(
        split_vs_full_f32=float(split_f32.mean() / full_f32.mean() - 1),
        tf32_vs_f32_original=float(full_tf32.mean() / full_f32.mean() - 1),
        split_vs_full_tf32=float(split_tf32.mean() / full_tf32.mean() - 1),
        max_target_gap_tf32=float((split_tf32 - full_tf32).abs().max()),
        script_vs_tool=float((script - split_f32).abs().max()),
        targets=int(script.numel()), mean_nll=float(full_f32.mean()))


def slot_batches(e, s, n_batches: int) -> list[SlotBatch]:
    """The first SLOT batches as the evaluation groups them (train_gpt.EvalConfig `e`, Scoring
    `s`), each with the nll the script's SLOT scorer gives the very batch the pass yields."""
    plan = tg.sliding_windows(s.n_targets, e.seq_len, e.window_stride, e.tail)
    batches = tg.window_batches(len(plan), e.slot.batch_seqs, e.slot.interleave)[:n_batches]
    rows = max(len(b) for b in batches)
    scorer = tg.SlotScorer("scored", e.slot, s, plan, batches, rows)
    scorer.sums = tg.Sums(s.rt.device, s.n_targets)
    out = []
    for b in tg.window_pass(s, plan, batches, rows, e.seq_len, collect=True):
        scorer(s, b)
        out.append(SlotBatch(b.hid.float(), b.y, torch.from_numpy(b.scored),
                             scorer.sums.nll[b.where].float()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.slot_tf32",
                                description=__doc__.split("\n")[0])
    p.add_argument("--artifact", default="final_model.int6.ptz", help="an artifact of train_gpt.py")
    a = p.parse_args(argv)
    try:  # the artifact's model on the first SLOT batches of the validation stream
        cfg = tg.Config.from_env()
        model = tg.eval_model(cfg.model, tg.read_artifact(a.artifact), torch.device("cpu"),
                              a.artifact)
        files = tg.shard_files(cfg.data.data_path, "val")
        tokens = tg.load_validation_tokens(files, cfg.max_seq_len, cfg.model.vocab_size)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = tg.Scoring(model, model.hidden, tokens, unit_luts(cfg.model.vocab_size), tg.Runtime())
    batches, slot = slot_batches(cfg.eval, s, 8), cfg.eval.slot
    r = compare(batches, model.head_weight().detach().float(), slot, cfg.model.logit_softcap)
    print(REPORT.format(batches=len(batches), steps=slot.steps, **r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
