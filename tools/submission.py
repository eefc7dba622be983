"""Build a record folder, in the form of the challenge's records, from train_gpt.py run logs.

    python -m tools.submission LOG... --out records/track_10min_16mb/DATE_NAME [--script FILE]

writes DIR/train_gpt.py (the exact script the logs ran), DIR/train_seed<SEED>.log for each log,
DIR/submission.json, DIR/README.md and DIR/requirements.txt. Every figure comes from the logs,
so the folder cannot disagree with them (the original record's submission reported step counts
its logs did not show).

Three kinds of score, kept apart everywhere:
- accepted: the round trip, the sliding window at any stride, legal score-first TTT; what the
  challenge's accepted records report;
- causal, not accepted: the context-only SLOT; it passes the flip test, but its legality was
  never ruled on and no accepted record uses SLOT;
- not causal: the scored SLOT (the original's 0.74): fitted to the very targets it scores.
The headline is the best accepted score every log holds; --score chooses another, and a headline
that is not accepted carries its kind in the JSON, the README and the console.

The script: a log carries the full source at its head. A plain run's script is that source; a
packed run's (its Code size differs from the source's bytes) is re-made from it with the
packed format of tools.pack, and must come out at exactly the logged Code size, else --script
is needed. A log without its source (the original's published logs) needs --script FILE.

Refused, with one line naming the log and what is missing, and nothing written: a log that
stopped early, was interrupted or stopped with an error, one with a line out of its format
(tools.runlog.LINES), one without the chosen score, one whose closing score: lines give a
score another kind than SCORES does, logs of different configurations, sources or repeated
seeds. The runs' WARNING lines are repeated as warnings. The folder is written whole into a
temporary sibling and renamed into place; an existing folder is replaced only with --force.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from tools import _packed
from tools._files import write_atomic
from tools._record_readme import render_readme, results_table
from tools import runlog
from tools.runlog import DEFAULTS, EVAL_TAGS, REMOVED_DEFAULTS, EvalResult, LogError, RunRecord
from tools.runlog import same_value

__all__ = ["RunRecord", "EvalResult", "parse_log", "build_submission", "acceptance_p_value", "main"]

ACCEPTED, CAUSAL_NOT_ACCEPTED, NOT_CAUSAL = "accepted", "causal, not accepted", "not causal"
KIND_WHY = {
    ACCEPTED: "the challenge accepts it: each target is scored from the artifact and the tokens "
              "before it, and test-time training only on tokens already scored (PR #549)",
    CAUSAL_NOT_ACCEPTED: "passes the flip test, but the legality of context-only SLOT was never "
                         "ruled on (openai/parameter-golf issue #1336) and no accepted record uses "
                         "SLOT",
    NOT_CAUSAL: "SLOT in its scored mode fits delta and bias to the very targets it then scores "
                "(it fails the flip test, docs/evaluation.md): not a compression result",
}


@dataclass(frozen=True)
class Score:
    label: str
    kind: str


# --score choices (the names of tools.runlog.EVAL_TAGS), in evaluation order.
SCORES = {
    "roundtrip": Score("round trip", ACCEPTED),
    "sliding": Score("sliding window", ACCEPTED),
    "sliding_s64": Score("sliding window", ACCEPTED),
    "slot": Score("SLOT scored", NOT_CAUSAL),
    "slot_context": Score("SLOT context", CAUSAL_NOT_ACCEPTED),
    "legal_ttt": Score("legal TTT", ACCEPTED),
}
# The kind words of train_gpt.py's closing score: lines (its SCORE_KINDS), for each kind here:
# a log that says otherwise means the two tables disagree.
LOG_KINDS = {ACCEPTED: "accepted", CAUSAL_NOT_ACCEPTED: "causal_not_accepted",
             NOT_CAUSAL: "not_causal"}


@dataclass(frozen=True)
class TrackLimits:
    train_seconds: float = 600.0
    total_bytes: int = 16_000_000  # the artifact total (model + code) must stay under it
    eval_seconds: float = 600.0
    hardware: str = "8xH100"  # what the time limits are measured on


TRACK_LIMITS = {"10min_16mb": TrackLimits()}
RECORD_LIMITS = TRACK_LIMITS["10min_16mb"]  # the compliance section always shows these
FOLDER_CAP = RECORD_LIMITS.total_bytes  # the challenge's validator also caps the folder


class SubmissionError(Exception):
    """A refusal: the message names the log (when there is one) and the reason."""


def parse_log(path: str | os.PathLike) -> RunRecord:
    """One train_gpt.py log (tools.runlog); SubmissionError when it cannot be a submission's."""
    try:
        record = runlog.parse_log(path)
    except LogError as exc:
        raise SubmissionError(str(exc)) from None
    check_kinds(record)
    return record


