"""Tests for tools/data.py: shard format, shards/demo/verify/download
commands, and the byte accounting behind val_bpb."""
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tools import _files, data

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
REFERENCE_MODEL = REFERENCE / "fineweb_1024_bpe.model"


def import_train_gpt():
    # Skip only while the file is missing: a broken train_gpt.py must fail.
    if not (ROOT / "train_gpt.py").exists():
        pytest.skip("train_gpt.py is not written yet")
    return importlib.import_module("train_gpt")


def shard_bytes(magic=data.MAGIC, version=data.VERSION, count=None, tokens=(1, 2, 3)):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


# ---------------------------------------------------------------- shard format

@pytest.mark.parametrize("tokens", [[1, 0, 65535, 7, 1023], list(range(3000)), []])
def test_shard_round_trip(tmp_path, tokens):
    path = tmp_path / "fineweb_train_000000.bin"
    data.write_shard(path, np.array(tokens, dtype=np.int64))

    # Read back independently of tools.data.
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240520, 1, len(tokens)]
    assert not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert np.fromfile(path, dtype="<u2", offset=1024).tolist() == tokens

    assert data.read_shard(path).tolist() == tokens
    assert data.verify_shard(path, vocab_size=65536) == (len(tokens), max(tokens, default=-1))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


@pytest.mark.parametrize("content, reason", [
    (shard_bytes(magic=20240521), "bad magic 20240521"),
    (shard_bytes(version=2), "unsupported version 2"),
    (shard_bytes(count=4), "size 1030 bytes does not match header token count 4"),
    (shard_bytes()[:-1], "size 1029 bytes does not match header token count 3"),
    (shard_bytes() + b"\0\0", "size 1032 bytes does not match header token count 3"),
    (shard_bytes(count=-1), "size 1030 bytes does not match header token count -1"),
    (shard_bytes()[:600], "truncated header"),
    (b"", r"truncated header \(0 bytes"),
    (None, "cannot read shard"),
], ids=["magic", "version", "count", "negative", "short", "long", "header", "empty", "folder"])
def test_bad_shards_rejected_as_training_rejects_them(tmp_path, content, reason):
    """Two copies of one shard reader (train_gpt.py must stay one file; the tools must not
    need torch): the tools' verdict is train_gpt's, word for word."""
    train_gpt = import_train_gpt()
    path = tmp_path / "fineweb_val_000000.bin"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(train_gpt.ConfigError) as training:
        train_gpt.load_data_shard(path)
    with pytest.raises(_files.ShardError) as tools_reader:
        _files.read_shard(path)
    assert str(tools_reader.value) == str(training.value)
    for check in (data.read_shard, data.verify_shard):
        with pytest.raises(data.DataError, match=reason) as err:
            check(path)
        assert str(err.value) == str(training.value)
        assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("tokens", [[], [1], [1, 0, 65535, 7, 1023], list(range(3000))],
                         ids=["empty", "one", "extremes", "long"])
def test_good_shards_read_as_training_reads_them(tmp_path, tokens):
    """tools.data writes the shared format's bytes, and both readers give the same tokens."""
    train_gpt = import_train_gpt()
    assert (_files.SHARD_MAGIC, _files.SHARD_VERSION, _files.HEADER_INTS, _files.HEADER_BYTES) == (
        train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, train_gpt.HEADER_INTS, train_gpt.HEADER_BYTES)
    path = tmp_path / "fineweb_train_000000.bin"
    data.write_shard(path, np.array(tokens, dtype=np.int64))
    assert path.read_bytes() == _files.shard_bytes(np.array(tokens, dtype=np.int64))
    ours, training = _files.read_shard(path), train_gpt.load_data_shard(path)
    assert ours.dtype == training.dtype == np.uint16
    assert ours.tolist() == np.asarray(training).tolist() == tokens


def test_data_tools_need_no_torch():
    """Data can be fetched, built and checked on a machine without PyTorch."""
    code = ("import sys, tools.data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'train_gpt')))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert (run.returncode, run.stdout, run.stderr) == (0, "[]\n", "")


def test_out_of_range_ids_rejected_naming_file(tmp_path):
    path = tmp_path / "fineweb_train_000003.bin"
    data.write_shard(path, [1, 5, 1024, 6])
    assert data.verify_shard(path)[1] == 1024
    with pytest.raises(data.DataError, match=r"token id 1024 at position 2 .* 1024") as err:
        data.verify_shard(path, vocab_size=1024)
    assert str(path) in str(err.value)
    for bad in ([1, 65536], [-1, 2]):
        with pytest.raises(data.DataError, match="0..65535") as err:
            data.write_shard(path, bad)
        assert str(path) in str(err.value)
    assert data.read_shard(path).tolist() == [1, 5, 1024, 6]  # old file untouched


def test_verify_command(tmp_path, capsys):
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    data.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 4])
    data.write_shard(tmp_path / "fineweb_train_000001.bin", [1, 9, 9])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "fineweb_train_000001.bin: 3 tokens, max id 9" in out
    assert "total train: 5 tokens" in out and "total val: 3 tokens" in out

    assert data.main(["verify", str(tmp_path), "--vocab-size", "9"]) == 1
    assert "fineweb_train_000001.bin: token id 9" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ['{"splits": []}', '{"splits": {"val": 3}}',
                                      '{"tokenizer": 5}', "[1]"])
def test_verify_names_a_malformed_manifest_in_one_line(tmp_path, capsys, manifest):
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    (tmp_path / "manifest.json").write_text(manifest)
    assert data.main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "manifest.json" in err


