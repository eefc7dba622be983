"""Build a challenge submission (submission.json + results table) from run logs.

Every figure is read from the logs train_gpt.py writes, so the submission
cannot disagree with them (the original record's submission reported step
counts its logs did not show). The score is, by default, the best causal
evaluation the logs have (sliding window, SLOT context, legal TTT); the
non-causal SLOT figure, when present, stands beside it, labelled. A run that
breaks its track's limits (time, bytes, hardware) gets a warning, on stderr and
in submission.json's "warnings".

    python -m tools.submission logs/a.txt logs/b.txt logs/c.txt --out records/x
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

SEPARATOR = "=" * 100


@dataclass(frozen=True)
class Score:
    tag: str  # the summary line's name; the precise figures are on tag + "_exact"
    label: str
    causal: bool  # passes the flip test: no target's score reads later tokens (docs/evaluation.md)


# --score choices, in the results table's column order.
SCORES = {
    "roundtrip": Score("final_int6_roundtrip", "roundtrip", True),
    "sliding": Score("final_int6_sliding_window", "sliding", True),
    "sliding_s64": Score("final_int6_sliding_window_s64", "s64", True),
    "slot_context": Score("final_slot_context", "SLOT context", True),
    "legal_ttt": Score("legal_ttt", "legal TTT", True),
    "slot": Score("final_slot", "SLOT scored", False),
}
NOT_CAUSAL_WHY = (
    "SLOT in its scored mode fits delta and bias to the very targets it then scores (it fails the flip "
    "test, docs/evaluation.md): not a compression result"
)


@dataclass(frozen=True)
class TrackLimits:
    train_seconds: float
    artifact_bytes: int  # the total must stay under it
    hardware: str  # what the time limit is measured on


TRACK_LIMITS = {"10min_16mb": TrackLimits(600.0, 16_000_000, "8xH100")}
ARTIFACT_CAP = TRACK_LIMITS["10min_16mb"].artifact_bytes  # bytes, decimal: the challenge's limit

# Config lines (named by their first key) that all seeds of a submission share.
CONFIG_LINES = (
    "model_params",
    "world_size",
    "train_batch_tokens",
    "attention_mode",
    "tie_embeddings",
)
_EVAL_TAGS = "|".join(s.tag for s in SCORES.values())

# Every log line this tool reads, in the format train_gpt.py writes it: a parsed line is a
# contract, so a change of format there is a change of this table. Further figures of the step
# and evaluation lines are read by name from their key:value words (group "rest").
LOG_LINES = {
    # step:N/M train_loss:… train_time:…ms step_avg:…ms
    # step:N/M val_loss:… val_bpb:… train_time:…ms step_avg:…ms
    "step": re.compile(r"^step:(?P<step>\d+)/(?P<iterations>\d+)\s+(?P<rest>.*)$"),
    "seed": re.compile(r"^seed:(?P<seed>\d+)\s*$"),
    "config": re.compile(rf"^(?P<key>{'|'.join(CONFIG_LINES)}):"),
    "stop": re.compile(r"^stopping_early:\s*(?P<reason>\S+)"),
    "code": re.compile(r"^Code size: (?P<bytes>\d+) bytes"),
    "model": re.compile(r"^Serialized model int6\+\w+: (?P<bytes>\d+) bytes"),
    "artifact": re.compile(r"^Total submission size int6\+(?P<compressor>\w+): (?P<bytes>\d+) bytes"),
    # <tag> val_loss:%.4f val_bpb:%.4f [stride:… | steps:… lr:…] eval_time:…ms [mode:…]
    # <tag>_exact val_loss:%.8f val_bpb:%.8f
    "eval": re.compile(
        rf"^(?P<tag>{_EVAL_TAGS})(?P<exact>_exact)? "
        r"val_loss:(?P<val_loss>\S+) val_bpb:(?P<val_bpb>\S+)(?P<rest>.*)$"
    ),
    # nvidia-smi device row: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |"
    "gpu": re.compile(
        r"^\|\s+(?P<index>\d+)\s+(?P<name>\S.*?)\s+(?:On|Off)\s+\|\s+[0-9A-Fa-f]+:[0-9A-Fa-f:]+\.\d"
    ),
}


class SubmissionError(Exception):
    """A refusal: the message names the log (when there is one) and the reason."""


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    line: str  # the log line the figures were read from
    eval_time_ms: float | None = None
    params: dict[str, str] = field(default_factory=dict)  # stride, steps, lr, mode...


@dataclass
class RunRecord:
    path: str
    seed: int
    steps: int  # steps actually run: the last step line's N
    iterations: int
    training_time_ms: float
    step_avg_ms: float  # on the line training_time_ms was read from
    artifact_bytes: int
    model_bytes: int | None
    code_bytes: int
    compressor: str
    num_gpus: int
    gpu_type: str
    config: dict[str, str]  # key:value words of the CONFIG_LINES
    evals: dict[str, EvalResult]  # keyed by --score choice
    stop_reason: str | None = None

    @property
    def training_time_seconds(self) -> float:
        return self.training_time_ms / 1000.0

    @property
    def hardware(self) -> str:
        return f"{self.num_gpus}x {self.gpu_type}" if self.num_gpus else self.gpu_type


def _tokens(text: str) -> dict[str, str]:
    """The key:value words of a log line; words without a colon are skipped."""
    pairs = (word.partition(":") for word in text.split())
    return {key: value for key, colon, value in pairs if colon}


def _figure(words: dict[str, str], key: str, where: str) -> float:
    try:
        value = float(words[key].removesuffix("ms"))
    except (KeyError, ValueError):
        raise ValueError(f"malformed '{where}' line: no number for {key}") from None
    if not math.isfinite(value):
        raise ValueError(f"'{where}' line: {key} is {words[key]}, not a finite number")
    return value


def _split_log(lines: list[str]) -> tuple[list[str], list[str]]:
    """(environment block, body). The body follows the last row of '='; the
    environment block (versions, nvidia-smi) lies between the last two rows,
    or starts the file when the source header was stripped."""
    rows = [i for i, line in enumerate(lines) if line.rstrip() == SEPARATOR]
    if not rows:
        return [], lines
    start = rows[-2] + 1 if len(rows) > 1 else 0
    return lines[start : rows[-1]], lines[rows[-1] + 1 :]


def _matches(kind: str, lines: list[str]) -> list[re.Match]:
    return [m for m in map(LOG_LINES[kind].match, lines) if m]


def _last(kind: str, lines: list[str]) -> re.Match | None:
    found = _matches(kind, lines)
    return found[-1] if found else None


def _require(kind: str, lines: list[str], reason: str) -> re.Match:
    found = _last(kind, lines)
    if found is None:
        raise ValueError(reason)
    return found


def _gpus(env: list[str]) -> tuple[int, str]:
    names = {int(m["index"]): m["name"] for m in _matches("gpu", env)}
    if not names:
        return 0, "cpu"
    return len(names), ", ".join(sorted(set(names.values())))


def _training(body: list[str]) -> tuple[int, int, float, float]:
    """(steps run, iterations, training ms, step average ms): the last step line's N/M and
    the last validation line's train_time and step_avg."""
    steps = [(m, _tokens(m["rest"])) for m in _matches("step", body)]
    if not steps:
        raise ValueError("no 'step:N/M' line: training did not run or the log is cut")
    last = steps[-1][0]
    timed = [words for _, words in steps if "val_loss" in words] or [steps[-1][1]]
    train_ms, step_avg_ms = (_figure(timed[-1], key, "step") for key in ("train_time", "step_avg"))
    return int(last["step"]), int(last["iterations"]), train_ms, step_avg_ms


