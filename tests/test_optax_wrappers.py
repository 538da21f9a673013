"""SNGD inside optax's wrappers and recipes, as a training script writes them, in float64.

Each test runs the real pattern (``optax.contrib.schedule_free``, ``reduce_on_plateau``,
``clip_by_global_norm`` on either side of ``sngd``, the learning-rate-free bases
``prodigy`` and ``dadapt_adamw``, ``optax.transforms.selective_transform`` and ``freeze`` on a
fine-tuned backbone) and compares every update with the wrapper's math written out in numpy
on the float64 preconditioned gradient ``(G + damping tr(G) I)^{-1} [g_W; g_b^T]``, ``G`` the
``E[x~ x~^T]`` of the rows of an independent numpy forward pass (``helpers_mlp.dense_inputs``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_mlp import dense_inputs, grads_and_acts, make_problem
from np_reference import DAMPING, dense_update, linear_factor, normalized_factor, one_step_kwargs

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

FEATURES = (7, 5, 3)
LAYERS = ("Dense_0", "Dense_1", "Dense_2")
# Every step a factor step of that step's batch, inverted at once, no trust region: one
# update is the damped solve of that step's rows.
BATCH = dict(one_step_kwargs(), factor_every=1)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _preconditioned(params, x, grads, layers=LAYERS):
  """float64 ``(G + damping tr(G) I)^{-1} [g_W; g_b^T]`` per layer, ``G`` from the rows of
  a numpy forward pass at ``params``."""
  rows, _ = dense_inputs(params, x, FEATURES)
  out = {}
  for i, h in enumerate(rows):
    layer = f"Dense_{i}"
    if layer in layers:
      k, b = dense_update(h, grads[layer]["kernel"], grads[layer]["bias"])
      out[layer] = {"kernel": k, "bias": b}
  return out


def _close(actual, want, rtol=1e-9, atol=1e-12, msg=""):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=msg),
               _np(actual), _np(want))


def _sngd_states(state):
  """The ``SNGDState``s inside an optimizer state."""
  is_sngd = lambda s: isinstance(s, sngd_jax.SNGDState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_sngd) if is_sngd(s)]


def _scaled(tree, s):
  return jax.tree.map(lambda a: a * s, tree)


def _step(tx, loss_fn):
  """A jitted step: grads and activations at ``params``, one ``tx.update``."""

  @jax.jit
  def step(params, state, x, y):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return updates, state, grads

  return step


@pytest.mark.parametrize("make", [
    lambda lr: sngd_jax.sngd_momentum(lr, momentum=0.0, **BATCH),
    lambda lr: optax.chain(sngd_jax.sngd(**BATCH), optax.sgd(lr))],
    ids=["sngd_momentum", "chain_sngd_sgd"])
def test_schedule_free_around_sngd_is_schedule_free_written_out(make):
  """``optax.contrib.schedule_free(base, lr, b1)`` forwards ``activations=`` to its base, and
  the training params it hands out are the interpolated point ``y``, where the step takes
  the gradient and captures the activations: each factor is ``E[x~ x~^T]`` of the rows at
  ``y_t`` (not at the evaluation point ``x_t``). Three steps against the method written out:
  ``z+ = z - lr P(y)^{-1} g(y)``, ``x+ = (1 - c) x + c z+`` with ``c = 1 / (t + 1)`` (a
  constant rate), ``y+ = b1 x+ + (1 - b1) z+``, and ``schedule_free_eval_params`` is ``x``."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  lr, b1 = 0.1, 0.9
  tx = optax.contrib.schedule_free(make(lr), lr, b1=b1)
  step = _step(tx, loss_fn)
  state, p = tx.init(params), params
  zs = xs = _np(params)
  for t in range(3):
    updates, state, grads = step(p, state, x, y)
    pre = _preconditioned(_np(p), x, _np(grads))
    zs_new = jax.tree.map(lambda z, u: z - lr * u, zs, pre)
    xs = jax.tree.map(lambda a, z, c=1.0 / (t + 1): (1 - c) * a + c * z, xs, zs_new)
    want_y = jax.tree.map(lambda a, z: b1 * a + (1 - b1) * z, xs, zs_new)
    sngd_state, = _sngd_states(state)
    rows_y, _ = dense_inputs(_np(p), x, FEATURES)   # the point the step was taken at
    eval_p = _np(optax.contrib.schedule_free_eval_params(state, p))
    for layer, h in zip(LAYERS, rows_y, strict=True):
      np.testing.assert_allclose(normalized_factor(sngd_state, layer), linear_factor(h),
                                 rtol=1e-10, atol=1e-12, err_msg=f"step {t} {layer}")
    p = optax.apply_updates(p, updates)
    _close(p, want_y, msg=f"y at step {t}")
    zs = zs_new
    if t > 0:  # y differs from the evaluation point x from the second step on
      rows_x, _ = dense_inputs(eval_p, x, FEATURES)
      assert not np.allclose(linear_factor(rows_x[1]), normalized_factor(sngd_state, "Dense_1"))
    _close(optax.contrib.schedule_free_eval_params(state, p), xs, msg=f"x at step {t}")
  _close(state.z, zs)