def check_kinds(record: RunRecord) -> None:
    """The kinds the log's score: lines give (logs before them have none) against SCORES."""
    for name, result in record.evals.items():
        ours = SCORES[name].kind
        if result.kind is not None and result.kind != LOG_KINDS[ours]:
            raise SubmissionError(
                f"{record.path}: its score:{EVAL_TAGS[name]} line says kind:{result.kind}, but "
                f"tools.submission counts '{name}' as {ours}: train_gpt.SCORE_KINDS and "
                "tools.submission.SCORES disagree")


@dataclass(frozen=True)
class Meta:
    name: str = ""
    author: str = ""
    github_id: str = ""
    blurb: str = ""
    track: str = "10min_16mb"
    date: str = ""  # YYYY-MM-DD; empty: today


@dataclass(frozen=True)
class Script:
    data: bytes  # the file train_gpt.py of the folder
    form: str  # "plain", "packed (lzma)" or "packed (brotli)"
    origin: str  # where it came from, for the README
    source: str  # the source it runs (a packed file's unpacked one)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Baseline:
    what: str  # how it was given, for the README and the JSON
    bpb: float  # mean val_bpb
    losses: tuple[float, ...] = ()  # per-seed val_loss (nats) from its logs; empty for a figure


# ----------------------------------------------------------------------------- consistency


def _identity(record: RunRecord) -> dict[str, str]:
    """What the seeds of one submission share: every recorded setting but the seed, the model's
    size, the script's bytes and the hardware."""
    settings = {k: v for k, v in record.settings.items() if k != "SEED"}
    return {**settings, "model_params": record.config.get("model_params", "absent"),
            "world_size": record.config.get("world_size", "absent"),
            "code_bytes": str(record.code_bytes), "gpus": record.hardware}


def check_consistent(records: Sequence[RunRecord]) -> None:
    """Refuse logs of different sources, configurations and repeated seeds."""
    first, seen = records[0], {}
    differ = [r.path for r in records[1:] if r.source != first.source]
    if differ:
        raise SubmissionError(f"{', '.join(differ)}: the source at the log's head differs from "
                              f"{first.path}'s (or only one carries it): one record holds one "
                              "script")
    for record in records:
        a, b = _identity(first), _identity(record)
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if keys:
            diffs = "; ".join(f"{k} {a.get(k, 'absent')} vs {b.get(k, 'absent')}" for k in keys)
            raise SubmissionError(f"{record.path}: config differs from {first.path}: {diffs}")
        if record.seed in seen:
            raise SubmissionError(f"{record.path}: seed {record.seed} duplicates "
                                  f"{seen[record.seed]}: each run needs its own seed")
        seen[record.seed] = record.path


# ----------------------------------------------------------------------------- the script


def recover_script(records: Sequence[RunRecord], given: Path | None = None) -> Script:
    """The script the logs ran: the logged source, the packed file re-made from it, or --script."""
    source, code = records[0].source, records[0].code_bytes
    if given is not None:
        return _given_script(given, source, code)
    if source is None:
        raise SubmissionError(f"{records[0].path}: no source at the log's head (removed, as in "
                              "the original's published logs): give the script that ran with "
                              "--script FILE")
    if len(source.encode("utf-8")) == code:
        origin = "the full source at the head of every log"
        return Script(source.encode("utf-8"), "plain", origin, source)
    return _repacked(records[0].path, source, code)


