"""CUDA tensors through the package (need a GPU and a CUDA build; skipped otherwise, saying
why): forward and gradients against the CPU kernel, on torch.cuda.current_stream() without
blocking the host."""

import pytest
import torch

import ringattn
from test_functions import assert_close, qkv, rand

pytestmark = pytest.mark.skipif(
    not (ringattn.has_cuda and torch.cuda.is_available()),
    reason="needs a CUDA device and a CUDA build of ringattn "
    f"(has_cuda={ringattn.has_cuda}, torch.cuda.is_available()={torch.cuda.is_available()})",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["groups", "longnet"])
def test_cuda_matches_the_cpu_kernel(dtype, mode):
    q, k, v = qkv(b=2, n=256, h=4, hkv=2, d=64, seed=40)
    dout = rand(*q.shape, seed=41)
    args = ([64, 256], [1, 4])
    results = {}
    for device in ("cpu", "cuda"):
        xs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        out = ringattn.dilated_attn_func(*xs, *args, mode=mode, causal=True)
        out.backward(dout.to(device=device, dtype=dtype))
        results[device] = [out.detach().cpu()] + [x.grad.cpu() for x in xs]
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    for gpu, cpu in zip(results["cuda"], results["cpu"]):
        assert_close(gpu, cpu, rel)


def test_runs_on_the_current_stream_without_blocking():
    q, k, v = (t.cuda().half() for t in qkv(b=4, n=1024, h=8, hkv=8, d=64, seed=42))
    expected = ringattn.dilated_attn_func(q, k, v, [256, 1024], [1, 2], causal=True)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(2_000_000_000)  # keeps the stream busy for about a second
        out = ringattn.dilated_attn_func(q, k, v, [256, 1024], [1, 2], causal=True)
        assert not stream.query(), "the call waited for its stream"
    stream.synchronize()
    assert torch.equal(out, expected)


def test_block_sparse_on_cuda_matches_the_cpu_kernel():
    q, k, v = qkv(b=1, n=512, h=4, hkv=4, d=64, seed=43)
    pattern = ringattn.BlockPattern.local_window(64, 128)
    cpu = ringattn.block_sparse_attn_func(q, k, v, pattern, causal=True)
    gpu = ringattn.block_sparse_attn_func(q.cuda(), k.cuda(), v.cuda(), pattern, causal=True)
    assert_close(gpu.cpu(), cpu, 1e-5)
