"""Reading the logs train_gpt.py writes: the one place every line a tool parses is defined.
Pure text: no torch, no train_gpt import.

LINES is the contract: each line of train_gpt.py's log that a tool reads, with the train_gpt.py
function that writes it and the pattern that reads it; a change of format there is a change of
this table (tests/test_submission.py checks that every writer exists and prints its line's
literal start; tests/test_gpu_check.py reads real logs of its dry run through every pattern).
Two readers use it:

- the figures a submission is built from (parse_log -> RunRecord, for tools.submission): a log is
  the full source of the script that ran, a row of '=', the versions (Python, PyTorch,
  nvidia-smi), a row of '=', then the run's lines. A log that stops before its evaluations are
  done, was interrupted, stopped with an error or breaks a line's format is refused;
- the console output of a running script (bench_train, gpu_check): step times, evaluation times,
  progress and timing lines, with the glog-style lines torch prints under TORCH_LOGS (dynamo's
  compilations, each tagged with its compile id `[frame/n]` and a wall-clock time) and, in a log
  captured by gpu_check, an arrival-time prefix on every line.
"""

from __future__ import annotations

import datetime
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "data" / "datasets" / "demo_sp1024"
DEMO_TOKENIZER = ROOT / "data" / "tokenizers" / "demo_1024_bpe.model"

# The record on 8xH100 (published): 786,432 tokens per step, one micro-step of 48 rows per GPU.
ORIGINAL_MS_PER_STEP = 91.25
ORIGINAL_PEAK_MIB = 22524
RECORD_VAL_TARGETS = 62_021_632  # targets in the record's validation split
RECORD_EVAL_S = {"final_int6_sliding_window": 54.5, "final_slot": 408.7}  # eval_time on 8xH100


# ---------------------------------------------------------------- the line formats

@dataclass(frozen=True)
class Format:
    """One kind of log line: who writes it and the pattern that reads it (named groups)."""
    writer: str  # train_gpt.<function>, or the program that prints it
    pattern: re.Pattern

    @property
    def prefix(self) -> str:
        """The literal text every such line starts with ('' when it starts with a field)."""
        text, out, i = self.pattern.pattern, [], 1
        if not text.startswith("^"):
            return ""
        while i < len(text):
            ch = text[i]
            if ch == "\\" and i + 1 < len(text) and not text[i + 1].isalnum():
                ch, step = text[i + 1], 2
            elif ch in "()[]{}.*+?|$^\\":
                break
            else:
                step = 1
            if text[i + step:i + step + 1] in ("*", "+", "?", "{"):  # a repeated character
                break
            out.append(ch)
            i += step
        return "".join(out)


def _f(writer: str, pattern: str) -> Format:
    # re.M: a pattern reads one line, or every line of a whole log at once (finditer); none of
    # them can match a newline, so both give the same matches.
    return Format(writer, re.compile(pattern, re.M))


