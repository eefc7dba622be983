"""Build a challenge submission (submission.json + results table) from run logs.

Every figure is read from the logs train_gpt.py writes, so the submission
cannot disagree with them (the original record's submission reported step
counts its logs did not show).

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
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

ARTIFACT_CAP = 16_000_000  # bytes, decimal: the challenge's limit
SEPARATOR = "=" * 100

# --score choice -> summary line tag; the precise figures are on tag + "_exact".
SCORE_TAGS = {
    "slot": "final_slot",
    "slot_context": "final_slot_context",
    "sliding": "final_int6_sliding_window",
    "sliding_s64": "final_int6_sliding_window_s64",
    "roundtrip": "final_int6_roundtrip",
}
# Config lines (named by their first key) that all seeds of a submission share.
CONFIG_LINES = (
    "model_params",
    "world_size",
    "train_batch_tokens",
    "attention_mode",
    "tie_embeddings",
)

STEP_RE = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
SEED_RE = re.compile(r"^seed:(\d+)\s*$")
ARTIFACT_RE = re.compile(r"^Total submission size int6\+(\w+): (\d+) bytes")
MODEL_RE = re.compile(r"^Serialized model int6\+\w+: (\d+) bytes")
CODE_RE = re.compile(r"^Code size: (\d+) bytes")
STOP_RE = re.compile(r"^stopping_early:\s*(\S+)")
# nvidia-smi device row: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |"
GPU_RE = re.compile(r"^\|\s+(\d+)\s+(\S.*?)\s+(?:On|Off)\s+\|\s+[0-9A-Fa-f]+:[0-9A-Fa-f:]+\.\d")


class SubmissionError(Exception):
    """A refusal: the message names the log (when there is one) and the reason."""


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    line: str  # the log tag the figures were read from
    eval_time_ms: float | None = None
    params: dict[str, str] = field(default_factory=dict)  # stride, steps, lr, mode...


@dataclass
class RunRecord:
    path: str
    seed: int
    steps: int  # steps actually run: the last step line's N
    iterations: int
    training_time_ms: float
    artifact_bytes: int
    model_bytes: int | None
    code_bytes: int
    compressor: str
    num_gpus: int
    gpu_type: str
    config: dict[str, str]  # key:value tokens of the CONFIG_LINES
    evals: dict[str, EvalResult]  # keyed by --score choice
    stop_reason: str | None = None

    @property
    def training_time_seconds(self) -> float:
        return self.training_time_ms / 1000.0


def _tokens(text: str) -> dict[str, str]:
    """The key:value words of a log line; words without a colon are skipped."""
    pairs = (word.partition(":") for word in text.split())
    return {key: value for key, colon, value in pairs if colon}


def _figure(tokens: dict[str, str], key: str, where: str) -> float:
    try:
        return float(tokens[key].removesuffix("ms"))
    except (KeyError, ValueError):
        raise ValueError(f"malformed '{where}' line: no number for {key}") from None


def _split_log(lines: list[str]) -> tuple[list[str], list[str]]:
    """(environment block, body). The body follows the last row of '='; the
    environment block (versions, nvidia-smi) lies between the last two rows,
    or starts the file when the source header was stripped."""
    rows = [i for i, line in enumerate(lines) if line.rstrip() == SEPARATOR]
    if not rows:
        return [], lines
    start = rows[-2] + 1 if len(rows) > 1 else 0
    return lines[start : rows[-1]], lines[rows[-1] + 1 :]


def _last_match(regex: re.Pattern, lines: list[str]) -> re.Match | None:
    found = None
    for line in lines:
        found = regex.match(line) or found
    return found


def _require(regex: re.Pattern, lines: list[str], reason: str) -> re.Match:
    found = _last_match(regex, lines)
    if found is None:
        raise ValueError(reason)
    return found


def _gpus(env: list[str]) -> tuple[int, str]:
    names = {}
    for line in env:
        row = GPU_RE.match(line)
        if row:
            names[int(row.group(1))] = row.group(2)
    if not names:
        return 0, "cpu"
    return len(names), ", ".join(sorted(set(names.values())))


def _training(body: list[str]) -> tuple[int, int, float]:
    """(steps run, iterations, training ms): the last step line's N/M and the
    last validation line's train_time."""
    steps = [(m, _tokens(m.group(3))) for m in map(STEP_RE.match, body) if m]
    if not steps:
        raise ValueError("no 'step:N/M' line: training did not run or the log is cut")
    last = steps[-1][0]
    timed = [tokens for _, tokens in steps if "val_loss" in tokens] or [steps[-1][1]]
    return int(last.group(1)), int(last.group(2)), _figure(timed[-1], "train_time", "step")


def _config(body: list[str]) -> dict[str, str]:
    config = {}
    for line in body:
        if line.partition(":")[0] in CONFIG_LINES:
            config.update(_tokens(line))
    return config


def _final_lines(body: list[str]) -> dict[str, list[dict[str, str]]]:
    finals: dict[str, list[dict[str, str]]] = {}
    for line in body:
        if line.startswith("final_"):
            tag, _, rest = line.partition(" ")
            finals.setdefault(tag, []).append(_tokens(rest))
    return finals


