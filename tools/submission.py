"""A record folder, in the form of the challenge's records, from train_gpt.py run logs.

    python -m tools.submission LOG... --out records/track_10min_16mb/DATE_NAME [--script FILE]

Every figure comes from the logs; three kinds of score stay apart (SCORES). Anything but the
finished runs of one configuration is refused in one line, with nothing written."""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import sys
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import stats

from tools import _packed
from tools._files import write_atomic
from tools.runlog import EVAL_TAGS, LINES, config, env_value, find, first, last, malformed, match

ACCEPTED, CAUSAL_NOT_ACCEPTED, NOT_CAUSAL = "accepted", "causal, not accepted", "not causal"
KIND_WHY = {
    ACCEPTED: "the challenge accepts it: each target is scored from the artifact and the tokens "
              "before it, and test-time training only on tokens already scored (PR #549)",
    CAUSAL_NOT_ACCEPTED: "passes the flip test, but the legality of context-only SLOT was never "
                         "ruled on (openai/parameter-golf issue #1336) and no accepted record uses "
                         "SLOT",
    NOT_CAUSAL: "SLOT in its scored mode fits delta and bias to the very targets it then scores "
                "(it fails the flip test, docs/evaluation.md): not a compression result",
}
# The kind words of train_gpt.py's closing score: lines (its SCORE_KINDS), for each kind here.
LOG_KINDS = {kind: kind.replace(", ", "_").replace(" ", "_") for kind in KIND_WHY}


class Score(NamedTuple):
    label: str
    kind: str


# --score choices (the names of tools.runlog.EVAL_TAGS), in evaluation order.
SCORES = {"roundtrip": Score("round trip", ACCEPTED), "sliding": Score("sliding window", ACCEPTED),
          "sliding_s64": Score("sliding window", ACCEPTED),
          "slot": Score("SLOT scored", NOT_CAUSAL),
          "slot_context": Score("SLOT context", CAUSAL_NOT_ACCEPTED),
          "legal_ttt": Score("legal TTT", ACCEPTED)}
RECORD_TRACK = "10min_16mb"
TRAIN_S, TOTAL_BYTES, EVAL_S = 600.0, 16_000_000, 600.0  # the record track's limits, on 8xH100
WRITTEN_BY = "tools.submission"  # submission.json's mark on a folder this tool wrote
ROOT = Path(__file__).resolve().parent.parent
SEPARATOR = "=" * 100


class SubmissionError(Exception):
    """A refusal: the message names the log (when there is one) and the reason."""


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
    training_time_seconds: float
    step_avg_ms: float  # on the line the training time was read from
    eval_time_seconds: float  # all the run's evaluations together
    artifact_bytes: int
    model_bytes: int | None
    code_bytes: int
    compressor: str
    num_gpus: int
    gpu_type: str
    hardware: str  # "8x <gpu_type>", or "cpu"
    versions: dict[str, str]  # python, pytorch and, with GPUs, driver and cuda
    config: dict[str, str]  # the configuration lines' fields (config())
    settings: dict[str, str]  # setting -> value as its variable spells it; SEED included
    evals: dict[str, EvalResult]  # keyed by evaluation name (EVAL_TAGS)
    stop_reason: str | None = None
    warnings: list[str] = field(default_factory=list)  # the run's WARNING lines, as logged


def split_log(text: str) -> tuple[str | None, list[str], list[str]]:
    """(source, versions block, body); no source (None) in the original's published logs."""
    head = "\n" + SEPARATOR + "\nRunning Python "
    if text.startswith("Running Python "):
        text = SEPARATOR + "\n" + text
    source, found, rest = ("\n" + text).partition(head)
    if not found:
        raise ValueError("no 'Running Python' header after the source: not a train_gpt.py log")
    lines = rest.splitlines()
    if (end := next((i for i, line in enumerate(lines) if line.rstrip() == SEPARATOR), 0)) == 0:
        raise ValueError("the versions block has no closing row of '=': the log is cut")
    return source[1:] or None, ["Running Python " + lines[0], *lines[1:end]], lines[end + 1:]


def _check_body(text: str, source: str | None, body: list[str]) -> None:
    """The most telling refusal first; a last line without its newline must be whole."""
    if body and not text.endswith("\n"):
        m = match("score", body[-1]) or (match("exact", body[-1]) if source is None else None)
        if not (m and all(re.fullmatch(r"\d+\.\d{8}", m[k]) for k in ("val_bpb", "val_loss")
                          if k in m.groupdict())):
            raise ValueError(f"its last line, '{body[-1][:120]}', ends mid-line: the log was cut "
                             "while it was being written")
    for kind, what in (("interrupted", "was interrupted"), ("error", "stopped with an error")):
        if m := last(kind, body):
            raise ValueError(f"the run {what} ('{m.group(0).strip()[:200]}'): not a finished run")
    if problem := malformed(body):
        raise ValueError(problem)


