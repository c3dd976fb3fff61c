"""Run a function on N processes joined in a gloo (or NCCL) group; a hang fails instead of stalling CI.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, each calling
``fn(rank, world_size, *args)`` inside an initialised process group (gloo; ``backend="nccl"``: rank
r on GPU r), and returns their results
in rank order. ``fn`` must be importable (a module-level function) and return picklable values.
A worker's exception is re-raised here with its traceback; past ``timeout`` seconds every worker is
killed and the call raises ``TimeoutError``.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo") -> list:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [
        context.Process(target=_worker, args=(fn, rank, world_size, port, timeout, backend, args, results))
        for rank in range(world_size)
    ]
    for w in workers:
        w.start()
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, w in enumerate(workers) if r not in got and w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"ranks {dead} of {world_size} died without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size} gloo ranks: no result within {timeout} s (ranks done: {sorted(got)})"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            got[rank] = value
    finally:
        for w in workers:
            w.join(timeout=5)
            if w.is_alive():
                w.kill()
                w.join()
    return [got[r] for r in range(world_size)]


def _worker(fn, rank, world_size, port, timeout, backend, args, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
