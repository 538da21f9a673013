"""Bad inputs raise errors that name the layer path and the expected and actual shapes."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_warnings import no_sngd_warnings

import sngd_jax
from sngd_jax import Captured
from sngd_jax._src import coverage as coverage_lib


def _params(d_in=4, d_out=3, dtype=jnp.float32):
  return {"Dense_0": {"kernel": jnp.ones((d_in, d_out), dtype), "bias": jnp.zeros(d_out, dtype)},
          "head": {"Dense_1": {"kernel": jnp.ones((d_out, 2), dtype)}}}


def _acts(params, n=5, d_in=None, dtype=jnp.float32):
  k0 = params["Dense_0"]["kernel"]
  d_in = k0.shape[0] if d_in is None else d_in
  x0 = jnp.ones((n, d_in), dtype)
  return {"Dense_0": (Captured(x0, jnp.ones((n, k0.shape[1]), dtype)),),
          "head/Dense_1": (Captured(jnp.ones((n, k0.shape[1]), dtype), jnp.ones((n, 2), dtype)),)}


def _update(params, acts, state=None, grads=None, **kwargs):
  tx = sngd_jax.sngd(**kwargs)
  state = tx.init(params) if state is None else state
  return tx.update(params if grads is None else grads, state, params, activations=acts)


def test_good_inputs_pass():
  p = _params()
  updates, state = _update(p, _acts(p))
  assert int(state.count) == 1


def test_missing_activations_name_the_layer():
  p = _params()
  acts = _acts(p)
  del acts["head/Dense_1"]
  with pytest.raises(ValueError, match=r"no activations were captured for layer 'head/Dense_1'"
                                       r".*params 'head/Dense_1/kernel'"):
    _update(p, acts)


def test_no_activations_at_all():
  p = _params()
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match=r"needs `activations=`"):
    tx.update(p, tx.init(p), p)


def test_activations_of_layers_the_params_do_not_hold_are_ignored():
  """Activations of a layer without params here (frozen, or another transform's) change
  nothing: the same update and state as without them; ``coverage`` lists the layer."""
  p = _params()
  acts = _acts(p)
  extra = {**acts, "Dense_7": acts["Dense_0"]}
  (u1, s1), (u2, s2) = _update(p, acts), _update(p, extra)
  jax.tree.map(np.testing.assert_array_equal, (u1, s1), (u2, s2))
  report = coverage_lib.report(p, extra)  # what sngd_jax.coverage prints
  assert report.unmatched == ("Dense_7",)
  assert "captured but matching no params (frozen, or another transform's" in str(report)


def test_wrong_input_features_name_layer_and_shapes():
  p = _params()
  acts = _acts(p)
  acts["Dense_0"] = (Captured(jnp.ones((5, 6)), jnp.ones((5, 3))),)
  with pytest.raises(ValueError, match=re.escape(
      "layer 'Dense_0': captured activations have 6 input and 3 output features per row "
      "(inputs (5, 6), outputs (5, 3)), but its kernel expects 4 inputs and 3 outputs")):
    _update(p, acts)


def test_wrong_output_features():
  p = _params()
  acts = _acts(p)
  acts["head/Dense_1"] = (Captured(jnp.ones((5, 3)), jnp.ones((5, 7))),)
  with pytest.raises(ValueError, match=r"layer 'head/Dense_1'.*3 input and 7 output.*expects 3 "
                                       r"inputs and 2 outputs"):
    _update(p, acts)


def test_scalar_activations():
  p = _params()
  acts = _acts(p)
  acts["Dense_0"] = (Captured(jnp.ones(()), jnp.ones((5, 3))),)
  with pytest.raises(ValueError, match=r"layer 'Dense_0': call 0 captured scalar inputs; "
                                       r"expected shape \(\.\.\., 4\)"):
    _update(p, acts)


def test_params_tree_with_other_layers_than_the_state():
  p = _params()
  tx = sngd_jax.sngd()
  state = tx.init(p)
  other = {"Dense_0": p["Dense_0"], "Dense_2": p["head"]["Dense_1"]}
  acts = {"Dense_0": _acts(p)["Dense_0"], "Dense_2": _acts(p)["head/Dense_1"]}
  with pytest.raises(ValueError, match=r"does not match the optimizer state.*"
                                       r"\['head/Dense_1'\].*\['Dense_2'\]"):
    tx.update(other, state, other, activations=acts)


def test_params_tree_with_other_shapes_than_the_state():
  p = _params()
  tx = sngd_jax.sngd()
  state = tx.init(p)
  wider = _params(d_in=6)
  with pytest.raises(ValueError, match=re.escape(
      "layer 'Dense_0': the optimizer state holds a factor of shape (5, 5), but params with "
      "kernel 'Dense_0/kernel' of 6 inputs and 3 outputs and a bias need (7, 7)")):
    tx.update(wider, state, wider, activations=_acts(wider))


def test_state_made_for_another_fisher_kind():
  p = _params()
  state = sngd_jax.sngd(fisher="linear").init(p)
  tx = sngd_jax.sngd(fisher="rfim")
  with pytest.raises(ValueError, match=r"layer 'Dense_0'.*shape \(5, 5\).*need \(3, 5, 5\) "
                                       r"\(fisher='rfim'\)"):
    tx.update(p, state, p, activations=_acts(p))


@pytest.mark.parametrize("fisher", ["kfac", {"head/Dense_1": "diag"}])
def test_unknown_fisher_kind(fisher):
  with pytest.raises(ValueError, match=r"unknown fisher kind '(kfac|diag)' for layer "
                                       r"'(<every layer>|head/Dense_1)'; expected one of"):
    sngd_jax.sngd(fisher=fisher)


def test_unknown_fisher_kind_from_a_callable_names_the_layer():
  tx = sngd_jax.sngd(fisher=lambda path: "rfim" if path == "Dense_0" else "bogus")
  with pytest.raises(ValueError, match=r"unknown fisher kind 'bogus' for layer 'head/Dense_1'"):
    tx.init(_params())


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(damping=-1e-4), r"`damping` must be in \[0.0, inf\], got -0.0001"),
    (dict(abs_damping=-1.0), r"`abs_damping` must be in \[0.0, inf\], got -1.0"),
    (dict(damping=float("nan")), r"`damping` must be in .*got nan"),
    (dict(damping=0.0, abs_damping=0.0), r"`damping` and `abs_damping` are both 0"),
    (dict(decay=1.5), r"`decay` must be in \[0.0, 1.0\], got 1.5"),
    (dict(inverse_every=0), r"`inverse_every` must be in \(0, inf\], got 0"),
    (dict(factor_every=-2), r"`factor_every` must be in \(0, inf\], got -2"),
    (dict(max_factor_ratio=0.5), r"`max_factor_ratio` must be in \[1.0, inf\], got 0.5"),
    (dict(prior="zeros"), r"unknown prior 'zeros'"),
    (dict(inverse="svd"), r"unknown inverse method 'svd'"),
])
def test_bad_hyperparameters(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    sngd_jax.sngd(**kwargs)


def test_integer_params_name_the_leaf():
  p = _params()
  p["head"]["Dense_1"]["kernel"] = jnp.ones((3, 2), jnp.int32)
  with pytest.raises(TypeError, match=r"params leaf 'head/Dense_1/kernel' of layer "
                                      r"'head/Dense_1' has dtype int32"):
    sngd_jax.sngd().init(p)


def test_integer_gradients_name_the_leaf():
  p = _params()
  tx = sngd_jax.sngd()
  state = tx.init(p)
  grads = {**p, "Dense_0": {**p["Dense_0"], "bias": np.zeros(3, np.int32)}}
  with pytest.raises(TypeError, match=r"updates leaf 'Dense_0/bias' of layer 'Dense_0' has "
                                      r"dtype int32"):
    tx.update(grads, state, p, activations=_acts(p))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_activations_name_the_layer(dtype):
  p = _params()
  acts = _acts(p)
  acts["Dense_0"] = (Captured(jnp.ones((5, 4), dtype), jnp.ones((5, 3))),)
  with pytest.raises(TypeError, match=r"layer 'Dense_0': call 0 captured inputs of dtype "
                                      r"(int32|bool) and shape \(5, 4\); activations must be "
                                      r"floating point"):
    _update(p, acts)


def test_bias_not_matching_kernel():
  p = _params()
  p["Dense_0"]["bias"] = jnp.zeros(5)
  with pytest.raises(ValueError, match=r"layer 'Dense_0': bias shape \(5,\) does not match "
                                       r"the trailing axes of kernel shape \(4, 3\)"):
    sngd_jax.sngd().init(p)


def test_activations_that_are_not_the_captured_dict():
  """Passing the aux (logits) or the ``(aux, acts)`` pair instead of ``acts``."""
  p = _params()
  tx = sngd_jax.sngd()
  for wrong in (jnp.ones((5, 3)), (jnp.ones((5, 3)), _acts(p))):
    with pytest.raises(TypeError, match=r"`activations=` must be the dict that "
                                        r"`sngd_jax.capture` returns.*got a (ArrayImpl|tuple)"):
      tx.update(p, tx.init(p), p, activations=wrong)


def test_gradients_passed_as_activations_name_the_fix():
  """``jax.grad(capture(loss), has_aux=True)`` returns ``(grads, acts)``: unpacking it in the
  other order passes the gradients (a dict of dicts of arrays) as ``activations=``, which
  raised ``AttributeError: 'str' object has no attribute 'inputs'`` from inside the checks."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  model, x = MLP(), jnp.ones((6, 4))
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x: (model.apply({"params": p}, x) ** 2).mean()
  grads, acts = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
  tx = sngd_jax.sngd()
  for wrong in (grads, params):  # `acts, grads = ...` unpacks the gradients into `acts`
    with pytest.raises(TypeError, match=r"`activations=` holds a value of type dict with keys "
                                        r"\['bias', 'kernel'\] at 'Dense_0', not the tuple of "
                                        r"captured calls.*`jax.grad\(sngd_jax.capture\("
                                        r"loss_fn\), has_aux=True\)` returns `\(grads, acts\)`"):
      tx.update(grads, tx.init(params), params, activations=wrong)
  with pytest.raises(TypeError, match=r"holds a value of type ArrayImpl at 'Dense_1'"):
    tx.update(params, tx.init(params), params,
              activations={"Dense_0": acts["Dense_0"], "Dense_1": jnp.ones((6, 8))})
  tx.update(grads, tx.init(params), params, activations=acts)  # the right order runs


def test_state_restored_without_a_target():
  """A checkpoint restored without a target is plain dicts: the error says to restore into
  ``tx.init(params)``."""
  p = _params()
  tx = sngd_jax.sngd()
  raw = {"count": 0, "factors": {}, "weights": {}}
  with pytest.raises(TypeError, match=r"optimizer state is a dict, not the `SNGDState`.*"
                                      r"restore it into `tx.init\(params\)`"):
    tx.update(p, raw, p, activations=_acts(p))
  # through a chain (msgpack_restore without a target): its keys reach sngd, not a str
  chained = optax.chain(sngd_jax.sngd(), optax.sgd(0.1))
  with pytest.raises(TypeError, match=r"optimizer state is a dict \(restored without a "
                                      r"target: its keys reached sngd\)"):
    chained.update(p, {"0": raw, "1": {}}, p, activations=_acts(p))


def test_multisteps_state_restored_without_a_target():
  """``sngd_jax.MultiSteps`` restored without a target (``flax.serialization.msgpack_restore``
  of a ``TrainState``) raised ``AttributeError: 'dict' object has no attribute
  'inner_opt_state'``; it now says to restore into a template, and the state restored into
  one (``from_bytes``) gives the update of the state that was saved, bit for bit."""
  from flax import serialization
  p = _params()
  acts = _acts(p)
  grads = jax.tree.map(lambda a: jnp.full_like(a, 0.1), p)
  tx = sngd_jax.MultiSteps(sngd_jax.sngd_momentum(0.1), every_k_schedule=2)
  state = tx.init(p)
  _, state = tx.update(grads, state, p, activations=acts)  # one micro-batch accumulated
  blob = serialization.to_bytes(state)
  with pytest.raises(TypeError, match=r"state given to `sngd_jax.MultiSteps.update` is a dict, "
                                      r"not the `MultiStepsState`.*restore it into "
                                      r"`tx.init\(params\)`"):
    tx.update(grads, serialization.msgpack_restore(blob), p, activations=acts)
  restored = serialization.from_bytes(tx.init(p), blob)
  want, _ = tx.update(grads, state, p, activations=acts)
  got, _ = tx.update(grads, restored, p, activations=acts)
  assert any(float(jnp.abs(w).max()) > 0 for w in jax.tree.leaves(want))  # the k-th call
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_nothing_captured_hints_at_the_capture_function():
  p = _params()
  with pytest.raises(ValueError, match=r"Captured layers: \[\]\. No layer at all was captured: "
                                       r"is the capture function the one for this kind"):
    _update(p, {})
  acts = _acts(p)
  del acts["head/Dense_1"]  # some layers captured: no such hint
  with pytest.raises(ValueError) as info:
    _update(p, acts)
  assert "No layer at all" not in str(info.value)


def test_params_that_are_not_arrays_name_the_leaf():
  """An Equinox model passed to ``init`` unfiltered holds functions (its activation)."""
  p = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
       "activation": jax.nn.relu}
  with pytest.raises(TypeError, match=r"the params hold a .* at 'activation', not an array.*"
                                      r"eqx.filter\(model, eqx.is_array\)"):
    sngd_jax.sngd_momentum(0.1).init(p)


