"""Imports run one way: down the layers below, with no cycle among modules or packages.

A package imports only the layers below its own, never one above and never a sibling on its own layer, so each layer
can be read, tested and changed with only what is under it in mind, and no import cycle can make a module's meaning
depend on which module was imported first. The files are parsed, not imported: every import counts, those inside
functions too. A new package fails `test_every_module_is_placed` until it is put on a layer in LAYERS on purpose.
"""

import ast
from collections import deque
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "components")  # the folders under ROOT whose imports are checked

LAYERS = [  # bottom to top: a unit may import the units of the layers below its own only
    ["service.errors", "service.credentials"],
    ["service.storage", "service.runtime"],
    ["service.spec"],
    ["service.data", "service.run"],
    ["service.method"],
    ["service.checkpoint", "service.observe"],
    ["service.evaluation"],
    ["service.train"],
    ["service.reports"],
    ["service.launch", "service.export"],
    ["service.cli", "components"],  # the TorchX components may import all of service but the CLI
    ["service.__main__"],  # `python -m service`: runs the CLI
]
LAYER = {unit: number for number, units in enumerate(LAYERS) for unit in units}


class Import(NamedTuple):
    source: str  # the importing module
    target: str  # the project module imported (a submodule named by `from package import submodule` included)
    line: str  # where, and the statement
    type_only: bool  # under `if TYPE_CHECKING:`


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def unit(module: str) -> str | None:
    """The entry of LAYERS a module belongs to (the root package `service` belongs to none)."""
    return max((u for u in LAYER if module == u or module.startswith(u + ".")), key=len, default=None)


def scan(root: Path) -> list[Import]:
    """Every import of a project module in every file, relative ones resolved."""
    known, imports = modules(root), []

    def existing(name: str) -> str:  # the module `import a.b.c` or `from a.b.c import ...` loads last
        while name not in known and "." in name:
            name = name.rpartition(".")[0]
        return name

    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def visit(node: ast.AST, type_only: bool) -> None:
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                # an import only type checkers run makes no cycle at run time but still points one way: it counts
                # for direction (misdirected), not for cycles (graph)
                for child in node.body:
                    visit(child, True)
                for child in node.orelse:
                    visit(child, type_only)
                return
            targets = []
            if isinstance(node, ast.Import):
                targets = [existing(alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0], base]))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else existing(base) for a in node.names]
            for target in dict.fromkeys(targets):
                if target in known and target != module:
                    where = f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}"
                    imports.append(Import(module, target, where, type_only))
            for child in ast.iter_child_nodes(node):
                visit(child, type_only)

        visit(ast.parse(path.read_text(), str(path)), False)
    return imports


def tree(edges: dict[str, dict[str, str]], start: str) -> dict[str, str]:
    """Each node reachable from start, with its predecessor on a shortest path from start (breadth first)."""
    parents, queue = {}, deque([start])
    while queue:
        node = queue.popleft()
        for nxt in edges.get(node, {}):
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return parents


def cycles(edges: dict[str, dict[str, str]]) -> list[str]:
    """One shortest cycle through each group of nodes that reach one another, each edge with its import line."""
    trees, found, done = {node: tree(edges, node) for node in edges}, [], set()
    for start in sorted(edges):
        if start in trees[start] and start not in done:
            group = {node for node in trees[start] if start in trees.get(node, {})}
            done |= group
            path = [start, trees[start][start]]
            while path[-1] != start:
                path.append(trees[start][path[-1]])
            path.reverse()
            lines = "".join(f"\n    {edges[a][b]}" for a, b in zip(path, path[1:]))
            found.append(f"{' -> '.join(path)} (of {len(group)} that reach one another){lines}")
    return found


def graph(imports: list[Import], key) -> dict[str, dict[str, str]]:
    """Edges between the keys (modules or units) of the imports that run: each with its first import line."""
    edges: dict[str, dict[str, str]] = {}
    for i in imports:
        source, target = key(i.source), key(i.target)
        if not i.type_only and source and target and source != target:
            edges.setdefault(source, {}).setdefault(target, i.line)
    return edges


def misdirected(imports: list[Import]) -> list[str]:
    found = []
    for i in imports:
        source, target = unit(i.source), unit(i.target)
        if source and target and source != target and LAYER[target] >= LAYER[source]:
            kind = "a layer above" if LAYER[target] > LAYER[source] else "a sibling on its layer"
            found.append(f"{source} (L{LAYER[source]}) imports {kind}, {target} (L{LAYER[target]}): {i.line}")
    return found


def unplaced(root: Path) -> list[str]:
    tree = modules(root)
    found = [f"{m} ({p.relative_to(root)}) is on no layer" for m, p in tree.items() if not unit(m) and m != "service"]
    return found + [f"{u} is in LAYERS but not in the tree" for u in LAYER if not any(unit(m) == u for m in tree)]


def test_no_module_cycle():
    found = cycles(graph(scan(ROOT), key=lambda module: module))
    assert not found, "modules import one another in a cycle:\n" + "\n".join(found)


def test_no_package_cycle():
    found = cycles(graph(scan(ROOT), key=unit))
    assert not found, "packages import one another in a cycle:\n" + "\n".join(found)


def test_imports_run_down_the_layers():
    found = misdirected(scan(ROOT))
    assert not found, "imports that do not run down the layers:\n" + "\n".join(found)


def test_every_module_is_placed():
    found = unplaced(ROOT) + [f"the root package imports: {i.line}" for i in scan(ROOT) if i.source == "service"]
    assert not found, "put each on a layer in LAYERS (tests/unit/test_import_graph.py):\n" + "\n".join(found)


def test_the_checker_reports_a_planted_upward_import_a_cycle_and_an_unplaced_package(tmp_path):
    files = {
        "service/__init__.py": "",
        "service/errors.py": "import service.cli\n",  # upward, and a cycle with the CLI
        "service/cli/__init__.py": "from service import errors\n",
        "service/spec/__init__.py": "def load():\n    from service.storage import filesystem\n",  # lazy: counts
        "service/storage/__init__.py": "",
        "service/storage/filesystem.py": "from ..spec import StorageSpec\n",  # relative, upward, closes a cycle
        "service/runtime/__init__.py": "from service.storage.filesystem import open\n",  # a sibling
        "service/method/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import service.train\n",
        "service/train/__init__.py": "from service.method import Model\n",  # no cycle: the other way is type-only
        "service/stray/__init__.py": "",
        "components/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    imports = scan(tmp_path)
    assert [c.split(" (")[0] for c in cycles(graph(imports, key=lambda m: m))] == [
        "service.cli -> service.errors -> service.cli", "service.spec -> service.storage.filesystem -> service.spec"]
    assert [c.split(" (")[0] for c in cycles(graph(imports, key=unit))] == [
        "service.cli -> service.errors -> service.cli", "service.spec -> service.storage -> service.spec"]
    assert "service/spec/__init__.py:2: from service.storage import filesystem" in cycles(graph(imports, key=unit))[1]
    assert sorted(f.split(":")[0] for f in misdirected(imports)) == [
        "service.errors (L0) imports a layer above, service.cli (L10)",
        "service.method (L4) imports a layer above, service.train (L7)",  # type-only: counts for direction
        "service.runtime (L1) imports a sibling on its layer, service.storage (L1)",
        "service.storage (L1) imports a layer above, service.spec (L2)",
    ]
    assert "service.stray (service/stray/__init__.py) is on no layer" in unplaced(tmp_path)
