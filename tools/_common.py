"""Small helpers shared by the reviewer tools (audit, preflight)."""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_train_gpt():
    """train_gpt.py sits at the repository root, which is on sys.path only when run from there."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import train_gpt
    return train_gpt


@contextlib.contextmanager
def kept_global_rng():
    """build_model reseeds python, numpy and torch: give the caller its generators back."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)


@contextlib.contextmanager
def torch_threads(n: int):
    """Tiny tensors run fastest on one thread (no OpenMP hand-offs, which stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def perturbed_model(tg, h, seed: int, noise: float):
    """The seeded initial model plus seeded noise on every parameter: at initialisation the output
    projections are zero and the embeddings tiny, so every target would score about ln V
    whatever the input (or the code) does."""
    with kept_global_rng():
        model = tg.build_model(h, torch.device("cpu"), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return model
