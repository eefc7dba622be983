"""Runs train_gpt.main() with test-only patches chosen by environment variables, so that tests can
observe or break a real run (torchrun can launch this file like the script itself).

TEST_FAIL_RANK=r       evaluate raises on rank r (the others carry on into their collectives)
TEST_LOSE_RANK=r:how   at its third training step rank r is killed (how=kill: SIGKILL) or stalls
                       (how=stall: sleeps until stopped)
TEST_COMPILE_COUNTS=F  torch.compile uses the "eager" backend (dynamo traces as on CUDA, no C++
                       compiler needed); at every log line, rank 0 appends the number of graphs
                       compiled so far and the line to F (JSON lines; rank r > 0 writes F.r)
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import train_gpt as tg  # noqa: E402


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


if "TEST_FAIL_RANK" in os.environ:
    fail_rank, evaluate = int(os.environ["TEST_FAIL_RANK"]), tg.evaluate

    def failing_evaluate(cfg, rt, model, data):
        if rt.rank == fail_rank:
            raise RuntimeError(f"injected failure on rank {fail_rank}")
        return evaluate(cfg, rt, model, data)

    tg.evaluate = failing_evaluate

if "TEST_LOSE_RANK" in os.environ:
    lose_rank, how = os.environ["TEST_LOSE_RANK"].split(":")
    log_train_step = tg.log_train_step

    def losing_log_train_step(t, rt, step, *args):
        if rt.rank == int(lose_rank) and step == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return log_train_step(t, rt, step, *args)

    tg.log_train_step = losing_log_train_step

if "TEST_COMPILE_COUNTS" in os.environ:
    counts_path, real_compile, real_log = (
        os.environ["TEST_COMPILE_COUNTS"],
        torch.compile,
        tg.Runtime.log,
    )
    torch.compile = lambda *args, **kwargs: real_compile(*args, **{**kwargs, "backend": "eager"})

    def counting_log(self, msg, console=True):
        path = counts_path if self.rank == 0 else f"{counts_path}.{self.rank}"
        line = msg.splitlines()[0] if msg else ""
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"graphs": compiled_graphs(), "line": line}) + "\n")
        real_log(self, msg, console)

    tg.Runtime.log = counting_log

if __name__ == "__main__":
    tg.main()
