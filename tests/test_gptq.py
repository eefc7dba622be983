"""GPTQ export (GPTQ_ENABLED=1, SPEC section 9): the solver against an independent computation,
the Hessians against hooks written here, the training-time budget, and the artifact from one
process against two."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"

QUANTILES = (0.999, 0.9995, 0.9999, 0.99999)
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster


def spec_scales(w: torch.Tensor) -> list[torch.Tensor]:
    """SPEC section 5's clip candidates: row quantiles of |w| (float32, unpermuted), then the row
    max."""
    clips = [torch.quantile(w.abs(), q, dim=1) for q in QUANTILES] + [w.abs().amax(dim=1)]
    return [(c / 31).clamp_min(1 / 31).half() for c in clips]


def spec_clip_search(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best = None
    for s in spec_scales(w):
        q = (w / s.float()[:, None]).round().clamp(-31, 31)
        err = (w - q * s.float()[:, None]).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, q.to(torch.int8), s)
    return best[1], best[2]


def reference_gptq(w: torch.Tensor, H: torch.Tensor, tie: float):
    """Unblocked GPTQ in float64 numpy, H^-1's upper factor from an explicit inverse. Returns the
    codes, the scales, and where w/s came within `tie` of a rounding boundary (float32 may round
    those the other way, and a flipped code changes the rest of its row)."""
    W, H = w.double().numpy(), H.double().numpy().copy()
    n = W.shape[1]
    dead = np.diag(H) == 0
    H[np.flatnonzero(dead), np.flatnonzero(dead)] = 1
    H[np.arange(n), np.arange(n)] += 0.01 * np.diag(H).mean()
    order = np.argsort(-np.diag(H), kind="stable")
    Wp = W[:, order].copy()
    Wp[:, dead[order]] = 0
    U = np.linalg.cholesky(np.linalg.inv(H[np.ix_(order, order)])).T  # H^-1 = U^T U
    best = None
    for s16 in spec_scales(w.float()):
        s = s16.double().numpy()
        work, Q, near = Wp.copy(), np.zeros_like(Wp), np.zeros(Wp.shape, dtype=bool)
        for j in range(n):
            v = work[:, j] / s
            Q[:, j] = np.clip(np.round(v), -31, 31)
            near[:, j] = (np.abs(np.abs(v - np.floor(v)) - 0.5) < tie) & (np.abs(v) < 31)
            e = (work[:, j] - Q[:, j] * s) / U[j, j]
            work[:, j + 1:] -= np.outer(e, U[j, j + 1:])
        err = ((Wp - Q * s[:, None]) ** 2).mean()
        if best is None or err < best[0]:
            best = (err, Q, s16, near)
    inverse = np.argsort(order)
    return torch.from_numpy(best[1][:, inverse]).to(torch.int8), best[2], best[3][:, inverse]


def correlated_hessian(cols: int, dead: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.4 * torch.randn(cols, cols, generator=gen) / cols ** 0.5
    X = torch.randn(6 * cols, cols, generator=gen) * torch.linspace(0.2, 3.0, cols) @ mix
    X[:, dead] = 0  # inputs that never fire: zero diagonal, zero rows and columns
    return X.T @ X / X.size(0)


@pytest.mark.parametrize("rows, cols, block", [(24, 200, 128), (16, 45, 8)])
def test_solver_matches_an_independent_computation(rows, cols, block):
    """Blocks of 128 over 200 columns and of 8 over 45 (neither divides), dead columns, an
    outlier: the same scales, and the same codes in every row where float32 and float64 cannot
    disagree on a rounding (at least 3 rows in 4)."""
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    w[1, 3] = 0.9
    dead = [0, 7, cols - 2]
    w[:, dead] = 0.5  # large weights on dead inputs: dropped, and still in the clip quantiles
    H = correlated_hessian(cols, dead, seed=cols)
    q, s = tg.gptq_quantize(w, H, block=block)
    q_ref, s_ref, near = reference_gptq(w, H, tie=1e-4)  # float32 drifts ~1e-5 from float64 here
    assert q.dtype == torch.int8 and q.shape == (rows, cols)
    assert s.dtype == torch.float16 and s.shape == (rows,)
    assert torch.equal(s, s_ref)
    clean = ~near.any(axis=1)
    assert clean.mean() >= 0.75, clean.mean()
    assert torch.equal(q[clean], q_ref[clean])
    assert (q[:, dead] == 0).all() and q.abs().max() <= 31
    assert not torch.equal(q, spec_clip_search(w)[0])  # GPTQ moved codes away from plain rounding


def test_indefinite_hessian_falls_back_to_the_clip_search():
    """H = 2 J - I has eigenvalue -1 even after damping: Cholesky fails, the clip search answers."""
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(1)) * 0.1
    H = 2 * torch.ones(40, 40) - torch.eye(40)
    q, s = tg.gptq_quantize(w, H)
    q_ref, s_ref = spec_clip_search(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def spec_container(state: dict) -> dict:
    """SPEC section 5 written out here: the container the export wrote before GPTQ existed."""
    tensors, schemes = {}, {}
    for name, t in state.items():
        t = t.float()
        if t.numel() <= 65536:
            tensors[name], schemes[name] = t.half(), "passthrough"
        elif "tok_emb" not in name and any(s in name for s in (".mlp.", ".attn.", ".proj.")):
            tensors[name + ".q"], tensors[name + ".scale"] = spec_clip_search(t)
            schemes[name] = {"type": "int6"}
        else:
            clip = torch.quantile(t.abs(), 0.9999984, dim=1)
            s32 = (clip / 127).clamp_min(1 / 127)
            q = torch.maximum(torch.minimum(t, clip[:, None]), -clip[:, None]) / s32[:, None]
            tensors[name + ".q"] = q.round().clamp(-127, 127).to(torch.int8)
            tensors[name + ".scale"] = s32.half()
            schemes[name] = {"type": "int8"}
    return {"w": tensors, "m": schemes}


def test_gptq_off_keeps_the_clip_search_container():
    """Without Hessians the container is SPEC section 5's, tensor for tensor (so the artifact's
    bytes are today's); with a Hessian for one int6 matrix only that matrix changes."""
    cfg = tg.Config.from_env(dict(NUM_LAYERS="1", MODEL_DIM="256", NUM_HEADS="2", NUM_KV_HEADS="1",
                                  MLP_MULT="2", XSA_LAST_N="1", VE_LAYERS="0", RUN_ID="t"))
    gen = torch.Generator().manual_seed(0)
    model = tg.build_model(cfg.model, torch.device("cpu"), seed=0)
    roles = model.roles
    state = {k: v + 0.02 * torch.randn(v.shape, generator=gen)
             for k, v in model.state_dict().items()}
    off, want = tg.quantize_state_dict(state, roles), spec_container(state)
    assert off["m"] == want["m"] and list(off["w"]) == list(want["w"])
    for k, t in off["w"].items():
        assert t.dtype == want["w"][k].dtype and torch.equal(t, want["w"][k]), k
    assert {m["type"] for m in off["m"].values() if isinstance(m, dict)} == {"int6", "int8"}
    assert tg.pack_artifact(tg.quantize_state_dict(state, roles, {}), "lzma") == tg.pack_artifact(
        off, "lzma")

    name = "blocks.0.mlp.fc.weight"
    H = correlated_hessian(256, [], seed=2)
    on = tg.quantize_state_dict(state, roles, {name: H})
    q, s = tg.gptq_quantize(state[name], H)
    assert torch.equal(on["w"][name + ".q"], q) and torch.equal(on["w"][name + ".scale"], s)
    assert not torch.equal(q, off["w"][name + ".q"])
    assert all(torch.equal(t, off["w"][k]) for k, t in on["w"].items() if not k.startswith(name))


