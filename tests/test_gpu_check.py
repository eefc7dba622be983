"""tools.gpu_check: its readers and checks on crafted logs with known figures, then the real
thing on the CPU: one healthy dry run shared by most assertions, one whose training diverges
while a stage overruns its deadline, and one killed at a random moment."""

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

import pytest
import torch

import train_gpt as tg
from tools import gpu_check, runlog
from tools._gpu_probes import classify_sdpa

ROOT = Path(__file__).resolve().parent.parent


def glog(t: float, cid: str, msg: str, src: str = "symbolic_convert.py:5335",
         level: str = "I") -> str:
    """A line as TORCH_LOGS prints it, at t seconds after 02:00:00."""
    stamp = f"02:{int(t // 60):02d}:{t % 60:09.6f}"
    return f"{level}1201 {stamp} 9059 site-packages/torch/_dynamo/{src}] [{cid}] {msg}"


def compile_lines(t: float, cid: str, fn: str, seconds: float, reason: str | None = None,
                  backward: tuple[float, float] | None = None) -> list[str]:
    """One compilation: (a recompilation first names its failed guard) tracing at t, dynamo's
    compiler done `seconds` later; optionally a backward compiled lazily at (start, seconds)."""
    lines = []
    if reason:
        rec = f"[__recompiles] Recompiling function {fn} in /x/train_gpt.py:626"
        guard = f"[__recompiles]     - 9/9: {reason}        # if qat:  # x.py:438"
        lines += [glog(t, cid, rec, "guards.py:5396", "V"),
                  glog(t, cid, guard, "guards.py:5396", "V")]
    lines += [glog(t, cid, f"Step 1: torchdynamo start tracing {fn} /x/train_gpt.py:626"),
              glog(t + seconds / 2, cid, "Step 2: calling compiler function inductor", "o.py:3116"),
              glog(t + seconds, cid, "Step 2: done compiler function inductor", "o.py:3120"),
              glog(t + seconds + 0.01, cid, "produce_guards", "symbolic_shapes.py:5889")]
    if backward:
        start, secs = backward
        lines += [glog(start, cid, "Step 3: torchinductor compiling BACKWARDS graph 0", "c.py:2"),
                  glog(start + secs, cid, "Step 3: torchinductor done compiling BACKWARDS graph 0",
                       "c.py:3")]
    return lines


STEP_MS = {1: 700, 2: 1400, 3: 2150, 4: 2850, 5: 3560, 6: 4270}
EVAL_MS = {"DIAGNOSTIC post_ema": 2102, "final_int6_roundtrip": 7486,
           "final_int6_sliding_window": 54469, "final_int6_sliding_window_s64": 77664,
           "final_slot": 408741, "final_slot_context": 1000}
MISMATCH = "tensor 'ids' size mismatch at index 0. expected {}, actual {}"


def step(s: int) -> str:
    return f"step:{s}/6 train_loss:2.5 train_time:{STEP_MS[s]}ms step_avg:{STEP_MS[s] / s:.2f}ms"


def ev(name: str, extra: str = "") -> str:
    return f"{name} val_loss:1.9 val_bpb:1.1377{extra} eval_time:{EVAL_MS[name]}ms"


