"""Tests of tools/submission.py: log parsing, refusals, statistics, outputs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tools.submission import RunRecord, acceptance_p_value, build_submission, main, parse_log

REPO = Path(__file__).resolve().parents[1]
REFERENCE_LOG = REPO.parent / "shared" / "reference" / "seed42_run_log.txt"
SEPARATOR = "=" * 100

# A stand-in for the script source that heads every log; its column-0 lines
# look like log lines and must not be read as such.
FAKE_SOURCE = '''"""train_gpt.py stand-in
seed:7
step:99999/99999 val_loss:0.1 val_bpb:0.1 train_time:1ms step_avg:1ms
final_slot_exact val_loss:0.00000001 val_bpb:0.00000001
Total submission size int6+lzma: 1 bytes
"""
print("hello")
'''


def make_log(
    seed=1337,
    *,
    steps=6576,
    train_ms=600031,
    artifact=15_751_595,
    code=61_983,
    model_params=26_862_694,
    roundtrip=(1.93188450, 1.14417082),
    sliding=(1.89204246, 1.12057665),
    s64=(1.89198560, 1.12054341),
    slot=(1.24104846, 0.73502047),
    slot_context=None,
    legal_ttt=None,
    gpus=0,
):
    """A complete log in train_gpt.py's format; a CPU run (no nvidia-smi block) unless gpus > 0."""
    lines = [
        FAKE_SOURCE,
        SEPARATOR,
        "Running Python 3.11.7",
        "Running PyTorch 2.9.1+cpu",
        *(f"|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i:02X}:00.0 Off |      0 |" for i in range(gpus)),
        SEPARATOR,
        f"model_params:{model_params}",
        "world_size:1 grad_accum_steps:8",
        "attention_mode:gqa num_heads:8 num_kv_heads:4",
        "tie_embeddings:True embed_lr:0.035 head_lr:0.0 matrix_lr:0.025 scalar_lr:0.025",
        "train_batch_tokens:786432 train_seq_len:2048 iterations:20000 warmup_steps:20 "
        "max_wallclock_seconds:600.000",
        f"seed:{seed}",
        "warmup_step:1/20",
        "step:0/20000 val_loss:6.9310 val_bpb:4.1049 train_time:0ms step_avg:0.01ms",
        f"step:{steps - 1}/20000 train_loss:2.0516 train_time:{train_ms - 90}ms step_avg:91.24ms",
        f"step:{steps}/20000 val_loss:1.9209 val_bpb:1.1377 train_time:{train_ms}ms step_avg:91ms",
        f"stopping_early: wallclock_cap train_time:{train_ms}ms step:{steps}/20000",
        f"Code size: {code} bytes",
        f"Serialized model int6+brotli: {artifact - code} bytes",
        f"Total submission size int6+brotli: {artifact} bytes",
        f"final_int6_roundtrip val_loss:{roundtrip[0]:.4f} val_bpb:{roundtrip[1]:.4f} "
        "eval_time:7486ms",
        f"final_int6_roundtrip_exact val_loss:{roundtrip[0]:.8f} val_bpb:{roundtrip[1]:.8f}",
    ]
    for tag, figures, stride in (
        ("final_int6_sliding_window", sliding, 96),
        ("final_int6_sliding_window_s64", s64, 64),
    ):
        if figures is None:
            continue
        loss, bpb = figures
        lines += [
            f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} stride:{stride} eval_time:54469ms",
            f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
            # The original repeats the sliding result on a round-trip line.
            f"final_int6_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
        ]
    for tag, figures, mode in (
        ("final_slot", slot, "scored"),
        ("final_slot_context", slot_context, "context"),
    ):
        if figures:
            loss, bpb = figures
            lines += [
                f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} steps:48 lr:0.012 "
                f"eval_time:408741ms mode:{mode}",
                f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} mode:{mode}",
            ]
    if legal_ttt:
        loss, bpb = legal_ttt
        lines += [
            # the accepted record's progress lines, which are not results
            "ttt_sliding:start chunks=8 chunk_tokens=32768 total_windows=646018 stride=96 ttt_lr=0.002",
            "  ttt_chunk [1/8] bpb=1.348943",
            f"ttt_sliding:done val_loss={loss - 0.5:.6f} val_bpb={bpb - 0.5:.6f}",
            f"legal_ttt val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:291234ms",
            f"legal_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
        ]
    return "\n".join(lines) + "\n"


