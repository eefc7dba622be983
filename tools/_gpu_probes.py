"""What runs inside tools.gpu_check's child processes (private to it):

    python -m tools._gpu_probes boot train_gpt.py   # the script as __main__, with a memory report
    python -m tools._gpu_probes probes              # the probes, settings in GPU_CHECK_PROBES

`boot` runs train_gpt.py unchanged (runpy, as `python train_gpt.py` would) and adds a thread
that prints `gpu_check:memory ...` whenever the process's peak memory grows, and once at exit:
every stage reports its peak (train_gpt logs one only after training). With GPU_CHECK_EAGER=1
(the CPU dry run) every torch.compile uses dynamo's eager backend: the same graphs, guards and
recompilations, without inductor's minutes of code generation on a CPU.

`probes` prints one `gpu_check:part {json}` line per probe as it finishes: the device; GPTQ on
the device against the CPU; the eager SDPA call; a profiler trace of one compiled training
micro-step of the model (the attention kernel the compiled graph runs).

Both die with their parent (gpu_check): a killed check leaves no process behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import runpy
import signal
import sys
import threading
import time
import traceback
import types
import warnings

from tools.runlog import MEMORY_LINE, PART_PREFIX

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
# The aten op each SDPA backend dispatches to (the CPU's flash kernel has its own name).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
}
ATTENTION_WORDS = ("flash", "fmha", "sdpa", "attention", "softmax")


def die_with_parent() -> None:
    """Linux: the kernel kills this process when gpu_check dies (even by SIGKILL). The parent
    may be gone already by the time this runs: then exit at once."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    parent = os.environ.get("GPU_CHECK_PARENT")
    if parent and os.getppid() != int(parent):
        os._exit(1)


# ---------------------------------------------------------------- boot: train_gpt.py

def memory_line(torch) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    alloc = torch.cuda.max_memory_allocated() // 2**20 if cuda else -1
    reserved = torch.cuda.max_memory_reserved() // 2**20 if cuda else -1
    return MEMORY_LINE.format(rss=rss, allocated=alloc, reserved=reserved)  # tools.runlog reads it


class MemoryReporter:
    """Prints the memory line when it changes: every second from a thread, and at exit."""

    def __init__(self, torch):
        self.torch, self.last = torch, None

    def report(self) -> None:
        line = memory_line(self.torch)
        if line != self.last:
            self.last = line
            sys.stderr.write(line + "\n")  # one write: never split by the script's own output
            sys.stderr.flush()

    def watch(self) -> None:
        while True:
            time.sleep(1.0)
            self.report()

    def start(self) -> None:
        import atexit

        threading.Thread(target=self.watch, daemon=True, name="gpu_check-memory").start()
        atexit.register(self.report)


def boot(script: str) -> None:
    die_with_parent()
    import torch

    if os.environ.get("GPU_CHECK_EAGER") == "1":
        torch.compile = functools.partial(torch.compile, backend="eager")
    MemoryReporter(torch).start()
    sys.argv = [script]
    runpy.run_path(script, run_name="__main__")


# ---------------------------------------------------------------- the one import of train_gpt.py

def train_gpt_api(env: dict[str, str]):
    """The one place gpu_check imports train_gpt.py, and all it takes from it: the settings read
    from an environment, build_model and gptq_quantize."""
    from tools._common import import_train_gpt

    tg = import_train_gpt()
    model_cfg = tg.Config.from_env(env).model

    def build_model(device, seed: int):
        return tg.build_model(model_cfg, device, seed=seed)

    return types.SimpleNamespace(build_model=build_model, gptq_quantize=tg.gptq_quantize)


# ---------------------------------------------------------------- probes

def emit(part: dict) -> None:
    print(PART_PREFIX + json.dumps(part, default=str), flush=True)


