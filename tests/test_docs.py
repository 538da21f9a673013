"""The documentation names only things that exist.

Every dotted ``sngd_jax.`` name in README.md, benchmarks/README.md, docs/*.md and the docstrings and
comments under sngd_jax/ must resolve (import the module, then getattr), and
every ``benchmarks/results/...`` and ``tests/...`` path they cite must exist.
The reference itself is built by ``.ci/docs.sh`` (``mkdocs build --strict``).
"""

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md",
               *(ROOT / "docs").rglob("*.md")])
SOURCES = sorted((ROOT / "sngd_jax").rglob("*.py"))

# Named in README.md's training-loop pointers; added by the drop-in (issue 14) and capture
# (issue 13) work. Remove a name from here once it is exported.
PENDING: set[str] = set()

NAME = re.compile(r"\bsngd_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATH = re.compile(r"\b((?:benchmarks/results|tests|examples|benchmarks)/[A-Za-z0-9_./-]+)")


def _resolves(name: str) -> bool:
  parts = name.split(".")
  for k in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:k]))
    except ImportError:
      continue
    try:
      for attr in parts[k:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return False
    return True
  return False


def _names(path: pathlib.Path) -> set[str]:
  text = path.read_text()
  names = set()
  for m in NAME.finditer(text):
    name = m.group(0)
    # A trailing file suffix (``sngd_jax.inverse.py``) or attribute access on a call result
    # is not a name: strip what follows a known file extension.
    name = re.sub(r"\.(py|md|json|toml)$", "", name)
    names.add(name)
  return names


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_sngd_jax_name_resolves(path):
  missing = sorted(n for n in _names(path)
                   if not any(n == p or n.startswith(p + ".") for p in PENDING)
                   and not _resolves(n))
  assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {missing}"


@pytest.mark.parametrize("path", DOCS + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_file_exists(path):
  cited = {m.group(1).rstrip(".,:;)`") for m in PATH.finditer(path.read_text())}
  outputs = ("benchmarks/out",)  # written by the benchmarks, git-ignored
  # an output prefix (`--out benchmarks/results/NAME` writes NAME.json and NAME.md) counts
  # when the files it names exist
  prefix_of_files = lambda c: any((ROOT / c).parent.glob((ROOT / c).name + ".*"))
  missing = sorted(c for c in cited if not (ROOT / c).exists() and not prefix_of_files(c)
                   and not c.startswith(outputs) and not any(ch in c for ch in "*<{"))
  assert not missing, f"{path.relative_to(ROOT)} cites missing files: {missing}"


SPHINX = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc):`|^\s*\.\. \w+::|\S::\s*$", re.M)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstrings_are_markdown(path):
  """mkdocstrings renders docstrings as Markdown: Sphinx roles and directives show verbatim.

  Write ``name`` (a code span) instead of :func:`name`, and a fenced block after ``text:``
  instead of ``text::`` and an indented literal block or ``.. math::``.
  """
  bad = [f"line {path.read_text()[:m.start()].count(chr(10)) + 1}: {m.group(0).strip()}"
         for m in SPHINX.finditer(path.read_text())]
  assert not bad, f"{path.relative_to(ROOT)} has Sphinx markup: {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docstring_code_fences_are_closed(path):
  """An unclosed fence turns the rest of a docstring (its Args table) into raw text."""
  tree = ast.parse(path.read_text())
  nodes = [n for n in ast.walk(tree)
           if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  open_fence = [getattr(n, "name", "<module>") for n in nodes
                if (ast.get_docstring(n) or "").count("```") % 2]
  assert not open_fence, f"{path.relative_to(ROOT)}: unclosed ``` in the docstring of {open_fence}"


API = sorted((ROOT / "docs" / "api").glob("*.md"))
PUBLIC = ("sngd_jax", "sngd_jax.inverse", "sngd_jax.presets")


def _api_entries() -> set[str]:
  return {m.group(1) for p in API for m in re.finditer(r"^::: (\S+)", p.read_text(), re.M)}


def test_every_public_name_is_in_the_api_reference():
  """Every name in a public ``__all__`` has its ``::: name`` entry in docs/api (a public
  subpackage, its own entry or those of its names)."""
  entries = _api_entries()
  missing = []
  for module in PUBLIC:
    for name in importlib.import_module(module).__all__:
      full = f"{module}.{name}"
      if full in PUBLIC:
        continue
      if full not in entries:
        missing.append(full)
  assert not missing, f"public names missing from docs/api: {missing}"


def test_every_api_entry_is_public():
  entries = _api_entries()
  bad = []
  for entry in sorted(entries - set(PUBLIC)):
    module, _, name = entry.rpartition(".")
    if module not in PUBLIC or name not in importlib.import_module(module).__all__:
      bad.append(entry)
  assert not bad, f"docs/api entries that are not public names: {bad}"


def _attribute_docstrings() -> dict[str, bool]:
  """Module-level assignments under sngd_jax/_src: name -> followed by a string (the
  attribute docstring mkdocstrings shows)."""
  out = {}
  for path in SOURCES:
    body = ast.parse(path.read_text()).body
    for node, nxt in zip(body, body[1:] + [None], strict=True):
      targets = node.targets if isinstance(node, ast.Assign) else (
          [node.target] if isinstance(node, ast.AnnAssign) else [])
      documented = (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str))
      for t in targets:
        if isinstance(t, ast.Name):
          out[t.id] = out.get(t.id, False) or documented
  return out


def test_every_public_name_has_a_docstring():
  """Functions and classes, their public methods and properties, and constants (an
  attribute docstring after the assignment)."""
  attribute_docs = _attribute_docstrings()
  missing = []
  for module in PUBLIC:
    for name in importlib.import_module(module).__all__:
      obj = getattr(importlib.import_module(module), name)
      full = f"{module}.{name}"
      if inspect.ismodule(obj):
        continue
      if callable(obj) and not isinstance(obj, type(dict[str, int])):
        if not obj.__doc__:
          missing.append(full)
        for attr, value in vars(obj).items() if inspect.isclass(obj) else ():
          f = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
          if not attr.startswith("_") and callable(f) and not f.__doc__:
            missing.append(f"{full}.{attr}")
      elif not attribute_docs.get(name):
        missing.append(full)
  assert not missing, f"public names without a docstring: {missing}"


def test_sngd_options_default_to_DEFAULTS_everywhere():
  """README: every default of ``sngd``'s options is defined once, in ``sngd_jax.DEFAULTS``.
  Public functions that take one of those options (the presets, ``coverage``,
  ``to_reconstructed``, ...) must default to the same value (or None: the state's)."""
  import dataclasses

  import sngd_jax
  defaults = {f.name: getattr(sngd_jax.DEFAULTS, f.name)
              for f in dataclasses.fields(sngd_jax.DEFAULTS)}
  differ = []
  for module in PUBLIC:
    for name in importlib.import_module(module).__all__:
      obj = getattr(importlib.import_module(module), name)
      if not inspect.isfunction(obj):
        continue
      for p in inspect.signature(obj).parameters.values():
        # None: read from the state's configuration (damped_factors, trust_region_scale)
        if p.name in defaults and p.default not in (inspect.Parameter.empty, None) \
            and p.default != defaults[p.name]:
          differ.append(f"{module}.{name}({p.name}={p.default!r}), DEFAULTS: "
                        f"{defaults[p.name]!r}")
  assert not differ, differ
