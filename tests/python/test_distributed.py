"""Several processes: gloo at 2 and 4 ranks (torch.distributed) and mpirun -np 2 (mpi4py), each
rank's forward and backward equal to the one-process result (tests/python/dist_worker.py), and
a bad shape on one rank an error on every rank, never a hang (every run has a timeout)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker.py")
TIMEOUT_S = 240


def finish(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hang)")
    text = "\n".join(outputs)
    print(text)
    assert all(p.returncode == 0 for p in procs), text
    return text


def run_gloo(world, case, tmp_path, **env_vars):
    env = dict(os.environ, WORLD_SIZE=str(world), RINGATTN_TEST_STORE=str(tmp_path / "store"),
               OMP_NUM_THREADS="1", **env_vars)
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "--backend", "gloo", "--case", case],
                         env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    return finish(procs)


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ring_equals_one_process(world, tmp_path):
    text = run_gloo(world, "checks", tmp_path)
    assert text.count("all ok") == world


def test_gloo_bad_shape_fails_every_rank(tmp_path):
    text = run_gloo(2, "bad_shape", tmp_path)
    assert text.count("raised") == 4 and text.count("all ok") == 2


def test_gloo_missing_rank_ends_at_the_deadline(tmp_path):
    text = run_gloo(2, "stall", tmp_path, RINGATTN_TIMEOUT_S="4")
    assert "raised after" in text and text.count("all ok") == 2


def mpirun(np, case):
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "OMP_NUM_THREADS=1", "-x", "PYTHONPATH", sys.executable, str(WORKER),
            "--backend", "mpi", "--case", case]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return finish([proc])


def test_mpi_ring_equals_one_process():
    assert mpirun(2, "checks").count("all ok") == 2


def test_mpi_bad_shape_fails_every_rank():
    text = mpirun(2, "bad_shape")
    assert text.count("raised") == 4 and text.count("all ok") == 2
