"""scripts/setup.sh says what it installs before a long first install, and is silent when up to date.

Runs the real script in a scratch copy of the repository with a stand-in Python whose venv "pip"
succeeds instantly, so no package is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# `python -m venv DIR` makes DIR/bin/python, a stand-in for which every command succeeds.
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && printf '#!/usr/bin/env bash\\nexit 0\\n' >"$3/bin/python" && chmod +x "$3/bin/python"
fi
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    (tmp_path / "scripts").mkdir()
    for name in ("scripts/setup.sh", "scripts/constraints.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    return tmp_path


def _setup(checkout: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(checkout / "fake-python")}
    return subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=checkout, env=env, capture_output=True, text=True, check=True
    )


def test_first_run_prints_one_progress_line_then_later_runs_are_silent(checkout):
    first = _setup(checkout)
    assert first.stdout == ""
    assert first.stderr.splitlines() == [
        "scripts/setup.sh: installing PyTorch (CPU), Triton and flexattn into ./.venv "
        "(first run, about a minute)"
    ]
    again = _setup(checkout)
    assert (again.stdout, again.stderr) == ("", "")


def test_a_changed_pyproject_announces_the_reinstall(checkout):
    _setup(checkout)
    with (checkout / "pyproject.toml").open("a") as f:
        f.write("\n# changed\n")
    assert "installing flexattn and its dev tools" in _setup(checkout).stderr
