"""The house rules of seslib.py and sesrun.py, checked on their source with ast (no import, well under a second):
functions of at most 80 lines and a training driver of at most 60, sections in data-flow order (each uses only names
defined in itself or above), seslib never importing the runner, and each module docstring's section index equal to its
section banners."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ("seslib.py", "sesrun.py")
MAX_FUNCTION_LINES = 80
MAX_TRAIN_DRIVER_LINES = 60


def _source(name):
    return (ROOT / name).read_text()


def banners(src):
    """[(first line number, section name)] of the `# ═══ / # name / # ═══` banners, in file order."""
    lines = src.splitlines()
    return [(i + 2, lines[i + 1][2:].strip()) for i in range(len(lines) - 2)
            if lines[i].startswith("# ═") and lines[i + 2].startswith("# ═") and lines[i + 1].startswith("# ")]


def section_of(lineno, secs):
    """Index of the section holding a line (-1: the module head, imports and docstring)."""
    return max((k for k, (start, _) in enumerate(secs) if start <= lineno), default=-1)


def defined_names(node):
    """The module-level names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def bound_inside(node):
    """Every name a statement binds inside itself (arguments, assignments, loop and comprehension targets, nested
    definitions, imports): a load of one of these is local, not a reference to a module-level name."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not node:
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return out


def later_section_uses(src):
    """[(user, its section, name used, the later section defining it)] over the module's top-level statements."""
    tree, secs = ast.parse(src), banners(src)
    where = {}
    for node in tree.body:
        for name in defined_names(node):
            where.setdefault(name, section_of(node.lineno, secs))
    bad = []
    for node in tree.body:
        mine = section_of(node.lineno, secs)
        local = bound_inside(node) - set(defined_names(node)) if not isinstance(node, (ast.Assign, ast.AnnAssign)) else set()
        for n in ast.walk(node):
            if (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in where and n.id not in local
                    and where[n.id] > mine):
                user = (defined_names(node) or [f"line {node.lineno}"])[0]
                bad.append((user, secs[mine][1] if mine >= 0 else "head", n.id, secs[where[n.id]][1]))
    return sorted(set(bad))


def long_functions(src, limit):
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def docstring_index(src):
    """The section names the module docstring lists: the indented `name: what it holds` lines after 'Sections'."""
    doc = ast.get_docstring(ast.parse(src)) or ""
    block = doc.split("Sections", 1)[1] if "Sections" in doc else ""
    return [m.group(1).strip() for m in re.finditer(r"^ {2,}(\S[^:\n]*):", block, re.M)]


# ─── the rules, on both files ──────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("name", FILES)
def test_no_function_is_longer_than_80_lines(name):
    assert long_functions(_source(name), MAX_FUNCTION_LINES) == [], f"{name}: split these into named steps"


def test_the_training_driver_reads_as_a_page():
    (train,) = [n for n in ast.parse(_source("seslib.py")).body if isinstance(n, ast.FunctionDef) and n.name == "_train"]
    assert train.end_lineno - train.lineno + 1 <= MAX_TRAIN_DRIVER_LINES


@pytest.mark.parametrize("name", FILES)
def test_each_section_uses_only_names_defined_in_it_or_above(name):
    assert later_section_uses(_source(name)) == []


@pytest.mark.parametrize("name", FILES)
def test_the_docstring_index_lists_the_section_banners_in_order(name):
    src = _source(name)
    assert [s for _, s in banners(src)] == docstring_index(src)


def test_the_readme_lists_the_same_sections():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## The code: `seslib.py` and `sesrun.py`", 1)[1].split("\n## ", 1)[0]
    lib = re.findall(r"^\d+\. ([^:\n]+)", code.split("`seslib.py`:", 1)[1], re.M)
    run = code.split("`sesrun.py`: ", 1)[1].split("\n\n", 1)[0]
    assert lib == [s for _, s in banners(_source("seslib.py"))]
    assert [re.sub(r"\s*\(.*?\)", "", x).strip() for x in run.rstrip(".").split("→")] == [
        s for _, s in banners(_source("sesrun.py"))]


def test_seslib_never_imports_or_refers_to_the_runner():
    """seslib is what the notebooks import: it may tell a user which `sesrun.py` command to run (a string), but its
    code never imports, names or reaches the runner module."""
    tree = ast.parse(_source("seslib.py"))
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imports |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", ""))
             in ("import_module", "__import__") and any(isinstance(a, ast.Constant) and "sesrun" in str(a.value)
                                                       for a in n.args)]
    assert "sesrun" not in imports and "sesrun" not in names and not calls


def test_sesrun_imports_seslib_and_defines_no_notebook_helper():
    """The runner depends on the helper one way only, and the notebooks' helpers are not duplicated there."""
    run, lib = ast.parse(_source("sesrun.py")), ast.parse(_source("seslib.py"))
    assert any(isinstance(n, ast.Import) and any(a.name == "seslib" for a in n.names) for n in run.body)
    mine = {d for n in run.body for d in defined_names(n)}
    theirs = {d for n in lib.body for d in defined_names(n)}
    assert mine & theirs <= {"CONTRACT_VERSION", "main"}


# ─── the checker itself: each rule catches what it is for ──────────────────────────────────────

BANNER = "# " + "═" * 20


def _module(*sections, doc="Sections:\n  a: first\n  b: second\n"):
    body = "".join(f"{BANNER}\n# {name}\n{BANNER}\n{code}\n" for name, code in sections)
    return f'"""m.\n\n{doc}"""\n{body}'


def test_the_checker_catches_a_section_that_uses_a_later_one():
    ok = _module(("a", "X = 1\ndef f():\n    return X\n"), ("b", "def g():\n    return f() + X\n"))
    bad = _module(("a", "def f():\n    return g()\n"), ("b", "def g():\n    return 1\n"))
    local = _module(("a", "def f(g):\n    return g()\n"), ("b", "def g():\n    return 1\n"))
    assert later_section_uses(ok) == [] and later_section_uses(local) == []
    assert later_section_uses(bad) == [("f", "a", "g", "b")]


def test_the_checker_reads_the_docstring_index_and_long_functions():
    src = _module(("a", "def f():\n" + "    x = 1\n" * 81), ("b", ""))
    assert [s for _, s in banners(src)] == docstring_index(src) == ["a", "b"]
    assert long_functions(src, 80) == [("f", 10, 82)]
    assert docstring_index(_module(("a", ""), doc="Sections:\n  b: x\n  a: y\n")) == ["b", "a"]