def write_logs(tmp_path, texts):
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"run{i}.txt"
        path.write_text(text)
        paths.append(str(path))
    return paths


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


SLOT_LOSSES = [1.2410, 1.2502, 1.2387]
SLOT_BPBS = [0.7350, 0.7405, 0.7336]
SEEDS = [42, 1337, 2024]
STEPS = [6576, 6581, 6570]


@pytest.fixture
def three_logs(tmp_path):
    texts = [
        make_log(
            seed,
            steps=steps,
            train_ms=600_000 + i,
            artifact=15_751_595 + 1000 * i,
            slot=(loss, bpb),
        )
        for i, (seed, steps, loss, bpb) in enumerate(
            zip(SEEDS, STEPS, SLOT_LOSSES, SLOT_BPBS, strict=True)
        )
    ]
    return write_logs(tmp_path, texts)


@pytest.mark.skipif(not REFERENCE_LOG.exists(), reason="../shared reference log absent")
@pytest.mark.parametrize("with_source", [False, True])
def test_reference_log_parses_to_its_figures(tmp_path, with_source):
    text = REFERENCE_LOG.read_text()
    if with_source:  # the full format: script source and a row of '=' first
        text = FAKE_SOURCE + SEPARATOR + "\n" + text
    path = tmp_path / "seed42.txt"
    path.write_text(text)
    record = parse_log(path)
    assert isinstance(record, RunRecord)
    assert (record.seed, record.steps, record.iterations) == (42, 6576, 20000)
    assert record.artifact_bytes == 15_751_595
    assert record.model_bytes == 15_689_612
    assert record.code_bytes == 61_983
    assert record.compressor == "lzma"
    assert record.num_gpus == 8 and "H100" in record.gpu_type
    assert record.training_time_seconds == pytest.approx(600.031)
    assert record.stop_reason == "wallclock_cap"
    assert record.config["model_params"] == "26862694"
    expected = {
        "slot": (1.24104846, 0.73502047),
        "sliding": (1.89204246, 1.12057665),
        "sliding_s64": (1.89198560, 1.12054341),
        "roundtrip": (1.93188450, 1.14417082),
    }
    assert set(record.evals) == set(expected)
    for score, (loss, bpb) in expected.items():
        assert (record.evals[score].val_loss, record.evals[score].val_bpb) == (loss, bpb)
    assert record.evals["sliding"].params["stride"] == "96"
    assert record.evals["slot"].eval_time_ms == 408741


def test_cpu_log_without_nvidia_smi(tmp_path):
    (path,) = write_logs(tmp_path, [make_log(8)])
    record = parse_log(path)
    assert (record.num_gpus, record.gpu_type) == (0, "cpu")
    # Not the look-alike lines of the source header.
    assert (record.seed, record.steps, record.artifact_bytes) == (8, 6576, 15_751_595)
    assert record.evals["slot"].val_loss == 1.24104846
    assert record.evals["slot"].params["mode"] == "scored"


def test_three_seeds_build_submission(tmp_path, three_logs, capsys):
    """--score slot: the non-causal SLOT as the score, labelled so, with the best causal figure beside it."""
    out = tmp_path / "out"
    code, printed, err = run_cli(
        [*three_logs, "--out", str(out), "--name", "SLOT-48", "--date", "2026-04-04", "--score", "slot"], capsys
    )
    assert code == 0
    sub = json.loads((out / "submission.json").read_text())
    losses, bpbs = np.array(SLOT_LOSSES), np.array(SLOT_BPBS)
    assert sub["val_loss"] == pytest.approx(losses.mean(), abs=1e-12)
    assert sub["val_bpb"] == pytest.approx(bpbs.mean(), abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-12)
    assert sub["artifact_bytes"] == 15_753_595 and sub["artifact_under_cap"] is True
    assert sub["training_time_seconds"] == pytest.approx(600.002)
    assert (sub["num_gpus"], sub["gpu_type"], sub["code_bytes"]) == (0, "cpu", 61_983)
    assert (sub["name"], sub["date"], sub["track"]) == ("SLOT-48", "2026-04-04", "10min_16mb")
    assert (sub["score"], sub["score_causal"], sub["score_line"]) == ("slot", False, "final_slot_exact")
    assert sub["best_causal"]["score"] == "sliding_s64" and sub["best_causal"]["val_bpb"] == 1.12054341
    assert "not_causal" not in sub
    assert sub["warnings"][0].startswith("score 'slot' is not causal")
    assert list(sub["seed_results"]) == [str(s) for s in SEEDS]
    assert sub["seed_results"]["1337"]["val_loss"] == SLOT_LOSSES[1]
    assert "p_value" not in sub
    assert "warning: score 'slot' is not causal" in err
    assert "score: SLOT scored (NOT causal)" in printed
    assert "beside it, the best causal: s64, final_int6_sliding_window_s64_exact" in printed

    table = (out / "results_table.md").read_text()
    rows = table.splitlines()
    assert len(rows) == 2 + 3 + 1  # header, rule, seeds, mean
    assert rows[0].split(" | ")[-2:] == ["s64 bpb", "SLOT scored bpb (NOT causal) (score) |"]
    assert rows[2].split(" | ")[:4] == ["| 42", "6576", "600.000", "15751595"]
    assert rows[2].endswith("| 0.73500000 |")  # no SLOT-context line in these logs: no such column
    assert rows[-1].startswith("| mean | ")
    assert f"{bpbs.mean():.8f}" in rows[-1]
    assert table in printed


