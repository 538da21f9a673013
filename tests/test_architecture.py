"""The package's import structure matches docs/architecture.md.

Every module of ``sngd_jax/_src`` is parsed with ``ast`` (imports inside functions
included) and its imports from the package are checked against the table of
allowed imports in ``docs/architecture.md``; the public modules must re-export
exactly the names in their ``__all__``.
"""

import ast
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "sngd_jax"
SRC = PKG / "_src"
DOC = ROOT / "docs" / "architecture.md"


def _module_name(path: pathlib.Path) -> str:
  """``_src/capture/linen.py`` -> ``capture/linen``; a package's ``__init__`` -> the package."""
  rel = path.relative_to(SRC).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return "/".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module name imported anywhere in a file (absolute, dotted)."""
  tree = ast.parse(path.read_text())
  package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
  if path.name == "__init__.py":
    package = ".".join(path.relative_to(ROOT).parts[:-1])
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      out.add(module)
      # `from pkg import mod` imports a module when `pkg.mod` is one.
      out.update(f"{module}.{alias.name}" for alias in node.names)
  return out


def _internal(imports: set[str]) -> set[str]:
  """The ``sngd_jax._src`` modules among ``imports``, as table names (``inverse/base``)."""
  out = set()
  for name in imports:
    if not name.startswith("sngd_jax._src."):
      continue
    parts = name.split(".")[2:]
    # Keep the longest prefix that is a module or package of _src.
    for k in range(len(parts), 0, -1):
      candidate = SRC.joinpath(*parts[:k])
      if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
        out.add("/".join(parts[:k]))
        break
  return out


def _table() -> dict[str, set[str]]:
  text = DOC.read_text()
  block = re.search(r"<!-- imports:start -->(.*?)<!-- imports:end -->", text, re.S)
  assert block, "docs/architecture.md lost its table of allowed imports"
  table = {}
  for line in block.group(1).splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) != 2 or not cells[0].startswith("`"):
      continue
    allowed = set(re.findall(r"`([^`]+)`", cells[1]))
    table[cells[0].strip("`")] = allowed
  return table


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))
           if p.name != "__init__.py" or p.parent != SRC}
TABLE = _table()


def _row(module: str) -> set[str] | None:
  if module in TABLE:
    return TABLE[module]
  package = module.split("/")[0]
  return TABLE.get(f"{package}/*") if "/" in module or f"{package}/*" in TABLE else None


def _allowed(module: str, target: str, allowed: set[str]) -> bool:
  package = module.split("/")[0]
  if target == package or target.startswith(package + "/"):
    return True  # a module's own package
  for rule in allowed:
    if rule == target:
      return True
    if rule.endswith("/*") and (target == rule[:-2] or target.startswith(rule[:-1])):
      return True
  return False


def test_table_parses_and_names_real_modules():
  assert len(TABLE) >= 15
  known = set(MODULES) | {m.split("/")[0] for m in MODULES}
  for module, allowed in TABLE.items():
    for name in {module, *allowed}:
      assert name.removesuffix("/*") in known, f"docs/architecture.md names unknown {name!r}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_what_architecture_allows(module):
  allowed = _row(module)
  assert allowed is not None, (
      f"sngd_jax/_src/{module} has no row in the allowed-imports table of "
      "docs/architecture.md: add one (what it owns and what it may import)")
  used = _internal(_imports(MODULES[module]))
  bad = sorted(t for t in used if not _allowed(module, t, allowed))
  assert not bad, f"{module} imports {bad}, not allowed by docs/architecture.md"


def test_rules_stated_in_architecture():
  for module, path in MODULES.items():
    used = _internal(_imports(path))
    if module.startswith("inverse/"):
      assert "transform" not in used, module
      third_party = {i.split(".")[0] for i in _imports(path)}
      assert not third_party & {"flax", "optax"}, f"{module} imports flax/optax"
    if module.startswith("capture/"):
      assert not used & {"statistics", "transform", "precondition"}, module
      assert not any(u.startswith("inverse") for u in used), module


def test_import_graph_has_no_cycle():
  graph = {m: {t for t in _internal(_imports(p)) if t in MODULES} - {m}
           for m, p in MODULES.items()}
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in graph[node]:
      if state.get(nxt) == "open":
        raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
      if nxt not in state:
        visit(nxt, stack + [node])
    state[node] = "done"

  for node in graph:
    if node not in state:
      visit(node, [])


def test_package_never_imports_benchmarks_tests_or_examples():
  for path in PKG.rglob("*.py"):
    roots = {i.split(".")[0] for i in _imports(path)}
    assert not roots & {"benchmarks", "tests", "examples"}, path


@pytest.mark.parametrize("public", ["sngd_jax", "sngd_jax.inverse"])
def test_public_modules_reexport_exactly_their_all(public):
  module = importlib.import_module(public)
  path = PKG / ("__init__.py" if public == "sngd_jax" else "inverse.py")
  tree = ast.parse(path.read_text())
  imported = {(a.asname or a.name) for node in tree.body
              if isinstance(node, ast.ImportFrom) for a in node.names}
  imported.discard("annotations")
  exported = set(module.__all__)
  assert len(module.__all__) == len(exported), "duplicate names in __all__"
  for name in exported:
    assert hasattr(module, name), f"{public}.{name} is in __all__ but not defined"
  assert imported == exported, (
      f"{public}: imported but not in __all__: {sorted(imported - exported)}; "
      f"in __all__ but not imported: {sorted(exported - imported)}")
  # Re-exported explicitly (`from x import y as y`), as optax and equinox do.
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module != "__future__":
      for a in node.names:
        assert a.asname == a.name, f"{public}: `import {a.name}` without `as {a.name}`"
