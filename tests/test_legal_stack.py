"""The accepted records' components (docs/legal_stack.md; the contract is shared/LEGAL_STACK.md):
MuonEq-R (MUON_ROW_NORMALIZE), parallel residual lanes (PARALLEL_RESIDUAL, PARALLEL_START_LAYER)
and mini depth recurrence with shared MLPs (RECUR_LAYERS, RECUR_START_STEP).

Each component against an independent computation written here: the forward of the contract's
section 4 typed out (lanes as two tensors, the skip pairing as a list, every per-layer parameter
looked up by physical layer), Muon's row normalisation, the GPTQ Hessians summing both uses of a
recurrent layer. With every new setting at its default nothing changes (keys, initial weights);
the records' settings not offered and the refused combination stop with one line. The whole
script (marked slow): the log lines, activation and warm-up of a training run, the evaluation
graph, EVAL_ONLY, a run that never activated recurrence, no compilation after the timer, and
torchrun with two processes against one."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import train_gpt as tg
from tests.conftest import tiny_env
from tests.test_model import default_config_and_model
from tests.test_pipeline import figures, main_in_process, run_in_process, run_script
from tools._common import perturbed_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")

# Five layers of width 32: an encoder of 2 (3 when two layers recur), XSA on the last two and VE
# on physical layers 1 and 3, so that a virtual-layer lookup of any of them would show.
FIVE = dict(VOCAB_SIZE="64", NUM_LAYERS="5", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
            MLP_MULT="2", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="8", VE_LAYERS="3,1",
            XSA_LAST_N="2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32", EVAL_STRIDE="16")


def five(**settings) -> tg.GPTConfig:
    return tg.Config.from_env({**FIVE, **{k: str(v) for k, v in settings.items()}}).model


# ---------------------------------------------------------------- the forward, written out


def virtual_layers(L: int, recur: list[int]) -> list[int]:
    """Contract section 3: the recurrent layers again after the last of them."""
    R = sorted(recur)
    if not R:
        return list(range(L))
    c = max(R) + 1
    return list(range(c)) + R + list(range(c, L))


def skip_pairing(L: int, v2p: list[int]) -> list[tuple[int, int, int]]:
    """(decoder virtual layer, popped virtual layer, skip row) of every skip, in order."""
    V, n = len(v2p), min(L // 2, L - L // 2)
    stack, pairs = [], []
    for vi in range(V):
        if vi >= V // 2 and stack:
            pairs.append((vi, stack.pop(), min(vi - V // 2, n - 1)))
        if vi < V // 2:
            stack.append(vi)
    return pairs


def reference_hidden(model: tg.GPT, ids: torch.Tensor, recur: bool) -> torch.Tensor:
    """Contract section 4 step by step: lanes as two tensors, everything of virtual layer vi
    taken from physical layer v2p[vi]; the attention and MLP modules are the model's own."""
    cfg = model.cfg
    R = sorted(int(s) for s in cfg.recur_layers.split(",") if s) if recur else []
    ve_layers = [int(s) for s in cfg.ve_layers.split(",")]
    v2p = virtual_layers(cfg.num_layers, R)
    pairs = {vi: (src, row) for vi, src, row in skip_pairing(cfg.num_layers, v2p)}
    x = model.smear(tg.rms(model.tok_emb(ids) + model.bigram(ids)))
    x0, ve_base, v_first = x, model.ve_shared(ids), None
    rope = tg.rotary_cos_sin(ids.size(1), cfg.rope_dims, cfg.rope_base, ids.device, x.dtype)
    lanes, pushed = None, {}
    for vi, p in enumerate(v2p):
        blk, ln = model.blocks[p], 1 / (p + 1) ** 0.5
        par = cfg.parallel_residual and p >= cfg.parallel_start_layer
        if par and lanes is None:
            lanes = [x, x]
        if vi in pairs:
            src, row = pairs[vi]
            w, s = model.skip_weights[row], pushed[src]
            if par:
                s0, s1 = s if isinstance(s, tuple) else (s, s)
                lanes = [lanes[0] + w * s0, lanes[1] + w * s1]
            else:
                x = x + w * s
        ve = ve_base * model.ve_layer_scales[ve_layers.index(p)] if p in ve_layers else None
        m0, m1 = blk.resid_mix
        if par:
            post, resid = model.parallel_post_lambdas[p], model.parallel_resid_lambdas[p]
            a, v_raw = blk.attn(tg.rms(m0 * lanes[0] + m1 * x0) * ln, rope, v_first, ve, False)
            a = blk.attn_scale * a
            lanes = [resid[0] * lanes[0] + post[0, 0] * a, resid[0] * lanes[1] + post[0, 1] * a]
            o = blk.mlp_scale * blk.mlp(tg.rms(m0 * lanes[1] + m1 * x0) * ln, False)
            lanes = [resid[1] * lanes[0] + post[1, 0] * o, resid[1] * lanes[1] + post[1, 1] * o]
        else:
            x_in = m0 * x + m1 * x0
            a, v_raw = blk.attn(tg.rms(x_in) * ln, rope, v_first, ve, False)
            x = x_in + blk.attn_scale * a
            x = x + blk.mlp_scale * blk.mlp(tg.rms(x) * ln, False)
        pushed[vi] = tuple(lanes) if par else x
        if vi == 0:
            v_first = v_raw
    return tg.rms((lanes[0] + lanes[1]) * 0.5) if lanes is not None else tg.rms(x)


