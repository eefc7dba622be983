"""GPTQ export (GPTQ_ENABLED=1, SPEC section 9): the solver against an independent computation,
the Hessians against hooks written here, the training-time budget, and the artifact from one
process against two."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from tests.test_pipeline import run_script, tiny_data, tiny_env  # noqa: F401  (tiny_data is a fixture)

QUANTILES = (0.999, 0.9995, 0.9999, 0.99999)


def spec_scales(w: torch.Tensor) -> list[torch.Tensor]:
    """SPEC section 5's clip candidates: row quantiles of |w| (float32, unpermuted), then the row max."""
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
def test_solver_matches_an_independent_computation(rows, cols, block, one_thread):
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
    assert q.dtype == torch.int8 and q.shape == (rows, cols) and s.dtype == torch.float16 and s.shape == (rows,)
    assert torch.equal(s, s_ref)
    clean = ~near.any(axis=1)
    assert clean.mean() >= 0.75, clean.mean()
    assert torch.equal(q[clean], q_ref[clean])
    assert (q[:, dead] == 0).all() and q.abs().max() <= 31
    assert not torch.equal(q, spec_clip_search(w)[0])  # GPTQ moved codes away from plain rounding


def test_indefinite_hessian_falls_back_to_the_clip_search(one_thread):
    """H = 2 J - I has eigenvalue -1 even after damping: Cholesky fails, the clip search answers."""
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(1)) * 0.1
    H = 2 * torch.ones(40, 40) - torch.eye(40)
    q, s = tg.gptq_quantize(w, H)
    q_ref, s_ref = spec_clip_search(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def spec_container(state: dict, h) -> dict:
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
            tensors[name + ".q"], tensors[name + ".scale"] = q.round().clamp(-127, 127).to(torch.int8), s32.half()
            schemes[name] = {"type": "int8"}
    return {"w": tensors, "m": schemes}


def test_gptq_off_keeps_the_clip_search_container(one_thread):
    """Without Hessians the container is SPEC section 5's, tensor for tensor (so the artifact's
    bytes are today's); with a Hessian for one int6 matrix only that matrix changes."""
    h = tg.Hyperparameters.from_env(dict(NUM_LAYERS="1", MODEL_DIM="256", NUM_HEADS="2", NUM_KV_HEADS="1",
                                         MLP_MULT="2", XSA_LAST_N="1", VE_LAYERS="0", RUN_ID="t"))
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=gen)
             for k, v in tg.build_model(h, torch.device("cpu"), seed=0).state_dict().items()}
    off, want = tg.quantize_state_dict(state, h), spec_container(state, h)
    assert off["m"] == want["m"] and list(off["w"]) == list(want["w"])
    for k, t in off["w"].items():
        assert t.dtype == want["w"][k].dtype and torch.equal(t, want["w"][k]), k
    assert {m["type"] for m in off["m"].values() if isinstance(m, dict)} == {"int6", "int8"}
    assert tg.pack_artifact(tg.quantize_state_dict(state, h, {}), "lzma") == tg.pack_artifact(off, "lzma")

    name = "blocks.0.mlp.fc.weight"
    H = correlated_hessian(256, [], seed=2)
    on = tg.quantize_state_dict(state, h, {name: H})
    q, s = tg.gptq_quantize(state[name], H)
    assert torch.equal(on["w"][name + ".q"], q) and torch.equal(on["w"][name + ".scale"], s)
    assert not torch.equal(q, off["w"][name + ".q"])
    assert all(torch.equal(t, off["w"][k]) for k, t in on["w"].items() if not k.startswith(name))


# -----------------------------
# Hessians on a model trained on the demo corpus
# -----------------------------


@pytest.fixture(scope="module")
def demo_model(tiny_data):  # noqa: F811
    """The tiny configuration trained 30 steps on the demo corpus (eager, the record's optimizers)."""
    h = tg.Hyperparameters.from_env(dict(tiny_env(tiny_data, "gptq"), GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="3",
                                         MAX_WALLCLOCK_SECONDS="600"))
    torch.set_num_threads(1)
    model = tg.build_model(h, torch.device("cpu"), seed=h.seed)
    optimizers, _ = tg.build_optimizers(model, h)
    train_files = tg.shard_files(h.data_path, "train")
    loader = tg.DistributedTokenLoader(train_files, 0, 1, torch.device("cpu"))
    for _ in range(30):
        model(*loader.next_batch(h.train_batch_tokens, h.train_seq_len, 1)).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return h, model.eval(), train_files