def _config(body: list[str]) -> dict[str, str]:
    config = {}
    for line in body:
        if LOG_LINES["config"].match(line):
            config.update(_tokens(line))
    return config


def _eval_lines(body: list[str]) -> dict[str, list[dict[str, str]]]:
    """The key:value words of every evaluation line, by line name (tag or tag_exact), in log order."""
    lines: dict[str, list[dict[str, str]]] = {}
    for m in _matches("eval", body):
        words = {**_tokens(m["rest"]), "val_loss": m["val_loss"], "val_bpb": m["val_bpb"]}
        lines.setdefault(m["tag"] + (m["exact"] or ""), []).append(words)
    return lines


def _eval_result(lines: dict[str, list[dict[str, str]]], score: Score) -> EvalResult | None:
    # The original repeats final_int6_roundtrip_exact after each sliding result, carrying that
    # result: the round trip's own line is the first.
    pick = 0 if score is SCORES["roundtrip"] else -1
    exact = score.tag + "_exact"
    source = exact if exact in lines else score.tag
    if source not in lines:
        return None
    figures = lines[source][pick]
    summary = lines[score.tag][pick] if score.tag in lines else {}
    eval_time = _figure(summary, "eval_time", score.tag) if "eval_time" in summary else None
    params = {k: v for k, v in summary.items() if k not in ("val_loss", "val_bpb", "eval_time")}
    return EvalResult(
        val_loss=_figure(figures, "val_loss", source),
        val_bpb=_figure(figures, "val_bpb", source),
        line=source,
        eval_time_ms=eval_time,
        params=params,
    )


