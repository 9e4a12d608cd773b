"""The import rules of docs/architecture.md, checked on the source with ``ast`` (nothing is imported).

Every module under meshrl/ is parsed; every ``import`` and ``from ... import`` in it counts, at module
level or inside a function, relative ones resolved against the module's package, and so does
``importlib.import_module("<literal>")``. An arrow is a (file, imported module) pair; each rule below
names the arrows it forbids, and a failure names the importing file, its line and the statement.

Known exceptions are listed by file and imported module with the reason and the change that removes
them; an exception that no longer occurs fails too, so the list cannot outlive the code it excuses.
"""
from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "meshrl"

# Parts of meshrl/, as docs/architecture.md names them. "engine" is engine/'s top-level modules
# (batch, checkpoint, dataflow, distributed, train, watchdog).
ENGINE_SUBPACKAGES = ("model", "generation", "algorithms", "runtime", "data", "tasks")


@dataclass(frozen=True)
class Arrow:
    file: str      # path relative to the checked tree's parent, e.g. "meshrl/engine/train.py"
    line: int
    source: str    # the module that imports
    target: str    # the module (or package) it imports
    statement: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.target} (`{self.statement}`)"


def part_of(module: str) -> str:
    """The part a dotted module name belongs to: parallel, kernels, engine.<sub>, engine, study, cli,
    testing; "meshrl" for the root package; the first component for anything outside meshrl."""
    names = module.split(".")
    if names[0] != "meshrl":
        return names[0]
    if len(names) == 1:
        return "meshrl"
    if names[1] == "engine":
        if len(names) > 2 and names[2] in ENGINE_SUBPACKAGES:
            return f"engine.{names[2]}"
        return "engine"
    return names[1]


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    names = list(rel.parts)
    is_package = names[-1] == "__init__"
    if is_package:
        names.pop()
    return ".".join(names), is_package


def imports_in_source(source: str, module: str, is_package: bool, known: set[str],
                      filename: str = "<string>") -> list[tuple[int, str, str]]:
    """(line, imported module, statement) for every import in ``source``, at any depth.

    ``from X import n`` counts as an import of ``X.n`` when that is a module of the tree (``known``),
    else of ``X``; relative imports are resolved against the package of ``module``."""
    tree = ast.parse(source, filename=filename)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):
                    raise ValueError(f"{filename}:{node.lineno}: relative import beyond the top package")
                parts = package[:len(package) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value, ast.unparse(node)))
    return found


def collect_arrows(root: Path | None = None) -> list[Arrow]:
    """Every import of every module under ``root`` (a directory named meshrl; ROOT by default)."""
    root = ROOT if root is None else root
    files = sorted(root.rglob("*.py"))
    names = {p: _module_name(p, root) for p in files}
    known = {name for name, _ in names.values()}
    arrows = []
    for path in files:
        module, is_package = names[path]
        rel = path.relative_to(root.parent).as_posix()
        for line, target, statement in imports_in_source(path.read_text(), module, is_package, known, rel):
            arrows.append(Arrow(rel, line, module, target, statement))
    return arrows


# --- the rules ---------------------------------------------------------------------------------
# (name, importer parts, forbidden(target part) -> bool, why). Parts only see meshrl's own modules;
# third-party imports are not arrows between parts (except for the sandbox child, below).

MESHRL_PARTS = ("parallel", "kernels", "engine", *(f"engine.{s}" for s in ENGINE_SUBPACKAGES),
                "planning", "launch", "study", "cli", "testing", "meshrl")


def _only(*allowed):
    return lambda part: part in MESHRL_PARTS and part not in allowed and part != "meshrl"


def _one_of(*forbidden):
    return lambda part: part in forbidden


