"""Imports go one way: trees <- core <- drafters <- training; the edge (cli, bench, registry, demo) sits on top.

Read from the source with `ast`, so the test costs milliseconds and needs no import.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "specdec"
LAYERS = ["trees", "core", "drafters", "training", "edge"]  # each may import only layers before it
EDGE = {"cli", "bench", "demo", "registry", "__init__", "__main__"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "specdec"
    if len(parts) == 1 or parts[1] in EDGE:
        return "edge"
    return parts[1] if parts[1] in ("trees", "drafters", "training") else "core"


def specdec_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path.name}: use absolute imports"
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "specdec"}
        elif isinstance(node, ast.ImportFrom) and node.module == "specdec":  # from specdec import kv
            found |= {f"specdec.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "specdec":
            found.add(node.module)
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def test_layering():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        mod = module_name(path)
        mine = LAYERS.index(layer_of(mod))
        for imported in specdec_imports(path):
            theirs = LAYERS.index(layer_of(imported))
            if theirs > mine:
                violations.append(f"{mod} ({LAYERS[mine]}) imports {imported} ({LAYERS[theirs]})")
    assert not violations, "\n".join(violations)


def test_trees_import_only_torch():
    for path in (ROOT / "trees").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                top = name.split(".")[0]
                assert top in {"torch", "specdec"} or top in sys.stdlib_module_names, (
                    f"{path.name} imports {name}: trees/ is torch and the standard library only"
                )


def test_core_never_names_a_drafter():
    """The core reaches drafters only through the protocol: no concrete drafter name appears."""
    core = [p for p in ROOT.glob("*.py") if p.stem not in EDGE]
    for path in core:
        text = path.read_text()
        for name in ("PromptLookup", "DraftModel", "isinstance(drafter"):
            assert name not in text, f"{path.name} mentions {name}"


def test_only_kv_touches_cache_internals():
    """When transformers changes its cache classes, specdec/kv.py is the one file to change."""
    for path in ROOT.rglob("*.py"):
        if path.name != "kv.py":
            text = path.read_text()
            for needle in (".layers", "DynamicLayer", "DynamicCache("):
                assert needle not in text, f"{path.relative_to(ROOT.parent)} uses {needle}: go through specdec.kv"