def _parse(path: str, text: str) -> RunRecord:
    env, body = _split_log(text.splitlines())
    seed = _require("seed", body, "no 'seed:S' line")
    steps, iterations, train_ms, step_avg_ms = _training(body)
    artifact = _require(
        "artifact", body, "no 'Total submission size int6+...' line (artifact size): the log stops before it"
    )
    code = _require("code", body, "no 'Code size' line")
    lines = _eval_lines(body)
    evals = {name: r for name, score in SCORES.items() if (r := _eval_result(lines, score))}
    if not evals:
        raise ValueError("no final evaluation line: the log is cut before evaluation")
    model = _last("model", body)
    stop = _last("stop", body)
    num_gpus, gpu_type = _gpus(env)
    return RunRecord(
        path=path,
        seed=int(seed["seed"]),
        steps=steps,
        iterations=iterations,
        training_time_ms=train_ms,
        step_avg_ms=step_avg_ms,
        artifact_bytes=int(artifact["bytes"]),
        model_bytes=int(model["bytes"]) if model else None,
        code_bytes=int(code["bytes"]),
        compressor=artifact["compressor"],
        num_gpus=num_gpus,
        gpu_type=gpu_type,
        config=_config(body),
        evals=evals,
        stop_reason=stop["reason"] if stop else None,
    )