def run_part(name: str, fn, *args) -> dict:
    """One probe: its figures and failures, or the exception that stopped it."""
    t0 = time.perf_counter()
    try:
        part = fn(*args)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        print("\n".join(tb), flush=True)  # into the stage's log
        part = dict(failures=[f"{type(e).__name__}: {str(e).strip()[:300]}"], traceback=tb[-6:])
    part.setdefault("failures", [])
    seconds = round(time.perf_counter() - t0, 2)
    return dict(name=name, ok=not part["failures"], seconds=seconds, **part)


def probes() -> None:
    die_with_parent()
    cfg = json.loads(os.environ["GPU_CHECK_PROBES"])
    import torch

    device = torch.device(cfg["device"])
    emit(run_part("device", probe_device, torch, device))
    try:
        api = train_gpt_api(cfg["model_env"])
    except Exception as e:  # the script itself would not start: both parts that need it say so
        print(traceback.format_exc(), flush=True)
        why = f"train_gpt.py could not be imported or configured: {type(e).__name__}: {e}"[:400]
        api = None
        for name in ("gptq", "kernel"):
            emit(dict(name=name, ok=False, seconds=0.0, failures=[why]))
    if api is not None:
        emit(run_part("gptq", probe_gptq, torch, api, device, cfg["gptq_shape"]))
    emit(run_part("sdpa", probe_sdpa, torch, device, cfg["sdpa_shape"], cfg["dtype"]))
    if api is not None:
        emit(run_part("kernel", probe_kernel, torch, api, device, cfg))


def probe_device(torch, device) -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out = dict(torch=torch.__version__, cuda=torch.version.cuda, cudnn=cudnn, gpu=None)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = dict(name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                          capability=f"{p.major}.{p.minor}", count=torch.cuda.device_count(),
                          multiprocessors=p.multi_processor_count)
    try:
        import flash_attn_interface  # noqa: F401
        out["fa3"] = dict(importable=True, error=None)
    except Exception as e:  # an ImportError, or a broken build's own error
        out["fa3"] = dict(importable=False, error=f"{type(e).__name__}: {e}"[:200])
    return out


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def output_error(W, q, scale, H) -> float:
    """trace(E H E^T) / rows, E = W - q * scale: the loss GPTQ minimises, per output row."""
    E = W.double() - q.double() * scale.double()[:, None]
    return float(((E @ H.double()) * E).sum() / W.size(0))


def timed(torch, device, fn):
    """(fn's result, its milliseconds, the device synchronised on both sides)."""
    _sync(torch, device)
    t0 = time.perf_counter()
    result = fn()
    _sync(torch, device)
    return result, 1000 * (time.perf_counter() - t0)


