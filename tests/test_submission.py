"""Tests of tools/submission.py: log parsing, the three kinds of score, the record folder (its
script byte for byte, the challenge's validator checks), refusals that leave nothing on disk,
the comparison with a baseline."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from tools import _packed, runlog, submission
from tools.runlog import EVAL_TAGS
from tools.submission import RunRecord, acceptance_p_value, build_submission, main, parse_log

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
REFERENCE_LOGS = [REFERENCE / f"seed{seed}_run_log.txt" for seed in (42, 1337, 2024)]
DEMO_LOG = REPO / "examples" / "cpu_demo" / "train_seed1337.log"
SEPARATOR = "=" * 100
needs_reference = pytest.mark.skipif(not REFERENCE_LOGS[0].exists(),
                                     reason="../shared reference logs absent")
GPU_ROW = "|   {i}  NVIDIA H100 80GB HBM3          On  |   00000000:{i:02X}:00.0 Off |      0 |"

# A stand-in for the script source that heads every log; its column-0 lines
# look like log lines and must not be read as such.
FAKE_SOURCE = '''"""train_gpt.py stand-in
seed:7
step:99999/99999 val_loss:0.1 val_bpb:0.1 train_time:1ms step_avg:1ms
final_slot_exact val_loss:0.00000001 val_bpb:0.00000001
Total submission size int6+lzma: 1 bytes
interrupted during evaluation
"""
print("hello")
'''


# make_log's figures unless a test says otherwise: the original's seed-42 log, on a CPU (no
# nvidia-smi rows unless gpus > 0), the plain script (code None: Code size = the source's bytes).
LOG_DEFAULTS = dict(
    source=FAKE_SOURCE,
    steps=6576,
    train_ms=600031,
    artifact=15_751_595,
    code=None,
    model_params=26_862_694,
    roundtrip=(1.93188450, 1.14417082),
    sliding=(1.89204246, 1.12057665),
    s64=(1.89198560, 1.12054341),
    slot=(1.24104846, 0.73502047),
    slot_context=None,
    legal_ttt=None,
    gpus=0,
    current=False,  # with the lines train_gpt.py added since: param tables, eval_timing, score:
    settings=None,  # a dict: the settings: line (every setting as resolved, as JSON)
)
# train_gpt.SCORE_KINDS, as its score: lines write them.
KIND_WORDS = {"final_int6_roundtrip": "accepted", "final_int6_sliding_window": "accepted",
              "final_int6_sliding_window_s64": "accepted", "final_slot": "not_causal",
              "final_slot_context": "causal_not_accepted", "legal_ttt": "accepted"}


def _log_head(spec) -> list[str]:
    head = [spec.source, SEPARATOR] if spec.source is not None else []
    gpus = [GPU_ROW.format(i=i) for i in range(spec.gpus)]
    return [*head, "Running Python 3.11.7", "Running PyTorch 2.9.1+cpu", *gpus, SEPARATOR]


def _log_training(spec, seed: int) -> list[str]:
    steps, train_ms, code = spec.steps, spec.train_ms, spec.code
    tables = ["param_groups (tensors/params) embed:3/623616 matrix:66/25952256 scalar:57/286822",
              "param_formats (tensors/params) int6:66/25952256 int8:1/524288 fp16:59/386150"]
    return [
        f"model_params:{spec.model_params}",
        *(tables if spec.current else []),
        "world_size:1 grad_accum_steps:8",
        "attention_mode:gqa num_heads:8 num_kv_heads:4",
        "tie_embeddings:True embed_lr:0.035 head_lr:0.0 matrix_lr:0.025 scalar_lr:0.025",
        "train_batch_tokens:786432 train_seq_len:2048 iterations:20000 warmup_steps:20 "
        "max_wallclock_seconds:600.000",
        f"seed:{seed}",
        *([f"settings:{json.dumps(spec.settings)}"] if spec.settings is not None else []),
        "warmup_step:1/20",
        "step:0/20000 val_loss:6.9310 val_bpb:4.1049 train_time:0ms step_avg:0.01ms",
        f"step:{steps - 1}/20000 train_loss:2.0516 train_time:{train_ms - 90}ms step_avg:91.24ms",
        f"step:{steps}/20000 val_loss:1.9209 val_bpb:1.1377 train_time:{train_ms}ms step_avg:91ms",
        f"stopping_early: wallclock_cap train_time:{train_ms}ms step:{steps}/20000",
        f"Code size: {code} bytes",
        f"Serialized model int6+brotli: {spec.artifact - code} bytes",
        f"Total submission size int6+brotli: {spec.artifact} bytes",
    ]


def _timing(spec, tag: str) -> list[str]:
    line = f"eval_timing:{tag} batches:2524 first_batch:4.1000s steady_batch:0.0820s"
    return [line] if spec.current else []


def _log_scores(spec) -> list[str]:
    figures = {"final_int6_roundtrip": spec.roundtrip, "final_int6_sliding_window": spec.sliding,
               "final_int6_sliding_window_s64": spec.s64, "final_slot": spec.slot,
               "final_slot_context": spec.slot_context, "legal_ttt": spec.legal_ttt}
    return [f"score:{tag} val_bpb:{f[1]:.8f} kind:{KIND_WORDS[tag]}"
            for tag, f in figures.items() if f and spec.current]


def _log_evals(spec) -> list[str]:
    loss, bpb = spec.roundtrip
    lines = [f"final_int6_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:7486ms",
             f"final_int6_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}"]
    for tag, figures, stride in (("final_int6_sliding_window", spec.sliding, 96),
                                 ("final_int6_sliding_window_s64", spec.s64, 64)):
        if figures:
            loss, bpb = figures
            lines += [
                f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} stride:{stride} eval_time:54469ms",
                f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
                # The original repeats the sliding result on a round-trip line.
                f"final_int6_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
                *_timing(spec, tag),
            ]
    for tag, figures, mode in (("final_slot", spec.slot, "scored"),
                               ("final_slot_context", spec.slot_context, "context")):
        if figures:
            loss, bpb = figures
            lines += [f"{tag} val_loss:{loss:.4f} val_bpb:{bpb:.4f} steps:48 lr:0.012 "
                      f"eval_time:208741ms mode:{mode}",
                      f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f} mode:{mode}",
                      *_timing(spec, tag)]
    if spec.legal_ttt:
        loss, bpb = spec.legal_ttt
        lines += [
            "legal_ttt:start chunks:8 windows:646018 chunk_tokens:32768 stride:96 lr:0.002 "
            "epochs:3 freeze_blocks:0 trained_params:26862694",
            "legal_ttt:chunk 1/8 bpb:1.348943 elapsed:0.4s eta:40.5s",  # progress, not a result
            "legal_ttt:done optimizer_steps:21",
            f"legal_ttt val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:191234ms",
            f"legal_ttt_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
        ]
    return lines + _log_scores(spec)


def make_log(seed=1337, **changes) -> str:
    """A complete log in train_gpt.py's format: LOG_DEFAULTS with `changes`."""
    assert set(changes) <= set(LOG_DEFAULTS), set(changes) - set(LOG_DEFAULTS)
    spec = SimpleNamespace(**{**LOG_DEFAULTS, **changes})
    if spec.code is None:
        spec.code = len((spec.source or "").encode())
    return "\n".join([*_log_head(spec), *_log_training(spec, seed), *_log_evals(spec)]) + "\n"


