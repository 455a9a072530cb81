"""The documentation runs: every docstring example, and every Python block of README.md and
docs/*.md (a block preceded by `<!-- not run: reason -->` is skipped with that reason)."""
import doctest
import importlib
import re
import subprocess
import sys

import pytest

from helpers import REPO

PACKAGES = {"vquant_pl": REPO / "vquant_pl", "vquant_pl.callbacks": REPO / "callbacks",
            "vquant_pl.datamodules": REPO / "datamodules"}


def _modules_with_examples() -> list[str]:
    out = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if ">>>" not in path.read_text() or path.name == "__main__.py":
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append(".".join([package, *parts]))
    return out


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _python_blocks() -> list[tuple[str, int, str, str | None]]:
    blocks = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in re.finditer(r"(<!-- not run: (?P<why>[^>]*?) -->\s*\n)?```python\n(?P<code>.*?)```", text, re.S):
            line = text[:m.start("code")].count("\n")
            blocks.append((path.relative_to(REPO).as_posix(), line, m.group("code"), m.group("why")))
    return blocks


@pytest.mark.parametrize("where,line,code,why", _python_blocks(), ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_markdown_python_blocks_run(where, line, code, why, tmp_path):
    if why:
        pytest.skip(f"{where}:{line}: {why}")
    script = tmp_path / "block.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, f"{where}:{line}\n{out.stderr[-3000:]}"
