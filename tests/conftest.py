"""Fixtures shared by the test modules, each built once per test session (once per worker:
pytest.ini runs the suite on pytest-xdist's workers, one per core, a whole module on each)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from tools import data as demo_data
from tools._files import read_shard, shard_bytes

ROOT = Path(__file__).resolve().parent.parent
# One thread per worker, for this process and what it starts (PRESET=demo asks for two): the
# workers fill the cores, and more threads than free cores run several times slower.
WORKER = os.environ.get("PYTEST_XDIST_WORKER") is not None
THREADS = 1 if WORKER else 2
if WORKER:
    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", CPU_THREADS="1")
# The longest modules first, so that no worker is left with one of them at the end.
SLOW_MODULES = ("test_ttt.py", "test_gpu_check.py", "test_legal_stack.py", "test_compile.py",
                "test_safety.py", "test_gptq.py", "test_tools.py", "test_submission.py",
                "test_pipeline.py", "test_pack.py", "test_reliability.py")
DEMO = Path("data") / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = Path("data") / "tokenizers" / "demo_1024_bpe.model"
SMALL_VAL_TOKENS = 16_385  # 256 sequences of 64: evaluations 6x cheaper than the whole demo split
SMALL_TRAIN_TOKENS = 200_000  # more than any test trains on (12 steps of 2048 tokens)
# The smallest model with every part of the record's (bigram, value embedding, XSA on both
# layers), for in-process evaluation tests; 32-token sequences.
TINY_MODEL = dict(VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
                  BIGRAM_VOCAB_SIZE="64", BIGRAM_DIM="16", VE_DIM="8", VE_LAYERS="1",
                  XSA_LAST_N="2", TRAIN_SEQ_LEN="32", EVAL_SEQ_LEN="32")

def demo_is_complete(root: Path) -> bool:
    """Whether root holds the demo corpus as tools.data writes it: the manifest's tokenizer
    (by sha256) and every shard it lists, of the size its token count gives."""
    try:
        manifest = json.loads((root / DEMO / "manifest.json").read_text(encoding="utf-8"))
        tokenizer = (root / DEMO_TOKENIZER).read_bytes()
        if hashlib.sha256(tokenizer).hexdigest() != manifest["tokenizer"]["sha256"]:
            return False
        for split in manifest["splits"].values():
            sizes = [(root / DEMO / name).stat().st_size for name in split["files"]]
            if sum(sizes) != 2 * split["tokens"] + 1024 * len(sizes):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder holding data/datasets/demo_sp1024 and data/tokenizers/demo_1024_bpe.model (the
    demo corpus, tools.data demo: CPython's own prose): the checkout itself when its ./data
    holds it complete (demo.sh builds it), else built once into a session folder (about 13 s)."""
    if demo_is_complete(ROOT):
        return ROOT
    root = tmp_path_factory.mktemp("demo_root")
    with contextlib.redirect_stdout(io.StringIO()):
        demo_data.build_demo(root)
    return root


@pytest.fixture(scope="session")
def small_root(demo_root, tmp_path_factory) -> Path:
    """The demo corpus cut short, in the same layout (its manifest, so the tokenizer's hash is
    still checked): the first SMALL_VAL_TOKENS of validation and SMALL_TRAIN_TOKENS of training.
    For runs that show behaviour, not figures of the whole demo split."""
    root = tmp_path_factory.mktemp("small_root")
    (root / DEMO).mkdir(parents=True)
    (root / DEMO_TOKENIZER).parent.mkdir(parents=True)
    shutil.copy(demo_root / DEMO_TOKENIZER, root / DEMO_TOKENIZER)
    shutil.copy(demo_root / DEMO / "manifest.json", root / DEMO / "manifest.json")
    for split, n in (("val", SMALL_VAL_TOKENS), ("train", SMALL_TRAIN_TOKENS)):
        name = f"fineweb_{split}_000000.bin"
        tokens = np.asarray(read_shard(demo_root / DEMO / name))[:n]
        (root / DEMO / name).write_bytes(shard_bytes(tokens))
    return root


def script_command(script: Path, torchrun: int = 0) -> list[str]:
    """`python SCRIPT`, or the same under torchrun with `torchrun` processes on this machine."""
    if not torchrun:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={torchrun}", str(script)]


def tiny_env(root: Path, run_id: str) -> dict:
    """A 2-layer model of width 64 on the demo corpus under `root`: seconds per run."""
    return dict(
        DATA_PATH=str(root / DEMO),
        TOKENIZER_PATH=str(root / DEMO_TOKENIZER),
        RUN_ID=run_id,
        NUM_LAYERS="2",
        MODEL_DIM="64",
        NUM_HEADS="2",
        NUM_KV_HEADS="1",
        MLP_MULT="2",
        BIGRAM_DIM="16",
        VE_DIM="16",
        VE_LAYERS="1",
        XSA_LAST_N="2",
        TRAIN_SEQ_LEN="64",
        EVAL_SEQ_LEN="64",
        TRAIN_BATCH_TOKENS="2048",
        VAL_BATCH_SIZE="8192",
        ITERATIONS="12",
        WARMUP_STEPS="2",
        WARMDOWN_ITERS="6",
        LATE_QAT_THRESHOLD="0.5",
        MAX_WALLCLOCK_SECONDS="0",
        VAL_LOSS_EVERY="0",
        TRAIN_LOG_EVERY="1",
        EVAL_STRIDE="32",
        SLOT_STEPS="2",
        SLOT_MODE="both",
        SEED="3",
    )


def dead_pid() -> int:
    """The id of a process that has exited (a stale lock's owner)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="session")
def finished_run(small_root, tmp_path_factory):
    """One short training run (RUN_ID=shared, 4 steps, SLOT off) through train_gpt.main in this
    process, in its own folder: its log, artifact, sidecar and kept weights serve several
    modules (tests that write there use copies). It starts over a stale lock whose process is
    gone, with a misspelt setting in its environment (ignored).
    Returns (folder, env, status, stdout, stderr)."""
    from tests.test_pipeline import main_in_process

    cwd = tmp_path_factory.mktemp("finished")
    stale = {"run_id": "crashed", "pid": dead_pid()}
    (cwd / ".final_model.int6.ptz.lock").write_text(json.dumps(stale))
    env = {**tiny_env(small_root, "shared"), "ITERATIONS": "4", "SLOT_ENABLED": "0"}
    status, out, err = main_in_process(cwd, {**env, "SLOT_STPES": "3"})
    return cwd, env, status, out, err


@pytest.fixture(scope="session")
def default_model():
    """The default 27M-parameter model (SEED 1337), built once per test session: its
    orthogonal initialisation alone takes seconds. (Config, GPT)."""
    cfg = tg.Config.from_env({})
    return cfg, tg.build_model(cfg.model, torch.device("cpu"), seed=cfg.run.seed)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and immune to other processes on the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)  # stable: each module's own order is kept
