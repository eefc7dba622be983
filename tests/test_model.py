"""Tests of the model in train_gpt.py against SPEC section 3: state-dict layout, initialisation
and its random draws, the forward computation (checked against an independent float64
re-implementation), causality, torch.compile and the QAT fake quantisation."""

import ast
import functools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
CPU = torch.device("cpu")
DEFAULT_PARAMS = 26_862_694

# Small tensors: one thread is faster, and immune to other processes on the cores.
pytestmark = pytest.mark.usefixtures("one_thread")

# A small model that still has every component: bigram.proj and ve_shared.proj, GQA,
# partial RoPE, XSA on some layers only, VE on layer 0 (so v_first excludes VE), U-Net skips.
TINY = dict(
    VOCAB_SIZE="64", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
    MLP_MULT="2", ROPE_DIMS="8", XSA_LAST_N="3", BIGRAM_VOCAB_SIZE="50", BIGRAM_DIM="24",
    VE_DIM="8", VE_LAYERS="0,3", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32",
)


def tiny_cfg(**overrides) -> tg.GPTConfig:
    """The model section of TINY with `overrides`."""
    env = dict(TINY)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Config.from_env(env).model


@functools.cache
def default_config_and_model() -> tuple[tg.Config, tg.GPT]:
    """The default 27M-parameter model (SEED 1337), built once per session for the test
    modules that read it (test_model, test_optim, test_export): its orthogonal initialisation
    alone takes seconds. Nothing may modify it."""
    cfg = tg.Config.from_env({})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded machine 2 threads took 30 s instead of 1.5
    try:
        return cfg, tg.build_model(cfg.model, CPU, seed=cfg.run.seed)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def default_model():
    """(Config, GPT) of the defaults; shadows conftest's fixture of the old API."""
    return default_config_and_model()


def bf16(t):
    return t.bfloat16().float()


# ---------------------------------------------------------------- layout and count


