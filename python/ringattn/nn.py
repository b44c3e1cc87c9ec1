"""torch.nn modules with the Python project's names, argument order and forward signatures
(SPEC.md, "The Python project's multihead layer"), so its models and state dicts carry over.
Projections and norms are torch modules (FSDP, autocast and torch.compile see them as usual);
only the attention core calls ringattn. What is not supported yet raises ringattn.Error and
names the alternative: the Python project silently ignores masks, these modules never do.
"""

import torch
from torch import nn

from . import _C
from .distributed import group_rank_size, register
from .ops import block_sparse_attn_func, dilated_attn_func

__all__ = [
    "DilatedAttention",
    "RingDilatedAttention",
    "BlockSparseRingDilatedAttention",
    "MultiheadDilatedAttention",
    "DistributedDilatedAttention",
    "FusedMultiheadDilatedAttention",
]


def _unsupported(message):
    return _C.UnsupportedError(f"ringattn: unsupported: {message}")


def _check_core_call(module, attention_mask, dropout):
    if attention_mask is not None:
        raise _unsupported(
            f"{type(module).__name__}: attention_mask is not supported yet (the Python project "
            "ignores it; ringattn refuses rather than compute something else); pass "
            "attention_mask=None and use is_causal=True for causal masking"
        )
    if dropout > 0.0 and module.training:
        raise _unsupported(
            f"{type(module).__name__}: attention dropout ({dropout}) in training is not "
            "supported yet; construct it with dropout 0.0 or call .eval()"
        )


class DilatedAttention(nn.Module):
    """The attention core on [B, N, H, D] query, key and value (the Python project's
    DilatedAttention; mode "groups" by default, "longnet" is one argument away)."""

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0,
                 *, mode="groups", group=None):
        super().__init__()
        self.segment_lengths = [int(s) for s in segment_lengths]
        self.dilation_rates = [int(r) for r in dilation_rates]
        self.softmax_scale = softmax_scale
        self.attention_dropout = float(attention_dropout)
        self.mode = mode
        self.group = group
        register(group)

    def forward(self, query, key, value, is_causal=False, attention_mask=None):
        _check_core_call(self, attention_mask, self.attention_dropout)
        return dilated_attn_func(
            query, key, value, self.segment_lengths, self.dilation_rates, mode=self.mode,
            causal=is_causal, softmax_scale=self.softmax_scale, group=self.group,
        )

    def extra_repr(self):
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"mode={self.mode!r}")


class RingDilatedAttention(DilatedAttention):
    """DilatedAttention over the ranks of ``group`` (sequence parallel): each rank passes its
    contiguous shard of the sequence and gets the same rows of the one-process result."""

    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0,
                 *, mode="groups", group=None):
        super().__init__(segment_lengths, dilation_rates, softmax_scale, attention_dropout,
                         mode=mode, group=group)


class BlockSparseRingDilatedAttention(nn.Module):
    """Block-sparse attention on [B, N, H, D] (one joint softmax over a query block's listed key
    blocks); ``pattern``: a ringattn.BlockPattern or one per query head. Over ``group`` a rank
    fetches only the key/value blocks its query blocks list."""

    def __init__(self, pattern, softmax_scale=None, attention_dropout=0.0, *, group=None):
        super().__init__()
        self.pattern = pattern
        self.softmax_scale = softmax_scale
        self.attention_dropout = float(attention_dropout)
        self.group = group
        register(group)

    def forward(self, query, key, value, is_causal=False, attention_mask=None):
        _check_core_call(self, attention_mask, self.attention_dropout)
        return block_sparse_attn_func(query, key, value, self.pattern, causal=is_causal,
                                      softmax_scale=self.softmax_scale, group=self.group)


