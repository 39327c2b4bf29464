"""docs/concepts.md names only code and tests that exist: every `file::symbol`, every test, every library name."""

from __future__ import annotations

import ast
import functools
import importlib
import re

from conftest import ROOT

CONCEPTS = ROOT / "docs" / "concepts.md"
REFERENCE = re.compile(r"`([\w/]+\.py)::([\w.]+)`")
LIBRARY = re.compile(r"`((?:transformers|peft|torch|tokenizers)(?:\.\w+)+)`")


def defined_names(tree: ast.AST) -> dict[str, ast.AST]:
    """Top-level functions, classes and assignments of a module (or of a class body), by name."""
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({target.id: node for target in node.targets if isinstance(target, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


@functools.cache
def parsed(path: str) -> ast.Module | None:
    file = ROOT / path
    return ast.parse(file.read_text(encoding="utf-8")) if file.is_file() else None


def resolve(path: str, symbol: str) -> str | None:
    """None when `symbol` (dotted through classes) is defined in `path`, else what is missing."""
    node: ast.AST | None = parsed(path)
    if node is None:
        return f"{path}: no such file"
    for part in symbol.split("."):
        names = defined_names(node) if isinstance(node, (ast.Module, ast.ClassDef)) else {}
        if part not in names:
            return f"{path}::{symbol}: {part} is not defined there"
        node = names[part]
    return None


def references() -> list[tuple[str, str]]:
    return REFERENCE.findall(CONCEPTS.read_text(encoding="utf-8"))


def test_the_map_covers_what_the_seed_teaches():
    first_cells = [line.split("|")[1] for line in CONCEPTS.read_text(encoding="utf-8").splitlines()
                   if line.startswith("| ") and not line.startswith("| concept")]
    for concept in ("BPE merges", "token + position embeddings", "causal mask as a buffer", "scaled dot-product",
                    "splitting heads", "merging heads", "GELU", "LayerNorm", "pre-norm residual", "weight tying",
                    "shifted loss", "temperature, top-k, top-p", "KV cache", "freezing layers", "LoRA",
                    "prompt masking"):
        assert any(concept in cell for cell in first_cells), concept
    assert any(path.startswith("tests/") for path, _ in references())
    assert sum(not path.startswith("tests/") for path, _ in references()) >= 20


def test_every_symbol_and_test_it_names_exists():
    missing = [problem for path, symbol in references() if (problem := resolve(path, symbol))]
    assert not missing, "docs/concepts.md names what does not exist:\n" + "\n".join(missing)
    for path, symbol in references():
        if path.startswith("tests/"):
            assert symbol.startswith("test_") and "." not in symbol, f"{path}::{symbol} is not a test function"


def test_every_library_name_it_gives_imports():
    names = LIBRARY.findall(CONCEPTS.read_text(encoding="utf-8"))
    assert names
    for name in names:
        module, _, attribute = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attribute), name


def test_the_checker_catches_a_stale_reference():
    assert resolve("gpt2_scratch/modeling_gpt2_scratch.py", "MultiHeadAttention.split_heads") is None
    assert "no_such_method" in resolve("gpt2_scratch/modeling_gpt2_scratch.py", "MultiHeadAttention.no_such_method")
    assert "no such file" in resolve("gpt2_scratch/moved.py", "GELU")
    assert resolve("tests/test_model.py", "test_gone") is not None
