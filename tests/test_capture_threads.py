"""Capture on one thread leaves other threads' models alone (``capture/swap.py``).

NNX layer classes and Flax's private ``_normalize`` are swapped while capturing. Before, the
swap was a process-wide ``setattr``: another thread running a model meanwhile ran the
capture's recording wrappers (its layers reported by the capture as ones it could not name,
its ``xhat`` recorded into the capturing thread's norm slot: a linen LayerNorm's statistics
were the other thread's batch), and two captures on two threads ending out of order left one
capture's wrappers installed for good. The overlaps are forced with events (a capturing
thread paused inside its norm layer's ``_compute_stats``), the statistics compared with the
Gram of the rows from a float64 numpy forward pass.
"""

import concurrent.futures
import threading
import warnings

import flax.linen as nn
import flax.linen.normalization as linen_norm
import flax.nnx.nn.normalization as nnx_norm
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx

import sngd_jax

F64 = jnp.float64
EPS = 1e-6  # the LayerNorm epsilon of linen and NNX
WAIT = 60.0  # seconds an event may take before the test fails (a deadlock, not a slow host)

pytestmark = pytest.mark.usefixtures("x64")


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 4, rngs=rngs, param_dtype=F64)
    self.ln = nnx.LayerNorm(4, rngs=rngs, param_dtype=F64)
    self.l2 = nnx.Linear(4, 2, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l2(self.ln(self.l1(x)))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(param_dtype=F64)(nn.Dense(4, param_dtype=F64)(x))
    return nn.Dense(2, param_dtype=F64)(h)


def _np_rows(w1, b1, scale, bias, x):
  """The rows each layer of ``Linear -> LayerNorm -> Linear`` sees, in float64 numpy:
  ``{'l1': x, 'ln': xhat, 'l2': the LayerNorm's output}``."""
  x = np.asarray(x, np.float64)
  h = x @ np.asarray(w1, np.float64) + np.asarray(b1, np.float64)
  xhat = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + EPS)
  return {"l1": x, "ln": xhat, "l2": xhat * np.asarray(scale) + np.asarray(bias)}


class _Framework:
  """One framework's model, capture and patched module (NNX or linen)."""

  def __init__(self, name):
    self.name = name
    self.norm_module = nnx_norm if name == "nnx" else linen_norm
    self.paths = ({"l1": "l1", "ln": "ln", "l2": "l2"} if name == "nnx" else
                  {"l1": "Dense_0", "ln": "LayerNorm_0", "l2": "Dense_1"})

  def model(self, seed, x):
    """``(model, forward, rows)``: ``forward(model, x)``, and ``rows(x)`` per layer."""
    if self.name == "nnx":
      m = NnxNet(nnx.Rngs(seed))
      v = lambda p: np.asarray(p[...])
      rows = lambda x: _np_rows(v(m.l1.kernel), v(m.l1.bias), v(m.ln.scale), v(m.ln.bias), x)
      return m, lambda m, x: m(x), rows
    module = LinenNet()
    p = module.init(jax.random.key(seed), x)["params"]
    rows = lambda x: _np_rows(p["Dense_0"]["kernel"], p["Dense_0"]["bias"],
                              p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"], x)
    return p, lambda p, x: module.apply({"params": p}, x), rows

  def capture(self, forward, model, x, inside=lambda: None):
    """The activations of ``sum(forward(model, x)**2)`` through the public capture (with
    ``jax.value_and_grad``), ``inside()`` called in the loss before the forward pass."""
    def loss(m, x):
      inside()
      return jnp.sum(forward(m, x) ** 2)
    if self.name == "nnx":
      return nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model, x)[0][1]
    return jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(model, x)[0][1]

  def originals(self):
    """What capture swaps: the module's ``_normalize`` and the NNX classes' ``__call__``."""
    out = {"_normalize": self.norm_module._normalize}
    for cls in (nnx.Linear, nnx.LayerNorm):
      out[cls.__name__] = cls.__dict__["__call__"]
    return out

  def assert_stats(self, acts, rows):
    """One call per layer, its rows' Gram ``(1/n) sum x~ x~^T`` that of ``rows``."""
    assert set(acts) == set(self.paths.values())
    for layer, path in self.paths.items():
      assert len(acts[path]) == 1, path
      got = np.asarray(acts[path][0].inputs, np.float64).reshape(-1, rows[layer].shape[-1])
      bias = layer != "ln"
      np.testing.assert_allclose(ref.gram(got, bias), ref.gram(rows[layer], bias),
                                 rtol=1e-12, atol=1e-14, err_msg=f"{self.name} {path}")


def _run_threads(*targets):
  """Runs each target on its own thread (float64 enabled there: JAX's config context is per
  thread), joins them, and re-raises the first exception one of them raised."""
  errors = []

  def run(target):
    try:
      with jax.enable_x64(True):
        target()
    except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
      errors.append(e)

  threads = [threading.Thread(target=run, args=(t,)) for t in targets]
  for t in threads:
    t.start()
  for t in threads:
    t.join(2 * WAIT)
  assert not any(t.is_alive() for t in threads), "a thread hangs"
  if errors:
    raise errors[0]


