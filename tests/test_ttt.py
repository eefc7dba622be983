"""Tests of legal score-first test-time training (SPEC section 8): the accepted record's figures
on the reference model, the flip test, coverage, rank splits, what is and is not trained on."""

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tests.conftest import THREADS, TINY_MODEL
import train_gpt as tg
from tests.test_pipeline import REF, figures, process_state, run_script
from tools._files import shard_bytes

CPU = torch.device("cpu")
L, N = 32, 300
TINY = dict(
    TINY_MODEL,
    EVAL_STRIDE="12",
    VAL_BATCH_SIZE=str(8 * 4 * L),
    SLOT_BATCH_SEQS="4",
    SLOT_STEPS="2",
    TTT_ENABLED="1",
    TTT_CHUNK_TOKENS="64",
    TTT_LR="0.05",
    RUN_ID="test",
)

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**change):
    return tg.Config.from_env({**TINY, **{k.upper(): str(v) for k, v in change.items()}})


def perturbed_model(cfg: tg.GPTConfig, seed: int, noise: float) -> tg.GPT:
    """The seeded initial model plus seeded noise on every parameter: at initialisation the output
    projections are zero and the embeddings tiny, so every target would score about ln V
    whatever the input (or the code) does."""
    model = tg.build_model(cfg, CPU, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def setup():
    """A tiny model whose predictions depend on its input, a random stream of N targets, random
    byte tables."""
    cfg = config()
    vocab = cfg.model.vocab_size
    model = perturbed_model(cfg.model, 0, 0.3).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (N + 1,), generator=g)
    luts = (
        torch.randint(0, 5, (vocab,), generator=g).to(torch.int16),
        torch.rand(vocab, generator=g) < 0.5,
        torch.zeros(vocab, dtype=torch.bool),
    )
    return model, tokens, luts


def ttt(setup, tokens=None, rt=None, **change):
    """eval_ttt on a copy of the model: (per-target nll, Sums, the adapted model)."""
    model, base_tokens, luts = setup
    cfg, adapted = config(**change), copy.deepcopy(model)
    rt = rt or tg.Runtime()
    tokens = base_tokens if tokens is None else tokens
    sums, _ = tg.eval_ttt(cfg.eval, rt, adapted, tokens, luts, collect=True)
    return sums.per_target(rt) if not rt.distributed else None, sums, adapted


def flipped(tokens, p, vocab=64):
    out = tokens.clone()
    out[p + 1] = (out[p + 1] + 1) % vocab  # target p is token p + 1
    return out


# -----------------------------
# chunks and coverage
# -----------------------------


