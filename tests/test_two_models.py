"""One captured loss differentiated with respect to two trained models (a GAN's generator and
discriminator, an actor and a critic), each trained by its own optimizer.

``capture(loss, argnums=(0, 1))`` (and ``capture_nnx``, ``capture_eqx``) returns one
activations per model. Checked against independent float64 references: each optimizer's factor
is ``E[x~ x~^T]`` over the rows its own model's layers saw (the generator's first layer: the
noise ``z``; the discriminator's first layer: the real rows and the generated rows, each once),
each update is the damped solve of ``tests/np_reference.py``, and each equals the update made
with the activations of that model's loss captured alone. Without ``argnums``, a second
argument differentiated together with the first is an error naming it (before, its layers were
left out silently, and where both models have a ``'Dense_0'`` the discriminator's optimizer
took the generator's rows).
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx
from helpers_warnings import no_sngd_warnings
from np_reference import assert_factor

import sngd_jax

EXACT = ref.one_step_kwargs() | {"factor_every": 1}


def assert_dense_update(updates, grads, rows, kernel="kernel", bias="bias", transpose=False):
  """``updates`` of one dense layer against the float64 damped solve over ``rows``."""
  g_kernel, g_bias = np.asarray(grads[kernel]), np.asarray(grads[bias])
  if transpose:  # stored (out, in): Equinox, NNX hold (in, out)
    g_kernel = g_kernel.T
  want_kernel, want_bias = ref.dense_update(np.asarray(rows, np.float64), g_kernel, g_bias)
  got_kernel = np.asarray(updates[kernel])
  got_kernel = got_kernel.T if transpose else got_kernel
  scale = np.abs(want_kernel).max()
  np.testing.assert_allclose(got_kernel, want_kernel, rtol=1e-3, atol=1e-4 * scale)
  np.testing.assert_allclose(np.asarray(updates[bias]), want_bias, rtol=1e-3, atol=1e-4 * scale)


def assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5,  # float32, jit or not
                               atol=1e-5 * float(np.abs(np.asarray(y)).max()))


def relu(x):
  return np.maximum(x, 0.0)


def data():
  kz, kx = jax.random.split(jax.random.key(0))
  return jax.random.normal(kz, (32, 8)), 2.0 + jax.random.normal(kx, (32, 8))


# --- linen -------------------------------------------------------------------------------------

class Generator(nn.Module):
  @nn.compact
  def __call__(self, z):  # 'Dense_0' is the outer (16 -> 8), 'Dense_1' the inner (8 -> 16)
    return nn.Dense(8)(nn.relu(nn.Dense(16)(z)))


class Discriminator(nn.Module):
  @nn.compact
  def __call__(self, x):  # 'Dense_0' (16 -> 1) and 'Dense_1' (8 -> 16): the generator's paths
    return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))[..., 0]


G, D = Generator(), Discriminator()


def linen_problem():
  z, real = data()
  pg = G.init(jax.random.key(1), z)["params"]
  pd = D.init(jax.random.key(2), real)["params"]
  return pg, pd, z, real


def gan_loss(pg, pd, z, real):
  """The discriminator's logistic loss; the generator is trained on the same loss with the
  opposite sign (as the minimax game), so one loss gives both players' gradients."""
  fake = G.apply({"params": pg}, z)
  return (jnp.mean(jax.nn.softplus(-D.apply({"params": pd}, real)))
          + jnp.mean(jax.nn.softplus(D.apply({"params": pd}, fake))))


def gan_rows(weights, z, real, paths=("layers/0", "layers/1")):
  """The float64 inputs of every layer of a generator and a discriminator of two dense layers
  each: the generator's from ``z``; the discriminator's from the real rows and the generated
  rows. ``weights``: per model, its two layers' ``(kernel (in, out), bias)`` in the order they
  are applied; ``paths``: those layers' paths."""
  (g0, b0), (g1, b1) = jax.tree.map(ref.np64, weights[0])
  (d0, c0), _ = jax.tree.map(ref.np64, weights[1])
  z, real = ref.np64(z), ref.np64(real)
  h_g = relu(z @ g0 + b0)
  x_d = np.concatenate([real, h_g @ g1 + b1])
  first, second = paths
  return {first: z, second: h_g}, {first: x_d, second: relu(x_d @ d0 + c0)}