def _wait(event, what):
  assert event.wait(WAIT), f"timed out waiting for {what}"


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_a_plain_forward_on_another_thread_is_neither_recorded_nor_changed(
    framework, monkeypatch):
  """Thread A captures a ``Linear -> LayerNorm -> Linear`` and pauses inside its LayerNorm
  (after the norm slot is opened, before ``_normalize``) until thread B has run its own plain
  model forward; B then runs it 20 more times while A finishes. B's outputs are bitwise those
  computed alone; A's activations hold one call per layer whose Gram is the float64
  reference's; no warning; the swapped attributes are the originals after.

  Before (process-wide swap): NNX, A warned that it could not name B's two Linear and its
  LayerNorm; linen, B's ``xhat`` went into A's norm slot first, and A recorded it as its own
  LayerNorm's rows (its Gram B's batch's)."""
  fw = _Framework(framework)
  x_a = jax.random.normal(jax.random.key(1), (6, 3), F64)
  x_b = 3.0 + jax.random.normal(jax.random.key(2), (5, 3), F64)
  model_a, forward, rows_a = fw.model(0, x_a)
  model_b, _, _ = fw.model(7, x_b)
  want_b = np.asarray(forward(model_b, x_b))
  originals = fw.originals()

  a_in_norm, b_done = threading.Event(), threading.Event()
  thread_a = []
  compute_stats = fw.norm_module._compute_stats

  def pausing_stats(*args, **kwargs):
    if threading.current_thread() in thread_a and not a_in_norm.is_set():
      a_in_norm.set()
      _wait(b_done, "thread B's first forward")
    return compute_stats(*args, **kwargs)

  monkeypatch.setattr(fw.norm_module, "_compute_stats", pausing_stats)
  acts, outs_b = {}, []

  def run_a():
    thread_a.append(threading.current_thread())
    acts.update(fw.capture(forward, model_a, x_a))

  def run_b():
    _wait(a_in_norm, "thread A inside its LayerNorm")
    outs_b.append(np.asarray(forward(model_b, x_b)))
    b_done.set()
    for _ in range(20):
      outs_b.append(np.asarray(forward(model_b, x_b)))

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _run_threads(run_a, run_b)
  assert not [str(w.message) for w in caught if "sngd" in str(w.message)]
  assert len(outs_b) == 21
  for out in outs_b:
    np.testing.assert_array_equal(out, want_b)
  fw.assert_stats(acts, rows_a(x_a))
  assert fw.originals() == originals


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_two_captures_on_two_threads_ending_out_of_order_restore_the_originals(framework):
  """Thread A's capture starts, thread C's starts while A's runs, A's ends first, then C's.
  Each one's activations are its own model's (float64 Gram references), and the swapped
  attributes are the originals after. Before, C restored what it found when it started, A's
  wrapper: ``_normalize`` (and NNX's ``Linear.__call__``) stayed A's recording wrapper."""
  fw = _Framework(framework)
  x_a = jax.random.normal(jax.random.key(1), (6, 3), F64)
  x_c = 2.0 + jax.random.normal(jax.random.key(3), (4, 3), F64)
  model_a, forward, rows_a = fw.model(0, x_a)
  model_c, _, rows_c = fw.model(5, x_c)
  originals = fw.originals()
  a_started, c_started, a_ended = threading.Event(), threading.Event(), threading.Event()
  acts_a, acts_c = {}, {}

  def run_a():
    def inside():
      a_started.set()
      _wait(c_started, "thread C's capture")
    acts_a.update(fw.capture(forward, model_a, x_a, inside))
    a_ended.set()

  def run_c():
    _wait(a_started, "thread A's capture")
    def inside():
      c_started.set()
      _wait(a_ended, "thread A's capture to end")
    acts_c.update(fw.capture(forward, model_c, x_c, inside))

  _run_threads(run_a, run_c)
  assert fw.originals() == originals
  fw.assert_stats(acts_a, rows_a(x_a))
  fw.assert_stats(acts_c, rows_c(x_c))