def test_the_contracts_layout_table():
    """L = 11, R = [4, 5]: 13 virtual layers; every pairing moves at activation, the last two
    skips share row 4 (no row is created) and virtual layer 12 finds the stack empty."""
    active = virtual_layers(11, [5, 4])
    assert active == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    assert [(vi, src, row) for vi, src, row in skip_pairing(11, active)] == [
        (6, 5, 0), (7, 4, 1), (8, 3, 2), (9, 2, 3), (10, 1, 4), (11, 0, 4)]
    assert skip_pairing(11, list(range(11))) == [
        (5, 4, 0), (6, 3, 1), (7, 2, 2), (8, 1, 3), (9, 0, 4)]
    model = tg.GPT(tg.Config.from_env({"NUM_LAYERS": "11", "RECUR_LAYERS": "5,4",
                                       "MODEL_DIM": "16", "NUM_HEADS": "2",
                                       "NUM_KV_HEADS": "1", "ROPE_DIMS": "4"}).model)
    assert model.layer_order(True) == active and model.layer_order(False) == list(range(11))
    assert virtual_layers(6, [1, 3]) == [0, 1, 2, 3, 1, 3, 4, 5]  # non-contiguous


LAYOUTS = [  # (PARALLEL_RESIDUAL, PARALLEL_START_LAYER, RECUR_LAYERS)
    (1, 0, ""), (1, 1, "1,2"), (1, 3, "1,2"), (1, 4, "0"), (1, 2, "3"), (0, 7, "1,3"),
    (1, 2, ""), (0, 7, "4"),
]


@pytest.mark.parametrize("lanes, start, recur", LAYOUTS)
def test_forward_matches_the_contract_written_out(lanes, start, recur):
    """model.hidden against reference_hidden, recurrence on and off, lambdas far from their
    initial values; a transposed post table would differ (so the check can see it)."""
    cfg = five(PARALLEL_RESIDUAL=lanes, PARALLEL_START_LAYER=start, RECUR_LAYERS=recur)
    model = perturbed_model(tg, cfg, seed=5, noise=0.3).eval()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for active in (False, True):
            got, want = model.hidden(ids, recur=active), reference_hidden(model, ids, active)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        if lanes:
            model.parallel_post_lambdas.copy_(model.parallel_post_lambdas.transpose(1, 2).clone())
            assert (model.hidden(ids, recur=True) - want).abs().max() > 1e-3


def test_recurrence_changes_the_forward_and_the_loss_takes_it():
    """Recurrence on gives other hidden states than off; forward(recur=...) is the loss of
    hidden(recur=...)."""
    model = perturbed_model(tg, five(RECUR_LAYERS="1,2"), seed=2, noise=0.3)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(4))
    y = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        assert (model.hidden(ids, recur=True) - model.hidden(ids)).abs().max() > 1e-2
        logits = model.logits(model.hidden(ids, recur=True))
        want = F.cross_entropy(logits.reshape(-1, 64), y.reshape(-1))
        assert torch.allclose(model(ids, y, recur=True), want, rtol=1e-6)


