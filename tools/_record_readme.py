"""The record folder's README.md and the per-seed table, rendered from submission.json's content
and the parsed logs only, so the README says nothing the logs do not (tools.submission)."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

import numpy as np


KIND_LINES = (
    ("accepted", "the round trip, the sliding window at any stride and legal score-first TTT: what "
                 "the challenge's accepted records report"),
    ("causal, not accepted", "the context-only SLOT: it passes the flip test, but its legality was "
                             "never ruled on and no accepted record uses SLOT"),
    ("not causal", "the scored SLOT (the original's 0.74): fitted to the very targets it "
                   "scores, so not a compression result"),
)

# (header, value of a run, format of a float cell); ints print with thousands separators.
RUN_COLUMNS = (
    ("steps", lambda r: r.steps, "{:,.1f}"),
    ("ms/step", lambda r: r.step_avg_ms, "{:.2f}"),
    ("train s", lambda r: r.training_time_seconds, "{:.1f}"),
    ("eval s", lambda r: r.eval_time_seconds, "{:.1f}"),
    ("artifact bytes", lambda r: r.artifact_bytes, "{:,.1f}"),
)


def _bpb(name: str) -> Callable[[object], float | None]:
    return lambda r: r.evals[name].val_bpb if name in r.evals else None


def _cell(value: float | int | None, fmt: str) -> str:
    if value is None:
        return ""
    return f"{value:,}" if isinstance(value, int) else fmt.format(value)


def _score_columns(submission: dict) -> list[tuple]:
    """One column per score the logs hold (the seeds of one submission share their
    evaluations), each with its kind, the headline marked."""
    columns = []
    for name, block in submission["scores"].items():
        mark = ", the score" if name == submission["score"] else ""
        columns.append((f"{block['label']} bpb ({block['kind']}{mark})", _bpb(name), "{:.8f}"))
    return columns


def _summary_row(label: str, columns: list[tuple], records: Sequence[object],
                 spread: bool) -> list[str]:
    row = [label]
    for _, get, fmt in columns:
        values = [v for v in map(get, records) if v is not None]
        if not values:
            row.append("")
            continue
        a = np.asarray(values, dtype=float)
        value = (float(a.std(ddof=1)) if a.size > 1 else 0.0) if spread else float(a.mean())
        row.append(fmt.format(value))
    return row


def results_table(records: Sequence[object], submission: dict) -> str:
    """Markdown table: a row per seed, then each column's mean and std over the seeds."""
    columns = [*RUN_COLUMNS, *_score_columns(submission)]
    rows = [["seed", *(h for h, _, _ in columns)], ["---:"] * (len(columns) + 1)]
    for r in records:
        rows.append([str(r.seed), *(_cell(get(r), fmt) for _, get, fmt in columns)])
    rows.append(_summary_row("mean", columns, records, spread=False))
    rows.append(_summary_row("std", columns, records, spread=True))
    return "".join("| " + " | ".join(row) + " |\n" for row in rows)


def _headline(s: dict) -> list[str]:
    kind = s["score_kind"]
    lines = [
        f"# {s['name'] or 'Record'}",
        "",
        f"**val_bpb {s['val_bpb']:.8f}**: {s['score_label']} (`{s['score_line']}`), **{kind}**; "
        f"mean of {len(s['seeds'])} seed(s), std {s['val_bpb_std']:.8f}; val_loss "
        f"{s['val_loss']:.8f} nats. Total {s['bytes_total']:,} bytes (largest seed), "
        f"{s['hardware']}, track `{s['track']}`.",
    ]
    if kind != "accepted":
        lines += ["", f"> **This headline is not an accepted kind of score: {kind}.** "
                      f"{s['score_kinds'][kind]}."]
    if s["blurb"]:
        lines += ["", s["blurb"]]
    lines += ["", "Kinds of score:"]
    lines += [f"- **{kind}**: {text}." for kind, text in KIND_LINES]
    return lines


