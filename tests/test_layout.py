"""The package's shape: the layer order (no upward import, at module level or inside a
function), no import cycles, no private names across modules, layer state owned by
`state.py`, tests mirroring the source, docs in the repository."""
import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGES = {"vquant_pl": REPO / "vquant_pl", "vquant_pl.callbacks": REPO / "callbacks",
            "vquant_pl.datamodules": REPO / "datamodules"}

#: The layer order, bottom first: a module imports only from its own layer or the ones below.
ORDER = [
    ("vquant_pl.config", "vquant_pl._lightning", "vquant_pl.csrc", "vquant_pl.configs"),
    ("vquant_pl.layers", "vquant_pl.ops"),
    ("vquant_pl.report", "vquant_pl.input_quantizer", "vquant_pl.probe", "vquant_pl.state"),
    ("vquant_pl.nvidia", "vquant_pl.methods"),
    ("vquant_pl.quantize",),
    ("vquant_pl.models", "vquant_pl.export", "vquant_pl.plots"),
    ("vquant_pl.classifier", "vquant_pl.datamodules", "vquant_pl.callbacks"),
    ("vquant_pl.cli",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "vquant_pl" and parts and parts[0] in ("callbacks", "datamodules"):
                continue
            out[name] = path
    return out


def _rank(module: str) -> int:
    if module == "vquant_pl":  # the package's __init__ gathers the public names of every layer
        return len(ORDER)
    for rank, names in enumerate(ORDER):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    raise AssertionError(f"{module} has no place in tests/test_layout.py ORDER: add it to a layer")


def _imports(name: str, path: Path, known: set[str], top_level_only: bool):
    """(imported module, imported names, line) for package-internal imports."""
    is_package = path.stem == "__init__"
    base = name if is_package else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if top_level_only and isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.Import):
            pairs = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                module = f"{parent}.{node.module}" if node.module else parent
            else:
                module = node.module or ""
            pairs = [(module, [a.name for a in node.names])]
        else:
            continue
        for module, names in pairs:
            if not module.startswith("vquant_pl"):
                continue
            for n in names or [None]:
                target = f"{module}.{n}" if n and f"{module}.{n}" in known else module
                yield target, n, node.lineno


def test_every_import_follows_the_layer_order():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, _, line in _imports(name, path, set(modules), top_level_only=False):
            if _rank(target) > _rank(name):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target} (a higher layer)")
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = [f"{path.relative_to(REPO)}:{line} imports {n} from {target}"
           for name, path in modules.items()
           for target, n, line in _imports(name, path, set(modules), top_level_only=False)
           if n and n.startswith("_") and not n.startswith("__") and target != name and target in modules
           and not target.endswith("." + n)]  # a private name of another module (a `_module` itself is fine)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t, _, _ in _imports(name, path, set(modules), top_level_only=True)
                    if t not in (name, "vquant_pl")} for name, path in modules.items()}
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


def test_only_state_touches_a_layers_dict():
    """Quantization state is attached, read and saved through `vquant_pl.state` only."""
    bad = []
    for name, path in _modules().items():
        if name == "vquant_pl.state":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue  # an object's own state (pickling)
                if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "type":
                    continue  # a class's own namespace
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, "a module other than vquant_pl/state.py reads or writes a layer's __dict__: " + ", ".join(bad)


def test_top_level_stays_small_and_tests_mirror_the_subpackages():
    top = [p for p in (REPO / "vquant_pl").glob("*.py") if p.stem != "__init__"]
    assert len(top) <= 12, sorted(p.name for p in top)
    for sub in ("ops", "methods", "nvidia", "cli"):
        assert (REPO / "vquant_pl" / sub / "__init__.py").is_file()
        assert list((REPO / "tests" / sub).glob("test_*.py")), f"tests/{sub}/ has no tests"
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), "two test files share a name (pytest's rootdir imports collide)"


@pytest.mark.parametrize("module", ["vquant_pl.nvidia.tensor_quant", "vquant_pl.nvidia.calib",
                                    "vquant_pl.nvidia.quant_modules", "vquant_pl.cli.app"])
def test_a_submodule_is_not_shadowed_by_a_name_of_its_package(module):
    import importlib
    import types

    package, _, leaf = module.rpartition(".")
    assert isinstance(getattr(importlib.import_module(package), leaf, None) or importlib.import_module(module),
                      types.ModuleType)
    from_import = getattr(importlib.import_module(package), leaf)
    assert isinstance(from_import, types.ModuleType), f"`from {package} import {leaf}` is not the module"


def test_rules_cited_by_the_code_live_in_the_repository():
    rules = REPO / "docs" / "quantization-rules.md"
    text = rules.read_text()
    for heading in ("## Rules", "## SQuant rounding", "## Activation range methods"):
        assert heading in text
    for path in _modules().values():
        assert "DESIGN.md" not in path.read_text(), f"{path} cites DESIGN.md, which is not in the repository"
