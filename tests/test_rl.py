"""Reinforcement-learning training loops: PPO (one actor-critic, and two networks with two
``TrainState``s), a DQN target network and a DDPG actor loss through the critic, in linen and
NNX, on the CartPole environment of ``examples/ppo_cartpole.py`` (imported, so there is one
copy; rollouts under ``lax.scan`` over time and ``jax.vmap`` over environments, the policy
applied inside the rollout).

Each factor is checked against the float64 local Fisher ``E[x~ x~^T]`` of the rows the
trained loss feeds the layer (with ``decay=0``, ``prior="none"`` and ``factor_every=1`` the
factor is the last batch's estimate): the minibatch's observations and hidden features only,
never the rollout's calls or a target network's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers_warnings import no_sngd_warnings
from np_reference import assert_factor

import sngd_jax
from examples.ppo_cartpole import env_reset as reset
from examples.ppo_cartpole import env_step

N_ENVS, T, EPOCHS, MINIBATCHES = 4, 8, 2, 2
BATCH_STATS = dict(decay=0.0, factor_every=1, prior="none")  # the factor = the last batch's


def ppo_terms(logits, v, a, old_logp, adv, ret):
  logp_all = jax.nn.log_softmax(logits)
  ratio = jnp.exp(jnp.take_along_axis(logp_all, a[:, None], 1)[:, 0] - old_logp)
  adv = (adv - adv.mean()) / (adv.std() + 1e-8)
  pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv).mean()
  entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
  return pg, 0.5 * ((v - ret) ** 2).mean(), entropy


def rollout(policy, s, key):
  """``T`` steps of ``N_ENVS`` environments; ``policy(obs) -> (logits, value)``."""

  def step(carry, _):
    s, key = carry
    key, ka, ke = jax.random.split(key, 3)
    logits, v = policy(s)
    a = jax.random.categorical(ka, logits)
    logp = jax.nn.log_softmax(logits)[jnp.arange(N_ENVS), a]
    s2, r, d = jax.vmap(env_step)(s, a, jax.random.split(ke, N_ENVS))
    return (s2, key), (s, a, logp, v, r, d)

  (s, _), traj = jax.lax.scan(step, (s, key), None, T)
  obs, a, logp, v, r, d = traj
  _, last_v = policy(s)

  def gae(carry, x):
    adv, next_v = carry
    r, v, d = x
    adv = r + 0.99 * next_v * (1 - d) - v + 0.99 * 0.95 * (1 - d) * adv
    return (adv, v), adv

  _, adv = jax.lax.scan(gae, (jnp.zeros_like(last_v), last_v), (r, v, d), reverse=True)
  flat = lambda z: z.reshape((T * N_ENVS,) + z.shape[2:])
  return s, tuple(map(flat, (obs, a, logp, adv, adv + v)))


def minibatches(key, data):
  perm = jax.random.permutation(key, T * N_ENVS)
  return jax.tree.map(lambda z: z[perm].reshape((MINIBATCHES, -1) + z.shape[1:]), data)


class ActorCritic(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(16, name="torso0")(x))
    h = nn.tanh(nn.Dense(16, name="torso1")(h))
    return nn.Dense(2, name="pi")(h), nn.Dense(1, name="v")(h)[..., 0]


def test_ppo_linen_trainstate_factors_are_the_minibatch_rows_and_it_compiles_once():
  """PPO with a shared torso: the rollout applies the policy under ``lax.scan`` (outside the
  captured loss), then epochs of shuffled minibatches under ``lax.scan`` inside ``jax.jit``,
  ``clip_by_global_norm`` before SNGD and an annealed Adam learning rate. Every layer's factor
  is the float64 ``E[x~ x~^T]`` of the last minibatch's rows (its observations for the torso,
  the torso's features for both heads), no sngd warning is raised, and the update compiles
  once."""
  model = ActorCritic()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
  tx = optax.chain(optax.clip_by_global_norm(0.5), sngd_jax.sngd(**BATCH_STATS),
                   optax.inject_hyperparams(optax.adam)(
                       learning_rate=optax.linear_schedule(3e-3, 0.0, 100)))
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), state)  # step: strong

  def loss_fn(params, batch):
    obs, *rest = batch
    pg, vl, ent = ppo_terms(*model.apply({"params": params}, obs), *rest)
    return pg + 0.5 * vl - 0.01 * ent

  @jax.jit
  def update(state, env_s, key):
    key, kr, kp = jax.random.split(key, 3)
    policy = lambda obs: model.apply({"params": state.params}, obs)
    env_s, data = rollout(policy, env_s, kr)

    def epoch(state, k):
      def minibatch(state, batch):
        grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)
        (loss, acts), grads = grad_fn(state.params, batch)
        return state.apply_gradients(grads=grads, activations=acts), (batch[0], state.params)
      return jax.lax.scan(minibatch, state, minibatches(k, data))

    state, seen = jax.lax.scan(epoch, state, jax.random.split(kp, EPOCHS))
    return state, env_s, key, seen

  env_s = jax.vmap(reset)(jax.random.split(jax.random.key(1), N_ENVS))
  key = jax.random.key(2)
  with no_sngd_warnings():
    for _ in range(2):
      state, env_s, key, (obs, before) = update(state, env_s, key)
  assert update._cache_size() == 1
  assert int(state.opt_state[1].count) == 2 * EPOCHS * MINIBATCHES
  obs = np.asarray(obs[-1, -1], np.float64)   # the last minibatch, and the params it saw
  p = jax.tree.map(lambda z: np.asarray(z[-1, -1], np.float64), before)
  h0 = np.tanh(obs @ p["torso0"]["kernel"] + p["torso0"]["bias"])
  h1 = np.tanh(h0 @ p["torso1"]["kernel"] + p["torso1"]["bias"])
  sngd_state = state.opt_state[1]
  for path, x in (("torso0", obs), ("torso1", h0), ("pi", h1), ("v", h1)):
    assert_factor(sngd_state, path, x)


class Net(nn.Module):
  out: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.out)(nn.tanh(nn.Dense(16)(x)))  # 'Dense_0' is the output layer


def _actor_critic_states():
  actor, critic = Net(2), Net(1)
  obs = jax.random.normal(jax.random.key(0), (32, 4))
  states = [sngd_jax.TrainState.create(
      apply_fn=m.apply, params=m.init(jax.random.key(i), obs)["params"],
      tx=sngd_jax.sngd_adam(1e-3, **BATCH_STATS)) for i, m in enumerate((actor, critic))]
  a = jnp.arange(32) % 2
  data = (obs, a, jnp.full(32, -0.7), jnp.linspace(-1, 1, 32), jnp.linspace(0, 2, 32))
  return actor, critic, states, data


def test_separate_actor_and_critic_each_captured_alone_get_their_own_rows():
  """Two networks whose layers have the same paths ('Dense_0', 'Dense_1'), two
  ``TrainState``s: one captured loss per optimizer gives each network its own factors (the
  first layer of both: the observations; the output layers: each network's own features)."""
  actor, critic, (sa, sc), (obs, a, old_logp, adv, ret) = _actor_critic_states()

  @jax.jit
  def step(sa, sc):
    def actor_loss(p):
      pg, _, ent = ppo_terms(actor.apply({"params": p}, obs), ret, a, old_logp, adv, ret)
      return pg - 0.01 * ent

    def critic_loss(p):
      return 0.5 * ((critic.apply({"params": p}, obs)[..., 0] - ret) ** 2).mean()

    (_, acts_a), ga = jax.value_and_grad(sngd_jax.capture(actor_loss), has_aux=True)(sa.params)
    (_, acts_c), gc = jax.value_and_grad(sngd_jax.capture(critic_loss), has_aux=True)(sc.params)
    return (sa.apply_gradients(grads=ga, activations=acts_a),
            sc.apply_gradients(grads=gc, activations=acts_c))

  with no_sngd_warnings():
    new_a, new_c = step(sa, sc)
  for old, new in ((sa, new_a), (sc, new_c)):
    p = jax.tree.map(lambda z: np.asarray(z, np.float64), old.params)
    h = np.tanh(np.asarray(obs, np.float64) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    assert_factor(new.opt_state[0], "Dense_1", obs)
    assert_factor(new.opt_state[0], "Dense_0", h)


class QNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="q")(nn.relu(nn.Dense(16, name="hidden")(x)))


def _dqn_problem():
  q = QNet()
  obs = jax.random.normal(jax.random.key(1), (32, 4))
  next_obs = 3.0 + jax.random.normal(jax.random.key(2), (32, 4))
  params = q.init(jax.random.key(0), obs)["params"]
  target = jax.tree.map(lambda w: w + 0.1, params)
  return q, params, target, obs, jnp.arange(32) % 3, next_obs


@pytest.mark.parametrize("target", ["argument", "outside", "closed over"])
def test_dqn_target_network(target):
  """A DQN step with a target network (the same model, other params). Passed to the captured
  loss as an argument, its calls are left out; applied outside the captured loss, with the TD
  target passed in, it is never seen. Either way the online layers' factors are the float64
  ``E[x~ x~^T]`` of the batch's observations only, without a warning. Closed over by the loss
  (passed into the jitted step), its params are constants of the loss's differentiation: left
  out as well (until 2026-12-06 its calls were pooled into the online network's factors, the
  next observations' rows, with a warning). Captured without a differentiation, nothing tells
  them apart: pooled, and capture warns, naming the layers."""
  q, params, target_params, obs, a, next_obs = _dqn_problem()
  tx = sngd_jax.sngd(**BATCH_STATS)
  q_of = lambda q_values: jnp.take_along_axis(q_values, a[:, None], 1)[:, 0]
  td = lambda p, y: ((q_of(q.apply({"params": p}, obs)) - y) ** 2).mean()
  y_of = lambda tp: jax.lax.stop_gradient(
      1.0 + 0.99 * q.apply({"params": tp}, next_obs).max(-1))

  @jax.jit
  def step(p, tp):
    if target == "argument":
      loss, args = (lambda p, tp: td(p, y_of(tp))), (p, tp)
    elif target == "outside":
      loss, args = td, (p, y_of(tp))
    else:
      loss, args = (lambda p: td(p, y_of(tp))), (p,)
    (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(*args)
    return tx.update(g, tx.init(p), p, activations=acts)[1]

  if target == "closed over":
    with pytest.warns(UserWarning, match="sngd: layers 'hidden', 'q' were called with 2 "
                      "different weight arrays"):
      _, acts = jax.jit(sngd_jax.capture(lambda p: td(p, y_of(target_params))))(params)
    assert len(acts["hidden"]) == 2  # next_obs rows pooled
  with no_sngd_warnings():
    state = step(params, target_params)
  p = jax.tree.map(lambda z: np.asarray(z, np.float64), params)
  assert_factor(state, "hidden", obs)
  assert_factor(state, "q", np.maximum(np.asarray(obs, np.float64) @ p["hidden"]["kernel"]
                                       + p["hidden"]["bias"], 0))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8)(h)), None


