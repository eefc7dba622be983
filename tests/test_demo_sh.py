"""demo.sh's steps, with a stand-in `python` that records each call: which torch it installs
and from where, and that training gets PRESET=demo. Nothing is installed or trained."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Exits 1 for `import torch` unless TORCH_PRESENT=1, and for a pip call naming an index
# unless CPU_INDEX_OK=1; records every other call, with PRESET, and succeeds.
STAND_IN = """#!/bin/sh
echo "PRESET=${PRESET:-} $*" >> "$CALLS"
case "$*" in
    "-c import torch") [ "$TORCH_PRESENT" = 1 ] || exit 1 ;;
    *--index-url*) [ "$CPU_INDEX_OK" = 1 ] || exit 1 ;;
esac
exit 0
"""


def run_demo(tmp_path, torch_present: bool, cpu_index_ok: bool):
    """demo.sh, copied into an empty folder (it clears logs/demo.txt where it lies)."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    shutil.copy(ROOT / "demo.sh", work / "demo.sh")
    python = bin_dir / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CALLS=str(calls),
               TORCH_PRESENT=str(int(torch_present)), CPU_INDEX_OK=str(int(cpu_index_ok)))
    env.pop("PRESET", None)
    run = subprocess.run(["bash", str(work / "demo.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return calls.read_text().splitlines(), run.stdout


AFTER_TORCH = ["PRESET= -m pip install -q -r requirements.txt", "PRESET= -m tools.data demo",
               "PRESET=demo train_gpt.py"]


@pytest.mark.parametrize("cpu_index_ok", [True, False])
def test_without_torch_the_cpu_build_comes_first(tmp_path, cpu_index_ok):
    calls, out = run_demo(tmp_path, torch_present=False, cpu_index_ok=cpu_index_ok)
    assert calls[:3] == [
        "PRESET= -c import torch",
        f"PRESET= -m pip install -q --no-deps torch==2.13.0 --index-url {CPU_INDEX}",
        # Its dependencies; or, when the CPU index failed, the usual index's build.
        "PRESET= -m pip install -q torch==2.13.0",
    ]
    assert calls[3:6] == AFTER_TORCH
    assert calls[6].startswith("PRESET= -m tools.submission logs/demo.txt --out runs/demo")
    assert ("installing torch==2.13.0 from the usual index" in out) is not cpu_index_ok


def test_an_installed_torch_is_kept(tmp_path):
    calls, _ = run_demo(tmp_path, torch_present=True, cpu_index_ok=True)
    assert calls[:4] == ["PRESET= -c import torch", *AFTER_TORCH]
    assert not any("torch==" in call for call in calls)
