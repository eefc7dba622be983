"""Tests of configuration handling (SPEC section 1): every bad setting or input stops
`python train_gpt.py` before any work with one line naming the variable (or file), the value
and what is allowed; exit code 2, no traceback, nothing written. Every variable of the
original keeps its name and default; the three removed ones stop a run that sets them."""

import io
import os
import random
import re
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_gpt.py"
TOKENIZER_VOCAB = 64
WORDS = ("the cat sat on a mat while seven dogs ran past quietly and every bird sang loud songs "
         "about rivers mountains small towns green fields old bridges").split()


def write_shard(path, tokens, magic=20240520, version=1):
    """A shard as SPEC section 2 describes it: 256 int32 header (magic, version, N), then
    uint16 tokens."""
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
                                   vocab_size=TOKENIZER_VOCAB, model_type="bpe",
                                   character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   minloglevel=2)
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
        DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE=str(TOKENIZER_VOCAB),
        DEVICE="cpu", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
        ROPE_DIMS="8", BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="8", VE_DIM="8", VE_LAYERS="1",
        XSA_LAST_N="2", TRAIN_SEQ_LEN="16", EVAL_SEQ_LEN="16", TRAIN_BATCH_TOKENS="128",
        VAL_BATCH_SIZE="128", ITERATIONS="2", WARMUP_STEPS="0", WARMDOWN_ITERS="1",
        MAX_WALLCLOCK_SECONDS="0", SLOT_ENABLED="0", EVAL_STRIDE="8", RUN_ID="cfgtest",
    )
    return dict(root=root, base=base, data=data, tokenizer=tokenizer, bad=bad, bad_size=bad_size)


# (case id, overrides, variable or file, value, substrings saying what is allowed)
CASES = [
    ("num_heads", dict(NUM_HEADS="3"), "NUM_HEADS", "3", ["divisor of MODEL_DIM=32"]),
    ("num_kv_heads", dict(NUM_HEADS="4", NUM_KV_HEADS="3"), "NUM_KV_HEADS", "3",
     ["divisor of NUM_HEADS=4"]),
    # One process runs 8 micro-steps: a multiple of TRAIN_SEQ_LEN (192 = 12 x 16) is not enough.
    ("batch_split", dict(TRAIN_BATCH_TOKENS="192"), "TRAIN_BATCH_TOKENS", "192",
     ["multiple of 128"]),
    ("vocab_size", dict(VOCAB_SIZE="100"), "VOCAB_SIZE", "100", [f"VOCAB_SIZE={TOKENIZER_VOCAB}"]),
    ("bool", dict(TIE_EMBEDDINGS="maybe"), "TIE_EMBEDDINGS", "maybe", ["1/0"]),
    ("slot_mode", dict(SLOT_MODE="foo"), "SLOT_MODE", "foo", ["'scored'", "'context'"]),
    ("eval_tail", dict(EVAL_TAIL="foo"), "EVAL_TAIL", "foo", ["'once'", "'original'"]),
    ("compressor", dict(COMPRESSOR="foo"), "COMPRESSOR", "foo", ["'lzma'"]),
    ("negative_count", dict(ITERATIONS="-1"), "ITERATIONS", "-1", [">= 0"]),
    ("not_an_int", dict(NUM_LAYERS="two"), "NUM_LAYERS", "two", ["int"]),
    ("missing_data", dict(DATA_PATH="{root}/no_such_folder"), "DATA_PATH", "{root}/no_such_folder",
     ["fineweb_val_*.bin"]),
    ("missing_tokenizer", dict(TOKENIZER_PATH="{root}/no_such.model"), "TOKENIZER_PATH",
     "{root}/no_such.model", ["SentencePiece"]),
    # Settings the validation once missed (found by these tests): each crashed after logs/ was
    # written. numpy seeds take [0, 2**32 - 1]; logs/a/b.txt cannot be opened; an empty
    # ARTIFACT crashed at export, after training.
    ("seed_out_of_range", dict(SEED="-1"), "SEED", "-1", ["expected"]),
    ("run_id_with_slash", dict(RUN_ID="a/b"), "RUN_ID", "a/b", ["expected"]),
    ("artifact_empty", dict(ARTIFACT=""), "ARTIFACT", "", ["expected"]),
    ("bad_magic", dict(DATA_PATH="{root}/bad_magic"), None,
     "{root}/bad_magic/fineweb_val_000000.bin", ["magic", "20240520"]),
    ("bad_size", dict(DATA_PATH="{root}/bad_size"), None,
     "{root}/bad_size/fineweb_train_000000.bin", ["size", "token count"]),
]


