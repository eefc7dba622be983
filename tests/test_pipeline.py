"""train_gpt.py run as users run it: the original's reference trajectory on the CPU,
torchrun with two processes against one, and EVAL_ONLY on the artifact a run wrote."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_gpt.py"
REF = ROOT.parent / "shared" / "reference"
TRAJ = REF / "trajectory"


def run_script(cwd: Path, env: dict, torchrun: int = 0, timeout: int = 240) -> str:
    cmd = [sys.executable, str(SCRIPT)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               str(SCRIPT)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"), **env}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return (cwd / "logs" / f"{env['RUN_ID']}.txt").read_text()


def figures(log: str, name: str) -> tuple[float, float]:
    m = re.findall(rf"^{name} val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    assert m, f"no {name} line"
    return float(m[0][0]), float(m[0][1])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """The demo corpus (built offline from CPython's own prose) in a temporary root."""
    root = tmp_path_factory.mktemp("demo_root")
    subprocess.run([sys.executable, "-m", "tools.data", "demo", "--root", str(root)], cwd=ROOT, check=True,
                   capture_output=True, timeout=180)
    return root


def tiny_env(root: Path, run_id: str) -> dict:
    return dict(
        DATA_PATH=str(root / "data" / "datasets" / "demo_sp1024"),
        TOKENIZER_PATH=str(root / "data" / "tokenizers" / "demo_1024_bpe.model"),
        RUN_ID=run_id, NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", MLP_MULT="2",
        BIGRAM_DIM="16", VE_DIM="16", VE_LAYERS="1", XSA_LAST_N="2", TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="64",
        TRAIN_BATCH_TOKENS="2048", VAL_BATCH_SIZE="8192", ITERATIONS="12", WARMUP_STEPS="2", WARMDOWN_ITERS="6",
        LATE_QAT_THRESHOLD="0.5", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
        EVAL_STRIDE="32", SLOT_STEPS="2", SLOT_MODE="both", SEED="3",
    )


@pytest.mark.skipif(not TRAJ.exists(), reason="../shared/reference/trajectory is absent")
def test_reference_trajectory(tmp_path):
    """The original's own CPU run: every train_loss within 2.5e-3 up to late QAT (3e-2 after),
    late QAT at the same step, round-trip val_loss within 1e-4 relative, same parameter count."""
    exp = json.loads((TRAJ / "expected.json").read_text())
    env = dict(exp["env"], DATA_PATH=str(TRAJ), TOKENIZER_PATH=str(REF / "fineweb_1024_bpe.model"), RUN_ID="traj")
    log = run_script(tmp_path, env)
    got = {int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", log, re.M)}
    want = {i + 1: float(v) for i, v in enumerate(exp["train_loss"])}
    assert sorted(got) == sorted(want)
    qat = exp["late_qat"]["step"]
    tol = exp["tolerances"]
    for step, value in want.items():
        limit = tol["train_loss_abs_up_to_late_qat_step"] if step <= qat else tol["train_loss_abs_after_late_qat_step"]
        assert abs(got[step] - value) <= limit, (step, got[step], value)
    assert re.search(rf"^late_qat:enabled step:{qat} scale:{exp['late_qat']['scale']}$", log, re.M)
    assert f"model_params:{exp['model_params']}" in log
    rt_loss, _ = figures(log, "final_int6_roundtrip_exact")
    assert abs(rt_loss - exp["roundtrip"][0]) / exp["roundtrip"][0] <= tol["roundtrip_val_loss_rel"]
    ema_loss, _ = figures(log, "DIAGNOSTIC post_ema")
    assert abs(ema_loss - exp["post_ema"][0]) < 1e-3


def test_two_processes_match_one(tiny_data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with the same global batch: the same data in a
    different micro-step order, so the final validation loss agrees within 1e-3; SLOT's
    grouping makes its figures agree too."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    log1 = run_script(one, tiny_env(tiny_data, "p1"))
    log2 = run_script(two, tiny_env(tiny_data, "p2"), torchrun=2)
    assert "world_size:2 grad_accum_steps:4" in log2
    for name in ("step:12/12", "final_int6_roundtrip_exact", "final_slot_exact", "final_slot_context_exact"):
        a, b = figures(log1, name), figures(log2, name)
        assert abs(a[0] - b[0]) < 1e-3, (name, a, b)


def test_eval_only_reproduces_and_keeps_inputs(tiny_data, tmp_path):
    """EVAL_ONLY=1 reads the artifact a run wrote and gives the same evaluation figures
    (same artifact, same code path); the run saved the EMA weights and the log has the
    original's line formats, with the scored and context SLOT lines labelled."""
    log = run_script(tmp_path, tiny_env(tiny_data, "train"))
    assert (tmp_path / "final_model.pt").is_file() and (tmp_path / "final_model.int6.ptz").is_file()
    for pattern in (r"^model_params:\d+$", r"^world_size:1 grad_accum_steps:8$",
                    r"^step:12/12 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
                    r"^step:12/12 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
                    r"^late_qat:enabled step:\d+ scale:\d\.\d{4}$", r"^DIAGNOSTIC post_ema val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$",
                    r"^Serialized model int6\+lzma: \d+ bytes$", r"^Total submission size int6\+lzma: \d+ bytes$",
                    r"^final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:32 eval_time:\d+ms$",
                    r"^final_slot val_loss:\S+ val_bpb:\S+ steps:2 lr:0.012 eval_time:\d+ms mode:scored$",
                    r"^final_slot_context val_loss:\S+ val_bpb:\S+ steps:2 lr:0.012 eval_time:\d+ms mode:context$"):
        assert re.search(pattern, log, re.M), pattern
    assert log.startswith(SCRIPT.read_text()[:200])  # the log opens with the full source
    # Two roundtrip_exact lines: the round trip, then the sliding result repeated (no s64 pass:
    # EVAL_SEQ_LEN is 64).
    assert len(re.findall(r"^final_int6_roundtrip_exact ", log, re.M)) == 2

    # The submission builder reads this log's own figures.
    from tools.submission import parse_log
    record = parse_log(tmp_path / "logs" / "train.txt")
    assert (record.steps, record.seed, record.num_gpus, record.gpu_type) == (12, 3, 0, "cpu")
    total = int(re.search(r"^Total submission size int6\+lzma: (\d+) bytes$", log, re.M).group(1))
    assert record.artifact_bytes == total
    assert (record.evals["slot"].val_loss, record.evals["slot"].val_bpb) == figures(log, "final_slot_exact")
    assert record.evals["slot_context"].val_bpb == figures(log, "final_slot_context_exact")[1]

    log2 = run_script(tmp_path, dict(tiny_env(tiny_data, "evalonly"), EVAL_ONLY="1"))
    assert re.search(r"^model_params:\d+$", log2, re.M)
    assert not re.search(r"^step:\d+/\d+ train_loss", log2, re.M)
    for name in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "final_slot_exact",
                 "final_slot_context_exact"):
        assert figures(log, name) == figures(log2, name), name


def test_eval_only_bad_artifact_writes_nothing(tiny_data, tmp_path):
    """A truncated artifact stops EVAL_ONLY before any file is written, naming the file."""
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 50)
    env = {**os.environ, **tiny_env(tiny_data, "x"), "EVAL_ONLY": "1", "ARTIFACT": str(bad)}
    p = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "bad.ptz" in p.stderr and "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.ptz"]


def test_compiled_small_model_trains_on_real_text(tiny_data):
    """torch.compile(fullgraph=True) on the CPU (a graph break would raise) trains a small model
    with the record's optimizers, clipping and late-QAT path: the loss on real text falls."""
    import torch
    import train_gpt as tg

    torch._dynamo.reset()
    h = tg.Hyperparameters.from_env({**tiny_env(tiny_data, "compiled"), "QAT_ENABLED": "1"})
    model = tg.build_model(h, torch.device("cpu"), seed=h.seed)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    optimizers, _ = tg.build_optimizers(model, h)
    loader = tg.DistributedTokenLoader(tg.shard_files(h.data_path, "train"), 0, 1, torch.device("cpu"))
    losses = []
    try:
        for _ in range(25):
            x, y = loader.next_batch(h.train_batch_tokens, h.train_seq_len, 1)
            loss = compiled(x, y, qat=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch._dynamo.reset()
    assert abs(losses[0] - 6.93) < 0.1  # ln 1024 at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # measured: 6.93 -> about 6.06