def parse_log(path: str | os.PathLike) -> RunRecord:
    """Read one train_gpt.py log; SubmissionError when it is unreadable or incomplete."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _parse(str(path), text)
    except ValueError as exc:
        raise SubmissionError(f"{path}: {exc}") from None


def _identity(record: RunRecord) -> dict[str, str]:
    """What the seeds of one submission share: configuration, script (by its size), hardware."""
    return {**record.config, "code_bytes": str(record.code_bytes), "gpus": record.hardware}


def check_consistent(records: Sequence[RunRecord]) -> None:
    """Refuse logs of different configurations and repeated seeds."""
    first, seen = records[0], {}
    for record in records:
        a, b = _identity(first), _identity(record)
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if keys:
            diffs = "; ".join(f"{k} {a.get(k, 'absent')} vs {b.get(k, 'absent')}" for k in keys)
            raise SubmissionError(f"{record.path}: config differs from {first.path}: {diffs}")
        if record.seed in seen:
            raise SubmissionError(
                f"{record.path}: seed {record.seed} duplicates {seen[record.seed]}: "
                "each run needs its own seed"
            )
        seen[record.seed] = record.path


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def _mean_bpb(records: Sequence[RunRecord], score: str) -> float:
    return _mean_std([r.evals[score].val_bpb for r in records])[0]


def _shared(records: Sequence[RunRecord], causal: bool) -> list[str]:
    """The scores of this causality that every log has, in SCORES order."""
    return [
        name
        for name, s in SCORES.items()
        if s.causal == causal and all(name in r.evals for r in records)
    ]


def resolve_score(records: Sequence[RunRecord], score: str | None = None) -> str:
    """The --score choice; by default the causal evaluation with the lowest mean val_bpb
    among those every log has."""
    if score is None:
        causal = _shared(records, causal=True)
        if not causal:
            raise SubmissionError(
                f"{', '.join(r.path for r in records)}: no causal evaluation line present in every log "
                "(the non-causal SLOT needs --score slot)"
            )
        return min(causal, key=lambda name: _mean_bpb(records, name))
    for record in records:
        if score not in record.evals:
            raise SubmissionError(
                f"{record.path}: no {SCORES[score].tag}_exact line for score '{score}': "
                "the log is cut or that evaluation was off"
            )
    return score


def _aggregate(records: Sequence[RunRecord], score: str) -> dict:
    results = [r.evals[score] for r in records]
    loss_mean, loss_std = _mean_std([e.val_loss for e in results])
    bpb_mean, bpb_std = _mean_std([e.val_bpb for e in results])
    return {
        "line": ", ".join(sorted({e.line for e in results})),
        "val_loss": loss_mean,
        "val_bpb": bpb_mean,
        "val_loss_std": loss_std,
        "val_bpb_std": bpb_std,
    }


def _beside(records: Sequence[RunRecord], score: str) -> dict:
    """The figures shown beside the score, labelled: the non-causal ones beside a causal score,
    the best causal one beside a non-causal score."""
    if SCORES[score].causal:
        others = _shared(records, causal=False)
        if not others:
            return {}
        return {"not_causal": {name: {**_aggregate(records, name), "why": NOT_CAUSAL_WHY} for name in others}}
    causal = _shared(records, causal=True)
    if not causal:
        return {}
    best = min(causal, key=lambda name: _mean_bpb(records, name))
    return {"best_causal": {"score": best, **_aggregate(records, best)}}


def track_warnings(records: Sequence[RunRecord], track: str) -> list[str]:
    """The runs that break the track's limits (none for a track without known limits)."""
    limits = TRACK_LIMITS.get(track)
    if limits is None:
        return []
    warnings = []
    for r in records:
        if r.num_gpus != 8 or "H100" not in r.gpu_type:
            warnings.append(
                f"{r.path}: trained on {r.hardware}; the {track} track's time limit is on {limits.hardware}"
            )
        # The wall-clock cap is checked after each step: a capped run ends within one step past it.
        if r.training_time_seconds > limits.train_seconds + r.step_avg_ms / 1000.0:
            warnings.append(
                f"{r.path}: training took {r.training_time_seconds:,.1f} s, over the {track} track's "
                f"{limits.train_seconds:g} s"
            )
        if r.artifact_bytes >= limits.artifact_bytes:
            warnings.append(
                f"{r.path}: artifact {r.artifact_bytes:,} bytes, not under the {track} track's "
                f"{limits.artifact_bytes:,}-byte cap"
            )
    return warnings


def acceptance_p_value(
    losses: Sequence[float],
    baseline_mean: float | None = None,
    baseline_losses: Sequence[float] | None = None,
    min_gain: float = 0.005,
) -> float | None:
    """One-sided p-value that the runs' val_loss beats the baseline by at
    least min_gain nats; None with fewer than 2 runs or a degenerate sample."""
    if len(losses) < 2:
        return None
    x = np.asarray(losses, dtype=float)
    if baseline_losses is not None:
        if len(baseline_losses) < 2:
            raise SubmissionError("--baseline-losses needs at least 2 values, else --baseline-mean")
        # Shifting the new losses by min_gain tests mean(baseline) - mean(new) > min_gain.
        base = np.asarray(baseline_losses, dtype=float)
        result = stats.ttest_ind(base, x + min_gain, equal_var=False, alternative="greater")
    else:
        result = stats.ttest_1samp(baseline_mean - x - min_gain, 0.0, alternative="greater")
    p = float(result.pvalue)
    return None if math.isnan(p) else p


