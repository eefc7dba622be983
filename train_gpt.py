"""
The SLOT-48 parameter-golf record, rebuilt: an 11-layer GPT trained for 600 s on
8xH100, packed with this file into < 16,000,000 bytes (int6 + lzma), scored in
bits per byte on FineWeb with the round trip, sliding windows, SLOT and legal TTT.

One file (its bytes count toward the artifact); CUDA (bf16, compile, FlashAttention 3 if
installed) or CPU (float32), one process or torchrun. `run()` in MAIN is the table of
contents; the entry points for tools and tests are listed in README.md.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import fcntl
import glob
import hashlib
import importlib
import io
import itertools
import json
import lzma
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------
# SETTINGS
# -----------------------------
# Environment variables, read once into frozen sections, one per stage: each field declares the
# values it accepts, each check() the constraints between them; MAIN's Config reads them all.


class ConfigError(Exception):
    """A bad setting or input file: printed as one line, no traceback."""


def setting(default, expect: str = "", ok=None):
    """A field with the values it accepts: `ok(value)`, else `NAME=value is not allowed;
    expected <expect>`."""
    return field(default=default, metadata=dict(ok=ok, expect=expect))


def choice(default: str, *choices: str):
    return setting(default, "one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


def kind(expect: str, ok):
    return lambda default: setting(default, expect, ok)


count = kind("a count >= 0", lambda v: v >= 0)
positive = kind("a positive integer", lambda v: v > 0)
positive_number = kind("a positive number", lambda v: v > 0)
nonneg = kind("a number >= 0", lambda v: v >= 0)
unit = kind("a number in [0, 1)", lambda v: 0 <= v < 1)
file_path = kind("a file path", lambda v: bool(v) and not v.endswith(("/", os.sep)))
free = kind("", None)  # any value of the field's type
layers = kind("distinct comma-separated layer indices", lambda v: layer_ids(v) is not None)


class Section:
    """A frozen group of settings, each read from PREFIX + its name in capitals."""
    PREFIX = ""

    @classmethod
    def settings(cls) -> dict[str, object]:  # variable -> field, nested sections excluded
        return {cls.PREFIX + f.name.upper(): f for f in fields(cls) if "ok" in f.metadata}

    def resolved(self) -> dict[str, object]:  # variable -> value
        return {name: getattr(self, f.name) for name, f in self.settings().items()}

    def check(self) -> None:
        """Constraints between this section's fields."""


@dataclass(frozen=True)
class RunConfig(Section):
    run_id: str = setting("", "a file name without path separators, at most 200 bytes",
                          lambda v: is_file_name(v))  # empty: a random uuid
    seed: int = setting(1337, "an integer in [0, 2**32 - 1] (numpy's seed range)",
                        lambda v: 0 <= v < 2**32)  # python, numpy and torch
    preset: str = free("")  # defaults from presets/PRESET.env, read first
    device: str = choice("auto", "auto", "cpu", "cuda")  # auto: CUDA when available
    cpu_threads: int = count(1)  # per process, CPU runs only; 0: torch's default
    compile: str = choice("auto", "auto", "0", "1")  # auto: on CUDA only
    attention_backend: str = choice("auto", "auto", "fa3", "fa2", "flash", "cudnn", "efficient",
                                    "math")  # see attention_kernel
    eval_only: bool = free(False)  # evaluate ARTIFACT, no training
    export_only: bool = free(False)  # make the artifact from MODEL_PATH, then evaluate it
    collective_timeout_seconds: float = positive_number(300.0)  # a rank stuck this long ends a run

    def check(self) -> None:
        need(not (self.eval_only and self.export_only), "EXPORT_ONLY", self.export_only,
             "0 with EVAL_ONLY=1 (one of the two)")


@dataclass(frozen=True)
class DataConfig(Section):
    data_path: str = free("./data/datasets/fineweb10B_sp1024")  # folder of the .bin shards
    tokenizer_path: str = free("./data/tokenizers/fineweb_1024_bpe.model")  # SentencePiece model


# The original's control patterns, less those that name no parameter of this model.
CONTROL_PATTERNS_DEFAULT = ("attn_scale,mlp_scale,resid_mix,q_gain,skip_weight,skip_weights,"
                            "smear,ve_layer_scales,ve_shared.scale")


@dataclass(frozen=True)
class GPTConfig(Section):
    """Everything the model reads, and nothing else (nanoGPT's GPTConfig)."""
    vocab_size: int = setting(1024, "an integer in [2, 65536] (tokens are stored as uint16)",
                              lambda v: 2 <= v <= 65536)
    num_layers: int = positive(11)  # half encoder, half decoder (U-Net skips)
    model_dim: int = positive(512)
    num_heads: int = positive(8)
    num_kv_heads: int = positive(4)
    mlp_mult: float = positive_number(3.0)  # MLP width / MODEL_DIM
    tie_embeddings: bool = free(True)
    logit_softcap: float = positive_number(30.0)  # c in c*tanh(z/c)
    rope_base: float = positive_number(10000.0)
    qk_gain_init: float = free(4.0)  # per-head query gain
    rope_dims: int = count(16)  # 0: all of each head's dims
    ln_scale: bool = free(True)  # block inputs x 1/sqrt(layer+1)
    xsa_last_n: int = count(11)  # XSA on the last N layers
    bigram_vocab_size: int = setting(1024, "0 (no bigram table) or at least 2",
                                     lambda v: v == 0 or v >= 2)  # hashed-bigram buckets
    bigram_dim: int = positive(128)
    ve_enabled: bool = free(True)  # shared value embedding
    ve_dim: int = positive(128)
    ve_layers: str = layers("9,10")  # layers adding it
    vrl_enabled: bool = free(True)  # value residual from layer 0
    parallel_residual: bool = free(False)  # two residual lanes (docs/legal_stack.md)
    parallel_start_layer: int = count(7)  # the first physical layer with lanes
    recur_layers: str = layers("")  # physical layers run a second time, once activated
    tied_embed_init_std: float = nonneg(0.005)
    control_tensor_name_patterns: str = free(CONTROL_PATTERNS_DEFAULT)  # control tensors: kept fp16

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def ve_layer_ids(self) -> tuple[int, ...]:
        return layer_ids(self.ve_layers) if self.ve_enabled else ()

    @property
    def recur_ids(self) -> tuple[int, ...]:
        return tuple(sorted(layer_ids(self.recur_layers)))

    @property
    def control_patterns(self) -> tuple[str, ...]:
        return tuple(p for p in self.control_tensor_name_patterns.split(",") if p)

    def check(self) -> None:
        need(self.model_dim % self.num_heads == 0, "NUM_HEADS", self.num_heads,
             f"a divisor of MODEL_DIM={self.model_dim}")
        need(self.num_heads % self.num_kv_heads == 0, "NUM_KV_HEADS", self.num_kv_heads,
             f"a divisor of NUM_HEADS={self.num_heads}")
        need(self.head_dim % 2 == 0, "NUM_HEADS", self.num_heads,
             "a value that leaves an even head dimension")
        rope_ok = 4 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0
        need(self.rope_dims == 0 or rope_ok, "ROPE_DIMS", self.rope_dims,
             f"0 (all dims) or an even number in [4, head_dim={self.head_dim}]")
        need(self.xsa_last_n <= self.num_layers, "XSA_LAST_N", self.xsa_last_n,
             f"at most NUM_LAYERS={self.num_layers}")
        need(self.mlp_hidden > 0, "MLP_MULT", self.mlp_mult,
             "a value giving at least one hidden unit")
        L, S, R = self.num_layers, self.parallel_start_layer, self.recur_ids
        for name, ids, least in (("VE_LAYERS", self.ve_layer_ids, self.ve_enabled),
                                 ("RECUR_LAYERS", R, 0)):
            need(len(ids) >= least and max(ids, default=0) < L, name,
                 getattr(self, name.lower()), f"distinct comma-separated layer indices in [0, {L})")
        if self.parallel_residual:
            need(S < L, "PARALLEL_START_LAYER", S, f"less than NUM_LAYERS={L} with lanes on")
        if self.parallel_residual and R:
            # A layer below S run again after the lanes started would read a stale stream.
            need(not R[0] < S <= R[-1], "PARALLEL_START_LAYER", S,
                 f"at most min(RECUR_LAYERS)={R[0]} or above max(RECUR_LAYERS)={R[-1]} with "
                 f"PARALLEL_RESIDUAL=1")


@dataclass(frozen=True)
class OptimConfig(Section):
    tied_embed_lr: float = nonneg(0.035)
    embed_lr: float = nonneg(0.6)  # untied only
    head_lr: float = nonneg(0.008)  # untied only
    matrix_lr: float = nonneg(0.025)  # Muon
    scalar_lr: float = nonneg(0.025)  # AdamW: scalars and controls
    muon_momentum: float = unit(0.99)
    muon_momentum_warmup_start: float = unit(0.92)
    muon_momentum_warmup_steps: int = count(1500)
    muon_backend_steps: int = positive(5)  # Newton-Schulz iterations
    muon_row_normalize: bool = free(False)  # MuonEq-R: rows of each update to unit norm
    muon_wd: float = nonneg(0.04)
    adam_wd: float = nonneg(0.04)
    beta1: float = unit(0.9)  # Adam
    beta2: float = unit(0.95)  # Adam
    adam_eps: float = nonneg(1e-8)
    grad_clip_norm: float = nonneg(0.3)  # 0: none


@dataclass(frozen=True)
class TrainConfig(Section):
    iterations: int = count(20000)  # maximum optimizer steps
    max_wallclock_seconds: float = free(600.0)  # <= 0: no cap
    warmdown_iters: int = free(3500)  # <= 0: no warm-down
    warmup_steps: int = count(20)  # compile warm-up, then reset
    train_batch_tokens: int = positive(786432)  # per step, all processes
    train_seq_len: int = setting(2048, "a positive integer at most 1048576",
                                 lambda v: 0 < v <= 1 << 20)
    val_batch_size: int = positive(524288)  # each rank takes VAL_BATCH_SIZE / 8 tokens a batch
    val_loss_every: int = free(4000)  # <= 0: only at the end
    train_log_every: int = count(500)
    ema_decay: float = unit(0.997)  # the exported weights' EMA
    qat_enabled: bool = free(False)  # fake int6 from the first step
    late_qat_threshold: float = free(0.15)  # QAT once the lr scale drops below; <= 0: never
    recur_start_step: int = count(3000)  # the first step that trains on RECUR_LAYERS twice
    late_qat: str = choice("record", "record", "on", "off")  # record: as the original ran (below)

    def late_qat_acts(self, compiled: bool) -> bool:
        """The original's class switch acted eagerly but was folded into its compiled graph."""
        return self.late_qat == "on" or (self.late_qat == "record" and not compiled)


@dataclass(frozen=True)
class ExportConfig(Section):
    compressor: str = choice("lzma", "lzma", "brotli")
    gptq_enabled: bool = free(False)  # full-Hessian GPTQ for the int6 matrices (record 2026-03-29)
    gptq_calibration_batches: int = positive(64)  # for the Hessians
    gptq_reserve_seconds: float = nonneg(10.0)  # taken off the training cap for the calibration
    artifact: str = file_path("final_model.int6.ptz")  # EVAL_ONLY reads it
    model_path: str = file_path("final_model.pt")  # the unquantised EMA weights

    def check(self) -> None:
        artifact = Path(self.artifact).resolve()
        need(Path(self.model_path).resolve() not in (artifact, sidecar_path(artifact)), "ARTIFACT",
             self.artifact, f"outputs that do not collide with MODEL_PATH={self.model_path!r} "
             f"(it and {self.artifact}.json)")


@dataclass(frozen=True)
class SlotConfig(Section):
    PREFIX = "SLOT_"
    enabled: bool = free(True)
    steps: int = positive(48)  # AdamW steps per batch
    lr: float = nonneg(0.012)  # peak, cosine to LR_MIN
    lr_min: float = nonneg(0.001)
    batch_seqs: int = positive(32)  # windows per SLOT (and sliding) batch
    mode: str = choice("scored", "scored", "context", "both")  # scored: the original's, not causal
    interleave: int = positive(8)  # windows dealt round-robin into this many lists (8 GPUs)

    @property
    def modes(self) -> tuple[str, ...]:
        return ("scored", "context") if self.mode == "both" else (self.mode,)


@dataclass(frozen=True)
class TTTConfig(Section):
    PREFIX = "TTT_"
    enabled: bool = free(False)  # legal score-first test-time training (record 2026-03-23)
    lr: float = nonneg(0.002)  # SGD, cosine over the chunks
    epochs: int = count(3)  # passes over each scored chunk
    chunk_tokens: int = positive(32768)  # targets per chunk
    freeze_blocks: int = count(0)  # blocks 0..N-1 keep their weights
    momentum: float = unit(0.9)
    batch_seqs: int = positive(32)  # sequences per step
    grad_clip: float = nonneg(1.0)  # 0: no clipping
    qat: bool = free(True)  # fake int6 in TTT's training forward
    float32: bool = free(False)  # train the copy in float32 (the CPU reference's layout) on CUDA


@dataclass(frozen=True)
class EvalConfig(Section):
    PREFIX = "EVAL_"
    seq_len: int = setting(2048, "an integer at most 1048576 (<= 0: TRAIN_SEQ_LEN)",
                           lambda v: v <= 1 << 20)
    stride: int = free(96)  # <= 0 or >= SEQ_LEN: no stride-S sliding pass
    tail: str = choice("once", "once", "original")  # original: re-scores the last targets
    slot: SlotConfig = field(default_factory=SlotConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)

    @property
    def window_stride(self) -> int:  # SLOT's and TTT's windows
        return self.stride if self.stride > 0 else 64

    def check(self) -> None:
        windows = self.slot.enabled or self.ttt.enabled
        need(not windows or self.window_stride <= self.seq_len, "EVAL_STRIDE", self.stride,
             f"at most EVAL_SEQ_LEN={self.seq_len} with SLOT or TTT on (<= 0 means 64; "
             f"longer leaves gaps)")
        need(not self.ttt.enabled or self.ttt.chunk_tokens >= self.seq_len, "TTT_CHUNK_TOKENS",
             self.ttt.chunk_tokens,
             f"at least EVAL_SEQ_LEN={self.seq_len} (a chunk holds whole sequences to train on)")


# -----------------------------
# MODEL
# -----------------------------
# Takes a GPTConfig; returns the GPT. Every parameter has one declared role (optimizer group,
# CUDA dtype, artifact format): the role table closes the section.


def rms(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))  # eps=None: the dtype's machine epsilon