def test_dense_call_with_other_input_axes_gives_the_fix():
  """A bias-free kernel ``(D, H, k)`` reads as ``D*H`` inputs; the captured call has ``D``
  features: ``update`` names ``fisher={path: ('linear', 1)}``, which then works."""
  import flax.linen as nn  # noqa: PLC0415

  class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((2, 3), use_bias=False)(x).sum(axis=(-1, -2))

  x = jnp.ones((5, 4))
  params = Proj().init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(Proj().apply({"params": p}, x) ** 2)
  grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match=re.escape(
      "pass fisher={'DenseGeneral_0': ('linear', 1)}")):
    tx.update(grads, tx.init(params), params, activations=acts)
  tx = sngd_jax.sngd(fisher={"DenseGeneral_0": ("linear", 1)})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  assert updates["DenseGeneral_0"]["kernel"].shape == (4, 2, 3)
  # under rfim the fix keeps rfim (it said ('linear', 1), which silently changed the kind)
  grads, acts = jax.grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(params, x)
  tx = sngd_jax.sngd(fisher="rfim")
  with pytest.raises(ValueError, match=re.escape(
      "pass fisher={'DenseGeneral_0': ('rfim', 1)}")):
    tx.update(grads, tx.init(params), params, activations=acts)
  report = sngd_jax.coverage(loss, params, x, fisher="rfim", outputs=True)
  assert "('rfim', 1)" in {r.path: r.fisher for r in report.params}["DenseGeneral_0/kernel"]


