"""Preflight: check a train_gpt.py configuration (its environment variables, PRESET included)
on a CPU with no data before a GPU run, each check of CHECKS a line; exit 1 if one fails.

    PRESET=demo python -m tools.preflight --no-compile
    NUM_LAYERS=12 MODEL_DIM=576 python -m tools.preflight --world-size 8 --packed
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from tools import pack
from tools._common import import_train_gpt, perturbed_model

FORWARD_TOLERANCE = 0.1  # |loss - ln V| at initialisation; see check_forward
COMPILE_TOLERANCE = 1e-4
SEED = 0  # of the random tokens and weights
IGNORED_VARS = ("MUON_BETA2", "SWA_ENABLED", "SWA_EVERY")  # the original's, changing nothing

# Trained-like weights for the artifact estimate: Muon's orthogonalised update of a rows x cols
# matrix has entries of RMS 1/sqrt(cols), so matrices get rows of L2 norm ~ ROW_NORM, spread
# lognormally. int6's scale floor of 1/31 makes the absolute scale matter: ROW_NORM is calibrated
# on the default configuration (seed 0) against the seed-42 record's artifact, 15,689,612 bytes:
# c = 3.5 -> 15,050,236 bytes, 4.0 -> 15,614,184, 4.1 -> 15,702,908 (+0.08%), 4.5 -> 16,034,528.
ROW_NORM = 4.1
ROW_NORM_SPREAD = 0.3  # sigma of the row norm's log
VECTOR_JITTER = 0.1  # vectors and scalars: their initial value times (1 + 0.1 N(0, 1))
RECORD_PARAMS, RECORD_MODEL_BYTES = 26_862_694, 15_689_612


# Each check returns (status, summary, details) or raises (a failure); ctx holds args, env and
# what the checks found (tg, cfg, model, code, estimate), each NEEDED by later checks.
def check_import(ctx):
    ctx.tg = import_train_gpt()
    return "PASS", (f"train_gpt.py imported (torch {torch.__version__}, Python "
                    f"{sys.version.split()[0]})"), []


def check_config(ctx):
    ctx.cfg = cfg = ctx.tg.Config.from_env(ctx.env)
    m, e = cfg.model, cfg.eval
    given = ", ".join(f"{k}={ctx.env[k]}" for k in sorted(ctx.tg.Config.variables() | {"PRESET"})
                      if k in ctx.env)
    slot = f"SLOT {e.slot.mode} {e.slot.steps} steps" if e.slot.enabled else "SLOT off"
    return "PASS", (
        f"PRESET={cfg.run.preset or '(none)'}: {m.num_layers} layers, d={m.model_dim}, "
        f"{m.num_heads} heads ({m.num_kv_heads} kv), MLP x{m.mlp_mult:g}, V={m.vocab_size}, "
        f"seq {cfg.train.train_seq_len}/{e.seq_len}, {slot}, COMPRESSOR={cfg.export.compressor}"), [
        f"set: {given or '(nothing)'}", *(f"note: {n}" for n in suspicious_vars(ctx.tg, ctx.env))]


def suspicious_vars(tg, env) -> list[str]:
    """The original's variables that change nothing, and upper-case variables like a setting
    misspelt (SLOT_STPES): a typo would run the default."""
    known = tg.Config.variables() | set(tg.REMOVED_SETTINGS) | {"PRESET", *IGNORED_VARS}
    return [f"{name} is read by the original but changes nothing; train_gpt.py ignores it"
            for name in sorted(env) if name in IGNORED_VARS] + [
        f"{name} is not a setting of train_gpt.py; did you mean {close[0]}?"
        for name in sorted(env) if name.isupper() and name not in known
        and (close := difflib.get_close_matches(name, known, n=1, cutoff=0.8))]


def check_world(ctx):
    world, t = ctx.args.world_size, ctx.cfg.train
    if world < 1:
        return "FAIL", f"world size {world}: expected at least 1", []
    ctx.tg.check_world(ctx.cfg, world)
    accum = ctx.tg.grad_accum_steps(world)
    local = t.train_batch_tokens // (world * accum)
    details = [] if 8 % world == 0 else [f"note: {world} does not divide 8, so grad_accum is 1 "
                                         "(the original requires a divisor of 8)"]
    return "PASS", (f"world_size={world}: grad_accum {accum}, {local:,} tokens per rank per "
                    f"micro-step ({local // t.train_seq_len} rows of {t.train_seq_len}); "
                    f"validation {t.val_batch_size // 8:,} tokens per rank per batch"), details


def check_model(ctx):
    """The model as the run builds it, with its parameter table's counts. The artifact estimate
    starts here in the background: quantile and lzma release the GIL, overlapping compile."""
    t0 = time.perf_counter()
    ctx.model = ctx.tg.build_model(ctx.cfg.model, torch.device("cpu"), seed=ctx.cfg.run.seed)
    n = sum(p.numel() for p in ctx.model.parameters())  # as train_gpt.py's model_params line
    if not ctx.args.no_artifact:
        ctx.estimate = ctx.pool.submit(estimate_artifact, ctx.tg, ctx.model.roles,
                                       ctx.model.state_dict(), ctx.cfg.export.compressor)
    note = " - the record's count" if n == RECORD_PARAMS else ""
    return ("PASS", f"{n:,} parameters{note} (built in {time.perf_counter() - t0:.1f} s)",
            ctx.tg.role_summary(ctx.model))


def sample_batch(cfg):
    gen, shape = torch.Generator().manual_seed(SEED), (2, min(cfg.train.train_seq_len, 256))
    return tuple(torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in "xy")


def check_forward(ctx):
    """At init (zero output projections, a tiny tied embedding) the loss on random targets is
    near ln V (the input token's own logit moves it ~0.01 at V = 1024); a wrong init scale, a
    broken norm or a NaN moves it much more."""
    x, y = sample_batch(ctx.cfg)
    with torch.no_grad():
        loss = ctx.model.eval()(x, y).item()
    ln_v = math.log(ctx.cfg.model.vocab_size)
    line = (f"loss {loss:.4f} at init on 2x{x.size(1)} random tokens, ln V = {ln_v:.4f}, "
            f"|diff| {abs(loss - ln_v):.4f}")
    ok = abs(loss - ln_v) < FORWARD_TOLERANCE  # False for NaN
    return ("PASS" if ok else "FAIL"), f"{line} {'<' if ok else '>='} {FORWARD_TOLERANCE}", []


def shrunk_config(env):
    """`env` read as a run would with 2 layers and 16-dim heads, the rest kept (head counts,
    vocab, RoPE dims...) and which optional parts exist: bigram/VE projections, VE, XSA, VRL."""
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


def check_compile(ctx):
    """GPT.forward in train mode on the late-QAT path (the superset of the training forward) of
    a shrunk copy with perturbed weights, compiled with fullgraph=True, against eager."""
    small = shrunk_config(ctx.env)
    m, backend = small.model, ctx.args.compile_backend
    model = perturbed_model(ctx.tg, m, SEED, noise=0.05).train()
    x, y = sample_batch(small)
    desc = [f"compiled: a shrunk copy ({m.num_layers} layers, d={m.model_dim}, {m.num_heads}x"
            f"{m.head_dim} heads, {m.num_kv_heads} kv), batch 2x{x.size(1)}, backend={backend!r}"]
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            eager = model(x, y, qat=True, recur=True).item()
            fn = torch.compile(model, dynamic=False, fullgraph=True, backend=backend)
            compiled = fn(x, y, qat=True, recur=True).item()
    finally:
        torch._dynamo.reset()
    diff = abs(eager - compiled)
    line = (f"no graph break; loss eager {eager:.6f}, compiled {compiled:.6f}, |diff| {diff:.2e} "
            f"(compile + run {time.perf_counter() - t0:.0f} s)")
    ok = diff < COMPILE_TOLERANCE
    return ("PASS" if ok else "FAIL"), line + ("" if ok else f" >= {COMPILE_TOLERANCE}"), desc


def check_code(ctx):
    """The bytes the submission counts for the script: plain, or tools.pack's file."""
    source = Path(ctx.tg.__file__).read_text(encoding="utf-8")
    _, codec, sizes = pack.pack(source)
    plain = len(source.encode("utf-8"))
    ctx.code = ctx.tg.Code(source, sizes[codec] if ctx.args.packed else plain)
    form = "packed" if ctx.args.packed else "plain"
    return "PASS", (f"{ctx.code.size:,} bytes of train_gpt.py ({form}; plain {plain:,}, packed by "
                    f"tools.pack {sizes[codec]:,} with {codec}); leaves "
                    f"{ctx.tg.SIZE_LIMIT - ctx.code.size:,} bytes for the compressed model"), []


def check_artifact(ctx):
    limit, export, code, est = ctx.tg.SIZE_LIMIT, ctx.cfg.export, ctx.code, ctx.estimate.result()
    total, comp, source = est.model_bytes + code.size, export.compressor, len(code.source.encode())
    margin = limit - total
    details = [
        *(f"budget {kind}: {n:,} bytes stored" for kind, n in est.stored.items()),
        f"budget model: {est.model_bytes:,} bytes after {comp}",
        f"budget code: {code.size:,} bytes ({'plain' if code.size == source else 'packed'} "
        f"script; source {source:,} bytes)",
        f"budget total: {total:,} bytes, margin {margin:,} to the {limit:,}-byte limit",
        f"basis: trained-like weights (matrix rows of L2 norm ~{ROW_NORM:g}), calibrated with "
        f"lzma on the seed-42 record's {RECORD_MODEL_BYTES:,} bytes",
        *(["note: GPTQ_ENABLED=1 estimated with the clip search (GPTQ needs trained weights; on "
           "a trained demo model its artifact was 0.7% larger)"] if export.gptq_enabled else []),
        *([f"the record's shape: {100 * (est.model_bytes / RECORD_MODEL_BYTES - 1):+.2f}% "
           "model bytes against its artifact"] if est.total_params == RECORD_PARAMS else [])]
    line = (f"estimated {est.model_bytes:,} model + {code.size:,} code = {total:,} bytes "
            f"{'<' if margin > 0 else '>='} {limit:,}")
    if margin <= 0:
        return "FAIL", f"{line} (over by {-margin:,})", details
    return "PASS", f"{line} (margin {margin:,}, {100 * margin / limit:.1f}%)", details


def trained_like_state(tg, roles: dict, state: dict, seed: int = SEED) -> dict:
    """A state dict of the same names and shapes with trained-like values (see ROW_NORM);
    roles: the model's parameter table (model.roles): control tensors keep their values."""
    gen, out = torch.Generator().manual_seed(seed), {}
    for name, t in state.items():
        if t.ndim == 2 and roles[name] is not tg.ROLES["control"]:
            rows, cols = t.shape
            norm = ROW_NORM * torch.exp(ROW_NORM_SPREAD * torch.randn(rows, 1, generator=gen))
            out[name] = torch.randn(rows, cols, generator=gen) * (norm / math.sqrt(cols))
        else:
            out[name] = t.float() * (1 + VECTOR_JITTER * torch.randn(t.shape, generator=gen))
    return out


def estimate_artifact(tg, roles: dict, state: dict, compressor: str = "lzma",
                      seed: int = SEED) -> SimpleNamespace:
    """Trained-like weights of this shape quantised (container) and packed (blob, model_bytes)
    by train_gpt itself; counts: values per int6 / int8 / fp16, stored: bytes per scheme."""
    container = tg.quantize_state_dict(trained_like_state(tg, roles, state, seed), roles)
    counts, stored = dict(int6=0, int8=0, fp16=0), dict(int6=0, int8=0, passthrough=0)
    for name, scheme in container["m"].items():
        kind = scheme["type"] if isinstance(scheme, dict) else "passthrough"
        held = [container["w"][name]] if kind == "passthrough" else [
            container["w"][name + ".q"], container["w"][name + ".scale"]]
        stored[kind] += sum(t.numel() * t.element_size() for t in held)
        counts[kind if kind != "passthrough" else "fp16"] += held[0].numel()
    blob = tg.pack_artifact(container, compressor)
    return SimpleNamespace(blob=blob, model_bytes=len(blob), counts=counts, stored=stored,
                           total_params=sum(counts.values()), container=container)


CHECKS = (("import", check_import), ("config", check_config), ("world", check_world),
          ("model", check_model), ("forward", check_forward), ("compile", check_compile),
          ("code", check_code), ("artifact", check_artifact))
NEEDS = dict(config="tg", world="cfg", model="cfg", forward="model", compile="cfg", code="tg",
             artifact="model code")


def run_check(name: str, fn, ctx) -> tuple[str, str, list[str]]:
    """(status, summary, details); an unexpected error is a failed check, not a crash."""
    if any(getattr(ctx, needed) is None for needed in NEEDS.get(name, "").split()):
        return "SKIP", "skipped: an earlier check failed", []
    if getattr(ctx.args, f"no_{name}", False):  # --no-compile, --no-artifact
        return "SKIP", f"--no-{name}", []
    try:
        return fn(ctx)
    except Exception as e:  # a ConfigError says what is wrong in one line; else the first line
        name, first = type(e).__name__, (str(e).strip().splitlines() or ["(no message)"])[0]
        return "FAIL", str(e) if name == "ConfigError" else f"{name}: {first}", []


def main(argv=None, env=None, out=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.preflight",
                                description=__doc__.split("\n\n")[0])
    env = dict(os.environ if env is None else env)
    p.add_argument("--world-size", type=int, default=env.get("WORLD_SIZE", 8),
                   help="GPUs of the planned run (default: $WORLD_SIZE, else the record's 8)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile's backend: the "
                   "record's inductor; aot_eager is faster and still finds graph breaks")
    p.add_argument("--no-artifact", action="store_true", help="skip the artifact-size estimate")
    p.add_argument("--packed", action="store_true", help="count the code as tools.pack's file")
    args, t0 = p.parse_args(argv), time.perf_counter()  # out None: print's sys.stdout
    with ThreadPoolExecutor(max_workers=1) as pool:
        ctx = SimpleNamespace(args=args, env=env, pool=pool, tg=None, cfg=None, model=None,
                              code=None, estimate=None)
        statuses = {}
        for name, fn in CHECKS:
            status, summary, details = run_check(name, fn, ctx)
            statuses[name] = status
            print(f"{status:<4}  {name:<8}  {summary}", *details, sep="\n" + " " * 16, file=out,
                  flush=True)
    failed = [name for name, status in statuses.items() if status == "FAIL"]
    verdict = f"FAIL ({', '.join(failed)})" if failed else "PASS"
    counts = list(statuses.values())
    print(f"preflight: {verdict} - {counts.count('PASS')} passed, {len(failed)} failed, "
          f"{counts.count('SKIP')} skipped in {time.perf_counter() - t0:.0f} s", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