def test_compiled_graphs_are_specialised_per_mode():
    """torch.compile(fullgraph=True) captures the lanes and the recurrent sequence (no graph
    break), one graph per mode, each equal to the eager forward."""
    model = perturbed_model(tg, five(PARALLEL_RESIDUAL=1, PARALLEL_START_LAYER=3,
                                     RECUR_LAYERS="1,2"), seed=3, noise=0.3)
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(2))
    y = torch.roll(ids, -1, dims=1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="eager")
        with torch.no_grad():
            for recur in (False, True, False, True):
                eager = model(ids, y, recur=recur)
                assert abs(compiled(ids, y, recur=recur).item() - eager.item()) <= 1e-5
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs == 2


# ---------------------------------------------------------------- defaults, keys, roles


def test_defaults_change_nothing_and_the_components_add_only_the_lambdas():
    """The default model (its keys and initial weights) against one built with the three
    components on: the only new keys are the two lambda tensors, registered after skip_weights
    (recurrence adds none), every other initial value is equal (no new random draw), and the
    lambdas start at 1 and at sqrt(1.1) after the bf16 round trip: 1.046875."""
    cfg, base = default_config_and_model()
    env = {"PARALLEL_RESIDUAL": "1", "RECUR_LAYERS": "4,5", "MUON_ROW_NORMALIZE": "1"}
    model = tg.build_model(tg.Config.from_env(env).model, CPU, seed=cfg.run.seed)
    keys, base_keys = list(model.state_dict()), list(base.state_dict())
    lambdas = ["parallel_post_lambdas", "parallel_resid_lambdas"]
    assert keys == base_keys[:1] + lambdas + base_keys[1:]
    for name, t in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    assert torch.equal(model.parallel_post_lambdas, torch.ones(11, 2, 2))
    assert torch.equal(model.parallel_resid_lambdas, torch.full((11, 2), 1.046875))
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 6 * 11
    assert (cfg.model.parallel_residual, cfg.model.recur_layers, cfg.optim.muon_row_normalize,
            cfg.train.recur_start_step, cfg.model.parallel_start_layer) == (False, "", False,
                                                                            3000, 7)


def test_lambdas_are_scalar_adamw_fp16_passthrough_and_decay_unread_rows():
    """Role scalar (never Muon, though resid is 2-D), fp16 passthrough in the artifact, counted
    in param_groups; AdamW's decoupled decay shrinks the rows p < S, whose gradients are 0."""
    cfg = tg.Config.from_env({**FIVE, "PARALLEL_RESIDUAL": "1", "PARALLEL_START_LAYER": "3"})
    model = perturbed_model(tg, cfg.model, seed=1, noise=0.1)
    for name in ("parallel_post_lambdas", "parallel_resid_lambdas"):
        assert model.roles[name] is tg.ROLES["scalar"]
    adam_scalar, muon = tg.build_optimizers(model, cfg.optim)[1:3]
    lambdas = {id(model.parallel_post_lambdas), id(model.parallel_resid_lambdas)}
    assert lambdas <= {id(p) for p in adam_scalar.param_groups[0]["params"]}
    assert not lambdas & {id(p) for p in muon.param_groups[0]["params"]}
    container = tg.quantize_state_dict(model.state_dict(), model.roles)
    assert container["m"]["parallel_resid_lambdas"] == "passthrough"
    assert container["w"]["parallel_post_lambdas"].dtype == torch.float16
    groups = tg.role_summary(model)[0]
    base = tg.role_summary(perturbed_model(tg, five(), seed=1, noise=0.1))[0]
    scalar = [tuple(map(int, re.search(r"scalar:(\d+)/(\d+)", g).groups())) for g in (groups, base)]
    assert scalar[0] == (scalar[1][0] + 2, scalar[1][1] + 30)

    before = model.parallel_resid_lambdas.detach().clone()
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids, torch.roll(ids, -1, 1)).backward()
    assert not model.parallel_resid_lambdas.grad[:3].any()
    assert model.parallel_resid_lambdas.grad[3:].abs().min() > 0
    adam_scalar.step()
    decay = 1 - cfg.optim.scalar_lr * cfg.optim.adam_wd
    torch.testing.assert_close(model.parallel_resid_lambdas[:3].detach(), before[:3] * decay)


