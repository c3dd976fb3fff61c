"""flexattn against an earlier flexattn: the paper's 7 variants, both configs, forward and backward.

A redesign that must not change speed (issue #11: "no row slower by more than 2% than before the
change, measured in the same call") needs both versions timed on one machine in one sitting. Two
versions of one package cannot share a process, so each tree runs in its own worker process, and
the workers alternate (before, after, before, after, ...) so that drift of the card hits both alike;
each row keeps the best (lowest) time of its rounds. Variants, configs, inputs and timing are those
of each tree's own ``benchmarks/bench_attention.py`` (``make_variants``, ``CONFIGS``, ``bench_ms``,
``timed``), flexattn alone. Before the timed rounds, one warm-up worker per tree runs every call
once, in parallel, so the Triton cache is warm and no timed worker compiles.

Usage (CUDA machine, repository root; the earlier tree e.g. from ``git archive <rev> | tar -x -C DIR``)::

    python benchmarks/before_after.py --before .old/base --after . --json before_after.json
    python benchmarks/before_after.py --before .old/base --head-dims 128 --variants noop
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(
    tree: Path, variants: list[str] | None, head_dims: list[int] | None, warmup_only: bool
) -> list[dict]:
    """Time flexattn fwd and fwd+bwd for every row, with ``tree``'s flexattn and benchmark code."""
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

            forward, both = ba.timed(call, q, k, v, False), ba.timed(call, q, k, v, True)
            if warmup_only:
                forward(), both()
                continue
            fwd_ms, both_ms = ba.bench_ms(forward, False), ba.bench_ms(both, False)
            rows.append(
                {"config": str(cfg), "variant": var.name, "fwd_ms": fwd_ms, "bwd_ms": both_ms - fwd_ms}
            )
            print(f"  {cfg} {var.name}: fwd {fwd_ms:.3f} ms, bwd {both_ms - fwd_ms:.3f} ms", flush=True)
        torch.cuda.synchronize()
    return rows


def run_worker(tree: Path, args, warmup_only: bool = False) -> subprocess.Popen:
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, "--worker", str(tree), "--worker-json", str(out)]
    cmd += ["--variants", *args.variants] if args.variants else []
    cmd += ["--head-dims", *map(str, args.head_dims)] if args.head_dims else []
    cmd += ["--warmup-only"] if warmup_only else []
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(cmd, env=env)
    proc.out_path = out  # type: ignore[attr-defined]
    return proc


def collect(proc: subprocess.Popen, tree: Path) -> list[dict]:
    if proc.wait() != 0:
        raise SystemExit(f"worker for {tree} failed (exit {proc.returncode})")
    return json.loads(proc.out_path.read_text())  # type: ignore[attr-defined]


def compare(before: list[list[dict]], after: list[list[dict]]) -> list[dict]:
    """One row per (config, variant): best-of-rounds ms of each tree and after/before ratios."""

    def best(rounds):
        table = {}
        for rows in rounds:
            for r in rows:
                key = (r["config"], r["variant"])
                old = table.get(key, {"fwd_ms": float("inf"), "bwd_ms": float("inf")})
                table[key] = {p: min(old[p], r[p]) for p in ("fwd_ms", "bwd_ms")}
        return table

    b, a = best(before), best(after)
    return [
        {
            "config": key[0],
            "variant": key[1],
            "before": b[key],
            "after": a[key],
            "fwd_ratio": a[key]["fwd_ms"] / b[key]["fwd_ms"],
            "bwd_ratio": a[key]["bwd_ms"] / b[key]["bwd_ms"],
        }
        for key in b
        if key in a
    ]


def markdown(rows: list[dict], limit: float) -> str:
    lines = [
        "| config | variant | fwd ms before | fwd ms after | after/before "
        "| bwd ms before | bwd ms after | after/before |",
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
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per tree, alternating")
    parser.add_argument("--limit", type=float, default=0.02, help="flag rows slower than this fraction")
    parser.add_argument("--variants", nargs="*")
    parser.add_argument("--head-dims", type=int, nargs="*")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rows = worker(args.worker, args.variants, args.head_dims, args.warmup_only)
        args.worker_json.write_text(json.dumps(rows))
        return
    if args.before is None:
        parser.error("--before is required: the earlier tree to compare against")
    trees = (args.before, args.after)
    warm = [run_worker(t, args, warmup_only=True) for t in trees]  # compile both in parallel
    for proc, tree in zip(warm, trees):
        collect(proc, tree)
    results: dict[Path, list[list[dict]]] = {t: [] for t in trees}
    for i in range(args.rounds):
        for tree in trees if i % 2 == 0 else reversed(trees):
            print(f"round {i + 1}: {tree}", flush=True)
            results[tree].append(collect(run_worker(tree, args), tree))
    rows = compare(results[args.before], results[args.after])
    print(markdown(rows, args.limit))
    worst = max(max(r["fwd_ratio"], r["bwd_ratio"]) for r in rows)
    print(f"slowest row after/before: {worst:.3f} (limit {1 + args.limit:.2f})")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "rounds": {str(t): results[t] for t in trees}}, indent=1)
        )


if __name__ == "__main__":
    main()