def crafted_log(training_recompile: bool = True, limit_hit: bool = True) -> str:
    """A short record-like run. Compilations: 0/0 (20 s, its backward 30 s more, lazily at the
    first backward) and 0/1 (QAT, 10 s) in the warm-up; optionally 0/2 between steps 2 and 3
    (in the timed loop); 1/0 and 1/1 in the final validation; 1/2 in the round trip, 1/3 in the
    s64 pass."""
    lines = ["model_params:26993756", "world_size:1 grad_accum_steps:8",
             "train_batch_tokens:786432 train_seq_len:2048 iterations:6 warmup_steps:4 "
             "max_wallclock_seconds:0.000", "seed:1337",
             *compile_lines(0, "0/0", "forward", 20, backward=(25, 30)), "warmup_step:1/4",
             "warmup_step:2/4", *compile_lines(60, "0/1", "forward", 10, "qat == False"),
             "warmup_step:3/4", "warmup_step:4/4", step(1), step(2)]
    if training_recompile:
        lines += compile_lines(80, "0/2", "forward", 5, MISMATCH.format(48, 47))
    lines += [step(3), "late_qat:enabled step:3 scale:0.1497", step(4), step(5), step(6),
              *compile_lines(100, "1/0", "hidden", 4),
              *compile_lines(110, "1/1", "hidden", 3, MISMATCH.format(32, 14)),
              "step:6/6 val_loss:1.9209 val_bpb:1.1377 train_time:4270ms step_avg:711.67ms",
              "peak memory allocated: 23000 MiB reserved: 24000 MiB", "ema:applying EMA weights",
              ev("DIAGNOSTIC post_ema"), "Serialized model int6+lzma: 15689612 bytes",
              *compile_lines(130, "1/2", "hidden", 2, "___check_obj_id(L['self'], 1)"),
              ev("final_int6_roundtrip"),
              "final_int6_roundtrip_exact val_loss:1.93188450 val_bpb:1.14417082",
              ev("final_int6_sliding_window", " stride:96"),
              *compile_lines(150, "1/3", "hidden", 1.5, "expected 32, actual 7")]
    if limit_hit:
        hit = "torch._dynamo hit config.recompile_limit (8)"
        lines.append(glog(152, "1/3", hit, "convert_frame.py:1000", "W"))
    lines += [ev("final_int6_sliding_window_s64", " stride:64"),
              ev("final_slot", " steps:48 lr:0.012") + " mode:scored",
              ev("final_slot_context", " steps:48 lr:0.012") + " mode:context"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- log readers

def test_compilations_by_phase_with_their_seconds():
    parsed = gpu_check.parse_compiles(crafted_log())
    got = [(c["id"], c["function"], c["phase"], c["evaluation"], c["recompile"], c["seconds"])
           for c in parsed["compilations"]]
    # 0/0: 20 s of forward plus its backward's 30 s, not the 5 s between them.
    assert got == [("0/0", "forward", "warmup", None, False, 50.0),
                   ("0/1", "forward", "warmup", None, True, 10.0),
                   ("0/2", "forward", "training", None, True, 5.0),
                   ("1/0", "hidden", "validation", None, False, 4.0),
                   ("1/1", "hidden", "validation", None, True, 3.0),
                   ("1/2", "hidden", "evaluation", "final_int6_roundtrip", True, 2.0),
                   ("1/3", "hidden", "evaluation", "final_int6_sliding_window_s64", True, 1.5)]
    assert (parsed["total"], parsed["recompilations"], parsed["seconds"]) == (7, 5, 75.5)
    assert parsed["by_phase"]["warmup"] == dict(compilations=2, recompilations=1, seconds=60.0)
    assert parsed["by_evaluation"]["final_int6_roundtrip"] == dict(compilations=1, recompilations=1,
                                                                   seconds=2.0)
    assert [(f["function"], f["entries"], f["seconds"]) for f in parsed["functions"]] == [
        ("forward", 3, 65.0), ("hidden", 4, 10.5)]
    assert parsed["compilations"][1]["reason"] == "qat == False" and len(parsed["limit_hits"]) == 1


def test_a_compilation_cut_short_counts_to_its_last_line_and_days_wrap():
    lines = [glog(3599.5, "0/0", "Step 1: torchdynamo start tracing forward /x/t.py:1"),
             glog(3599.9, "0/0", "Step 2: calling compiler function inductor", "o.py:3116")]
    (c,) = gpu_check.parse_compiles(lines)["compilations"]
    assert c["seconds"] == pytest.approx(0.4) and not c["finished"]
    # 23:59:59 then 00:00:01: two seconds, not minus a day.
    times = gpu_check.glog_seconds(["I1201 23:59:59.000000 1 a.py:1] x", "own line",
                                 "I1202 00:00:01.000000 1 a.py:1] y"])
    assert times[0] is not None and times[1] is None and times[2] - times[0] == pytest.approx(2.0)


def test_an_eval_only_log_compiles_inside_its_evaluations():
    lines = ["seed:1337", "eval_only artifact:/x/a.ptz bytes:100",
             *compile_lines(0, "0/0", "hidden", 3),
             "final_int6_roundtrip val_loss:1.9 val_bpb:1.10 eval_time:4000ms",
             *compile_lines(9, "1/0", "slot_loss", 2),
             "final_int6_sliding_window val_loss:1.9 val_bpb:1.10 stride:96 eval_time:900ms"]
    phases = [(c["phase"], c["evaluation"]) for c in gpu_check.parse_compiles(lines)["compilations"]]
    assert phases == [("evaluation", "final_int6_roundtrip"),
                      ("evaluation", "final_int6_sliding_window")]


def test_compile_failures_flag_the_timed_loop_the_validation_recompile_and_the_limit():
    log = crafted_log()
    failures = gpu_check.compile_failures(gpu_check.parse_compiles(log), log)
    assert len(failures) == 3
    assert failures[0].startswith("recompilation 0/2 of forward during the timed training steps "
                                  "(tensor 'ids'")
    assert failures[1].startswith("recompilation 1/1 of hidden after the warm-up, in the in-loop "
                                  "validation")
    assert failures[2].startswith("recompile limit hit:") and "recompile_limit (8)" in failures[2]
    clean = crafted_log(training_recompile=False, limit_hit=False)
    found = gpu_check.compile_failures(gpu_check.parse_compiles(clean), clean)
    assert [f.split(" of ")[0] for f in found] == ["recompilation 1/1"]
    early = "\n".join(["seed:1337", *compile_lines(0, "0/0", "forward", 1), "warmup_step:1/4"])
    assert gpu_check.compile_failures(gpu_check.parse_compiles(early), early) == [
        "the run never reached the timed training loop: compile counts incomplete"]


def test_training_figures_from_the_log():
    t = gpu_check.training_figures(crafted_log())
    ms = (4270 - 2150) / 3
    assert t["averaged_steps"] == [3, 6] and t["ms_per_step"] == pytest.approx(ms, abs=0.01)
    assert t["tokens_per_s_per_gpu"] == round(786432 / (ms / 1000))
    assert t["late_qat_from_step"] == 4 and t["ms_per_step_before_qat"] == 750.0
    assert t["record"]["single_gpu_equivalent_ms"] == 8 * 91.25
    assert gpu_check.memory_figures(crafted_log())["logged_allocated_mib"] == 23000


def test_the_childrens_memory_line_is_the_one_read():
    from tools import _gpu_probes

    peaks = gpu_check.memory_peaks(_gpu_probes.memory_line(torch))
    assert peaks["rss_peak_mib"] > 0 and set(peaks) == {
        "rss_peak_mib", "cuda_allocated_peak_mib", "cuda_reserved_peak_mib"}


def test_defaults_are_train_gpts():
    """The settings gpu_check reads from a stage's environment default as train_gpt.py's do."""
    fields = {name: f for section in tg.Config.SECTIONS for name, f in section.settings().items()}
    for name, value in gpu_check.DEFAULTS.items():
        default = fields[name].default
        assert value == (str(int(default)) if isinstance(default, bool) else str(default)), name


def test_captured_lines_keep_their_arrival_times():
    text = gpu_check.capture_line(1.5, "step:1/2 train_loss:6.9\n")
    text += gpu_check.capture_line(12.25, "x | y")
    assert gpu_check.read_captured(text) == ([1.5, 12.25], ["step:1/2 train_loss:6.9", "x | y"])


# ---------------------------------------------------------------- checks on the numbers

def test_loss_checks_name_the_figures_that_broke_them():
    ln_v = math.log(1024)
    healthy = [(1, ln_v + 0.01), (2, 6.5), (3, 6.2), (4, 6.0), (5, 5.9), (6, 5.8)]
    assert gpu_check.loss_failures(healthy, 1024, True, True) == []
    diverged = healthy[:2] + [(3, float("nan")), (4, float("inf"))]
    assert gpu_check.loss_failures(diverged, 1024, True, True) == [
        "train_loss nan at step 3 (the first non-finite; 2 of 4 logged steps non-finite)"]
    far = [(1, 7.4), (2, 7.0), (3, 6.8)]
    (msg,) = gpu_check.loss_failures(far, 1024, True, True)
    assert msg.startswith("first train_loss 7.4000 is +0.4685 from ln(1024) = 6.9315")
    assert gpu_check.loss_failures(far, 1024, False, True) == []  # not the default init: no check
    flat = [(1, ln_v), (2, ln_v), (3, ln_v - 0.01)]
    (msg,) = gpu_check.loss_failures(flat, 1024, True, True)
    assert msg.startswith("train_loss not falling: step 1 6.9315, mean of steps 3..3 6.9215")


def ev_result(name: str, bpb: float) -> dict:
    return dict(name=name, val_bpb=bpb, val_loss=bpb * 1.7)


def test_evaluations_must_be_finite_and_in_their_bands():
    names = ("final_int6_roundtrip", "final_int6_sliding_window", "final_slot",
             "final_slot_context", "legal_ttt")
    good = [ev_result(n, x) for n, x in zip(names, (2.00, 1.97, 1.80, 2.03, 1.90))]
    assert gpu_check.eval_failures(good, (), True, 2.001) == []
    bad = [ev_result(n, x) for n, x in zip(names, (2.00, 2.06, 2.00, float("nan"), 2.07))]
    assert gpu_check.eval_failures(bad, ("final_int6_sliding_window_s64",), True, 2.02) == [
        "final_slot_context val_loss nan val_bpb nan: not finite",
        "no final_int6_sliding_window_s64 evaluation in the log",
        "final_int6_sliding_window val_bpb 2.0600 vs round trip 2.0000 (+0.0600); "
        "expected within 0.05",
        "final_slot val_bpb 2.0000 vs round trip 2.0000 (+0.0000); expected below it",
        "legal_ttt val_bpb 2.0700 vs round trip 2.0000 (+0.0700); expected at most 0.05 above it",
        "compiled round trip val_bpb 2.0000 vs 2.0200 eager on the same artifact (-0.0200); "
        "expected within 0.01"]
    # Still running: an evaluation not reached yet is not missing.
    assert gpu_check.eval_failures(bad[:1], ("legal_ttt",), False, None) == []


# ---------------------------------------------------------------- timing figures

def test_steady_state_from_the_best_source_the_log_has():
    e = dict(name="final_slot", seconds=10.0, paused_s=1.0, compile_s=3.0)
    derived = "derived: eval_time less pauses and compile seconds, per batch"
    assert gpu_check.steady_state(e, "", 20) == (0.3, derived)
    progress = ("eval_progress:final_slot 25.0% elapsed:30s eta:90s\n"
                "eval_progress:final_slot 75.0% elapsed:80s eta:27s\n")
    assert gpu_check.steady_state(e, progress, 20) == (pytest.approx(50 / (0.5 * 20)),
                                                       "measured: eval_progress lines")
    timing = progress + ("eval_timing:final_slot batches:20 first_batch:4.1000s "
                         "steady_batch:0.2500s\n")
    assert gpu_check.steady_state(e, timing, 20) == (0.25,
                                                     "measured: eval_timing line, batches 2..n")
    chunks = ("legal_ttt:chunk 1/3 bpb:2.1 elapsed:40.0s eta:80.0s\n"
              "legal_ttt:chunk 3/3 bpb:2.0 elapsed:46.0s eta:0.0s\n")
    assert gpu_check.steady_state(dict(e, name="legal_ttt"), chunks, 3) == (
        3.0, "measured: legal_ttt:chunk lines, chunks 2..3")


def test_projection_to_the_record_split_on_eight_gpus():
    s = gpu_check.settings_of({"SLOT_MODE": "both"})
    slot = gpu_check.projection(dict(name="final_slot", steady_s_per_batch=0.16), s)
    # 646,039 windows at stride 96 dealt into 8 lists of batches of 32, over 8 ranks.
    assert slot["projected_batches"] == 2524
    assert slot["projected_8xh100_s"] == pytest.approx(0.16 * 2524, abs=0.1)
    assert slot["projected_8xh100_upper_s"] == pytest.approx(0.16 * 2524 * 4.8 / 3.35, abs=0.1)
    assert slot["record_8xh100_s"] == 408.7
    ttt = gpu_check.projection(dict(name="legal_ttt", steady_s_per_batch=0.8), s)
    assert ttt["projected_batches"] == 1893
    assert ttt["projected_8xh100_s"] == pytest.approx(1893 * 0.8 / 8, abs=0.1)
    rt = gpu_check.projection(dict(name="final_int6_roundtrip", steady_s_per_batch=0.05), s)
    assert rt["projected_batches"] == 119  # 30,284 sequences, 3,785 on rank 0, 32 per batch
    fewer_steps = gpu_check.projection(dict(name="final_slot", steady_s_per_batch=0.1),
                                       dict(s, SLOT_STEPS="8"))
    assert fewer_steps["record_8xh100_s"] is None  # not the record's settings: no comparison


@pytest.mark.parametrize("n_targets,L,stride", [
    (16256, 128, 96), (16256, 128, 64), (94208, 2048, 96), (94208, 2048, 64), (2048, 2048, 96),
    (100, 128, 96), (62_021_632, 2048, 96)])
def test_plan_arithmetic_matches_train_gpt(n_targets, L, stride):
    plan = tg.sliding_windows(n_targets, L, stride, "once")
    assert gpu_check.n_windows(n_targets, L, stride) == len(plan)
    for interleave, world in ((1, 1), (8, 1), (8, 8), (1, 8)):
        batches = tg.window_batches(len(plan), 32, interleave)
        assert gpu_check.pass_batches(len(plan), 32, interleave, world) == len(batches[0::world])


def test_stage_arguments_are_checked():
    sets = gpu_check.parse_sets(["MATRIX_LR=1", "training:SEED=7"])
    assert sets["training"] == dict(MATRIX_LR="1", SEED="7")
    assert sets["eval_slot"] == dict(MATRIX_LR="1")
    for bad in ("matrix_lr=1", "probes:SEED=1", "SEED"):
        with pytest.raises(gpu_check.CheckError, match="--set"):
            gpu_check.parse_sets([bad])
    assert gpu_check.parse_deadlines(["probes=30"], 420)["probes"] == 30
    assert gpu_check.parse_deadlines([], 420)["training"] == 399
    with pytest.raises(gpu_check.CheckError, match="--deadline"):
        gpu_check.parse_deadlines(["training=500"], 420)
    with pytest.raises(gpu_check.CheckError, match="add eval_model"):
        gpu_check.chosen_stages("training,eval_ttt")


def test_late_qat_switches_on_past_the_middle_of_the_short_run():
    for n in (8, 36):
        env = gpu_check.schedule_env(n, 4, 0.15)
        cfg = tg.Config.from_env(dict(env, RUN_ID="x"))
        schedule = tg.Schedule.of(cfg.train, cfg.optim, cfg.train.max_wallclock_seconds)
        first = next(s for s in range(n) if schedule.late_qat(schedule.lr_scale(s, 0.0)))
        assert n // 2 <= first <= n // 2 + 1


def test_sdpa_backend_from_ops_and_kernel_names():
    flash = "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>(Flash_fwd_params)"
    assert classify_sdpa(["aten::_scaled_dot_product_flash_attention"], [flash]) == (
        "FLASH_ATTENTION", "FLASH_ATTENTION")
    cudnn = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64"
    assert classify_sdpa(["aten::_scaled_dot_product_cudnn_attention"], [cudnn]) == (
        "CUDNN_ATTENTION", "CUDNN_ATTENTION")
    mem = "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)"
    assert classify_sdpa(["aten::_scaled_dot_product_efficient_attention"], [mem]) == (
        "EFFICIENT_ATTENTION", "EFFICIENT_ATTENTION")
    # The compiled graph's math fallback: inductor's own softmax kernels, no fused attention.
    inductor = ["triton_red_fused__softmax_4", "sm90_xmma_gemm_bf16bf16"]
    assert classify_sdpa([], inductor) == (None, "MATH")
    assert classify_sdpa(["aten::_scaled_dot_product_flash_attention_for_cpu"], []) == (
        "FLASH_ATTENTION", None)


def test_output_paths_and_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    paths = gpu_check.output_paths(None)
    assert paths["summary"] == tmp_path / "gpu_check.json"
    assert paths["text"] == tmp_path / "gpu_check.txt"
    assert paths["training"] == tmp_path / "gpu_check_training.log"
    assert len(paths) == 7  # the device machine sends back at most 8 files
    json_out = str(tmp_path / "s.json")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "s.txt")]) == 2
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "no" / "s.json")]) == 2
    assert gpu_check.main(["--dry-run", "--steps", "2", "--out", json_out]) == 2
    assert gpu_check.main(["--dry-run", "--set", "x=1", "--out", json_out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: --") for line in err)
    assert not list(tmp_path.iterdir())


def test_refuses_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "s.json")]) == 1
    assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_partial_summary_renders():
    """A stage cut early holds only some of its figures: the text copy still renders."""
    host = dict(python="3", torch="2", cuda=None, triton=None, driver=None, cpu_count=2,
                cpu_usable=2)
    stages = {n: dict(status="skipped", failures=[]) for n in gpu_check.STAGES}
    loss = dict(first=[1, 6.9], last=None, ln_vocab=6.93, logged=1)
    stages["training"] = dict(status="running", started_s=1.0, ended_s=None, deadline_s=400,
                              failures=[], loss=loss, compile=None)
    summary = dict(mode="gpu", started="t", elapsed_s=5, budget_s=420, state="running",
                   failed_stages=[], host=host, pauses=[dict(from_s=2.0, to_s=None, note="ok")],
                   stages=stages)
    text = gpu_check.render_text(summary)
    assert "running (incomplete)" in text and "[training] running 1-… s (deadline 400)" in text
    assert "paused the other stages 2-… s" in text