# ---------------------------------------------------------------- MuonEq-R


def muon_step(row_normalize: bool, grads: dict, seed: int = 0) -> dict:
    """One Muon step of the five-layer model with the given gradients; the new matrices."""
    cfg = tg.Config.from_env({**FIVE, "MUON_ROW_NORMALIZE": str(int(row_normalize))})
    model = perturbed_model(tg, cfg.model, seed=seed, noise=0.1)
    muon = tg.build_optimizers(model, cfg.optim)[2]
    named = dict(model.named_parameters())
    for name, g in grads.items():
        named[name].grad = g.clone()
    muon.step()
    return {name: named[name].detach().clone() for name in grads}


def test_muon_row_normalize_is_rows_to_unit_norm_before_newton_schulz():
    """Per matrix: u = g + mu (mu 0 + g) (the first step), each row divided by its float32
    norm (at least 1e-7), then Newton-Schulz, the sqrt(max(1, rows/cols)) factor, the bf16
    buffer, decay and the lr step (SPEC section 4), computed here; a zero row stays zero; the
    update no longer depends on each row's scale, which it did without MuonEq-R."""
    cfg = tg.Config.from_env({**FIVE, "MUON_ROW_NORMALIZE": "1"})
    model = perturbed_model(tg, cfg.model, seed=0, noise=0.1)
    o, gen = cfg.optim, torch.Generator().manual_seed(7)
    names = ["blocks.1.mlp.fc.weight", "blocks.3.attn.c_k.weight", "bigram.proj.weight"]
    grads = {n: torch.randn(model.get_parameter(n).shape, generator=gen) for n in names}
    grads[names[0]][5] = 0
    new = muon_step(True, grads)
    for name, g in grads.items():
        p0 = model.get_parameter(name).detach()
        u = g + o.muon_momentum * g
        u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
        upd = tg.newton_schulz5(u, o.muon_backend_steps).float()
        upd = (upd * max(1, u.size(0) / u.size(1)) ** 0.5).bfloat16().float()
        want = (p0 * (1 - o.matrix_lr * o.muon_wd)).add(upd, alpha=-o.matrix_lr)
        torch.testing.assert_close(new[name], want, rtol=0, atol=1e-6)
    decayed = model.get_parameter(names[0]).detach()[5] * (1 - o.matrix_lr * o.muon_wd)
    assert torch.equal(new[names[0]][5], decayed)
    scales = torch.rand(grads[names[1]].size(0), 1, generator=gen) * 100 + 0.01
    scaled = {names[1]: grads[names[1]] * scales}
    for on, most in ((True, 1e-4), (False, None)):
        a, b = muon_step(on, {names[1]: grads[names[1]]}), muon_step(on, scaled)
        diff = (a[names[1]] - b[names[1]]).abs().max().item()
        assert diff < most if most else diff > 1e-3


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("name, value", [
    ("REPEAT_UNTIE_MLP", "full"), ("REPEAT_UNTIE_MLP_LAYERS", "4,5"),
    ("PARALLEL_START_LAYER_IS_PHYSICAL", "0"), ("PARALLEL_START_LAYER_IS_PHYSICAL", "true"),
    ("RECUR_WARMUP_STEPS", "20"), ("RECUR_WARMUP_STEPS", "0"), ("DISABLE_LAYER0_ATTN", "1")])
def test_record_settings_not_offered_stop_with_one_line(name, value):
    with pytest.raises(tg.ConfigError) as info:
        tg.Config.from_env({name: value})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{name}={value!r} is not allowed: ")
    assert msg.endswith("; unset it")


@pytest.mark.parametrize("name, value", [
    ("REPEAT_UNTIE_MLP", "none"), ("REPEAT_UNTIE_MLP_LAYERS", ""),
    ("PARALLEL_START_LAYER_IS_PHYSICAL", "1"), ("DISABLE_LAYER0_ATTN", "off")])