# Variables the script reads besides its settings (torchrun's), and the three removed settings.
LAUNCH_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT"}
REMOVED = {"MTP_NUM_HEADS": "0", "MTP_LOSS_WEIGHT": "0.2", "DTG_ENABLED": "0"}
OURS = tg.Config.variables() | set(REMOVED) | LAUNCH_VARIABLES


def clean_env(settings):
    """The parent environment without any variable train_gpt.py reads, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    env.update(settings)
    return env


def case_settings(case, inputs) -> dict:
    settings = dict(inputs["base"])
    settings.update({k: v.format(root=str(inputs["root"])) for k, v in case[1].items()})
    return settings


def run_main(settings, cwd, capsys):
    """tg.main() in this process, as `python train_gpt.py` in `cwd` with only `settings` set:
    (exit status, stdout, stderr, files left in cwd). The signal handler and the thread count
    main sets are restored."""
    sigterm, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for name in OURS & set(os.environ):
            mp.delenv(name)
        for name, value in settings.items():
            mp.setenv(name, value)
        try:
            with pytest.raises(SystemExit) as stopped:
                tg.main()
        finally:
            signal.signal(signal.SIGTERM, sigterm)
            torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return stopped.value.code, out, err, sorted(p.name for p in Path(cwd).iterdir())


def test_base_settings_are_valid(inputs):
    """The base environment is itself valid, so each case fails only for its one bad setting."""
    cfg = tg.Config.from_env(inputs["base"])
    tg.check_world(cfg, 1)
    assert tg.load_tokenizer(cfg.data, cfg.model.vocab_size).vocab_size() == TOKENIZER_VOCAB
    for split in ("train", "val"):
        files = tg.shard_files(cfg.data.data_path, split)
        assert len(files) == 1
        for f in files:
            tg.load_data_shard(f)
    tg.load_validation_tokens(tg.shard_files(cfg.data.data_path, "val"), cfg.max_seq_len,
                              cfg.model.vocab_size)
    data, warnings = tg.load_data(cfg, tg.Runtime(), training=True)
    # (no manifest.json here: the one warning says the tokenizer is unchecked)
    assert data.train_tokens == 2000 and warnings == tg.check_tokenizer_hash(cfg.data)


def check_stopped_cleanly(case, result, root) -> None:
    """Exit code 2, one `error:` line naming the variable (or file), the value and what is
    allowed; no traceback, nothing printed to stdout, nothing written in the working directory."""
    case_id, _, name, value, allowed = case
    value = value.format(root=str(root))
    rc, out, err, left = result
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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_setting_stops_cleanly(case, inputs, tmp_path, capsys):
    """Each case through the script's entry point, main(), in this process."""
    check_stopped_cleanly(case, run_main(case_settings(case, inputs), tmp_path, capsys),
                          inputs["root"])


# The same contract from a real `python train_gpt.py`: a setting and an input file.
SCRIPT_CASES = [c for c in CASES if c[0] in ("num_heads", "bad_magic")]


@pytest.fixture(scope="module")
def script_runs(inputs, tmp_path_factory):
    """The script cases run as processes, two at a time: {case id: (returncode, stdout,
    stderr, files left in cwd)}."""

    def run_case(case):
        cwd = tmp_path_factory.mktemp(f"cwd_{case[0]}")
        proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=cwd,
                              env=clean_env(case_settings(case, inputs)), capture_output=True,
                              text=True, timeout=120)
        left = sorted(p.name for p in cwd.iterdir())
        return case[0], (proc.returncode, proc.stdout, proc.stderr, left)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run_case, SCRIPT_CASES))


@pytest.mark.slow
@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_bad_setting_stops_the_script_cleanly(case, script_runs, inputs):
    check_stopped_cleanly(case, script_runs[case[0]], inputs["root"])


