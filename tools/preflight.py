"""Preflight: check a train_gpt.py configuration (its environment variables, PRESET included)
on a CPU, with no data, before a GPU run: the configuration and its split over the world size,
the parameter count and table, a forward pass, torch.compile of a shrunk copy, the code bytes
and the artifact size of trained-like weights against the limit. Exit 1 if a check fails.

    python -m tools.preflight
    PRESET=demo python -m tools.preflight --no-compile
    NUM_LAYERS=12 MODEL_DIM=576 python -m tools.preflight --world-size 8 --packed
"""

from __future__ import annotations

import argparse
import difflib
import io
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tools import pack
from tools._common import import_train_gpt, perturbed_model

DEFAULT_WORLD_SIZE = 8  # the record's 8xH100
FORWARD_TOLERANCE = 0.1  # |loss - ln V| at initialisation; see check_forward
COMPILE_TOLERANCE = 1e-4
IGNORED_VARS = ("MUON_BETA2", "SWA_ENABLED", "SWA_EVERY")  # the original's, changing nothing

# Trained-like weights for the artifact estimate. Muon's orthogonalised update of a rows x cols
# matrix has entries of RMS 1/sqrt(cols) (after its sqrt(max(1, rows/cols)) factor), so trained
# matrices are drawn with rows of L2 norm ~ ROW_NORM: entries N(0, (ROW_NORM / sqrt(cols))^2), each
# row's norm spread lognormally. int6's scale floor of 1/31 makes the absolute scale matter, so
# ROW_NORM is calibrated: with it the default configuration gives the seed-42 record's artifact
# (15,689,612 bytes). Measured on the default configuration, seed 0: c = 3.5 -> 15,050,236 bytes,
# 4.0 -> 15,614,184, 4.1 -> 15,702,908 (+0.08%), 4.5 -> 16,034,528.
ROW_NORM = 4.1
ROW_NORM_SPREAD = 0.3  # sigma of the row norm's log
VECTOR_JITTER = 0.1  # vectors and scalars: their initial value times (1 + 0.1 N(0, 1))
RECORD_PARAMS, RECORD_MODEL_BYTES = 26_862_694, 15_689_612


class CheckSkipped(Exception):
    """A check asked not to run."""


class CheckFailed(Exception):
    """A check's negative result: summary and detail lines."""

    def __init__(self, summary: str, details: list[str] | None = None):
        super().__init__(summary)
        self.details = details or []


@dataclass
class Context:
    env: dict
    args: argparse.Namespace
    tg: object = None
    cfg: object = None  # train_gpt.Config
    model: object = None
    code: object = None  # train_gpt.Code: what the submission counts, plain or packed as asked
    estimate: Future | None = None  # the artifact estimate, started once the model exists


# Each check returns (summary, details), raises CheckFailed or CheckSkipped, or returns None when
# an earlier check it needs failed.
def check_import(ctx: Context):
    ctx.tg = import_train_gpt()
    return f"train_gpt.py imported (torch {torch.__version__}, Python {sys.version.split()[0]})", []


def check_config(ctx: Context):
    tg = ctx.tg
    try:
        ctx.cfg = cfg = tg.Config.from_env(ctx.env)
    except tg.ConfigError as e:
        raise CheckFailed(str(e)) from None
    m, e = cfg.model, cfg.eval
    given = ", ".join(f"{k}={ctx.env[k]}" for k in sorted(tg.Config.variables() | {"PRESET"})
                      if k in ctx.env)
    slot = f"SLOT {e.slot.mode} {e.slot.steps} steps" if e.slot.enabled else "SLOT off"
    return (f"PRESET={cfg.run.preset or '(none)'}: {m.num_layers} layers, d={m.model_dim}, "
            f"{m.num_heads} heads ({m.num_kv_heads} kv), MLP x{m.mlp_mult:g}, V={m.vocab_size}, "
            f"seq {cfg.train.train_seq_len}/{e.seq_len}, {slot}, "
            f"COMPRESSOR={cfg.export.compressor}"), [
        f"set: {given or '(nothing)'}", *(f"note: {n}" for n in suspicious_vars(tg, ctx.env))]


