"""Reading train_gpt.py logs: LINES defines once every line a tool parses, as the line itself with
its fields in braces, beside the function that writes it. Pure text: no torch, no train_gpt."""

from __future__ import annotations

import re
import string
from functools import partial
from typing import NamedTuple


class Format(NamedTuple):
    writer: str  # train_gpt.<function>, or the program that prints it
    prefix: str  # the literal start; '' when the line starts with a field
    pattern: re.Pattern  # named groups


# A field {name:type} of a template; untyped: one word; f: a finite number (no nan, no inf).
FIELD_TYPES = {"": r"\S+", "d": r"\d+", "n": r"-?\d+", "f": r"-?\d+(?:\.\d+)?", "*": r".*",
               "bool": "True|False", "kind": "accepted|causal_not_accepted|not_causal"}


def _f(writer: str, template: str, regex: str | None = None) -> Format:
    """Lines written as `template`, its {name:type} fields read as groups, or read by `regex`
    (`template` then only their literal start). re.M: a whole log reads as its lines."""
    if regex is None:
        regex = "^" + "".join(re.escape(text) + (f"(?P<{name}>{FIELD_TYPES[spec]})" if name else "")
                              for text, name, spec, _ in string.Formatter().parse(template)) + "$"
    return Format(writer, template.split("{")[0], re.compile(regex, re.M))


