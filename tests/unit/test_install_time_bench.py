"""benchmarks/install_time.py: it times the README's own pip install, with and without --no-compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import load_benchmark


@pytest.fixture(scope="module")
def bench() -> Any:
    return load_benchmark("install_time")


def test_it_times_the_readmes_own_pip_install_with_and_without_byte_compilation(bench: Any) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    pip = bench.readme_pip_install(readme)
    assert pip[:2] == ["pip", "install"] and "-e" in pip and ".[dev]" in pip
    compiled, skipped = bench.variants(pip).values()
    assert "--no-compile" not in compiled and skipped == [*compiled[:2], "--no-compile", *compiled[2:]]
    assert [w for w in skipped if w != "--no-compile"] == [w for w in pip if w != "--no-compile"]


def test_readme_without_an_install_block_or_pip_is_refused(bench: Any) -> None:
    with pytest.raises(SystemExit, match="no ```bash block"):
        bench.readme_pip_install("# nothing here\n")
    with pytest.raises(SystemExit, match="no `pip install`"):
        bench.readme_pip_install("<!-- ci:install -->\n```bash\nmake all && make test\n```\n")
    fenced = '<!-- ci:install -->\n```bash\npython3 -m venv .venv && pip install --no-compile "torch==2" -e . && run\n```\n'
    assert bench.readme_pip_install(fenced) == ["pip", "install", "--no-compile", "torch==2", "-e", "."]