def suspicious_vars(tg, env) -> list[str]:
    """Variables train_gpt.py does not read but that look like one it does (a typo is silently
    ignored): the script's own check, and the original's variables that change nothing."""
    notes = [f"{name} is read by the original but changes nothing; train_gpt.py ignores it"
             for name in sorted(env) if name in IGNORED_VARS]
    return notes + [w for w in misspelt_settings(tg, env) if w.split()[0] not in IGNORED_VARS]


def budget_lines(tg, container: dict, model_bytes: int, compressor: str, code) -> list[str]:
    """The submission's bytes: stored tensors by scheme (uncompressed), then the totals."""
    stored = dict.fromkeys(("int6", "int8", "passthrough"), 0)
    for name, t in container["w"].items():
        scheme = container["m"].get(name) or container["m"][name.rsplit(".", 1)[0]]
        kind = scheme["type"] if isinstance(scheme, dict) else "passthrough"
        stored[kind] += t.numel() * t.element_size()
    total, source = model_bytes + code.size, len(code.source.encode("utf-8"))
    script = "plain" if code.size == source else "packed"
    return [f"budget {kind}: {n:,} bytes stored" for kind, n in stored.items()] + [
        f"budget model: {model_bytes:,} bytes after {compressor}",
        f"budget code: {code.size:,} bytes ({script} script; source {source:,} bytes)",
        f"budget total: {total:,} bytes, margin {tg.SIZE_LIMIT - total:,} to the "
        f"{tg.SIZE_LIMIT:,}-byte limit"]


def misspelt_settings(tg, env) -> list[str]:
    """Upper-case variables that look like a setting misspelt (SLOT_STPES): the script ignores
    them, so a typo would run the default silently."""
    known = tg.Config.variables() | set(tg.REMOVED_SETTINGS) | {"PRESET"}
    notes = []
    for name in sorted(env):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if name.isupper() and name not in known and close:
            notes.append(f"{name} is not a setting of train_gpt.py; did you mean {close[0]}?")
    return notes


def check_world(ctx: Context):
    if ctx.cfg is None:
        return None
    raw = ctx.env.get("WORLD_SIZE", str(DEFAULT_WORLD_SIZE))
    try:
        world = ctx.args.world_size if ctx.args.world_size is not None else int(raw)
    except ValueError:
        raise CheckFailed(f"WORLD_SIZE={raw!r} is not an integer") from None
    if world < 1:
        raise CheckFailed(f"world size {world}: expected at least 1")
    t = ctx.cfg.train
    try:
        ctx.tg.check_world(ctx.cfg, world)
    except ctx.tg.ConfigError as e:
        raise CheckFailed(str(e)) from None
    accum = ctx.tg.grad_accum_steps(world)
    local = t.train_batch_tokens // (world * accum)
    details = [] if 8 % world == 0 else [f"note: {world} does not divide 8, so grad_accum is 1 "
                                         "(the original requires a divisor of 8)"]
    return (f"world_size={world}: grad_accum {accum}, {local:,} tokens per rank per micro-step "
            f"({local // t.train_seq_len} rows of {t.train_seq_len}); validation "
            f"{t.val_batch_size // 8:,} tokens per rank per batch"), details


def check_model(ctx: Context):
    """The model as the run builds it (SEED), and its parameter table's counts: where each
    tensor goes (optimizer group, artifact format)."""
    if ctx.cfg is None:
        return None
    t0 = time.perf_counter()
    ctx.model = ctx.tg.build_model(ctx.cfg.model, torch.device("cpu"), seed=ctx.cfg.run.seed)
    n = sum(p.numel() for p in ctx.model.parameters())  # as train_gpt.py's model_params line
    note = " - the record's count" if n == RECORD_PARAMS else ""
    return (f"{n:,} parameters{note} (built in {time.perf_counter() - t0:.1f} s)",
            ctx.tg.role_summary(ctx.model))


def sample_batch(cfg, seed: int):
    gen, shape = torch.Generator().manual_seed(seed), (2, min(cfg.train.train_seq_len, 256))
    return tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in "xy")


