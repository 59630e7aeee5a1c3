"""The import-layering rule of docs/architecture.md, read from the source of ``bigtrain/``.

Layers, top to bottom (a module may import its own package and any lower layer, never a higher one):

    5  entry points and tools: cli, __main__, doctor, plan, plan_layout, generate, export, runs, plot, config
    4  train/                                     (RunConfig lives here: train/run_config.py)
    3  checkpoint/  parallel/  data/  optim/      (peers: no imports between them, except checkpoint → parallel)
    2  model/
    1  kernels/
    0  sections, errors, messages

Modules of one layer 5 or layer 0 may import each other (cycles are still refused).

Every import counts, also the lazy ones inside functions; only imports under ``if TYPE_CHECKING:`` are
exempt (they never run). A second test plants a violation and checks that the rule catches it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "bigtrain"

LAYER_OF_UNIT: dict[str, int] = {
    "cli": 5, "__main__": 5, "doctor": 5, "plan": 5, "plan_layout": 5, "generate": 5, "export": 5, "runs": 5,
    "plot": 5, "config": 5,
    "train": 4,
    "checkpoint": 3, "parallel": 3, "data": 3, "optim": 3,
    "model": 2,
    "kernels": 1,
    "sections": 0, "errors": 0, "messages": 0, "__init__": 0,
}
# The layer whose packages each own one concern and must not reach into each other...
ISOLATED_PEERS_LAYER = 3
# ...except for these (importer unit, imported unit): checkpoint backends need the Strategy types.
ALLOWED_PEER_IMPORTS = {("checkpoint", "parallel")}


def unit_of(module: str) -> str:
    """``bigtrain.data.shards`` → ``data``; ``bigtrain.cli`` → ``cli``; ``bigtrain`` → ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported bigtrain module) for every import in ``source`` (relative imports resolved)."""
    tree = ast.parse(source)
    exempt = _type_checking_lines(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in exempt:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "bigtrain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "bigtrain":
                continue
            if target == "bigtrain":  # `from bigtrain import data` imports the submodules named
                found += [(node.lineno, f"bigtrain.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(root: Path) -> list[str]:
    """Every import of ``root``'s modules that breaks the layering, as 'file:line: a -> b (why)'."""
    problems: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        importer = unit_of(module)
        if importer not in LAYER_OF_UNIT:
            problems.append(f"{path}: module unit {importer!r} has no layer; add it to LAYER_OF_UNIT")
            continue
        for line, target in imports_of(path.read_text(), module, path.name == "__init__.py"):
            imported = unit_of(target)
            if imported == importer or imported == "__init__":
                continue
            where = f"{path.relative_to(root.parent)}:{line}: {module} imports {target}"
            if imported not in LAYER_OF_UNIT:
                problems.append(f"{where} (unknown unit {imported!r})")
            elif LAYER_OF_UNIT[imported] > LAYER_OF_UNIT[importer]:
                problems.append(f"{where} (a higher layer)")
            elif (LAYER_OF_UNIT[imported] == LAYER_OF_UNIT[importer] == ISOLATED_PEERS_LAYER
                  and (importer, imported) not in ALLOWED_PEER_IMPORTS):
                problems.append(f"{where} (a peer package of the same layer)")
    return problems


def package_cycles(root: Path) -> list[list[str]]:
    """Cycles in the graph of units (packages and top-level modules) that import each other."""
    edges: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = module_name(path, root)
        for _, target in imports_of(path.read_text(), module, path.name == "__init__.py"):
            a, b = unit_of(module), unit_of(target)
            if a != b and b != "__init__":
                edges.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_bigtrain_imports_follow_the_layers() -> None:
    problems = violations(PACKAGE_ROOT)
    assert not problems, "import-layering violations:\n  " + "\n  ".join(problems)


def test_no_cycles_between_packages() -> None:
    cycles = package_cycles(PACKAGE_ROOT)
    assert not cycles, "package import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("planted, reason", [
    ("from bigtrain.train.trainer import Trainer\n", "a higher layer"),
    ("def lazy():\n    from bigtrain.checkpoint import manager\n", "a higher layer"),  # lazy imports count
    ("from bigtrain.checkpoint.manager import CheckpointManager\n", "a higher layer"),
])
def test_a_planted_violation_is_caught(tmp_path: Path, planted: str, reason: str) -> None:
    fake = tmp_path / "bigtrain"
    (fake / "model").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "checkpoint").mkdir()
    for pkg in ("", "model", "train", "checkpoint"):
        (fake / pkg / "__init__.py").write_text("")
    (fake / "train" / "trainer.py").write_text("from bigtrain.model import decoder\n")  # downward: fine
    (fake / "checkpoint" / "manager.py").write_text("")
    (fake / "model" / "decoder.py").write_text(planted)
    problems = violations(fake)
    assert len(problems) == 1 and reason in problems[0] and "bigtrain.model.decoder" in problems[0]


def test_peer_imports_and_type_checking_imports(tmp_path: Path) -> None:
    fake = tmp_path / "bigtrain"
    for pkg in ("data", "parallel", "checkpoint"):
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "data" / "x.py").write_text("from bigtrain.parallel import dist\n")  # peer: refused
    (fake / "checkpoint" / "y.py").write_text("from bigtrain.parallel import dist\n")  # the allowed peer edge
    (fake / "parallel" / "z.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bigtrain.checkpoint import y\n")
    problems = violations(fake)
    assert len(problems) == 1 and "bigtrain.data.x imports bigtrain.parallel" in problems[0]


def test_a_planted_cycle_is_found(tmp_path: Path) -> None:
    fake = tmp_path / "bigtrain"
    for pkg in ("data", "optim"):
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("from bigtrain.optim import b\n")
    (fake / "optim" / "b.py").write_text("def f():\n    from bigtrain.data import a\n")
    assert package_cycles(fake) == [["data", "optim", "data"]]