def test_sngd_before_schedule_free_sgd_is_schedule_free_of_the_chain():
  """``optax.chain(sngd(), optax.contrib.schedule_free_sgd(lr))`` (SNGD first, the packaged
  schedule-free SGD after it) is the same optimizer as ``schedule_free(chain(sngd(),
  sgd(lr)), lr)``; its schedule-free state is the chain's second entry, which is what
  ``schedule_free_eval_params`` needs."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  lr = 0.1
  tx = optax.chain(sngd_jax.sngd(**BATCH), optax.contrib.schedule_free_sgd(lr, b1=0.9))
  ref = optax.contrib.schedule_free(optax.chain(sngd_jax.sngd(**BATCH), optax.sgd(lr)), lr,
                                    b1=0.9)
  step, ref_step = _step(tx, loss_fn), _step(ref, loss_fn)
  state, ref_state, p, q = tx.init(params), ref.init(params), params, params
  for t in range(3):
    u, state, _ = step(p, state, x, y)
    v, ref_state, _ = ref_step(q, ref_state, x, y)
    _close(u, v, msg=f"step {t}")
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  _close(optax.contrib.schedule_free_eval_params(state[1], p),
         optax.contrib.schedule_free_eval_params(ref_state, q))
  with pytest.raises(AttributeError, match="b1"):  # the chain's tuple is not its state
    optax.contrib.schedule_free_eval_params(state, p)


def test_accumulation_goes_outside_schedule_free():
  """``sngd_jax.MultiSteps(schedule_free(sngd_momentum(lr, momentum=0.0), lr), k)``: two
  micro-batches of 8 give, step for step, schedule-free on the batch of 16 (float64
  accumulators). The other nesting, ``schedule_free(sngd_jax.MultiSteps(...), lr)``, runs
  without an error but is not accumulation: on the first micro-batch the base's update is
  zero, yet (once ``x`` and ``z`` differ) schedule-free still averages ``x`` toward ``z``
  and moves the params ``y = b1 x + (1 - b1) z``, and counts the micro-batch as a step of
  its average."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  lr = 0.1
  base = lambda: sngd_jax.sngd_momentum(lr, momentum=0.0, **BATCH)
  free = lambda tx: optax.contrib.schedule_free(tx, lr, b1=0.9)
  acc = lambda tx: sngd_jax.MultiSteps(tx, every_k_schedule=2, accumulator_dtype=jnp.float64)
  big, outside, inside = free(base()), acc(free(base())), free(acc(base()))
  steps = [_step(tx, loss_fn) for tx in (big, outside, inside)]
  states = [tx.init(params) for tx in (big, outside, inside)]
  pb = po = pi = params
  for t in range(3):
    u, states[0], _ = steps[0](pb, states[0], x, y)
    pb = optax.apply_updates(pb, u)
    for half in (slice(0, 8), slice(8, 16)):
      u, states[1], _ = steps[1](po, states[1], x[half], y[half])
      po = optax.apply_updates(po, u)
      u, states[2], _ = steps[2](pi, states[2], x[half], y[half])
      if t == 1 and half.start == 0:   # x and z differ after the first update
        assert max(float(np.abs(a).max()) for a in jax.tree.leaves(u)) > 1e-3
      pi = optax.apply_updates(pi, u)
    _close(po, pb, rtol=1e-12, atol=1e-14, msg=f"step {t}")
  assert max(float(np.abs(a - b).max())
             for a, b in zip(jax.tree.leaves(pi), jax.tree.leaves(pb), strict=True)) > 1e-2


