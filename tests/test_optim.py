"""Tests of the optimizers and schedules in train_gpt.py against SPEC section 4: Newton-Schulz,
Muon's update, the parameter groups, optimizer settings, the LR warm-down, late QAT's start
and the Muon momentum warm-up."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TRAJECTORY = REPO.parent / "shared" / "reference" / "trajectory" / "expected.json"
CPU = torch.device("cpu")


def hp(**env):
    return tg.Hyperparameters.from_env({k: str(v) for k, v in env.items()})


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # SPEC section 4's quintic a x + b x^3 + c x^5


def ns_by_svd(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz as a function of the singular values, in float64: X <- aX + b(XX^T)X + c(XX^T)^2 X
    keeps X's singular vectors and maps each singular value s to a s + b s^3 + c s^5, so from
    G = U S V^T normalised by its Frobenius norm the result is U p(...p(S / |G|)) V^T."""
    a, b, c = NS_COEFFICIENTS
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / g.double().norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


# ---------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_newton_schulz_is_near_orthogonal(shape):
    """NS5 returns a bf16 matrix of the input's shape whose singular values lie in [0.6, 1.2]
    (observed ~0.67-1.15: the quintic does not converge to 1) and whose direction is the polar factor U V^T."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = tg.newton_schulz5(g, 5)
    assert out.shape == shape and out.dtype == torch.bfloat16
    sv = torch.linalg.svdvals(out.float())
    assert sv.min().item() > 0.6 and sv.max().item() < 1.2
    # Without the iteration the normalised input is far from orthogonal.
    assert torch.linalg.svdvals(tg.newton_schulz5(g, 0).float()).max().item() < 0.3
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (out.float() * polar).sum() / (out.float().norm() * polar.norm())
    assert cos.item() > 0.97


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 32), (96, 32)])
@pytest.mark.parametrize("steps, tolerance", [(1, 0.008), (2, 0.012), (5, 0.06)])
def test_newton_schulz_is_the_polynomial_of_the_singular_values(shape, steps, tolerance):
    """bf16 Newton-Schulz against its float64 spectral form (written with an SVD, not the matrix
    iteration), relative Frobenius error. Measured on these shapes and seeds 0-2: at most 0.41% after
    1 step, 0.68% after 2, 3.8% after 5 (bf16 rounding, amplified by the quintic's slope near 0)."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out, want = tg.newton_schulz5(g, steps).double(), ns_by_svd(g, steps)
    assert ((out - want).norm() / want.norm()).item() < tolerance


def test_newton_schulz_one_by_one_by_hand():
    """A 1 x 1 matrix normalises to exactly 1 (bf16: 2 / (2 + 1e-7) rounds to 1), and one step
    multiplies by a + b + c with each product rounded to bf16 (7 mantissa bits): b -> -4.78125,
    c -> 2.03125, B = -2.75 exactly, a -> 3.4375, so x = 3.4375 - 2.75 = 0.6875 (in float64:
    a + b + c = 0.701). The iteration is odd: -3 gives -0.6875."""
    assert tg.newton_schulz5(torch.tensor([[2.0]]), 0).item() == 1.0
    assert tg.newton_schulz5(torch.tensor([[2.0]]), 1).item() == 0.6875
    assert tg.newton_schulz5(torch.tensor([[-3.0]]), 1).item() == -0.6875


# ---------------------------------------------------------------- Muon


def test_muon_two_steps_match_hand_computation():
    """Two Muon steps on a tall and a wide matrix (one group, one flat buffer) equal the hand computation:
    m = mu m + g, Nesterov g + mu m, bf16 NS, sqrt(max(1, rows/cols)), decoupled weight decay, p - lr u."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(96, 32), (32, 96)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    params = [nn.Parameter(t.clone()) for t in start]
    lr, mu, wd = 0.05, 0.9, 0.04
    opt = tg.Muon(params, lr=lr, momentum=mu, backend_steps=5, weight_decay=wd)
    want = [t.clone() for t in start]
    bufs = [torch.zeros(s) for s in shapes]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for k, g in enumerate(step_grads):
            bufs[k] = mu * bufs[k] + g
            update = tg.newton_schulz5(g + mu * bufs[k], 5)  # tested above against its spectral form
            rows, cols = g.shape
            update = update * math.sqrt(max(1.0, rows / cols))
            want[k] = want[k] * (1 - lr * wd)
            want[k] = want[k] - lr * update.float()
        for k, p in enumerate(params):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[k], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(p.detach(), want[k], rtol=1e-6, atol=1e-6)
    # The tall matrix's update really is scaled by sqrt(3): its step is larger than the wide one's.
    moved = [(p.detach() - s * (1 - lr * wd) ** 2).norm().item() for p, s in zip(params, start)]
    assert moved[0] > 1.5 * moved[1]


# ---------------------------------------------------------------- parameter groups


def expected_groups(h):
    """SPEC section 4's groups, by parameter name."""
    L = h.num_layers
    n_ve = len([s for s in h.ve_layers.split(",") if s])
    embed = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    muon = {f"blocks.{i}.{m}.weight" for i in range(L)
            for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    if h.bigram_dim != h.model_dim:
        muon.add("bigram.proj.weight")
    if h.ve_dim != h.kv_dim:
        muon.add("ve_shared.proj.weight")
    scalar = {"skip_weights", "bigram.scale", "smear.gate", "ve_shared.scale"}
    scalar |= {f"ve_layer_scales.{j}" for j in range(n_ve)}
    scalar |= {f"blocks.{i}.{n}" for i in range(L) for n in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")}
    scalar |= {f"blocks.{i}.attn.vrl_gate" for i in range(1, L)}
    head = set() if h.tie_embeddings else {"lm_head.weight"}
    return {"muon": muon, "embed": embed, "scalar": scalar, "head": head}


def check_split(model, h):
    groups = tg.split_params(model, h)
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(groups) == {"muon", "embed", "scalar", "head"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(names)  # every parameter in exactly one group
    got = {k: {names[id(p)] for p in ps} for k, ps in groups.items()}
    assert got == expected_groups(h)
    return groups


def test_split_params_default(default_model):
    """Default model: 68 Muon matrices (incl. bigram.proj, ve_shared.proj), 3 embeddings, 60 scalars/controls
    (incl. the 2-D skip_weights and resid_mix), no head."""
    h, model = default_model
    groups = check_split(model, h)
    assert [len(groups[k]) for k in ("muon", "embed", "scalar", "head")] == [68, 3, 60, 0]


def test_split_params_untied_head():
    """An untied lm_head goes alone into the head group."""
    h = hp(VOCAB_SIZE=64, NUM_LAYERS=3, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, BIGRAM_DIM=16, VE_DIM=16,
           VE_LAYERS="1,2", XSA_LAST_N=3, TIE_EMBEDDINGS=0)
    groups = check_split(tg.build_model(h, CPU, seed=0), h)
    assert len(groups["head"]) == 1 and groups["head"][0].shape == (64, 64)


# ---------------------------------------------------------------- optimizer settings


def test_build_optimizers_default(default_model):
    """AdamW for embeddings (lr 0.035) and scalars (lr 0.025), betas 0.9/0.95, eps 1e-8, wd 0.04;
    Muon lr 0.025, wd 0.04, 5 NS steps; every lr remembers its base_lr for the schedule."""
    h, model = default_model
    optimizers, muon = tg.build_optimizers(model, h)
    groups = tg.split_params(model, h)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, torch.optim.AdamW, tg.Muon]
    assert optimizers[-1] is muon
    for opt, key, lr in ((optimizers[0], "embed", 0.035), (optimizers[1], "scalar", 0.025)):
        (group,) = opt.param_groups
        assert [id(p) for p in group["params"]] == [id(p) for p in groups[key]]
        assert group["lr"] == group["base_lr"] == lr
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8 and group["weight_decay"] == 0.04
    (group,) = muon.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in groups["muon"]]
    assert group["lr"] == group["base_lr"] == 0.025
    assert group["weight_decay"] == 0.04 and group["backend_steps"] == 5


def test_build_optimizers_untied_head():
    """Untied: embeddings at EMBED_LR 0.6, the head in Adam (no weight decay) at HEAD_LR 0.008."""
    h = hp(VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, BIGRAM_DIM=16, VE_DIM=16,
           VE_LAYERS="1", XSA_LAST_N=2, TIE_EMBEDDINGS=0)
    model = tg.build_model(h, CPU, seed=0)
    optimizers, _ = tg.build_optimizers(model, h)
    assert len(optimizers) == 4
    assert optimizers[0].param_groups[0]["lr"] == 0.6
    head = optimizers[3]
    assert type(head) is torch.optim.Adam
    (group,) = head.param_groups
    assert group["params"] == [model.lm_head.weight]
    assert group["lr"] == group["base_lr"] == 0.008 and group["weight_decay"] == 0
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8


# ---------------------------------------------------------------- schedule


def test_lr_multiplier_by_steps():
    """No cap: 1 until ITERATIONS - WARMDOWN_ITERS, then (ITERATIONS - step) / WARMDOWN_ITERS."""
    h = hp(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    for step in range(100):
        want = 1.0 if step < 80 else (100 - step) / 20
        assert tg.lr_multiplier(h, step, elapsed_ms=123.0 * step) == pytest.approx(want, abs=1e-12), step
    assert tg.lr_multiplier(h, 90, 0.0) == pytest.approx(0.5)
    # ITERATIONS < WARMDOWN_ITERS: the warm-down is already under way at step 0.
    short = hp(ITERATIONS=10, WARMDOWN_ITERS=40, MAX_WALLCLOCK_SECONDS=0)
    assert [tg.lr_multiplier(short, s, 0.0) for s in (0, 5, 9)] == pytest.approx([0.25, 0.125, 0.025])


def test_lr_multiplier_without_warmdown():
    """WARMDOWN_ITERS <= 0: the multiplier is always 1, with or without a cap."""
    for wd in (0, -5):
        for cap in (0, 10):
            h = hp(ITERATIONS=50, WARMDOWN_ITERS=wd, MAX_WALLCLOCK_SECONDS=cap)
            assert all(tg.lr_multiplier(h, s, 300.0 * s) == 1.0 for s in range(0, 60, 7))


def test_lr_multiplier_with_wallclock_cap():
    """Cap: step_ms = elapsed/step, warmdown_ms = WARMDOWN_ITERS * step_ms; m = remaining / warmdown_ms
    once remaining <= warmdown_ms (simulated clock, 100 ms per step, 10 s cap, 20-step warm-down)."""
    h = hp(ITERATIONS=10_000, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=10)
    assert tg.lr_multiplier(h, 0, 0.0) == 1.0
    for step in range(1, 110):
        elapsed = 100.0 * step
        remaining = max(10_000.0 - elapsed, 0.0)
        want = remaining / 2000.0 if remaining <= 2000.0 else 1.0
        assert tg.lr_multiplier(h, step, elapsed) == pytest.approx(want, abs=1e-12), step
    assert tg.lr_multiplier(h, 90, 9000.0) == pytest.approx(0.5)
    assert tg.lr_multiplier(h, 79, 7900.0) == 1.0
    # A slower clock starts the warm-down earlier in steps: 200 ms/step -> 4 s warm-down from 6 s.
    assert tg.lr_multiplier(h, 35, 7000.0) == pytest.approx(3000.0 / 4000.0)


def test_late_qat_starts_at_reference_step():
    """With the reference trajectory's settings (ITERATIONS=30, WARMDOWN_ITERS=12, threshold 0.5) the
    first step with m < LATE_QAT_THRESHOLD is 25, at scale 5/12."""
    h = hp(ITERATIONS=30, WARMDOWN_ITERS=12, LATE_QAT_THRESHOLD=0.5, MAX_WALLCLOCK_SECONDS=0)
    first = next(s for s in range(h.iterations) if tg.lr_multiplier(h, s, 0.0) < h.late_qat_threshold)
    assert first == 25
    assert tg.lr_multiplier(h, first, 0.0) == pytest.approx(5 / 12)
    if EXPECTED_TRAJECTORY.is_file():
        late = json.loads(EXPECTED_TRAJECTORY.read_text())["late_qat"]
        assert late["step"] == first and late["scale"] == f"{5 / 12:.4f}"


def test_muon_momentum_warmup():
    """mu rises linearly from 0.92 at step 0 to 0.99 at step 1500 and stays there."""
    h = hp()
    assert tg.muon_momentum_at(h, 0) == pytest.approx(0.92, abs=1e-15)
    for step in (1, 100, 750, 1234, 1499):
        assert tg.muon_momentum_at(h, step) == pytest.approx(0.92 + 0.07 * step / 1500, abs=1e-12)
    for step in (1500, 1501, 6000):
        assert tg.muon_momentum_at(h, step) == pytest.approx(0.99, abs=1e-15)
    assert tg.muon_momentum_at(hp(MUON_MOMENTUM_WARMUP_STEPS=0), 0) == pytest.approx(0.99, abs=1e-15)
