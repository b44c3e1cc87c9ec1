"""One rank of the multi-process tests (test_distributed.py starts them): every rank makes the
same whole tensors, runs ringattn on its shard over the group and compares its rows, forward
and backward, with the one-process result computed here on the whole sequence. Prints one
line per check and exits non-zero if any failed.

  torch.distributed (gloo): RANK, WORLD_SIZE and RINGATTN_TEST_STORE (a file) in the environment
  MPI:                      mpirun -np P python dist_worker.py --backend mpi
--case bad_shape: rank 1 passes a shard of the wrong length; every rank must raise.
--case stall: rank 1 never calls; rank 0's call must end at the deadline (RINGATTN_TIMEOUT_S).
"""

import argparse
import os
import sys
import time

import torch

import ringattn

failures = []


def check(name, actual, expected, rel=1e-5, floor=1.0):
    """max |actual - expected| <= rel * max(floor, max |expected|)."""
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(floor, expected.abs().max().item())
    ok = err <= rel * scale and expected.abs().max() > 0 and torch.isfinite(actual).all()
    print(f"rank {RANK}: {name}: max err {err:.3g} {'ok' if ok else 'FAILED'}", flush=True)
    if not ok:
        failures.append(name)


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def leaf(x):
    return x.detach().clone().requires_grad_()


def compare_function(name, fn, group, shapes, seed):
    """fn(q, k, v, group) on this rank's shard against fn(..., None) on the whole tensors."""
    whole = [rand(*s, seed=seed + i) for i, s in enumerate(shapes)]
    dout = rand(*shapes[0], seed=seed + 9)
    mine = [leaf(ringattn.shard_sequence(t, group)) for t in whole]
    out = fn(*mine, group)
    out.backward(ringattn.shard_sequence(dout, group))
    ref = [leaf(t) for t in whole]
    ref_out = fn(*ref, None)
    ref_out.backward(dout)
    check(f"{name} out", out, ringattn.shard_sequence(ref_out, group))
    for label, x, r in zip("qkv", mine, ref):
        check(f"{name} d{label}", x.grad, ringattn.shard_sequence(r.grad, group))
    check(f"{name} gather_sequence", ringattn.gather_sequence(out.detach(), group), ref_out)


def run_checks(group, world, fresh):
    """fresh: another group of the same ranks, registered, then first used under
    torch.compile."""
    n = 128 * world
    shape, gqa = (2, n, 4, 32), (2, n, 2, 32)
    for mode, causal in (("groups", True), ("longnet", False), ("longnet", True)):
        compare_function(
            f"dilated {mode} causal={causal}",
            lambda q, k, v, g: ringattn.dilated_attn_func(
                q, k, v, [64, 128, n], [1, 2, 4], mode=mode, causal=causal, group=g),
            group, [shape, gqa, gqa], seed=1)
    compare_function(
        "block_sparse local_window causal",
        lambda q, k, v, g: ringattn.block_sparse_attn_func(
            q, k, v, ringattn.BlockPattern.local_window(32, 96), causal=True, group=g),
        group, [shape, gqa, gqa], seed=2)

    # Under torch.compile(fullgraph=True): the group is looked up while tracing, the ring runs
    # inside the compiled graph, forward and backward.
    def attention(q, k, v, g):
        return ringattn.dilated_attn_func(q, k, v, [64, n], [1, 2], causal=True, group=g)

    ringattn.distributed.register(fresh)
    compiled = torch.compile(attention, fullgraph=True)
    compare_function("torch.compile ring", lambda q, k, v, g: (compiled if g is not None else
                                                                attention)(q, k, v, g),
                     fresh, [shape, shape, shape], seed=10)

    # The multihead layer, sequence parallel: y rows and every weight gradient (summed over
    # the ranks) equal the one-process layer's.
    torch.manual_seed(3)
    layer = ringattn.nn.DistributedDilatedAttention(64, 4, [1, 2], [64, n], group=group)
    whole = ringattn.nn.MultiheadDilatedAttention(64, 4, [1, 2], [64, n])
    whole.load_state_dict(layer.state_dict())
    x, dy = rand(2, n, 64, seed=4), rand(2, n, 64, seed=5)
    y = layer(ringattn.shard_sequence(x, group), is_causal=True)
    y.backward(ringattn.shard_sequence(dy, group))
    y_ref = whole(x, is_causal=True)
    y_ref.backward(dy)
    check("DistributedDilatedAttention y", y, ringattn.shard_sequence(y_ref, group))
    # The gradients of k_proj.bias and k_ln.bias are 0 up to rounding (they shift every score
    # of a query alike): every gradient is compared on the scale of the largest one.
    largest = max(r.grad.abs().max().item() for r in whole.parameters())
    for (name, p), r in zip(layer.named_parameters(), whole.parameters()):
        g = p.grad.clone()
        all_reduce(g, group)
        check(f"DistributedDilatedAttention d{name}", g, r.grad, floor=largest)


