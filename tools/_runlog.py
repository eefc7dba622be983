"""Reading the logs train_gpt.py writes, without torch: the figures a submission is built from.

A log is the full source of the script that ran, a row of '=', the versions (Python, PyTorch,
nvidia-smi), a row of '=', then the run's lines: configuration, training, export, evaluations.
Every line read here is in LOG_LINES, in the format train_gpt.py writes it: a parsed line is a
contract, so a change of format there is a change of this table. A log that stops before its
evaluations are done, or was interrupted, is refused: its figures are not a run's result.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "=" * 100
# Where the source ends: the row of '=' that opens the versions block.
SOURCE_END = "\n" + SEPARATOR + "\nRunning Python "

# Evaluation names (tools.submission's --score choices) and their lines' tags, in the order
# train_gpt.py runs them.
EVAL_TAGS = {
    "roundtrip": "final_int6_roundtrip",
    "sliding": "final_int6_sliding_window",
    "sliding_s64": "final_int6_sliding_window_s64",
    "slot": "final_slot",
    "slot_context": "final_slot_context",
    "legal_ttt": "legal_ttt",
}
_TAGS = "|".join(EVAL_TAGS.values())

LOG_LINES = {
    # step:N/M train_loss:… train_time:…ms step_avg:…ms
    # step:N/M val_loss:… val_bpb:… train_time:…ms step_avg:…ms
    "step": re.compile(r"^step:(?P<step>\d+)/(?P<iterations>\d+)\s+(?P<rest>.*)$"),
    "seed": re.compile(r"^seed:(?P<seed>\d+)\s*$"),
    "stop": re.compile(r"^stopping_early:\s*(?P<reason>\S+)"),
    "code": re.compile(r"^Code size: (?P<bytes>\d+) bytes"),
    "model": re.compile(r"^Serialized model int6\+\w+: (?P<bytes>\d+) bytes"),
    "artifact": re.compile(
        r"^Total submission size int6\+(?P<compressor>\w+): (?P<bytes>\d+) bytes"
    ),
    # <tag> val_loss:%.4f val_bpb:%.4f [stride:… | steps:… lr:…] eval_time:…ms [mode:…]
    # <tag>_exact val_loss:%.8f val_bpb:%.8f
    "eval": re.compile(
        rf"^(?P<tag>{_TAGS})(?P<exact>_exact)? "
        r"val_loss:(?P<val_loss>\S+) val_bpb:(?P<val_bpb>\S+)(?P<rest>.*)$"
    ),
    # Ctrl-C / SIGTERM: "interrupted at step N/M", "interrupted during training|export|evaluation"
    "interrupted": re.compile(r"^interrupted (?:at step \d+/\d+|during \w+)\s*$"),
    "eval_only": re.compile(r"^eval_only artifact:"),
    "progress": re.compile(r"^eval_progress:(?P<label>\S+) "),
    "ttt_start": re.compile(r"^legal_ttt:start (?P<rest>.*)$"),
    "gptq": re.compile(r"^gptq:calibration batches:(?P<batches>\d+)"),
    "python": re.compile(r"^Running Python (?P<version>\S+)"),
    "pytorch": re.compile(r"^Running PyTorch (?P<version>\S+)"),
    "driver": re.compile(r"Driver Version: (?P<driver>\S+)\s+CUDA Version: (?P<cuda>\S+)"),
    # nvidia-smi device row: "|   0  NVIDIA H100 80GB HBM3   On  |   00000000:19:00.0 Off |"
    "gpu": re.compile(
        r"^\|\s+(?P<index>\d+)\s+(?P<name>\S.*?)\s+(?:On|Off)\s+\|\s+[0-9A-Fa-f]+:[0-9A-Fa-f:]+\.\d"
    ),
}

# The settings a log records (their defaults as in train_gpt.Hyperparameters, which
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
    "MTP_NUM_HEADS": "0",
    "MTP_LOSS_WEIGHT": "0.2",
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
# Config words read as they are: word key -> setting.
_CONFIG_SETTINGS = {
    "tokenizer_path": "TOKENIZER_PATH",
    "iterations": "ITERATIONS",
    "max_wallclock_seconds": "MAX_WALLCLOCK_SECONDS",
    "warmup_steps": "WARMUP_STEPS",
    "train_batch_tokens": "TRAIN_BATCH_TOKENS",
    "train_seq_len": "TRAIN_SEQ_LEN",
    "num_heads": "NUM_HEADS",
    "num_kv_heads": "NUM_KV_HEADS",
    "mtp_num_heads": "MTP_NUM_HEADS",
    "mtp_loss_weight": "MTP_LOSS_WEIGHT",
    "tie_embeddings": "TIE_EMBEDDINGS",
    "matrix_lr": "MATRIX_LR",
    "scalar_lr": "SCALAR_LR",
}
# legal_ttt:start words -> setting.
_TTT_SETTINGS = {
    "chunk_tokens": "TTT_CHUNK_TOKENS",
    "lr": "TTT_LR",
    "epochs": "TTT_EPOCHS",
    "freeze_blocks": "TTT_FREEZE_BLOCKS",
}


class LogError(Exception):
    """A log that cannot be a submission's: the message names the log and what is missing."""


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    line: str  # the log line the figures were read from
    eval_time_ms: float | None = None
    params: dict[str, str] = field(default_factory=dict)  # stride, steps, lr, mode...


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
    config: dict[str, str]  # key:value and key=value words of the configuration lines
    settings: dict[str, str]  # the settings the log records (DEFAULTS' keys), SEED included
    evals: dict[str, EvalResult]  # keyed by evaluation name (EVAL_TAGS)
    stop_reason: str | None = None

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
    """The key:value (or key=value) words of a log line; other words are skipped."""
    pairs = {}
    for word in text.split():
        key, colon, value = word.partition(":")
        if not colon or "=" in key:
            key, colon, value = word.partition("=")
        if colon:
            pairs[key] = value
    return pairs