def probe_gptq(torch, api, device, shape) -> dict:
    """One Hessian (X^T X of seeded squared-ReLU activations, float32 products summed in float64
    as train_gpt's calibration, TF32 off as its export) and one GPTQ solve on the device, each
    against the same work on the CPU; the solve gets the CPU's Hessian on both sides."""
    rows, cols = shape
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4 * cols, cols, generator=gen).relu().square()
    W = torch.randn(rows, cols, generator=gen) * 0.02
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        Xd = X.to(device)
        Hd, hessian_ms = timed(torch, device, lambda: (Xd.T @ Xd).double() / X.size(0))
        H = (X.T @ X).double() / X.size(0)
        Wd, Hf = W.to(device), H.float().to(device)
        (qd, sd), solve_ms = timed(torch, device, lambda: api.gptq_quantize(Wd, Hf))
        cpu = torch.device("cpu")
        (qc, sc), cpu_ms = timed(torch, cpu, lambda: api.gptq_quantize(W, H.float()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    qd, sd = qd.cpu(), sd.cpu()
    err_d, err_c = output_error(W, qd, sd, H), output_error(W, qc, sc, H)
    scale_diff = ((sd.float() - sc.float()).abs() / sc.float().abs()).max()
    out = dict(shape=[rows, cols], device=device.type, hessian_ms=round(hessian_ms, 3),
               solve_ms=round(solve_ms, 1), cpu_solve_ms=round(cpu_ms, 1),
               hessian_max_rel_diff=float((Hd.cpu() - H).abs().max() / H.abs().max()),
               codes_equal=float((qd == qc).float().mean()),
               max_code_diff=int((qd.int() - qc.int()).abs().max()),
               scales_max_rel_diff=float(scale_diff),
               error_ratio=err_d / err_c if err_c > 0 else float("nan"))
    out["failures"] = gptq_failures(out)
    return out


def gptq_failures(g: dict) -> list[str]:
    """The device's solve must do as well as the CPU's: a few rounding decisions may differ
    (float32 sums in another order), the error GPTQ minimises may not."""
    failures = []
    if not g["hessian_max_rel_diff"] <= 1e-4:
        failures.append(f"Hessian differs from the CPU's by {g['hessian_max_rel_diff']:.2e} "
                        "(relative, max); expected <= 1e-4 with TF32 off")
    if not 0.98 <= g["error_ratio"] <= 1.02:
        failures.append(f"GPTQ output error {g['error_ratio']:.4f}x the CPU's (codes equal "
                        f"{g['codes_equal']:.2%}); expected within 2%")
    if not g["scales_max_rel_diff"] <= 1e-3:
        failures.append(f"row scales differ from the CPU's by {g['scales_max_rel_diff']:.2e}; "
                        "expected <= 1e-3")
    return failures


def classify_sdpa(op_names: list[str], kernel_names: list[str]) -> tuple[str | None, str | None]:
    """(backend by the aten op dispatched, backend by the device kernels' names). cuDNN's
    kernels mention flash too: test for cudnn first."""
    by_op = next((SDPA_OPS[n] for n in op_names if n in SDPA_OPS), None)
    by_kernel = None
    for name in kernel_names:
        low = name.lower()
        if "cudnn" in low and any(w in low for w in ("sdpa", "attention", "flash")):
            by_kernel = "CUDNN_ATTENTION"
        elif "flash" in low:
            by_kernel = "FLASH_ATTENTION"
        elif "fmha" in low or "efficient_attention" in low or "cutlassf" in low:
            by_kernel = "EFFICIENT_ATTENTION"
        if by_kernel:
            break
    if by_kernel is None and any("softmax" in n.lower() for n in kernel_names):
        by_kernel = "MATH"  # no fused kernel: bmm + softmax
    return by_op, by_kernel


def profile_step(torch, step, device) -> tuple[list[str], list[str]]:
    """The aten ops and the device kernels (by total device time, longest first) of one call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        _sync(torch, device)
    events = prof.events()
    ops = sorted({e.name for e in events if e.name.startswith("aten::")})
    kernels: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total
    return ops, sorted(kernels, key=kernels.get, reverse=True)


def time_call(torch, fn, device, target_s: float) -> dict:
    """Mean ms of fn over as many calls as fit in about target_s (1 to 20), after one warm call."""
    _, once = timed(torch, device, fn)
    iters = max(1, min(20, int(target_s / max(once / 1000, 1e-6))))
    _, total = timed(torch, device, lambda: [fn() for _ in range(iters)])
    return dict(ms=round(total / iters, 3), iters=iters)


def probe_sdpa(torch, device, shape, dtype_name) -> dict:
    """train_gpt's attention call without FA3 (SDPA on [B, heads, T, D], causal, GQA), eager:
    the backend PyTorch picks, then forward+backward under each backend forced, or why not."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, H, Hkv, D = shape
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, device=device, dtype=dtype, generator=gen).requires_grad_()
               for n in (H, Hkv, Hkv))
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen)

    def fwd_bwd():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv).backward(grad)
        q.grad = k.grad = v.grad = None

    fwd_bwd()  # kernel selection, lazy initialisation
    ops, kernels = profile_step(torch, fwd_bwd, device)
    by_op, by_kernel = classify_sdpa(ops, kernels)
    default = dict(backend=by_kernel if device.type == "cuda" else by_op, backend_by_aten_op=by_op,
                   backend_by_kernels=by_kernel, kernels=[n[:160] for n in kernels[:4]],
                   **time_call(torch, fwd_bwd, device, 0.5))
    out = dict(shape=dict(batch=B, seq_len=T, query_heads=H, kv_heads=Hkv, head_dim=D,
                          dtype=dtype_name), default=default, backends={}, failures=[])
    for name in SDPA_BACKENDS:
        with sdpa_kernel([getattr(SDPBackend, name)]):
            out["backends"][name] = forced_backend(torch, fwd_bwd, device)
    if not any(b["status"] == "ok" for b in out["backends"].values()):
        out["failures"].append("no SDPA backend accepts the record's attention shape")
    if not default["backend"]:
        out["failures"].append("the default call's backend could not be told from its trace")
    return out