def _repacked(path: str, source: str, code: int) -> Script:
    """A packed run: its log holds the unpacked source and counts the packed file's bytes. The
    packed format is deterministic, so re-packing gives the file back; its size must be the
    logged Code size (else the run used another packer or --minify, and --script is needed)."""
    files = _packed.packed_files(source)
    for codec, data in files.items():
        if len(data) == code:
            origin = f"re-packed ({codec}) from the full source at the head of every log"
            return Script(data, f"packed ({codec})", origin, source)
    sizes = " or ".join(f"{len(d):,} ({c})" for c, d in files.items())
    plain = len(source.encode("utf-8"))
    raise SubmissionError(
        f"{path}: Code size {code:,} bytes is not the logged source's {plain:,} (a packed run), "
        f"and re-packing that source gives {sizes} bytes: give the packed file that ran with "
        "--script FILE")


def _read_script(path: Path) -> tuple[bytes, str]:
    """The file's bytes and the source it runs (a packed file's unpacked one)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SubmissionError(f"--script {path}: cannot read ({exc.strerror})") from None
    packed = _packed.unpacked(data)
    if packed:
        return data, packed[1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SubmissionError(f"--script {path}: not UTF-8 text, so not a train_gpt.py") from None
    try:
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        raise SubmissionError(f"--script {path}: not valid Python (line {exc.lineno}: "
                              f"{exc.msg})") from None
    return data, text


def _given_script(path: Path, source: str | None, code: int) -> Script:
    """--script: for logs without their source (checked against the logged Code size), or a
    packed file the logs' source comes out of."""
    data, runs = _read_script(path)
    packed = _packed.unpacked(data)
    if source is not None and runs != source:
        raise SubmissionError(f"--script {path}: not the script the logs ran (neither the source "
                              "at their head nor a packed file of it)")
    warnings = ()
    if len(data) != code:
        warnings = (f"--script {path} is {len(data):,} bytes, but the logs' Code size is {code:,} "
                    "bytes: their artifact totals counted a script of another size",)
    form = f"packed ({packed[0]})" if packed else "plain"
    return Script(data, form, f"given with --script ({path.name})", runs, warnings)


# ----------------------------------------------------------------------------- scores


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def _mean_bpb(records: Sequence[RunRecord], name: str) -> float:
    return _mean_std([r.evals[name].val_bpb for r in records])[0]


def shared_scores(records: Sequence[RunRecord]) -> list[str]:
    """The scores every log has, in SCORES order."""
    return [name for name in SCORES if all(name in r.evals for r in records)]


def score_label(name: str, record: RunRecord) -> str:
    """The score's name for people: a sliding window says its stride."""
    stride = record.evals[name].params.get("stride") if name in record.evals else None
    return f"{SCORES[name].label} s{stride}" if stride else SCORES[name].label


def resolve_score(records: Sequence[RunRecord], score: str | None = None) -> str:
    """The --score choice; by default the accepted score with the lowest mean val_bpb among
    those every log has."""
    if score is None:
        accepted = [name for name in shared_scores(records) if SCORES[name].kind == ACCEPTED]
        if not accepted:
            raise SubmissionError(f"{', '.join(r.path for r in records)}: no accepted score "
                                  "(round trip, sliding window, legal TTT) in every log; --score "
                                  "chooses another kind")
        return min(accepted, key=lambda name: _mean_bpb(records, name))
    for record in records:
        if score not in record.evals:
            raise SubmissionError(f"{record.path}: no {EVAL_TAGS[score]}_exact line for score "
                                  f"'{score}': that evaluation was off in this run")
    return score


def aggregate(records: Sequence[RunRecord], name: str) -> dict:
    results = [r.evals[name] for r in records]
    loss_mean, loss_std = _mean_std([e.val_loss for e in results])
    bpb_mean, bpb_std = _mean_std([e.val_bpb for e in results])
    return {"label": score_label(name, records[0]), "kind": SCORES[name].kind,
            "line": results[0].line, "val_loss": loss_mean, "val_bpb": bpb_mean,
            "val_loss_std": loss_std, "val_bpb_std": bpb_std}


# ----------------------------------------------------------------------------- comparison


