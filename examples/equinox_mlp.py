"""An Equinox MLP classifier trained with SNGD (``pip install "sngd_jax[equinox]"``).

The Equinox way: layers are called per example under ``jax.vmap``, the model is a pytree,
``eqx.filter_value_and_grad`` differentiates its floating-point arrays. SNGD needs two
changes to a plain optax loop: wrap the loss with ``sngd_jax.capture_eqx`` and pass the
activations to ``update``.

Run: ``python examples/equinox_mlp.py --steps 300`` (synthetic two-spirals data).
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax


def spirals(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two interleaved spirals in 2-D, labels 0 and 1."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, 2, size=n)
  t = rng.uniform(0.5, 3.5 * np.pi, size=n)
  x = np.stack([t * np.cos(t + np.pi * label), t * np.sin(t + np.pi * label)], 1) / 10.0
  return (x + 0.02 * rng.normal(size=x.shape)).astype(np.float32), label.astype(np.int32)


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--lr", type=float, default=0.05)
  args = parser.parse_args(argv)

  x, y = spirals(4096)
  model = eqx.nn.MLP(2, 2, width_size=64, depth=3, activation=jax.nn.tanh,
                     key=jax.random.key(0))

  def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  print(sngd_jax.coverage(loss_fn, model, x[:8], y[:8]))
  tx = sngd_jax.sngd_momentum(args.lr)
  state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state, x, y):
    (loss, acts), grads = eqx.filter_value_and_grad(
        sngd_jax.capture_eqx(loss_fn, outputs=False), has_aux=True)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, state = tx.update(grads, state, params, activations=acts)
    return eqx.apply_updates(model, updates), state, loss

  rng = np.random.default_rng(1)
  start, loss = time.perf_counter(), float("nan")
  for t in range(args.steps):
    idx = rng.integers(0, len(x), size=args.batch)
    model, state, loss = step(model, state, x[idx], y[idx])
    if t % max(args.steps // 10, 1) == 0 or t == args.steps - 1:
      print(f"step {t:4d}  loss {float(loss):.3f}  ({time.perf_counter() - start:.1f} s)")
  accuracy = jnp.mean(jnp.argmax(jax.vmap(model)(x), -1) == y)
  print(f"train accuracy {float(accuracy):.3f}")
  return float(loss)


if __name__ == "__main__":
  main()