def forced_backend(torch, fn, device) -> dict:
    """One backend's time, or why it refuses: SDPA warns each reason, then raises."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return dict(status="ok", **time_call(torch, fn, device, 0.3))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return dict(status="error", reason="out of memory")
        except RuntimeError as e:
            reasons = list(dict.fromkeys(str(w.message).strip() for w in caught))
            reason = "; ".join(reasons) if reasons else str(e).strip().splitlines()[0]
            return dict(status="refused", reason=reason[:300])


def probe_kernel(torch, api, device, cfg) -> dict:
    """One training micro-step of the model, compiled as train_gpt's loop compiles it
    (fullgraph, static shapes, bf16 autocast on CUDA), traced by the profiler: the attention
    kernel the compiled graph runs (a silent fallback to the math path shows here), its time
    and peak memory (one micro-step of 48 rows is what each of the record's 8 GPUs runs)."""
    rows, seq = cfg["trace_rows"], cfg["trace_seq"]
    vocab = int(cfg["model_env"].get("VOCAB_SIZE", 1024))
    model = api.build_model(device, seed=1337)
    backend = dict(backend="eager") if cfg.get("eager") else {}
    compiled = torch.compile(model, dynamic=False, fullgraph=True, **backend)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab, (rows, seq), generator=gen).to(device) for _ in range(2))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = compiled(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    loss, first_ms = timed(torch, device, step)
    timing = time_call(torch, step, device, 1.0)
    ops, kernels = profile_step(torch, step, device)
    by_op, by_kernel = classify_sdpa(ops, kernels)
    attention = [k for k in kernels if any(w in k.lower() for w in ATTENTION_WORDS)]
    peak = torch.cuda.max_memory_allocated() // 2**20 if device.type == "cuda" else None
    out = dict(rows=rows, seq_len=seq, backend_by_aten_op=by_op, backend_by_kernels=by_kernel,
               attention_kernel=by_kernel if device.type == "cuda" else by_op,
               attention_kernels=[k[:160] for k in attention[:6]],
               attention_ops=[o for o in ops if "attention" in o],
               top_kernels=[k[:160] for k in kernels[:8]], first_call_s=round(first_ms / 1000, 2),
               ms_per_micro_step=timing["ms"], first_loss=loss.item(), peak_allocated_mib=peak)
    out["failures"] = kernel_failures(out)
    return out


def kernel_failures(k: dict) -> list[str]:
    if k["attention_kernel"] is None:
        return [f"no attention kernel recognised in the compiled step; top kernels: "
                f"{k['top_kernels'][:3]}"]
    if k["attention_kernel"] == "MATH":
        return [f"the compiled training step runs the math attention path (kernels: "
                f"{k['attention_kernels'][:3]}); expected a fused kernel (flash, cuDNN or "
                "memory-efficient)"]
    return []


def main(argv: list[str]) -> None:
    if argv[:1] == ["boot"] and len(argv) == 2:
        boot(argv[1])
    elif argv == ["probes"]:
        probes()
    else:
        sys.exit("usage: python -m tools._gpu_probes boot SCRIPT | probes")


if __name__ == "__main__":
    main(sys.argv[1:])