class MultiheadDilatedAttention(nn.Module):
    """The Python project's multihead layer: q/k/v projections, LayerNorms q_ln and k_ln, the
    groups-mode core, q_ln again on the attention output (reused as the sub-LayerNorm, as the
    Python project does), out_proj. Initialisation: xavier_normal_(gain=gamma_init) on the four
    projection weights, zero biases. [B, N, E] in and out."""

    def __init__(self, embed_dim, num_heads, dilation_rates, segment_lengths, dropout=0.0,
                 bias=True, layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None,
                 dtype=None, *, mode="groups", group=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise _C.InvalidArgumentError(
                f"embed_dim = {embed_dim} is not divisible by num_heads = {num_heads}; pick "
                "num_heads dividing embed_dim"
            )
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.layer_norm, self.gamma_init = layer_norm, gamma_init
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.attention = DilatedAttention(segment_lengths, dilation_rates,
                                          attention_dropout=dropout, mode=mode, group=group)
        if layer_norm:
            self.q_ln = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw)
            self.k_ln = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._reset_parameters()

    def _reset_parameters(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_normal_(proj.weight, gain=self.gamma_init)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=False,
                attn_mask=None, is_causal=False, average_attn_weights=True):
        name = type(self).__name__
        if key_padding_mask is not None or attn_mask is not None:
            raise _unsupported(
                f"{name}: key_padding_mask and attn_mask are not supported yet (the Python "
                "project ignores them; ringattn refuses rather than compute something else); "
                "pass None and use is_causal=True for causal masking"
            )
        if need_weights:
            raise _unsupported(
                f"{name}: need_weights=True is not supported (ringattn never forms the attention "
                "weights); call with need_weights=False"
            )
        key = query if key is None else key
        value = query if value is None else value
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.layer_norm:
            q, k = self.q_ln(q), self.k_ln(k)
        b, n, _ = q.shape
        heads = (b, n, self.num_heads, self.embed_dim // self.num_heads)
        x = self.attention(q.view(heads), k.view(heads), v.view(heads), is_causal=is_causal)
        x = x.reshape(b, n, self.embed_dim)
        if self.layer_norm:
            x = self.q_ln(x)
        return self.out_proj(x)

    def fused(self, threads=None):
        """This layer's weights in the fused C++ MultiheadDilatedAttention (fp32, CPU,
        forward only): one call per forward, no autograd. For inference and benchmarks."""
        return FusedMultiheadDilatedAttention(self, threads)


class DistributedDilatedAttention(MultiheadDilatedAttention):
    """MultiheadDilatedAttention over the ranks of ``group`` (sequence parallel): x is this
    rank's shard [B, N_loc, E]; the attention core is the ring, projections and norms are
    local. Weights are replicated: sum (or average, as DDP does) their gradients over the group."""

    def __init__(self, embed_dim, num_heads, dilation_rates, segment_lengths, dropout=0.0,
                 bias=True, layer_norm=True, layer_norm_eps=1e-5, gamma_init=1.0, device=None,
                 dtype=None, *, mode="groups", group=None):
        super().__init__(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias,
                         layer_norm, layer_norm_eps, gamma_init, device, dtype, mode=mode,
                         group=group)
        self.rank, self.world_size = group_rank_size(group)


class FusedMultiheadDilatedAttention:
    """The C++ MultiheadDilatedAttention with a MultiheadDilatedAttention's current weights
    (q_ln serves as both the q norm and the output sub-LayerNorm). Call it on fp32 CPU tensors
    [B, N, E]; it reads the weights once, at construction."""

    def __init__(self, module, threads=None):
        if module.attention.group is not None:
            raise _unsupported("the fused layer runs in one process; use the module itself")

        def flat(t):
            return t.detach().to(device="cpu", dtype=torch.float32).contiguous().view(-1).numpy()

        weights = {"wq": module.q_proj.weight, "wk": module.k_proj.weight,
                   "wv": module.v_proj.weight, "wo": module.out_proj.weight}
        if module.q_proj.bias is not None:
            weights.update(bq=module.q_proj.bias, bk=module.k_proj.bias, bv=module.v_proj.bias,
                           bo=module.out_proj.bias)
        if module.layer_norm:
            weights.update(q_norm_weight=module.q_ln.weight, q_norm_bias=module.q_ln.bias,
                           k_norm_weight=module.k_ln.weight, k_norm_bias=module.k_ln.bias,
                           out_norm_weight=module.q_ln.weight, out_norm_bias=module.q_ln.bias)
        flat_weights = {name: flat(t) for name, t in weights.items()}
        core = module.attention
        self._layer = lambda causal: _C.FusedMultihead(
            module.embed_dim, module.num_heads, module.num_heads, core.segment_lengths,
            core.dilation_rates, core.mode, causal, core.softmax_scale,
            module.q_proj.bias is not None, module.layer_norm,
            module.q_ln.eps if module.layer_norm else 1e-5, flat_weights,
            torch.get_num_threads() if threads is None else threads,
        )
        self._layers = {}

    def __call__(self, query, key=None, value=None, is_causal=False):
        if is_causal not in self._layers:
            self._layers[is_causal] = self._layer(is_causal)
        key = query if key is None else key
        value = query if value is None else value
        y = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        self._layers[is_causal].forward(query.detach(), key.detach(), value.detach(), y)
        return y
