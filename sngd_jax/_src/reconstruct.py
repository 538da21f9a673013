"""The reconstructed network: ``W' = G^{1/2} W~`` behind a local Fisher layer.

W. Liu et al. (arXiv:2412.07441) show that SNGD is plain gradient descent on a
*reconstructed* network. For a layer with augmented input ``x~ = [x; 1]``,
weights ``W~ = [W; b^T]`` (``d x O``) and damped local Fisher
``G_rho = G + rho I``:

```
W' = G_rho^{1/2} W~,     x' = G_rho^{-1/2} x~   (the local Fisher layer),
z  = x'^T W' = x~^T W~                          (the same function),
grad_W' L = G_rho^{-1/2} grad_W~ L,
```

so a gradient step on ``W'`` mapped back by ``W~ = G_rho^{-1/2} W'`` is
``W~ - eta G_rho^{-1} grad_W~ L``. For ``fisher="rfim"`` the same holds column
by column with ``G_j``: ``w'_j = G_j^{1/2} w~_j`` and ``x'_j = G_j^{-1/2} x~``.

These functions take the factors from an ``sngd_jax.SNGDState`` (the
running ``G_t / w_t``) with the damping the transform used, so users can
inspect or train the reconstructed network. Recipe for training it with
``G`` held fixed:

```python
roots = factor_roots(state)          # G^{1/2}, G^{-1/2}, damping from state.config
p = to_reconstructed(params, roots)  # W'
# forward: each Dense layer -> reconstructed_dense(x, k', b', roots[path].inv_sqrt)
# train p with SGD; then params = from_reconstructed(p, roots)
```

When ``G`` changes, remap ``W' <- G_new^{1/2} G_old^{-1/2} W'``, i.e.
``to_reconstructed(from_reconstructed(p, old_roots), new_roots)``.

A bias that the ``sngd`` does not see (masked out by ``optax.masked``, so its
factor has no bias row, ``d = I``) takes its raw gradient: the reconstructed
layer is ``z = (G_rho^{-1/2} x)^T W' + b`` with ``W' = G_rho^{1/2} W`` and ``b``
as it is (``reconstructed_dense(x, k', None, inv_sqrt) + b``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, cast

import jax
import jax.numpy as jnp

from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src import layers as layers_lib
from sngd_jax._src import paths, precondition, statistics
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.config import value_at
from sngd_jax._src.inverse import base
from sngd_jax._src.inverse import nystrom as nystrom_lib
from sngd_jax._src.inverse.registry import get_method
from sngd_jax._src.inverse.roots import Roots, sqrt_and_inv_sqrt
from sngd_jax._src.state import injected, only_sngd_state


def _sngd_state_in(state: Any) -> Any:
  """``state`` if it holds factors (an ``SNGDState``, or anything with ``factors`` and
  ``weights``), else the one ``SNGDState`` inside an optax state."""
  if isinstance(getattr(state, "factors", None), dict) and hasattr(state, "weights"):
    return state
  return only_sngd_state(state)


def _configured(state: Any, name: str, value: Any, outer: Any = None) -> Any:
  """``value``, or the option ``name`` of the state's configuration at ``state.count`` (or
  its injected value in ``outer``, the optimizer state holding ``state``)."""
  if value is not None:
    return value
  config = getattr(state, "config", None)
  value = None if config is None else getattr(config, name)
  if value is None and outer is not None:
    value = injected(outer, name, state)
  if value is None:
    raise ValueError(f"sngd: the state does not record `{name}` (it was injected as an array "
                     f"or the state has no config); pass `{name}=` explicitly")
  return value_at(value, state.count)


def _sketched_model(s: sketch_lib.Sketch, damping, abs_damping, seed: int,
                    tail: str, omega: Optional[jax.Array] = None) -> jax.Array:
  """The dense ``M + rho I`` of the Nystrom model that a refresh makes from a sketch (one
  per layer of a stack: shape ``s.trace.shape + (d, d)``); ``omega``: the sketch's test
  matrix, where given, instead of ``seed``'s."""
  stacked = sketch_lib.flat_blocks(s)
  u, lam, tau = nystrom_lib.from_sketch(stacked, seed, tail, omega=omega)
  shift = base.damping_shift(stacked, damping, abs_damping).astype(u.dtype)
  dense = nystrom_lib.dense(nystrom_lib.NystromRep(u, lam, tau, shift))
  return dense.reshape(s.trace.shape + dense.shape[-2:])


