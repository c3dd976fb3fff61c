"""The gallery behind ``flexattn demo`` and ``flexattn show``: every variant, checked, timed, pictured.

:data:`GALLERY` maps a variant's name to a builder that instantiates it for a sequence length.
:func:`run_demo` runs each one through :func:`flexattn.flex_attention` on the best device (the Triton
kernels on a GPU, the reference backend on CPU), compares it with the float64 reference backend,
times it and draws its mask. :func:`ascii_picture` is ``flexattn show``'s terminal picture.

Example:
    >>> from flexattn.gallery import GALLERY, DemoConfig, run_demo
    >>> rows = run_demo(DemoConfig(length=128, device="cpu", out_dir="demo_out"))
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flexattn import variants as V
from flexattn.api import flex_attention
from flexattn.block_mask import BlockMask, create_block_mask, create_mask, noop_mask
from flexattn.mod_eval import eval_score_mod, index


@dataclass(frozen=True)
class Case:
    """One variant instantiated for a length: what to pass to ``create_block_mask`` / ``flex_attention``.

    ``sink_slot``: key/value position 0 is the learned-sink slot, so value 0 is zeroed.
    """

    mask_mod: Callable | None
    score_mod: Callable | None
    q_len: int
    kv_len: int
    sink_slot: bool = False

    @property
    def title(self) -> str:
        names = [getattr(m, "__name__", "mod") for m in (self.mask_mod, self.score_mod) if m is not None]
        return " + ".join(names) or "noop"


def _document_lengths(length: int) -> torch.Tensor:
    """Five documents of uneven lengths that fill ``length`` tokens."""
    cuts = [0] + [round(length * f) for f in (0.12, 0.37, 0.45, 0.71)] + [length]
    return torch.tensor([b - a for a, b in zip(cuts, cuts[1:]) if b > a])


def _cross_attention(L: int, device) -> Case:
    """Four images of L/8 tokens each, tagged at 5%, 20%, 45% and 80% of the text."""
    tags = sorted({min(L - 1, round(L * f)) for f in (0.05, 0.2, 0.45, 0.8)})
    image_tokens = max(1, L // 8)
    kv_ids = V.document_ids_from_lengths(torch.full((len(tags),), image_tokens, device=device))
    spans = V.flamingo_query_spans(torch.tensor(tags, device=device), L)
    return Case(V.image_cross_attention(kv_ids, spans), None, L, len(tags) * image_tokens)


def _natten_2d(L: int, device) -> Case:
    side = math.isqrt(L)
    return Case(V.natten_2d(side, side, min(7, side)), None, side * side, side * side)


def _t5(L: int, device, heads: int) -> Case:
    table = torch.randn(32, heads, generator=torch.Generator().manual_seed(0)).to(device)
    return Case(None, V.t5_relative_bias(table, max_distance=max(L // 4, 9)), L, L)


def _learned_sink(L: int, device, heads: int) -> Case:
    sinks = torch.linspace(-1.0, 2.0, heads, device=device)
    return Case(V.with_sink_slot(V.causal()), V.learned_sink(sinks), L, L + 1, sink_slot=True)


# name -> builder(L, device, heads) -> Case. Names are what `flexattn show <name>` accepts.
GALLERY: dict[str, Callable[[int, torch.device, int], Case]] = {
    "noop": lambda L, d, H: Case(None, None, L, L),
    "causal": lambda L, d, H: Case(V.causal(), None, L, L),
    "sliding_window": lambda L, d, H: Case(V.sliding_window(max(1, L // 8)), None, L, L),
    "prefix_lm": lambda L, d, H: Case(V.prefix_lm(L // 4), None, L, L),
    "dilated_sliding_window": lambda L, d, H: Case(V.dilated_sliding_window(max(1, L // 32), 4), None, L, L),
    "longformer": lambda L, d, H: Case(V.longformer(max(1, L // 16), max(1, L // 32)), None, L, L),
    "chunked": lambda L, d, H: Case(V.chunked(max(1, L // 4), causal=True), None, L, L),
    "streaming_llm": lambda L, d, H: Case(V.streaming_llm(4, max(1, L // 8)), None, L, L),
    "document": lambda L, d, H: Case(
        V.document_mask(V.document_ids_from_lengths(_document_lengths(L).to(d)), V.causal()), None, L, L
    ),
    "natten_1d": lambda L, d, H: Case(V.natten_1d(L, min(L, L // 8 + 1)), None, L, L),
    "natten_2d": lambda L, d, H: _natten_2d(L, d),
    "image_cross_attention": lambda L, d, H: _cross_attention(L, d),
    "alibi": lambda L, d, H: Case(V.causal(), V.alibi(H, device=d), L, L),
    "tanh_softcap": lambda L, d, H: Case(V.causal(), V.tanh_softcap(2.0), L, L),
    "tanh_softcap_approx": lambda L, d, H: Case(V.causal(), V.tanh_softcap(2.0, approx=True), L, L),
    "t5_relative_bias": lambda L, d, H: _t5(L, d, H),
    "learned_sink": lambda L, d, H: _learned_sink(L, d, H),
}


def build_case(name: str, length: int, device, heads: int = 4) -> Case:
    """Instantiate gallery variant ``name`` for sequence length ``length``."""
    if name not in GALLERY:
        raise KeyError(f"Unknown variant {name!r}. Choose one of: {', '.join(GALLERY)}.")
    return GALLERY[name](length, torch.device(device), heads)


def block_mask_of(case: Case, device, block_size: int) -> BlockMask:
    return create_block_mask(
        case.mask_mod or noop_mask, None, None, case.q_len, case.kv_len, device=device, BLOCK_SIZE=block_size
    )


# ---------------------------------------------------------------------------------------------------
# The demo: check, time, picture.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run. ``None`` picks per device: GPU B2 H16 L4096 E64 bf16 blocks of 128;
    CPU B1 H4 L1024 E64 fp32 blocks of 64 (well under a minute on two cores)."""

    device: str | None = None
    length: int | None = None
    batch: int | None = None
    heads: int | None = None
    head_dim: int = 64
    block_size: int | None = None
    out_dir: str = "flexattn-demo"
    picture_length: int = 1024
    variants: tuple[str, ...] = tuple(GALLERY)

    def resolved(self) -> DemoConfig:
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = torch.device(device).type == "cuda"
        return DemoConfig(
            device=device,
            length=self.length or (4096 if gpu else 1024),
            batch=self.batch or (2 if gpu else 1),
            heads=self.heads or (16 if gpu else 4),
            head_dim=self.head_dim,
            block_size=self.block_size or (128 if gpu else 64),
            out_dir=self.out_dir,
            picture_length=self.picture_length,
            variants=self.variants,
        )


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table."""

    variant: str
    title: str
    sparsity: float  # percent of blocks skipped
    max_error: float  # max |flexattn - float64 reference|
    eager_error: float  # the same for the reference backend run in the working dtype
    ok: bool
    milliseconds: float
    picture: str


def run_demo(config: DemoConfig, on_row: Callable[[DemoRow], None] | None = None) -> list[DemoRow]:
    """Run every variant of ``config.variants``; return one :class:`DemoRow` per variant.

    ``on_row`` is called with each row as soon as its variant finishes (``flexattn demo`` prints
    it); pictures go to ``config.out_dir``.
    """
    config = config.resolved()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in config.variants:
        case = build_case(name, config.length, config.device, config.heads)
        rows.append(_run_case(name, case, config, out_dir))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _run_case(name: str, case: Case, config: DemoConfig, out_dir: Path) -> DemoRow:
    device = torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (config.batch, config.heads)
    q = torch.randn(*shape, case.q_len, config.head_dim, device=device, generator=generator)
    k = torch.randn(*shape, case.kv_len, config.head_dim, device=device, generator=generator)
    v = torch.randn(*shape, case.kv_len, config.head_dim, device=device, generator=generator)
    if case.sink_slot:
        v[:, :, 0] = 0.0
    q, k, v = (x.to(dtype) for x in (q, k, v))
    block_mask = block_mask_of(case, device, config.block_size)

    def attend(*qkv, **options):
        return flex_attention(*qkv, score_mod=case.score_mod, block_mask=block_mask, kernel_options=options)

    out = attend(q, k, v)
    milliseconds = _time_ms(lambda: attend(q, k, v), device)
    gold = attend(q.double(), k.double(), v.double(), BACKEND="REFERENCE")
    eager = attend(q, k, v, BACKEND="REFERENCE")
    max_error = (out.double() - gold).abs().max().item()
    eager_error = (eager.double() - gold).abs().max().item()
    picture = out_dir / f"{name}.png"
    small = build_case(name, min(config.picture_length, config.length), "cpu", config.heads)
    save_picture(small, config.block_size, picture)  # pictures are drawn on CPU
    return DemoRow(
        variant=name,
        title=case.title,
        sparsity=block_mask.sparsity(),
        max_error=max_error,
        eager_error=eager_error,
        ok=max_error <= 3 * eager_error + 1e-5,
        milliseconds=milliseconds,
        picture=str(picture),
    )


def _time_ms(fn: Callable, device: torch.device) -> float:
    """Median milliseconds per call: CUDA-event timings on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def table_header(config: DemoConfig) -> str:
    """The lines above the demo's table: the sizes, what each column means, the column names."""
    config = config.resolved()
    gpu = torch.device(config.device).type == "cuda"
    dtype = "bf16" if gpu else "fp32"
    backend = "Triton kernels" if gpu else "reference backend"
    timing = "CUDA-event time, triton.testing.do_bench" if gpu else "wall clock, 3 calls"
    return "\n".join(
        [
            f"flexattn demo on {config.device} ({backend}): B={config.batch} H={config.heads} "
            f"L={config.length} E={config.head_dim} {dtype}, blocks of {config.block_size}",
            "  sparsity: share of the (q, kv) area in skipped blocks; "
            "max err: max |flexattn - float64 reference|",
            f"  ok: max err <= 3 x the {dtype} reference backend's own error + 1e-5",
            f"  fwd ms: median milliseconds of one forward call ({timing})",
            f"{'variant':<24}{'mods':<48}{'sparsity':>9}{'max err':>10}{'ok':>4}{'fwd ms':>11}",
        ]
    )