LINES: dict[str, Format] = {
    # The versions block.
    "python": _f("train_gpt.log_header", r"^Running Python (?P<version>\S+)"),
    "pytorch": _f("train_gpt.log_header", r"^Running PyTorch (?P<version>\S+)"),
    "driver": _f("nvidia-smi (in train_gpt.log_header)",
                 r"Driver Version: (?P<driver>\S+) +CUDA Version: (?P<cuda>\S+)"),
    # nvidia-smi device row: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |"
    "gpu": _f("nvidia-smi (in train_gpt.log_header)",
              r"^\| +(?P<index>\d+) +(?P<name>\S.*?) +(?:On|Off) +\| +"
              r"[0-9A-Fa-f]+:[0-9A-Fa-f:]+\.\d"),
    # The configuration, before training.
    "tokenizer": _f("train_gpt.log_config", r"^val_bpb:enabled tokenizer_kind=(?P<tokenizer_kind>"
                    r"\S+) tokenizer_path=(?P<tokenizer_path>.+)$"),
    "train_loader": _f("train_gpt.log_config", r"^train_loader:dataset:(?P<dataset>.+) "
                       r"train_shards:(?P<train_shards>\d+)$"),
    "val_loader": _f("train_gpt.log_config", r"^val_loader:shards pattern=(?P<val_pattern>.+) "
                     r"tokens:(?P<val_tokens>\d+)$"),
    "model_params": _f("train_gpt.log_config", r"^model_params:(?P<model_params>\d+)$"),
    "param_groups": _f("train_gpt.role_summary",
                       r"^param_groups \(tensors/params\)(?P<counts>(?: \w+:\d+/\d+)+)$"),
    "param_formats": _f("train_gpt.role_summary",
                        r"^param_formats \(tensors/params\)(?P<counts>(?: \w+:\d+/\d+)+)$"),
    "mtp": _f("train_gpt.log_config", r"^mtp_num_heads:(?P<mtp_num_heads>\d+) mtp_loss_weight:"
              r"(?P<mtp_loss_weight>\S+) mtp_params:(?P<mtp_params>\d+)$"),
    "xsa": _f("train_gpt.log_config",
              r"^XSA:last_(?P<xsa_last_n>\d+) active_layers:\[(?P<xsa_layers>[\d, ]*)\]$"),
    "world": _f("train_gpt.log_config",
                r"^world_size:(?P<world_size>\d+) grad_accum_steps:(?P<grad_accum_steps>\d+)$"),
    "kernel": _f("train_gpt.log_config", r"^attention_kernel:(?P<attention_kernel>\S+) "
                 r"device:(?P<device>\S+) compile:(?P<compile>True|False)$"),
    "attention": _f("train_gpt.log_config", r"^attention_mode:(?P<attention_mode>gqa|mha) "
                    r"num_heads:(?P<num_heads>\d+) num_kv_heads:(?P<num_kv_heads>\d+)$"),
    "lrs": _f("train_gpt.log_config", r"^tie_embeddings:(?P<tie_embeddings>True|False) "
              r"embed_lr:(?P<embed_lr>\S+) head_lr:(?P<head_lr>\S+) "
              r"matrix_lr:(?P<matrix_lr>\S+) scalar_lr:(?P<scalar_lr>\S+)$"),
    "batch": _f("train_gpt.log_config", r"^train_batch_tokens:(?P<train_batch_tokens>\d+) "
                r"train_seq_len:(?P<train_seq_len>\d+) iterations:(?P<iterations>\d+) "
                r"warmup_steps:(?P<warmup_steps>\d+) "
                r"max_wallclock_seconds:(?P<max_wallclock_seconds>\S+)$"),
    "seed": _f("train_gpt.log_config", r"^seed:(?P<seed>\d+) *$"),
    "preset": _f("train_gpt.log_config",
                 r"^preset:(?P<preset>\S+) cpu_threads:(?P<cpu_threads>\d+)$"),
    # Anywhere: a misspelt setting (also load_data's short data, calibrate's GPTQ over the cap,
    # log_export's total over the limit); a failure after the log opened (the run's last line).
    "warning": _f("train_gpt.misspelt_settings", r"^WARNING: (?P<message>.*)$"),
    "error": _f("train_gpt.run", r"^error: (?P<message>.*)$"),
    "eval_only": _f("train_gpt.run", r"^eval_only artifact:(?P<artifact>.+) bytes:(?P<bytes>\d+)$"),
    "export_only": _f("train_gpt.trained_model",
                      r"^export_only weights:(?P<weights>.+) bytes:(?P<bytes>\d+)$"),
    # Training.
    "warmup": _f("train_gpt.Trainer.warm_up", r"^warmup_step:(?P<step>\d+)/(?P<steps>\d+)$"),
    "val_step": _f("train_gpt.train", r"^step:(?P<step>\d+)/(?P<iterations>\d+) val_loss:"
                   r"(?P<val_loss>\S+) val_bpb:(?P<val_bpb>\S+) train_time:(?P<train_time>\d+)ms "
                   r"step_avg:(?P<step_avg>\S+)ms$"),
    "train_step": _f("train_gpt.log_train_step", r"^step:(?P<step>\d+)/(?P<iterations>\d+) "
                     r"train_loss:(?P<train_loss>\S+) train_time:(?P<train_time>\d+)ms "
                     r"step_avg:(?P<step_avg>\S+)ms$"),
    "late_qat": _f("train_gpt.train",
                   r"^late_qat:enabled step:(?P<step>\d+) scale:(?P<scale>\S+)$"),
    "stop": _f("train_gpt.train", r"^stopping_early: (?P<reason>\S+) train_time:(?P<train_time>"
               r"\d+)ms step:(?P<step>\d+)/(?P<iterations>\d+)$"),
    "peak": _f("train_gpt.train", r"^peak memory allocated: (?P<allocated>\d+) MiB "
               r"reserved: (?P<reserved>\d+) MiB$"),
    "ema": _f("train_gpt.train", r"^ema:applying EMA weights$"),
    # Ctrl-C / SIGTERM (train and stage raise it, run logs it): the run's last line.
    "interrupted": _f("train_gpt.run", r"^interrupted (?:at step (?P<step>\d+)/(?P<iterations>"
                      r"\d+)|during (?P<stage>\w+))$"),
    # Export.
    "gptq": _f("train_gpt.calibrate", r"^gptq:calibration batches:(?P<batches>\d+) "
               r"inputs:(?P<inputs>\d+) time:(?P<ms>\d+)ms$"),
    "code": _f("train_gpt.log_export", r"^Code size: (?P<bytes>\d+) bytes$"),
    "model": _f("train_gpt.log_export",
                r"^Serialized model int6\+(?P<compressor>\w+): (?P<bytes>\d+) bytes$"),
    "artifact": _f("train_gpt.log_export",
                   r"^Total submission size int6\+(?P<compressor>\w+): (?P<bytes>\d+) bytes$"),
    # Evaluation. <name> val_loss:%.4f val_bpb:%.4f[ stride:S | steps:N lr:X] eval_time:Nms
    # [ mode:M] (also make_artifact's `DIAGNOSTIC post_ema`), then <name>_exact with 8 decimals
    # (evaluate repeats each sliding result on a final_int6_roundtrip_exact line).
    "result": _f("train_gpt.log_result", r"^(?P<name>\S.*?) val_loss:(?P<val_loss>\S+) "
                 r"val_bpb:(?P<val_bpb>\S+)(?P<extra>.*?) eval_time:(?P<ms>\d+)ms(?P<suffix>.*)$"),
    "exact": _f("train_gpt.log_result", r"^(?P<name>\S+)_exact val_loss:(?P<val_loss>\S+) "
                r"val_bpb:(?P<val_bpb>\S+)(?P<rest>.*)$"),
    "progress": _f("train_gpt.score_windows", r"^eval_progress:(?P<label>\S+) (?P<percent>[\d.]+)"
                   r"% elapsed:(?P<elapsed>\d+)s eta:(?P<eta>-?\d+)s$"),
    # After each sliding or SLOT result: this rank's batches, the first one's seconds
    # (compilation included) and the mean of the others (nan with one batch).
    "timing": _f("train_gpt.log_timing", r"^eval_timing:(?P<name>\S+) batches:(?P<batches>\d+) "
                 r"first_batch:(?P<first>[\d.]+)s steady_batch:(?P<steady>\S+?)s$"),
    "ttt_start": _f("train_gpt.eval_ttt", r"^legal_ttt:start chunks:(?P<chunks>\d+) windows:"
                    r"(?P<windows>\d+) chunk_tokens:(?P<chunk_tokens>\d+) stride:(?P<stride>\d+) "
                    r"lr:(?P<lr>\S+) epochs:(?P<epochs>\d+) freeze_blocks:(?P<freeze_blocks>\d+) "
                    r"trained_params:(?P<trained_params>\d+)$"),
    "ttt_chunk": _f("train_gpt.eval_ttt", r"^legal_ttt:chunk (?P<chunk>\d+)/(?P<chunks>\d+) "
                    r"bpb:(?P<bpb>\S+) elapsed:(?P<elapsed>[\d.]+)s eta:(?P<eta>\S+)s$"),
    # The closing summary, one line per evaluation, with its kind (train_gpt.SCORE_KINDS).
    "score": _f("train_gpt.log_scores", r"^score:(?P<name>\S+) val_bpb:(?P<val_bpb>\S+) "
                r"kind:(?P<kind>accepted|causal_not_accepted|not_causal)$"),
    # gpu_check's child processes (tools._gpu_probes) report themselves in these.
    "memory": _f("tools._gpu_probes.memory_line", r"^gpu_check:memory rss_peak_mib:(?P<rss>\d+) "
                 r"cuda_allocated_peak_mib:(?P<allocated>-?\d+) "
                 r"cuda_reserved_peak_mib:(?P<reserved>-?\d+)$"),
    "part": _f("tools._gpu_probes.emit", r"^gpu_check:part (?P<json>.*)$"),
}
# What tools._gpu_probes.memory_line writes (-1: no CUDA); emit writes PART_PREFIX + JSON.
MEMORY_LINE = ("gpu_check:memory rss_peak_mib:{rss} cuda_allocated_peak_mib:{allocated} "
               "cuda_reserved_peak_mib:{reserved}")