def test_verify_reports_every_problem(tmp_path, capsys):
    data.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 4, 12])
    (tmp_path / "fineweb_train_000002.bin").write_bytes(shard_bytes(magic=7))
    data.write_shard(tmp_path / "fineweb_train_000003.bin", [1, 2])
    data.write_shard(tmp_path / "fineweb_train_000006.bin", [1, 11])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "12"]) == 1
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err == [
        f"error: {tmp_path / 'fineweb_train_000000.bin'}: token id 12 at position 2 is outside "
        "the vocabulary of 12",
        f"error: {tmp_path / 'fineweb_train_000002.bin'}: bad magic 7; expected 20240520",
        f"error: {tmp_path}: no fineweb_val_*.bin shards",
        f"error: {tmp_path}: fineweb_train_000001.bin, fineweb_train_000004.bin, "
        "fineweb_train_000005.bin missing (shards are numbered from 000000 without gaps)",
        f"error: {tmp_path}: 4 problems (listed above)",
    ]
    # The good shards are still counted.
    assert "fineweb_train_000006.bin: 2 tokens, max id 11" in captured.out
    assert "total train: 4 tokens" in captured.out


def test_verify_refuses_an_empty_split(tmp_path, capsys):
    """A train split of valid but empty shards made training wait forever for a batch."""
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    data.write_shard(tmp_path / "fineweb_train_000000.bin", [])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "8"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: {tmp_path}: the train split holds 0 tokens (1 shard, all empty)",
        f"error: {tmp_path}: 1 problem (listed above)"]
    assert "total train: 0 tokens" in captured.out

    data.write_shard(tmp_path / "fineweb_train_000001.bin", [])
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "8"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path}: the val split holds 0 tokens (1 shard, all empty)",
        f"error: {tmp_path}: the train split holds 0 tokens (2 shards, all empty)",
        f"error: {tmp_path}: 2 problems (listed above)"]

    # An empty shard beside one with tokens is no problem.
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    data.write_shard(tmp_path / "fineweb_train_000002.bin", [1, 4])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "8"]) == 0
    # Nor is a split called empty while one of its shards could not be counted.
    data.write_shard(tmp_path / "fineweb_train_000002.bin", [1, 9])
    assert data.main(["verify", str(tmp_path), "--vocab-size", "8"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {tmp_path / 'fineweb_train_000002.bin'}: token id 9 at position 1 is outside "
        "the vocabulary of 8",
        f"error: {tmp_path}: 1 problem (listed above)"]


def test_verify_says_when_ids_go_unchecked(tmp_path, capsys):
    """Without --vocab-size or a manifest no vocabulary is known: say so rather than pass quietly."""
    data.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    data.write_shard(tmp_path / "fineweb_train_000000.bin", [1, 60000])
    assert data.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: unknown (no --vocab-size, no manifest): token ids are not checked" in out
    assert data.main(["verify", str(tmp_path), "--vocab-size", "1024"]) == 1
    assert "token id 60000 at position 1 is outside the vocabulary of 1024" in capsys.readouterr().err


def built_folder(tmp_path, inputs):
    """A small dataset as the shards command writes it: 64 pieces, 5 val shards."""
    (jsonl, txt), _ = inputs
    out = tmp_path / "out"
    assert data.main(["shards", str(jsonl), str(txt), "--out", str(out), "--val-docs", "2",
                      "--shard-tokens", "50", "--train-tokenizer", "--vocab-size", "64",
                      "--tokenizer-out", str(tmp_path / "t.model")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["shards"] == 5 and manifest["splits"]["train"]["shards"] > 2
    return out


def test_verify_takes_vocab_and_counts_from_folder_manifest(tmp_path, inputs, capsys):
    out = built_folder(tmp_path, inputs)
    capsys.readouterr()
    assert data.main(["verify", str(out)]) == 0
    assert f"vocabulary: 64 pieces (from {out / 'manifest.json'})" in capsys.readouterr().out

    data.write_shard(out / "fineweb_train_000001.bin", [1, 63, 64])
    (out / "fineweb_val_000004.bin").unlink()  # the tail of val: no gap shows it
    assert data.main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin: token id 64 at position 2 is outside the vocabulary of 64" in err
    assert f"4 val shards, but {out / 'manifest.json'} lists 5" in err
    assert data.main(["verify", str(out), "--vocab-size", "65"]) == 1  # the option wins
    assert "token id" not in capsys.readouterr().err


def test_verify_download_layout(tmp_path, capsys):
    """A download keeps the hub manifest in data/: all of val, a prefix of train."""
    folder = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    folder.mkdir(parents=True)
    manifest = json.loads(json.dumps(HUB_MANIFEST))
    manifest["datasets"][0]["stats"]["files_val"] = 2
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    data.write_shard(folder / "fineweb_val_000000.bin", [1, 1023])
    data.write_shard(folder / "fineweb_train_000000.bin", [1, 1024])
    assert data.main(["verify", str(folder)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert err[0].endswith("fineweb_train_000000.bin: token id 1024 at position 1 is outside "
                           "the vocabulary of 1024")
    assert err[1] == f"error: {folder}: 1 val shards, but {tmp_path / 'data' / 'manifest.json'} lists 2"

    data.write_shard(folder / "fineweb_val_000001.bin", [1, 5])
    data.write_shard(folder / "fineweb_train_000000.bin", [1, 5])
    assert data.main(["verify", str(folder)]) == 0  # 1 of 3 train shards is a valid download
    data.write_shard(folder / "fineweb_train_000003.bin", [1, 5])
    assert data.main(["verify", str(folder)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {folder}: fineweb_train_000001.bin, fineweb_train_000002.bin missing "
        "(shards are numbered from 000000 without gaps)")
    data.write_shard(folder / "fineweb_train_000001.bin", [1, 5])
    data.write_shard(folder / "fineweb_train_000002.bin", [1, 5])
    assert data.main(["verify", str(folder)]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {folder}: 4 train shards, but {tmp_path / 'data' / 'manifest.json'} lists 3")


def test_cli_error_has_no_traceback(tmp_path):
    (tmp_path / "fineweb_val_000000.bin").write_bytes(shard_bytes(magic=7))
    run = subprocess.run([sys.executable, "-m", "tools.data", "verify", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith("error: ") and "fineweb_val_000000.bin: bad magic 7" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", [[], ["download"], ["shards"], ["demo"], ["verify"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        data.main(command + ["--help"])
    assert done.value.code == 0
    assert "usage: python -m tools.data" in capsys.readouterr().out


def test_reads_challenge_shards():
    shards = sorted((REFERENCE / "trajectory").glob("fineweb_*.bin"))
    if not shards:
        pytest.skip("no challenge shards in shared/reference")
    for path in shards:
        count, top = data.verify_shard(path, vocab_size=1024)
        assert count > 0 and top < 1024
    assert data.read_shard(REFERENCE / "trajectory" / "fineweb_val_000000.bin")[0] == 1  # BOS


# ---------------------------------------------------------------- shards command

WORDS = ("the model reads tokens from shards and learns to predict the next one while "
         "a tokenizer splits text into pieces with merges learned from data 2024").split()


def corpus(count, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=40)) + "." for _ in range(count)]


@pytest.fixture
def inputs(tmp_path):
    docs = corpus(6, seed=1) + ["Une dernière phrase, en   français.\n\nFin."]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n\n" for i, d in enumerate(docs[:6])))
    txt = tmp_path / "last.txt"
    txt.write_text(docs[6], encoding="utf-8")
    return [jsonl, txt], docs


def test_shards_command(tmp_path, inputs, capsys):
    (jsonl, txt), docs = inputs
    out, model = tmp_path / "out", tmp_path / "tok" / "small.model"
    out.mkdir()
    data.write_shard(out / "fineweb_train_000099.bin", [1])  # stale, from an older build
    argv = ["shards", str(jsonl), str(txt), "--out", str(out), "--val-docs", "2",
            "--shard-tokens", "50"]
    assert data.main(argv + ["--train-tokenizer", "--vocab-size", "64",
                             "--tokenizer-out", str(model)]) == 0
    assert "removed stale" in capsys.readouterr().out
    assert not (out / "fineweb_train_000099.bin").exists()

    sp = data.load_tokenizer(model)
    assert sp.vocab_size() == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"file": "small.model", "vocab_size": 64,
                                     "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    for split, split_docs in (("val", docs[:2]), ("train", docs[2:])):
        expected = [t for d in split_docs for t in [1] + sp.encode(d)]
        info = manifest["splits"][split]
        shards = [data.read_shard(out / name) for name in info["files"]]
        assert info["files"] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(shards))]
        assert np.concatenate(shards).tolist() == expected
        assert [len(s) for s in shards[:-1]] == [50] * (len(shards) - 1)
        assert (info["documents"], info["tokens"], info["shards"]) == \
               (len(split_docs), len(expected), len(shards))
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        manifest["splits"]["val"]["files"] + manifest["splits"]["train"]["files"])

    # The same tokenizer given with --tokenizer rebuilds the same shards.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert data.main(argv + ["--tokenizer", str(model)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("line, reason", [
    ('{"txt": "x"}', 'docs.jsonl:3: no "text" string field'),
    ("{broken", "docs.jsonl:3: not valid JSON"),
])
@pytest.mark.parametrize("train", [True, False])
def test_shards_bad_jsonl(tmp_path, inputs, capsys, line, reason, train):
    (jsonl, _), _ = inputs
    jsonl.write_text(json.dumps({"text": " ".join(corpus(30, seed=3))}) + "\n\n" + line + "\n")
    model = tmp_path / "t.model"
    argv = ["shards", str(jsonl), "--out", str(tmp_path / "o")]
    if train:
        argv += ["--train-tokenizer", "--vocab-size", "64", "--tokenizer-out", str(model)]
    else:
        data.train_tokenizer(corpus(20, seed=2), 64, model)
        argv += ["--tokenizer", str(model)]
    assert data.main(argv) == 1
    assert capsys.readouterr().err.startswith(f"error: {jsonl}:{reason.split(':', 1)[1]}")


def test_shards_input_and_split_errors(tmp_path, inputs, capsys):
    (jsonl, txt), _ = inputs
    out = str(tmp_path / "o")
    assert data.main(["shards", str(tmp_path / "x.csv"), "--out", out, "--tokenizer", "m"]) == 1
    assert "x.csv: unsupported input" in capsys.readouterr().err
    assert data.main(["shards", str(tmp_path / "gone.txt"), "--out", out, "--tokenizer", "m"]) == 1
    assert "gone.txt: no such file" in capsys.readouterr().err
    assert data.main(["shards", str(txt), "--out", out, "--tokenizer", str(tmp_path / "m")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'm'}: no such file\n"
    txt.with_suffix(".model").write_bytes(b"junk")
    assert data.main(["shards", str(txt), "--out", out, "--tokenizer", str(txt.with_suffix(".model"))]) == 1
    assert "last.model: not a usable SentencePiece model" in capsys.readouterr().err


def tree(root):
    """Every path under root, hidden ones included, with file contents."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("extra, reason", [
    (["--val-docs", "7"], "no train documents (7 documents in all, the first 7 for val)"),
    (["--val-docs", "0"], "no val documents (7 documents in all, the first 0 for val)"),
    (["--val-docs", "2", "--bad-line"], 'docs.jsonl:13: no "text" string field'),
])
@pytest.mark.parametrize("train", [True, False])
def test_failed_shards_build_leaves_nothing(tmp_path, inputs, capsys, extra, reason, train):
    (jsonl, txt), _ = inputs
    if "--bad-line" in extra:  # after the val documents and some train shards
        extra = extra[:-1]
        jsonl.write_text(jsonl.read_text() + '{"txt": "late"}\n')
    given = tmp_path / "given.model"
    data.train_tokenizer(corpus(20, seed=2), 64, given)
    before = tree(tmp_path)
    argv = ["shards", str(jsonl), str(txt), "--out", str(tmp_path / "new" / "out"),
            "--shard-tokens", "50", *extra]
    argv += (["--train-tokenizer", "--vocab-size", "64", "--tokenizer-out",
              str(tmp_path / "tok" / "t.model")] if train else ["--tokenizer", str(given)])
    assert data.main(argv) == 1
    assert capsys.readouterr().err.endswith(f"{reason}\n")
    assert tree(tmp_path) == before


def test_failed_rebuild_keeps_the_previous_output(tmp_path, inputs, capsys):
    out = built_folder(tmp_path, inputs)
    before = tree(tmp_path)
    (jsonl, txt), _ = inputs
    # A different tokenizer, then no train documents: neither may replace the old files.
    assert data.main(["shards", str(jsonl), str(txt), "--out", str(out), "--val-docs", "7",
                      "--train-tokenizer", "--vocab-size", "48",
                      "--tokenizer-out", str(tmp_path / "t.model")]) == 1
    assert "no train documents" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_failed_demo_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "demo_documents", lambda: corpus(40, seed=4))
    monkeypatch.setattr(data, "DEMO_VOCAB", 64)
    monkeypatch.setattr(data, "DEMO_VAL_TOKENS", 10**9)  # every document goes to val
    assert data.main(["demo", "--root", str(tmp_path)]) == 1
    assert "demo_sp64: no train documents (40 documents in all" in capsys.readouterr().err
    assert tree(tmp_path) == {}


def test_demo_hint_names_the_preset(tmp_path, monkeypatch, capsys):
    """Without PRESET=demo the printed command would train the 27M-parameter model on a CPU."""
    monkeypatch.setattr(data, "demo_documents", lambda: corpus(40, seed=4))
    monkeypatch.setattr(data, "DEMO_VOCAB", 64)
    monkeypatch.setattr(data, "DEMO_VAL_TOKENS", 200)
    assert data.main(["demo", "--root", str(tmp_path)]) == 0
    out, model = tmp_path / "data" / "datasets" / "demo_sp64", tmp_path / "data" / "tokenizers"
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"to train on it (from the repository root): PRESET=demo DATA_PATH={out} "
        f"TOKENIZER_PATH={model / 'demo_64_bpe.model'} python train_gpt.py")


def test_shards_path_errors_are_one_line(tmp_path, inputs, capsys):
    (jsonl, txt), _ = inputs
    afile, folder = tmp_path / "afile", tmp_path / "folder.txt"
    afile.write_text("x")
    folder.mkdir()
    model = tmp_path / "t.model"
    data.train_tokenizer(corpus(20, seed=2), 64, model)
    train = ["--train-tokenizer", "--vocab-size", "64", "--tokenizer-out"]
    cases = [
        ([str(txt), "--out", str(afile), *train, str(tmp_path / "new.model")],
         f"{afile}: exists and is not a folder"),
        ([str(txt), "--out", str(afile / "sub"), "--tokenizer", str(model)],
         f"{afile / 'sub'}: {afile} is a file, not a folder"),
        ([str(folder), "--out", str(tmp_path / "o"), "--tokenizer", str(model)],
         f"{folder}: is a folder; expected a .txt or .jsonl file"),
        ([str(jsonl), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path)],
         f"{tmp_path}: is a folder; expected a SentencePiece .model file"),
        ([str(jsonl), "--out", str(tmp_path / "o"), *train, str(folder)],
         f"{folder}: is a folder; expected a file path"),
    ]
    before = tree(tmp_path)
    for argv, message in cases:
        assert data.main(["shards", *argv]) == 1
        assert capsys.readouterr().err == f"error: {message}\n"
    assert tree(tmp_path) == before  # refused before any work

    run = subprocess.run([sys.executable, "-m", "tools.data", "shards", *cases[0][0]],
                         cwd=ROOT, capture_output=True, text=True)
    assert (run.returncode, run.stderr) == (1, f"error: {cases[0][1]}\n")


def test_train_tokenizer_needs_tokenizer_out(tmp_path, inputs, capsys):
    with pytest.raises(SystemExit):
        data.main(["shards", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--train-tokenizer train a BPE tokenizer on the inputs with the challenge settings; " \
           "needs --tokenizer-out" in help_text
    assert "--tokenizer-out PATH where the trained model is saved (required with --train-tokenizer)" \
        in help_text

    (jsonl, _), _ = inputs
    out = ["shards", str(jsonl), "--out", str(tmp_path / "o")]
    for argv, message in [
        (["--train-tokenizer"], "--train-tokenizer needs --tokenizer-out PATH, where the trained model "
                                "is saved"),
        (["--tokenizer", "m", "--tokenizer-out", "t.model"],
         "--tokenizer-out applies to --train-tokenizer, not to --tokenizer"),
        (["--tokenizer", "m", "--vocab-size", "64"],
         "--vocab-size applies to --train-tokenizer, not to --tokenizer"),
    ]:
        with pytest.raises(SystemExit) as done:
            data.main(out + argv)
        assert done.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tokenizer_too_little_text(tmp_path):
    with pytest.raises(data.DataError, match="only supports .* pieces, not 1024"):
        data.train_tokenizer(["tiny text"], 1024, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


# ---------------------------------------------------------------- demo

# demo_root: conftest's session corpus (the checkout's ./data when demo.sh built it, else one
# build); the determinism test below builds it once more and compares the bytes.


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_build_is_deterministic(demo_root, tmp_path):
    assert data.main(["demo", "--root", str(tmp_path)]) == 0
    def demo_files(root):  # (the checkout's ./data may hold other datasets beside the demo's)
        files = tree_bytes(root / "data" / "datasets" / "demo_sp1024")
        model = root / "data" / "tokenizers" / "demo_1024_bpe.model"
        return {**{f"datasets/demo_sp1024/{k}": v for k, v in files.items()},
                "tokenizers/demo_1024_bpe.model": model.read_bytes()}

    first, second = demo_files(demo_root), demo_files(tmp_path)
    assert sorted(first) == [
        "datasets/demo_sp1024/fineweb_train_000000.bin",
        "datasets/demo_sp1024/fineweb_val_000000.bin",
        "datasets/demo_sp1024/manifest.json",
        "tokenizers/demo_1024_bpe.model",
    ]
    assert first == second


def test_demo_contents(demo_root):
    folder = demo_root / "data" / "datasets" / "demo_sp1024"
    model = demo_root / "data" / "tokenizers" / "demo_1024_bpe.model"
    sp = data.load_tokenizer(model)
    assert sp.vocab_size() == 1024
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert not any(sp.is_byte(i) for i in range(1024))
    assert str(demo_root).encode() not in model.read_bytes()  # no paths of this machine

    totals = data.verify_dir(folder, vocab_size=1024)
    assert 60_000 <= totals["val"] <= 120_000
    assert totals["train"] >= 1_000_000
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["val"]["tokens"] == totals["val"]
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    for split in ("val", "train"):
        tokens = data.read_shard(folder / f"fineweb_{split}_000000.bin")
        assert tokens[0] == 1
        assert (tokens == 1).sum() == manifest["splits"][split]["documents"]


# ---------------------------------------------------------------- byte accounting

COVERED = [  # text the challenge tokenizer covers without <unk>
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Prices rose 12.5% in 2024: 1,234,567 units at $3.99 each.",
    "Runs   of    spaces,\ttabs\n\nand new   lines   ",
    "   leading and trailing whitespace   ",
    "He said “yes” – then left—fast, didn’t he?",
]
UNCOVERED = [
    "Café déjà vu: a naïve façade in Zürich.",
    "日本語のテキストと中文。",
    "Emoji 😀🎉 party 👍🏽 time",
    "Mixed: résumé, 東京 2024 🚀, ½ and Ⅻ.",
]


def reference_luts(sp, table_size):
    """base bytes, leading space, boundary, computed from the spec's wording."""
    base = np.zeros(table_size, dtype=np.int64)
    space = np.zeros(table_size, dtype=bool)
    boundary = np.ones(table_size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            base[i] = 1
        else:
            space[i] = piece.startswith("▁")
            base[i] = len(piece.removeprefix("▁").encode("utf-8"))
    return base, space, boundary


def counted_bytes(stream, luts):
    base, space, boundary = luts
    prev, target = stream[:-1], stream[1:]
    return int((base[target] + (space[target] & ~boundary[prev])).sum())


def normalised_bytes(sp, text):
    """UTF-8 length of the normalised text, and how much of it goes uncounted:
    <unk> pieces count 0, and as boundaries they also hide the leading space
    of the piece after them."""
    pieces, ids = sp.encode(text, out_type=str), sp.encode(text)
    normalised = sp.normalize(text)
    assert "".join(pieces) == normalised
    uncounted, after_unknown = 0, False
    for piece, i in zip(pieces, ids):
        if sp.is_unknown(i):
            uncounted += len(piece.replace("▁", " ").encode())
        elif after_unknown and piece.startswith("▁"):
            uncounted += 1
        after_unknown = sp.is_unknown(i)
    return len(normalised.replace("▁", " ").encode("utf-8")), uncounted


@pytest.fixture(params=["challenge", "demo"])
def tokenizer(request):
    if request.param == "demo":
        return data.load_tokenizer(request.getfixturevalue("demo_root") / "data" / "tokenizers"
                                   / "demo_1024_bpe.model")
    if not REFERENCE_MODEL.exists():
        pytest.skip("the challenge tokenizer is not in shared/reference")
    return data.load_tokenizer(REFERENCE_MODEL)


def test_byte_accounting(tokenizer):
    sp = tokenizer
    luts = reference_luts(sp, sp.vocab_size())
    texts = COVERED + UNCOVERED
    encoded = list(data.encode_documents(sp, texts))
    expected = []
    for text, tokens in zip(texts, encoded):
        total, uncounted = normalised_bytes(sp, text)
        expected.append(total - uncounted)
        assert tokens[0] == 1
        assert counted_bytes(tokens, luts) == total - uncounted
    # Documents back to back, as in a shard: BOS keeps them apart.
    assert counted_bytes(np.concatenate(encoded), luts) == sum(expected)


def test_challenge_tokenizer_unknowns():
    """The counted bytes equal the normalised text's UTF-8 length only where
    the text has no <unk>: the challenge model has no byte fallback, so
    accented letters, CJK and emoji are <unk> and go uncounted."""
    if not REFERENCE_MODEL.exists():
        pytest.skip("the challenge tokenizer is not in shared/reference")
    sp = data.load_tokenizer(REFERENCE_MODEL)
    assert not any(sp.is_byte(i) for i in range(sp.vocab_size()))
    assert all(normalised_bytes(sp, text)[1] == 0 for text in COVERED)
    assert all(normalised_bytes(sp, text)[1] > 0 for text in UNCOVERED)


def test_train_gpt_byte_luts_match(tokenizer):
    train_gpt = import_train_gpt()
    sp = tokenizer
    size = sp.vocab_size() + 8  # ids past the tokenizer are boundaries
    got = [t.cpu().numpy() for t in train_gpt.build_byte_luts(sp, size, "cpu")]
    want = reference_luts(sp, size)
    assert str(got[0].dtype) == "int16" and got[1].dtype == bool and got[2].dtype == bool
    for g, w in zip(got, want):
        assert g.tolist() == w.tolist()
    stream = np.concatenate(list(data.encode_documents(sp, COVERED + UNCOVERED)))
    assert counted_bytes(stream, got) == counted_bytes(stream, want)


# ---------------------------------------------------------------- download

class FakeHub:
    """Stands in for hf_hub_download, serving files from a local folder. Like
    huggingface_hub before 1.18, it resumes from a partial file that an earlier
    attempt left in local_dir unless force_download is set."""

    def __init__(self, folder):
        self.folder = folder
        self.calls = []  # (repo_id, filename)
        self.fail = {}  # filename -> exception to raise
        self.cut = {}  # filename -> bytes delivered before the connection drops
        self.resumed = []  # (filename, bytes found from an earlier attempt)

    def __call__(self, repo_id, filename, *, repo_type=None, local_dir=None, force_download=False,
                 **kwargs):
        assert repo_type == "dataset" and not kwargs
        self.calls.append((repo_id, filename))
        if filename in self.fail:
            raise self.fail[filename]
        source = self.folder / repo_id / filename
        if not source.exists():
            raise FileNotFoundError(f"404: {filename}")
        content = source.read_bytes()
        partial = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.incomplete"
        if force_download:
            partial.unlink(missing_ok=True)
        if partial.exists():
            self.resumed.append((filename, partial.stat().st_size))
        partial.parent.mkdir(parents=True, exist_ok=True)
        if filename in self.cut:
            partial.write_bytes(content[:self.cut.pop(filename)])
            raise TimeoutError("The read operation timed out")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(content)
        partial.replace(target)
        return str(target)

    def names(self):
        return [name for _, name in self.calls]


REPO = "willdepueoai/parameter-golf"
# The challenge downloader's variables (data/cached_challenge_fineweb.py).
REPO_ENV, ROOT_ENV = "MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
HUB_MANIFEST = {
    "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024,
                  "stats": {"files_train": 3, "files_val": 1}}],
    "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                    "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
}
SHARD_DIR = "datasets/datasets/fineweb10B_sp1024"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for name in (REPO_ENV, ROOT_ENV):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "hub"
    export = folder / REPO
    (export / SHARD_DIR).mkdir(parents=True)
    (export / "datasets" / "tokenizers").mkdir()
    (export / "datasets" / "manifest.json").write_text(json.dumps(HUB_MANIFEST))
    data.write_shard(export / SHARD_DIR / "fineweb_val_000000.bin", [1, 2, 3])
    for i in range(3):
        data.write_shard(export / SHARD_DIR / f"fineweb_train_{i:06d}.bin", [1] + [i] * 10)
    data.train_tokenizer(corpus(20, seed=2), 64, export / "datasets/tokenizers/fineweb_1024_bpe.model")
    (export / "datasets/tokenizers/fineweb_1024_bpe.vocab").write_text("<pad>\t0\n<s>\t0\n")
    fake = FakeHub(folder)
    monkeypatch.setattr(data, "HUB_DOWNLOAD", fake)
    return fake


def set_manifest(hub, manifest):
    (hub.folder / REPO / "datasets" / "manifest.json").write_text(json.dumps(manifest))


def run_download(root, *extra):
    return data.main(["download", "--root", str(root), "--train-shards", "2", *extra])


def local_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


EXPECTED_SHARDS = [
    "data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
    "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
    "data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    "data/manifest.json",
    "data/tokenizers/fineweb_1024_bpe.model",
    "data/tokenizers/fineweb_1024_bpe.vocab",
]
# With the shard folder's own manifest, written once every file is there.
EXPECTED_LOCAL = sorted(EXPECTED_SHARDS + ["data/datasets/fineweb10B_sp1024/manifest.json"])


def test_download_then_skip_complete_files(hub, tmp_path, capsys):
    root = tmp_path / "repo"
    assert run_download(root) == 0
    assert local_files(root) == EXPECTED_LOCAL
    for name in EXPECTED_SHARDS:
        remote = hub.folder / REPO / name.replace("data/", "datasets/", 1)
        assert (root / name).read_bytes() == remote.read_bytes()
    assert hub.names() == ["datasets/manifest.json", f"{SHARD_DIR}/fineweb_val_000000.bin",
                           f"{SHARD_DIR}/fineweb_train_000000.bin", f"{SHARD_DIR}/fineweb_train_000001.bin",
                           "datasets/tokenizers/fineweb_1024_bpe.model",
                           "datasets/tokenizers/fineweb_1024_bpe.vocab"]
    out = capsys.readouterr().out
    assert "[2/5] fineweb_train_000000.bin: 1,046 bytes (downloaded)" in out

    assert run_download(root) == 0
    assert len(hub.calls) == 6  # nothing fetched again
    assert "[5/5] fineweb_1024_bpe.vocab: 14 bytes (present)" in capsys.readouterr().out
    assert data.main(["verify", str(root / "data/datasets/fineweb10B_sp1024")]) == 0


def test_download_records_the_tokenizer_of_its_shards(hub, tmp_path, monkeypatch):
    """The shard folder's manifest names the tokenizer fetched with the shards by its sha256,
    so that train_gpt.py refuses another tokenizer of the same vocabulary size (without it, a
    wrong tokenizer scored the shards silently)."""
    train_gpt = import_train_gpt()
    root = tmp_path / "repo"
    assert run_download(root) == 0
    folder, model = root / "data/datasets/fineweb10B_sp1024", root / EXPECTED_SHARDS[4]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"file": "fineweb_1024_bpe.model", "vocab_size": 64,
                                     "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    assert {split: info["files"] for split, info in manifest["splits"].items()} == {
        "val": ["fineweb_val_000000.bin"],
        "train": ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]}
    assert manifest["splits"]["train"]["tokens"] == 22 and manifest["splits"]["val"]["shards"] == 1
    given = train_gpt.DataConfig(data_path=str(folder), tokenizer_path=str(model))
    train_gpt.check_tokenizer_hash(given)  # the shards' own: accepted
    other = tmp_path / "other.model"
    data.train_tokenizer(corpus(30, seed=9), 64, other)
    with pytest.raises(train_gpt.ConfigError, match="is not the tokenizer of DATA_PATH's shards"):
        train_gpt.check_tokenizer_hash(train_gpt.DataConfig(str(folder), str(other)))
    assert data.main(["verify", str(folder)]) == 0  # its counts and vocabulary are the files'