def write_logs(tmp_path, texts):
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"run{i}.txt"
        path.write_text(text)
        paths.append(str(path))
    return paths


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_json(folder):
    return json.loads((folder / "submission.json").read_text())


def assert_nothing_written(out: Path):
    """No folder, no temporary sibling, not even the parent folder."""
    assert not out.exists()
    if out.parent.exists():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def logged_source(log_text: str) -> str:
    """The source at a log's head, cut independently of the tool."""
    return log_text.split("\n" + SEPARATOR + "\nRunning Python ")[0]


SLOT_LOSSES = [1.2410, 1.2502, 1.2387]
SLOT_BPBS = [0.7350, 0.7405, 0.7336]
SEEDS = [42, 1337, 2024]
STEPS = [6576, 6581, 6570]


@pytest.fixture
def three_logs(tmp_path):
    """Three seeds whose best accepted score is the stride-64 sliding window."""
    rows = enumerate(zip(SEEDS, STEPS, SLOT_LOSSES, SLOT_BPBS, strict=True))
    texts = [
        make_log(seed, steps=steps, train_ms=600_000 + i, artifact=15_751_595 + 1000 * i,
                 slot=(loss, bpb), sliding=None, s64=(1.892 + i / 1000, 1.1205 + i / 1000))
        for i, (seed, steps, loss, bpb) in rows
    ]
    return write_logs(tmp_path, texts)


@pytest.fixture
def demo_folder(tmp_path, capsys):
    """The folder built from the committed demo log (a real CPU run of this project)."""
    out = tmp_path / "runs" / "demo"
    argv = [DEMO_LOG, "--out", out, "--track", "cpu_demo", "--name", "CPU demo", "--date",
            "2026-05-01"]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    return out, printed, err


# ----------------------------------------------------------------------------- parsing


@needs_reference
@pytest.mark.parametrize("with_source", [False, True])
def test_reference_log_parses_to_its_figures(tmp_path, with_source):
    text = REFERENCE_LOGS[0].read_text()
    if with_source:  # the full format: script source and a row of '=' first
        text = FAKE_SOURCE + "\n" + SEPARATOR + "\n" + text  # as train_gpt.py writes it
    path = tmp_path / "seed42.txt"
    path.write_text(text)
    record = parse_log(path)
    assert isinstance(record, RunRecord)
    assert record.source == (FAKE_SOURCE if with_source else None)
    assert (record.seed, record.steps, record.iterations) == (42, 6576, 20000)
    sizes = (record.artifact_bytes, record.model_bytes, record.code_bytes)
    assert sizes == (15_751_595, 15_689_612, 61_983)
    assert record.compressor == "lzma"
    assert record.num_gpus == 8 and "H100" in record.gpu_type
    assert record.versions == {"python": "3.12.3", "pytorch": "2.9.1+cu128",
                               "driver": "580.126.09", "cuda": "13.0"}
    assert record.training_time_seconds == pytest.approx(600.031)
    assert record.eval_time_seconds == pytest.approx(7.486 + 54.469 + 77.664 + 408.741)
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
    # The record ran the defaults: no recorded setting differs but the seed.
    assert record.settings["SEED"] == "42" and submission.reproduction([record])["settings"] == {}


def test_cpu_log_without_nvidia_smi(tmp_path):
    (path,) = write_logs(tmp_path, [make_log(8)])
    record = parse_log(path)
    assert (record.num_gpus, record.gpu_type) == (0, "cpu")
    # Not the look-alike lines of the source header.
    assert (record.seed, record.steps, record.artifact_bytes) == (8, 6576, 15_751_595)
    assert record.evals["slot"].val_loss == 1.24104846
    assert record.evals["slot"].params["mode"] == "scored"


def test_demo_log_settings_reproduce_its_configuration():
    """The settings read from the demo log's lines, given to train_gpt.py's own parser with its
    preset, give the configuration the log records; every name is a real setting."""
    import train_gpt as tg

    record = parse_log(DEMO_LOG)
    settings = submission.reproduction([record])["settings"]
    assert settings == {
        "PRESET": "demo", "DATA_PATH": "./data/datasets/demo_sp1024",
        "TOKENIZER_PATH": "./data/tokenizers/demo_1024_bpe.model", "ITERATIONS": "120",
        "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "TRAIN_BATCH_TOKENS": "8192",
        "TRAIN_SEQ_LEN": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "XSA_LAST_N": "4",
        "EVAL_STRIDE": "64", "SLOT_MODE": "both",
        "SLOT_STEPS": "8", "TTT_ENABLED": "1", "TTT_LR": "0.01", "TTT_CHUNK_TOKENS": "1024",
        "CPU_THREADS": "2",
    }
    assert set(settings) <= tg.Config.variables()
    cfg = tg.Config.from_env({**settings, "SEED": "1337"})
    m, t, e = cfg.model, cfg.train, cfg.eval
    shape = (m.num_heads, m.num_kv_heads, t.train_seq_len, t.iterations, e.stride)
    assert shape == (4, 2, 256, 120, 64)
    evaluation = (e.slot.mode, e.slot.steps, e.ttt.enabled, e.ttt.lr, cfg.run.seed)
    assert evaluation == ("both", 8, True, 0.01, 1337)


def test_declared_defaults_are_train_gpts():
    """The defaults a reproduction command is compared against are read from the script's source
    (no copy): for train_gpt.py they are its settings' own, every one of them."""
    import train_gpt as tg

    fields = {name: f for section in tg.Config.SECTIONS for name, f in section.settings().items()}
    declared = submission.declared_defaults((REPO / "train_gpt.py").read_text())
    assert declared == {name: runlog.env_value(f.default) for name, f in fields.items()}
    assert submission.declared_defaults(FAKE_SOURCE) == {}  # a script that declares none


def test_every_evaluation_has_a_kind():
    import train_gpt as tg

    assert list(submission.SCORES) == list(EVAL_TAGS)
    kinds = {name: s.kind for name, s in submission.SCORES.items()}
    assert kinds == {"roundtrip": "accepted", "sliding": "accepted", "sliding_s64": "accepted",
                     "slot": "not causal", "slot_context": "causal, not accepted",
                     "legal_ttt": "accepted"}
    # The same kinds as the script's closing score: lines give (and make_log writes).
    logged = {EVAL_TAGS[name]: submission.LOG_KINDS[kind] for name, kind in kinds.items()}
    assert logged == tg.SCORE_KINDS == KIND_WORDS
    assert set(tg.SCORE_KINDS.values()) == set(runlog.SCORE_KINDS)


# ----------------------------------------------------------------------------- the line formats


def _writer_source(writer: str) -> str:
    import inspect

    import train_gpt as tg

    obj = tg
    for name in writer.split(".")[1:]:
        obj = getattr(obj, name)
    return inspect.getsource(obj)


def test_every_line_format_names_the_function_that_writes_it():
    """Each format's writer is a train_gpt.py function that writes the format's literal start
    (the evaluation lines start with their names)."""
    checked = 0
    for kind, fmt in runlog.LINES.items():
        if not fmt.writer.startswith("train_gpt."):
            continue
        source = _writer_source(fmt.writer)
        words = [fmt.prefix] if fmt.prefix else {"result": [" val_loss:", "eval_time:"],
                                                 "exact": ["_exact val_loss:"]}[kind]
        for word in words:
            assert word in source, (kind, fmt.writer, word)
        checked += 1
    assert checked >= 40
    groups = runlog.first("param_groups", make_log(current=True))
    assert groups["counts"] == " embed:3/623616 matrix:66/25952256 scalar:57/286822"


