"""The house rules of the seslib package and sesrun.py, checked on their source with ast (no import, well under a
second): rooms that import one way only (each room imports only rooms above it in the package's list), the SES
method room importing nothing of the suite, the library rooms never reaching the runner's, no function over 80 lines
and a training driver of at most 60, no product file over 1,500 lines nor over a quarter of the product code, no
private torch module imported when a room loads, and the package docstring and docs/code.md listing exactly the
package's rooms."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "seslib"
MAX_FUNCTION_LINES = 80
MAX_TRAIN_DRIVER_LINES = 60
MAX_FILE_LINES = 1500
MAX_FILE_SHARE = 0.25


def _tuple_assigned(tree, name):
    """The tuple of strings a module-level `name = (...)` assigns."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise KeyError(name)


INIT = ast.parse((PKG / "__init__.py").read_text())
LIBRARY = _tuple_assigned(INIT, "LIBRARY_ROOMS")
RUNNER = _tuple_assigned(INIT, "RUNNER_ROOMS")
ROOMS = LIBRARY + RUNNER  # the one order: a room imports only rooms before it here
PRODUCT = [PKG / f"{r}.py" for r in ROOMS] + [PKG / "__init__.py", PKG / "__main__.py", ROOT / "sesrun.py"]


def _source(path):
    return Path(path).read_text()


def room_imports(src, package="seslib"):
    """[(line, room imported)] of every import of a sibling room in a module's source, at any depth (a function's
    lazy import counts as much as the module's own): `from .x import`, `from . import x`, `import seslib.x`,
    `from seslib.x import`, `from seslib import x`."""
    out = []
    for n in ast.walk(ast.parse(src)):
        if isinstance(n, ast.ImportFrom):
            mod = n.module or ""
            if n.level == 1 or mod == package or mod.startswith(package + "."):
                base = mod[len(package) + 1:] if mod.startswith(package + ".") else ("" if mod == package else mod)
                if base:
                    out.append((n.lineno, base.split(".")[0]))
                else:
                    out += [(n.lineno, a.name) for a in n.names]
        elif isinstance(n, ast.Import):
            out += [(n.lineno, a.name.split(".")[1]) for a in n.names if a.name.startswith(package + ".")]
    return out


def upward_imports(sources: dict, order) -> list:
    """[(room, line, room it imports)] where a room imports itself, a room after it in `order`, or no room at all."""
    bad = []
    for room, src in sources.items():
        for line, dep in room_imports(src):
            if dep not in order or order.index(dep) >= order.index(room):
                bad.append((room, line, dep))
    return bad


