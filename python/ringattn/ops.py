"""The attention functions as torch operators (torch.library.custom_op): shapes for tracing
(fake kernels), autograd through the C++ backward, so torch.compile(fullgraph=True) runs
through them. The kernels are ringattn._C's, reached through DLPack: CPU tensors run on
torch.get_num_threads() threads, CUDA tensors on torch.cuda.current_stream() without blocking.
"""

import contextlib
from typing import List, Optional, Tuple

import numpy as np
import torch

from . import _C
from . import distributed as _dist

__all__ = ["dilated_attn_func", "block_sparse_attn_func", "BlockPattern", "block_sparse_density"]

BlockPattern = _C.BlockPattern
Tensor = torch.Tensor
# (typing.List and Tuple, not list[int]: torch 2.4's schema inference knows only these.)


def _lse_shape(q):
    # [B, H, N]; a q that is not [B, N, H, D] gets an empty lse and ringattn's error about q
    # (on every rank of a group: the library checks before anything else).
    return (q.shape[0], q.shape[2], q.shape[1]) if len(q.shape) == 4 else (0,)


def _forward_outputs(q):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=torch.float32)


def _backward_outputs(q, k, v):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _run_args(q):
    """(threads, stream) for the device of q, and the device context the call runs in."""
    if q.device.type == "cuda":
        return 0, torch.cuda.current_stream(q.device).cuda_stream, torch.cuda.device(q.device)
    return torch.get_num_threads(), 0, contextlib.nullcontext()


def _views(*tensors):
    # DLPack refuses tensors that require grad; the operator's inputs are only read.
    return [t.detach() for t in tensors]


def _forward(q, k, v, spec, group, backend):
    out, lse = _forward_outputs(q)
    threads, stream, device = _run_args(q)
    with device:
        _C.forward(*_views(q, k, v), out, lse, spec, _dist.handle(group, q.device), backend,
                   threads, stream)
    return out, lse


def _backward(dout, q, k, v, out, lse, spec, group, backend):
    dq, dk, dv = _backward_outputs(q, k, v)
    threads, stream, device = _run_args(q)
    with device:
        _C.backward(*_views(dout, q, k, v, out, lse), dq, dk, dv, spec,
                    _dist.handle(group, q.device), backend, threads, stream)
    return dq, dk, dv