def check_forward(ctx: Context):
    """At initialisation the output projections are zero and the tied embedding tiny (std
    TIED_EMBED_INIT_STD), so the logits are near 0 and the loss on random targets near ln V. The
    input token's own logit is about std * d / sqrt(2) (1.8 at the default), which moves the loss
    by ~0.01 at V = 1024; a wrong init scale, a broken norm or a NaN moves it much more."""
    if ctx.model is None:
        return None
    x, y = sample_batch(ctx.cfg, ctx.args.seed)
    with torch.no_grad():
        loss = ctx.model.eval()(x, y).item()
    ln_v = math.log(ctx.cfg.model.vocab_size)
    line = (f"loss {loss:.4f} at init on 2x{x.size(1)} random tokens, ln V = {ln_v:.4f}, "
            f"|diff| {abs(loss - ln_v):.4f}")
    if not math.isfinite(loss) or abs(loss - ln_v) >= FORWARD_TOLERANCE:
        raise CheckFailed(line + f" >= {FORWARD_TOLERANCE}")
    return line + f" < {FORWARD_TOLERANCE}", []


def shrunk_config(env):
    """The configuration of `env` with 2 layers and 16-dim heads (same head counts, MLP ratio,
    vocab, bigram table, RoPE dims, softcap...), keeping which optional parts exist: bigram/VE
    projections, VE on a layer, XSA on all or only the last layer, VRL. Built from the
    environment with those variables changed, as a run would read it."""
    config = import_train_gpt().Config.from_env
    m = config(env).model
    head_dim = min(m.head_dim, max(16, m.rope_dims))
    d, kv = m.num_heads * head_dim, m.num_kv_heads * head_dim
    def width(same: bool, full: int) -> int:  # a small width that keeps a projection's presence
        return full if same else (32 if full != 32 else 16)

    changed = dict(
        NUM_LAYERS=2, MODEL_DIM=d, XSA_LAST_N=0 if m.xsa_last_n == 0 else
        (2 if m.xsa_last_n >= m.num_layers else 1),
        VE_LAYERS=",".join(map(str, sorted({0 if i == 0 else 1 for i in m.ve_layer_ids}) or [1])),
        BIGRAM_DIM=width(m.bigram_dim == m.model_dim, d), VE_DIM=width(m.ve_dim == m.kv_dim, kv),
        TTT_FREEZE_BLOCKS=0,  # at most NUM_LAYERS: what it freezes is not compiled here
        RECUR_LAYERS="1" if m.recur_ids else "", PARALLEL_START_LAYER=1)  # lanes on layer 1
    return config({**env, **{k: str(v) for k, v in changed.items()}})


def check_compile(ctx: Context):
    if ctx.cfg is None:
        return None
    if ctx.args.no_compile:
        raise CheckSkipped("--no-compile")
    small = shrunk_config(ctx.env)
    m, backend = small.model, ctx.args.compile_backend
    model = perturbed_model(ctx.tg, m, ctx.args.seed, noise=0.05).train()
    x, y = sample_batch(small, ctx.args.seed)
    parts = (f"{'bigram_dim ' + str(m.bigram_dim) if m.bigram_vocab_size else 'no bigram'}, "
             f"{f've_dim {m.ve_dim} on layer(s) {m.ve_layers}' if m.ve_enabled else 'no VE'}, "
             f"VRL {'on' if m.vrl_enabled else 'off'}")
    desc = [f"compiled: GPT.forward (train mode, late-QAT path on) of a shrunk copy: 2 layers, "
            f"d={m.model_dim} ({m.num_heads}x{m.head_dim} heads, {m.num_kv_heads} kv), "
            f"MLP x{m.mlp_mult:g}, {parts}, XSA last {m.xsa_last_n}; batch 2x{x.size(1)}; "
            f"torch.compile(fullgraph=True, dynamic=False, backend={backend!r}); weights "
            "perturbed"]
    t0 = time.perf_counter()
    try:  # the late-QAT branch is the superset of the training forward
        with torch.no_grad():
            eager = model(x, y, qat=True, recur=True).item()
            fn = torch.compile(model, dynamic=False, fullgraph=True, backend=backend)
            compiled = fn(x, y, qat=True, recur=True).item()
    except Exception as e:  # a graph break under fullgraph, a lowering error, no C++ compiler...
        raise CheckFailed(f"{type(e).__name__}: {first_line(e)}", desc) from None
    finally:
        torch._dynamo.reset()
    diff = abs(eager - compiled)
    line = (f"no graph break; loss eager {eager:.6f}, compiled {compiled:.6f}, |diff| {diff:.2e} "
            f"(compile + run {time.perf_counter() - t0:.0f} s)")
    if not diff < COMPILE_TOLERANCE:
        raise CheckFailed(line + f" >= {COMPILE_TOLERANCE}", desc)
    return line, desc


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def check_code(ctx: Context):
    """The bytes the submission counts for the script: plain, or tools.pack's file."""
    source = Path(ctx.tg.__file__).read_text(encoding="utf-8")
    _, codec, sizes = pack.pack(source)
    plain = len(source.encode("utf-8"))
    ctx.code = ctx.tg.Code(source, sizes[codec] if ctx.args.packed else plain)
    return (f"{ctx.code.size:,} bytes of train_gpt.py ({'packed' if ctx.args.packed else 'plain'}"
            f"; plain {plain:,}, packed by tools.pack {sizes[codec]:,} with {codec}); leaves "
            f"{ctx.tg.SIZE_LIMIT - ctx.code.size:,} bytes for the compressed model"), []