def test_rfim_without_outputs_is_missing_in_coverage():
  """``update`` raises for rfim without the outputs; ``coverage`` said nothing of it."""
  import flax.linen as nn  # noqa: PLC0415

  model = nn.Dense(3)
  x = jnp.ones((5, 4))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)
  row = {r.path: r.fisher for r in sngd_jax.coverage(loss, params, x, fisher="rfim").params}
  assert row["kernel"].startswith("MISSING: fisher='rfim' weighs rows by the layer's outputs")
  report = sngd_jax.coverage(loss, params, x, fisher="rfim", outputs=True)
  assert report.missing == []


def test_wide_rfim_layer_under_a_nystrom_method_warns():
  """rfim keeps dense per-unit blocks: above the exact limit their Nystrom model holds the
  prior (only a linear layer's sketch keeps it out), so init says what to pass."""
  import flax.linen as nn  # noqa: PLC0415

  params = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 600)))["params"]
  with pytest.warns(UserWarning, match=r"rfim layers \[''\] get a Nystrom model.*"
                                       r"`inverse=\"cholesky\"`"):
    sngd_jax.sngd(fisher="rfim").init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sngd_jax.sngd(fisher="rfim", inverse="cholesky").init(params)
    sngd_jax.sngd(fisher="rfim", prior="none").init(params)
    sngd_jax.sngd().init(params)  # linear: a sketch, the prior kept out


def test_unmodelled_kernel_layout_is_missing_in_coverage_and_named_by_init():
  """A ``ConvTranspose(transpose_kernel=True)`` kernel is ``k x out x in``: its bias does
  not fit the kernel's trailing axes. ``init`` raises with the fix; ``coverage`` lists the
  layer ``MISSING`` with the fix instead of raising, and with the fix a pass-through."""
  from flax import nnx  # noqa: PLC0415

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.ct = nnx.ConvTranspose(1, 4, kernel_size=(3, 3), strides=(2, 2),
                                  transpose_kernel=True, rngs=rngs)
      self.head = nnx.Linear(4 * 8 * 8, 2, rngs=rngs)

    def __call__(self, x):
      h = self.ct(x)
      return self.head(h.reshape(h.shape[0], -1))

  model = Model(nnx.Rngs(0))
  x = jnp.ones((3, 4, 4, 1))
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  with pytest.raises(ValueError, match=r"layer 'ct': bias shape \(4,\) does not match.*"
                                       r"leave it to the next transform with "
                                       r"`fisher=\{'ct': None\}`"):
    sngd_jax.sngd().init(nnx.state(model, nnx.Param))
  report = sngd_jax.coverage(loss, model, x)
  assert report.missing == ["ct/bias", "ct/kernel"]
  row = {r.path: r for r in report.params}["ct/kernel"]
  assert row.fisher.startswith("MISSING: bias shape (4,) does not match")
  assert row.fisher.endswith("leave it to the next transform with `fisher={'ct': None}`")
  assert {r.path: r for r in report.params}["head/kernel"].factor_bytes > 0
  lines = str(report).splitlines()
  assert max(len(line) for line in lines[2:-1]) < 140  # the long reason wraps
  fixed = sngd_jax.coverage(loss, model, x, fisher={"ct": None})
  assert fixed.missing == []
  assert {r.path: r for r in fixed.params}["ct/kernel"].fisher == "pass-through (fisher=None)"


