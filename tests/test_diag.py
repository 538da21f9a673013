"""Embeddings (diagonal factor from token counts) and normalization scale/bias
(per-channel 2x2 blocks over [xhat; 1]): one update vs a float64 reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import exact_sngd

import sngd_jax
from sngd_jax._src import statistics as factors
from sngd_jax._src.inverse import diagonal

F64 = dict(param_dtype=jnp.float64)


pytestmark = pytest.mark.usefixtures("x64")


def _grads_updates(model, params, *inputs, tx=None, state=None, **kwargs):
  loss = lambda p, *a: jnp.sum(jnp.sin(model.apply({"params": p}, *a, **kwargs)))
  tx = tx or exact_sngd(**ref.one_step_kwargs())
  state = tx.init(params) if state is None else state
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, *inputs)
  updates, state = jax.jit(tx.update)(grads, state, params, activations=acts)
  return grads, updates, state


class Emb(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    return nn.Embed(9, 3, name="emb", **F64)(tokens)


def test_embedding_update_divides_each_row_by_its_damped_frequency():
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])  # 3, 5, 6, 8 never appear
  model = Emb()
  params = model.init(jax.random.key(0), tokens)["params"]
  grads, updates, _ = _grads_updates(model, params, tokens)
  counts = np.zeros(9)
  for t in np.asarray(tokens).ravel():
    counts[t] += 1
  freq = counts / counts.sum()
  expect = np.asarray(grads["emb"]["embedding"]) / (
      freq + ref.DAMPING * freq.sum())[:, None]
  np.testing.assert_allclose(updates["emb"]["embedding"], expect, rtol=1e-10)
  # a row's update is its mean per-occurrence gradient (up to damping); unseen rows stay 0
  assert np.all(np.asarray(updates["emb"]["embedding"])[[3, 5, 6, 8]] == 0)


def test_embedding_average_starts_from_its_scaled_identity_prior():
  """Default prior and decay: f_1 = d P + (1 - d) f^_1, P = mean(f^_1) on every token."""
  tokens = jnp.array([[1, 4, 4, 0, 4, 2]])
  model = Emb()
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = exact_sngd(damping=1e-3, decay=0.9)
  grads, updates, state = _grads_updates(model, params, tokens, tx=tx)
  f_hat = np.bincount(np.asarray(tokens).ravel(), minlength=9) / 6
  f = 0.9 * f_hat.mean() + 0.1 * f_hat
  np.testing.assert_allclose(state.factors["emb"], f, rtol=1e-12)
  expect = np.asarray(grads["emb"]["embedding"]) / (f + 1e-3 * f.sum())[:, None]
  np.testing.assert_allclose(updates["emb"]["embedding"], expect, rtol=1e-10)


class Tied(nn.Module):
  """A table used for the lookup and, through a hidden layer, as the output layer."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(9, 3, **F64)
    h = jnp.tanh(nn.Dense(3, **F64)(emb(tokens)))
    return emb.attend(h)


def test_tied_embedding_is_refused_with_the_fix():
  tokens = jnp.array([[1, 2]])
  model = Tied()
  params = model.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match=r"attend.*fisher=\{'Embed_0': 'tied'\}.*"
                                       r"fisher=\{'Embed_0': None\}"):
    _grads_updates(model, params, tokens)
  report = sngd_jax.coverage(lambda p, t: jnp.sum(model.apply({"params": p}, t)), params, tokens)
  row = {r.path: r.fisher for r in report.params}["Embed_0/embedding"]
  assert row.startswith("MISSING") and "fisher={'Embed_0': 'tied'}" in row
  tx = exact_sngd(fisher={"Embed_0": None})
  grads, updates, _ = _grads_updates(model, params, tokens, tx=tx)   # passes through
  np.testing.assert_array_equal(updates["Embed_0"]["embedding"], grads["Embed_0"]["embedding"])