# ---------------------------------------------------------------- removed and misspelt settings


@pytest.mark.parametrize("name, value", [("MTP_NUM_HEADS", "2"), ("DTG_ENABLED", "1"),
                                         ("MTP_LOSS_WEIGHT", "0.5")])
def test_a_removed_setting_set_stops_the_run(name, value, inputs, tmp_path, capsys):
    """A removed setting at anything but its default stops with one line saying it was removed;
    at its default it is accepted (and ignored)."""
    with pytest.raises(tg.ConfigError) as info:
        tg.Config.from_env({name: value})
    msg = str(info.value)
    assert re.fullmatch(rf"{name}='{re.escape(value)}' is not allowed: the setting was removed "
                        r"\([^)]+\); unset it", msg), msg
    rc, out, err, left = run_main({**inputs["base"], name: value}, tmp_path, capsys)
    assert (rc, out, err, left) == (2, "", f"error: {msg}\n", [])
    accepted = [REMOVED[name]] + (["false", "off", "no"] if name == "DTG_ENABLED" else [])
    for default in accepted:
        cfg = tg.Config.from_env({name: default, "RUN_ID": "x"})
        assert cfg == tg.Config.from_env({"RUN_ID": "x"})


def test_misspelt_settings_are_noted_with_a_suggestion():
    """tools.preflight notes a variable that looks like a setting misspelt, naming the setting
    meant; other variables (PATH), lower-case names, the settings and the removed ones get none."""
    from tools.preflight import suspicious_vars
    assert suspicious_vars(tg, {"ITERATION": "2", "SLOT_STPES": "4", "PATH": "/bin"}) == [
        "ITERATION is not a setting of train_gpt.py; did you mean ITERATIONS?",
        "SLOT_STPES is not a setting of train_gpt.py; did you mean SLOT_STEPS?"]
    quiet = {"ITERATIONS": "2", "SLOT_STEPS": "4", "MTP_NUM_HEADS": "0", "PRESET": "demo",
             "slot_stpes": "4", "HOME": "/home/user", "RANK": "0"}
    assert suspicious_vars(tg, quiet) == []


# ---------------------------------------------------------------- every setting of the original

