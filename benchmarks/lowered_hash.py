"""A digest of each evaluation model's lowered ``sngd_momentum`` training step.

``python3 -m benchmarks.lowered_hash [--models mlp-256-256,cnn,...]`` prints, per model, the
sha256 (first 16 hex digits) and length of the StableHLO text of
``jax.jit(step).lower(...)`` (the step of ``benchmarks.compile_time``: ``sngd()`` chained with
``sgd(0.01, momentum=0.9)``), with source locations stripped. Run it at two commits (a
checkout of each, ``PYTHONPATH`` set to it): equal digests mean the same program, so the
compile-time and time-to-target figures measured at one hold at the other.
"""

from __future__ import annotations

import argparse
import hashlib
import re

MODELS = "mlp-256-256,cnn,resnet-bn,autoencoder,char-lstm,transformer"


def digest(name: str) -> tuple[str, int]:
  """``(sha256[:16], length)`` of the model's lowered step, locations stripped."""
  import jax.numpy as jnp  # noqa: PLC0415 - after argparse, so --help imports nothing heavy
  import optax  # noqa: PLC0415

  import sngd_jax  # noqa: PLC0415
  from benchmarks import compile_time, evaluate  # noqa: PLC0415
  task = compile_time._tasks()[name]()
  pre, post = sngd_jax.sngd(), optax.with_extra_args_support(optax.sgd(0.01, momentum=0.9))
  xs, ys = jnp.asarray(task.x_train[:256]), jnp.asarray(task.y_train[:256])
  params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
  idx = jnp.arange(task.batch_size, dtype=jnp.int32) % xs.shape[0]
  text = evaluate.make_step(task, pre, post).lower(params, extra, s_pre, s_post, xs, ys,
                                                   idx).as_text()
  text = re.sub(r"loc\([^)]*\)", "", text)
  text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
  return hashlib.sha256(text.encode()).hexdigest()[:16], len(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=MODELS, help="comma-separated evaluation models")
  args = parser.parse_args(argv)
  import sngd_jax  # noqa: PLC0415
  print(f"sngd_jax from {sngd_jax.__file__}")
  for name in args.models.split(","):
    h, n = digest(name)
    print(f"{name} {h} {n}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