def _training(body: list[str]) -> tuple[int, int, float, float]:
    """(steps run, iterations, training ms, step average ms), the last from a validation line."""
    steps = [m for line in body if (m := match("train_step", line) or match("val_step", line))]
    if not steps:
        if run := next((k for k in ("eval_only", "export_only") if last(k, body)), None):
            raise ValueError(f"an {run.upper()} log (no training): a submission needs the "
                             "training run's log")
        raise ValueError("no 'step:N/M' line: training did not run or the log is cut")
    timed = [m for m in steps if m.re is LINES["val_step"].pattern] or steps
    return (int(steps[-1]["step"]), int(steps[-1]["iterations"]), float(timed[-1]["train_time"]),
            float(timed[-1]["step_avg"]))


def _evals(body: list[str]) -> dict[str, EvalResult]:
    """Each evaluation's figures (_exact line), time and parameters (result line)."""
    exact, summary = defaultdict(list), defaultdict(list)
    for kind, found in (("exact", exact), ("result", summary)):
        for m in find(kind, body):
            found[m["name"]].append(m)
    if "final_int6_roundtrip" not in exact:
        raise ValueError("no final_int6_roundtrip_exact line: the log stops before its evaluations")
    evals = {}
    for name, tag in EVAL_TAGS.items():
        if tag in summary and tag not in exact:
            raise ValueError(f"'{tag}' has no {tag}_exact line: the log is cut in its evaluations")
        if tag in exact:
            pick = 0 if name == "roundtrip" else -1  # the original repeats it after sliding
            figures, line = exact[tag][pick], summary.get(tag, [None])[pick]
            evals[name] = EvalResult(
                float(figures["val_loss"]), float(figures["val_bpb"]), tag + "_exact",
                float(line["ms"]) if line else None,
                dict(w.split(":", 1) for w in (line["extra"] + line["suffix"]).split() if ":" in w)
                if line else {})
    started = [m["label"] for m in find("progress", body)] + ["legal_ttt"] * bool(
        last("ttt_start", body))
    for label in started:  # a SLOT pass of its own is labelled final_slot whichever modes it scores
        if not any(tag.startswith(label) and tag in exact for tag in EVAL_TAGS.values()):
            raise ValueError(f"{label} started but has no {label}_exact line: "
                             "the run did not finish its evaluations")
    return evals


def _score_kinds(body: list[str], evals: dict[str, EvalResult], summary_due: bool) -> None:
    """Each result's kind, from its closing score: line (which a settings: line makes due)."""
    scores = {m["name"]: m for m in find("score", body)}
    if not scores and not summary_due:
        return
    known = {tag: name for name, tag in EVAL_TAGS.items()}
    if unknown := sorted(set(scores) - set(known)):
        raise ValueError(f"score:{unknown[0]} names an evaluation this reader does not know "
                         "(tools/runlog.py EVAL_TAGS)")
    evaluated = sorted(EVAL_TAGS[name] for name in evals)
    if sorted(scores) != evaluated:
        raise ValueError(f"the score: lines name {', '.join(sorted(scores)) or 'nothing'} but the "
                         f"evaluations are {', '.join(evaluated)}: the log is cut in its closing "
                         "summary")
    for tag, m in scores.items():
        name, ours = known[tag], SCORES[known[tag]].kind
        if float(m["val_bpb"]) != evals[name].val_bpb:
            raise ValueError(f"score:{tag} val_bpb:{m['val_bpb']} is not its {evals[name].line} "
                             f"line's {evals[name].val_bpb:.8f}: the log disagrees with itself")
        if m["kind"] != LOG_KINDS[ours]:
            raise ValueError(f"its score:{tag} line says kind:{m['kind']}, but tools.submission "
                             f"counts '{name}' as {ours}: train_gpt.SCORE_KINDS and "
                             "tools.submission.SCORES disagree")
        evals[name].kind = m["kind"]


LEGACY_FIELDS = ("tokenizer_path", "iterations", "max_wallclock_seconds", "warmup_steps",
                 "train_batch_tokens", "train_seq_len", "num_heads", "num_kv_heads", "xsa_last_n",
                 "tie_embeddings", "matrix_lr", "scalar_lr")


def legacy_settings(cfg: dict[str, str], body: list[str], evals: dict[str, EvalResult],
                    compressor: str) -> dict[str, str]:
    """The settings of a log without the settings: line (the original's), from its own lines."""
    s = {"PRESET": cfg.get("preset", "none")}
    if "val_pattern" in cfg:  # val_loader:shards pattern=<DATA_PATH>/fineweb_val_*.bin
        s["DATA_PATH"] = os.path.dirname(cfg["val_pattern"])
    s.update({name.upper(): cfg[name] for name in LEGACY_FIELDS if name in cfg})
    if "embed_lr" in cfg:  # one line holds the lrs; head_lr is logged as 0.0 when tied
        s.update({"TIED_EMBED_LR": cfg["embed_lr"]} if cfg["tie_embeddings"] == "True" else
                 {"EMBED_LR": cfg["embed_lr"], "HEAD_LR": cfg["head_lr"]})
    if cfg.get("cpu_threads", "0") != "0":  # 0: a CUDA run, which ignores the setting
        s["CPU_THREADS"] = cfg["cpu_threads"]
    if "compile" in cfg and (cfg["compile"] == "True") != (cfg.get("device") == "cuda"):
        s["COMPILE"] = cfg["compile"]  # the default compiles on CUDA only
    # No sliding-window line: EVAL_STRIDE was 0 (or at least EVAL_SEQ_LEN, which means the same).
    s["EVAL_STRIDE"] = evals["sliding"].params.get("stride", "") if "sliding" in evals else "0"
    modes = [mode for mode, name in (("scored", "slot"), ("context", "slot_context"))
             if name in evals]
    if modes:
        s["SLOT_MODE"] = "both" if len(modes) == 2 else modes[0]
        slot = evals["slot" if "slot" in evals else "slot_context"].params
        s.update({f"SLOT_{k.upper()}": slot[k] for k in ("steps", "lr") if k in slot})
    else:
        s["SLOT_ENABLED"] = "0"
    start = last("ttt_start", body)
    if "legal_ttt" in evals or start:
        s["TTT_ENABLED"] = "1"
        s.update({f"TTT_{k.upper()}": start[k] for k in ("chunk_tokens", "lr", "epochs",
                                                          "freeze_blocks") if start})
    if gptq := last("gptq", body):
        s.update(GPTQ_ENABLED="1", GPTQ_CALIBRATION_BATCHES=gptq["batches"])
    s["COMPRESSOR"] = compressor
    plain = {"True": "1", "False": "0"}  # and '600.000' as '600'
    return {k: plain.get(v, v.rstrip("0").rstrip(".") if re.fullmatch(r"-?\d+\.\d+", v) else v)
            for k, v in s.items() if (k, v) != ("PRESET", "none")}