def fake_int6(w: Tensor, dtype: torch.dtype) -> Tensor:
    """Late QAT: the weight as int6 would store it (row max / 31), straight-through gradient."""
    with torch.no_grad():
        w32 = w.float()
        scale = (w32.abs().amax(dim=1) / 31.0).clamp_min(1.0 / 31.0)[:, None]
        w_q = (torch.clamp(torch.round(w32 / scale), -32, 31) * scale).to(dtype)
    w = w.to(dtype)
    return w + (w_q - w).detach()


class CastedLinear(nn.Linear):
    """A bias-free linear in the input's dtype; `qat` is an argument, so no recompile."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False,
                 role: str = "matrix"):
        super().__init__(in_features, out_features, bias=False)
        self.zero_init = zero_init
        self.param_roles = {"weight": role}

    def forward(self, x: Tensor, qat: bool = False) -> Tensor:
        w = fake_int6(self.weight, x.dtype) if qat else self.weight.to(x.dtype)
        return F.linear(x, w)


class Table(nn.Embedding):
    param_roles = {"weight": "embedding"}


class ScalarList(nn.ParameterList):
    @property
    def param_roles(self) -> dict[str, str]:
        return dict.fromkeys((str(i) for i in range(len(self))), "scalar")


def rotary_cos_sin(seq_len: int, rope_dims: int, base: float, device, dtype) -> tuple[Tensor, ...]:
    """Partial-RoPE tables in float32, cast to the activation dtype. Seed quirk kept: the base
    is rescaled for rows over 1024 tokens (so at T = 2048)."""
    if seq_len > 1024:
        base = base * (seq_len / 1024) ** (rope_dims / (rope_dims - 2))
    dims = torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims
    inv_freq = 1.0 / (base ** dims)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((a * cos + b * sin, a * (-sin) + b * cos, rest), dim=-1)


SDPA_PINS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
FLASH_MODULES = (("fa3", "flash_attn_interface"), ("fa2", "flash_attn.flash_attn_interface"),
                 ("fa2", "flash_attn"))


def attention_kernel(setting: str, device: torch.device) -> tuple:
    """(kernel, flash_attn_func or None) for ATTENTION_BACKEND. auto: the original's order on
    CUDA, torch's choice on the CPU."""
    if setting == "auto" and device.type != "cuda":
        return "sdpa", None
    for name, module in FLASH_MODULES:
        with contextlib.suppress(ImportError, AttributeError):  # (as `from m import f`)
            if setting in ("auto", name):
                return name, importlib.import_module(module).flash_attn_func
    need(setting not in ("fa3", "fa2"), "ATTENTION_BACKEND", setting, "a kernel that is installed")
    return ("flash" if setting == "auto" else setting), None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa",
                     flash=None) -> Tensor:
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]; query head h reads kv head h // (H/Hkv)."""
    if torch.is_autocast_enabled(q.device.type):
        # torch >= 2.12's autocast leaves q and k float32 (rms_norm), and FA3 refuses mixed dtypes.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if flash is not None:
        out = flash(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    with sdpa_kernel(SDPA_PINS[backend]) if backend in SDPA_PINS else contextlib.nullcontext():
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True,
                                           enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


class Attention(nn.Module):
    param_roles = {"q_gain": "scalar", "vrl_gate": "scalar"}

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.vrl_gate = nn.Parameter(torch.tensor(-1.5)) if cfg.vrl_enabled and layer > 0 else None
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        self.kernel = ("sdpa", None)  # (build_model's: attention_kernel)
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.c_k = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.c_v = CastedLinear(cfg.model_dim, cfg.kv_dim)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], v_first: Tensor | None,
                ve: Tensor | None, qat: bool) -> tuple[Tensor, Tensor]:
        B, T, _ = x.shape
        q = self.c_q(x, qat).reshape(B, T, -1, self.head_dim)
        k = self.c_k(x, qat).reshape(B, T, -1, self.head_dim)
        v = self.c_v(x, qat)
        v_raw = v  # layer 0's raw value feeds the value residual of later layers
        if ve is not None:
            v = v + ve
        if self.vrl_gate is not None and v_first is not None:
            alpha = torch.sigmoid(self.vrl_gate.to(v.dtype))
            v = (1 - alpha) * v + alpha * v_first
        v = v.reshape(k.shape)
        q, k = apply_rotary(rms(q), *rope), apply_rotary(rms(k), *rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, *self.kernel)
        if self.xsa:  # remove each head's component along its (normalised) value vector
            y = y.reshape(*k.shape[:3], -1, self.head_dim)  # [B, T, Hkv, group, D]
            v_hat = F.normalize(v, dim=-1).unsqueeze(-2)
            y = y - (y * v_hat).sum(dim=-1, keepdim=True) * v_hat
        return self.proj(y.reshape(B, T, -1), qat), v_raw


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor, qat: bool) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x, qat), negative_slope=0.5).square(), qat)


class Block(nn.Module):
    param_roles = {"attn_scale": "scalar", "mlp_scale": "scalar", "resid_mix": "scalar"}

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim))
        mix = (torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))  # x and x0 weights
        self.resid_mix = nn.Parameter(torch.stack(mix))
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.ln_scale = 1.0 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0

    def forward(self, x, x0, rope, v_first, ve, qat: bool):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn_out, v_raw = self.attn(rms(x) * self.ln_scale, rope, v_first, ve, qat)
        x = x + self.attn_scale.to(x.dtype) * attn_out
        x = x + self.mlp_scale.to(x.dtype) * self.mlp(rms(x) * self.ln_scale, qat)
        return x, v_raw

    def parallel(self, x, x0, rope, v_first, ve, qat: bool, lam):
        """The block on lanes x = [lane0, lane1]: attention reads lane 0, the MLP lane 1; each
        adds to both (docs/legal_stack.md)."""
        post, resid = (t.to(x0.dtype)[..., None, None, None] for t in lam)
        mix = self.resid_mix.to(x0.dtype)
        a, v_raw = self.attn(rms(mix[0] * x[0] + mix[1] * x0) * self.ln_scale, rope, v_first, ve,
                             qat)
        x = resid[0] * x + post[0] * (self.attn_scale.to(x0.dtype) * a)
        m = self.mlp(rms(mix[0] * x[1] + mix[1] * x0) * self.ln_scale, qat)
        return resid[1] * x + post[1] * (self.mlp_scale.to(x0.dtype) * m), v_raw


class ScaledEmbedding(nn.Module):
    param_roles = {"scale": "scalar"}

    def __init__(self, rows: int, dim: int, out_dim: int, scale: float, init_std: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.embed = Table(rows, dim)
        if init_std > 0:
            nn.init.normal_(self.embed.weight, std=init_std)
        else:
            nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, out_dim) if dim != out_dim else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def forward(self, ids: Tensor, qat: bool = False) -> Tensor:
        out = self.embed(ids)
        if self.proj is not None:
            out = self.proj(out, qat)
        return out * self.scale.to(out.dtype)


class BigramHash(ScaledEmbedding):
    """A learned embedding of a hash of (previous token, token), added to the token embedding."""

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim, scale=0.05,
                         init_std=0.0)

    def forward(self, ids: Tensor, qat: bool = False) -> Tensor:
        t = ids.to(torch.int32)  # the hash wraps in int32, as the original's
        mod = self.embed.num_embeddings - 1
        buckets = torch.full_like(t, mod)  # position 0 of every row has no previous token
        buckets[:, 1:] = torch.bitwise_xor(36313 * t[:, 1:], 27191 * t[:, :-1]) % mod
        return super().forward(buckets.long(), qat)


class SmearGate(nn.Module):
    """Mixes each position with the previous one: x[t] <- (1 - g) x[t] + g x[t-1]."""
    param_roles = {"gate": "scalar"}

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))
        x_prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
        return (1 - g) * x + g * x_prev


class GPT(nn.Module):
    # Gains, not matrices to orthogonalise.
    param_roles = {"skip_weights": "scalar", "parallel_post_lambdas": "scalar",
                   "parallel_resid_lambdas": "scalar"}

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg, self.ve_ids, self.recur_ids = cfg, cfg.ve_layer_ids, cfg.recur_ids
        num_skips = min(cfg.num_layers // 2, cfg.num_layers - cfg.num_layers // 2)
        # Construction order is the random draws' order: keep it.
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim))
        if cfg.parallel_residual:  # row p: physical layer p's (no random draw)
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1**0.5))
        self.tok_emb = Table(cfg.vocab_size, cfg.model_dim)
        self.bigram = BigramHash(cfg) if cfg.bigram_vocab_size > 0 else None
        self.smear = SmearGate(cfg.model_dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.ve_shared = None
        if cfg.ve_layer_ids:
            self.ve_shared = ScaledEmbedding(cfg.vocab_size, cfg.ve_dim, cfg.kv_dim, scale=0.1,
                                             init_std=0.01)
        self.ve_layer_scales = ScalarList(nn.Parameter(torch.ones(1)) for _ in cfg.ve_layer_ids)
        self.lm_head = None
        if not cfg.tie_embeddings:
            self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True, role="head")
        self._init_weights()
        self.roles = parameter_roles(self, cfg.control_patterns)

    def _init_weights(self) -> None:
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.cfg.tied_embed_init_std)
        for name, module in self.named_modules():
            if not isinstance(module, CastedLinear):
                continue
            if module.zero_init:
                nn.init.zeros_(module.weight)
            elif min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight, gain=1.0)
                if name.endswith(".proj"):
                    # Seed quirk kept: this also moves bigram.proj and ve_shared.proj off zero.
                    with torch.no_grad():
                        module.weight.mul_(1.0 / math.sqrt(2 * self.cfg.num_layers))

    def head_weight(self) -> Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    def layer_order(self, recur: bool) -> list[int]:
        """The physical layer of each virtual layer: with `recur`, RECUR_LAYERS run again after
        the last of them (docs/legal_stack.md)."""
        L, R = self.cfg.num_layers, self.recur_ids if recur else ()
        cut = R[-1] + 1 if R else L
        return [*range(cut), *R, *range(cut, L)]

    def hidden(self, ids: Tensor, qat: bool = False, recur: bool = False) -> Tensor:
        """Final hidden states after the last RMS norm, [B, T, d]. x: one stream, or two lanes
        [2, B, T, d]."""
        cfg = self.cfg
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids, qat)
        x = self.smear(rms(x))
        x0, v_first, skips = x, None, []
        rope_dims = cfg.rope_dims or cfg.head_dim
        rope = rotary_cos_sin(ids.size(1), rope_dims, cfg.rope_base, ids.device, x.dtype)
        ve_base = self.ve_shared(ids, qat) if self.ve_shared is not None else None
        order = self.layer_order(recur)
        encoder, rows = len(order) // 2, len(self.skip_weights)
        for i, p in enumerate(order):
            lanes = cfg.parallel_residual and p >= cfg.parallel_start_layer
            if lanes and x.dim() == 3:
                x = torch.stack((x, x))  # both lanes start as the stream
            if i >= encoder and skips:  # U-Net: decoder i reads encoder outputs, LIFO
                x = x + self.skip_weights[min(i - encoder, rows - 1)].to(x0.dtype) * skips.pop()
            ve = None
            if p in self.ve_ids:
                ve = ve_base * self.ve_layer_scales[self.ve_ids.index(p)].to(ve_base.dtype)
            if lanes:
                lam = (self.parallel_post_lambdas[p], self.parallel_resid_lambdas[p])
                x, v_raw = self.blocks[p].parallel(x, x0, rope, v_first, ve, qat, lam)
            else:
                x, v_raw = self.blocks[p](x, x0, rope, v_first, ve, qat)
            if v_first is None:
                v_first = v_raw
            if i < encoder:
                skips.append(x)
        return rms(x if x.dim() == 3 else (x[0] + x[1]) * 0.5)

    def logits(self, x: Tensor, qat: bool = False) -> Tensor:
        if self.lm_head is None:
            z = F.linear(x, self.head_weight().to(x.dtype))
        else:
            z = self.lm_head(x, qat)
        # Rounded once, as the original's compiled graph does.
        return (self.cfg.logit_softcap * torch.tanh(z.float() / self.cfg.logit_softcap)).to(z.dtype)

    def forward(self, ids: Tensor, targets: Tensor, qat: bool = False,
                recur: bool = False) -> Tensor:
        """The training loss: mean cross-entropy over every target."""
        logits = self.logits(self.hidden(ids, qat, recur), qat)
        return F.cross_entropy(logits.float().reshape(-1, self.cfg.vocab_size), targets.reshape(-1))


def build_model(cfg: GPTConfig, device: torch.device, seed: int | None = None,
                attention: str = "auto") -> GPT:
    """Built on the CPU (the original's draws, the caller's generator untouched), rounded
    through bf16, then in each role's dtype on CUDA, float32 on the CPU."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        model = GPT(cfg).bfloat16()
    kernel = attention_kernel(attention, device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel
    return (cuda_layout(model) if device.type == "cuda" else model.float()).to(device)


@dataclass(frozen=True)
class Role:
    group: str  # optimizer: embed (AdamW), head (Adam), matrix (Muon), scalar (AdamW)
    cuda_dtype: torch.dtype
    export: str  # int6 | int8 | fp16; any tensor of at most PASSTHROUGH_MAX_NUMEL values is fp16


# A control tensor is a scalar named by CONTROL_TENSOR_NAME_PATTERNS: fp16 at any size.
ROLES = {
    "embedding": Role("embed", torch.bfloat16, "int8"),  # the original keeps its tables bf16
    "head": Role("head", torch.float32, "int8"),
    "matrix": Role("matrix", torch.float32, "int6"),
    "scalar": Role("scalar", torch.float32, "int8"),
    "control": Role("scalar", torch.float32, "fp16"),
}


def parameter_roles(model: nn.Module, control_patterns: tuple[str, ...]) -> dict[str, Role]:
    """Every parameter's role, from its module's `param_roles`; none or two stops the build."""
    declared = {}
    for prefix, module in model.named_modules():
        for local, kind in getattr(module, "param_roles", {}).items():
            name = f"{prefix}.{local}" if prefix else local
            if name in declared:
                raise ConfigError(f"parameter {name} has two roles ({declared[name]}, {kind}); "
                                  f"declare it in one module's param_roles")
            declared[name] = kind
    roles = {}
    for name, p in model.named_parameters():
        if name not in declared:
            raise ConfigError(f"parameter {name} {tuple(p.shape)} has no role; declare it in its "
                              f"module's param_roles as one of {', '.join(ROLES)}")
        kind = declared[name]
        if kind == "scalar" and any(pattern in name for pattern in control_patterns):
            kind = "control"
        roles[name] = ROLES[kind]
    return roles


def cuda_layout(model: GPT) -> GPT:
    for name, p in model.named_parameters():
        p.data = p.data.to(model.roles[name].cuda_dtype)
    return model


def role_summary(model: GPT) -> list[str]:
    """Counts per optimizer group and artifact format: where a new tensor went."""
    groups, formats = {}, {}
    for name, p in model.named_parameters():
        role = model.roles[name]
        fmt = "fp16" if p.numel() <= PASSTHROUGH_MAX_NUMEL else role.export
        for table, key in ((groups, role.group), (formats, fmt)):
            tensors, params = table.get(key, (0, 0))
            table[key] = (tensors + 1, params + p.numel())
    return [f"param_groups (tensors/params) {format_counts(groups)}",
            f"param_formats (tensors/params) {format_counts(formats)}"]


def format_counts(table: dict[str, tuple[int, int]]) -> str:
    return " ".join(f"{key}:{tensors}/{params}" for key, (tensors, params) in table.items())

# -----------------------------
# OPTIMIZERS AND SCHEDULE
# -----------------------------
# Takes the parameter table and an OptimConfig; returns the record's optimizers and the
# schedule (lr multiplier, Muon's momentum, late QAT) the training loop asks every step.


def cpu_bf16_matmul(p: Tensor, q: Tensor) -> Tensor:
    """A bf16 GEMM's product (float32 sums, one rounding): CPUs emulate bf16 GEMMs ~25x slower."""
    return torch.matmul(p.float(), q.float()).bfloat16()