class ScannedQ(nn.Module):
  """An LSTM over a short history, then blocks under ``nn.scan`` over depth."""

  def setup(self):
    self.rnn = nn.RNN(nn.LSTMCell(8))
    self.blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                          length=2)()
    self.out = nn.Dense(3)

  def features(self, x):  # x: (batch, time, features)
    return self.rnn(x)[:, -1]

  def __call__(self, x):
    return self.out(self.blocks(self.features(x), None)[0])


def test_target_network_with_scanned_blocks_and_an_lstm_passed_as_an_argument():
  """The target's calls are left out also inside ``nn.scan`` over depth (where each block
  reads a slice of the stacked params) and inside ``nn.RNN``'s scan: every layer keeps the
  online network's call only, whose rows are the online network's float64 inputs. (Before,
  the target's scanned blocks were pooled into the online stack's factors without a
  warning.)"""
  model = ScannedQ()
  x = jax.random.normal(jax.random.key(0), (4, 3, 5))
  params = model.init(jax.random.key(1), x)["params"]
  target_params = jax.tree.map(lambda w: w + 0.1, params)

  def loss(p, tp):
    y = jax.lax.stop_gradient(model.apply({"params": tp}, 2.0 * x).max(-1))
    return ((model.apply({"params": p}, x).max(-1) - y) ** 2).mean()

  with no_sngd_warnings():
    (_, acts), _ = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
        params, target_params)
  assert all(len(calls) == 1 for calls in acts.values()), {k: len(v) for k, v in acts.items()}
  assert len(acts) == 10  # 'out', 'blocks/Dense_0' and the LSTM's 8 gates
  np.testing.assert_array_equal(acts["rnn/cell/ii"][0].inputs.reshape(-1, 5),
                                jnp.swapaxes(x, 0, 1).reshape(12, 5))  # time-major rows
  h = model.apply({"params": params}, x, method=ScannedQ.features)
  np.testing.assert_allclose(acts["blocks/Dense_0"][0].inputs[0], h, rtol=1e-5, atol=1e-6)


