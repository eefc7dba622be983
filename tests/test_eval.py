"""Tests of the evaluations (SPEC section 6): window plans, SLOT grouping,
fast SLOT against a full-window reference, rank splits, causality, val_bpb."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_MODEL
import train_gpt as tg

CPU = torch.device("cpu")
TINY = dict(
    TINY_MODEL,
    EVAL_STRIDE="8",
    VAL_BATCH_SIZE=str(8 * 32 * 3),
    SLOT_STEPS="4",
    SLOT_LR="0.05",
    SLOT_LR_MIN="0.005",
    SLOT_BATCH_SEQS="4",
    SLOT_INTERLEAVE="3",
    RUN_ID="test",
)
N_TARGETS = 301  # 34 whole windows of 32 at stride 8, then a tail window scoring the last 5


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**change):
    return tg.Config.from_env({**TINY, **change})


@pytest.fixture(scope="module")
def setup():
    """A tiny model with random weights in every matrix, a random stream and random byte tables."""
    cfg = config()
    model = tg.build_model(cfg.model, CPU, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.copy_(
                    torch.randn(p.shape, generator=g)
                    * (0.5 if "embed" in name else p.size(1) ** -0.5)
                )
    model.eval()
    vocab = cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (N_TARGETS + 1,), generator=g)
    base_bytes = torch.randint(0, 5, (vocab,), generator=g).to(torch.int16)
    leading = torch.rand(vocab, generator=g) < 0.5
    boundary = torch.zeros(vocab, dtype=torch.bool)
    boundary[[0, 1, 2, 3, 17, 40]] = True
    luts = (base_bytes, leading, boundary)
    return cfg, model, tokens, luts


def part(scorer) -> str:
    return "sliding" if isinstance(scorer, tg.SlidingScorer) else scorer.mode


def scoring(model, tokens, luts, rt=None, hidden=None) -> tg.Scoring:
    """What the evaluations read; `hidden` stands in for the model's hidden states."""
    return tg.Scoring(model, hidden or model.hidden, tokens, luts, rt or tg.Runtime())


def window_pass(s: tg.Scoring, cfg, sliding=True, modes=()) -> dict:
    """sliding_pass at EVAL_STRIDE with per-target collection: the scorers by part (sliding,
    scored, context)."""
    name = "sliding" if sliding else ""
    scorers = tg.sliding_pass(cfg.eval, s, cfg.eval.stride, name, modes, collect=True)
    return {part(sc): sc for sc in scorers}


def run_windows(model, tokens, cfg, luts, sliding=True, modes=(), rt=None):
    """The window pass's sums by part."""
    passed = window_pass(scoring(model, tokens, luts, rt), cfg, sliding, modes)
    return {k: sc.sums for k, sc in passed.items()}


def standard(s: tg.Scoring, cfg):
    """The round trip's non-overlapping windows of 32, every target's nll collected."""
    return tg.score_sequences(s, 32, cfg.train.val_batch_size, collect=True)


# -----------------------------
# window plans
# -----------------------------


def scored_counts(plan, n_targets):
    """How many times each target is scored."""
    counts = np.zeros(n_targets, dtype=np.int64)
    for s, ln, sf in zip(plan.start, plan.length, plan.score_from):
        counts[s + sf : s + ln] += 1
    return counts


@pytest.mark.parametrize(
    "n,L,S",
    [
        (20, 32, 8),
        (32, 32, 8),
        (72, 32, 8),
        (75, 32, 8),
        (33, 32, 8),
        (301, 32, 8),
        (1000, 64, 7),
        (50, 16, 16),
        (4096 + 96 * 40 + 17, 2048, 96),
    ],
)
def test_once_tail_scores_every_target_once(n, L, S):
    """EVAL_TAIL=once: exact coverage, full-length windows, at least L - S context after the
    first."""
    plan = tg.sliding_windows(n, L, S, "once")
    assert np.array_equal(scored_counts(plan, n), np.ones(n, dtype=np.int64))
    assert plan.start[0] == 0 and plan.score_from[0] == 0
    assert np.all(plan.start[:-1] < plan.start[1:])
    if n >= L:
        assert np.all(plan.length == L) and np.all(plan.start + plan.length <= n)
        assert np.all(
            plan.score_from[1:] >= L - S
        )  # each later scored position has >= L - S tokens before it
        whole = (n - L) // S + 1
        assert len(plan) == whole + (1 if (n - L) % S else 0)
        assert np.array_equal(plan.start[:whole], np.arange(whole) * S)
        if (n - L) % S:
            assert plan.start[-1] == n - L and plan.score_from[-1] == L - (n - L) % S
    else:
        assert len(plan) == 1 and plan.length[0] == n


