"""Control flow that keeps its cost under a caller's ``jax.vmap``.

Users vmap whole training steps: an ensemble, several seeds or learning rates in one program.
Inside such a step ``jax.lax.cond`` with a batched predicate becomes a ``select`` that runs
both branches on every call, so the statistics (due one step in ``factor_every``) and the
inverse refresh (one in ``inverse_every``) would run on every step, for every member (4
members of an MLP: 36.9 ms a step against 14.8 ms with this module and 2.9 ms for one
member alone, means of ``benchmarks/vmap_members.py --members 4 --rounds 5``:
``benchmarks/results/vmap_members.json``; ``tests/test_vmap.py`` checks the structure
and the numbers against members trained alone). ``schedule_cond`` keeps the branch a
conditional: the expensive branch runs only on the calls where some member's predicate
holds (all members on the usual schedule), and only there are the two branches' results
selected per member.
``traced_with_explicit_closure`` is the shared step: ``jax.custom_batching`` needs the
values a function closes over (the step's tracers) as explicit arguments.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.core
import jax.numpy as jnp


def traced_with_explicit_closure(fn: Callable, *args) -> tuple[Callable, tuple]:
  """``fn`` traced at ``args``, as ``(run, consts)`` with ``run(*args, *consts) == fn(*args)``.

  ``consts`` are the values ``fn`` closes over (tracers of the enclosing step included), so
  that a ``custom_vmap`` rule sees which of them are batched.
  """
  # A fresh function each time: `make_jaxpr` caches traces by function, and a trace must
  # read the module state of its own time (as `lax.cond` does), not an earlier one's.
  closed, out_shape = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*args)
  out_tree = jax.tree.structure(out_shape)
  n_args = len(args)
  # `run` holds the jaxpr, never its consts: they may be tracers of the enclosing trace, and
  # `run` outlives it (a custom_vmap rule kept in the program's equations).
  jaxpr, consts = closed.jaxpr, tuple(closed.consts)
  del closed

  def run(*all_args):
    flat = jax.tree.leaves(all_args[:n_args])
    outs = jax.core.eval_jaxpr(jaxpr, all_args[n_args:], *flat)
    return jax.tree.unflatten(out_tree, outs)

  return run, consts


def with_derivatives_of(plain: Callable, primal: Callable) -> Callable:
  """``primal`` (the same results as ``plain``) differentiated as ``plain`` is.

  A ``custom_jvp`` whose rule is ``jax.jvp(plain, ...)``: for a ``primal`` with its own
  batching (``jax.custom_batching``), which JAX cannot differentiate in reverse mode, so
  that forward and reverse mode through it work as through ``plain``.
  """
  f = jax.custom_jvp(lambda *args: primal(*args))
  f.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
  return f


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
  """Per member (the leading axis): ``on_true`` where ``pred``, else ``on_false``."""
  return jax.tree.map(
      lambda a, b: jnp.where(pred.reshape((-1,) + (1,) * (jnp.ndim(a) - 1)), a, b),
      on_true, on_false)


def schedule_cond(pred: jax.Array, true_fn: Callable, false_fn: Callable, operand: Any) -> Any:
  """``jax.lax.cond(pred, true_fn, false_fn, operand)`` that stays a conditional under vmap.

  Without ``vmap`` it is that ``lax.cond`` (the same program). Under a caller's ``vmap``
  whose ``pred`` is batched (``s`` members), the batched call is

      all(pred)  -> vmap(true_fn)
      any(pred)  -> select(pred, vmap(true_fn), vmap(false_fn))
      otherwise  -> vmap(false_fn)

  instead of ``select(pred, vmap(true_fn), vmap(false_fn))`` on every call; an unbatched
  ``pred`` keeps one ``lax.cond`` over the vmapped branches. The results are those of
  ``lax.cond`` member by member. Its derivatives are ``lax.cond``'s
  (``with_derivatives_of``), so forward and reverse mode work through it; a vmap of a
  derivative runs both branches, as ``lax.cond`` does.
  """
  run_t, consts_t = traced_with_explicit_closure(true_fn, operand)
  run_f, consts_f = traced_with_explicit_closure(false_fn, operand)

  def plain(pred, operand, consts_t, consts_f):
    return jax.lax.cond(pred, lambda: run_t(operand, *consts_t),
                        lambda: run_f(operand, *consts_f))

  batched_cond = jax.custom_batching.custom_vmap(plain)

  @batched_cond.def_vmap
  def _rule(axis_size, in_batched, pred, operand, consts_t, consts_f):
    pred_batched, *rest = in_batched
    broadcast = lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
    operand, consts_t, consts_f = jax.tree.map(broadcast, (operand, consts_t, consts_f),
                                               tuple(rest))
    on_true = lambda: jax.vmap(lambda o, c: run_t(o, *c))(operand, consts_t)
    on_false = lambda: jax.vmap(lambda o, c: run_f(o, *c))(operand, consts_f)
    if not pred_batched:
      out = jax.lax.cond(pred, on_true, on_false)
    else:
      mixed = lambda: _select(pred, on_true(), on_false())
      out = jax.lax.cond(jnp.all(pred), on_true,
                         lambda: jax.lax.cond(jnp.any(pred), mixed, on_false))
    return out, jax.tree.map(lambda _: True, out)

  return with_derivatives_of(plain, batched_cond)(pred, operand, consts_t, consts_f)