def test_nnx_layer_inside_a_decorator_transform_warns():
  """``nnx.remat`` applied at class definition builds its ``jax.checkpoint`` before capture
  starts; the layer copy inside cannot be named: ``capture_nnx`` warns (naming the class
  and weight shape), the other layers are captured, and ``update`` names the layer."""
  from flax import nnx  # noqa: PLC0415

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(4, 4, rngs=rngs)

    @nnx.remat
    def __call__(self, x):
      return x + self.linear(x)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.block = Block(rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(self.block(x))

  model = Model(nnx.Rngs(0))
  loss = lambda m, x: jnp.sum(m(x) ** 2)
  with pytest.warns(UserWarning, match=r"capture_nnx could not name 1 layer call\(s\) "
                                       r"\(Linear \(weight \(4, 4\)\)\).*nnx.remat"):
    _, acts = sngd_jax.capture_nnx(loss)(model, jnp.ones((3, 4)))
  assert sorted(acts) == ["out"]


@pytest.mark.parametrize("fisher, stacked, pattern", [
    ({"Dense_0/kernel": None}, None,
     r"`fisher` key 'Dense_0/kernel' names no layer.*Did you mean 'Dense_0'"),
    ({"Dense_9": "rfim"}, None, r"`fisher` key 'Dense_9' names no layer.*'head/Dense_1'"),
    ({"head/Dense_1/bias": None}, None, r"Did you mean 'head/Dense_1'"),
    (None, {"blocks": 1}, r"`stacked` key 'blocks' names no layer"),
])
def test_option_keys_that_name_no_layer_warn_at_init(fisher, stacked, pattern):
  """A ``fisher`` / ``stacked`` key that names no layer had no effect and said nothing (a
  parameter path instead of the layer path was the usual cause)."""
  p = _params()
  kwargs = {"fisher": fisher or "linear", "stacked": stacked}
  with pytest.warns(UserWarning, match=pattern):
    tx = sngd_jax.sngd(**kwargs)
    tx.init(p)


def test_option_keys_that_name_layers_do_not_warn():
  import warnings  # noqa: PLC0415
  p = _params()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sngd_jax.sngd(fisher={"Dense_0": "rfim", "head/Dense_1": None},
                  stacked={"head": 0}).init(p)


def test_params_without_any_layer_but_activations_raise():
  """``optax.flatten(sngd)`` made SNGD see one vector, no layer, and pass the gradient
  through: plain SGD with no message."""
  import optax  # noqa: PLC0415
  p = _params()
  tx = optax.flatten(sngd_jax.sngd())
  with pytest.warns(UserWarning, match="sngd: found no layer in the params"):
    state = tx.init(p)  # init already sees the one vector
  with pytest.raises(ValueError, match=r"one vector.*optax.flatten"):
    tx.update(p, state, p, activations=_acts(p))


@pytest.mark.parametrize("sep", [None, "/"])
def test_params_flattened_by_traverse_util_raise(sep):
  """Params kept as ``flax.traverse_util.flatten_dict(params)`` (tuple keys, or ``sep='/'``)
  hold no nested layer: ``sngd`` found none and passed every gradient through unchanged, plain
  SGD with no message, the activations ignored as a frozen layer's. Now the error names the
  key and the fix; the unflattened params get the preconditioned update."""
  from flax import traverse_util  # noqa: PLC0415
  p = _params()
  flat = traverse_util.flatten_dict(p, sep=sep)
  with (pytest.raises(ValueError, match=r"flattened dict.*'Dense_0'.*unflatten_dict"),
        pytest.warns(UserWarning, match="sngd: found no layer in the params")):
    _update(flat, _acts(p))  # init warns (no nested layer), update names the fix
  nested = traverse_util.unflatten_dict(flat, sep=sep)
  updates, _ = _update(nested, _acts(p))
  expected, _ = _update(p, _acts(p))
  jax.tree.map(np.testing.assert_array_equal, updates, expected)
  assert not np.allclose(updates["Dense_0"]["kernel"], p["Dense_0"]["kernel"])


def test_changing_the_trained_layers_needs_a_new_state():
  """A head trained first, then the whole model unfrozen (new ``multi_transform`` labels):
  the phase-1 state lacks the unfrozen layers; the error lists them and points to the fix,
  a state made by ``init``, after which the unfrozen layer gets SNGD's update (not zero, not
  the raw gradient)."""
  p = _params()
  make = lambda labels: optax.multi_transform(
      {"sngd": sngd_jax.sngd(), "frozen": optax.set_to_zero()}, labels)
  tx1 = make({"Dense_0": "frozen", "head": "sngd"})
  _, state1 = tx1.update(p, tx1.init(p), p, activations=_acts(p))
  tx2 = make({"Dense_0": "sngd", "head": "sngd"})
  with pytest.raises(ValueError, match=r"not in the state: \['Dense_0'\].*After changing which "
                     r"layers are trained.*make the new optimizer's state with `init`"):
    tx2.update(p, state1, p, activations=_acts(p))
  updates, _ = tx2.update(p, tx2.init(p), p, activations=_acts(p))
  expected, _ = _update(p, _acts(p))
  jax.tree.map(np.testing.assert_array_equal, updates, expected)


def test_stack_as_long_as_the_input_axis_gives_the_fix():
  """A scanned Dense with ``in_features == depth``: its bias ``(L, O)`` also fits the kernel's
  trailing ``(I, O)``, so the params read as an unstacked DenseGeneral; the error names the
  ``stacked=`` fix, which then works (the scanned layers' equality with the unrolled model:
  tests/test_transforms.py)."""
  import flax.linen as nn  # noqa: PLC0415

  depth = 3

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(depth, name="d")(x)), None

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=depth)(name="blocks")(x, None)[0]

  model = Model()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, depth)), jnp.float32)
  p = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)
  (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(p)
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match=re.escape("pass `stacked={'blocks/d': 1}`")):
    tx.update(g, tx.init(p), p, activations=acts)
  tx = sngd_jax.sngd(stacked={"blocks/d": 1})
  updates, _ = tx.update(g, tx.init(p), p, activations=acts)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_state_cast_to_bfloat16_names_the_layer():
  """An optimizer state cast to bfloat16 wholesale (a memory-saving move for Adam moments)
  failed inside XLA's lowering of LAPACK with no `sngd:` message."""
  p = _params()
  tx = sngd_jax.sngd()
  state = jax.tree.map(
      lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      tx.init(p))
  with pytest.raises(TypeError, match=r"layer 'Dense_0'.*bfloat16.*not the `SNGDState`"):
    tx.update(p, state, p, activations=_acts(p))


