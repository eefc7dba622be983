#!/usr/bin/env bash
# The whole pipeline on the embedded demo corpus, on a CPU, in a few minutes:
# install -> data -> train -> artifact -> every evaluation -> the record folder runs/demo/.
# Outputs: logs/demo.txt, final_model.pt, final_model.int6.ptz, runs/demo/ (train_gpt.py,
# train_seed1337.log, submission.json, README.md, requirements.txt: python -m tools.submission).
set -euo pipefail
cd "$(dirname "$0")"
if ! python -c "import torch" 2>/dev/null; then
    # PyPI's torch for Linux is the CUDA build (GBs of CUDA libraries); the CPU build is on
    # PyTorch's own index. Only torch itself comes from there; the second command adds its
    # dependencies from the usual index, or, where the CPU index could not be reached,
    # installs the usual index's build (a find-links or local index may offer a CPU wheel).
    cpu_index=https://download.pytorch.org/whl/cpu
    python -m pip install -q --no-deps torch==2.13.0 --index-url "$cpu_index" ||
        echo "demo.sh: no torch from $cpu_index; installing torch==2.13.0 from the usual index"
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -r requirements.txt
python -m tools.data demo
rm -f logs/demo.txt  # a taken log name would send this run to logs/demo-2.txt
PRESET=demo python train_gpt.py
python -m tools.submission logs/demo.txt --out runs/demo --force --name "CPU demo (not a record)" --track cpu_demo \
    --blurb "PRESET=demo on the embedded demo corpus, one CPU process: a pipeline check, not a record."
python -m tools.plot logs/demo.txt --out runs/demo/train_loss_and_scores.png