def build_submission(
    records: Sequence[RunRecord],
    score: str | None = None,
    *,
    name: str = "",
    author: str = "",
    github_id: str = "",
    blurb: str = "",
    track: str = "10min_16mb",
    date: str | None = None,
    baseline_mean: float | None = None,
    baseline_losses: Sequence[float] | None = None,
    min_gain: float = 0.005,
) -> dict:
    """The submission.json content for the runs of one configuration."""
    if not records:
        raise SubmissionError("no logs given")
    check_consistent(records)
    score = resolve_score(records, score)
    results = [r.evals[score] for r in records]
    head = _aggregate(records, score)
    artifact_bytes = max(r.artifact_bytes for r in records)
    warnings = [] if SCORES[score].causal else [f"score '{score}' is not causal: {NOT_CAUSAL_WHY}"]
    submission = {
        "name": name,
        "author": author,
        "github_id": github_id,
        "date": date or datetime.date.today().isoformat(),
        "track": track,
        "num_gpus": records[0].num_gpus,
        "gpu_type": records[0].gpu_type,
        # The slowest seed, since every seed must fit the time limit.
        "training_time_seconds": max(r.training_time_seconds for r in records),
        "seed_results": {
            str(r.seed): {
                "val_loss": e.val_loss,
                "val_bpb": e.val_bpb,
                "steps": r.steps,
                "artifact_bytes": r.artifact_bytes,
                "training_time_seconds": r.training_time_seconds,
            }
            for r, e in zip(records, results, strict=True)
        },
        "val_loss": head["val_loss"],
        "val_bpb": head["val_bpb"],
        "val_loss_std": head["val_loss_std"],
        "val_bpb_std": head["val_bpb_std"],
        "score": score,
        "score_causal": SCORES[score].causal,
        "score_line": head["line"],
        **_beside(records, score),
        "artifact_bytes": artifact_bytes,
        "artifact_under_cap": artifact_bytes < ARTIFACT_CAP,
        "code_bytes": records[0].code_bytes,
        "warnings": warnings + track_warnings(records, track),
        "blurb": blurb,
    }
    if baseline_mean is not None or baseline_losses is not None:
        losses = [e.val_loss for e in results]
        p_value = acceptance_p_value(losses, baseline_mean, baseline_losses, min_gain)
        submission["p_value"] = p_value
        submission["baseline"] = baseline_mean if baseline_losses is None else list(baseline_losses)
        submission["min_gain"] = min_gain
    return submission


def _bpb(score: str) -> Callable[[RunRecord], float | None]:
    return lambda r: r.evals[score].val_bpb if score in r.evals else None


# (header, value of a run, format of a float cell); ints print as they are.
RUN_COLUMNS = (
    ("steps", lambda r: r.steps, "{:.1f}"),
    ("train time (s)", lambda r: r.training_time_seconds, "{:.3f}"),
    ("artifact bytes", lambda r: r.artifact_bytes, "{:.1f}"),
)


def _score_header(name: str, score: str) -> str:
    s = SCORES[name]
    return f"{s.label} bpb" + ("" if s.causal else " (NOT causal)") + (" (score)" if name == score else "")


def _cell(value: float | int | None, fmt: str) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else fmt.format(value)


def results_table(records: Sequence[RunRecord], score: str) -> str:
    """Markdown table: a row per seed, then each column's mean over the seeds that have it. One
    column per evaluation some log has, the non-causal ones and the score marked."""
    present = [name for name in SCORES if any(name in r.evals for r in records)]
    columns = [*RUN_COLUMNS, *((_score_header(name, score), _bpb(name), "{:.8f}") for name in present)]
    rows = [["seed", *(h for h, _, _ in columns)], ["---:"] * (len(columns) + 1)]
    for r in records:
        rows.append([str(r.seed), *(_cell(get(r), fmt) for _, get, fmt in columns)])
    means = ["mean"]
    for _, get, fmt in columns:
        values = [v for v in map(get, records) if v is not None]
        means.append(_cell(float(np.mean(values)) if values else None, fmt))
    rows.append(means)
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