def newton_schulz5(g: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise g, in bf16 throughout."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    x = x / (x.norm() + eps)
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    mm = torch.matmul if x.is_cuda else cpu_bf16_matmul
    for _ in range(steps):
        A = mm(x, x.T)
        B = b * A + mm(c * A, A)
        x = a * x + mm(B, x)
    return x.T if transposed else x


def row_normalized_newton_schulz5(g: Tensor, steps: int) -> Tensor:
    """MuonEq-R (record 2026-04-03): each row of g to unit norm (float32), then Newton-Schulz."""
    return newton_schulz5(g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype),
                          steps)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalised; rank k % world_size does parameter k, and one
    all-reduce of a flat bf16 buffer shares the updates."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 orthogonalize=newton_schulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps,
                                      weight_decay=weight_decay))
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params, lr = group["params"], group["lr"]
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                               dtype=torch.bfloat16)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    flat[offset:offset + p.numel()] = self.update(p, group).reshape(-1)
                offset += p.numel()
            if distributed:
                all_reduce_sum(flat)
            offset = 0
            for p in params:
                if group["weight_decay"] > 0:
                    p.mul_(1.0 - lr * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-lr)
                offset += p.numel()

    def update(self, p: Tensor, group: dict) -> Tensor:
        state, mu = self.state[p], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(mu).add_(p.grad)
        update = self.orthogonalize(p.grad.add(buf, alpha=mu), group["backend_steps"])
        return update * max(1, update.size(0) / update.size(1)) ** 0.5


def all_reduce_sum(t: Tensor) -> None:
    # gloo reduces bf16 poorly: widen on the CPU. Each slot has one non-zero writer: exact.
    if t.dtype == torch.bfloat16 and t.device.type == "cpu":
        wide = t.float()
        dist.all_reduce(wide)
        t.copy_(wide)
    else:
        dist.all_reduce(t)


def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """The table's optimizer groups, each in the model's parameter order."""
    groups = {"embed": [], "matrix": [], "scalar": [], "head": []}
    for name, p in model.named_parameters():
        groups[model.roles[name].group].append(p)
    return groups


def build_optimizers(model: GPT, cfg: OptimConfig, compiled: bool = False) -> list:
    """[AdamW embeddings, AdamW scalars, Muon matrices, (Adam head)]: the original's order."""
    groups = param_groups(model)
    fused = dict(fused=True) if next(model.parameters()).is_cuda else {}
    adam = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, **fused)
    embed_lr = cfg.tied_embed_lr if model.lm_head is None else cfg.embed_lr
    optimizers = [torch.optim.AdamW(groups[name], lr=lr, weight_decay=cfg.adam_wd, **adam)
                  for name, lr in (("embed", embed_lr), ("scalar", cfg.scalar_lr))]
    # Eagerly, Newton-Schulz is thousands of small launches a step; one graph per shape.
    orthogonalize = row_normalized_newton_schulz5 if cfg.muon_row_normalize else newton_schulz5
    orthogonalize = torch.compile(orthogonalize, dynamic=False) if compiled else orthogonalize
    optimizers.append(Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                           backend_steps=cfg.muon_backend_steps, weight_decay=cfg.muon_wd,
                           orthogonalize=orthogonalize))
    if groups["head"]:
        optimizers.append(torch.optim.Adam(groups["head"], lr=cfg.head_lr, **adam))
    for group in (group for opt in optimizers for group in opt.param_groups):
        group["base_lr"] = group["lr"]  # the schedule scales lr from it
    return optimizers


@dataclass(frozen=True)
class Schedule:
    """A linear lr warm-down (by steps, or under a wall-clock cap by the time the remaining
    steps will take), Muon's momentum warm-up and late QAT's threshold."""
    train: TrainConfig
    optim: OptimConfig
    cap_ms: float | None  # None: no wall-clock cap

    @classmethod
    def of(cls, train: TrainConfig, optim: OptimConfig, cap_seconds: float) -> "Schedule":
        return cls(train, optim, 1000.0 * cap_seconds if cap_seconds > 0 else None)

    def lr_scale(self, step: int, elapsed_ms: float) -> float:
        iterations, warmdown = self.train.iterations, self.train.warmdown_iters
        if warmdown <= 0:
            return 1.0
        if self.cap_ms is None:
            if max(iterations - warmdown, 0) <= step < iterations:
                return max((iterations - step) / warmdown, 0.0)
            return 1.0
        warmdown_ms = warmdown * (elapsed_ms / max(step, 1))
        remaining_ms = max(self.cap_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0

    def momentum(self, step: int) -> float:
        o, warmup = self.optim, self.optim.muon_momentum_warmup_steps
        frac = min(step / warmup, 1.0) if warmup > 0 else 1.0
        return (1 - frac) * o.muon_momentum_warmup_start + frac * o.muon_momentum

    def late_qat(self, lr_scale: float) -> bool:
        """Whether this multiplier switches late QAT on (the loop never switches it off)."""
        return 0 < self.train.late_qat_threshold and lr_scale < self.train.late_qat_threshold

# -----------------------------
# RUNTIME AND DATA
# -----------------------------
# Where this process runs (rank, device, compile, its log), then DATA_PATH's shards and the
# tokenizer, every one checked before any work.


ORIGINAL_WORLD = 8  # the original's 8 GPUs: its batch split, validation batch and SLOT grouping


def grad_accum_steps(world_size: int) -> int:
    return ORIGINAL_WORLD // world_size if ORIGINAL_WORLD % world_size == 0 else 1


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    compile: bool = False
    log_path: str | None = None
    attention: str = "sdpa"  # ATTENTION_BACKEND on this device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def log(self, msg: str, console: bool = True) -> None:
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                print(msg, file=f)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def mark(self):
        """Now on the device's timeline, without a sync: a CUDA event (or the host clock)."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def reduce(self, values: list[float] | Tensor) -> Tensor:
        t = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.distributed:
            dist.all_reduce(t)
        return t

    def compiled(self, fn):
        """fn compiled for fixed shapes on CUDA (or with COMPILE=1), else fn itself."""
        return torch.compile(fn, dynamic=False, fullgraph=True) if self.compile else fn


def start_runtime(cfg: RunConfig) -> Runtime:
    """torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU; otherwise a single process."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("DEVICE='cuda' but no CUDA device is available; "
                          "expected DEVICE=auto or cpu")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    missing = {"RANK", "MASTER_ADDR", "MASTER_PORT"} - set(os.environ)
    if world_size > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={world_size} is set without torchrun (no "
                          f"{', '.join(sorted(missing))}); expected a torchrun launch or "
                          f"WORLD_SIZE unset")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        # The original's setting; it reaches SLOT's float32 logit matmul too.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.collective_timeout_seconds)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout,
                                device_id=device if use_cuda else None)
    compiled = cfg.compile == "1" or (cfg.compile == "auto" and use_cuda)
    return Runtime(rank, world_size, device, compiled,
                   attention=attention_kernel(cfg.attention_backend, device)[0])


def check_attention(cfg: Config, rt: Runtime) -> None:
    """A kernel that refuses the model stops the run here (pinned SDPA never falls back)."""
    m = cfg.model
    q = torch.zeros(1, cfg.max_seq_len, m.num_heads, m.head_dim, device=rt.device,
                    requires_grad=True)
    kv = q[:, :, :m.num_kv_heads]
    try:
        with rt.autocast(), warnings.catch_warnings(record=True) as why:
            causal_attention(q, kv, kv, *attention_kernel(rt.attention, rt.device)).sum().backward()
    except RuntimeError as e:
        reason = "; ".join(str(w.message) for w in why) or str(e)
        raise ConfigError(f"ATTENTION_BACKEND={cfg.run.attention_backend!r}: {rt.attention} "
                          f"refuses this model ({reason[:300]})") from None


def check_world(cfg: Config, world_size: int) -> None:
    """Batch divisibility depends on the world size, known only at launch."""
    t = cfg.train
    accum = grad_accum_steps(world_size)
    unit_tokens = world_size * accum * t.train_seq_len
    if t.train_batch_tokens % unit_tokens:
        raise ConfigError(
            f"TRAIN_BATCH_TOKENS={t.train_batch_tokens} does not split over world_size="
            f"{world_size} x grad_accum={accum} x TRAIN_SEQ_LEN={t.train_seq_len}; "
            f"expected a multiple of {unit_tokens}")
    per_rank = t.val_batch_size // ORIGINAL_WORLD
    if per_rank < cfg.max_seq_len:
        raise ConfigError(
            f"VAL_BATCH_SIZE={t.val_batch_size} gives each rank {per_rank} tokens per batch; "
            f"expected at least 8 x {cfg.max_seq_len} (one sequence per rank)")


SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256  # as tools/_files.py
HEADER_BYTES = HEADER_INTS * 4


def load_data_shard(path) -> np.ndarray:
    """A shard's tokens as a read-only uint16 memory map (no whole-file copy)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read shard ({e.strerror})") from None
    if header.size < HEADER_INTS:
        raise ConfigError(f"{path}: truncated header ({size} bytes; a shard starts with a "
                          f"{HEADER_BYTES}-byte header)")
    for what, value, expected in (("bad magic", header[0], SHARD_MAGIC),
                                  ("unsupported version", header[1], SHARD_VERSION)):
        if value != expected:
            raise ConfigError(f"{path}: {what} {value}; expected {expected}")
    n = int(header[2])
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ConfigError(f"{path}: size {size} bytes does not match header token count {n} "
                          f"(expected {HEADER_BYTES + 2 * max(n, 0)} bytes)")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def checked_shard(path, vocab_size: int) -> np.ndarray:
    """A shard whose ids all fit the vocabulary (an embedding lookup would fail mid-run)."""
    tokens = load_data_shard(path)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"{path}: token id {int(tokens.max())} is out of range for "
                          f"VOCAB_SIZE={vocab_size}")
    return tokens


def shard_files(data_path: str, split: str) -> list[str]:
    if not os.path.isdir(data_path):
        what = "is a file" if os.path.exists(data_path) else "does not exist"
        raise ConfigError(f"DATA_PATH={data_path!r}: {what}; expected a folder of "
                          f"fineweb_{split}_*.bin shards")
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    if not files:
        raise ConfigError(f"DATA_PATH={data_path!r}: no fineweb_{split}_*.bin shards found")
    return files


class TokenStream:
    """The train shards in order, wrapping around (load_data checked each one's ids)."""

    def __init__(self, files: list[str]):
        self.files, self.file_idx, self.pos = files, 0, 0
        self.tokens = load_data_shard(files[0])

    def take(self, n: int) -> np.ndarray:
        """The next n tokens as stored (uint16): each rank widens only its own span."""
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.size:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = load_data_shard(self.files[self.file_idx])
                self.pos = 0
                continue
            k = min(n, self.tokens.size - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class DistributedTokenLoader:
    """Each micro-step takes one contiguous chunk; rank r reads its own (local + 1)-token slice."""

    def __init__(self, files: list[str], rt: Runtime):
        self.stream, self.rt = TokenStream(files), rt

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum: int) -> tuple[Tensor, ...]:
        rank, world = self.rt.rank, self.rt.world_size
        local = global_tokens // (world * grad_accum)
        chunk = self.stream.take((local + 1) * world)
        span = torch.from_numpy(chunk[rank * (local + 1):(rank + 1) * (local + 1)].astype(np.int64))
        if self.rt.device.type == "cuda":  # pinned: the copy overlaps the previous micro-step
            span = span.pin_memory()
        span = span.to(self.rt.device, non_blocking=True)
        return span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)


def load_validation_tokens(files: list[str], seq_len: int, vocab_size: int) -> Tensor:
    parts = [np.asarray(checked_shard(f, vocab_size), dtype=np.int64) for f in files]
    tokens = np.concatenate(parts)
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ConfigError(f"validation split ({', '.join(files)}) has {tokens.size} tokens; "
                          f"expected more than one sequence of {seq_len}")
    return torch.from_numpy(tokens[:usable + 1])


def load_tokenizer(cfg: DataConfig, vocab_size: int) -> spm.SentencePieceProcessor:
    path = Path(cfg.tokenizer_path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path!r}: {what}; expected a "
                          f"SentencePiece .model file")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError):
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path!r}: not a SentencePiece "
                          f"model") from None
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"VOCAB_SIZE={vocab_size} differs from the tokenizer's size "
                          f"{sp.vocab_size()} ({cfg.tokenizer_path}); expected "
                          f"VOCAB_SIZE={sp.vocab_size()}")
    return sp


def check_tokenizer_hash(cfg: DataConfig) -> list[str]:
    """Another tokenizer would give a meaningless bpb; without a manifest, a warning."""
    manifest = Path(cfg.data_path) / "manifest.json"
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):  # no manifest, or one without a hash
        return [f"WARNING: TOKENIZER_PATH is unchecked: no tokenizer sha256 in {manifest}"]
    actual = hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest()
    if actual != expected:
        raise ConfigError(f"TOKENIZER_PATH={cfg.tokenizer_path!r} (sha256 {actual[:12]}...) is not "
                          f"the tokenizer of DATA_PATH's shards ({manifest}: sha256 "
                          f"{expected[:12]}...); expected the tokenizer they were made with")
    return []


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device) -> tuple[Tensor, ...]:
    """Per-token UTF-8 byte counts, leading-space and boundary flags."""
    table = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(table, dtype=np.int16)
    leading_space = np.zeros(table, dtype=np.bool_)
    boundary = np.ones(table, dtype=np.bool_)  # ids past the tokenizer's size count as boundaries
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            leading_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return tuple(torch.from_numpy(a).to(device) for a in (base_bytes, leading_space, boundary))