PART_PREFIX = LINES["part"].prefix

# Evaluation names (tools.submission's --score choices) and their lines' names, in the order
# train_gpt.py runs them.
EVAL_TAGS = {
    "roundtrip": "final_int6_roundtrip",
    "sliding": "final_int6_sliding_window",
    "sliding_s64": "final_int6_sliding_window_s64",
    "slot": "final_slot",
    "slot_context": "final_slot_context",
    "legal_ttt": "legal_ttt",
}
POST_EMA = "DIAGNOSTIC post_ema"  # make_artifact's check before export: not a score
SCORE_KINDS = ("accepted", "causal_not_accepted", "not_causal")  # the score: lines' kind words
CONFIG_LINES = ("tokenizer", "train_loader", "val_loader", "model_params", "mtp", "xsa", "world",
                "kernel", "attention", "lrs", "batch", "seed", "preset")


def _prefixed() -> dict[str, tuple[str, ...]]:
    """Literal line starts -> the formats a line starting so must match. The evaluation lines
    start with their names."""
    out: dict[str, tuple[str, ...]] = {}
    for kind, fmt in LINES.items():
        if fmt.writer.startswith("train_gpt.") and fmt.prefix:
            out[fmt.prefix] = out.get(fmt.prefix, ()) + (kind,)
    for tag in EVAL_TAGS.values():
        out[f"{tag} val_loss:"] = ("result",)
        out[f"{tag}_exact "] = ("exact",)
    return out


PREFIXED = _prefixed()


# ---------------------------------------------------------------- finding lines

Log = str | list[str]


def match(kind: str, line: str) -> re.Match | None:
    """The line read as a `kind` line (LINES), or None."""
    return LINES[kind].pattern.search(line)


def find(kind: str, log: Log) -> list[re.Match]:
    """Every `kind` line of a log (a whole text, or its lines), in order."""
    pattern = LINES[kind].pattern
    if isinstance(log, str):
        return list(pattern.finditer(log))
    return [m for m in map(pattern.search, log) if m]


def first(kind: str, log: Log) -> re.Match | None:
    if isinstance(log, str):
        return LINES[kind].pattern.search(log)
    return next((m for m in map(LINES[kind].pattern.search, log) if m), None)


def last(kind: str, log: Log) -> re.Match | None:
    found = find(kind, log)
    return found[-1] if found else None


def malformed(lines: list[str]) -> str | None:
    """The first line that starts as one of train_gpt.py's lines but breaks that format, with
    the format it breaks and its writer; None when every such line keeps its format."""
    starts = tuple(PREFIXED)
    for number, line in enumerate(lines, 1):
        if not line.startswith(starts):
            continue
        kinds = [k for prefix, ks in PREFIXED.items() if line.startswith(prefix) for k in ks]
        if not any(match(kind, line) for kind in kinds):
            writers = sorted({LINES[k].writer for k in kinds})
            return (f"line {number} of the run's lines, '{line[:120]}', is not in the format "
                    f"{' / '.join(writers)} writes (tools/runlog.py LINES: {', '.join(kinds)})")
    return None


def config(log: Log) -> dict[str, str]:
    """The fields of the configuration lines (CONFIG_LINES), by their group names: those before
    training starts."""
    lines = log.splitlines() if isinstance(log, str) else log
    out: dict[str, str] = {}
    training = (LINES["warmup"].prefix, LINES["train_step"].prefix)
    for line in lines:
        if line.startswith(training):
            break
        for kind in CONFIG_LINES:
            if m := match(kind, line):
                out.update({k: v for k, v in m.groupdict().items() if v is not None})
                break
    return out


def param_counts(m: re.Match) -> dict[str, tuple[int, int]]:
    """A param_groups / param_formats line: (tensors, parameters) by group or format."""
    pairs = (word.partition(":") for word in m["counts"].split())
    return {key: tuple(int(x) for x in value.split("/")) for key, _, value in pairs}


def ensure_demo_data(data: Path) -> None:
    """The demo corpus is built offline in seconds by `python -m tools.data demo`."""
    if data == DEMO_DATA and not DEMO_DATA.exists():
        command = [sys.executable, "-m", "tools.data", "demo", "--root", str(ROOT)]
        subprocess.run(command, check=True, cwd=ROOT)


# ---------------------------------------------------------------- figures of a running script

def step_times(log: Log) -> list[tuple[int, float]]:
    """(step, cumulative train_time ms) of every logged training step."""
    return [(int(m["step"]), float(m["train_time"])) for m in find("train_step", log)]