# ---------------------------------------------------------------- real runs on the CPU

def check_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tools.gpu_check", "--dry-run", "-q", "--out", str(out), *args]


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(check_command(out, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"
    except (FileNotFoundError, IndexError):
        return True


def stage_log(out: Path, stage: str) -> tuple[list[float], list[str]]:
    return gpu_check.read_captured(out.with_name(f"{out.stem}_{stage}.log").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry") / "check.json"
    t0 = time.monotonic()
    proc = run_check(out)
    return dict(proc=proc, seconds=time.monotonic() - t0, summary=json.loads(out.read_text()),
                out=out)


def test_dry_run_passes_inside_its_budget(dry_run):
    s, proc = dry_run["summary"], dry_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert s["state"] == "finished" and s["ok"] and s["failed_stages"] == []
    assert all(st["status"] == "ok" and st["failures"] == [] for st in s["stages"].values())
    assert s["elapsed_s"] < s["budget_s"] == 170 and dry_run["seconds"] < 180
    for name, st in s["stages"].items():
        assert st["ended_s"] <= st["deadline_s"] and gone(st["pid"]), name
    # The evaluations started once eval_model had written their artifact.
    assert s["stages"]["eval_slot"]["started_s"] >= s["stages"]["eval_model"]["ended_s"]
    assert "every stage passed" in dry_run["out"].with_suffix(".txt").read_text()


def test_dry_run_losses_and_evaluations_are_checked_numbers(dry_run):
    st = dry_run["summary"]["stages"]
    for name in ("training", "eval_model"):
        first = st[name]["loss"]["first"]
        assert first[0] == 1 and abs(first[1] - math.log(1024)) < 0.3
    evals = {e["name"]: e for e in st["eval_slot"]["evaluations"]}
    rt = evals["final_int6_roundtrip"]["val_bpb"]
    assert evals["final_slot"]["val_bpb"] < rt
    assert abs(evals["final_int6_sliding_window"]["val_bpb"] - rt) <= 0.05
    # The compiled round trip (the eager backend here) against eval_model's eager one.
    eager = next(e for e in st["eval_model"]["evaluations"] if e["name"] == "final_int6_roundtrip")
    assert abs(rt - eager["val_bpb"]) <= 0.01
    assert [e["name"] for e in st["eval_ttt"]["evaluations"]][-1] == "legal_ttt"


def test_dry_run_compile_seconds_come_from_its_own_log(dry_run):
    figures, out = dry_run["summary"]["figures"], dry_run["out"]
    for stage in ("training", "eval_slot", "eval_ttt"):
        _, lines = stage_log(out, stage)
        graphs = figures["compile_s"][stage]["graphs"]
        starts = [ln for ln in lines if "torchdynamo start tracing" in ln]
        assert graphs and len(graphs) == len(starts)
        for g in graphs:  # eager backend: a graph from its first line to dynamo's `done compiler`
            mine = [ln for ln in lines if gpu_check.GLOG_LINE.match(ln) and f"] [{g['id']}] " in ln]
            t = gpu_check.glog_seconds(mine)
            done = next(i for i, ln in enumerate(mine) if "Step 2: done compiler function" in ln)
            assert g["seconds"] == pytest.approx(t[done] - t[0], abs=1e-3)
    training = figures["compile_s"]["training"]["graphs"]
    assert {g["function"] for g in training} >= {"forward", "hidden", "newton_schulz5"}
    assert all(g["where"] != "training" for g in training)  # nothing compiled once the timer ran


def test_dry_run_steady_state_and_projections_come_from_its_own_log(dry_run):
    s, out = dry_run["summary"], dry_run["out"]
    text = "\n".join(stage_log(out, "eval_slot")[1])
    n_targets = int(runlog.config(text)["val_tokens"])
    assert n_targets == 16256  # the dry run's 16,384 validation tokens, in whole 128-token rows
    slot = next(e for e in s["stages"]["eval_slot"]["evaluations"] if e["name"] == "final_slot")
    logged = next(e for e in runlog.eval_times(text) if e["name"] == "final_slot")
    plan = tg.sliding_windows(n_targets, 128, 96, "once")
    assert slot["batches"] == len(tg.window_batches(len(plan), 32, 8))
    # The script's eval_timing line (batches 2..n) is the best source; it counts this rank's
    # batches as the plan does.
    timing = gpu_check.eval_timing(text)["final_slot"]
    assert timing["batches"] == slot["batches"] and slot["steady_basis"].startswith(
        "measured: eval_timing line")
    assert slot["steady_s_per_batch"] == pytest.approx(timing["steady_batch_s"], abs=1e-5)
    # eval_time is the sum of its batches' seconds (each figure rounded)
    assert 0 < timing["steady_batch_s"] <= (logged["ms"] + 1) / 1000 / (slot["batches"] - 1)
    record = tg.sliding_windows(62_021_632 // 128 * 128, 128, 96, "once")
    assert slot["projected_batches"] == len(tg.window_batches(len(record), 32, 8)[0::8])
    assert slot["projected_8xh100_s"] == pytest.approx(
        slot["steady_s_per_batch"] * slot["projected_batches"], rel=1e-3, abs=0.2)
    assert s["figures"]["projected_8xh100_s"]["eval_slot/final_slot"] == slot["projected_8xh100_s"]
    ttt = s["stages"]["eval_ttt"]["evaluations"][-1]
    chunks = gpu_check.ttt_chunk_lines("\n".join(stage_log(out, "eval_ttt")[1]))
    assert ttt["batches"] == chunks[-1][1] == 4  # TTT_CHUNK_TOKENS=4096 over 16,256 targets
    assert ttt["steady_basis"].startswith("measured: legal_ttt:chunk")
    steady = (chunks[-1][2] - chunks[0][2]) / (chunks[-1][0] - chunks[0][0])
    assert ttt["steady_s_per_batch"] == pytest.approx(steady, abs=1e-4)


def test_dry_run_logs_keep_the_line_contract(dry_run):
    """The real script's lines as the tools read them (tools.runlog.LINES): no line that starts
    like one of them breaks its format, the lines every figure comes from are there, and each
    closing score: line repeats its evaluation's _exact figure."""
    seen = set()
    for stage in gpu_check.SCRIPT_STAGES:
        _, lines = stage_log(dry_run["out"], stage)
        assert runlog.malformed(lines) is None, stage
        seen |= {kind for kind in runlog.LINES if runlog.find(kind, lines)}
        scores = {m["name"]: m["val_bpb"] for m in runlog.find("score", lines)}
        results = [m["name"] for m in runlog.find("result", lines) if m["name"] != runlog.POST_EMA]
        assert list(scores) == results, stage
        for name, bpb in scores.items():
            assert bpb in [m["val_bpb"] for m in runlog.find("exact", lines) if m["name"] == name]
    assert seen >= {*runlog.CONFIG_LINES, "param_groups", "param_formats", "eval_only", "warmup",
                    "train_step", "val_step", "late_qat", "ema", "code", "model", "artifact",
                    "result", "exact", "timing", "ttt_start", "ttt_chunk", "score", "memory"}


def test_dry_run_kernel_gptq_memory_and_host_figures(dry_run):
    s, out = dry_run["summary"], dry_run["out"]
    f = s["figures"]
    # On the CPU the compiled (eager-backend) step dispatches SDPA's CPU flash kernel.
    assert f["attention_kernel"] == "FLASH_ATTENTION"
    kernel = s["stages"]["probes"]["parts"]["kernel"]
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernel["attention_ops"]
    _, lines = stage_log(out, "probes")
    assert any(ln.startswith("gpu_check:part ") and '"name": "kernel"' in ln for ln in lines)
    g = f["gptq"]
    assert g["shape"] == [64, 192] and g["codes_equal"] == 1.0
    assert g["error_ratio"] == pytest.approx(1.0)
    assert set(f["peak_mib"]) >= {"training", "eval_slot", "eval_ttt"}
    assert all(v > 0 for v in f["peak_mib"].values())
    assert f["cpu_count"] == os.cpu_count() and "driver" in f
    assert f["ms_per_step"] == s["stages"]["training"]["speed"]["ms_per_step"] > 0


def test_dry_run_pauses_the_others_during_training_steps(dry_run):
    s, out = dry_run["summary"], dry_run["out"]
    (pause,) = s["pauses"]
    times, lines = stage_log(out, "training")
    warm = next(t for t, ln in zip(times, lines) if ln == "warmup_step:2/2")
    ema = next(t for t, ln in zip(times, lines) if ln.startswith("ema:"))
    # The summary gives the pause to 0.01 s, the stage log its lines to 0.001 s.
    r = 0.005
    assert warm - r <= pause["from_s"] < ema - 0.5 and ema - 0.5 - r <= pause["to_s"] <= ema + 1.5
    # No line of another stage came while it was paused (but what was already in its pipe).
    for name in ("eval_slot", "eval_ttt", "probes"):
        t, _ = stage_log(out, name)
        assert not [x for x in t if pause["from_s"] + 1.5 < x < pause["to_s"] - 0.1], name


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    out = tmp_path_factory.mktemp("diverged") / "check.json"
    proc = run_check(out, "--only", "probes,training,eval_model,eval_slot", "--steps", "3",
                     "--set", "training:MATRIX_LR=1e30", "--deadline", "probes=4")
    return dict(proc=proc, summary=json.loads(out.read_text()), out=out)


def test_diverged_training_fails_naming_the_figure_while_the_evaluations_report(diverged):
    s = diverged["summary"]
    assert diverged["proc"].returncode == 1 and not s["ok"]
    training = s["stages"]["training"]
    assert training["status"] == "failed"
    assert any(re.match(r"train_loss nan at step \d \(the first non-finite", f)
               for f in training["failures"]), training["failures"]
    ev = s["stages"]["eval_slot"]
    assert ev["status"] == "ok"
    assert {e["name"] for e in ev["evaluations"]} >= {"final_slot", "final_slot_context"}
    assert s["stages"]["eval_ttt"]["status"] == "skipped" and "eval_ttt" not in s["failed_stages"]


def test_a_stage_past_its_deadline_is_cut_and_the_others_finish_inside_the_total(diverged):
    s, out = diverged["summary"], diverged["out"]
    probes = s["stages"]["probes"]
    assert probes["status"] == "cut"
    assert probes["failures"][0].startswith("stopped at its deadline (4 s")
    assert 4 <= probes["ended_s"] <= 4 + gpu_check.CUT_GRACE_S + 2 and gone(probes["pid"])
    assert out.with_name("check_probes.log").exists()
    assert sorted(s["failed_stages"]) == ["probes", "training"]
    for name in ("training", "eval_model", "eval_slot"):
        assert s["stages"][name]["ended_s"] <= s["stages"][name]["deadline_s"] <= s["budget_s"]
    assert s["elapsed_s"] <= s["budget_s"]


def test_killed_at_a_random_moment_leaves_a_parseable_summary(tmp_path):
    out = tmp_path / "check.json"
    moment = random.Random().uniform(3.0, 25.0)
    cmd = check_command(out, "--only", "eval_model,eval_slot")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and time.monotonic() < deadline:  # its first summary: no stage yet
            time.sleep(0.05)
        first = time.monotonic()
        time.sleep(moment)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic() - first
    finally:
        proc.wait(timeout=30)
    s = json.loads(out.read_text())
    # A kill between the last summary's write and the process's exit finds it finished.
    allowed = ("finished",) if finished else ("running", "finished")
    assert s["state"] in allowed, f"killed at {moment:.1f} s"
    assert s["elapsed_s"] >= min(killed_at, s["elapsed_s"]) - 2 * gpu_check.WRITE_EVERY_S - 1.5
    for name in ("eval_model", "eval_slot"):
        st = s["stages"][name]
        if st["status"] in ("ok", "failed"):
            assert st["ended_s"] <= s["elapsed_s"] and st["evaluations"], (name, moment)
        if st["status"] != "pending":
            times, lines = stage_log(out, name)
            assert len(times) == len(lines) and times == sorted(times)
            end = time.monotonic() + 10
            while not gone(st["pid"]) and time.monotonic() < end:  # the child dies with gpu_check
                time.sleep(0.1)
            assert gone(st["pid"]), (name, moment)
    assert s["stages"]["training"]["status"] == "skipped"