def count_bytes(luts, prev_ids: Tensor, target_ids: Tensor) -> Tensor:
    """Bytes of each target: its piece, plus the space it opens unless it follows a boundary."""
    base_bytes, leading_space, boundary = luts
    opens_space = leading_space[target_ids] & ~boundary[prev_ids]
    return base_bytes[target_ids].double() + opens_space.double()


@dataclass(frozen=True)
class Data:
    """Validation tokens on the host, byte tables on the device."""
    val_tokens: Tensor
    luts: tuple[Tensor, ...]
    train_files: list[str]
    train_tokens: int


def load_data(cfg: Config, rt: Runtime, training: bool) -> tuple[Data, list[str]]:
    """Every data input checked; returns the data and the warnings to log."""
    sp = load_tokenizer(cfg.data, cfg.model.vocab_size)
    vocab = cfg.model.vocab_size
    val_files = shard_files(cfg.data.data_path, "val")
    val_tokens = load_validation_tokens(val_files, cfg.max_seq_len, vocab)
    files = shard_files(cfg.data.data_path, "train") if training else []
    sizes = [checked_shard(f, vocab).size for f in files]  # every header and id before any work
    warnings = check_tokenizer_hash(cfg.data)
    if files:
        if sum(sizes) == 0:
            raise ConfigError(f"DATA_PATH={cfg.data.data_path!r}: the training split "
                              f"({len(files)} shards) holds 0 tokens; expected training data")
        step = cfg.train.train_batch_tokens + rt.world_size
        if sum(sizes) < step:
            warnings.append(f"WARNING: the training split holds {sum(sizes)} tokens, less than one "
                            f"step ({cfg.train.train_batch_tokens}): every step repeats it")
        calibration = step * cfg.export.gptq_calibration_batches
        if cfg.export.gptq_enabled and sum(sizes) < calibration:
            warnings.append(f"WARNING: GPTQ's calibration reads {calibration} tokens; the training "
                            f"split holds {sum(sizes)}, so it repeats them")
    files = [f for f, n in zip(files, sizes) if n]  # an empty shard is skipped, not spun on
    luts = build_byte_luts(sp, vocab, rt.device)
    return Data(val_tokens, luts, files, sum(sizes)), warnings

# -----------------------------
# TRAINING
# -----------------------------
# Takes the model, the data and the cap; leaves the EMA weights in the model and returns the
# compiled hidden-state function and the training time.


class Diverged(Exception):
    """A non-finite loss: the run stops and nothing is exported from those weights."""


@dataclass(frozen=True)
class Trained:
    hidden_fn: object  # model.hidden, compiled on CUDA
    train_ms: float
    recur: bool  # the model as the loop left it runs RECUR_LAYERS twice


def check_finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise Diverged(f"training diverged: {what} is {value}; nothing was exported")
    return value


