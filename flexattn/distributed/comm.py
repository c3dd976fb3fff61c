"""Point-to-point communication of the ring: send tensors to the next rank and receive the previous
rank's (``start``), or exchange with any ranks at once (``exchange``), asynchronously.

``RingComm.start`` posts batched ``isend`` / ``irecv`` (``torch.distributed.batch_isend_irecv``) and
returns at once; ``Transfer.wait`` returns the received tensors. Between the two the caller computes,
so the transfer overlaps the computation: with gloo on CPU the transfers run on gloo's threads; on
CUDA the ops are posted on a dedicated communication stream (which first waits for the work that
produced the tensors), and ``wait`` makes the compute stream wait for that stream only then.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_WARM: set = set()


def _warm_up(group) -> None:
    """One barrier per NCCL group before its first point-to-point batch: NCCL needs every rank in the
    first ``batch_isend_irecv`` of a communicator, and a direct exchange may give a rank nothing to send."""
    key = id(group) if group is not None else None
    if key in _WARM or dist.get_backend(group) != "nccl":
        return
    dist.barrier(group=group)
    _WARM.add(key)


@dataclass
class Transfer:
    """A posted ring transfer; ``wait()`` -> the received tensors (once)."""

    requests: list
    received: list[torch.Tensor]
    stream: torch.cuda.Stream | None

    def wait(self) -> list[torch.Tensor]:
        if self.stream is None:
            for request in self.requests:
                request.wait()
        else:
            with torch.cuda.stream(self.stream):
                for request in self.requests:
                    request.wait()
            torch.cuda.current_stream().wait_stream(self.stream)
        return self.received


class RingComm:
    """Point-to-point ring over ``group``: rank r sends to r + 1 and receives from r - 1 (mod N).

    Args:
        group: a torch.distributed process group, or None for the default group (gloo, NCCL, ...).
    """

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ring attention needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group('nccl' or 'gloo') first (torchrun sets the environment)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.next = self._global((self.rank + 1) % self.world_size)
        self.prev = self._global((self.rank - 1) % self.world_size)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        _warm_up(group)

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def start(self, send: list[torch.Tensor], recv_shapes: list[torch.Size], tag: int = 0) -> Transfer:
        """Post sends of ``send`` to the next rank and receives of ``recv_shapes`` (same dtypes and
        device as ``send``, in order) from the previous rank. Tensor i travels with tag ``tag + i``:
        transfers in flight at the same time need tags apart (gloo matches by tag)."""
        received = [torch.empty(shape, dtype=t.dtype, device=t.device) for t, shape in zip(send, recv_shapes)]
        send = [t.contiguous() for t in send]
        ops = []
        for i, (out, back) in enumerate(zip(send, received)):
            ops.append(dist.P2POp(dist.isend, out, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, back, self.prev, self.group, tag + i))
        stream = self._stream(send[0].device)
        if stream is None:
            return Transfer(dist.batch_isend_irecv(ops), received, None)
        stream.wait_stream(torch.cuda.current_stream())  # the tensors are ready on the compute stream
        with torch.cuda.stream(stream):
            requests = dist.batch_isend_irecv(ops)
        for t in (*send, *received):
            t.record_stream(stream)  # the caching allocator keeps them until the comm stream is done
        return Transfer(requests, received, stream)

    def exchange(
        self,
        sends: list[tuple[int, list[torch.Tensor]]],
        recvs: list[tuple[int, list[torch.Size]]],
        like: list[torch.Tensor],
        tag: int = 0,
    ) -> Transfer:
        """Post, in one batch, sends of tensors to group ranks and receives from group ranks.

        ``sends``: (peer, tensors); ``recvs``: (peer, shapes), each received tensor with the dtype and
        device of ``like[i]``. ``Transfer.wait()`` returns the received tensors flat, in ``recvs``
        order. Every rank posts its whole exchange at once, so no ordering between peers can deadlock.
        """
        ops, received = [], []
        for peer, tensors in sends:
            for i, t in enumerate(tensors):
                ops.append(dist.P2POp(dist.isend, t.contiguous(), self._global(peer), self.group, tag + i))
        for peer, shapes in recvs:
            for i, (shape, t) in enumerate(zip(shapes, like)):
                back = torch.empty(shape, dtype=t.dtype, device=t.device)
                received.append(back)
                ops.append(dist.P2POp(dist.irecv, back, self._global(peer), self.group, tag + i))
        if not ops:
            return Transfer([], received, None)
        stream = self._stream(like[0].device)
        if stream is None:
            return Transfer(dist.batch_isend_irecv(ops), received, None)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            requests = dist.batch_isend_irecv(ops)
        for op in ops:
            op.tensor.record_stream(stream)
        return Transfer(requests, received, stream)

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]
