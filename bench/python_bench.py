"""The Python package against the C++ call and against torch, alternated in one run.

Rows (fp32, causal, groups mode, 8 heads of 64, forward, the same threads everywhere):
  python   ringattn.dilated_attn_func on torch tensors (the package: the torch operator, DLPack,
           output allocation, the C++ kernel)
  cpp      the same row through ringattn_bench --impl dilated (the C++ call alone, timed inside)
  torch    the Python project's algorithm on torch's scaled_dot_product_attention
           (bench/seed_python.py)
on the seed's three configurations, then a sweep of the sequence length (B = 1, segments
N/4, N/2, N with rates 1, 2, 4) for python and torch. Every round runs each side once per
row, in turn (A B C A B C ...), so the machine's noise hits all alike; the binding overhead is
the python / cpp ratio of the rounds' means on the large configuration (target: at most 1.03).
As rounds seconds apart see different loads on a shared machine, the overhead is also measured
call by call: --pairs single calls of the package and of the C++ call from Python (ringattn._C
with preallocated outputs) alternated in one process, on the large configuration; it reports
the median of the pairs' ratios and the page faults of each call. A torch operator returns
a fresh output: for one this large (64 MB) glibc maps new memory at every call, which the
first write faults in and the kernel zeroes; MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296 in the environment (a process-wide glibc setting) makes it
reuse freed memory instead. Writes --json (every round's times and the summary) and --png
(time against sequence length, and the seed's configurations side by side).

  python bench/python_bench.py --threads 2 --rounds 3 --json bench.json --png bench.png
(launch/python_bench.sh builds, makes the environment and runs it.)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ringattn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_python import CONFIGS, dilated_attention as seed_attention  # noqa: E402

HEADS, HEAD_DIM = 8, 64


def inputs(batch, seq):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seq, HEADS, HEAD_DIM, generator=g) for _ in range(3)]


def time_in_process(fn, warmup, iters):
    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def time_cpp(bench, row, threads, warmup, iters):
    batch, seq, segments, rates = row
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            [bench, "--impl", "dilated", "--batch", str(batch), "--seq", str(seq),
             "--heads", str(HEADS), "--head-dim", str(HEAD_DIM),
             "--segments", ",".join(map(str, segments)),
             "--dilations", ",".join(map(str, rates)), "--causal", "1", "--mode", "groups",
             "--threads", str(threads), "--warmup", str(warmup), "--iters", str(iters),
             "--json", f.name],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (record,) = json.load(open(f.name))
    return record["mean_ms"], record["min_ms"]


def measure(rows, sides, a, bench):
    """{(row name, side): [mean ms of each round]}, the sides alternated row by row."""
    results = {}
    for rnd in range(a.rounds):
        for name, row in rows:
            batch, seq, segments, rates = row
            q, k, v = inputs(batch, seq)
            for side in sides:
                if side == "cpp":
                    mean, best = time_cpp(bench, row, a.threads, a.warmup, a.iters)
                else:
                    fn = {
                        "python": lambda: ringattn.dilated_attn_func(q, k, v, segments, rates,
                                                                     causal=True),
                        "torch": lambda: seed_attention(q, k, v, segments, rates, True),
                    }[side]
                    times = time_in_process(fn, a.warmup, a.iters)
                    mean, best = statistics.mean(times), min(times)
                results.setdefault((name, side), []).append({"mean_ms": mean, "min_ms": best})
                print(f"# round {rnd + 1}/{a.rounds} {name:>9} {side:>6} {mean:10.1f} ms",
                      file=sys.stderr, flush=True)
    return results


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure_pairs(row, pairs, threads):
    """The package against ringattn._C on preallocated outputs, single calls alternated."""
    batch, seq, segments, rates = row
    q, k, v = inputs(batch, seq)
    out, lse = torch.empty_like(q), torch.empty(batch, HEADS, seq)

    def package():
        ringattn.dilated_attn_func(q, k, v, segments, rates, causal=True)

    spec = ringattn._C.DilatedSpec(segments, rates, "groups", True, None)

    def direct():
        ringattn._C.forward(q, k, v, out, lse, spec, None, "cpu", threads, 0)

    sides = {"python": package, "c_direct": direct}
    record = {name: {"ms": [], "faults": []} for name in sides}
    with torch.no_grad():
        for fn in sides.values():
            fn()
        for i in range(pairs):
            for name, fn in sides.items():
                f0, t0 = faults(), time.perf_counter()
                fn()
                record[name]["ms"].append((time.perf_counter() - t0) * 1e3)
                record[name]["faults"].append(faults() - f0)
    ratios = [p / c for p, c in zip(record["python"]["ms"], record["c_direct"]["ms"])]
    record["ratio_median"] = statistics.median(ratios)
    record["ratio_mean"] = statistics.mean(ratios)
    return record


def summary(results, name, side):
    means = [r["mean_ms"] for r in results[(name, side)]]
    return {"mean_ms": statistics.mean(means), "best_round_ms": min(means)}


def plot(path, seed_rows, sweep_rows, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {"python": "ringattn (Python package)", "cpp": "ringattn (C++ call)",
              "torch": "torch SDPA, the seed's algorithm"}
    colors = {"python": "tab:blue", "cpp": "tab:green", "torch": "tab:orange"}
    seqs = [row[1] for _, row in sweep_rows]
    for side in ("python", "torch"):
        left.plot(seqs, [summary(results, name, side)["best_round_ms"] for name, _ in sweep_rows],
                  "o-", color=colors[side], label=labels[side])
    left.set(yscale="log", xlabel="sequence length N (B = 1)",
             ylabel="forward ms (best round's mean)",
             title="segments N/4, N/2, N; rates 1, 2, 4")
    left.set_xscale("log", base=2)
    left.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(seqs))
    left.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(s) for s in seqs]))
    left.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    left.legend()
    width = 0.27
    for i, side in enumerate(("python", "cpp", "torch")):
        xs = [j + (i - 1) * width for j in range(len(seed_rows))]
        ms = [summary(results, name, side)["best_round_ms"] for name, _ in seed_rows]
        right.bar(xs, ms, width, color=colors[side], label=labels[side])
    right.set_xticks(range(len(seed_rows)),
                     [f"{name}\nB={r[0]}, N={r[1]}" for name, r in seed_rows])
    right.set(yscale="log", ylabel="forward ms", title="the seed's configurations")
    right.legend(fontsize=8)
    fig.suptitle(f"fp32, causal, groups mode, {HEADS} heads x {HEAD_DIM}, "
                 f"{torch.get_num_threads()} CPU threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="build/bench/ringattn_bench",
                    help="the ringattn_bench binary (the same build as the package)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--sweep", default="2048,4096,8192,16384,32768",
                    help="sequence lengths of the sweep (empty: none)")
    ap.add_argument("--pairs", type=int, default=10,
                    help="alternated single calls for the call-by-call overhead (0: none)")
    ap.add_argument("--json", help="write the rounds and the summary here")
    ap.add_argument("--png", help="write the figure here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seed_rows = list(CONFIGS.items())
    sweep_rows = [(f"N={n}", (1, n, [n // 4, n // 2, n], [1, 2, 4]))
                  for n in map(int, filter(None, a.sweep.split(",")))]
    load = os.getloadavg()
    print(f"# ringattn {ringattn.__version__} ({ringattn.cpu_simd_target()}), torch "
          f"{torch.__version__}, {a.threads} threads, {a.rounds} rounds of {a.warmup} + "
          f"{a.iters} iterations, load average {load[0]:.2f} at start")
    results = measure(seed_rows, ("python", "cpp", "torch"), a, a.bench)
    results.update(measure(sweep_rows, ("python", "torch"), a, a.bench))
    print(f"{'row':>9} {'python_ms':>10} {'cpp_ms':>9} {'torch_ms':>9} {'python/cpp':>10} "
          f"{'torch/python':>12}")
    table = []
    for name, row in seed_rows + sweep_rows:
        rec = {"row": name, "batch": row[0], "seq": row[1], "segments": row[2], "rates": row[3]}
        for side in ("python", "cpp", "torch"):
            if (name, side) in results:
                rec[side] = summary(results, name, side)
                rec[side]["rounds"] = results[(name, side)]
        py, th = rec["python"]["mean_ms"], rec["torch"]["mean_ms"]
        cpp = rec["cpp"]["mean_ms"] if "cpp" in rec else None
        if cpp:
            # Paired by round: each round's python and cpp ran back to back.
            ratios = [p["mean_ms"] / c["mean_ms"] for p, c in
                      zip(results[(name, "python")], results[(name, "cpp")])]
            rec["python_over_cpp"] = {"mean": statistics.mean(ratios), "rounds": ratios}
        table.append(rec)
        cpp_ms = f"{cpp:9.1f}" if cpp else f"{'-':>9}"
        ratio = f"{rec['python_over_cpp']['mean']:10.3f}" if cpp else f"{'-':>10}"
        print(f"{name:>9} {py:10.1f} {cpp_ms} {th:9.1f} {ratio} {th / py:12.2f}")
    pairs = measure_pairs(CONFIGS["large"], a.pairs, a.threads) if a.pairs else None
    if pairs:
        med = {name: statistics.median(pairs[name]["ms"]) for name in ("python", "c_direct")}
        flt = {name: statistics.median(pairs[name]["faults"]) for name in ("python", "c_direct")}
        print(f"# large, {a.pairs} alternated pairs: package {med['python']:.1f} ms "
              f"({flt['python']:.0f} page faults), ringattn._C on preallocated outputs "
              f"{med['c_direct']:.1f} ms ({flt['c_direct']:.0f}): package / C++ call median "
              f"{pairs['ratio_median']:.3f}, mean {pairs['ratio_mean']:.3f}")
    load = os.getloadavg()
    print(f"# load average {load[0]:.2f} at the end; python/cpp is the mean of the rounds' "
          "ratios, the others the mean of the rounds' means")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "torch": torch.__version__,
                       "ringattn": ringattn.__version__, "rows": table, "pairs": pairs,
                       "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "")},
                      f, indent=1)
    if a.png:
        plot(a.png, seed_rows, sweep_rows, results)


if __name__ == "__main__":
    main()
