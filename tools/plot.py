"""Runs side by side as a picture: train loss by step and by training time, and val_bpb by kind
of score (`python -m tools.plot LOG... --out FILE.png`). Logs are read by
tools.submission.parse_log: anything but a finished run is refused in one line."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from tools._files import write_atomic
from tools.runlog import EVAL_TAGS, step_times, train_losses
from tools.submission import SCORES, RunRecord, SubmissionError, parse_log

STYLES = ("-", "--", ":", "-.")


def configurations(records: list[RunRecord]) -> list[list[RunRecord]]:
    """The runs grouped by configuration, in the order given: the settings and configuration
    lines a log records, less its seed; a seed met twice starts another configuration."""
    groups: list[tuple[tuple, list[RunRecord]]] = []
    for r in records:
        key = (sorted((k, v) for k, v in r.settings.items() if k != "SEED"),
               sorted((k, v) for k, v in r.config.items() if k != "seed"))
        group = next((g for k, g in groups if k == key and r.seed not in {x.seed for x in g}),
                     None)
        if group is None:
            groups.append((key, group := []))
        group.append(r)
    return [g for _, g in groups]


def labels(groups: list[list[RunRecord]]) -> list[str]:
    """Each configuration by its first log's name (with its folder where names repeat), seeds."""
    stems = [Path(r.path).stem for g in groups for r in g]
    out = []
    for g in groups:
        first = Path(g[0].path)
        name = first.stem if stems.count(first.stem) == 1 else f"{first.parent.name}/{first.stem}"
        out.append(f"{name} (seed{'s' if len(g) > 1 else ''} {', '.join(str(r.seed) for r in g)})")
    return out


def draw(records: list[RunRecord]):
    """Train loss by step and by training time; per evaluation (the tick says its kind), each
    seed's val_bpb a point, its mean a short line. Colour Cn per configuration, a style per seed."""
    from matplotlib.figure import Figure  # no pyplot: no backend, no global figure list

    groups = configurations(records)
    names = [n for n in EVAL_TAGS if any(n in r.evals for g in groups for r in g)]
    width = 0.8 / len(groups)
    fig = Figure(figsize=(16, 4.8), layout="tight")
    by_step, by_time, evals = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=(1, 1, 1.3)))
    for gi, (group, label) in enumerate(zip(groups, labels(groups))):
        colour = f"C{gi % 10}"
        for si, r in enumerate(group):
            text = r.data.decode("utf-8")
            losses, times = train_losses(text), step_times(text)
            style = dict(color=colour, linestyle=STYLES[si % len(STYLES)], linewidth=1.2,
                         label=label if si == 0 else None)
            by_step.plot([s for s, _ in losses], [v for _, v in losses], **style)
            by_time.plot([ms / 1000 for _, ms in times], [v for _, v in losses], **style)
        for xi, name in enumerate(names):
            if values := [r.evals[name].val_bpb for r in group if name in r.evals]:
                x = xi - 0.4 + width * (gi + 0.5)
                mean = sum(values) / len(values)
                evals.scatter([x] * len(values), values, color=colour, s=18, zorder=3)
                evals.hlines(mean, x - width / 2.5, x + width / 2.5, color=colour, linewidth=2)
                evals.annotate(f"{mean:.4f}", (x, mean), textcoords="offset points",
                               xytext=(0, 4), ha="center", fontsize=7, color=colour)
    for ax, xlabel, by in ((by_step, "step", "step"), (by_time, "training time (s)", "time")):
        ax.set(xlabel=xlabel, ylabel="train loss", title=f"train loss by {by}")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    ticks = [f"{EVAL_TAGS[n]}\n{SCORES[n].kind}" for n in names]  # the kind parse_log checks
    evals.set_xticks(range(len(names)), ticks, fontsize=7, rotation=20, ha="right")
    evals.set(ylabel="val_bpb", title="evaluations (val_bpb, lower is better)")
    evals.grid(axis="y", alpha=0.3)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__)
    p.add_argument("logs", nargs="+", help="train_gpt.py logs of finished runs")
    p.add_argument("--out", required=True, type=Path, help="the picture (.png)")
    a = p.parse_args(argv)
    try:
        if a.out.suffix.lower() != ".png" or not a.out.parent.is_dir():
            raise SubmissionError(f"--out {a.out}: expected a .png file in an existing folder")
        records = [parse_log(path) for path in a.logs]
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    picture = io.BytesIO()
    draw(records).savefig(picture, format="png", dpi=110)
    write_atomic(a.out, picture.getvalue())  # an earlier picture stays whole until this one is
    print(f"wrote {a.out}: {len(records)} run(s) in {len(configurations(records))} "
          f"configuration(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