def test_every_layer_left_out_is_not_the_no_layer_error():
  """``fisher`` None for every layer is a choice: the gradient passes through, no error."""
  p = _params()
  updates, _ = _update(p, _acts(p), fisher={"Dense_0": None, "head/Dense_1": None})
  jax.tree.map(np.testing.assert_array_equal, updates, p)


def test_ready_statistics_that_do_not_fit_are_named():
  """``update(..., statistics=)``: ready batch estimates equal ``activations=``'s update; a
  missing or extra layer is named as such, and an estimate narrower than the factor (integer,
  bfloat16) is refused naming the layer, not cast silently or failing in numpy."""
  from helpers_mlp import grads_and_acts, make_problem

  from sngd_jax._src import transform as sngd_transform

  _, params, x, y, loss_fn = make_problem(dtype=jnp.float32)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  tx = sngd_jax.sngd()
  state = tx.init(params)
  est, _ = sngd_transform.local_statistics(grads, state, acts)
  via_acts, _ = tx.update(grads, state, params, activations=acts)
  via_stats, _ = tx.update(grads, state, params, statistics=est)
  for a, b in zip(jax.tree.leaves(via_acts), jax.tree.leaves(via_stats), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  first, *_ = sorted(est)
  fewer = {p: v for p, v in est.items() if p != first}
  with pytest.raises(ValueError, match=re.escape(f"missing from `statistics=`: ['{first}']")):
    tx.update(grads, state, params, statistics=fewer)
  with pytest.raises(ValueError, match=re.escape("not layers of the updates: ['ghost']")):
    tx.update(grads, state, params, statistics={**est, "ghost": est[first]})
  for dtype in (jnp.int32, jnp.bfloat16):
    narrow = {**est, first: est[first].astype(dtype)}
    with pytest.raises(ValueError, match=f"layer '{first}'.*{jnp.dtype(dtype).name}"):
      tx.update(grads, state, params, statistics=narrow)


def _three_kinds():
  """A linen, an NNX and an Equinox model of one Dense layer, with params and a batch."""
  import flax.linen as nn  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  eqx = pytest.importorskip("equinox")
  x = jnp.ones((6, 5))
  linen = nn.Dense(3)
  return {"linen": linen, "params": linen.init(jax.random.key(0), x)["params"],
          "nnx": nnx.Linear(5, 3, rngs=nnx.Rngs(0)),
          "equinox": eqx.nn.Linear(5, 3, key=jax.random.key(0)), "x": x}


def test_coverage_given_a_model_for_the_loss_says_the_call_to_write():
  """``coverage(model, params, x)`` (a linen Module where the loss goes) ended in Flax's
  ``CallCompactUnboundModuleError``; an NNX model (``coverage(model, x)``) gave a report of
  ``x``'s "params" with no layer, an Equinox one a shape error. Each raises a TypeError with
  the call to write, and that call gives the report of the model's layer."""
  m = _three_kinds()
  calls = {
      "linen": (lambda: sngd_jax.coverage(m["linen"], m["params"], m["x"]),
                r"sngd_jax\.coverage\(lambda params, x: model\.apply\(\{'params': params\}, x\), "
                r"params, x\)"),
      "nnx": (lambda: sngd_jax.coverage(m["nnx"], m["x"]),
              r"sngd_jax\.coverage\(lambda model, x: model\(x\), model, x\)"),
      "equinox": (lambda: sngd_jax.coverage(m["equinox"], m["x"]),
                  r"sngd_jax\.coverage\(lambda model, x: jax\.vmap\(model\)\(x\), model, x\)"),
      "swapped": (lambda: sngd_jax.coverage(m["params"], lambda p, x: x, m["x"]),
                  r"got a `dict` \(not callable\).*sngd_jax\.coverage\(lambda params"),
  }
  for call, fix in calls.values():
    with pytest.raises(TypeError, match=r"`coverage` takes the loss function first.*" + fix):
      call()
  model = m["linen"]
  written = {  # the calls the messages give
      "linen": sngd_jax.coverage(lambda params, x: model.apply({'params': params}, x),
                                 m["params"], m["x"]),
      "nnx": sngd_jax.coverage(lambda model, x: model(x), m["nnx"], m["x"]),
      "equinox": sngd_jax.coverage(lambda model, x: jax.vmap(model)(x), m["equinox"], m["x"]),
  }
  for kind, report in written.items():
    assert len(report.preconditioned) == 2 and not report.missing, (kind, str(report))


def test_capture_given_a_model_or_the_wrong_kind_of_model_says_what_to_write():
  """``capture(model)`` of a linen Module failed at its call with Flax's
  ``CallCompactUnboundModuleError``; ``capture_nnx(model)(x)`` and ``capture_eqx(model)``
  ran the model on the batch and captured nothing (``{}``), as did ``capture`` of a loss
  given an NNX or Equinox model. Each raises a TypeError naming the capture and the call
  to write. (A model passed after the batch to ``capture_nnx``/``capture_eqx``'s function
  is warned about: ``test_capture_aux.py``.)"""
  m = _three_kinds()
  linen_loss = lambda p, x: jnp.sum(m["linen"].apply({"params": p}, x))
  model_loss = lambda model, x: jnp.sum(model(x))
  cases = [
      (lambda: sngd_jax.capture(m["linen"]), r"`capture` takes the loss function.*linen model "
       r"`Dense` itself.*sngd_jax\.capture\(loss_fn\)\(params, x, y\)"),
      (lambda: sngd_jax.capture(m["nnx"]), r"NNX model `Linear`.*sngd_jax\.capture_nnx"),
      (lambda: sngd_jax.capture({"not": "callable"}), r"got a `dict` \(not callable\)"),
      (lambda: sngd_jax.capture_nnx(m["nnx"]), r"`capture_nnx` takes the loss function.*NNX "
       r"model `Linear` itself.*sngd_jax\.capture_nnx\(loss_fn\)\(model, x, y\)"),
      (lambda: sngd_jax.capture_nnx(m["linen"]), r"linen model.*sngd_jax\.capture\(loss_fn\)"),
      (lambda: sngd_jax.capture_eqx(m["equinox"]), r"`capture_eqx` takes the loss function.*"
       r"Equinox model `Linear` itself.*sngd_jax\.capture_eqx\(loss_fn\)\(model, x, y\)"),
      (lambda: sngd_jax.capture(model_loss)(m["nnx"], m["x"]),
       r"`capture` records linen modules.*NNX model `Linear`.*sngd_jax\.capture_nnx\(loss_fn\)"),
      (lambda: sngd_jax.capture(lambda model, x: jnp.sum(jax.vmap(model)(x)))(
          m["equinox"], m["x"]), r"Equinox model `Linear`.*sngd_jax\.capture_eqx\(loss_fn\)"),
  ]
  for call, pattern in cases:
    with pytest.raises(TypeError, match=pattern):
      call()
  # the right calls record the layer
  assert list(sngd_jax.capture(linen_loss)(m["params"], m["x"])[1]) == [""]  # the root Dense
  assert len(sngd_jax.capture_nnx(model_loss)(m["nnx"], m["x"])[1]) == 1
  assert len(sngd_jax.capture_eqx(lambda model, x: jnp.sum(jax.vmap(model)(x)))(
      m["equinox"], m["x"])[1]) == 1


def test_presets_name_a_non_array_leaf_of_the_params_in_update():
  """An Equinox model passed whole to ``update`` (``params=model``, not ``eqx.filter(model,
  eqx.is_array)``): ``sngd_momentum``/``sngd_adam`` failed inside optax's weight-decay masking
  with a bare "pytree structure error: different types at key path"; ``init`` already named
  the leaf and the fix. The check changes no update: with the filtered params the presets
  equal the chains they are documented to be, built here by hand from optax."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.key(0))
  x, y = jnp.linspace(-1, 1, 24).reshape(6, 4), jnp.arange(6) % 3
  loss_fn = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(
      jax.vmap(m)(x), y).mean()
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss_fn), has_aux=True)(
      model, x, y)
  params = eqx.filter(model, eqx.is_inexact_array)
  kernels = lambda p: jax.tree.map(lambda a: a.ndim >= 2, p)
  presets = {
      "sngd_momentum": (sngd_jax.sngd_momentum(0.1, weight_decay=0.3),
                        optax.chain(sngd_jax.sngd(), optax.add_decayed_weights(0.3, kernels),
                                    optax.sgd(0.1, momentum=0.9))),
      "sngd_adam": (sngd_jax.sngd_adam(1e-2, weight_decay=0.3),
                    optax.chain(sngd_jax.sngd(), optax.adamw(1e-2, weight_decay=0.3,
                                                             mask=kernels))),
  }
  for name, (tx, reference) in presets.items():
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"sngd: the params hold a custom_jvp at 'activation', "
                                        r"not an array: pass only the arrays to `init` and "
                                        r"`update` \(an Equinox model: `eqx.filter\(model, "
                                        r"eqx.is_array\)`\)"):
      tx.update(grads, state, model, activations=acts)
    got, _ = tx.update(grads, state, params, activations=acts)
    want, _ = reference.update(grads, reference.init(params), params, activations=acts)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-8,
                                 err_msg=name)


def test_no_sngd_warnings_helper_catches_the_library_warnings_only():
  """``helpers_warnings.no_sngd_warnings`` (test_rl, test_two_models) turns a warning of the
  library into an error, so those tests fail if one is raised, and lets others through."""
  with no_sngd_warnings(), pytest.raises(UserWarning, match="sngd: fisher='tied'"):
    sngd_jax.sngd(fisher={"Embed_0": "tied"}, max_norm=None)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with no_sngd_warnings():
      warnings.warn("not the library's", DeprecationWarning, stacklevel=1)
  assert [str(w.message) for w in caught] == ["not the library's"]


# --- init's warning for params in which no layer is found -----------------------------------

# two arrays under names no layer is found by (a hand-written `x @ p["a"] + p["c"]`)
_NO_LAYER = {"a": jnp.ones((4, 3)), "c": jnp.zeros(3)}
_NO_LAYER_WARNING = r"found no layer in the params \(2 array\(s\): 'a', 'c'\)"


def test_coverage_of_params_without_a_layer_does_not_warn():
  """``coverage`` is what init's no-layer warning sends the user to, and its report lists every
  leaf as a pass-through: its own ``init`` of those params gave the same warning again (at the
  user's ``coverage`` line), pointing to ``coverage``."""
  x = jnp.ones((2, 4))
  with no_sngd_warnings():
    report = sngd_jax.coverage(lambda p, x: jnp.sum(x @ p["a"] + p["c"]), _NO_LAYER, x)
  assert [(p.path, p.fisher) for p in report.params] == [
      ("a", coverage_lib.PASS_THROUGH), ("c", coverage_lib.PASS_THROUGH)]
  with pytest.warns(UserWarning, match=_NO_LAYER_WARNING):  # init itself still warns
    sngd_jax.sngd().init(_NO_LAYER)


def _wrapped_inits():
  """``init`` of sngd under the optax wrappers that call it, by name."""
  from flax import nnx  # noqa: PLC0415

  class Raw(nnx.Module):
    def __init__(self):
      self.a, self.c = nnx.Param(_NO_LAYER["a"]), nnx.Param(_NO_LAYER["c"])

  class Linear(nnx.Module):
    def __init__(self):
      self.l = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

  nested = lambda: optax.chain(optax.clip(1.0), optax.chain(sngd_jax.sngd(), optax.sgd(0.1)))
  return {
      "chain": lambda p: nested().init(p),
      "MultiSteps": lambda p: sngd_jax.MultiSteps(sngd_jax.sngd(), every_k_schedule=2).init(p),
      "inject_hyperparams": lambda p: optax.inject_hyperparams(sngd_jax.sngd_momentum)(
          learning_rate=0.1).init(p),
      "apply_if_finite": lambda p: optax.apply_if_finite(sngd_jax.sngd(), 2).init(p),
      "nnx.Optimizer": lambda p: nnx.Optimizer(Raw() if "a" in p else Linear(),
                                               sngd_jax.sngd(), wrt=nnx.Param),
  }


@pytest.mark.parametrize("wrapper", list(_wrapped_inits()))
def test_no_layer_warning_under_optax_wrappers(wrapper):
  """Under each wrapper that calls ``init`` the warning is given once, at the user's line,
  for params without a layer, and not for params with one."""
  init = _wrapped_inits()[wrapper]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    init(_NO_LAYER)
  found = [w for w in caught if re.search(_NO_LAYER_WARNING, str(w.message))]
  assert len(found) == 1 and found[0].filename == __file__, [str(w.message) for w in caught]
  with no_sngd_warnings():
    init(_params())


def test_no_layer_warning_under_masked_and_partitioned_optimizers():
  """sngd given no array (masked off, or no label of its own) and sngd given a part of the
  layers: no warning; sngd given only the biases finds no layer: warned."""
  p = _params()
  is_kernel = jax.tree_util.tree_map_with_path(lambda path, _: "kernel" in str(path), p)
  labels = {"Dense_0": {"kernel": "sngd", "bias": "sngd"}, "head": {"Dense_1": {"kernel": "a"}}}
  with no_sngd_warnings():
    optax.masked(sngd_jax.sngd(), jax.tree.map(lambda _: False, p)).init(p)
    optax.masked(sngd_jax.sngd(), is_kernel).init(p)
    optax.multi_transform({"sngd": sngd_jax.sngd(), "a": optax.adam(1e-3)}, labels).init(p)
    optax.multi_transform({"sngd": sngd_jax.sngd(), "a": optax.adam(1e-3)},
                          jax.tree.map(lambda _: "a", p)).init(p)
    sngd_jax.sngd(fisher=lambda path: None).init(p)  # every layer left out on purpose
  with pytest.warns(UserWarning, match=r"found no layer in the params \(1 array\(s\): "
                                       r"'Dense_0/bias'\)"):
    optax.masked(sngd_jax.sngd(), jax.tree.map(lambda k: not k, is_kernel)).init(p)


# --- the capture functions the errors name ---------------------------------------------------


def test_missing_activations_errors_name_every_capture_function():
  """``update`` without activations, or with none captured (the loss wrapped by the capture of
  another framework), names the capture of each framework, Haiku's ``capture_hk`` too."""
  p = _params()
  for acts, match in ((None, r"needs `activations=`"), ({}, r"No layer at all was captured")):
    with pytest.raises(ValueError, match=match) as raised:
      _update(p, acts)
    for name in ("capture`", "capture_nnx", "capture_eqx", "capture_hk"):
      assert f"sngd_jax.{name}" in str(raised.value), (name, str(raised.value))


def test_params_read_with_haiku_names_say_so_when_not_captured():
  """Once ``haiku`` is imported, a linen layer whose params are named ``w``/``b`` is read with
  Haiku's names (as a kernel and its bias) and ``capture`` records no call of it: the error
  says why the names were read so and gives both ways out; a linen ``kernel`` gets no such
  hint."""
  pytest.importorskip("haiku")
  import flax.linen as nn  # noqa: PLC0415

  class WB(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 3))
      return x @ w + self.param("b", nn.initializers.zeros, (3,))

  x = jnp.ones((4, 5))
  params = WB().init(jax.random.key(0), x)["params"]
  assert list(sngd_jax.discover(params)) == [""]  # read as one Haiku layer at the root
  loss = lambda p: jnp.sum(WB().apply({"params": p}, x) ** 2)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  with pytest.raises(ValueError, match=r"read with Haiku's names \('w' as a 'kernel'\).*"
                     r"`sngd_jax.capture_hk`.*`fisher=\{'': None\}`.*`kernel` and `bias`"):
    _update(params, acts, grads=grads)
  updates, _ = _update(params, acts, grads=grads, fisher={"": None})  # the way out: untouched
  jax.tree.map(np.testing.assert_array_equal, updates, grads)
  with pytest.raises(ValueError, match=r"no activations were captured") as raised:
    _update(_params(), {})
  assert "Haiku's names" not in str(raised.value)


def test_capture_hk_and_coverage_given_a_haiku_model_say_what_to_write():
  """``capture_hk(model)`` (the ``hk.transform``ed model, not a loss applying it) and
  ``capture_hk(None)`` raised a ``KeyError: 'capture_hk'`` from the message's own table instead
  of the documented ``TypeError``; ``coverage(model, params, x)`` suggested a linen call."""
  hk = pytest.importorskip("haiku")
  model = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x)))
  with_state = hk.transform_with_state(lambda x: hk.Linear(2)(x))
  write = (r"For a Haiku model write `sngd_jax.capture_hk\(loss_fn\)\(params, x, y\)` with e.g. "
           r"`def loss_fn\(params, x, y\): return jnp.mean\(\(model.apply\(params, x\)")
  for m in (model, with_state):
    with pytest.raises(TypeError, match=rf"`capture_hk` takes the loss function.*it got the "
                                        rf"Haiku model `{type(m).__name__}` itself. {write}"):
      sngd_jax.capture_hk(m)
  with pytest.raises(TypeError, match=r"`capture_hk` takes.*a `NoneType` \(not callable\)\. "
                                      r"For a Haiku model write"):
    sngd_jax.capture_hk(None)
  x = jnp.ones((3, 4))
  params = model.init(jax.random.key(0), x)
  with pytest.raises(TypeError, match=r"got the Haiku model `Transformed` in place of `loss_fn`.*"
                     r"`sngd_jax.coverage\(lambda params, x: model.apply\(params, x\), params, "
                     r"x\)`"):
    sngd_jax.coverage(model, params, x)
  assert sngd_jax.coverage(model.apply, params, x).params[0].fisher.startswith("(with linear/w)")