RULES = [
    ("parallel/ imports nothing of meshrl outside parallel/ (no models, kernels' callers or RL)",
     {"parallel"}, _only("parallel")),
    ("kernels/ imports nothing of meshrl outside kernels/ (pure functions on tensors)",
     {"kernels"}, _only("kernels")),
    ("engine/tasks imports nothing of meshrl outside engine/tasks",
     {"engine.tasks"}, _only("engine.tasks")),
    ("engine/data imports only engine/data and engine/tasks",
     {"engine.data"}, _only("engine.data", "engine.tasks")),
    ("engine/model imports only engine/model, parallel/ and kernels/",
     {"engine.model"}, _only("engine.model", "parallel", "kernels")),
    ("engine/algorithms imports only engine/algorithms and kernels/ (pure; nothing of engine/runtime)",
     {"engine.algorithms"}, _only("engine.algorithms", "kernels")),
    ("engine/generation imports no engine/runtime, engine/algorithms or engine/tasks (only its job, "
     "`meshrl generate`, reads prompts through engine/data)",
     {"engine.generation"}, _one_of("engine.runtime", "engine.algorithms", "engine.tasks")),
    ("only engine/runtime, planning/, launch, study/ and cli import engine/runtime",
     set(MESHRL_PARTS) - {"engine.runtime", "planning", "launch", "study", "cli"}, _one_of("engine.runtime")),
    ("only launch and cli import planning/ (the runtime executes a plan; it never plans)",
     set(MESHRL_PARTS) - {"planning", "launch", "cli"}, _one_of("planning")),
    ("planning/ imports no engine/generation, engine/data or engine/tasks (it prices calls on the meta "
     "device; only bench.py's CPU calibration times real calls)",
     {"planning"}, _one_of("engine.generation", "engine.data", "engine.tasks")),
    ("only study/ and cli import launch",
     set(MESHRL_PARTS) - {"launch", "study", "cli"}, _one_of("launch")),
    ("only study/ and cli import study/",
     set(MESHRL_PARTS) - {"study", "cli"}, _one_of("study")),
    ("nothing imports cli",
     set(MESHRL_PARTS) - {"cli"}, _one_of("cli")),
    ("only meshrl/testing imports meshrl.testing (it is test support)",
     set(MESHRL_PARTS) - {"testing"}, _one_of("testing")),
]

# (importing file, imported module) -> why it is allowed today, and what removes it.
KNOWN_EXCEPTIONS: dict = {
    ("meshrl/planning/bench.py", "meshrl.engine.generation"):
        "bench's CPU calibration times one real generation call (the rule's own exception)",
}

# Import cycles between parts allowed today: none.
KNOWN_CYCLE_EDGES: set = set()

SANDBOX_CHILD = "meshrl/engine/tasks/_sandbox_child.py"


def violations(arrows: list[Arrow], rules=RULES, exceptions=KNOWN_EXCEPTIONS) -> list[str]:
    out = []
    for arrow in arrows:
        src, dst = part_of(arrow.source), part_of(arrow.target)
        if src == dst or (arrow.file, arrow.target) in exceptions:
            continue
        for why, importers, forbidden in rules:
            if src in importers and forbidden(dst):
                out.append(f"{arrow}: {why}")
    return out


def part_cycles(arrows: list[Arrow], skip=KNOWN_CYCLE_EDGES) -> list[list[str]]:
    """Cycles of the part graph (meshrl's parts only), each as the list of parts around it."""
    graph: dict[str, set[str]] = {}
    for a in arrows:
        src, dst = part_of(a.source), part_of(a.target)
        if src != dst and dst in MESHRL_PARTS and (a.file, a.target) not in skip:
            graph.setdefault(src, set()).add(dst)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


# --- the tests on meshrl/ as it is --------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _arrows_today() -> tuple[Arrow, ...]:
    return tuple(collect_arrows())


def test_forbidden_imports_absent():
    found = violations(_arrows_today())
    assert not found, "forbidden imports (docs/architecture.md):\n" + "\n".join(found)


def test_known_exceptions_still_exist():
    arrows = {(a.file, a.target) for a in _arrows_today()}
    stale = [f"{f} -> {t}" for f, t in [*KNOWN_EXCEPTIONS, *KNOWN_CYCLE_EDGES] if (f, t) not in arrows]
    assert not stale, ("these known exceptions no longer occur; remove them from tests/test_architecture.py "
                       "and docs/architecture.md: " + ", ".join(stale))


def test_no_import_cycle_between_parts():
    cycles = part_cycles(_arrows_today())
    assert not cycles, "import cycles between parts: " + "; ".join(" -> ".join(c) for c in cycles)


def test_sandbox_child_uses_the_standard_library_only():
    # sandbox.py runs it as `python -I -S _sandbox_child.py`, by path, once per test case.
    path = ROOT.parent / SANDBOX_CHILD
    found = imports_in_source(path.read_text(), "meshrl.engine.tasks._sandbox_child", False, set(), SANDBOX_CHILD)
    outside = [f"{SANDBOX_CHILD}:{line} imports {target} (`{stmt}`)" for line, target, stmt in found
               if target.split(".")[0] not in sys.stdlib_module_names and target != "__future__"]
    assert not outside, "the sandbox child may import the standard library only:\n" + "\n".join(outside)


