"""Every Python block in README.md and docs/*.md runs as pasted (on CPU here; on a GPU where there is one).

Fences must name their language: ```python blocks are executed, ```text / ```bash / ```console
blocks (signatures, shell commands, printed output) are not. A Python block runs in a fresh
namespace unless its first line says it continues the block before it, e.g.
``# continues the setup above``; then it runs in that block's namespace, as pasted after it.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NOT_RUN = {"text", "bash", "console"}
CONTINUES = "# continues the "

# Python blocks per page. A page's test fails when its count differs, so it cannot pass vacuously
# (a fence renamed by mistake, a page the extractor no longer parses); update it with the docs.
PYTHON_BLOCKS = {
    "README.md": 1,
    "docs/api.md": 0,
    "docs/architecture.md": 0,
    "docs/composing_masks.md": 5,
    "docs/context_parallel.md": 1,
    "docs/debugging.md": 6,
    "docs/kernel_options.md": 1,
    "docs/learnable_bias.md": 2,
    "docs/paged_kv.md": 1,
    "docs/programming_model.md": 1,
    "docs/variants.md": 12,
}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a page, in order."""
    text = (ROOT / page).read_text()
    return [
        Block(page, text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
        for m in FENCE.finditer(text)
    ]


def test_every_page_is_listed():
    assert sorted(PYTHON_BLOCKS) == sorted(PAGES), "add the new page to PYTHON_BLOCKS"


@pytest.mark.parametrize("page", PAGES)
def test_every_fence_names_its_language(page):
    unnamed = [f"{b.page}:{b.line}" for b in blocks(page) if b.language not in NOT_RUN | {"python"}]
    assert not unnamed, f"fences without python/text/bash/console: {unnamed}"


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_as_pasted(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (pictures)
    python = [b for b in blocks(page) if b.language == "python"]
    expected = PYTHON_BLOCKS[page]
    assert len(python) == expected, f"{page}: {len(python)} Python blocks, expected {expected}"
    namespace: dict = {}
    for block in python:
        if not block.code.startswith(CONTINUES):
            namespace = {"__name__": "__docs__"}
        try:
            exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the block at {block.page}:{block.line} failed:\n{traceback.format_exc()}")


def test_the_cache_table_names_tests_that_exist():
    """Each row of architecture.md's "What each cache keys on" names test files that exist, and the
    test functions it names exist in them (a renamed test must not leave a row vouched for by nothing)."""
    text = (ROOT / "docs/architecture.md").read_text()
    table = text.split("## What each cache keys on", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 10
    for row in rows:
        tests = row.rsplit("|", 2)[-2]
        files = re.findall(r"`(tests/[\w/]+\.py)", tests)
        names = re.findall(r"\b(test_\w+)\b(?!\.py)", tests)
        assert files and all((ROOT / f).exists() for f in files), row
        sources = "".join((ROOT / f).read_text() for f in files)
        missing = [n for n in names if f"def {n}(" not in sources]
        assert not missing, f"{missing} not found in {files}"