def mean_step_ms(steps: list[tuple[int, float]], skip: int) -> tuple[float, int, int]:
    """Mean ms per step from the `skip`-th logged step to the last (the first steps include
    compilation for new shapes): (ms, first step, last step)."""
    if len(steps) < 2:
        raise ValueError(f"{len(steps)} training step line(s) in the log; expected at least 2")
    skip = min(skip, len(steps) - 2)
    (s0, t0), (s1, t1) = steps[skip], steps[-1]
    return (t1 - t0) / (s1 - s0), s0, s1


def eval_times(log: Log) -> list[dict]:
    """Every evaluation line with an eval_time, in log order: name, ms, val_loss, val_bpb and the
    rest of the line (stride, steps, mode)."""
    return [dict(name=m["name"], ms=int(m["ms"]), val_loss=float(m["val_loss"]),
                 val_bpb=float(m["val_bpb"]), detail=(m["extra"] + m["suffix"]).strip())
            for m in find("result", log)]


def train_losses(log: Log) -> list[tuple[int, float]]:
    """(step, train_loss) of every logged step; nan and inf parse as such."""
    return [(int(m["step"]), float(m["train_loss"])) for m in find("train_step", log)]


def val_losses(log: Log) -> list[tuple[int, float, float]]:
    """(step, val_loss, val_bpb) of every in-loop validation line."""
    return [(int(m["step"]), float(m["val_loss"]), float(m["val_bpb"]))
            for m in find("val_step", log)]


def ttt_chunk_lines(log: Log) -> list[tuple[int, int, float]]:
    """(chunk, chunks, elapsed seconds) of every legal_ttt:chunk line."""
    return [(int(m["chunk"]), int(m["chunks"]), float(m["elapsed"]))
            for m in find("ttt_chunk", log)]


def progress_lines(log: Log, label: str) -> list[tuple[float, float]]:
    """(fraction done, elapsed seconds) of the eval_progress lines of one pass."""
    return [(float(m["percent"]) / 100, float(m["elapsed"])) for m in find("progress", log)
            if m["label"] == label]


def eval_timing(log: Log) -> dict[str, dict]:
    """The eval_timing lines by evaluation name."""
    return {m["name"]: dict(batches=int(m["batches"]), first_batch_s=float(m["first"]),
                            steady_batch_s=float(m["steady"])) for m in find("timing", log)}


def memory_peaks(log: Log) -> dict | None:
    """The last gpu_check:memory line: peak resident memory and CUDA peaks (None off CUDA)."""
    m = last("memory", log)
    if m is None:
        return None
    rss, alloc, reserved = (int(m[k]) for k in ("rss", "allocated", "reserved"))
    return dict(rss_peak_mib=rss, cuda_allocated_peak_mib=alloc if alloc >= 0 else None,
                cuda_reserved_peak_mib=reserved if reserved >= 0 else None)


def is_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- a run's record (submissions)

# The settings a log records (their defaults as in train_gpt.Config's sections, which
# tests/test_submission.py checks), in the order a reproduction command lists them.
DEFAULTS = {
    "PRESET": "",
    "DATA_PATH": "./data/datasets/fineweb10B_sp1024",
    "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model",
    "CPU_THREADS": "1",
    "COMPILE": "auto",
    "ITERATIONS": "20000",
    "MAX_WALLCLOCK_SECONDS": "600",
    "WARMUP_STEPS": "20",
    "TRAIN_BATCH_TOKENS": "786432",
    "TRAIN_SEQ_LEN": "2048",
    "NUM_HEADS": "8",
    "NUM_KV_HEADS": "4",
    "XSA_LAST_N": "11",
    "TIE_EMBEDDINGS": "1",
    "TIED_EMBED_LR": "0.035",
    "EMBED_LR": "0.6",
    "HEAD_LR": "0.008",
    "MATRIX_LR": "0.025",
    "SCALAR_LR": "0.025",
    "COMPRESSOR": "lzma",
    "GPTQ_ENABLED": "0",
    "GPTQ_CALIBRATION_BATCHES": "64",
    "EVAL_STRIDE": "96",
    "SLOT_ENABLED": "1",
    "SLOT_MODE": "scored",
    "SLOT_STEPS": "48",
    "SLOT_LR": "0.012",
    "TTT_ENABLED": "0",
    "TTT_LR": "0.002",
    "TTT_EPOCHS": "3",
    "TTT_CHUNK_TOKENS": "32768",
    "TTT_FREEZE_BLOCKS": "0",
}
# Settings the original had and train_gpt.py removed (train_gpt.REMOVED_SETTINGS): its logs
# still record them (the mtp line), and a run that changed one is another configuration.
REMOVED_DEFAULTS = {"MTP_NUM_HEADS": "0", "MTP_LOSS_WEIGHT": "0.2"}
# Configuration fields (config()) read as they are: field -> setting.
_CONFIG_SETTINGS = {
    "tokenizer_path": "TOKENIZER_PATH",
    "iterations": "ITERATIONS",
    "max_wallclock_seconds": "MAX_WALLCLOCK_SECONDS",
    "warmup_steps": "WARMUP_STEPS",
    "train_batch_tokens": "TRAIN_BATCH_TOKENS",
    "train_seq_len": "TRAIN_SEQ_LEN",
    "num_heads": "NUM_HEADS",
    "num_kv_heads": "NUM_KV_HEADS",
    "xsa_last_n": "XSA_LAST_N",
    "mtp_num_heads": "MTP_NUM_HEADS",
    "mtp_loss_weight": "MTP_LOSS_WEIGHT",
    "tie_embeddings": "TIE_EMBEDDINGS",
    "matrix_lr": "MATRIX_LR",
    "scalar_lr": "SCALAR_LR",
}
# legal_ttt:start fields -> setting.
_TTT_SETTINGS = {
    "chunk_tokens": "TTT_CHUNK_TOKENS",
    "lr": "TTT_LR",
    "epochs": "TTT_EPOCHS",
    "freeze_blocks": "TTT_FREEZE_BLOCKS",
}
SEPARATOR = "=" * 100
# Where the source ends: the row of '=' that opens the versions block.
SOURCE_END = "\n" + SEPARATOR + "\nRunning Python "