def test_default_score_is_the_best_causal_evaluation(tmp_path, capsys):
    """Without --score: the causal evaluation with the lowest mean val_bpb that every log has; the
    non-causal SLOT stands beside it, labelled, in the JSON, the table and the summary."""
    figures = {  # seed: (SLOT context, legal TTT); legal TTT wins on the mean, not on every seed
        1: ((1.880, 1.110), (1.870, 1.105)),
        2: ((1.882, 1.104), (1.871, 1.107)),
    }
    paths = write_logs(tmp_path, [make_log(seed, slot_context=c, legal_ttt=t) for seed, (c, t) in figures.items()])
    out = tmp_path / "out"
    code, printed, _ = run_cli([*paths, "--out", str(out)], capsys)
    assert code == 0
    sub = json.loads((out / "submission.json").read_text())
    assert (sub["score"], sub["score_causal"], sub["score_line"]) == ("legal_ttt", True, "legal_ttt_exact")
    assert sub["val_bpb"] == pytest.approx(1.106, abs=1e-12) and sub["val_loss"] == pytest.approx(1.8705)
    assert sub["seed_results"]["2"]["val_bpb"] == 1.107
    slot = sub["not_causal"]["slot"]
    assert (slot["line"], slot["val_bpb"], slot["val_loss"]) == ("final_slot_exact", 0.73502047, 1.24104846)
    assert "fits delta and bias to the very targets it then scores" in slot["why"]
    assert "score_causal" in sub and "best_causal" not in sub

    header = (out / "results_table.md").read_text().splitlines()[0].strip("| ").split(" | ")
    assert header[4:] == ["roundtrip bpb", "sliding bpb", "s64 bpb", "SLOT context bpb", "legal TTT bpb (score)",
                          "SLOT scored bpb (NOT causal)"]
    assert "score: legal TTT (causal), legal_ttt_exact over 2 seed(s)" in printed
    assert "beside it, NOT causal: SLOT scored, final_slot_exact: val_loss 1.24104846" in printed

    # Without legal TTT the SLOT context wins; without it too, the stride-64 sliding window.
    assert build_submission([parse_log(p) for p in write_logs(
        tmp_path, [make_log(1, slot_context=(1.88, 1.11))])])["score"] == "slot_context"
    assert build_submission([parse_log(p) for p in write_logs(tmp_path, [make_log(1)])])["score"] == "sliding_s64"


def test_legal_ttt_lines_and_score(tmp_path):
    """legal_ttt lines are read by their names; the record's progress lines are not results."""
    (path,) = write_logs(tmp_path, [make_log(1, legal_ttt=(1.89012345, 1.11943210))])
    record = parse_log(path)
    ttt = record.evals["legal_ttt"]
    assert (ttt.val_loss, ttt.val_bpb, ttt.line, ttt.eval_time_ms) == (1.89012345, 1.11943210, "legal_ttt_exact",
                                                                      291234)
    sub = build_submission([record], "legal_ttt", track="x")
    assert (sub["score_causal"], sub["val_bpb"], sub["warnings"]) == (True, 1.1194321, [])


