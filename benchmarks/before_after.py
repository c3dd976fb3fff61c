"""flexattn against an earlier flexattn: the paper's 7 variants, both configs, forward and backward.

A redesign that must not change speed (issue #11: "no row slower by more than 2% than before the
change, measured in the same call") needs both versions timed on one machine in one sitting. Two
versions of one package cannot share a process, so each tree runs in its own worker process, both
alive at once and driven row by row over a pipe: for every row the workers take turns (before,
after, after, before, ...), one timing each per round, so that drift of the card between rounds
hits both alike and a row's two trees are timed seconds apart. A row's ratio is the median over
rounds of its paired ratios (after / before of the same round); its ms are the best of its rounds.
Variants, configs, inputs and timing are those of each tree's own ``benchmarks/bench_attention.py``
(``make_variants``, ``CONFIGS``, ``bench_ms``, ``timed``), flexattn alone. Before the timed rounds
both workers run every call once, in parallel, so the Triton cache is warm and no timing compiles.

Usage (CUDA machine, repository root; the earlier tree e.g. from ``git archive <rev> | tar -x -C DIR``)::

    python benchmarks/before_after.py --before .old/base --after . --rounds 6 --json before_after.json
    python benchmarks/before_after.py --before .old/base --head-dims 128 --variants noop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PARTS = ("fwd_ms", "bwd_ms")


def tree_rows(tree: Path, variants: list[str] | None, head_dims: list[int] | None) -> list[tuple]:
    """``(config, variant, forward, forward_backward)`` for every row, with ``tree``'s flexattn and
    benchmark code (inputs, masks and closures built once)."""
    sys.path.insert(0, str(tree / "benchmarks"))
    sys.path.insert(0, str(tree))
    import bench_attention as ba  # the tree's own variants, configs and timing
    import torch

    import flexattn

    assert Path(flexattn.__file__).resolve().is_relative_to(tree.resolve()), flexattn.__file__
    rows = []
    for cfg in ba.CONFIGS:
        if head_dims and cfg.E not in head_dims:
            continue
        torch.manual_seed(0)  # the same inputs and document lengths in both trees
        q, k, v = (
            torch.randn(cfg.B, cfg.H, cfg.L, cfg.E, device="cuda", dtype=torch.bfloat16) for _ in range(3)
        )
        for var in ba.make_variants(cfg, "cuda"):
            if not getattr(var, "default", True) or (variants and var.name not in variants):
                continue
            mask = flexattn.create_block_mask(
                var.mask_mod or flexattn.noop_mask, None, None, cfg.L, cfg.L, device="cuda"
            )
            score = var.flex_score_mod or var.score_mod
            options = getattr(var, "flex_options", None)

            def call(q, k, v, score=score, mask=mask, options=options):
                return flexattn.flex_attention(
                    q, k, v, score_mod=score, block_mask=mask, kernel_options=options
                )

            rows.append((str(cfg), var.name, ba.timed(call, q, k, v, False), ba.timed(call, q, k, v, True)))
    return rows


def serve(tree: Path, variants: list[str] | None, head_dims: list[int] | None) -> None:
    """A worker: one JSON request per stdin line, one JSON answer per stdout line.

    ``{"cmd": "rows"}`` -> the rows' ``[config, variant]``; ``{"cmd": "warm"}`` -> runs every call
    once; ``{"cmd": "time", "row": i}`` -> ``{"fwd_ms", "bwd_ms"}`` of row i."""
    sys.path.insert(0, str(tree / "benchmarks"))
    import bench_attention as ba
    import torch

    rows = tree_rows(tree, variants, head_dims)
    answer = sys.stdout
    sys.stdout = sys.stderr  # (anything the tree prints stays off the pipe)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "rows":
            reply = [[c, v] for c, v, _, _ in rows]
        elif request["cmd"] == "warm":
            for _, _, forward, both in rows:
                forward(), both()
            torch.cuda.synchronize()
            reply = "warm"
        else:
            _, _, forward, both = rows[request["row"]]
            fwd_ms, both_ms = ba.bench_ms(forward, False), ba.bench_ms(both, False)
            reply = {"fwd_ms": fwd_ms, "bwd_ms": both_ms - fwd_ms}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()


class Worker:
    """The parent's end of one tree's worker process."""

    def __init__(self, tree: Path, args):
        cmd = [sys.executable, __file__, "--worker", str(tree)]
        cmd += ["--variants", *args.variants] if args.variants else []
        cmd += ["--head-dims", *map(str, args.head_dims)] if args.head_dims else []
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.tree = tree
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker for {self.tree} failed (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, request: dict):
        self.send(request)
        return self.receive()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved(before, after, rounds: int, log=print) -> list[dict]:
    """Time every row shared by both workers (``ask(request)`` objects, see ``serve``) ``rounds``
    times, alternating which tree goes first; one dict per row: ``config``, ``variant``, ``before``
    and ``after`` (best ms of each part), ``fwd_ratio`` / ``bwd_ratio`` (median paired ratio) and
    ``fwd_ratios`` / ``bwd_ratios`` (every round's)."""
    names_b = [tuple(r) for r in before.ask({"cmd": "rows"})]
    names_a = {tuple(r): i for i, r in enumerate(after.ask({"cmd": "rows"}))}
    out = []
    for i, name in enumerate(names_b):
        if name not in names_a:
            continue
        times = {"before": [], "after": []}
        for j in range(rounds):
            order = [("before", before, i), ("after", after, names_a[name])]
            for tag, worker, row in order if j % 2 == 0 else reversed(order):
                times[tag].append(worker.ask({"cmd": "time", "row": row}))
        row = {"config": name[0], "variant": name[1]}
        for tag in ("before", "after"):
            row[tag] = {p: min(t[p] for t in times[tag]) for p in PARTS}
        for p, key in zip(PARTS, ("fwd", "bwd")):
            ratios = [a[p] / b[p] for a, b in zip(times["after"], times["before"])]
            row[f"{key}_ratios"] = ratios
            row[f"{key}_ratio"] = statistics.median(ratios)
        log(f"  {name[0]} {name[1]}: fwd x{row['fwd_ratio']:.3f}, bwd x{row['bwd_ratio']:.3f}")
        out.append(row)
    return out


def markdown(rows: list[dict], limit: float) -> str:
    lines = [
        "| config | variant | fwd ms before | fwd ms after | after/before (median paired) "
        "| bwd ms before | bwd ms after | after/before (median paired) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flag = lambda x: f"**{x:.3f}**" if x > 1 + limit else f"{x:.3f}"  # noqa: E731
        lines.append(
            f"| {r['config']} | {r['variant']} | {r['before']['fwd_ms']:.3f} | {r['after']['fwd_ms']:.3f} | "
            f"{flag(r['fwd_ratio'])} | {r['before']['bwd_ms']:.3f} | {r['after']['bwd_ms']:.3f} | "
            f"{flag(r['bwd_ratio'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the earlier tree (flexattn/ + benchmarks/)")
    parser.add_argument("--after", type=Path, default=Path("."), help="the tree under test (default: here)")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per row, alternating")
    parser.add_argument("--limit", type=float, default=0.02, help="flag rows slower than this fraction")
    parser.add_argument("--variants", nargs="*")
    parser.add_argument("--head-dims", type=int, nargs="*")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve(args.worker, args.variants, args.head_dims)
        return
    if args.before is None:
        parser.error("--before is required: the earlier tree to compare against")
    before, after = Worker(args.before, args), Worker(args.after, args)
    for w in (before, after):  # compile both trees' kernels in parallel
        w.send({"cmd": "warm"})
    for w in (before, after):
        w.receive()
    rows = interleaved(before, after, args.rounds)
    before.close(), after.close()
    print(markdown(rows, args.limit))
    worst = max(max(r["fwd_ratio"], r["bwd_ratio"]) for r in rows)
    print(f"slowest row after/before (median of {args.rounds} paired rounds): {worst:.3f} "
          f"(limit {1 + args.limit:.2f})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
