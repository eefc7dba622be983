"""tools.plot: runs side by side as a picture, read through the record reader
(tools.submission.parse_log); the seeds
of one configuration share a colour; anything but a finished run's log is refused with one
line and nothing is written."""

import re
from pathlib import Path

import pytest
from matplotlib.collections import PathCollection

from tools import plot
from tools.runlog import step_times, train_losses
from tools.submission import parse_log

DEMO_LOG = Path(__file__).resolve().parents[1] / "examples" / "cpu_demo" / "train_seed1337.log"


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[str, Path]:
    """The committed demo log (seed 1337); the same with seed 42 (another seed of its
    configuration); one with another MATRIX_LR (another configuration); a copy of the first in
    another folder (the same seed again: another configuration the log cannot name)."""
    root = tmp_path_factory.mktemp("logs")
    text = DEMO_LOG.read_text(encoding="utf-8")
    seed42 = text.replace("\nseed:1337\n", "\nseed:42\n").replace(
        "step:120/120 train_loss:4.1962", "step:120/120 train_loss:4.0000")
    other = text.replace(" matrix_lr:0.025 ", " matrix_lr:0.03 ")
    assert seed42 != text and other != text
    out = {"a": root / "a" / "demo.txt", "b": root / "b" / "seed42.txt",
           "c": root / "c" / "lr.txt", "d": root / "d" / "demo.txt"}
    for key, body in (("a", text), ("b", seed42), ("c", other), ("d", text)):
        out[key].parent.mkdir()
        out[key].write_text(body, encoding="utf-8")
    return out


def test_seeds_of_one_configuration_are_grouped(logs):
    records = [parse_log(logs[k]) for k in "abcd"]
    groups = plot.configurations(records)
    assert [[Path(r.path).parent.name for r in g] for g in groups] == [["a", "b"], ["c"], ["d"]]
    assert plot.labels(groups) == ["a/demo (seeds 1337, 42)", "lr (seed 1337)",
                                   "d/demo (seed 1337)"]


def test_the_picture_holds_every_run_and_figure(logs, tmp_path, capsys):
    """Per run, a train-loss line by step and one by training time with the log's own numbers
    (the colour of its configuration, a line style per seed); per evaluation, each run's
    val_bpb as a point; the file is a PNG."""
    paths = [logs[k] for k in "abc"]
    records = [parse_log(p) for p in paths]
    fig = plot.draw(records)
    by_step, by_time, evals = fig.axes
    assert len(by_step.lines) == len(by_time.lines) == 3
    colours = [line.get_color() for line in by_step.lines]
    assert colours[0] == colours[1] != colours[2]
    assert [line.get_linestyle() for line in by_step.lines] == ["-", "--", "-"]
    for line, t_line, path in zip(by_step.lines, by_time.lines, paths):
        text = path.read_text(encoding="utf-8")
        losses, times = train_losses(text), step_times(text)
        assert list(line.get_xdata()) == [s for s, _ in losses]
        assert list(line.get_ydata()) == [v for _, v in losses]
        assert list(t_line.get_xdata()) == [ms / 1000 for _, ms in times]
    assert by_step.lines[1].get_ydata()[-1] == 4.0 and by_step.lines[0].get_ydata()[-1] == 4.1962
    points = sorted(round(float(y), 8) for c in evals.collections
                    if isinstance(c, PathCollection) for y in c.get_offsets()[:, 1])
    want = sorted(round(e.val_bpb, 8) for r in records for e in r.evals.values())
    assert points == want and len(want) == 3 * 5
    ticks = [t.get_text() for t in evals.get_xticklabels()]
    assert ticks[0] == "final_int6_roundtrip\naccepted" and "final_slot\nnot causal" in ticks

    out = tmp_path / "runs.png"
    assert plot.main([*map(str, paths), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {out}: 3 run(s) in 2 configuration(s)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.png"]


@pytest.mark.parametrize("case", ["foreign", "cut", "out"])
def test_anything_else_is_refused_with_one_line(case, logs, tmp_path, capsys):
    """A file that is not a log of ours, a log cut before its evaluations, an --out that is
    not a .png: one line, exit 2, nothing written."""
    path, out = logs["a"], tmp_path / "x.png"
    if case == "foreign":
        path = tmp_path / "notes.txt"
        path.write_text("hello\n")
    elif case == "cut":
        path = tmp_path / "cut.txt"
        text = logs["a"].read_text(encoding="utf-8")
        path.write_text(text[:text.index("\nfinal_int6_roundtrip ")] + "\n", encoding="utf-8")
    else:
        out = tmp_path / "x.pdf"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert plot.main([str(logs["a"]), str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert (str(path) if case != "out" else "--out") in err
    if case == "cut":
        assert re.search(r"stops before its evaluations|cut", err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