@pytest.mark.parametrize(
    "log, track, expected",
    [
        (dict(), "10min_16mb", []),
        # a CPU run of 3,516 s: both its time and its hardware break the track
        (dict(gpus=0, train_ms=3_516_240), "10min_16mb", ["trained on cpu", "training took 3,516.2 s, over"]),
        (dict(train_ms=600_200), "10min_16mb", ["training took 600.2 s, over the 10min_16mb track's 600 s"]),
        (dict(artifact=16_000_000), "10min_16mb", ["artifact 16,000,000 bytes, not under"]),
        (dict(gpus=0, train_ms=3_516_240, artifact=16_000_000), "cpu_demo", []),  # a track without limits
    ],
)
def test_track_limit_warnings(tmp_path, capsys, log, track, expected):
    """Warnings on stderr and in submission.json. An 8xH100 run stopped by the wall-clock cap like the
    record (600.031 s: its last step ends 31 ms past the cap, less than one step) gets none."""
    log = {"gpus": 8, **log}
    (path,) = write_logs(tmp_path, [make_log(1, **log)])
    code, _, err = run_cli([path, "--out", str(tmp_path / "out"), "--track", track], capsys)
    assert code == 0
    warnings = json.loads((tmp_path / "out" / "submission.json").read_text())["warnings"]
    assert len(warnings) == len(expected)
    for warning, part in zip(warnings, expected):
        assert warning.startswith(f"{path}: ") and part in warning
        assert f"warning: {warning}" in err
    if not expected:
        assert "warning" not in err


def test_steps_equal_the_logs_last_step(tmp_path, three_logs, capsys):
    out = tmp_path / "out"
    assert run_cli([*three_logs, "--out", str(out)], capsys)[0] == 0
    sub = json.loads((out / "submission.json").read_text())
    for path in three_logs:
        text = Path(path).read_text().split(SEPARATOR)[-1]
        last_step = int(re.findall(r"^step:(\d+)/", text, flags=re.M)[-1])
        seed = re.search(r"^seed:(\d+)$", text, flags=re.M).group(1)
        assert sub["seed_results"][seed]["steps"] == last_step


