"""Trains a small LongNet-style language model with ringattn on the CPU: one process, or the
sequence sharded over a ring of processes (torchrun or mpirun), with the same numbers.

The data: sequences of a fixed random order-2 Markov chain (each token drawn from a peaked
distribution given the two before it), so that beating the bigram statistics needs attention
to the previous tokens; the loss falls from log(vocab) towards the chain's entropy. The model:
token and position embeddings, pre-LayerNorm blocks of ringattn.nn.MultiheadDilatedAttention
(causal, segments N/4, N/2, N with rates 1, 2, 4, groups mode as in the Python project) and an
MLP, a linear head.

  python examples/train_longnet.py --steps 300
  torchrun --standalone --nproc-per-node 2 examples/train_longnet.py --steps 300
  mpirun -np 2 python examples/train_longnet.py --steps 300 --mpi

Over P ranks each rank holds N/P consecutive positions of every sequence; the attention
layers exchange keys and values over the ring, everything else is per token. Each rank's
loss is its tokens' share of the mean, so the gradients summed over the ranks are the
one-process gradients, and every rank takes the same optimizer step.
"""

import argparse
import math
import os

import torch
from torch import nn

import ringattn


class Block(nn.Module):
    def __init__(self, dim, heads, seq, group):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = ringattn.nn.MultiheadDilatedAttention(
            dim, heads, [1, 2, 4], [seq // 4, seq // 2, seq], group=group)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x), is_causal=True)
        return x + self.mlp(self.norm2(x))


class LongNetLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, seq, group=None):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, seq, group) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, tokens, positions):
        x = self.tokens(tokens) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class Chain:
    """An order-2 Markov chain over `vocab` tokens with peaked transitions (a fixed seed)."""

    def __init__(self, vocab):
        g = torch.Generator().manual_seed(7)
        self.p = torch.softmax(3.0 * torch.randn(vocab, vocab, vocab, generator=g), dim=-1)
        # The entropy of the next token given the two before it (the loss's floor), averaged
        # over the pairs as if uniform.
        self.entropy = -(self.p * self.p.log()).sum(-1).mean().item()

    def batch(self, step, batch, seq):
        """Inputs and next-token targets [batch, seq], the same on every rank for a step."""
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, :2] = torch.randint(0, self.p.shape[0], (batch, 2), generator=g)
        for i in range(2, seq + 1):
            x[:, i] = torch.multinomial(self.p[x[:, i - 2], x[:, i - 1]], 1, generator=g)[:, 0]
        return x[:, :-1], x[:, 1:]


class Group:
    """The ranks: None (one process), a torch.distributed group or an mpi4py communicator."""

    def __init__(self, use_mpi):
        self.handle, self.rank, self.size = None, 0, 1
        if use_mpi:
            from mpi4py import MPI

            self.handle = MPI.COMM_WORLD
            self.rank, self.size = self.handle.Get_rank(), self.handle.Get_size()
        elif "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            torch.distributed.init_process_group("gloo")
            self.handle = torch.distributed.group.WORLD
            self.rank, self.size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def sum_(self, t):
        """Sums t over the ranks, in place."""
        if self.handle is None:
            return t
        if hasattr(self.handle, "Allreduce"):
            from mpi4py import MPI

            self.handle.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
        else:
            torch.distributed.all_reduce(t)
        return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: default)")
    ap.add_argument("--mpi", action="store_true", help="the ranks are MPI's (mpirun)")
    ap.add_argument("--log-every", type=int, default=25)
    a = ap.parse_args()
    group = Group(a.mpi)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = LongNetLM(a.vocab, a.dim, a.heads, a.layers, a.seq, group.handle)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    # This rank's positions of every sequence.
    n_loc = a.seq // group.size
    positions = torch.arange(group.rank * n_loc, (group.rank + 1) * n_loc)
    lead = group.rank == 0
    chain = Chain(a.vocab)
    if lead:
        print(f"# {sum(p.numel() for p in model.parameters())} parameters, {group.size} rank(s), "
              f"{n_loc} positions each; loss of a uniform guess log(vocab) = "
              f"{math.log(a.vocab):.3f}, the chain's entropy about {chain.entropy:.3f}")
    first = last = None
    for step in range(a.steps):
        tokens, targets = chain.batch(step, a.batch, a.seq)
        tokens, targets = tokens[:, positions], targets[:, positions]
        logits = model(tokens, positions.expand(a.batch, -1))
        # This rank's share of the mean over all batch x seq tokens.
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                           reduction="sum") / (a.batch * a.seq)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            group.sum_(p.grad)
        opt.step()
        total = group.sum_(loss.detach().clone()).item()
        first = total if first is None else first
        last = total
        if lead and (step % a.log_every == 0 or step == a.steps - 1):
            print(f"step {step:4d} loss {total:.4f}", flush=True)
    if lead:
        print(f"# loss {first:.4f} -> {last:.4f}")
    if group.handle is not None and not a.mpi:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
