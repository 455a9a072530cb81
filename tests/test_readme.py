"""The README's "Inside your Lightning project" code runs as written (its own process, as a user's script)."""
import re
import subprocess
import sys

from helpers import REPO


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under {heading!r}, found {len(blocks)}"
    return blocks[0]


def test_inside_your_lightning_project_runs(tmp_path):
    code = readme_block("Inside your Lightning project")
    assert "import lightning as L" in code and "class MyClassifier(L.LightningModule)" in code
    script = tmp_path / "user_project.py"
    script.write_text(code + "\nimport sys\nprint('NAMESPACES', sorted(m for m in ('lightning', 'pytorch_lightning')"
                             " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    confidence, layers = lines[-2].split()
    assert 0 < float(confidence) <= 1 and layers == "21"  # the backbone's 21 conv/linear layers
    assert lines[-1] == "NAMESPACES ['lightning']"  # pytorch_lightning never needed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user_project.py"]  # logger=False: no files