def _modelled(method: base.InverseMethod, g, damping, abs_damping,
              nystrom: bool = True) -> Optional[jax.Array]:
  """The damped factor that ``method`` preconditions with, where it is not ``G + rho I``
  itself: the dense Nystrom model ``M + rho I`` (from a sketch or a dense ``G``; not with
  ``nystrom=False``), or the block-diagonal part of ``G + rho I`` (``block_diagonal``); None
  for the other methods (exact, or iterative approximations of the exact inverse)."""
  d = g.y.shape[-2] if sketch_lib.is_sketch(g) else g.shape[-1]
  if not ((nystrom and base.is_nystrom(method, d))
          or base.describe(method, d).name.startswith("blocks")):
    return None
  stack = g.trace.shape if sketch_lib.is_sketch(g) else g.shape[:-2]
  blocks = sketch_lib.flat_blocks(g) if sketch_lib.is_sketch(g) else g.reshape((-1, d, d))
  shift = base.damping_shift(blocks, damping, abs_damping)
  rep, _ = method.refresh(cast(jax.Array, blocks),
                          shift.astype(jax.tree.leaves(blocks)[0].dtype))
  if isinstance(rep, nystrom_lib.NystromRep):
    out = nystrom_lib.dense(rep)
  else:  # the diagonal sub-blocks (a dense G): sub-block size from the representation
    num, size = jax.tree.leaves(rep)[0].shape[1:3]
    damped = base.damp(cast(jax.Array, blocks), damping, abs_damping)
    mask = jnp.kron(jnp.eye(num, dtype=damped.dtype), jnp.ones((size, size), damped.dtype))
    out = damped * mask[:d, :d]
  return out.reshape(stack + (d, d))


def damped_factors(state: Any, damping=None, abs_damping=None,
                   nystrom_seed: Optional[int] = None,
                   nystrom_tail: Optional[str] = None) -> dict[str, jax.Array]:
  """``G + (damping * tr(G) + abs_damping) I`` per layer, from the state's factors.

  Where the state's inverse method preconditions with a model of it, the model: a
  layer whose state keeps only the sketch ``(S Omega, tr S, c)`` of ``G = S + c I``
  (the rank-``r`` Nystrom layers of ``inverse="auto"``, ``sngd_jax._src.sketch``), or a
  dense factor under a Nystrom method, gets the dense Nystrom model ``M + rho I`` that
  the transform's refresh builds, ``M = U diag(lam) U^T + tau (I - U U^T)`` (with the
  method's own seed and tail); a layer under ``block_diagonal`` (or
  ``auto(large="blocks")``) the block-diagonal part of ``G + rho I``. These are the
  matrices whose inverses it preconditions with, so the reconstructed network stays
  exact for them.

  Args:
    state: an ``sngd_jax.SNGDState`` (or anything with ``factors`` and
      ``weights`` dicts keyed by layer path), or an optimizer state that holds
      one (``sngd_momentum``'s, ``apply_if_finite``'s, ...).
    damping: the relative damping; None (default) reads the one the state was
      made with (``state.config``; a schedule is evaluated at ``state.count``; an
      injected one from the ``optax.inject_hyperparams`` state, given the whole state).
    abs_damping: the absolute damping; None reads it likewise.
    nystrom_seed: the test-matrix seed of the Nystrom model of a sketched layer; None
      (default): the state's method's (its test matrix, also when only ``nystrom_tail`` is
      given; 0 for a state without a config).
    nystrom_tail: its tail rule; None: the method's (``"mean"`` without a config).

  Returns:
    Per layer path, ``(d, d)`` (linear) or ``(O, d, d)`` (rfim) damped blocks, ``(C, 2, 2)``
    (or ``(C, 1, 1)``) for a normalization layer's channels; an embedding table's diagonal
    factor ``diag(f)`` as its damped diagonal ``f + rho``, a ``(V,)`` vector. The bias row
    (column) of an augmented input is the last.
  """
  outer, state = state, _sngd_state_in(state)
  damping = _configured(state, "damping", damping, outer)
  abs_damping = _configured(state, "abs_damping", abs_damping, outer)
  config = getattr(state, "config", None)
  method = None if config is None else get_method(config.inverse)
  # nystrom_seed/nystrom_tail replace the method's Nystrom model only, not a block-diagonal one
  own_nystrom = nystrom_seed is None and nystrom_tail is None
  out = {}
  for path, f in state.factors.items():
    g = statistics.normalized(f, state.weights[path])
    if not sketch_lib.is_sketch(g) and g.ndim == 1:  # an embedding's diagonal factor
      out[path] = g + (damping * jnp.sum(g) + abs_damping)
      continue
    model = None if method is None else _modelled(method, g, damping, abs_damping,
                                                  nystrom=own_nystrom)
    if model is not None:
      out[path] = model
    elif sketch_lib.is_sketch(g):
      # Without a seed, the test matrix the state's method sketched with (its own seed).
      omega = (None if method is None or nystrom_seed is not None or method.sketch is None
               else method.sketch(g.y.shape[-2], g.y.dtype))
      out[path] = _sketched_model(g, damping, abs_damping,
                                  0 if nystrom_seed is None else nystrom_seed,
                                  "mean" if nystrom_tail is None else nystrom_tail, omega)
    else:
      out[path] = base.damp(g, damping, abs_damping)
  return out