class _MidCapture(Exception):
  pass


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_an_exception_mid_capture_leaves_nothing_behind_on_a_reused_thread(framework):
  """On one worker thread of a ``ThreadPoolExecutor`` (reused for every task): a capture whose
  loss raises inside a ``jax.lax.scan`` body (its transform frame, the norm slot and the swaps
  open) after the model ran, then a plain forward pass, a plain ``jax.lax.scan`` and a new
  capture. The exception reaches the caller; after it this thread runs no capture
  (``records.running()`` empty, no hook on the swap stacks), the swapped attributes and
  ``jax.lax.scan`` are the originals, the plain forward pass is bitwise the one before, and
  the new capture's activations are one call per layer with the float64 Gram."""
  from sngd_jax._src.capture import records, swap  # noqa: PLC0415 - the private state

  fw = _Framework(framework)
  x = jax.random.normal(jax.random.key(1), (6, 3), F64)
  model, forward, rows = fw.model(0, x)
  originals, scan = fw.originals(), jax.lax.scan
  want = np.asarray(forward(model, x))

  def raising():
    def body(c, _):
      jnp.sum(forward(model, x))
      raise _MidCapture
    jax.lax.scan(body, 0.0, None, length=2)

  def leftovers():
    stacks = getattr(swap._HOOKS, "stacks", {})
    return (list(records.running()), {k: v for k, v in stacks.items() if v},
            fw.originals() == originals, jax.lax.scan is scan)

  def task(fn):
    with jax.enable_x64(True):
      return fn()

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    with pytest.raises(_MidCapture):
      pool.submit(task, lambda: fw.capture(forward, model, x, raising)).result(WAIT)
    assert pool.submit(task, leftovers).result(WAIT) == ([], {}, True, True)
    plain = pool.submit(task, lambda: np.asarray(forward(model, x))).result(WAIT)
    np.testing.assert_array_equal(plain, want)
    carry = pool.submit(task, lambda: jax.lax.scan(
        lambda c, _: (c + 1.0, c), 0.0, None, length=3)[1]).result(WAIT)
    np.testing.assert_array_equal(np.asarray(carry), [0.0, 1.0, 2.0])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      acts = pool.submit(task, lambda: fw.capture(forward, model, x)).result(WAIT)
    assert pool.submit(task, leftovers).result(WAIT) == ([], {}, True, True)
  assert not [str(w.message) for w in caught if "sngd" in str(w.message)]
  fw.assert_stats(acts, rows(x))


def test_two_captures_on_two_threads_through_one_sharded_nnx_jit():
  """Threads A and C capture models of their own whose first layer runs through one shared
  ``nnx.jit`` given ``in_shardings`` (which runs as a jit: capture swaps its function for one
  naming the layers it runs, whose records it drops, warning): A's trace of it is paused while
  C traces it (another batch size), A's capture ends, then C's. Each capture records its own
  LayerNorm and output layer, run after the jit (float64 Gram references), warns that it could
  not capture its ``l1``, and the jit's function is NNX's own after. Before, the swap was an
  assignment to the jit's function seen by every thread: C's trace opened its frame in A's
  recorder, which A's jit then closed in place of its own, so A's ``ln`` and ``l2`` records went
  into A's closed frame and were lost; and C restored A's wrapper, installed for good."""
  fw = _Framework("nnx")
  x_a = jax.random.normal(jax.random.key(1), (6, 3), F64)
  x_c = 2.0 + jax.random.normal(jax.random.key(3), (4, 3), F64)
  (model_a, _, rows_a), (model_c, _, rows_c) = fw.model(0, x_a), fw.model(5, x_c)
  a_in, c_in, a_ended = threading.Event(), threading.Event(), threading.Event()
  thread_a = []

  def inside():
    if threading.current_thread() in thread_a:
      a_in.set()
      _wait(c_in, "thread C inside the jit")
    else:
      c_in.set()
      _wait(a_ended, "thread A's capture to end")

  jitted = nnx.jit(lambda layer, h: (inside(), layer(h))[1], in_shardings=(None, None))
  function = jitted.jitted_fn.__wrapped__.f
  forward = lambda m, x: m.l2(m.ln(jitted(m.l1, x)))
  acts_a, acts_c = {}, {}

  def run_a():
    thread_a.append(threading.current_thread())
    acts_a.update(fw.capture(forward, model_a, x_a))
    a_ended.set()

  def run_c():
    _wait(a_in, "thread A inside the jit")
    acts_c.update(fw.capture(forward, model_c, x_c))

  with warnings.catch_warnings(record=True) as caught:  # process-wide: both threads'
    warnings.simplefilter("always")
    _run_threads(run_a, run_c)
  assert jitted.jitted_fn.__wrapped__.f is function
  caught = [str(w.message) for w in caught if "sngd" in str(w.message)]
  assert len(caught) == 2 and all("'l1'" in w for w in caught), caught
  for name, acts, rows in (("a", acts_a, rows_a(x_a)), ("c", acts_c, rows_c(x_c))):
    assert set(acts) == {"ln", "l2"}, (name, set(acts))
    for layer in ("ln", "l2"):
      assert len(acts[layer]) == 1, (name, layer)
      got = np.asarray(acts[layer][0].inputs, np.float64).reshape(-1, 4)
      bias = layer != "ln"
      np.testing.assert_allclose(ref.gram(got, bias), ref.gram(rows[layer], bias),
                                 rtol=1e-12, atol=1e-14, err_msg=f"{name} {layer}")