class LogError(Exception):
    """A log that cannot be a submission's: the message names the log and what is missing."""


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    line: str  # the log line the figures were read from
    eval_time_ms: float | None = None
    params: dict[str, str] = field(default_factory=dict)  # stride, steps, lr, mode...
    kind: str | None = None  # its score: line's kind (SCORE_KINDS); None in a log without them


@dataclass
class RunRecord:
    path: str
    data: bytes  # the log's bytes, as read
    source: str | None  # the full source at the log's head; None when it was removed
    seed: int
    steps: int  # steps actually run: the last step line's N
    iterations: int
    training_time_ms: float
    step_avg_ms: float  # on the line training_time_ms was read from
    artifact_bytes: int
    model_bytes: int | None
    code_bytes: int
    compressor: str
    num_gpus: int
    gpu_type: str
    versions: dict[str, str]  # python, pytorch and, with GPUs, driver and cuda
    config: dict[str, str]  # the configuration lines' fields (config())
    settings: dict[str, str]  # the settings the log records (DEFAULTS' keys), SEED included
    evals: dict[str, EvalResult]  # keyed by evaluation name (EVAL_TAGS)
    stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)  # the run's WARNING lines, as logged

    @property
    def training_time_seconds(self) -> float:
        return self.training_time_ms / 1000.0

    @property
    def eval_time_seconds(self) -> float:
        """All the run's evaluations together, as their lines report them."""
        return sum(e.eval_time_ms or 0.0 for e in self.evals.values()) / 1000.0

    @property
    def hardware(self) -> str:
        return f"{self.num_gpus}x {self.gpu_type}" if self.num_gpus else self.gpu_type


def _tokens(text: str) -> dict[str, str]:
    """The key:value words of a line's free part (stride, steps, lr, mode); others skipped."""
    pairs = {}
    for word in text.split():
        key, colon, value = word.partition(":")
        if colon:
            pairs[key] = value
    return pairs


def _number(text: str, key: str, where: str) -> float:
    try:
        value = float(text.removesuffix("ms"))
    except ValueError:
        raise ValueError(f"malformed '{where}' line: no number for {key}") from None
    if not math.isfinite(value):
        raise ValueError(f"'{where}' line: {key} is {text}, not a finite number")
    return value


def split_log(text: str) -> tuple[str | None, list[str], list[str]]:
    """(source, versions block, body). The source is None when the log's head was removed (the
    original's published logs start at 'Running Python')."""
    end = text.find(SOURCE_END)
    if end > 0:
        source, rest = text[:end], text[end + 1:]
    elif text.startswith(SEPARATOR + "\nRunning Python "):
        source, rest = None, text
    elif text.startswith("Running Python "):
        source, rest = None, SEPARATOR + "\n" + text
    else:
        raise ValueError("no 'Running Python' header after the source: not a train_gpt.py log")
    lines = rest.splitlines()
    rows = [i for i, line in enumerate(lines) if line.rstrip() == SEPARATOR][:2]
    if len(rows) < 2:
        raise ValueError("the versions block has no closing row of '=': the log is cut")
    return source, lines[rows[0] + 1:rows[1]], lines[rows[1] + 1:]


def _require(kind: str, lines: list[str], reason: str) -> re.Match:
    found = last(kind, lines)
    if found is None:
        raise ValueError(reason)
    return found


def _gpus(env: list[str]) -> tuple[int, str]:
    names = {int(m["index"]): m["name"] for m in find("gpu", env)}
    if not names:
        return 0, "cpu"
    return len(names), ", ".join(sorted(set(names.values())))


def _versions(env: list[str]) -> dict[str, str]:
    versions = {}
    for kind in ("python", "pytorch"):
        if found := last(kind, env):
            versions[kind] = found["version"]
    if driver := first("driver", env):
        versions.update(driver=driver["driver"], cuda=driver["cuda"])
    return versions


def _training(body: list[str]) -> tuple[int, int, float, float]:
    """(steps run, iterations, training ms, step average ms): the last step line's N/M and
    the last validation line's train_time and step_avg."""
    steps = [m for line in body if (m := match("train_step", line) or match("val_step", line))]
    if not steps:
        for kind, run in (("eval_only", "EVAL_ONLY"), ("export_only", "EXPORT_ONLY")):
            if last(kind, body):
                raise ValueError(f"an {run} log (no training): a submission needs the training "
                                 "run's log")
        raise ValueError("no 'step:N/M' line: training did not run or the log is cut")
    timed = [m for m in steps if m.re is LINES["val_step"].pattern] or [steps[-1]]
    train_ms = _number(timed[-1]["train_time"], "train_time", "step")
    step_avg_ms = _number(timed[-1]["step_avg"], "step_avg", "step")
    return int(steps[-1]["step"]), int(steps[-1]["iterations"]), train_ms, step_avg_ms


def _eval_lines(body: list[str]) -> dict[str, list[dict[str, str]]]:
    """The fields of every evaluation line, by line name (name or name_exact), in log order."""
    tags = set(EVAL_TAGS.values())
    lines: dict[str, list[dict[str, str]]] = {}
    for line in body:
        if (m := match("exact", line)) and m["name"] in tags:
            words = {**_tokens(m["rest"]), "val_loss": m["val_loss"], "val_bpb": m["val_bpb"]}
            lines.setdefault(m["name"] + "_exact", []).append(words)
        elif (m := match("result", line)) and m["name"] in tags:
            words = {**_tokens(m["extra"] + m["suffix"]), "val_loss": m["val_loss"],
                     "val_bpb": m["val_bpb"], "eval_time": m["ms"]}
            lines.setdefault(m["name"], []).append(words)
    return lines