# The operators: their arguments are torch's schema types, the call's spec is made inside.
@torch.library.custom_op("ringattn::dilated_attn_fwd", mutates_args=())
def _dilated_fwd(
    q: Tensor, k: Tensor, v: Tensor, segment_lengths: List[int], dilation_rates: List[int],
    mode: str, causal: bool, softmax_scale: Optional[float], group: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    spec = _C.DilatedSpec(segment_lengths, dilation_rates, mode, causal, softmax_scale)
    return _forward(q, k, v, spec, group, backend)


@torch.library.custom_op("ringattn::dilated_attn_bwd", mutates_args=())
def _dilated_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    segment_lengths: List[int], dilation_rates: List[int], mode: str, causal: bool,
    softmax_scale: Optional[float], group: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _C.DilatedSpec(segment_lengths, dilation_rates, mode, causal, softmax_scale)
    return _backward(dout, q, k, v, out, lse, spec, group, backend)


@torch.library.custom_op("ringattn::block_sparse_attn_fwd", mutates_args=())
def _sparse_fwd(
    q: Tensor, k: Tensor, v: Tensor, patterns: List[int], causal: bool,
    softmax_scale: Optional[float], group: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, _C.SparseSpec(patterns, causal, softmax_scale), group, backend)


@torch.library.custom_op("ringattn::block_sparse_attn_bwd", mutates_args=())
def _sparse_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, patterns: List[int],
    causal: bool, softmax_scale: Optional[float], group: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    spec = _C.SparseSpec(patterns, causal, softmax_scale)
    return _backward(dout, q, k, v, out, lse, spec, group, backend)


def _fake_forward(q, k, v, *args):
    return _forward_outputs(q)


def _fake_backward(dout, q, k, v, *args):
    return _backward_outputs(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    # lse is an output for callers that merge partial results; its gradient is not computed.
    ctx.mark_non_differentiable(lse)


def _autograd_backward(backward_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the expanded gradient of a sum
            dout = dout.contiguous()
        dq, dk, dv = backward_op(dout, q, k, v, out, lse, *ctx.args)
        return (dq, dk, dv) + (None,) * len(ctx.args)

    return backward


for _fwd, _bwd in ((_dilated_fwd, _dilated_bwd), (_sparse_fwd, _sparse_bwd)):
    _fwd.register_fake(_fake_forward)
    _bwd.register_fake(_fake_backward)
    _fwd.register_autograd(_autograd_backward(_bwd), setup_context=_setup_context)


def _scale(softmax_scale):
    return None if softmax_scale is None else float(softmax_scale)


def dilated_attn_func(
    q,
    k,
    v,
    segment_lengths,
    dilation_rates,
    *,
    mode="groups",
    causal=False,
    softmax_scale=None,
    return_lse=False,
    group=None,
):
    """Dilated attention (SPEC.md): q [B, N, H, D], k and v [B, N, Hkv, D] (H % Hkv == 0),
    fp32 / bf16 / fp16, any strides with a contiguous last dim, on the CPU or a CUDA device.
    Returns out [B, N, H, D] (q's dtype), and with return_lse also lse [B, H, N] (fp32,
    natural log; not differentiable). mode "groups" (the Python project's) or "longnet".
    With a group, q, k, v are this rank's shard of the sequence (ringattn.distributed); every
    rank of the group calls it. numpy arrays run the forward (no autograd)."""
    segments, rates = [int(s) for s in segment_lengths], [int(r) for r in dilation_rates]
    if isinstance(q, np.ndarray):
        spec = _C.DilatedSpec(segments, rates, mode, bool(causal), _scale(softmax_scale))
        return _numpy_forward(q, k, v, return_lse, spec, group)
    out, lse = _dilated_fwd(
        q, k, v, segments, rates, mode, bool(causal), _scale(softmax_scale),
        _dist.register(group), "cpu",
    )
    return (out, lse) if return_lse else out


def encode_pattern(pattern):
    """The operator argument of a BlockPattern, or of a list of them (one per query head)."""
    patterns = [pattern] if isinstance(pattern, BlockPattern) else list(pattern)
    return _C.encode_patterns(patterns)


def block_sparse_attn_func(
    q, k, v, pattern, *, causal=False, softmax_scale=None, return_lse=False, group=None
):
    """Block-sparse attention: every query row attends to the keys of the key blocks its query
    block lists in ``pattern`` (a BlockPattern, or one per query head) with one joint softmax.
    Shapes, dtypes, devices, groups and the return value as in dilated_attn_func; over a group
    a rank fetches only the blocks its queries list."""
    code = encode_pattern(pattern)
    if isinstance(q, np.ndarray):
        spec = _C.SparseSpec(code, bool(causal), _scale(softmax_scale))
        return _numpy_forward(q, k, v, return_lse, spec, group)
    out, lse = _sparse_fwd(
        q, k, v, code, bool(causal), _scale(softmax_scale), _dist.register(group), "cpu"
    )
    return (out, lse) if return_lse else out


def block_sparse_density(pattern, seq, heads, causal=False):
    """The fraction of (query block, key block) pairs computed over all heads x blocks^2."""
    return _C.block_sparse_density(encode_pattern(pattern), causal, seq, heads)


def _numpy_forward(q, k, v, return_lse, spec, group):
    out = np.empty(q.shape, q.dtype)
    lse = np.empty(_lse_shape(q), np.float32)
    comm = _dist.handle(_dist.register(group), torch.device("cpu"))
    _C.forward(q, k, v, out, lse, spec, comm, "cpu", torch.get_num_threads(), 0)
    return (out, lse) if return_lse else out