# -----------------------------
# Hessians on a model trained on the demo corpus
# -----------------------------

CPU = torch.device("cpu")


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """SPEC section 2's shard: a 256-int32 header (magic, version, count), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, tokens.size)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


@pytest.fixture(scope="module")
def gptq_root(demo_root, tmp_path_factory) -> Path:
    """The session's demo corpus (tests/conftest.py) under `data/`, and beside it `short/`: its
    training shard with the validation split cut to 4,097 tokens (what the runs here score does
    not matter, and three passes over 95,000 tokens cost)."""
    root = tmp_path_factory.mktemp("gptq_root")
    (root / "data").symlink_to(demo_root / "data", target_is_directory=True)
    demo = root / "data" / "datasets" / "demo_sp1024"
    short = root / "short"
    short.mkdir()
    (short / "fineweb_train_000000.bin").symlink_to(demo / "fineweb_train_000000.bin")
    val = np.fromfile(demo / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    write_shard(short / "fineweb_val_000000.bin", val[:4097])
    return root


def tiny_env(root: Path, run_id: str) -> dict:
    """A 2-layer model of width 64 on the short demo data (test_pipeline's tiny configuration)."""
    return dict(
        DATA_PATH=str(root / "short"),
        TOKENIZER_PATH=str(root / "data" / "tokenizers" / "demo_1024_bpe.model"),
        RUN_ID=run_id, NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
        MLP_MULT="2", BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1", XSA_LAST_N="2",
        TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="8192",
        ITERATIONS="12", WARMUP_STEPS="2", WARMDOWN_ITERS="6", LATE_QAT_THRESHOLD="0.5",
        MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1", EVAL_STRIDE="32",
        SLOT_STEPS="2", SLOT_MODE="both", SEED="3", CPU_THREADS="0",
    )


def every_linear(model: tg.GPT) -> dict:
    """What the original's calibration hooked: every linear, int6 or not."""
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, tg.CastedLinear)}