def _eval_result(lines: dict[str, list[dict[str, str]]], name: str) -> EvalResult | None:
    # The original repeats final_int6_roundtrip_exact after each sliding result, carrying that
    # result: the round trip's own line is the first.
    tag = EVAL_TAGS[name]
    pick = 0 if name == "roundtrip" else -1
    exact = tag + "_exact"
    if exact not in lines:
        return None
    figures = lines[exact][pick]
    summary = lines[tag][pick] if tag in lines else {}
    eval_time = _number(summary["eval_time"], "eval_time", tag) if "eval_time" in summary else None
    params = {k: v for k, v in summary.items() if k not in ("val_loss", "val_bpb", "eval_time")}
    return EvalResult(
        val_loss=_number(figures["val_loss"], "val_loss", exact),
        val_bpb=_number(figures["val_bpb"], "val_bpb", exact),
        line=exact,
        eval_time_ms=eval_time,
        params=params,
    )


def _check_finished(body: list[str], lines: dict[str, list]) -> None:
    """Refuse a run whose evaluations did not all finish (killed without its `interrupted` line):
    whatever ran before the stop is not the run's result."""
    if "final_int6_roundtrip_exact" not in lines:
        raise ValueError("no final_int6_roundtrip_exact line: the log stops before its evaluations")
    for tag in EVAL_TAGS.values():
        if tag in lines and tag + "_exact" not in lines:
            raise ValueError(f"'{tag}' has no {tag}_exact line: the log is cut in its evaluations")
    started = [m["label"] for m in find("progress", body)]
    started += ["legal_ttt"] if last("ttt_start", body) else []
    for label in started:
        # A SLOT pass of its own is labelled final_slot whichever modes it scores.
        if not any(name.startswith(label) and name.endswith("_exact") for name in lines):
            raise ValueError(f"{label} started but has no {label}_exact line: "
                             "the run did not finish its evaluations")


def _score_kinds(body: list[str], evals: dict[str, EvalResult]) -> None:
    """The closing score: lines (logs of train_gpt.py before them have none): one per evaluation,
    each with the figure of its _exact line; their kinds go to the results."""
    scores = {m["name"]: m for m in find("score", body)}
    if not scores:
        return
    known = {tag: name for name, tag in EVAL_TAGS.items()}
    unknown = sorted(set(scores) - set(known))
    if unknown:
        raise ValueError(f"score:{unknown[0]} names an evaluation this reader does not know "
                         "(tools/runlog.py EVAL_TAGS)")
    evaluated = {EVAL_TAGS[name] for name in evals}
    if set(scores) != evaluated:
        raise ValueError(f"the score: lines name {', '.join(sorted(scores))} but the evaluations "
                         f"are {', '.join(sorted(evaluated))}: the log is cut in its closing "
                         "summary")
    for tag, m in scores.items():
        result = evals[known[tag]]
        if float(m["val_bpb"]) != result.val_bpb:
            raise ValueError(f"score:{tag} val_bpb:{m['val_bpb']} is not its {result.line} "
                             f"line's {result.val_bpb:.8f}: the log disagrees with itself")
        result.kind = m["kind"]


def _plain(value: str) -> str:
    """A logged value as a setting: True/False as 1/0, '600.000' as '600'."""
    if value in ("True", "False"):
        return str(int(value == "True"))
    if re.fullmatch(r"-?\d+\.\d+", value):
        return value.rstrip("0").rstrip(".")
    return value


def _config_settings(config: dict[str, str]) -> dict[str, str]:
    settings = {env: config[key] for key, env in _CONFIG_SETTINGS.items() if key in config}
    if "val_pattern" in config:  # val_loader:shards pattern=<DATA_PATH>/fineweb_val_*.bin
        settings["DATA_PATH"] = os.path.dirname(config["val_pattern"])
    if config.get("preset", "none") != "none":
        settings["PRESET"] = config["preset"]
    # embed_lr is the tied table's lr when tied; head_lr is logged as 0.0 then.
    tied = config.get("tie_embeddings", "True") == "True"
    if "embed_lr" in config:
        settings["TIED_EMBED_LR" if tied else "EMBED_LR"] = config["embed_lr"]
    if "head_lr" in config and not tied:
        settings["HEAD_LR"] = config["head_lr"]
    if config.get("cpu_threads", "0") != "0":  # 0: a CUDA run, which ignores the setting
        settings["CPU_THREADS"] = config["cpu_threads"]
    if "compile" in config:  # the default compiles on CUDA only
        default = config.get("device") == "cuda"
        if (config["compile"] == "True") != default:
            settings["COMPILE"] = str(int(config["compile"] == "True"))
    return settings


def _eval_settings(body: list[str], evals: dict[str, EvalResult]) -> dict[str, str]:
    # No sliding-window line: EVAL_STRIDE was 0 (or at least EVAL_SEQ_LEN, which means the same).
    stride = evals["sliding"].params.get("stride", "") if "sliding" in evals else "0"
    settings = {"EVAL_STRIDE": stride}
    modes = [mode for mode, name in (("scored", "slot"), ("context", "slot_context"))
             if name in evals]
    if not modes:
        settings["SLOT_ENABLED"] = "0"
    else:
        settings["SLOT_MODE"] = "both" if len(modes) == 2 else modes[0]
        slot = evals["slot" if "slot" in evals else "slot_context"].params
        pairs = (("steps", "SLOT_STEPS"), ("lr", "SLOT_LR"))
        settings.update({env: slot[key] for key, env in pairs if key in slot})
    if start := last("ttt_start", body):
        settings["TTT_ENABLED"] = "1"
        settings.update({env: start[key] for key, env in _TTT_SETTINGS.items()})
    elif "legal_ttt" in evals:
        settings["TTT_ENABLED"] = "1"
    if gptq := last("gptq", body):
        settings.update(GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES=gptq["batches"])
    return settings