class Actor(nn.Module):
  @nn.compact
  def __call__(self, s):
    return jnp.tanh(nn.Dense(1)(nn.relu(nn.Dense(16)(s))))  # Dense_0: the output layer


class Critic(nn.Module):
  @nn.compact
  def __call__(self, s, a):  # 'Dense_0' and 'Dense_1' too; Dense_1 reads 5 features
    return nn.Dense(1)(nn.relu(nn.Dense(16)(jnp.concatenate([s, a], -1))))[..., 0]


@pytest.mark.parametrize("critic_params", ["argument", "closed over"])
def test_ddpg_actor_loss_through_the_critic(critic_params):
  """DDPG/TD3/SAC's actor loss runs through the critic (its gradient flows through it), so
  the critic cannot be applied outside the captured loss, and both networks name their layers
  'Dense_0', 'Dense_1'. With the critic's params passed to the loss as an argument its calls
  are left out: the actor's factors are the float64 ``E[x~ x~^T]`` of its own inputs, without
  a warning. Closed over by the loss (passed into the jitted step), the critic's params are
  constants of the actor loss's differentiation: left out as well (until 2026-12-06 its calls
  landed at the actor's paths, capture warned and ``update`` refused the 5-feature rows). Only
  captured without a differentiation do they land there, with the warning."""
  actor, critic = Actor(), Critic()
  s = jax.random.normal(jax.random.key(1), (32, 4))
  pa = actor.init(jax.random.key(0), s)["params"]
  pc = critic.init(jax.random.key(2), s, jnp.zeros((32, 1)))["params"]
  state = sngd_jax.TrainState.create(apply_fn=actor.apply, params=pa,
                                     tx=sngd_jax.sngd_adam(1e-3, **BATCH_STATS))
  loss = lambda p, pc: -critic.apply({"params": pc}, s, actor.apply({"params": p}, s)).mean()

  @jax.jit
  def step(state, pc):
    if critic_params == "argument":
      grad_fn = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)
      (_, acts), g = grad_fn(state.params, pc)
    else:
      grad_fn = jax.value_and_grad(sngd_jax.capture(lambda p: loss(p, pc)), has_aux=True)
      (_, acts), g = grad_fn(state.params)
    return state.apply_gradients(grads=g, activations=acts)

  if critic_params == "closed over":
    with pytest.warns(UserWarning) as record:
      _, acts = sngd_jax.capture(lambda p: loss(p, pc))(pa)
    assert any("different shapes" in str(w.message) for w in record)
    assert len(acts["Dense_1"]) == 2
  with no_sngd_warnings():
    new = step(state, pc)
  p = jax.tree.map(lambda z: np.asarray(z, np.float64), pa)
  h = np.maximum(np.asarray(s, np.float64) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], 0)
  assert_factor(new.opt_state[0], "Dense_1", s)
  assert_factor(new.opt_state[0], "Dense_0", h)


