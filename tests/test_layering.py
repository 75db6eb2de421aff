"""The package's layers: imports point downwards only, and no module imports itself in a circle.

Layers, bottom to top (a module may import its own package and anything in a lower layer):

    errors < core < {models, data, io} < rollout < train < {rewards, eval} < demo < cli

Function-level (lazy) imports count as much as top-level ones: a lazy import is still an arrow.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"

LAYER = {
    "errors": 0,
    "core": 1,
    "models": 2, "data": 2, "io": 2,
    "rollout": 3,
    "train": 4,
    "rewards": 5, "eval": 5,
    "demo": 6,
    "cli": 7,  # `rlhf-jax demo` runs the demo; nothing imports the CLI
}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(name, path):
    """Modules of ours that `name` imports (absolute, resolved from relative imports)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "rlhf_jax")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "rlhf_jax":
                continue
            for alias in node.names:
                out.add(f"{base}.{alias.name}")  # may be a submodule or a name in `base`
            out.add(base)
    return out


def _resolve(target, known):
    """The longest known module that `target` names (a `from m import name` gives m.name)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target


def _layer_of(module):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root re-exports; it is checked separately
    return parts[1]


MODULES = dict(_modules())
GRAPH = {}
for _name, _path in MODULES.items():
    GRAPH[_name] = {t for t in (_resolve(i, MODULES) for i in _imports(_name, _path)) if t and t != _name}


def test_every_subpackage_has_a_layer():
    unknown = sorted({_layer_of(m) for m in MODULES} - set(LAYER) - {None})
    assert not unknown, f"modules outside the layer table: {unknown} (add them to LAYER and STYLE.md)"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer_of(m)))
def test_imports_point_downwards(module):
    here = _layer_of(module)
    bad = []
    for target in sorted(GRAPH[module]):
        there = _layer_of(target)
        if there is None:
            bad.append(f"{target} (the package root)")
        elif there != here and LAYER[there] >= LAYER[here]:
            bad.append(f"{target} (layer {there}, rank {LAYER[there]} >= {here}'s {LAYER[here]})")
    assert not bad, f"{module} imports upwards or sideways: {bad}"


def test_root_reexports_only_core_and_the_lazy_sampler():
    allowed = {"core", "rollout"}
    bad = sorted(t for t in GRAPH["rlhf_jax"] if _layer_of(t) not in allowed)
    assert not bad, f"rlhf_jax/__init__.py imports {bad}"


def test_no_import_circle():
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    # A package's __init__ re-exporting its own submodules is no circle of behaviour, but a
    # submodule importing its package __init__ back is: both directions are listed here.
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_nothing_of_ours_but_core_and_errors():
    for module in (m for m in MODULES if _layer_of(m) == "core"):
        bad = sorted(t for t in GRAPH[module] if _layer_of(t) not in ("core", "errors"))
        assert not bad, f"{module} imports {bad}"


def test_the_checker_sees_an_upward_arrow(tmp_path):
    # The test itself must be able to fail: a fake core module importing train is caught.
    fake = tmp_path / "rlhf_jax" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from rlhf_jax.train import state\n")
    found = {_resolve(i, MODULES) for i in _imports("rlhf_jax.core.bad", fake / "bad.py")}
    assert "rlhf_jax.train.state" in found or "rlhf_jax.train" in found
    assert LAYER["train"] > LAYER["core"]