def acceptance_p_value(
    losses: Sequence[float],
    baseline_loss: float | None = None,
    baseline_losses: Sequence[float] | None = None,
    min_gain: float = 0.005,
) -> float | None:
    """One-sided p-value that the runs' val_loss beats the baseline by at least min_gain nats:
    Welch's t against the baseline's seeds, or a one-sample t against a single figure. None
    with fewer than 2 runs or a degenerate sample."""
    if len(losses) < 2:
        return None
    x = np.asarray(losses, dtype=float)
    if baseline_losses is not None and len(baseline_losses) > 1:
        # Shifting the new losses by min_gain tests mean(baseline) - mean(new) > min_gain.
        base = np.asarray(baseline_losses, dtype=float)
        result = stats.ttest_ind(base, x + min_gain, equal_var=False, alternative="greater")
    else:
        figure = float(np.mean(baseline_losses)) if baseline_losses is not None else baseline_loss
        result = stats.ttest_1samp(figure - x - min_gain, 0.0, alternative="greater")
    p = float(result.pvalue)
    return None if math.isnan(p) else p


def read_baseline(bpb: float | None, logs: Sequence[str] | None) -> Baseline | None:
    """--baseline-bpb (a figure) or --baseline-logs (that run's logs, scored by the same rule)."""
    if bpb is not None:
        return Baseline(f"val_bpb {bpb:.8f} (given)", bpb)
    if not logs:
        return None
    records = [parse_log(path) for path in logs]
    check_consistent(records)
    name = resolve_score(records)
    head = aggregate(records, name)
    names = ", ".join(Path(r.path).name for r in records)
    what = f"{len(records)} log(s) ({names}), {head['label']}"
    return Baseline(what, head["val_bpb"], tuple(r.evals[name].val_loss for r in records))


def compare(records: Sequence[RunRecord], score: str, baseline: Baseline, min_gain: float) -> dict:
    """The delta to the baseline in bpb and nats, and the one-sided p-value over seeds."""
    losses = [r.evals[score].val_loss for r in records]
    bpbs = [r.evals[score].val_bpb for r in records]
    # On one validation text and tokenizer, nats per token and bits per byte are in one ratio.
    nats_per_bpb = float(np.mean(losses) / np.mean(bpbs))
    base_loss = float(np.mean(baseline.losses)) if baseline.losses else baseline.bpb * nats_per_bpb
    p = acceptance_p_value(losses, base_loss, baseline.losses or None, min_gain)
    test = "Welch's t, one-sided" if len(baseline.losses) > 1 else "one-sample t, one-sided"
    return {
        "what": baseline.what,
        "val_bpb": baseline.bpb,
        "val_loss": base_loss,
        "val_loss_from_bpb": not baseline.losses,
        "delta_bpb": float(np.mean(bpbs)) - baseline.bpb,
        "delta_nats": float(np.mean(losses)) - base_loss,
        "min_gain_nats": min_gain,
        "p_value": p,
        "test": test if p is not None else f"needs at least 2 seeds with spread (got {len(bpbs)})",
    }


# ----------------------------------------------------------------------------- limits


def seed_compliance(record: RunRecord, limits: TrackLimits = RECORD_LIMITS) -> dict[str, bool]:
    """Whether one run met the record track's limits."""
    one_step = record.step_avg_ms / 1000  # the cap is checked after each step: one step past it
    return {
        "train_under_600s": record.training_time_seconds <= limits.train_seconds + one_step,
        "artifact_under_16mb": record.artifact_bytes < limits.total_bytes,
        "eval_under_600s": record.eval_time_seconds <= limits.eval_seconds,
        "hardware_8xh100": record.num_gpus == 8 and "H100" in record.gpu_type,
    }


def track_warnings(records: Sequence[RunRecord], track: str) -> list[str]:
    """The runs that break the track's limits (none for a track without known limits)."""
    limits = TRACK_LIMITS.get(track)
    if limits is None:
        return []
    warnings = []
    for r in records:
        met = seed_compliance(r, limits)
        if not met["hardware_8xh100"]:
            warnings.append(f"{r.path}: trained on {r.hardware}; the {track} track's time limits "
                            f"are on {limits.hardware}")
        if not met["train_under_600s"]:
            warnings.append(f"{r.path}: training took {r.training_time_seconds:,.1f} s, over the "
                            f"{track} track's {limits.train_seconds:g} s")
        if not met["artifact_under_16mb"]:
            warnings.append(f"{r.path}: artifact {r.artifact_bytes:,} bytes, not under the {track} "
                            f"track's {limits.total_bytes:,}-byte cap")
        if not met["eval_under_600s"]:
            warnings.append(f"{r.path}: the evaluations took {r.eval_time_seconds:,.1f} s, over "
                            f"the {track} track's {limits.eval_seconds:g} s")
    return warnings


