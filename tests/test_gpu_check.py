"""tools.gpu_check: its log readers on crafted logs with known compilations, step times and
evaluation times, and one dry run end to end on the CPU."""

import importlib.util
import json
import re

import pytest
import torch

import train_gpt as tg
from tools import bench_train, gpu_check

PREFIX = "I1201 02:39:11.920000 9059 site-packages/torch/_dynamo/{src}] [{id}] "


def dynamo(cid: str, msg: str, src: str = "symbolic_convert.py:5335") -> str:
    return PREFIX.format(src=src, id=cid) + msg


def compile_lines(cid: str, fn: str, reason: str | None = None) -> list[str]:
    """What TORCH_LOGS=recompiles,dynamo prints for one compilation (a recompilation first
    names the guard that failed, over several lines)."""
    lines = []
    if reason:
        rec = dict(src="guards.py:5396")
        lines += [dynamo(cid, f"[__recompiles] Recompiling function {fn} in /x/train_gpt.py:626", **rec),
                  dynamo(cid, "[__recompiles]     triggered by the following guard failure(s):", **rec),
                  dynamo(cid, f"[__recompiles]     - 9/9: {reason}        # if qat:  # train_gpt.py:438", **rec),
                  dynamo(cid, "[__recompiles]     - User stack trace:", **rec)]
    return lines + [dynamo(cid, f"Step 1: torchdynamo start tracing {fn} /x/train_gpt.py:626"),
                    dynamo(cid, "Step 2: calling compiler function inductor", "output_graph.py:3116")]


STEP_MS = {1: 700, 2: 1400, 3: 2150, 4: 2850, 5: 3560, 6: 4270}
EVAL_MS = {"DIAGNOSTIC post_ema": 2102, "final_int6_roundtrip": 7486, "final_int6_sliding_window": 54469,
           "final_int6_sliding_window_s64": 77664, "final_slot": 408741, "final_slot_context": 1000}


def crafted_log(training_recompile: bool = True, limit_hit: bool = True) -> str:
    """A short record-like run. Compilations: 0/0 and 0/1 (QAT) in the warm-up; optionally 0/2
    between steps 2 and 3 (in the timed loop); 1/0 and 1/1 in the final validation; 1/2 in the
    round trip, 1/3 in the s64 pass."""
    step = lambda s: f"step:{s}/6 train_loss:2.5 train_time:{STEP_MS[s]}ms step_avg:{STEP_MS[s] / s:.2f}ms"  # noqa
    ev = lambda n, extra="": f"{n} val_loss:1.9 val_bpb:1.1377{extra} eval_time:{EVAL_MS[n]}ms"  # noqa
    lines = ["model_params:26993756", "world_size:1 grad_accum_steps:8",
             "train_batch_tokens:786432 train_seq_len:2048 iterations:6 warmup_steps:4 max_wallclock_seconds:0.000",
             "seed:1337", *compile_lines("0/0", "forward"), "warmup_step:1/4", "warmup_step:2/4",
             *compile_lines("0/1", "forward", "qat == False"), "warmup_step:3/4", "warmup_step:4/4",
             step(1), step(2)]
    if training_recompile:
        lines += compile_lines("0/2", "forward", "tensor 'ids' size mismatch at index 0. expected 48, actual 47")
    lines += [step(3), "late_qat:enabled step:3 scale:0.1497", step(4), step(5), step(6),
              *compile_lines("1/0", "hidden"),
              *compile_lines("1/1", "hidden", "tensor 'ids' size mismatch at index 0. expected 32, actual 14"),
              "step:6/6 val_loss:1.9209 val_bpb:1.1377 train_time:4270ms step_avg:711.67ms",
              "peak memory allocated: 23000 MiB reserved: 24000 MiB", "ema:applying EMA weights",
              ev("DIAGNOSTIC post_ema"), "Serialized model int6+lzma: 15689612 bytes",
              *compile_lines("1/2", "hidden", "___check_obj_id(L['self'], 1)"),
              ev("final_int6_roundtrip"), "final_int6_roundtrip_exact val_loss:1.93188450 val_bpb:1.14417082",
              ev("final_int6_sliding_window", " stride:96"), *compile_lines("1/3", "hidden", "expected 32, actual 7")]
    if limit_hit:
        lines.append("W1201 02:40:00.000000 9059 torch/_dynamo/convert_frame.py:1000] [1/3] "
                     "torch._dynamo hit config.recompile_limit (8)")
    lines += [ev("final_int6_sliding_window_s64", " stride:64"), ev("final_slot", " steps:48 lr:0.012") + " mode:scored",
              ev("final_slot_context", " steps:48 lr:0.012") + " mode:context"]
    return "\n".join(lines) + "\n"