def original_rule(n, L, S):
    """SPEC 6.2's EVAL_TAIL=original, written as a loop."""
    starts, lengths, froms = [], [], []
    for i, s in enumerate(range(0, n, S)):
        ln = min(L, n - s)
        starts.append(s)
        lengths.append(ln)
        froms.append(0 if i == 0 else max(ln - S, 0))
    return starts, lengths, froms


@pytest.mark.parametrize(
    "n,L,S",
    [(20, 32, 8), (32, 32, 8), (75, 32, 8), (301, 32, 8), (1000, 64, 7), (2048 * 3 + 40, 2048, 96)],
)
def test_original_tail_follows_its_rule(n, L, S):
    """EVAL_TAIL=original: windows at every multiple of S; the duplicates the rule implies."""
    plan = tg.sliding_windows(n, L, S, "original")
    starts, lengths, froms = original_rule(n, L, S)
    assert (
        plan.start.tolist() == starts
        and plan.length.tolist() == lengths
        and plan.score_from.tolist() == froms
    )
    counts = scored_counts(plan, n)
    assert counts.min() == 1
    # Duplicates by hand: every short window with length >= S re-scores the last S targets, one
    # shorter than S the last `length`; the first short window overlaps the last full one.
    expected = lengths[0] + sum(min(ln, S) for ln in lengths[1:]) - n
    assert int(counts.sum()) - n == expected
    assert int(counts.sum()) - n == duplicates_by_intervals(plan)


def duplicates_by_intervals(plan):
    """Total scored minus the union of the scored intervals (vectorised; no per-target array)."""
    a = plan.start + plan.score_from
    b = plan.start + plan.length
    order = np.argsort(a, kind="stable")
    a, b = a[order], b[order]
    reach = np.maximum.accumulate(b)
    prev = np.concatenate(([0], reach[:-1]))
    union = np.maximum(b - np.maximum(a, prev), 0).sum()
    assert a[0] == 0 and reach[-1] == plan.start[-1] + plan.length[-1]
    assert np.all(a[1:] <= reach[:-1])  # no gap: every target is covered
    return int((b - a).sum() - union)