@pytest.fixture(scope="module")
def demo_model(gptq_root, one_thread):
    """The tiny configuration trained 30 steps on the demo corpus (eager, the record's
    optimizers)."""
    env = dict(tiny_env(gptq_root, "gptq"), GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="3",
               MAX_WALLCLOCK_SECONDS="600")
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime()
    data, _ = tg.load_data(cfg, rt, training=True)
    model = tg.build_model(cfg.model, CPU, seed=cfg.run.seed)
    optimizers = tg.build_optimizers(model, cfg.optim)
    loader = tg.DistributedTokenLoader(data.train_files, rt)
    for _ in range(30):
        x, y = loader.next_batch(cfg.train.train_batch_tokens, cfg.train.train_seq_len, 1)
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return cfg, model.eval(), data


def test_calibration_matches_hooks_and_reads_training_shards_only(demo_model, monkeypatch, capsys):
    """H of each linear equals the mean over the calibration batches of X^T X taken here with
    pre-hooks on the same training spans; c_q, c_k and c_v share one; no validation shard
    opens. (Every linear is hooked here, as the original did; which ones the export hooks is
    the next test's.)"""
    cfg, model, data = demo_model
    monkeypatch.setattr(tg, "gptq_modules", every_linear)
    opened = []
    real = tg.load_data_shard
    monkeypatch.setattr(tg, "load_data_shard", lambda path: opened.append(str(path)) or real(path))
    hessians = tg.calibrate(cfg, tg.Runtime(), model, data, train_ms=1234.0)
    assert opened and all("fineweb_train_" in Path(p).name for p in opened)
    assert set(hessians) == set(every_linear(model)) and len(hessians) == 2 * 6 + 2

    want, handles = {}, []
    for name in ("blocks.0.attn.c_q", "blocks.1.mlp.proj", "bigram.proj"):
        def grab(module, args, name=name):
            x = args[0].reshape(-1, args[0].size(-1)).double()
            want[name] = want.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(name).register_forward_pre_hook(grab))
    stream = tg.TokenStream(data.train_files)
    t, accum = cfg.train, tg.grad_accum_steps(1)
    with torch.no_grad():  # each micro-batch: tokens / accum + 1 tokens, the last only a target
        for _ in range(3 * accum):
            span = torch.from_numpy(stream.take(t.train_batch_tokens // accum + 1).astype(np.int64))
            model.hidden(span[:-1].reshape(-1, t.train_seq_len))
    for handle in handles:
        handle.remove()
    for name, H in want.items():
        # float32 products summed in float64 vs float64 throughout: ~1e-5 of the scale
        want_h = (H / 3).float()
        torch.testing.assert_close(hessians[name + ".weight"], want_h, rtol=0,
                                   atol=1e-5 * want_h.abs().max().item())
    for other in ("c_k", "c_v"):
        assert torch.equal(hessians["blocks.0.attn.c_q.weight"],
                           hessians[f"blocks.0.attn.{other}.weight"])
    out = capsys.readouterr().out
    assert re.search(r"^gptq:calibration batches:3 inputs:14 time:\d+ms$", out, re.M)
    assert re.search(r"^gptq:training\+calibration \d+ms under MAX_WALLCLOCK_SECONDS "
                     r"\(600000ms\)$", out, re.M)
    tg.calibrate(cfg, tg.Runtime(), model, data, train_ms=599_999.0)
    assert re.search(r"^WARNING: training\+calibration \d+ms over MAX_WALLCLOCK_SECONDS",
                     capsys.readouterr().out, re.M)


def test_calibration_hooks_the_int6_matrices_only(demo_model, capsys):
    """The export calibrates the matrices its table stores int6 (the original's name rule, more
    than 65,536 values): none in the tiny model; at width 264 with as many kv heads as heads,
    the six of every block, not the 264 x 16 bigram and value-embedding projections."""
    cfg, model, data = demo_model
    assert tg.gptq_modules(model) == {}
    assert tg.calibrate(cfg, tg.Runtime(), model, data, train_ms=0.0) == {}
    assert re.search(r"^gptq:calibration batches:3 inputs:0 ", capsys.readouterr().out, re.M)
    wide_cfg = tg.Config.from_env(dict(tiny_env(Path("."), "w"), MODEL_DIM="264", NUM_KV_HEADS="2",
                                       GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="1"))
    wide = tg.build_model(wide_cfg.model, CPU, seed=0)
    int6 = {f"blocks.{i}.{m}.weight" for i in range(2)
            for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")}
    assert set(tg.gptq_modules(wide)) == int6
    assert {n for n, r in wide.roles.items() if r.export == "int6"} == int6 | {
        "bigram.proj.weight", "ve_shared.proj.weight"}
    hessians = tg.calibrate(wide_cfg, tg.Runtime(), wide, data, train_ms=0.0)
    assert set(hessians) == int6
    assert all(H.shape == (264, 264) for n, H in hessians.items() if "mlp.proj" not in n)


def test_gptq_lowers_the_hessian_weighted_error(demo_model, monkeypatch):
    """Per matrix of the trained demo model: tr((W - Q) H (W - Q)^T) is lower with GPTQ than with
    the clip search (the objective GPTQ's error feedback minimises)."""
    cfg, model, data = demo_model
    monkeypatch.setattr(tg, "gptq_modules", every_linear)
    hessians = tg.calibrate(cfg, tg.Runtime(), model, data, train_ms=0.0)
    # Six linears per block, the bigram and value-embedding projections.
    assert len(hessians) == 2 * 6 + 2
    # In this tiny configuration the bigram table and its projection start at zero and stay there.
    live = {name: H for name, H in hessians.items() if H.any()}
    assert len(live) >= 12
    for name, H in live.items():
        w = model.get_parameter(name).detach().float()

        def weighted_error(q, s):
            d = w - q.float() * s.float()[:, None]
            return torch.trace(d @ H @ d.T).item()

        gptq, clip = weighted_error(*tg.gptq_quantize(w, H)), weighted_error(*tg.quantize_int6(w))
        assert gptq < clip, (name, gptq, clip)


def script_code() -> tg.Code:
    return tg.Code(SCRIPT.read_text(encoding="utf-8"), SCRIPT.stat().st_size)


def test_training_cap_reserves_the_calibration_time(gptq_root, tmp_path, monkeypatch):
    """train() runs with MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS when GPTQ is on and a cap
    is set (the cap is an argument: the config keeps MAX_WALLCLOCK_SECONDS as set). (One
    calibration batch: its measured time stays under the reserve on any machine.)"""
    seen = []

    class Stop(Exception):
        pass

    def fake_train(cfg, rt, model, data, cap_seconds):
        seen.append((cap_seconds, cfg.train.max_wallclock_seconds))
        raise Stop

    monkeypatch.setattr(tg, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    for gptq, cap in (("1", "600"), ("0", "600"), ("1", "0")):
        env = dict(tiny_env(gptq_root, "cap"), GPTQ_ENABLED=gptq, MAX_WALLCLOCK_SECONDS=cap,
                   GPTQ_CALIBRATION_BATCHES="1")
        with pytest.raises(Stop):
            tg.run(tg.Config.from_env(env), script_code())
    assert seen == [(590.0, 600.0), (600.0, 600.0), (0.0, 0.0)]


@pytest.mark.parametrize("env, needle", [
    (dict(GPTQ_ENABLED="1", MAX_WALLCLOCK_SECONDS="5", GPTQ_RESERVE_SECONDS="5"),
     "GPTQ_RESERVE_SECONDS=5.0"),
    (dict(GPTQ_CALIBRATION_BATCHES="0"), "GPTQ_CALIBRATION_BATCHES=0"),
    (dict(GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS=-1.0"),
])
def test_bad_gptq_settings_are_refused(env, needle):
    with pytest.raises(tg.ConfigError, match=re.escape(needle)):
        tg.Config.from_env(env)

# -----------------------------
# the whole run: one process against two
# -----------------------------

# A hang guard: the torchrun below takes about a minute on a loaded 2-core machine.
RUN_GUARD_S = 240


def gptq_env(root: Path, run_id: str) -> dict:
    """No training step (one process and two start from the same weights; their training
    differs in float rounding) and a width at which the MLP matrices are int6 (more than
    65,536 values)."""
    return dict(tiny_env(root, run_id), MODEL_DIM="256", NUM_HEADS="2", NUM_KV_HEADS="1",
                ITERATIONS="0", WARMUP_STEPS="0", GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="3",
                MAX_WALLCLOCK_SECONDS="600", SLOT_ENABLED="0", EVAL_STRIDE="0", CPU_THREADS="1")


def torchrun(cwd: Path, env: dict, nproc: int) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(SCRIPT)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=RUN_GUARD_S)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return (cwd / "logs" / f"{env['RUN_ID']}.txt").read_text()


@pytest.mark.slow
def test_one_and_two_processes_write_the_same_artifact(gptq_root, tmp_path, monkeypatch, capsys):
    """The calibration splits each global batch over the ranks as training does and sums in
    float64: torchrun with 2 processes (gloo) writes the single process's artifact byte for
    byte (the single process run in-process, on one thread as each rank), and its int6
    matrices are GPTQ's, not the clip search's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    monkeypatch.chdir(one)
    tg.run(tg.Config.from_env(gptq_env(gptq_root, "g1")), script_code())
    capsys.readouterr()
    log1 = (one / "logs" / "g1.txt").read_text()
    log2 = torchrun(two, gptq_env(gptq_root, "g2"), 2)
    assert "world_size:2 grad_accum_steps:4" in log2
    for log in (log1, log2):
        assert re.search(r"^gptq:calibration batches:3 inputs:4 time:\d+ms$", log, re.M)
        assert re.search(r"^gptq:training\+calibration \d+ms under MAX_WALLCLOCK_SECONDS", log,
                         re.M)
        assert re.search(r"^gptq:solved on cpu in \d+ms$", log, re.M)
    blob = (one / "final_model.int6.ptz").read_bytes()
    assert blob == (two / "final_model.int6.ptz").read_bytes()

    container = tg.unpack_artifact(blob, "one")
    weights = torch.load(io.BytesIO((one / "final_model.pt").read_bytes()), weights_only=True)
    int6 = [n for n, m in container["m"].items() if isinstance(m, dict) and m["type"] == "int6"]
    assert len(int6) == 4  # mlp.fc and mlp.proj of both blocks
    fc = "blocks.0.mlp.fc.weight"
    assert not torch.equal(container["w"][fc + ".q"], tg.quantize_int6(weights[fc])[0])


# -----------------------------
# issue 29: the solver's candidates in one pass, TF32 products, the measured reserve
# -----------------------------


def test_candidates_are_solved_in_one_pass_as_one_by_one(monkeypatch):
    """The five clip candidates go through one column loop (stacked as rows: a fifth of the
    launches) and give what five separate passes give: the same choice and codes, written here
    as the solver ran before (float32 may round a near-tie the other way: 99.9% of codes)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 160, generator=gen) * 0.05
    H = correlated_hessian(160, [3], seed=6)
    calls = []
    real = tg.gptq_round
    monkeypatch.setattr(tg, "gptq_round", lambda W, *a: calls.append(W.shape) or real(W, *a))
    q, s = tg.gptq_quantize(w, H, block=32)
    assert calls == [(5 * 48, 160)]

    Hd = H.clone()  # the solver's preparation, then one pass per candidate
    dead = Hd.diagonal() == 0
    Hd.diagonal()[dead] = 1
    Hd.diagonal().add_(0.01 * Hd.diagonal().mean())
    perm = torch.argsort(Hd.diagonal(), descending=True)
    W, Hd = w[:, perm].clone(), Hd[perm][:, perm]
    W[:, dead[perm]] = 0
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    best = None
    for scale in spec_scales(w):
        codes = real(W, Hinv, scale.float(), 32)
        err = (W - codes.float() * scale.float()[:, None]).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, codes[:, torch.argsort(perm)], scale)
    assert torch.equal(s, best[2])
    assert (q == best[1]).float().mean() >= 0.999


def test_calibration_products_may_use_tf32(demo_model, monkeypatch):
    """The Hessian products run with TF32 allowed (on CUDA: float32 accumulation, and bf16
    activations are exact in TF32's 10-bit mantissa); the solve still runs without. With
    `micro_batches` the calibration returns those micro-batches' float64 sums as they are."""
    cfg, model, data = demo_model
    monkeypatch.setattr(tg, "gptq_modules", every_linear)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    seen = []
    handle = model.blocks[0].attn.c_q.register_forward_hook(
        lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32))
    try:
        tg.calibrate(cfg, tg.Runtime(), model, data, train_ms=0.0)
    finally:
        handle.remove()
    assert seen and all(seen)
    with tg.no_tf32():
        assert not torch.backends.cuda.matmul.allow_tf32
    sums = tg.calibrate(cfg, tg.Runtime(), model, data, 0.0, micro_batches=2)
    x = []
    handle = model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, a: x.append(a[0]))
    stream = tg.TokenStream(data.train_files)
    t = cfg.train
    with torch.no_grad():
        for _ in range(2):
            span = torch.from_numpy(stream.take(t.train_batch_tokens // 8 + 1).astype(np.int64))
            model.hidden(span[:-1].reshape(-1, t.train_seq_len))
    handle.remove()
    X = torch.cat(x).reshape(-1, x[0].size(-1)).double()
    H = sums["blocks.1.mlp.proj.weight"]
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, X.T @ X, rtol=0, atol=1e-5 * H.abs().max().item())


def test_reserve_covers_the_measured_calibration(demo_model, monkeypatch, capsys):
    """GPTQ on with a cap: the reserve is GPTQ_RESERVE_SECONDS or, if longer, the calibration's
    time measured before training (after an untimed warm-up: its set-up and first micro-batch,
    then each further micro-batch at the difference of two timed and one, plus a quarter); a
    calibration longer than the cap stops the run naming GPTQ_CALIBRATION_BATCHES. GPTQ off or
    no cap: no reserve. The model is left in training mode with its weights."""
    cfg, model, data = demo_model
    clock, calls = [100.0], []

    def fake_calibrate(cfg, rt, model, data, train_ms, micro_batches=0):
        calls.append(micro_batches)
        clock[0] += 0.1 + 0.25 * micro_batches  # set-up 0.1 s, each micro-batch 0.25 s
        return {}

    monkeypatch.setattr(tg, "calibrate", fake_calibrate)
    monkeypatch.setattr(tg.time, "perf_counter", lambda: clock[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def reserve(**env):
        c = tg.Config.from_env({**tiny_env(Path("."), "r"), "GPTQ_ENABLED": "1",
                                "MAX_WALLCLOCK_SECONDS": "600", **env})
        return tg.gptq_reserve(c, tg.Runtime(), model, data)

    # 3 batches x 8 micro-batches (one process): 1.25 x (0.1 + 24 x 0.25) = 7.625 s, under the
    # 10 s floor.
    assert reserve(GPTQ_CALIBRATION_BATCHES="3") == 10.0 and calls == [1, 1, 2]
    assert "gptq:reserve 10.0s (calibration measured at 7.6s)" in capsys.readouterr().out
    assert reserve(GPTQ_CALIBRATION_BATCHES="3", GPTQ_RESERVE_SECONDS="0") == pytest.approx(7.625)
    assert reserve(GPTQ_CALIBRATION_BATCHES="8") == pytest.approx(1.25 * (0.1 + 64 * 0.25))
    with pytest.raises(tg.ConfigError, match="GPTQ_CALIBRATION_BATCHES=300"):
        reserve(GPTQ_CALIBRATION_BATCHES="300")  # 750 s
    calls.clear()
    assert reserve(GPTQ_ENABLED="0") == 0.0 and reserve(MAX_WALLCLOCK_SECONDS="0") == 0.0
    assert calls == []
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.eval()