def parse_log(path: str | os.PathLike) -> RunRecord:
    """One train_gpt.py log of a finished run; SubmissionError naming the log otherwise."""
    try:
        data = Path(path).read_bytes()
        # Strict UTF-8 (a ValueError): the source at its head must come back byte for byte. CRLF: a
        # log that went through a system writing them.
        text = data.decode("utf-8").replace("\r\n", "\n")
        source, env, body = split_log(text)
        _check_body(text, source, body)
        if (seed := last("seed", body)) is None:
            raise ValueError("no 'seed:S' line")
        steps, iterations, train_ms, step_avg_ms = _training(body)
        stop = last("stop", body)
        if steps < iterations and stop is None:
            raise ValueError(f"training ends at step {steps}/{iterations} without a stopping_early "
                             "line: the log is cut")
        if (artifact := last("artifact", body)) is None:
            raise ValueError("no 'Total submission size int6+...' line (artifact size): the log "
                             "stops before it")
        if (code := last("code", body)) is None:
            raise ValueError("no 'Code size' line")
        evals, logged = _evals(body), last("settings", body)
        _score_kinds(body, evals, summary_due=logged is not None)
        run_config, model = config(body), last("model", body)
        settings = ({k: env_value(v) for k, v in json.loads(logged["json"]).items()} if logged else
                    {"SEED": seed["seed"], **legacy_settings(run_config, body, evals,
                                                             artifact["compressor"])})
        gpus = {int(m["index"]): m["name"] for m in find("gpu", env)}
        gpu_type = ", ".join(sorted(set(gpus.values()))) or "cpu"
        versions = {k: m["version"] for k in ("python", "pytorch") if (m := last(k, env))}
        if driver := first("driver", env):
            versions.update(driver=driver["driver"], cuda=driver["cuda"])
        return RunRecord(
            path=str(path), data=data, source=source, seed=int(seed["seed"]), steps=steps,
            iterations=iterations, training_time_seconds=train_ms / 1000, step_avg_ms=step_avg_ms,
            eval_time_seconds=sum(e.eval_time_ms or 0.0 for e in evals.values()) / 1000,
            artifact_bytes=int(artifact["bytes"]), code_bytes=int(code["bytes"]),
            model_bytes=int(model["bytes"]) if model else None,
            compressor=artifact["compressor"], num_gpus=len(gpus),
            gpu_type=gpu_type, hardware=f"{len(gpus)}x {gpu_type}" if gpus else gpu_type,
            versions=versions, config=run_config, settings=settings, evals=evals,
            stop_reason=stop["reason"] if stop else None,
            warnings=[m["message"] for m in find("warning", body)])
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise SubmissionError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class Script:
    data: bytes  # the file train_gpt.py of the folder
    form: str  # "plain", "packed (lzma)" or "packed (brotli)"
    origin: str  # where it came from, for the README
    source: str  # the source it runs (a packed file's unpacked one)
    warnings: tuple[str, ...] = ()


def check_consistent(records: Sequence[RunRecord]) -> None:
    """Refuse logs of different sources, configurations and repeated seeds."""
    def identity(r: RunRecord) -> dict[str, str]:  # what the seeds of one submission share
        return {**{k: v for k, v in r.config.items() if k != "seed"},
                **{k: v for k, v in r.settings.items() if k not in ("SEED", "RUN_ID")},
                "code_bytes": str(r.code_bytes), "gpus": r.hardware}

    first_record, seen = records[0], {}
    if differ := [r.path for r in records[1:] if r.source != first_record.source]:
        raise SubmissionError(f"{', '.join(differ)}: the source at the log's head differs from "
                              f"{first_record.path}'s (or only one carries it): one record holds "
                              "one script")
    a = identity(first_record)
    for record in records:
        b = identity(record)
        if keys := sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)):
            diffs = "; ".join(f"{k} {a.get(k, 'absent')} vs {b.get(k, 'absent')}" for k in keys)
            raise SubmissionError(f"{record.path}: config differs from {first_record.path}: "
                                  f"{diffs}")
        if record.seed in seen:
            raise SubmissionError(f"{record.path}: seed {record.seed} duplicates "
                                  f"{seen[record.seed]}: each run needs its own seed")
        seen[record.seed] = record.path


