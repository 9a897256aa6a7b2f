"""The package's layers, read from every import statement (module level and inside functions) with ``ast``.

The rule (README, Layout): a module imports only from its own layer or a lower one; among the parts (layer 2)
only ``data`` may import ``tasks`` (for target specs); imports inside functions are only for the optional or
heavy third-party packages in ``LAZY`` and for ``mtl.cli`` loading command modules (``importlib``); and the
module-level imports between mtl's modules form no cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "mtl"

LAYERS = [  # lowest first; a module belongs to the first entry its name starts with
    ("core", ("mtl.core", "mtl")),
    ("config", ("mtl.config",)),
    ("parts", ("mtl.data", "mtl.tasks", "mtl.models", "mtl.weighting")),
    ("engine", ("mtl.engine",)),
    ("build", ("mtl.build", "mtl.plugins")),
    ("workflows", ("mtl.workflows",)),
    ("commands", ("mtl.commands", "mtl.cli", "mtl.__main__")),
]
# optional packages, imported where they are used; safetensors and huggingface_hub come with timm (mtl[timm])
LAZY = (
    "torch.utils.tensorboard",
    "tensorboard",
    "matplotlib",
    "submitit",
    "timm",
    "safetensors",
    "huggingface_hub",
    "captcha",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _prefix_match(module, prefix) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, module
    return best[0]


def part_of(module: str) -> str:
    return module.split(".")[1]


def imports(path: Path):
    """(imported module, line, inside a function) for every import in the file; relative ones made absolute."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                for a in child.names:  # `from mtl.core import distributed`: the submodule is what is imported
                    sub = f"{target}.{a.name}"
                    is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                        PACKAGE.parent / Path(*sub.split(".")) / "__init__.py"
                    ).exists()
                    found.append((sub if is_module else target, child.lineno, inside))
            visit(child, nested)

    visit(tree, False)
    return name, found


def all_imports():
    return [imports(p) for p in sorted(PACKAGE.rglob("*.py"))]


def violations():
    problems = []
    for module, found in all_imports():
        for target, line, inside in found:
            where = f"{module}:{line} imports {target}"
            if not _prefix_match(target, "mtl"):
                if inside and not any(_prefix_match(target, lazy) for lazy in LAZY):
                    problems.append(f"{where} inside a function (only {', '.join(LAZY)} may be imported there)")
                continue
            if inside:
                problems.append(f"{where} inside a function (mtl modules are imported at module level)")
            if layer_of(target) > layer_of(module):
                problems.append(
                    f"{where}: layer {LAYERS[layer_of(module)][0]} imports the higher layer "
                    f"{LAYERS[layer_of(target)][0]}"
                )
            elif (
                layer_of(target) == layer_of(module) == 2
                and part_of(target) != part_of(module)
                and (part_of(module), part_of(target)) != ("data", "tasks")
            ):
                problems.append(
                    f"{where}: part {part_of(module)} imports part {part_of(target)} (only data may import tasks)"
                )
    return problems


def cycles():
    graph = {}
    for module, found in all_imports():
        graph[module] = {t for t, _, inside in found if not inside and _prefix_match(t, "mtl") and t != module}
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle between modules
    return [
        c
        for c in found
        if not all(_prefix_match(m, c[0].rpartition(".")[0] or c[0]) for m in c) or len({m for m in c}) > 2
    ]


def test_every_import_points_down():
    problems = violations()
    assert not problems, f"{len(problems)} imports break the layers:\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize(
    "module,layer",
    [
        ("mtl.core.errors", "core"),
        ("mtl.config.schema", "config"),
        ("mtl.data.scenes", "parts"),
        ("mtl.engine.trainer", "engine"),
        ("mtl.plugins", "build"),
        ("mtl.cli", "commands"),
        ("mtl", "core"),
    ],
)
def test_layer_names(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
