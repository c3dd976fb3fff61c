"""The ``flexattn`` command: ``demo``, ``bench`` and ``show``. A thin argument parser over
:mod:`flexattn.gallery` and the scripts in ``benchmarks/``.

    flexattn demo [--out DIR] [--length N] [--device cpu|cuda] [--variants a,b,...]
    flexattn bench [NAME] [ARGS...]             # benchmarks/bench_*.py (GPU only)
    flexattn show VARIANT [--length N] [--block-size B]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flexattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="check, time and picture every variant in the gallery")
    demo.add_argument(
        "--out", default="flexattn-demo", help="folder for the PNG pictures (default: %(default)s)"
    )
    demo.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--length", type=int, help="sequence length (default: 4096 on GPU, 1024 on CPU)")
    demo.add_argument("--batch", type=int, help="batch size (default: 2 on GPU, 1 on CPU)")
    demo.add_argument("--heads", type=int, help="number of heads (default: 16 on GPU, 4 on CPU)")
    demo.add_argument("--block-size", type=int, help="BlockMask block size (default: 128 on GPU, 64 on CPU)")
    demo.add_argument("--variants", help="comma-separated subset of the gallery (default: all)")

    bench = commands.add_parser("bench", help="run the side-by-side GPU benchmarks in benchmarks/")
    bench.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="[NAME] [ARGS...]: one benchmark (e.g. 'attention' for bench_attention.py, default: all) "
        "and arguments for its main, e.g. `flexattn bench attention --quick`",
    )

    show = commands.add_parser("show", help="ASCII picture of a variant's mask")
    show.add_argument("variant", help="a gallery name (flexattn show --list prints them)", nargs="?")
    show.add_argument("--list", action="store_true", help="list the gallery's variants")
    show.add_argument("--length", type=int, default=48, help="sequence length (default: %(default)s)")
    show.add_argument(
        "--block-size", type=int, default=16, help="BlockMask block size (default: %(default)s)"
    )

    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.args = [a for a in args.args + unknown if a != "--"]  # options go to the benchmark
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return {"demo": _demo, "bench": _bench, "show": _show}[args.command](args)


def _demo(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from flexattn.gallery import GALLERY, DemoConfig, format_table, run_demo

    variants = tuple(GALLERY) if not args.variants else tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in variants if v not in GALLERY]
    if unknown:
        print(
            f"flexattn demo: unknown variant(s) {unknown}. Choose from: {', '.join(GALLERY)}.",
            file=sys.stderr,
        )
        return 2
    config = DemoConfig(
        device=args.device,
        length=args.length,
        batch=args.batch,
        heads=args.heads,
        block_size=args.block_size,
        out_dir=args.out,
        variants=variants,
    )
    rows = run_demo(config, progress=lambda names: tqdm(names, desc="flexattn demo", unit="variant"))
    print(format_table(rows, config))
    print(f"Pictures of every mask in {Path(args.out).resolve()}/")
    failed = [r.variant for r in rows if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)} differ from the float64 reference.", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "flexattn bench needs a CUDA GPU (torch.cuda.is_available() is False); the benchmarks "
            "compare GPU kernels side by side. Use `flexattn demo` on CPU.",
            file=sys.stderr,
        )
        return 2
    scripts = sorted(BENCHMARKS_DIR.glob("bench_*.py"))
    if not scripts:
        print(
            f"flexattn bench: no benchmarks/bench_*.py found under {BENCHMARKS_DIR} "
            "(run from a source checkout).",
            file=sys.stderr,
        )
        return 2
    name = args.args[0] if args.args and not args.args[0].startswith("-") else None
    extra = args.args[1:] if name else args.args
    if name:
        scripts = [s for s in scripts if s.stem in (name, f"bench_{name}")]
        if not scripts:
            names = [s.stem.removeprefix("bench_") for s in sorted(BENCHMARKS_DIR.glob("bench_*.py"))]
            print(f"flexattn bench: no benchmark {name!r}; available: {', '.join(names)}.", file=sys.stderr)
            return 2
    status = 0
    for script in scripts:
        print(f"== {script.name} ==", flush=True)
        status = max(status, _load_script(script).main(extra) or 0)
    return status


def _load_script(path: Path):
    """Import a benchmark script by path (benchmarks/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses (and pickling) look their module up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise SystemExit(f"{path} has no main(argv) function.")
    return module


def _show(args: argparse.Namespace) -> int:
    from flexattn.gallery import GALLERY, ascii_picture, build_case

    if args.list or args.variant is None:
        print("variants: " + ", ".join(GALLERY))
        return 0 if args.list else 2
    if args.variant not in GALLERY:
        print(
            f"flexattn show: unknown variant {args.variant!r}. Choose from: {', '.join(GALLERY)}.",
            file=sys.stderr,
        )
        return 2
    print(ascii_picture(build_case(args.variant, args.length, "cpu"), args.block_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
