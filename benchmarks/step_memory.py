"""What makes an SNGD step's temporary memory larger than its base optimizer's (one task).

    python3 -m benchmarks.step_memory                  # resnet-bn, ~2 min; results/step_memory.json
    python3 -m benchmarks.step_memory --task cnn

XLA:CPU allocates a compiled step's temporary buffer (``memory_analysis().temp_size_in_bytes``)
on every run; glibc serves an allocation above 32 MiB with a fresh ``mmap``, so such a step
page-faults on every page it touches, every run (``docs/performance.md``). On the ResNet of
the evaluation set these faults are what keeps SNGD's mean step above 1.5x Adam's
(``benchmarks/README.md``, *The step's temporary memory*). This compiles the task's training
step (``evaluate.make_step``) in variants and reports each one's temporary memory, to show
which part of the SNGD step holds the memory and whether a change could bring it under the
32 MiB line:

- ``sgd(momentum)``: the base optimizer alone;
- ``sngd``: ``sngd()`` then SGD momentum, statistics and refresh never due (the temporaries do
  not depend on what is due: XLA sizes them for every branch);
- ``sngd, patch chunks 4 / 2 / 1 MiB``: ``statistics.ROW_CHUNK_BYTES`` smaller than its 8 MiB;
- ``sngd, norm layers left out``: ``fisher={path: None}`` for every normalization layer;
- ``sngd, no statistics stage``: the statistics stage replaced by a pass-through (the
  captured activations then feed nothing after the backward pass);
- ``sngd, statistics independent of the gradients``: the statistics ``lax.cond`` no longer
  waits for the gradients' finiteness check (so XLA may schedule it before the backward pass).
- ``sngd, norm records hold the layer input``: linen normalization layers record their input
  ``x`` instead of ``xhat`` (wrong statistics: a memory model only) -- what recomputing
  ``xhat = (x - mean) rsqrt(var + eps)`` inside the statistics stage would hold (``x`` is
  kept for the backward pass anyway); also with the statistics independent of the gradients
  and patch chunks of 2 and 1 MiB.

Also lists the captured activations (shapes and bytes) that the SNGD step keeps until its
statistics stage.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from unittest import mock


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", default="resnet-bn")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import flax.linen.normalization as linen_norm
  import jax
  import jax.numpy as jnp
  import optax

  import sngd_jax
  from benchmarks import eval_tasks, evaluate, harness
  from sngd_jax._src import statistics, transform
  from sngd_jax._src.capture import flax_patches

  task = eval_tasks.EVAL_TASKS[args.task](30.0)
  xs, ys = jnp.asarray(task.x_train[:512]), jnp.asarray(task.y_train[:512])
  idx = jnp.arange(task.batch_size, dtype=jnp.int32)
  never = 10**9

  def temp_mb(pre) -> float:
    post = optax.with_extra_args_support(optax.sgd(0.03, momentum=0.9))
    params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
    compiled = evaluate.make_step(task, pre, post).lower(
        params, extra, s_pre, s_post, xs, ys, idx).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 1e6

  frozen = lambda **kw: sngd_jax.sngd(factor_every=never, inverse_every=never, **kw)
  params = evaluate.init_run(task, None, optax.sgd(0.1), 0, xs)[0]
  norms = [s.path for s in sngd_jax.discover(params).values() if s.structure == "per_channel"]

  orig = transform._update_statistics

  def no_statistics(config, inputs, state, grads_finite):
    return state.factors, state.weights, jnp.array(True), jnp.zeros((), jnp.int32)

  def without_gradient_check(config, inputs, state, grads_finite):
    return orig(config, inputs, state, jnp.array(True))

  def norm_records_hold_input(rec):
    """linen's ``_normalize`` patched to record ``x`` where capture records ``xhat``."""
    original = linen_norm._normalize

    @functools.wraps(original)
    def normalize(mdl, x, mean, var, reduction_axes, feature_axes, *rest, **kwargs):
      if rec.norm_slots:
        rec.normalized(x, feature_axes)
      return original(mdl, x, mean, var, reduction_axes, feature_axes, *rest, **kwargs)

    return mock.patch.object(linen_norm, "_normalize", normalize)

  rows = {"sgd(momentum)": temp_mb(None), "sngd": temp_mb(frozen())}
  for mib in (4, 2, 1):
    with mock.patch.object(statistics, "ROW_CHUNK_BYTES", mib * 2**20):
      rows[f"sngd, patch chunks {mib} MiB"] = temp_mb(frozen())
  if norms:
    rows["sngd, norm layers left out"] = temp_mb(frozen(fisher={p: None for p in norms}))
  with mock.patch.object(transform, "_update_statistics", no_statistics):
    rows["sngd, no statistics stage"] = temp_mb(frozen())
  with mock.patch.object(transform, "_update_statistics", without_gradient_check):
    rows["sngd, statistics independent of the gradients"] = temp_mb(frozen())
  if norms:
    with mock.patch.object(flax_patches, "linen_normalize", norm_records_hold_input):
      rows["sngd, norm records hold the layer input"] = temp_mb(frozen())
      with mock.patch.object(transform, "_update_statistics", without_gradient_check):
        for mib in (8, 2, 1):
          with mock.patch.object(statistics, "ROW_CHUNK_BYTES", mib * 2**20):
            rows[f"sngd, norm records hold the layer input, statistics independent of the "
                 f"gradients, patch chunks {mib} MiB"] = temp_mb(frozen())

  loss_fn = evaluate._loss_fn(task)
  extra = evaluate.init_run(task, None, optax.sgd(0.1), 0, xs)[1]
  grad_cap = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
  (_, (_, acts)), _ = jax.eval_shape(lambda p, e: grad_cap(p, e, xs[idx], ys[idx]), params, extra)
  captured = {}
  for path, calls in acts.items():
    for i, call in enumerate(calls):
      for name in ("inputs", "outputs"):
        a = getattr(call, name)
        if a is not None:
          captured[f"{path}[{i}].{name}"] = [list(a.shape), a.size * a.dtype.itemsize / 1e6]
  total = sum(mb for _, mb in captured.values())

  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"step_memory_{args.task}.json")
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "task": task.description, "temp_mb": rows, "captured_mb": captured,
               "captured_total_mb": total, "mmap_threshold_mb": 32 * 2**20 / 1e6}, f, indent=1)
  print(f"{task.description}\n\n| step variant | temporary MB |\n|---|---|")
  for name, mb in rows.items():
    print(f"| {name} | {mb:.1f} |")
  print(f"\ncaptured activations kept for the statistics stage: {total:.1f} MB in "
        f"{len(captured)} arrays; glibc's mmap threshold: {32 * 2**20 / 1e6:.1f} MB")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