def test_rfim_without_outputs_names_every_capture_function():
  """``update`` with fisher='rfim' and no outputs says to capture them, with each framework's
  capture, Haiku's ``capture_hk`` too."""
  p = _params()
  acts = {k: tuple(c.replace(outputs=None) for c in v) for k, v in _acts(p).items()}
  with pytest.raises(ValueError, match=r"fisher='rfim'.*outputs=True.*`capture_nnx`, "
                                       r"`capture_eqx`, `capture_hk` the same"):
    _update(p, acts, fisher="rfim")


def test_no_layer_warning_says_when_a_linen_name_keeps_haiku_names_unread():
  """A Haiku model with a custom ``hk.get_parameter("bias", ...)``: the tree holds a linen
  name, so Haiku's ``w``/``b`` are not read and no layer is found. The warning said that
  Haiku's names are read once ``haiku`` is imported, which it was; it now names the leaf that
  keeps them unread. Without that leaf the layer is found and nothing is said."""
  hk = pytest.importorskip("haiku")

  def fn(x):
    return hk.Linear(2)(x) + hk.get_parameter("bias", (2,), init=jnp.zeros)

  params = hk.without_apply_rng(hk.transform(fn)).init(jax.random.key(0), jnp.ones((1, 3)))
  assert sngd_jax.discover(params) == {}
  with pytest.warns(UserWarning, match=r"found no layer.*These params hold Haiku layers' leaves, "
                    r"but also the linen name '~/bias'.*rename that param"):
    sngd_jax.sngd().init(params)
  renamed = {k: v for k, v in params.items() if k != "~"}
  with no_sngd_warnings():
    sngd_jax.sngd().init(renamed)
  assert list(sngd_jax.discover(renamed)) == ["linear"]
  with pytest.warns(UserWarning, match=r"found no layer") as caught:  # no Haiku leaves: no hint
    sngd_jax.sngd().init({"shift": {"bias": jnp.zeros(2)}})
  assert "Haiku layers' leaves" not in str(caught[0].message)