def test_a_whole_log_and_its_lines_read_the_same():
    """Every format reads a whole text (finditer) as it reads its lines one by one: none can
    match across a line's end."""
    others = ["| NVIDIA-SMI 580.126.09   Driver Version: 580.126.09     CUDA Version: 13.0  |",
              "WARNING: SLOT_STPES is not a setting of this script; did you mean SLOT_STEPS?",
              "error: training diverged: train_loss at step 3 is nan; nothing was exported",
              "eval_only artifact:runs/a b/final_model.int6.ptz bytes:15751595",
              "export_only weights:final_model.pt bytes:105919389",
              "peak memory allocated: 22524 MiB reserved: 22564 MiB",
              "gptq:calibration batches:64 inputs:66 time:9312ms",
              'gpu_check:part {"name": "device"}',
              'settings:{"SEED": 1337, "SLOT_MODE": "both"}']
    text = DEMO_LOG.read_text() + make_log(current=True, legal_ttt=(1.8, 1.1), gpus=2)
    text += "\n".join(others) + "\n"
    lines = text.splitlines()
    for kind in runlog.LINES:
        whole = [m.group(0) for m in runlog.find(kind, text)]
        assert whole and whole == [m.group(0) for m in runlog.find(kind, lines)], kind
    assert runlog.last("eval_only", text)["artifact"] == "runs/a b/final_model.int6.ptz"


# ----------------------------------------------------------------------------- the kinds of score


@needs_reference
def test_reference_logs_headline_is_the_sliding_window(tmp_path, capsys):
    """The original's three real logs (source head removed): the script comes from --script; one of
    the published script's size (61,864 bytes, the seed-42 log says 61,983) is written with a
    warning naming both figures. Headline: the sliding window; the scored SLOT labelled not
    causal."""
    script = tmp_path / "train_gpt.py"
    script.write_text("x = 1\n" + "#" * (61_864 - 7) + "\n")
    out = tmp_path / "records" / "track_10min_16mb" / "2026-04-04_SLOT48"
    argv = [*REFERENCE_LOGS, "--script", script, "--out", out, "--date", "2026-04-04"]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    sub = read_json(out)
    headline = (sub["score"], sub["score_label"], sub["score_kind"])
    assert headline == ("sliding_s64", "sliding window s64", "accepted")
    assert sub["val_bpb"] == pytest.approx(np.mean([1.12054341, 1.12245187, 1.12195888]), abs=1e-12)
    assert [sub["seed_results"][str(s)]["steps"] for s in (42, 1337, 2024)] == [6576, 6578, 6588]
    assert sub["scores"]["slot"]["kind"] == "not causal"
    assert sub["scores"]["sliding"]["kind"] == "accepted"
    slot_bpbs = [0.73502047, 0.74502015, 0.74164171]
    assert sub["scores"]["slot"]["val_bpb"] == pytest.approx(np.mean(slot_bpbs))
    (warning,) = sub["warnings"]
    assert "61,864 bytes" in warning and "61,983 bytes" in warning and f"warning: {warning}" in err
    assert (out / "train_gpt.py").read_bytes() == script.read_bytes()
    checks = ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "hardware_8xh100",
              "score_accepted")
    assert all(sub["compliance"][check] is True for check in checks)
    readme = (out / "README.md").read_text()
    assert "| SLOT scored | not causal | `final_slot_exact` |" in readme
    assert "SEED=42 torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert "score: sliding window s64 (accepted)" in printed
    assert "beside it, not causal: SLOT scored, final_slot_exact" in printed
    for seed in (42, 1337, 2024):
        log = (REFERENCE / f"seed{seed}_run_log.txt").read_bytes()
        assert (out / f"train_seed{seed}.log").read_bytes() == log


def test_demo_headline_is_legal_ttt(demo_folder):
    """The demo's context SLOT is lower than legal TTT, but not accepted: the headline is legal TTT,
    the context SLOT labelled 'causal, not accepted', the scored SLOT 'not causal'."""
    out, printed, err = demo_folder
    sub = read_json(out)
    headline = (sub["score"], sub["score_kind"], sub["score_line"])
    assert headline == ("legal_ttt", "accepted", "legal_ttt_exact")
    assert (sub["val_bpb"], sub["val_loss"]) == (2.32770419, 4.28238356)
    assert sub["scores"]["slot_context"]["kind"] == "causal, not accepted"
    assert sub["scores"]["slot_context"]["val_bpb"] < sub["val_bpb"]  # lower, yet not the headline
    assert sub["scores"]["slot"]["kind"] == "not causal"
    assert (sub["warnings"], sub["seeds"]) == ([], [1337])
    assert sub["seed_results"]["1337"]["steps"] == 120
    readme = (out / "README.md").read_text()
    assert "| SLOT context | causal, not accepted | `final_slot_context_exact` |" in readme
    assert "**legal TTT (the score)** | accepted |" in readme
    assert "beside it, causal, not accepted: SLOT context, final_slot_context_exact" in printed
    assert err == ""


@pytest.mark.parametrize("score, kind",
                         [("slot_context", "causal, not accepted"), ("slot", "not causal")])
def test_a_headline_that_is_not_accepted_carries_its_kind(tmp_path, capsys, score, kind):
    """--score may choose another kind: it is then written with its kind in the JSON, the README
    and the console, never silently promoted."""
    out = tmp_path / "out"
    argv = [DEMO_LOG, "--out", out, "--score", score, "--track", "cpu_demo"]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0
    sub = read_json(out)
    assert (sub["score"], sub["score_kind"]) == (score, kind)
    assert sub["compliance"]["score_accepted"] is False
    assert any(w.startswith(f"the headline score '{score}'") and f"is {kind}:" in w
               for w in sub["warnings"])
    readme = (out / "README.md").read_text()
    assert f"**This headline is not an accepted kind of score: {kind}.**" in readme
    assert f"({kind.upper()})" in printed and f"warning: the headline score '{score}'" in err


def test_default_score_is_the_best_accepted_one(tmp_path):
    """Without --score: the accepted score with the lowest mean val_bpb every log has, even where a
    SLOT score is lower; legal TTT wins on the mean here, not on every seed."""
    def built(*texts):
        return build_submission([parse_log(p) for p in write_logs(tmp_path, texts)])

    figures = {1: (1.110, (1.870, 1.105)), 2: (1.104, (1.871, 1.107))}  # seed: (SLOT context, TTT)
    sub = built(*(make_log(seed, slot_context=(1.80, c), legal_ttt=t)
                  for seed, (c, t) in figures.items()))
    assert (sub["score"], sub["score_kind"]) == ("legal_ttt", "accepted")
    assert sub["val_bpb"] == pytest.approx(1.106, abs=1e-12)
    assert sub["val_loss"] == pytest.approx(1.8705)
    # the SLOT context (1.0) is lower, but not accepted
    assert built(make_log(1, slot_context=(1.8, 1.0)))["score"] == "sliding_s64"
    sub = built(make_log(1, sliding=None, s64=None))
    assert sub["score"] == "roundtrip" and sub["val_bpb"] == 1.14417082  # the first round trip