_CONFIG, _RESULT = "train_gpt.log_config", "train_gpt.log_result"
LINES: dict[str, Format] = {
    # The versions block; nvidia-smi's device row: "|   0  NVIDIA H100 80GB HBM3   On  |   00...".
    "python": _f("train_gpt.log_header", "Running Python {version}{rest:*}"),
    "pytorch": _f("train_gpt.log_header", "Running PyTorch {version}{rest:*}"),
    "driver": _f("nvidia-smi", "", r"Driver Version: (?P<driver>\S+) +CUDA Version: (?P<cuda>\S+)"),
    "gpu": _f("nvidia-smi", "", r"^\| +(?P<index>\d+) +(?P<name>\S.*?) +(?:On|Off) +\| +"
                r"[0-9A-Fa-f]+:[0-9A-Fa-f:]+\.\d"),
    # The configuration, before training.
    "tokenizer": _f(_CONFIG, "val_bpb:enabled tokenizer_kind={tokenizer_kind} "
                             "tokenizer_path={tokenizer_path:*}"),
    "train_loader": _f(_CONFIG, "train_loader:dataset:{dataset:*} train_shards:{train_shards:d}"),
    "val_loader": _f(_CONFIG, "val_loader:shards pattern={val_pattern:*} tokens:{val_tokens:d}"),
    "model_params": _f(_CONFIG, "model_params:{model_params:d}"),
    "param_groups": _f("train_gpt.role_summary", "param_groups (tensors/params){counts:*}"),
    "param_formats": _f("train_gpt.role_summary", "param_formats (tensors/params){counts:*}"),
    "mtp": _f(_CONFIG, "mtp_num_heads:{mtp_num_heads:d} mtp_loss_weight:{mtp_loss_weight} "
                       "mtp_params:{mtp_params:d}"),
    "xsa": _f(_CONFIG, "XSA:last_{xsa_last_n:d} active_layers:[{xsa_layers:*}]"),
    "world": _f(_CONFIG, "world_size:{world_size:d} grad_accum_steps:{grad_accum_steps:d}"),
    "kernel": _f(_CONFIG, "attention_kernel:{attention_kernel} device:{device} "
                          "compile:{compile:bool}"),
    "attention": _f(_CONFIG, "attention_mode:{attention_mode} num_heads:{num_heads:d} "
                             "num_kv_heads:{num_kv_heads:d}"),
    "lrs": _f(_CONFIG, "tie_embeddings:{tie_embeddings:bool} embed_lr:{embed_lr} head_lr:{head_lr} "
                       "matrix_lr:{matrix_lr} scalar_lr:{scalar_lr}"),
    "batch": _f(_CONFIG, "train_batch_tokens:{train_batch_tokens:d} train_seq_len:{train_seq_len:d}"
                         " iterations:{iterations:d} warmup_steps:{warmup_steps:d} "
                         "max_wallclock_seconds:{max_wallclock_seconds}"),
    "seed": _f(_CONFIG, "seed:{seed:d}"),
    "preset": _f(_CONFIG, "preset:{preset} cpu_threads:{cpu_threads:d}"),
    "settings": _f(_CONFIG, "settings:{json:*}"),
    # Anywhere: a misspelt setting, short data...; a failure after the log opened (its last line).
    "warning": _f("train_gpt.load_data", "WARNING: {message:*}"),
    "error": _f("train_gpt.run", "error: {message:*}"),
    "eval_only": _f("train_gpt.read_inputs", "eval_only artifact:{artifact:*} bytes:{bytes:d}"),
    "export_only": _f("train_gpt.trained_model", "export_only weights:{weights:*} bytes:{bytes:d}"),
    # Training.
    "warmup": _f("train_gpt.Trainer.warm_up", "warmup_step:{step:d}/{steps:d}"),
    "val_step": _f("train_gpt.train", "step:{step:d}/{iterations:d} val_loss:{val_loss} "
                                      "val_bpb:{val_bpb} train_time:{train_time:d}ms "
                                      "step_avg:{step_avg:f}ms"),
    "train_step": _f("train_gpt.log_train_step", "step:{step:d}/{iterations:d} train_loss:"
                     "{train_loss} train_time:{train_time:d}ms step_avg:{step_avg:f}ms"),
    "late_qat": _f("train_gpt.train", "late_qat:enabled step:{step:d} scale:{scale}"),
    "stop": _f("train_gpt.train", "stopping_early: {reason} train_time:{train_time:d}ms "
                                  "step:{step:d}/{iterations:d}"),
    "peak": _f("train_gpt.train", "peak memory allocated: {allocated:d} MiB reserved: "
                                  "{reserved:d} MiB"),
    "ema": _f("train_gpt.train", "ema:applying EMA weights"),
    # Ctrl-C / SIGTERM: the run's last line.
    "interrupted": _f("train_gpt.run", "interrupted ", r"^interrupted (?:at step (?P<step>\d+)/"
                      r"(?P<iterations>\d+)|during (?P<stage>\w+))$"),
    # Export.
    "gptq": _f("train_gpt.calibrate", "gptq:calibration batches:{batches:d} inputs:{inputs:d} "
                                      "time:{ms:d}ms"),
    "code": _f("train_gpt.log_export", "Code size: {bytes:d} bytes"),
    "model": _f("train_gpt.log_export", "Serialized model int6+{compressor}: {bytes:d} bytes"),
    "artifact": _f("train_gpt.log_export",
                   "Total submission size int6+{compressor}: {bytes:d} bytes"),
    # Evaluation (also make_artifact's `DIAGNOSTIC post_ema`), then <name>_exact with 8 decimals
    # (evaluate repeats each sliding result on a final_int6_roundtrip_exact line).
    "result": _f(_RESULT, "", r"^(?P<name>\S.*?) val_loss:(?P<val_loss>\S+) val_bpb:"
                 r"(?P<val_bpb>\S+)(?P<extra>.*?) eval_time:(?P<ms>\d+)ms(?P<suffix>.*)$"),
    "exact": _f(_RESULT, "{name}_exact val_loss:{val_loss:f} val_bpb:{val_bpb:f}{rest:*}"),
    "progress": _f("train_gpt.score_windows", "eval_progress:{label} {percent}% "
                                              "elapsed:{elapsed:d}s eta:{eta:n}s"),
    # After each sliding or SLOT result: the first batch's seconds and the others' mean.
    "timing": _f("train_gpt.log_timing", "eval_timing:{name} batches:{batches:d} "
                                         "first_batch:{first}s steady_batch:{steady}s"),
    "ttt_start": _f("train_gpt.eval_ttt", "legal_ttt:start chunks:{chunks:d} windows:{windows:d} "
                                          "chunk_tokens:{chunk_tokens:d} stride:{stride:d} "
                                          "lr:{lr} epochs:{epochs:d} freeze_blocks:"
                                          "{freeze_blocks:d} trained_params:{trained_params:d}"),
    "ttt_chunk": _f("train_gpt.eval_ttt", "legal_ttt:chunk {chunk:d}/{chunks:d} bpb:{bpb} "
                                          "elapsed:{elapsed}s eta:{eta}s"),
    # The closing summary, one line per evaluation, with its kind (train_gpt.SCORE_KINDS).
    "score": _f("train_gpt.log_scores", "score:{name} val_bpb:{val_bpb} kind:{kind:kind}"),
}