# ----------------------------------------------------------------------------- submission.json


def reproduction(records: Sequence[RunRecord]) -> dict:
    """The command per seed: every recorded setting that differs from the script's defaults (the
    seeds share them, check_consistent saw to it), then the launcher the run used."""
    logged, defaults = records[0].settings, {**DEFAULTS, **REMOVED_DEFAULTS}
    settings = {k: logged[k] for k in defaults
                if k in logged and not same_value(logged[k], defaults[k])}
    world = int(records[0].config.get("world_size", "1"))
    launch = "python train_gpt.py"
    if world > 1:
        launch = f"torchrun --standalone --nproc_per_node={world} train_gpt.py"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    commands = {str(r.seed): " ".join(filter(None, [env, f"SEED={r.seed}", launch]))
                for r in records}
    return {"settings": settings, "launch": launch, "commands": commands}


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _seed_results(records: Sequence[RunRecord], score: str) -> dict:
    return {
        str(r.seed): {
            "val_loss": r.evals[score].val_loss,
            "val_bpb": r.evals[score].val_bpb,
            "artifact_bytes": r.artifact_bytes,
            "steps": r.steps,
            "step_avg_ms": r.step_avg_ms,
            # the score's own evaluation (None only where its line has no eval_time); all the
            # run's evaluations together beside it
            "eval_time_s": _seconds(r.evals[score].eval_time_ms),
            "eval_time_total_s": r.eval_time_seconds,
            "train_time_s": r.training_time_seconds,
        }
        for r in records
    }


def _compliance(records: Sequence[RunRecord], score: str) -> dict:
    per_seed = [seed_compliance(r) for r in records]
    met = {key: all(s[key] for s in per_seed) for key in per_seed[0]}
    return {**met, "score_accepted": SCORES[score].kind == ACCEPTED,
            "per_seed": {str(r.seed): s for r, s in zip(records, per_seed, strict=True)}}


def _script_facts(script: Script | None) -> dict | None:
    if script is None:
        return None
    return {"form": script.form, "origin": script.origin, "bytes": len(script.data)}


def log_warnings(records: Sequence[RunRecord]) -> list[str]:
    """The runs' own WARNING lines (a misspelt setting, short data, GPTQ over the cap...)."""
    return [f"{r.path}: the run warned: {message}" for r in records for message in r.warnings]


def _headline_warnings(records: Sequence[RunRecord], score: str) -> list[str]:
    kind = SCORES[score].kind
    if kind == ACCEPTED:
        return []
    label = score_label(score, records[0])
    return [f"the headline score '{score}' ({label}) is {kind}: {KIND_WHY[kind]}"]


def build_submission(
    records: Sequence[RunRecord],
    score: str | None = None,
    meta: Meta | None = None,
    script: Script | None = None,
    baseline: Baseline | None = None,
    min_gain: float = 0.005,
) -> dict:
    """The submission.json content for the runs of one configuration."""
    if not records:
        raise SubmissionError("no logs given")
    meta = meta or Meta()
    check_consistent(records)
    score = resolve_score(records, score)
    head = aggregate(records, score)
    first = records[0]
    return {
        "name": meta.name,
        "author": meta.author,
        "github_id": meta.github_id,
        "date": meta.date or datetime.date.today().isoformat(),
        "track": meta.track,
        "blurb": meta.blurb,
        "val_loss": head["val_loss"],
        "val_bpb": head["val_bpb"],
        "val_loss_std": head["val_loss_std"],
        "val_bpb_std": head["val_bpb_std"],
        "seeds": [r.seed for r in records],
        "seed_results": _seed_results(records, score),
        "bytes_total": max(r.artifact_bytes for r in records),
        "bytes_code": len(script.data) if script else first.code_bytes,
        "score": score,
        "score_label": head["label"],
        "score_kind": head["kind"],
        "score_line": head["line"],
        "scores": {name: aggregate(records, name) for name in shared_scores(records)},
        "score_kinds": KIND_WHY,
        "hardware": first.hardware,
        "num_gpus": first.num_gpus,
        "gpu_type": first.gpu_type,
        "versions": first.versions,
        "training_time_seconds": max(r.training_time_seconds for r in records),
        "script": _script_facts(script),
        "reproduction": reproduction(records),
        "compliance": _compliance(records, score),
        "baseline": compare(records, score, baseline, min_gain) if baseline else None,
        "warnings": [*_headline_warnings(records, score), *(script.warnings if script else ()),
                     *track_warnings(records, meta.track), *log_warnings(records)],
    }