def all_reduce(t, group):
    if BACKEND == "mpi":
        from mpi4py import MPI

        buf = t.numpy()
        group.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    else:
        torch.distributed.all_reduce(t, group=group)


def run_bad_shape(group, world):
    """Rank 1 passes a shard of another length (the ranks disagree), then a float64 shard (the
    binding rejects it before the library runs): each time every rank raises."""
    cases = [
        ("shard length", lambda: rand(1, 128 if RANK != 1 else 96, 2, 16, seed=6), "disagree"),
        ("dtype", lambda: rand(1, 128, 2, 16, seed=6).to(torch.float64 if RANK == 1 else
                                                        torch.float32), "float64"),
    ]
    for name, make_q, expected in cases:
        q = make_q()
        k, v = (rand(1, q.shape[1], 2, 16, seed=7 + i) for i in range(2))
        try:
            ringattn.dilated_attn_func(q, k.to(q.dtype), v.to(q.dtype), [64], [1], group=group)
        except ringattn.Error as e:
            text = str(e)
            ok = expected in text and (RANK == 1 or "rank 1" in text)
            print(f"rank {RANK}: bad {name} raised {type(e).__name__}: {text[:160]} "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failures.append(f"bad {name} message")
        else:
            print(f"rank {RANK}: bad {name} did not raise FAILED", flush=True)
            failures.append(f"bad {name}")
    # The group still works afterwards (nothing was left in flight).
    q, k, v = (rand(1, 128, 2, 16, seed=9 + i) for i in range(3))
    out = ringattn.dilated_attn_func(q, k, v, [64], [1], group=group)
    ref = ringattn.dilated_attn_func(*(rand(1, 128 * world, 2, 16, seed=9 + i)
                                       for i in range(3)), [64], [1])
    # Each rank used the same seed, so its shard equals the first N_loc rows of a whole
    # sequence only at rank 0; compare there (and check finiteness everywhere).
    if RANK == 0:
        check("after the error", out, ref[:, :128])
    elif not torch.isfinite(out).all():
        failures.append("after the error")


def run_stall(group, world):
    """Rank 1 stays away: rank 0's call ends with a CommunicationError at the deadline (the
    transport waits within it), not a hang. Both ranks then leave without tearing the group
    down (it has a transfer that will never complete)."""
    if RANK == 1:
        time.sleep(float(os.environ["RINGATTN_TIMEOUT_S"]) * 4)
        print("rank 1: stayed away; all ok", flush=True)
        os._exit(0)
    q, k, v = (rand(1, 128, 2, 16, seed=12 + i) for i in range(3))
    start = time.monotonic()
    try:
        ringattn.dilated_attn_func(q, k, v, [64], [1], group=group)
    except ringattn.CommunicationError as e:
        elapsed = time.monotonic() - start
        deadline = float(os.environ["RINGATTN_TIMEOUT_S"])
        ok = deadline * 0.9 <= elapsed <= deadline * 3
        print(f"rank 0: raised after {elapsed:.1f} s (deadline {deadline} s): {str(e)[:200]} "
              f"{'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failures.append("stall timing")
    else:
        failures.append("stall did not raise")
    print(f"rank 0: {'FAILED ' + ', '.join(failures) if failures else 'all ok'}", flush=True)
    os._exit(1 if failures else 0)


def main():
    global RANK, BACKEND
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["gloo", "mpi"], required=True)
    ap.add_argument("--case", choices=["checks", "bad_shape", "stall"], default="checks")
    a = ap.parse_args()
    BACKEND = a.backend
    torch.set_num_threads(1)
    if a.backend == "mpi":
        from mpi4py import MPI

        group = MPI.COMM_WORLD
        RANK, world = group.Get_rank(), group.Get_size()
        fresh = group.Dup()
    else:
        RANK, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{os.environ['RINGATTN_TEST_STORE']}", rank=RANK,
            world_size=world)
        group = torch.distributed.group.WORLD
        fresh = torch.distributed.new_group(list(range(world)))
    if a.case == "checks":
        run_checks(group, world, fresh)
    elif a.case == "stall":
        run_stall(group, world)
    else:
        run_bad_shape(group, world)
    if a.backend == "gloo":
        torch.distributed.destroy_process_group()
    print(f"rank {RANK}: {'FAILED ' + ', '.join(failures) if failures else 'all ok'}", flush=True)
    sys.exit(1 if failures else 0)


RANK, BACKEND = 0, ""
if __name__ == "__main__":
    main()