def test_haiku_channels_first_conv_bias_gives_the_haiku_fix():
  """``hk.Conv2D(..., data_format="NCHW")`` keeps its bias as ``(O, 1, 1)``, which fits no
  modelled layer: ``init`` and ``coverage`` said to check whether the kernel is laid out inputs
  first (as ``ConvTranspose(transpose_kernel=True)``), which is not the cause; they now say
  what to build instead. A linen kernel with such a bias keeps the general fix."""
  hk = pytest.importorskip("haiku")
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.Conv2D(3, 3, data_format="NCHW", name="conv")(x)))
  x = jnp.ones((1, 2, 4, 4))
  params = model.init(jax.random.key(0), x)
  assert params["conv"]["b"].shape == (3, 1, 1)
  fix = (r"a Haiku conv with a channels-first `data_format` keeps its bias as \(3, 1, 1\): "
         r"build it with `with_bias=False`.*or channels last, or leave it to the next transform "
         r"with `fisher=\{'conv': None\}`")
  with pytest.raises(ValueError, match=r"layer 'conv': bias shape \(3, 1, 1\).*\. A Haiku conv"):
    sngd_jax.sngd().init(params)
  row = {p.path: p.fisher for p in sngd_jax.coverage(model.apply, params, x).params}["conv/w"]
  assert re.search(fix, " ".join(row.split())), row
  no_bias = hk.without_apply_rng(hk.transform(
      lambda x: hk.Conv2D(3, 3, data_format="NCHW", with_bias=False, name="conv")(x)))
  assert list(sngd_jax.discover(no_bias.init(jax.random.key(0), x))) == ["conv"]
  linen = {"conv": {"kernel": jnp.ones((3, 3, 2, 3)), "bias": jnp.ones((3, 1, 1))}}
  with pytest.raises(ValueError, match=r"transpose_kernel=True") as raised:
    sngd_jax.sngd().init(linen)
  assert "Haiku" not in str(raised.value)
