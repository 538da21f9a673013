"""Layers inside ``jax.lax.cond``/``switch``, ``nn.cond``/``nn.switch``, ``nnx.cond``/
``nnx.switch`` and ``hk.cond``/``hk.switch``: the layers of the branch taken get the step's
rows, those of the branches not taken none (their factors kept as they are), checked against
a float64 moving average over exactly the steps each layer ran, from an independent numpy
forward pass, over steps whose branch changes; a branch per example under ``jax.vmap`` is a
row mask; a conditional inside a scan over depth is reported."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

B, D, OUT = 8, 3, 2
DECAY = 0.5
KW = dict(decay=DECAY, prior="none", damping=ref.DAMPING, inverse_every=1, factor_every=1,
          max_norm=None)
STEPS = {2: [0, 1, 1, 0, 1, 0], 3: [2, 0, 1, 1, 2, 0]}


def _x(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, D), jnp.float64)


# --- the models: branch k is `s(tanh(ls_k(x)))` (`s` shared by every branch), then `head` ---

class LinenModel(nn.Module):
  kind: str  # "lax.cond" (jax.lax.cond inside a compact module), "nn.cond", "nn.switch"
  n: int

  def setup(self):
    self.ls = [nn.Dense(D, param_dtype=jnp.float64) for _ in range(self.n)]
    self.s = nn.Dense(D, param_dtype=jnp.float64)
    self.head = nn.Dense(OUT, param_dtype=jnp.float64)

  def __call__(self, x, i):
    fns = [lambda m, h, k=k: m.s(jnp.tanh(m.ls[k](h))) for k in range(self.n)]
    if self.is_initializing():
      for f in fns:
        f(self, x)
      return self.head(x)
    if self.kind == "lax.cond":
      h = jax.lax.cond(i == 0, lambda h: fns[0](self, h), lambda h: fns[1](self, h), x)
    elif self.kind == "nn.cond":
      h = nn.cond(i == 0, fns[0], fns[1], self, x)
    else:
      h = nn.switch(i, fns, self, x)
    return self.head(h)


class NNXModel(nnx.Module):
  def __init__(self, n, rngs):
    self.ls = nnx.List([nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
                        for _ in range(n)])
    self.s = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
    self.head = nnx.Linear(D, OUT, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x, i):
    fns = [lambda m, h, k=k: m.s(jnp.tanh(m.ls[k](h))) for k in range(len(self.ls))]
    if len(fns) == 2:
      return self.head(nnx.cond(i == 0, fns[0], fns[1], self, x))
    return self.head(nnx.switch(i, fns, self, x))


def _haiku_fn(n):
  hk = pytest.importorskip("haiku")  # the hk.cond/hk.switch cases only

  def f(x, i):
    ls = [hk.Linear(D, name=f"ls_{k}") for k in range(n)]
    s, head = hk.Linear(D, name="s"), hk.Linear(OUT, name="head")
    fns = [lambda h, k=k: s(jnp.tanh(ls[k](h))) for k in range(n)]
    if hk.running_init():
      for g in fns:
        g(x)
      return head(x)
    h = hk.cond(i == 0, fns[0], fns[1], x) if n == 2 else hk.switch(i, fns, x)
    return head(h)
  return hk.transform(f)


def _loss_of(out):
  return jnp.sum(jnp.sin(out))


class Case:
  """A model of one framework: its params, a function giving ``(grads, activations)`` at
  ``(params, i)``, its layers' sngd paths and their ``(kernel, bias)`` in numpy."""

  def __init__(self, kind, n):
    self.kind, self.n = kind, n
    x = _x()
    names = [f"ls_{k}" for k in range(n)] + ["s", "head"]
    self.paths = dict(zip(names, names, strict=True))
    if kind in ("lax.cond", "nn.cond", "nn.switch"):
      model = LinenModel(kind, n)
      self.params = model.init(jax.random.key(1), x, 0)["params"]
      loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)))
      self.grads_acts = jax.grad(loss, has_aux=True)
      self.layer = lambda p, name: (p[name]["kernel"], p[name]["bias"])
    elif kind in ("nnx.cond", "nnx.switch"):
      graphdef, self.params = nnx.split(NNXModel(n, nnx.Rngs(1)), nnx.Param)
      loss = sngd_jax.capture_nnx(lambda m, i: _loss_of(m(x, i)))

      self.grads_acts = lambda p, i: nnx.grad(loss, has_aux=True)(nnx.merge(graphdef, p), i)
      self.paths = {**self.paths, **{f"ls_{k}": f"ls/{k}" for k in range(n)}}
      self.layer = lambda p, name: _nnx_layer(p, name)
    else:  # hk.cond, hk.switch
      t = _haiku_fn(n)
      self.params = t.init(jax.random.key(1), x, 0)
      self.params = ref.f64(self.params)
      loss = sngd_jax.capture_hk(lambda p, i: _loss_of(t.apply(p, None, x, i)))
      self.grads_acts = jax.grad(loss, has_aux=True)
      self.layer = lambda p, name: (p[name]["w"], p[name]["b"])
    self.x = np.asarray(x)

  def rows(self, params, i):
    """Per layer name, the rows it saw at ``(params, i)``: a numpy forward pass."""
    k = int(np.clip(i, 0, self.n - 1)) if self.n > 2 else int(i != 0)
    w, b = map(ref.np64, self.layer(params, f"ls_{k}"))
    h = np.tanh(self.x @ w + b)
    ws, bs = map(ref.np64, self.layer(params, "s"))
    return {f"ls_{k}": self.x, "s": h, "head": h @ ws + bs}