def factor_roots(state: Any, damping=None, abs_damping=None, method: str = "eigh",
                 nystrom_seed: Optional[int] = None, nystrom_tail: Optional[str] = None,
                 **kwargs) -> dict[str, Roots]:
  """``G_rho^{1/2}`` and ``G_rho^{-1/2}`` per layer (see ``damped_factors``).

  Args:
    state: an ``sngd_jax.SNGDState``, or an optimizer state holding one.
    damping: relative damping (None: the state's, see ``damped_factors``).
    abs_damping: absolute damping (None: the state's).
    method: a key of ``sngd_jax.inverse.ROOTS`` (``"eigh"`` is exact).
    nystrom_seed: see ``damped_factors``.
    nystrom_tail: see ``damped_factors``.
    **kwargs: passed to the root method (e.g. ``num_iters``).

  Returns:
    Per layer path, ``sngd_jax.inverse.Roots`` with the factor's shape (an embedding's:
    the elementwise roots of its damped diagonal, ``(V,)`` vectors).
  """
  out: dict[str, Roots] = {}
  previous = None
  for path, g in damped_factors(state, damping, abs_damping, nystrom_seed,
                                nystrom_tail).items():
    if g.ndim == 1:  # a diagonal: elementwise, exact
      root = jnp.sqrt(g)
      out[path] = Roots(root, 1.0 / root, jnp.zeros((), g.dtype))
      continue
    if previous is not None:  # one layer after another under jit, as refresh_inverses does
      g, _ = jax.lax.optimization_barrier((g, previous))
    out[path] = previous = sqrt_and_inv_sqrt(g, method, **kwargs)
  return out


def _map_layers(params: Any, roots: dict[str, Roots], power: str,
                fisher: layers_lib.FisherSpec, stacked: layers_lib.StackSpec) -> Any:
  """Replaces ``W~`` of every layer in ``roots`` by ``R W~`` (``d x O`` after the layer's
  stack axes), ``R`` its root ``power`` (``"sqrt"`` or ``"inv_sqrt"``).

  A tied table's two roots act on its two sides (``D^{1/2} E G_h^{1/2}``): each reads
  the table as the other left it.
  """
  specs = layers_lib.discover(params, fisher, stacked)
  missing = sorted(set(roots) - set(specs))
  if missing:
    raise ValueError(
        f"sngd: layers {missing} have factors but no kernel in the params (layers found: "
        f"{sorted(specs)}). Pass the `fisher=` and `stacked=` that the optimizer was built "
        "with (a tied table's output layer, a stacked or bias-free multi-axis kernel)")
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  index = {paths.leaf_parts(p): i for i, (p, _) in enumerate(leaves_with_path)}
  out = [leaf for _, leaf in leaves_with_path]
  for path, r in roots.items():
    spec = specs[path]
    m = getattr(r, power)
    if spec.bias is not None and spec.structure != "diagonal" and m.shape[-1] == spec.in_dim:
      # A factor without the bias row: the `sngd` did not see the bias (masked out by
      # `optax.masked` / `multi_transform`, as `transform.seen_by_state` reads it), which
      # takes its raw gradient: W' = G^{1/2} W, the bias left as it is.
      spec = dataclasses.replace(spec, bias=None)
    w = precondition.augmented(spec, out, index, m.dtype)
    size = spec.in_dim if spec.structure == "diagonal" else spec.dim
    if m.shape[-1] != size or w.shape[-2] != size:
      raise ValueError(
          f"sngd: layer {path!r}: factor of size {m.shape[-1]} does not match the "
          f"{w.shape[-2]} rows of its augmented kernel (shape {w.shape}); pass the "
          "`fisher=` and `stacked=` that the optimizer was built with")
    for i, part in precondition.split(spec, _left_multiply(spec, m, w), out, index).items():
      out[i] = part
  return jax.tree_util.tree_unflatten(treedef, out)


