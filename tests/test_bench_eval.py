"""tools.bench_eval's ratio rows: a ratio over its target is marked, and --strict fails on it.
No benchmark runs here (tests/test_tools.py runs the default invocation)."""
import math

import pytest

from tools import bench_eval
from tools.bench_eval import Ratio, ratio_line, report_ratios

MARK = "MISSES TARGET"


def test_rows_keep_the_table_layout():
    assert ratio_line(Ratio("SLOT / sliding", 1.2249, 1.5, 7.5)) == (
        f"{'SLOT / sliding':<46}{'1.22':>10}{'<= 1.5':>10}{'7.5':>10}")
    assert ratio_line(Ratio("TTT / sliding", 1.19, 1.5)) == (
        f"{'TTT / sliding':<46}{'1.19':>10}{'<= 1.5':>10}")
    assert ratio_line(Ratio("original-style SLOT / fast SLOT", 11.94)) == (
        f"{'original-style SLOT / fast SLOT':<46}{'11.94':>10}")
    assert ratio_line(Ratio("  per window", 3.0, note="(0.2s vs 0.1s)")) == (
        f"{'  per window':<46}{'3.00':>10}   (0.2s vs 0.1s)")


@pytest.mark.parametrize("value, misses", [
    (1.5, False), (1.504, False),  # prints 1.50: the printed figure is the one judged
    (1.506, True), (2.8, True), (math.nan, True), (math.inf, True), (0.0, False),
])
def test_a_ratio_over_its_target_is_marked(value, misses):
    ratio = Ratio("SLOT / sliding", value, 1.5, 7.5)
    assert ratio.misses is misses
    line = ratio_line(ratio)
    assert line.endswith(f"7.5  {MARK} (<= 1.5)") if misses else MARK not in line


def test_no_target_never_misses():
    for value in (0.5, 40.0, math.nan):
        assert not Ratio("original-style SLOT / fast SLOT", value).misses
        assert MARK not in ratio_line(Ratio("original-style SLOT / fast SLOT", value))


def test_strict_fails_only_on_a_miss(capsys):
    met = [Ratio("SLOT / sliding", 1.22, 1.5, 7.5), Ratio("suite / sliding", 2.8, 3, 10),
           Ratio("original-style SLOT / fast SLOT", 11.9)]
    missed = met + [Ratio("TTT / sliding", 1.9, 1.5)]
    assert report_ratios(met, strict=True) == 0
    assert report_ratios(missed, strict=False) == 0  # marked, but no failure without --strict
    out = capsys.readouterr()
    assert out.err == "" and out.out.count(MARK) == 1
    assert out.out.splitlines()[:3] == [ratio_line(r) for r in met]

    assert report_ratios(missed + [Ratio("suite / sliding", 3.4, 3, 10)], strict=True) == 1
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 5 and out.out.count(MARK) == 2  # every row printed first
    assert out.err == ("error: 2 ratios over target (TTT / sliding, suite / sliding); "
                       "--strict fails the run\n")


def test_strict_is_an_option():
    assert bench_eval.parse_args(["--strict"]).strict
    assert not bench_eval.parse_args([]).strict