def _nnx_layer(p, name):
  d = nnx.to_pure_dict(p)
  node = d["ls"][int(name.split("_")[1])] if name.startswith("ls_") else d[name]
  return node["kernel"], node["bias"]


CASES = [("lax.cond", 2), ("nn.cond", 2), ("nn.switch", 3), ("nnx.cond", 2),
         ("nnx.switch", 3), ("hk.cond", 2), ("hk.switch", 3)]


@pytest.mark.parametrize("kind,n", CASES, ids=[k for k, _ in CASES])
def test_branch_layers_get_the_rows_of_the_steps_their_branch_ran(kind, n):
  """Steps whose branch changes (``i`` traced in one jitted step): every layer's factor is the
  float64 moving average (decay 0.5, no prior) of ``E[x~ x~^T]`` over exactly the steps its
  branch ran (the shared ``s`` and the ``head`` every step), from a numpy forward pass; a layer
  of a branch not taken keeps its factor and weight bit for bit (not pulled towards zero
  or the identity) and gets a zero update; every other update is the float64 damped solve of
  its gradient with the reference factor. Until 2026-12-06 the branch layers were reported
  as not captured (a warning) and ``update`` raised naming them."""
  case = Case(kind, n)
  tx = sngd_jax.sngd(**KW)
  params = case.params
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    grads, acts = case.grads_acts(params, i)
    updates, state = tx.update(grads, state, params, activations=acts)
    return grads, updates, state

  want = {name: (np.zeros((D + 1, D + 1)), 0.0) for name in case.paths}
  for i in STEPS[n]:
    rows = case.rows(params, i)
    grads, updates, new = step(params, state, jnp.asarray(i))
    for name, path in case.paths.items():
      g_ref, w_ref = want[name]
      if name in rows:
        g_ref = DECAY * g_ref + (1 - DECAY) * ref.gram(rows[name])
        w_ref = DECAY * w_ref + (1 - DECAY)
        want[name] = g_ref, w_ref
        np.testing.assert_allclose(ref.normalized_factor(new, path), g_ref / w_ref,
                                   rtol=1e-10, atol=1e-12, err_msg=f"{path} step {i}")
        g = case.layer(grads, name)
        u = case.layer(updates, name)
        pre = ref.damped_solve(g_ref / w_ref, ref.augmented(g[0], g[1], g[0].shape[0]))
        kernel, bias = pre[:-1], pre[-1]
        np.testing.assert_allclose(u[0], kernel, rtol=1e-8, atol=1e-12, err_msg=path)
        np.testing.assert_allclose(u[1], bias, rtol=1e-8, atol=1e-12, err_msg=path)
      else:  # its branch not taken: factor and weight as they were, no update
        np.testing.assert_array_equal(np.asarray(new.factors[path]),
                                      np.asarray(state.factors[path]), err_msg=path)
        np.testing.assert_array_equal(np.asarray(new.weights[path]),
                                      np.asarray(state.weights[path]), err_msg=path)
        for leaf in case.layer(updates, name):
          np.testing.assert_array_equal(np.asarray(leaf), 0.0, err_msg=path)
    state = new
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)
  assert all(w > 0 for _, w in want.values())  # every branch ran at least once


def test_a_branch_per_example_under_vmap_is_a_row_mask():
  """``jax.vmap`` over examples with a per-example predicate (JAX runs both branches and
  selects per example): each example's rows count for the branch it took. One step
  (no decay): ``ls_k``'s factor is ``E[x~ x~^T]`` over the examples that took branch ``k``
  (and are real under a padding mask ``with_row_mask`` multiplies in), ``s`` and ``head``
  over every real example, each from its own branch (float64 numpy forward). A second step
  where no example takes branch 1 keeps ``ls_1``'s factor bit for bit."""
  model = LinenModel("lax.cond", 2)
  x = _x(3)
  params = model.init(jax.random.key(1), x, 0)["params"]
  per_example = lambda p, xb, ib: model.apply({"params": p}, xb, ib)
  loss = sngd_jax.capture(
      lambda p, x, idx: _loss_of(jax.vmap(per_example, in_axes=(None, 0, 0))(p, x, idx)))
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1)
  idx = jnp.array([0, 1, 1, 0, 1, 1, 0, 1])
  real = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  grads, acts = jax.grad(loss, has_aux=True)(params, x, idx)
  acts = sngd_jax.with_row_mask(acts, jnp.asarray(real))
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  p = jax.tree.map(ref.np64, params)
  xn = np.asarray(x)
  pre = np.where(np.asarray(idx)[:, None] == 0, xn @ p["ls_0"]["kernel"] + p["ls_0"]["bias"],
                 xn @ p["ls_1"]["kernel"] + p["ls_1"]["bias"])
  h = np.tanh(pre)
  ref.assert_factor(state, "ls_0", xn[(np.asarray(idx) == 0) & real])
  ref.assert_factor(state, "ls_1", xn[(np.asarray(idx) == 1) & real])
  ref.assert_factor(state, "s", h[real])
  ref.assert_factor(state, "head", (h @ p["s"]["kernel"] + p["s"]["bias"])[real])
  grads, acts = jax.grad(loss, has_aux=True)(params, x, jnp.zeros_like(idx))
  _, again = tx.update(grads, state, params, activations=acts)
  np.testing.assert_array_equal(np.asarray(again.factors["ls_1"]),
                                np.asarray(state.factors["ls_1"]))
  np.testing.assert_array_equal(np.asarray(again.weights["ls_1"]),
                                np.asarray(state.weights["ls_1"]))
  ref.assert_factor(again, "ls_0", xn)