def _eval_result(finals: dict[str, list[dict[str, str]]], tag: str) -> EvalResult | None:
    # The original repeats final_int6_roundtrip_exact after each sliding
    # result, carrying that result: the round trip's own line is the first.
    pick = 0 if tag == SCORE_TAGS["roundtrip"] else -1
    source = tag + "_exact" if tag + "_exact" in finals else tag
    if source not in finals:
        return None
    figures = finals[source][pick]
    summary = finals[tag][pick] if tag in finals else {}
    eval_time = _figure(summary, "eval_time", tag) if "eval_time" in summary else None
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
    seed = _require(SEED_RE, body, "no 'seed:S' line")
    steps, iterations, train_ms = _training(body)
    artifact = _require(
        ARTIFACT_RE,
        body,
        "no 'Total submission size int6+...' line (artifact size): the log stops before it",
    )
    code = _require(CODE_RE, body, "no 'Code size' line")
    finals = _final_lines(body)
    evals = {name: r for name, tag in SCORE_TAGS.items() if (r := _eval_result(finals, tag))}
    if not evals:
        raise ValueError("no final evaluation line: the log is cut before evaluation")
    model = _last_match(MODEL_RE, body)
    stop = _last_match(STOP_RE, body)
    num_gpus, gpu_type = _gpus(env)
    return RunRecord(
        path=path,
        seed=int(seed.group(1)),
        steps=steps,
        iterations=iterations,
        training_time_ms=train_ms,
        artifact_bytes=int(artifact.group(2)),
        model_bytes=int(model.group(1)) if model else None,
        code_bytes=int(code.group(1)),
        compressor=artifact.group(1),
        num_gpus=num_gpus,
        gpu_type=gpu_type,
        config=_config(body),
        evals=evals,
        stop_reason=stop.group(1) if stop else None,
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
    return {
        **record.config,
        "code_bytes": str(record.code_bytes),
        "gpus": f"{record.num_gpus}x {record.gpu_type}",
    }


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


def resolve_score(records: Sequence[RunRecord], score: str | None = None) -> str:
    """The --score choice; by default SLOT when the logs have it, else the stride sliding window."""
    if score is None:
        score = "slot" if any("slot" in r.evals for r in records) else "sliding"
    for record in records:
        if score not in record.evals:
            raise SubmissionError(
                f"{record.path}: no {SCORE_TAGS[score]}_exact line for score '{score}': "
                "the log is cut or that evaluation was off"
            )
    return score


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


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
    loss_mean, loss_std = _mean_std([e.val_loss for e in results])
    bpb_mean, bpb_std = _mean_std([e.val_bpb for e in results])
    artifact_bytes = max(r.artifact_bytes for r in records)
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
        "val_loss": loss_mean,
        "val_bpb": bpb_mean,
        "val_loss_std": loss_std,
        "val_bpb_std": bpb_std,
        "artifact_bytes": artifact_bytes,
        "artifact_under_cap": artifact_bytes < ARTIFACT_CAP,
        "code_bytes": records[0].code_bytes,
        "score_line": ", ".join(sorted({e.line for e in results})),
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
TABLE_COLUMNS = (
    ("steps", lambda r: r.steps, "{:.1f}"),
    ("train time (s)", lambda r: r.training_time_seconds, "{:.3f}"),
    ("artifact bytes", lambda r: r.artifact_bytes, "{:.1f}"),
    ("roundtrip bpb", _bpb("roundtrip"), "{:.8f}"),
    ("sliding bpb", _bpb("sliding"), "{:.8f}"),
    ("s64 bpb", _bpb("sliding_s64"), "{:.8f}"),
    ("SLOT bpb", _bpb("slot"), "{:.8f}"),
    ("SLOT-context bpb", _bpb("slot_context"), "{:.8f}"),
)


def _cell(value: float | int | None, fmt: str) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else fmt.format(value)


def results_table(records: Sequence[RunRecord]) -> str:
    """Markdown table: a row per seed, then each column's mean over the seeds that have it."""
    rows = [["seed", *(h for h, _, _ in TABLE_COLUMNS)], ["---:"] * (len(TABLE_COLUMNS) + 1)]
    for r in records:
        rows.append([str(r.seed), *(_cell(get(r), fmt) for _, get, fmt in TABLE_COLUMNS)])
    means = ["mean"]
    for _, get, fmt in TABLE_COLUMNS:
        values = [v for v in map(get, records) if v is not None]
        means.append(_cell(float(np.mean(values)) if values else None, fmt))
    rows.append(means)
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and os.replace, so a
    reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _summary(submission: dict, runs: int) -> str:
    s = submission
    cap = "under" if s["artifact_under_cap"] else "OVER"
    lines = [
        f"score: {s['score_line']} over {runs} seed(s): "
        f"val_loss {s['val_loss']:.8f} (std {s['val_loss_std']:.8f}), "
        f"val_bpb {s['val_bpb']:.8f} (std {s['val_bpb_std']:.8f})",
        f"artifact: {s['artifact_bytes']:,} bytes (max of the seeds), "
        f"{cap} the {ARTIFACT_CAP:,}-byte cap",
    ]
    if s["score_line"].removesuffix("_exact") == SCORE_TAGS["slot"]:
        lines.append(
            "note: SLOT (scored) fits the targets it scores; reviewers hold it non-causal "
            "(see --score slot_context)"
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
        choices=tuple(SCORE_TAGS),
        help="evaluation that is the score (default: slot when the logs have it, else sliding)",
    )
    p.add_argument("--name", default="", help="submission name")
    p.add_argument("--author", default="")
    p.add_argument("--github-id", default="")
    p.add_argument("--blurb", default="", help="one-paragraph description")
    p.add_argument("--track", default="10min_16mb")
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
        table = results_table(records)
        args.out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(submission, indent=2, allow_nan=False) + "\n"
        write_atomic(args.out / "submission.json", text)
        write_atomic(args.out / "results_table.md", table)
    except SubmissionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(table)
    print(_summary(submission, len(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
