"""How far this project's SLOT can move from the original's on CUDA, emulated on the CPU.

    python -m tools.slot_tf32 --artifact final_model.int6.ptz [--batches 8]

Model and data settings come from the environment, as for train_gpt.py (PRESET=demo for the CPU
demo's artifact). On CUDA both scripts run SLOT's float32 logit matmul with TF32 (the
original's setting), which keeps 10 of float32's 23 mantissa bits of each operand. The
original computes (h + delta) W^T, so TF32 rounds h + delta; this project computes h W^T once
per batch and adds delta W^T each step (what makes its SLOT fast), so TF32 rounds h and delta
apart: in float32 the same number, under TF32 two roundings of it. This tool runs SLOT both
ways on the same frozen hidden states, with and without emulated TF32 (operands rounded to
nearest in the forward and backward matmuls), and prints the relative change of the mean
scored loss (= of val_bpb): an estimate of size, the hardware's rounding may differ.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tools._common import fit_slot, import_train_gpt, unit_luts

tg = import_train_gpt()


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


def slot_nll(b: SlotBatch, weight, slot, softcap: float, split: bool, tf32: bool) -> torch.Tensor:
    """SLOT (scored mode) on one batch of windows, written out here; `split` is this project's
    h W^T + delta W^T, otherwise the original's (h + delta) W^T. Logits are computed only at the
    scored rows: each row's logits do not depend on the others."""
    linear = TF32Linear.apply if tf32 else F.linear
    rows_b, cols = b.scored.nonzero(as_tuple=True)
    rows, targets = b.hid[rows_b, cols], b.y[rows_b, cols]
    delta = torch.zeros(b.hid.size(0), b.hid.size(-1), requires_grad=True)
    bias = torch.zeros(b.hid.size(0), weight.size(0), requires_grad=True)
    base = linear(rows, weight).detach() if split else None

    def logits():
        z = base + linear(delta, weight)[rows_b] if split else linear(rows + delta[rows_b], weight)
        return softcap * torch.tanh((z + bias[rows_b]) / softcap)

    fit_slot(delta, bias, slot, lambda: F.cross_entropy(logits(), targets, reduction="sum")
             .div(rows_b.numel()))
    with torch.no_grad():
        return F.cross_entropy(logits(), targets, reduction="none")


VARIANTS = {  # name: (split, tf32)
    "full_f32": (False, False), "split_f32": (True, False), "full_tf32": (False, True),
    "split_tf32": (True, True),
}


def compare(batches: list[SlotBatch], weight, slot, softcap: float) -> dict[str, float]:
    """Relative changes of the mean scored loss, the largest per-target gap under TF32, and the
    gap between this tool's float32 split and the script's own SLOT scorer (which ties the
    emulation to the script's SLOT). slot: train_gpt.SlotConfig."""
    nll = {name: [] for name in VARIANTS}
    for b in batches:
        for name, (split, tf32) in VARIANTS.items():
            nll[name].append(slot_nll(b, weight, slot, softcap, split, tf32).double())
    nll = {k: torch.cat(v) for k, v in nll.items()}
    script = torch.cat([b.script for b in batches])

    def rel(a, b):
        return float((nll[a].mean() - nll[b].mean()) / nll[b].mean())

    return dict(
        split_vs_full_f32=rel("split_f32", "full_f32"),
        tf32_vs_f32_original=rel("full_tf32", "full_f32"),
        split_vs_full_tf32=rel("split_tf32", "full_tf32"),
        max_target_gap_tf32=float((nll["split_tf32"] - nll["full_tf32"]).abs().max()),
        script_vs_tool=float((script - nll["split_f32"]).abs().max()),
        targets=int(script.numel()), mean_nll=float(nll["full_f32"].mean()),
    )


def slot_batches(e, s, n_batches: int) -> list[SlotBatch]:
    """The first SLOT batches of the stream as the evaluation groups them (train_gpt.EvalConfig
    `e`, train_gpt.Scoring `s`), each with the script's SLOT scorer's nll of it: the scorer is
    fed the very batches the window pass yields, with per-target collection."""
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


def artifact_batches(cfg, path, n_batches: int) -> tuple[list[SlotBatch], torch.Tensor]:
    """The artifact's model on the first SLOT batches of the validation stream."""
    cpu = torch.device("cpu")
    model = tg.eval_model(cfg.model, tg.read_artifact(path), cpu, path)
    files = tg.shard_files(cfg.data.data_path, "val")
    tokens = tg.load_validation_tokens(files, cfg.max_seq_len, cfg.model.vocab_size)
    s = tg.Scoring(model, model.hidden, tokens, unit_luts(cfg.model.vocab_size), tg.Runtime())
    return slot_batches(cfg.eval, s, n_batches), model.head_weight().detach().float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.slot_tf32",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="final_model.int6.ptz", help="an artifact of train_gpt.py")
    p.add_argument("--batches", type=int, default=8, help="SLOT batches to run (default 8)")
    a = p.parse_args(argv)
    try:
        cfg = tg.Config.from_env({**os.environ, "ARTIFACT": a.artifact})
        batches, weight = artifact_batches(cfg, a.artifact, a.batches)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    slot = cfg.eval.slot
    r = compare(batches, weight, slot, cfg.model.logit_softcap)
    print(f"{len(batches)} SLOT batches, {r['targets']:,} scored targets, SLOT_STEPS={slot.steps}, "
          f"mean loss {r['mean_nll']:.4f}")
    print("relative change of the mean scored loss (= of val_bpb):")
    rows = (("float32: this project's split vs the original's (h + delta) W^T",
             "split_vs_full_f32"),
            ("the original itself, TF32 vs float32", "tf32_vs_f32_original"),
            ("TF32: this project's split vs the original's (h + delta) W^T", "split_vs_full_tf32"))
    width = max(len(label) for label, _ in rows)
    for label, key in rows:
        print(f"  {label:<{width}}  {r[key]:+.1e}")
    print(f"largest per-target loss gap under TF32: {r['max_target_gap_tf32']:.1e}")
    print(f"train_gpt's SLOT scorer vs this tool's float32 split: largest per-target gap "
          f"{r['script_vs_tool']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
