"""The seed project's DilatedAttention forward (groups mode), timed on this CPU with torch.

The seed (a PyTorch package) computes each head group's dilated segments with torch's
scaled_dot_product_attention, which is its CPU path: slice the group's heads, cut the
sequence into segments, keep every r-th row from the group's offset i % r, attend (causal
inside the kept rows), add the rows back into a zero output, divide by the number of groups.
This file states that algorithm with torch so that launch/seed_compare.sh can time it next
to ringattn_bench on the same machine (BENCHMARKS.md: "at least 10x faster than the seed's
Python DilatedAttention on the same machine"), in fp32 or bf16 (torch's CPU attention on bf16
tensors). Prints one line per configuration: "<config> <mean_ms> <min_ms>".
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# The seed's configurations (BENCHMARKS.md): batch, sequence, segments, dilation rates.
CONFIGS = {
    "small": (1, 2048, [1024, 2048], [1, 2]),
    "medium": (2, 4096, [1024, 2048, 4096], [1, 2, 4]),
    "large": (4, 8192, [2048, 4096, 8192], [1, 2, 4]),
}


def dilated_attention(q, k, v, segments, rates, causal):
    """q, k, v: [B, N, H, D]; the seed's groups mode with torch's fused attention."""
    b, n, h, d = q.shape
    groups = len(segments)
    sizes = [h // groups + (1 if i < h % groups else 0) for i in range(groups)]
    out = torch.zeros_like(q)
    h0 = 0
    for i, (g, s, r) in enumerate(zip(sizes, segments, rates)):
        h1 = h0 + g
        offset = i % r

        def kept(x):
            x = x[:, :, h0:h1].contiguous().view(b, n // s, s, g, d)[:, :, offset::r]
            return x.reshape(b * (n // s), -1, g, d).transpose(1, 2)

        y = F.scaled_dot_product_attention(kept(q), kept(k), kept(v), is_causal=causal)
        y = y.transpose(1, 2).reshape(b, n // s, -1, g, d)
        group = out[:, :, h0:h1].contiguous().view(b, n // s, s, g, d)
        # (An out-of-place add: with r = 1 the in-place += on this view fails under autograd.)
        group[:, :, offset::r] = group[:, :, offset::r] + y
        out[:, :, h0:h1] = group.view(b, n, g, d)
        h0 = h1
    return out / groups


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    names = list(CONFIGS) if a.config == "all" else [a.config]
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}, causal, "
          "groups")
    for name in names:
        b, n, segments, rates = CONFIGS[name]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, n, a.heads, a.head_dim, generator=gen).to(dtype)
                   for _ in range(3))
        times = []
        with torch.no_grad():
            for i in range(a.warmup + a.iters):
                start = time.perf_counter()
                dilated_attention(q, k, v, segments, rates, True)
                if i >= a.warmup:
                    times.append((time.perf_counter() - start) * 1e3)
        print(f"{name} {statistics.mean(times):.1f} {min(times):.1f}")


if __name__ == "__main__":
    main()