def test_download_replaces_partial_file(hub, tmp_path, capsys):
    root = tmp_path / "repo"
    assert run_download(root) == 0
    shard = root / "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-5])
    (root / "data/tokenizers/fineweb_1024_bpe.model").write_bytes(b"junk")
    hub.calls.clear()
    assert run_download(root) == 0
    assert hub.names() == [f"{SHARD_DIR}/fineweb_train_000001.bin",
                           "datasets/tokenizers/fineweb_1024_bpe.model"]
    assert shard.read_bytes() == good
    assert "(replaced)" in capsys.readouterr().out
    assert local_files(root) == EXPECTED_LOCAL  # no scratch files left


def test_download_offline(hub, tmp_path, capsys):
    hub.fail["datasets/manifest.json"] = ConnectionError("[Errno -2] Name or service not known")
    root = tmp_path / "repo"
    assert run_download(root) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not download datasets/manifest.json from the Hugging "
                          "Face hub dataset willdepueoai/parameter-golf")
    assert "Name or service not known" in err and "Traceback" not in err
    assert local_files(root) == []


def test_interrupted_download_resumes(hub, tmp_path, capsys):
    """The hub's partial file survives a failed attempt, and the next one continues it."""
    shard = f"{SHARD_DIR}/fineweb_train_000001.bin"
    hub.cut[shard] = 700
    root = tmp_path / "repo"
    assert run_download(root) == 1
    assert "fineweb_train_000001.bin" in capsys.readouterr().err
    assert local_files(root) == [
        "data/datasets/fineweb10B_sp1024/.fineweb_train_000001.bin.download/.cache/huggingface/"
        f"download/{shard}.incomplete", *EXPECTED_SHARDS[:1], *EXPECTED_SHARDS[2:4]]
    assert run_download(root) == 0
    assert hub.resumed == [(shard, 700)]
    assert local_files(root) == EXPECTED_LOCAL