def linen_rows(pg, pd, z, real):
  """:func:`gan_rows` of the linen models, whose inner layer is 'Dense_1'."""
  layers = lambda p: [(p[n]["kernel"], p[n]["bias"]) for n in ("Dense_1", "Dense_0")]
  return gan_rows((layers(pg), layers(pd)), z, real, paths=("Dense_1", "Dense_0"))


def test_linen_gan_without_argnums_is_an_error_naming_the_second_model():
  """Both players differentiated by one ``value_and_grad(argnums=(0, 1))``: capture used to
  record the generator's layers only, silently, and the discriminator's optimizer, given those
  activations, took the generator's rows for its same-named layers (its factors 0.94 and 1.01
  off in relative Frobenius norm). Now an error names the argument, a layer and the fix."""
  pg, pd, z, real = linen_problem()
  grad_fn = jax.value_and_grad(sngd_jax.capture(gan_loss), argnums=(0, 1), has_aux=True)
  with pytest.raises(ValueError, match=r"layer 'Dense_1' of argument 1 \(`pd`\) is "
                                       r"differentiated together.*argnums=\(0, 1\)\)` returns "
                                       r"one activations per model"):
    grad_fn(pg, pd, z, real)
  with pytest.raises(ValueError, match=r"argument 1 \(`pd`\)"):  # also under jit and vmap
    jax.jit(jax.vmap(grad_fn, in_axes=(None, None, 0, 0)))(pg, pd, z[None], real[None])


def test_what_the_error_prevents_the_first_models_rows_in_the_second_optimizer():
  """What the capture without ``argnums`` used to return for the joint loss: the generator's
  activations only (the same as its loss captured alone, the discriminator left out). Handed
  to the discriminator's optimizer, ``update`` accepted them (same paths, same widths), and its
  factors were the generator's rows: relative Frobenius error 0.94 ('Dense_1') and 1.01
  ('Dense_0') against the float64 factors of its own rows."""
  pg, pd, z, real = linen_problem()
  (_, acts_g), _ = jax.value_and_grad(sngd_jax.capture(gan_loss), has_aux=True)(
      pg, pd, z, real)
  tx = sngd_jax.sngd(**EXACT)
  state = tx.update(jax.tree.map(jnp.zeros_like, pd), tx.init(pd), pd, activations=acts_g)[1]
  _, rows_d = linen_rows(pg, pd, z, real)
  errors = {}
  for path, rows in rows_d.items():
    got = np.asarray(state.factors[path]) / np.asarray(state.weights[path])
    want = ref.linear_factor(rows)
    errors[path] = np.linalg.norm(got - want) / np.linalg.norm(want)
  np.testing.assert_allclose([errors["Dense_1"], errors["Dense_0"]], [0.94, 1.01], atol=0.01)