def recover_script(records: Sequence[RunRecord], given: Path | None = None) -> Script:
    """The logged source, the packed file re-made from it (Code size tells), or --script."""
    path, source, code = records[0].path, records[0].source, records[0].code_bytes
    if given is not None:
        return _given_script(given, source, code)
    if source is None:
        raise SubmissionError(f"{path}: no source at the log's head (removed, as in the "
                              "original's published logs): give the script that ran with "
                              "--script FILE")
    files = _packed.packed_files(source)
    origin = "the full source at the head of every log"
    for form, data in {"plain": source.encode("utf-8"),
                       **{f"packed ({c})": d for c, d in files.items()}}.items():
        if len(data) == code:
            return Script(data, form, origin if form == "plain" else f"re-{form} from {origin}",
                          source)
    sizes = " or ".join(f"{len(d):,} ({c})" for c, d in files.items())
    raise SubmissionError(
        f"{path}: Code size {code:,} bytes is not the logged source's "
        f"{len(source.encode('utf-8')):,} (a packed run), and re-packing that source gives "
        f"{sizes} bytes: give the packed file that ran with --script FILE")


def _given_script(path: Path, source: str | None, code: int) -> Script:
    """--script: for logs without their source, or a packed file of the logged source."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SubmissionError(f"--script {path}: cannot read ({exc.strerror})") from None
    packed = _packed.unpacked(data)
    try:
        runs = packed[1] if packed else data.decode("utf-8")
        compile(runs, str(path), "exec")
    except UnicodeDecodeError:
        raise SubmissionError(f"--script {path}: not UTF-8 text, so not a train_gpt.py") from None
    except SyntaxError as exc:
        raise SubmissionError(f"--script {path}: not valid Python (line {exc.lineno}: "
                              f"{exc.msg})") from None
    if source is not None and runs != source:
        raise SubmissionError(f"--script {path}: not the script the logs ran (neither the source "
                              "at their head nor a packed file of it)")
    warnings = () if len(data) == code else (
        f"--script {path} is {len(data):,} bytes, but the logs' Code size is {code:,} bytes: "
        "their artifact totals counted a script of another size",)
    form = f"packed ({packed[0]})" if packed else "plain"
    return Script(data, form, f"given with --script ({path.name})", runs, warnings)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)


def resolve_score(records: Sequence[RunRecord], scores: dict[str, dict],
                  score: str | None = None) -> str:
    """--score, by default the accepted score every log has with the lowest mean val_bpb."""
    if score is None:  # there is one: every log has its round trip (_evals)
        return min((name for name, x in scores.items() if x["kind"] == ACCEPTED),
                   key=lambda name: (scores[name]["val_bpb"], scores[name]["val_bpb_std"]))
    for record in records:
        if score not in record.evals:
            raise SubmissionError(f"{record.path}: no {EVAL_TAGS[score]}_exact line for score "
                                  f"'{score}': that evaluation was off in this run")
    return score


def aggregate(records: Sequence[RunRecord]) -> dict[str, dict]:
    """Each score all the logs have: its label (with its stride), kind, log line, means, stds."""
    out = {}
    for name in (n for n in SCORES if all(n in r.evals for r in records)):
        stride = records[0].evals[name].params.get("stride")
        (loss, loss_std), (bpb, bpb_std) = (_mean_std([getattr(r.evals[name], k) for r in records])
                                            for k in ("val_loss", "val_bpb"))
        out[name] = {"label": SCORES[name].label + f" s{stride}" * bool(stride),
                     "kind": SCORES[name].kind, "line": records[0].evals[name].line,
                     "val_loss": loss, "val_bpb": bpb, "val_loss_std": loss_std,
                     "val_bpb_std": bpb_std}
    return out


def acceptance_p_value(losses: Sequence[float], baseline_losses: Sequence[float],
                       min_gain: float = 0.005) -> float | None:
    """One-sided p-value that the runs' val_loss beats the baseline by min_gain nats (Welch's t
    against its seeds, else one-sample t); None with under 2 runs or no spread."""
    if len(losses) < 2:
        return None
    x = np.asarray(losses, dtype=float)
    if len(baseline_losses) > 1:
        # Shifting the new losses by min_gain tests mean(baseline) - mean(new) > min_gain.
        result = stats.ttest_ind(baseline_losses, x + min_gain, equal_var=False,
                                 alternative="greater")
    else:
        result = stats.ttest_1samp(baseline_losses[0] - x - min_gain, 0.0, alternative="greater")
    p = float(result.pvalue)
    return None if math.isnan(p) else p


def compare(records: Sequence[RunRecord], score: str, baseline: float | Sequence[str],
            min_gain: float) -> dict:
    """This run against a baseline: its val_bpb, or its logs (their best accepted score)."""
    losses = [r.evals[score].val_loss for r in records]
    bpbs = [r.evals[score].val_bpb for r in records]
    if given := isinstance(baseline, float):
        # On one validation text and tokenizer, nats per token and bits per byte are in one ratio.
        what, bpb = f"val_bpb {baseline:.8f} (given)", baseline
        base_losses = [bpb * float(np.mean(losses) / np.mean(bpbs))]
    else:
        base = [parse_log(path) for path in baseline]
        check_consistent(base)
        scores = aggregate(base)
        head = scores[name := resolve_score(base, scores)]
        names = ", ".join(Path(r.path).name for r in base)
        what, bpb = f"{len(base)} log(s) ({names}), {head['label']}", head["val_bpb"]
        base_losses = [r.evals[name].val_loss for r in base]
    base_loss, p = float(np.mean(base_losses)), acceptance_p_value(losses, base_losses, min_gain)
    test = "Welch's t, one-sided" if len(base_losses) > 1 else "one-sample t, one-sided"
    return {"what": what, "val_bpb": bpb, "val_loss": base_loss, "val_loss_from_bpb": given,
            "delta_bpb": float(np.mean(bpbs)) - bpb,
            "delta_nats": float(np.mean(losses)) - base_loss, "min_gain_nats": min_gain,
            "p_value": p, "test": test if p is not None else
            f"needs at least 2 seeds with spread (got {len(bpbs)})"}


def seed_compliance(r: RunRecord) -> dict[str, tuple[bool, str, str]]:
    """The record track's limits: check -> (met, the run's figure, the warning when not met)."""
    one_step = r.step_avg_ms / 1000  # the cap is checked after each step: one step past it
    train, evals = f"{r.training_time_seconds:,.1f} s", f"{r.eval_time_seconds:,.1f} s"
    where = f"the {RECORD_TRACK} track's"
    return {"train_under_600s": (r.training_time_seconds <= TRAIN_S + one_step, train,
                                 f"training took {train}, over {where} {TRAIN_S:g} s"),
            "artifact_under_16mb": (r.artifact_bytes < TOTAL_BYTES, f"{r.artifact_bytes:,}",
                                    f"artifact {r.artifact_bytes:,} bytes, not under {where} "
                                    f"{TOTAL_BYTES:,}-byte cap"),
            "eval_under_600s": (r.eval_time_seconds <= EVAL_S, evals,
                                f"the evaluations took {evals}, over {where} {EVAL_S:g} s"),
            "hardware_8xh100": (r.num_gpus == 8 and "H100" in r.gpu_type, r.hardware,
                                f"trained on {r.hardware}; {where} time limits are on 8xH100")}


def _warnings(records: Sequence[RunRecord], score: str, label: str, script: Script | None,
              track: str) -> list[str]:
    kind, out = SCORES[score].kind, list(script.warnings if script else ())
    if kind != ACCEPTED:
        out.insert(0, f"the headline score '{score}' ({label}) is {kind}: {KIND_WHY[kind]}")
    for r in records if track == RECORD_TRACK else ():  # hardware first: it explains the times
        checks = sorted(seed_compliance(r).items(), key=lambda c: c[0] != "hardware_8xh100")
        out += [f"{r.path}: {text}" for _, (met, _, text) in checks if not met]
    return out + [f"{r.path}: the run warned: {message}" for r in records for message in r.warnings]


def declared_defaults(source: str) -> dict[str, str]:
    """The defaults of a script's settings (a Section's `name: type = kind(default, ...)`)."""
    tree = ast.parse(source)  # it ran: it parses
    names = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    out = {}
    for cls in (c for c in tree.body
                if isinstance(c, ast.ClassDef) and "Section" in map(ast.unparse, c.bases)):
        prefix = next((ast.literal_eval(s.value) for s in cls.body if isinstance(s, ast.Assign)
                       and ast.unparse(s.targets[0]) == "PREFIX"), "")
        for s in cls.body:
            if isinstance(s, ast.AnnAssign) and isinstance(s.value, ast.Call) and s.value.args:
                arg = s.value.args[0]
                with contextlib.suppress(ValueError):
                    value = ast.literal_eval(names.get(getattr(arg, "id", None), arg))
                    out[prefix + s.target.id.upper()] = env_value(value)
    return out


def same_value(a: str, b: str | None) -> bool:
    """Equal text, or equal numbers ('0.5' and '0.50')."""
    with contextlib.suppress(TypeError, ValueError):
        return float(a) == float(b)
    return a == b


def reproduction(records: Sequence[RunRecord]) -> dict:
    """The command per seed: the settings that differ from the script's defaults, the launcher."""
    defaults = declared_defaults(records[0].source or "") or declared_defaults(
        (ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    settings = {k: v for k, v in records[0].settings.items()
                if k not in ("SEED", "RUN_ID") and not same_value(v, defaults.get(k))}
    world = int(records[0].config.get("world_size", "1"))
    launch = f"torchrun --standalone --nproc_per_node={world}" if world > 1 else "python"
    launch += " train_gpt.py"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in settings.items())
    return {"settings": settings, "launch": launch,
            "commands": {str(r.seed): " ".join(filter(None, [env, f"SEED={r.seed}", launch]))
                         for r in records}}


def build_submission(records: Sequence[RunRecord], score: str | None = None,
                     meta: dict | None = None, script: Script | None = None,
                     baseline: float | Sequence[str] | None = None,
                     min_gain: float = 0.005) -> dict:
    """submission.json; meta: name, author, github_id, blurb, track, date; baseline: compare."""
    meta = {"name": "", "author": "", "github_id": "", "date": datetime.date.today(),
            "track": RECORD_TRACK, "blurb": "", **{k: v for k, v in (meta or {}).items() if v}}
    check_consistent(records)
    scores = aggregate(records)
    per_seed = [{k: met for k, (met, _, _) in seed_compliance(r).items()} for r in records]
    head = scores[score := resolve_score(records, scores, score)]
    return {
        **meta, "date": str(meta["date"]),  # --date gives a datetime.date
        **{k: head[k] for k in ("val_loss", "val_bpb", "val_loss_std", "val_bpb_std")},
        "seeds": [r.seed for r in records],
        # the score's own evaluation time (None only where its line has none), all the run's beside
        "seed_results": {str(r.seed): {
            "val_loss": r.evals[score].val_loss, "val_bpb": r.evals[score].val_bpb,
            "artifact_bytes": r.artifact_bytes, "steps": r.steps, "step_avg_ms": r.step_avg_ms,
            "eval_time_s": None if r.evals[score].eval_time_ms is None
            else r.evals[score].eval_time_ms / 1000.0, "eval_time_total_s": r.eval_time_seconds,
            "train_time_s": r.training_time_seconds} for r in records},
        "bytes_total": max(r.artifact_bytes for r in records),
        "bytes_code": len(script.data) if script else records[0].code_bytes,
        "score": score, "score_label": head["label"], "score_kind": head["kind"],
        "score_line": head["line"], "scores": scores, "score_kinds": KIND_WHY,
        "hardware": records[0].hardware, "num_gpus": records[0].num_gpus,
        "gpu_type": records[0].gpu_type, "versions": records[0].versions,
        "training_time_seconds": max(r.training_time_seconds for r in records),
        "script": script and {"form": script.form, "origin": script.origin,
                              "bytes": len(script.data)},
        "reproduction": reproduction(records),
        "compliance": {**{key: all(s[key] for s in per_seed) for key in per_seed[0]},
                       "score_accepted": SCORES[score].kind == ACCEPTED,
                       "per_seed": {str(r.seed): s for r, s in zip(records, per_seed)}},
        "baseline": None if baseline is None else compare(records, score, baseline, min_gain),
        "warnings": _warnings(records, score, head["label"], script, meta["track"]),
    }


def requirements(script: Script, records: Sequence[RunRecord]) -> str:
    """What the script imports beyond the standard library (optional: guarded by ImportError)."""
    tree, guarded, found = ast.parse(script.source), set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and ast.unparse(h.type).endswith("ImportError")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for top in {name.split(".")[0] for name in names} - set(sys.stdlib_module_names):
            found[top] = found.get(top, False) or id(node) not in guarded
    codecs = {records[0].compressor, script.form.removeprefix("packed (").rstrip(")")}
    found.update(dict.fromkeys(codecs & {"brotli"}, True))
    torch = records[0].versions.get("pytorch", "")
    lines = [f"# What train_gpt.py needs beyond Python {records[0].versions.get('python', '3')}'s "
             "standard library."]
    if torch:
        lines.append(f"# The logs ran PyTorch {torch}: install that build from PyTorch's index.")
    lines += [name + (f"=={torch.split('+')[0]}" if name == "torch" and torch else "")
              for name in sorted(found) if found[name]]
    notes = {"flash_attn_interface": "FlashAttention 3 for Hopper GPUs, built from its own "
                                     "repository; PyTorch SDPA is used without it"}
    lines += [f"# optional: {name} ({notes.get(name, 'imported when installed')})"
              for name in sorted(found) if not found[name]]
    return "\n".join(lines) + "\n"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> list[str]:
    """A Markdown table: its first `left` columns aligned left, the figures after them right."""
    rule = ["---"] * left + ["---:"] * (len(head) - left)
    return ["| " + " | ".join(row) + " |" for row in (head, rule, *rows)]


def results_table(records: Sequence[RunRecord], s: dict) -> list[str]:
    """A row per seed, then mean and std; a column per score, with its kind."""
    columns = [(head, [getattr(r, attr) for r in records], fmt) for head, attr, fmt in (
        ("steps", "steps", "{:,.1f}"), ("ms/step", "step_avg_ms", "{:.2f}"),
        ("train s", "training_time_seconds", "{:.1f}"), ("eval s", "eval_time_seconds", "{:.1f}"),
        ("artifact bytes", "artifact_bytes", "{:,.1f}"))]
    columns += [(f"{b['label']} bpb ({b['kind']}{', the score' * (name == s['score'])})",
                 [r.evals[name].val_bpb for r in records], "{:.8f}")
                for name, b in s["scores"].items()]
    rows = [[str(r.seed), *(f"{v[i]:,}" if isinstance(v[i], int) else fmt.format(v[i])
                            for _, v, fmt in columns)] for i, r in enumerate(records)]
    rows += [[label, *(fmt.format(_mean_std(v)[i]) for _, v, fmt in columns)]
             for i, label in enumerate(("mean", "std"))]
    return _table(["seed", *(h for h, _, _ in columns)], rows)


def _readme_head(s: dict) -> list[str]:
    kind = s["score_kind"]
    lines = [f"# {s['name'] or 'Record'}", "",
             f"**val_bpb {s['val_bpb']:.8f}**: {s['score_label']} (`{s['score_line']}`), "
             f"**{kind}**; mean of {len(s['seeds'])} seed(s), std {s['val_bpb_std']:.8f}; "
             f"val_loss {s['val_loss']:.8f} nats. Total {s['bytes_total']:,} bytes (largest "
             f"seed), {s['hardware']}, track `{s['track']}`."]
    if kind != ACCEPTED:
        lines += ["", f"> **This headline is not an accepted kind of score: {kind}.** "
                      f"{s['score_kinds'][kind]}."]
    lines += ["", s["blurb"]] * bool(s["blurb"]) + ["", "Kinds of score:"]
    lines += [f"- **{k}**: {', '.join(sorted({x.label for x in SCORES.values() if x.kind == k}))}"
              f": {why}." for k, why in KIND_WHY.items()]
    head = ("score", "kind", "log line", "val_bpb", "std", "val_loss (nats)", "std")
    rows = [[f"**{x['label']} (the score)**" if name == s["score"] else x["label"], x["kind"],
             f"`{x['line']}`", *(f"{x[k]:.8f}" for k in ("val_bpb", "val_bpb_std", "val_loss",
                                                         "val_loss_std"))]
            for name, x in s["scores"].items()]
    return lines + ["", "## Scores (mean over the seeds)", "", *_table(head, rows, left=3)]


def _baseline_lines(b: dict) -> list[str]:
    """The comparison with the baseline, for the README and the console."""
    p = f"{b['p_value']:.6g} ({b['test']})" if b["p_value"] is not None else f"none: {b['test']}"
    return [f"baseline: {b['what']}: val_bpb {b['val_bpb']:.8f}, val_loss {b['val_loss']:.8f} "
            "nats" + " (from its bpb, with this run's nats per bpb)" * b["val_loss_from_bpb"],
            f"delta: {b['delta_bpb']:+.8f} bpb, {b['delta_nats']:+.8f} nats",
            f"p-value (beats it by >= {b['min_gain_nats']} nats): {p}"]


def render_readme(s: dict, records: Sequence[RunRecord]) -> str:
    rep, v, cfg, b = s["reproduction"], s["versions"], records[0].config, s["baseline"]
    preset = rep["settings"].get("PRESET")
    kind, script = s["score_kind"], s["script"]
    driver = f" (driver {v['driver']}, CUDA {v['cuda']})" if "driver" in v else ""
    exports = textwrap.wrap(" ".join(f"{k}={shlex.quote(x)}" for k, x in rep["settings"].items()),
                            86, break_long_words=False, break_on_hyphens=False)
    track = "" if s["track"] == RECORD_TRACK else (
        f" (this folder's track, `{s['track']}`, is not the record track: for comparison)")
    compliance = [[str(r.seed), *(f"{'yes' if ok else '**no**'} ({x})"
                                  for ok, x, _ in seed_compliance(r).values())] for r in records]
    lines = [*_readme_head(s), "", "## Per seed", "", *results_table(records, s), "",
             "## Against a baseline", "",
             *([f"- {line}" for line in _baseline_lines(b)] if b else [
                 "No baseline was given (`--baseline-bpb` or `--baseline-logs`): no delta, no "
                 "p-value."]),
             "", "## Reproduction", "", "```bash", *(f"export {line}" for line in exports),
             *(f"SEED={seed} {rep['launch']}" for seed in s["seeds"]), "```", "",
             "The settings listed are every setting that differs from the script's defaults, as "
             "the logs record them (a log without its settings: line records some: the others "
             f"are the script's defaults{f', or those of `presets/{preset}.env`' * bool(preset)})."
             f" Each log's `model_params:{cfg.get('model_params', '?')}` checks the model built.",
             "", "## Hardware and versions", "",
             f"- {s['hardware']}{driver}, world size {cfg.get('world_size', '?')}",
             f"- Python {v.get('python', 'not logged')}, PyTorch {v.get('pytorch', 'not logged')}",
             "", "## Compliance", "",
             f"- Score: the headline, {s['score_label']}, is {kind}: {s['score_kinds'][kind]}.",
             f"- The record track's limits{track}: training 600 s, artifact total (model + code) "
             "under 16,000,000 bytes, evaluation 600 s (all the logged evaluations together), "
             "on 8×H100.", "",
             *_table(("seed", "training", "total bytes", "evaluation", "8×H100"), compliance, 5),
             "", "## Files", "",
             f"- `train_gpt.py`: the script the logs ran, {script['form']}, "
             f"{script['bytes']:,} bytes; {script['origin']}.",
             f"- {', '.join(f'`train_seed{seed}.log`' for seed in s['seeds'])}: the run logs, "
             "as written.",
             "- `submission.json`: these figures; `requirements.txt`: what the script imports."]
    lines += ["", "## Warnings", "", *(f"- {w}" for w in s["warnings"])] * bool(s["warnings"])
    return "\n".join(lines + ["", "Generated by `python -m tools.submission` from the logs: every "
                                  "figure is theirs."]) + "\n"


def _check_target(out: Path, force: bool) -> None:
    """--force replaces only a folder this tool wrote, as it wrote it."""
    if not out.exists():
        return
    if not force:
        raise SubmissionError(f"{out}: exists; --force replaces it")
    written = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        mark = json.loads((out / "submission.json").read_text(encoding="utf-8"))
        written = mark["files"] if mark.get("written_by") == WRITTEN_BY else None
    if not isinstance(written, dict):
        raise SubmissionError(f"{out}: not a record folder this tool wrote (its submission.json "
                              "does not list the files it wrote): --force replaces only such a "
                              "folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name != "submission.json" and (
        not p.is_file() or p.is_symlink()
        or written.get(p.name) != hashlib.sha256(p.read_bytes()).hexdigest()))
    if foreign:
        raise SubmissionError(f"{out}: holds files this tool did not write, or changed since "
                              f"({', '.join(foreign[:5])}): --force replaces only a folder as "
                              "this tool wrote it; move them away first")