def test_legal_ttt_lines_and_score(tmp_path):
    """legal_ttt lines are read by their names; the progress lines are not results."""
    (path,) = write_logs(tmp_path, [make_log(1, legal_ttt=(1.89012345, 1.11943210))])
    record = parse_log(path)
    ttt = record.evals["legal_ttt"]
    figures = (ttt.val_loss, ttt.val_bpb, ttt.line, ttt.eval_time_ms)
    assert figures == (1.89012345, 1.1194321, "legal_ttt_exact", 191234)
    assert record.settings["TTT_ENABLED"] == "1" and record.settings["TTT_CHUNK_TOKENS"] == "32768"


def test_current_log_lines_change_no_figure(tmp_path):
    """The lines train_gpt.py added (param tables, eval_timing, the closing score: lines) change
    no figure; each result carries its score: line's kind."""
    paths = write_logs(tmp_path, [make_log(1), make_log(1, current=True)])
    old, new = (parse_log(p) for p in paths)
    figures = [{n: (e.val_loss, e.val_bpb, e.eval_time_ms, e.params) for n, e in r.evals.items()}
               for r in (old, new)]
    assert figures[0] == figures[1] and old.settings == new.settings and old.config == new.config
    assert {n: e.kind for n, e in new.evals.items()} == {
        "roundtrip": "accepted", "sliding": "accepted", "sliding_s64": "accepted",
        "slot": "not_causal"}
    assert all(e.kind is None for e in old.evals.values())


def test_the_runs_warnings_are_repeated(tmp_path, capsys):
    line = "WARNING: SLOT_STPES is not a setting of this script; did you mean SLOT_STEPS?"
    text = make_log(1, current=True).replace("model_params:", f"{line}\nmodel_params:")
    (path,) = write_logs(tmp_path, [text])
    code, _, err = run_cli([path, "--out", tmp_path / "out", "--track", "cpu_demo"], capsys)
    assert code == 0, err
    warnings = read_json(tmp_path / "out")["warnings"]
    assert warnings == [f"{path}: the run warned: {line.removeprefix('WARNING: ')}"]
    assert f"warning: {warnings[0]}" in err


# ----------------------------------------------------------------------------- the record folder


def test_demo_folder_passes_the_validator_checks(demo_folder):
    """The checks the challenge's pre-submission validator makes: the required files, a train log,
    submission.json with a numeric val_bpb and string name and date, a script that compiles, the
    folder under 16,000,000 bytes."""
    out, _, _ = demo_folder
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "submission.json", "train_gpt.py", "requirements.txt"} <= names
    assert [n for n in names if re.fullmatch(r"train\w*\.log", n)] == ["train_seed1337.log"]
    sub = read_json(out)
    assert isinstance(sub["val_bpb"], float) and math.isfinite(sub["val_bpb"])
    assert isinstance(sub["name"], str) and sub["name"]
    assert isinstance(sub["date"], str) and re.fullmatch(r"\d{4}-\d\d-\d\d", sub["date"])
    compile((out / "train_gpt.py").read_text(), "train_gpt.py", "exec")
    assert sum(p.stat().st_size for p in out.iterdir()) < 16_000_000
    assert [p for p in out.iterdir() if p.is_dir()] == []


def test_submission_json_fields_and_types(demo_folder):
    """The fields accepted records use, of the types the challenge's tooling reads: numbers are
    numbers and no figure the logs hold is null."""
    out, _, _ = demo_folder
    sub = read_json(out)
    for key in ("name", "author", "github_id", "date", "track", "blurb", "score", "score_kind"):
        assert isinstance(sub[key], str), key
    for key in ("val_loss", "val_bpb", "val_loss_std", "val_bpb_std"):
        assert isinstance(sub[key], float), key
    assert isinstance(sub["bytes_total"], int) and sub["bytes_total"] == 1_139_068
    assert sub["seeds"] == [1337]
    seed = sub["seed_results"]["1337"]
    expected = {"val_loss": 4.28238356, "val_bpb": 2.32770419, "artifact_bytes": 1_139_068,
                "steps": 120, "step_avg_ms": 697.05, "eval_time_s": 28.465}
    assert {key: seed[key] for key in expected} == expected
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seed.values())
    assert sub["baseline"] is None and isinstance(sub["warnings"], list)


def test_demo_readme_is_generated_from_the_log(demo_folder):
    out, _, _ = demo_folder
    readme = (out / "README.md").read_text()
    assert readme.startswith("# CPU demo\n\n**val_bpb 2.32770419**: legal TTT "
                             "(`legal_ttt_exact`), **accepted**")
    row = ("| 1337 | 120 | 697.05 | 83.6 | 75.0 | 1,139,068 | 2.34456381 | 2.34107637 | "
           "2.20495689 |")
    assert row in readme
    assert "| std |" in readme and "| mean |" in readme
    assert "export PRESET=demo DATA_PATH=./data/datasets/demo_sp1024" in readme
    assert "SEED=1337 python train_gpt.py" in readme
    assert "- Python 3.11.7, PyTorch 2.13.0+cpu" in readme
    assert "| 1337 | yes (83.6 s) | yes (1,139,068) | yes (75.0 s) | **no** (cpu) |" in readme
    assert "No baseline was given" in readme
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert {"numpy", "sentencepiece", "torch==2.13.0"} <= set(requirements)
    assert "brotli" not in requirements  # an lzma artifact and a plain script do without it
    assert any(line.startswith("# optional: flash_attn_interface") for line in requirements)


def test_plain_script_round_trip_is_byte_identical(tmp_path, capsys, demo_folder):
    """The written train_gpt.py is the script that ran, byte for byte: the demo's, and the current
    train_gpt.py in a log of its own."""
    out, _, _ = demo_folder
    assert (out / "train_gpt.py").read_bytes() == logged_source(DEMO_LOG.read_text()).encode()
    assert (out / "train_seed1337.log").read_bytes() == DEMO_LOG.read_bytes()
    script = (REPO / "train_gpt.py").read_text()
    (path,) = write_logs(tmp_path, [make_log(3, source=script)])
    code, _, err = run_cli([path, "--out", tmp_path / "plain"], capsys)
    assert code == 0, err
    written = (tmp_path / "plain" / "train_gpt.py").read_bytes()
    assert written == (REPO / "train_gpt.py").read_bytes()
    assert read_json(tmp_path / "plain")["script"]["form"] == "plain"


