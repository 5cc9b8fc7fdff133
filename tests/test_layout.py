"""The package's shape (README's Layout): imports run down the layers, no module imports an entry point, one job per
module (at most 450 lines). Read from the source with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

RAT = Path(__file__).resolve().parents[1] / "rat"

# Each package of rat and its layer: a module may import its own package and any lower layer, never a higher layer or
# a peer of its own layer (train and eval know nothing of each other; augment, models and attacks neither).
LAYERS = {
    "rat": 0, "rat.cli": 0, "rat.io": 0, "rat.logging": 0, "rat.precision": 0, "rat.config": 0,
    "rat.data": 1,
    "rat.augment": 2, "rat.models": 2, "rat.attacks": 2,
    "rat.train": 3, "rat.eval": 3,
    "rat.quant": 4,
}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(RAT.rglob("*.py")):
        parts = path.relative_to(RAT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The rat modules ``name`` imports, at module level or inside functions (lazy imports are imports too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            out.add(module)
            # `from rat.eval import sweep` imports the module rat.eval.sweep when there is one
            out.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in _MODULES)
    return {m for m in out if m == "rat" or m.startswith("rat.")}


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


_MODULES = _modules()


def test_every_package_has_a_layer():
    assert {_package(m) for m in _MODULES} <= set(LAYERS), "add the new package to LAYERS (and README's Layout)"


def test_imports_run_down_the_layers():
    wrong = []
    for name, path in _MODULES.items():
        own = _package(name)
        for target in sorted(_imports(name, path)):
            other = _package(target)
            if target.endswith(".__main__"):
                wrong.append(f"{name} -> {target} (an entry point)")
            elif other != own and (LAYERS[other] >= LAYERS[own] > 0 or LAYERS[other] > LAYERS[own] == 0):
                wrong.append(f"{name} (layer {LAYERS[own]}) -> {target} (layer {LAYERS[other]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_modules_have_one_job():
    long = {name: n for name, path in _MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their jobs): {long}"