def write_folder(out: Path, files: dict[str, bytes], force: bool = False) -> None:
    """A hidden sibling, then renames: never half a folder, the old one kept on failure."""
    _check_target(out, force)
    out = out.resolve()  # a name to put the sibling beside, even for --out with '..' in it
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        new, old = Path(tmp, "new"), Path(tmp, "old")
        new.mkdir()
        for name, data in files.items():
            write_atomic(new / name, data)
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)  # in the folder where the rename before it worked: nothing to undo


def plan_folder(args: argparse.Namespace) -> tuple[dict[str, bytes], dict, list[RunRecord]]:
    """Everything in memory first, so that each refusal comes before anything is written."""
    records = [parse_log(path) for path in args.logs]
    script = recover_script(records, args.script)
    meta = {k: getattr(args, k) for k in ("name", "author", "github_id", "blurb", "track", "date")}
    baseline = args.baseline_logs if args.baseline_bpb is None else args.baseline_bpb
    submission = build_submission(records, args.score, meta, script, baseline, args.min_gain)
    files = {"train_gpt.py": script.data, **{f"train_seed{r.seed}.log": r.data for r in records},
             "requirements.txt": requirements(script, records).encode("utf-8")}
    files["README.md"] = render_readme(submission, records).encode("utf-8")
    submission["written_by"] = WRITTEN_BY
    submission["files"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    files["submission.json"] = (json.dumps(submission, indent=2, allow_nan=False) + "\n").encode()
    return files, submission, records


def summary(files: dict[str, bytes], s: dict, records: list[RunRecord], out: Path) -> str:
    kind = s["score_kind"] if s["score_kind"] == ACCEPTED else s["score_kind"].upper()
    lines = [*results_table(records, s), "",
             f"score: {s['score_label']} ({kind}), {s['score_line']} over {len(records)} "
             f"seed(s): val_loss {s['val_loss']:.8f} (std {s['val_loss_std']:.8f}), "
             f"val_bpb {s['val_bpb']:.8f} (std {s['val_bpb_std']:.8f})"]
    lines += [f"beside it, {b['kind']}: {b['label']}, {b['line']}: val_bpb {b['val_bpb']:.8f} "
              f"(std {b['val_bpb_std']:.8f})" for name, b in s["scores"].items()
              if name != s["score"]]
    lines += _baseline_lines(s["baseline"]) if s["baseline"] else []
    lines.append(f"wrote {out}/: train_gpt.py ({s['script']['bytes']:,} bytes, "
                 f"{s['script']['form']}), {', '.join(n for n in files if n != 'train_gpt.py')}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.submission",
                                description="Write a record folder from train_gpt.py logs.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="run log, one per seed")
    p.add_argument("--out", required=True, type=Path, help="the record folder (must not exist)")
    p.add_argument("--force", action="store_true",
                   help="replace a record folder this tool wrote, if nothing in it changed")
    p.add_argument("--script", type=Path, metavar="FILE",
                   help="the script that ran, for logs without their source (or a packed file)")
    p.add_argument("--score", choices=tuple(SCORES),
                   help="the headline score (default: the best accepted one every log has)")
    for option in ("--name", "--author", "--github-id", "--blurb"):
        p.add_argument(option, default="")
    p.add_argument("--track", default=RECORD_TRACK,
                   help="challenge track (default %(default)s: warns on its limits)")
    p.add_argument("--date", type=datetime.date.fromisoformat, help="YYYY-MM-DD (default: today)")
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--baseline-bpb", type=float, metavar="BPB",
                          help="the record to beat: its val_bpb")
    baseline.add_argument("--baseline-logs", nargs="+", metavar="LOG",
                          help="the record to beat: its logs (Welch's t over both runs' seeds)")
    p.add_argument("--min-gain", type=float, default=0.005,
                   help="nats to beat the baseline by (default 0.005, the challenge's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        files, submission, records = plan_folder(args)
        write_folder(args.out, files, args.force)
    except (SubmissionError, OSError) as exc:  # an OSError: writing the folder failed
        where = "" if isinstance(exc, SubmissionError) else f"cannot write {args.out}: "
        print(f"error: {where}{exc}", file=sys.stderr)
        return 2
    print(summary(files, submission, records, args.out))
    for warning in submission["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