def test_packed_script_round_trip_is_byte_identical(tmp_path, capsys):
    """A packed run logs the full source and counts the packed file's bytes: the folder gets the
    packed file back (re-made from the logged source, its size checked against Code size), or
    the one given with --script."""
    from tools import pack

    source = (REPO / "train_gpt.py").read_text()
    packed, codec, _ = pack.pack(source)
    (tmp_path / "packed.py").write_bytes(packed)
    (path,) = write_logs(tmp_path, [make_log(3, source=source, code=len(packed), gpus=8)])
    code, printed, err = run_cli([path, "--out", tmp_path / "a"], capsys)
    assert code == 0, err
    assert (tmp_path / "a" / "train_gpt.py").read_bytes() == packed
    assert read_json(tmp_path / "a")["script"]["form"] == f"packed ({codec})"
    assert f"train_gpt.py ({len(packed):,} bytes, packed ({codec}))" in printed
    argv = [path, "--out", tmp_path / "b", "--script", tmp_path / "packed.py"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and err == ""
    assert (tmp_path / "b" / "train_gpt.py").read_bytes() == packed
    assert read_json(tmp_path / "b")["warnings"] == []
    if codec == "brotli":  # the packed file's loader imports it
        assert "brotli" in (tmp_path / "b" / "requirements.txt").read_text().splitlines()


def test_packed_format_is_tools_packs():
    """tools.pack writes tools._packed's format, which reads back only an exact packed file."""
    from tools import pack

    data, codec, _ = pack.pack(FAKE_SOURCE)
    assert data == _packed.packed_files(FAKE_SOURCE)[codec]
    for codec, data in _packed.packed_files(FAKE_SOURCE).items():
        assert _packed.unpacked(data) == (codec, FAKE_SOURCE)
        assert _packed.unpacked(data + b"import os\n") is None  # does something else besides
        assert _packed.unpacked(data.replace(b's=L.decompress("""', b's=L.decompress("""0')) is None
    assert _packed.unpacked(FAKE_SOURCE.encode()) is None


def test_logs_without_source_use_the_script_given(tmp_path, capsys):
    """A log whose source head was removed needs --script; a size other than the logs' Code size
    is written with a warning naming both figures, on the console and in the JSON."""
    (path,) = write_logs(tmp_path, [make_log(1, source=None, code=61_983, gpus=8)])
    code, _, err = run_cli([path, "--out", tmp_path / "none"], capsys)
    assert code == 2 and f"error: {path}: no source at the log's head" in err
    assert "--script FILE" in err
    assert_nothing_written(tmp_path / "none")
    script = tmp_path / "script.py"
    script.write_text("print('the original')\n")
    code, _, err = run_cli([path, "--out", tmp_path / "out", "--script", script], capsys)
    assert code == 0
    (warning,) = read_json(tmp_path / "out")["warnings"]
    size = len(script.read_bytes())
    assert warning.startswith(f"--script {script} is {size} bytes, but the logs' Code size is "
                              "61,983 bytes")
    assert f"warning: {warning}" in err
    assert (tmp_path / "out" / "train_gpt.py").read_bytes() == script.read_bytes()


def test_existing_folder_needs_force(tmp_path, capsys, demo_folder):
    out, _, _ = demo_folder
    before = read_json(out)
    code, _, err = run_cli([DEMO_LOG, "--out", out, "--name", "again"], capsys)
    assert (code, err) == (2, f"error: {out}: exists; --force replaces it\n")
    assert read_json(out) == before
    code, _, _ = run_cli([DEMO_LOG, "--out", out, "--name", "again", "--force"], capsys)
    assert code == 0 and read_json(out)["name"] == "again"
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]


def test_force_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    """A folder without the tool's mark is not replaced, even one holding a stray
    submission.json beside a user's file (it used to be deleted whole)."""
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, err = run_cli([DEMO_LOG, "--out", keep, "--force"], capsys)
    assert code == 2 and "not a record folder this tool wrote" in err
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]
    (keep / "submission.json").write_text(json.dumps({"val_bpb": 1.1}))
    (keep / "thesis.tex").write_text("\\documentclass{article}")
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    code, _, err = run_cli([DEMO_LOG, "--out", keep, "--force"], capsys)
    assert code == 2 and "not a record folder this tool wrote" in err
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before


@pytest.mark.parametrize("change", ["added", "edited", "folder"])
def test_force_never_deletes_a_file_it_did_not_write(tmp_path, capsys, demo_folder, change):
    """A folder the tool wrote is replaced only as it wrote it: a file added to it, one edited
    since or a folder made in it are kept, and the folder with them."""
    out, _, _ = demo_folder
    assert set(read_json(out)["files"]) == {p.name for p in out.iterdir()} - {"submission.json"}
    name = {"added": "thesis.tex", "edited": "README.md", "folder": "figures"}[change]
    if change == "folder":
        (out / name).mkdir()
    else:
        (out / name).write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli([DEMO_LOG, "--out", out, "--force"], capsys)
    assert code == 2 and err == (f"error: {out}: holds files this tool did not write, or changed "
                                 f"since ({name}): --force replaces only a folder as this tool "
                                 "wrote it; move them away first\n")
    assert sorted(p.name for p in out.iterdir()) == before
    if change != "folder":
        assert (out / name).read_text() == "mine"


def test_a_log_with_crlf_line_ends_is_read(tmp_path, capsys, demo_folder):
    """A log that went through a system writing CRLF gives the same figures, and the folder
    keeps the log as it was given."""
    crlf = tmp_path / "crlf.log"
    crlf.write_bytes(DEMO_LOG.read_bytes().replace(b"\n", b"\r\n"))
    code, _, err = run_cli([crlf, "--out", tmp_path / "out", "--track", "cpu_demo", "--name",
                            "CPU demo", "--date", "2026-05-01"], capsys)
    assert code == 0, err
    ours, theirs = read_json(tmp_path / "out"), read_json(demo_folder[0])
    assert {k: v for k, v in ours.items() if k != "files"} == {
        k: v for k, v in theirs.items() if k != "files"}
    assert (tmp_path / "out" / "train_seed1337.log").read_bytes() == crlf.read_bytes()


def test_a_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch, demo_folder):
    """A write that fails midway (disk full) leaves no new folder, and the old one as it was."""
    out, _, _ = demo_folder
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        Path(path).write_bytes(data)

    monkeypatch.setattr(submission, "write_atomic", failing)
    fresh = tmp_path / "fresh"
    code, _, err = run_cli([DEMO_LOG, "--out", fresh], capsys)
    assert code == 2 and err.startswith(f"error: cannot write {fresh}: ") and "No space left" in err
    assert_nothing_written(fresh)
    calls.clear()
    code, _, _ = run_cli([DEMO_LOG, "--out", out, "--force", "--name", "x"], capsys)
    assert code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]


def test_steps_equal_the_logs_last_step(tmp_path, three_logs, capsys):
    out = tmp_path / "out"
    assert run_cli([*three_logs, "--out", out], capsys)[0] == 0
    sub = read_json(out)
    for path in three_logs:
        text = Path(path).read_text().split(SEPARATOR)[-1]
        last_step = int(re.findall(r"^step:(\d+)/", text, flags=re.M)[-1])
        seed = re.search(r"^seed:(\d+)$", text, flags=re.M).group(1)
        assert sub["seed_results"][seed]["steps"] == last_step
        assert (out / f"train_seed{seed}.log").read_text() == Path(path).read_text()


