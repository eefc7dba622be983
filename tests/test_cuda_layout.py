"""The CUDA precision path, on the CPU: the original's CUDA dtype layout (`cuda_layout`) under a
bf16 autocast whose policy mirrors CUDA's (ops CUDA runs in float32 are registered as float32 rules
of CPU autocast), for torch 2.11's policy and for >= 2.12's, which also keeps rms_norm in float32.
A training step, the export round trip and every evaluation run without a dtype error, attention
always receives one dtype, and the figures stay near the float32 ones."""

import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
    BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="8", VE_LAYERS="1", XSA_LAST_N="2",
    TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="64", EVAL_STRIDE="16", VAL_BATCH_SIZE=str(8 * 64 * 2),
    TRAIN_BATCH_TOKENS=str(8 * 32 * 2), SLOT_STEPS="3",
    SLOT_BATCH_SEQS="4", SLOT_MODE="both", TTT_ENABLED="1", TTT_CHUNK_TOKENS="256", TTT_EPOCHS="1",
    TTT_BATCH_SEQS="4", RUN_ID="layout",
)
# Ops of CUDA autocast's float32 list that this model reaches (F.normalize, .square(), rsqrt).
CUDA_FP32_OPS = ("linalg_vector_norm.default", "pow.Tensor_Scalar", "rsqrt.default")
CUDA_FP32_OPS_212 = CUDA_FP32_OPS + ("rms_norm.default",)


@dataclass(frozen=True)
class EmulatedCudaRuntime(tg.Runtime):
    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(params=["2.11", "2.12"])
def cuda_policy(request):
    """Registers float32 rules for the policy's ops in CPU autocast; removed after the test."""
    lib = torch.library.Library("aten", "IMPL")
    below_autocast = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32_rule(op):
        def kernel(*args, **kwargs):
            wide = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                    for a in args]
            with torch._C._ExcludeDispatchKeyGuard(below_autocast):
                return op(*wide, **kwargs)
        return kernel

    for name in CUDA_FP32_OPS_212 if request.param == "2.12" else CUDA_FP32_OPS:
        packet, overload = name.split(".")
        lib.impl(f"{packet}.{overload}" if overload != "default" else packet,
                 fp32_rule(getattr(getattr(torch.ops.aten, packet), overload)), "AutocastCPU")
    yield request.param
    lib._destroy()


def cuda_layout_model(mc: tg.GPTConfig) -> tg.GPT:
    """What build_model makes on CUDA (its device move aside)."""
    return tg.cuda_layout(tg.GPT(mc).bfloat16())


def trained_like_model(mc: tg.GPTConfig) -> tg.GPT:
    """A CUDA-layout model with random matrices: the zero-initialised projections would hide
    the paths."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cuda_layout_model(mc)
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_((torch.randn(p.shape, generator=g) * p.size(1) ** -0.5).to(p.dtype))
    return model


@pytest.fixture
def attention_dtypes(monkeypatch):
    """The dtypes (q, k, v) reaching causal_attention and the SDPA kernel, call by call."""
    entry, kernel = [], []
    attention, sdpa = tg.causal_attention, F.scaled_dot_product_attention

    def spy_attention(q, k, v, *kernel):
        entry.append((q.dtype, k.dtype, v.dtype))
        return attention(q, k, v, *kernel)

    def spy_sdpa(q, k, v, **kwargs):
        kernel.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(tg, "causal_attention", spy_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy_sdpa)
    return entry, kernel


def train_one_step(cfg: tg.Config, rt: tg.Runtime, model: tg.GPT) -> None:
    """One training step with late QAT's fake quantisation, as the record's loop runs it."""
    optimizers = tg.build_optimizers(model, cfg.optim)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, cfg.model.vocab_size, (4, cfg.train.train_seq_len), generator=g)
    y = torch.roll(x, -1, dims=1)
    model.train()
    with rt.autocast():
        loss = model(x, y, qat=True)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    for opt in optimizers:
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the optimizers keep the layout


def validation_data(vocab_size: int) -> tg.Data:
    tokens = torch.randint(0, vocab_size, (3000,), generator=torch.Generator().manual_seed(3))
    luts = (torch.ones(vocab_size, dtype=torch.int16), torch.zeros(vocab_size, dtype=torch.bool),
            torch.zeros(vocab_size, dtype=torch.bool))
    return tg.Data(tokens, luts, [], 0)


def test_training_export_and_every_evaluation_under_cuda_policy(cuda_policy, tmp_path,
                                                                attention_dtypes):
    cfg = tg.Config.from_env({**TINY, "ARTIFACT": str(tmp_path / "m.ptz")})
    mc, path = cfg.model, cfg.export.artifact
    entry, kernel = attention_dtypes
    model = trained_like_model(mc)
    rt = EmulatedCudaRuntime(log_path=str(tmp_path / "log.txt"))
    train_one_step(cfg, rt, model)
    # rms_norm stays float32 under >= 2.12's policy: q and k reach attention wider than v...
    if cuda_policy == "2.12":
        want_entry = (torch.float32, torch.float32, torch.bfloat16)
    else:
        want_entry = (torch.bfloat16,) * 3
    assert set(entry) == {want_entry}
    # ...and the kernel gets one dtype all the same (FA3 would refuse a mix).
    assert set(kernel) == {(torch.bfloat16,) * 3}

    # Export, round trip into a fresh CUDA-layout model, every evaluation.
    container = tg.quantize_state_dict(model.state_dict(), model.roles)
    tg.write_atomic(path, tg.pack_artifact(container, cfg.export.compressor))
    evaluated = tg.load_container(cuda_layout_model(mc), tg.read_artifact(path), path)
    assert evaluated.tok_emb.weight.dtype == torch.bfloat16
    data = validation_data(mc.vocab_size)
    kernel.clear()
    tg.evaluate(cfg, rt, evaluated.eval(), data)
    assert set(kernel) == {(torch.bfloat16,) * 3}
    log = (tmp_path / "log.txt").read_text()

    # The same artifact in float32 (the CPU mode): the bf16 figures stay close.
    reference = tg.eval_model(mc, tg.read_artifact(path), torch.device("cpu"), path)
    assert all(p.dtype == torch.float32 for p in reference.parameters())
    rt32 = tg.Runtime(log_path=str(tmp_path / "log32.txt"))
    tg.evaluate(cfg, rt32, reference, data)
    log32 = (tmp_path / "log32.txt").read_text()
    names = re.findall(r"^(\w+)_exact val_loss", log32, re.M)
    assert {"final_int6_roundtrip", "final_int6_sliding_window", "final_slot", "final_slot_context",
            "legal_ttt"} <= set(names)
    for name in set(names):
        got = float(re.search(rf"^{name}_exact val_loss:(\S+)", log, re.M).group(1))
        want = float(re.search(rf"^{name}_exact val_loss:(\S+)", log32, re.M).group(1))
        assert math.isfinite(got) and abs(got - want) <= 0.02 * want, (name, got, want)