def test_linen_target_network_not_differentiated_is_still_left_out():
  """The discriminator passed but not differentiated (the generator's own step, a target
  network, under ``jit``): left out as before, without an error or a warning."""
  pg, pd, z, real = linen_problem()
  grad_fn = jax.jit(jax.value_and_grad(sngd_jax.capture(gan_loss), has_aux=True))
  with no_sngd_warnings():
    (_, acts), _ = grad_fn(pg, pd, z, real)
  rows_g, _ = linen_rows(pg, pd, z, real)
  assert sorted(acts) == ["Dense_0", "Dense_1"]
  for path, rows in rows_g.items():
    assert len(acts[path]) == 1
    np.testing.assert_allclose(acts[path][0].inputs, rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("has_aux", [False, True])
def test_linen_gan_argnums_gives_each_optimizer_its_own_rows(has_aux):
  """``capture(loss, argnums=(0, 1))``: one jitted step, two ``sngd`` optimizers. Each factor
  is the float64 ``E[x~ x~^T]`` of its own model's layer inputs (the discriminator's first
  layer: the 32 real and the 32 generated rows, each once), each update is the float64 damped
  solve, and each equals the update made with that model's loss captured alone."""
  pg, pd, z, real = linen_problem()
  tx_g, tx_d = sngd_jax.sngd(**EXACT), sngd_jax.sngd(**EXACT)
  sg, sd = tx_g.init(pg), tx_d.init(pd)
  loss = (lambda *a: (gan_loss(*a), 7.0)) if has_aux else gan_loss

  @jax.jit
  def step(pg, pd, sg, sd):
    wrapped = sngd_jax.capture(loss, argnums=(0, 1), has_aux=has_aux)
    out, (gg, gd) = jax.value_and_grad(wrapped, argnums=(0, 1), has_aux=True)(pg, pd, z, real)
    if has_aux:
      _, (aux, (acts_g, acts_d)) = out
    else:
      (_, (acts_g, acts_d)), aux = out, 7.0
    ug, sg = tx_g.update(jax.tree.map(jnp.negative, gg), sg, pg, activations=acts_g)
    ud, sd = tx_d.update(gd, sd, pd, activations=acts_d)
    return (gg, gd), (acts_g, acts_d), (ug, ud), (sg, sd), aux

  with no_sngd_warnings():
    (gg, gd), (acts_g, acts_d), (ug, ud), (sg, sd), aux = step(pg, pd, sg, sd)
  assert aux == 7.0
  rows_g, rows_d = linen_rows(pg, pd, z, real)
  assert sorted(acts_g) == sorted(acts_d) == ["Dense_0", "Dense_1"]
  assert [c.inputs.shape for c in acts_d["Dense_1"]] == [(32, 8), (32, 8)]  # real, fake: once
  for state, updates, grads, rows, sign in ((sg, ug, gg, rows_g, -1), (sd, ud, gd, rows_d, 1)):
    for path in ("Dense_0", "Dense_1"):
      assert_factor(state, path, rows[path])
      assert_dense_update(updates[path], jax.tree.map(lambda g, s=sign: s * g, grads[path]),
                          rows[path])

  # the manual path: each model's loss captured alone (the other model an argument left out)
  tx = sngd_jax.sngd(**EXACT)
  (_, alone_g), gg2 = jax.value_and_grad(sngd_jax.capture(gan_loss), has_aux=True)(
      pg, pd, z, real)
  d_first = lambda pd, pg, z, real: gan_loss(pg, pd, z, real)
  (_, alone_d), gd2 = jax.value_and_grad(sngd_jax.capture(d_first), has_aux=True)(
      pd, pg, z, real)
  assert_trees_close(ug, tx.update(jax.tree.map(jnp.negative, gg2), tx.init(pg), pg,
                                   activations=alone_g)[0])
  assert_trees_close(ud, tx.update(gd2, tx.init(pd), pd, activations=alone_d)[0])


def test_linen_argnums_order_and_checks():
  """``argnums=(1, 0)`` returns the activations in that order; a bad ``argnums`` is refused."""
  pg, pd, z, real = linen_problem()
  (_, (acts_d, acts_g)), _ = jax.value_and_grad(
      sngd_jax.capture(gan_loss, argnums=(1, 0)), argnums=(0, 1), has_aux=True)(
          pg, pd, z, real)
  rows_g, rows_d = linen_rows(pg, pd, z, real)
  np.testing.assert_allclose(acts_g["Dense_1"][0].inputs, rows_g["Dense_1"], rtol=1e-6)
  np.testing.assert_allclose(jnp.concatenate([c.inputs for c in acts_d["Dense_1"]]),
                             rows_d["Dense_1"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="distinct"):
    sngd_jax.capture(gan_loss, argnums=(0, 0))
  with pytest.raises(TypeError, match="int or a non-empty tuple"):
    sngd_jax.capture(gan_loss, argnums=[0, 1])
  with pytest.raises(ValueError, match="passed positionally"):
    sngd_jax.capture(gan_loss, argnums=(0, 4))(pg, pd, z, real)


# --- NNX ---------------------------------------------------------------------------------------

class NnxMLP(nnx.Module):
  def __init__(self, sizes, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes, sizes[1:], strict=False)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


def nnx_loss(gen, disc, z, real):
  fake = gen(z)
  return (jnp.mean(jax.nn.softplus(-disc(real))) + jnp.mean(jax.nn.softplus(disc(fake))))


def nnx_rows(gen, disc, z, real):
  layers = lambda m: [(m.layers[i].kernel[...], m.layers[i].bias[...]) for i in range(2)]
  return gan_rows((layers(gen), layers(disc)), z, real)


def test_nnx_gan_without_argnums_is_an_error_and_with_it_each_optimizer_gets_its_rows():
  """``nnx.value_and_grad(capture_nnx(loss, argnums=(0, 1)), argnums=(0, 1))`` with two
  ``nnx.Optimizer``s: each factor is the float64 ``E[x~ x~^T]`` of its model's rows (both models
  name their layers 'layers/0', 'layers/1'), each model's new params equal those of the
  manual path (each loss captured alone). Without ``argnums``: an error naming ``disc``."""
  z, real = data()
  gen, disc = NnxMLP([8, 16, 8], nnx.Rngs(1)), NnxMLP([8, 16, 1], nnx.Rngs(2))
  rows_g, rows_d = nnx_rows(gen, disc, z, real)
  with pytest.raises(ValueError, match=r"layer 'layers/0' of argument 1 \(`disc`\).*"
                                       r"capture_nnx\(loss_fn, argnums=\(0, 1\)\)"):
    nnx.value_and_grad(sngd_jax.capture_nnx(nnx_loss), argnums=(0, 1), has_aux=True)(
        gen, disc, z, real)

  def optimizers(gen, disc):
    return (nnx.Optimizer(gen, sngd_jax.sngd(**EXACT), wrt=nnx.Param),
            nnx.Optimizer(disc, sngd_jax.sngd(**EXACT), wrt=nnx.Param))

  @nnx.jit
  def joint(gen, disc, opt_g, opt_d):
    grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(nnx_loss, argnums=(0, 1)),
                                 argnums=(0, 1), has_aux=True)
    (_, (acts_g, acts_d)), (gg, gd) = grad_fn(gen, disc, z, real)
    opt_g.update(gen, jax.tree.map(jnp.negative, gg), activations=acts_g)
    opt_d.update(disc, gd, activations=acts_d)
    return acts_d

  @nnx.jit
  def alone(gen, disc, opt_g, opt_d):
    (_, acts_g), gg = nnx.value_and_grad(sngd_jax.capture_nnx(nnx_loss), has_aux=True)(
        gen, disc, z, real)
    d_first = lambda disc, gen, z, real: nnx_loss(gen, disc, z, real)
    (_, acts_d), gd = nnx.value_and_grad(sngd_jax.capture_nnx(d_first), has_aux=True)(
        disc, gen, z, real)
    opt_g.update(gen, jax.tree.map(jnp.negative, gg), activations=acts_g)
    opt_d.update(disc, gd, activations=acts_d)

  gen2, disc2 = nnx.clone(gen), nnx.clone(disc)
  opt_g, opt_d = optimizers(gen, disc)
  opt_g2, opt_d2 = optimizers(gen2, disc2)
  with no_sngd_warnings():
    acts_d = joint(gen, disc, opt_g, opt_d)
    alone(gen2, disc2, opt_g2, opt_d2)
  assert [c.inputs.shape for c in acts_d["layers/0"]] == [(32, 8), (32, 8)]
  for opt, rows in ((opt_g, rows_g), (opt_d, rows_d)):
    for path, r in rows.items():
      assert_factor(opt.opt_state, path, r)
  assert_trees_close(nnx.state(gen, nnx.Param), nnx.state(gen2, nnx.Param))
  assert_trees_close(nnx.state(disc, nnx.Param), nnx.state(disc2, nnx.Param))


def test_nnx_target_network_not_differentiated_is_still_left_out():
  z, real = data()
  gen, disc = NnxMLP([8, 16, 8], nnx.Rngs(1)), NnxMLP([8, 16, 1], nnx.Rngs(2))
  with no_sngd_warnings():
    (_, acts), _ = nnx.value_and_grad(sngd_jax.capture_nnx(nnx_loss), has_aux=True)(
        gen, disc, z, real)
  rows_g, _ = nnx_rows(gen, disc, z, real)
  assert sorted(acts) == ["layers/0", "layers/1"]
  np.testing.assert_allclose(acts["layers/0"][0].inputs, rows_g["layers/0"], rtol=1e-6)


# --- Equinox -----------------------------------------------------------------------------------

def eqx_mlp(sizes, key):
  return eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], 1, activation=jax.nn.relu, key=key)


