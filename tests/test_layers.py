"""The package's imports only point down, and no two modules import each other (directly or around a loop).

Every import counts, the ones inside functions too: a lazy import that points up is still an upward dependency.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top; a module may import its own layer (without a cycle) and any layer below.
LAYERS = [
    ("fcit", "fcit.env", "fcit.errors", "fcit.jsonio", "fcit.environment", "fcit.hardware", "fcit.embedded"),
    ("fcit.config",),
    ("fcit.data",),
    ("fcit.models",),
    ("fcit.training",),
    ("fcit.methods",),
    ("fcit.eval", "fcit.runtime"),
    ("fcit.results",),
    ("fcit.report",),
    ("fcit.engines",),
    ("fcit.experiment", "fcit.pretrain", "fcit.rundir"),
    ("fcit.launch",),
    ("fcit.compare",),
    ("fcit.matrix",),
    ("fcit.cli",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "fcit").rglob("*.py"):
        parts = f.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The fcit modules a file imports (``from pkg import sub`` counts as ``pkg.sub`` when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fcit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fcit":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in modules else node.module)
    return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_import_points_down_or_sideways():
    up = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
          for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d == "fcit":  # the root package only sets the environment switches
                continue
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path):
    # The rules are only worth something if a violation is visible to them.
    modules = {**_modules(), "fcit.fake": tmp_path / "fake.py"}
    (tmp_path / "fake.py").write_text("def f():\n    from fcit.cli import main\n")
    assert _imports(tmp_path / "fake.py", modules) == {"fcit.cli"}
    assert _layer("fcit.models.lora") < _layer("fcit.cli")