class Trainer:

    def __init__(self, cfg: Config, rt: Runtime, model: GPT, data: Data):
        self.cfg, self.rt, self.model, self.data = cfg, rt, model, data
        compiled = rt.compiled(model)
        self.hidden_fn = rt.compiled(model.hidden)
        device_ids = [rt.device.index] if rt.device.type == "cuda" else None
        self.ddp = DDP(compiled, device_ids=device_ids) if rt.distributed else compiled
        self.optimizers = build_optimizers(model, cfg.optim, compiled=rt.compile)
        self.muon = next(opt for opt in self.optimizers if isinstance(opt, Muon))
        self.accum = grad_accum_steps(rt.world_size)
        self.loader = self.new_loader()

    def new_loader(self) -> DistributedTokenLoader:
        return DistributedTokenLoader(self.data.train_files, self.rt)

    def gradients(self, qat: bool, recur: bool) -> Tensor:
        """The step's mean loss, its gradients accumulated over the micro-steps."""
        t, total = self.cfg.train, torch.zeros((), device=self.rt.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch(t.train_batch_tokens, t.train_seq_len, self.accum)
            no_sync = self.rt.distributed and micro < self.accum - 1
            with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                with self.rt.autocast():
                    loss = self.ddp(x, y, qat=qat, recur=recur)
                (loss * (1.0 / self.accum)).backward()
            total += loss.detach()
        return total / self.accum

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def step(self, qat: bool, recur: bool, lr_scale: float, momentum: float) -> Tensor:
        self.zero_grad()
        loss = self.gradients(qat, recur)
        for group in self.muon.param_groups:
            group["momentum"] = momentum
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if self.cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.zero_grad()
        return loss

    def validate(self, recur: bool) -> tuple[float, float]:
        t = self.cfg.train
        sums = score_sequences(self.scoring(recur=recur), t.train_seq_len, t.val_batch_size)
        return sums.result(self.rt)

    def scoring(self, tokens: Tensor | None = None, recur: bool = False) -> "Scoring":
        tokens = self.data.val_tokens if tokens is None else tokens
        return Scoring(self.model, self.hidden_fn, tokens, self.data.luts, self.rt, recur)

    def warm_up(self) -> None:
        """Compiles every graph the timed loop uses (with and without late QAT and recurrence,
        validation), then restores weights, optimizer states and data stream exactly."""
        t, rt, model = self.cfg.train, self.rt, self.model
        initial_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        initial_opt = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        qat_later = not t.qat_enabled and t.late_qat_threshold > 0 and t.late_qat_acts(rt.compile)
        warm = self.data.val_tokens[:rt.world_size * t.val_batch_size // ORIGINAL_WORLD + 1]
        model.train()
        for recur in (False, True)[:1 + bool(model.recur_ids)]:
            if recur:
                rt.log(f"recurrence:prewarm active=1 virtual_layers:{len(model.layer_order(True))}")
            for i in range(t.warmup_steps):
                self.zero_grad()
                self.gradients(t.qat_enabled or (qat_later and i >= t.warmup_steps // 2), recur)
                for opt in self.optimizers:
                    opt.step()
                if i == 0:
                    score_sequences(self.scoring(warm, recur), t.train_seq_len, t.val_batch_size)
                if t.warmup_steps <= 20 or (i + 1) % 10 == 0 or i + 1 == t.warmup_steps:
                    rt.log(f"warmup_step:{i + 1}/{t.warmup_steps}")
        self.model.load_state_dict(initial_model, strict=True)
        for opt, state in zip(self.optimizers, initial_opt):
            opt.load_state_dict(state)
        self.zero_grad()
        self.loader = self.new_loader()


class Clock:
    """Training time: validation, logging and waits outside it are not counted."""

    def __init__(self, rt: Runtime):
        self.rt, self.ms = rt, 0.0
        rt.sync()
        self.t0 = time.perf_counter()

    def now_ms(self) -> float:
        return self.ms + 1000.0 * (time.perf_counter() - self.t0)

    def pause(self) -> None:
        self.rt.sync()
        self.ms += 1000.0 * (time.perf_counter() - self.t0)

    def resume(self) -> None:
        self.rt.sync()
        self.t0 = time.perf_counter()


def train(cfg: Config, rt: Runtime, model: GPT, data: Data, cap_seconds: float) -> Trained:
    """The record's loop; `cap_seconds` is MAX_WALLCLOCK_SECONDS less GPTQ's reserve."""
    t = cfg.train
    trainer = Trainer(cfg, rt, model, data)
    if t.warmup_steps > 0:
        trainer.warm_up()
    schedule = Schedule.of(t, cfg.optim, cap_seconds)
    ema = EMA(model, t.ema_decay)
    qat, recur, stop_after, step = t.qat_enabled, False, None, 0
    switched = qat
    clock = Clock(rt)
    try:
        while True:
            if model.recur_ids and not recur and step >= t.recur_start_step:
                recur = True  # never switched off again; nothing is copied (shared weights)
                rt.log(f"recurrence:activated step:{step} layers:{list(model.recur_ids)} "
                       f"virtual_layers:{len(model.layer_order(True))}")
            last = step == t.iterations or (stop_after is not None and step >= stop_after)
            if last or (t.val_loss_every > 0 and step % t.val_loss_every == 0):
                clock.pause()
                val_loss, val_bpb = trainer.validate(recur)
                rt.log(f"step:{step}/{t.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                       f"train_time:{clock.ms:.0f}ms step_avg:{clock.ms / max(step, 1):.2f}ms")
                check_finite(val_loss, f"val_loss at step {step}")
                clock.resume()
            if last:
                if stop_after is not None and step < t.iterations:
                    rt.log(f"stopping_early: wallclock_cap train_time:{clock.ms:.0f}ms "
                           f"step:{step}/{t.iterations}")
                break
            scale = schedule.lr_scale(step, clock.now_ms())
            if schedule.late_qat(scale) and not switched:
                switched, qat = True, t.late_qat_acts(rt.compile)  # never switched off again
                if qat:
                    rt.log(f"late_qat:enabled step:{step} scale:{scale:.4f}")
                rt.log(f"late_qat:{'applied' if qat else 'skipped'} LATE_QAT={t.late_qat} "
                       f"compile:{rt.compile}")
            train_loss = trainer.step(qat, recur, scale, schedule.momentum(step))
            ema.update()
            step += 1
            ms = clock.now_ms()
            log_train_step(t, rt, step, train_loss, ms, stop_after is not None)
            if stop_after is None and over_cap(rt, schedule, ms):
                stop_after = step
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {step}/{t.iterations}") from None
    if rt.device.type == "cuda":
        rt.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 1024 // 1024} MiB "
               f"reserved: {torch.cuda.max_memory_reserved() // 1024 // 1024} MiB")
    rt.log("ema:applying EMA weights")
    ema.apply()
    if cfg.model.parallel_residual:
        rt.log("\n".join(lane_table(model, recur)))
    return Trained(trainer.hidden_fn, clock.ms, recur)


def lane_table(model: GPT, recur: bool) -> list[str]:
    """The lanes' lambdas, a line per parallel virtual layer (record 2026-03-31's table)."""
    S = model.cfg.parallel_start_layer
    rows = [(i, p) for i, p in enumerate(model.layer_order(recur)) if p >= S]
    lines = [f"parallel_residual:converged active=1 start_layer={S} start_mode=physical "
             f"final_lane=mean used_layers={len(rows)}"]
    for i, p in rows:
        (aa, am), (ma, mm) = model.parallel_post_lambdas[p].tolist()
        ar, mr = model.parallel_resid_lambdas[p].tolist()
        lines.append(f"parallel_residual layer:{i} physical:{p} attn_resid:{ar:.4f} "
                     f"attn_to_attn:{aa:.4f} attn_to_mlp:{am:.4f} mlp_resid:{mr:.4f} "
                     f"mlp_to_attn:{ma:.4f} mlp_to_mlp:{mm:.4f}")
    return lines


def component_lines(cfg: Config) -> list[str]:
    """The configuration lines of the accepted records' components that are on."""
    m, training = cfg.model, not (cfg.run.eval_only or cfg.run.export_only)
    lines = ["muon: row_normalize=1"] if cfg.optim.muon_row_normalize and training else []
    if m.parallel_residual:
        lines.append(f"parallel_residual: active=1 start_layer={m.parallel_start_layer} "
                     f"start_mode=physical params={6 * m.num_layers}")
    if m.recur_ids:
        lines.append(f"recurrence: layers={list(m.recur_ids)} "
                     f"start_step={cfg.train.recur_start_step} active={int(not training)}")
    return lines


def log_train_step(t: TrainConfig, rt: Runtime, step: int, loss: Tensor, ms: float, stopping: bool):
    if t.train_log_every > 0 and (step <= 10 or step % t.train_log_every == 0 or stopping):
        value = loss.item()
        rt.log(f"step:{step}/{t.iterations} train_loss:{value:.4f} "
               f"train_time:{ms:.0f}ms step_avg:{ms / step:.2f}ms")
        check_finite(value, f"train_loss at step {step}")


def over_cap(rt: Runtime, schedule: Schedule, ms: float) -> bool:
    reached = schedule.cap_ms is not None and ms >= schedule.cap_ms
    if rt.distributed and schedule.cap_ms is not None:  # stop together: any rank over the cap
        flag = torch.tensor(int(reached), device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        reached = bool(flag.item())
    return reached


class EMA:
    """A float32 moving average of every weight, exported instead of the weights."""

    def __init__(self, model: GPT, decay: float):
        self.model, self.decay = model, decay
        # Views of the parameters, which the optimizers update in place.
        self.weights = list(model.state_dict().values())
        self.ema = [w.detach().float().clone() for w in self.weights]

    @torch.no_grad()
    def update(self) -> None:  # one fused launch per op for all ~135 tensors
        torch._foreach_mul_(self.ema, self.decay)
        torch._foreach_add_(self.ema, [w.float() for w in self.weights], alpha=1.0 - self.decay)

    def apply(self) -> None:
        current = self.model.state_dict()
        self.model.load_state_dict({k: e.to(current[k].dtype) for k, e in zip(current, self.ema)},
                                   strict=True)

# -----------------------------
# EXPORT: quantisation, GPTQ, packing, loading
# -----------------------------
# Export and load mirror each other: the evaluations score what was submitted.


INT6_CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, None)  # None: the row max
INT8_CLIP_QUANTILE = 0.9999984
PASSTHROUGH_MAX_NUMEL = 65536
SIZE_LIMIT = 16_000_000
BROTLI_MAGIC = b"PGBR1"  # brotli streams have no magic of their own
XZ_MAGIC = b"\xfd7zXZ\x00"


def quantize_int6(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row int6 with an fp16 scale, the clip candidate of least squared error (first of
    equals)."""
    t32 = t.float()
    if t32.ndim != 2:
        amax = t32.abs().max().item()
        scale = torch.tensor(amax / 31 if amax > 0 else 1.0, dtype=torch.float16)
        return torch.clamp(torch.round(t32 / scale.float()), -31, 31).to(torch.int8), scale
    best, best_err = None, float("inf")
    for scale in int6_clip_scales(t32):
        q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -31, 31).to(torch.int8)
        err = (t32 - q.float() * scale.float()[:, None]).pow(2).mean().item()
        if err < best_err:
            best, best_err = (q, scale), err
    return best


def int6_clip_scales(t32: Tensor) -> Iterator[Tensor]:
    for q_level in INT6_CLIP_QUANTILES:
        if q_level is None:
            clip = t32.abs().amax(dim=1)
        else:
            clip = torch.quantile(t32.abs(), q_level, dim=1)
        yield (clip / 31).clamp_min(1.0 / 31).to(torch.float16)


def quantize_int8(t: Tensor) -> tuple[Tensor, Tensor]:
    """The scale quantises in float32 and is stored fp16 (a 1-D tensor's: 0-d float32)."""
    t32 = t.float()
    if t32.ndim != 2:
        clip = 0.0
        if t32.numel():
            clip = float(torch.quantile(t32.abs().flatten(), INT8_CLIP_QUANTILE).item())
        scale = torch.tensor(clip / 127 if clip > 0 else 1.0, dtype=torch.float32)
        q = torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / scale), -127, 127)
        return q.to(torch.int8), scale
    clip = torch.quantile(t32.abs(), INT8_CLIP_QUANTILE, dim=1)
    scale = (clip / 127).clamp_min(1.0 / 127)
    clipped = torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def quantize_state_dict(state: dict[str, Tensor], roles: dict[str, Role],
                        hessians: dict[str, Tensor] | None = None) -> dict:
    """Each tensor in its role's format (GPTQ where an int6 matrix has a Hessian)."""
    tensors, schemes = {}, {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        fmt = roles[name].export if name in roles else "fp16"  # (no role: not a parameter)
        small = t.numel() <= PASSTHROUGH_MAX_NUMEL or not t.is_floating_point()
        if small or fmt == "fp16":
            tensors[name] = t.to(torch.float16) if t.is_floating_point() else t
            schemes[name] = "passthrough" if small else "passthrough_ctrl"
            continue
        if fmt == "int6" and name in (hessians or {}):
            q, scale = gptq_quantize(t.to(hessians[name].device), hessians[name])
        else:
            q, scale = quantize_int6(t) if fmt == "int6" else quantize_int8(t)
        tensors[name + ".q"] = q.cpu().contiguous()
        tensors[name + ".scale"] = scale.cpu().contiguous()
        schemes[name] = {"type": fmt}
    return {"w": tensors, "m": schemes}


def dequantize_state_dict(container: dict, template: dict[str, Tensor]) -> dict[str, Tensor]:
    tensors, schemes, out = container["w"], container["m"], {}
    for name, ref in template.items():
        scheme = schemes.get(name)
        if scheme is None:
            continue
        if isinstance(scheme, str):
            out[name] = tensors[name].to(ref.dtype)
            continue
        q, scale = tensors[name + ".q"], tensors[name + ".scale"]
        s = scale.float().view(-1, *([1] * (q.ndim - 1))) if scale.ndim else scale.float()
        out[name] = (q.float() * s).to(ref.dtype)
    return out


def gptq_quantize(weight: Tensor, hessian: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """int6 codes and fp16 row scales of least output error under `hessian` (record 2026-03-29)."""
    w32, H = weight.float(), hessian.float().clone()
    dead = H.diagonal() == 0  # an input that is always zero: unit curvature, weights dropped
    H.diagonal()[dead] = 1
    H.diagonal().add_(0.01 * H.diagonal().mean())  # damping keeps the Cholesky well conditioned
    perm = torch.argsort(H.diagonal(), descending=True)  # act-order: most energy first
    W, H = w32[:, perm].clone(), H[perm][:, perm]
    W[:, dead[perm]] = 0
    try:  # the upper Cholesky factor of H^-1 holds each step's error weights
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:  # not positive definite in float32: the clip search
        return quantize_int6(weight)
    scales = list(int6_clip_scales(w32))
    # All candidates in one pass, as rows: a fifth of the launches.
    codes = gptq_round(W.repeat(len(scales), 1), Hinv, torch.cat(scales).float(), block)
    found = list(zip(codes.split(W.size(0)), scales))
    errs = [(W - q.float() * s.float()[:, None]).pow(2).mean().item() for q, s in found]
    q, scale = found[errs.index(min(errs))]
    return q[:, torch.argsort(perm)], scale


def gptq_round(W: Tensor, Hinv: Tensor, sf: Tensor, block: int) -> Tensor:
    """Each column's rounding error moved onto the later ones (lazily past the block)."""
    W, q = W.clone(), torch.zeros(W.shape, dtype=torch.int8, device=W.device)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        err = torch.zeros(W.size(0), i2 - i1, device=W.device)
        for j in range(i1, i2):
            qj = torch.clamp(torch.round(W[:, j] / sf), -31, 31)
            q[:, j] = qj.to(torch.int8)
            err[:, j - i1] = (W[:, j] - qj * sf) / Hinv[j, j]
            W[:, j:i2] -= err[:, j - i1, None] * Hinv[j, j:i2]
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    return q


def gptq_modules(model: GPT) -> dict[str, nn.Module]:
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, CastedLinear) and m.weight.numel() > PASSTHROUGH_MAX_NUMEL:
            if model.roles[f"{name}.weight"].export == "int6":
                found[f"{name}.weight"] = m
    return found


def calibrate(cfg: Config, rt: Runtime, model: GPT, data: Data, train_ms: float,
              micro_batches: int = 0) -> dict:
    """H = mean X^T X per int6 linear, summed in float64 over the training micro-batches: one
    artifact on any world size. `micro_batches`: only these, sums returned as they are."""
    t0, sums, last, batches = time.perf_counter(), {}, {}, cfg.export.gptq_calibration_batches

    def hook(name):
        def accumulate(module, args, out):
            if last.get("x") is not args[0]:  # c_q, c_k and c_v read one tensor: one product
                with torch.autocast(rt.device.type, enabled=False):
                    x = args[0].reshape(-1, args[0].size(-1)).float()
                    last.update(x=args[0], xtx=(x.T @ x).double())
            sums[name] = sums.get(name, 0) + last["xtx"]
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in gptq_modules(model).items()]
    loader = DistributedTokenLoader(data.train_files, rt)
    accum, t = grad_accum_steps(rt.world_size), cfg.train
    model.eval()
    with torch.no_grad(), rt.autocast():
        for _ in range(micro_batches or batches * accum):
            x = loader.next_batch(t.train_batch_tokens, t.train_seq_len, accum)[0]
            model.hidden(x, recur=bool(cfg.model.recur_ids))
    for handle in handles:
        handle.remove()
    if micro_batches:
        return sums
    for H in sums.values() if rt.distributed else ():
        dist.all_reduce(H)
    hessians = {name: (H / batches).float() for name, H in sums.items()}
    rt.sync()
    ms = 1000.0 * (time.perf_counter() - t0)
    rt.log(f"gptq:calibration batches:{batches} inputs:{len(sums)} time:{ms:.0f}ms")
    total, cap = train_ms + ms, 1000.0 * t.max_wallclock_seconds
    if cap > 0:  # training stopped GPTQ_RESERVE_SECONDS early to leave this room
        under = total <= cap
        rt.log(f"{'gptq:' if under else 'WARNING: '}training+calibration {total:.0f}ms "
               f"{'under' if under else 'over'} MAX_WALLCLOCK_SECONDS ({cap:.0f}ms)")
    return hessians


def gptq_reserve(cfg: Config, rt: Runtime, model: GPT, data: Data) -> float:
    """GPTQ_RESERVE_SECONDS, or the calibration's measured time (plus a quarter) if longer."""
    e, cap = cfg.export, cfg.train.max_wallclock_seconds
    if not e.gptq_enabled or cap <= 0:
        return 0.0
    ms = []
    for n in (1, 1, 2):  # the first warms up
        clock = Clock(rt)
        calibrate(cfg, rt, model, data, 0.0, micro_batches=n)
        clock.pause()
        ms.append(clock.ms)
    micro = e.gptq_calibration_batches * grad_accum_steps(rt.world_size)
    mine = 1.25e-3 * (ms[1] + (micro - 1) * max(ms[2] - ms[1], 0.0))
    measured = float(rt.reduce([mine])) / rt.world_size
    reserve = max(e.gptq_reserve_seconds, measured)
    model.train()
    rt.log(f"gptq:reserve {reserve:.1f}s (calibration measured at {measured:.1f}s)")
    need(reserve < cap, "GPTQ_CALIBRATION_BATCHES", e.gptq_calibration_batches, "fewer batches")
    return reserve


@contextlib.contextmanager
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _byte_shuffle(container: dict, inverse: bool) -> dict:
    """Each multi-byte tensor's bytes grouped by significance (brotli compresses that better)."""
    tensors = {}
    for name, t in container["w"].items():
        if inverse and isinstance(t, dict):
            tensors[name] = t["bytes"].T.contiguous().view(t["dtype"]).reshape(t["shape"])
        elif not inverse and t.element_size() > 1:
            planes = t.reshape(-1).view(torch.uint8).reshape(-1, t.element_size()).T.contiguous()
            tensors[name] = {"bytes": planes, "dtype": t.dtype, "shape": tuple(t.shape)}
        else:
            tensors[name] = t
    return {"w": tensors, "m": container["m"]}


def codec(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"COMPRESSOR={name!r} needs the Python package {name}; install it or "
                          f"use COMPRESSOR=lzma") from None


def pack_artifact(container: dict, compressor: str) -> bytes:
    buf = io.BytesIO()
    if compressor == "brotli":
        container = _byte_shuffle(container, inverse=False)
    torch.save(container, buf)
    if compressor == "brotli":
        return BROTLI_MAGIC + codec("brotli").compress(buf.getvalue(), quality=11)
    return lzma.compress(buf.getvalue(), preset=6)


def unpack_artifact(blob: bytes, path) -> dict:
    shuffled = blob.startswith(BROTLI_MAGIC)
    if shuffled:
        decompress, blob = codec("brotli").decompress, blob[len(BROTLI_MAGIC):]
    elif blob.startswith(XZ_MAGIC):
        decompress = lzma.decompress
    else:
        raise ConfigError(f"{path}: not an artifact of this project (no xz or brotli header)")
    try:
        container = torch.load(io.BytesIO(decompress(blob)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
  # (torch's message would advise unsafe loading)
        raise ConfigError(f"{path}: not an artifact of this project (its payload is not a "
                          f"tensor container)") from None
    except Exception as e:
        what = str(e).splitlines()[0][:120] if str(e) else ""
        raise ConfigError(f"{path}: damaged, truncated or not an artifact of this project "
                          f"({type(e).__name__}{': ' + what if what else ''})") from None
    ok = isinstance(container, dict) and all(isinstance(container.get(k), dict) for k in "wm")
    if not ok:
        raise ConfigError(f"{path}: not an artifact of this project (expected a quantised "
                          f"container with keys 'w' and 'm')")
    return _byte_shuffle(container, inverse=True) if shuffled else container


def read_artifact(path) -> dict:
    return unpack_artifact(artifact_bytes(path), path)


def artifact_bytes(path) -> bytes:
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        raise ConfigError(f"ARTIFACT={str(path)!r}: {what}; expected an artifact file")
    return path.read_bytes()


def load_container(model: GPT, container: dict, path) -> GPT:
    template = model.state_dict()
    missing, unexpected = set(template) - set(container["m"]), set(container["m"]) - set(template)
    if missing or unexpected:
        raise ConfigError(f"{path}: artifact does not fit this configuration (missing "
                          f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); set the "
                          f"model variables it was trained with")
    try:
        state = dequantize_state_dict(container, template)
    except KeyError as e:
        raise ConfigError(f"{path}: damaged artifact (no stored tensor {e})") from None
    bad = [k for k, v in state.items() if v.shape != template[k].shape]
    if bad:
        raise ConfigError(f"{path}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, this "
                          f"configuration expects {tuple(template[bad[0]].shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def eval_model(cfg: GPTConfig, container: dict, device: torch.device, path,
               attention: str = "auto") -> GPT:
    return load_container(build_model(cfg, device, attention=attention), container, path)


@dataclass(frozen=True)
class Code:
    """This script's source (logged) and the bytes that count (a packed file's)."""
    source: str
    size: int


def save_weights(cfg: ExportConfig, model: GPT) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    try:
        write_atomic(cfg.model_path, buf.getvalue())
    except OSError as e:
        raise SaveError(f"MODEL_PATH={cfg.model_path!r}: cannot write the trained weights "
                        f"({e.strerror}); nothing was kept") from None
    return len(buf.getvalue())


def load_weights(cfg: Config, rt: Runtime) -> tuple[GPT, int]:
    path = Path(cfg.export.model_path)
    if not path.is_file():
        raise ConfigError(f"MODEL_PATH={str(path)!r}: no weights of this project there; expected "
                          f"the final_model.pt a training run saved")
    model = build_model(cfg.model, rt.device, attention=rt.attention)
    state = torch.load(path, map_location=rt.device, weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not fit this configuration "
                          f"({str(e).splitlines()[1].strip()[:160]}); set the model variables "
                          f"they were trained with") from None
    return model, path.stat().st_size


def export_artifact(cfg: Config, rt: Runtime, model: GPT, hessians, weights_bytes: int,
                    code: Code) -> dict:
    """Rank 0 quantises and writes; the others read what it wrote."""
    container = None
    if rt.master:
        t0 = time.perf_counter()
        with no_tf32():  # GPTQ solves in float32, as the record did (on the CPU)
            container = quantize_state_dict(model.state_dict(), model.roles, hessians)
        if hessians:
            rt.log(f"gptq:solved on {rt.device.type} in {1000 * (time.perf_counter() - t0):.0f}ms")
        blob = pack_artifact(container, cfg.export.compressor)
        try:
            write_atomic(cfg.export.artifact, blob)
            write_sidecar(cfg, blob)
        except OSError as e:
            raise SaveError(f"ARTIFACT={cfg.export.artifact!r}: cannot write the artifact "
                            f"({e.strerror}); the trained weights are kept in "
                            f"{cfg.export.model_path} (EXPORT_ONLY=1 makes the artifact)") from None
        log_export(cfg.export, rt, len(blob), weights_bytes, code)
    if rt.distributed:
        dist.barrier()
    if not rt.master:
        container = read_artifact(cfg.export.artifact)
    return container


def log_export(cfg: ExportConfig, rt: Runtime, model_bytes: int, weights_bytes: int,
               code: Code) -> None:
    total = model_bytes + code.size
    rt.log(f"Serialized model: {weights_bytes} bytes")
    rt.log(f"Code size: {code.size} bytes")
    rt.log(f"Serialized model int6+{cfg.compressor}: {model_bytes} bytes")
    rt.log(f"Total submission size int6+{cfg.compressor}: {total} bytes")
    rt.log(f"Total submission size: {total} bytes")
    if total >= SIZE_LIMIT:
        rt.log(f"WARNING: total submission size {total} bytes is over the {SIZE_LIMIT:,}-byte "
               f"limit")

# -----------------------------
# EVALUATION
# -----------------------------
# One window pass feeds every scorer; see docs/evaluation.md.


SCORE_KINDS = {
    "final_int6_roundtrip": "accepted", "final_int6_sliding_window": "accepted",
    "final_int6_sliding_window_s64": "accepted", "legal_ttt": "accepted",
    "final_slot_context": "causal_not_accepted",
    "final_slot": "not_causal",
}


class Sums:
    def __init__(self, device, collect_targets: int = 0):
        self.loss, self.tokens, self.bytes = (torch.zeros((), dtype=torch.float64, device=device)
                                              for _ in range(3))
        self.nll = None
        if collect_targets:
            self.nll = torch.zeros(collect_targets, dtype=torch.float64, device=device)

    def add(self, nll: Tensor, prev: Tensor, tgt: Tensor, luts, where: Tensor | None = None):
        self.loss += nll.double().sum()
        self.tokens += nll.numel()
        self.bytes += count_bytes(luts, prev, tgt).sum()
        if self.nll is not None:
            self.nll[where] = nll.double()

    def result(self, rt: Runtime) -> tuple[float, float]:
        loss, tokens, nbytes = rt.reduce(torch.stack((self.loss, self.tokens, self.bytes))).tolist()
        val_loss = loss / tokens
        return val_loss, val_loss / math.log(2.0) * (tokens / nbytes)

    def per_target(self, rt: Runtime) -> Tensor:
        return rt.reduce(self.nll).cpu()  # each target is scored by exactly one rank


@dataclass(frozen=True)
class Scoring:
    model: GPT
    hidden_fn: object
    tokens: Tensor
    luts: tuple[Tensor, ...]
    rt: Runtime
    recur: bool = False  # hidden_fn's graph on RECUR_LAYERS run twice

    @property
    def n_targets(self) -> int:
        return self.tokens.numel() - 1


def score_sequences(s: Scoring, seq_len: int, batch_tokens: int, collect: bool = False) -> Sums:
    """Non-overlapping windows; each batch adds its float32 mean nll times its count (the
    original's sum)."""
    rt, vocab = s.rt, s.model.cfg.vocab_size
    n_seqs = s.n_targets // seq_len
    first, last = n_seqs * rt.rank // rt.world_size, n_seqs * (rt.rank + 1) // rt.world_size
    batch_seqs = max(min(batch_tokens // ORIGINAL_WORLD // seq_len, -(-n_seqs // rt.world_size)), 1)
    sums = Sums(rt.device, s.n_targets if collect else 0)
    was_training = s.model.training
    s.model.eval()
    with torch.no_grad():
        for start in range(first * seq_len, last * seq_len, batch_seqs * seq_len):
            n = min(batch_seqs * seq_len, last * seq_len - start)
            pad = batch_seqs * seq_len - n
            chunk = F.pad(s.tokens[start:start + n + 1], (0, pad)).to(rt.device)
            x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
            with rt.autocast():
                logits = s.model.logits(s.hidden_fn(x, recur=s.recur)).float().reshape(-1, vocab)
                nll = F.cross_entropy(logits, y.reshape(-1), reduction="none")[:n]
            sums.loss += nll.mean().double() * n
            sums.tokens += n
            sums.bytes += count_bytes(s.luts, chunk[:n], chunk[1:n + 1]).sum()
            if collect:
                sums.nll[start:start + n] = nll.double()
    s.model.train(was_training)
    return sums


@dataclass(frozen=True)
class WindowPlan:
    """Window i reads targets [start, start + length) and scores its positions from
    score_from."""
    start: np.ndarray
    length: np.ndarray
    score_from: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def __getitem__(self, s: slice) -> "WindowPlan":
        return WindowPlan(self.start[s], self.length[s], self.score_from[s])


def sliding_windows(n_targets: int, seq_len: int, stride: int, tail: str) -> WindowPlan:
    """Each window after the first scores only its last `stride` targets."""
    if tail == "original":  # (docs/evaluation.md)
        start = np.arange(0, n_targets, stride, dtype=np.int64)
        length = np.minimum(seq_len, n_targets - start)
        score_from = np.where(start == 0, 0, np.maximum(length - stride, 0))
        return WindowPlan(start, length, score_from)
    if n_targets <= seq_len:
        return WindowPlan(np.zeros(1, np.int64), np.array([n_targets]), np.zeros(1, np.int64))
    start = np.arange(0, n_targets - seq_len + 1, stride, dtype=np.int64)
    score_from = np.where(start == 0, 0, seq_len - stride)
    remaining = n_targets - (start[-1] + seq_len)
    if remaining > 0:
        start = np.append(start, n_targets - seq_len)
        score_from = np.append(score_from, seq_len - remaining)
    return WindowPlan(start, np.full(len(start), seq_len), score_from)


def window_batches(n_windows: int, batch_seqs: int, interleave: int) -> list[np.ndarray]:
    """Windows dealt round-robin into `interleave` lists (the original's 8 ranks), each cut
    into batches: SLOT's result depends on the grouping (docs/evaluation.md)."""
    batches = []
    for v in range(interleave):
        ids = np.arange(v, n_windows, interleave)
        batches += [ids[i:i + batch_seqs] for i in range(0, len(ids), batch_seqs)]
    return batches


def window_batch(tokens: np.ndarray, plan: WindowPlan, idx: np.ndarray, rows: int,
                 L: int) -> tuple[np.ndarray, ...]:
    ar, k = np.arange(L), len(idx)
    start, score_from = plan.start[idx, None], plan.score_from[idx, None]
    valid = ar < plan.length[idx, None]
    pos = np.minimum(start + ar, len(tokens) - 2)
    xy, masks = np.zeros((2, rows, L), np.int64), np.zeros((2, rows, L), bool)
    where = np.zeros((rows, L), np.int64)
    xy[:, :k] = np.where(valid, tokens[pos], 0), np.where(valid, tokens[pos + 1], 0)
    masks[:, :k] = valid & (ar >= score_from), ar < score_from
    where[:k] = start + ar
    return xy, masks, where


@dataclass
class Batch:
    """One batch of the window pass; the masks are on the host."""
    windows: np.ndarray
    hid: Tensor
    y: Tensor
    scored: np.ndarray
    context: np.ndarray
    pos: Tensor
    x_pos: Tensor
    y_pos: Tensor
    where: Tensor | None


def window_pass(s: Scoring, plan: WindowPlan, batches: list[np.ndarray], rows: int,
                seq_len: int, collect: bool) -> Iterator[Batch]:
    """This rank's share, each batch padded to `rows` windows (0: none): one input shape."""
    dev, host = s.rt.device, s.tokens.numpy()
    for idx in batches[s.rt.rank::s.rt.world_size]:
        xy, (scored, context), where = window_batch(host, plan, idx, rows or len(idx), seq_len)
        x, y = torch.from_numpy(xy).to(dev)
        pos = torch.from_numpy(np.flatnonzero(scored)).to(dev)
        where_t = torch.from_numpy(where[scored]).to(dev) if collect else None
        with torch.no_grad(), s.rt.autocast():
            hid = s.hidden_fn(x, recur=s.recur)
        x_pos, y_pos = x.reshape(-1)[pos], y.reshape(-1)[pos]
        yield Batch(idx, hid, y, scored, context, pos, x_pos, y_pos, where_t)


class Scorer:
    def __init__(self, name: str, sums: Sums):
        self.name, self.sums, self.times = name, sums, []

    @property
    def seconds(self) -> float:
        return sum(self.times)


class SlidingScorer(Scorer):
    def __call__(self, s: Scoring, b: Batch) -> None:
        with torch.no_grad(), s.rt.autocast():
            hid = b.hid.reshape(-1, b.hid.size(-1))[b.pos]
            nll = F.cross_entropy(s.model.logits(hid).float(), b.y_pos, reduction="none")
        self.sums.add(nll, b.x_pos, b.y_pos, s.luts, b.where)


def slot_nll(delta: Tensor, bias: Tensor, base: Tensor, expand: Tensor, y: Tensor,
             weight: Tensor, softcap: float) -> Tensor:
    """`expand` is indices (CPU) or one-hot (CUDA: a matmul backward, no atomic scatter)."""
    shift = F.linear(delta, weight) + bias
    z = base + (expand @ shift if expand.is_floating_point() else shift[expand])
    return F.cross_entropy(softcap * torch.tanh(z / softcap), y, reduction="none")


def slot_loss(delta: Tensor, bias: Tensor, base: Tensor, expand: Tensor, y: Tensor, w: Tensor,
              weight: Tensor, softcap: float) -> Tensor:
    """SLOT's loss; a compiled kernel. w is 0 on padding (fixed shapes)."""
    return (slot_nll(delta, bias, base, expand, y, weight, softcap) * w).sum()


class SlotScorer(Scorer):
    """A per-window hidden delta and logit bias fitted by AdamW on the scored positions
    ("scored") or those before them ("context"); see docs/evaluation.md."""

    def __init__(self, mode: str, cfg: SlotConfig, s: Scoring, plan: WindowPlan,
                 batches: list[np.ndarray], rows: int):
        name = "final_slot" if mode == "scored" else "final_slot_context"
        super().__init__(name, Sums(s.rt.device))
        self.mode, self.cfg = mode, cfg
        self.weight = s.model.head_weight().detach().float()
        self.softcap = s.model.cfg.logit_softcap
        self.loss_fn = s.rt.compiled(slot_loss)
        self.counts = plan.length - plan.score_from if mode == "scored" else plan.score_from
        # Two fit sizes per mode (typical, largest): two shapes for the compiled loss.
        largest = max(int(self.counts[b].sum()) for b in batches)
        self.sizes = (rows * int(np.median(self.counts)), largest)

    def __call__(self, s: Scoring, b: Batch) -> None:
        n = int(self.counts[b.windows].sum())
        size = self.sizes[0] if n <= self.sizes[0] else self.sizes[1]
        fit = b.scored if self.mode == "scored" else b.context
        nll = self.fit_and_score(b.hid.float(), b.y, fit, b.scored, size)
        self.sums.add(nll, b.x_pos, b.y_pos, s.luts, b.where)

    def fit_and_score(self, hid: Tensor, y: Tensor, fit: np.ndarray, score: np.ndarray,
                      size: int) -> Tensor:
        """Fits on `fit`, returns the nll at `score`; no sync."""
        B, L, dev, weight = hid.size(0), hid.size(1), hid.device, self.weight
        hid, y = hid.reshape(B * L, -1), y.reshape(-1)
        fit_pos = np.flatnonzero(fit)
        n = len(fit_pos)
        pos = torch.from_numpy(np.pad(fit_pos, (0, max(size - n, 0)))).to(dev)
        w = (torch.arange(len(pos), device=dev) < n).float() / max(n, 1)
        delta = torch.zeros(B, hid.size(-1), device=dev, requires_grad=True)
        bias = torch.zeros(B, weight.size(0), device=dev, requires_grad=True)
        fit_base = F.linear(hid[pos], weight)
        if n:
            self.fit(delta, bias, fit_base, pos // L, y[pos], w)
        with torch.no_grad():
            if self.mode == "scored":  # the scored rows are the fitted ones: reuse their base
                pos, base = pos[:n], fit_base[:n]
            else:
                pos = torch.from_numpy(np.flatnonzero(score)).to(dev)
                base = F.linear(hid[pos], weight)
            return slot_nll(delta, bias, base, pos // L, y[pos], weight, self.softcap)

    def fit(self, delta: Tensor, bias: Tensor, base: Tensor, rows: Tensor, y: Tensor, w: Tensor):
        c, cuda = self.cfg, delta.is_cuda
        opt = torch.optim.AdamW([delta, bias], lr=c.lr, betas=(0.9, 0.999), eps=1e-5,
                                weight_decay=1e-8, **(dict(fused=True) if cuda else {}))
        expand = F.one_hot(rows, delta.size(0)).float() if cuda else rows
        for i in range(c.steps):  # (the fit needs autograd whatever the caller's grad mode)
            cosine = 0.5 * (1 + math.cos(math.pi * i / c.steps))
            opt.param_groups[0]["lr"] = c.lr_min + (c.lr - c.lr_min) * cosine
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                self.loss_fn(delta, bias, base, expand, y, w, self.weight, self.softcap).backward()
            opt.step()


def score_windows(s: Scoring, plan: WindowPlan, batches: list[np.ndarray], rows: int,
                  seq_len: int, scorers: list, label: str = "") -> None:
    collect = any(sc.sums.nll is not None for sc in scorers)
    sliding = isinstance(scorers[0], SlidingScorer)
    n_mine, k = len(batches[s.rt.rank::s.rt.world_size]), len(scorers) + 1
    was_training = s.model.training
    s.model.eval()
    t_start = last_report = time.perf_counter()
    marks = [s.rt.mark()]  # each batch: after its hidden states, after each scorer
    for done, batch in enumerate(window_pass(s, plan, batches, rows, seq_len, collect)):
        marks.append(s.rt.mark())
        for sc in scorers:
            sc(s, batch)
            marks.append(s.rt.mark())
        if label and s.rt.master and time.perf_counter() - last_report >= 30:
            last_report = time.perf_counter()
            elapsed, frac = last_report - t_start, (done + 1) / n_mine
            s.rt.log(f"eval_progress:{label} {frac:.1%} elapsed:{elapsed:.0f}s "
                     f"eta:{elapsed / frac - elapsed:.0f}s")
    s.rt.sync()  # once per pass: every event has happened
    for b in range(0, len(marks) - 1, k):
        hidden_s = seconds_between(marks[b], marks[b + 1])
        for i, sc in enumerate(scorers):
            share = (hidden_s if i == 0 else 0.0) if sliding else hidden_s / len(scorers)
            sc.times.append(seconds_between(marks[b + i + 1], marks[b + i + 2]) + share)
    s.model.train(was_training)


def seconds_between(a, b) -> float:
    return a.elapsed_time(b) / 1000 if isinstance(a, torch.cuda.Event) else b - a


@dataclass(frozen=True)
class Score:
    val_loss: float
    val_bpb: float
    seconds: float


def log_result(rt: Runtime, name: str, sums: Sums, seconds: float, extra: str = "",
               suffix: str = "") -> Score:
    val_loss, val_bpb = sums.result(rt)
    rt.log(f"{name} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}{extra} "
           f"eval_time:{1000 * seconds:.0f}ms{suffix}")
    rt.log(f"{name}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    return Score(val_loss, val_bpb, seconds)


def log_timing(rt: Runtime, sc: Scorer) -> None:
    steady = sum(sc.times[1:]) / (len(sc.times) - 1) if len(sc.times) > 1 else float("nan")
    first = sc.times[0] if sc.times else 0.0
    rt.log(f"eval_timing:{sc.name} batches:{len(sc.times)} first_batch:{first:.4f}s "
           f"steady_batch:{steady:.4f}s")


def log_scores(rt: Runtime, scores: dict[str, Score]) -> None:
    """The closing summary; tools.submission reads it."""
    for name, score in scores.items():
        rt.log(f"score:{name} val_bpb:{score.val_bpb:.8f} kind:{SCORE_KINDS[name]}")


def ttt_chunk_windows(plan: WindowPlan, n_targets: int, chunk: int) -> np.ndarray:
    """Chunk bounds in window indices: each window in the chunk of its first scored target."""
    n_chunks = -(-n_targets // chunk)
    owner = np.minimum((plan.start + plan.score_from) // chunk, n_chunks - 1)
    return np.searchsorted(owner, np.arange(n_chunks + 1))


class TTTTrainer:
    def __init__(self, cfg: TTTConfig, rt: Runtime, model: GPT, seq_len: int):
        self.cfg, self.rt, self.model, self.seq_len = cfg, rt, model, seq_len
        frozen = tuple(f"blocks.{i}." for i in range(cfg.freeze_blocks))
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(frozen))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum)
        self.loss_fn = rt.compiled(self.step_loss)
        self.steps, self.recur = 0, bool(model.recur_ids)

    def step_loss(self, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        with self.rt.autocast():
            logits = self.model.logits(self.model.hidden(x, self.cfg.qat, self.recur), self.cfg.qat)
        vocab = self.model.cfg.vocab_size
        nll = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1), reduction="none")
        return (nll * w).sum()

    def warm_up(self, s: Scoring, rows: int, n_seqs: int) -> None:
        """Compiles every shape before the timer (zeros: nothing changes)."""
        L, dev, step = self.seq_len, self.rt.device, self.cfg.batch_seqs
        with torch.no_grad(), self.rt.autocast():
            s.hidden_fn(torch.zeros(rows, L, dtype=torch.long, device=dev), recur=s.recur)
        self.model.train()
        for n in dict.fromkeys(min(step, n_seqs - i) for i in range(0, n_seqs, step)):
            r = -(-n // self.rt.world_size)
            seq = torch.zeros(r * L + 1, dtype=torch.long, device=dev)
            self.loss_fn(seq[:-1].view(r, L), seq[1:].view(r, L), seq[1:].float()).backward()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()

    def train_chunk(self, chunk: Tensor, lr: float) -> None:
        """Each step's rows split over the ranks, padded (fixed shapes) and weighted so that the
        summed gradient is the step mean's on any world size."""
        L, W, rt, c = self.seq_len, self.rt.world_size, self.rt, self.cfg
        n_seqs = (chunk.numel() - 1) // L
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        for _ in range(c.epochs):
            for s in range(0, n_seqs, c.batch_seqs):
                n = min(c.batch_seqs, n_seqs - s)
                lo, hi, rows = s + n * rt.rank // W, s + n * (rt.rank + 1) // W, -(-n // W)
                seq = F.pad(chunk[lo * L:hi * L + 1], (0, (rows - hi + lo) * L)).to(rt.device)
                w = (torch.arange(rows * L, device=rt.device) < (hi - lo) * L).float() / (n * L)
                self.opt.zero_grad(set_to_none=True)
                self.loss_fn(seq[:-1].view(rows, L), seq[1:].view(rows, L), w).backward()
                self.all_reduce_grads()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
                self.opt.step()
                self.steps += 1
        self.model.eval()

    def all_reduce_grads(self) -> None:
        if not self.rt.distributed:
            return
        grads = [p.grad for p in self.params if p.grad is not None]  # one flat float32 collective
        flat = torch.cat([g.float().reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def eval_ttt(cfg: EvalConfig, rt: Runtime, model: GPT, tokens: Tensor, luts,
             collect: bool = False) -> tuple[Sums, float]:
    """Legal score-first TTT (record 2026-03-23), adapting `model`: each chunk scored, then
    trained on, except the last."""
    c, L, n_targets = cfg.ttt, cfg.seq_len, tokens.numel() - 1
    if c.float32:
        model.float()
    plan = sliding_windows(n_targets, L, cfg.window_stride, cfg.tail)
    bounds = ttt_chunk_windows(plan, n_targets, c.chunk_tokens)
    n_chunks = len(bounds) - 1
    trainer = TTTTrainer(c, rt, model, L)
    s = Scoring(model, rt.compiled(model.hidden), tokens, luts, rt, trainer.recur)
    rows = min(cfg.slot.batch_seqs, int(np.diff(bounds).max()))
    if rt.compile:  # eager runs (CPU) have nothing to compile, and score unpadded batches
        trainer.warm_up(s, rows, c.chunk_tokens // L if n_chunks > 1 and c.epochs else 0)
    scorer = SlidingScorer("legal_ttt", Sums(rt.device, n_targets if collect else 0))
    rt.log(f"legal_ttt:start chunks:{n_chunks} windows:{len(plan)} chunk_tokens:{c.chunk_tokens} "
           f"stride:{cfg.window_stride} lr:{c.lr} epochs:{c.epochs} "
           f"freeze_blocks:{c.freeze_blocks} "
           f"trained_params:{sum(p.numel() for p in trainer.params)}")
    t0 = time.perf_counter()
    for ci in range(n_chunks):
        chunk_plan = plan[bounds[ci]:bounds[ci + 1]]
        batches = window_batches(len(chunk_plan), rows, 1)
        score_windows(s, chunk_plan, batches, rows if rt.compile else 0, L, [scorer])
        if ci < n_chunks - 1 and c.epochs > 0:
            lr = c.lr * 0.5 * (1 + math.cos(math.pi * ci / max(n_chunks - 1, 1)))
            trainer.train_chunk(tokens[ci * c.chunk_tokens:(ci + 1) * c.chunk_tokens + 1], lr)
        if ci % 10 == 0 or ci == n_chunks - 1:
            elapsed = time.perf_counter() - t0
            rt.log(f"legal_ttt:chunk {ci + 1}/{n_chunks} bpb:{scorer.sums.result(rt)[1]:.6f} "
                   f"elapsed:{elapsed:.1f}s eta:{elapsed / (ci + 1) * (n_chunks - ci - 1):.1f}s")
    rt.log(f"legal_ttt:done optimizer_steps:{trainer.steps}")
    return scorer.sums, time.perf_counter() - t0


def sliding_pass(cfg: EvalConfig, s: Scoring, stride: int, name: str,
                 slot_modes: tuple[str, ...] = (), collect: bool = False) -> list:
    """One pass at `stride`: the sliding scorer `name` ("": none) and a SLOT scorer per mode."""
    plan = sliding_windows(s.n_targets, cfg.seq_len, stride, cfg.tail)
    interleave = cfg.slot.interleave if slot_modes else 1
    batches = window_batches(len(plan), cfg.slot.batch_seqs, interleave)
    rows = max(len(b) for b in batches)
    scorers = [SlidingScorer(name, Sums(s.rt.device))] if name else []
    scorers += [SlotScorer(m, cfg.slot, s, plan, batches, rows) for m in slot_modes]
    for sc in scorers if collect else ():
        sc.sums = Sums(s.rt.device, s.n_targets)
    score_windows(s, plan, batches, rows, cfg.seq_len, scorers, label=name or "final_slot")
    return scorers


def evaluate(cfg: Config, rt: Runtime, model: GPT, data: Data) -> dict[str, Score]:
    e, L = cfg.eval, cfg.eval.seq_len
    s = Scoring(model, rt.compiled(model.hidden), data.val_tokens, data.luts, rt,
                bool(model.recur_ids))
    clock = Clock(rt)
    sums = score_sequences(s, L, cfg.train.val_batch_size)
    clock.pause()
    scores = {"final_int6_roundtrip": log_result(rt, "final_int6_roundtrip", sums, clock.ms / 1000)}

    share = e.slot.enabled and e.window_stride == e.stride  # one hidden pass serves both
    slot_scorers = []
    passes = ((e.stride, "final_int6_sliding_window"), (64, "final_int6_sliding_window_s64"))
    for stride, name in passes:
        if not 0 < stride < L or (name.endswith("s64") and e.stride == 64):
            continue
        modes = e.slot.modes if share and stride == e.stride else ()
        sliding, *slots = sliding_pass(e, s, stride, name, modes)
        slot_scorers += slots
        score = log_result(rt, name, sliding.sums, sliding.seconds, extra=f" stride:{stride}")
        # The original repeats each sliding result as a roundtrip line; tools read the last one.
        rt.log(f"final_int6_roundtrip_exact val_loss:{score.val_loss:.8f} "
               f"val_bpb:{score.val_bpb:.8f}")
        log_timing(rt, sliding)
        scores[name] = score
    if e.slot.enabled and not slot_scorers:
        slot_scorers = sliding_pass(e, s, e.window_stride, "", e.slot.modes)
    for sc in slot_scorers:
        extra = f" steps:{e.slot.steps} lr:{e.slot.lr}"
        scores[sc.name] = log_result(rt, sc.name, sc.sums, sc.seconds, extra, f" mode:{sc.mode}")
        log_timing(rt, sc)
    if e.ttt.enabled:  # last, and on a copy: no other evaluation sees adapted weights
        sums, seconds = eval_ttt(e, rt, copy.deepcopy(model), data.val_tokens, data.luts)
        scores["legal_ttt"] = log_result(rt, "legal_ttt", sums, seconds)
    log_scores(rt, scores)
    return scores

# -----------------------------
# RUN SAFETY: atomic writes, sidecars, output locks, logs, signals
# -----------------------------
# See docs/reliability.md.


class Stopped(Exception):
    """The run ended early, already logged."""

    def __init__(self, status: int, message: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message


class SaveError(ConfigError):
    """A file the run could not write (disk full, I/O error): the log says what was kept."""


class LostRank(Exception):
    """Another rank was killed or stalled (a collective failed)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the run stops with one logged line."""


def beside(path, suffix: str) -> Path:
    """A hidden file beside `path`: its temporary or its lock."""
    path = Path(path)
    return path.with_name(f".{path.name}{suffix}")


def temporary(path) -> Path:
    return beside(path, f".{os.getpid()}.tmp")


def write_atomic(path, data: bytes) -> None:
    """A crash never leaves a half-written file."""
    tmp = temporary(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sidecar_path(artifact) -> Path:
    return Path(f"{artifact}.json")


def write_sidecar(cfg: Config, blob: bytes) -> None:
    """<ARTIFACT>.json: the model settings and the artifact's sha256 (the artifact keeps the
    original's format)."""
    meta = {"format": "train_gpt artifact sidecar", "sha256": hashlib.sha256(blob).hexdigest(),
            "settings": cfg.model.resolved()}
    write_atomic(sidecar_path(cfg.export.artifact), (json.dumps(meta, indent=1) + "\n").encode())


def check_sidecar(cfg: Config, sha256: str) -> str:
    """Other model settings would score the artifact wrongly, silently."""
    path = sidecar_path(cfg.export.artifact)
    if not path.is_file():
        return f"eval_only: no {path.name} beside the artifact; its model settings are unchecked"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        sha, saved = meta["sha256"], meta["settings"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path}: unreadable sidecar; expected the JSON written with the "
                          f"artifact (remove it to evaluate unchecked)") from None
    if sha != sha256:
        raise ConfigError(f"{path}: describes another artifact (sha256 differs from "
                          f"{cfg.export.artifact}); remove it to evaluate unchecked")
    ours = cfg.model.resolved()
    diffs = [f"{k}={ours[k]!r} (artifact: {v!r})" for k, v in saved
             if k in ours and ours[k] != v]
    if diffs:
        raise ConfigError(f"ARTIFACT={cfg.export.artifact!r} was trained with other model "
                          f"settings: {', '.join(diffs)}; set them as it was trained")
    return f"eval_only: model settings match {path.name}"


def is_our_file(path: Path, kind: str) -> bool:
    try:
        if kind == "artifact":
            read_artifact(path)
            return True
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values())
    except Exception:  # anything unreadable is somebody else's file
        return False


def check_replaceable(cfg: ExportConfig) -> None:
    """A run never deletes or overwrites a file it did not write."""
    outputs = (("ARTIFACT", cfg.artifact, "artifact"), ("MODEL_PATH", cfg.model_path, "weights"))
    for var, value, kind in outputs:
        path = Path(value)
        if path.exists() and not (path.is_file() and is_our_file(path, kind)):
            raise ConfigError(f"{var}={value!r} names an existing file that is not {kind} of this "
                              f"project; expected a new path or one this script wrote")


def outputs(cfg: Config) -> list[str]:
    """The files this run locks (EVAL_ONLY: the artifact it reads, where a run could write)."""
    artifact = cfg.export.artifact
    if cfg.run.eval_only:
        return [artifact] if os.access(Path(artifact).parent, os.W_OK) else []
    paths = [artifact, str(sidecar_path(artifact))]
    return paths if cfg.run.export_only else [cfg.export.model_path] + paths


def check_outputs(cfg: Config) -> None:
    """Every folder and name the run writes (the longest: a lock's temporary), before any work."""
    logs, e = Path("logs"), cfg.export
    if logs.exists() and not logs.is_dir():
        raise ConfigError("logs: is a file; expected a folder for the run logs (move the "
                          "file away)")
    probes = {"logs/": temporary((logs if logs.is_dir() else Path(".")) / "log")}
    for path in outputs(cfg):  # the sidecar's probe (longer) replaces the artifact's
        var, value = ("MODEL_PATH", path) if path == e.model_path else ("ARTIFACT", e.artifact)
        if not cfg.run.eval_only and os.path.isdir(value):
            raise ConfigError(f"{var}={value!r} is a directory; expected a file path")
        probes[f"{var}={value!r}"] = temporary(beside(path, ".lock"))
    for what, probe in probes.items():
        try:
            open(probe, "a").close()
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"{what}: cannot write {str(probe)!r} ({err.strerror}); expected a "
                              f"writable folder and a shorter name") from None
    if not cfg.run.eval_only:
        check_replaceable(e)


@contextlib.contextmanager
def output_lock(paths: list[str], run_id: str) -> Iterator[None]:
    """`.<name>.lock` beside each output, held for the run (docs/reliability.md)."""
    held = []
    try:
        for path in paths:
            lock = beside(path, ".lock")
            held.append((lock, take_lock(lock, path, run_id)))
        yield
    finally:
        for lock, fd in held:
            lock.unlink(missing_ok=True)  # then closed: a run that opened it sees another file
            os.close(fd)


def take_lock(lock: Path, path: str, run_id: str) -> int:
    tmp = temporary(lock)
    tmp.write_text(json.dumps({"run_id": run_id, "pid": os.getpid()}), encoding="utf-8")
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for _ in range(3):
            with contextlib.suppress(FileExistsError):
                os.link(tmp, lock)
                return fd
            with contextlib.suppress(FileNotFoundError), open(lock, "rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    other = json.loads(f.read())
                    raise ConfigError(f"{path} is in use by run {other['run_id']!r} (process "
                                      f"{other['pid']}, lock {lock}); wait for it or choose "
                                      f"other outputs") from None
                if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:  # still the lock
                    os.replace(tmp, lock)
                    return fd
        raise ConfigError(f"{lock}: cannot take the output lock; remove it if no run is using "
                          f"{path}")
    except BaseException:
        os.close(fd)
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Ctrl-C, SIGTERM or a failed collective inside a stage ends the run with one line."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted during {name}") from None
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        raise LostRank(f"rank {dist.get_rank()} lost another rank during {name} (killed or "
                       f"stalled): {str(e).split('] ', 1)[-1].split('. ')[0][:160]}") from None


def create_log(run_id: str) -> str:
    """logs/<RUN_ID>.txt, or -2, -3, ... where taken."""
    os.makedirs("logs", exist_ok=True)
    for n in itertools.count(1):
        path = f"logs/{run_id}.txt" if n == 1 else f"logs/{run_id}-{n}.txt"
        with contextlib.suppress(FileExistsError):
            open(path, "x").close()
            return path

# -----------------------------
# MAIN
# -----------------------------
# Every input checked before the run writes anything; run() is the table of contents.


@dataclass(frozen=True)
class Config:
    """Every setting, by the stage that reads it."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    SECTIONS = (RunConfig, DataConfig, GPTConfig, OptimConfig, TrainConfig, ExportConfig,
                EvalConfig, SlotConfig, TTTConfig)

    @classmethod
    def variables(cls) -> set[str]:
        return {name for section in cls.SECTIONS for name in section.settings()}

    @classmethod
    def from_env(cls, env=None) -> "Config":
        raw = read_settings(os.environ if env is None else env)
        train = read_section(TrainConfig, raw)
        if parse_value("EVAL_SEQ_LEN", raw.get("EVAL_SEQ_LEN", "2048").strip(), "int") <= 0:
            raw["EVAL_SEQ_LEN"] = str(train.train_seq_len)  # <= 0 means TRAIN_SEQ_LEN
        evaluation = read_section(EvalConfig, raw, slot=read_section(SlotConfig, raw),
                                  ttt=read_section(TTTConfig, raw))
        run = read_section(RunConfig, {**raw, "RUN_ID": raw.get("RUN_ID", "").strip()
                                       or str(uuid.uuid4())})
        cfg = cls(run, read_section(DataConfig, raw), read_section(GPTConfig, raw),
                  read_section(OptimConfig, raw), train, read_section(ExportConfig, raw),
                  evaluation)
        cfg.check()
        return cfg

    @property
    def max_seq_len(self) -> int:
        return max(self.train.train_seq_len, self.eval.seq_len)

    def check(self) -> None:
        need(self.eval.ttt.freeze_blocks <= self.model.num_layers, "TTT_FREEZE_BLOCKS",
             self.eval.ttt.freeze_blocks, f"in [0, NUM_LAYERS={self.model.num_layers}]")
        cap, reserve = self.train.max_wallclock_seconds, self.export.gptq_reserve_seconds
        need(not self.export.gptq_enabled or cap <= 0 or reserve < cap, "GPTQ_RESERVE_SECONDS",
             reserve, "less than MAX_WALLCLOCK_SECONDS with GPTQ on")


def need(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed; expected {expected}")


def read_section(cls, raw: dict[str, str], **nested):
    values = {}
    for name, f in cls.settings().items():
        value = f.default if name not in raw else parse_value(name, raw[name].strip(), f.type)
        if f.metadata["ok"] is not None:
            need(f.metadata["ok"](value), name, value, f.metadata["expect"])
        values[f.name] = value
    section = cls(**values, **nested)
    section.check()
    return section


def layer_ids(text: str) -> tuple[int, ...] | None:
    """A comma list of distinct layer indices ('9,10') in its order; None if it is not one."""
    try:
        ids = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        return None
    return ids if len(set(ids)) == len(ids) and min(ids, default=0) >= 0 else None


def is_file_name(name: str) -> bool:
    return name not in (".", "..") and not set(name) & set("/\\\0") and len(name.encode()) <= 200


def parse_value(name: str, raw: str, kind: str):
    booleans = {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}
    parsers = {"int": int, "float": float, "bool": lambda r: booleans[r.lower()], "str": str}
    try:
        value = parsers[kind](raw)
    except (ValueError, KeyError):
        allowed = f"a valid {kind}"
        if kind == "bool":
            allowed = "a boolean: 1/0, true/false, yes/no, on/off"
        raise ConfigError(f"{name}={raw!r} is not allowed; expected {allowed}") from None
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not allowed; expected a finite number")
    return value


# Settings the original or a record had: set to other than their default (None: unset), a run
# stops instead of ignoring them.
REMOVED_SETTINGS = {"MTP_NUM_HEADS": ("0", "the record trains no multi-token heads"),
                    "MTP_LOSS_WEIGHT": ("0.2", "it weighted the multi-token heads"),
                    "DTG_ENABLED": ("0", "the record runs without the gate"),
                    "PARALLEL_START_LAYER_IS_PHYSICAL": ("1", "lanes start at a physical layer"),
                    "REPEAT_UNTIE_MLP": ("none", "untied repeat MLPs: +1.8 MB, over 16 MB"),
                    "REPEAT_UNTIE_MLP_LAYERS": ("", "untied repeat MLPs"),
                    "RECUR_WARMUP_STEPS": (None, "the warm-up compiles the recurrent graphs"),
                    "DISABLE_LAYER0_ATTN": ("0", "the value residual reads layer 0's values")}


def read_settings(env) -> dict[str, str]:
    preset = env.get("PRESET", "").strip()
    raw = {**(preset_defaults(preset) if preset else {}), **env}
    off = ("0", "false", "off", "no")
    for name, (default, why) in REMOVED_SETTINGS.items():
        if name in raw and raw[name].strip().lower() not in (off if default == "0" else (default,)):
            raise ConfigError(f"{name}={raw[name]!r} is not allowed: the setting was removed "
                              f"({why}); unset it")
    known = Config.variables()
    return {k: v for k, v in raw.items() if k in known}


def preset_defaults(name: str) -> dict[str, str]:
    """Defaults from presets/NAME.env beside this file (KEY=VALUE lines)."""
    path = Path(__file__).resolve().with_name("presets") / f"{name}.env"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        names = sorted(p.stem for p in path.parent.glob("*.env"))
        found = f"one of: {', '.join(names)} (or unset)" if names else "unset (no presets found)"
        raise ConfigError(f"PRESET={name!r} is not allowed; expected {found}; presets are read "
                          f"from {path.parent}") from None
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return dict(line.split("=", 1) for line in lines if "=" in line)


def log_header(rt: Runtime, code: Code) -> None:
    smi = None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    lines = [code.source, "=" * 100, f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__}", smi, "=" * 100]
    rt.log("\n".join(line for line in lines if line is not None), console=False)


def log_config(cfg: Config, rt: Runtime, model: GPT, data: Data) -> None:
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train
    rt.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={d.tokenizer_path}")
    rt.log(f"train_loader:dataset:{Path(d.data_path).name} train_shards:{len(data.train_files)}")
    rt.log(f"val_loader:shards pattern={os.path.join(d.data_path, 'fineweb_val_*.bin')} "
           f"tokens:{data.val_tokens.numel() - 1}")
    rt.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    for line in component_lines(cfg):
        rt.log(line)
    rt.log("\n".join(role_summary(model)))
    rt.log("mtp_num_heads:0 mtp_loss_weight:0.2 mtp_params:0")  # the original's line, no heads
    xsa = [i for i, b in enumerate(model.blocks) if b.attn.xsa]
    rt.log(f"XSA:last_{m.xsa_last_n} active_layers:{xsa}")
    rt.log(f"world_size:{rt.world_size} grad_accum_steps:{grad_accum_steps(rt.world_size)}")
    rt.log(f"attention_kernel:{rt.attention} device:{rt.device.type} compile:{rt.compile}")
    rt.log(f"attention_mode:{'gqa' if m.num_kv_heads != m.num_heads else 'mha'} "
           f"num_heads:{m.num_heads} num_kv_heads:{m.num_kv_heads}")
    embed_lr = o.tied_embed_lr if m.tie_embeddings else o.embed_lr
    rt.log(f"tie_embeddings:{m.tie_embeddings} embed_lr:{embed_lr} "
           f"head_lr:{0.0 if m.tie_embeddings else o.head_lr} matrix_lr:{o.matrix_lr} "
           f"scalar_lr:{o.scalar_lr}")
    rt.log(f"train_batch_tokens:{t.train_batch_tokens} train_seq_len:{t.train_seq_len} "
           f"iterations:{t.iterations} warmup_steps:{t.warmup_steps} "
           f"max_wallclock_seconds:{t.max_wallclock_seconds:.3f}")
    rt.log(f"seed:{cfg.run.seed}")
    threads = torch.get_num_threads() if rt.device.type == "cpu" else 0
    rt.log(f"preset:{cfg.run.preset or 'none'} cpu_threads:{threads}")
    # Every setting as resolved, for the tools (the lines above are the original's).
    sections = (cfg.run, cfg.data, cfg.model, cfg.optim, cfg.train, cfg.export, cfg.eval,
                cfg.eval.slot, cfg.eval.ttt)
    rt.log("settings:" + json.dumps({k: v for s in sections for k, v in s.resolved().items()}))


@dataclass(frozen=True)
class Inputs:
    data: Data
    warnings: list[str]
    model: GPT | None = None  # EVAL_ONLY: the artifact's; EXPORT_ONLY: the kept weights
    weights_bytes: int = 0
    eval_lines: tuple[str, ...] = ()  # EVAL_ONLY: what it evaluates


def read_inputs(cfg: Config, rt: Runtime) -> Inputs:
    if not cfg.run.eval_only:
        codec(cfg.export.compressor)  # a missing codec would otherwise fail at export
    check_outputs(cfg)
    data, warnings = load_data(cfg, rt, training=not cfg.run.eval_only)
    if cfg.run.eval_only:  # a bad artifact stops the run before anything is written
        path = cfg.export.artifact
        blob = artifact_bytes(path)  # read once: the bytes hashed are those evaluated
        container, sha = unpack_artifact(blob, path), hashlib.sha256(blob).hexdigest()
        lines = (f"eval_only artifact:{path} bytes:{len(blob)}", f"eval_only sha256:{sha}",
                 check_sidecar(cfg, sha))
        model = eval_model(cfg.model, container, rt.device, path, rt.attention)
        return Inputs(data, warnings, model, eval_lines=lines)
    if cfg.run.export_only:
        model, weights_bytes = load_weights(cfg, rt)
        return Inputs(data, warnings, model, weights_bytes)
    return Inputs(data, warnings)


def trained_model(cfg: Config, rt: Runtime, inputs: Inputs) -> tuple[GPT, Trained, int]:
    if inputs.model is not None:
        model = inputs.model
        log_config(cfg, rt, model, inputs.data)
        rt.log(f"export_only weights:{cfg.export.model_path} bytes:{inputs.weights_bytes}")
        recur = bool(model.recur_ids)  # EXPORT_ONLY: recurrent iff RECUR_LAYERS is set
        return model, Trained(rt.compiled(model.hidden), 0.0, recur), inputs.weights_bytes
    model = build_model(cfg.model, rt.device, cfg.run.seed, rt.attention)
    log_config(cfg, rt, model, inputs.data)
    reserve = gptq_reserve(cfg, rt, model, inputs.data)
    trained = train(cfg, rt, model, inputs.data, cfg.train.max_wallclock_seconds - reserve)
    with stage("export"):  # saved before anything that can fail after training
        weights_bytes = save_weights(cfg.export, model) if rt.master else 0
    return model, trained, weights_bytes


def make_artifact(cfg: Config, rt: Runtime, inputs: Inputs, code: Code) -> GPT:
    with stage("training"):
        model, trained, weights_bytes = trained_model(cfg, rt, inputs)
    if not trained.recur:  # calibrated, recorded (sidecar) and scored without recurrence
        cfg = replace(cfg, model=replace(cfg.model, recur_layers=""))
    with stage("export"):
        data, hessians = inputs.data, None
        if cfg.export.gptq_enabled:
            hessians = calibrate(cfg, rt, model, data, trained.train_ms)
        t0 = time.perf_counter()
        s = Scoring(model, trained.hidden_fn, data.val_tokens, data.luts, rt, trained.recur)
        sums = score_sequences(s, cfg.train.train_seq_len, cfg.train.val_batch_size)
        val_loss, val_bpb = sums.result(rt)
        rt.log(f"DIAGNOSTIC post_ema val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
               f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
        container = export_artifact(cfg, rt, model, hessians, weights_bytes, code)
        return eval_model(cfg.model, container, rt.device, cfg.export.artifact, rt.attention)


def run(cfg: Config, code: Code) -> None:
    rt = start_runtime(cfg.run)
    check_world(cfg, rt.world_size)
    check_attention(cfg, rt)
    inputs = read_inputs(cfg, rt)
    lock = output_lock(outputs(cfg), cfg.run.run_id) if rt.master else contextlib.nullcontext()
    with lock:
        started = time.time()
        rt = replace(rt, log_path=create_log(cfg.run.run_id) if rt.master else None)
        if rt.master:
            print(f"log: {rt.log_path}", flush=True)
        try:
            log_header(rt, code)
            for line in inputs.warnings:
                rt.log(line)
            if cfg.run.eval_only:
                model = inputs.model
                log_config(cfg, rt, model, inputs.data)
                rt.log("\n".join(inputs.eval_lines))
            else:
                model = make_artifact(cfg, rt, inputs, code)
            with stage("evaluation"):
                evaluate(cfg, rt, model, inputs.data)
        except (KeyboardInterrupt, Interrupted) as e:
            rt.log(str(e) if isinstance(e, Interrupted) else "interrupted during evaluation")
            raise Stopped(130) from None
        except OSError as e:  # the log's (the outputs' are SaveErrors)
            kept = [p for p in outputs(cfg) if os.path.isfile(p) and os.path.getmtime(p) > started]
            raise Stopped(1, f"error: {e.filename or rt.log_path}: {e.strerror}; the run stopped, "
                             f"keeping {', '.join(kept) or 'no output of its own'}") from None
        except (ConfigError, Diverged, LostRank) as e:
            with contextlib.suppress(OSError):  # (a full disk may refuse the log line too)
                rt.log(f"error: {e}", console=False)
            raise Stopped(2 if isinstance(e, ConfigError) else 1, f"error: {e}") from None


def main(source: str | None = None) -> None:
    """`source`: the text a packed file (tools/pack.py) runs; `Code size` counts its bytes."""
    # SIGTERM (torchrun stopping its workers, a scheduler) stops the run like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    status, message = 0, None
    try:
        code = Code(source or Path(__file__).read_text(encoding="utf-8"), os.path.getsize(__file__))
        run(Config.from_env(), code)
    except ConfigError as e:
        status, message = 2, f"error: {e}"
    except Stopped as e:
        status, message = e.status, e.message
    except KeyboardInterrupt:
        status, message = 130, "interrupted before the run started"
    if message and int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every rank meets the same input
        print(message, file=sys.stderr, flush=True)
    if dist.is_initialized():  # only a run that succeeded everywhere meets at the barrier
        if status == 0:
            dist.barrier()
            dist.destroy_process_group()
        os._exit(status)  # every print flushed; no interpreter teardown (gloo's threads can abort)
    sys.exit(status)


if __name__ == "__main__":
    main()
