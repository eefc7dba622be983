"""The GPU check: on a CUDA machine, the record's configuration end to end for a short
run (compile, bf16, FlashAttention 3 or SDPA, export, round trip, sliding windows, SLOT),
printing step time, tokens/s, peak memory and each evaluation's time.

    python -m tools.gpu_check [--steps 60] [--nproc 1] [--set VAR=VALUE ...]

It is tools.bench_train --end-to-end with a refusal on machines without CUDA.
"""

import sys

from tools import bench_train


def main(argv=None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA device; on a CPU use `python -m tools.bench_train`", file=sys.stderr)
        return 1
    return bench_train.main(["--end-to-end", "--steps", "60", *argv])


if __name__ == "__main__":
    sys.exit(main())