def test_three_seeds_mean_and_std(tmp_path, three_logs, capsys):
    out = tmp_path / "out"
    code, printed, _ = run_cli([*three_logs, "--out", out, "--score", "slot"], capsys)
    assert code == 0
    sub = read_json(out)
    losses, bpbs = np.array(SLOT_LOSSES), np.array(SLOT_BPBS)
    assert sub["val_loss"] == pytest.approx(losses.mean(), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(np.std(bpbs, ddof=1), abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(np.std(losses, ddof=1), abs=1e-12)
    assert sub["bytes_total"] == 15_753_595 and sub["seeds"] == SEEDS
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 3 + 2  # header, rule, seeds, mean, std
    assert rows[-1].startswith("| std |") and f"{np.std(bpbs, ddof=1):.8f}" in rows[-1]
    assert rows[-2].startswith("| mean |") and f"{bpbs.mean():.8f}" in rows[-2]


@pytest.mark.parametrize(
    "log, track, expected",
    [
        (dict(), "10min_16mb", []),
        # a CPU run of 3,516 s: both its time and its hardware break the track
        (dict(gpus=0, train_ms=3_516_240), "10min_16mb",
         ["trained on cpu", "training took 3,516.2 s, over"]),
        (dict(train_ms=600_200), "10min_16mb",
         ["training took 600.2 s, over the 10min_16mb track's 600 s"]),
        (dict(artifact=16_000_000), "10min_16mb", ["artifact 16,000,000 bytes, not under"]),
        (dict(legal_ttt=(1.8, 1.1)), "10min_16mb", []),  # the evaluations take 516.4 s
        (dict(legal_ttt=(1.8, 1.1), slot_context=(1.8, 1.1)), "10min_16mb",
         ["the evaluations took 725.1 s, over the 10min_16mb track's 600 s"]),
        # a track without limits
        (dict(gpus=0, train_ms=3_516_240, artifact=16_000_000), "cpu_demo", []),
    ],
)
def test_track_limit_warnings(tmp_path, capsys, log, track, expected):
    """Warnings on stderr and in submission.json. An 8xH100 run stopped by the wall-clock cap like
    the record (600.031 s: its last step ends 31 ms past the cap, less than one step) gets none."""
    log = {"gpus": 8, **log}
    (path,) = write_logs(tmp_path, [make_log(1, **log)])
    code, _, err = run_cli([path, "--out", tmp_path / "out", "--track", track], capsys)
    assert code == 0
    warnings = json.loads((tmp_path / "out" / "submission.json").read_text())["warnings"]
    assert len(warnings) == len(expected)
    for warning, part in zip(warnings, expected, strict=True):
        assert warning.startswith(f"{path}: ") and part in warning
        assert f"warning: {warning}" in err
    if not expected:
        assert "warning" not in err


# ----------------------------------------------------------------------------- refusals


def refused(tmp_path, capsys, texts, *extra):
    """Run the tool on these logs; it must refuse with one line and write nothing."""
    paths = write_logs(tmp_path, texts)
    out = tmp_path / "records" / "out"
    code, printed, err = run_cli([*paths, "--out", out, *extra], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert printed == ""
    assert_nothing_written(out)
    return paths, err


def cut_demo(after: str, extra: str = "") -> str:
    """The demo log cut after the first line starting with `after`, plus `extra`."""
    lines = DEMO_LOG.read_text().splitlines(keepends=True)
    body = lines.index("preset:demo cpu_threads:2\n")
    end = next(i for i in range(body, len(lines)) if lines[i].startswith(after))
    return "".join(lines[: end + 1]) + extra


@pytest.mark.parametrize(
    "after, extra, reason",
    [
        # A log ending 'interrupted during evaluation' (Ctrl-C in legal TTT), and each other stage.
        ("legal_ttt:chunk 51/93", "interrupted during evaluation\n",
         "the run was interrupted ('interrupted during evaluation'): not a finished run"),
        ("Code size", "interrupted during export\n", "interrupted ('interrupted during export')"),
        ("step:60/120 val_loss", "interrupted at step 61/120\n",
         "interrupted ('interrupted at step 61/120')"),
        ("preset:demo", "interrupted during training\n",
         "interrupted ('interrupted during training')"),
        # Killed without a word (SIGKILL, a lost machine): the evaluations did not finish.
        ("legal_ttt:chunk 51/93", "", "legal_ttt started but has no legal_ttt_exact line"),
        ("eval_progress:final_int6_sliding_window", "",
         "final_int6_sliding_window started but has no"),
        ("final_slot val_loss", "", "'final_slot' has no final_slot_exact line"),
        ("Total submission size:", "", "no final_int6_roundtrip_exact line"),
        ("DIAGNOSTIC", "", "artifact size"),
        ("step:110/120", "", "training ends at step 110/120 without a stopping_early line"),
        ("preset:demo", "", "no 'step:N/M' line"),
        # A failure after the log opened: its one error line ends the log.
        ("step:60/120 val_loss", "error: training diverged: train_loss at step 61 is nan; "
         "nothing was exported\n", "the run stopped with an error ('error: training diverged"),
    ],
    ids=["evaluation", "export", "step", "training", "ttt-killed", "sliding-killed", "slot-cut",
         "before-evaluations", "before-export", "training-cut", "no-training", "error"],
)
def test_unfinished_or_interrupted_log_refused(tmp_path, capsys, after, extra, reason):
    (path,), err = refused(tmp_path, capsys, [cut_demo(after, extra)])
    assert err.startswith(f"error: {path}: ") and reason in err


@pytest.mark.parametrize("line, run", [("eval_only artifact:final_model.int6.ptz bytes:1",
                                        "EVAL_ONLY"),
                                       ("export_only weights:final_model.pt bytes:1",
                                        "EXPORT_ONLY")])
def test_eval_only_log_refused(tmp_path, capsys, line, run):
    """EVAL_ONLY and EXPORT_ONLY runs evaluate an artifact (or kept weights): no training."""
    text = make_log(1).replace("world_size:1", f"{line}\nworld_size:1")
    text = re.sub(r"^(warmup_)?step:.*\n|^stopping_early.*\n", "", text, flags=re.M)
    (path,), err = refused(tmp_path, capsys, [text])
    assert f"an {run} log (no training)" in err


def test_a_log_cut_mid_line_is_not_read_to_its_last_character(tmp_path, capsys):
    """Killed while writing its round trip's figure: the part written is not a line (its
    figure would read 2.344)."""
    text = cut_demo("final_int6_roundtrip_exact")
    assert text.endswith(" val_bpb:2.34456381\n")
    (path,), err = refused(tmp_path, capsys, [text[:-6]])
    assert err == (f"error: {path}: its last line, 'final_int6_roundtrip_exact val_loss:4.31340099 "
                   "val_bpb:2.344', ends mid-line: the log was cut while it was being written\n")


@pytest.mark.parametrize("log", [DEMO_LOG, REFERENCE_LOGS[0]], ids=["demo", "original"])
def test_a_complete_log_without_its_last_newline_is_read(tmp_path, log):
    """Only the final newline missing: the last line (the demo's closing score: line, the
    original's final_slot_exact) is whole, the log is complete."""
    if not log.exists():
        pytest.skip("../shared reference logs absent")
    (path,) = write_logs(tmp_path, [log.read_text().rstrip("\n")])
    record, whole = parse_log(path), parse_log(log)
    assert record.evals == whole.evals and record.settings == whole.settings


@pytest.mark.parametrize("cut", ["legal_ttt_exact val_loss:4.28238356 val_bpb:2.327",
                                 "legal_ttt_exact val_loss:4.28238356 val_bpb:2.32770419",
                                 "score:final_int6_roun",
                                 "score:legal_ttt val_bpb:2.32770419 kind:accep"])
def test_a_log_cut_mid_line_in_its_last_evaluation_line_is_refused(tmp_path, capsys, cut):
    """Killed while writing its last evaluation line or its closing summary: the part written
    is not a line, and the log is refused as cut (it was read as complete and copied)."""
    text = DEMO_LOG.read_text()
    assert cut.split(" kind:")[0] in text
    (path,), err = refused(tmp_path, capsys, [text[:text.index(cut) + len(cut)]])
    assert err == (f"error: {path}: its last line, '{cut}', ends mid-line: the log was cut while "
                   "it was being written\n")


def default_settings(**changes) -> dict:
    """Every setting as train_gpt.py resolves it with these changes: its settings: line."""
    import train_gpt as tg

    cfg = tg.Config.from_env({"RUN_ID": "r1", **changes})
    sections = (cfg.run, cfg.data, cfg.model, cfg.optim, cfg.train, cfg.export, cfg.eval,
                cfg.eval.slot, cfg.eval.ttt)
    return {name: getattr(s, f.name) for s in sections for name, f in s.settings().items()}


def test_settings_line_gives_the_settings_and_the_reproduction(tmp_path):
    """A log with the settings: line: its settings are the line's, and the reproduction lists
    those that differ from the defaults the script declares (here: the repository's, the fake
    source declaring none), whatever the original's lines say."""
    changes = dict(MATRIX_LR="0.03", NUM_LAYERS="12", COMPRESSOR="brotli", TTT_ENABLED="1",
                   SEED="7")
    logged = default_settings(**changes)
    (path,) = write_logs(tmp_path, [make_log(7, current=True, settings=logged)])
    record = parse_log(path)
    assert record.settings == {k: str(int(v)) if isinstance(v, bool) else str(v)
                               for k, v in logged.items()}
    rep = submission.reproduction([record])
    assert rep["settings"] == {"NUM_LAYERS": "12", "MATRIX_LR": "0.03", "COMPRESSOR": "brotli",
                               "TTT_ENABLED": "1"}
    assert rep["commands"]["7"] == ("NUM_LAYERS=12 MATRIX_LR=0.03 COMPRESSOR=brotli TTT_ENABLED=1"
                                    " SEED=7 python train_gpt.py")


def test_logs_whose_settings_lines_differ_are_refused(tmp_path, capsys):
    """Every logged setting but the seed and the run id must agree across the seeds."""
    texts = [make_log(1, current=True, settings={**default_settings(SEED="1"), "RUN_ID": "a"}),
             make_log(2, current=True, settings=default_settings(SEED="2", VE_DIM="64"))]
    paths, err = refused(tmp_path, capsys, texts)
    assert f"error: {paths[1]}: config differs from {paths[0]}: VE_DIM 128 vs 64\n" == err


def test_a_log_with_the_settings_line_must_end_with_its_summary(tmp_path, capsys):
    """A current log (settings: line) cut at a line's end before its closing score: lines is
    cut; an older log without them is read as before."""
    text = make_log(1, current=True, settings=default_settings(SEED="1"))
    cut = text.split("score:")[0]
    (path,), err = refused(tmp_path, capsys, [cut])
    assert "the score: lines name nothing but the evaluations are final_int6_roundtrip, " in err
    assert err.endswith(": the log is cut in its closing summary\n")
    (tmp_path / "older").mkdir()
    (older,) = write_logs(tmp_path / "older", [make_log(1, current=False)])
    assert all(e.kind is None for e in parse_log(older).evals.values())


def test_a_real_runs_settings_line_is_its_whole_configuration(finished_run):
    """The script's own log: one settings: line naming every setting with the value the run
    resolved (the script's own parser, run here on the same environment), and a reproduction
    of exactly the settings that differ from their defaults."""
    import os

    import train_gpt as tg

    cwd, env, status, _, _ = finished_run
    assert status == 0
    text = (cwd / "logs" / "shared.txt").read_text()
    (line,) = re.findall(r"^settings:(.*)$", text.split(SEPARATOR)[-1], re.M)
    logged = json.loads(line)
    assert set(logged) == tg.Config.variables()
    resolved = tg.Config.from_env({**os.environ, **env})
    fields = {name: (f, section) for section in tg.Config.SECTIONS
              for name, f in section.settings().items()}
    owner = {tg.RunConfig: resolved.run, tg.DataConfig: resolved.data, tg.GPTConfig: resolved.model,
             tg.OptimConfig: resolved.optim, tg.TrainConfig: resolved.train,
             tg.ExportConfig: resolved.export, tg.EvalConfig: resolved.eval,
             tg.SlotConfig: resolved.eval.slot, tg.TTTConfig: resolved.eval.ttt}
    assert logged == {name: getattr(owner[section], f.name)
                      for name, (f, section) in fields.items()}
    record = parse_log(cwd / "logs" / "shared.txt")
    changed = {name for name, (f, _) in fields.items() if logged[name] != f.default}
    assert set(submission.reproduction([record])["settings"]) == changed - {"RUN_ID", "SEED"}
    assert {"DATA_PATH", "ITERATIONS", "SLOT_ENABLED", "NUM_LAYERS"} <= changed


SCORE_SLOT = "score:final_slot val_bpb:0.73502047 kind:not_causal"


@pytest.mark.parametrize(
    "old, new, reason",
    [
        (SCORE_SLOT, SCORE_SLOT.replace("not_causal", "accepted"),
         "its score:final_slot line says kind:accepted, but tools.submission counts 'slot' as "
         "not causal: train_gpt.SCORE_KINDS and tools.submission.SCORES disagree"),
        (SCORE_SLOT, SCORE_SLOT.replace("47 ", "48 "), "score:final_slot val_bpb:0.73502048 is "
         "not its final_slot_exact line's 0.73502047: the log disagrees with itself"),
        (SCORE_SLOT + "\n", "", "the score: lines name final_int6_roundtrip, "
         "final_int6_sliding_window, final_int6_sliding_window_s64 but the evaluations are "
         "final_int6_roundtrip, final_int6_sliding_window, final_int6_sliding_window_s64, "
         "final_slot: the log is cut in its closing summary"),
        (SCORE_SLOT, SCORE_SLOT + "\nscore:final_new val_bpb:1.00000000 kind:accepted",
         "score:final_new names an evaluation this reader does not know"),
        (SCORE_SLOT, SCORE_SLOT.replace("not_causal", "causal"),
         f"'{SCORE_SLOT.replace('not_causal', 'causal')}', is not in the format "
         "train_gpt.log_scores writes (tools/runlog.py LINES: score)"),
        (" eval_time:208741ms mode:scored", " mode:scored",
         "'final_slot val_loss:1.2410 val_bpb:0.7350 steps:48 lr:0.012 mode:scored', is not in "
         "the format train_gpt.log_result writes"),
        ("train_time:599941ms", "train_time:599941", "'step:6575/20000 train_loss:2.0516 "
         "train_time:599941 step_avg:91.24ms', is not in the format train_gpt.log_train_step / "
         "train_gpt.train writes (tools/runlog.py LINES: val_step, train_step)"),
        ("Code size: ", "Code size: +", "is not in the format train_gpt.log_export writes"),
    ],
    ids=["kind", "figure", "missing", "unknown", "kind-word", "result", "step", "code"],
)
def test_a_log_that_breaks_its_lines_is_refused(tmp_path, capsys, old, new, reason):
    """Each line read is a contract (tools.runlog.LINES): a line out of its format, or closing
    score: lines that disagree with the results or with SCORES' kinds, refuse the log."""
    text = make_log(1, current=True)
    assert old in text
    (path,), err = refused(tmp_path, capsys, [text.replace(old, new, 1)])
    assert err.startswith(f"error: {path}: ") and reason in err, err


def test_missing_chosen_score_refused(tmp_path, capsys):
    """--score names an evaluation the log lacks."""
    paths, err = refused(tmp_path, capsys, [make_log(1)], "--score", "legal_ttt")
    assert f"error: {paths[0]}: no legal_ttt_exact line for score 'legal_ttt'" in err


def test_mixed_configurations_refused(tmp_path, capsys):
    paths, err = refused(tmp_path, capsys, [make_log(1), make_log(2, model_params=26_000_000)])
    assert f"error: {paths[1]}: config differs from {paths[0]}: " in err
    assert "model_params 26862694 vs 26000000" in err
    paths, err = refused(tmp_path, capsys, [make_log(1), make_log(2, slot_context=(1.8, 1.1))])
    assert f"error: {paths[1]}: config differs" in err and "SLOT_MODE scored vs both" in err


def test_different_code_size_refused(tmp_path, capsys):
    logs = [make_log(1, source=None, code=61_983), make_log(2, source=None, code=60_000)]
    _, err = refused(tmp_path, capsys, logs, "--script", __file__)
    assert "code_bytes 61983 vs 60000" in err


def test_different_sources_refused(tmp_path, capsys):
    """All logs must carry one source: one line names the logs that differ."""
    other = FAKE_SOURCE.replace("hello", "world")
    paths, err = refused(tmp_path, capsys, [make_log(1), make_log(2, source=other), make_log(3),
                                            make_log(4, source=None)])
    assert err.startswith(f"error: {paths[1]}, {paths[3]}: the source at the log's head differs "
                          f"from {paths[0]}'s")


def test_duplicate_seeds_refused(tmp_path, capsys):
    paths, err = refused(tmp_path, capsys, [make_log(5), make_log(5, slot=(1.25, 0.74))])
    assert f"error: {paths[1]}: seed 5 duplicates {paths[0]}" in err


def test_script_given_must_be_the_one_logged(tmp_path, capsys):
    other = tmp_path / "other.py"
    other.write_text("print('not the one')\n")
    _, err = refused(tmp_path, capsys, [make_log(1)], "--script", other)
    assert "not the script the logs ran" in err
    other.write_text("def (:\n")
    _, err = refused(tmp_path, capsys, [make_log(1)], "--script", other)
    assert "not valid Python (line 1" in err


def test_packed_run_that_does_not_repack_needs_its_file(tmp_path, capsys):
    """Code size differs from the logged source's and no re-packing matches it (another packer,
    --minify): the packed file that ran must be given."""
    paths, err = refused(tmp_path, capsys, [make_log(1, code=31_476)])
    assert f"error: {paths[0]}: Code size 31,476 bytes is not the logged source's" in err
    assert "give the packed file that ran with --script FILE" in err


def test_cli_exit_status_without_traceback_and_without_torch(tmp_path):
    """The tool neither imports torch nor train_gpt.py; a refusal is one line, exit 2."""
    (cut,) = write_logs(tmp_path, [make_log(1).split("Code size")[0]])
    argv = [sys.executable, "-m", "tools.submission", cut, "--out", str(tmp_path / "out")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {cut}: ") and "Traceback" not in done.stderr
    probe = "import sys, tools.submission; print(sorted({'torch', 'train_gpt'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert done.stdout == "[]\n", done.stderr


# ----------------------------------------------------------------------------- the comparison


def test_baseline_bpb_delta_and_p_value(tmp_path, three_logs, capsys):
    """--baseline-bpb: the delta in bpb, in nats through this run's own nats-per-bpb ratio, and a
    one-sample one-sided t-test of beating it by 0.005 nats."""
    out = tmp_path / "out"
    baseline = 1.1300
    code, printed, _ = run_cli([*three_logs, "--out", out, "--baseline-bpb", baseline], capsys)
    assert code == 0
    sub = read_json(out)
    losses = np.array([1.892 + i / 1000 for i in range(3)])
    bpbs = np.array([1.1205 + i / 1000 for i in range(3)])
    base_loss = baseline * losses.mean() / bpbs.mean()
    b = sub["baseline"]
    assert b["delta_bpb"] == pytest.approx(bpbs.mean() - baseline, abs=1e-12)
    assert b["delta_nats"] == pytest.approx(losses.mean() - base_loss, abs=1e-12)
    expected = stats.ttest_1samp(base_loss - losses - 0.005, 0.0, alternative="greater").pvalue
    assert b["p_value"] == pytest.approx(expected, rel=1e-9) and b["val_loss_from_bpb"] is True
    assert f"p-value (beats it by >= 0.005 nats): {expected:.6g}" in printed
    assert f"- delta: {bpbs.mean() - baseline:+.8f} bpb" in (out / "README.md").read_text()


def test_baseline_logs_welch(tmp_path, three_logs, capsys):
    """--baseline-logs: the baseline run's own best accepted score per seed, Welch's t over both
    runs' seeds, the delta in nats from both runs' losses."""
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    base_losses = [1.9010, 1.9035, 1.8990, 1.9022]
    base = write_logs(base_dir, [make_log(s, sliding=None, s64=(loss, loss * 0.5925))
                                 for s, loss in enumerate(base_losses)])
    out = tmp_path / "out"
    assert run_cli([*three_logs, "--out", out, "--baseline-logs", *base], capsys)[0] == 0
    b = read_json(out)["baseline"]
    new = np.array([1.892 + i / 1000 for i in range(3)])
    welch = stats.ttest_ind(base_losses, new + 0.005, equal_var=False, alternative="greater")
    expected = welch.pvalue
    assert b["p_value"] == pytest.approx(expected, rel=1e-9) and b["test"] == "Welch's t, one-sided"
    assert b["delta_nats"] == pytest.approx(new.mean() - np.mean(base_losses), abs=1e-12)
    assert b["val_loss_from_bpb"] is False and "4 log(s)" in b["what"]


def test_p_value_welch_against_baseline_losses():
    new, base, gain = np.array([1.100, 1.110, 1.105]), np.array([1.130, 1.128, 1.133, 1.127]), 0.01
    vn, vb = new.var(ddof=1) / new.size, base.var(ddof=1) / base.size
    t = (base.mean() - new.mean() - gain) / math.sqrt(vn + vb)
    df = (vn + vb) ** 2 / (vn**2 / (new.size - 1) + vb**2 / (base.size - 1))
    p = acceptance_p_value(new.tolist(), baseline_losses=base.tolist(), min_gain=gain)
    assert p == pytest.approx(stats.t.sf(t, df), rel=1e-9)


def test_p_value_needs_two_runs(tmp_path, capsys):
    (path,) = write_logs(tmp_path, [make_log(1)])
    code, printed, _ = run_cli([path, "--out", tmp_path / "out", "--baseline-bpb", "1.3"], capsys)
    assert code == 0
    b = read_json(tmp_path / "out")["baseline"]
    assert b["p_value"] is None and b["test"] == "needs at least 2 seeds with spread (got 1)"
    assert "needs at least 2 seeds" in printed
    assert "none: needs at least 2 seeds" in (tmp_path / "out" / "README.md").read_text()
