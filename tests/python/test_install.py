"""pip's front door: `pip wheel .` (scikit-build-core driving the CMake project; CPU-only here to
keep CI short: the CUDA objects are compiled by the main build) gives a wheel whose module does
not link libtorch, and which imports and computes from a directory of its own."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import ringattn, torch
assert ringattn.__file__.startswith(r"{target}"), ringattn.__file__
q, k, v = (torch.randn(1, 128, 4, 32) for _ in range(3))
# One branch with s = N and r = 1 is plain causal attention: torch's own is the reference.
out = ringattn.dilated_attn_func(q, k, v, [128], [1], causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(
    *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
assert out.abs().max() > 0 and (out - ref).abs().max() < 1e-5, (out - ref).abs().max()
print("imported", ringattn.__version__, ringattn.cpu_simd_target())
"""


def test_pip_wheel_builds_installs_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheels), "-C", "cmake.define.RINGATTN_WITH_CUDA=OFF",
         "-C", f"build-dir={tmp_path / 'build'}"],
        check=True, timeout=900)
    (wheel,) = wheels.glob("ringattn-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    (module,) = (target / "ringattn").glob("_C*.so")
    needed = subprocess.run(["readelf", "-d", str(module)], check=True, capture_output=True,
                            text=True).stdout
    assert "NEEDED" in needed
    assert "libtorch" not in needed and "libc10" not in needed, needed
    run = subprocess.run([sys.executable, "-c", CHECK.format(target=target)], cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "imported 0.1.0" in run.stdout
