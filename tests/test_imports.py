"""The package's modules import each other in one direction, with no circle, and ``import gpubp``
loads none of the optional integrations, nor scipy.special before an activation needs it."""

import ast
from pathlib import Path

import numpy as np
import pytest

import gpubp
from child_process import run_python

PACKAGE = Path(gpubp.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """gpubp modules that ``path`` imports when it loads (imports inside functions run later)."""
    return _imports(ast.parse(path.read_text()).body, modules)


def _imports(nodes, modules: set[str]) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # The package's own __init__ gathers the public names; a cycle through it is no circle between modules.
    # A package that imports its submodule ("from gpubp.optim import lr_scheduler") names itself: no edge.
    return {name: _top_level_imports(path, modules) - {"gpubp", name}
            for name, path in paths.items() if name != "gpubp"}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_modules_import_without_a_circle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def _every_import(source: str, modules: set[str]) -> set[str]:
    """gpubp modules that ``source`` imports anywhere, inside functions too."""
    return _imports(ast.walk(ast.parse(source)), modules)


def test_the_training_step_and_the_data_parallel_wrapper_never_import_the_training_loop():
    # fit uses them; they share what they need with it one floor down (gpubp.batches).
    modules = set(_import_graph()) | {"gpubp.train"}
    for name in ("step", "distributed"):
        imported = _every_import((PACKAGE / f"{name}.py").read_text(), modules)
        assert "gpubp.train" not in imported, f"gpubp.{name} imports gpubp.train"


def test_the_import_finder_sees_an_import_inside_a_function():
    source = "def run():\n    from gpubp import train\n    return train\n"
    assert "gpubp.train" in _every_import(source, {"gpubp.train"})


def test_optimizers_do_not_import_the_layer_module():
    assert "gpubp.layers" not in _import_graph()["gpubp.optim"]


def test_cycle_finder_reports_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]


def test_import_gpubp_imports_no_optional_integration():
    code = "import sys, gpubp; print(sorted({'sklearn', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    assert run_python(code, timeout=60).strip() == "[]"


def test_import_gpubp_leaves_scipy_special_for_the_first_activation_that_needs_it():
    # scipy.special costs about as much as the rest of `import gpubp`; a relu model never needs it.
    code = ("import sys, numpy as np, gpubp\n"
            "before = 'scipy.special' in sys.modules\n"
            "z = np.array([-2.0, 0.0, 3.0], dtype=np.float32); y = np.empty_like(z)\n"
            "gpubp.activations.forward('relu', z, y)\n"
            "after_relu = 'scipy.special' in sys.modules\n"
            "gpubp.activations.forward('sigmoid', z, y)\n"
            "print(before, after_relu, 'scipy.special' in sys.modules, y.tolist())")
    before, after_relu, after_sigmoid, values = run_python(code, timeout=60).strip().split(" ", 3)
    assert (before, after_relu, after_sigmoid) == ("False", "False", "True")
    expected = 1.0 / (1.0 + np.exp(-np.array([-2.0, 0.0, 3.0])))
    np.testing.assert_allclose(eval(values), expected, rtol=1e-6)


def test_the_lazy_scipy_special_names_only_what_it_forwards():
    from gpubp import _special
    from scipy import special

    assert _special.erf is special.erf and _special.expit is special.expit
    with pytest.raises(AttributeError, match="no attribute 'gamma'"):
        _special.gamma
