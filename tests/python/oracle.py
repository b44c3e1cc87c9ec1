"""Brute-force oracles of SPEC.md in torch (any dtype; fp64 for references), written from the
definitions: every (query, key) pair a branch or a block pattern allows is a boolean mask
entry, and attention is a masked softmax over whole rows. Differentiable, so torch.autograd
gives the reference gradients."""

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import seed_python  # noqa: E402  (the seed's groups-mode algorithm on torch's attention)

seed_dilated_attention = seed_python.dilated_attention


def _masked_attention(q, k, v, mask, scale):
    """q [B, N, H, D], k, v [B, N, H, D], mask [H, N, N] (query, key): (out, lse [B, H, N])."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    # Rows that see no key get lse = -inf and out = 0; their scores are replaced by zeros
    # first so that no -inf - -inf (NaN) reaches the gradient.
    sees = mask.any(-1)
    s = s.masked_fill(~mask & sees[..., None], float("-inf")).masked_fill(~sees[..., None], 0.0)
    row_lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(sees, row_lse, float("-inf"))
    p = torch.exp(s - torch.where(sees, row_lse, 0.0).unsqueeze(-1)).masked_fill(~mask, 0.0)
    return torch.einsum("bhnm,bmhd->bnhd", p, v), lse


def _branch_mask(n, s, r, offset, causal):
    pos = torch.arange(n)
    kept = (pos % s) % r == offset  # row j*s + offset + t*r of segment j
    same = (pos[:, None] // s) == (pos[None, :] // s)
    mask = same & kept[:, None] & kept[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    return mask


def group_sizes(heads, groups):
    return [heads // groups + (1 if i < heads % groups else 0) for i in range(groups)]


def dilated(q, k, v, segments, rates, mode="groups", causal=False, scale=None):
    """Dilated attention of SPEC.md: (out, lse). k, v may have fewer (GQA) heads."""
    b, n, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = len(segments)
    if mode == "groups":
        head_branch = [i for i, size in enumerate(group_sizes(h, g)) for _ in range(size)]
        mask = torch.stack([
            _branch_mask(n, segments[i], rates[i], i % rates[i], causal) for i in head_branch
        ])
        out, lse = _masked_attention(q, k, v, mask, scale)
        return out / g, lse
    outs, lses = [], []
    for s, r in zip(segments, rates):
        mask = torch.stack([_branch_mask(n, s, r, head % r, causal) for head in range(h)])
        o, l = _masked_attention(q, k, v, mask, scale)
        outs.append(o)
        lses.append(l)
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    out = sum(o * torch.exp(l - safe).transpose(1, 2).unsqueeze(-1) for o, l in zip(outs, lses))
    return out, lse


def block_sparse(q, k, v, key_blocks, block_size, causal=False, scale=None):
    """One joint softmax per query row over the keys of its query block's key blocks.
    key_blocks: per head (or one for all) a list, per query block, of key-block indices."""
    b, n, h, d = q.shape
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    per_head = key_blocks if isinstance(key_blocks[0][0], list) else [key_blocks] * h
    pos = torch.arange(n)
    masks = []
    for blocks in per_head:
        allowed = torch.zeros(n // block_size, n // block_size, dtype=torch.bool)
        for qb, kbs in enumerate(blocks):
            allowed[qb, kbs] = True
        mask = allowed[pos[:, None] // block_size, pos[None, :] // block_size]
        if causal:
            mask &= pos[None, :] <= pos[:, None]
        masks.append(mask)
    return _masked_attention(q, k, v, torch.stack(masks), scale)


def local_window_blocks(blocks, block_size, window):
    w = -(-window // block_size)
    return [[kb for kb in range(blocks) if abs(kb - qb) <= w] for qb in range(blocks)]


def dilated_blocks(blocks, rates):
    return [
        sorted({qb} | {qb + s * r for r in rates for s in (-1, 1) if 0 <= qb + s * r < blocks})
        for qb in range(blocks)
    ]