class TiedByHand(nn.Module):
  """``Tied`` with the output layer written as ``h @ E^T`` instead of ``attend``."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(9, 3, **F64)
    h = jnp.tanh(nn.Dense(3, **F64)(emb(tokens)))
    return h @ emb.embedding.T


def test_tied_output_written_by_hand_gets_the_lookups_diagonal_only():
  """docs/layer-coverage.md: ``h @ embed.embedding.T`` is not seen as a use of the table: the
  summed gradient of both uses is divided by each token's damped lookup frequency, so a row
  never looked up (its gradient the output use's alone) gets ``g / damping``."""
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])  # 3, 5, 6, 8 never looked up
  model = TiedByHand()
  params = model.init(jax.random.key(0), tokens)["params"]
  grads, updates, state = _grads_updates(model, params, tokens)
  assert set(state.factors) == {"Embed_0", "Dense_0"}
  g = np.asarray(grads["Embed_0"]["embedding"], np.float64)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=9) / tokens.size
  np.testing.assert_allclose(updates["Embed_0"]["embedding"],
                             g / (freq + ref.DAMPING)[:, None], rtol=1e-10)
  unseen = [3, 5, 6, 8]
  assert np.all(np.abs(g[unseen]) > 1e-6)  # the output use's gradient reaches them
  np.testing.assert_allclose(np.asarray(updates["Embed_0"]["embedding"])[unseen],
                             g[unseen] / ref.DAMPING, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_tied_embedding_is_preconditioned_as_both_layers():
  """fisher='tied': Delta E = (D + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}.

  ``D = diag(f)`` is the lookup's local Fisher (token frequencies of the lookups),
  ``G_h = E[h h^T]`` the output layer's (over the ``attend`` queries ``h``, no bias row),
  ``g_E`` the sum of both uses' gradients: exact gradient descent on the reconstructed
  network in which both uses read ``E = D^{-1/2} E' G_h^{-1/2}``.
  """
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])
  model = Tied()
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = exact_sngd(fisher={"Embed_0": "tied"}, **ref.one_step_kwargs())
  grads, updates, state = _grads_updates(model, params, tokens, tx=tx)
  e = np.asarray(params["Embed_0"]["embedding"], np.float64)
  dense = params["Dense_0"]
  h = np.tanh(e[np.asarray(tokens)] @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"]))
  g_e = np.asarray(grads["Embed_0"]["embedding"], np.float64)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=9) / tokens.size
  rows = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  expect = ref.damped_solve(ref.linear_factor(h.reshape(-1, 3), bias=False), rows.T).T
  np.testing.assert_allclose(updates["Embed_0"]["embedding"], expect, rtol=1e-9)
  np.testing.assert_allclose(state.factors["Embed_0"], freq, rtol=1e-12)
  assert set(state.factors) == {"Embed_0", "Embed_0[attend]", "Dense_0"}
  # the other layers are as without the tie: the Dense layer's exact update
  x = e[np.asarray(tokens)].reshape(-1, 3)
  kernel, bias = ref.dense_update(x, grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"])
  np.testing.assert_allclose(updates["Dense_0"]["kernel"], kernel, rtol=1e-9)
  np.testing.assert_allclose(updates["Dense_0"]["bias"], bias, rtol=1e-9)
  report = sngd_jax.coverage(lambda p, t: jnp.sum(model.apply({"params": p}, t)), params,
                             tokens, fisher={"Embed_0": "tied"})
  row = {r.path: r for r in report.params}["Embed_0/embedding"]
  assert row.fisher == "tied: diagonal/embed 9 + linear/attend 3x3"
  assert row.inverse == "diagonal + cholesky"


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_tied_trust_region_uses_the_kronecker_norm():
  """q = <g_E, u_E> for the tied table: max_norm scales the update by min(1, r / sqrt(q))."""
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])
  model = Tied()
  params = model.init(jax.random.key(0), tokens)["params"]
  kwargs = {**ref.one_step_kwargs(), "fisher": {"Embed_0": "tied", "Dense_0": None}}
  _, free, _ = _grads_updates(model, params, tokens, tx=exact_sngd(**kwargs))
  grads, clipped, state = _grads_updates(model, params, tokens,
                                         tx=exact_sngd(**{**kwargs, "max_norm": 1e-3}))
  u = np.asarray(free["Embed_0"]["embedding"])
  q = np.vdot(np.asarray(grads["Embed_0"]["embedding"]), u)
  assert q > 1e-6  # so that the radius clips
  np.testing.assert_allclose(clipped["Embed_0"]["embedding"], u * 1e-3 / np.sqrt(q), rtol=1e-9)
  # the diagnostic reads the table once, from the state or from the update
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state), 1e-3 / np.sqrt(q),
                             rtol=1e-8)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state, clipped),
                             1e-3 / np.sqrt(q), rtol=1e-8)


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_tied_setting_errors_name_the_layer():
  tokens = jnp.array([[1, 2]])
  params = Emb().init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match=r"'emb' has fisher='tied'.*never used its table as "
                                       r"the output layer"):
    _grads_updates(Emb(), params, tokens, tx=exact_sngd(fisher={"emb": "tied"}))

  class OutputOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Embed(9, 3, **F64).attend(x)

  x = jnp.ones((2, 3))
  params = OutputOnly().init(jax.random.key(0), x)["params"]
  with pytest.raises(ValueError, match=r"'Embed_0' has fisher='tied'.*never looked up"):
    _grads_updates(OutputOnly(), params, x, tx=exact_sngd(fisher={"Embed_0": "tied"}))
  dense_params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"'Dense_0', which is not an embedding"):
    sngd_jax.sngd(fisher={"Dense_0": "tied"}).init(dense_params)
  with pytest.raises(ValueError, match=r"name it: fisher=\{'<embedding path>': 'tied'\}"):
    sngd_jax.sngd(fisher="tied")
  # The warning names the caller's line, whichever public function built the configuration.
  for make in (sngd_jax.sngd, lambda **kw: sngd_jax.sngd_momentum(0.1, **kw),
               lambda **kw: sngd_jax.sngd_adam(1e-3, **kw)):
    with pytest.warns(UserWarning, match=r"'tied' with max_norm=None.*keep max_norm") as rec:
      make(fisher={"emb": "tied"}, max_norm=None)
    assert rec[0].filename == __file__, rec[0].filename