def _figure(words: dict[str, str], key: str, where: str) -> float:
    try:
        value = float(words[key].removesuffix("ms"))
    except (KeyError, ValueError):
        raise ValueError(f"malformed '{where}' line: no number for {key}") from None
    if not math.isfinite(value):
        raise ValueError(f"'{where}' line: {key} is {words[key]}, not a finite number")
    return value


def split_log(text: str) -> tuple[str | None, list[str], list[str]]:
    """(source, versions block, body). The source is None when the log's head was removed (the
    original's published logs start at 'Running Python')."""
    end = text.find(SOURCE_END)
    if end > 0:
        source, rest = text[:end], text[end + 1 :]
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
    return source, lines[rows[0] + 1 : rows[1]], lines[rows[1] + 1 :]


def _matches(kind: str, lines: list[str]) -> list[re.Match]:
    return [m for m in map(LOG_LINES[kind].match, lines) if m]


def _last(kind: str, lines: list[str]) -> re.Match | None:
    found = _matches(kind, lines)
    return found[-1] if found else None


def _require(kind: str, lines: list[str], reason: str) -> re.Match:
    found = _last(kind, lines)
    if found is None:
        raise ValueError(reason)
    return found


def _gpus(env: list[str]) -> tuple[int, str]:
    names = {int(m["index"]): m["name"] for m in _matches("gpu", env)}
    if not names:
        return 0, "cpu"
    return len(names), ", ".join(sorted(set(names.values())))


def _versions(env: list[str]) -> dict[str, str]:
    versions = {}
    for kind in ("python", "pytorch"):
        if found := _last(kind, env):
            versions[kind] = found["version"]
    if driver := next((m for m in map(LOG_LINES["driver"].search, env) if m), None):
        versions.update(driver=driver["driver"], cuda=driver["cuda"])
    return versions


def _training(body: list[str]) -> tuple[int, int, float, float]:
    """(steps run, iterations, training ms, step average ms): the last step line's N/M and
    the last validation line's train_time and step_avg."""
    steps = [(m, _tokens(m["rest"])) for m in _matches("step", body)]
    if not steps:
        if _last("eval_only", body):
            raise ValueError("an EVAL_ONLY log (no training): a submission needs the training "
                             "run's log")
        raise ValueError("no 'step:N/M' line: training did not run or the log is cut")
    last = steps[-1][0]
    timed = [words for _, words in steps if "val_loss" in words] or [steps[-1][1]]
    train_ms, step_avg_ms = (_figure(timed[-1], key, "step") for key in ("train_time", "step_avg"))
    return int(last["step"]), int(last["iterations"]), train_ms, step_avg_ms


def _config(body: list[str]) -> dict[str, str]:
    """The words of the configuration lines: those before training starts."""
    config = {}
    for line in body:
        if line.startswith(("warmup_step:", "step:")):
            break
        config.update(_tokens(line))
    return config