def test_reduce_on_plateau_after_sngd_gets_value_and_sngd_gets_activations():
  """``tx.update(..., activations=acts, value=loss)`` on ``chain(sngd(), sgd(lr),
  reduce_on_plateau(...))``: each extra argument reaches the transform that takes it. A
  rising loss halves the plateau's scale from the second step on (``patience=1``), and
  every update is that scale times ``-lr`` times the float64 preconditioned gradient (the
  scale read from ``reduce_on_plateau`` run alone on the same values)."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  lr = 0.1
  plateau = lambda: optax.contrib.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=1)
  tx = optax.chain(sngd_jax.sngd(**BATCH), optax.sgd(lr), plateau())
  alone = plateau()

  @jax.jit
  def step(params, state, bump):
    loss, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts, value=loss + bump)
    return updates, state, grads, loss

  state, alone_state, p = tx.init(params), alone.init(params), params
  scales = []
  for t in range(4):
    bump = 10.0 * t   # a rising loss
    updates, state, grads, loss = step(p, state, bump)
    want = jax.tree.map(lambda u: -lr * u, _preconditioned(_np(p), x, _np(grads)))
    want, alone_state = alone.update(want, alone_state, value=float(loss) + bump)
    scales.append(float(alone_state.scale))
    _close(updates, want, msg=f"step {t}")
    assert float(state[2].scale) == scales[-1]
    p = optax.apply_updates(p, updates)
  assert scales == [1.0, 0.5, 0.25, 0.125]


@pytest.mark.parametrize("order", ["clip_then_sngd", "sngd_then_clip"])
def test_clip_by_global_norm_on_either_side_of_sngd_with_adamw(order):
  """``chain(clip_by_global_norm(c), sngd(), adamw(schedule))`` clips the gradient and
  preconditions the clipped gradient; ``chain(sngd(), clip_by_global_norm(c), adamw(...))``
  clips the preconditioned gradient. ``c`` binds in both orders here; three steps of each
  against clipping, the damped solve and AdamW (bias-corrected moments, decoupled decay of
  every leaf, the scheduled rate) written out in numpy."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  c, b1, b2, eps, wd = 0.3, 0.9, 0.999, 1e-8, 1e-2
  sched = optax.linear_schedule(1e-2, 1e-3, 3)
  parts = [optax.clip_by_global_norm(c), sngd_jax.sngd(**BATCH)]
  tx = optax.chain(*(parts if order == "clip_then_sngd" else parts[::-1]),
                   optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  step = _step(tx, loss_fn)
  state, p = tx.init(params), params
  norm = lambda t: np.sqrt(sum(np.sum(a ** 2) for a in jax.tree.leaves(t)))
  m = v = jax.tree.map(np.zeros_like, _np(params))
  for t in range(1, 4):
    updates, state, grads = step(p, state, x, y)
    g = _np(grads)
    if order == "clip_then_sngd":
      assert norm(g) > c
      u = _preconditioned(_np(p), x, _scaled(g, c / norm(g)))
    else:
      u = _preconditioned(_np(p), x, g)
      assert norm(u) > c
      u = _scaled(u, c / norm(u))
    m = jax.tree.map(lambda m, u: b1 * m + (1 - b1) * u, m, u)
    v = jax.tree.map(lambda v, u: b2 * v + (1 - b2) * u * u, v, u)
    lr = float(sched(t - 1))
    adamw = lambda m, v, w, lr=lr, t=t: -lr * (
        (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * w)
    want = jax.tree.map(adamw, m, v, _np(p))
    # optax evaluates the schedule at its int32 count: a float32 rate (within 1 ulp of it).
    _close(updates, want, rtol=2e-7, atol=1e-14, msg=f"{order} step {t}")
    p = optax.apply_updates(p, updates)


@pytest.mark.parametrize("base", ["prodigy", "dadapt_adamw"])
def test_learning_rate_free_base_after_sngd_sees_the_preconditioned_gradient(base):
  """``optax.chain(sngd(), optax.contrib.prodigy())`` (and ``dadapt_adamw``): the
  learning-rate-free base estimates its step size from the preconditioned gradient. Three
  steps equal the base run alone on the float64 preconditioned gradients (its distance
  estimate from the same params)."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  make = getattr(optax.contrib, base)
  tx = optax.chain(sngd_jax.sngd(**BATCH), make())
  alone = make()
  step = _step(tx, loss_fn)
  state, alone_state, p = tx.init(params), alone.init(params), params
  for t in range(3):
    updates, state, grads = step(p, state, x, y)
    pre = jax.tree.map(jnp.asarray, _preconditioned(_np(p), x, _np(grads)))
    want, alone_state = alone.update(pre, alone_state, p)
    _close(updates, want, rtol=1e-8, msg=f"{base} step {t}")
    p = optax.apply_updates(p, updates)
  assert any(float(np.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_selective_transform_trains_the_head_with_sngd_and_freezes_the_backbone():
  """Fine-tuning the head of a frozen backbone:
  ``optax.transforms.selective_transform(sngd_momentum(lr, weight_decay=wd),
  freeze_mask=...)``. The backbone's updates are exact zeros (no weight decay either), SNGD
  keeps a factor for the head only (its input: the backbone's features), and three head
  updates equal momentum SGD on the float64 preconditioned gradient plus ``wd * W``.
  ``chain(optax.transforms.freeze(mask), sngd_momentum(lr, weight_decay=wd))`` is not a
  freeze: ``freeze`` zeroes the gradient, and the decoupled decay after it moves the frozen
  kernels by ``-lr wd W`` on the first step."""
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64)
  lr, mom, wd = 0.05, 0.9, 1e-2
  frozen = {"Dense_0": True, "Dense_1": True, "Dense_2": False}
  make = lambda: sngd_jax.sngd_momentum(lr, momentum=mom, weight_decay=wd, **BATCH)
  tx = optax.transforms.selective_transform(make(), freeze_mask=frozen)
  step = _step(tx, loss_fn)
  state, p = tx.init(params), params
  trace = jax.tree.map(np.zeros_like, _np(params["Dense_2"]))
  for t in range(3):
    updates, state, grads = step(p, state, x, y)
    pre = _preconditioned(_np(p), x, _np(grads), layers=("Dense_2",))["Dense_2"]
    decay = {"kernel": wd * _np(p["Dense_2"]["kernel"]), "bias": 0.0}  # kernels only
    trace = jax.tree.map(lambda tr, u, d: mom * tr + u + d, trace, pre, decay)
    _close(updates["Dense_2"], jax.tree.map(lambda tr: -lr * tr, trace), msg=f"step {t}")
    for layer in ("Dense_0", "Dense_1"):
      assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[layer]))
    p = optax.apply_updates(p, updates)
  assert [sorted(s.factors) for s in _sngd_states(state)] == [["Dense_2"]]

  wrong = optax.chain(optax.transforms.freeze(frozen), make())
  updates, _, _ = _step(wrong, loss_fn)(params, wrong.init(params), x, y)
  np.testing.assert_allclose(updates["Dense_0"]["kernel"],
                             -lr * wd * np.asarray(params["Dense_0"]["kernel"]), rtol=1e-12)


@pytest.mark.parametrize("part", ["head_only", "masked_biases", "masked_biases_nystrom"])
def test_trust_region_scale_of_sngd_on_part_of_the_model(part):
  """``sngd_jax.trust_region_scale(grads, opt_state)`` (and ``(grads, opt_state, updates)``)
  with the full gradients and the state of ``selective_transform`` (SNGD on the head only) or
  ``optax.masked`` (every bias masked out): the scale the update used,
  ``min(1, max_norm / sqrt(q))`` with ``q = sum_l <g_l, (G_l + damping tr(G_l) I)^{-1} g_l>``
  over the layers and leaves SNGD sees, in float64 (it raised ``KeyError: 'Dense_0'`` for the
  head-only state, and a shape ``TypeError`` for the masked biases, which it counted against
  factors without a bias row).

  ``masked_biases_nystrom``: the same masked biases with every layer kept as a Nystrom sketch
  of rank 4 (``inverse.nystrom(4)``; the layers' ``d`` = 6, 7, 5 without their bias rows) on
  a batch of 2 rows, so ``G`` has rank 2 and the sketch is exact. Whether SNGD saw a bias is
  read from the block size ``d`` of the state's factor (``transform.seen_by_state``); the
  former rule compared dense factor shapes only, took every sketched layer's masked bias as
  seen, and raised a shape ``ValueError`` for ``(grads, state)`` and gave 7.4e-5 for
  ``(grads, state, updates)`` (the bias leaf's pass-through gradient counted in ``q``),
  against 7.3e-3."""
  nystrom = part == "masked_biases_nystrom"
  _, params, x, y, loss_fn = make_problem(dtype=jnp.float64, batch=2 if nystrom else 16)
  max_norm = 0.01
  extra = {"inverse": sngd_jax.inverse.nystrom(rank=4)} if nystrom else {}
  sngd = sngd_jax.sngd(**{**BATCH, "max_norm": max_norm, **extra})
  if part == "head_only":
    tx = optax.transforms.selective_transform(
        sngd, freeze_mask={"Dense_0": True, "Dense_1": True, "Dense_2": False})
    seen, bias = ("Dense_2",), True
  else:
    mask = {layer: {"kernel": True, "bias": False} for layer in LAYERS}
    tx = optax.masked(sngd, mask)
    seen, bias = LAYERS, False
  updates, state, grads = _step(tx, loss_fn)(params, tx.init(params), x, y)
  if nystrom:  # every layer is held as a sketch (no bias row: d = in_dim)
    (sngd_state,) = _sngd_states(state)
    assert {p: f.y.shape for p, f in sngd_state.factors.items()} == {
        "Dense_0": (6, 4), "Dense_1": (7, 4), "Dense_2": (5, 4)}
  rows, _ = dense_inputs(_np(params), x, FEATURES)
  q = 0.0
  for i, layer in enumerate(LAYERS):
    if layer in seen:
      g = _np(grads[layer])
      ga = np.concatenate([g["kernel"], g["bias"][None]]) if bias else g["kernel"]
      f = linear_factor(rows[i], bias=bias)
      q += np.sum(ga * np.linalg.solve(f + DAMPING * np.trace(f) * np.eye(len(f)), ga))
  want = min(1.0, max_norm / np.sqrt(q))
  assert want < 0.5   # the trust region clips this step
  for got in (sngd_jax.trust_region_scale(grads, state),
              sngd_jax.trust_region_scale(grads, state, updates)):
    np.testing.assert_allclose(float(got), want, rtol=1e-9)