# Evaluation names (tools.submission's --score choices) and their lines' names, in run order.
EVAL_TAGS = {"roundtrip": "final_int6_roundtrip", "sliding": "final_int6_sliding_window",
             "sliding_s64": "final_int6_sliding_window_s64", "slot": "final_slot",
             "slot_context": "final_slot_context", "legal_ttt": "legal_ttt"}
SCORE_KINDS = FIELD_TYPES["kind"].split("|")  # the score: lines' kind words
CONFIG_LINES = [k for k, fmt in LINES.items() if fmt.writer == _CONFIG and k != "settings"]
# (literal line start, the format such a line must keep); evaluation lines start with their names.
PREFIXED = [(fmt.prefix, k) for k, fmt in LINES.items()
            if fmt.writer.startswith("train_gpt.") and fmt.prefix]
PREFIXED += [(tag + end, k) for tag in EVAL_TAGS.values()
             for end, k in ((" val_loss:", "result"), ("_exact ", "exact"))]

Log = str | list[str]


def match(kind: str, line: str) -> re.Match | None:
    """The line read as a `kind` line (LINES), or None."""
    return LINES[kind].pattern.search(line)


def find(kind: str, log: Log) -> list[re.Match]:
    """Every `kind` line of a log (a whole text, or its lines), in order."""
    return list(LINES[kind].pattern.finditer(log if isinstance(log, str) else "\n".join(log)))


def first(kind: str, log: Log) -> re.Match | None:
    return next(iter(find(kind, log)), None)


def last(kind: str, log: Log) -> re.Match | None:
    return next(reversed(find(kind, log)), None)


def malformed(lines: list[str]) -> str | None:
    """The first line that starts as one of train_gpt.py's lines (PREFIXED) but breaks that
    format, with the format and its writer; None when every such line keeps its format."""
    for number, line in enumerate(lines, 1):
        kinds = [k for prefix, k in PREFIXED if line.startswith(prefix)]
        if kinds and not any(match(kind, line) for kind in kinds):
            writers = " / ".join(sorted({LINES[k].writer for k in kinds}))
            return (f"line {number} of the run's lines, '{line[:120]}', is not in the format "
                    f"{writers} writes (tools/runlog.py LINES: {', '.join(kinds)})")
    return None


def config(log: Log) -> dict[str, str]:
    """The fields of the configuration lines (CONFIG_LINES) before training starts."""
    out: dict[str, str] = {}
    for line in log.splitlines() if isinstance(log, str) else log:
        if line.startswith((LINES["warmup"].prefix, LINES["train_step"].prefix)):
            break
        for m in filter(None, (match(kind, line) for kind in CONFIG_LINES)):
            out.update({k: v for k, v in m.groupdict().items() if v is not None})
    return out


def env_value(value) -> str:
    """A setting's value as its environment variable would spell it (True -> '1')."""
    return str(int(value)) if isinstance(value, bool) else str(value)


def _per_step(field: str, log: Log) -> list[tuple[int, float]]:
    """(step, `field`) of every logged training step."""
    return [(int(m["step"]), float(m[field])) for m in find("train_step", log)]


step_times = partial(_per_step, "train_time")  # (step, cumulative train_time ms)
train_losses = partial(_per_step, "train_loss")


def mean_step_ms(steps: list[tuple[int, float]], skip: int) -> tuple[float, int, int]:
    """Mean ms per step from the `skip`-th logged step to the last (the first steps include
    compilation for new shapes): (ms, first step, last step)."""
    if len(steps) < 2:
        raise ValueError(f"{len(steps)} training step line(s) in the log; expected at least 2")
    (s0, t0), (s1, t1) = steps[min(skip, len(steps) - 2)], steps[-1]
    return (t1 - t0) / (s1 - s0), s0, s1