# The original's variables (its Hyperparameters, the README's table), where each lives now and
# its default there. CONTROL_TENSOR_NAME_PATTERNS lost four patterns that name no parameter of
# this model (tests/test_model.py checks that the same tensors are control tensors).
ORIGINAL_DEFAULTS = [
    ("DATA_PATH", "data.data_path", "./data/datasets/fineweb10B_sp1024"),
    ("TOKENIZER_PATH", "data.tokenizer_path", "./data/tokenizers/fineweb_1024_bpe.model"),
    ("SEED", "run.seed", 1337), ("PRESET", "run.preset", ""), ("DEVICE", "run.device", "auto"),
    ("CPU_THREADS", "run.cpu_threads", 1), ("COMPILE", "run.compile", "auto"),
    ("ITERATIONS", "train.iterations", 20000),
    ("MAX_WALLCLOCK_SECONDS", "train.max_wallclock_seconds", 600.0),
    ("WARMDOWN_ITERS", "train.warmdown_iters", 3500), ("WARMUP_STEPS", "train.warmup_steps", 20),
    ("TRAIN_BATCH_TOKENS", "train.train_batch_tokens", 786432),
    ("TRAIN_SEQ_LEN", "train.train_seq_len", 2048), ("EVAL_SEQ_LEN", "eval.seq_len", 2048),
    ("VAL_BATCH_SIZE", "train.val_batch_size", 524288),
    ("VAL_LOSS_EVERY", "train.val_loss_every", 4000),
    ("TRAIN_LOG_EVERY", "train.train_log_every", 500),
    ("VOCAB_SIZE", "model.vocab_size", 1024), ("NUM_LAYERS", "model.num_layers", 11),
    ("MODEL_DIM", "model.model_dim", 512), ("NUM_HEADS", "model.num_heads", 8),
    ("NUM_KV_HEADS", "model.num_kv_heads", 4), ("MLP_MULT", "model.mlp_mult", 3.0),
    ("TIE_EMBEDDINGS", "model.tie_embeddings", True),
    ("LOGIT_SOFTCAP", "model.logit_softcap", 30.0), ("ROPE_BASE", "model.rope_base", 10000.0),
    ("QK_GAIN_INIT", "model.qk_gain_init", 4.0), ("ROPE_DIMS", "model.rope_dims", 16),
    ("LN_SCALE", "model.ln_scale", True), ("XSA_LAST_N", "model.xsa_last_n", 11),
    ("BIGRAM_VOCAB_SIZE", "model.bigram_vocab_size", 1024),
    ("BIGRAM_DIM", "model.bigram_dim", 128), ("VE_ENABLED", "model.ve_enabled", True),
    ("VE_DIM", "model.ve_dim", 128), ("VE_LAYERS", "model.ve_layers", "9,10"),
    ("VRL_ENABLED", "model.vrl_enabled", True),
    ("TIED_EMBED_LR", "optim.tied_embed_lr", 0.035),
    ("TIED_EMBED_INIT_STD", "model.tied_embed_init_std", 0.005),
    ("EMBED_LR", "optim.embed_lr", 0.6), ("HEAD_LR", "optim.head_lr", 0.008),
    ("MATRIX_LR", "optim.matrix_lr", 0.025), ("SCALAR_LR", "optim.scalar_lr", 0.025),
    ("MUON_MOMENTUM", "optim.muon_momentum", 0.99),
    ("MUON_MOMENTUM_WARMUP_START", "optim.muon_momentum_warmup_start", 0.92),
    ("MUON_MOMENTUM_WARMUP_STEPS", "optim.muon_momentum_warmup_steps", 1500),
    ("MUON_BACKEND_STEPS", "optim.muon_backend_steps", 5), ("MUON_WD", "optim.muon_wd", 0.04),
    ("ADAM_WD", "optim.adam_wd", 0.04), ("BETA1", "optim.beta1", 0.9),
    ("BETA2", "optim.beta2", 0.95), ("ADAM_EPS", "optim.adam_eps", 1e-8),
    ("GRAD_CLIP_NORM", "optim.grad_clip_norm", 0.3), ("EMA_DECAY", "train.ema_decay", 0.997),
    ("QAT_ENABLED", "train.qat_enabled", False),
    ("LATE_QAT_THRESHOLD", "train.late_qat_threshold", 0.15),
    ("CONTROL_TENSOR_NAME_PATTERNS", "model.control_tensor_name_patterns",
     "attn_scale,mlp_scale,resid_mix,q_gain,skip_weight,skip_weights,smear,ve_layer_scales,"
     "ve_shared.scale"),
    ("COMPRESSOR", "export.compressor", "lzma"), ("GPTQ_ENABLED", "export.gptq_enabled", False),
    ("GPTQ_CALIBRATION_BATCHES", "export.gptq_calibration_batches", 64),
    ("GPTQ_RESERVE_SECONDS", "export.gptq_reserve_seconds", 10.0),
    ("EVAL_ONLY", "run.eval_only", False), ("ARTIFACT", "export.artifact", "final_model.int6.ptz"),
    ("EVAL_STRIDE", "eval.stride", 96), ("EVAL_TAIL", "eval.tail", "once"),
    ("SLOT_ENABLED", "eval.slot.enabled", True), ("SLOT_STEPS", "eval.slot.steps", 48),
    ("SLOT_LR", "eval.slot.lr", 0.012), ("SLOT_LR_MIN", "eval.slot.lr_min", 0.001),
    ("SLOT_BATCH_SEQS", "eval.slot.batch_seqs", 32), ("SLOT_MODE", "eval.slot.mode", "scored"),
    ("SLOT_INTERLEAVE", "eval.slot.interleave", 8), ("TTT_ENABLED", "eval.ttt.enabled", False),
    ("TTT_LR", "eval.ttt.lr", 0.002), ("TTT_EPOCHS", "eval.ttt.epochs", 3),
    ("TTT_CHUNK_TOKENS", "eval.ttt.chunk_tokens", 32768),
    ("TTT_FREEZE_BLOCKS", "eval.ttt.freeze_blocks", 0),
    ("TTT_MOMENTUM", "eval.ttt.momentum", 0.9), ("TTT_BATCH_SEQS", "eval.ttt.batch_seqs", 32),
    ("TTT_GRAD_CLIP", "eval.ttt.grad_clip", 1.0), ("TTT_QAT", "eval.ttt.qat", True),
]
ORIGINAL_PATTERNS = ("attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,"
                     "skip_weight,skip_weights,smear,dtg_gate,ve_layer_scales,ve_shared.scale")