def _settings(config: dict[str, str], body: list[str], evals: dict[str, EvalResult],
              compressor: str, seed: int) -> dict[str, str]:
    settings = {**_config_settings(config), **_eval_settings(body, evals), "COMPRESSOR": compressor}
    return {"SEED": str(seed), **{key: _plain(value) for key, value in settings.items()}}


def same_value(a: str, b: str) -> bool:
    """Two settings' values mean the same: equal text, or equal numbers ('0.5' and '0.50')."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def _check_complete(body: list[str]) -> None:
    """The refusals that come first: the most telling reason for what is missing."""
    if stopped := last("interrupted", body):
        raise ValueError(f"the run was interrupted ('{stopped.group(0).strip()}'): not a "
                         "finished run")
    if failed := last("error", body):
        raise ValueError(f"the run stopped with an error ('{failed.group(0)[:200]}'): not a "
                         "finished run")
    if problem := malformed(body):
        raise ValueError(problem)


def _parse(path: str, data: bytes) -> RunRecord:
    try:
        text = data.decode("utf-8")  # strictly: the source at its head must come back byte for byte
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}): not a train_gpt.py log") from None
    source, env, body = split_log(text)
    if body and not text.endswith("\n"):  # killed mid-line: the part written is not a line
        body = body[:-1]
    _check_complete(body)
    seed = int(_require("seed", body, "no 'seed:S' line")["seed"])
    steps, iterations, train_ms, step_avg_ms = _training(body)
    stop = last("stop", body)
    if steps < iterations and stop is None:
        raise ValueError(f"training ends at step {steps}/{iterations} without a stopping_early "
                         "line: the log is cut")
    artifact = _require("artifact", body, "no 'Total submission size int6+...' line (artifact "
                        "size): the log stops before it")
    code = _require("code", body, "no 'Code size' line")
    lines = _eval_lines(body)
    _check_finished(body, lines)
    evals = {name: r for name in EVAL_TAGS if (r := _eval_result(lines, name))}
    _score_kinds(body, evals)
    model = last("model", body)
    num_gpus, gpu_type = _gpus(env)
    run_config = config(body)
    return RunRecord(
        path=path, data=data, source=source, seed=seed, steps=steps, iterations=iterations,
        training_time_ms=train_ms, step_avg_ms=step_avg_ms,
        artifact_bytes=int(artifact["bytes"]), model_bytes=int(model["bytes"]) if model else None,
        code_bytes=int(code["bytes"]), compressor=artifact["compressor"],
        num_gpus=num_gpus, gpu_type=gpu_type, versions=_versions(env), config=run_config,
        settings=_settings(run_config, body, evals, artifact["compressor"], seed),
        evals=evals, stop_reason=stop["reason"] if stop else None,
        warnings=[m["message"] for m in find("warning", body)],
    )


def parse_log(path: str | os.PathLike) -> RunRecord:
    """Read one train_gpt.py log; LogError when it is unreadable, incomplete, interrupted or
    breaks a line's format."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _parse(str(path), data)
    except ValueError as exc:
        raise LogError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- captured logs

CAPTURED = re.compile(r"^ *(\d+\.\d+)\| ?(.*)$")  # written by capture_line


def capture_line(t: float, line: str) -> str:
    """A line as gpu_check stores it: seconds since the check started, then the line."""
    return f"{t:9.3f}| {line.rstrip(chr(10))}\n"


def read_captured(text: str) -> tuple[list[float], list[str]]:
    """Arrival times and lines of a captured log (a line without a prefix takes the last time)."""
    times, lines, t = [], [], 0.0
    for raw in text.splitlines():
        m = CAPTURED.match(raw)
        if m:
            t, raw = float(m[1]), m[2]
        times.append(t)
        lines.append(raw)
    return times, lines


# ---------------------------------------------------------------- dynamo's compilations

# torch's own lines under TORCH_LOGS (glog format), not train_gpt.py's.
GLOG_LINE = re.compile(r"^(?:\[rank\d+\]:)?[IWEVDC]\d{4} (\d\d):(\d\d):(\d\d\.\d+) +\d+ \S+:\d+\] ")
COMPILE_ID = re.compile(r"\] \[(\d+)/(\d+)(?:_\d+)?\] ")
START_TRACING = re.compile(r"torchdynamo start tracing (\S+) (\S+)")
RECOMPILING = re.compile(r"Recompiling function (\S+) in (\S+)")
GUARD_FAILURE = re.compile(r"\[__recompiles\]\s+- \d+/\d+: (.*)")
LIMIT_HIT = re.compile(r"hit config\.(?:recompile|cache_size)_limit|FailOnRecompileLimitHit")
FORWARD_DONE = "Step 2: done compiler function"
BACKWARD_START = "Step 3: torchinductor compiling BACKWARDS graph"
BACKWARD_DONE = "Step 3: torchinductor done compiling BACKWARDS graph"

# Phases of a training log; WARMUP is everything before the training timer starts.
WARMUP, TRAINING, VALIDATION, EVALUATION = "warmup", "training", "validation", "evaluation"
PHASES = (WARMUP, TRAINING, VALIDATION, EVALUATION)


def glog_seconds(lines: list[str]) -> list[float | None]:
    """Each glog line's wall-clock time in seconds (a day boundary adds 86,400), None elsewhere."""
    out, offset, prev = [], 0.0, None
    for line in lines:
        m = GLOG_LINE.match(line)
        if not m:
            out.append(None)
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) + offset
        if prev is not None and t < prev - 43200:
            offset += 86400
            t += 86400
        out.append(t)
        prev = t
    return out


def compile_seconds(entries: list[tuple[float, str]]) -> tuple[float, bool]:
    """(seconds, finished) of one compilation from its lines (time, text) in log order: the
    forward from its first line to dynamo's `done compiler function`, and each backward from
    inductor's `compiling BACKWARDS` to its `done` line. Inductor may compile a backward lazily,
    at the first backward call: the time between belongs to the program, not the compiler."""
    total, start, state = 0.0, entries[0][0], "forward"
    for t, text in entries:
        if state == "forward" and FORWARD_DONE in text:
            total, state = total + t - start, "idle"
        elif BACKWARD_START in text and state != "backward":
            if state == "forward":  # no done line before the backward: the forward ends here
                total += t - start
            start, state = t, "backward"
        elif state == "backward" and BACKWARD_DONE in text:
            total, state = total + t - start, "idle"
    if state != "idle":  # cut mid-compilation: count up to its last line
        total += entries[-1][0] - start
    return total, state == "idle"