def _eval_lines(body: list[str]) -> dict[str, list[dict[str, str]]]:
    """The key:value words of every evaluation line, by line name (tag or tag_exact), in log
    order."""
    lines: dict[str, list[dict[str, str]]] = {}
    for m in _matches("eval", body):
        words = {**_tokens(m["rest"]), "val_loss": m["val_loss"], "val_bpb": m["val_bpb"]}
        lines.setdefault(m["tag"] + (m["exact"] or ""), []).append(words)
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
    eval_time = _figure(summary, "eval_time", tag) if "eval_time" in summary else None
    params = {k: v for k, v in summary.items() if k not in ("val_loss", "val_bpb", "eval_time")}
    return EvalResult(
        val_loss=_figure(figures, "val_loss", exact),
        val_bpb=_figure(figures, "val_bpb", exact),
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
    started = [m["label"] for m in _matches("progress", body)]
    started += ["legal_ttt"] if _last("ttt_start", body) else []
    for label in started:
        # A SLOT pass of its own is labelled final_slot whichever modes it scores.
        if not any(name.startswith(label) and name.endswith("_exact") for name in lines):
            raise ValueError(f"{label} started but has no {label}_exact line: "
                             "the run did not finish its evaluations")


def _plain(value: str) -> str:
    """A logged value as a setting: True/False as 1/0, '600.000' as '600'."""
    if value in ("True", "False"):
        return str(int(value == "True"))
    if re.fullmatch(r"-?\d+\.\d+", value):
        return value.rstrip("0").rstrip(".")
    return value


def _config_settings(config: dict[str, str]) -> dict[str, str]:
    settings = {env: config[key] for key, env in _CONFIG_SETTINGS.items() if key in config}
    if "pattern" in config:  # val_loader:shards pattern=<DATA_PATH>/fineweb_val_*.bin
        settings["DATA_PATH"] = os.path.dirname(config["pattern"])
    if config.get("preset", "none") != "none":
        settings["PRESET"] = config["preset"]
    if config.get("XSA", "").startswith("last_"):
        settings["XSA_LAST_N"] = config["XSA"].removeprefix("last_")
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
    if start := _last("ttt_start", body):
        words = _tokens(start["rest"])
        settings["TTT_ENABLED"] = "1"
        settings.update({env: words[key] for key, env in _TTT_SETTINGS.items() if key in words})
    elif "legal_ttt" in evals:
        settings["TTT_ENABLED"] = "1"
    if gptq := _last("gptq", body):
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


def _parse(path: str, data: bytes) -> RunRecord:
    try:
        text = data.decode("utf-8")  # strictly: the source at its head must come back byte for byte
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start}): not a train_gpt.py log") from None
    source, env, body = split_log(text)
    if stopped := _last("interrupted", body):  # first: the most telling reason for what is missing
        line = stopped.group(0).strip()
        raise ValueError(f"the run was interrupted ('{line}'): not a finished run")
    seed = _require("seed", body, "no 'seed:S' line")
    steps, iterations, train_ms, step_avg_ms = _training(body)
    stop = _last("stop", body)
    if steps < iterations and stop is None:
        raise ValueError(f"training ends at step {steps}/{iterations} without a stopping_early "
                         "line: the log is cut")
    artifact = _require("artifact", body, "no 'Total submission size int6+...' line (artifact "
                        "size): the log stops before it")
    code = _require("code", body, "no 'Code size' line")
    lines = _eval_lines(body)
    _check_finished(body, lines)
    evals = {name: r for name in EVAL_TAGS if (r := _eval_result(lines, name))}
    model = _last("model", body)
    num_gpus, gpu_type = _gpus(env)
    config = _config(body)
    return RunRecord(
        path=path,
        data=data,
        source=source,
        seed=int(seed["seed"]),
        steps=steps,
        iterations=iterations,
        training_time_ms=train_ms,
        step_avg_ms=step_avg_ms,
        artifact_bytes=int(artifact["bytes"]),
        model_bytes=int(model["bytes"]) if model else None,
        code_bytes=int(code["bytes"]),
        compressor=artifact["compressor"],
        num_gpus=num_gpus,
        gpu_type=gpu_type,
        versions=_versions(env),
        config=config,
        settings=_settings(config, body, evals, artifact["compressor"], int(seed["seed"])),
        evals=evals,
        stop_reason=stop["reason"] if stop else None,
    )


def parse_log(path: str | os.PathLike) -> RunRecord:
    """Read one train_gpt.py log; LogError when it is unreadable, incomplete or interrupted."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LogError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return _parse(str(path), data)
    except ValueError as exc:
        raise LogError(f"{path}: {exc}") from None