def test_compilations_counted_by_phase_and_evaluation():
    parsed = gpu_check.parse_compiles(crafted_log())
    assert [(c["id"], c["function"], c["phase"], c["evaluation"], c["recompile"]) for c in parsed["compilations"]] == [
        ("0/0", "forward", "warmup", None, False), ("0/1", "forward", "warmup", None, True),
        ("0/2", "forward", "training", None, True), ("1/0", "hidden", "validation", None, False),
        ("1/1", "hidden", "validation", None, True), ("1/2", "hidden", "evaluation", "final_int6_roundtrip", True),
        ("1/3", "hidden", "evaluation", "final_int6_sliding_window_s64", True)]
    assert (parsed["total"], parsed["recompilations"]) == (7, 5)
    assert parsed["by_phase"] == dict(warmup=dict(compilations=2, recompilations=1),
                                      training=dict(compilations=1, recompilations=1),
                                      validation=dict(compilations=2, recompilations=1),
                                      evaluation=dict(compilations=2, recompilations=2))
    assert parsed["by_evaluation"] == {"final_int6_roundtrip": dict(compilations=1, recompilations=1),
                                       "final_int6_sliding_window_s64": dict(compilations=1, recompilations=1)}
    assert [(f["function"], f["location"], f["entries"]) for f in parsed["functions"]] == [
        ("forward", "train_gpt.py:626", 3), ("hidden", "train_gpt.py:626", 4)]
    # The first guard line, without its source comment.
    assert parsed["compilations"][1]["reason"] == "qat == False"
    assert len(parsed["limit_hits"]) == 1


def test_compile_failures_flag_the_timed_loop_the_validation_recompile_and_the_limit():
    log = crafted_log()
    failures = gpu_check.compile_failures(gpu_check.parse_compiles(log), log, expect_compile=True)
    assert len(failures) == 3
    assert failures[0].startswith("recompilation 0/2 of forward during the timed training steps (tensor 'ids'")
    assert failures[1].startswith("recompilation 1/1 of hidden after the warm-up, in the in-loop validation")
    assert failures[2].startswith("recompile limit hit:") and "recompile_limit (8)" in failures[2]
    # Without the planted recompilations only the validation recompile remains; a first
    # compilation in the validation (1/0) and every evaluation recompile are allowed.
    clean = crafted_log(training_recompile=False, limit_hit=False)
    failures = gpu_check.compile_failures(gpu_check.parse_compiles(clean), clean, expect_compile=True)
    assert [f.split(" of ")[0] for f in failures] == ["recompilation 1/1"]


def test_without_warmup_the_first_compilation_is_inside_the_timed_loop():
    lines = ["world_size:1 grad_accum_steps:8", "seed:1337", *compile_lines("0/0", "forward"),
             "step:1/2 train_loss:6.9 train_time:100ms step_avg:100.00ms",
             "step:2/2 train_loss:6.8 train_time:200ms step_avg:100.00ms"]
    log = "\n".join(lines)
    parsed = gpu_check.parse_compiles(log)
    assert parsed["by_phase"]["training"]["compilations"] == 1
    assert gpu_check.compile_failures(parsed, log, expect_compile=True) == [
        "compilation 0/0 of forward during the timed training steps"]
    # A log that stops before any training step cannot vouch for the timed loop.
    early = "\n".join(["seed:1337", *compile_lines("0/0", "forward"), "warmup_step:1/4"])
    assert gpu_check.compile_failures(gpu_check.parse_compiles(early), early, expect_compile=False) == [
        "the run never reached the timed training loop: compile counts incomplete"]


