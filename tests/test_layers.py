"""The package's layer order, checked on the source: no import cycle, no import from a lower layer to a higher one.

Every `import` / `from ... import` statement of every module is read with `ast` — function-level ones and
`if TYPE_CHECKING:` ones included (for the order; they never run, so they close no cycle), relative imports
resolved, `importlib.import_module("anima_trainer...")`
calls and the module-name strings of a lazy `__getattr__` package counted as imports — so a dependency cannot
hide.  A module may import its own layer and the layers below it.  docs/DESIGN.md ("Layers") quotes LAYERS.
A violation is printed as `a.b -> c.d (line N)` (names relative to `anima_trainer`).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "anima_trainer"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# The layer table: lowest first.  (layer, modules — a package name stands for all its modules, why it sits there)
LAYERS: list[tuple[str, tuple[str, ...], str]] = [
    ("base", ("", "fileio", "console"),
     "the one write path of final files and the console; used by every layer, imports nothing of the package"),
    ("config", ("config",),
     "TrainConfig and its validation; no torch: validating a config loads no model or optimizer code"),
    ("tensors", ("dtypes", "tensor_files"),
     "dtype names and safetensors files through the one write path: the lowest layer that loads torch"),
    ("data", ("data",),
     "dataset.toml, scanning, captions, buckets, the dataset and its loader; reads no model"),
    ("compat", ("compat",),
     "front-ends for other tools' formats (kohya command lines and option tables, root converter): they "
     "produce a config and a dataset config, so they sit above both and below everything that runs"),
    ("cache", ("cache",),
     "the frozen encoders' outputs, keyed by data items; takes the encoders as arguments"),
    ("models", ("models",),
     "the DiT, text encoder and VAE, and reading their files; never the networks"),
    ("networks", ("networks",),
     "what is trained: adapter modules injected into the models, their files as ComfyUI reads them"),
    ("sample", ("sample",),
     "the sampler and preview images; training draws previews with it"),
    ("evaluation", ("evaluation",),
     "measurements of a network against its frozen base (held-out loss, preservation drift, trigger response) "
     "and the prompt bank, on models, networks and sample; below tools and train, which call them"),
    ("tools", ("tools",),
     "file tools (download, inspect, convert, merge) on top of models and networks; training's start-up "
     "uses the downloader to complete tokenizer folders, so tools sit below train"),
    ("train", ("train",),
     "the training run: objective, loop, optimizer, states, saving"),
    ("cli", ("cli", "eval_command", "demo", "__main__"),
     "the commands: parse, call a stage"),
]

# Layers whose modules may not load torch (directly, or through a module-level import of the package).
NO_TORCH = ("config",)
TORCH_PACKAGES = ("torch", "safetensors", "torchvision")


@dataclass(frozen=True)
class Import:
    source: str       # importing module, relative to the package ("" for the package itself)
    target: str       # imported module of the package
    line: int
    module_level: bool
    type_only: bool   # under `if TYPE_CHECKING:`: counts for the layer order, not for cycles (never executed)

    def __str__(self) -> str:
        return f"{_short(self.source)} -> {_short(self.target)} (line {self.line})"


def _short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".") if name != PACKAGE else PACKAGE


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its `__init__`)."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _enclosing_functions(tree: ast.AST) -> set[int]:
    """ids of the nodes that sit inside a function body."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.walk(node):
                if child is not node:
                    inside.add(id(child))
    return inside


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the nodes inside an `if TYPE_CHECKING:` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
            if name == "TYPE_CHECKING":
                inside |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return inside


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """The package modules `name` imports, one entry per imported module and statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    in_function = _enclosing_functions(tree)
    type_only = _type_checking_blocks(tree)
    lazy_package = any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
    found: list[Import] = []

    def add(target: str, node: ast.AST) -> None:
        edge = Import(name, target, node.lineno, id(node) not in in_function, id(node) in type_only)
        if edge not in found:
            found.append(edge)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin != PACKAGE and not origin.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                add(submodule if submodule in known else origin, node)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith(PACKAGE):
                    add(arg.value, node)
        elif lazy_package and isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in known and node.value != name:   # a lazy table's ("anima_trainer.x.y", "attr")
                add(node.value, node)
    return found


def import_graph() -> dict[str, list[Import]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(name: str) -> int | None:
    """Index into LAYERS of a module: the longest matching module prefix."""
    short = "" if name == PACKAGE else _short(name)
    best, best_len = None, -1
    for index, (_layer, prefixes, _why) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix == "":
                if short == "" and best_len < 0:
                    best, best_len = index, 0
            elif (short == prefix or short.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for edge in graph.get(v, []):
            w = edge.target
            if w not in graph or edge.type_only:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_every_module_has_a_layer() -> None:
    missing = [_short(name) for name in modules() if layer_of(name) is None]
    assert not missing, "modules without a layer in LAYERS: " + ", ".join(missing)


def test_no_import_cycles() -> None:
    graph = import_graph()
    lines = []
    for component in cycles(graph):
        members = set(component)
        lines.append("cycle: " + ", ".join(_short(m) for m in component))
        lines += ["  " + str(edge) for m in component for edge in graph[m]
                  if edge.target in members and not edge.type_only]
    assert not lines, "import cycles between modules of the package:\n" + "\n".join(lines)


def upward_imports() -> list[tuple[str, str, str]]:
    """(importer, imported, printed line) of every import from a lower layer to a higher one."""
    graph = import_graph()
    out = []
    for name in sorted(graph):
        own = layer_of(name)
        for edge in graph[name]:
            target = layer_of(edge.target)
            if own is not None and target is not None and target > own:
                out.append((_short(name), _short(edge.target), f"{edge}   [{LAYERS[own][0]} imports "
                                                               f"{LAYERS[target][0]}]"))
    return out


def test_no_upward_imports() -> None:
    lines = [line for _, _, line in upward_imports()]
    assert not lines, "imports from a lower layer to a higher one:\n" + "\n".join(lines)


def test_config_layer_loads_no_torch() -> None:
    """`import anima_trainer.config` must not import torch: checked on the config modules' own imports (any
    level) and on everything they reach through module-level imports of the package."""
    graph = import_graph()
    known = modules()
    lines = []

    def torch_imports(name: str, module_level_only: bool) -> list[int]:
        tree = ast.parse(known[name].read_text(encoding="utf-8"))
        in_function = _enclosing_functions(tree)
        hits = []
        for node in ast.walk(tree):
            if module_level_only and id(node) in in_function:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in TORCH_PACKAGES for n in names):
                hits.append(node.lineno)
        return hits

    roots = [name for name in graph if layer_of(name) is not None and LAYERS[layer_of(name)][0] in NO_TORCH]
    for root in sorted(roots):
        lines += [f"{_short(root)} -> torch (line {n})" for n in torch_imports(root, module_level_only=False)]
    seen = set(roots)
    todo = [(edge, edge.target) for r in roots for edge in graph[r]]
    while todo:
        edge, target = todo.pop()
        if target in seen or target not in graph:
            continue
        seen.add(target)
        hits = torch_imports(target, module_level_only=True)
        if hits:
            lines.append(f"{_short(target)} -> torch (line {hits[0]}), reached by {edge}")
        todo += [(e, e.target) for e in graph[target] if e.module_level]
    assert not lines, "the config layer loads torch:\n" + "\n".join(sorted(set(lines)))


def test_layer_table_is_quoted_in_design_md() -> None:
    design = (SRC.parents[1] / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    assert layer_table_markdown() in design, "docs/DESIGN.md must quote the layer table (tests/test_layers.py)"


def layer_table_markdown() -> str:
    """The table as docs/DESIGN.md quotes it (`python tests/test_layers.py` prints it)."""
    rows = ["| layer | modules (of `anima_trainer`) | why it sits there |", "|---|---|---|"]
    for layer, prefixes, why in LAYERS:
        names = ", ".join(f"`{p}`" if p else "`__init__`" for p in prefixes)
        rows.append(f"| {layer} | {names} | {why} |")
    return "\n".join(rows)


def report() -> dict[str, list[str]]:
    """Every violation, grouped by the importing layer (for the command line)."""
    graph = import_graph()
    grouped: dict[str, list[str]] = defaultdict(list)
    for name in sorted(graph):
        own = layer_of(name)
        for edge in graph[name]:
            target = layer_of(edge.target)
            if own is not None and target is not None and target > own:
                grouped[LAYERS[own][0]].append(f"upward: {edge}")
    for component in cycles(graph):
        members = set(component)
        for m in component:
            grouped["cycles"] += [f"cycle: {edge}" for edge in graph[m]
                                  if edge.target in members and not edge.type_only]
    return grouped


if __name__ == "__main__":
    print(layer_table_markdown())
    for layer, lines in report().items():
        print(f"\n[{layer}]")
        print("\n".join(lines))
