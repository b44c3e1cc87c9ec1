"""Groups of processes for ringattn: what ``group=`` accepts, and sequence shards.

``group`` is one of
  - ``None``: one process (no communication);
  - a ``torch.distributed`` ProcessGroup (torchrun, ``init_process_group``): CPU tensors go
    through torch.distributed itself (gloo), on the calling thread; CUDA tensors through
    ringattn's NCCL communicator, set up by broadcasting its unique id over the group;
  - an ``mpi4py`` communicator (mpirun, srun): ringattn's MPI communicator (a duplicate, so
    ringattn's traffic never mixes with the caller's);
  - a ``ringattn._C.Communicator``.
Each rank passes its contiguous shard of the sequence: rank p holds rows
``[p * N_loc, (p + 1) * N_loc)`` (``shard_sequence`` cuts them, ``gather_sequence`` joins them).
Communicators are made at the first call on a group (one per device kind) and cached until
the process exits.
"""

import atexit
import datetime

import torch

from . import _C

__all__ = ["shard_sequence", "gather_sequence", "group_rank_size", "register"]

# Operators take a group as an integer key into this table (0 = one process), so that
# torch.compile sees a constant. A group is registered outside compiled code (register, the
# ringattn.nn modules' constructors, or a first eager call); its communicators are made at
# the first call that runs on it.
_groups = {}  # key -> [group, {device type: communicator or None (one rank)}]
_keys = {}  # identity -> key (the group is kept alive in _groups, so ids are not reused)


def _is_mpi4py(group):
    return type(group).__module__.startswith("mpi4py")


def _is_process_group(group):
    return torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)


def group_rank_size(group):
    """(rank, size) of this process in ``group`` (``(0, 1)`` for None)."""
    if group is None:
        return 0, 1
    if _is_mpi4py(group):
        return group.Get_rank(), group.Get_size()
    if _is_process_group(group):
        return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    if isinstance(group, _C.Communicator):
        return group.rank, group.size
    raise _C.InvalidArgumentError(
        f"group is a {type(group).__name__}; pass None, a torch.distributed ProcessGroup, an "
        "mpi4py communicator or a ringattn communicator"
    )


def register(group):
    """Makes ``group`` usable inside torch.compile'd code (the ringattn.nn modules register
    their group when constructed; an eager call registers it too). Returns its key."""
    if group is None:
        return 0
    # A ProcessGroup by its name (dynamo folds it to a constant; torch 2.4 cannot trace id()
    # of one), anything else by its id.
    name = getattr(group, "group_name", None)
    identity = ("process group", name) if name is not None else id(group)
    key = _keys.get(identity)
    if key is None:
        if torch.compiler.is_compiling():
            raise _C.UnsupportedError(
                "ringattn: unsupported: a group is first used inside torch.compile'd code; call "
                "ringattn.distributed.register(group) before compiling (the ringattn.nn modules "
                "do it when constructed)"
            )
        key = len(_groups) + 1
        _groups[key] = [group, {}]
        _keys[identity] = key
    return key



def handle(key, device):
    """The _C.Communicator of group ``key`` for tensors on ``device`` (None: one process),
    made on first use (collective over the group)."""
    if key == 0:
        return None
    group, made = _groups[key]
    if device.type not in made:
        rank, size = group_rank_size(group)
        made[device.type] = None if size == 1 else _make_communicator(group, device, rank, size)
    return made[device.type]


def _make_communicator(group, device, rank, size):
    if isinstance(group, _C.Communicator):
        return group
    if _is_mpi4py(group):
        from mpi4py import MPI

        return _C.mpi_communicator(MPI._handleof(group))
    if device.type == "cuda":
        return _nccl_communicator(group, device, rank, size)
    return _C.python_communicator(_TorchTransport(group, rank, size))


def _nccl_communicator(group, device, rank, size):
    unique_id = [_C.nccl_unique_id() if rank == 0 else None]
    torch.distributed.broadcast_object_list(
        unique_id, src=torch.distributed.get_global_rank(group, 0), group=group
    )
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        return _C.nccl_communicator(unique_id[0], rank, size, stream)


@atexit.register
def _release():
    # Before mpi4py finalizes MPI (its exit hook runs after atexit's), and while torch is loaded.
    _groups.clear()
    _keys.clear()


class _SelfTransfer:
    """A message to or from this rank's own rank (torch.distributed has no self-send)."""

    def __init__(self, buf, tag):
        self.buf, self.tag, self.done = buf, tag, False


