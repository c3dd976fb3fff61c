"""The ``flexattn`` command: ``demo``, ``bench`` and ``show``. A thin argument parser over
:mod:`flexattn.gallery` and the scripts in ``benchmarks/``.

    flexattn demo [--out DIR] [--length N] [--device cpu|cuda] [--variants a,b,...]
    flexattn bench [NAME] [ARGS...]             # benchmarks/bench_*.py (GPU only)
    flexattn show VARIANT [--length N] [--block-size B]

Bad arguments, a missing GPU or an error while running end in one line on stderr (exit status 2,
or 1 when a demo variant fails its check); ``FLEXATTN_TRACEBACK=1`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


class UsageError(Exception):
    """A bad argument or an unusable environment: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block) that points to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        args.args = [a for a in args.args + unknown if a != "--"]  # options go to the benchmark
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    command = {"demo": _demo, "bench": _bench, "show": _show}[args.command]
    prog = f"flexattn {args.command}"
    try:
        return command(args)
    except UsageError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("FLEXATTN_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or "(no message)"
        print(
            f"{prog}: {type(error).__name__}: {message} (FLEXATTN_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flexattn", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="check, time and picture every variant in the gallery")
    demo.add_argument(
        "--out", default="flexattn-demo", help="folder for the PNG pictures (default: %(default)s)"
    )
    demo.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    demo.add_argument(
        "--length", type=_positive_int, help="sequence length (default: 4096 on GPU, 1024 on CPU)"
    )
    demo.add_argument("--batch", type=_positive_int, help="batch size (default: 2 on GPU, 1 on CPU)")
    demo.add_argument("--heads", type=_positive_int, help="number of heads (default: 16 on GPU, 4 on CPU)")
    demo.add_argument(
        "--block-size", type=_positive_int, help="BlockMask block size (default: 128 on GPU, 64 on CPU)"
    )
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
    show.add_argument(
        "--length", type=_positive_int, default=48, help="sequence length (default: %(default)s)"
    )
    show.add_argument(
        "--block-size", type=_positive_int, default=16, help="BlockMask block size (default: %(default)s)"
    )
    return parser


def _check_device(device: str | None) -> str | None:
    """``--device`` as given, once it names a usable device (None: the demo picks one)."""
    if device is None:
        return None
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda (or cuda:N), got {device!r}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: no CUDA GPU is available (torch.cuda.is_available() is False). "
            "Use --device cpu, or leave --device out to pick the best device."
        )
    return device


def _demo(args: argparse.Namespace) -> int:
    from flexattn.gallery import GALLERY, DemoConfig, format_row, run_demo, table_header

    variants = tuple(GALLERY) if not args.variants else tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in variants if v not in GALLERY]
    if unknown:
        raise UsageError(
            f"unknown variant(s) {', '.join(map(repr, unknown))}. Choose from: {', '.join(GALLERY)}."
        )
    config = DemoConfig(
        device=_check_device(args.device),
        length=args.length,
        batch=args.batch,
        heads=args.heads,
        block_size=args.block_size,
        out_dir=args.out,
        variants=variants,
    )
    print(table_header(config), flush=True)
    rows = run_demo(config, on_row=lambda row: print(format_row(row), flush=True))
    print(f"Pictures of every mask in {Path(args.out).resolve()}/")
    failed = [r.variant for r in rows if not r.ok]
    if failed:
        print(f"FAILED: {', '.join(failed)} differ from the float64 reference.", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            "needs a CUDA GPU (torch.cuda.is_available() is False); the benchmarks "
            "compare GPU kernels side by side. Use `flexattn demo` on CPU."
        )
    scripts = sorted(BENCHMARKS_DIR.glob("bench_*.py"))
    if not scripts:
        raise UsageError(
            f"no benchmarks/bench_*.py found under {BENCHMARKS_DIR} (run from a source checkout)."
        )
    name = args.args[0] if args.args and not args.args[0].startswith("-") else None
    extra = args.args[1:] if name else args.args
    if name:
        scripts = [s for s in scripts if s.stem in (name, f"bench_{name}")]
        if not scripts:
            names = [s.stem.removeprefix("bench_") for s in sorted(BENCHMARKS_DIR.glob("bench_*.py"))]
            raise UsageError(f"no benchmark {name!r}; available: {', '.join(names)}.")
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

    if args.list:
        print("variants: " + ", ".join(GALLERY))
        return 0
    if args.variant is None:
        raise UsageError(f"name a variant: flexattn show VARIANT. Choose from: {', '.join(GALLERY)}.")
    if args.variant not in GALLERY:
        raise UsageError(f"unknown variant {args.variant!r}. Choose from: {', '.join(GALLERY)}.")
    print(ascii_picture(build_case(args.variant, args.length, "cpu"), args.block_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
