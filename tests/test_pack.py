"""tools.pack: the self-extracting submission file unpacks to the source, counts its own bytes
as the code size, logs the full source, and trains and scores exactly as the plain script."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_pipeline import ROOT, SCRIPT, tiny_data, tiny_env  # noqa: F401  (tiny_data is a fixture)
from tools import pack

SOURCE = SCRIPT.read_text(encoding="utf-8")


def test_packed_file_unpacks_to_the_source_with_the_smaller_codec():
    text, codec, sizes = pack.pack(SOURCE)
    assert set(sizes) == {"lzma", "brotli"} and sizes[codec] == min(sizes.values()) == len(text)
    lines = text.splitlines()
    assert len(lines) == 2 and lines[1] == pack.EXEC_LINE
    for codec_text in pack.packed_files(SOURCE).values():  # either codec's loader decodes its payload
        namespace = {}
        exec(codec_text.splitlines()[0], namespace)
        assert namespace["PACKED_SOURCE"] == SOURCE
    assert sizes[codec] < len(SOURCE.encode()) // 2


def test_cli_reports_sizes_against_the_goal(tmp_path):
    out = io.StringIO()
    assert pack.main([str(SCRIPT), str(tmp_path / "packed.py")], out=out) == 0
    report = out.getvalue()
    size = (tmp_path / "packed.py").stat().st_size
    plain = len(SOURCE.encode("utf-8"))
    assert f"source: {plain:,} bytes" in report
    assert re.search(rf"^wrote \S+packed\.py: {size:,} bytes, [\d.]+% of the source, (within|over) the 20,000-byte "
                     rf"goal; saves {plain - size:,} bytes", report, re.M)
    print(report)  # the figures, for the record (pytest -s)


@pytest.mark.parametrize("args, needle", [
    (["missing.py", "{tmp}/o.py"], "missing.py: file not found"),
    (["{tmp}/bad.py", "{tmp}/o.py"], "bad.py: not valid Python (line 1"),
    (["{script}", "{tmp}/no/such/dir/o.py"], "no such directory"),
    (["{tmp}/bad.py", "{tmp}/bad.py"], "would overwrite the source"),
])
def test_cli_refusals_write_nothing(tmp_path, capsys, args, needle):
    (tmp_path / "bad.py").write_text("def (:\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(tmp=tmp_path, script=SCRIPT) for a in args]
    assert pack.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def run(path: Path, cwd: Path, env: dict) -> str:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    p = subprocess.run([sys.executable, str(path)], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return (cwd / "logs" / f"{env['RUN_ID']}.txt").read_text()


def figures(log: str) -> list[str]:
    """Every result, timings left out: training losses, validations, round trip, sliding window, SLOT."""
    keep = re.compile(r"^(.*?(?:train_loss|val_loss):\S+(?: val_bpb:\S+)?)")
    body = log.rsplit("=" * 100 + "\n", 1)[1]  # after the header (source, versions)
    return [m.group(1) for m in map(keep.match, body.splitlines()) if m]


def packed_env(root: Path) -> dict:
    return dict(tiny_env(root, "p"), ITERATIONS="4", SLOT_ENABLED="0")


@pytest.fixture(scope="module")
def plain_log(tiny_data, tmp_path_factory):  # noqa: F811
    return run(SCRIPT, tmp_path_factory.mktemp("plain"), packed_env(tiny_data))


def check_packed_run(tiny_data, tmp_path, plain_log, minify: bool):  # noqa: F811
    packed = tmp_path / "packed.py"
    assert pack.main([*(["--minify"] if minify else []), str(SCRIPT), str(packed)], out=io.StringIO()) == 0
    packed_log = run(packed, tmp_path, packed_env(tiny_data))
    assert figures(packed_log) == figures(plain_log) and len(figures(plain_log)) > 10
    size = packed.stat().st_size
    unpacked = pack.minify(SOURCE, "train_gpt.py") if minify else SOURCE
    assert packed_log.startswith(unpacked + "\n")  # the header holds the source that ran, not the loader
    assert re.search(rf"^Code size: {size} bytes$", packed_log, re.M)
    assert re.search(rf"^Code size: {len(SOURCE.encode())} bytes$", plain_log, re.M)
    assert f"budget code: {size:,} bytes (packed script; source {len(unpacked.encode()):,} bytes)" in packed_log
    model = int(re.search(r"^Serialized model int6\+lzma: (\d+) bytes$", packed_log, re.M).group(1))
    assert re.search(rf"^Total submission size: {model + size} bytes$", packed_log, re.M)
    print(f"packed{' minified' if minify else ''}: {size:,} bytes; plain source {len(SOURCE.encode()):,} bytes")


def test_packed_file_runs_like_the_plain_script(tiny_data, tmp_path, plain_log):  # noqa: F811
    """Same training losses, validations and evaluation figures; `Code size` counts the packed
    file and the log header records the full source."""
    check_packed_run(tiny_data, tmp_path, plain_log, minify=False)


def test_minified_packed_file_runs_like_the_plain_script(tiny_data, tmp_path, plain_log):  # noqa: F811
    pytest.importorskip("python_minifier")
    check_packed_run(tiny_data, tmp_path, plain_log, minify=True)


def test_minify_without_the_library_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # import fails as if not installed
    assert pack.main(["--minify", str(SCRIPT), str(tmp_path / "o.py")]) == 2
    assert "python-minifier" in capsys.readouterr().err and not (tmp_path / "o.py").exists()


def test_interface_check_catches_a_changed_field():
    tree = pack.ast.parse("from dataclasses import dataclass\n@dataclass\nclass H:\n    a: int = 1\n")
    changed = pack.ast.parse("from dataclasses import dataclass\n@dataclass\nclass H:\n    a: float = 1\n")
    assert pack.interface(tree) != pack.interface(changed)
    assert pack.interface(tree) == {"names": {"H"}, "fields": {"H": [("a", "int")]}}


def test_preflight_counts_the_packed_file_and_lists_the_budget():
    """--packed counts tools.pack's file in the total; the budget lines add up to it."""
    from tools import preflight
    env = dict(NUM_LAYERS="1", MODEL_DIM="256", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", XSA_LAST_N="1",
               VE_LAYERS="0", TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", TRAIN_BATCH_TOKENS="8192",
               VAL_BATCH_SIZE="8192", RUN_ID="t")
    out = io.StringIO()
    assert preflight.main(["--no-compile", "--packed"], env=env, out=out) == 0
    text = out.getvalue()
    _, codec, sizes = pack.pack(SOURCE)
    packed = sizes[codec]
    assert re.search(rf"^PASS\s+code\s+{packed:,} bytes of train_gpt.py \(packed; plain {len(SOURCE.encode()):,}", text,
                     re.M)
    stored = {k: int(v.replace(",", "")) for k, v in re.findall(r"budget (int6|int8|passthrough): ([\d,]+) bytes", text)}
    assert set(stored) == {"int6", "int8", "passthrough"} and stored["int6"] > 0
    model = int(re.search(r"budget model: ([\d,]+) bytes after lzma", text).group(1).replace(",", ""))
    assert f"budget code: {packed:,} bytes (packed script; source {len(SOURCE.encode()):,} bytes)" in text
    total = model + packed
    assert f"budget total: {total:,} bytes, margin {16_000_000 - total:,} to the 16,000,000-byte limit" in text
    assert re.search(rf"^PASS\s+artifact\s+estimated {model:,} model \+ {packed:,} code = {total:,} bytes", text, re.M)