def test_step_time_tokens_and_memory_from_the_log():
    t = gpu_check.parse_training(crafted_log(), skip=2)
    assert t["averaged_steps"] == [3, 6] and t["steps_logged"] == 6
    assert t["ms_per_step"] == pytest.approx((4270 - 2150) / 3)
    assert t["tokens_per_s_per_gpu"] == pytest.approx(786432 / ((4270 - 2150) / 3 / 1000))
    assert (t["tokens_per_step"], t["grad_accum_steps"], t["world_size"]) == (786432, 8, 1)
    # late_qat:enabled step:3 is logged before the 4th step: steps 1-3 without QAT, 4-6 with.
    assert t["late_qat_from_step"] == 4
    assert t["ms_per_step_before_qat"] == pytest.approx(2150 - 1400)
    assert t["ms_per_step_with_qat"] == pytest.approx((4270 - 2150) / 3)
    assert (t["peak_allocated_mib"], t["peak_reserved_mib"]) == (23000, 24000)
    r = gpu_check.record_comparison(t)
    assert r["record_single_gpu_equivalent_ms"] == pytest.approx(8 * 91.25)
    assert r["ratio_to_single_gpu_equivalent"] == pytest.approx(t["ms_per_step"] / 730.0)
    assert r["peak_ratio_to_record"] == pytest.approx(23000 / 22524)


def test_evaluation_times_and_missing_evaluations():
    evals, missing = gpu_check.parse_evaluations(crafted_log(), gpu_check.EXPECTED_EVALS)
    assert {e["name"]: e["ms"] for e in evals} == EVAL_MS and missing == []
    assert [e["detail"] for e in evals][2:] == ["stride:96", "stride:64", "steps:48 lr:0.012 mode:scored",
                                               "steps:48 lr:0.012 mode:context"]
    cut = crafted_log().split("final_slot val_loss")[0]
    assert gpu_check.parse_evaluations(cut, gpu_check.EXPECTED_EVALS + ("ttt",))[1] == [
        "final_slot", "final_slot_context", "ttt"]


def test_sdpa_backend_from_ops_and_kernel_names():
    classify = gpu_check.classify_sdpa
    assert classify(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention"],
                    ["void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>(Flash_fwd_params)",
                     "void at::native::elementwise_kernel"]) == ("FLASH_ATTENTION", "FLASH_ATTENTION")
    # cuDNN's own SDPA kernels have flash in their names too.
    assert classify(["aten::_scaled_dot_product_cudnn_attention"],
                    ["cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64"]) == (
        "CUDNN_ATTENTION", "CUDNN_ATTENTION")
    assert classify(["aten::_scaled_dot_product_efficient_attention"],
                    ["fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)"]) == (
        "EFFICIENT_ATTENTION", "EFFICIENT_ATTENTION")
    assert classify(["aten::_scaled_dot_product_attention_math", "aten::bmm"],
                    ["sm90_xmma_gemm_bf16bf16_bf16f32", "void at::native::cunn_SoftMaxForward<8>"]) == ("MATH", "MATH")
    assert classify(["aten::_scaled_dot_product_flash_attention_for_cpu"], []) == ("FLASH_ATTENTION", None)


def test_late_qat_switches_on_past_the_middle_of_the_short_run():
    for n in (8, 36):
        env = gpu_check.schedule_env(n, 4, 0.15)
        h = tg.Hyperparameters.from_env(dict(env, RUN_ID="x"))
        first = next(s for s in range(n) if tg.lr_multiplier(h, s, 0.0) < h.late_qat_threshold)
        assert n // 2 <= first <= n // 2 + 1


