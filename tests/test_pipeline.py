"""train_gpt.py run as users run it: the original's reference trajectory on the CPU,
torchrun with two processes against one, a run stopped by its wall-clock cap, and EVAL_ONLY
on the artifact a run wrote.

Whole runs go through train_gpt.main in this process (main_in_process: the same stages, log
and exit status, without starting an interpreter and importing torch again); a subprocess
only where one is the point (torchrun here)."""

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from tests.conftest import DEMO, ROOT, script_command, tiny_env  # noqa: F401  (tiny_env: imported from here)

SCRIPT = ROOT / "train_gpt.py"
REF = ROOT.parent / "shared" / "reference"
TRAJ = REF / "trajectory"
# A guard against a hung run, not a speed test; each caller passes a few times its usual time.
HANG_GUARD_S = 600
CPU = torch.device("cpu")


def run_script(cwd: Path, env: dict, torchrun: int = 0, timeout: int = HANG_GUARD_S) -> str:
    """`python train_gpt.py` (or torchrun) in cwd with env added; returns the run's log."""
    cmd = script_command(SCRIPT, torchrun)
    threads = "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2")
    full_env = {**os.environ, "OMP_NUM_THREADS": threads, **env}
    p = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return (cwd / "logs" / f"{env['RUN_ID']}.txt").read_text()


@contextlib.contextmanager
def process_state(cwd: Path, env: dict):
    """A run's view of the process: cwd, env added to os.environ; both and torch's thread count
    (start_runtime sets it) restored afterwards."""
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)


def main_in_process(cwd: Path, env: dict) -> tuple[int, str, str]:
    """train_gpt.main() as `python train_gpt.py` runs it in cwd with env added to the
    environment, in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # main sets its own
    status = None
    with process_state(cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tg.main()
        except SystemExit as e:
            status = e.code
        finally:
            signal.signal(signal.SIGTERM, sigterm)
    return status, out.getvalue(), err.getvalue()


def run_in_process(cwd: Path, env: dict) -> str:
    """A run that must succeed, in this process; returns its log."""
    status, out, err = main_in_process(cwd, env)
    assert status == 0, out[-2000:] + err[-2000:]
    return (cwd / "logs" / f"{env['RUN_ID']}.txt").read_text()


def figures(log: str, name: str) -> tuple[float, float]:
    m = re.findall(rf"^{name} val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    assert m, f"no {name} line"
    return float(m[0][0]), float(m[0][1])


@pytest.fixture(scope="module")
def tiny_data(demo_root) -> Path:
    """The demo corpus's root (tests/conftest.py builds it once per session); kept under this
    name for the modules that import it from here."""
    return demo_root


@pytest.mark.slow
@pytest.mark.skipif(not TRAJ.exists(), reason="../shared/reference/trajectory is absent")
def test_reference_trajectory(tmp_path):
    """The original's own CPU run: every train_loss within 2.5e-3 up to late QAT (3e-2 after),
    late QAT at the same step, round-trip val_loss within 1e-4 relative, same parameter count."""
    exp = json.loads((TRAJ / "expected.json").read_text())
    env = dict(
        exp["env"],
        DATA_PATH=str(TRAJ),
        TOKENIZER_PATH=str(REF / "fineweb_1024_bpe.model"),
        RUN_ID="traj",
    )
    log = run_in_process(tmp_path, env)
    got = {
        int(s): float(v) for s, v in re.findall(r"^step:(\d+)/\d+ train_loss:([\d.]+)", log, re.M)
    }
    want = {i + 1: float(v) for i, v in enumerate(exp["train_loss"])}
    assert sorted(got) == sorted(want)
    qat = exp["late_qat"]["step"]
    tol = exp["tolerances"]
    for step, value in want.items():
        after = "after" if step > qat else "up_to"
        assert abs(got[step] - value) <= tol[f"train_loss_abs_{after}_late_qat_step"], (
            step,
            got[step],
        )
    assert re.search(rf"^late_qat:enabled step:{qat} scale:{exp['late_qat']['scale']}$", log, re.M)
    assert f"model_params:{exp['model_params']}" in log
    rt_loss, _ = figures(log, "final_int6_roundtrip_exact")
    assert abs(rt_loss - exp["roundtrip"][0]) / exp["roundtrip"][0] <= tol["roundtrip_val_loss_rel"]
    ema_loss, _ = figures(log, "DIAGNOSTIC post_ema")
    assert abs(ema_loss - exp["post_ema"][0]) < 1e-3


LOG_FORMATS = (
    r"^model_params:\d+$",
    r"^world_size:1 grad_accum_steps:8$",
    r"^step:12/12 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    r"^step:12/12 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$",
    r"^late_qat:enabled step:\d+ scale:\d\.\d{4}$",
    r"^DIAGNOSTIC post_ema val_loss:\S+ val_bpb:\S+ eval_time:\d+ms$",
    r"^Serialized model int6\+lzma: \d+ bytes$",
    r"^Total submission size int6\+lzma: \d+ bytes$",
    r"^final_int6_sliding_window val_loss:\S+ val_bpb:\S+ stride:32 eval_time:\d+ms$",
    r"^final_slot val_loss:\S+ val_bpb:\S+ steps:2 lr:0.012 eval_time:\d+ms mode:scored$",
    r"^final_slot_context val_loss:\S+ val_bpb:\S+ steps:2 lr:0.012 eval_time:\d+ms mode:context$",
    r"^score:final_int6_sliding_window val_bpb:\d+\.\d{8} kind:accepted$",
    r"^score:final_slot_context val_bpb:\d+\.\d{8} kind:causal_not_accepted$",
    r"^score:final_slot val_bpb:\d+\.\d{8} kind:not_causal$",
)


def independent_loss(model, tokens: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """(mean loss, targets) over non-overlapping windows of seq_len, through the model's own
    training loss (its forward), not the script's evaluation code."""
    n = (tokens.numel() - 1) // seq_len
    x, y = tokens[: n * seq_len].view(n, seq_len), tokens[1 : n * seq_len + 1].view(n, seq_len)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 64):
            total += float(model(x[i : i + 64], y[i : i + 64])) * x[i : i + 64].numel()
    return total / (n * seq_len), n * seq_len