def _warm_end(lines: list[str], own: list[int]) -> tuple[int, bool]:
    """The last line of the warm-up (the eval_only line, else the last warm-up line, else the
    seed line that ends the config; -1: none) and whether the log is an EVAL_ONLY run's."""
    eval_only = [i for i in own if match("eval_only", lines[i])]
    marks = eval_only or [i for i in own if match("warmup", lines[i])] or [
        i for i in own if match("seed", lines[i])]
    return (marks[-1] if marks else -1), bool(eval_only)


def line_phases(lines: list[str]) -> list[tuple[str, str | None]]:
    """(phase, evaluation name) of every line. Up to the last warm-up line (or the end of the
    config when there is no warm-up): warm-up. Then, until `ema:`, a line belongs to the
    training step or the validation whose log line closes it (TRAIN_LOG_EVERY=1 logs every
    step). After `ema:` (an EVAL_ONLY run: after its `eval_only` line), to the evaluation whose
    eval_time line closes it."""
    own = [i for i, line in enumerate(lines) if not GLOG_LINE.match(line)]
    warm_end, eval_only = _warm_end(lines, own)
    labels: list[tuple[str, str | None]] = [(WARMUP, None)] * (warm_end + 1)
    pending, region = 0, EVALUATION if eval_only else TRAINING
    for i in range(warm_end + 1, len(lines)):
        line = lines[i]
        glog = bool(GLOG_LINE.match(line))
        if region == TRAINING and not glog and match("ema", line):
            labels += [(TRAINING, None)] * (pending + 1)
            pending, region = 0, EVALUATION
            continue
        pending += 1
        if glog:
            continue
        if region == TRAINING and (match("train_step", line) or match("val_step", line)):
            labels += [(TRAINING if match("train_step", line) else VALIDATION, None)] * pending
            pending = 0
        elif region == EVALUATION:
            ev = match("result", line)
            if ev:
                labels += [(EVALUATION, ev["name"])] * pending
                pending = 0
    labels += [(region, None if region == TRAINING else "(unfinished)")] * pending
    return labels


def _compile_entries(lines: list[str]) -> tuple[dict, list[str]]:
    """Every compile id's first line index and (time, text) lines; and the recompile-limit hits."""
    times = glog_seconds(lines)
    found: dict[tuple[int, int], dict] = {}
    limit_hits = []
    for i, line in enumerate(lines):
        if LIMIT_HIT.search(line):
            limit_hits.append(line.strip()[-300:])
        m = COMPILE_ID.search(line) if times[i] is not None else None
        if m:
            entry = found.setdefault((int(m[1]), int(m[2])), dict(first=i, lines=[]))
            entry["lines"].append((times[i], line))
    return found, limit_hits


def parse_compiles(log: Log) -> dict:
    """Every dynamo compilation in the log (one per compile id [frame/n]; n > 0 is a
    recompilation of frame `frame`): its phase, function, the guard that failed and its seconds."""
    lines = log.splitlines() if isinstance(log, str) else log
    phases = line_phases(lines)
    found, limit_hits = _compile_entries(lines)
    ordered = []
    for (frame, n), entry in sorted(found.items(), key=lambda kv: kv[1]["first"]):
        phase, name = phases[entry["first"]]
        seconds, finished = compile_seconds(entry["lines"])
        c = dict(id=f"{frame}/{n}", function=None, location=None, phase=phase, evaluation=name,
                 recompile=n > 0, reason=None, seconds=round(seconds, 3), finished=finished)
        for _, text in entry["lines"]:
            fn = START_TRACING.search(text) or RECOMPILING.search(text)
            if fn and c["function"] is None:
                c["function"], c["location"] = fn[1], Path(fn[2]).name
            guard = GUARD_FAILURE.search(text)
            if guard and c["reason"] is None:
                c["reason"] = guard[1].split("  #")[0].strip()[:200]
        ordered.append(c)
    return dict(total=len(ordered), recompilations=sum(c["recompile"] for c in ordered),
                seconds=round(sum(c["seconds"] for c in ordered), 3),
                by_phase=_count_phases(ordered), by_evaluation=_count_evaluations(ordered),
                functions=_count_functions(ordered), compilations=ordered, limit_hits=limit_hits)


def _count_phases(ordered: list[dict]) -> dict:
    counts = {p: dict(compilations=0, recompilations=0, seconds=0.0) for p in PHASES}
    for c in ordered:
        _add(counts[c["phase"]], c)
    return counts


def _count_evaluations(ordered: list[dict]) -> dict:
    by_eval: dict[str, dict] = {}
    for c in ordered:
        if c["phase"] == EVALUATION:
            empty = dict(compilations=0, recompilations=0, seconds=0.0)
            _add(by_eval.setdefault(c["evaluation"], empty), c)
    return by_eval


def _count_functions(ordered: list[dict]) -> list[dict]:
    frames: dict[str, dict] = {}
    for c in ordered:
        frame = c["id"].split("/")[0]
        f = frames.setdefault(frame, dict(function=c["function"], location=c["location"],
                                          entries=0, seconds=0.0))
        f["entries"] += 1
        f["seconds"] = round(f["seconds"] + c["seconds"], 3)
        f["function"] = f["function"] or c["function"]
        f["location"] = f["location"] or c["location"]
    return list(frames.values())


def _add(count: dict, c: dict) -> None:
    count["compilations"] += 1
    count["recompilations"] += c["recompile"]
    count["seconds"] = round(count["seconds"] + c["seconds"], 3)


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
