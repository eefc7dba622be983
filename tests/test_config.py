"""Tests of configuration handling (SPEC section 1): every bad setting or input stops
`python train_gpt.py` before any work with one line naming the variable (or file), the value
and what is allowed; exit code 2, no traceback, nothing written."""

import io
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
TOKENIZER_VOCAB = 64
WORDS = ("the cat sat on a mat while seven dogs ran past quietly and every bird sang loud songs "
         "about rivers mountains small towns green fields old bridges").split()


def write_shard(path, tokens, magic=20240520, version=1):
    """A shard as SPEC section 2 describes it: 256 int32 header (magic, version, N), then uint16 tokens."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, tokens.size)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny SentencePiece model and a valid data folder, outside every run's working directory."""
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                   vocab_size=TOKENIZER_VOCAB, model_type="bpe", character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    tokenizer = root / "tiny.model"
    tokenizer.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert sp.vocab_size() == TOKENIZER_VOCAB
    ids = [i for s in sentences for i in [1] + sp.encode(s)]
    data = root / "data"
    data.mkdir()
    write_shard(data / "fineweb_train_000000.bin", ids[:2000])
    write_shard(data / "fineweb_val_000000.bin", ids[2000:2600])
    bad = root / "bad_magic"
    bad.mkdir()
    write_shard(bad / "fineweb_train_000000.bin", ids[:2000])
    write_shard(bad / "fineweb_val_000000.bin", ids[2000:2600], magic=20240521)
    bad_size = root / "bad_size"
    bad_size.mkdir()
    write_shard(bad_size / "fineweb_val_000000.bin", ids[2000:2600])
    write_shard(bad_size / "fineweb_train_000000.bin", ids[:2000])
    with open(bad_size / "fineweb_train_000000.bin", "ab") as f:
        f.write(b"\x00")  # one byte more than the header's token count allows
    base = dict(
        DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE=str(TOKENIZER_VOCAB), DEVICE="cpu",
        NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2", ROPE_DIMS="8",
        BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="8", VE_DIM="8", VE_LAYERS="1", XSA_LAST_N="2",
        TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="16", TRAIN_BATCH_TOKENS="128", VAL_BATCH_SIZE="128",
        ITERATIONS="2", WARMUP_STEPS="0", WARMDOWN_ITERS="1", MAX_WALLCLOCK_SECONDS="0", SLOT_ENABLED="0",
        EVAL_STRIDE="8", RUN_ID="cfgtest",
    )
    return dict(root=root, base=base, data=data, tokenizer=tokenizer, bad=bad, bad_size=bad_size)


# (case id, overrides, variable or file, value, substrings saying what is allowed)
CASES = [
    ("num_heads", dict(NUM_HEADS="3"), "NUM_HEADS", "3", ["divisor of MODEL_DIM=32"]),
    ("num_kv_heads", dict(NUM_HEADS="4", NUM_KV_HEADS="3"), "NUM_KV_HEADS", "3", ["divisor of NUM_HEADS=4"]),
    # One process runs 8 micro-steps: a multiple of TRAIN_SEQ_LEN (192 = 12 x 16) is not enough.
    ("batch_split", dict(TRAIN_BATCH_TOKENS="192"), "TRAIN_BATCH_TOKENS", "192", ["multiple of 128"]),
    ("vocab_size", dict(VOCAB_SIZE="100"), "VOCAB_SIZE", "100", [f"VOCAB_SIZE={TOKENIZER_VOCAB}"]),
    ("bool", dict(TIE_EMBEDDINGS="maybe"), "TIE_EMBEDDINGS", "maybe", ["1/0"]),
    ("slot_mode", dict(SLOT_MODE="foo"), "SLOT_MODE", "foo", ["'scored'", "'context'"]),
    ("eval_tail", dict(EVAL_TAIL="foo"), "EVAL_TAIL", "foo", ["'once'", "'original'"]),
    ("compressor", dict(COMPRESSOR="foo"), "COMPRESSOR", "foo", ["'lzma'"]),
    ("negative_count", dict(ITERATIONS="-1"), "ITERATIONS", "-1", [">= 0"]),
    ("not_an_int", dict(NUM_LAYERS="two"), "NUM_LAYERS", "two", ["int"]),
    ("missing_data", dict(DATA_PATH="{root}/no_such_folder"), "DATA_PATH", "{root}/no_such_folder",
     ["fineweb_val_*.bin"]),
    ("missing_tokenizer", dict(TOKENIZER_PATH="{root}/no_such.model"), "TOKENIZER_PATH", "{root}/no_such.model",
     ["SentencePiece"]),
    # Settings the validation misses (found by these tests): each one crashes after logs/ is written.
    ("seed_out_of_range", dict(SEED="-1"), "SEED", "-1", ["expected"]),  # numpy seeds take [0, 2**32 - 1]
    ("run_id_with_slash", dict(RUN_ID="a/b"), "RUN_ID", "a/b", ["expected"]),  # logs/a/b.txt cannot be opened
    ("artifact_empty", dict(ARTIFACT=""), "ARTIFACT", "", ["expected"]),  # crashes at export, after training
    ("bad_magic", dict(DATA_PATH="{root}/bad_magic"), None, "{root}/bad_magic/fineweb_val_000000.bin",
     ["magic", "20240520"]),
    ("bad_size", dict(DATA_PATH="{root}/bad_size"), None, "{root}/bad_size/fineweb_train_000000.bin",
     ["size", "token count"]),
]


def clean_env(settings):
    """The parent environment without any setting train_gpt.py reads, plus `settings`."""
    ours = {f.name.upper() for f in fields(tg.Hyperparameters)} | {"PRESET", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                   "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(settings)
    return env


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """Every case run once, two at a time: {case id: (returncode, stdout, stderr, files left in cwd)}."""
    root = str(inputs["root"])

    def run_case(case):
        case_id, overrides = case[0], case[1]
        cwd = tmp_path_factory.mktemp(f"cwd_{case_id}")
        settings = dict(inputs["base"])
        settings.update({k: v.format(root=root) for k, v in overrides.items()})
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd, env=clean_env(settings),
                              capture_output=True, text=True, timeout=300)
        return case_id, (proc.returncode, proc.stdout, proc.stderr, sorted(p.name for p in cwd.iterdir()))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, CASES))


def test_base_settings_are_valid(inputs):
    """The base environment is itself valid, so each case fails only for its one bad setting."""
    h = tg.Hyperparameters.from_env(inputs["base"])
    h.check_world(1)
    assert tg.load_tokenizer(h).vocab_size() == TOKENIZER_VOCAB
    for split in ("train", "val"):
        files = tg.shard_files(h.data_path, split)
        assert len(files) == 1
        for f in files:
            tg.load_data_shard(f)
    tg.load_validation_tokens(tg.shard_files(h.data_path, "val"), h.max_seq_len, h.vocab_size)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_setting_stops_cleanly(case, runs, inputs):
    """Exit code 2, one `error:` line naming the variable (or file), the value and what is allowed;
    no traceback, nothing printed to stdout, nothing written in the working directory."""
    case_id, _, name, value, allowed = case
    value = value.format(root=str(inputs["root"]))
    rc, out, err, left = runs[case_id]
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    msg = lines[0]
    if name is None:
        assert value in msg
    else:
        assert re.search(rf"\b{name}='?{re.escape(value)}'?", msg), msg
    for text in allowed:
        assert text in msg, msg
    assert out == ""
    assert left == []
