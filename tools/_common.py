"""Small helpers shared by the reviewer tools (audit, preflight, bench_eval, slot_tf32): each
tool reaches train_gpt.py through its documented entry points and these, never through another
tool."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_train_gpt():
    """train_gpt.py sits at the repository root, which is on sys.path only when run from there."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt
    return train_gpt


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny tensors run fastest on one thread (no OpenMP hand-offs, which stall on a busy
    machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturbed_model(tg, model_cfg, seed: int, noise: float):
    """The seeded initial model (train_gpt.GPTConfig model_cfg) plus seeded noise on every
    parameter: at initialisation the output projections are zero and the embeddings tiny, so
    every target would score about ln V whatever the input (or the code) does."""
    model = tg.build_model(model_cfg, torch.device("cpu"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


def unit_luts(vocab_size: int, device="cpu"):
    """Byte tables without a tokenizer: every token one byte, no spaces, no boundaries."""
    return (torch.ones(vocab_size, dtype=torch.int16, device=device),
            torch.zeros(vocab_size, dtype=torch.bool, device=device),
            torch.zeros(vocab_size, dtype=torch.bool, device=device))


def fit_slot(delta: torch.Tensor, bias: torch.Tensor, slot, loss) -> None:
    """The original's SLOT fit, written out for the tools' reference SLOTs: AdamW on the
    window's delta and bias, its lr on a cosine from SLOT_LR to SLOT_LR_MIN over SLOT_STEPS
    (train_gpt.SlotConfig `slot`); loss() is the batch's fit loss."""
    opt = torch.optim.AdamW([delta, bias], lr=slot.lr, betas=(0.9, 0.999), eps=1e-5,
                            weight_decay=1e-8)
    for i in range(slot.steps):
        cosine = 1 + math.cos(math.pi * i / slot.steps)
        for group in opt.param_groups:
            group["lr"] = slot.lr_min + 0.5 * (slot.lr - slot.lr_min) * cosine
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