def test_record_settings_at_their_value_are_accepted(name, value):
    assert tg.Config.from_env({name: value, "RUN_ID": "x"}) == tg.Config.from_env({"RUN_ID": "x"})


BAD = [  # (environment, variable named, value shown, a part of what is expected)
    (dict(PARALLEL_RESIDUAL="1", RECUR_LAYERS="4,5", PARALLEL_START_LAYER="5"),
     "PARALLEL_START_LAYER", "5", "at most min(RECUR_LAYERS)=4 or above max(RECUR_LAYERS)=5"),
    (dict(PARALLEL_RESIDUAL="1", RECUR_LAYERS="3,6", PARALLEL_START_LAYER="6"),
     "PARALLEL_START_LAYER", "6", "at most min(RECUR_LAYERS)=3"),
    (dict(PARALLEL_RESIDUAL="1", NUM_LAYERS="3", XSA_LAST_N="3", VE_LAYERS="1"),
     "PARALLEL_START_LAYER", "7", "less than NUM_LAYERS=3"),
    (dict(RECUR_LAYERS="4,4"), "RECUR_LAYERS", "'4,4'", "distinct comma-separated layer"),
    (dict(RECUR_LAYERS="x"), "RECUR_LAYERS", "'x'", "distinct comma-separated layer"),
    (dict(RECUR_LAYERS="-1"), "RECUR_LAYERS", "'-1'", "distinct comma-separated layer"),
    (dict(RECUR_LAYERS="11"), "RECUR_LAYERS", "'11'", "layer indices in [0, 11)"),
    (dict(VE_LAYERS="9,x"), "VE_LAYERS", "'9,x'", "distinct comma-separated layer"),
    (dict(RECUR_START_STEP="-1"), "RECUR_START_STEP", "-1", "a count >= 0"),
    (dict(MUON_ROW_NORMALIZE="maybe"), "MUON_ROW_NORMALIZE", "'maybe'", "a boolean"),
]


@pytest.mark.parametrize("env, name, shown, expected", BAD, ids=[b[1] + "=" + b[2] for b in BAD])
def test_bad_component_settings_name_the_variable(env, name, shown, expected):
    with pytest.raises(tg.ConfigError) as info:
        tg.Config.from_env(env)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{name}={shown} is not allowed; expected ")
    assert expected in msg, msg


def test_allowed_combinations_and_the_unchecked_default_start():
    """S at or below min(R), or above max(R); the default start 7 passes a 3-layer model with
    the lanes off; RECUR_LAYERS in any order, sorted."""
    for start in ("4", "6", "0"):
        tg.Config.from_env(dict(PARALLEL_RESIDUAL="1", RECUR_LAYERS="5,4",
                                PARALLEL_START_LAYER=start))
    small = dict(NUM_LAYERS="3", XSA_LAST_N="3", VE_LAYERS="1")
    assert tg.Config.from_env(small).model.parallel_start_layer == 7
    assert tg.Config.from_env(dict(RECUR_LAYERS=" 5, 4")).model.recur_ids == (4, 5)


def test_a_record_setting_stops_the_run_before_it_writes(tmp_path):
    status, out, err = main_in_process(tmp_path, {"REPEAT_UNTIE_MLP": "full", "RUN_ID": "x"})
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: REPEAT_UNTIE_MLP='full' is not allowed: ")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- GPTQ


