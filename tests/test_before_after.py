"""benchmarks/before_after.py's pairing, with stand-in workers (the real ones need a CUDA card)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import load_script

before_after = load_script(Path(__file__).parent.parent / "benchmarks" / "before_after.py")


class FakeWorker:
    """Rows named like the real ones; each timing drifts upward with the card's clock, which both
    trees share (``clock``), so only an interleaved pairing sees the true ratio."""

    def __init__(self, name, rows, speed, clock):
        self.name, self.rows, self.speed, self.clock = name, rows, speed, clock
        self.requests = []

    def ask(self, request):
        self.requests.append(request)
        if request["cmd"] == "rows":
            return [list(r) for r in self.rows]
        self.clock.append(self.name)
        drift = 1 + 0.01 * len(self.clock)
        return {"fwd_ms": self.speed * drift, "bwd_ms": 2 * self.speed * drift}


def test_rows_are_paired_round_by_round_and_alternate_who_goes_first():
    clock = []  # who was timed, in order
    before = FakeWorker("b", [("cfg", "noop"), ("cfg", "causal"), ("cfg", "only-before")], 1.0, clock)
    after = FakeWorker("a", [("cfg", "causal"), ("cfg", "noop")], 1.1, clock)
    rows = before_after.interleaved(before, after, rounds=4, log=lambda _: None)
    assert [(r["config"], r["variant"]) for r in rows] == [("cfg", "noop"), ("cfg", "causal")]
    for r in rows:
        assert len(r["fwd_ratios"]) == len(r["bwd_ratios"]) == 4
        # the drift between a pair's two timings is one tick either way: the median cancels it
        assert abs(r["fwd_ratio"] - 1.1) < 0.005 and abs(r["bwd_ratio"] - 1.1) < 0.005
        assert r["before"]["fwd_ms"] < r["after"]["fwd_ms"]
    times = [q["row"] for q in after.requests if q["cmd"] == "time"]
    assert times == [1] * 4 + [0] * 4  # the after tree's own row numbers
    assert "".join(clock) == "baabbaab" * 2  # each round's first tree alternates
