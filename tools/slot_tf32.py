"""How far this project's SLOT can move from the original's on CUDA, emulated on the CPU.

    python -m tools.slot_tf32 --artifact final_model.int6.ptz [--batches 8]

Model and data settings come from the environment, as for train_gpt.py (for the
CPU demo's artifact: PRESET=demo).

On CUDA both scripts run SLOT's float32 logit matmul with TF32 enabled (the
original's setting), and TF32 keeps only 10 of float32's 23 mantissa bits of
each matmul operand. The original computes (h + delta) W^T, so TF32 rounds
h + delta; this project computes h W^T once per batch and adds delta W^T each
step (what makes its SLOT fast), so TF32 rounds h and delta separately. In
float32 the two are the same number to float32 precision; under TF32 they are
two roundings of it. This tool runs SLOT both ways on the same frozen hidden
states, with and without emulated TF32 (operands rounded to nearest in the
forward and the backward matmul), and prints the relative change of the mean
scored loss (= of val_bpb): ours against the original's under TF32, beside
the original's own TF32 against float32. It is an estimate of size: the
hardware's rounding of operands may differ from round-to-nearest.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from tools._common import import_train_gpt
from tools.bench_eval import window_batch

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


def slot_nll(hid, y, scored, weight, h, split: bool, tf32: bool) -> torch.Tensor:
    """SLOT (scored mode) on one batch of windows, written out here; `split` is this project's
    h W^T + delta W^T, otherwise the original's (h + delta) W^T. Logits are computed only at the
    scored rows: each row's logits do not depend on the others."""
    linear = TF32Linear.apply if tf32 else F.linear
    b, t = scored.nonzero(as_tuple=True)
    rows, targets = hid[b, t], y[b, t]
    delta = torch.zeros(hid.size(0), hid.size(-1), requires_grad=True)
    bias = torch.zeros(hid.size(0), weight.size(0), requires_grad=True)
    base = linear(rows, weight).detach() if split else None

    def logits():
        z = base + linear(delta, weight)[b] if split else linear(rows + delta[b], weight)
        return h.logit_softcap * torch.tanh((z + bias[b]) / h.logit_softcap)

    opt = torch.optim.AdamW([delta, bias], lr=h.slot_lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8)
    for i in range(h.slot_steps):
        for group in opt.param_groups:
            group["lr"] = h.slot_lr_min + 0.5 * (h.slot_lr - h.slot_lr_min) * (1 + math.cos(math.pi * i / h.slot_steps))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(logits(), targets, reduction="sum").div(b.numel()).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(logits(), targets, reduction="none")


VARIANTS = {  # name: (split, tf32)
    "full_f32": (False, False), "split_f32": (True, False), "full_tf32": (False, True), "split_tf32": (True, True),
}


def compare(batches, weight, h) -> dict[str, float]:
    """batches: (hidden, targets, scored mask) triples. Relative changes of the mean scored loss,
    the largest per-target gap under TF32, and the gap between this tool's float32 split and
    train_gpt.slot_fit_and_score (which ties the emulation to the script's own SLOT)."""
    nll = {name: [] for name in VARIANTS}
    script = []
    for hid, y, scored in batches:
        for name, (split, tf32) in VARIANTS.items():
            nll[name].append(slot_nll(hid, y, scored, weight, h, split, tf32).double())
        script.append(tg.slot_fit_and_score(hid, y, scored, scored, weight, h).double())
    nll = {k: torch.cat(v) for k, v in nll.items()}
    script = torch.cat(script)

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


def artifact_batches(h, n_batches: int):
    """The first SLOT batches of the validation stream, as eval_windows groups them."""
    model = tg.load_eval_model(h, torch.device("cpu"))
    tokens = tg.load_validation_tokens(tg.shard_files(h.data_path, "val"), h.train_seq_len, h.vocab_size)
    plan = tg.sliding_windows(tokens.numel() - 1, h.effective_eval_seq_len, h.eval_stride, h.eval_tail)
    out = []
    for idx in tg.window_batches(len(plan), h.slot_batch_seqs, h.slot_interleave)[:n_batches]:
        x, y, scored = window_batch(tokens, plan, idx, h.effective_eval_seq_len, torch.device("cpu"))
        with torch.no_grad():
            out.append((model.hidden(x).float(), y, scored))
    return out, model.head_weight().detach().float()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.slot_tf32", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="final_model.int6.ptz", help="an artifact of train_gpt.py")
    p.add_argument("--batches", type=int, default=8, help="SLOT batches to run (default 8)")
    a = p.parse_args(argv)
    try:
        h = replace(tg.Hyperparameters.from_env(), artifact=a.artifact)
        batches, weight = artifact_batches(h, a.batches)
    except tg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    r = compare(batches, weight, h)
    print(f"{len(batches)} SLOT batches, {r['targets']:,} scored targets, SLOT_STEPS={h.slot_steps}, "
          f"mean loss {r['mean_nll']:.4f}")
    print("relative change of the mean scored loss (= of val_bpb):")
    print(f"  float32: this project's split vs the original's (h + delta) W^T  {r['split_vs_full_f32']:+.1e}")
    print(f"  the original itself, TF32 vs float32                            {r['tf32_vs_f32_original']:+.1e}")
    print(f"  TF32: this project's split vs the original's (h + delta) W^T     {r['split_vs_full_tf32']:+.1e}")
    print(f"largest per-target loss gap under TF32: {r['max_target_gap_tf32']:.1e}")
    print(f"train_gpt.slot_fit_and_score vs this tool's float32 split: largest per-target gap {r['script_vs_tool']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