def test_gptq_hessians_sum_both_uses_of_a_recurrent_layer(small_root, monkeypatch):
    """calibrate on a model whose layers 1 and 2 recur: H of their linears is the mean over the
    batches of the X^T X of both uses (collected here by a hook on every call); the recurrent
    graph is used only when the configuration keeps RECUR_LAYERS (a run that activated it)."""
    env = {**tiny_env(small_root, "h"), "NUM_LAYERS": "4", "VE_LAYERS": "3", "XSA_LAST_N": "4",
           "RECUR_LAYERS": "1,2", "GPTQ_ENABLED": "1", "GPTQ_CALIBRATION_BATCHES": "2"}
    cfg = tg.Config.from_env(env)
    rt = tg.Runtime()
    data, _ = tg.load_data(cfg, rt, training=True)
    model = perturbed_model(tg, cfg.model, seed=0, noise=0.2)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, tg.CastedLinear)}
    monkeypatch.setattr(tg, "gptq_modules", lambda m: linears)
    got = tg.calibrate(cfg, rt, model, data, train_ms=0.0)
    plain = tg.calibrate(tg.replace(cfg, model=tg.replace(cfg.model, recur_layers="")), rt, model,
                         data, train_ms=0.0)
    want, calls, handles = {}, {}, []
    for name in ("blocks.1.mlp.fc", "blocks.2.attn.c_v", "blocks.3.mlp.proj"):
        def grab(module, args, name=name):
            x = args[0].reshape(-1, args[0].size(-1)).double()
            want[name] = want.get(name, 0) + x.T @ x
            calls[name] = calls.get(name, 0) + 1
        handles.append(model.get_submodule(name).register_forward_pre_hook(grab))
    stream, t = tg.TokenStream(data.train_files), cfg.train
    accum = tg.grad_accum_steps(1)
    with torch.no_grad():
        for _ in range(2 * accum):
            span = torch.from_numpy(stream.take(t.train_batch_tokens // accum + 1).astype("int64"))
            model.hidden(span[:-1].reshape(-1, t.train_seq_len), recur=True)
    for handle in handles:
        handle.remove()
    assert calls == {"blocks.1.mlp.fc": 4 * accum, "blocks.2.attn.c_v": 4 * accum,
                     "blocks.3.mlp.proj": 2 * accum}
    for name, H in want.items():
        want_h = (H / 2).float()
        torch.testing.assert_close(got[name + ".weight"], want_h, rtol=0,
                                   atol=1e-5 * want_h.abs().max().item())
    assert (got["blocks.1.mlp.fc.weight"] - plain["blocks.1.mlp.fc.weight"]).abs().max() > 1e-3


# ---------------------------------------------------------------- whole runs (slow)


def stack_env(root: Path, run_id: str, **extra) -> dict:
    """A 3-layer model on the small corpus with the three components on: lanes from physical
    layer 2, layer 1 run twice from step 5 (virtual layers 0 1 1 2), late QAT from step 10; a
    short EMA, so that the evaluated weights are the trained ones."""
    env = {**tiny_env(root, run_id), "NUM_LAYERS": "3", "VE_LAYERS": "2", "XSA_LAST_N": "3",
           "PARALLEL_RESIDUAL": "1", "PARALLEL_START_LAYER": "2", "RECUR_LAYERS": "1",
           "RECUR_START_STEP": "5", "MUON_ROW_NORMALIZE": "1", "VAL_LOSS_EVERY": "5",
           "SLOT_ENABLED": "0", "TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "4096",
           "TTT_EPOCHS": "1", "EMA_DECAY": "0.5"}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def lines_of(log: str, pattern: str) -> list[str]:
    return re.findall(rf"^{pattern}.*$", log, re.M)


@pytest.fixture(scope="module")
def stack_run(small_root, tmp_path_factory):
    """One training run with the three components (train_gpt.main in this process)."""
    cwd = tmp_path_factory.mktemp("stack")
    env = stack_env(small_root, "stack")
    return cwd, env, run_in_process(cwd, env)


@pytest.mark.slow
def test_a_training_run_logs_activates_and_evaluates_recurrently(stack_run):
    """The configuration lines; the prewarm line before the first step; one activation line at
    the top of step 5's iteration (after step 5's train loss, before its validation and step
    6); the lambda table after EMA with the saved weights' values; the round trip scored on
    the recurrent graph (computed here); the sidecar records the model settings."""
    cwd, env, log = stack_run
    assert lines_of(log, "muon:") == ["muon: row_normalize=1"]
    assert lines_of(log, "parallel_residual: ") == [
        "parallel_residual: active=1 start_layer=2 start_mode=physical params=18"]
    assert lines_of(log, "recurrence: ") == ["recurrence: layers=[1] start_step=5 active=0"]
    kinds = r"(recurrence:|step:[456]/12 |warmup_step|late_qat|ema:|parallel_residual|DIAG)"
    order = [re.sub(r"(_loss):\S+$", r"\1",
                    re.sub(r" (train_time|val_bpb|attn_resid|eval_time).*", "", line))
             for line in log.splitlines() if re.match(kinds, line)]
    assert order == [
        "parallel_residual: active=1 start_layer=2 start_mode=physical params=18",
        "recurrence: layers=[1] start_step=5 active=0", "warmup_step:1/2", "warmup_step:2/2",
        "recurrence:prewarm active=1 virtual_layers:4", "warmup_step:1/2", "warmup_step:2/2",
        "step:4/12 train_loss", "step:5/12 train_loss",
        "recurrence:activated step:5 layers:[1] virtual_layers:4", "step:5/12 val_loss",
        "step:6/12 train_loss", "late_qat:enabled step:10 scale:0.3333",
        "late_qat:applied LATE_QAT=record compile:False", "ema:applying EMA weights",
        "parallel_residual:converged active=1 start_layer=2 start_mode=physical "
        "final_lane=mean used_layers=1", "parallel_residual layer:3 physical:2",
        "DIAGNOSTIC post_ema val_loss"]
    weights = torch.load(cwd / "final_model.pt", weights_only=True)
    row = re.search(r"^parallel_residual layer:3 physical:2 (.*)$", log, re.M).group(1)
    got = {k: float(v) for k, v in (w.split(":") for w in row.split())}
    post, resid = weights["parallel_post_lambdas"][2], weights["parallel_resid_lambdas"][2]
    want = dict(attn_resid=resid[0], attn_to_attn=post[0, 0], attn_to_mlp=post[0, 1],
                mlp_resid=resid[1], mlp_to_attn=post[1, 0], mlp_to_mlp=post[1, 1])
    assert got == {k: round(float(v), 4) for k, v in want.items()}
    assert (post != 1).all()  # trained away from the start: a transposition would show
    meta = json.loads((cwd / "final_model.int6.ptz.json").read_text())["settings"]
    assert (meta["RECUR_LAYERS"], meta["PARALLEL_RESIDUAL"], meta["PARALLEL_START_LAYER"]) == (
        "1", True, 2)

    cfg = tg.Config.from_env(env)
    path = cwd / "final_model.int6.ptz"
    model = tg.eval_model(cfg.model, tg.read_artifact(path), CPU, path)
    tokens = tg.load_validation_tokens(tg.shard_files(cfg.data.data_path, "val"), 64, 1024)
    n = (tokens.numel() - 1) // 64 * 64
    x, y = tokens[:n].reshape(-1, 64), tokens[1:n + 1].reshape(-1, 64)
    with torch.no_grad():
        losses = [model(x, y, recur=r).item() for r in (True, False)]
    loss = figures(log, "final_int6_roundtrip_exact")[0]
    assert abs(losses[0] - loss) <= 1e-5 * loss and abs(losses[1] - loss) > 1e-4


@pytest.mark.slow
def test_eval_only_of_its_artifact_is_recurrent_and_gives_the_runs_figures(stack_run, tmp_path):
    cwd, env, log = stack_run
    artifact = str(cwd / "final_model.int6.ptz")
    log2 = run_in_process(tmp_path, {**env, "RUN_ID": "e", "EVAL_ONLY": "1", "ARTIFACT": artifact})
    assert lines_of(log2, "recurrence: ") == ["recurrence: layers=[1] start_step=5 active=1"]
    assert not lines_of(log2, "muon:")
    for name in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact",
                 "legal_ttt_exact"):
        assert figures(log2, name) == figures(log, name), name


@pytest.mark.slow
def test_warm_up_and_an_unactivated_recurrence_change_no_number(stack_run, small_root, tmp_path):
    """WARMUP_STEPS=0 gives the warmed-up run's every figure; RECUR_START_STEP past the last
    step gives the figures of the run without RECUR_LAYERS, writes RECUR_LAYERS="" into the
    sidecar, and EVAL_ONLY then refuses RECUR_LAYERS=1 and scores the run's figures without it."""
    _, _, log = stack_run
    cold = run_in_process(tmp_path, stack_env(small_root, "cold", WARMUP_STEPS=0))
    assert not lines_of(cold, "recurrence:prewarm")
    numbers = r"^(step:\d+/\d+ (?:train|val)_loss:\S+|\S+_exact .*|parallel_residual .*)"
    assert re.findall(numbers, cold, re.M) == re.findall(numbers, log, re.M)

    quick = dict(TTT_ENABLED=0, ITERATIONS=6)
    never = stack_env(small_root, "never", RECUR_START_STEP=7, **quick)
    (tmp_path / "plain").mkdir()
    plain = run_in_process(tmp_path / "plain", stack_env(small_root, "p", RECUR_LAYERS="", **quick))
    later = run_in_process(tmp_path, never)
    assert not lines_of(later, "recurrence:activated") and lines_of(later, "recurrence:prewarm")
    assert re.findall(numbers, later, re.M) == re.findall(numbers, plain, re.M)
    meta = json.loads((tmp_path / "final_model.int6.ptz.json").read_text())["settings"]
    assert meta["RECUR_LAYERS"] == ""
    status, out, err = main_in_process(tmp_path, {**never, "RUN_ID": "e1", "EVAL_ONLY": "1"})
    assert status == 2 and "RECUR_LAYERS='1' (artifact: '')" in err
    scored = run_in_process(tmp_path, {**never, "RUN_ID": "e2", "EVAL_ONLY": "1",
                                       "RECUR_LAYERS": ""})
    assert figures(scored, "final_int6_sliding_window_exact") == figures(
        later, "final_int6_sliding_window_exact")


@pytest.mark.slow
def test_nothing_compiles_after_the_timer_with_the_components(small_root, tmp_path, monkeypatch):
    """COMPILE=1 (dynamo's eager backend, graphs counted at every log line): the warm-up
    builds the recurrent graphs too; the timed loop, activation and late QAT included, adds
    none."""
    counts, real_compile, real_log = [], torch.compile, tg.Runtime.log

    def counting_log(self, msg, console=True):
        counts.append((int(torch._dynamo.utils.counters["stats"]["unique_graphs"]), msg))
        real_log(self, msg, console)

    env = stack_env(small_root, "compiled", COMPILE=1, TTT_ENABLED=0, LATE_QAT="on")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: real_compile(*a, **{**k,
                                                                        "backend": "eager"}))
    monkeypatch.setattr(tg.Runtime, "log", counting_log)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        status, out, err = main_in_process(tmp_path, env)
    finally:
        torch._dynamo.reset()
    assert status == 0, out[-2000:] + err[-2000:]
    warm = [n for n, msg in counts if msg.startswith("warmup_step:")][-1]
    trained = next(n for n, msg in counts if msg.startswith("ema:"))
    assert any(msg.startswith("recurrence:activated") for _, msg in counts)
    assert any(msg.startswith("late_qat:enabled") for _, msg in counts)
    assert trained == warm
    assert warm >= 6  # the step (without and with late QAT) and validation, twice each