def expected_param_count(mc):
    """Parameter count from SPEC section 3's component list, written out by hand."""
    d, V, L = mc.model_dim, mc.vocab_size, mc.num_layers
    kv = mc.num_kv_heads * (d // mc.num_heads)
    hidden = int(mc.mlp_mult * d)
    n = V * d  # tok_emb
    n += (L // 2) * d  # skip_weights
    n += 1 + mc.bigram_vocab_size * mc.bigram_dim + (mc.bigram_dim * d if mc.bigram_dim != d else 0)
    n += d  # smear
    per_block = 2 * d + 2 * d + mc.num_heads + d * d + 2 * d * kv + d * d + 2 * d * hidden
    n += L * per_block + (L - 1)  # vrl_gate on layers >= 1
    ve_layers = [s for s in mc.ve_layers.split(",") if s]
    n += 1 + V * mc.ve_dim + (mc.ve_dim * kv if mc.ve_dim != kv else 0) + len(ve_layers)
    return n


def test_default_parameter_count(default_model):
    """The default model has exactly the record's 26,862,694 parameters."""
    cfg, model = default_model
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_PARAMS
    assert expected_param_count(cfg.model) == DEFAULT_PARAMS


def test_trajectory_config_parameter_count():
    """The reference trajectory's tiny config has 186,764 parameters (its logged model_params)."""
    mc = tg.Config.from_env(dict(
        VOCAB_SIZE="1024", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
        MLP_MULT="2", BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1,2", XSA_LAST_N="3",
        TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="64")).model
    model = tg.build_model(mc, CPU, seed=7)
    assert sum(p.numel() for p in model.parameters()) == 186_764 == expected_param_count(mc)


def test_default_state_dict_matches_reference_layout(default_model):
    """Keys, their order and shapes equal the original's state dict
    (reference/seed_state_dict.tsv)."""
    tsv = REFERENCE / "seed_state_dict.tsv"
    if not tsv.is_file():
        pytest.skip("../shared/reference/seed_state_dict.tsv is absent")
    expected = []
    for line in tsv.read_text().splitlines():
        if line.strip():
            name, shape = line.split("\t")
            expected.append((name, tuple(ast.literal_eval(shape))))
    _, model = default_model
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected
    assert sum(math.prod(s) for _, s in expected) == DEFAULT_PARAMS


# ---------------------------------------------------------------- initialisation


def test_default_init_values(default_model):
    """Default init: bf16-exact values, the bf16-rounded scalars, zero output projections and
    bigram table, orthogonal c_q, and the seed quirk: bigram.proj / ve_shared.proj orthogonal /
    sqrt(2L)."""
    cfg, model = default_model
    mc = cfg.model
    sd = model.state_dict()
    for name, t in sd.items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, bf16(t)), f"{name} is not bf16-representable"
    assert sd["bigram.scale"].item() == 0.050048828125
    assert sd["ve_shared.scale"].item() == 0.10009765625
    assert not torch.any(sd["bigram.embed.weight"])
    L = mc.num_layers
    for i in range(L):
        assert not torch.any(sd[f"blocks.{i}.attn.proj.weight"])
        assert not torch.any(sd[f"blocks.{i}.mlp.proj.weight"])
        assert torch.equal(sd[f"blocks.{i}.attn.q_gain"], torch.full((8,), 4.0))
        assert torch.equal(sd[f"blocks.{i}.resid_mix"][0], torch.ones(512))
        assert not torch.any(sd[f"blocks.{i}.resid_mix"][1])
        if i:
            assert sd[f"blocks.{i}.attn.vrl_gate"].item() == -1.5
        wq = sd[f"blocks.{i}.attn.c_q.weight"].double()
        torch.testing.assert_close(wq @ wq.T, torch.eye(512, dtype=torch.float64), atol=2e-2,
                                   rtol=0)
    assert torch.equal(sd["skip_weights"], torch.ones(5, 512))
    assert not torch.any(sd["smear.gate"])
    # Tall matrices (512x128, 256x128): orthonormal columns scaled by 1/sqrt(2L), so
    # W^T W = I / (2L).
    for name in ("bigram.proj.weight", "ve_shared.proj.weight"):
        w = sd[name].double()
        assert w.shape[0] > w.shape[1] >= 64
        assert torch.any(w), f"{name} should have left zero (seed quirk)"
        eye = torch.eye(w.shape[1], dtype=torch.float64)
        torch.testing.assert_close(w.T @ w, eye / (2 * L), atol=2e-3, rtol=0)
    # tok_emb: normal with std TIED_EMBED_INIT_STD = 0.005.
    assert abs(sd["tok_emb.weight"].std().item() - 0.005) < 1e-4
    assert abs(sd["ve_shared.embed.weight"].std().item() - 0.01) < 3e-4


def process_draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def seed_process(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_same_seed_same_weights_and_the_process_rngs_untouched():
    """build_model(seed) is deterministic and differs across seeds; it neither reseeds nor
    consumes the process's python, numpy or torch generators (issue 19: no process-wide state;
    the original reseeded all three)."""
    mc = tiny_cfg()
    seed_process(11)
    want = process_draws()
    seed_process(11)
    state = torch.get_rng_state()
    a = tg.build_model(mc, CPU, seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = tg.build_model(mc, CPU, seed=5).state_dict()
    c = tg.build_model(mc, CPU, seed=6).state_dict()
    assert process_draws() == want
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])
    assert not torch.equal(a["blocks.0.attn.c_q.weight"], c["blocks.0.attn.c_q.weight"])
    # seed=None draws from the process's torch generator as it stands, then restores it.
    torch.manual_seed(5)
    state = torch.get_rng_state()
    assert torch.equal(tg.build_model(mc, CPU).state_dict()["tok_emb.weight"], a["tok_emb.weight"])
    assert torch.equal(torch.get_rng_state(), state)


def expected_initial_state(mc, seed):
    """SPEC section 3's initialisation, reproduced with plain nn modules in the original's draw
    order."""
    torch.manual_seed(seed)
    d, V, L = mc.model_dim, mc.vocab_size, mc.num_layers
    kv = mc.num_kv_heads * (d // mc.num_heads)
    hidden = int(mc.mlp_mult * d)
    linears = {}  # named-module order
    tok = nn.Embedding(V, d)
    bigram_embed = nn.Embedding(mc.bigram_vocab_size, mc.bigram_dim)
    with torch.no_grad():
        bigram_embed.weight.zero_()
        if mc.bigram_dim != d:
            linears["bigram.proj"] = nn.Linear(mc.bigram_dim, d, bias=False)
            linears["bigram.proj"].weight.zero_()
        for i in range(L):
            linears[f"blocks.{i}.attn.c_q"] = nn.Linear(d, d, bias=False)
            linears[f"blocks.{i}.attn.c_k"] = nn.Linear(d, kv, bias=False)
            linears[f"blocks.{i}.attn.c_v"] = nn.Linear(d, kv, bias=False)
            linears[f"blocks.{i}.attn.proj"] = nn.Linear(d, d, bias=False)
            linears[f"blocks.{i}.mlp.fc"] = nn.Linear(d, hidden, bias=False)
            linears[f"blocks.{i}.mlp.proj"] = nn.Linear(hidden, d, bias=False)
        ve_embed = nn.Embedding(V, mc.ve_dim)
        ve_embed.weight.normal_(0.0, 0.01)
        if mc.ve_dim != kv:
            linears["ve_shared.proj"] = nn.Linear(mc.ve_dim, kv, bias=False)
            linears["ve_shared.proj"].weight.zero_()
        tok.weight.normal_(0.0, mc.tied_embed_init_std)
        for name, lin in linears.items():
            if name.endswith("attn.proj") or name.endswith("mlp.proj"):
                lin.weight.zero_()
            elif min(lin.weight.shape) >= 64:
                nn.init.orthogonal_(lin.weight, gain=1.0)
                if name.endswith(".proj"):
                    lin.weight.mul_(1.0 / math.sqrt(2 * L))
    state = {"skip_weights": torch.ones(L // 2, d), "tok_emb.weight": tok.weight.detach(),
             "bigram.scale": torch.tensor(0.05),
             "bigram.embed.weight": bigram_embed.weight.detach()}
    if "bigram.proj" in linears:
        state["bigram.proj.weight"] = linears["bigram.proj"].weight.detach()
    state["smear.gate"] = torch.zeros(d)
    for i in range(L):
        p = f"blocks.{i}."
        state[p + "attn_scale"] = torch.ones(d)
        state[p + "mlp_scale"] = torch.ones(d)
        state[p + "resid_mix"] = torch.stack((torch.ones(d), torch.zeros(d)))
        state[p + "attn.q_gain"] = torch.full((mc.num_heads,), 4.0)
        if i:
            state[p + "attn.vrl_gate"] = torch.tensor(-1.5)
        for sub in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            state[p + sub + ".weight"] = linears[p + sub].weight.detach()
    state["ve_shared.scale"] = torch.tensor(0.1)
    state["ve_shared.embed.weight"] = ve_embed.weight.detach()
    if "ve_shared.proj" in linears:
        state["ve_shared.proj.weight"] = linears["ve_shared.proj"].weight.detach()
    for j, _ in enumerate(mc.ve_layers.split(",")):
        state[f"ve_layer_scales.{j}"] = torch.ones(1)
    return {k: bf16(v) for k, v in state.items()}


@pytest.mark.parametrize("env,orthogonal,kept_zero", [
    # bigram.proj 64x96 (orthogonal / sqrt(2L)); ve_shared.proj 32x16 (< 64: stays zero);
    # c_k, c_v 32x64 (< 64: PyTorch's default init kept); mlp.fc 128x64 orthogonal.
    (dict(NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", BIGRAM_DIM="96",
          VE_DIM="16", VE_LAYERS="1,2", ROPE_DIMS="16", XSA_LAST_N="3", VOCAB_SIZE="96",
          BIGRAM_VOCAB_SIZE="80"),
     "bigram.proj.weight", "ve_shared.proj.weight"),
    # bigram.proj 128x16 (stays zero); ve_shared.proj 64x96 (orthogonal / sqrt(2L));
    # c_k, c_v 64x128.
    (dict(NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_DIM="16",
          VE_DIM="96", VE_LAYERS="1", ROPE_DIMS="16", XSA_LAST_N="2", VOCAB_SIZE="96",
          BIGRAM_VOCAB_SIZE="80", TIED_EMBED_INIT_STD="0.02"),
     "ve_shared.proj.weight", "bigram.proj.weight"),
], ids=["bigram_proj_orthogonal", "ve_proj_orthogonal"])
def test_initial_weights_follow_original_draw_order(env, orthogonal, kept_zero):
    """Every initial tensor equals an independent replay of the original's random draws."""
    mc = tiny_cfg(**env)
    got = tg.build_model(mc, CPU, seed=1234).state_dict()
    with torch.random.fork_rng(devices=[]):  # the replay seeds the process generator
        want = expected_initial_state(mc, 1234)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    # The config really exercises both sides of the >= 64 rule.
    assert min(got[orthogonal].shape) >= 64 and torch.any(got[orthogonal])
    assert min(got[kept_zero].shape) < 64 and not torch.any(got[kept_zero])
    ck = got["blocks.0.attn.c_k.weight"]
    if min(ck.shape) < 64:  # PyTorch's default: kaiming-uniform, |w| <= 1/sqrt(fan_in)
        assert 0 < ck.abs().max().item() <= 1 / math.sqrt(ck.shape[1]) + 1e-3


# ---------------------------------------------------------------- forward, independently


def randomize(model, seed):
    """Every parameter (scalars, gates and skip weights too) set to seeded random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("q_gain"):
                p.copy_(1.5 + 0.5 * r)
            elif (p.ndim == 2 and name.endswith(".weight") and "embed" not in name
                  and "tok_emb" not in name):
                p.copy_(r / math.sqrt(p.shape[1]))
            elif "emb" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(0.8 * r + 0.3)
    return model


EPS = torch.finfo(torch.float32).eps


def ref_rmsn(x):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + EPS)


def ref_linear(sd, x, name):
    return x @ sd[name + ".weight"].T


def ref_embed(sd, mc, ids):
    """The embedding stage: token + bigram hash, rms, smear."""
    T = ids.shape[1]
    x = sd["tok_emb.weight"][ids]
    Vb = mc.bigram_vocab_size
    buckets = torch.tensor([
        [Vb - 1] + [((36313 * row[t]) ^ (27191 * row[t - 1])) % (Vb - 1) for t in range(1, T)]
        for row in ids.tolist()])
    bg = sd["bigram.embed.weight"][buckets]
    if "bigram.proj.weight" in sd:
        bg = ref_linear(sd, bg, "bigram.proj")
    x = ref_rmsn(x + bg * sd["bigram.scale"])
    g = torch.sigmoid(sd["smear.gate"])
    prev = torch.zeros_like(x)
    prev[:, 1:] = x[:, :-1]
    return (1 - g) * x + g * prev


def ref_rope(mc, T, rope_scaling):
    """Partial RoPE: tables in float32, base rescaled for T > 1024 (seed quirk)."""
    rd = mc.rope_dims
    base = mc.rope_base
    if T > 1024 and rope_scaling:
        base = base * (T / 1024) ** (rd / (rd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().double()[None, :, None, :], angles.sin().double()[None, :, None, :]

    def rope(u):
        half = rd // 2
        a, b, rest = u[..., :half], u[..., half:rd], u[..., rd:]
        return torch.cat((a * cos + b * sin, -a * sin + b * cos, rest), dim=-1)

    return rope


def ref_heads(q, k, v, xsa):
    """Causal softmax attention head by head (query head h reads kv head h // (H / Hkv)); with
    XSA, each head's output loses its component along its normalised value vector."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    y = torch.zeros(B, T, H, D, dtype=torch.float64)
    for hh in range(H):
        kvh = hh // (H // Hkv)
        scores = q[:, :, hh] @ k[:, :, kvh].transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(~causal, float("-inf"))
        e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        yh = (e / e.sum(dim=-1, keepdim=True)) @ v[:, :, kvh]
        if xsa:
            vh = v[:, :, kvh]
            v_hat = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            yh = yh - (yh * v_hat).sum(dim=-1, keepdim=True) * v_hat
        y[:, :, hh] = yh
    return y.reshape(B, T, H * D)


def ref_hidden(sd, mc, ids, rope_scaling=True):
    """SPEC section 3, written from the text in float64 (RoPE tables in float32, as specified)."""
    B, T = ids.shape
    d, H, Hkv, L = mc.model_dim, mc.num_heads, mc.num_kv_heads, mc.num_layers
    D = d // H
    x0 = x = ref_embed(sd, mc, ids)
    rope = ref_rope(mc, T, rope_scaling)
    ve_ids = mc.ve_layer_ids
    ve = sd["ve_shared.embed.weight"][ids]
    if "ve_shared.proj.weight" in sd:
        ve = ref_linear(sd, ve, "ve_shared.proj")
    ve = ve * sd["ve_shared.scale"]
    n_enc = L // 2
    skips, v_first = [], None
    for i in range(L):
        if i >= n_enc and skips:
            x = x + sd["skip_weights"][i - n_enc] * skips.pop()
        p = f"blocks.{i}."
        mix = sd[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        s = 1.0 / math.sqrt(i + 1)
        hin = ref_rmsn(x) * s
        q = ref_linear(sd, hin, p + "attn.c_q").reshape(B, T, H, D)
        k = ref_linear(sd, hin, p + "attn.c_k").reshape(B, T, Hkv, D)
        v = ref_linear(sd, hin, p + "attn.c_v")
        v_raw = v
        if i in ve_ids:
            v = v + ve * sd[f"ve_layer_scales.{ve_ids.index(i)}"]
        if i >= 1:
            a = torch.sigmoid(sd[p + "attn.vrl_gate"])
            v = (1 - a) * v + a * v_first
        q = rope(ref_rmsn(q)) * sd[p + "attn.q_gain"][None, None, :, None]
        y = ref_heads(q, rope(ref_rmsn(k)), v.reshape(B, T, Hkv, D), i >= L - mc.xsa_last_n)
        x = x + sd[p + "attn_scale"] * ref_linear(sd, y, p + "attn.proj")
        u = ref_linear(sd, ref_rmsn(x) * s, p + "mlp.fc")
        u = torch.where(u >= 0, u, 0.5 * u) ** 2
        x = x + sd[p + "mlp_scale"] * ref_linear(sd, u, p + "mlp.proj")
        if v_first is None:
            v_first = v_raw
        if i < n_enc:
            skips.append(x)
    return ref_rmsn(x)


def ref_loss(sd, mc, hid, targets):
    w = sd["tok_emb.weight"] if mc.tie_embeddings else sd["lm_head.weight"]
    logits = 30.0 * torch.tanh((hid @ w.T) / 30.0)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -logp.gather(-1, targets[..., None]).mean()


@pytest.mark.parametrize("B,T,tie", [(2, 300, 1), (1, 1040, 1), (2, 40, 0)],
                         ids=["T300", "T1040_rope_rescaled", "untied_head"])
def test_forward_matches_independent_reference(B, T, tie):
    """Hidden states and loss of a randomised model equal SPEC section 3 computed
    independently in float64."""
    mc = tiny_cfg(TIE_EMBEDDINGS=tie)
    model = randomize(tg.build_model(mc, CPU, seed=3), seed=11 + T)
    model.eval()
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, mc.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, mc.vocab_size, (B, T), generator=g)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    assert not any(torch.equal(v, torch.zeros_like(v)) or torch.equal(v, torch.ones_like(v))
                   for v in sd.values())
    with torch.no_grad():
        hid = model.hidden(ids)
        loss = model(ids, targets)
    want_hid = ref_hidden(sd, mc, ids)
    want_loss = ref_loss(sd, mc, want_hid, targets)
    assert hid.shape == (B, T, mc.model_dim) and hid.dtype == torch.float32
    # float32 against float64: ~6e-6 seen
    torch.testing.assert_close(hid.double(), want_hid, rtol=1e-5, atol=3e-5)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    if T > 1024:  # the base rescaling is visible: without it the reference is far off
        unscaled = ref_hidden(sd, mc, ids, rope_scaling=False)
        assert (unscaled - want_hid).abs().max().item() > 1e-2


def test_bigram_hash_wraps_in_int32():
    """Bucket = ((36313*id[t]) XOR (27191*id[t-1])) mod (Vb-1) in int32 (overflow wraps), Vb-1
    at position 0."""
    mc = tg.Config.from_env(dict(VOCAB_SIZE="65536", MODEL_DIM="64", NUM_HEADS="2",
                                 NUM_KV_HEADS="1", BIGRAM_DIM="64", ROPE_DIMS="16")).model
    bigram = tg.BigramHash(mc)
    assert bigram.proj is None  # BIGRAM_DIM == MODEL_DIM: no projection
    with torch.no_grad():
        bigram.embed.weight.zero_()
        bigram.embed.weight[:, 0] = torch.arange(mc.bigram_vocab_size, dtype=torch.float32)
        bigram.scale.fill_(1.0)
    ids = torch.tensor([[65535, 65535, 1, 60000, 123, 0, 59999], [7, 3, 65000, 65001, 2, 2, 40000]])
    got = bigram(ids)[..., 0].long()
    a = ids.numpy().astype(np.int32)
    with np.errstate(over="ignore"):
        mixed = np.bitwise_xor(np.int32(36313) * a[:, 1:], np.int32(27191) * a[:, :-1])
    want = np.full(a.shape, 1023, dtype=np.int64)
    want[:, 1:] = np.mod(mixed.astype(np.int64), 1023)
    # The overflow really happens.
    assert np.any(np.int64(36313) * a[:, 1:].astype(np.int64) > 2**31 - 1)
    assert got.tolist() == want.tolist()


def test_hidden_is_causal():
    """Changing the token at position p leaves every hidden state before p unchanged (and
    changes p)."""
    mc = tiny_cfg()
    model = randomize(tg.build_model(mc, CPU, seed=1), seed=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, mc.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        base = model.hidden(ids)
        for p in (0, 17, 47):
            changed = ids.clone()
            changed[:, p] = (changed[:, p] + 1) % mc.vocab_size
            out = model.hidden(changed)
            torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=1e-6)
            assert (out[:, p] - base[:, p]).abs().max().item() > 1e-3


def test_rows_are_independent():
    """Each row is its own sequence: a row's hidden states do not depend on the other rows of
    the batch."""
    mc = tiny_cfg()
    model = randomize(tg.build_model(mc, CPU, seed=1), seed=4).eval()
    ids = torch.randint(0, mc.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model.hidden(ids)
        alone = model.hidden(ids[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- compile


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True, dynamic=False) captures the whole forward on the CPU (and
    the training step with late QAT's fake quantisation) and gives the eager loss (and
    gradients). No code generation: aot_eager for the forward (dynamo's capture, AOTAutograd's
    graph), dynamo's eager backend for the training step; inductor's C++ build took 70 s on 2
    cores from a cold cache, and tools.gpu_check compiles the record's model with inductor."""
    torch._dynamo.reset()
    # Still every branch: VE, VRL, XSA, a skip.
    mc = tiny_cfg(NUM_LAYERS="2", VE_LAYERS="0,1", XSA_LAST_N="1")
    model = randomize(tg.build_model(mc, CPU, seed=9), seed=9)
    ids = torch.randint(0, mc.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(ids, -1, dims=1)
    try:
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            eager = model(ids, targets)
            got = compiled(ids, targets)
        assert abs(got.item() - eager.item()) <= 1e-5 * abs(eager.item())
        grads = []
        for fn in (model, torch.compile(model, dynamic=False, fullgraph=True, backend="eager")):
            model.zero_grad(set_to_none=True)
            fn(ids, targets, qat=True).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        torch._dynamo.reset()
    assert list(grads[0]) == list(grads[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------- QAT


def fake_quant(w):
    """Per-row int6 fake quantisation of SPEC section 4, written out."""
    w = w.float()
    floor = torch.full((w.shape[0], 1), 1.0 / 31)
    scale = torch.maximum(w.abs().amax(dim=1, keepdim=True) / 31, floor)
    return torch.clamp(torch.round(w / scale), -32, 31) * scale


def test_qat_linear_fake_quantises_with_straight_through_gradient():
    """With qat=True a CastedLinear uses the quantised weight; gradients are straight-through;
    without it (the default, what evaluation calls) the plain weight."""
    g = torch.Generator().manual_seed(0)
    lin = tg.CastedLinear(16, 6)
    with torch.no_grad():
        w = (torch.randn(6, 16, generator=g) * 0.3).clamp(-0.95, 0.95)
        w[:3] *= 10.0  # rows with max|w| > 1 (scale max/31) and rows below 1 (scale 1/31)
        lin.weight.copy_(w)
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    gy = torch.randn(5, 6, generator=g)
    wq = fake_quant(w)
    assert not torch.allclose(wq, w)
    assert (w[:3].abs().amax(dim=1) > 1).all() and (w[3:].abs().amax(dim=1) < 1).all()
    lin.train()
    y = lin(x, qat=True)
    torch.testing.assert_close(y, F.linear(x, wq), rtol=0, atol=1e-6)
    y.backward(gy)
    torch.testing.assert_close(x.grad, gy @ wq, rtol=0, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, gy.T @ x.detach(), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, w), rtol=0, atol=1e-6)


def test_qat_applies_to_every_linear_of_the_model():
    """QAT quantises every Linear: blocks, bigram.proj, ve_shared.proj and an untied head alike
    (the same loss as a copy whose linear weights are quantised by hand, QAT off)."""
    mc = tiny_cfg(TIE_EMBEDDINGS=0)
    model = randomize(tg.build_model(mc, CPU, seed=1), seed=5)
    ids = torch.randint(0, mc.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(ids, -1, dims=1)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {"bigram.proj", "ve_shared.proj", "lm_head"} <= set(linear_names)
    assert len(linear_names) == 3 + 6 * mc.num_layers
    manual = randomize(tg.build_model(mc, CPU, seed=1), seed=5)
    with torch.no_grad():
        for n in linear_names:
            manual.get_submodule(n).weight.copy_(fake_quant(model.get_submodule(n).weight))
    model.train()
    manual.train()
    with torch.no_grad():
        qat_loss = model(ids, targets, qat=True)
        plain = model(ids, targets)
        want = manual(ids, targets)
    assert abs(qat_loss.item() - want.item()) <= 1e-5 * want.item()
    assert abs(qat_loss.item() - plain.item()) > 1e-4


def test_cuda_layout_keeps_only_the_embedding_tables_in_bf16():
    """SPEC's CUDA mode (checkable without a GPU): after the bf16 cast, exactly tok_emb,
    bigram.embed and ve_shared.embed stay bf16; every other tensor is float32 again."""
    model = tg.cuda_layout(tg.GPT(tiny_cfg()).bfloat16())
    bf16 = {name for name, p in model.state_dict().items() if p.dtype == torch.bfloat16}
    assert bf16 == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    assert all(p.dtype in (torch.bfloat16, torch.float32) for p in model.state_dict().values())


# ---------------------------------------------------------------- the role table

# The original's name rules, written out here: its 13 control patterns
# (CONTROL_TENSOR_NAME_PATTERNS) and the three embedding tables.
ORIGINAL_CONTROL_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
    "skip_weight", "skip_weights", "smear", "dtg_gate", "ve_layer_scales", "ve_shared.scale")
TABLES = {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}


def original_control(name: str) -> bool:
    return any(p in name for p in ORIGINAL_CONTROL_PATTERNS)


def original_group(name: str, p: torch.Tensor) -> str:
    """The original's split_params: tables, the untied head, 2-D non-control tensors for Muon."""
    if name in TABLES:
        return "embed"
    if name == "lm_head.weight":
        return "head"
    return "matrix" if p.ndim == 2 and not original_control(name) else "scalar"


def original_scheme(name: str, numel: int):
    """The original's export rules, first match wins."""
    if numel <= 65536:
        return "passthrough"
    if original_control(name):
        return "passthrough_ctrl"
    if "tok_emb" not in name and "lm_head" not in name and any(
            s in name for s in (".mlp.", ".attn.", ".proj.")):
        return {"type": "int6"}
    return {"type": "int8"}


def stored_format(scheme) -> str:
    return scheme["type"] if isinstance(scheme, dict) else "fp16"


def check_roles_follow_the_original(model: tg.GPT) -> None:
    """Every parameter has a role, and its group, CUDA dtype and artifact format are the
    original's; the control tensors are exactly those the original's 13 patterns named."""
    params = dict(model.named_parameters())
    assert list(model.roles) == list(params) == list(model.state_dict())
    for name, p in params.items():
        role = model.roles[name]
        assert role.group == original_group(name, p), name
        assert role.cuda_dtype == (torch.bfloat16 if name in TABLES else torch.float32), name
        fmt = "fp16" if p.numel() <= tg.PASSTHROUGH_MAX_NUMEL else role.export
        assert fmt == stored_format(original_scheme(name, p.numel())), name
        assert (role is tg.ROLES["control"]) == original_control(name), name
    groups = {k: [id(p) for p in ps] for k, ps in tg.param_groups(model).items()}
    for key in ("embed", "matrix", "scalar", "head"):
        assert groups[key] == [id(p) for n, p in params.items() if original_group(n, p) == key]


def expected_summary(model: tg.GPT) -> list[str]:
    """role_summary's two lines from the original's rules: (tensors/params) per key, keys in
    the order their first tensor appears."""
    groups, formats = {}, {}
    for name, p in model.named_parameters():
        fmt = stored_format(original_scheme(name, p.numel()))
        for table, key in ((groups, original_group(name, p)), (formats, fmt)):
            n, total = table.get(key, (0, 0))
            table[key] = (n + 1, total + p.numel())

    def line(table):
        return " ".join(f"{k}:{n}/{total}" for k, (n, total) in table.items())

    return [f"param_groups (tensors/params) {line(groups)}",
            f"param_formats (tensors/params) {line(formats)}"]


def test_role_table_of_the_default_model(default_model, monkeypatch):
    """Groups: embed = the three tables; matrix (Muon) = every other 2-D non-control tensor
    (blocks' c_q/c_k/c_v/proj, mlp fc/proj, bigram.proj, ve_shared.proj); scalar = the rest;
    head empty (tied). bf16 on CUDA for exactly the tables; the artifact formats, the schemes
    quantize_state_dict writes and role_summary's counts as the original's name rules give them."""
    cfg, model = default_model
    check_roles_follow_the_original(model)
    groups = {k: {n for n, r in model.roles.items() if r.group == k}
              for k in ("embed", "matrix", "scalar", "head")}
    assert groups["embed"] == TABLES and groups["head"] == set()
    blocks = {f"blocks.{i}.{m}.weight" for i in range(11) for m in
              ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert groups["matrix"] == blocks | {"bigram.proj.weight", "ve_shared.proj.weight"}
    assert {n for n, r in model.roles.items() if r.cuda_dtype == torch.bfloat16} == TABLES
    # The default patterns lost four that name no parameter; they mark the same tensors.
    assert set(cfg.model.control_patterns) < set(ORIGINAL_CONTROL_PATTERNS)
    assert set(ORIGINAL_CONTROL_PATTERNS) - set(cfg.model.control_patterns) == {
        "attn_scales", "mlp_scales", "resid_mixes", "dtg_gate"}

    def stub(t):  # the schemes, without the clip search over 69 large matrices
        return torch.zeros(t.shape, dtype=torch.int8), torch.ones(t.shape[0], dtype=torch.float16)

    monkeypatch.setattr(tg, "quantize_int6", stub)
    monkeypatch.setattr(tg, "quantize_int8", stub)
    state = model.state_dict()
    schemes = tg.quantize_state_dict(state, model.roles)["m"]
    assert schemes == {n: original_scheme(n, t.numel()) for n, t in state.items()}
    assert list(schemes) == list(state)
    summary = tg.role_summary(model)
    assert summary == expected_summary(model)
    assert summary == [
        "param_groups (tensors/params) scalar:60/25702 embed:3/786432 matrix:68/26050560",
        "param_formats (tensors/params) fp16:62/124006 int8:3/786432 int6:66/25952256"]
    assert 25702 + 786432 + 26050560 == 124006 + 786432 + 25952256 == DEFAULT_PARAMS


@pytest.mark.parametrize("env", [
    dict(TIE_EMBEDDINGS="0", VOCAB_SIZE="1100", MODEL_DIM="128", NUM_HEADS="4", MLP_MULT="4.5"),
    dict(BIGRAM_VOCAB_SIZE="0", VE_ENABLED="0", VRL_ENABLED="0"),
    dict(BIGRAM_DIM="64", VE_DIM="32")], ids=["untied_wide", "no_bigram_no_ve", "no_projections"])
def test_role_table_of_other_configurations(env):
    """An untied head over 65,536 values (Adam, int8, float32 on CUDA) beside int6 MLP matrices
    and an int8 token table, a model without the bigram and value embeddings, one whose
    embeddings need no projection: every parameter still has the original's group and format."""
    model = tg.build_model(tiny_cfg(**env), CPU, seed=0)
    check_roles_follow_the_original(model)
    summary = tg.role_summary(model)
    assert summary == expected_summary(model)
    if env.get("TIE_EMBEDDINGS") == "0":
        assert model.roles["lm_head.weight"] is tg.ROLES["head"]
        assert tg.ROLES["head"] == tg.Role("head", torch.float32, "int8")
        assert summary[0].endswith(" head:1/140800")
        assert " int6:10/" in summary[1] and " int8:2/" in summary[1]
    else:
        assert "lm_head.weight" not in model.roles and " head:" not in summary[0]


class WithAdapter(nn.Module):
    """A forker's wrapper: a GPT plus a 2-D parameter of its own."""

    def __init__(self, gpt: tg.GPT):
        super().__init__()
        self.gpt = gpt
        self.adapter = nn.Parameter(torch.zeros(8, gpt.cfg.model_dim))


def test_a_parameter_without_a_role_is_named():
    """A 2-D parameter no module declares stops with a ConfigError naming it and its shape;
    declared, it gets its role and the GPT's parameters keep theirs."""
    mc = tiny_cfg()
    wrapped = WithAdapter(tg.GPT(mc))
    with pytest.raises(tg.ConfigError, match=r"^parameter adapter \(8, 64\) has no role; "):
        tg.parameter_roles(wrapped, mc.control_patterns)
    WithAdapter.param_roles = {"adapter": "matrix"}
    try:
        roles = tg.parameter_roles(wrapped, mc.control_patterns)
    finally:
        del WithAdapter.param_roles
    assert roles.pop("adapter") is tg.ROLES["matrix"]
    assert roles == {f"gpt.{n}": r for n, r in wrapped.gpt.roles.items()}


def test_building_a_model_with_an_undeclared_parameter_stops(monkeypatch):
    """A tensor added inside the model (here a 2-D gate in every MLP) stops build_model, named."""
    init = tg.MLP.__init__

    def with_gate(self, cfg):
        init(self, cfg)
        self.gate = nn.Parameter(torch.zeros(4, cfg.model_dim))

    monkeypatch.setattr(tg.MLP, "__init__", with_gate)
    named = r"^parameter blocks\.0\.mlp\.gate \(4, 64\) has no role"
    with pytest.raises(tg.ConfigError, match=named):
        tg.build_model(tiny_cfg(), CPU, seed=0)


class Outer(nn.Module):
    param_roles = {"inner.weight": "scalar"}

    def __init__(self):
        super().__init__()
        self.inner = tg.CastedLinear(4, 4)  # declares its weight a matrix


def test_a_parameter_declared_twice_is_named(monkeypatch):
    """Two modules' param_roles naming one parameter stop with the "two roles" error, naming it;
    inside the model too (a Block declaring its attention's q_gain)."""
    with pytest.raises(tg.ConfigError, match=r"^parameter inner\.weight has two roles \(scalar, "
                                             r"matrix\); declare it in one module's param_roles"):
        tg.parameter_roles(Outer(), ())
    monkeypatch.setattr(tg.Block, "param_roles", {**tg.Block.param_roles, "attn.q_gain": "matrix"})
    with pytest.raises(tg.ConfigError, match=r"^parameter blocks\.0\.attn\.q_gain has two roles"):
        tg.build_model(tiny_cfg(), CPU, seed=0)


# -----------------------------
# the attention kernel (ATTENTION_BACKEND, issue 29)
# -----------------------------

CUDA = torch.device("cuda")  # a device object only: nothing here runs on a GPU
FA_MODULES = ("flash_attn_interface", "flash_attn.flash_attn_interface", "flash_attn")


@pytest.fixture
def installed(monkeypatch):
    """A fake table of importable FlashAttention modules: each one's flash_attn_func is its
    name; every import attempt is recorded."""
    table, tried, real = set(), [], tg.importlib.import_module

    def fake_import(name, *args):
        if name not in FA_MODULES:
            return real(name, *args)
        tried.append(name)
        if name not in table:
            raise ImportError(name)
        return type("Module", (), {"flash_attn_func": name})

    monkeypatch.setattr(tg.importlib, "import_module", fake_import)
    return table, tried


@pytest.mark.parametrize("available, want", [
    (FA_MODULES, ("fa3", "flash_attn_interface")),
    (FA_MODULES[1:], ("fa2", "flash_attn.flash_attn_interface")),
    (FA_MODULES[2:], ("fa2", "flash_attn")),
    ((), ("flash", None)),
])
def test_auto_takes_the_originals_order_on_cuda(installed, available, want):
    """auto on CUDA: FlashAttention 3, then the flash-attn package (its interface module, then
    the package), then SDPA pinned to flash; on the CPU torch's own choice, nothing imported."""
    table, tried = installed
    table.update(available)
    assert tg.attention_kernel("auto", CUDA) == want
    assert tried == list(FA_MODULES[:FA_MODULES.index(want[1]) + 1 if want[1] else 3])
    tried.clear()
    assert tg.attention_kernel("auto", CPU) == ("sdpa", None) and tried == []


def test_named_kernels_are_pinned_or_refused(installed):
    """fa3/fa2 name their package (refused, naming the setting, where it is not installed);
    flash, cudnn, efficient and math are SDPA pins on any device."""
    table, _ = installed
    table.add("flash_attn_interface")
    assert tg.attention_kernel("fa3", CPU) == ("fa3", "flash_attn_interface")
    with pytest.raises(tg.ConfigError, match=r"ATTENTION_BACKEND='fa2' is not allowed"):
        tg.attention_kernel("fa2", CUDA)
    for name in ("flash", "cudnn", "efficient", "math"):
        assert tg.attention_kernel(name, CUDA) == tg.attention_kernel(name, CPU) == (name, None)
    with pytest.raises(tg.ConfigError, match="ATTENTION_BACKEND='xformers'"):
        tg.Config.from_env({"ATTENTION_BACKEND": "xformers"})


SDPA_FLAGS = ("flash_sdp_enabled", "math_sdp_enabled", "mem_efficient_sdp_enabled",
              "cudnn_sdp_enabled")


@pytest.mark.parametrize("backend, allowed", [
    ("auto", SDPA_FLAGS), ("flash", SDPA_FLAGS[:1]), ("math", SDPA_FLAGS[1:2]),
    ("efficient", SDPA_FLAGS[2:3]), ("cudnn", SDPA_FLAGS[3:])])
def test_sdpa_runs_pinned_to_one_kernel(monkeypatch, backend, allowed):
    """Inside the model's forward SDPA may use exactly the named kernel (no fallback); auto on the
    CPU leaves torch's choice open. The flash and math pins give the unpinned figures."""
    seen, sdpa = [], F.scaled_dot_product_attention
    cfg = tiny_cfg()
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(0))
    unpinned = tg.build_model(cfg, CPU, seed=0).hidden(ids)

    def spy(q, k, v, **kwargs):
        seen.append({f for f in SDPA_FLAGS if getattr(torch.backends.cuda, f)()})
        if backend in ("efficient", "cudnn"):  # refused by the CPU: the flags are the point
            return torch.zeros_like(q)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tg.build_model(cfg, CPU, seed=0, attention=backend)
    out = model.hidden(ids)
    assert seen and all(flags == set(allowed) for flags in seen)
    assert all(getattr(torch.backends.cuda, f)() for f in SDPA_FLAGS)  # restored after
    if backend in ("auto", "flash", "math"):
        torch.testing.assert_close(out, unpinned, rtol=0, atol=1e-5)


def test_flash_attn_function_gets_the_models_layout():
    """A FlashAttention function gets q [B, T, H, D], k and v [B, T, Hkv, D] (no transposes),
    causal=True, in one dtype; its output (or a tuple's first item, as FA3 returns) is the
    attention: the same hidden states as SDPA's."""
    calls = []

    def fake_flash(q, k, v, causal=False):
        calls.append((q.shape, k.shape, v.shape, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, enable_gqa=True).transpose(1, 2)
        return y, None  # (out, softmax_lse)

    cfg = tiny_cfg()
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    model = tg.build_model(cfg, CPU, seed=0)
    want = model.hidden(ids)
    for module in model.modules():
        if isinstance(module, tg.Attention):
            module.kernel = ("fa3", fake_flash)
    torch.testing.assert_close(model.hidden(ids), want, rtol=0, atol=1e-5)
    assert calls and all(c == ((2, 64, 4, 16), (2, 64, 2, 16), (2, 64, 2, 16), True) for c in calls)


def test_a_refusing_kernel_stops_the_run_with_one_line(tmp_path):
    """ATTENTION_BACKEND=efficient on the CPU (no such kernel there): the run stops before any
    work with one line naming the setting and torch's reason; fa3 where it is not installed
    likewise. The chosen kernel is the one the log names."""
    from tests.test_pipeline import main_in_process

    for backend, reason in (("efficient", "efficient refuses this model"),
                            ("fa3", "expected a kernel that is installed")):
        status, out, err = main_in_process(tmp_path, {**TINY, "ATTENTION_BACKEND": backend,
                                                      "RUN_ID": "k", "DATA_PATH": str(tmp_path)})
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"ATTENTION_BACKEND='{backend}'" in err and reason in err
        assert not (tmp_path / "logs").exists()
    cfg = tg.Config.from_env({**TINY, "ATTENTION_BACKEND": "math"})
    rt = tg.start_runtime(cfg.run)
    assert rt.attention == "math"
    tg.check_attention(cfg, rt)  # math runs anything