def format_row(row: DemoRow) -> str:
    """One line of the demo's table (columns as in :func:`table_header`)."""
    title = row.title if len(row.title) <= 46 else row.title[:43] + "..."
    return (
        f"{row.variant:<24}{title:<48}{row.sparsity:>8.1f}%{row.max_error:>10.1e}"
        f"{'yes' if row.ok else 'NO':>4}{row.milliseconds:>11.2f}"
    )


def format_table(rows: list[DemoRow], config: DemoConfig) -> str:
    """The demo's whole result table: :func:`table_header`, then one :func:`format_row` per variant."""
    return "\n".join([table_header(config), *map(format_row, rows)])


# ---------------------------------------------------------------------------------------------------
# Pictures.
# ---------------------------------------------------------------------------------------------------


def element_picture(case: Case, device, block_size: int) -> torch.Tensor:
    """int (Lq, Lkv): 0 skipped block, 1 masked element in a visited block, 2 allowed in a partial
    block, 3 allowed in a full block (head 0, batch 0)."""
    allowed = create_mask(case.mask_mod or noop_mask, 1, 1, case.q_len, case.kv_len, device=device)[0, 0]
    block_mask = block_mask_of(case, device, block_size)
    visited = block_mask.to_dense()[0, 0].bool()  # (NQ, NKV)
    full = _full_blocks(block_mask)[0, 0]
    expand = lambda blocks: blocks.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)[
        : case.q_len, : case.kv_len
    ]
    picture = expand(visited).int() + allowed.int() + (allowed & expand(full)).int()
    return picture.cpu()