def eqx_loss(gen, disc, z, real):
  fake = jax.vmap(gen)(z)
  return (jnp.mean(jax.nn.softplus(-jax.vmap(disc)(real)))
          + jnp.mean(jax.nn.softplus(jax.vmap(disc)(fake))))


def eqx_rows(gen, disc, z, real):
  layers = lambda m: [(m.layers[i].weight.T, m.layers[i].bias) for i in range(2)]
  return gan_rows((layers(gen), layers(disc)), z, real)


def test_equinox_gan_without_argnums_is_an_error_and_with_it_each_update_is_its_own():
  """``eqx.filter_value_and_grad`` of the pair ``(gen, disc)`` through
  ``capture_eqx(loss, argnums=(0, 1))``: each update is the float64 damped solve over its own
  model's rows (the discriminator's first layer: real and generated rows), and equals the
  update made with each model's loss captured alone. Without ``argnums``: an error naming
  ``disc``."""
  z, real = data()
  gen = eqx_mlp([8, 16, 8], jax.random.key(1))
  disc = eqx_mlp([8, 16, 1], jax.random.key(2))
  params = lambda m: eqx.filter(m, eqx.is_inexact_array)

  def pair_grad(captured):
    return eqx.filter_value_and_grad(lambda pair, z, real: captured(*pair, z, real),
                                     has_aux=True)((gen, disc), z, real)

  with pytest.raises(ValueError, match=r"layer 'layers/0' of argument 1 \(`disc`\).*"
                                       r"capture_eqx\(loss_fn, argnums=\(0, 1\)\)"):
    pair_grad(sngd_jax.capture_eqx(eqx_loss))
  with no_sngd_warnings():
    (_, (acts_g, acts_d)), (gg, gd) = eqx.filter_jit(pair_grad)(
        sngd_jax.capture_eqx(eqx_loss, argnums=(0, 1)))
  tx = sngd_jax.sngd(**EXACT)
  gg = jax.tree.map(jnp.negative, gg)
  ug = tx.update(gg, tx.init(params(gen)), params(gen), activations=acts_g)[0]
  ud = tx.update(gd, tx.init(params(disc)), params(disc), activations=acts_d)[0]
  rows_g, rows_d = eqx_rows(gen, disc, z, real)
  for updates, grads, rows in ((ug, gg, rows_g), (ud, gd, rows_d)):
    for i in range(2):
      assert_dense_update(updates.layers[i].__dict__, grads.layers[i].__dict__,
                          rows[f"layers/{i}"], kernel="weight", transpose=True)

  # the manual path: each model's loss captured alone
  (_, alone_g), _ = eqx.filter_value_and_grad(sngd_jax.capture_eqx(eqx_loss), has_aux=True)(
      gen, disc, z, real)
  d_first = lambda disc, gen, z, real: eqx_loss(gen, disc, z, real)
  (_, alone_d), _ = eqx.filter_value_and_grad(sngd_jax.capture_eqx(d_first), has_aux=True)(
      disc, gen, z, real)
  assert_trees_close(ug, tx.update(gg, tx.init(params(gen)), params(gen),
                                   activations=alone_g)[0])
  assert_trees_close(ud, tx.update(gd, tx.init(params(disc)), params(disc),
                                   activations=alone_d)[0])


