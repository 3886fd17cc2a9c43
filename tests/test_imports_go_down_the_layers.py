"""The layout: imports go one way (commands -> Lightning pieces -> model-side pieces), with no cycles.

`python tests/test_imports_go_down_the_layers.py` prints the import graph.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_SIDE = {"distill.errors", "distill.checkpoints", "distill.hf_data", "distill.inference", "distill.adapters", "distill.ranges", "distill.files", "distill.identity", "distill.mixing", "distill.views", "distill.image_folder", "distill.serving_host", "distill.images", "distill.seeding", "distill.batch",
              "distill.cache", "distill.losses"}
LIGHTNING = {"distill.run_records", "distill.step_rules", "distill.data", "distill.module", "distill.callbacks", "distill.telemetry", "distill.cache_writer"}
COMMANDS = {"distill.cli", "distill.train", "distill.__main__", "distill.pipeline", "distill.compare", "distill.export", "distill.predict",
            "distill.report", "distill.cache_teacher", "distill.serve", "distill.quantize"}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at the top or inside functions)."""
    modules = {}
    for package in ("distill", "students", "teachers"):
        for path in sorted((ROOT / package).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {m for m in (node.module, *(f"{node.module}.{a.name}" for a in node.names)) if m in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        graph[name] = found - {name}
    return graph


def layer(module: str) -> int:
    if module in COMMANDS:
        return 2
    if module in LIGHTNING:
        return 1
    return 0  # model-side: distill's utilities, students, teachers, the package __init__ files


def test_every_module_belongs_to_a_layer():
    unknown = [m for m in import_graph() if m.startswith("distill.") and m not in MODEL_SIDE | LIGHTNING | COMMANDS]
    assert not unknown, f"add {unknown} to a layer in tests/test_imports_go_down_the_layers.py"


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
        print(f"{name:24s} [{('model-side', 'lightning', 'command')[layer(name)]}] -> {', '.join(sorted(deps))}")
