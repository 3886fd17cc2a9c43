"""The layout: imports go one way (commands -> Lightning pieces -> model-side pieces), with no cycles.

`python tests/test_imports_go_down_the_layers.py` prints the import graph.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The layers are folders: the commands (distill/commands/ and the command table), the Lightning pieces
# (distill/training/), and below them the model side (students/, teachers/, and every other folder of distill/).
COMMANDS_FOLDER, LIGHTNING_FOLDER = "distill.commands", "distill.training"
TOP = ("distill.cli", "distill.__main__")


def command_modules() -> set[str]:
    """The modules `distill` runs as commands (its table): they share code through the layers below, not each other."""
    from distill.cli import COMMANDS

    return {module for module, _ in COMMANDS.values()}


def modules() -> dict[str, Path]:
    """Every module of the project's packages -> its file."""
    found = {}
    for package in ("distill", "students", "teachers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions)."""
    modules_ = modules()
    graph = {}
    for name, path in modules_.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules_}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules_}
        graph[name] = found - {name}
    return graph


def layer(module: str) -> int:
    if module in TOP or module == COMMANDS_FOLDER or module.startswith(COMMANDS_FOLDER + "."):
        return 2
    if module == LIGHTNING_FOLDER or module.startswith(LIGHTNING_FOLDER + "."):
        return 1
    return 0  # model-side: distill's other folders, students, teachers, the package __init__ files


def test_every_module_sits_in_a_folder_of_its_layer():
    flat = sorted(p.name for p in (ROOT / "distill").glob("*.py") if p.stem not in ("__init__", "__main__", "cli"))
    assert not flat, f"{flat}: distill/ holds the command table and its sub-packages only"
    commands = command_modules()
    assert commands and all(layer(m) == 2 for m in commands), commands  # every command in distill/commands/
    assert "distill.training.module" in import_graph() and layer("distill.training.module") == 1


# In the Lightning folder, the loss, its methods and feature imitation compute without Lightning too (a notebook).
WITHOUT_LIGHTNING = ("distill.training.losses", "distill.training.methods", "distill.training.imitation")


def test_the_model_side_imports_no_lightning():
    """students, teachers and distill's model-side modules import without Lightning (a deployment, a notebook): no
    import of it when the module loads (one inside a function runs only when that function is called)."""
    lightning = ("pytorch_lightning", "lightning_fabric", "lightning")
    found = []
    for module, path in modules().items():
        if layer(module) != 0 and not module.startswith(WITHOUT_LIGHTNING):
            continue
        statements = list(ast.parse(path.read_text()).body)
        for statement in list(statements):  # try/if blocks at the top run at import too, except TYPE_CHECKING's
            if isinstance(statement, (ast.If, ast.Try)) and getattr(statement, "test", None) is None or \
                    isinstance(statement, ast.If) and getattr(statement.test, "id", "") != "TYPE_CHECKING":
                statements += statement.body
        for node in statements:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{module}: {name}" for name in names if name.split(".")[0] in lightning]
    assert not found, found


def test_commands_share_code_through_the_layers_below_not_through_each_other():
    commands = command_modules()
    shared = [f"{m} -> {d}" for m, deps in import_graph().items() if m in commands for d in deps
              if d in commands and d != m]
    assert not shared, shared


def test_imports_only_go_down_the_layers():
    upward = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep] if dep in path else [module, dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            assert not cycle, " -> ".join(cycle)


if __name__ == "__main__":
    for name, deps in import_graph().items():
        print(f"{name:32s} [{('model-side', 'lightning', 'command')[layer(name)]}] -> {', '.join(sorted(deps))}")