def _full_blocks(block_mask: BlockMask) -> torch.Tensor:
    """bool (B, H, NQ, NKV): the blocks the mask lists as full (mask_mod skipped)."""
    num, indices = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    nkv = block_mask.kv_indices.shape[-1]
    device = block_mask.kv_indices.device
    dense = torch.zeros(*block_mask.kv_indices.shape[:-1], nkv + 1, dtype=torch.bool, device=device)
    if num is None:
        return dense[..., :nkv]
    listed = torch.arange(indices.shape[-1], device=device) < num[..., None]
    dense.scatter_(-1, torch.where(listed, indices, nkv).long(), True)  # unlisted entries land in column nkv
    return dense[..., :nkv]


def score_picture(case: Case, device) -> torch.Tensor:
    """fp32 (Lq, Lkv): what ``score_mod`` adds to a zero score (head 0), NaN where masked."""
    zeros = torch.zeros(1, 1, case.q_len, case.kv_len, device=device)
    q, kv = index(0, case.q_len, device), index(0, case.kv_len, device)
    scores = eval_score_mod(case.score_mod, zeros, q, kv)[0, 0].float()
    allowed = create_mask(case.mask_mod or noop_mask, 1, 1, case.q_len, case.kv_len, device=device)[0, 0]
    return scores.masked_fill(~allowed, float("nan")).cpu()


