"""Import graph of a package's own modules, read from source: prints it, finds cycles and private-name imports.

Usage::

    python scripts/import_graph.py [--root minicache] [--package-name minicache] [--dot FILE] [--quiet]

Every ``*.py`` file under ``--root`` (default: ``minicache/`` of this repository) is parsed with :mod:`ast`;
nothing of the project is imported or run. Module names are dotted (``minicache.runtime.cache``); a package's
``__init__.py`` is the package itself (``minicache.runtime``). ``--package-name`` (default: the root directory's
name) is the dotted name of the root.

What counts as an edge ``A -> B`` ("A imports B"), both modules of the package:

* every ``import`` and ``from ... import ...`` statement anywhere in A's file: at module level, but also inside
  functions and methods, ``if TYPE_CHECKING:`` blocks and ``try``/``except``. A lazy import is still a
  dependency (it runs whenever the function does, and the layering it breaks is the same), so it counts;
  the reports mark such imports ``(inside a function)`` or ``(under TYPE_CHECKING)``;
* ``import a.b.c``: an edge to ``a.b.c``;
* ``from p import name``: an edge to ``p.name`` if that is a module of the package, else to ``p``;
* relative imports (``from . import x``, ``from ..a import b``) are resolved against A's package first;
* ``importlib.import_module("minicache.x")`` (or ``import_module(...)``) with a constant string argument;
  a relative name is resolved against a constant ``package=`` argument, ``__name__`` or ``__package__``.
  A computed argument (``import_module(name)``) cannot be resolved from source and is not an edge.

A dotted name that is not a module of the package (``import minicache.a.Thing``) goes to its longest prefix
that is one. Imports of anything outside the package, and a module importing itself, are ignored.

Reports, on stdout:

* the graph, one line per module: ``minicache.runtime.cache -> minicache.profile, minicache.runtime.views``
  (``--quiet`` leaves it out);
* each cycle, a strongly connected component of more than one module: its modules, and one concrete cycle
  through them with the file and line of the import that creates each edge
  (``minicache/a.py:12 imports minicache.b``);
* each private-name import: ``from minicache.x import _name`` (a name with a leading underscore that is not a
  dunder, and not a submodule of ``minicache.x``) in a module other than ``minicache.x``;
* a last line ``import graph: 84 modules, 201 edges, 2 cycles, 3 private imports``.

``--dot FILE`` also writes the graph as Graphviz DOT, the edges inside cycles in red.

Exit status: 0 when there is no cycle and no private-name import; 1 when there is one (or a file could not be
parsed: the graph would be incomplete); 2 for a usage error (bad option, missing root directory, unwritable
DOT file).
"""

import argparse
import ast
import itertools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "minicache"


@dataclass(frozen=True)
class ImportSite:
    """One import statement (or ``import_module`` call) that creates the edge ``importer -> target``."""

    importer: str
    path: str
    line: int
    target: str
    context: str = ""  # "", "inside a function" or "under TYPE_CHECKING"


@dataclass(frozen=True)
class PrivateImport:
    """``from source import name`` of a private ``name`` in ``importer``, another module than ``source``."""

    importer: str
    path: str
    line: int
    source: str
    name: str