def test_output_paths_and_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.output_paths(None) == (tmp_path / "gpu_check_summary.json", tmp_path / "gpu_check_summary.txt",
                                            tmp_path / "gpu_check_summary_train.log")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "s.txt")]) == 2
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "no" / "s.json")]) == 2
    assert gpu_check.main(["--dry-run", "--steps", "1", "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: --") for line in err)
    assert not list(tmp_path.iterdir())


def test_refuses_a_machine_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "s.json")]) == 1
    assert "no CUDA device" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_dry_run_end_to_end(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "check.json"
    rc = gpu_check.main(["--dry-run", "-q", "--out", str(out)])
    s = json.loads(out.read_text())
    st = s["stages"]
    assert list(st) == ["versions", "sdpa", "compile", "training", "evaluation"]
    assert s["failed_stages"] == [n for n, v in st.items() if not v["ok"]] and rc == (0 if s["ok"] else 1)

    v = st["versions"]
    assert v["ok"] and v["torch"] == torch.__version__ and v["gpu"] is None
    assert v["fa3"]["importable"] == (importlib.util.find_spec("flash_attn_interface") is not None)

    sd = st["sdpa"]
    assert sd["ok"] and sd["shape"]["enable_gqa"] and sd["default"]["backend"] in ("FLASH_ATTENTION", "MATH")
    assert sd["backends"][sd["default"]["backend"]]["status"] == "ok" and sd["backends"]["MATH"]["status"] == "ok"
    for cuda_only in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        assert sd["backends"][cuda_only]["status"] == "refused" and sd["backends"][cuda_only]["reason"]

    log = (tmp_path / "check_train.log").read_text()
    c = st["compile"]
    # The model's forward is compiled twice in the warm-up (late QAT off, then on), never after.
    forward = [x for x in c["compilations"] if x["function"] == "forward"]
    assert [(x["id"], x["phase"]) for x in forward] == [("0/0", "warmup"), ("0/1", "warmup")]
    assert "qat" in forward[1]["reason"]
    assert c["by_phase"]["training"]["compilations"] == 0
    assert c["total"] == len(set(re.findall(r"\] \[(\d+/\d+)\S*\] Step 1: torchdynamo start tracing", log)))
    flagged = {x["id"] for x in c["compilations"] if x["phase"] == "validation" and x["recompile"]}
    assert c["ok"] == (not flagged and not c["limit_hits"])
    assert sum(p["compilations"] for p in c["by_phase"].values()) == c["total"]

    t = st["training"]
    steps = [(int(a), int(b)) for a, b in re.findall(r"^step:(\d+)/8 train_loss:\S+ train_time:(\d+)ms", log, re.M)]
    assert t["ok"] and [x[0] for x in steps] == list(range(1, 9)) and t["averaged_steps"] == [3, 8]
    assert t["ms_per_step"] == pytest.approx((steps[-1][1] - steps[2][1]) / 5)
    assert t["tokens_per_step"] == 1024 and t["tokens_per_s_per_gpu"] == pytest.approx(1024 / t["ms_per_step"] * 1000)
    assert t["late_qat_from_step"] == 5  # 8 steps, warm-down over 27: LR scale (8 - 4) / 27 < 0.15 at step 4

    e = st["evaluation"]
    logged = dict(re.findall(r"^(\S+(?: post_ema)?) val_loss:\S+ val_bpb:\S+.*? eval_time:(\d+)ms", log, re.M))
    assert e["ok"] and [x["name"] for x in e["evaluations"]] == [*gpu_check.EXPECTED_EVALS, "legal_ttt"]
    assert {x["name"]: x["ms"] for x in e["evaluations"]} == {k: int(v) for k, v in logged.items()}
    assert s["train_run"]["env"]["VAL_BATCH_SIZE"] == "65536" and s["train_run"]["returncode"] == 0

    text = out.with_suffix(".txt").read_text()
    assert f"{t['ms_per_step']:.1f} ms/step (steps 3..8)" in text
    assert all(f"[{name}] " in text for name in st)
    assert f"default call: {sd['default']['backend']}" in text
