"""The package's shape: no import cycles between its modules, docs in the repository."""
import ast
from pathlib import Path

from helpers import REPO

PACKAGES = {"vquant_pl": REPO / "vquant_pl", "vquant_pl.callbacks": REPO / "callbacks",
            "vquant_pl.datamodules": REPO / "datamodules"}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package-internal modules imported at module level (not inside functions)."""
    is_package = path.stem == "__init__"
    base = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{parent}.{node.module}" if node.module else parent
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "vquant_pl":
                found.add(t)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _top_level_imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            assert state.get(m) != 1, "import cycle: " + " -> ".join(stack[stack.index(m):] + [m])
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_rules_cited_by_the_code_live_in_the_repository():
    rules = REPO / "docs" / "quantization-rules.md"
    text = rules.read_text()
    for heading in ("## Rules", "## SQuant rounding", "## Activation range methods"):
        assert heading in text
    for path in _modules().values():
        assert "DESIGN.md" not in path.read_text(), f"{path} cites DESIGN.md, which is not in the repository"
