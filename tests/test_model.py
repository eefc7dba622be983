"""Tests of the model in train_gpt.py against SPEC section 3: state-dict layout, initialisation
and its random draws, the forward computation (checked against an independent float64
re-implementation), causality, torch.compile and the QAT fake quantisation."""

import ast
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

# A small model that still has every component: bigram.proj and ve_shared.proj, GQA,
# partial RoPE, XSA on some layers only, VE on layer 0 (so v_first excludes VE), U-Net skips.
TINY = dict(
    VOCAB_SIZE="64", NUM_LAYERS="5", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", MLP_MULT="2",
    ROPE_DIMS="8", XSA_LAST_N="3", BIGRAM_VOCAB_SIZE="50", BIGRAM_DIM="24", VE_DIM="8", VE_LAYERS="0,3",
    TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32",
)


def tiny_h(**overrides):
    env = dict(TINY)
    env.update({k: str(v) for k, v in overrides.items()})
    return tg.Hyperparameters.from_env(env)


def bf16(t):
    return t.bfloat16().float()


# ---------------------------------------------------------------- layout and count


def expected_param_count(h):
    """Parameter count from SPEC section 3's component list, written out by hand."""
    d, V, L = h.model_dim, h.vocab_size, h.num_layers
    kv = h.num_kv_heads * (d // h.num_heads)
    hidden = int(h.mlp_mult * d)
    n = V * d  # tok_emb
    n += (L // 2) * d  # skip_weights
    n += 1 + h.bigram_vocab_size * h.bigram_dim + (h.bigram_dim * d if h.bigram_dim != d else 0)
    n += d  # smear
    per_block = 2 * d + 2 * d + h.num_heads + d * d + 2 * d * kv + d * d + 2 * d * hidden
    n += L * per_block + (L - 1)  # vrl_gate on layers >= 1
    ve_layers = [s for s in h.ve_layers.split(",") if s]
    n += 1 + V * h.ve_dim + (h.ve_dim * kv if h.ve_dim != kv else 0) + len(ve_layers)
    return n


def test_default_parameter_count(default_model):
    """The default model has exactly the record's 26,862,694 parameters."""
    h, model = default_model
    assert sum(p.numel() for p in model.parameters()) == DEFAULT_PARAMS
    assert expected_param_count(h) == DEFAULT_PARAMS


def test_trajectory_config_parameter_count():
    """The reference trajectory's tiny config has 186,764 parameters (its logged model_params)."""
    h = tg.Hyperparameters.from_env(dict(
        VOCAB_SIZE="1024", NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
        BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1,2", XSA_LAST_N="3", TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="64"))
    model = tg.build_model(h, CPU, seed=7)
    assert sum(p.numel() for p in model.parameters()) == 186_764 == expected_param_count(h)


def test_default_state_dict_matches_reference_layout(default_model):
    """Keys, their order and shapes equal the original's state dict (reference/seed_state_dict.tsv)."""
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
    bigram table, orthogonal c_q, and the seed quirk: bigram.proj / ve_shared.proj orthogonal / sqrt(2L)."""
    h, model = default_model
    sd = model.state_dict()
    for name, t in sd.items():
        assert t.dtype == torch.float32, name
        assert torch.equal(t, bf16(t)), f"{name} is not bf16-representable"
    assert sd["bigram.scale"].item() == 0.050048828125
    assert sd["ve_shared.scale"].item() == 0.10009765625
    assert not torch.any(sd["bigram.embed.weight"])
    L = h.num_layers
    for i in range(L):
        assert not torch.any(sd[f"blocks.{i}.attn.proj.weight"])
        assert not torch.any(sd[f"blocks.{i}.mlp.proj.weight"])
        assert torch.equal(sd[f"blocks.{i}.attn.q_gain"], torch.full((8,), 4.0))
        assert torch.equal(sd[f"blocks.{i}.resid_mix"][0], torch.ones(512))
        assert not torch.any(sd[f"blocks.{i}.resid_mix"][1])
        if i:
            assert sd[f"blocks.{i}.attn.vrl_gate"].item() == -1.5
        wq = sd[f"blocks.{i}.attn.c_q.weight"].double()
        torch.testing.assert_close(wq @ wq.T, torch.eye(512, dtype=torch.float64), atol=2e-2, rtol=0)
    assert torch.equal(sd["skip_weights"], torch.ones(5, 512))
    assert not torch.any(sd["smear.gate"])
    # Tall matrices (512x128, 256x128): orthonormal columns scaled by 1/sqrt(2L) -> W^T W = I / (2L).
    for name in ("bigram.proj.weight", "ve_shared.proj.weight"):
        w = sd[name].double()
        assert w.shape[0] > w.shape[1] >= 64
        assert torch.any(w), f"{name} should have left zero (seed quirk)"
        torch.testing.assert_close(w.T @ w, torch.eye(w.shape[1], dtype=torch.float64) / (2 * L), atol=2e-3, rtol=0)
    # tok_emb: normal with std TIED_EMBED_INIT_STD = 0.005.
    assert abs(sd["tok_emb.weight"].std().item() - 0.005) < 1e-4
    assert abs(sd["ve_shared.embed.weight"].std().item() - 0.01) < 3e-4


def test_same_seed_same_weights_and_seeds_everything():
    """build_model(seed) is deterministic, differs across seeds, and seeds python and numpy too."""
    h = tiny_h()
    a = tg.build_model(h, CPU, seed=5).state_dict()
    py_draw, np_draw = random.random(), np.random.rand()
    b = tg.build_model(h, CPU, seed=5).state_dict()
    c = tg.build_model(h, CPU, seed=6).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_emb.weight"], c["tok_emb.weight"])
    assert not torch.equal(a["blocks.0.attn.c_q.weight"], c["blocks.0.attn.c_q.weight"])
    random.seed(5)
    np.random.seed(5)
    assert py_draw == random.random() and np_draw == np.random.rand()


def expected_initial_state(h, seed):
    """SPEC section 3's initialisation, reproduced with plain nn modules in the original's draw order."""
    torch.manual_seed(seed)
    d, V, L = h.model_dim, h.vocab_size, h.num_layers
    kv = h.num_kv_heads * (d // h.num_heads)
    hidden = int(h.mlp_mult * d)
    linears = {}  # named-module order
    tok = nn.Embedding(V, d)
    bigram_embed = nn.Embedding(h.bigram_vocab_size, h.bigram_dim)
    with torch.no_grad():
        bigram_embed.weight.zero_()
        if h.bigram_dim != d:
            linears["bigram.proj"] = nn.Linear(h.bigram_dim, d, bias=False)
            linears["bigram.proj"].weight.zero_()
        for i in range(L):
            linears[f"blocks.{i}.attn.c_q"] = nn.Linear(d, d, bias=False)
            linears[f"blocks.{i}.attn.c_k"] = nn.Linear(d, kv, bias=False)
            linears[f"blocks.{i}.attn.c_v"] = nn.Linear(d, kv, bias=False)
            linears[f"blocks.{i}.attn.proj"] = nn.Linear(d, d, bias=False)
            linears[f"blocks.{i}.mlp.fc"] = nn.Linear(d, hidden, bias=False)
            linears[f"blocks.{i}.mlp.proj"] = nn.Linear(hidden, d, bias=False)
        ve_embed = nn.Embedding(V, h.ve_dim)
        ve_embed.weight.normal_(0.0, 0.01)
        if h.ve_dim != kv:
            linears["ve_shared.proj"] = nn.Linear(h.ve_dim, kv, bias=False)
            linears["ve_shared.proj"].weight.zero_()
        tok.weight.normal_(0.0, h.tied_embed_init_std)
        for name, lin in linears.items():
            if name.endswith("attn.proj") or name.endswith("mlp.proj"):
                lin.weight.zero_()
            elif min(lin.weight.shape) >= 64:
                nn.init.orthogonal_(lin.weight, gain=1.0)
                if name.endswith(".proj"):
                    lin.weight.mul_(1.0 / math.sqrt(2 * L))
    state = {"skip_weights": torch.ones(L // 2, d), "tok_emb.weight": tok.weight.detach(),
             "bigram.scale": torch.tensor(0.05), "bigram.embed.weight": bigram_embed.weight.detach()}
    if "bigram.proj" in linears:
        state["bigram.proj.weight"] = linears["bigram.proj"].weight.detach()
    state["smear.gate"] = torch.zeros(d)
    for i in range(L):
        p = f"blocks.{i}."
        state[p + "attn_scale"] = torch.ones(d)
        state[p + "mlp_scale"] = torch.ones(d)
        state[p + "resid_mix"] = torch.stack((torch.ones(d), torch.zeros(d)))
        state[p + "attn.q_gain"] = torch.full((h.num_heads,), 4.0)
        if i:
            state[p + "attn.vrl_gate"] = torch.tensor(-1.5)
        for sub in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"):
            state[p + sub + ".weight"] = linears[p + sub].weight.detach()
    state["ve_shared.scale"] = torch.tensor(0.1)
    state["ve_shared.embed.weight"] = ve_embed.weight.detach()
    if "ve_shared.proj" in linears:
        state["ve_shared.proj.weight"] = linears["ve_shared.proj"].weight.detach()
    for j, _ in enumerate(h.ve_layers.split(",")):
        state[f"ve_layer_scales.{j}"] = torch.ones(1)
    return {k: bf16(v) for k, v in state.items()}


@pytest.mark.parametrize("env,orthogonal,kept_zero", [
    # bigram.proj 64x96 (orthogonal / sqrt(2L)); ve_shared.proj 32x16 (< 64: stays zero);
    # c_k, c_v 32x64 (< 64: PyTorch's default init kept); mlp.fc 128x64 orthogonal.
    (dict(NUM_LAYERS="3", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", BIGRAM_DIM="96", VE_DIM="16",
          VE_LAYERS="1,2", ROPE_DIMS="16", XSA_LAST_N="3", VOCAB_SIZE="96", BIGRAM_VOCAB_SIZE="80"),
     "bigram.proj.weight", "ve_shared.proj.weight"),
    # bigram.proj 128x16 (stays zero); ve_shared.proj 64x96 (orthogonal / sqrt(2L)); c_k, c_v 64x128.
    (dict(NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_DIM="16", VE_DIM="96",
          VE_LAYERS="1", ROPE_DIMS="16", XSA_LAST_N="2", VOCAB_SIZE="96", BIGRAM_VOCAB_SIZE="80",
          TIED_EMBED_INIT_STD="0.02"),
     "ve_shared.proj.weight", "bigram.proj.weight"),
], ids=["bigram_proj_orthogonal", "ve_proj_orthogonal"])
def test_initial_weights_follow_original_draw_order(env, orthogonal, kept_zero):
    """Every initial tensor equals an independent replay of the original's random draws."""
    h = tiny_h(**env)
    got = tg.build_model(h, CPU, seed=1234).state_dict()
    want = expected_initial_state(h, 1234)
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
            elif p.ndim == 2 and name.endswith(".weight") and "embed" not in name and "tok_emb" not in name:
                p.copy_(r / math.sqrt(p.shape[1]))
            elif "emb" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(0.8 * r + 0.3)
    return model


def ref_hidden(sd, h, ids, rope_scaling=True):
    """SPEC section 3, written from the text in float64 (RoPE tables in float32, as specified)."""
    B, T = ids.shape
    d, H, Hkv, L = h.model_dim, h.num_heads, h.num_kv_heads, h.num_layers
    D = d // H
    eps = torch.finfo(torch.float32).eps

    def rmsn(x):
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)

    def linear(x, name):
        return x @ sd[name + ".weight"].T

    # Embedding stage: token + bigram hash, rms, smear.
    x = sd["tok_emb.weight"][ids]
    Vb = h.bigram_vocab_size
    buckets = torch.tensor([[Vb - 1] + [((36313 * row[t]) ^ (27191 * row[t - 1])) % (Vb - 1) for t in range(1, T)]
                            for row in ids.tolist()])
    bg = sd["bigram.embed.weight"][buckets]
    if "bigram.proj.weight" in sd:
        bg = linear(bg, "bigram.proj")
    x = rmsn(x + bg * sd["bigram.scale"])
    g = torch.sigmoid(sd["smear.gate"])
    prev = torch.zeros_like(x)
    prev[:, 1:] = x[:, :-1]
    x = (1 - g) * x + g * prev
    x0 = x

    # Partial RoPE tables: float32, base rescaled for T > 1024 (seed quirk).
    rd = h.rope_dims
    base = h.rope_base
    if T > 1024 and rope_scaling:
        base = base * (T / 1024) ** (rd / (rd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().double()[None, :, None, :], angles.sin().double()[None, :, None, :]

    def rope(u):
        half = rd // 2
        a, b, rest = u[..., :half], u[..., half:rd], u[..., rd:]
        return torch.cat((a * cos + b * sin, -a * sin + b * cos, rest), dim=-1)

    ve_ids = h.ve_layer_ids
    ve = sd["ve_shared.embed.weight"][ids]
    if "ve_shared.proj.weight" in sd:
        ve = linear(ve, "ve_shared.proj")
    ve = ve * sd["ve_shared.scale"]

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    n_enc = L // 2
    skips, v_first = [], None
    for i in range(L):
        if i >= n_enc and skips:
            x = x + sd["skip_weights"][i - n_enc] * skips.pop()
        p = f"blocks.{i}."
        mix = sd[p + "resid_mix"]
        x = mix[0] * x + mix[1] * x0
        s = 1.0 / math.sqrt(i + 1)
        hin = rmsn(x) * s
        q = linear(hin, p + "attn.c_q").reshape(B, T, H, D)
        k = linear(hin, p + "attn.c_k").reshape(B, T, Hkv, D)
        v = linear(hin, p + "attn.c_v")
        v_raw = v
        if i in ve_ids:
            v = v + ve * sd[f"ve_layer_scales.{ve_ids.index(i)}"]
        if i >= 1:
            a = torch.sigmoid(sd[p + "attn.vrl_gate"])
            v = (1 - a) * v + a * v_first
        v = v.reshape(B, T, Hkv, D)
        q = rope(rmsn(q)) * sd[p + "attn.q_gain"][None, None, :, None]
        k = rope(rmsn(k))
        y = torch.zeros(B, T, H, D, dtype=torch.float64)
        for hh in range(H):
            kvh = hh // (H // Hkv)
            scores = q[:, :, hh] @ k[:, :, kvh].transpose(1, 2) / math.sqrt(D)
            scores = scores.masked_fill(~causal, float("-inf"))
            e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            yh = (e / e.sum(dim=-1, keepdim=True)) @ v[:, :, kvh]
            if i >= L - h.xsa_last_n:
                vh = v[:, :, kvh]
                v_hat = vh / vh.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                yh = yh - (yh * v_hat).sum(dim=-1, keepdim=True) * v_hat
            y[:, :, hh] = yh
        x = x + sd[p + "attn_scale"] * linear(y.reshape(B, T, H * D), p + "attn.proj")
        u = linear(rmsn(x) * s, p + "mlp.fc")
        u = torch.where(u >= 0, u, 0.5 * u) ** 2
        x = x + sd[p + "mlp_scale"] * linear(u, p + "mlp.proj")
        if v_first is None:
            v_first = v_raw
        if i < n_enc:
            skips.append(x)
    return rmsn(x)


def ref_loss(sd, h, hid, targets):
    w = sd["tok_emb.weight"] if h.tie_embeddings else sd["lm_head.weight"]
    logits = 30.0 * torch.tanh((hid @ w.T) / 30.0)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return -logp.gather(-1, targets[..., None]).mean()


@pytest.mark.parametrize("B,T,tie", [(2, 300, 1), (1, 1040, 1), (2, 40, 0)],
                         ids=["T300", "T1040_rope_rescaled", "untied_head"])
def test_forward_matches_independent_reference(B, T, tie):
    """Hidden states and loss of a randomised model equal SPEC section 3 computed independently in float64."""
    h = tiny_h(TIE_EMBEDDINGS=tie)
    model = randomize(tg.build_model(h, CPU, seed=3), seed=11 + T)
    model.eval()
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, h.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, h.vocab_size, (B, T), generator=g)
    sd = {k: v.double() for k, v in model.state_dict().items()}
    assert not any(torch.equal(v, torch.zeros_like(v)) or torch.equal(v, torch.ones_like(v)) for v in sd.values())
    with torch.no_grad():
        hid = model.hidden(ids)
        loss = model(ids, targets)
    want_hid = ref_hidden(sd, h, ids)
    want_loss = ref_loss(sd, h, want_hid, targets)
    assert hid.shape == (B, T, h.model_dim) and hid.dtype == torch.float32
    torch.testing.assert_close(hid.double(), want_hid, rtol=1e-5, atol=3e-5)  # float32 vs float64: ~6e-6 seen
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    if T > 1024:  # the base rescaling is visible: without it the reference is far off
        unscaled = ref_hidden(sd, h, ids, rope_scaling=False)
        assert (unscaled - want_hid).abs().max().item() > 1e-2


def test_bigram_hash_wraps_in_int32():
    """Bucket = ((36313*id[t]) XOR (27191*id[t-1])) mod (Vb-1) in int32 (overflow wraps), Vb-1 at position 0."""
    h = tg.Hyperparameters.from_env(dict(VOCAB_SIZE="65536", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
                                         BIGRAM_DIM="64", ROPE_DIMS="16"))
    bigram = tg.BigramHash(h)
    assert bigram.proj is None  # BIGRAM_DIM == MODEL_DIM: no projection
    with torch.no_grad():
        bigram.embed.weight.zero_()
        bigram.embed.weight[:, 0] = torch.arange(h.bigram_vocab_size, dtype=torch.float32)
        bigram.scale.fill_(1.0)
    ids = torch.tensor([[65535, 65535, 1, 60000, 123, 0, 59999], [7, 3, 65000, 65001, 2, 2, 40000]])
    got = bigram(ids)[..., 0].long()
    a = ids.numpy().astype(np.int32)
    with np.errstate(over="ignore"):
        mixed = np.bitwise_xor(np.int32(36313) * a[:, 1:], np.int32(27191) * a[:, :-1])
    want = np.full(a.shape, 1023, dtype=np.int64)
    want[:, 1:] = np.mod(mixed.astype(np.int64), 1023)
    assert np.any(np.int64(36313) * a[:, 1:].astype(np.int64) > 2**31 - 1)  # overflow really happens
    assert got.tolist() == want.tolist()


def test_hidden_is_causal():
    """Changing the token at position p leaves every hidden state before p unchanged (and changes p)."""
    h = tiny_h()
    model = randomize(tg.build_model(h, CPU, seed=1), seed=2).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, h.vocab_size, (2, 48), generator=g)
    with torch.no_grad():
        base = model.hidden(ids)
        for p in (0, 17, 47):
            changed = ids.clone()
            changed[:, p] = (changed[:, p] + 1) % h.vocab_size
            out = model.hidden(changed)
            torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=1e-6)
            assert (out[:, p] - base[:, p]).abs().max().item() > 1e-3


def test_rows_are_independent():
    """Each row is its own sequence: a row's hidden states do not depend on the other rows of the batch."""
    h = tiny_h()
    model = randomize(tg.build_model(h, CPU, seed=1), seed=4).eval()
    ids = torch.randint(0, h.vocab_size, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model.hidden(ids)
        alone = model.hidden(ids[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- compile


def test_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) captures the whole forward on the CPU and gives the eager loss."""
    torch._dynamo.reset()
    h = tiny_h(NUM_LAYERS="2", VE_LAYERS="0,1", XSA_LAST_N="1")  # still every branch: VE, VRL, XSA, skip
    model = randomize(tg.build_model(h, CPU, seed=9), seed=9)
    ids = torch.randint(0, h.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(ids, -1, dims=1)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    with torch.no_grad():
        eager = model(ids, targets)
        got = compiled(ids, targets)
    torch._dynamo.reset()
    assert abs(got.item() - eager.item()) <= 1e-5 * abs(eager.item())


# ---------------------------------------------------------------- QAT


def fake_quant(w):
    """Per-row int6 fake quantisation of SPEC section 4, written out."""
    w = w.float()
    scale = torch.maximum(w.abs().amax(dim=1, keepdim=True) / 31, torch.full((w.shape[0], 1), 1.0 / 31))
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
    h = tiny_h(TIE_EMBEDDINGS=0)
    model = randomize(tg.build_model(h, CPU, seed=1), seed=5)
    ids = torch.randint(0, h.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(ids, -1, dims=1)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {"bigram.proj", "ve_shared.proj", "lm_head"} <= set(linear_names)
    assert len(linear_names) == 3 + 6 * h.num_layers
    manual = randomize(tg.build_model(h, CPU, seed=1), seed=5)
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


def test_cuda_precision_keeps_only_the_embedding_tables_in_bf16():
    """SPEC's CUDA mode (checkable without a GPU): after the bf16 cast, exactly tok_emb,
    bigram.embed and ve_shared.embed stay bf16; every other tensor is float32 again."""
    h = tiny_h()
    model = tg.cuda_precision(tg.GPT(h).bfloat16(), h)
    bf16 = {name for name, p in model.state_dict().items() if p.dtype == torch.bfloat16}
    assert bf16 == {"tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"}
    assert all(p.dtype in (torch.bfloat16, torch.float32) for p in model.state_dict().values())