def test_download_rejects_corrupt_file(hub, tmp_path, capsys):
    (hub.folder / REPO / SHARD_DIR / "fineweb_val_000000.bin").write_bytes(shard_bytes(magic=5))
    assert run_download(tmp_path / "repo") == 1
    assert "downloaded datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin is unusable" \
        in capsys.readouterr().err
    assert local_files(tmp_path / "repo") == ["data/manifest.json"]


def test_download_checks_manifest_counts(hub, tmp_path, capsys):
    assert data.main(["download", "--root", str(tmp_path), "--train-shards", "4"]) == 1
    assert "the hub has 3 training shards, 4 were asked for" in capsys.readouterr().err
    assert data.main(["download", "--root", str(tmp_path), "--train-shards", "1",
                      "--val-shards", "2"]) == 1
    assert "the hub has 1 val shards, 2 were asked for" in capsys.readouterr().err


def broken(change):
    manifest = json.loads(json.dumps(HUB_MANIFEST))
    change(manifest)
    return manifest


@pytest.mark.parametrize("manifest, reason", [
    ({"something": "else"}, "no dataset 'fineweb10B_sp1024' (it lists none); check --variant and "
                            "--remote-root"),
    (broken(lambda m: m["datasets"][0].update(name="fineweb10B_sp2048")),
     "no dataset 'fineweb10B_sp1024' (it lists ['fineweb10B_sp2048']); check --variant and --remote-root"),
    (broken(lambda m: m["datasets"][0].pop("stats")),
     "dataset 'fineweb10B_sp1024' has no shard counts (stats.files_train and stats.files_val missing)"),
    (broken(lambda m: m["datasets"][0]["stats"].pop("files_val")),
     "dataset 'fineweb10B_sp1024' has no shard counts (stats.files_val missing)"),
    (broken(lambda m: m.pop("tokenizers")),
     "no tokenizer 'sp_bpe_1024' (named by dataset 'fineweb10B_sp1024')"),
    (broken(lambda m: m["tokenizers"][0].update(model_path="", vocab_path=None)),
     "tokenizer 'sp_bpe_1024' lists no files (model_path, vocab_path or path)"),
    (broken(lambda m: m["tokenizers"][0].update(vocab_path="../../x.vocab")),
     "tokenizer file '../../x.vocab' is not a path inside the export"),
])
def test_download_stops_on_incomplete_manifest(hub, tmp_path, capsys, manifest, reason):
    set_manifest(hub, manifest)
    root = tmp_path / "repo"
    assert run_download(root) == 1
    local = root / "data" / "manifest.json"
    assert capsys.readouterr().err == (f"error: {local} (hub dataset {REPO}, datasets/manifest.json): "
                                       f"{reason}\n")
    assert hub.names() == ["datasets/manifest.json"]  # not one shard
    assert local_files(root) == ["data/manifest.json"]


