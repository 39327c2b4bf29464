"""The package's modules import one way: orchestrators → training loop → data and tokenizer → model and config."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2_scratch"
LAYERS = [  # lowest first; a module may import its own layer and those below, never one above
    {"configuration_gpt2_scratch", "modeling_gpt2_scratch", "decoding_gpt2_scratch", "stock_gpt2_scratch"},
    {"files", "sources", "bpe", "tokenizer", "data", "tasks", "metrics"},
    {"memory", "checkpoints", "training", "loading", "lora", "hub"},
    {"pretraining", "classification", "instruction", "convert", "cli", "demo", "__init__"},
]
CHECKPOINT_CODE = LAYERS[0]  # copied into every saved folder: libraries and each other only


def package_imports() -> dict[str, set[str]]:
    """Each module's imports of the package's own modules, wherever in the file they stand (in functions too)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} | {"metrics"}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [alias.name for alias in node.names]
                found |= {name.split(".")[0] for name in names} & modules
            elif isinstance(node, ast.Import):  # `import gpt2_scratch.x` makes transformers demand the package
                assert not any(alias.name.startswith("gpt2_scratch") for alias in node.names), path.name
        graph[path.stem] = found
    return graph


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module in layer)


def test_every_module_has_a_layer_and_imports_none_above_it():
    for module, imported in package_imports().items():
        for target in imported:
            assert layer_of(target) <= layer_of(module), f"{module} imports {target}, which sits above it"


def test_the_package_has_no_import_cycle():
    graph = package_imports()

    def visit(module: str, path: list[str]) -> None:
        for target in graph.get(module, ()):
            assert target not in path, "import cycle: " + " → ".join([*path, target])
            visit(target, [*path, target])

    for module in graph:
        visit(module, [module])


def test_checkpoint_code_imports_only_libraries_and_its_siblings_in_the_form_transformers_follows():
    for name in CHECKPOINT_CODE:
        source = (PACKAGE / f"{name}.py").read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and node.level:
                where = f"{name}: from {'.' * node.level}{node.module}"
                assert node.level == 1 and node.module in CHECKPOINT_CODE, where