def test_calibration_matches_hooks_and_reads_training_shards_only(demo_model, monkeypatch, capsys):
    """H of each linear equals the mean over the calibration batches of X^T X taken here with
    pre-hooks on the same training spans; c_q, c_k and c_v share one; no validation shard opens."""
    h, model, train_files = demo_model
    opened = []
    real = tg.load_data_shard
    monkeypatch.setattr(tg, "load_data_shard", lambda path: opened.append(str(path)) or real(path))
    hessians = tg.calibrate(h, tg.Runtime(), model, train_files, train_ms=1234.0)
    assert opened and all("fineweb_train_" in Path(p).name for p in opened)

    want, handles = {}, []
    for name in ("blocks.0.attn.c_q", "blocks.1.mlp.proj", "bigram.proj"):
        def grab(module, args, name=name):
            x = args[0].reshape(-1, args[0].size(-1)).double()
            want[name] = want.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(name).register_forward_pre_hook(grab))
    stream = tg.TokenStream(train_files)
    accum = h.grad_accum_steps(1)
    with torch.no_grad():
        for _ in range(3 * accum):  # each micro-batch: (tokens / accum + 1) tokens, the last one only a target
            span = stream.take(h.train_batch_tokens // accum + 1)
            model.hidden(span[:-1].reshape(-1, h.train_seq_len))
    for handle in handles:
        handle.remove()
    for name, H in want.items():
        want_h = (H / 3).float()  # float32 products summed in float64 vs float64 throughout: ~1e-5 of the scale
        torch.testing.assert_close(hessians[name + ".weight"], want_h, rtol=0, atol=1e-5 * want_h.abs().max().item())
    assert torch.equal(hessians["blocks.0.attn.c_q.weight"], hessians["blocks.0.attn.c_v.weight"])
    out = capsys.readouterr().out
    assert re.search(r"^gptq:calibration batches:3 inputs:\d+ time:\d+ms$", out, re.M)
    assert re.search(r"^gptq:training\+calibration \d+ms under MAX_WALLCLOCK_SECONDS \(600000ms\)$", out, re.M)
    tg.calibrate(h, tg.Runtime(), model, train_files, train_ms=599_999.0)
    assert re.search(r"^WARNING: training\+calibration \d+ms over MAX_WALLCLOCK_SECONDS", capsys.readouterr().out, re.M)


def test_gptq_lowers_the_hessian_weighted_error(demo_model):
    """Per matrix of the trained demo model: tr((W - Q) H (W - Q)^T) is lower with GPTQ than with
    the clip search (the objective GPTQ's error feedback minimises)."""
    h, model, train_files = demo_model
    hessians = tg.calibrate(h, tg.Runtime(), model, train_files, train_ms=0.0)
    assert len(hessians) == 2 * 6 + 2  # six linears per block, bigram and value-embedding projections
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


def test_training_cap_reserves_the_calibration_time(tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """train() runs with MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS when GPTQ is on and a cap is set."""
    seen = []

    class Stop(Exception):
        pass

    def fake_train(h, *args):
        seen.append(h.max_wallclock_seconds)
        raise Stop

    monkeypatch.setattr(tg, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    for gptq, cap, expected in (("1", "600", 590.0), ("0", "600", 600.0), ("1", "0", 0.0)):
        env = dict(tiny_env(tiny_data, "cap"), GPTQ_ENABLED=gptq, MAX_WALLCLOCK_SECONDS=cap)
        with pytest.raises(Stop):
            tg.run(tg.Hyperparameters.from_env(env))
    assert seen == [590.0, 600.0, 0.0]


@pytest.mark.parametrize("env, needle", [
    (dict(GPTQ_ENABLED="1", MAX_WALLCLOCK_SECONDS="5", GPTQ_RESERVE_SECONDS="5"), "GPTQ_RESERVE_SECONDS=5.0"),
    (dict(GPTQ_CALIBRATION_BATCHES="0"), "GPTQ_CALIBRATION_BATCHES=0"),
    (dict(GPTQ_RESERVE_SECONDS="-1"), "GPTQ_RESERVE_SECONDS=-1.0"),
])
def test_bad_gptq_settings_are_refused(env, needle):
    with pytest.raises(tg.ConfigError, match=re.escape(needle)):
        tg.Hyperparameters.from_env(env)

# -----------------------------
# the whole run: one process against two
# -----------------------------


def gptq_env(root: Path, run_id: str) -> dict:
    """No training step (one process and two start from the same weights; their training differs
    in float rounding) and a width at which the MLP matrices are int6 (more than 65,536 values)."""
    return dict(tiny_env(root, run_id), MODEL_DIM="256", NUM_HEADS="2", NUM_KV_HEADS="1", ITERATIONS="0",
                WARMUP_STEPS="0", GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES="3", MAX_WALLCLOCK_SECONDS="600",
                SLOT_ENABLED="0", EVAL_STRIDE="0")


def test_one_and_two_processes_write_the_same_artifact(tiny_data, tmp_path):  # noqa: F811
    """The calibration splits each global batch over the ranks as training does and sums in
    float64: torchrun with 2 processes (gloo) writes the single process's artifact byte for byte,
    and its int6 matrices are GPTQ's, not the clip search's."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    log1 = run_script(one, gptq_env(tiny_data, "g1"))
    log2 = run_script(two, gptq_env(tiny_data, "g2"), torchrun=2)
    assert "world_size:2 grad_accum_steps:4" in log2
    for log in (log1, log2):
        assert re.search(r"^gptq:calibration batches:3 inputs:\d+ time:\d+ms$", log, re.M)
        assert re.search(r"^gptq:training\+calibration \d+ms under MAX_WALLCLOCK_SECONDS", log, re.M)
        assert re.search(r"^gptq:solved on cpu in \d+ms$", log, re.M)
        assert re.search(r"^budget int6: [\d,]+ bytes stored$", log, re.M)
    blob = (one / "final_model.int6.ptz").read_bytes()
    assert blob == (two / "final_model.int6.ptz").read_bytes()

    container = tg.unpack_artifact(blob, "one")
    weights = torch.load(io.BytesIO((one / "final_model.pt").read_bytes()), weights_only=True)
    int6 = [n for n, m in container["m"].items() if isinstance(m, dict) and m["type"] == "int6"]
    assert len(int6) == 4  # mlp.fc and mlp.proj of both blocks
    fc = "blocks.0.mlp.fc.weight"
    assert not torch.equal(container["w"][fc + ".q"], tg.quantize_int6(weights[fc])[0])
