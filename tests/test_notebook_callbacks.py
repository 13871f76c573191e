"""A widget's callback runs when the student moves a slider — after "Run All", so with the values the *last* cells
left in the kernel. A name the callback reads and a later cell rebinds (notebook 05's ``targets``, rebound by a loop
two cells later) breaks the widget only then, out of the executed run's sight. This reads every notebook's code."""

import ast
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
#: a call that registers a callback the kernel runs later
REGISTERS = ("interact", "interactive", "observe", "on_click", "on_submit", "live_tuning")


def code_cells(path: Path) -> list[tuple[int, ast.Module]]:
    """(index, syntax tree) of each code cell, as IPython runs it (%magics made Python)."""
    from IPython.core.inputtransformer2 import TransformerManager

    found = []
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            found.append((index, ast.parse(TransformerManager().transform_cell("".join(cell["source"])))))
    return found


def callback_reads(tree: ast.Module) -> set[str]:
    """The global names read inside the lambdas and functions a cell passes to a callback-registering call (or
    defines and passes by name), minus their own parameters."""
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    reads = set()
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
        if name not in REGISTERS:
            continue
        for argument in [*call.args, *(k.value for k in call.keywords)]:
            body = argument if isinstance(argument, ast.Lambda) else functions.get(getattr(argument, "id", None))
            if body is None:
                continue
            own = {a.arg for a in ast.walk(body.args) if isinstance(a, ast.arg)}
            own |= {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            reads |= {n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own
    return reads


def module_binds(tree: ast.Module) -> set[str]:
    """The global names a cell binds: assignments, loop targets, imports, definitions (not inside functions)."""
    bound = set()

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
            return
        if isinstance(node, ast.Lambda) or isinstance(node, ast.comprehension):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        if isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return bound


def rebound_after_callbacks(path: Path) -> list[str]:
    cells = code_cells(path)
    found = []
    for position, (index, tree) in enumerate(cells):
        reads = callback_reads(tree)
        for later, later_tree in cells[position + 1:]:
            for name in sorted(reads & module_binds(later_tree)):
                found.append(f"cell {index}'s widget callback reads {name!r}, which cell {later} rebinds: after "
                             "Run All the widget sees cell {later}'s value".replace("{later}", str(later)))
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_later_cell_rebinds_a_name_a_widget_callback_reads(path):
    assert rebound_after_callbacks(path) == []


def test_the_check_finds_notebook_05s_rebound_targets(tmp_path):
    cells = [
        "targets = {'a': 1}\ninteract(lambda target, rank: plot(targets[target], rank), target=['a'], rank=1)",
        "for name, (config, targets) in setups.items():\n    pass",
    ]
    nb = {"cells": [{"cell_type": "code", "source": source} for source in cells]}
    (tmp_path / "nb.ipynb").write_text(json.dumps(nb))
    assert rebound_after_callbacks(tmp_path / "nb.ipynb") == [
        "cell 0's widget callback reads 'targets', which cell 1 rebinds: after Run All the widget sees cell 1's value"]
