"""The ```python blocks of README.md and docs/*.md run.

The blocks of one page run in order in one namespace, so a block may use what an earlier block
of its page defined. What a reader already has (a model, a batch, a loss) is written in the
markdown, in HTML comments that the rendered page hides, each right next to its block:

    <!-- snippet: prelude
    model = ...            (runs right before the block that follows the comment)
    -->
    <!-- snippet: check
    assert ...             (runs right after the block that precedes the comment)
    -->
    <!-- snippet: skip (why it cannot run in a test) -->

A skipped block is not run; the marker must say why. Every marker must belong to a block.
Tracebacks name the markdown file and its line. Process-wide settings a block changes (JAX's
config, the BLAS thread limit of ``sngd_jax.limit_lapack_threads``) are restored after it.
"""

import contextlib
import dataclasses
import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"<!--\s*snippet:(.*?)-->", re.S)
KIND = re.compile(r"\s*(prelude|check)\s*\n|\s*skip\s*\((.*)\)\s*$", re.S)


@dataclasses.dataclass
class Code:
  source: str
  line: int  # of the code's first line in the markdown file (1-based)


@dataclasses.dataclass
class Block:
  page: str
  index: int
  code: Code
  prelude: Code | None = None
  check: Code | None = None
  skip: str | None = None


def _line(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def parse(text: str, page: str) -> list[Block]:
  """The page's ```python blocks with their markers; raises on a marker that fits no block."""
  fences = list(FENCE.finditer(text))
  if len(fences) != text.count("```python"):
    raise ValueError(f"{page}: a ```python fence is not closed at the start of a line")
  blocks = [Block(page, i, Code(m.group(1), _line(text, m.start(1))))
            for i, m in enumerate(fences)]
  for m in MARKER.finditer(text):
    kind = KIND.match(m.group(1))
    where = f"{page}:{_line(text, m.start())}"
    if not kind:
      raise ValueError(f"{where}: unknown snippet marker {m.group(0)[:60]!r}; write "
                       "`prelude` or `check` and the code on the next lines, or `skip (reason)`")
    if kind.group(1) == "check":
      owner = [b for b, f in zip(blocks, fences, strict=True)
               if f.end() <= m.start() and not text[f.end():m.start()].strip()]
    else:
      owner = [b for b, f in zip(blocks, fences, strict=True)
               if m.end() <= f.start() and not text[m.end():f.start()].strip()]
    if not owner:
      raise ValueError(f"{where}: snippet marker not next to a ```python block")
    block = owner[0]
    if kind.group(1) is None:
      if not kind.group(2).strip():
        raise ValueError(f"{where}: `snippet: skip` must give its reason in parentheses")
      block.skip = kind.group(2).strip()
    else:
      code = Code(m.group(1)[kind.end(1):], _line(text, m.start(1) + kind.end(1)))
      setattr(block, kind.group(1), code)
  return blocks


def _blocks() -> list[Block]:
  return [b for p in PAGES for b in parse(p.read_text(), str(p.relative_to(ROOT)))]


BLOCKS = _blocks()


@contextlib.contextmanager
def _process_state_restored():
  """Undoes process-wide changes: JAX's config and the BLAS libraries' thread limits."""
  config = dict(jax.config.values)
  try:
    import scipy.linalg.cython_lapack  # noqa: F401  (the LAPACK limit_lapack_threads caps)
    import threadpoolctl
    pools = [(c, c.num_threads) for c in threadpoolctl.ThreadpoolController().lib_controllers]
  except ImportError:
    pools = []
  try:
    yield
  finally:
    for name, value in config.items():
      if jax.config.values.get(name) != value:
        jax.config.update(name, value)
    for pool, num_threads in pools:
      if pool.num_threads != num_threads:
        pool.set_num_threads(num_threads)


def _exec(code: Code | None, path: str, namespace: dict) -> None:
  if code is not None:
    # padded so that tracebacks give the line in the markdown file
    exec(compile("\n" * (code.line - 1) + code.source, path, "exec"), namespace)


def run_block(block: Block, namespace: dict) -> None:
  with _process_state_restored():
    _exec(block.prelude, block.page, namespace)
    _exec(block.code, block.page, namespace)
    _exec(block.check, block.page, namespace)


class _Page:
  """One page's namespace, the blocks run in it so far and the first that failed."""

  def __init__(self):
    self.namespace: dict = {"__name__": "__doc_snippet__"}
    self.done = 0
    self.failed: int | None = None


_pages: dict[str, _Page] = {}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}#{b.index}" for b in BLOCKS])
def test_snippet_runs(block):
  page = _pages.get(block.page)
  if page is None or page.done > block.index:  # a rerun of the page starts afresh
    page = _pages[block.page] = _Page()
  blocks = [b for b in BLOCKS if b.page == block.page]
  while page.done <= block.index:
    b = blocks[page.done]
    page.done += 1
    if page.failed is not None or b.skip:
      continue
    try:
      run_block(b, page.namespace)
    except Exception:
      page.failed = b.index
      if b is block:
        raise
  if block.skip:
    pytest.skip(block.skip)
  if page.failed is not None:
    pytest.fail(f"needs block {page.failed} of {block.page}, which failed", pytrace=False)


def test_every_block_is_found_and_every_skip_says_why():
  assert len(BLOCKS) >= 20, [b.page for b in BLOCKS]  # the fence pattern still matches
  for b in BLOCKS:
    assert b.code.source.strip(), f"{b.page}#{b.index} is empty"
    assert b.skip is None or len(b.skip) > 3, f"{b.page}#{b.index}: skipped without a reason"


PAGE = '''# A page

<!-- snippet: prelude
a = 1
-->
```python
b = a + 1
```
<!-- snippet: check
assert b == 2
-->

```python
c = b + undefined_name
```

<!-- snippet: skip (needs 8 devices) -->
```python
d = 1 / 0
```
'''


def test_a_broken_block_fails():
  blocks = parse(PAGE, "page.md")
  assert [(b.skip, b.prelude is not None, b.check is not None) for b in blocks] == [
      (None, True, True), (None, False, False), ("needs 8 devices", False, False)]
  namespace = {}
  run_block(blocks[0], namespace)
  with pytest.raises(NameError, match="undefined_name") as err:
    run_block(blocks[1], namespace)
  assert err.traceback[-1].path == "page.md" and err.traceback[-1].lineno + 1 == 14
  broken_check = PAGE.replace("assert b == 2", "assert b == 3")
  with pytest.raises(AssertionError):
    run_block(parse(broken_check, "page.md")[0], {})


@pytest.mark.parametrize("marker", [
    "<!-- snippet: skip -->\n```python\nx = 1\n```\n",          # no reason
    "<!-- snippet: skip () -->\n```python\nx = 1\n```\n",       # an empty one
    "<!-- snippet: prelude\nx = 1\n-->\n\ntext\n```python\nx\n```\n",  # not next to a block
    "<!-- snippet: setup\nx = 1\n-->\n```python\nx\n```\n",    # unknown kind
])
def test_a_bad_marker_is_an_error(marker):
  with pytest.raises(ValueError, match="snippet"):
    parse(marker, "page.md")
