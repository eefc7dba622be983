"""tools.gpu_check: its checks and projections on crafted figures, then the real thing on the
CPU (--dry-run): a healthy run read against its own logs and train_gpt's arithmetic, a run
whose training diverges, one cut by its budget, and one killed at a seeded moment."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import train_gpt as tg
from tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent
LN_V = math.log(1024)


# ---------------------------------------------------------------- checks on crafted figures

def test_reserves_are_the_estimates_scaled_alike_into_the_budget():
    gpu = {s: gpu_check.OTHER_S["gpu"][s] for s in gpu_check.STAGES}
    graphs = {s: sum(n * t for n, t in zip(gpu_check.GRAPHS[s], (50, 20, 4))) for s in gpu}
    estimates = {s: sum(gpu[s]) + graphs[s] for s in gpu}
    # training: two forward+backward graphs at 50 s, one forward at 20, six small at 4
    assert graphs["training"] == 144 and estimates["training"] == 204
    assert gpu_check.reserves("gpu", 1000.0) == pytest.approx(estimates)
    tight = gpu_check.reserves("gpu", 330.0)
    assert sum(tight.values()) == pytest.approx(330.0, abs=0.3)
    for s in gpu:  # one scale for all: their ratios are the estimates'
        assert tight[s] / tight["training"] == pytest.approx(estimates[s] / 204, rel=2e-3)


def steps_of(losses, ms_per_step=100.0):
    return [[i + 1, loss, ms_per_step * (i + 1)] for i, loss in enumerate(losses)]


def test_loss_checks_name_the_figures_that_broke_them():
    healthy = steps_of([LN_V + 0.01, 6.5, 6.2, 6.0, 5.9, 5.8])
    assert gpu_check.loss_failures(healthy, 1024) == []
    diverged = steps_of([LN_V, 6.5, float("nan"), float("inf")])
    assert gpu_check.loss_failures(diverged, 1024) == [
        "train_loss nan at step 3 (the first non-finite; 2 of 4 logged steps)"]
    (far,) = gpu_check.loss_failures(steps_of([7.4, 7.0, 6.8]), 1024)
    assert far.startswith("first train_loss 7.4000 is +0.4685 from ln(1024)")
    (flat,) = gpu_check.loss_failures(steps_of([LN_V, LN_V, LN_V - 0.01]), 1024)
    assert flat.startswith("train_loss not falling: step 1 6.9315, mean of the last 1 6.9215")
    assert gpu_check.loss_failures([], 1024) == []  # nothing measured yet: nothing failed


def test_speed_leaves_out_the_first_step_and_the_traced_one():
    times = [900.0, 1500.0, 2210.0, 2940.0, 3650.0, 4360.0, 5100.0, 9000.0]  # the last: traced
    steps = [[i + 1, 5.0, t] for i, t in enumerate(times)]
    s = gpu_check.speed(steps, iterations=8)
    assert s["steps"] == [2, 7] and s["ms_per_step"] == pytest.approx((5100 - 1500) / 5)
    assert s["projected_8xh100_ms"] == pytest.approx(720 / 8, abs=0.01)
    assert s["record_8xh100_ms"] == 91.25
    assert gpu_check.speed(steps[:2], iterations=8) == {}  # one interval is not a rate yet


def ev(name, bpb):
    return dict(name=name, val_bpb=bpb, val_loss=bpb * 1.7)


def test_evaluations_must_be_finite_and_in_their_bands():
    names = ("final_int6_roundtrip", "final_int6_sliding_window", "final_slot",
             "final_slot_context", "legal_ttt")
    good = [ev(n, x) for n, x in zip(names, (2.00, 1.97, 1.80, 2.03, 1.90))]
    assert gpu_check.eval_failures(good) == []
    bad = [ev(n, x) for n, x in zip(names, (2.00, 2.06, 2.00, float("nan"), 2.07))]
    assert gpu_check.eval_failures(bad) == [
        "final_slot_context val_loss nan val_bpb nan: not finite",
        "final_int6_sliding_window val_bpb 2.0600 vs round trip 2.0000 (+0.0600); expected "
        "near it (tolerance 0.05)",
        "final_slot val_bpb 2.0000 vs round trip 2.0000 (+0.0000); expected below it",
        "legal_ttt val_bpb 2.0700 vs round trip 2.0000 (+0.0700); expected not above it "
        "(tolerance 0.05)"]
    # TTT against the same windows unadapted (the rank-0-of-8 run scores a share of them)
    assert gpu_check.stage_failures({"runs": {"adapted": ev("legal_ttt", 2.2),
                                              "unadapted": ev("legal_ttt", 2.1)}}) == [
        "legal_ttt val_bpb 2.2000 vs the same windows unadapted 2.1000 (+0.1000); expected "
        "not above it (tolerance 0.05)"]


def test_stage_failures_cover_gptq_sdpa_compilation_and_the_attention_kernel():
    r = dict(gptq=dict(error_ratio=1.031, codes_equal=0.97),
             sdpa={b: dict(refused="no") for b in gpu_check.SDPA_OPS.values()},
             timed_loop_graphs=2, train_s=10.0, trace=dict(attention_kernel="MATH",
                                                           top_kernels=["triton_softmax"]))
    found = gpu_check.stage_failures(r)
    assert [f.split(":")[0].split(" ")[0] for f in found] == ["gptq", "sdpa", "2", "the"]
    assert "1.0310x the CPU's (codes equal 97.00%)" in found[0]
    assert "runs MATH ['triton_softmax']" in found[3]
    ok = dict(r, gptq=dict(error_ratio=0.995, codes_equal=0.99), timed_loop_graphs=0,
              sdpa=dict(r["sdpa"], CUDNN_ATTENTION=dict(ms=2.0)),
              trace=dict(attention_kernel="CUDNN_ATTENTION"))
    assert gpu_check.stage_failures(ok) == []
    assert gpu_check.stage_failures(dict(train_s=1.0))[0].startswith("the traced step")


def test_ttt_projection_splits_scoring_from_training():
    score, train, compile_s, n = 0.11, 0.37, 40.0, 4  # chunk 1 compiles; chunk n trains nothing
    ends = [compile_s + score + train]
    for c in range(2, n + 1):
        ends.append(ends[-1] + score + (train if c < n else 0))
    adapted = [[1, n, 100 + ends[0]], [n, n, 100 + ends[-1]]]  # logged: chunk 1 and the last
    unadapted = [[1, n, 500.0], [n, n, 500.0 + score * (n - 1)]]
    p = gpu_check.ttt_projection(adapted, unadapted, record_chunks=1893)
    assert p["score_s_per_chunk"] == pytest.approx(score) and p["train_s_per_chunk"] == (
        pytest.approx(train))
    assert p["projected_8xh100_s"] == pytest.approx(1893 * score + 1892 * train, abs=0.1)
    assert gpu_check.ttt_projection(adapted[:1], unadapted, 1893) is None


def test_eval_budget_counts_ttt_only_when_the_configuration_runs_it():
    evals = [dict(ev("final_int6_roundtrip", 2.0), projected_8xh100_s=7.0, compile_s=3.0),
             dict(ev("final_slot", 1.9), projected_8xh100_s=400.0, compile_s=5.0)]
    ttt = dict(runs={"adapted": dict(ev("legal_ttt", 1.9), compile_s=30.0)},
               projection=dict(projected_8xh100_s=350.0), preset_runs_ttt=False)
    stages = {"evaluation": {"result": {"evaluations": evals}}, "ttt": {"result": ttt}}
    b = gpu_check.eval_budget(stages)
    assert b["total_s"] == 407.0 and b["limit_s"] == 600.0
    assert b["projected_s_and_compile_s"]["legal_ttt"] == [350.0, 30.0]
    ttt["preset_runs_ttt"] = True
    assert gpu_check.eval_budget(stages)["total_s"] == 757.0
    ttt["projection"] = None  # TTT not measured: no total
    assert gpu_check.eval_budget(stages)["total_s"] is None


def event(name, cuda_us=None):
    kind = SimpleNamespace(CUDA="cuda", CPU="cpu")
    torch_like = SimpleNamespace(autograd=SimpleNamespace(DeviceType=kind))
    return torch_like, SimpleNamespace(name=name, device_type="cuda" if cuda_us else "cpu",
                                       device_time_total=cuda_us or 0)


@pytest.mark.parametrize("kernels,expected", [
    (["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>(Flash_fwd_params)"],
     "FLASH_ATTENTION"),
    (["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64"],
     "CUDNN_ATTENTION"),
    (["fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)"],
     "EFFICIENT_ATTENTION"),
    (["triton_red_fused__softmax_4", "sm90_xmma_gemm_bf16bf16"], "MATH"),
    (["sm90_xmma_gemm_bf16bf16"], None)])
def test_the_traced_attention_kernel_by_name(kernels, expected):
    torch_like = event("x")[0]
    events = [event(k, 100.0 - i)[1] for i, k in enumerate(kernels)]
    events.append(event("aten::_scaled_dot_product_flash_attention")[1])
    assert gpu_check.trace_figures(torch_like, events)["attention_kernel"] == expected
    cpu = [event("aten::_scaled_dot_product_flash_attention_for_cpu")[1]]  # no device kernels
    assert gpu_check.trace_figures(torch_like, cpu)["attention_kernel"] == "FLASH_ATTENTION"


def test_bad_arguments_stop_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    for argv in (["--out", str(tmp_path / "s.txt")], ["--out", str(tmp_path / "no" / "s.json")],
                 ["--budget", "0"], ["--budget", "x"], ["--preset", "nope"], ["--steps", "3"]):
        with pytest.raises(SystemExit) as stop:
            gpu_check.main(["--dry-run", *argv])
        assert stop.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), (argv, err)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- real runs on the CPU

def run_check(out: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, **(env or {})))


def gone(pid: int, wait_s: float = 10.0) -> bool:
    """The process has exited (or is a zombie nobody reaped yet), within wait_s."""
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX":
                return True
        except (FileNotFoundError, IndexError):
            return True
        time.sleep(0.1)
    return False


def log_lines(out: Path, stage: str) -> list[str]:
    return out.with_name(f"{out.stem}_{stage}.log").read_text().splitlines()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy") / "check.json"
    t0 = time.monotonic()
    proc = run_check(out)
    return dict(proc=proc, seconds=time.monotonic() - t0, s=json.loads(out.read_text()), out=out)


# What a summary holds: each key's type (a dict: its own keys), for every stage whatever it did.
SCHEMA = dict(tool=str, mode=str, preset=(str, type(None)), budget_s=float, started=str,
              start_time=float, elapsed_s=float, state=str, ok=(bool, type(None)),
              failed_stages=list, evaluation_8xh100=dict(projected_s_and_compile_s=dict,
                                                         limit_s=float,
                                                         total_s=(float, int, type(None))),
              stages=dict)
STAGE_SCHEMA = dict(status=str, notes=list, failures=list, reserve_s=float, log=str, result=dict,
                    deadline_s=(int, type(None)), started_s=(float, type(None)),
                    ended_s=(float, type(None)), pid=(int, type(None)), exit=(int, type(None)))


def check_schema(value, schema, where="summary"):
    assert set(value) == set(schema), (where, set(value) ^ set(schema))
    for key, kind in schema.items():
        if isinstance(kind, dict):
            check_schema(value[key], kind, f"{where}.{key}")
        else:
            assert isinstance(value[key], kind), (where, key, value[key])


def check_summary(s: dict, statuses=("ok", "failed", "cut", "skipped", "running", "pending")):
    check_schema(s, SCHEMA)
    assert list(s["stages"]) == list(gpu_check.STAGES)
    for name, st in s["stages"].items():
        check_schema(st, STAGE_SCHEMA, name)
        assert st["status"] in statuses, (name, st["status"])


@pytest.mark.slow
def test_healthy_dry_run_passes_every_stage_in_sequence_inside_its_budget(healthy):
    s, proc = healthy["s"], healthy["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_summary(s, statuses=("ok",))
    assert s["state"] == "finished" and s["ok"] and s["failed_stages"] == []
    assert all(st["failures"] == [] and st["exit"] == 0 for st in s["stages"].values())
    assert s["elapsed_s"] < s["budget_s"] == 240 and healthy["seconds"] < 240
    ends = 0.0
    for name, st in s["stages"].items():  # one after another, each inside its deadline
        assert ends <= st["started_s"] <= st["ended_s"] <= st["deadline_s"] and gone(st["pid"])
        ends = st["ended_s"]
    assert "every stage passed" in proc.stdout


@pytest.mark.slow
def test_healthy_training_figures_are_the_logs(healthy):
    r, lines = healthy["s"]["stages"]["training"]["result"], log_lines(healthy["out"], "training")
    logged = [re.match(r"step:(\d+)/8 train_loss:(\S+) train_time:(\d+)ms", x) for x in lines]
    logged = [[int(m[1]), float(m[2]), float(m[3])] for m in logged if m]
    assert r["steps"] == logged and len(logged) == 8
    assert abs(logged[0][1] - LN_V) < 0.3 and r["vocab"] == 1024
    assert r["speed"]["ms_per_step"] == pytest.approx((logged[6][2] - logged[1][2]) / 5, abs=0.01)
    assert r["timed_loop_graphs"] == 0  # counted at the ema: line
    graphs = r["compile"]["graphs"]
    assert len(graphs) == r["compile"]["count"] and r["compile"]["seconds"] == pytest.approx(
        sum(g[2] for g in graphs), abs=0.01)
    assert {g[1] for g in graphs} >= {"forward", "hidden", "newton_schulz5"}
    assert r["trace"]["attention_kernel"] == "FLASH_ATTENTION"  # the CPU's flash kernel
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in r["trace"]["aten_ops"]
    assert r["memory"]["rss_peak_mib"] > 0 and r["artifact_bytes"] > 0


@pytest.mark.slow
def test_healthy_evaluations_are_the_logs_and_project_with_train_gpts_arithmetic(healthy):
    s, out = healthy["s"], healthy["out"]
    evals = {e["name"]: e for e in s["stages"]["evaluation"]["result"]["evaluations"]}
    lines = log_lines(out, "evaluation")
    exact = {}  # each evaluation's first _exact line (sliding repeats as a roundtrip one)
    for m in filter(None, (re.match(r"(\w+)_exact val_loss:\S+ val_bpb:(\S+)", x) for x in lines)):
        exact.setdefault(m[1], float(m[2]))
    assert set(evals) == {"final_int6_roundtrip", "final_int6_sliding_window",
                          "final_int6_sliding_window_s64", "final_slot"}
    for name, e in evals.items():
        assert e["val_bpb"] == pytest.approx(exact[name], abs=5e-5), name
    assert evals["final_slot"]["val_bpb"] < evals["final_int6_roundtrip"]["val_bpb"]
    timing = {m[1]: (int(m[2]), float(m[3])) for m in map(gpu_check.TIMING.match, lines) if m}
    slot = evals["final_slot"]
    assert (slot["batches"], slot["steady_s_per_batch"]) == timing["final_slot"]
    # rank 0's batches on 8 ranks: the record's windows dealt as train_gpt deals them
    record = tg.sliding_windows(62_021_632 // 128 * 128, 128, 96, "once")
    assert slot["record_batches"] == len(tg.window_batches(len(record), 32, 8)[0::8])
    assert slot["projected_8xh100_s"] == pytest.approx(
        slot["steady_s_per_batch"] * slot["record_batches"], abs=0.1)
    rt = evals["final_int6_roundtrip"]  # 484,544 sequences of 128, 60,568 on rank 0, 64 a batch
    assert rt["record_batches"] == 947 and rt["batches"] == 2  # here: 127 sequences
    total = sum(e["projected_8xh100_s"] for e in evals.values())  # the record runs no TTT
    assert s["evaluation_8xh100"]["total_s"] == pytest.approx(total, abs=0.2)


@pytest.mark.slow
def test_healthy_ttt_runs_rank_zeros_share_against_the_same_windows_unadapted(healthy):
    r, lines = healthy["s"]["stages"]["ttt"]["result"], log_lines(healthy["out"], "ttt")
    runs, chunks = r["runs"], r["chunks"]
    logged = [re.match(r"legal_ttt:chunk (\d+)/(\d+) ", x) for x in lines]
    logged = [[int(m[1]), int(m[2])] for m in logged if m]
    assert [c[:2] for c in chunks["adapted"] + chunks["unadapted"]] == logged
    assert logged[-1] == [4, 4]  # 16,256 targets in chunks of 4,096
    adapted, unadapted = runs["adapted"]["val_bpb"], runs["unadapted"]["val_bpb"]
    assert math.isfinite(adapted) and adapted <= unadapted + 0.05
    assert not r["preset_runs_ttt"] and r["world"] == 8
    a, u = chunks["adapted"], chunks["unadapted"]
    score = (u[-1][2] - u[0][2]) / 3
    assert r["projection"]["score_s_per_chunk"] == pytest.approx(score, abs=1e-4)
    assert r["projection"]["record_chunks"] == -(-62_021_632 // 4096)
    assert runs["adapted"]["compile_s"] > 0  # its step and scoring rows compiled in chunk 1


@pytest.mark.slow
def test_healthy_probes(healthy):
    r = healthy["s"]["stages"]["probes"]["result"]
    assert r["device"]["cpu_count"] == os.cpu_count() and r["device"]["gpu"] is None
    assert r["sdpa"]["shape"] == [1, 128, 4, 2, 16]  # 1,024 tokens a step: 128 per GPU
    assert "ms" in r["sdpa"]["FLASH_ATTENTION"] and "refused" in r["sdpa"]["CUDNN_ATTENTION"]
    assert r["sdpa"]["MATH"]["seq_len"] == 128
    assert r["gptq"]["shape"] == [64, 192] and r["gptq"]["codes_equal"] == 1.0
    assert r["gptq"]["error_ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_diverged_training_fails_with_its_figure_while_the_evaluations_report(tmp_path):
    out = tmp_path / "check.json"
    proc = run_check(out, env=dict(MATRIX_LR="1e30"))
    s = json.loads(out.read_text())
    assert proc.returncode == 1 and s["failed_stages"] == ["training"]
    check_summary(s)
    training = s["stages"]["training"]
    assert training["status"] == "failed" and training["exit"] == 1
    assert any(re.fullmatch(r"train_loss nan at step \d \(the first non-finite; 1 of \d logged "
                            r"steps\)", f) for f in training["failures"]), training["failures"]
    assert any(f.startswith("Diverged: training diverged") for f in training["failures"])
    for name in ("evaluation", "ttt"):  # on the initial weights, exported when none came
        st = s["stages"][name]
        assert st["status"] == "ok", (name, st["failures"])
        assert st["result"].get("artifact", "").startswith("the initial weights") == (
            name == "evaluation")
    assert len(s["stages"]["evaluation"]["result"]["evaluations"]) == 4


@pytest.mark.slow
def test_a_budget_cuts_each_stage_at_its_deadline(tmp_path):
    out = tmp_path / "check.json"
    proc = run_check(out, "--budget", "12")
    s = json.loads(out.read_text())
    assert proc.returncode == 1
    check_summary(s)
    reserve = gpu_check.reserves("dry", 12.0)
    later = [sum(list(reserve.values())[i + 1:]) for i in range(4)]
    for (name, st), rest in zip(s["stages"].items(), later):
        assert st["deadline_s"] == round(12 - rest), name
        if st["status"] == "cut":
            assert st["failures"][0].startswith(f"stopped at its deadline ({st['deadline_s']} s")
            assert st["deadline_s"] <= st["ended_s"] <= st["deadline_s"] + gpu_check.CUT_GRACE_S + 2
            assert gone(st["pid"], 1.0) and st["exit"] < 0
    assert s["stages"]["probes"]["status"] == "cut" and s["stages"]["training"]["status"] == "cut"
    assert s["elapsed_s"] <= 12 + gpu_check.CUT_GRACE_S + 2
    assert not list(tmp_path.glob(".*.tmp"))  # no write a cut stopped halfway is left behind


@pytest.mark.slow
def test_killed_at_a_seeded_moment_leaves_a_parseable_summary(tmp_path):
    out = tmp_path / "check.json"
    moment = random.Random(29).uniform(4.0, 16.0)  # 10.6 s: inside the training stage
    command = [sys.executable, "-m", "tools.gpu_check", "--dry-run", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(moment)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    s = json.loads(out.read_text())
    check_summary(s)
    assert s["state"] == ("finished" if finished else "running"), moment
    assert s["elapsed_s"] <= moment + 1.0
    running = [st for st in s["stages"].values() if st["status"] == "running"]
    assert len(running) <= 1 and not (finished and running), moment
    for st in running:  # the stage died with gpu_check, what it measured kept
        assert gone(st["pid"]), (moment, st)
    done = [n for n, st in s["stages"].items() if st["status"] not in ("running", "pending")]
    assert done == list(gpu_check.STAGES)[:len(done)]  # the stages in order