class _TorchTransport:
    """What ringattn's Python communicator calls (python/src/python_communicator.h): the
    transfers and collectives over a torch.distributed group, on the calling thread. Buffers
    are uint8 (or typed, for reductions) CPU tensors viewing ringattn's memory."""

    name = "torch.distributed"
    max_tag = 2**30

    def __init__(self, group, rank, size):
        self.group, self.rank, self.size = group, rank, size
        self._global = [torch.distributed.get_global_rank(group, r) for r in range(size)]
        self._sent = {}  # tag -> self-sends not yet received (copies)
        self._posted = {}  # tag -> self-receives not yet matched

    def isend(self, buf, peer, tag):
        if peer != self.rank:
            return torch.distributed.isend(buf, self._global[peer], group=self.group, tag=tag)
        posted = self._posted.get(tag)
        if posted:
            self._deliver(posted.pop(0), buf)
        else:
            self._sent.setdefault(tag, []).append(buf.clone())
        send = _SelfTransfer(buf, tag)
        send.done = True
        return send

    def irecv(self, buf, peer, tag):
        if peer != self.rank:
            return torch.distributed.irecv(buf, self._global[peer], group=self.group, tag=tag)
        recv = _SelfTransfer(buf, tag)
        sent = self._sent.get(tag)
        if sent:
            self._deliver(recv, sent.pop(0))
        else:
            self._posted.setdefault(tag, []).append(recv)
        return recv

    @staticmethod
    def _deliver(recv, data):
        if recv.buf.numel() != data.numel():
            raise RuntimeError(
                f"a receive of {recv.buf.numel()} bytes from this rank (tag {recv.tag}) matched a "
                f"send of {data.numel()} bytes"
            )
        recv.buf.copy_(data)
        recv.done = True

    def wait(self, work, timeout_s):
        if isinstance(work, _SelfTransfer):
            if not work.done:
                raise RuntimeError(
                    f"a receive from this rank (tag {work.tag}) has no matching send"
                )
            return
        _finish(work, timeout_s)

    def cancel(self, work):
        if isinstance(work, _SelfTransfer):
            posted = self._posted.get(work.tag, [])
            if work in posted:
                posted.remove(work)
            return
        abort = getattr(work, "abort", None)
        if abort is not None:
            abort()

    def allreduce(self, buf, op, timeout_s):
        ops = {
            "sum": torch.distributed.ReduceOp.SUM,
            "max": torch.distributed.ReduceOp.MAX,
            "min": torch.distributed.ReduceOp.MIN,
        }
        _finish(torch.distributed.all_reduce(buf, op=ops[op], group=self.group, async_op=True),
                timeout_s)

    def allgather(self, send, recv, timeout_s):
        # send may be this rank's slot of recv: gather from a copy.
        _finish(torch.distributed.all_gather(list(recv.chunk(self.size)), send.clone(),
                                             group=self.group, async_op=True), timeout_s)

    def broadcast(self, buf, root, timeout_s):
        _finish(torch.distributed.broadcast(buf, src=self._global[root], group=self.group,
                                            async_op=True), timeout_s)

    def barrier(self, timeout_s):
        _finish(torch.distributed.barrier(group=self.group, async_op=True), timeout_s)


def _finish(work, timeout_s):
    """Waits for a torch.distributed work item within ringattn's deadline (raises past it)."""
    work.wait(timeout=datetime.timedelta(seconds=timeout_s))


def shard_sequence(x, group=None, dim=1):
    """This rank's contiguous shard of ``x`` along ``dim`` (the sequence of [B, N, ...]):
    rows ``[rank * N / P, (rank + 1) * N / P)``. A view, no copy; N must divide by P."""
    rank, size = group_rank_size(group)
    n = x.shape[dim]
    if n % size != 0:
        raise _C.InvalidArgumentError(
            f"x.shape[{dim}] = {n} does not divide among the {size} ranks of the group; pad the "
            f"sequence to a multiple of {size} (and of the segment lengths)"
        )
    return x.narrow(dim, rank * (n // size), n // size)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x.contiguous(), group, dim)

    @staticmethod
    def backward(ctx, grad):
        rank, size = group_rank_size(ctx.group)
        grad = _all_reduce(grad.contiguous(), ctx.group)
        n = grad.shape[ctx.dim] // size
        return grad.narrow(ctx.dim, rank * n, n), None, None


def _all_gather(x, group, dim):
    if _is_mpi4py(group):
        parts = [torch.from_numpy(p) for p in group.allgather(x.detach().cpu().numpy())]
        return torch.cat(parts, dim).to(x.device)
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, x, group=group)
    return torch.cat(parts, dim)


def _all_reduce(x, group):
    if _is_mpi4py(group):
        from mpi4py import MPI

        out = x.detach().cpu().numpy().copy()
        group.Allreduce(MPI.IN_PLACE, out, op=MPI.SUM)
        return torch.from_numpy(out).to(x.device)
    x = x.clone()
    torch.distributed.all_reduce(x, group=group)
    return x


def gather_sequence(x, group=None, dim=1):
    """The whole sequence from every rank's shard ``x`` (concatenated along ``dim`` in rank
    order), on every rank. Differentiable: the gradient of a rank's shard is the sum over the
    ranks of their gradients of that slice (as for torch.distributed.nn's all_gather)."""
    _, size = group_rank_size(group)
    if size == 1:
        return x
    if isinstance(group, _C.Communicator):
        raise _C.UnsupportedError(
            "gather_sequence takes a torch.distributed group or an mpi4py communicator"
        )
    return _Gather.apply(x, group, dim)
