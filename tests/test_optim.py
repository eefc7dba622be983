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
from tests.test_model import default_config_and_model

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TRAJECTORY = REPO.parent / "shared" / "reference" / "trajectory" / "expected.json"
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


@pytest.fixture(scope="module")
def default_model() -> tuple[tg.Config, tg.GPT]:
    """(Config, GPT) of the defaults, built once per session (tests/test_model.py)."""
    return default_config_and_model()


def config(**env) -> tg.Config:
    return tg.Config.from_env({k: str(v) for k, v in env.items()})


def schedule(**env) -> tg.Schedule:
    """The schedule of a run under these settings (the training cap is MAX_WALLCLOCK_SECONDS)."""
    cfg = config(**env)
    return tg.Schedule.of(cfg.train, cfg.optim, cfg.train.max_wallclock_seconds)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # SPEC section 4's quintic a x + b x^3 + c x^5


def ns_by_svd(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz as a function of the singular values, in float64:
    X <- aX + b(XX^T)X + c(XX^T)^2 X keeps X's singular vectors and maps each singular value s
    to a s + b s^3 + c s^5, so from G = U S V^T normalised by its Frobenius norm the result is
    U p(...p(S / |G|)) V^T."""
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
    (observed ~0.67-1.15: the quintic does not converge to 1) and whose direction is the polar
    factor U V^T."""
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
    iteration), relative Frobenius error. Measured on these shapes and seeds 0-2: at most 0.41%
    after 1 step, 0.68% after 2, 3.8% after 5 (bf16 rounding, amplified by the quintic's slope
    near 0)."""
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


@pytest.mark.parametrize("k", [64, 512])
def test_cpu_bf16_matmul_rounds_the_exact_product_once(k):
    """The CPU's bf16 product is the float64 product of its bf16 inputs rounded once to bf16:
    within half a bf16 step, plus float32 accumulation's bound (K u sum |p q|, u = 2^-24), which
    near-cancelling sums need. torch's own bf16 GEMM agrees with it but in a few entries."""
    gen = torch.Generator().manual_seed(k)
    p = torch.randn(96, k, generator=gen).bfloat16()
    q = torch.randn(k, 128, generator=gen).bfloat16()
    got = tg.cpu_bf16_matmul(p, q)
    assert got.dtype == torch.bfloat16 and got.shape == (96, 128)
    exact = p.double() @ q.double()
    step = torch.pow(2.0, (torch.frexp(exact)[1] - 8).double())  # bf16: 8 significant bits
    accumulation = k * 2.0**-24 * (p.double().abs() @ q.double().abs())
    err = (got.double() - exact).abs()
    assert torch.all(err <= 0.5 * step + accumulation)
    assert (got != p @ q).float().mean() < 0.01


# ---------------------------------------------------------------- Muon


def test_muon_two_steps_match_hand_computation():
    """Two Muon steps on a tall and a wide matrix (one group, one flat buffer) equal the hand
    computation: m = mu m + g, Nesterov g + mu m, bf16 NS, sqrt(max(1, rows/cols)), decoupled
    weight decay, p - lr u."""
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
            # (Newton-Schulz is tested above against its spectral form.)
            update = tg.newton_schulz5(g + mu * bufs[k], 5)
            rows, cols = g.shape
            update = update * math.sqrt(max(1.0, rows / cols))
            want[k] = want[k] * (1 - lr * wd)
            want[k] = want[k] - lr * update.float()
        for k, p in enumerate(params):
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], bufs[k], rtol=1e-6,
                                       atol=1e-6)
            torch.testing.assert_close(p.detach(), want[k], rtol=1e-6, atol=1e-6)
    # The tall matrix's update really is scaled by sqrt(3): its step is larger than the wide one's.
    moved = [(p.detach() - s * (1 - lr * wd) ** 2).norm().item() for p, s in zip(params, start)]
    assert moved[0] > 1.5 * moved[1]


# ---------------------------------------------------------------- parameter groups