class ScannedBlocks(nn.Module):
  """Two blocks under ``nn.scan`` over depth; each runs ``a`` then, where ``i == 0``,
  ``b`` (``shared=False``), or ``b`` in both branches (``shared=True``)."""

  shared: bool

  @nn.compact
  def __call__(self, h, i):
    a = nn.Dense(D, name="a", param_dtype=jnp.float64)
    b = nn.Dense(D, name="b", param_dtype=jnp.float64)
    h = jnp.tanh(a(h))
    if self.is_initializing():
      return jnp.tanh(b(h)), None
    other = (lambda h: -b(h)) if self.shared else (lambda h: h)
    return jnp.tanh(jax.lax.cond(i == 0, b, other, h)), None


def _scanned(shared):
  return nn.scan(ScannedBlocks, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=nn.broadcast, length=2)(shared)


def test_a_layer_of_a_stack_in_some_branches_is_reported_by_path():
  """A conditional inside ``nn.scan`` over depth whose branches do not all call layer ``b``:
  the predicate may differ between the layers of the stack, and a layer of the stack that
  took no branch calling ``b`` would get a zero estimate, so ``b`` is not modelled: capture
  warns naming its path and the rewrite, ``update`` raises naming it, and ``a`` (outside the
  conditional) is captured. Called alike in both branches, ``b`` is modelled: each layer of
  the stack gets its own rows (float64 numpy forward)."""
  x = _x(4)
  model = _scanned(False)
  params = model.init(jax.random.key(0), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: jnp.sum(model.apply({"params": p}, x, i)[0]))
  with pytest.warns(UserWarning) as caught:
    grads, acts = jax.grad(loss, has_aux=True)(params, jnp.asarray(0))
  messages = [str(w.message) for w in caught if str(w.message).startswith("sngd:")]
  assert len(messages) == 1, messages
  assert re.search(r"layer 'b' is a layer of a stack .* called in some branches of a "
                   r"`cond`/`switch` .* Call it in every branch alike .*`fisher=\{'b': None\}`",
                   messages[0]), messages[0]
  assert set(acts) == {"a"}
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="no activations were captured for layer 'b'"):
    tx.update(grads, tx.init(params), params, activations=acts)

  model = _scanned(True)
  params = model.init(jax.random.key(0), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: jnp.sum(model.apply({"params": p}, x, i)[0]))
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  for i, sign in ((0, 1.0), (1, -1.0)):
    grads, acts = jax.grad(loss, has_aux=True)(params, jnp.asarray(i))
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
    p = jax.tree.map(ref.np64, params)
    h = np.asarray(x)
    for layer in range(2):
      ha = np.tanh(h @ p["a"]["kernel"][layer] + p["a"]["bias"][layer])
      for name, rows in (("a", h), ("b", ha)):
        want = ref.gram(rows)
        got = np.asarray(state.factors[name][layer]) / np.asarray(state.weights[name])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"{name} {layer}")
      h = np.tanh(sign * (ha @ p["b"]["kernel"][layer] + p["b"]["bias"][layer]))


class Steps(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
    self.b = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, xs):
    def body(carry, tx):
      t, x = tx
      return carry, jax.lax.cond(t % 3 == 0, self.a, self.b, x)
    return jax.lax.scan(body, (), (jnp.arange(xs.shape[0]), xs))[1]


def test_a_branch_per_scan_step_pools_the_steps_that_took_it():
  """``jax.lax.cond`` inside a ``jax.lax.scan`` over time whose predicate is the step
  (``a`` on steps 0 and 3, ``b`` on 1, 2, 4): each layer's factor is ``E[x~ x~^T]`` over the
  rows of the steps that took its branch (float64, one step without decay)."""
  xs = jax.random.normal(jax.random.key(5), (5, B, D), jnp.float64)
  model = Steps(nnx.Rngs(0))
  loss = sngd_jax.capture_nnx(lambda m, xs: jnp.sum(jnp.sin(m(xs))))
  grads, acts = nnx.grad(loss, has_aux=True)(model, xs)
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  xs = np.asarray(xs)
  ref.assert_factor(state, "a", xs[[0, 3]].reshape(-1, D))
  ref.assert_factor(state, "b", xs[[1, 2, 4]].reshape(-1, D))