# ----------------------------------------------------------------------------- requirements.txt

# Import names whose pip package has another name, or that are optional extras.
PIP_NAMES = {"sentencepiece": "sentencepiece", "numpy": "numpy", "brotli": "brotli"}
OPTIONAL_NOTES = {"flash_attn_interface": "FlashAttention 3 for Hopper GPUs, built from its own "
                                          "repository; PyTorch SDPA is used without it"}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    return handler.type is not None and ast.unparse(handler.type).endswith("ImportError")


def _imports(source: str) -> dict[str, bool]:
    """Top-level modules the source imports -> required (False: only inside a try that catches
    ImportError, which the script runs without)."""
    tree = ast.parse(source)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for top in (name.split(".")[0] for name in names):
            found[top] = found.get(top, False) or id(node) not in guarded
    return found


def requirements(script: Script, records: Sequence[RunRecord]) -> str:
    """What the script imports beyond the standard library (and the compressor it loads by name),
    with torch pinned to the version the logs ran."""
    imports = {k: v for k, v in _imports(script.source).items() if k not in sys.stdlib_module_names}
    codecs = {records[0].compressor, script.form.removeprefix("packed (").rstrip(")")}
    imports.update({codec: True for codec in codecs & {"brotli"}})
    versions = records[0].versions
    torch_version = versions.get("pytorch", "")
    python = versions.get("python", "3")
    lines = [f"# What train_gpt.py needs beyond Python {python}'s standard library."]
    if torch_version:
        lines.append(f"# The logs ran PyTorch {torch_version}: install that build from PyTorch's "
                     "index.")
    for name in sorted(k for k, required in imports.items() if required):
        pin = f"=={torch_version.split('+')[0]}" if name == "torch" and torch_version else ""
        lines.append(PIP_NAMES.get(name, name) + pin)
    for name in sorted(k for k, required in imports.items() if not required):
        lines.append(f"# optional: {name} ({OPTIONAL_NOTES.get(name, 'imported when installed')})")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the folder