def test_injected_max_norm_with_tied_does_not_warn():
  """The state records injected options as None; that is not `max_norm=None` (it warned)."""
  import warnings  # noqa: PLC0415

  import optax  # noqa: PLC0415
  params = {"Embed_0": {"embedding": jnp.ones((5, 3))}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx = optax.inject_hyperparams(sngd_jax.sngd_adam)(1e-3, fisher={"Embed_0": "tied"})
    state = tx.init(params)
  assert state.hyperparams["max_norm"] == 1.0


def test_diagonal_refresh_and_apply():
  f = jnp.array([0.5, 0.25, 0.25, 0.0])
  inv, ok = diagonal.refresh(f, 0.1, 0.01)
  np.testing.assert_allclose(inv, 1.0 / (np.asarray(f) + 0.1 + 0.01))
  assert bool(ok)
  g = jnp.arange(8.0).reshape(4, 2)
  np.testing.assert_allclose(diagonal.apply(inv, g), np.asarray(g) * np.asarray(inv)[:, None])
  assert factors.prior_of("scaled_identity", f).tolist() == [0.25] * 4


# --- normalization ------------------------------------------------------------------

def _xhat_layer(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _xhat_rms(x, eps=1e-6):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _xhat_batch(x, eps=1e-5):
  axes = tuple(range(x.ndim - 1))
  return (x - x.mean(axes)) / np.sqrt(x.var(axes) + eps)


def _xhat_group(x, groups, eps=1e-6):
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, groups, c // groups)
  mu = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  return ((xg - mu) / np.sqrt(var + eps)).reshape(x.shape)


NORMS = {
    "layer": (lambda: nn.LayerNorm(**F64), _xhat_layer, {}),
    "rms": (lambda: nn.RMSNorm(**F64), _xhat_rms, {}),
    "batch": (lambda: nn.BatchNorm(use_running_average=False, **F64), _xhat_batch, {}),
    "group": (lambda: nn.GroupNorm(num_groups=2, **F64), lambda x: _xhat_group(x, 2), {}),
    "layer_no_bias": (lambda: nn.LayerNorm(use_bias=False, **F64), _xhat_layer, {}),
}


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("zero_scale", [False, True])
def test_norm_update_matches_per_channel_reference(name, zero_scale):
  """[d scale_c; d bias_c] = (G_c + damping tr(G_c) I)^{-1} [g scale_c; g bias_c],
  G_c = E[[xhat_c^2, xhat_c], [xhat_c, 1]], xhat from the raw input (also at scale 0)."""
  make, xhat_fn, _ = NORMS[name]

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return make()(x)

  x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (3, 4, 4), jnp.float64)
  model = Net()
  variables = model.init(jax.random.key(0), x)
  params = variables["params"]
  (norm,) = params
  if zero_scale:   # "zero-gamma" init: y does not reveal xhat, the capture must not need it
    params = {norm: {**params[norm], "scale": jnp.zeros_like(params[norm]["scale"])}}
  rest = {k: v for k, v in variables.items() if k != "params"}
  mutable = list(rest) or False

  def loss(p, x):
    y = model.apply({"params": p, **rest}, x, mutable=mutable)
    y = y[0] if mutable else y
    return jnp.sum(jnp.sin(y + 0.3 * x))

  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  tx = exact_sngd(**ref.one_step_kwargs())
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  xhat = xhat_fn(np.asarray(x)).reshape(-1, 4)
  g = grads[norm]
  scale, bias = ref.channel_update(xhat, np.asarray(g["scale"]),
                                   None if "bias" not in g else np.asarray(g["bias"]))
  np.testing.assert_allclose(updates[norm]["scale"], scale, rtol=1e-8, atol=1e-12)
  if bias is not None:
    np.testing.assert_allclose(updates[norm]["bias"], bias, rtol=1e-8, atol=1e-12)


def test_norm_without_scale_passes_bias_through():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm(use_scale=False)(x)

  x = jnp.ones((2, 3))
  model = Net()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x))
  report = sngd_jax.coverage(loss, params, x)
  assert report.pass_through == ["LayerNorm_0/bias"]


def test_a_stacked_table_from_nn_vmap_is_refused_with_the_fix():
  """nn.vmap over nn.Embed gives a (members, V, D) table: refused, naming the fix (it
  used to pass through silently while coverage listed it as a pass-through)."""

  class Members(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.vmap(nn.Embed, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=0, out_axes=0)(9, 3, **F64)
      return jnp.sum(jnp.sin(embed(tokens)))

  tokens = jnp.array([[1, 2], [3, 3]])
  model = Members()
  params = model.init(jax.random.key(0), tokens)["params"]
  (path,) = params
  with pytest.raises(ValueError, match=rf"layer '{path}': an embedding table of shape "
                                       rf"\(2, 9, 3\).*fisher=\{{'{path}': None\}}"):
    sngd_jax.sngd().init(params)
  report = sngd_jax.coverage(lambda p, t: model.apply({"params": p}, t), params, tokens)
  assert {r.path: r.fisher for r in report.params}[f"{path}/embedding"].startswith(
      "MISSING: an embedding table")
