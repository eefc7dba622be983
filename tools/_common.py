"""What the reviewer tools share, the import of train_gpt.py among it."""
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
    """Tiny tensors run fastest on one thread (no OpenMP hand-offs to stall a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturbed_model(tg, model_cfg, seed: int, noise: float):
    """The seeded model plus seeded noise: unperturbed, its zero output layers score all ln V."""
    model = tg.build_model(model_cfg, torch.device("cpu"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


def unit_luts(vocab_size: int, device="cpu"):
    """Byte tables without a tokenizer: every token one byte, no spaces, no boundaries."""
    zeros = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    return torch.ones(vocab_size, dtype=torch.int16, device=device), zeros, zeros.clone()


def fit_slot(delta: torch.Tensor, bias: torch.Tensor, slot, loss) -> None:
    """The original's SLOT fit: AdamW on the window's delta and bias, lr on a cosine from
    slot.lr to slot.lr_min over slot.steps; loss() is the batch's fit loss."""
    opt = torch.optim.AdamW([delta, bias], lr=slot.lr, eps=1e-5, weight_decay=1e-8)
    for i in range(slot.steps):
        cosine = 1 + math.cos(math.pi * i / slot.steps)
        for group in opt.param_groups:
            group["lr"] = slot.lr_min + 0.5 * (slot.lr - slot.lr_min) * cosine
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
