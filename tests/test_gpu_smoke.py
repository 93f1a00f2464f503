"""bench/gpu_smoke.py on a machine without CUDA: it says so and succeeds, so CI can call it anywhere.
(Its paths were rehearsed on the CPU with --rehearse; on a GPU it runs them for real.)"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_cuda_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, "bench/gpu_smoke.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "needs a CUDA GPU" in done.stdout and not os.path.exists(os.path.join(ROOT, "outputs", "gpu-smoke"))