def independent_bytes(tokenizer: Path, tokens: torch.Tensor, n_targets: int) -> int:
    """UTF-8 bytes of the first n_targets targets: each piece's text with its '▁' as a space, that
    space left out after a control or unknown token (the start of a document)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    special = [
        sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) for i in range(sp.vocab_size())
    ]
    text = [
        " " if special[i] else sp.id_to_piece(i).replace("\u2581", " ")
        for i in range(sp.vocab_size())
    ]
    size = np.array(
        [
            0 if special[i] else 1 if sp.is_byte(i) else len(text[i].encode())
            for i in range(len(text))
        ]
    )
    opens = np.array(
        [not special[i] and not sp.is_byte(i) and text[i].startswith(" ") for i in range(len(text))]
    )
    prev, tgt = tokens[:n_targets].numpy(), tokens[1 : n_targets + 1].numpy()
    return int(size[tgt].sum() - (opens[tgt] & np.array(special)[prev]).sum())


def check_capped_log(log: str) -> None:
    """It stops at the cap; validation is not training time."""
    stop = re.search(
        r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/1000$", log, re.M
    )
    assert stop, "no stopping_early line"
    train_ms, steps = int(stop.group(1)), int(stop.group(2))
    assert train_ms >= 1000 and 1 <= steps < 1000
    vals = [
        (int(s), int(t))
        for s, t in re.findall(
            r"^step:(\d+)/1000 val_loss:\S+ val_bpb:\S+ train_time:(\d+)ms", log, re.M
        )
    ]
    assert [s for s, _ in vals] == list(range(steps + 1)) and vals[-1][1] == train_ms
    validation_ms = int(
        re.search(
            r"^DIAGNOSTIC post_ema val_loss:\S+ val_bpb:\S+ eval_time:(\d+)ms$", log, re.M
        ).group(1)
    )
    # Between two validations the training clock moves by one step, less than a validation takes.
    increments = [b - a for (_, a), (_, b) in zip(vals, vals[1:])]
    assert max(increments) < validation_ms, (increments, validation_ms)


def check_kept_weights(cwd: Path, cfg: tg.Config, log: str, tokens: torch.Tensor) -> None:
    """final_model.pt holds the EMA weights, the brotli artifact their quantisation."""
    saved = torch.load(cwd / "final_model.pt", map_location="cpu", weights_only=True)
    model = tg.build_model(cfg.model, CPU, seed=cfg.run.seed)
    model.load_state_dict(saved)
    ema_loss, _ = independent_loss(model.eval(), tokens, cfg.train.train_seq_len)
    assert abs(ema_loss - figures(log, "DIAGNOSTIC post_ema")[0]) < 1e-4
    last_raw_loss = float(re.findall(r"^step:\d+/1000 val_loss:(\S+)", log, re.M)[-1])
    assert abs(ema_loss - last_raw_loss) > 1e-2

    artifact = (cwd / "final_model.int6.ptz").read_bytes()
    # Brotli streams have no magic: the script's container adds one.
    assert artifact.startswith(b"PGBR1")
    assert re.search(rf"^Serialized model int6\+brotli: {len(artifact)} bytes$", log, re.M)
    container = tg.unpack_artifact(artifact, "artifact")
    expected = tg.quantize_state_dict(saved, model.roles, None)
    assert container["m"] == expected["m"] and list(container["w"]) == list(expected["w"])
    assert all(torch.equal(container["w"][k], v) for k, v in expected["w"].items())


@pytest.mark.slow
def test_capped_brotli_run_and_eval_only(small_root, tmp_path):
    """One run capped at 1 s of training (MAX_WALLCLOCK_SECONDS=1, ITERATIONS=1000), a validation
    after every step, COMPRESSOR=brotli; then EVAL_ONLY on its artifact:
    - it stops at the cap: a stopping_early line, train_time >= 1000 ms, far fewer steps than 1000;
    - validation is not training time: the run validated after every step, and between two
      validations its training time grew by less than one validation (the post-EMA one) takes;
    - final_model.pt holds the EMA weights: their loss, computed here, is the post-EMA line's,
      not the last raw weights' validation loss, and the artifact is their quantisation;
    - the artifact is a brotli container, and EVAL_ONLY (told COMPRESSOR=lzma: the reader goes
      by the bytes) checks the model settings against the sidecar and gives the run's own
      figures, which equal a round trip evaluated here independently."""
    # Steps of 512 tokens and validation batches of 8 sequences: a step takes less than half
    # a validation.
    env = dict(
        tiny_env(small_root, "capped"),
        COMPRESSOR="brotli",
        MAX_WALLCLOCK_SECONDS="1",
        ITERATIONS="1000",
        VAL_LOSS_EVERY="1",
        TRAIN_BATCH_TOKENS="512",
        VAL_BATCH_SIZE="4096",
    )
    log = run_in_process(tmp_path, env)
    check_capped_log(log)
    cfg = tg.Config.from_env(env)
    tokens = tg.load_validation_tokens(
        tg.shard_files(cfg.data.data_path, "val"), cfg.max_seq_len, cfg.model.vocab_size
    )
    check_kept_weights(tmp_path, cfg, log, tokens)

    log2 = run_in_process(tmp_path, dict(env, RUN_ID="evalonly", EVAL_ONLY="1", COMPRESSOR="lzma"))
    assert re.search(r"^model_params:\d+$", log2, re.M)
    assert not re.search(r"^step:\d+/\d+ train_loss", log2, re.M)
    assert "\neval_only: model settings match final_model.int6.ptz.json\n" in log2
    for name in (
        "final_int6_roundtrip_exact",
        "final_int6_sliding_window_exact",
        "final_slot_exact",
        "final_slot_context_exact",
    ):
        assert figures(log, name) == figures(log2, name), name
    path = tmp_path / "final_model.int6.ptz"
    loaded = tg.eval_model(cfg.model, tg.read_artifact(path), CPU, path)
    loss, n = independent_loss(loaded, tokens, cfg.eval.seq_len)
    bpb = loss / math.log(2) * n / independent_bytes(Path(cfg.data.tokenizer_path), tokens, n)
    got = figures(log2, "final_int6_roundtrip_exact")
    assert got == pytest.approx((loss, bpb), rel=1e-5)


def test_eval_only_bad_artifact_writes_nothing(small_root, tmp_path):
    """A truncated artifact stops EVAL_ONLY before any file is written, naming the file."""
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"\xfd7zXZ\x00" + b"\x00" * 50)
    env = {**tiny_env(small_root, "x"), "EVAL_ONLY": "1", "ARTIFACT": str(bad)}
    status, out, err = main_in_process(tmp_path, env)
    assert status == 2
    assert err.count("\n") == 1 and "bad.ptz" in err and "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.ptz"]


@pytest.mark.usefixtures("one_thread")
def test_compiled_small_model_trains_on_real_text(small_root):
    """torch.compile(fullgraph=True) on the CPU (a graph break would raise) trains a small model
    with the record's optimizers, clipping and late-QAT path: the loss on real text falls.
    Dynamo's "eager" backend: the same tracing and graph-break checks, without inductor's C++
    build (minutes on a cold cache)."""
    torch._dynamo.reset()
    cfg = tg.Config.from_env({**tiny_env(small_root, "compiled"), "QAT_ENABLED": "1"})
    model = tg.build_model(cfg.model, CPU, seed=cfg.run.seed)
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="eager")
    optimizers = tg.build_optimizers(model, cfg.optim)
    files = tg.shard_files(cfg.data.data_path, "train")
    loader = tg.DistributedTokenLoader(files, tg.Runtime())
    losses = []
    try:
        for _ in range(25):
            x, y = loader.next_batch(cfg.train.train_batch_tokens, cfg.train.train_seq_len, 1)
            loss = compiled(x, y, qat=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch._dynamo.reset()
    assert abs(losses[0] - 6.93) < 0.1  # ln 1024 at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5  # measured: 6.93 -> about 6.06
