"""Test session setup: one torch thread per xdist worker, a fresh seed per test, GPU tests skipped
cleanly without CUDA.

Every test runs with a new random seed (printed with the failure). Reproduce a failure with
``FLEXATTN_SEED=<seed> bash scripts/test.sh -k <test id>``. ``FLEXATTN_SEEDS=<s1>,<s2>,...`` runs
every test once per listed seed (test ids end in ``-seed<s>``); ``scripts/seed_sweep.sh`` uses it.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the machine's cores; intra-op threads would only fight each other.
    torch.set_num_threads(1)


def _swept_seeds() -> list[int]:
    """The seeds of ``FLEXATTN_SEEDS`` (comma-separated; the same list in every xdist worker)."""
    spec = os.environ.get("FLEXATTN_SEEDS", "")
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"FLEXATTN_SEEDS must be comma-separated integers, got {spec!r}.") from None


def pytest_generate_tests(metafunc):
    seeds = _swept_seeds()
    if seeds:
        metafunc.fixturenames.append("flexattn_swept_seed")
        metafunc.parametrize("flexattn_swept_seed", seeds, ids=lambda s: f"seed{s}")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch with a fresh seed (or FLEXATTN_SEED, or the swept one) and remember it for the
    failure report."""
    callspec = getattr(request.node, "callspec", None)
    fixed = callspec.params.get("flexattn_swept_seed") if callspec else None
    fixed = fixed if fixed is not None else os.environ.get("FLEXATTN_SEED")
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.flexattn_seed = seed
    yield


@pytest.fixture(autouse=True)
def _no_prepared_calls():
    """Every test starts without prepared calls (``flexattn/call_cache.py``): an entry kept by an
    earlier test would repeat that test's launches, through its monkeypatched launchers too."""
    from flexattn import call_cache

    call_cache.clear()
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "flexattn_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("flexattn seed", f"FLEXATTN_SEED={seed}"))
    return report


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """A test that compiles ``flex_attention`` counts its own graphs: every such test compiles one
    code object, and Dynamo keeps at most ``recompile_limit`` (8) graphs per code object; past that
    it stops compiling the frame and traces the frames it calls instead."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
