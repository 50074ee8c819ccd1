"""The layout is the architecture: the README's tree lists exactly the package's files, no module
imports itself back through others, and none grows past what one reader can take in."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
README = ROOT / "README.md"
MAX_LINES = 400


def tree_entries() -> set[str]:
    """Paths under proxy/ that the README's layout tree names (folders end with /)."""
    text = README.read_text()
    m = re.search(r"<!-- layout: begin -->\n```\n(.*?)```\n<!-- layout: end -->", text, re.S)
    assert m, "README.md has no layout tree between <!-- layout: begin --> and <!-- layout: end -->"
    lines = m.group(1).splitlines()
    assert lines[0] == "proxy/", "the tree starts at proxy/"
    entries: set[str] = set()
    folder = ""
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        assert len(line.split()) > 1, f"{name}: every entry says what it is for"
        if indent == 2:
            folder = name if name.endswith("/") else ""
            entries.add(name)
        else:
            assert indent == 4 and folder, f"unexpected indentation in the README tree: {line!r}"
            entries.add(folder + name)
    return entries


def package_files() -> set[str]:
    """What the tree must list: every file of the package; a subpackage's __init__.py is its folder line."""
    out: set[str] = set()
    for path in PACKAGE.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        if "/" in rel and path.name == "__init__.py":
            rel = rel.removesuffix("__init__.py")
        out.add(rel)
    return out


def test_the_readme_tree_lists_every_file_and_only_those() -> None:
    listed, files = tree_entries(), package_files()
    assert len(files) > 40, "the package was not found"
    assert not files - listed, f"in proxy/ but not in the README's layout tree: {sorted(files - listed)}"
    assert not listed - files, f"in the README's layout tree but not in proxy/: {sorted(listed - files)}"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, anywhere in the file (a lazy import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    out.add(sub)  # `from proxy.gateway import handler`: the submodule
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_no_module_imports_itself_back() -> None:
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    assert graph["proxy.app"] >= {"proxy.gateway.handler", "proxy.ops.endpoints"}, "the import graph was not read"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_is_over_400_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these modules (over {MAX_LINES} lines): {too_long}"
