"""The package's one rule: imports only go down the layers (chattune/__init__.py), imports inside functions
included, and no module imports itself back through others. Plus: every command in the CLI table answers
--help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import chattune
from chattune.cli import COMMANDS, build_parser

PACKAGE = Path(chattune.__file__).parent
# lowest first; packages on one line are siblings and may not import each other
LAYERS = [
    {"errors", "outputs", "verbosity"},
    {"config"},
    {"data", "demo"},
    {"model"},
    {"training", "inference"},
    {"evaluation"},
    {"artifacts", "serving"},
    {"commands"},
    {"cli"},
    {"__main__"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("chattune", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """chattune modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n == "chattune" or n.startswith("chattune.")}
    return found


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path, known) if m in known} for name, path in known.items()}


def test_every_module_belongs_to_a_layer():
    assert {part_of(m) for m in modules()} - {""} <= set(RANK), "a new package needs a place in LAYERS (and the docs)"


def test_imports_only_go_down():
    wrong = []
    for module, deps in graph().items():
        if module == "chattune":  # the package's lazy re-exports of the stable entry points
            continue
        mine = part_of(module)
        for dep in deps:
            theirs = part_of(dep)
            if dep == "chattune" or theirs == mine or RANK[theirs] < RANK[mine]:
                continue
            wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = {m: {d for d in deps if d != "chattune"} for m, deps in graph().items() if m != "chattune"}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_readable():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_command_has_help_and_answers_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        assert help_text and sub.choices[name].description == help_text
        with pytest.raises(SystemExit) as exit_info:
            build_parser(name).parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_help_does_not_import_the_heavy_libraries():
    code = ("import sys; from chattune.cli import build_parser; build_parser('train'); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