def test_stats_batch_size_takes_the_first_examples_of_the_branch_taken():
  """``stats_batch_size=4``: the branch layer's factor is ``E[x~ x~^T]`` over the first 4
  examples (its row mask, size 1 along the examples, is not cut), the layer of the branch
  not taken keeps its factor (float64)."""
  model = LinenModel("lax.cond", 2)
  x = _x(6)
  params = model.init(jax.random.key(1), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)))
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), stats_batch_size=4)
  state = tx.init(params)
  grads, acts = jax.grad(loss, has_aux=True)(params, jnp.asarray(1))
  _, new = tx.update(grads, state, params, activations=acts)
  ref.assert_factor(new, "ls_1", np.asarray(x)[:4])
  np.testing.assert_array_equal(np.asarray(new.factors["ls_0"]),
                                np.asarray(state.factors["ls_0"]))


class ConvBranches(nn.Module):
  direct: bool = False  # the reference: the branch-1 conv called without the conditional

  @nn.compact
  def __call__(self, x, i):
    convs = [nn.Conv(3, (3, 3), name=f"c{k}", param_dtype=jnp.float64) for k in range(2)]
    if self.is_initializing():
      return jnp.sum(convs[0](x)) + jnp.sum(convs[1](x))
    h = convs[1](x) if self.direct else jax.lax.cond(
        i == 0, lambda h: convs[0](h), lambda h: convs[1](h), x)
    return jnp.sum(jnp.sin(h))


def test_conv_rows_formed_in_chunks_of_examples_read_the_branch_mask(monkeypatch):
  """A conv in a branch, its patch rows formed in chunks of examples (``ROW_CHUNK_BYTES``
  made small): each chunk reads the row mask, size 1 along the examples, whole (cutting it
  per chunk failed until the mask was kept whole). The taken conv's factor is that of the
  same conv called without the conditional; the other conv keeps its factor."""
  from sngd_jax._src import statistics  # noqa: PLC0415
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", 12000)  # 4 chunks of 2 examples
  x = jax.random.normal(jax.random.key(7), (B, 6, 6, 2), jnp.float64)
  params = ConvBranches().init(jax.random.key(0), x, 0)["params"]
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), uncalled="skip")  # the reference calls no c0
  states = []
  for direct in (False, True):
    model = ConvBranches(direct)
    loss = sngd_jax.capture(lambda p, m=model: m.apply({"params": p}, x, 1))
    grads, acts = jax.grad(loss, has_aux=True)(params)
    if not direct:
      assert acts["c1"][0].row_mask is not None
    states.append((tx.init(params), tx.update(grads, tx.init(params), params,
                                              activations=acts)[1]))
  (before, branch), (_, direct) = states
  np.testing.assert_allclose(ref.normalized_factor(branch, "c1"),
                             ref.normalized_factor(direct, "c1"), rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(np.asarray(branch.factors["c0"]),
                                np.asarray(before.factors["c0"]))


class SwitchingCell(nn.RNNCellBase):
  """A cell that runs ``a`` on steps whose carry sums to more than 0 over the batch, else
  ``b`` (one branch per step: the predicate is a scalar)."""

  @nn.compact
  def __call__(self, carry, x):
    a = nn.Dense(D, name="a", param_dtype=jnp.float64)
    b = nn.Dense(D, name="b", param_dtype=jnp.float64)
    if self.is_initializing():
      h = a(x) + b(x)
    else:
      h = jax.lax.cond(jnp.sum(carry) > 0, a, b, x + carry)
    return jnp.tanh(h), h

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape[:-1] + (D,), jnp.float64)

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse_seq_lengths"])
def test_a_conditional_in_an_rnn_cell_pools_the_steps_that_took_it(reverse):
  """A ``cond`` inside an ``nn.RNNCellBase`` run by ``nn.RNN`` (its records leave the scan
  through the cell's output and time is merged into rows): each layer's factor is
  ``E[x~ x~^T]`` over the rows of the steps that took its branch (float64 numpy recurrence;
  reversed, each example's first ``seq_lengths[b]`` steps flipped first, as ``nn.RNN``
  flips them). The branch mask,
  one per step, is broadcast, flipped and merged with the inputs: until 2026-12-06 a
  ``(1, T, 1)`` mask met ``(T * B, D)`` inputs and ``update`` raised in ``broadcast_to``."""
  steps = 5
  xs = jax.random.normal(jax.random.key(8), (B, steps, D), jnp.float64)
  lengths = jnp.array([5, 3, 4, 5, 2, 5, 1, 4])
  rnn = nn.RNN(SwitchingCell(), reverse=reverse, keep_order=False)
  kw = dict(seq_lengths=lengths) if reverse else {}
  params = rnn.init(jax.random.key(1), xs, **kw)["params"]
  loss = sngd_jax.capture(lambda p: jnp.sum(jnp.sin(rnn.apply({"params": p}, xs, **kw))))
  grads, acts = jax.grad(loss, has_aux=True)(params)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  p = jax.tree.map(ref.np64, params)["cell"]
  xn = np.asarray(xs)
  if reverse:  # nn.RNN flips each example's first seq_lengths[b] steps (and the rest)
    order = (np.arange(steps)[::-1][None] + np.asarray(lengths)[:, None]) % steps
    xn = np.take_along_axis(xn, order[:, :, None], axis=1)
  rows, carry = {"a": [], "b": []}, np.zeros((B, D))
  for t in range(steps):
    z = xn[:, t] + carry
    name = "a" if carry.sum() > 0 else "b"
    rows[name].append(z)
    carry = np.tanh(z @ p[name]["kernel"] + p[name]["bias"])
  assert rows["a"] and rows["b"]  # both branches ran on some steps
  for name in "ab":
    ref.assert_factor(state, f"cell/{name}", np.concatenate(rows[name]))


