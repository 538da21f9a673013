"""Static input checks: mistakes become errors that name the layer path.

These run while tracing (shapes and dtypes are known then) and turn a state,
params tree or activations that do not fit into an error naming the layer path
and the expected and actual shapes or dtypes, instead of a broadcasting error
deep in XLA. (The on-device acceptance test of a refreshed inverse is
``sngd_jax._src.inverse.refresh``.)
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from sngd_jax._src import config as config_lib
from sngd_jax._src import distributed, paths
from sngd_jax._src import layers as layers_lib
from sngd_jax._src import sketch as sketch_lib


def check_param_dtypes(specs: Mapping[str, layers_lib.LayerSpec], leaves: list[Any],
                       index: Mapping[tuple[str, ...], int], what: str) -> None:
  """Requires floating-point kernels and biases for every preconditioned layer.

  Args:
    specs: the layers.
    leaves: flat leaves of the params (or updates) tree.
    index: leaf parts -> position in ``leaves``.
    what: ``"params"`` or ``"updates"``, for the message.

  Raises:
    TypeError: naming the leaf path and its dtype, and the ``fisher`` entry that leaves the
      layer to the next transform (a complex ``kernel``, such as the spectral weights of a
      Fourier neural operator, is a layer by its name only: sngd has no local Fisher for it).
  """
  for spec in specs.values():
    for parts in (spec.kernel, spec.bias):
      if parts is None:
        continue
      dtype = jnp.asarray(leaves[index[parts]]).dtype
      if not jnp.issubdtype(dtype, jnp.floating):
        what_it_is = ("complex weights have no local Fisher in sngd (the spectral weights of a "
                      "Fourier neural operator, say)"
                      if jnp.issubdtype(dtype, jnp.complexfloating) else
                      "a preconditioned layer needs floating-point params and gradients "
                      "(float16, bfloat16, float32 or float64)")
        raise TypeError(
            f"sngd: {what} leaf {paths.join(parts)!r} of layer {spec.path!r} has dtype "
            f"{dtype}; {what_it_is}. Pass `fisher={{{spec.path!r}: None}}` to leave the "
            "layer to the next transform of the chain (its gradient passes through "
            "unchanged)")


def check_state_shapes(specs: Mapping[str, layers_lib.LayerSpec],
                       factors: Mapping[str, Any],
                       sketch_ranks: Optional[Mapping[str, int]] = None) -> None:
  """Requires every state factor to have the shape the layer's params need.

  Args:
    specs: the layers of the updates tree.
    factors: the state's factors, by layer path.
    sketch_ranks: the rank ``r`` of each layer kept as a sketch (its factor is
      a ``sngd_jax.Sketch`` with ``y`` of shape ``(d, r)``).

  Raises:
    ValueError: naming the layer path and the expected and actual factor shapes.
  """
  sketch_ranks = sketch_ranks or {}
  shape = lambda f: (("sketch",) + tuple(f.y.shape)) if sketch_lib.is_sketch(f) \
      else tuple(f.shape)
  for path, spec in specs.items():
    want = spec.factor_shape
    if path in sketch_ranks:
      want = ("sketch",) + spec.stack + (spec.dim, sketch_ranks[path])
    got = shape(factors[path])
    if got != want:
      raise ValueError(
          f"sngd: layer {path!r}: the optimizer state holds a factor of shape {got}, but "
          f"params with kernel {paths.join(spec.kernel)!r} of {spec.in_dim} inputs and "
          f"{spec.out_dim} outputs{' and a bias' if spec.bias else ''} need {want} "
          f"(fisher={spec.fisher!r}). Was the state made by `init` on the same params?")
    dtypes = {jnp.dtype(a.dtype) for a in jax.tree.leaves(factors[path])
              if jnp.issubdtype(a.dtype, jnp.floating)}
    low = sorted(str(d) for d in dtypes if d.itemsize < 4)
    if low:
      raise TypeError(
          f"sngd: layer {path!r}: the optimizer state holds its factor in {', '.join(low)}; "
          "SNGD keeps factors and inverses in float32 (or float64), which the inverses' "
          "LAPACK kernels need. Was the state cast to a low precision? Cast only the other "
          "transforms' states (e.g. Adam's moments), not the `SNGDState`")


def check_activations(specs: Mapping[str, layers_lib.LayerSpec], activations: Mapping) -> None:
  """Requires floating-point activations with at least one axis (token ids excepted).

  Args:
    specs: the layers.
    activations: captured activations by layer path.

  Raises:
    TypeError: for integer or boolean activations, naming the layer path.
    ValueError: for scalar (rank 0) activations, naming the layer path.
  """
  for path, spec in specs.items():
    for i, call in enumerate(activations[path]):
      for name, x in (("inputs", call.inputs), ("outputs", call.outputs)):
        if x is None:
          continue  # outputs not kept (capture(..., outputs=False))
        x = jnp.asarray(x)
        if x.ndim == 0:
          raise ValueError(
              f"sngd: layer {path!r}: call {i} captured scalar {name}; expected shape "
              f"(..., {spec.in_dim if name == 'inputs' else spec.out_dim})")
        if name == "inputs" and call.kind == "embed":
          continue  # token ids: integers by design
        if not jnp.issubdtype(x.dtype, jnp.floating):
          raise TypeError(
              f"sngd: layer {path!r}: call {i} captured {name} of dtype {x.dtype} and shape "
              f"{x.shape}; activations must be floating point")


_NOTHING_CAPTURED = (
    ". No layer at all was captured: is the capture function the one for this kind of "
    "model? `sngd_jax.capture` for a linen module's `apply`, `sngd_jax.capture_nnx` for an "
    "NNX module, `sngd_jax.capture_eqx` for an Equinox model, `sngd_jax.capture_hk` for a "
    "Haiku model's `apply`, each wrapping the function that calls the model")


def unmatched_option_keys(params: Any, fisher: Any, stacked: Any) -> list[str]:
  """Messages for ``fisher`` / ``stacked`` keys that name no layer of ``params``.

  ``fisher`` keys are layer paths (a layer's parameter path without its leaf name:
  ``'Dense_0'``, not ``'Dense_0/kernel'``); ``stacked`` keys are path prefixes. A key that
  names no layer has no effect, most often because it is a parameter path or misspelled.
  """
  errors: dict[str, Any] = {}
  known = set(layers_lib.discover(params, "linear", None, errors=errors)) | set(errors)
  shown = sorted(known)
  listing = f"{shown[:12]}{' ...' if len(shown) > 12 else ''}"
  out = []

  def message(option: str, key: str, what: str) -> str:
    text = (f"sngd: `{option}` key {key!r} names no layer of the params this `sngd` sees, "
            f"so it has no effect. Its keys are {what}. Layers: {listing}.")
    stem, _, leaf = key.rpartition("/")
    if leaf in ("kernel", "bias", "embedding", "scale", *layers_lib.HAIKU_NAMES) and stem in known:
      text += f" Did you mean {stem!r} (the layer, not its {leaf!r} leaf)?"
    return text + (" (A layer that is frozen or updated by another transform is not seen "
                   "by this `sngd`.)")

  if isinstance(fisher, Mapping):
    for key in fisher:
      if key not in known:
        out.append(message("fisher", key, "layer paths as `sngd_jax.coverage` lists them"))
  for key in (stacked or {}):
    if key != "" and not any(p == key or p.startswith(key + "/") for p in known):
      out.append(message("stacked", key, "prefixes of layer paths"))
  return out


def warn_unmatched_option_keys(params: Any, fisher: Any, stacked: Any) -> None:
  """Warns once per key of ``unmatched_option_keys`` (at ``init``, outside any trace)."""
  for text in unmatched_option_keys(params, fisher, stacked):
    warnings.warn(text, stacklevel=config_lib.caller_stacklevel())


NO_LAYERS = "sngd: found no layer in the params"
"""The start of ``no_layers_message`` (``coverage``, which reports those params, filters it)."""


def no_layers_message(params: Any, specs: Mapping[str, Any], stacked: Any) -> Optional[str]:
  """The warning for params in which ``discover`` finds no layer at all, else None.

  Such params have arrays but none of the leaf names (or Equinox layer types) a layer is
  found by: ``sngd`` would pass every gradient through unchanged. A tree whose layers
  ``fisher`` leaves out (``None``) on purpose, one whose layers fit no modelled layer
  (``coverage`` reports those), or one without arrays (every leaf masked off by
  ``optax.masked``), gives no message.
  """
  if specs:
    return None
  arrays = [paths.join(paths.leaf_parts(key_path))
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if getattr(leaf, "ndim", None) is not None]
  unmodelled: dict[str, layers_lib.UnmodelledLayer] = {}  # layers that fit no model: found
  if not arrays or layers_lib.discover(params, "linear", stacked, errors=unmodelled) or unmodelled:
    return None
  shown = ", ".join(repr(a or "<root>") for a in arrays[:4])
  shown += ", ..." if len(arrays) > 4 else ""
  unread = layers_lib.haiku_names_unread(params)
  return (
      f"{NO_LAYERS} ({len(arrays)} array(s): {shown}), so every "
      "gradient passes through unchanged. Layers are found by their leaf names: Flax linen "
      "and NNX `kernel` (+ `bias`), `embedding`, `scale` (+ `bias`); Haiku `w` (+ `b`), "
      "`embeddings`, `scale` (+ `offset`), read so once `haiku` is imported; Equinox layers "
      "by their type. "
      + (f"These params hold Haiku layers' leaves, but also the linen name {unread!r}, and a "
         "tree that holds any of linen's names is read with linen's only "
         "(docs/known-issues.md): rename that param. " if unread else "")
      + "`sngd_jax.coverage(loss_fn, params, ...)` shows what each leaf gets "
      "(docs/layer-coverage.md)."
      + (f" Here {paths.FLAT_MAP_FIX}." if paths.holds_flat_map(params) else ""))


def warn_no_layers(params: Any, specs: Mapping[str, Any], stacked: Any) -> None:
  """Warns at ``init`` when ``params`` hold arrays but no layer (``no_layers_message``)."""
  text = no_layers_message(params, specs, stacked)
  if text is not None:
    warnings.warn(text, stacklevel=config_lib.caller_stacklevel())


def warn_under_optax_multisteps() -> None:
  """Warns when ``init`` is called by ``optax.MultiSteps`` (not ``sngd_jax.MultiSteps``).

  ``optax.MultiSteps`` averages the micro-batches' gradients but hands the inner
  optimizer the extra arguments of one call only (or none): SNGD's statistics would see
  ``1/k`` of the data, or ``update`` would miss its activations. Its ``init`` is found
  on the call stack (it calls the inner ``init``), since nothing else tells ``sngd``
  what wraps it.
  """
  try:
    import optax  # noqa: PLC0415
    code = optax.MultiSteps.init.__code__
  except AttributeError:
    return
  frame = sys._getframe(1)
  while frame is not None:
    if frame.f_code is code:
      owner = frame.f_locals.get("self")
      if not type(owner).__module__.startswith("sngd_jax."):
        warnings.warn(
            "sngd: this `sngd` is wrapped by `optax.MultiSteps`, which passes the inner "
            "optimizer the activations of one micro-batch at most: SNGD's local Fisher would "
            "see 1/k of the data. Use `sngd_jax.MultiSteps` (same arguments), which "
            "accumulates the statistics of every micro-batch.",
            stacklevel=config_lib.caller_stacklevel())
      return
    frame = frame.f_back


PROJECTING_MODULES = ("optax.contrib._galore",)
"""Modules of optax transforms that hand their ``base_optimizer`` low-rank projections of the
gradients (``optax.contrib.galore``, ``scale_by_galore``) instead of the gradients."""


def check_not_under_projection() -> None:
  """Raises when ``init`` is called by a transform that projects the gradients (GaLore).

  ``optax.contrib.galore(..., base_optimizer=sngd)`` initializes its base optimizer with
  params of the projected shapes (a ``(m, n)`` kernel becomes ``(r, n)`` or ``(m, r)``, a bias
  stays) and updates it with ``R = P^T G`` or ``G P`` and no keyword arguments. SNGD
  preconditions a layer's whole gradient ``[g_W; g_b^T]`` by the local Fisher ``E[x~ x~^T]``
  of its inputs, so it would fail on the shapes (a kernel whose outputs no longer match its
  bias, an error that blamed the kernel's layout) or on the missing activations (an error
  that blamed the training loop), or, for a bias-free kernel projected on its output side,
  run. The caller is found on the call stack, as ``warn_under_optax_multisteps`` does.
  """
  frame = sys._getframe(1)
  while frame is not None:
    module = frame.f_globals.get("__name__", "")
    if any(module == m or module.startswith(m + ".") for m in PROJECTING_MODULES):
      raise TypeError(
          "sngd: `sngd` is the `base_optimizer` of `optax.contrib.galore` (or "
          "`scale_by_galore`), which hands it low-rank projections of the gradients "
          "(`P^T G` of shape (r, n), or `G P` of shape (m, r), per kernel; biases unprojected) "
          "and no `activations=`. SNGD preconditions each layer's full gradient "
          "`[g_W; g_b^T]` with the local Fisher of the layer's inputs, `E[x~ x~^T]`, which a "
          "projected gradient no longer matches in shape or meaning. Put SNGD first and "
          "GaLore after it, on the preconditioned update: `optax.chain(sngd_jax.sngd(), "
          "optax.contrib.galore(learning_rate, rank=...))`, or give the two different "
          "layers with `optax.multi_transform`. For SNGD's own memory on wide layers, "
          "`inverse=\"auto\"` keeps a rank-128 Nystrom sketch (docs/training-loops.md).")
    frame = frame.f_back


def check_not_params_placeholder(params: Any) -> None:
  """Raises when ``init`` gets the placeholder of ``optax.tree_utils.tree_map_params``.

  ``tree_map_params`` finds the params-shaped parts of an optimizer state by calling ``init``
  on a placeholder and matching the two states. SNGD's state has one factor and inverse per
  layer, found from the params' shapes: from the placeholder it would have none, and the match
  failed in ``jax.tree.map`` with a pytree structure error at ``factors``.
  """
  kind = type(params)
  if kind.__name__ != "_ParamsPlaceholder" or not kind.__module__.startswith("optax."):
    return
  raise TypeError(
      "sngd: `optax.tree_utils.tree_map_params` cannot map a state that holds an `SNGDState`: "
      "it calls `init` on a placeholder to find the params-shaped leaves, and SNGD's state has "
      "one factor and inverse per layer, found from the params, none of them shaped like a "
      "parameter. Map the SNGD part with `jax.tree.map` (its leaves are per-layer statistics, "
      "e.g. replicated under data parallelism), and call `tree_map_params` with the other "
      "transforms of the chain on their part of the state (for `optax.chain(sngd_jax.sngd(), "
      "base)`: `(jax.tree.map(g, opt_state[0]), optax.tree_utils.tree_map_params(base, f, "
      "opt_state[1]))`)")


def check_has_layers(updates: Any, activations: Any) -> None:
  """Raises when ``sngd`` sees the params as one vector (``optax.flatten``) while activations
  name layers: it would pass every gradient through unchanged, plain SGD with no word.

  Params that hold no layer in a tree (only LoRA adapters or biases trained, through an
  ``nnx.Optimizer`` ``wrt`` filter or a mask) pass: the activations of frozen layers are
  ignored, as everywhere.
  """
  if not isinstance(activations, Mapping) or not activations:
    return
  leaves = jax.tree_util.tree_leaves_with_path(updates)
  _check_not_flattened(leaves, activations)
  if len(leaves) != 1 or leaves[0][0] or getattr(leaves[0][1], "ndim", 0) > 1:
    return
  raise ValueError(
      "sngd: the params this `sngd` sees are one vector, not a tree of layers, so it would "
      "pass every gradient through unchanged, while `activations=` holds layers "
      f"{sorted(activations)[:8]}. Under `optax.flatten` the params are one vector: put "
      "`sngd` outside it (`optax.chain(sngd_jax.sngd(), optax.flatten(...))`)")


def _check_not_flattened(leaves: list, activations: Mapping) -> None:
  """Raises for params flattened into one dict (``flax.traverse_util.flatten_dict``, with
  tuple keys or ``sep='/'``) whose keys name captured layers: ``sngd`` finds layers by
  nesting, so it would find none and pass every gradient through, ignoring the activations.

  Only a leaf's own key is read as flattened: a Haiku module's name holds ``/`` too
  (``{'mlp/~/linear_0': {'w': ...}}``), and Haiku params in which no layer is found (every
  layer left out with ``fisher={path: None}``, ``optax.masked`` to the biases) are not
  flattened."""
  for key_path, _ in leaves:
    keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
    flat = key_path[-1].key if key_path and isinstance(key_path[-1],
                                                       jax.tree_util.DictKey) else None
    if not (isinstance(flat, tuple) or (isinstance(flat, str) and "/" in flat)):
      continue
    parts = [str(p) for k in keys
             for p in (k if isinstance(k, tuple) else str(k).split("/"))]
    if parts and parts[0] == "params":
      parts = parts[1:]
    if len(parts) > 1 and paths.join(parts[:-1]) in activations:
      raise ValueError(
          f"sngd: the params are a flattened dict (key {flat!r}, as "
          "`flax.traverse_util.flatten_dict` makes), while `activations=` holds the layer "
          f"{paths.join(parts[:-1])!r}: sngd finds layers in nested params "
          "(`{'Dense_0': {'kernel': ...}}`), so it would find none and pass every gradient "
          "through unchanged. Give `init` and `update` the nested params: "
          "`flax.traverse_util.unflatten_dict(flat)` (with the `sep=` you flattened with)")


def check_structure(specs: Mapping[str, layers_lib.LayerSpec], state_factors: Mapping[str, Any],
                    activations: Optional[Mapping], skip_uncalled: bool = False) -> None:
  """Raises clear errors for a state, params or activations that do not fit.

  Every layer of the params needs activations. Activations of layers the params do not
  hold are not an error: they belong to parameters that another transform updates
  (``optax.multi_transform``, ``optax.masked``) or that are frozen (an ``nnx.Optimizer``
  with a ``wrt`` filter, an ``eqx.partition``), and ``update`` ignores them;
  ``sngd_jax.coverage`` lists them.
  """
  if activations is not None and not isinstance(activations, Mapping):
    raise TypeError(
        f"sngd: `activations=` must be the dict that `sngd_jax.capture` returns (layer path "
        f"-> captured calls), got a {type(activations).__name__}. With `has_aux=True` the "
        "wrapped loss returns `(loss, (aux, acts))`: pass `acts`, not the aux or the pair")
  if activations is not None:
    for path in sorted(activations):
      calls = activations[path]
      if isinstance(calls, (tuple, list)) and all(
          hasattr(c, "inputs") and hasattr(c, "kind") for c in calls):
        continue
      got = f"value of type {type(calls).__name__}"
      if isinstance(calls, Mapping):
        got += f" with keys {sorted(map(str, calls))[:4]}"
      raise TypeError(
          f"sngd: `activations=` holds a {got} at {path!r}, not the tuple of captured calls "
          "that `sngd_jax.capture` records per layer path: were the gradients or the params "
          "passed as `activations=`? `jax.value_and_grad(sngd_jax.capture(loss_fn), "
          "has_aux=True)` returns `((loss, acts), grads)` and `jax.grad(sngd_jax.capture("
          "loss_fn), has_aux=True)` returns `(grads, acts)`: pass that `acts`")
  if set(specs) != set(state_factors):
    missing = sorted(set(state_factors) - set(specs))
    extra = sorted(set(specs) - set(state_factors))
    raise ValueError(
        "sngd: the updates tree does not match the optimizer state "
        f"(layers in the state but not in the updates: {missing}; in the updates but not in "
        f"the state: {extra}). Was the state made by `init` on the same params? After "
        "changing which layers are trained (the labels of `optax.multi_transform`, a mask, "
        "an `nnx.Optimizer`'s `wrt`), make the new optimizer's state with `init` "
        "(docs/training-loops.md, *Changing which layers are trained*)")
  if activations is None:
    raise ValueError(
        "sngd: `update` needs `activations=`: wrap the loss with `sngd_jax.capture` (linen), "
        "`sngd_jax.capture_nnx` (NNX), `sngd_jax.capture_eqx` (Equinox) or "
        "`sngd_jax.capture_hk` (Haiku) and pass what it "
        "returns, e.g. "
        "`tx.update(grads, state, params, activations=acts)`. Flax's "
        "`TrainState.apply_gradients` does not pass them on: use `sngd_jax.TrainState`. "
        "`optax.MultiSteps` does not pass them on either (and where it does, SNGD would see "
        "only the last micro-batch): use `sngd_jax.MultiSteps`, same arguments. "
        "Under a wrapper that calls "
        "its inner transform without keyword arguments (`optax.lookahead`, "
        "`optax.contrib.sam`), build the wrapper in the step around "
        "`sngd_jax.with_activations(tx, acts)`.")
  if skip_uncalled and activations:  # `uncalled="skip"`: layers without calls are kept
    return
  for path, spec in specs.items():
    path = spec.source or path  # a tied table's output layer: the table's calls
    if path not in activations or not activations[path]:
      raise ValueError(
          f"sngd: no activations were captured for layer {path!r} (params "
          f"{paths.join(spec.kernel)!r}). Is it a layer type that `capture` records "
          "(docs/layer-coverage.md; not ConvLocal, DenseGeneral(batch_dims=...), "
          "ConvTranspose(transpose_kernel=True or CIRCULAR), a Conv with mask=, "
          "an Einsum of another layout; a layer you wrote yourself, `x @ kernel + bias`, is "
          "recorded when it computes `y = sngd_jax.dense(x, kernel, bias)` instead), "
          "called inside the captured function (not under a while_loop or inner jit, a "
          "module-level `nnx.remat`: capture warns about those, and the fix is in the "
          "warning)? Only for a layer that this step does not call at all (a head used in "
          "some steps only): pass `uncalled=\"skip\"` to sngd, which keeps its factor on "
          "such steps (never for a layer called where capture cannot see it: its factor "
          "would never be fed). To leave it unpreconditioned pass "
          f"`fisher={{{path!r}: None}}`. Captured layers: {sorted(activations)}"
          + (_subtree_hint(path, activations) if activations else _NOTHING_CAPTURED)
          + _haiku_names_hint(spec) + _raw_param_hint(spec))


def _raw_param_hint(spec: layers_lib.LayerSpec) -> str:
  """For a norm scale or an embedding table: that it may be an array of the user's own module
  named like one (``layers.raw_param_note``); for a stack of dense layers: how to record a
  stacked kernel used by hand (``layers.stacked_kernel_note``)."""
  note = (layers_lib.raw_param_note(spec.path, spec.kernel, spec.structure)
          or layers_lib.stacked_kernel_note(spec.path, spec.structure, spec.stack))
  return f". {note}" if note else ""


def _haiku_names_hint(spec: layers_lib.LayerSpec) -> str:
  """For a layer found under Haiku's names (``layers.HAIKU_NAMES``: ``w``, ``embeddings``),
  says why they were read, since a linen, NNX or hand-written tree that names its arrays so
  is read the same way once ``haiku`` is imported."""
  leaf = spec.kernel[-1] if spec.kernel else None
  if leaf is None or layers_lib.HAIKU_NAMES.get(leaf, leaf) == leaf:
    return ""
  return (f". Its params were read with Haiku's names ({leaf!r} as a "
          f"{layers_lib.HAIKU_NAMES[leaf]!r}): `haiku` is imported and the params hold none of "
          "linen's names. A Haiku model is captured with `sngd_jax.capture_hk` (a Haiku "
          "module you wrote when it computes `sngd_jax.dense(x, w, b)` on its own `w`, `b`); "
          "a layer of another framework whose arrays are named so is not: leave it to "
          f"the next transform with `fisher={{{spec.path!r}: None}}`, or name its arrays "
          "`kernel` and `bias` (docs/layer-coverage.md)")


def _subtree_hint(path: str, activations: Mapping) -> str:
  """Where a captured path is ``path`` without a leading prefix (a module applied by its own
  ``apply`` on a subtree of the params names its layers from that root), says so."""
  found = sorted(k for k in activations if isinstance(k, str) and k
                 and path.endswith("/" + k)) or ([""] if "" in activations else [])
  if not found:
    return ""
  k = found[-1]
  prefix = path[:len(path) - len(k)].rstrip("/") if k else path
  return (f". The calls captured as {k!r} may be this layer's: a module applied by its own "
          f"`apply` on the subtree {prefix!r} of the params (`Sub().apply({{'params': "
          f"params[...]}}, x)`) names its layers from that root, without {prefix!r}. Call "
          "it through the model instead, e.g. `model.apply({'params': params}, x, "
          "method=lambda m, x: m.sub(x))`, so that the captured paths are the params' paths")


def check_statistics(specs: Mapping[str, layers_lib.LayerSpec], state_factors: Mapping[str, Any],
                     estimates: Mapping[str, Any]) -> None:
  """Requires ready batch estimates (``update(..., statistics=)``) to fit the state.

  Args:
    specs: the layers of the updates tree.
    state_factors: the state's factors, by layer path.
    estimates: a batch estimate per layer path, of its factor's form and shape.

  Raises:
    ValueError: naming the layer path, for a missing layer or a wrong shape.
  """
  if set(specs) != set(state_factors) or set(estimates) != set(specs):
    missing, extra = sorted(set(specs) - set(estimates)), sorted(set(estimates) - set(specs))
    raise ValueError(
        f"sngd: `statistics=` holds batch estimates for layers {sorted(estimates)}; the "
        f"updates have layers {sorted(specs)} and the state {sorted(state_factors)} "
        f"(missing from `statistics=`: {missing}; not layers of the updates: {extra}). Was "
        "the state made by `init` on the same params?")
  for path in specs:
    want = jax.tree.map(jnp.shape, state_factors[path])
    got = jax.tree.map(jnp.shape, estimates[path])
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise ValueError(
          f"sngd: layer {path!r}: the batch estimate passed as `statistics=` has shape {got}; "
          f"the state's factor has {want}. Pass what `sngd_jax.MultiSteps` accumulates.")
    for leaf, factor in zip(jax.tree.leaves(estimates[path]),
                            jax.tree.leaves(state_factors[path]), strict=True):
      if (not jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
          or jnp.finfo(jnp.result_type(leaf)).bits < jnp.finfo(factor.dtype).bits):
        raise ValueError(
            f"sngd: layer {path!r}: the batch estimate passed as `statistics=` is "
            f"{jnp.result_type(leaf)}; the state's factor is {factor.dtype}: pass estimates "
            "in the factor's dtype (or wider), as `sngd_jax.MultiSteps` accumulates them.")


def check_axis_name(axis_name: Any) -> None:
  """Requires ``axis_name`` to be bound where ``update`` is traced; warns when a step
  inside ``shard_map`` or ``pmap`` (both bind manual mesh axes) leaves it unset.

  ``axis_name`` is for a step written per device (``shard_map``, ``pmap``): each device's
  statistics are averaged over that axis. A wrong name made JAX fail later with an empty
  ``AssertionError`` (inside ``shard_map``) or a message about ``psum``; without the name
  inside ``shard_map`` the statistics are each device's own shard's, and with
  ``check_vma`` on, JAX refuses a conditional deep in ``update``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  manual = () if mesh.empty else tuple(
      n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
      if t == jax.sharding.AxisType.Manual)
  if axis_name is None:
    if manual:
      warnings.warn(
          f"sngd: `update` runs inside a `shard_map` or `pmap` over the manual axes {manual}, "
          "but `axis_name` is not set: each device's local Fisher is estimated from its own "
          "shard of the batch, and the devices' states drift apart. Pass "
          f"`sngd(axis_name={manual[0]!r})` (the data axis) to average the statistics "
          "over it (docs/scale-out.md).", stacklevel=config_lib.caller_stacklevel())
    return
  for name in distributed.axis_names(axis_name):
    try:
      jax.lax.axis_size(name)
    except NameError:
      where = (f"inside a `shard_map` or `pmap` over the axes {manual}" if manual else
               "outside any `shard_map`/`pmap` (under `jit` with sharded arrays, leave "
               "`axis_name=None`: XLA reduces the statistics over the devices itself)")
      raise ValueError(
          f"sngd: `axis_name={axis_name!r}` names an axis that is not bound where `update` "
          f"runs ({name!r}: the step is {where}). `axis_name` is the data axis of a step "
          "written per device (`shard_map`, `pmap`).") from None