def write_atomic(path: Path, text: str) -> None:
    """train_gpt.py's atomic writer: a reader never sees half a file."""
    from tools._common import import_train_gpt  # here: parsing logs needs no torch
    import_train_gpt().write_atomic(path, text.encode("utf-8"))


def _figures(block: dict) -> str:
    return (
        f"val_loss {block['val_loss']:.8f} (std {block['val_loss_std']:.8f}), "
        f"val_bpb {block['val_bpb']:.8f} (std {block['val_bpb_std']:.8f})"
    )


def _summary(submission: dict, runs: int) -> str:
    s = submission
    label = SCORES[s["score"]].label
    causality = "causal" if s["score_causal"] else "NOT causal"
    cap = "under" if s["artifact_under_cap"] else "OVER"
    lines = [f"score: {label} ({causality}), {s['score_line']} over {runs} seed(s): {_figures(s)}"]
    for name, block in s.get("not_causal", {}).items():
        lines.append(f"beside it, NOT causal: {SCORES[name].label}, {block['line']}: {_figures(block)}")
    if "best_causal" in s:
        block = s["best_causal"]
        label = SCORES[block["score"]].label
        lines.append(f"beside it, the best causal: {label}, {block['line']}: {_figures(block)}")
    lines.append(
        f"artifact: {s['artifact_bytes']:,} bytes (max of the seeds), {cap} the {ARTIFACT_CAP:,}-byte cap"
    )
    if "p_value" in s:
        p = s["p_value"]
        value = f"{p:.6g}" if p is not None else f"needs at least 2 runs with spread (got {runs})"
        claim = f"beats baseline {s['baseline']} by >= {s['min_gain']} nats"
        lines.append(f"p-value ({claim}): {value}")
    return "\n".join(lines)


def _iso_date(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers a,b,c: {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.submission",
        description="Write submission.json and results_table.md from train_gpt.py logs.",
    )
    p.add_argument("logs", nargs="+", metavar="LOG", help="run log, one per seed")
    p.add_argument("--out", required=True, type=Path, help="output folder (created when missing)")
    p.add_argument(
        "--score",
        choices=tuple(SCORES),
        help="evaluation that is the score (default: the causal one with the lowest mean val_bpb "
        "that every log has; 'slot' is not causal, see docs/evaluation.md)",
    )
    p.add_argument("--name", default="", help="submission name")
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--blurb", default="", help="one-paragraph description")
    p.add_argument(
        "--track",
        default="10min_16mb",
        help="challenge track (default %(default)s: warns when a run is not on 8xH100, trains over "
        "600 s or has an artifact of 16,000,000 bytes or more)",
    )
    p.add_argument("--date", type=_iso_date, help="YYYY-MM-DD (default: today)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument(
        "--baseline-mean", type=float, help="mean val_loss of the record to beat (one-sample t)"
    )
    baseline.add_argument(
        "--baseline-losses",
        type=_float_list,
        help="per-seed val_loss of the record to beat, a,b,c (Welch's t-test)",
    )
    p.add_argument(
        "--min-gain", type=float, default=0.005, help="nats to beat the baseline by (default 0.005)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        records = [parse_log(path) for path in args.logs]
        submission = build_submission(
            records,
            args.score,
            name=args.name,
            author=args.author,
            github_id=args.github_id,
            blurb=args.blurb,
            track=args.track,
            date=args.date,
            baseline_mean=args.baseline_mean,
            baseline_losses=args.baseline_losses,
            min_gain=args.min_gain,
        )
        table = results_table(records, submission["score"])
        args.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(submission, indent=2, allow_nan=False) + "\n"
        write_atomic(args.out / "submission.json", text)
        write_atomic(args.out / "results_table.md", table)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(_summary(submission, len(records)))
    for warning in submission["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