def save_picture(case: Case, block_size: int, path: Path, device="cpu") -> None:
    """PNG of the case's block mask (and its score pattern for score mods), via matplotlib (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    panels = 2 if case.score_mod is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 5.2), squeeze=False)
    colours = ListedColormap(["#ffffff", "#dbe7f3", "#2b6cb0", "#1c4532"])
    ax = axes[0, 0]
    ax.imshow(
        element_picture(case, device, block_size).numpy(),
        cmap=colours,
        vmin=0,
        vmax=3,
        interpolation="nearest",
    )
    for edge in range(block_size, max(case.q_len, case.kv_len), block_size):
        if edge < case.kv_len:
            ax.axvline(edge - 0.5, color="#a0aec0", linewidth=0.5)
        if edge < case.q_len:
            ax.axhline(edge - 0.5, color="#a0aec0", linewidth=0.5)
    ax.set_title(
        f"{getattr(case.mask_mod, '__name__', 'noop')}\n"
        "(green: full blocks; blue / pale: allowed / masked in partial blocks)",
        fontsize=9,
    )
    ax.set_xlabel("kv_idx")
    ax.set_ylabel("q_idx")
    if case.score_mod is not None:
        ax = axes[0, 1]
        image = ax.imshow(score_picture(case, device).numpy(), cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, label="added to a zero score (blank: masked)")
        ax.set_title(f"{case.score_mod.__name__}: score_mod(0, b=0, h=0, q, kv)", fontsize=9)
        ax.set_xlabel("kv_idx")
    fig.suptitle(f"{case.title}  (Lq={case.q_len}, Lkv={case.kv_len}, blocks of {block_size})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ascii_picture(case: Case, block_size: int, max_cells: int = 96) -> str:
    """Terminal picture of a case's mask: one character per element when it fits in ``max_cells``
    columns ('█' allowed, '·' masked), otherwise the BlockMask's block picture."""
    block_mask = block_mask_of(case, "cpu", block_size)
    lines = [
        f"{case.title}: Lq={case.q_len}, Lkv={case.kv_len}, blocks of {block_size}, "
        f"{block_mask.sparsity():.1f}% of blocks skipped"
    ]
    if max(case.q_len, case.kv_len) <= max_cells:
        allowed = create_mask(case.mask_mod or noop_mask, 1, 1, case.q_len, case.kv_len, device="cpu")[0, 0]
        lines += ["".join("█" if x else "·" for x in row) for row in allowed.tolist()]
    else:
        lines.append("(one cell per block: '██' full, '░░' partial, blank skipped)")
        lines.append(block_mask[0, 0].to_string(grid_size=max_cells // 2).split("\n", 1)[1])
    return "\n".join(lines)