class Uneven(nn.Module):
  """``a`` and ``b`` under conditionals of every shape the slots must line up: ``twice``, a
  branch calling ``a`` twice and the other once; ``nested``, a cond in a branch of a cond;
  ``switch``, an index JAX clamps into range; ``python``, a Python-bool predicate;
  ``legacy``, ``cond(pred, true_operand, true_fun, false_operand, false_fun)``; ``switch_kw``,
  the operand by keyword."""

  how: str

  @nn.compact
  def __call__(self, x, i):
    a = nn.Dense(D, name="a", param_dtype=jnp.float64)
    b = nn.Dense(D, name="b", param_dtype=jnp.float64)
    if self.is_initializing():
      return b(a(x))
    if self.how == "twice":
      return jax.lax.cond(i == 0, a, lambda h: a(jnp.tanh(a(h))), x)
    if self.how == "nested":
      return jax.lax.cond(i >= 1, lambda h: jax.lax.cond(i == 2, a, lambda z: -b(z), h),
                          lambda h: -a(2.0 * h), x)
    if self.how == "switch":
      return jax.lax.switch(i, [a, b], x)
    if self.how == "switch_kw":
      return jax.lax.switch(i, [lambda h: a(h), lambda h: b(h)], operand=x)
    if self.how == "legacy":  # JAX's deprecated order, which it still runs
      return jax.lax.cond(i == 0, x, a, 2.0 * x, b)
    return jax.lax.cond(bool(i), a, b, x)


def _uneven_rows(how, i, p, x):
  """The rows ``a`` and ``b`` see, from a numpy forward pass (None: not called)."""
  lin = lambda n, h: h @ p[n]["kernel"] + p[n]["bias"]
  if how == "twice":
    return {"a": x if i == 0 else np.concatenate([x, np.tanh(lin("a", x))]), "b": None}
  if how == "nested":
    return {"a": 2.0 * x if i == 0 else x if i == 2 else None, "b": x if i == 1 else None}
  if how in ("switch", "switch_kw"):
    return {"a": x, "b": None} if i <= 0 else {"a": None, "b": x}
  if how == "legacy":
    return {"a": x, "b": None} if i == 0 else {"a": None, "b": 2.0 * x}
  return {"a": x, "b": None} if i else {"a": None, "b": x}


UNEVEN = [("twice", 0), ("twice", 1), ("nested", 0), ("nested", 1), ("nested", 2),
          ("switch", -3), ("switch", 1), ("switch", 5), ("python", True), ("python", False),
          ("legacy", 0), ("legacy", 1), ("switch_kw", 1)]


@pytest.mark.parametrize("how,i", UNEVEN, ids=[f"{h}-{i}" for h, i in UNEVEN])
def test_uneven_and_nested_branches_get_the_rows_of_the_branch_taken(how, i):
  """Each layer's factor is ``E[x~ x~^T]`` over exactly the rows the branch taken fed it
  (float64 numpy forward), a layer the branch taken does not call keeps its factor bit for
  bit: a branch calling ``a`` twice against one calling it once (the second call's slot is
  masked in the other), a cond nested in a branch (the masks multiply), an out-of-range
  ``switch`` index (clamped as JAX clamps it, -3 -> 0, 5 -> 1), a Python-bool predicate, and
  ``cond`` in JAX's deprecated argument order (until 2026-12-06 capture called the true
  operand as the branch: ``TypeError: Dense.__call__() takes 2 positional arguments``), and
  ``switch(i, branches, operand=x)`` (left to JAX, its layers were reported as not captured
  by a warning that named jit and loops only)."""
  model = Uneven(how)
  x = _x(9)
  params = model.init(jax.random.key(1), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)))
  arg = i if how == "python" else jnp.asarray(i)
  grads, acts = jax.grad(loss, has_aux=True)(params, arg)
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), uncalled="skip")  # `twice` never calls b
  state = tx.init(params)
  _, new = tx.update(grads, state, params, activations=acts)
  rows = _uneven_rows(how, i, jax.tree.map(ref.np64, params), np.asarray(x))
  for name, r in rows.items():
    if r is None:
      np.testing.assert_array_equal(np.asarray(new.factors[name]),
                                    np.asarray(state.factors[name]), err_msg=name)
      np.testing.assert_array_equal(np.asarray(new.weights[name]),
                                    np.asarray(state.weights[name]), err_msg=name)
    else:
      ref.assert_factor(new, name, r)