@pytest.mark.slow
def test_two_processes_match_one_with_the_components(stack_run, small_root, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the same global batch in another micro-step order
    (the train loss lines are rank 0's share, so they differ); every validation, the lambda
    table and the evaluations agree to 1e-3, activation at the same step."""
    _, _, log1 = stack_run
    log2 = run_script(tmp_path, stack_env(small_root, "two"), torchrun=2)
    assert "world_size:2 grad_accum_steps:4" in log2
    assert lines_of(log2, "recurrence:activated") == lines_of(log1, "recurrence:activated")
    vals = [re.findall(r"^step:(\d+)/12 val_loss:(\S+)", lg, re.M) for lg in (log1, log2)]
    assert [s for s, _ in vals[0]] == [s for s, _ in vals[1]] == ["0", "5", "10", "12"]
    for (_, a), (_, b) in zip(*vals):
        assert abs(float(a) - float(b)) < 1e-3
    table = [re.findall(r"_\w+:(\d\.\d{4})", " ".join(lines_of(lg, "parallel_residual layer")))
             for lg in (log1, log2)]
    assert len(table[0]) == 6 and max(abs(float(a) - float(b)) for a, b in zip(*table)) < 1e-3
    for name in ("final_int6_roundtrip_exact", "legal_ttt_exact"):
        assert abs(figures(log1, name)[0] - figures(log2, name)[0]) < 1e-3, name