@pytest.mark.parametrize("stride,duplicates", [(96, 1952), (64, 1984)])
def test_original_tail_duplicates_on_the_real_split(stride, duplicates):
    """SPEC's figures for the real split (62,021,632 targets, L = 2048)."""
    n = 62_021_632
    original = tg.sliding_windows(n, 2048, stride, "original")
    assert len(original) == -(-n // stride)
    assert int((original.start + original.length).max()) == n
    assert duplicates_by_intervals(original) == duplicates
    once = tg.sliding_windows(n, 2048, stride, "once")
    assert duplicates_by_intervals(once) == 0
    assert int((once.length - once.score_from).sum()) == n


def test_window_batches_deal_round_robin():
    """Interleave 8, batch 32: list v holds windows v, v+8, ...; consecutive batches; each window
    once."""
    n = 1000
    batches = tg.window_batches(n, 32, 8)
    expected = []
    for v in range(8):
        own = list(range(v, n, 8))
        expected += [own[i : i + 32] for i in range(0, len(own), 32)]
    assert [b.tolist() for b in batches] == expected
    assert len(batches) == 8 * 4  # 125 windows per list: 32, 32, 32, 29
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    assert [len(b) for b in batches[:4]] == [32, 32, 32, 29]
    assert [b.tolist() for b in tg.window_batches(5, 32, 8)] == [[0], [1], [2], [3], [4]]
    assert [b.tolist() for b in tg.window_batches(10, 4, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# -----------------------------
# references written from the spec
# -----------------------------


def window_rows(tokens, plan, idx, L):
    """Inputs, targets (right-padded with 0) and the scored/context masks of some windows."""
    B = len(idx)
    x = torch.zeros(B, L, dtype=torch.long)
    y = torch.zeros(B, L, dtype=torch.long)
    scored = torch.zeros(B, L)
    context = torch.zeros(B, L)
    for b, i in enumerate(idx):
        s, ln, sf = int(plan.start[i]), int(plan.length[i]), int(plan.score_from[i])
        x[b, :ln], y[b, :ln] = tokens[s : s + ln], tokens[s + 1 : s + ln + 1]
        scored[b, sf:ln] = 1
        context[b, :sf] = 1
    return x, y, scored, context


def collect(out, total, plan, idx, nll):
    """Store the scored positions' nll by target index, and in scoring order."""
    for b, i in enumerate(idx):
        s, ln, sf = int(plan.start[i]), int(plan.length[i]), int(plan.score_from[i])
        for p in range(sf, ln):
            out[s + p] = float(nll[b, p])
            total.append(float(nll[b, p]))


def reference_sliding(model, tokens, plan, cfg):
    """Full-window logits over all L positions, one window at a time."""
    n, L, V = tokens.numel() - 1, cfg.eval.seq_len, cfg.model.vocab_size
    out, total = torch.full((n,), float("nan"), dtype=torch.float64), []
    for i in range(len(plan)):
        x, y, _, _ = window_rows(tokens, plan, [i], L)
        with torch.no_grad():
            nll = F.cross_entropy(
                model.logits(model.hidden(x)).reshape(-1, V), y.reshape(-1), reduction="none"
            ).reshape(1, L)
        collect(out, total, plan, [i], nll)
    return out, total


def reference_slot(model, tokens, plan, cfg, mode):
    """The original's SLOT, straightforwardly: logits for every position of every window,
    the loss masked to the fit positions, AdamW on a per-window delta and bias."""
    n, L, V = tokens.numel() - 1, cfg.eval.seq_len, cfg.model.vocab_size
    slot = cfg.eval.slot
    weight = model.head_weight().detach().float()
    cap = cfg.model.logit_softcap
    lists = [list(range(v, len(plan), slot.interleave)) for v in range(slot.interleave)]
    batches = [
        lst[i : i + slot.batch_seqs] for lst in lists for i in range(0, len(lst), slot.batch_seqs)
    ]
    out, total = torch.full((n,), float("nan"), dtype=torch.float64), []
    for idx in batches:
        x, y, scored, context = window_rows(tokens, plan, idx, L)
        with torch.no_grad():
            hid = model.hidden(x).float()
        delta = torch.zeros(len(idx), 1, hid.size(-1), requires_grad=True)
        bias = torch.zeros(len(idx), 1, V, requires_grad=True)

        def nll_all():
            logits = cap * torch.tanh(((hid + delta) @ weight.T + bias) / cap)
            return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none").reshape(
                len(idx), L
            )

        mask = scored if mode == "scored" else context
        if mask.sum() > 0:
            opt = torch.optim.AdamW(
                [delta, bias], lr=slot.lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8
            )
            for i in range(slot.steps):
                lr = slot.lr_min + 0.5 * (slot.lr - slot.lr_min) * (
                    1 + math.cos(math.pi * i / slot.steps)
                )
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad()
                loss = (nll_all() * mask).sum() / mask.sum()
                loss.backward()
                opt.step()
        with torch.no_grad():
            collect(out, total, plan, idx, nll_all())
    return out, total


def relative_gap(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("n_targets", [N_TARGETS, 20, 32])
def test_sliding_equals_full_window_logits(setup, n_targets):
    """Sliding per-target nll equals a whole-window computation (padded short streams too)."""
    cfg, model, tokens, luts = setup
    tokens = tokens[: n_targets + 1]
    plan = tg.sliding_windows(n_targets, 32, 8, "once")
    ref, total = reference_sliding(model, tokens, plan, cfg)
    sums = run_windows(model, tokens, cfg, luts)["sliding"]
    got = sums.per_target(tg.Runtime())
    assert not torch.isnan(ref).any() and len(total) == n_targets
    assert relative_gap(got, ref) <= 1e-6
    assert int(sums.tokens) == n_targets
    assert math.isclose(float(sums.loss), math.fsum(total), rel_tol=1e-9)


@pytest.mark.parametrize("mode", ["scored", "context"])
def test_slot_equals_full_window_reference(setup, mode):
    """Fast SLOT (scored rows only) gives the per-target nll of the full-window original."""
    cfg, model, tokens, luts = setup
    plan = tg.sliding_windows(N_TARGETS, 32, 8, "once")
    ref, total = reference_slot(model, tokens, plan, cfg, mode)
    sums = run_windows(model, tokens, cfg, luts, sliding=False, modes=(mode,))[mode]
    got = sums.per_target(tg.Runtime())
    assert not torch.isnan(ref).any()
    assert relative_gap(got, ref) <= 1e-5
    assert math.isclose(float(sums.loss), math.fsum(total), rel_tol=1e-6)
    plain = run_windows(model, tokens, cfg, luts)["sliding"].per_target(tg.Runtime())
    if mode == "scored":  # SLOT moved every window's scores
        assert float((got - plain).abs().min()) > 0
    else:  # the first window has no context: scored without adaptation
        assert torch.equal(got[:32], plain[:32]) and float((got[32:] - plain[32:]).abs().min()) > 0


@pytest.mark.parametrize("mode", ["scored", "context"])
def test_slot_with_original_tail_matches_reference_totals(setup, mode):
    """Short padded windows and duplicate scores (EVAL_TAIL=original) agree in total."""
    cfg, model, tokens, luts = setup
    plan = tg.sliding_windows(N_TARGETS, 32, 8, "original")
    _, total = reference_slot(model, tokens, plan, cfg, mode)
    original = config(EVAL_TAIL="original")
    sums = run_windows(model, tokens, original, luts, sliding=False, modes=(mode,))[mode]
    assert int(sums.tokens) == len(total) > N_TARGETS
    assert math.isclose(float(sums.loss), math.fsum(total), rel_tol=1e-6)


# -----------------------------
# splitting the work over ranks
# -----------------------------


def test_two_ranks_equal_one(setup):
    """Batches split over two simulated ranks (no process group) give the one-process numbers."""
    cfg, model, tokens, luts = setup
    modes = ("scored", "context")
    one = run_windows(model, tokens, cfg, luts, modes=modes)
    parts = [
        run_windows(model, tokens, cfg, luts, modes=modes, rt=tg.Runtime(rank=r, world_size=2))
        for r in (0, 1)
    ]
    for key in ("sliding", *modes):
        a, b, whole = parts[0][key], parts[1][key], one[key]
        assert 0 < int(a.tokens) < N_TARGETS and int(a.tokens) + int(b.tokens) == N_TARGETS
        assert not torch.any((a.nll != 0) & (b.nll != 0))  # each target scored by one rank
        assert torch.allclose(a.nll + b.nll, whole.nll, rtol=1e-12, atol=0)
        assert float(a.bytes + b.bytes) == float(whole.bytes)
        assert math.isclose(float(a.loss + b.loss), float(whole.loss), rel_tol=1e-12)
    std_one = standard(scoring(model, tokens, luts), cfg)
    std = [
        standard(scoring(model, tokens, luts, tg.Runtime(rank=r, world_size=2)), cfg)
        for r in (0, 1)
    ]
    assert (
        int(std[0].tokens) == 4 * 32 and int(std[1].tokens) == 5 * 32
    )  # 9 sequences: [0, 4) and [4, 9)
    assert torch.allclose(std[0].nll + std[1].nll, std_one.nll, rtol=1e-12, atol=0)


def test_runtime_reduce_needs_no_process_group_for_one_rank():
    """A single-process Runtime reduces locally; the simulated ranks above never call reduce."""
    t = tg.Runtime().reduce([1.5, 2.5])
    assert t.dtype == torch.float64 and t.tolist() == [1.5, 2.5]
    assert tg.Runtime(rank=1, world_size=2).distributed and not tg.Runtime().distributed


def test_shared_pass_equals_separate_passes(setup):
    """One hidden pass serving sliding and both SLOT modes gives each one's separate numbers."""
    cfg, model, tokens, luts = setup
    shared = window_pass(scoring(model, tokens, luts), cfg, modes=("scored", "context"))
    assert set(shared) == {"sliding", "scored", "context"} and all(
        sc.seconds > 0 for sc in shared.values()
    )
    assert [sc.name for sc in shared.values()] == ["sliding", "final_slot", "final_slot_context"]
    for name in ("scored", "context"):
        alone = run_windows(model, tokens, cfg, luts, sliding=False, modes=(name,))[name]
        assert torch.equal(shared[name].sums.nll, alone.nll)
    alone = run_windows(model, tokens, cfg, luts)["sliding"]
    assert torch.allclose(shared["sliding"].sums.nll, alone.nll, rtol=1e-6, atol=0)


# -----------------------------
# causality: the flip test
# -----------------------------

P = 8 * 10 + 31  # the last target of window 10 (start 80, scores 104..111)


def flipped(tokens, p, vocab):
    """The stream with target p changed."""
    out = tokens.clone()
    out[p + 1] = (out[p + 1] + 1) % vocab  # target p is token p + 1
    return out


def test_flip_standard(setup):
    """Non-overlapping windows are causal: no target before p moves."""
    cfg, model, tokens, luts = setup
    runs = [
        standard(scoring(model, t, luts), cfg).nll
        for t in (tokens, flipped(tokens, P, cfg.model.vocab_size))
    ]
    assert torch.equal(runs[0][:P], runs[1][:P])
    assert runs[0][P] != runs[1][P]


@pytest.mark.parametrize("part", ["sliding", "context"])
def test_flip_causal_modes(setup, part):
    """Sliding and context-SLOT: no target before p moves; later ones do."""
    cfg, model, tokens, luts = setup
    modes = () if part == "sliding" else ("context",)
    runs = [
        run_windows(model, t, cfg, luts, sliding=part == "sliding", modes=modes)[part].nll
        for t in (tokens, flipped(tokens, P, cfg.model.vocab_size))
    ]
    assert float((runs[0][:P] - runs[1][:P]).abs().max()) <= 1e-6
    assert float((runs[0][P:] - runs[1][P:]).abs().max()) > 1e-4


def test_flip_detects_scored_slot_as_non_causal(setup):
    """Scored SLOT fits to the targets it scores: earlier targets of p's window move."""
    cfg, model, tokens, luts = setup
    runs = [
        run_windows(model, t, cfg, luts, sliding=False, modes=("scored",))["scored"].nll
        for t in (tokens, flipped(tokens, P, cfg.model.vocab_size))
    ]
    gap = (runs[0][:P] - runs[1][:P]).abs()
    assert float(gap[104:P].max()) > 1e-4  # the same window's scored span, before p
    assert float(gap[:104].max()) <= 1e-6


# -----------------------------
# bits per byte
# -----------------------------


def own_bpb(nll, tokens, luts):
    base_bytes, leading, boundary = luts
    prev, tgt = tokens[:-1], tokens[1:]
    nbytes = base_bytes[tgt].double() + (leading[tgt] & ~boundary[prev]).double()
    return (
        float(nll.sum()) / nll.numel(),
        (float(nll.sum()) / math.log(2)) / float(nbytes.sum()),
        float(nbytes.sum()),
    )


def test_bpb_from_per_target_nll(setup):
    """val_bpb = (sum nll / ln 2) / sum bytes, with the previous token's boundary rule."""
    cfg, model, tokens, luts = setup
    base_bytes, leading, boundary = luts
    prev, tgt = tokens[:-1], tokens[1:]
    assert bool((leading[tgt] & boundary[prev]).any())  # the boundary rule matters on this stream
    for sums, rel in (
        (run_windows(model, tokens, cfg, luts)["sliding"], 1e-12),
        (
            run_windows(model, tokens, cfg, luts, sliding=False, modes=("context",))["context"],
            1e-12,
        ),
        (standard(scoring(model, tokens, luts), cfg), 1e-6),
    ):
        n = int(sums.tokens)
        nll = sums.nll[:n]  # eval_standard scores whole sequences: the first 9 * 32 targets
        loss, bpb, nbytes = own_bpb(nll, tokens[: n + 1], luts)
        val_loss, val_bpb = sums.result(tg.Runtime())
        assert float(sums.bytes) == nbytes
        assert math.isclose(val_loss, loss, rel_tol=rel) and math.isclose(val_bpb, bpb, rel_tol=rel)


# -----------------------------
# fixed shapes: one compiled graph per evaluation, whatever the data and the world size
# -----------------------------


def recording(fn, shapes):
    def wrapped(x, *args, **kwargs):
        shapes.append(tuple(x.shape))
        return fn(x, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("n_targets", [N_TARGETS, 150])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_one_input_shape_per_evaluation(setup, n_targets, world):
    """Standard batches (short ones padded with rows that score nothing) have one shape on every
    rank,
    window batches always SLOT_BATCH_SEQS rows; the per-target numbers are those of one process."""
    cfg, model, tokens, luts = setup
    tokens = tokens[: n_targets + 1]
    std_shapes, win_shapes, std, win = [], [], [], []
    for r in range(world):
        rt = tg.Runtime(rank=r, world_size=world)
        std.append(
            standard(scoring(model, tokens, luts, rt, recording(model.hidden, std_shapes)), cfg)
        )
        s = scoring(model, tokens, luts, rt, recording(model.hidden, win_shapes))
        scorers = window_pass(s, cfg, modes=("context",))
        win.append({k: sc.sums for k, sc in scorers.items()})
    n_seqs = n_targets // 32
    assert len(set(std_shapes)) == 1 and std_shapes[0][1] == 32
    assert std_shapes[0][0] == min(
        3, -(-n_seqs // world)
    )  # VAL_BATCH_SIZE gives 3 rows, unless no rank has 3
    assert sum(int(s.tokens) for s in std) == n_seqs * 32
    assert set(win_shapes) == {(4, 32)}
    one_std = standard(scoring(model, tokens, luts), cfg)
    one_win = run_windows(model, tokens, cfg, luts, modes=("context",))
    assert torch.allclose(sum(s.nll for s in std), one_std.nll, rtol=1e-6, atol=0)
    for part in ("sliding", "context"):
        assert torch.equal(sum(w[part].nll for w in win), one_win[part].nll)


@pytest.mark.parametrize("n_targets", [N_TARGETS, 150, 77])
def test_slot_fit_shapes_are_bounded(setup, n_targets, monkeypatch):
    """Each SLOT fit list is padded to one of two sizes per mode (a typical batch's, or the largest
    batch's), its weights summing to one over the real positions and zero on the padding."""
    cfg, model, tokens, luts = setup
    seen = {}
    loss = tg.slot_loss

    def spy(*args):  # (delta, bias, base, rows, y, w, weight, softcap)
        base, w = args[2], args[5]
        seen.setdefault(tuple(base.shape), []).append(w)
        return loss(*args)

    monkeypatch.setattr(tg, "slot_loss", spy)
    for mode in ("scored", "context"):
        seen.clear()
        run_windows(model, tokens[: n_targets + 1], cfg, luts, sliding=False, modes=(mode,))
        assert 1 <= len(seen) <= 2
        for ws in seen.values():
            for w in ws:
                n = int((w > 0).sum())
                assert torch.all(w[n:] == 0) and math.isclose(
                    float(w.double().sum()), 1.0, rel_tol=1e-6
                )


def test_padded_slot_fit_equals_the_unpadded_one(setup):
    """Padding the fit list with weight-0 entries leaves SLOT's scores unchanged."""
    cfg, model, tokens, luts = setup
    plan = tg.sliding_windows(N_TARGETS, 32, 8, "once")
    xy, (scored, context), _ = tg.window_batch(tokens.numpy(), plan, np.array([0, 5, 9]), 4, 32)
    x, y = torch.from_numpy(xy)
    with torch.no_grad():
        hid = model.hidden(x).float()
    s = tg.Scoring(model, model.hidden, tokens, luts, tg.Runtime())
    batches = tg.window_batches(len(plan), cfg.eval.slot.batch_seqs, cfg.eval.slot.interleave)
    for mode, fit in (
        ("scored", scored),
        ("context", context),
    ):  # the scored mode fits what it scores
        scorer = tg.SlotScorer(mode, cfg.eval.slot, s, plan, batches, 4)
        plain = scorer.fit_and_score(hid, y, fit, scored, int(fit.sum()))
        padded = scorer.fit_and_score(hid, y, fit, scored, int(fit.sum()) + 37)
        assert plain.numel() == 32 + 2 * 8 and torch.equal(plain, padded)


# -----------------------------
# issue 29: logits rounded once, batches timed without a sync each
# -----------------------------


def test_logits_are_rounded_once_as_the_compiled_graph_rounds_them(setup):
    """In bf16 the soft cap runs in float32 on the bf16 product and is rounded once (what the
    original's compiled graph stores), not after each of its three steps as eager bf16 would;
    in float32 (the CPU mode) the figures are the plain formula's, bit for bit."""
    cfg, model, _, _ = setup
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, cfg.model.model_dim, generator=g)
    weight = model.tok_emb.weight.detach()
    cap = cfg.model.logit_softcap
    z32 = F.linear(x, weight)
    assert torch.equal(model.logits(x), cap * torch.tanh(z32 / cap))

    bf16 = tg.build_model(cfg.model, CPU, seed=0).bfloat16()
    with torch.no_grad():
        bf16.tok_emb.weight.copy_(weight.bfloat16())
        z = F.linear(x.bfloat16(), weight.bfloat16())
        want = (cap * torch.tanh(z.float() / cap)).bfloat16()
        three = cap * torch.tanh(z / cap)  # each step rounded to bf16
        got = bf16.logits(x.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert (three != want).float().mean() > 0.01  # measured: 4.6% of these logits


class CountingRuntime(tg.Runtime):
    """The CPU runtime, counting host syncs; its marks are fake CUDA events on the host clock."""
    syncs = 0

    def sync(self):
        CountingRuntime.syncs += 1

    def mark(self):
        return FakeEvent(tg.time.perf_counter())


class FakeEvent:
    def __init__(self, t):
        self.t = t

    def elapsed_time(self, end):  # milliseconds, as torch.cuda.Event's
        return 1000 * (end.t - self.t)


def test_batches_are_timed_by_events_with_one_sync_per_pass(setup, monkeypatch):
    """A window pass with the sliding and two SLOT scorers marks the device's timeline around
    each batch's hidden states and each scorer (events: no host sync in the loop) and syncs once
    at the end; every scorer gets one time per batch, the hidden states counted in the sliding
    scorer's, and the times add up to the pass."""
    cfg, model, tokens, luts = setup
    monkeypatch.setattr(tg.torch.cuda, "Event", FakeEvent)
    s = scoring(model, tokens, luts, CountingRuntime())
    plan = tg.sliding_windows(N_TARGETS, 32, 8, "once")
    batches = tg.window_batches(len(plan), 4, 3)
    scorers = [tg.SlidingScorer("sliding", tg.Sums(CPU))]
    scorers += [tg.SlotScorer(m, cfg.eval.slot, s, plan, batches, 4) for m in ("scored", "context")]
    CountingRuntime.syncs = 0
    t0 = tg.time.perf_counter()
    tg.score_windows(s, plan, batches, 4, 32, scorers)
    elapsed = tg.time.perf_counter() - t0
    assert CountingRuntime.syncs == 1
    assert all(len(sc.times) == len(batches) for sc in scorers)
    assert all(t > 0 for sc in scorers for t in sc.times)
    assert 0.9 * elapsed < sum(sc.seconds for sc in scorers) <= elapsed