@pytest.mark.parametrize("pattern", [[0, 1, 0], [0, 0, 0]], ids=["both", "one"])
def test_multisteps_counts_each_micro_batch_for_the_branch_it_took(pattern):
  """``sngd_jax.MultiSteps`` over 3 micro-batches whose branch is ``pattern``: on the
  emitting call ``ls_k``'s factor is ``E[x~ x~^T]`` over the rows of the micro-batches that
  took branch ``k`` (row-weighted: 8 rows each), and a layer no micro-batch ran keeps its
  factor and weight bit for bit (its accumulated rows stay 0: no NaN from an empty mean)."""
  from sngd_jax._src.state import only_sngd_state  # noqa: PLC0415

  model = LinenModel("lax.cond", 2)
  xs = jax.random.normal(jax.random.key(2), (3, B, D), jnp.float64)
  params = model.init(jax.random.key(1), xs[0], 0)["params"]
  loss = sngd_jax.capture(lambda p, x, i: _loss_of(model.apply({"params": p}, x, i)))
  tx = sngd_jax.MultiSteps(sngd_jax.sngd(**ref.one_step_kwargs()), every_k_schedule=3)

  @jax.jit
  def step(state, x, i):
    grads, acts = jax.grad(loss, has_aux=True)(params, x, i)
    return tx.update(grads, state, params, activations=acts)[1]

  state = before = tx.init(params)
  for m, i in enumerate(pattern):
    state = step(state, xs[m], jnp.asarray(i))
  new, old = only_sngd_state(state), only_sngd_state(before)
  xn = np.asarray(xs)
  for k in (0, 1):
    rows = [xn[m] for m, i in enumerate(pattern) if i == k]
    name = f"ls_{k}"
    if rows:
      ref.assert_factor(new, name, np.concatenate(rows))
    else:
      np.testing.assert_array_equal(np.asarray(new.factors[name]),
                                    np.asarray(old.factors[name]), err_msg=name)
      np.testing.assert_array_equal(np.asarray(new.weights[name]),
                                    np.asarray(old.weights[name]), err_msg=name)


def test_stats_batch_size_cuts_a_per_example_branch_mask_with_a_float_weight():
  """A branch per example under ``jax.vmap`` (a mask per example), times a float weight per
  example from ``with_row_mask``, with ``stats_batch_size=5``: ``ls_k``'s factor is the
  weighted ``sum w x~ x~^T / sum w`` over the first 5 examples that took branch ``k``
  (float64 numpy)."""
  model = LinenModel("lax.cond", 2)
  x = _x(3)
  params = model.init(jax.random.key(1), x, 0)["params"]
  per_example = lambda p, xb, ib: model.apply({"params": p}, xb, ib)
  loss = sngd_jax.capture(
      lambda p, x, idx: _loss_of(jax.vmap(per_example, in_axes=(None, 0, 0))(p, x, idx)))
  idx = np.array([0, 1, 1, 0, 1, 1, 0, 1])
  w = np.linspace(0.1, 1.0, B)
  grads, acts = jax.grad(loss, has_aux=True)(params, x, jnp.asarray(idx))
  acts = sngd_jax.with_row_mask(acts, jnp.asarray(w))
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), stats_batch_size=5)
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  rows = np.concatenate([np.asarray(x), np.ones((B, 1))], axis=1)
  for k in (0, 1):
    sel = (idx == k) & (np.arange(B) < 5)
    want = (rows[sel] * w[sel, None]).T @ rows[sel] / w[sel].sum()
    np.testing.assert_allclose(ref.normalized_factor(state, f"ls_{k}"), want, rtol=1e-10,
                               atol=1e-12, err_msg=f"ls_{k}")


# --- shared buffers: slots of different layers that no branch fills both ---

class Shapes(nn.Module):
  """``switch(i, ...)`` of three branches whose layers all read ``(B, D)`` rows: ``a(x)``
  (bias), ``b(2 x)`` (no bias), ``d(tanh(c(x)))``. Branch 2 records two arrays, the others
  one: the conditional returns two buffers for the four layers (``a``, ``b``, ``c`` in one)."""

  @nn.compact
  def __call__(self, x, i):
    a = nn.Dense(D, name="a", param_dtype=jnp.float64)
    b = nn.Dense(D, name="b", use_bias=False, param_dtype=jnp.float64)
    c = nn.Dense(D, name="c", param_dtype=jnp.float64)
    d = nn.Dense(D, name="d", param_dtype=jnp.float64)
    fns = [a, lambda h: b(2.0 * h), lambda h: d(jnp.tanh(c(h)))]
    if self.is_initializing():
      return sum(f(x) for f in fns)
    return jax.lax.switch(i, fns, x)


def _shapes_rows(p, x, i):
  """The rows each layer of ``Shapes`` sees in branch ``i`` (float64 numpy forward)."""
  if i == 0:
    return {"a": x}
  if i == 1:
    return {"b": 2.0 * x}
  return {"c": x, "d": np.tanh(x @ p["c"]["kernel"] + p["c"]["bias"])}


def _distinct_inputs(fn, *args):
  """The number of distinct arrays the records' inputs are, inside a trace of ``fn``."""
  found = []

  def probe(*a):
    _, acts = fn(*a)
    found.append(len({id(c.inputs) for calls in acts.values() for c in calls}))
    return 0

  jax.make_jaxpr(probe)(*args)
  return found[0]


