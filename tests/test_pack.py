"""tools.pack: the self-extracting submission file unpacks to the source with either codec,
stays within the packed-size rule, counts its own bytes as the code size, logs the full source,
runs as a module of its own (dataclasses and torch.compile work there), and trains and scores
exactly as the plain script."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_pipeline import SCRIPT
from tools import _packed, pack

SOURCE = SCRIPT.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def minified():
    """train_gpt.py minified (seconds: python-minifier), or None without python-minifier."""
    try:
        import python_minifier  # noqa: F401
    except ImportError:
        return None
    return pack.minify(SOURCE, "train_gpt.py")


@pytest.fixture(scope="module")
def packed(minified):
    """Each codec's packed file of the real train_gpt.py, plain and minified."""
    files = {"plain": pack.packed_files(SOURCE)}
    if minified is not None:
        files["minified"] = pack.packed_files(minified)
    return files


def test_packed_file_unpacks_to_the_source_with_the_smaller_codec(packed, minified):
    """Either codec's file, read by Python's own tokenizer as latin-1, decompresses to the exact
    source; pack() keeps the smaller, within the 35,000-byte rule and under half the source."""
    data, codec, sizes = pack.pack(SOURCE)
    assert set(sizes) == {"lzma", "brotli"} and sizes[codec] == min(sizes.values()) == len(data)
    assert data == packed["plain"][codec]
    assert data.startswith(_packed.CODING_LINE) and data.endswith(_packed.EXEC_LINE + _packed.MAIN_LINE)
    for kind, files in packed.items():
        unpacked = SOURCE if kind == "plain" else minified
        for codec_data in files.values():
            assert _packed.unpacked(codec_data)[1] == unpacked
            compile(
                codec_data, "packed.py", "exec"
            )  # the whole file, as `python packed.py` reads it
    assert sizes[codec] <= pack.SIZE_LIMIT and sizes[codec] < len(SOURCE.encode()) // 2
    print({kind: {c: len(d) for c, d in files.items()} for kind, files in packed.items()})


@pytest.mark.parametrize(
    "blob",
    [
        bytes(range(256)) * 3,
        b'"',
        b'""',
        b'"""',
        b'a""""b"',
        b"\\",
        b"\x00",
        b"\x001\x007",
        b"\x00\x00\x008\x00",
        b"\r\n\r",
        b"\n\\\n",
        b'\\"',
        b"",
    ],
    ids=lambda b: repr(b)[:20],
)
def test_literal_holds_any_bytes(blob):
    """Quotes in runs and at the end, backslashes, CR, NUL before an octal digit, raw newlines:
    the literal, compiled from a latin-1 file, gives back every byte."""
    text = _packed.CODING_LINE + b"x = " + _packed.literal(blob) + b'.encode("latin-1")\n'
    namespace = {}
    exec(compile(text, "literal.py", "exec"), namespace)
    assert namespace["x"] == blob


def test_only_what_must_be_escaped_is(packed):
    """The embedded bytes cost about 2% over the compressed stream (base85: 25%)."""
    blob = _packed.compressed(SOURCE.encode())["brotli"]
    body = _packed.literal(blob)
    assert len(body) - len(blob) - 6 == (
        blob.count(b"\\")
        + blob.count(b"\r")
        + len(re.findall(rb"\x00(?![0-7])", blob))  # \0
        + 3 * len(re.findall(rb"\x00(?=[0-7])", blob))  # \x00 before an octal digit
        + len(re.findall(rb'"(?="|\Z)', blob))
    )
    assert len(body) < 1.04 * len(blob)


def test_the_packed_namespace_is_a_module_of_its_own(tmp_path, monkeypatch):
    """The loader's lines before `main(s)`: a fresh module, not __main__, whose __file__ is the
    packed file, registered in sys.modules (dataclasses look classes' modules up there); its
    Config parses settings and torch.compile traces its model."""
    data, _, _ = pack.pack(SOURCE)
    path = tmp_path / "packed.py"
    path.write_bytes(data)
    monkeypatch.setitem(sys.modules, _packed.MODULE_NAME, None)  # removed again afterwards
    loader = data[: len(data) - len(_packed.MAIN_LINE)]
    namespace = {"__file__": str(path), "__name__": "__main__"}
    exec(compile(loader, str(path), "exec"), namespace)
    m = namespace["m"]
    assert sys.modules[_packed.MODULE_NAME] is m and m.__name__ == _packed.MODULE_NAME
    assert m.__file__ == str(path) and os.path.getsize(m.__file__) == len(data)
    assert namespace["s"] == SOURCE and callable(m.main)
    cfg = m.Config.from_env(
        {
            "NUM_LAYERS": "1",
            "MODEL_DIM": "32",
            "NUM_HEADS": "2",
            "NUM_KV_HEADS": "1",
            "XSA_LAST_N": "1",
            "VE_LAYERS": "0",
            "VOCAB_SIZE": "64",
            "BIGRAM_VOCAB_SIZE": "64",
        }
    )
    assert cfg.model.num_layers == 1 and type(cfg.model).__module__ == _packed.MODULE_NAME
    model = m.build_model(cfg.model, torch.device("cpu"), seed=0)
    compiled = torch.compile(model.hidden, fullgraph=True, backend="eager")
    ids = torch.randint(0, 64, (2, 16))
    try:
        assert torch.equal(compiled(ids), model.hidden(ids))
    finally:
        torch._dynamo.reset()