def check_artifact(ctx: Context):
    if ctx.model is None or ctx.code is None:
        return None
    if ctx.args.no_artifact:
        raise CheckSkipped("--no-artifact")
    tg, export, code = ctx.tg, ctx.cfg.export, ctx.code
    est, seconds = ctx.estimate.result() if ctx.estimate else timed_estimate(ctx)
    total, comp = est.model_bytes + code.size, export.compressor
    margin = tg.SIZE_LIMIT - total
    details = [
        f"quantised: {est.counts['int6']:,} int6 + {est.counts['int8']:,} int8 + "
        f"{est.counts['fp16']:,} fp16 values; {est.raw_bytes:,} bytes serialised, "
        f"{est.model_bytes:,} after {comp} "
        f"({8 * est.model_bytes / max(est.total_params, 1):.2f} bits/param)",
        *budget_lines(tg, est.container, est.model_bytes, comp, code),
        f"basis: weight matrices' rows of L2 norm ~{ROW_NORM:g} (Muon's update scale) times "
        f"lognormal(0, {ROW_NORM_SPREAD}); vectors and scalars: init x (1 + {VECTOR_JITTER} "
        f"N(0,1)); the norm calibrated on the seed-42 record's {RECORD_MODEL_BYTES:,} lzma bytes "
        "(3.5 / 4.5 give -4.2% / +2.1% there)",
        *([f"note: calibrated with lzma; COMPRESSOR={comp} is estimated with the same weights"]
          if comp != "lzma" else []),
        *(["note: GPTQ_ENABLED=1 is estimated with the clip search: GPTQ needs the trained "
           "weights and their Hessians (on a trained demo model its artifact was 0.7% larger)"]
          if export.gptq_enabled else []),
        *([f"the record's shape: {100 * (est.model_bytes / RECORD_MODEL_BYTES - 1):+.2f}% "
           "model bytes against its artifact"] if est.total_params == RECORD_PARAMS else []),
        f"estimate took {seconds:.0f} s (in the background while the other checks ran)"]
    line = (f"estimated {est.model_bytes:,} model + {code.size:,} code = {total:,} bytes "
            f"{'<' if margin > 0 else '>='} {tg.SIZE_LIMIT:,}")
    if margin <= 0:
        raise CheckFailed(f"{line} (over by {-margin:,})", details)
    return f"{line} (margin {margin:,}, {100 * margin / tg.SIZE_LIMIT:.1f}%)", details


# ---------------------------------------------------------------- the artifact estimate

@dataclass
class ArtifactEstimate:
    blob: bytes  # the compressed container, as pack_artifact writes it
    raw_bytes: int  # the serialised container before compression
    counts: dict  # values stored as int6 / int8 / fp16 (passthrough)
    container: dict  # the quantised tensors, for the byte budget

    @property
    def model_bytes(self) -> int:
        return len(self.blob)

    @property
    def total_params(self) -> int:
        return sum(self.counts.values())


def timed_estimate(ctx: Context) -> tuple[ArtifactEstimate, float]:
    t0 = time.perf_counter()
    est = estimate_artifact(ctx.tg, ctx.model.roles, ctx.model.state_dict(),
                            ctx.cfg.export.compressor, seed=ctx.args.seed)
    return est, time.perf_counter() - t0


