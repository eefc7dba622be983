"""Tests of the export path (SPEC section 5): int6/int8 quantisation, the
state-dict rules, the compressed artifact and its reader's refusals."""

import io
import lzma

import pytest
import torch

import train_gpt as tg
from tests.test_model import default_config_and_model

CPU = torch.device("cpu")
INT6_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999)
XZ_MAGIC = b"\xfd7zXZ\x00"

# A model whose MLP matrices and embedding tables exceed 65,536 elements, so
# that the round trip goes through int6, int8 and passthrough alike.
MEDIUM = dict(
    VOCAB_SIZE="520", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="1",
    MLP_MULT="4.5", BIGRAM_VOCAB_SIZE="1040", BIGRAM_DIM="64", VE_DIM="32", VE_LAYERS="1",
    XSA_LAST_N="2", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", EVAL_STRIDE="32", RUN_ID="test",
)
SMALL = dict(
    VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
    BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1", XSA_LAST_N="2",
    TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", EVAL_STRIDE="16", RUN_ID="test",
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def default_model() -> tuple[tg.Config, tg.GPT]:
    """(Config, GPT) of the defaults, built once per session (tests/test_model.py)."""
    return default_config_and_model()


def model_config(**env) -> tg.GPTConfig:
    return tg.Config.from_env(env).model


def quick_model(mc: tg.GPTConfig, seed=0) -> tg.GPT:
    """build_model without the orthogonal initialisation (slow on a CPU; the tests overwrite it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.init, "orthogonal_", lambda w, gain=1.0: w)
        return tg.build_model(mc, CPU, seed=seed)


def load_artifact_into(model: tg.GPT, path) -> tg.GPT:
    """What EVAL_ONLY does with ARTIFACT: read the file, load its container into the model."""
    return tg.load_container(model, tg.read_artifact(path), path)


def randomize(model, seed):
    """Non-trivial weights: every matrix random (the zero-initialised ones too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                table = name.endswith("embed.weight") or name == "tok_emb.weight"
                std = 0.3 if table else p.size(1) ** -0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def reference_int6(w):
    """SPEC 5 rule 3 written out: (q, scale, index of the winning candidate)."""
    best, best_err = None, float("inf")
    clips = [torch.quantile(w.abs(), ql, dim=1) for ql in INT6_QUANTILES] + [w.abs().amax(dim=1)]
    for i, clip in enumerate(clips):
        s = torch.maximum(clip / 31, torch.full_like(clip, 1 / 31)).half()
        q = torch.clamp(torch.round(w / s.float()[:, None]), -31, 31)
        err = ((w - q * s.float()[:, None]) ** 2).mean().item()
        if err < best_err:
            best, best_err = (q.to(torch.int8), s, i), err
    return best


# -----------------------------
# int6 and int8
# -----------------------------


def test_int6_row_max_wins_when_the_row_is_on_a_grid():
    """Values on a 0.25 grid with an isolated max: only the row-max clip is exact, so it wins."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-8, 9, (6, 64), generator=g).float() * 0.25
    w[:, 5] = 7.75  # 31 * 0.25, alone at the top of its row
    q_ref, s_ref, winner = reference_int6(w)
    assert winner == 4
    q, s = tg.quantize_int6(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert q.shape == w.shape and s.shape == (6,)
    assert torch.equal(s, torch.full((6,), 0.25, dtype=torch.float16))
    assert torch.equal(q, q_ref) and torch.equal(q.float() * 0.25, w)


def grid_row_with_an_outlier(g):
    """10,001 values on a 0.25 grid whose sorted magnitudes are: 9,990 of at most 6.75, six of 7.0,
    four of 7.75 (31 steps), then one outlier of 9.0; random signs and order. torch.quantile's
    linear interpolation reads sorted index q * 10,000, so the candidate clips are 7.0 (0.999 and
    0.9995), 7.75 (0.9999), 8.875 (0.99999) and 9.0 (the row max)."""
    steps = torch.cat([torch.randint(0, 28, (9990,), generator=g), torch.full((6,), 28),
                       torch.full((4,), 31)])
    magnitudes = torch.cat([steps.float() * 0.25, torch.tensor([9.0])])
    signs = torch.randint(0, 2, (10001,), generator=g).float() * 2 - 1
    return (magnitudes * signs)[torch.randperm(10001, generator=g)]


def test_int6_quantile_clip_wins_with_an_outlier():
    """Only the 0.9999 quantile clip (7.75 = 31 x 0.25) has the grid's step as its scale: every
    value but the outlier is then exact, and the outlier's clip costs 1.25^2 / 10,001 = 1.6e-4
    per value, while any other step leaves rounding error on nearly every value (about
    step^2 / 12 = 4e-3). So the scale is 0.25 and q is the grid index, the outlier clipped to
    +-31."""
    g = torch.Generator().manual_seed(0)
    w = torch.stack([grid_row_with_an_outlier(g) for _ in range(4)])
    q, s = tg.quantize_int6(w)
    assert torch.equal(s, torch.full((4,), 0.25, dtype=torch.float16))
    outlier = w.abs() == 9.0
    expected = torch.where(outlier, torch.sign(w) * 31, w / 0.25).to(torch.int8)
    assert torch.equal(q, expected)
    assert outlier.sum() == 4 and int(q.abs().max()) == 31


def test_int6_range_and_candidates_on_heavy_tails():
    """Heavy-tailed rows: q stays in [-31, 31] and equals the reference choice."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 1000, generator=g) ** 3
    q_ref, s_ref, _ = reference_int6(w)
    q, s = tg.quantize_int6(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert int(q.abs().max()) == 31
    assert torch.all(s.float() >= 1 / 31 * (1 - 2**-10))


def test_int6_small_rows_use_the_scale_floor():
    """Rows smaller than 1: the scale is fp16(1/31), so small values round to 0."""
    w = torch.tensor([[0.01, -0.02, 0.5, 0.0161], [0.0, 0.0, 0.0, 0.0]])
    q, s = tg.quantize_int6(w)
    assert torch.equal(s, torch.full((2,), 1 / 31).half())
    expected = torch.round(w / torch.tensor(1 / 31).half().float())
    assert torch.equal(q.float(), expected)
    assert q.tolist() == [[0, -1, 16, 0], [0, 0, 0, 0]]


def test_int6_rounds_half_to_even():
    """Values exactly half a step from two levels go to the even level."""
    # s = 0.25: +-0.5, 1.5, 2.5 steps
    row = [7.75, 0.125, 0.375, 0.625, -0.125, -0.375, -0.625, 1.0]
    w = torch.tensor([row + [7.5, -7.5] * 28])  # many grid values: any scale but 0.25 costs more
    q_ref, s_ref, _ = reference_int6(w)
    assert float(s_ref[0]) == 0.25
    q, s = tg.quantize_int6(w)
    assert torch.equal(q, q_ref)
    assert q[0, :8].tolist() == [31, 0, 2, 2, 0, -2, -2, 4]
    assert float(s[0]) == 0.25
    q1, s1 = tg.quantize_int6(torch.tensor(row))  # 1-D: one fp16 0-d scale, amax / 31
    assert s1.dtype == torch.float16 and s1.ndim == 0 and float(s1) == 0.25
    assert q1.tolist() == [31, 0, 2, 2, 0, -2, -2, 4]


def reference_int8(w):
    """SPEC 5 rule 4 written out: (q, float32 scale)."""
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)
    s32 = torch.maximum(clip / 127, torch.full_like(clip, 1 / 127))
    clipped = torch.minimum(torch.maximum(w, -clip[:, None]), clip[:, None])
    q = torch.clamp(torch.round(clipped / s32[:, None]), -127, 127)
    return q.to(torch.int8), s32


def test_int8_per_row_uses_the_float32_scale():
    """q from the float32 scale (not its fp16 copy), clip at the 0.9999984 row quantile."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 3000, generator=g) * 3
    w[0, 0] = 1000.0  # clipped
    q_ref, s32 = reference_int8(w)
    q, s = tg.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (64,)
    assert torch.equal(s, s32.half())
    assert torch.equal(q, q_ref)
    assert int(q.abs().max()) == 127 and int(q[0, 0]) == 127
    clipped = torch.clamp(w, -127 * s32[:, None], 127 * s32[:, None])
    q_fp16 = torch.clamp(torch.round(clipped / s.float()[:, None]), -127, 127)
    assert not torch.equal(q.float(), q_fp16)  # the test would notice an fp16 scale


def test_int8_scale_floor_and_one_dimensional_tensors():
    """Rows under 1 use 1/127; a 1-D tensor gets one 0-d float32 scale."""
    w = torch.tensor([[0.5, -0.25, 0.0, 0.1]])
    q, s = tg.quantize_int8(w)
    assert float(s[0]) == float(torch.tensor(1 / 127).half())
    assert q.tolist() == [[63, -32, 0, 13]]  # 0.5 is clipped to the quantile 0.4999988 first
    v = torch.linspace(-2.0, 3.0, 1001)
    clip = torch.quantile(v.abs(), 0.9999984)
    q1, s1 = tg.quantize_int8(v)
    assert s1.dtype == torch.float32 and s1.ndim == 0
    assert torch.isclose(s1, clip / 127, rtol=1e-6, atol=0)
    want = torch.clamp(torch.round(torch.clamp(v, -clip, clip) / s1), -127, 127).to(torch.int8)
    assert torch.equal(q1, want)
    assert int(q1.max()) == 127 and int(q1.min()) == -85


# -----------------------------
# the state-dict rules
# -----------------------------


@pytest.fixture(scope="module")
def default_state(default_model):
    """The default model's roles and state dict (the model is built once per session)."""
    _, model = default_model
    return model.roles, model.state_dict()


def test_rule_order_on_the_default_model(default_state, monkeypatch):
    """Passthrough <= 65,536 elements, int6 for the blocks' matrices, int8 for the three tables."""
    roles, state = default_state
    calls = {"int6": [], "int8": []}

    def stub(kind):
        def quantize(t):
            calls[kind].append(tuple(t.shape))
            scale = torch.ones(t.shape[0], dtype=torch.float16)
            return torch.zeros(t.shape, dtype=torch.int8), scale
        return quantize

    monkeypatch.setattr(tg, "quantize_int6", stub("int6"))
    monkeypatch.setattr(tg, "quantize_int8", stub("int8"))
    c = tg.quantize_state_dict(state, roles)
    schemes, w = c["m"], c["w"]
    assert set(c) == {"w", "m"}
    assert list(schemes) == list(state)  # state-dict order, nothing dropped
    assert len(state) == 131 and state["bigram.proj.weight"].numel() == 65536
    int6 = sorted(n for n, s in schemes.items() if s == {"type": "int6"})
    int8 = sorted(n for n, s in schemes.items() if s == {"type": "int8"})
    passthrough = [n for n, s in schemes.items() if s == "passthrough"]
    assert int8 == ["bigram.embed.weight", "tok_emb.weight", "ve_shared.embed.weight"]
    assert int6 == sorted(
        f"blocks.{i}.{m}.weight" for i in range(11)
        for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"))
    assert len(passthrough) == 62 and len(int6) + len(int8) + len(passthrough) == 131
    assert "bigram.proj.weight" in passthrough and "ve_shared.proj.weight" in passthrough
    assert all(state[n].numel() <= 65536 for n in passthrough)
    assert all(state[n].numel() > 65536 for n in int6 + int8)
    assert len(calls["int6"]) == 66 and len(calls["int8"]) == 3
    for n in passthrough:
        assert w[n].dtype == torch.float16 and torch.equal(w[n], state[n].half())
    for n in int6 + int8:
        assert n not in w and w[n + ".q"].dtype == torch.int8
        assert w[n + ".scale"].dtype == torch.float16
        assert w[n + ".q"].shape == state[n].shape and w[n + ".scale"].shape == (state[n].shape[0],)
    assert len(w) == 62 + 2 * 69


def test_control_names_over_the_size_limit():
    """A large control tensor is passthrough_ctrl (by its role: control, fp16 at any size); a
    matrix int6, another tensor int8; a small one passthrough whatever its role."""
    roles = {"blocks.0.resid_mix": tg.ROLES["control"], "counter": tg.ROLES["scalar"],
             "blocks.0.mlp.fc.weight": tg.ROLES["matrix"], "other.weight": tg.ROLES["scalar"]}
    state = {
        "blocks.0.resid_mix": torch.randn(2, 40000),
        "counter": torch.arange(5),
        "blocks.0.mlp.fc.weight": torch.randn(300, 300),
        "other.weight": torch.randn(300, 300),
    }
    c = tg.quantize_state_dict(state, roles)
    assert c["m"] == {"blocks.0.resid_mix": "passthrough_ctrl", "counter": "passthrough",
                      "blocks.0.mlp.fc.weight": {"type": "int6"}, "other.weight": {"type": "int8"}}
    assert torch.equal(c["w"]["counter"], torch.arange(5))
    assert c["w"]["blocks.0.resid_mix"].dtype == torch.float16


# -----------------------------
# round trip and artifacts
# -----------------------------


@pytest.fixture(scope="module")
def medium():
    mc = model_config(**MEDIUM)
    model = randomize(quick_model(mc), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, mc.vocab_size, (4, 65), generator=g)
    container = tg.quantize_state_dict(model.state_dict(), model.roles)
    return mc, model, tokens, container


def loss_of(model, tokens):
    with torch.no_grad():
        return float(model(tokens[:, :-1], tokens[:, 1:]))


def test_round_trip_reproduces_the_loss(medium):
    """Dequantised weights give nearly the same loss; each tensor is within half a step."""
    mc, model, tokens, container = medium
    kinds = [s["type"] if isinstance(s, dict) else s for s in container["m"].values()]
    assert kinds.count("int6") == 4 and kinds.count("int8") == 2 and "passthrough" in kinds
    state = model.state_dict()
    deq = tg.dequantize_state_dict(container, state)
    assert list(deq) == list(state) and all(deq[k].dtype == torch.float32 for k in deq)
    for name, scheme in container["m"].items():
        w, d = state[name], deq[name]
        if scheme == "passthrough":
            assert torch.equal(d, w.half().float())
            continue
        q, s = container["w"][name + ".q"].float(), container["w"][name + ".scale"].float()[:, None]
        assert torch.equal(d, q * s)
        top = 31 if scheme["type"] == "int6" else 127
        inside = q.abs() < top  # not clipped
        err = (w - d).abs()
        # half a step, plus (int8) the gap between the float32 scale used for q and its fp16 copy
        bound = 0.5 * s * (1 + 2**-10) + q.abs() * s * 2**-10 + 1e-7
        assert torch.all(err[inside] <= bound.expand_as(err)[inside])
        assert torch.all((d.abs() <= top * s + 1e-7))
    fresh = quick_model(mc)
    fresh.load_state_dict(deq, strict=True)
    before, after = loss_of(model, tokens), loss_of(fresh.eval(), tokens)
    assert before > 1.0 and after != before
    assert abs(after - before) / before < 0.02


@pytest.mark.parametrize("compressor,magic", [("lzma", XZ_MAGIC), ("brotli", tg.BROTLI_MAGIC)])
def test_artifacts_are_deterministic_and_round_trip(medium, compressor, magic, tmp_path):
    """Packing twice gives the same bytes; the reader finds the format and restores every tensor."""
    mc, model, _, container = medium
    blob = tg.pack_artifact(container, compressor)
    assert blob == tg.pack_artifact(container, compressor)
    assert blob.startswith(magic)
    back = tg.unpack_artifact(blob, "x.ptz")
    assert back["m"] == container["m"]
    assert list(back["w"]) == list(container["w"])
    for k, t in container["w"].items():
        got = back["w"][k]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    if compressor == "lzma":  # the original's format: torch.save of the container, xz preset 6
        buf = io.BytesIO()
        torch.save(container, buf)
        assert blob == lzma.compress(buf.getvalue(), preset=6)
    path = tmp_path / f"model.{compressor}.ptz"
    tg.write_atomic(path, blob)
    assert path.read_bytes() == blob and [p.name for p in tmp_path.iterdir()] == [path.name]
    fresh = quick_model(mc)
    load_artifact_into(fresh, path)
    deq = tg.dequantize_state_dict(container, model.state_dict())
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, deq[k])


# -----------------------------
# refusals
# -----------------------------


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    mc = model_config(**SMALL)
    model = randomize(quick_model(mc), seed=3)
    blob = tg.pack_artifact(tg.quantize_state_dict(model.state_dict(), model.roles), "lzma")
    path = tmp_path_factory.mktemp("art") / "final_model.int6.ptz"
    path.write_bytes(blob)
    return mc, path, blob


def expect_refusal(model, path):
    with pytest.raises(tg.ConfigError) as info:
        load_artifact_into(model, path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file_is_refused(small_artifact, tmp_path):
    """ARTIFACT pointing nowhere: a ConfigError naming the path."""
    mc, _, _ = small_artifact
    msg = expect_refusal(quick_model(mc), tmp_path / "nope.ptz")
    assert "not found" in msg


@pytest.mark.parametrize("compressor", ["lzma", "brotli"])
def test_truncated_file_is_refused(small_artifact, tmp_path, compressor):
    """Cut to two thirds, or by one byte, under each compressor: refused, naming the file."""
    mc, path, _ = small_artifact
    with lzma.open(path) as f:  # rebuild the same container under each compressor
        container = torch.load(io.BytesIO(f.read()), weights_only=True)
    blob = tg.pack_artifact(container, compressor)
    cut = tmp_path / "cut.ptz"
    cut.write_bytes(blob[: len(blob) * 2 // 3])
    model = quick_model(mc)
    expect_refusal(model, cut)
    cut.write_bytes(blob[:-1])
    expect_refusal(model, cut)


@pytest.mark.parametrize("payload", ["random", "xz_text", "xz_list", "xz_state_dict", "empty"])
def test_foreign_file_is_refused(small_artifact, tmp_path, payload):
    """Random bytes, an xz of plain text, of a list, of an unquantised state dict, an empty file."""
    mc, _, _ = small_artifact
    model = quick_model(mc)
    if payload == "random":
        g = torch.Generator().manual_seed(0)
        blob = torch.randint(0, 256, (5000,), generator=g).to(torch.uint8).numpy().tobytes()
    elif payload == "xz_text":
        blob = lzma.compress(b"hello, this is not a model\n" * 10)
    elif payload == "empty":
        blob = b""
    else:
        buf = io.BytesIO()
        torch.save([1, 2, 3] if payload == "xz_list" else model.state_dict(), buf)
        blob = lzma.compress(buf.getvalue())
    path = tmp_path / "foreign.ptz"
    path.write_bytes(blob)
    expect_refusal(model, path)


@pytest.mark.parametrize("change", [dict(NUM_LAYERS="3"), dict(MODEL_DIM="64"),
                                    dict(VOCAB_SIZE="128"), dict(VE_ENABLED="0")])
def test_artifact_of_another_configuration_is_refused(small_artifact, change):
    """Missing/unexpected keys and shape mismatches are refused, naming the file."""
    mc, path, _ = small_artifact
    other = model_config(**{**SMALL, **change})
    model = quick_model(other)
    msg = expect_refusal(model, path)
    assert "configuration" in msg


def test_artifact_loads_into_its_own_configuration(small_artifact):
    """The control case of the refusals above: the matching configuration loads."""
    mc, path, _ = small_artifact
    model = quick_model(mc)
    load_artifact_into(model, path)
    assert float(model.tok_emb.weight.detach().abs().sum()) > 0


@pytest.mark.parametrize("drop", ["tok_emb.weight", "blocks.0.mlp.fc.weight.scale",
                                  "blocks.1.mlp.proj.weight.q"])
def test_container_missing_a_tensor_is_refused(small_artifact, medium, tmp_path, drop):
    """A well-formed container that lacks one of its scheme's tensors is a damaged artifact."""
    if drop == "tok_emb.weight":
        mc, path, _ = small_artifact
        with lzma.open(path) as f:
            container = torch.load(io.BytesIO(f.read()), weights_only=True)
    else:
        mc, _, _, container = medium
    tensors = {k: v for k, v in container["w"].items() if k != drop}
    assert len(tensors) == len(container["w"]) - 1
    bad = tmp_path / "damaged.ptz"
    bad.write_bytes(tg.pack_artifact({"w": tensors, "m": container["m"]}, "lzma"))
    expect_refusal(quick_model(mc), bad)