def expected_groups(mc: tg.GPTConfig) -> dict[str, set[str]]:
    """SPEC section 4's groups, by parameter name."""
    L = mc.num_layers
    n_ve = len([s for s in mc.ve_layers.split(",") if s])
    embed = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    matrix = {f"blocks.{i}.{m}.weight" for i in range(L)
              for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    if mc.bigram_dim != mc.model_dim:
        matrix.add("bigram.proj.weight")
    if mc.ve_dim != mc.kv_dim:
        matrix.add("ve_shared.proj.weight")
    scalar = {"skip_weights", "bigram.scale", "smear.gate", "ve_shared.scale"}
    scalar |= {f"ve_layer_scales.{j}" for j in range(n_ve)}
    scalar |= {f"blocks.{i}.{n}" for i in range(L)
               for n in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain")}
    scalar |= {f"blocks.{i}.attn.vrl_gate" for i in range(1, L)}
    head = set() if mc.tie_embeddings else {"lm_head.weight"}
    return {"matrix": matrix, "embed": embed, "scalar": scalar, "head": head}


def check_split(model: tg.GPT) -> dict[str, list]:
    groups = tg.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(groups) == {"matrix", "embed", "scalar", "head"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(names)  # every parameter in exactly one group
    got = {k: {names[id(p)] for p in ps} for k, ps in groups.items()}
    assert got == expected_groups(model.cfg)
    for ps in groups.values():  # each group in the model's parameter order
        order = [id(p) for p in model.parameters() if id(p) in {id(q) for q in ps}]
        assert [id(p) for p in ps] == order
    return groups


def test_param_groups_default(default_model):
    """Default model: 68 Muon matrices (incl. bigram.proj, ve_shared.proj), 3 embeddings, 60
    scalars/controls (incl. the 2-D skip_weights and resid_mix), no head."""
    _, model = default_model
    groups = check_split(model)
    assert [len(groups[k]) for k in ("matrix", "embed", "scalar", "head")] == [68, 3, 60, 0]


def test_param_groups_untied_head():
    """An untied lm_head goes alone into the head group."""
    cfg = config(VOCAB_SIZE=64, NUM_LAYERS=3, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
                 BIGRAM_DIM=16, VE_DIM=16, VE_LAYERS="1,2", XSA_LAST_N=3, TIE_EMBEDDINGS=0)
    groups = check_split(tg.build_model(cfg.model, CPU, seed=0))
    assert len(groups["head"]) == 1 and groups["head"][0].shape == (64, 64)


# ---------------------------------------------------------------- optimizer settings


def test_build_optimizers_default(default_model):
    """AdamW for embeddings (lr 0.035) and scalars (lr 0.025), betas 0.9/0.95, eps 1e-8, wd 0.04;
    Muon lr 0.025, wd 0.04, 5 NS steps, eager Newton-Schulz unless compiled; every lr
    remembers its base_lr for the schedule."""
    cfg, model = default_model
    optimizers = tg.build_optimizers(model, cfg.optim)
    groups = tg.param_groups(model)
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, torch.optim.AdamW, tg.Muon]
    muon = optimizers[-1]
    for opt, key, lr in ((optimizers[0], "embed", 0.035), (optimizers[1], "scalar", 0.025)):
        (group,) = opt.param_groups
        assert [id(p) for p in group["params"]] == [id(p) for p in groups[key]]
        assert group["lr"] == group["base_lr"] == lr
        assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8
        assert group["weight_decay"] == 0.04
    (group,) = muon.param_groups
    assert [id(p) for p in group["params"]] == [id(p) for p in groups["matrix"]]
    assert group["lr"] == group["base_lr"] == 0.025
    assert group["weight_decay"] == 0.04 and group["backend_steps"] == 5
    assert group["momentum"] == 0.99
    assert muon.orthogonalize is tg.newton_schulz5


def test_build_optimizers_untied_head():
    """Untied: embeddings at EMBED_LR 0.6, the head in Adam (no weight decay) at HEAD_LR 0.008."""
    cfg = config(VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1,
                 BIGRAM_DIM=16, VE_DIM=16, VE_LAYERS="1", XSA_LAST_N=2, TIE_EMBEDDINGS=0)
    model = tg.build_model(cfg.model, CPU, seed=0)
    optimizers = tg.build_optimizers(model, cfg.optim)
    assert len(optimizers) == 4 and type(optimizers[2]) is tg.Muon
    assert optimizers[0].param_groups[0]["lr"] == 0.6
    head = optimizers[3]
    assert type(head) is torch.optim.Adam
    (group,) = head.param_groups
    assert group["params"] == [model.lm_head.weight]
    assert group["lr"] == group["base_lr"] == 0.008 and group["weight_decay"] == 0
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-8


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_newton_schulz_builds_one_graph_per_matrix_shape(fresh_dynamo, monkeypatch):
    """build_optimizers(compiled=True) compiles Newton-Schulz for fixed shapes (dynamic=False):
    one Muon step of a model with three matrix shapes (32x32, 64x32, 32x64) builds exactly
    three graphs (dynamo's "eager" backend: the same tracing and guards, no C++ compiler), and
    a second step builds none."""
    calls, compile_ = [], torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return compile_(fn, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    cfg = config(VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=2, NUM_KV_HEADS=2,
                 MLP_MULT=2, BIGRAM_DIM=32, VE_DIM=32, VE_LAYERS="1", XSA_LAST_N=2, ROPE_DIMS=8)
    model = tg.build_model(cfg.model, CPU, seed=0)
    optimizers = tg.build_optimizers(model, cfg.optim, compiled=True)
    assert calls == [dict(dynamic=False)]
    muon = optimizers[2]
    shapes = {tuple(p.shape) for p in muon.param_groups[0]["params"]}
    assert shapes == {(32, 32), (64, 32), (32, 64)}
    gen = torch.Generator().manual_seed(0)
    stats = torch._dynamo.utils.counters["stats"]
    graphs = [stats["unique_graphs"]]
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        muon.step()
        graphs.append(stats["unique_graphs"])
    assert graphs[1] - graphs[0] == len(shapes)
    assert graphs[2] == graphs[1]


# ---------------------------------------------------------------- schedule


def test_lr_scale_by_steps():
    """No cap: 1 until ITERATIONS - WARMDOWN_ITERS, then (ITERATIONS - step) / WARMDOWN_ITERS."""
    sched = schedule(ITERATIONS=100, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=0)
    assert sched.cap_ms is None
    for step in range(100):
        want = 1.0 if step < 80 else (100 - step) / 20
        assert sched.lr_scale(step, 123.0 * step) == pytest.approx(want, abs=1e-12), step
    assert sched.lr_scale(90, 0.0) == pytest.approx(0.5)
    # ITERATIONS < WARMDOWN_ITERS: the warm-down is already under way at step 0.
    short = schedule(ITERATIONS=10, WARMDOWN_ITERS=40, MAX_WALLCLOCK_SECONDS=0)
    assert [short.lr_scale(s, 0.0) for s in (0, 5, 9)] == pytest.approx([0.25, 0.125, 0.025])


def test_lr_scale_without_warmdown():
    """WARMDOWN_ITERS <= 0: the multiplier is always 1, with or without a cap."""
    for wd in (0, -5):
        for cap in (0, 10):
            sched = schedule(ITERATIONS=50, WARMDOWN_ITERS=wd, MAX_WALLCLOCK_SECONDS=cap)
            assert all(sched.lr_scale(s, 300.0 * s) == 1.0 for s in range(0, 60, 7))


def test_lr_scale_with_wallclock_cap():
    """Cap: step_ms = elapsed/step, warmdown_ms = WARMDOWN_ITERS * step_ms; m = remaining /
    warmdown_ms once remaining <= warmdown_ms (simulated clock, 100 ms per step, 10 s cap,
    20-step warm-down)."""
    sched = schedule(ITERATIONS=10_000, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=10)
    assert sched.cap_ms == 10_000.0
    assert sched.lr_scale(0, 0.0) == 1.0
    for step in range(1, 110):
        elapsed = 100.0 * step
        remaining = max(10_000.0 - elapsed, 0.0)
        want = remaining / 2000.0 if remaining <= 2000.0 else 1.0
        assert sched.lr_scale(step, elapsed) == pytest.approx(want, abs=1e-12), step
    assert sched.lr_scale(90, 9000.0) == pytest.approx(0.5)
    assert sched.lr_scale(79, 7900.0) == 1.0
    # A slower clock starts the warm-down earlier in steps: 200 ms/step -> 4 s warm-down from 6 s.
    assert sched.lr_scale(35, 7000.0) == pytest.approx(3000.0 / 4000.0)


def test_the_cap_is_the_one_the_run_passes():
    """Schedule.of takes the cap as an argument (GPTQ's reserve comes off it), not from the
    config: the same settings under a 9 s cap warm down from 7 s."""
    cfg = config(ITERATIONS=10_000, WARMDOWN_ITERS=20, MAX_WALLCLOCK_SECONDS=10)
    sched = tg.Schedule.of(cfg.train, cfg.optim, 9.0)
    assert sched.cap_ms == 9000.0
    assert sched.lr_scale(80, 8000.0) == pytest.approx(0.5)
    assert tg.Schedule.of(cfg.train, cfg.optim, 0.0).cap_ms is None
    assert tg.Schedule.of(cfg.train, cfg.optim, -1.0).cap_ms is None


def test_late_qat_starts_at_reference_step():
    """With the reference trajectory's settings (ITERATIONS=30, WARMDOWN_ITERS=12, threshold 0.5)
    the first step with m < LATE_QAT_THRESHOLD is 25, at scale 5/12."""
    sched = schedule(ITERATIONS=30, WARMDOWN_ITERS=12, LATE_QAT_THRESHOLD=0.5,
                     MAX_WALLCLOCK_SECONDS=0)
    first = next(s for s in range(30) if sched.late_qat(sched.lr_scale(s, 0.0)))
    assert first == 25
    assert sched.lr_scale(first, 0.0) == pytest.approx(5 / 12)
    assert next(s for s in range(30) if sched.lr_scale(s, 0.0) < 0.5) == first
    if EXPECTED_TRAJECTORY.is_file():
        late = json.loads(EXPECTED_TRAJECTORY.read_text())["late_qat"]
        assert late["step"] == first and late["scale"] == f"{5 / 12:.4f}"


def test_muon_momentum_warmup():
    """mu rises linearly from 0.92 at step 0 to 0.99 at step 1500 and stays there."""
    sched = schedule()
    assert sched.momentum(0) == pytest.approx(0.92, abs=1e-15)
    for step in (1, 100, 750, 1234, 1499):
        assert sched.momentum(step) == pytest.approx(0.92 + 0.07 * step / 1500, abs=1e-12)
    for step in (1500, 1501, 6000):
        assert sched.momentum(step) == pytest.approx(0.99, abs=1e-15)
    assert schedule(MUON_MOMENTUM_WARMUP_STEPS=0).momentum(0) == pytest.approx(0.99, abs=1e-15)


def original_lr_multiplier(iterations, warmdown, cap_s, step, elapsed_ms):
    """The original's lr_multiplier(h, step, elapsed_ms), written out."""
    if warmdown <= 0:
        return 1.0
    if cap_s <= 0:
        if max(iterations - warmdown, 0) <= step < iterations:
            return max((iterations - step) / warmdown, 0.0)
        return 1.0
    warmdown_ms = warmdown * (elapsed_ms / max(step, 1))
    remaining_ms = max(1000.0 * cap_s - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


def original_momentum(start, end, warmup, step):
    """The original's muon_momentum_at(h, step), written out."""
    frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
    return (1 - frac) * start + frac * end


@pytest.mark.parametrize("iterations, warmdown, cap", [
    (100, 20, 0), (10, 40, 0), (50, 0, 0), (50, -5, 7), (60, 25, 3.0), (10_000, 20, 10),
    (200, 50, -1), (30, 12, 0.25)])
def test_schedule_equals_the_original_formulas(iterations, warmdown, cap):
    """lr_scale and momentum equal the original's lr_multiplier and muon_momentum_at exactly,
    over a grid of steps and elapsed times, with and without a wall-clock cap; late QAT is on
    exactly when the multiplier is under a positive threshold."""
    env = dict(ITERATIONS=iterations, WARMDOWN_ITERS=warmdown, MAX_WALLCLOCK_SECONDS=cap,
               MUON_MOMENTUM_WARMUP_START=0.85, MUON_MOMENTUM=0.95,
               MUON_MOMENTUM_WARMUP_STEPS=iterations // 3)
    sched = schedule(**env)
    thresholds = (0.0, -1.0, 0.15, 0.5)
    late = [schedule(**env, LATE_QAT_THRESHOLD=t) for t in thresholds]
    steps = sorted({0, 1, 2, iterations // 2, iterations - warmdown, iterations - 1, iterations,
                    iterations + 3} | set(range(0, iterations + 5, max(iterations // 17, 1))))
    for step in steps:
        assert sched.momentum(step) == original_momentum(0.85, 0.95, iterations // 3, step)
        for ms_per_step in (0.0, 1.0, 37.5, 100.0, 250.0, 1e4):
            elapsed = ms_per_step * step
            want = original_lr_multiplier(iterations, warmdown, cap, step, elapsed)
            assert sched.lr_scale(step, elapsed) == want, (step, elapsed)
            for threshold, s in zip(thresholds, late):
                assert s.late_qat(want) == (threshold > 0 and want < threshold)