def test_cli_reports_sizes_against_the_goal(tmp_path):
    out = io.StringIO()
    assert pack.main([str(SCRIPT), str(tmp_path / "packed.py")], out=out) == 0
    report = out.getvalue()
    size = (tmp_path / "packed.py").stat().st_size
    plain = len(SOURCE.encode("utf-8"))
    assert f"source: {plain:,} bytes" in report
    assert re.search(
        rf"^wrote \S+packed\.py: {size:,} bytes, [\d.]+% of the source, (within|over) the "
        rf"20,000-byte goal; saves {plain - size:,} bytes",
        report,
        re.M,
    )
    assert "WARNING" not in report  # within the 35,000-byte limit
    print(report)  # the figures, for the record (pytest -s)


def test_cli_minify_reports_the_minified_size(tmp_path, minified):
    if minified is None:
        pytest.skip("python-minifier is not installed")
    out = io.StringIO()
    assert pack.main(["--minify", str(SCRIPT), str(tmp_path / "packed.py")], out=out) == 0
    assert f"minified: {len(minified.encode()):,} bytes (python-minifier)" in out.getvalue()
    assert _packed.unpacked((tmp_path / "packed.py").read_bytes())[1] == minified
    print(out.getvalue())


@pytest.mark.parametrize(
    "args, needle",
    [
        (["missing.py", "{tmp}/o.py"], "missing.py: file not found"),
        (["{tmp}/bad.py", "{tmp}/o.py"], "bad.py: not valid Python (line 1"),
        (["{script}", "{tmp}/no/such/dir/o.py"], "no such directory"),
        (["{tmp}/bad.py", "{tmp}/bad.py"], "would overwrite the source"),
    ],
)
def test_cli_refusals_write_nothing(tmp_path, capsys, args, needle):
    (tmp_path / "bad.py").write_text("def (:\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(tmp=tmp_path, script=SCRIPT) for a in args]
    assert pack.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_pack_does_not_import_torch_or_the_script():
    """tools.pack reads the script as text and writes with tools/_files: no torch import."""
    code = "import sys, tools.pack; print(sorted({'torch', 'train_gpt'} & set(sys.modules)))"
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stderr


def launch(path: Path, env: dict) -> subprocess.Popen:
    """`python path` in path's folder with env added, started."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        [sys.executable, str(path)],
        cwd=path.parent,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def figures(log: str) -> list[str]:
    """Every result, timings left out: training losses, validations, round trip, sliding window."""
    keep = re.compile(r"^(.*?(?:train_loss|val_loss):\S+(?: val_bpb:\S+)?)")
    body = log.rsplit("=" * 100 + "\n", 1)[1]  # after the header (source, versions)
    return [m.group(1) for m in map(keep.match, body.splitlines()) if m]


@pytest.fixture(scope="module")
def plain(finished_run):
    """The session's finished run (tests/conftest.py: the plain script, 4 steps, SLOT off):
    its log and settings."""
    cwd, env, status, out, err = finished_run
    assert status == 0, out[-2000:] + err[-2000:]
    return (cwd / "logs" / "shared.txt").read_text(), {**env, "RUN_ID": "p"}


@pytest.fixture(scope="module")
def packed_runs(plain, packed, minified, tmp_path_factory):
    """The plain run's settings run side by side (one core each) from the file
    `python -m tools.pack` writes (brotli, the smaller) and from the minified source packed
    with the other codec (raw LZMA2). {codec: (packed file, its log, the source it holds)}."""
    cli = tmp_path_factory.mktemp("packed_cli") / "train_gpt.py"
    assert pack.main([str(SCRIPT), str(cli)], out=io.StringIO()) == 0
    files = {"brotli": (cli, SOURCE)}
    if minified is not None:
        path = tmp_path_factory.mktemp("packed_minified") / "train_gpt.py"
        path.write_bytes(packed["minified"]["lzma"])
        files["lzma"] = (path, minified)
    procs = {codec: launch(path, plain[1]) for codec, (path, _) in files.items()}
    runs = {}
    for codec, p in procs.items():
        out, err = p.communicate(timeout=180)  # a hang guard: about 20 s
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        path, source = files[codec]
        runs[codec] = path, (path.parent / "logs" / "p.txt").read_text(), source
    return runs


def check_packed_run(plain, path: Path, packed_log: str, unpacked: str) -> None:
    plain_log = plain[0]
    assert figures(packed_log) == figures(plain_log) and len(figures(plain_log)) > 10
    size = path.stat().st_size
    # The header holds the source that ran, not the loader.
    assert packed_log.startswith(unpacked + "\n")
    assert re.search(rf"^Code size: {size} bytes$", packed_log, re.M)
    assert re.search(rf"^Code size: {len(SOURCE.encode())} bytes$", plain_log, re.M)
    model = int(re.search(r"^Serialized model int6\+lzma: (\d+) bytes$", packed_log, re.M).group(1))
    assert re.search(rf"^Total submission size: {model + size} bytes$", packed_log, re.M)
    print(f"packed: {size:,} bytes; plain source {len(SOURCE.encode()):,} bytes")


@pytest.mark.slow
def test_packed_file_runs_like_the_plain_script(plain, packed_runs):
    """The file `python -m tools.pack` writes (brotli, the smaller): the same training losses,
    validations and evaluation figures; `Code size` counts the packed file and the log header
    records the full source."""
    path, log, source = packed_runs["brotli"]
    assert path.read_bytes() == pack.pack(SOURCE)[0]
    check_packed_run(plain, path, log, source)


@pytest.mark.slow
def test_minified_lzma_packed_file_runs_like_the_plain_script(plain, packed_runs):
    """The other loader (raw LZMA2) on the minified source: the same figures."""
    if "lzma" not in packed_runs:
        pytest.skip("python-minifier is not installed")
    path, log, source = packed_runs["lzma"]
    check_packed_run(plain, path, log, source)


def test_minify_without_the_library_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # import fails as if not installed
    assert pack.main(["--minify", str(SCRIPT), str(tmp_path / "o.py")]) == 2
    assert "python-minifier" in capsys.readouterr().err and not (tmp_path / "o.py").exists()


def test_interface_check_catches_a_changed_field():
    tree = pack.ast.parse(
        "from dataclasses import dataclass\n@dataclass\nclass H:\n    a: int = 1\n"
    )
    changed = pack.ast.parse(
        "from dataclasses import dataclass\n@dataclass\nclass H:\n    a: float = 1\n"
    )
    assert pack.interface(tree) != pack.interface(changed)
    assert pack.interface(tree) == {"names": {"H"}, "fields": {"H": [("a", "int")]}}


def test_preflight_counts_the_packed_file_and_lists_the_budget():
    """--packed counts tools.pack's file in the total; the budget lines add up to it."""
    from tools import preflight

    env = dict(
        NUM_LAYERS="1",
        MODEL_DIM="256",
        NUM_HEADS="2",
        NUM_KV_HEADS="1",
        MLP_MULT="2",
        XSA_LAST_N="1",
        VE_LAYERS="0",
        TRAIN_SEQ_LEN="128",
        EVAL_SEQ_LEN="128",
        TRAIN_BATCH_TOKENS="8192",
        VAL_BATCH_SIZE="8192",
        RUN_ID="t",
    )
    out = io.StringIO()
    assert preflight.main(["--no-compile", "--packed"], env=env, out=out) == 0
    text = out.getvalue()
    _, codec, sizes = pack.pack(SOURCE)
    packed = sizes[codec]
    assert re.search(
        rf"^PASS\s+code\s+{packed:,} bytes of train_gpt.py "
        rf"\(packed; plain {len(SOURCE.encode()):,}",
        text,
        re.M,
    )
    stored = {
        k: int(v.replace(",", ""))
        for k, v in re.findall(r"budget (int6|int8|passthrough): ([\d,]+) bytes", text)
    }
    assert set(stored) == {"int6", "int8", "passthrough"} and stored["int6"] > 0
    model = int(
        re.search(r"budget model: ([\d,]+) bytes after lzma", text).group(1).replace(",", "")
    )
    assert (
        f"budget code: {packed:,} bytes (packed script; source {len(SOURCE.encode()):,} bytes)"
        in text
    )
    total = model + packed
    assert (
        f"budget total: {total:,} bytes, margin {16_000_000 - total:,} to the 16,000,000-byte limit"
        in text
    )
    assert re.search(
        rf"^PASS\s+artifact\s+estimated {model:,} model \+ {packed:,} code = {total:,} bytes",
        text,
        re.M,
    )


def test_a_file_that_is_not_the_script_is_refused(tmp_path, capsys):
    """Any Python file used to pack, and its packed file then failed when run (no main): a file
    without the script's top-level main(source) is refused, in one line, nothing written."""
    other = tmp_path / "helper.py"
    other.write_text("def helper(x):\n    return x\n\nmain = 3\n")
    assert pack.main([str(other), str(tmp_path / "o.py")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {other}: not this project's train_gpt.py (no top-level main(source), "
                   "which the packed file calls); expected the script to pack\n")
    assert not (tmp_path / "o.py").exists()
