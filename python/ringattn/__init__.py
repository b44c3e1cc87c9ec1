"""ringattn for PyTorch: LongNet-style dilated attention (and block-sparse attention) with
autograd, torch.compile support and sequence parallelism over torch.distributed or MPI.

    import ringattn
    out = ringattn.dilated_attn_func(q, k, v, [2048, 4096], [1, 2], causal=True)

The compiled module (ringattn._C) does not link libtorch: tensors cross through DLPack, so one
build serves every torch >= 2.4 (and numpy arrays, for inference).
"""

from . import nn
from ._C import (
    CommunicationError,
    DeviceError,
    Error,
    InternalError,
    InvalidArgumentError,
    OutOfMemoryError,
    UnsupportedError,
    cpu_simd_target,
    has_cuda,
    has_mpi,
    has_nccl,
)
from ._C import version as _version
from .distributed import gather_sequence, shard_sequence
from .ops import BlockPattern, block_sparse_attn_func, block_sparse_density, dilated_attn_func

__version__ = _version()

__all__ = [
    "dilated_attn_func",
    "block_sparse_attn_func",
    "block_sparse_density",
    "BlockPattern",
    "shard_sequence",
    "gather_sequence",
    "nn",
    "Error",
    "InvalidArgumentError",
    "UnsupportedError",
    "CommunicationError",
    "DeviceError",
    "InternalError",
    "OutOfMemoryError",
    "has_cuda",
    "has_mpi",
    "has_nccl",
    "cpu_simd_target",
]