def trained_like_state(tg, roles: dict, state: dict, seed: int = 0,
                       row_norm: float = ROW_NORM) -> dict:
    """A state dict of the same names and shapes with trained-like values (see ROW_NORM);
    roles: the model's parameter table (model.roles): control tensors keep their values."""
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, t in state.items():
        if not t.is_floating_point():
            out[name] = t.clone()
        elif t.ndim == 2 and roles[name] is not tg.ROLES["control"]:
            rows, cols = t.shape
            norm = row_norm * torch.exp(ROW_NORM_SPREAD * torch.randn(rows, 1, generator=gen))
            out[name] = torch.randn(rows, cols, generator=gen) * (norm / math.sqrt(cols))
        else:
            out[name] = t.float() * (1 + VECTOR_JITTER * torch.randn(t.shape, generator=gen))
    return out


def estimate_artifact(tg, roles: dict, state: dict, compressor: str = "lzma", seed: int = 0,
                      row_norm: float = ROW_NORM) -> ArtifactEstimate:
    """Quantise trained-like weights of this shape with train_gpt's own quantize_state_dict
    (each tensor in its role's format) and compress them with pack_artifact."""
    container = tg.quantize_state_dict(trained_like_state(tg, roles, state, seed, row_norm), roles)
    counts = dict(int6=0, int8=0, fp16=0)
    for name, scheme in container["m"].items():
        if isinstance(scheme, dict):
            counts[scheme["type"]] += container["w"][name + ".q"].numel()
        elif container["w"][name].is_floating_point():
            counts["fp16"] += container["w"][name].numel()
    buf = io.BytesIO()
    torch.save(container, buf)
    return ArtifactEstimate(tg.pack_artifact(container, compressor), len(buf.getvalue()), counts,
                            container)


# ---------------------------------------------------------------- runner

CHECKS = (("import", check_import), ("config", check_config), ("world", check_world),
          ("model", check_model), ("forward", check_forward), ("compile", check_compile),
          ("code", check_code), ("artifact", check_artifact))


def run_check(fn, ctx: Context) -> tuple[str, str, list[str]]:
    """(status, summary, details)."""
    try:
        result = fn(ctx)
    except CheckFailed as e:
        return "FAIL", str(e), e.details
    except CheckSkipped as e:
        return "SKIP", str(e), []
    except Exception as e:  # an unexpected error is a failed check, not a crash of the tool
        return "FAIL", f"{type(e).__name__}: {first_line(e)}", []
    return ("SKIP", "skipped: an earlier check failed", []) if result is None else ("PASS", *result)


def main(argv=None, env=None, out=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.preflight",
        description="Check the train_gpt.py configuration set in the environment (the same "
                    "variables, PRESET included) on a CPU with no data. Exit 1 if any check fails.")
    p.add_argument("--world-size", type=int, default=None, help="GPUs of the planned run "
                   f"(default: $WORLD_SIZE, else {DEFAULT_WORLD_SIZE} like the record)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile check (the slowest)")
    p.add_argument("--compile-backend", default="inductor",
                   choices=("inductor", "aot_eager", "eager"),
                   help="torch.compile backend (default %(default)s, the record's; aot_eager is "
                        "faster and still finds graph breaks)")
    p.add_argument("--no-artifact", action="store_true", help="skip the artifact-size estimate")
    p.add_argument("--packed", action="store_true",
                   help="count the code as the packed file tools.pack writes (default: the plain "
                        "train_gpt.py)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random tokens and weights (default %(default)s)")
    ctx = Context(env=dict(os.environ if env is None else env), args=p.parse_args(argv))
    out, t0, statuses = sys.stdout if out is None else out, time.perf_counter(), {}
    print("preflight: train_gpt.py configuration from the environment, on the CPU, no data",
          file=out)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for name, fn in CHECKS:
            status, summary, details = run_check(fn, ctx)
            statuses[name] = status
            print(f"{status:<4}  {name:<8}  {summary}", file=out, flush=True)
            print("".join(f"{'':<16}{line}\n" for line in details), end="", file=out, flush=True)
            if name == "import" and status == "FAIL":
                break  # nothing else can run without train_gpt
            if name == "model" and ctx.model is not None and not ctx.args.no_artifact:
                # quantile and lzma release the GIL: the estimate overlaps the compile check
                ctx.estimate = pool.submit(timed_estimate, ctx)
    failed = [name for name, status in statuses.items() if status == "FAIL"]
    verdict = f"FAIL ({', '.join(failed)})" if failed else "PASS"
    counts = list(statuses.values())
    print(f"preflight: {verdict} - {counts.count('PASS')} passed, {len(failed)} failed, "
          f"{counts.count('SKIP')} skipped in {time.perf_counter() - t0:.0f} s", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
