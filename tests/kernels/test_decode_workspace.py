"""kernels/decode_workspace.py: the split workspace is reused only by the next call from the same
thread on the same stream, never kept from a CUDA graph capture, and a reused workspace gives each
call its own result."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from flexattn.compiler import compile_mask_mod, compile_score_mod
from flexattn.kernels import decode_workspace as ws
from flexattn.kernels.decode import flex_decode
from flexattn.kernels.positions import Positions
from flexattn.reference import reference_attention

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh():
    ws.clear()
    yield
    ws.clear()


def test_the_same_thread_and_shapes_get_the_same_workspace():
    first = ws.decode_workspace(3, 2, 4, 1, 16, CPU)
    assert ws.decode_workspace(3, 2, 4, 1, 16, CPU) is first
    assert first.out.shape == (3, 2, 4, 1, 16) and first.lse.shape == first.max_scores.shape == (3, 2, 4, 1)
    assert first.out.dtype == first.lse.dtype == torch.float32 and first.out.is_contiguous()
    assert ws.decode_workspace(4, 2, 4, 1, 16, CPU) is not first  # another split count
    assert ws.decode_workspace(3, 2, 4, 1, 32, CPU) is not first  # another head dim


def test_another_thread_gets_its_own_workspace():
    mine = ws.decode_workspace(3, 2, 4, 1, 16, CPU)
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(ws.decode_workspace(3, 2, 4, 1, 16, CPU)))
    worker.start()
    worker.join()
    assert theirs[0] is not mine and theirs[0].out.data_ptr() != mine.out.data_ptr()


def test_at_most_a_few_workspaces_are_kept_least_recently_used_out():
    first = ws.decode_workspace(1, 1, 1, 1, 16, CPU)
    for splits in range(2, ws.WORKSPACE_ENTRIES + 1):
        ws.decode_workspace(splits, 1, 1, 1, 16, CPU)
    assert ws.decode_workspace(1, 1, 1, 1, 16, CPU) is first  # used again: now the most recent
    ws.decode_workspace(ws.WORKSPACE_ENTRIES + 1, 1, 1, 1, 16, CPU)  # evicts splits=2, not the first
    assert ws.kept() == ws.WORKSPACE_ENTRIES and ws.decode_workspace(1, 1, 1, 1, 16, CPU) is first


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_calls_sharing_a_workspace_each_get_their_own_result():
    B, Hq, Hkv, L, E = 2, 4, 2, 97, 16
    k, v = torch.randn(B, Hkv, L, E), torch.randn(B, Hkv, L, E)
    args = dict(score_mod=compile_score_mod(None), mask_mod=compile_mask_mod(None), tables=None, scale=0.25)
    queries = [torch.randn(B, Hq, 1, E) for _ in range(3)]
    outs = [flex_decode(q, k, v, positions=Positions(q_offset=L - 1), splits=3, **args)[0] for q in queries]
    assert ws.kept() == 1
    for q, out in zip(queries, outs):
        want, _, _ = reference_attention(q.double(), k.double(), v.double(), None, None, 0.25)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_a_workspace_made_while_capturing_a_cuda_graph_is_not_kept():
    device = torch.device("cuda", torch.cuda.current_device())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ws.decode_workspace(3, 2, 4, 1, 16, device)
    assert ws.kept() == 0
    eager = ws.decode_workspace(3, 2, 4, 1, 16, device)
    assert eager is not captured and ws.kept() == 1
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        assert ws.decode_workspace(3, 2, 4, 1, 16, device) is not eager  # another stream
    assert ws.decode_workspace(3, 2, 4, 1, 16, device) is eager