class NnxActorCritic(nnx.Module):
  def __init__(self, rngs):
    self.torso0 = nnx.Linear(4, 16, rngs=rngs)
    self.torso1 = nnx.Linear(16, 16, rngs=rngs)
    self.pi = nnx.Linear(16, 2, rngs=rngs)
    self.v = nnx.Linear(16, 1, rngs=rngs)

  def features(self, x):
    return nnx.tanh(self.torso1(nnx.tanh(self.torso0(x))))

  def __call__(self, x):
    h = self.features(x)
    return self.pi(h), self.v(h)[..., 0]


def test_ppo_nnx_optimizer_with_nnx_scan_minibatches():
  """The NNX version: ``nnx.Optimizer``, the rollout calling the model inside ``lax.scan``,
  the minibatches under ``nnx.scan`` inside ``nnx.jit``. The factors are the float64
  ``E[x~ x~^T]`` of the last minibatch's rows; no sngd warning."""
  model = NnxActorCritic(nnx.Rngs(0))
  tx = optax.chain(optax.clip_by_global_norm(0.5), sngd_jax.sngd(**BATCH_STATS),
                   optax.adam(1e-3))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, obs, *rest):
    pg, vl, ent = ppo_terms(*model(obs), *rest)
    return pg + 0.5 * vl - 0.01 * ent

  @nnx.jit
  def update(model, optimizer, env_s, key):
    key, kr, kp = jax.random.split(key, 3)
    graphdef, params = nnx.split(model)
    policy = lambda obs: nnx.merge(graphdef, params)(obs)
    env_s, data = rollout(policy, env_s, kr)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def minibatch(carry, batch):
      model, optimizer = carry
      before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)
      (_, acts), grads = grad_fn(model, *batch)
      optimizer.update(model, grads, activations=acts)
      return (model, optimizer), (batch[0], before)

    _, seen = minibatch((model, optimizer), minibatches(kp, data))
    return env_s, key, seen

  env_s = jax.vmap(reset)(jax.random.split(jax.random.key(1), N_ENVS))
  key = jax.random.key(2)
  with no_sngd_warnings():
    for _ in range(2):
      env_s, key, (obs, before) = update(model, optimizer, env_s, key)
  sngd_state = optimizer.opt_state[1]
  assert int(sngd_state.count[...]) == 2 * MINIBATCHES
  obs = np.asarray(obs[-1], np.float64)
  p = jax.tree.map(lambda z: np.asarray(z[-1], np.float64), before)
  h0 = np.tanh(obs @ p["torso0"]["kernel"] + p["torso0"]["bias"])
  h1 = np.tanh(h0 @ p["torso1"]["kernel"] + p["torso1"]["bias"])
  for path, x in (("torso0", obs), ("torso1", h0), ("pi", h1), ("v", h1)):
    assert_factor(sngd_state, path, x)


