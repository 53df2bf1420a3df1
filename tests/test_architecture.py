"""The project's modules import one another in one direction only
(docs/architecture.md): types and specs, then the engine, the registry, the
workers' and remote clients, inference's edge (views, checks, commands), the
project's settings and helpers, the chat app, the API, and the site's
entry points (URLs, routing, ASGI). A module may import its own layer and
those before it, never one after, and no set of modules imports in a circle,
not even inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("inference", "chat", "api", "chatsite")

# Lowest first: (layer, the module prefixes in it). The longest prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "types and specs",
        (
            "inference",
            "inference.types",
            "inference.specs",
            "inference.stops",
            "inference.prompt_cache",
            "inference.grammars",
            "inference.tools",
            "inference.logprobs",
            "inference.streams",
            "inference.client",
            "inference.metrics",
        ),
    ),
    (
        "the engine",
        (
            "inference.llama",
            "inference.sampling",
            "inference.slots",
            "inference.scheduler",
            "inference.engine",
            "inference.embeddings",
        ),
    ),
    ("the registry", ("inference.registry",)),
    ("the workers' and remote clients", ("inference.remote", "inference.workers")),
    ("inference's edge", ("inference.views", "inference.checks", "inference.apps", "inference.management")),
    (
        "the project's settings and helpers",
        (
            "chatsite",
            "chatsite.config",
            "chatsite.settings",
            "chatsite.ratelimit",
            "chatsite.middleware",
            "chatsite.origins",
            "chatsite.db",
        ),
    ),
    ("the chat app", ("chat",)),
    ("the API", ("api",)),
    ("the site's entry points", ("chatsite.urls", "chatsite.routing", "chatsite.asgi")),
]


def project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports, anywhere in it."""
    modules = project_modules()

    def resolve(name: str) -> str | None:
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*parents, *([node.module] if node.module else [])])
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for name in names:
                found = resolve(name)
                if found is not None and found != module:
                    imported.add(found)
        graph[module] = imported
    return graph


def layer_of(module: str) -> int:
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[1]
            ):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's,
    without recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop()
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_it_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_it_imports_only_its_own_layer_and_those_below() -> None:
    graph = import_graph()
    against = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert against == []


def test_it_sees_the_imports_it_checks() -> None:
    # The graph is not empty by accident: known edges, a function-level one included.
    graph = import_graph()
    assert "inference.types" in graph["inference.engine"]
    assert "chat.replies" in graph["api.replies"]
    assert "inference.registry" in graph["chat.context"]
    # A cycle and an upward import are found.
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert layer_of("api.v1") > layer_of("chat.replies") > layer_of("inference.registry")
