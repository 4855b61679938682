"""The shape of the code: the core stands alone (no workflow module, no transformers / datasets /
lm-eval), no module imports itself back through another (no import circles, counting the imports
inside functions too), no function outside the tests is over 80 lines, and the README's map names
every folder and module."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# installed package name -> source folder (pyproject.toml [tool.setuptools.package-dir])
PACKAGES = {"paretoq_ao": ROOT / "paretoq_ao", "paretoq_ao.triton_kernels": ROOT / "triton_kernels",
            "paretoq_ao.export": ROOT / "export"}
WORKFLOW_DEPS = ("transformers", "datasets", "lm_eval")
# the old names of workflow modules: alias files that make the old name the workflow module itself
ALIASES = ("hf", "recipe", "data", "evaluate", "distributed", "generate", "cli", "example")


def _modules():
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg] + parts)] = path
    return mods


def _imports(name: str, path: pathlib.Path, mods) -> set:
    """Every module ``name`` imports, at the top or inside a function ('from . import x' names
    the submodule x, not the package)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods}
            out |= subs
            if len(subs) < len(node.names):
                out.add(mod)
    return {m for m in out if m != name}


def _graph():
    mods = _modules()
    return {n: {m for m in _imports(n, p, mods) if m in mods} for n, p in mods.items()}, mods


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state = {}

    def visit(v, stack):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w, stack)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v, [])
            if found:
                return found
    return None


def test_no_import_circles():
    graph, _ = _graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_circle():  # the check above can fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _core(mods):
    skip = {f"paretoq_ao.{a}" for a in ALIASES} | {"paretoq_ao.__main__"}
    return {n: p for n, p in mods.items()
            if n.startswith("paretoq_ao.") and not n.startswith(("paretoq_ao.workflow", "paretoq_ao.triton_kernels",
                                                                  "paretoq_ao.export"))
            and n not in skip} | {"paretoq_ao": mods["paretoq_ao"]}


def test_core_imports_no_workflow_module_nor_its_dependencies():
    graph, mods = _graph()
    core = _core(mods)
    assert {"paretoq_ao.formats", "paretoq_ao.packed", "paretoq_ao.ops", "paretoq_ao._targets"} <= set(core)
    for name, path in core.items():
        imported = _imports(name, path, mods)
        bad = sorted(m for m in imported
                     if m.startswith("paretoq_ao.workflow") or m.split(".")[0] in WORKFLOW_DEPS
                     or m in {f"paretoq_ao.{a}" for a in ALIASES})
        assert not bad, f"{name} imports {bad}"


def test_import_paretoq_ao_loads_no_workflow():
    code = ("import sys, paretoq_ao\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {WORKFLOW_DEPS!r} "
            "or m.startswith('paretoq_ao.workflow')]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_old_module_names_are_the_workflow_modules():
    import importlib

    for name in ALIASES:
        old = importlib.import_module(f"paretoq_ao.{name}")
        assert old is importlib.import_module(f"paretoq_ao.workflow.{name}"), name


def test_readme_map_names_every_folder():
    """The README's map of the code lists each package folder of the tree."""
    text = (ROOT / "README.md").read_text()
    assert "## Map of the code" in text
    section = text.split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    for folder in ("paretoq_ao/", "paretoq_ao/workflow/", "triton_kernels/", "export/", "export/csrc/",
                   "benchmarks/", "tests/"):
        assert f"`{folder}`" in section, folder
    for path in sorted((ROOT / "paretoq_ao").glob("*.py")) + sorted((ROOT / "paretoq_ao" / "workflow").glob("*.py")):
        if path.stem not in ("__init__", "__main__") + ALIASES or path.parent.name == "workflow":
            assert f"{path.stem}" in section, f"{path.relative_to(ROOT)} is not in the README map"


MAX_FUNCTION_LINES = 80
SOURCE_FOLDERS = ("paretoq_ao", "triton_kernels", "export", "benchmarks")


def _long_functions(tree: ast.AST, limit: int):
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_over_80_lines_outside_tests():
    found = []
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, line, n in _long_functions(ast.parse(path.read_text()), MAX_FUNCTION_LINES):
                found.append(f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)")
    assert not found, "functions over 80 lines: " + "; ".join(found)


def test_long_function_finder_counts_lines():  # the check above can fail
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    assert _long_functions(ast.parse(f"def f():\n{body}\n"), MAX_FUNCTION_LINES) == [("f", 1, 81)]
    assert _long_functions(ast.parse("def g():\n    pass\n"), MAX_FUNCTION_LINES) == []