@pytest.mark.parametrize(
    "cut_before, reason",
    [
        ("final_", "no final evaluation line"),
        ("Code size", "artifact size"),
        ("step:", "no 'step:N/M' line"),
    ],
)
def test_truncated_log_refused(tmp_path, capsys, cut_before, reason):
    text = make_log(1)
    body_start = text.index(SEPARATOR + "\nmodel_params")
    truncated = text[: text.index(cut_before, body_start)]
    good, cut = write_logs(tmp_path, [make_log(2), truncated])
    code, _, err = run_cli([good, cut, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith(f"error: {cut}: ") and reason in err
    assert not (tmp_path / "out").exists()


def test_missing_chosen_score_refused(tmp_path, capsys):
    paths = write_logs(tmp_path, [make_log(1), make_log(2, slot_context=(1.8, 1.1))])
    code, _, err = run_cli(
        [*paths, "--out", str(tmp_path / "out"), "--score", "slot_context"], capsys
    )
    assert code == 2
    assert f"error: {paths[0]}: no final_slot_context_exact line" in err


def test_mixed_configurations_refused(tmp_path, capsys):
    paths = write_logs(tmp_path, [make_log(1), make_log(2, model_params=26_000_000)])
    code, _, err = run_cli([*paths, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert f"error: {paths[1]}: config differs" in err
    assert "model_params 26862694 vs 26000000" in err


def test_different_script_refused(tmp_path, capsys):
    paths = write_logs(tmp_path, [make_log(1), make_log(2, code=60_000)])
    code, _, err = run_cli([*paths, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "code_bytes 61983 vs 60000" in err


def test_duplicate_seeds_refused(tmp_path, capsys):
    paths = write_logs(tmp_path, [make_log(5), make_log(5, slot=(1.25, 0.74))])
    code, _, err = run_cli([*paths, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert f"error: {paths[1]}: seed 5 duplicates {paths[0]}" in err


def test_cli_exit_status_without_traceback(tmp_path):
    (cut,) = write_logs(tmp_path, [make_log(1).split("Code size")[0]])
    done = subprocess.run(
        [sys.executable, "-m", "tools.submission", cut, "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {cut}: ") and "Traceback" not in done.stderr


def test_p_value_against_baseline_mean(tmp_path, three_logs, capsys):
    out = tmp_path / "out"
    baseline, gain = 1.2600, 0.005
    code, printed, _ = run_cli(
        [*three_logs, "--out", str(out), "--score", "slot", "--baseline-mean", str(baseline)], capsys
    )
    assert code == 0
    sub = json.loads((out / "submission.json").read_text())
    d = baseline - np.array(SLOT_LOSSES) - gain
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    expected = stats.t.sf(t, d.size - 1)
    assert sub["p_value"] == pytest.approx(expected, rel=1e-9)
    assert (sub["baseline"], sub["min_gain"]) == (baseline, gain)
    assert "p-value" in printed


def test_p_value_welch_against_baseline_losses():
    new, base, gain = np.array([1.100, 1.110, 1.105]), np.array([1.130, 1.128, 1.133, 1.127]), 0.01
    vn, vb = new.var(ddof=1) / new.size, base.var(ddof=1) / base.size
    t = (base.mean() - new.mean() - gain) / math.sqrt(vn + vb)
    df = (vn + vb) ** 2 / (vn**2 / (new.size - 1) + vb**2 / (base.size - 1))
    p = acceptance_p_value(new.tolist(), baseline_losses=base.tolist(), min_gain=gain)
    assert p == pytest.approx(stats.t.sf(t, df), rel=1e-9)


def test_p_value_needs_two_runs(tmp_path, capsys):
    (path,) = write_logs(tmp_path, [make_log(1)])
    code, printed, _ = run_cli(
        [path, "--out", str(tmp_path / "out"), "--baseline-mean", "1.3"], capsys
    )
    assert code == 0
    assert json.loads((tmp_path / "out" / "submission.json").read_text())["p_value"] is None
    assert "needs at least 2 runs" in printed


def test_score_selection(tmp_path):
    with_slot, without_slot, both = (
        parse_log(p)
        for p in write_logs(
            tmp_path, [make_log(1), make_log(2, slot=None, s64=None), make_log(3, slot_context=(1.86, 1.10))]
        )
    )
    assert build_submission([with_slot], "slot")["score_line"] == "final_slot_exact"
    sliding = build_submission([without_slot])
    assert sliding["score_line"] == "final_int6_sliding_window_exact"
    assert sliding["val_bpb"] == 1.12057665
    assert "not_causal" not in sliding  # no SLOT line: nothing to show beside it
    context = build_submission([both], "slot_context")
    assert (context["score_line"], context["val_loss"]) == ("final_slot_context_exact", 1.86)
    # The round trip is the first round-trip line, not the repeats carrying sliding results.
    assert build_submission([both], "roundtrip")["val_bpb"] == 1.14417082
    assert build_submission([both], "sliding_s64")["val_bpb"] == 1.12054341


def test_no_causal_line_refused(tmp_path, capsys):
    """A log whose only evaluation is the non-causal SLOT has no default score."""
    text = "\n".join(line for line in make_log(1).splitlines()
                     if not line.startswith(("final_int6", "final_slot_context"))) + "\n"
    (path,) = write_logs(tmp_path, [text])
    code, _, err = run_cli([path, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err == f"error: {path}: no causal evaluation line present in every log " \
                                "(the non-causal SLOT needs --score slot)\n"
    assert run_cli([path, "--out", str(tmp_path / "out"), "--score", "slot"], capsys)[0] == 0


def test_artifact_over_cap_flagged(tmp_path, capsys):
    (path,) = write_logs(tmp_path, [make_log(1, artifact=16_000_000)])
    code, printed, _ = run_cli([path, "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert (
        json.loads((tmp_path / "out" / "submission.json").read_text())["artifact_under_cap"]
        is False
    )
    assert "OVER the 16,000,000-byte cap" in printed


def test_committed_cpu_demo_example_matches_its_log():
    """The committed example (a real demo run of this project) parses to the figures of the
    submission.json built from it: every figure there comes from the log, the score is the causal
    SLOT and the non-causal one stands beside it."""
    example = REPO / "examples" / "cpu_demo"
    record = parse_log(example / "demo.txt")
    built = json.loads((example / "submission.json").read_text())
    seed = built["seed_results"][str(record.seed)]
    assert (seed["steps"], seed["artifact_bytes"]) == (record.steps, record.artifact_bytes) == (120, 1104435)
    context, slot = record.evals["slot_context"], record.evals["slot"]
    assert (built["val_loss"], built["val_bpb"]) == (context.val_loss, context.val_bpb)
    assert (built["score_line"], built["score_causal"], built["gpu_type"]) == ("final_slot_context_exact", True, "cpu")
    assert built["not_causal"]["slot"]["val_bpb"] == slot.val_bpb
    assert (built["track"], built["warnings"]) == ("cpu_demo", [])
    assert context.val_bpb > slot.val_bpb  # causal SLOT gains less
