"""PPO on a CartPole written in ``jax.numpy``, with a shared-torso actor-critic and SNGD.

The whole PPO update is one ``jax.jit``: a rollout under ``jax.lax.scan`` over time on
``jax.vmap``-ed environments (the policy acts there, outside the captured loss, so the
rollout adds nothing to the local Fishers), GAE, then epochs of shuffled minibatches under
``jax.lax.scan``, each a ``sngd_jax.capture``-d clipped-surrogate + value + entropy loss and
``state.apply_gradients(grads=grads, activations=acts)``. The optimizer is
``clip_by_global_norm(0.5)`` then ``sngd_adam`` with a linearly annealed learning rate.
One printed step is one PPO update; ``episode_length`` is the mean length of the episodes that
ended in its rollout (CartPole's reward is 1 per step).

Run from the repository root::

  python -m examples.ppo_cartpole --steps 200
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sngd_jax
from examples import _common

N_ENVS, T, EPOCHS, MINIBATCHES = 16, 64, 4, 4


def env_reset(key):
  return jax.random.uniform(key, (4,), minval=-0.05, maxval=0.05)


def env_step(s, a, key):
  """CartPole's dynamics (Barto, Sutton and Anderson 1983); resets when the pole falls."""
  x, x_dot, theta, theta_dot = s
  force = jnp.where(a == 1, 10.0, -10.0)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  temp = (force + 0.05 * theta_dot ** 2 * sin) / 1.1
  theta_acc = (9.8 * sin - cos * temp) / (0.5 * (4.0 / 3.0 - 0.1 * cos ** 2 / 1.1))
  x_acc = temp - 0.05 * theta_acc * cos / 1.1
  s = s + 0.02 * jnp.stack([x_dot, x_acc, theta_dot, theta_acc])
  done = (jnp.abs(s[0]) > 2.4) | (jnp.abs(s[2]) > 0.2095)
  return jnp.where(done, env_reset(key), s), jnp.float32(1.0), done.astype(jnp.float32)


class ActorCritic(nn.Module):
  @nn.compact
  def __call__(self, obs):
    h = nn.tanh(nn.Dense(64, name="torso0")(obs))
    h = nn.tanh(nn.Dense(64, name="torso1")(h))
    return nn.Dense(2, name="pi")(h), nn.Dense(1, name="v")(h)[..., 0]


model = ActorCritic()


def rollout(params, env_state, key):
  """``T`` steps of ``N_ENVS`` environments, then GAE(0.99, 0.95); rows flattened."""

  def step(carry, _):
    s, key = carry
    key, k_act, k_env = jax.random.split(key, 3)
    logits, value = model.apply({"params": params}, s)
    a = jax.random.categorical(k_act, logits)
    logp = jax.nn.log_softmax(logits)[jnp.arange(N_ENVS), a]
    s2, r, done = jax.vmap(env_step)(s, a, jax.random.split(k_env, N_ENVS))
    return (s2, key), (s, a, logp, value, r, done)

  (s, _), (obs, a, logp, value, r, done) = jax.lax.scan(step, (env_state, key), None, T)
  _, last_value = model.apply({"params": params}, s)

  def gae(carry, x):
    adv, next_value = carry
    r, v, d = x
    adv = r + 0.99 * next_value * (1 - d) - v + 0.99 * 0.95 * (1 - d) * adv
    return (adv, v), adv

  _, adv = jax.lax.scan(gae, (jnp.zeros_like(last_value), last_value), (r, value, done),
                        reverse=True)
  flat = lambda z: z.reshape((T * N_ENVS,) + z.shape[2:])
  return s, tuple(map(flat, (obs, a, logp, adv, adv + value))), done.sum()


def ppo_loss(params, obs, actions, old_logp, adv, ret):
  logits, value = model.apply({"params": params}, obs)
  logp_all = jax.nn.log_softmax(logits)
  ratio = jnp.exp(jnp.take_along_axis(logp_all, actions[:, None], 1)[:, 0] - old_logp)
  adv = (adv - adv.mean()) / (adv.std() + 1e-8)
  policy_loss = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv).mean()
  entropy = -(jnp.exp(logp_all) * logp_all).sum(-1).mean()
  return policy_loss + 0.5 * ((value - ret) ** 2).mean() - 0.01 * entropy


@jax.jit
def update(state, env_state, key):
  key, k_roll, k_perm = jax.random.split(key, 3)
  env_state, data, episodes = rollout(state.params, env_state, k_roll)

  def epoch(state, key):
    perm = jax.random.permutation(key, T * N_ENVS)
    batches = jax.tree.map(lambda z: z[perm].reshape((MINIBATCHES, -1) + z.shape[1:]), data)

    def minibatch(state, batch):
      grad_fn = jax.value_and_grad(sngd_jax.capture(ppo_loss), has_aux=True)
      (loss, acts), grads = grad_fn(state.params, *batch)
      return state.apply_gradients(grads=grads, activations=acts), loss

    return jax.lax.scan(minibatch, state, batches)

  state, losses = jax.lax.scan(epoch, state, jax.random.split(k_perm, EPOCHS))
  return state, env_state, key, losses.mean(), T * N_ENVS / jnp.maximum(episodes, 1)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=200, argv=argv,
                            learning_rate=(float, 3e-3))
  key = jax.random.key(args.seed)
  k_init, k_env, key = jax.random.split(key, 3)
  params = model.init(k_init, jnp.zeros((1, 4)))["params"]
  schedule = optax.linear_schedule(args.learning_rate, 0.0, args.steps * EPOCHS * MINIBATCHES)
  tx = optax.chain(optax.clip_by_global_norm(0.5), sngd_jax.sngd_adam(schedule))
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  # Flax starts `step` as a Python int: a strongly typed state compiles `update` once
  state = jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), state)
  env_state = jax.vmap(env_reset)(jax.random.split(k_env, N_ENVS))
  for step in range(args.steps):
    state, env_state, key, loss, length = update(state, env_state, key)
    _common.log(step, args.steps, float(loss), episode_length=float(length))


if __name__ == "__main__":
  main()