def test_sngd_and_adam_on_one_loss_record_both_and_drop_one():
  """An actor trained by SNGD and a critic by Adam on one shared loss: ``argnums=(0, 1)``
  and the critic's activations dropped gives the actor the update of its loss captured alone."""
  pg, pd, z, real = linen_problem()
  (_, (acts_g, _)), (gg, _) = jax.value_and_grad(
      sngd_jax.capture(gan_loss, argnums=(0, 1)), argnums=(0, 1), has_aux=True)(
          pg, pd, z, real)
  (_, alone), _ = jax.value_and_grad(sngd_jax.capture(gan_loss), has_aux=True)(pg, pd, z, real)
  tx = sngd_jax.sngd(**EXACT)
  assert_trees_close(tx.update(gg, tx.init(pg), pg, activations=acts_g)[0],
                     tx.update(gg, tx.init(pg), pg, activations=alone)[0])


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(8)(nn.relu(nn.Dense(16)(x))), None


class Deep(nn.Module):
  """Two residual blocks under ``nn.scan`` over depth, then a head: both models of the test
  have the same paths ('ScanBlock_0/Dense_0', 'ScanBlock_0/Dense_1', 'Dense_0')."""
  out: int

  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)()(x, None)
    return nn.Dense(self.out)(x)


def test_linen_scanned_models_argnums_and_params_computed_in_the_loss():
  """Both models scanned over depth: each call is its model's, followed out of the scan (and
  of the trace Flax makes of the scan's body, whose records are dropped, without a warning): the
  first block of the generator sees ``z``, the discriminator's sees the generated rows and the
  real rows; each update equals that of its loss captured alone. A model applied to params
  computed inside the loss belongs to no argument: left out, with a warning."""
  gen, disc = Deep(8), Deep(1)
  z, real = data()
  pg, pd = gen.init(jax.random.key(1), z)["params"], disc.init(jax.random.key(2), z)["params"]

  def loss(pg, pd, z, real):
    fake = gen.apply({"params": pg}, z)
    return (jnp.mean(jax.nn.softplus(-disc.apply({"params": pd}, real)[..., 0]))
            + jnp.mean(jax.nn.softplus(disc.apply({"params": pd}, fake)[..., 0])))

  grad_fn = jax.value_and_grad(sngd_jax.capture(loss, argnums=(0, 1)), argnums=(0, 1),
                               has_aux=True)
  with no_sngd_warnings():
    (_, (acts_g, acts_d)), (gg, gd) = grad_fn(pg, pd, z, real)
  first = "ScanBlock_0/Dense_1"
  assert [c.inputs.shape for c in acts_g[first]] == [(2, 32, 8)]
  np.testing.assert_allclose(acts_g[first][0].inputs[0], z, rtol=1e-6)
  fake = gen.apply({"params": pg}, z)
  np.testing.assert_allclose(np.concatenate([c.inputs[0] for c in acts_d[first]]),
                             np.concatenate([real, fake]), rtol=1e-5, atol=1e-5)
  tx = sngd_jax.sngd(**EXACT)
  (_, alone_g), _ = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(pg, pd, z, real)
  d_first = lambda pd, pg, z, real: loss(pg, pd, z, real)
  (_, alone_d), _ = jax.value_and_grad(sngd_jax.capture(d_first), has_aux=True)(
      pd, pg, z, real)
  for p, g, acts, alone in ((pg, gg, acts_g, alone_g), (pd, gd, acts_d, alone_d)):
    assert_trees_close(tx.update(g, tx.init(p), p, activations=acts)[0],
                       tx.update(g, tx.init(p), p, activations=alone)[0])

  computed = lambda pg, pd, z, real: loss(pg, jax.tree.map(lambda w: 1.0 * w, pd), z, real)
  with pytest.warns(UserWarning, match=r"left out 3 layer call\(s\).*params computed inside"):
    (_, (acts_g, acts_d)), _ = jax.value_and_grad(
        sngd_jax.capture(computed, argnums=(0, 1)), argnums=(0, 1), has_aux=True)(
            pg, pd, z, real)
  assert acts_d == {} and sorted(acts_g) == sorted(alone_g)


def test_arguments_by_keyword_are_captured_as_before_argnums():
  """A captured function called with keyword arguments only (``wrapped(params=..., x=...)``,
  and ``wrapped(model=..., x=...)`` for NNX and Equinox, as the one-model signature
  ``wrapped(model, *args)`` allowed) records the model as before."""
  z, _ = data()
  pg = G.init(jax.random.key(1), z)["params"]
  _, acts = sngd_jax.capture(lambda pg, z: G.apply({"params": pg}, z).sum())(pg=pg, z=z)
  np.testing.assert_allclose(acts["Dense_1"][0].inputs, z)
  gen = NnxMLP([8, 16, 8], nnx.Rngs(1))
  _, acts = sngd_jax.capture_nnx(lambda model, x: model(x).sum())(model=gen, x=z)
  np.testing.assert_allclose(acts["layers/0"][0].inputs, z)
  mlp = eqx_mlp([8, 16, 8], jax.random.key(1))
  _, acts = sngd_jax.capture_eqx(lambda model, x: jax.vmap(model)(x).sum())(model=mlp, x=z)
  np.testing.assert_allclose(acts["layers/0"][0].inputs, z)