def _scores(s: dict) -> list[str]:
    lines = ["", "## Scores (mean over the seeds)", "",
             "| score | kind | log line | val_bpb | std | val_loss (nats) | std |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, b in s["scores"].items():
        label = f"**{b['label']} (the score)**" if name == s["score"] else b["label"]
        lines.append(f"| {label} | {b['kind']} | `{b['line']}` | {b['val_bpb']:.8f} | "
                     f"{b['val_bpb_std']:.8f} | {b['val_loss']:.8f} | {b['val_loss_std']:.8f} |")
    return lines


def _comparison(s: dict) -> list[str]:
    lines = ["", "## Against a baseline", ""]
    b = s["baseline"]
    if b is None:
        return lines + ["No baseline was given (`--baseline-bpb` or `--baseline-logs`): no delta, "
                        "no p-value."]
    note = " (from its bpb, with this run's nats per bpb)" if b["val_loss_from_bpb"] else ""
    p = f"{b['p_value']:.3g} ({b['test']})" if b["p_value"] is not None else f"none: {b['test']}"
    return lines + [
        f"- baseline: {b['what']}: val_bpb {b['val_bpb']:.8f}, val_loss {b['val_loss']:.8f} "
        f"nats{note}",
        f"- delta: {b['delta_bpb']:+.8f} bpb, {b['delta_nats']:+.8f} nats",
        f"- p-value that this run beats the baseline by at least {b['min_gain_nats']} nats: {p}",
    ]


def _wrapped(words: list[str], width: int = 92) -> list[str]:
    """Words in lines of about `width` characters."""
    lines, line = [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line] if line else lines


def _reproduction(s: dict, records: Sequence[object]) -> list[str]:
    """The shared settings exported once, then a line per seed (submission.json's "commands"
    spell each seed's in full)."""
    rep = s["reproduction"]
    shared = [f"{k}={shlex.quote(v)}" for k, v in rep["settings"].items()]
    exports = [f"export {line}" for line in _wrapped(shared)]
    seeds = [f"SEED={seed} {rep['launch']}" for seed in s["seeds"]]
    preset = rep["settings"].get("PRESET")
    others = "the script's defaults"
    if preset:
        others += f", or those of `presets/{preset}.env` (`PRESET={preset}`)"
    params = records[0].config.get("model_params", "?")
    return ["", "## Reproduction", "", "```bash", *exports, *seeds, "```", "",
            "The settings listed are every setting the logs record that differs from the script's "
            "defaults; those the logs do not record (model width and depth, optimizer details) "
            f"are {others}. Each log's `model_params:{params}` checks the model built."]


def _hardware(s: dict, records: Sequence[object]) -> list[str]:
    v, world = s["versions"], records[0].config.get("world_size", "?")
    driver = f" (driver {v['driver']}, CUDA {v['cuda']})" if "driver" in v else ""
    return ["", "## Hardware and versions", "",
            f"- {s['hardware']}{driver}, world size {world}",
            f"- Python {v.get('python', 'not logged')}, PyTorch {v.get('pytorch', 'not logged')}"]


def _yes(ok: bool, figure: str) -> str:
    return f"{'yes' if ok else '**no**'} ({figure})"


def _compliance_row(r: object, met: dict[str, bool]) -> str:
    cells = (_yes(met["train_under_600s"], f"{r.training_time_seconds:.1f} s"),
             _yes(met["artifact_under_16mb"], f"{r.artifact_bytes:,}"),
             _yes(met["eval_under_600s"], f"{r.eval_time_seconds:.1f} s"),
             _yes(met["hardware_8xh100"], r.hardware))
    return f"| {r.seed} | " + " | ".join(cells) + " |"


def _compliance(s: dict, records: Sequence[object]) -> list[str]:
    kind = s["score_kind"]
    accepted = "is accepted" if kind == "accepted" else f"is **not** accepted ({kind})"
    track = ""
    if s["track"] != "10min_16mb":
        track = f" (this folder's track, `{s['track']}`, is not the record track: for comparison)"
    return ["", "## Compliance", "",
            f"- Score: the headline, {s['score_label']}, {accepted}: {s['score_kinds'][kind]}.",
            f"- The record track's limits{track}: training 600 s, artifact total (model + code) "
            "under 16,000,000 bytes, evaluation 600 s (all the logged evaluations together), "
            "on 8×H100.",
            "", "| seed | training | total bytes | evaluation | 8×H100 |", "|---:|---|---|---|---|",
            *(_compliance_row(r, s["compliance"]["per_seed"][str(r.seed)]) for r in records)]


def _files(s: dict) -> list[str]:
    script = s["script"]
    logs = ", ".join(f"`train_seed{seed}.log`" for seed in s["seeds"])
    lines = ["", "## Files", "",
             f"- `train_gpt.py`: the script the logs ran, {script['form']}, {script['bytes']:,} "
             f"bytes; {script['origin']}.",
             f"- {logs}: the run logs, as written.",
             "- `submission.json`: these figures; `requirements.txt`: what the script imports."]
    if s["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in s["warnings"])]
    return lines + ["", "Generated by `python -m tools.submission` from the logs: every figure "
                        "is theirs."]


def render_readme(submission: dict, records: Sequence[object]) -> str:
    s = submission
    table = results_table(records, s).rstrip("\n")
    lines = [*_headline(s), *_scores(s), "", "## Per seed", "", table, *_comparison(s),
             *_reproduction(s, records), *_hardware(s, records), *_compliance(s, records),
             *_files(s)]
    return "\n".join(lines) + "\n"