def test_download_from_another_export(hub, tmp_path, monkeypatch):
    mirror = hub.folder / "someone/mirror"
    shutil.copytree(hub.folder / REPO / "datasets", mirror / "exports/v2")
    monkeypatch.setenv(REPO_ENV, "someone/mirror")
    monkeypatch.setenv(ROOT_ENV, "exports/v2")
    assert run_download(tmp_path / "a") == 0
    assert local_files(tmp_path / "a") == EXPECTED_LOCAL
    assert {call[0] for call in hub.calls} == {"someone/mirror"}
    assert all(name.startswith("exports/v2/") for name in hub.names())

    # The options win over the environment.
    hub.calls.clear()
    assert run_download(tmp_path / "b", "--repo-id", REPO, "--remote-root", "datasets/") == 0
    assert local_files(tmp_path / "b") == EXPECTED_LOCAL
    assert {call[0] for call in hub.calls} == {REPO}
    assert hub.names()[0] == "datasets/manifest.json"


# ---------------------------------------------------------------- the training loader

def old_loader_batches(files, world, accum, global_tokens, seq_len, steps):
    """The loader as it was, written out: every rank widened the whole chunk of (local + 1) *
    world tokens (the shards read in order, wrapping around) to int64, then took its slice.
    Returns, per micro-step, each rank's (inputs, targets)."""
    stream = np.concatenate([np.fromfile(f, dtype="<u2", offset=1024) for f in files])
    local = global_tokens // (world * accum)
    n, out = (local + 1) * world, []
    for i in range(steps):
        chunk = stream[np.arange(i * n, (i + 1) * n) % stream.size].astype(np.int64)
        spans = [chunk[r * (local + 1):(r + 1) * (local + 1)] for r in range(world)]
        out.append([(s[:-1].reshape(-1, seq_len), s[1:].reshape(-1, seq_len)) for s in spans])
    return out


