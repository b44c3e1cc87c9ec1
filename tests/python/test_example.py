"""examples/train_longnet.py: the loss goes down in one process, and the same run as a 2-rank
ring under torchrun (gloo) gives the same losses step by step."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_longnet.py"
ARGS = ["--steps", "40", "--log-every", "5", "--threads", "1"]


def losses(cmd):
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout + run.stderr
    return [float(x) for x in re.findall(r"^step +\d+ loss ([0-9.]+)$", run.stdout, re.M)]


def test_training_lowers_the_loss_and_the_ring_matches():
    single = losses([sys.executable, str(EXAMPLE), *ARGS])
    assert len(single) == 9 and single[-1] < single[0] - 0.2, single
    torchrun = Path(sys.executable).with_name("torchrun")
    ring = losses([str(torchrun), "--standalone", "--nproc-per-node", "2", str(EXAMPLE), *ARGS])
    assert len(ring) == len(single)
    assert max(abs(a - b) for a, b in zip(single, ring)) < 1e-3, (single, ring)