def _left_multiply(spec: layers_lib.LayerSpec, m: jax.Array, w: jax.Array) -> jax.Array:
  """``M W`` (one block per layer of the stack), ``M_j w_j`` per column (rfim: ``(O, d,
  d)``), or ``diag(m) W`` (a diagonal factor, ``(V,)``)."""
  if spec.structure == "diagonal":
    return m[..., :, None] * w
  if spec.per_unit or m.ndim == len(spec.stack) + 3:  # rfim roots: one block per unit
    m = m.reshape(spec.stack + (spec.out_dim,) + m.shape[-2:])
    return jnp.einsum("...jab,...bj->...aj", m, w, precision=dtypes_lib.HIGHEST)
  return jnp.matmul(m, w, precision=dtypes_lib.HIGHEST)


def to_reconstructed(params: Any, roots: dict[str, Roots], *,
                     fisher: layers_lib.FisherSpec = "linear",
                     stacked: layers_lib.StackSpec = None) -> Any:
  """Maps params to the reconstructed network's: ``W' = G_rho^{1/2} W~`` per layer.

  Args:
    params: the params tree (as given to ``sngd_jax.sngd``).
    roots: per layer path, from ``factor_roots``.
    fisher: the ``fisher=`` the optimizer was built with, where it matters here: per-layer
      input axes (``("linear", n)``) and tied tables (``"tied"``: ``E' = D^{1/2} E
      G_h^{1/2}``, both of its roots); the kind itself is read from the roots' shapes.
    stacked: the ``stacked=`` the optimizer was built with (bias-free stacked kernels).

  Returns:
    A params tree of the same structure and dtypes whose kernels and biases
    hold ``W' = [W'; b'^T]``; other leaves are unchanged, and so is the bias of a layer
    whose factor has no bias row (an ``sngd`` under ``optax.masked`` that did not see it:
    ``W' = G_rho^{1/2} W``, and the layer is ``reconstructed_dense(x, k', None,
    inv_sqrt) + b``).
  """
  return _map_layers(params, roots, "sqrt", fisher, stacked)


def from_reconstructed(params_prime: Any, roots: dict[str, Roots], *,
                       fisher: layers_lib.FisherSpec = "linear",
                       stacked: layers_lib.StackSpec = None) -> Any:
  """The inverse of ``to_reconstructed``: ``W~ = G_rho^{-1/2} W'`` (same arguments)."""
  return _map_layers(params_prime, roots, "inv_sqrt", fisher, stacked)


def fisher_layer(x: jax.Array, inv_sqrt: jax.Array, bias: bool = True) -> jax.Array:
  """The local Fisher layer ``x' = G_rho^{-1/2} x~``.

  Args:
    x: inputs ``(..., I)``.
    inv_sqrt: ``G_rho^{-1/2}``, ``(d, d)`` or ``(O, d, d)`` for rfim.
    bias: whether the layer has a bias (then ``x~ = [x; 1]``, ``d = I + 1``).

  Returns:
    ``(..., d)``, or ``(..., O, d)`` for rfim (one transformed input per unit).
  """
  if bias:
    x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
  x = x.astype(inv_sqrt.dtype)
  if inv_sqrt.ndim == 3:
    return jnp.einsum("jab,...b->...ja", inv_sqrt, x, precision=dtypes_lib.HIGHEST)
  return jnp.einsum("ab,...b->...a", inv_sqrt, x, precision=dtypes_lib.HIGHEST)


def reconstructed_dense(x: jax.Array, kernel_prime: jax.Array, bias_prime: Optional[jax.Array],
                        inv_sqrt: jax.Array) -> jax.Array:
  """A dense layer of the reconstructed network: ``z = (G_rho^{-1/2} x~)^T W'``.

  Equals ``x @ W + b`` for the original weights ``W~ = G_rho^{-1/2} W'``.

  Args:
    x: inputs ``(..., I)``.
    kernel_prime: ``W'`` rows for the inputs, ``(I, O)``.
    bias_prime: the last row of ``W'``, ``(O,)``, or None for a layer without bias (or
      whose bias is not in its factor, which ``to_reconstructed`` leaves as it is: add it
      to the result).
    inv_sqrt: ``G_rho^{-1/2}``, ``(d, d)`` or ``(O, d, d)``.

  Returns:
    The pre-activations ``(..., O)``.
  """
  w = kernel_prime
  if bias_prime is not None:
    w = jnp.concatenate([w, bias_prime[None]], axis=0)
  xp = fisher_layer(x, inv_sqrt, bias_prime is not None)
  w = w.astype(xp.dtype)
  if inv_sqrt.ndim == 3:
    return jnp.einsum("...ja,aj->...j", xp, w, precision=dtypes_lib.HIGHEST)
  return jnp.matmul(xp, w, precision=dtypes_lib.HIGHEST)