DATAFLOW_TABLE = "meshrl/engine/dataflow.py"


def call_name_literals(root: Path | None = None) -> list[str]:
    """Every string constant under ``root`` that is a call name of the dataflow table, outside the
    table itself: code names calls by the table's constants (docstrings and comments may say them)."""
    from meshrl.engine.dataflow import DATAFLOWS
    names = {c.name for flow in DATAFLOWS.values() for c in flow.calls()}
    root = ROOT if root is None else root
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == DATAFLOW_TABLE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    return found


def test_call_names_are_literals_only_in_the_dataflow_table():
    found = call_name_literals()
    assert not found, ("call names outside engine/dataflow.py (import its constants):\n" + "\n".join(found))


# --- the checker itself can fail ------------------------------------------------------------------

def _write(root: Path, rel: str, text: str):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_forbidden_imports_in_a_scratch_tree(tmp_path):
    root = tmp_path / "meshrl"
    for pkg in ("", "parallel", "kernels", "engine", "engine/algorithms", "engine/runtime", "engine/model",
                "testing"):
        _write(root, f"{pkg}/__init__.py".lstrip("/"), "")
    _write(root, "engine/runtime/loop.py", "X = 1\n")
    _write(root, "engine/model/llama.py", "Y = 1\n")
    _write(root, "testing/dist_pool.py", "class DistPool: ...\n")
    _write(root, "parallel/layout.py", "import torch\nfrom meshrl.engine.model import llama\n")
    _write(root, "kernels/gae.py", "def f():\n    from ..parallel import layout\n")      # function-level, relative
    _write(root, "engine/algorithms/calls.py", "from ..runtime.loop import X\n")           # relative, two levels
    _write(root, "engine/model/hf.py", "import importlib\nm = importlib.import_module('meshrl.testing.dist_pool')\n")
    _write(root, "engine/train.py", "from meshrl.engine.algorithms import calls\n")        # allowed
    found = violations(collect_arrows(root), exceptions={})
    text = "\n".join(found)
    assert len(found) == 6, text  # calls.py and hf.py each break two rules
    assert "meshrl/parallel/layout.py:2 imports meshrl.engine.model.llama (`from meshrl.engine.model import llama`)" in text
    assert "meshrl/kernels/gae.py:2 imports meshrl.parallel.layout (`from ..parallel import layout`)" in text
    assert "meshrl/engine/algorithms/calls.py:1 imports meshrl.engine.runtime.loop" in text
    assert "only engine/runtime, planning/, launch, study/ and cli import engine/runtime" in text
    assert "meshrl/engine/model/hf.py:2 imports meshrl.testing.dist_pool" in text
    assert "meshrl/engine/train.py" not in text


def test_checker_finds_a_cycle():
    arrows = [Arrow("meshrl/engine/train.py", 1, "meshrl.engine.train", "meshrl.engine.generation", ""),
              Arrow("meshrl/engine/generation/fast.py", 1, "meshrl.engine.generation.fast", "meshrl.engine.train", "")]
    assert part_cycles(arrows, skip=set()) == [["engine", "engine.generation", "engine"]]
    assert part_cycles(arrows, skip={("meshrl/engine/train.py", "meshrl.engine.generation")}) == []


def test_call_name_checker_finds_a_literal(tmp_path):
    root = tmp_path / "meshrl"
    _write(root, "engine/runtime/loop.py", 'def f(ctx):\n    """runs actor_gen"""\n    return ctx.has("ref_inf")\n')
    _write(root, "engine/dataflow.py", 'REF_INF = "ref_inf"\n')
    assert call_name_literals(root) == ["meshrl/engine/runtime/loop.py:3 'ref_inf'"]


def test_relative_imports_resolve():
    known = {"meshrl.engine.generation", "meshrl.engine.model.attention"}
    src = "from .generation import FastGenerator\nfrom .model.attention import PackedMeta\nfrom . import batch\n"
    got = [t for _, t, _ in imports_in_source(src, "meshrl.engine.train", False, known)]
    assert got == ["meshrl.engine.generation", "meshrl.engine.model.attention", "meshrl.engine"]
    got = [t for _, t, _ in imports_in_source("from .. import kernels\n", "meshrl.engine", True,
                                              {"meshrl.kernels"})]
    assert got == ["meshrl.kernels"]