@pytest.mark.parametrize("world, accum", [(1, 8), (2, 4), (3, 1), (8, 1)])
def test_loader_gives_each_rank_the_old_batches(tmp_path, world, accum):
    """Shards of 1,000, 37 and 2,500 tokens, so chunks straddle shard ends and wrap around:
    every rank gets, micro-step by micro-step, the batches of the old whole-chunk loader."""
    tg = import_train_gpt()
    torch = importlib.import_module("torch")
    rng = np.random.default_rng(world)
    files = []
    for i, size in enumerate((1000, 37, 2500)):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        path.write_bytes(shard_bytes(tokens=rng.integers(0, 1024, size)))
        files.append(str(path))
    seq_len, steps = 16, 12
    global_tokens = 3 * seq_len * world * accum  # three rows per rank and micro-step
    want = old_loader_batches(files, world, accum, global_tokens, seq_len, steps)
    for rank in range(world):
        loader = tg.DistributedTokenLoader(files, tg.Runtime(rank=rank, world_size=world))
        for i in range(steps):
            x, y = loader.next_batch(global_tokens, seq_len, accum)
            assert x.dtype == y.dtype == torch.int64
            assert np.array_equal(x.numpy(), want[i][rank][0]), (rank, i)
            assert np.array_equal(y.numpy(), want[i][rank][1]), (rank, i)


def test_token_stream_hands_out_stored_tokens(tmp_path):
    """Within a shard the stream hands out a uint16 view of the memory map (no copy, no
    widening: each rank widens only its own span); across a shard end, one uint16 array."""
    tg = import_train_gpt()
    paths = [tmp_path / f"fineweb_train_{i:06d}.bin" for i in range(2)]
    for i, path in enumerate(paths):
        path.write_bytes(shard_bytes(tokens=np.arange(100) + 100 * i))
    stream = tg.TokenStream([str(p) for p in paths])
    inside = stream.take(60)
    assert inside.dtype == np.uint16 and np.shares_memory(inside, stream.tokens)
    across = stream.take(60)
    assert across.dtype == np.uint16 and across.tolist() == list(range(60, 120))
