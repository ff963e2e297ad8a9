"""The package's shape: no module imports itself back through others (imports inside functions count), and no
module grows past MAX_LINES. Read from the source with ast: nothing is imported here."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"lowmem_graph": ROOT / "lowmem_graph", "lowmem_graph.kernels": ROOT / "kernels"}   # kernels/ installs
MAX_LINES = 400


def _modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package (kernels/ as lowmem_graph.kernels)."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (at the top, in functions, under `if`),
    relative imports resolved; `from . import x` names the submodule x when there is one, else the package."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    out = set()
    for target in found:
        while target and target not in modules:        # an attribute of a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_cycles(packages: dict[str, Path] = PACKAGES) -> list[list[str]]:
    """Every cycle of imports, each as the path that closes it (a -> b -> ... -> a), one per strongly connected
    set of modules (Tarjan), shortest first."""
    modules = _modules(packages)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:        # a shortest cycle through the group's first module, found breadth first
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                cycles.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return sorted(cycles, key=len)


def test_no_module_imports_itself_back():
    cycles = import_cycles()
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "lowmem_graph"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert import_cycles({"lowmem_graph": pkg}) == [["lowmem_graph.a", "lowmem_graph.b", "lowmem_graph.a"]]


def test_modules_stay_short():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in _modules(PACKAGES).values()}
    long = {name: n for name, n in lengths.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_the_memory_planner_reaches_nothing_above_the_nodes():
    """memory/ (planning, placement, streaming) knows the nodes and the topology, never a runtime: nothing it
    imports, directly or through others, builds a graph, runs a step or trains."""
    modules = _modules(PACKAGES)
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    above = {f"lowmem_graph.{m}" for m in ("graph", "edge_graph", "step", "train", "frozen_pass", "cache", "lm",
                                           "cli", "summary", "evaluate", "objectives", "fit", "placed")}
    for name in (m for m in modules if m.startswith("lowmem_graph.memory")):
        reached, todo = set(), [name]
        while todo:
            for w in graph[todo.pop()] - reached:
                reached.add(w)
                todo.append(w)
        assert not reached & above, f"{name} reaches {sorted(reached & above)}"