@dataclass
class ImportGraph:
    """The modules of a package, the import edges among them and the private-name imports found."""

    modules: dict[str, Path]
    edges: dict[str, dict[str, list[ImportSite]]] = field(default_factory=dict)
    private_imports: list[PrivateImport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def targets(self, module: str) -> list[str]:
        """Sorted modules that ``module`` imports."""
        return sorted(self.edges.get(module, {}))

    @property
    def edge_count(self) -> int:
        """Number of distinct ``(importer, target)`` pairs."""
        return sum(len(targets) for targets in self.edges.values())


@dataclass(frozen=True)
class _FileContext:
    importer: str
    is_package: bool
    path: str
    modules: frozenset[str]
    package_name: str


def module_name(path: Path, root: Path, package_name: str) -> str:
    """Dotted module name of the file ``path`` under the package directory ``root``.

    Parameters
    ----------
    path : Path
        A ``.py`` file under ``root``.
    root : Path
        The package directory.
    package_name : str
        Dotted name of the package ``root`` is.

    Returns
    -------
    str
        ``package_name`` followed by the file's directories and stem; ``__init__.py`` names its directory.
    """
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([package_name, *parts])


def discover_modules(root: Path, package_name: str) -> dict[str, Path]:
    """Every ``*.py`` file under ``root`` (hidden directories skipped), by dotted module name.

    Parameters
    ----------
    root : Path
        The package directory.
    package_name : str
        Dotted name of the package ``root`` is.

    Returns
    -------
    dict[str, Path]
        Module name to file, sorted by name.
    """
    found = {}
    for path in root.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        found[module_name(path, root, package_name)] = path
    return dict(sorted(found.items()))


def resolve_relative(importer: str, is_package: bool, level: int, name: str | None) -> str | None:
    """Absolute name of a relative import ``from {'.' * level}{name} import ...`` written in ``importer``.

    Parameters
    ----------
    importer : str
        Dotted name of the module that contains the import.
    is_package : bool
        Whether ``importer`` is a package (an ``__init__.py``), whose own name is then the base.
    level : int
        Number of leading dots; 0 means ``name`` is already absolute.
    name : str or None
        The dotted name after the dots, if any.

    Returns
    -------
    str or None
        The absolute dotted name, or None when the dots go above the top-level package.
    """
    if level == 0:
        return name
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > len(base):
        return None
    parts = base[: len(base) - level + 1]
    if name:
        parts.extend(name.split("."))
    return ".".join(parts)


def is_private_name(name: str) -> bool:
    """Whether ``name`` has a leading underscore and is not a dunder (``__all__``)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_package(name: str, package_name: str) -> bool:
    return name == package_name or name.startswith(package_name + ".")


def _known_module(name: str, modules: frozenset[str]) -> str | None:
    """``name`` or its longest prefix that is a module of the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _constant_str(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


class _ImportCollector(ast.NodeVisitor):
    """Collects the import sites and private-name imports of one file."""

    def __init__(self, ctx: _FileContext) -> None:
        self.ctx = ctx
        self.function_depth = 0
        self.type_checking_depth = 0
        self.sites: list[ImportSite] = []
        self.private: list[PrivateImport] = []

    def _context(self) -> str:
        if self.function_depth:
            return "inside a function"
        return "under TYPE_CHECKING" if self.type_checking_depth else ""

    def _add_edge(self, target: str | None, line: int) -> None:
        if target is None or not _in_package(target, self.ctx.package_name):
            return
        known = _known_module(target, self.ctx.modules)
        if known is not None and known != self.ctx.importer:
            self.sites.append(ImportSite(self.ctx.importer, self.ctx.path, line, known, self._context()))

    def _visit_function(self, node: ast.AST) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_checking_depth += 1
        for statement in node.body:
            self.visit(statement)
        self.type_checking_depth -= 1
        for statement in node.orelse:
            self.visit(statement)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add_edge(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        ctx = self.ctx
        source = resolve_relative(ctx.importer, ctx.is_package, node.level, node.module)
        if source is None or not _in_package(source, ctx.package_name):
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if alias.name != "*" and submodule in ctx.modules:
                self._add_edge(submodule, node.lineno)
                continue
            self._add_edge(source, node.lineno)
            if is_private_name(alias.name) and _known_module(source, ctx.modules) != ctx.importer:
                self.private.append(PrivateImport(ctx.importer, ctx.path, node.lineno, source, alias.name))

    def visit_Call(self, node: ast.Call) -> None:
        self._add_edge(self._import_module_target(node), node.lineno)
        self.generic_visit(node)

    def _import_module_target(self, node: ast.Call) -> str | None:
        func = node.func
        named = isinstance(func, ast.Name) and func.id == "import_module"
        attribute = (
            isinstance(func, ast.Attribute)
            and func.attr == "import_module"
            and isinstance(func.value, ast.Name)
            and func.value.id == "importlib"
        )
        if not (named or attribute) or not node.args:
            return None
        name = _constant_str(node.args[0])
        if name is None or not name.startswith("."):
            return name
        level = len(name) - len(name.lstrip("."))
        base = self._package_argument(node)
        return None if base is None else resolve_relative(base, True, level, name[level:] or None)

    def _package_argument(self, node: ast.Call) -> str | None:
        package = node.args[1] if len(node.args) > 1 else None
        package = next((kw.value for kw in node.keywords if kw.arg == "package"), package)
        if isinstance(package, ast.Name) and package.id == "__name__":
            return self.ctx.importer
        if isinstance(package, ast.Name) and package.id == "__package__":
            return resolve_relative(self.ctx.importer, self.ctx.is_package, 1, None)
        return _constant_str(package)


def collect_imports(tree: ast.AST, ctx: _FileContext) -> tuple[list[ImportSite], list[PrivateImport]]:
    """Import sites (edges to package modules) and private-name imports of one parsed file.

    Parameters
    ----------
    tree : ast.AST
        The parsed file.
    ctx : _FileContext
        The file's module name, whether it is a package, its display path and the package's modules.

    Returns
    -------
    tuple[list[ImportSite], list[PrivateImport]]
        Both sorted by line; one site per line and target (``from p import a, b`` is one statement).
    """
    collector = _ImportCollector(ctx)
    collector.visit(tree)
    unique = {(site.line, site.target): site for site in reversed(collector.sites)}  # one per line and target
    by_line = [unique[key] for key in sorted(unique)]
    return by_line, sorted(collector.private, key=lambda item: (item.line, item.name))


def build_graph(root: Path, package_name: str | None = None) -> ImportGraph:
    """Parse every module of the package at ``root`` and build its import graph.

    Parameters
    ----------
    root : Path
        The package directory.
    package_name : str, optional
        Dotted name of the package; the directory's name by default.

    Returns
    -------
    ImportGraph
        Modules, edges with their import sites, private-name imports, and files that could not be parsed.
    """
    package_name = package_name or root.name
    graph = ImportGraph(discover_modules(root, package_name))
    names = frozenset(graph.modules)
    for name, path in graph.modules.items():
        display = (Path(root.name) / path.relative_to(root)).as_posix()
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=display)
        except (SyntaxError, UnicodeDecodeError, OSError) as err:
            graph.errors.append(f"{display}: cannot parse: {err}")
            continue
        ctx = _FileContext(name, path.name == "__init__.py", display, names, package_name)
        sites, private = collect_imports(tree, ctx)
        for site in sites:
            graph.edges.setdefault(name, {}).setdefault(site.target, []).append(site)
        graph.private_imports.extend(private)
    return graph


def strongly_connected_components(nodes: Iterable[str], successors: dict[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of a directed graph (Tarjan's algorithm, iterative).

    Parameters
    ----------
    nodes : Iterable[str]
        All nodes.
    successors : dict[str, Iterable[str]]
        Node to the nodes it has an edge to; a missing node has none.

    Returns
    -------
    list[list[str]]
        Every component (singletons included), each sorted, in the order Tarjan's algorithm completes them.
    """
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(successors.get(start, ()))))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    components.append(_pop_component(node, stack, on_stack))
            elif child not in index:
                index[child] = lowlink[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(successors.get(child, ())))))
            elif child in on_stack:
                lowlink[node] = min(lowlink[node], index[child])
    return components


def _pop_component(root: str, stack: list[str], on_stack: set[str]) -> list[str]:
    component = []
    while True:
        node = stack.pop()
        on_stack.discard(node)
        component.append(node)
        if node == root:
            return sorted(component)


def find_cycles(graph: ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module, each sorted, sorted by their first module.

    Parameters
    ----------
    graph : ImportGraph
        The import graph.

    Returns
    -------
    list[list[str]]
        The cyclic components.
    """
    components = strongly_connected_components(graph.modules, graph.edges)
    return sorted((c for c in components if len(c) > 1), key=lambda c: c[0])


def cycle_path(graph: ImportGraph, component: list[str]) -> list[str]:
    """A shortest cycle through the first module of ``component``, inside the component.

    Parameters
    ----------
    graph : ImportGraph
        The import graph.
    component : list[str]
        A strongly connected component of more than one module.

    Returns
    -------
    list[str]
        ``[m0, m1, ..., m0]``: each module imports the next.
    """
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in graph.targets(node):
                if target == start:
                    return [*_path_to(node, start, parents), start]
                if target in members and target not in parents:
                    parents[target] = node
                    following.append(target)
        frontier = following
    raise ValueError(f"{component} is not strongly connected")


def _path_to(node: str, start: str, parents: dict[str, str]) -> list[str]:
    path = [node]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return path[::-1]


def format_site(site: ImportSite, more: Iterable[ImportSite] = ()) -> str:
    """``minicache/a.py:12 imports minicache.b``, with the other lines of the same edge if any."""
    text = f"{site.path}:{site.line} imports {site.target}"
    if site.context:
        text += f" ({site.context})"
    others = [str(other.line) for other in more]
    if others:
        text += f" (also line{'s' if len(others) > 1 else ''} {', '.join(others)})"
    return text


def format_graph(graph: ImportGraph) -> list[str]:
    """One line per module: ``module -> target, target`` (sorted), ``(none)`` when it imports none."""
    return [f"{name} -> {', '.join(graph.targets(name)) or '(none)'}" for name in graph.modules]


def format_cycle(graph: ImportGraph, number: int, component: list[str]) -> list[str]:
    """A cycle's modules, each edge of one concrete cycle through them with its file and line, then the others.

    The other edges between the component's modules follow under ``other imports inside this cycle:``; all of
    them together are what has to go for the modules to stop forming a cycle.
    """
    lines = [f"cycle {number}: {len(component)} modules: {', '.join(component)}"]
    path = list(itertools.pairwise(cycle_path(graph, component)))
    members = set(component)
    rest = [(a, b) for a in component for b in graph.targets(a) if b in members and (a, b) not in path]
    for heading, edges in (("", path), ("  other imports inside this cycle:", rest)):
        if heading and edges:
            lines.append(heading)
        for importer, target in edges:
            first, *more = graph.edges[importer][target]
            lines.append(("    " if heading else "  ") + format_site(first, more))
    return lines


def format_private(item: PrivateImport) -> str:
    """``private import: minicache/a.py:3 imports _name from minicache.b``."""
    return f"private import: {item.path}:{item.line} imports {item.name} from {item.source}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def summary(graph: ImportGraph, cycles: list[list[str]]) -> str:
    """The last line: ``import graph: N modules, N edges, N cycles, N private imports``."""
    counts = [
        _count(len(graph.modules), "module"),
        _count(graph.edge_count, "edge"),
        _count(len(cycles), "cycle"),
        _count(len(graph.private_imports), "private import"),
    ]
    if graph.errors:
        counts.append(_count(len(graph.errors), "unparsable file"))
    return "import graph: " + ", ".join(counts)


def to_dot(graph: ImportGraph, cycles: list[list[str]]) -> str:
    """The graph in Graphviz DOT; edges between modules of the same cycle are red.

    Parameters
    ----------
    graph : ImportGraph
        The import graph.
    cycles : list[list[str]]
        Its cyclic components (``find_cycles``).

    Returns
    -------
    str
        The DOT source.
    """
    component_of = {name: number for number, component in enumerate(cycles) for name in component}
    lines = ["digraph imports {", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    lines += [f'  "{name}";' for name in graph.modules]
    for importer in graph.modules:
        for target in graph.targets(importer):
            in_cycle = component_of.get(importer) is not None and component_of.get(importer) == component_of.get(target)
            lines.append(f'  "{importer}" -> "{target}"' + (" [color=red];" if in_cycle else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="import_graph.py", description="Import graph of a package's modules: cycles and private-name imports."
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="package directory (default: %(default)s)")
    parser.add_argument("--package-name", help="dotted name of the package (default: the root directory's name)")
    parser.add_argument("--dot", type=Path, metavar="FILE", help="also write the graph as Graphviz DOT to FILE")
    parser.add_argument("--quiet", action="store_true", help="do not print the graph, only problems and summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : list[str], optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 when clean, 1 when there are cycles, private-name imports or unparsable files, 2 for a usage error.
    """
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse: usage error (2) or --help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    if not args.root.is_dir():
        print(f"import_graph.py: error: package directory not found: {args.root}", file=sys.stderr)
        return 2
    root = args.root.resolve()
    graph = build_graph(root, args.package_name)
    cycles = find_cycles(graph)
    for error in graph.errors:
        print(error, file=sys.stderr)
    if not args.quiet:
        print("\n".join(format_graph(graph)))
    for number, component in enumerate(cycles, start=1):
        print("\n".join(format_cycle(graph, number, component)))
    for item in graph.private_imports:
        print(format_private(item))
    if args.dot is not None:
        try:
            args.dot.write_text(to_dot(graph, cycles), encoding="utf-8")
        except OSError as err:
            print(f"import_graph.py: error: cannot write {args.dot}: {err}", file=sys.stderr)
            return 2
    print(summary(graph, cycles))
    return 1 if cycles or graph.private_imports or graph.errors else 0


if __name__ == "__main__":
    sys.exit(main())