def test_layers_of_different_branches_share_one_buffer():
  """Three branches whose four layers (with and without bias, different paths) read rows of
  one shape: the conditional returns two record buffers, not four (until 2026-12-06 one per
  layer, each branch filling the others' with zeros). Over 6 jitted steps of alternating
  branches every layer's factor is the float64 moving average of ``E[x~ x~^T]`` (no bias
  column for ``b``) over exactly the steps its branch ran (numpy forward), and a layer whose
  branch did not run keeps its factor bit for bit, although its slot then holds another
  layer's rows."""
  from helpers_jaxpr import eqns  # noqa: PLC0415

  model = Shapes()
  x = _x(11)
  params = model.init(jax.random.key(1), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)))
  grads_acts = jax.grad(loss, has_aux=True)
  assert _distinct_inputs(grads_acts, params, jnp.asarray(0)) == 2
  conds = [e for e in eqns(jax.make_jaxpr(loss)(params, jnp.asarray(0)).jaxpr)
           if e.primitive.name == "cond"]
  assert [len(e.outvars) for e in conds] == [1 + 2]  # the model's output and two buffers
  tx = sngd_jax.sngd(**KW)
  state = tx.init(params)

  @jax.jit
  def step(params, state, i):
    grads, acts = grads_acts(params, i)
    return tx.update(grads, state, params, activations=acts)

  want = {name: (np.zeros((D + (name != "b"),) * 2), 0.0) for name in "abcd"}
  for i in [0, 2, 1, 2, 0, 1]:
    rows = _shapes_rows(jax.tree.map(ref.np64, params), np.asarray(x), i)
    updates, new = step(params, state, jnp.asarray(i))
    for name in "abcd":
      if name in rows:
        g, w = want[name]
        want[name] = (DECAY * g + (1 - DECAY) * ref.gram(rows[name], bias=name != "b"),
                      DECAY * w + (1 - DECAY))
        g, w = want[name]
        np.testing.assert_allclose(ref.normalized_factor(new, name), g / w, rtol=1e-10,
                                   atol=1e-12, err_msg=f"{name} step {i}")
      else:
        np.testing.assert_array_equal(np.asarray(new.factors[name]),
                                      np.asarray(state.factors[name]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(new.weights[name]),
                                      np.asarray(state.weights[name]), err_msg=name)
    state = new
    params = jax.tree.map(lambda p, u: p - 0.1 * u, params, updates)


def test_a_branch_per_example_shares_buffers_and_weighs_each_example_for_its_branch():
  """``Shapes`` per example under ``jax.vmap`` with a per-example branch index (JAX runs every
  branch and selects per example): the records still read two buffers, and one step (no
  decay) gives each layer ``E[x~ x~^T]`` over the examples that took its branch, times a
  padding mask (float64 numpy)."""
  model = Shapes()
  x = _x(12)
  params = model.init(jax.random.key(1), x, 0)["params"]
  per_example = lambda p, xb, ib: model.apply({"params": p}, xb, ib)
  loss = sngd_jax.capture(
      lambda p, idx: _loss_of(jax.vmap(per_example, in_axes=(None, 0, 0))(p, x, idx)))
  idx = jnp.array([0, 2, 1, 2, 0, 1, 2, 0])
  real = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
  grads_acts = jax.grad(loss, has_aux=True)
  assert _distinct_inputs(grads_acts, params, idx) == 2
  grads, acts = grads_acts(params, idx)
  acts = sngd_jax.with_row_mask(acts, jnp.asarray(real))
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  p = jax.tree.map(ref.np64, params)
  xn, k = np.asarray(x), np.asarray(idx)
  rows = {name: [] for name in "abcd"}
  for e in np.flatnonzero(real):
    for name, r in _shapes_rows(p, xn[e:e + 1], k[e]).items():
      rows[name].append(r)
  for name in "abcd":
    r = np.concatenate(rows[name])
    np.testing.assert_allclose(ref.normalized_factor(state, name),
                               ref.gram(r, bias=name != "b"), rtol=1e-10, atol=1e-12,
                               err_msg=name)


class Unbatched(nn.Module):
  """``b`` called on the batch, then per example under a ``jax.vmap`` whose branch index is
  the same for every example: branch 0 runs ``a`` on the example, branch 1 runs ``b`` on
  ``ones(D)``, which the vmap does not batch (one row, not one per example)."""

  @nn.compact
  def __call__(self, x, i):
    a = nn.Dense(D, name="a", param_dtype=jnp.float64)
    b = nn.Dense(D, name="b", param_dtype=jnp.float64)
    h = b(x)
    if self.is_initializing():
      return a(h)

    def one(xe):
      return jax.lax.cond(i == 0, a, lambda _: b(jnp.ones(D, jnp.float64)), xe)

    return jax.vmap(one)(h)


def test_a_vmap_that_does_not_batch_the_index_shares_no_buffer_across_layers():
  """Under a ``jax.vmap`` that does not batch the branch index an output of the conditional
  is batched when any branch's array is: ``a``'s (batched) and ``b``'s (not) in one buffer
  would give ``b``'s unbatched row the vmap's axis, ``B`` copies of it. So there they keep a
  buffer each: ``b``'s factor pools its ``B`` rows on the batch and the one row of ``ones``
  (float64 numpy; shared, ``B`` copies of the ones row would weigh ``B`` times), and ``a``,
  whose branch did not run, keeps its factor."""
  model = Unbatched()
  x = _x(13)
  params = model.init(jax.random.key(1), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)))
  grads_acts = jax.grad(loss, has_aux=True)
  assert _distinct_inputs(grads_acts, params, jnp.asarray(1)) == 3  # x, h, ones: no sharing
  grads, acts = grads_acts(params, jnp.asarray(1))
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  state = tx.init(params)
  _, new = tx.update(grads, state, params, activations=acts)
  np.testing.assert_allclose(ref.normalized_factor(new, "b"),
                             ref.gram(np.concatenate([np.asarray(x), np.ones((1, D))])),
                             rtol=1e-10, atol=1e-12)
  np.testing.assert_array_equal(np.asarray(new.factors["a"]), np.asarray(state.factors["a"]))