# Added by issue 19, the reliability work and issue 30.
NEW_DEFAULTS = [("EXPORT_ONLY", "run.export_only", False),
                ("MODEL_PATH", "export.model_path", "final_model.pt"),
                ("COLLECTIVE_TIMEOUT_SECONDS", "run.collective_timeout_seconds", 300.0),
                ("TTT_FLOAT32", "eval.ttt.float32", False),
                ("ATTENTION_BACKEND", "run.attention_backend", "auto"),  # issue 29
                ("LATE_QAT", "train.late_qat", "record"),
                # Issue 30: the accepted records' components (docs/legal_stack.md).
                ("MUON_ROW_NORMALIZE", "optim.muon_row_normalize", False),
                ("PARALLEL_RESIDUAL", "model.parallel_residual", False),
                ("PARALLEL_START_LAYER", "model.parallel_start_layer", 7),
                ("RECUR_LAYERS", "model.recur_layers", ""),
                ("RECUR_START_STEP", "train.recur_start_step", 3000)]


def lookup(cfg: tg.Config, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_every_original_setting_keeps_its_name_and_default():
    """The original's 84 variables less the three removed ones (and RUN_ID, below) are
    settings with the same default and type; the only other settings are the new ones."""
    names = [n for n, _, _ in ORIGINAL_DEFAULTS]
    assert len(names) == len(set(names)) == 84 - len(REMOVED) - 1  # RUN_ID: below
    assert tg.Config.variables() == set(names) | {"RUN_ID"} | {n for n, _, _ in NEW_DEFAULTS}
    cfg = tg.Config.from_env({})
    for name, path, default in ORIGINAL_DEFAULTS + NEW_DEFAULTS:
        value = lookup(cfg, path)
        assert value == default and type(value) is type(default), (name, value)
    # RUN_ID's default is a random uuid, a new one each time.
    ids = {tg.Config.from_env({}).run.run_id for _ in range(2)} | {cfg.run.run_id}
    assert len(ids) == 3 and all(str(uuid.UUID(i)) == i for i in ids)
    assert set(cfg.model.control_patterns) < set(ORIGINAL_PATTERNS.split(","))
    # Each variable reaches its field: set, it is read there (a value unlike every default).
    assert lookup(tg.Config.from_env({"SLOT_STEPS": "7"}), "eval.slot.steps") == 7
    assert tg.Config.from_env({"TTT_LR": "0.5"}).eval.ttt.lr == 0.5
    assert tg.Config.from_env({"EVAL_STRIDE": "33"}).eval.stride == 33


def test_eval_seq_len_of_zero_means_the_training_length():
    cfg = tg.Config.from_env({"EVAL_SEQ_LEN": "0", "TRAIN_SEQ_LEN": "128", "EVAL_STRIDE": "64"})
    assert cfg.eval.seq_len == 128 and cfg.max_seq_len == 128
    assert tg.Config.from_env({"EVAL_SEQ_LEN": "-5", "TRAIN_SEQ_LEN": "256"}).eval.seq_len == 256


# (environment, variable named, its value as the message shows it)
BAD_VALUES = [
    ({"NUM_LAYERS": "two"}, "NUM_LAYERS", "'two'"),  # not an int
    ({"MLP_MULT": "x"}, "MLP_MULT", "'x'"),  # not a float
    ({"LOGIT_SOFTCAP": "inf"}, "LOGIT_SOFTCAP", "'inf'"),  # not finite
    ({"TIE_EMBEDDINGS": "maybe"}, "TIE_EMBEDDINGS", "'maybe'"),  # not a boolean
    ({"DEVICE": "tpu"}, "DEVICE", "'tpu'"),  # not a choice
    ({"ITERATIONS": "-1"}, "ITERATIONS", "-1"),  # a count
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS", "0"),  # a positive integer
    ({"MLP_MULT": "0"}, "MLP_MULT", "0.0"),  # a positive number
    ({"MATRIX_LR": "-0.1"}, "MATRIX_LR", "-0.1"),  # a number >= 0
    ({"BETA1": "1"}, "BETA1", "1.0"),  # in [0, 1)
    ({"VOCAB_SIZE": "1"}, "VOCAB_SIZE", "1"),  # a range
    ({"SEED": str(2**32)}, "SEED", str(2**32)),
    ({"BIGRAM_VOCAB_SIZE": "1"}, "BIGRAM_VOCAB_SIZE", "1"),
    ({"TRAIN_SEQ_LEN": str(2**20 + 1)}, "TRAIN_SEQ_LEN", str(2**20 + 1)),
    ({"EVAL_SEQ_LEN": str(2**20 + 1)}, "EVAL_SEQ_LEN", str(2**20 + 1)),
    ({"RUN_ID": "a/b"}, "RUN_ID", "'a/b'"),
    ({"RUN_ID": "a" * 201}, "RUN_ID", repr("a" * 201)),  # longer than 200 bytes
    ({"RUN_ID": "\u00e9" * 101}, "RUN_ID", repr("\u00e9" * 101)),  # 202 bytes in UTF-8
    ({"ARTIFACT": "out/"}, "ARTIFACT", "'out/'"),
    ({"MODEL_PATH": ""}, "MODEL_PATH", "''"),
    ({"MODEL_PATH": "final_model.int6.ptz"}, "ARTIFACT", "'final_model.int6.ptz'"),
    ({"COLLECTIVE_TIMEOUT_SECONDS": "0"}, "COLLECTIVE_TIMEOUT_SECONDS", "0.0"),
    ({"SLOT_MODE": "foo"}, "SLOT_MODE", "'foo'"),
    ({"NUM_HEADS": "3"}, "NUM_HEADS", "3"),  # between fields of a section
    ({"ROPE_DIMS": "5"}, "ROPE_DIMS", "5"),
    ({"XSA_LAST_N": "12"}, "XSA_LAST_N", "12"),
    ({"VE_LAYERS": "9,11"}, "VE_LAYERS", "'9,11'"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE", "4096"),
    ({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "1024"}, "TTT_CHUNK_TOKENS", "1024"),
    ({"TTT_FREEZE_BLOCKS": "12"}, "TTT_FREEZE_BLOCKS", "12"),  # across sections
    ({"EVAL_ONLY": "1", "EXPORT_ONLY": "1"}, "EXPORT_ONLY", "True"),
    ({"PRESET": "nope"}, "PRESET", "'nope'"),
]


@pytest.mark.parametrize("env, name, shown", BAD_VALUES, ids=[
    f"{n}={s[:12]}" for _, n, s in BAD_VALUES])
def test_bad_values_of_every_kind_give_the_one_line_message(env, name, shown):
    """`NAME=value is not allowed; expected ...`, one line, for every kind of check."""
    with pytest.raises(tg.ConfigError) as info:
        tg.Config.from_env(env)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}={shown} is not allowed; expected "), msg
    assert len(msg) > len(f"{name}={shown} is not allowed; expected ") + 3


def test_limits_are_inclusive():
    """The edge of each limit above is accepted: a 200-byte RUN_ID, EVAL_ONLY or EXPORT_ONLY
    alone, the largest seed, the smallest vocabulary."""
    assert tg.Config.from_env({"RUN_ID": "a" * 200}).run.run_id == "a" * 200
    assert tg.Config.from_env({"RUN_ID": "\u00e9" * 100}).run.run_id == "\u00e9" * 100
    assert tg.Config.from_env({"EVAL_ONLY": "1"}).run.eval_only
    assert tg.Config.from_env({"EXPORT_ONLY": "1"}).run.export_only
    assert tg.Config.from_env({"SEED": str(2**32 - 1), "VOCAB_SIZE": "2"}).run.seed == 2**32 - 1