@pytest.mark.parametrize(
    "n,seq_len,stride,chunk,tail",
    [
        (300, 32, 12, 64, "once"),
        (300, 32, 12, 80, "original"),
        (1000, 64, 7, 100, "once"),
        (1000, 64, 7, 64, "original"),
        (31744, 512, 64, 4096, "once"),
        (40, 32, 8, 32, "once"),
    ],
)
def test_chunk_windows_follow_the_first_scored_target(n, seq_len, stride, chunk, tail):
    """Window i belongs to chunk min((start + score_from) // C, n_chunks - 1), written as a loop."""
    plan = tg.sliding_windows(n, seq_len, stride, tail)
    bounds = tg.ttt_chunk_windows(plan, n, chunk)
    n_chunks = -(-n // chunk)
    assert len(bounds) == n_chunks + 1 and bounds[0] == 0 and bounds[-1] == len(plan)
    for ci in range(n_chunks):
        for i in range(bounds[ci], bounds[ci + 1]):
            assert min((plan.start[i] + plan.score_from[i]) // chunk, n_chunks - 1) == ci
    if (n, chunk) == (31744, 4096):  # the reference case's counts (expected.json)
        assert len(plan) == 489 and np.diff(bounds).tolist() == [57, 64, 64, 64, 64, 64, 64, 48]


@pytest.mark.parametrize("tail", ["once", "original"])
def test_every_target_scored_as_the_sliding_plan_scores_it(setup, tail, monkeypatch):
    """TTT scores exactly the sliding plan's targets (positions and count; once each under
    EVAL_TAIL=once,
    the original's duplicates under EVAL_TAIL=original); without training it is the sliding pass."""
    _, tokens, luts = setup
    seen = []
    add = tg.Sums.add
    monkeypatch.setattr(
        tg.Sums,
        "add",
        lambda self, nll, prev, tgt, lt, where=None: (
            seen.append(where.clone()),
            add(self, nll, prev, tgt, lt, where),
        )[1],
    )
    _, sums, _ = ttt(setup, eval_tail=tail)
    plan = tg.sliding_windows(N, L, 12, tail)
    want = np.sort(
        np.concatenate(
            [np.arange(s + f, s + ln) for s, ln, f in zip(plan.start, plan.length, plan.score_from)]
        )
    )
    got = np.sort(torch.cat(seen).numpy())
    assert np.array_equal(got, want) and int(sums.tokens) == len(want)
    if tail == "once":
        assert np.array_equal(got, np.arange(N))
    else:
        assert len(got) > N
    monkeypatch.undo()
    cfg = config(eval_tail=tail)
    model, _, _ = setup
    s = tg.Scoring(model, model.hidden, tokens, luts, tg.Runtime())
    sliding = tg.sliding_pass(cfg.eval, s, 12, "sliding", collect=True)[0].sums
    untrained, sums0, _ = ttt(setup, eval_tail=tail, ttt_epochs=0)
    assert torch.equal(untrained, sliding.per_target(tg.Runtime()))
    assert float(sums0.loss) == pytest.approx(float(sliding.loss), rel=1e-12)


# -----------------------------
# the flip test
# -----------------------------

# (TTT_CHUNK_TOKENS, p, whether token p + 1 is trained on). Chunks of 64 hold two whole sequences
# of 32; at stride 12 the span of window 3 (targets 56..67) straddles the boundary at 64 and is
# scored
# with chunk 0. Chunks of 80 leave targets 64..79 of each chunk untrained (token 80 opens chunk 1's
# first sequence). The last chunk is never trained on.
FLIPS = [
    (64, 40, True),  # mid-chunk
    (64, 63, True),  # the last target of chunk 0
    (64, 64, True),  # the first target of chunk 1
    (64, 65, True),  # in the straddling span 56..67, after the boundary
    (64, 61, True),  # in the straddling span, before the boundary
    (80, 70, False),  # in chunk 0's untrained remainder
    (80, 150, False),  # in chunk 1's untrained remainder
    (64, 270, False),  # in the last chunk [256, 300)
    (80, 250, False),  # in the last chunk [240, 300)
]


@pytest.mark.parametrize("chunk,p,trained", FLIPS, ids=[f"C{c}-p{p}" for c, p, _ in FLIPS])
def test_flip_keeps_every_earlier_target(setup, chunk, p, trained):
    """Change target p: every target before p keeps its nll bit for bit. Targets beyond the reach
    of p's token as context (q > p + L) change only through training: they do when the token is
    trained on, and stay bit-identical when it lies in a remainder or in the last chunk."""
    _, tokens, _ = setup
    a, _, _ = ttt(setup, ttt_chunk_tokens=chunk)
    b, _, _ = ttt(setup, flipped(tokens, p), ttt_chunk_tokens=chunk)
    assert torch.equal(a[:p], b[:p])
    assert a[p] != b[p]
    later = (a[p + L + 1 :] - b[p + L + 1 :]).abs()
    if trained:
        assert float(later.max()) > 1e-4
    else:
        assert later.numel() == 0 or float(later.max()) == 0.0


def test_remainders_and_last_chunk_never_trained(setup):
    """Every target of every remainder (but a chunk's last, whose token opens the next chunk's
    first sequence) and of the last chunk changed at once: the adapted weights are bit-identical.
    Changing one target of a trained sequence moves them."""
    model, tokens, _ = setup
    changed = tokens.clone()
    for p in [*range(64, 79), *range(144, 159), *range(224, 239), *range(240, N)]:
        changed[p + 1] = (changed[p + 1] + 7) % 64
    _, _, a = ttt(setup, ttt_chunk_tokens=80)
    _, _, b = ttt(setup, changed, ttt_chunk_tokens=80)
    _, _, c = ttt(setup, flipped(tokens, 100), ttt_chunk_tokens=80)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert any(not torch.equal(p, c.state_dict()[name]) for name, p in a.state_dict().items())
    assert any(not torch.equal(p, model.state_dict()[name]) for name, p in a.state_dict().items())


# -----------------------------
# what is trained, and how
# -----------------------------


def test_frozen_blocks_stay_bit_identical(setup):
    """TTT_FREEZE_BLOCKS=1: block 0 keeps its weights; block 1 and the embeddings are trained."""
    model, _, _ = setup
    _, _, adapted = ttt(setup, ttt_freeze_blocks=1)
    before, after = model.state_dict(), adapted.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith("blocks.0."):
            assert same, name
    assert not torch.equal(before["tok_emb.weight"], after["tok_emb.weight"])
    assert not torch.equal(before["blocks.1.mlp.fc.weight"], after["blocks.1.mlp.fc.weight"])
    _, _, all_frozen = ttt(setup, ttt_freeze_blocks=2)
    assert all(
        torch.equal(before[n], all_frozen.state_dict()[n])
        for n in before
        if n.startswith("blocks.")
    )


@pytest.mark.parametrize("qat", [0, 1])
def test_ttt_qat_changes_the_training_forward_only(setup, qat, monkeypatch):
    """Every linear layer sees qat=TTT_QAT in the training forward (train mode) and qat=False when
    scoring (eval mode); the first chunk, scored before any training, is the same either way."""
    calls = set()
    forward = tg.CastedLinear.forward

    def spy(self, x, qat=False):
        calls.add((self.training, bool(qat)))
        return forward(self, x, qat)

    monkeypatch.setattr(tg.CastedLinear, "forward", spy)
    got, _, _ = ttt(setup, ttt_qat=qat)
    assert calls == {(False, False), (True, bool(qat))}
    monkeypatch.undo()
    other, _, _ = ttt(setup, ttt_qat=1 - qat)
    plan = tg.sliding_windows(N, L, 12, "once")
    last = (
        tg.ttt_chunk_windows(plan, N, 64)[1] - 1
    )  # chunk 0's last window: targets 0..67 are scored untrained
    end = int(plan.start[last] + plan.length[last])
    assert end == 68 and torch.equal(got[:end], other[:end])
    assert float((got - other).abs().max()) > 1e-5


def test_step_shapes_are_fixed_and_ranks_pad_their_share(setup, monkeypatch):
    """Chunks of 160 targets hold 12 windows: scored in batches of 4 rows (SLOT_BATCH_SEQS, the
    sliding evaluation's: its compiled graph serves) on any number of processes; 5 sequences in
    steps of 3 train on [3, L] and [2, L], and as rank 1 of 2 (collectives stubbed) on [2, L]
    (1 real row, 1 padding) and [1, L]: each shape first before the timer (the warm-up)."""
    shapes = []
    hidden = tg.GPT.hidden

    def spy(self, ids, qat=False, recur=False):
        shapes.append((self.training, tuple(ids.shape)))
        return hidden(self, ids, qat, recur)

    monkeypatch.setattr(tg.GPT, "hidden", spy)
    ttt(setup, ttt_chunk_tokens=160, ttt_batch_seqs=3)
    assert {s for t, s in shapes if not t} == {(4, L)}
    assert [s for t, s in shapes if t][:2] == [(3, L), (2, L)] and {s for t, s in shapes if t} == {
        (3, L),
        (2, L),
    }
    shapes.clear()
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t: None)
    monkeypatch.setattr(tg.Sums, "result", lambda self, rt: (1.0, 1.0))
    ttt(setup, rt=tg.Runtime(rank=1, world_size=2), ttt_chunk_tokens=160, ttt_batch_seqs=3)
    assert [s for t, s in shapes if t][:2] == [(2, L), (1, L)] and {s for t, s in shapes if t} == {
        (2, L),
        (1, L),
    }
    assert {s for t, s in shapes if not t} == {(4, L)}


def test_evaluation_model_untouched(setup, capsys):
    """evaluate runs TTT last, on a copy: the model the other evaluations use keeps its
    weights and its trainable flags; the log has the record's line names, and the closing
    score lines each evaluation's kind."""
    model, tokens, luts = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(slot_mode="context")
    scores = tg.evaluate(cfg, tg.Runtime(), model, tg.Data(tokens, luts, [], 0))
    out = capsys.readouterr().out
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    names = re.findall(r"^(\w+) val_loss:", out, re.M)
    assert (
        names[-1] == "legal_ttt_exact"
        and names[-2] == "legal_ttt"
        and "final_slot_context" in names
    )
    assert re.search(
        r"^legal_ttt val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} eval_time:\d+ms$", out, re.M
    )
    assert re.search(r"^legal_ttt_exact val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", out, re.M)
    assert re.search(r"^legal_ttt:chunk 1/5 bpb:\d+\.\d{6} elapsed:\S+s eta:\S+s$", out, re.M)
    loss = float(re.search(r"^legal_ttt_exact val_loss:(\S+)", out, re.M).group(1))
    _, sums, _ = ttt(setup, slot_mode="context")
    assert loss == pytest.approx(sums.result(tg.Runtime())[0], abs=5e-9)
    assert scores["legal_ttt"].val_loss == sums.result(tg.Runtime())[0]
    assert list(scores) == [
        "final_int6_roundtrip",
        "final_int6_sliding_window",
        "final_slot_context",
        "legal_ttt",
    ]
    kinds = dict(re.findall(r"^score:(\w+) val_bpb:\d+\.\d{8} kind:(\w+)$", out, re.M))
    assert kinds == {
        "final_int6_roundtrip": "accepted",
        "final_int6_sliding_window": "accepted",
        "final_slot_context": "causal_not_accepted",
        "legal_ttt": "accepted",
    }


BAD = [
    ("TTT_LR", "-0.1", ">= 0"),
    ("TTT_GRAD_CLIP", "-1", ">= 0"),
    ("TTT_EPOCHS", "-1", ">= 0"),
    ("TTT_BATCH_SEQS", "0", "positive"),
    ("TTT_MOMENTUM", "1", "[0, 1)"),
    ("TTT_CHUNK_TOKENS", "31", "EVAL_SEQ_LEN=32"),
    ("TTT_FREEZE_BLOCKS", "3", "NUM_LAYERS=2"),
    ("TTT_QAT", "maybe", "1/0"),
    ("TTT_ENABLED", "2", "1/0"),
]


@pytest.mark.parametrize("name,value,allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_ttt_setting_names_the_variable(name, value, allowed):
    with pytest.raises(tg.ConfigError) as e:
        tg.Config.from_env({**TINY, name: value})
    assert re.search(rf"\b{name}='?{re.escape(value)}'?", str(e.value)) and allowed in str(e.value)


def test_demo_preset_turns_ttt_on():
    e = tg.Config.from_env({"PRESET": "demo"}).eval
    assert e.ttt.enabled and 0 < e.ttt.lr and e.ttt.chunk_tokens >= e.seq_len


# -----------------------------
# scripts: two processes, and the accepted record's own figures
# -----------------------------


def tiny_tokenizer(path: Path) -> None:
    words = "the cat sat on a mat while seven dogs ran past and every bird sang loud songs".split()
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(words, 9)) for _ in range(300)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=64,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def evaluated_here(env: dict, threads: int) -> str:
    """EVAL_ONLY's stages in this process (the data, the artifact's model, every evaluation),
    on `threads` threads; returns what they log."""
    cfg = tg.Config.from_env(env)
    out = io.StringIO()
    with process_state(Path.cwd(), {}), contextlib.redirect_stdout(out):
        torch.set_num_threads(threads)
        rt = tg.Runtime()
        data, _ = tg.load_data(cfg, rt, training=False)
        artifact = cfg.export.artifact
        tg.evaluate(
            cfg, rt, tg.eval_model(cfg.model, tg.read_artifact(artifact), CPU, artifact), data
        )
    return out.getvalue()


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo), EVAL_ONLY on a small artifact with no sidecar: chunks
    of 5 sequences in steps of 3 (split 1 + 2, then 1 + 1 over the ranks) give the one-process
    figures (evaluated here) to 1e-6; the run says the model settings went unchecked."""
    (tmp_path / "data").mkdir()
    val = np.random.default_rng(0).integers(0, 64, 1601)
    (tmp_path / "data" / "fineweb_val_000000.bin").write_bytes(shard_bytes(val))
    tiny_tokenizer(tmp_path / "tok.model")
    env = {
        **TINY,
        "TTT_CHUNK_TOKENS": "160",
        "TTT_BATCH_SEQS": "3",
        "EVAL_STRIDE": "16",
        "SLOT_ENABLED": "0",
        "DATA_PATH": str(tmp_path / "data"),
        "TOKENIZER_PATH": str(tmp_path / "tok.model"),
        "EVAL_ONLY": "1",
        "ARTIFACT": str(tmp_path / "m.ptz"),
    }
    model = perturbed_model(tg.Config.from_env(env).model, 0, 0.3)
    container = tg.quantize_state_dict(model.state_dict(), model.roles, None)
    tg.write_atomic(tmp_path / "m.ptz", tg.pack_artifact(container, "lzma"))
    log1 = evaluated_here(env, threads=1)
    log2 = run_script(tmp_path, {**env, "RUN_ID": "p2"}, torchrun=2, timeout=180)
    assert "world_size:2" in log2
    assert (
        "\neval_only: no m.ptz.json beside the artifact; its model settings are unchecked\n" in log2
    )
    for log in (log1, log2):  # 1600 targets: 10 chunks, 9 trained, 3 epochs of 2 steps
        assert "legal_ttt:start chunks:10 " in log and "legal_ttt:done optimizer_steps:54" in log
    for name in ("legal_ttt_exact", "final_int6_sliding_window_exact"):
        a, b = figures(log1, name), figures(log2, name)
        assert abs(a[0] - b[0]) <= 1e-6 * a[0] and abs(a[1] - b[1]) <= 1e-6 * a[1], (name, a, b)
    assert (
        figures(log1, "legal_ttt_exact")[0]
        < figures(log1, "final_int6_sliding_window_exact")[0] - 1e-3
    )


@pytest.mark.slow
@pytest.mark.skipif(not (REF / "ttt").exists(), reason="../shared/reference/ttt is absent")
def test_reference_figures():
    """EVAL_ONLY on the reference model (reference/ttt/README.md's command), its stages run here
    (one thread per test worker, two in one process): legal_ttt_exact and the control sliding
    line of the accepted record's own TTT function to 1e-5 relative, its window, chunk and step
    counts, and its progress figures for the first and the last chunk."""
    exp = json.loads((REF / "ttt" / "expected.json").read_text())
    case = exp["cases"]["public"]
    env = dict(
        case["env"],
        EVAL_ONLY="1",
        ARTIFACT=str(REF / "ttt" / "model.int6.ptz"),
        DATA_PATH=str(REF / "ttt"),
        TOKENIZER_PATH=str(REF / "fineweb_1024_bpe.model"),
        RUN_ID="ref",
    )
    log = evaluated_here(env, threads=THREADS)
    for name, want in (
        ("legal_ttt_exact", case["legal_ttt_exact"]),
        ("final_int6_sliding_window_exact", case["control_sliding"]),
    ):
        got = figures(log, name)
        assert all(abs(g - w) <= 1e-5 * w for g, w in zip(got, want)), (name, got, want)
    start = re.search(r"^legal_ttt:start chunks:(\d+) windows:(\d+) ", log, re.M)
    assert (int(start.group(1)), int(start.group(2))) == (case["chunks"], case["windows"])
    assert f"legal_ttt:done optimizer_steps:{case['optimizer_steps']}" in log
    progress = dict(re.findall(r"^legal_ttt:chunk (\d+)/\d+ bpb:([\d.]+)", log, re.M))
    for line in case["reference_log"]:
        m = re.match(r"\s*ttt_chunk \[(\d+)/\d+\] bpb=([\d.]+)", line)
        if m:
            assert abs(float(progress[m.group(1)]) - float(m.group(2))) <= 1e-5 * float(m.group(2))