def test_a_scan_around_a_conditional_stacks_one_buffer_for_its_branches():
  """``Steps`` (a ``cond`` between ``a`` and ``b`` of one shape in each step of a scan over
  time): the scan stacks the model's outputs, one record buffer for both layers and their
  masks, one each (until 2026-12-06 a buffer per layer: 5 outputs), and each layer's factor is
  still ``E[x~ x~^T]`` over the steps that took its branch (float64)."""
  from helpers_jaxpr import scan_output_counts  # noqa: PLC0415

  xs = jax.random.normal(jax.random.key(14), (5, B, D), jnp.float64)
  model = Steps(nnx.Rngs(0))
  loss = sngd_jax.capture_nnx(lambda m, xs: jnp.sum(jnp.sin(m(xs))))
  assert scan_output_counts(jax.make_jaxpr(loss)(model, xs).jaxpr) == [1 + 1 + 2]
  grads, acts = nnx.grad(loss, has_aux=True)(model, xs)
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  xs = np.asarray(xs)
  ref.assert_factor(state, "a", xs[[0, 3]].reshape(-1, D))
  ref.assert_factor(state, "b", xs[[1, 2, 4]].reshape(-1, D))


class Aliased(nn.Module):
  """``q(x) * k(x)`` (two layers reading one array) or ``r(2 x)``: with outputs captured the
  conditional returns three buffers, the inputs of all three layers in one (``q`` and ``k``
  hold one array) and the outputs in two."""

  @nn.compact
  def __call__(self, x, i):
    q, k, r = (nn.Dense(D, name=n, param_dtype=jnp.float64) for n in "qkr")
    fns = [lambda h: q(h) * k(h), lambda h: r(2.0 * h)]
    if self.is_initializing():
      return fns[0](x) + fns[1](x)
    return jax.lax.cond(i == 1, fns[1], fns[0], x)


def _rfim_factor(x, z):
  """``E[sigmoid(z_j)^2 x~ x~^T]`` per output unit ``j``, ``(O, d, d)`` (float64 numpy)."""
  xt = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  w = (1.0 / (1.0 + np.exp(-z))) ** 2
  return np.einsum("nj,na,nb->jab", w, xt, xt) / x.shape[0]


@pytest.mark.parametrize("i", [0, 1])
def test_shared_buffers_hold_outputs_and_one_array_that_two_layers_read(i):
  """``fisher="rfim"`` (outputs captured) on ``Aliased``: three record buffers, not six, and
  each layer of the branch taken gets ``E[sigmoid(z_j)^2 x~ x~^T]`` over its rows (float64
  numpy forward), a layer of the branch not taken keeps its factor."""
  from helpers_jaxpr import eqns  # noqa: PLC0415

  model = Aliased()
  x = _x(15)
  params = model.init(jax.random.key(1), x, 0)["params"]
  loss = sngd_jax.capture(lambda p, i: _loss_of(model.apply({"params": p}, x, i)),
                          outputs=True)
  conds = [e for e in eqns(jax.make_jaxpr(loss)(params, jnp.asarray(i)).jaxpr)
           if e.primitive.name == "cond"]
  assert [len(e.outvars) for e in conds] == [1 + 3]
  grads, acts = jax.grad(loss, has_aux=True)(params, jnp.asarray(i))
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), fisher="rfim")
  state = tx.init(params)
  _, new = tx.update(grads, state, params, activations=acts)
  p, xn = jax.tree.map(ref.np64, params), np.asarray(x)
  rows = {"r": 2.0 * xn} if i else {"q": xn, "k": xn}
  for name in "qkr":
    if name in rows:
      z = rows[name] @ p[name]["kernel"] + p[name]["bias"]
      np.testing.assert_allclose(ref.normalized_factor(new, name), _rfim_factor(rows[name], z),
                                 rtol=1e-10, atol=1e-12, err_msg=name)
    else:
      np.testing.assert_array_equal(np.asarray(new.factors[name]),
                                    np.asarray(state.factors[name]), err_msg=name)