def long_functions(src, limit):
    return [(n.name, n.lineno, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(src))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def module_level_private_imports(src):
    """Modules with a private path component (torch.utils._python_dispatch) imported when the module loads."""
    tree, out = ast.parse(src), []
    for n in tree.body:
        names = [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level else [
            a.name for a in n.names] if isinstance(n, ast.Import) else []
        out += [m for m in names if m != "__future__" and any(part.startswith("_") for part in m.split("."))]
    return out


def docstring_rooms(src):
    """The room names the package docstring lists: the indented `name   what it holds` lines."""
    doc = ast.get_docstring(ast.parse(src)) or ""
    return [m.group(1) for m in re.finditer(r"^  ([a-z_]+) {2,}\S", doc, re.M)]


def docs_rooms(md):
    """The rooms docs/code.md's table lists, in order: its rows `| `name` | lines | ... |`."""
    return re.findall(r"^\| `([a-z_]+)` \| \d", md, re.M)


# ─── the rules ─────────────────────────────────────────────────────────────────────────────────

def test_the_package_holds_exactly_the_listed_rooms():
    files = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    assert files == set(ROOMS), "add a new room to LIBRARY_ROOMS / RUNNER_ROOMS (seslib/__init__.py) in its place"


def test_rooms_import_one_way():
    assert upward_imports({r: _source(PKG / f"{r}.py") for r in ROOMS}, list(ROOMS)) == []


def test_the_ses_method_room_imports_nothing_of_the_suite():
    src = _source(PKG / "ses.py")
    assert room_imports(src) == []
    mods = {(a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
            for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert mods <= {"__future__", "contextlib", "math", "re", "warnings", "numpy", "pandas", "torch"}, mods


def test_the_library_never_reaches_the_runner():
    """What a notebook imports (`import seslib as S`: the library rooms) never imports, names or reaches the runner
    rooms or sesrun.py; it may tell a user which `sesrun.py` command to run (a string)."""
    for room in LIBRARY + ("__init__",):
        tree = ast.parse(_source(PKG / f"{room}.py"))
        deps = {d for _, d in room_imports(_source(PKG / f"{room}.py"))}
        if room == "__init__":
            deps = {d for d in deps if d not in LIBRARY}
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not deps & set(RUNNER), (room, deps & set(RUNNER))
        assert "sesrun" not in imports and "sesrun" not in names, room


def test_sesrun_is_a_thin_entry_over_the_runner_rooms():
    tree = ast.parse(_source(ROOT / "sesrun.py"))
    defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == [] and len(_source(ROOT / "sesrun.py").splitlines()) < 60


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.name)
def test_no_function_is_longer_than_80_lines(path):
    assert long_functions(_source(path), MAX_FUNCTION_LINES) == [], f"{path.name}: split these into named steps"


def test_the_training_driver_reads_as_a_page():
    (train,) = [n for n in ast.parse(_source(PKG / "training.py")).body
                if isinstance(n, ast.FunctionDef) and n.name == "_train"]
    assert train.end_lineno - train.lineno + 1 <= MAX_TRAIN_DRIVER_LINES


def test_no_file_is_a_warehouse():
    sizes = {p.name: len(_source(p).splitlines()) for p in PRODUCT}
    total = sum(sizes.values())
    assert max(sizes.values()) <= MAX_FILE_LINES, sizes
    assert max(sizes.values()) < MAX_FILE_SHARE * total, (max(sizes.values()), total)


@pytest.mark.parametrize("path", PRODUCT, ids=lambda p: p.name)
def test_no_private_torch_module_is_imported_when_a_room_loads(path):
    assert module_level_private_imports(_source(path)) == []


def test_the_package_docstring_lists_the_rooms_in_order():
    assert docstring_rooms(_source(PKG / "__init__.py")) == list(ROOMS)


def test_docs_code_page_lists_the_rooms_with_their_sizes():
    md = _source(ROOT / "docs" / "code.md")
    assert docs_rooms(md) == list(ROOMS)
    for room in ROOMS:
        (lines,) = re.findall(rf"^\| `{room}` \| (\d[\d,]*) \|", md, re.M)
        assert abs(int(lines.replace(",", "")) - len(_source(PKG / f"{room}.py").splitlines())) <= 50, (
            f"docs/code.md: {room}'s size is out of date (python tests/test_structure.py prints the table)")


def test_pyproject_installs_the_package_and_the_command():
    """`pip install -e .` installs the rooms (the package) and sesrun.py, and `sesrun` runs the same main."""
    import tomllib
    meta = tomllib.loads(_source(ROOT / "pyproject.toml"))
    assert meta["tool"]["setuptools"]["packages"] == ["seslib"]
    assert meta["tool"]["setuptools"]["py-modules"] == ["sesrun"]
    module, func = meta["project"]["scripts"]["sesrun"].split(":")
    assert module == "seslib.cli" and any(isinstance(n, ast.FunctionDef) and n.name == func
                                          for n in ast.parse(_source(PKG / "cli.py")).body)


# ─── the checker itself: each rule catches what it is for ──────────────────────────────────────

def test_the_checker_catches_an_upward_or_lazy_import():
    ok = {"a": "import os\n", "b": "from .a import f\nfrom . import a\n"}
    up = {"a": "from .b import g\n", "b": ""}
    lazy = {"a": "def f():\n    from seslib.b import g\n    return g\n", "b": ""}
    unknown = {"a": "import seslib.zz\n"}
    assert upward_imports(ok, ["a", "b"]) == []
    assert upward_imports(up, ["a", "b"]) == [("a", 1, "b")]
    assert upward_imports(lazy, ["a", "b"]) == [("a", 2, "b")]
    assert upward_imports(unknown, ["a"]) == [("a", 1, "zz")]


def test_the_checker_reads_long_functions_private_imports_and_room_lists():
    assert long_functions("def f():\n" + "    x = 1\n" * 81, 80) == [("f", 1, 82)]
    assert module_level_private_imports("from torch.utils._python_dispatch import M\nimport torch.nn\n") == [
        "torch.utils._python_dispatch"]
    assert module_level_private_imports("def f():\n    from torch.utils._pytree import x\n") == []
    assert docstring_rooms('"""x.\n\nRooms:\n  a    one\n  b_c  two\n"""') == ["a", "b_c"]
    assert docs_rooms("| room | lines |\n|---|---|\n| `a` | 10 | x |\n| `b` | 1,200 | y |\n") == ["a", "b"]


def code_table() -> str:
    """docs/code.md's room table, measured now."""
    sizes = {r: len(_source(PKG / f"{r}.py").splitlines()) for r in ROOMS}
    total = sum(len(_source(p).splitlines()) for p in PRODUCT)
    doc = {m.group(1): m.group(2) for m in re.finditer(r"^  ([a-z_]+) {2,}(.+?)(?:\s+}.*)?$",
                                                       ast.get_docstring(INIT), re.M)}
    rows = [f"| `{r}` | {sizes[r]:,} | {100 * sizes[r] / total:.1f} % | {doc[r].strip()} |" for r in ROOMS]
    return "\n".join(["| room | lines | share | what it holds |", "|---|---|---|---|", *rows,
                      f"\nProduct code: {total:,} lines (the rooms, `__init__.py`, `__main__.py`, `sesrun.py`); the "
                      f"biggest file is `{max(sizes, key=sizes.get)}.py`, {max(sizes.values()):,} lines, "
                      f"{100 * max(sizes.values()) / total:.1f} % of it."])


if __name__ == "__main__":
    print(code_table())