def _check_target(out: Path, force: bool) -> None:
    """An existing folder is replaced only with --force, and only if it is a record folder
    (submission.json, no subfolders): --force never deletes a folder this tool did not write."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise SubmissionError(f"{out}: exists and is not a folder; expected a new folder for the "
                              "record")
    if not force:
        raise SubmissionError(f"{out}: exists; --force replaces it")
    if not (out / "submission.json").is_file() or any(p.is_dir() for p in out.iterdir()):
        raise SubmissionError(f"{out}: not a record folder (no submission.json, or it holds "
                              "folders): --force replaces only a folder this tool wrote")


def write_folder(out: Path, files: dict[str, bytes], force: bool = False) -> None:
    """Every file into a temporary sibling, then one rename: a reader never sees half a folder,
    and a failure leaves the old folder (or none) in place."""
    _check_target(out, force)
    out = out.resolve()  # a name to put the siblings beside, even for --out with '..' in it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run of this process id
    try:
        tmp.mkdir()
        for name, data in files.items():
            write_atomic(tmp / name, data)
        if out.exists():
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Folder:
    files: dict[str, bytes]
    submission: dict
    records: list[RunRecord]


def plan_folder(args: argparse.Namespace) -> Folder:
    """Everything the folder holds, in memory: each refusal happens before anything is written."""
    records = [parse_log(path) for path in args.logs]
    check_consistent(records)
    script = recover_script(records, args.script)
    meta = Meta(args.name, args.author, args.github_id, args.blurb, args.track, args.date or "")
    baseline = read_baseline(args.baseline_bpb, args.baseline_logs)
    submission = build_submission(records, args.score, meta, script, baseline, args.min_gain)
    files = {"train_gpt.py": script.data, **{f"train_seed{r.seed}.log": r.data for r in records},
             "requirements.txt": requirements(script, records).encode("utf-8")}
    # The JSON and README are small; with them the folder must stay under the validator's cap.
    total = sum(map(len, files.values())) + 200_000
    if total >= FOLDER_CAP:
        submission["warnings"].append(f"the record folder holds about {total:,} bytes, not under "
                                      f"the challenge's {FOLDER_CAP:,}")
    text = json.dumps(submission, indent=2, allow_nan=False) + "\n"
    files["submission.json"] = text.encode("utf-8")
    files["README.md"] = render_readme(submission, records).encode("utf-8")
    return Folder(files, submission, records)


def summary(folder: Folder, out: Path) -> str:
    """The console's account: the table, the headline with its kind, the other scores labelled."""
    s, n = folder.submission, len(folder.records)
    lines = [results_table(folder.records, s), ""]
    kind = s["score_kind"] if s["score_kind"] == ACCEPTED else s["score_kind"].upper()
    lines.append(f"score: {s['score_label']} ({kind}), {s['score_line']} over {n} seed(s): "
                 f"val_loss {s['val_loss']:.8f} (std {s['val_loss_std']:.8f}), "
                 f"val_bpb {s['val_bpb']:.8f} (std {s['val_bpb_std']:.8f})")
    for name, block in s["scores"].items():
        if name != s["score"]:
            lines.append(f"beside it, {block['kind']}: {block['label']}, {block['line']}: "
                         f"val_bpb {block['val_bpb']:.8f} (std {block['val_bpb_std']:.8f})")
    cap = "under" if s["bytes_total"] < RECORD_LIMITS.total_bytes else "OVER"
    lines.append(f"artifact: {s['bytes_total']:,} bytes (max of the seeds), {cap} the "
                 f"{RECORD_LIMITS.total_bytes:,}-byte cap")
    if (b := s["baseline"]) is not None:
        p = f"{b['p_value']:.6g}" if b["p_value"] is not None else b["test"]
        lines.append(f"vs baseline {b['what']}: {b['delta_bpb']:+.8f} bpb, "
                     f"{b['delta_nats']:+.8f} nats; p-value (beats it by >= "
                     f"{b['min_gain_nats']} nats): {p}")
    script = s["script"]
    lines.append(f"wrote {out}/: train_gpt.py ({script['bytes']:,} bytes, {script['form']}), "
                 f"{', '.join(name for name in folder.files if name != 'train_gpt.py')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _iso_date(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.submission",
                                description="Write a record folder from train_gpt.py logs.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="run log, one per seed")
    p.add_argument("--out", required=True, type=Path,
                   help="the record folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing record folder")
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="the script that ran, for logs without their source (or a packed file)")
    p.add_argument("--score", choices=tuple(SCORES),
                   help="the headline score (default: the accepted one with the lowest mean "
                        "val_bpb that every log has; slot_context is causal but not accepted, "
                        "slot not causal)")
    p.add_argument("--name", default="", help="submission name")
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--blurb", default="", help="one-paragraph description")
    p.add_argument("--track", default="10min_16mb",
                   help="challenge track (default %(default)s: warns when a run is not on "
                        "8xH100, trains or evaluates over 600 s or has a total of 16,000,000 "
                        "bytes or more)")
    p.add_argument("--date", type=_iso_date, help="YYYY-MM-DD (default: today)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--baseline-bpb", type=float, metavar="BPB",
                          help="the record to beat: its val_bpb")
    baseline.add_argument("--baseline-logs", nargs="+", metavar="LOG",
                          help="the record to beat: its logs (Welch's t over both runs' seeds)")
    p.add_argument("--min-gain", type=float, default=0.005,
                   help="nats to beat the baseline by (default 0.005, the challenge's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        folder = plan_folder(args)
        write_folder(args.out, folder.files, args.force)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(summary(folder, args.out))
    for warning in folder.submission["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