class NnxQ(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.q = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.q(nnx.relu(self.hidden(x)))


def test_nnx_target_network_passed_as_an_argument_is_left_out_without_a_warning():
  """``loss_fn(model, target, batch)``: the target network's calls are left out (as those
  of the frozen half of ``eqx.partition`` passed as an argument are) and the online layers'
  factors are the float64 ``E[x~ x~^T]`` of the batch's observations. Before, capture_nnx
  warned that the target's layers were "a copy ... inside a transform made before capture
  started". A target the loss closes over is still left out with the warning, which now names
  that case and the fix."""
  model = NnxQ(nnx.Rngs(0))
  target = nnx.clone(model)
  optimizer = nnx.Optimizer(model, sngd_jax.sngd(**BATCH_STATS), wrt=nnx.Param)
  obs = jax.random.normal(jax.random.key(1), (32, 4))
  next_obs = 3.0 + jax.random.normal(jax.random.key(2), (32, 4))
  a = jnp.arange(32) % 3

  def td_loss(model, target, obs, a, next_obs):
    y = jax.lax.stop_gradient(1.0 + 0.99 * target(next_obs).max(-1))
    return ((jnp.take_along_axis(model(obs), a[:, None], 1)[:, 0] - y) ** 2).mean()

  @nnx.jit
  def step(model, target, optimizer):
    grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(td_loss), has_aux=True)
    (_, acts), grads = grad_fn(model, target, obs, a, next_obs)
    optimizer.update(model, grads, activations=acts)

  with no_sngd_warnings():
    step(model, target, optimizer)
  assert_factor(optimizer.opt_state, "hidden", obs)

  closed = lambda model, obs: td_loss(model, target, obs, a, next_obs)
  with pytest.warns(UserWarning, match=r"could not name 2 layer call.*another model the loss "
                                       r"closes over \(a target network"):
    sngd_jax.capture_nnx(closed)(model, obs)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)
    self.down = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(x)))


class NnxScannedQ(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)
    self.q = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.q(forward(x, self.blocks))


def test_nnx_target_network_with_scanned_blocks_passed_as_an_argument():
  """Inside ``nnx.scan`` each block of the target is a copy reading a slice of its stacked
  params; followed out of the scan to the target's arrays, its calls are left out without a
  warning (before: "could not name 2 layer call(s)"), and each layer keeps the online
  network's call: the first block's rows are the batch's observations."""
  model = NnxScannedQ(nnx.Rngs(0))
  target = nnx.clone(model)
  obs = jax.random.normal(jax.random.key(1), (5, 4))

  def loss(model, target, obs):
    return jnp.sum(model(obs) - jax.lax.stop_gradient(target(2.0 * obs)) ** 2)

  with no_sngd_warnings():
    (_, acts), _ = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(
        model, target, obs)
  assert {k: len(v) for k, v in acts.items()} == {"blocks/up": 1, "blocks/down": 1, "q": 1}
  np.testing.assert_array_equal(acts["blocks/up"][0].inputs[0], obs)


def test_double_dqn_online_pass_on_next_observations_counts_as_rows():
  """A Double DQN's online ``argmax`` on the next observations inside the captured loss is a
  call of the trained params: its rows join the factors, without a warning (documented in
  docs/training-loops.md, *Reinforcement learning*); computed outside, they do not."""
  q, params, target_params, obs, a, next_obs = _dqn_problem()
  q_of = lambda q_values, a: jnp.take_along_axis(q_values, a[:, None], 1)[:, 0]

  def loss_inside(p, tp):
    best = jnp.argmax(q.apply({"params": p}, next_obs), -1)
    y = jax.lax.stop_gradient(1.0 + 0.99 * q_of(q.apply({"params": tp}, next_obs), best))
    return ((q_of(q.apply({"params": p}, obs), a) - y) ** 2).mean()

  with no_sngd_warnings():
    (_, acts), _ = jax.value_and_grad(sngd_jax.capture(loss_inside), has_aux=True)(
        params, target_params)
  assert len(acts["hidden"]) == 2  # next_obs, then obs; the target's call left out
  np.testing.assert_array_equal(acts["hidden"][0].inputs, next_obs)
  np.testing.assert_array_equal(acts["hidden"][1].inputs, obs)
