"""Activation capture for Haiku models.

``capture_hk(loss_fn)`` runs ``loss_fn(params, ...)`` (which applies a Haiku
``transform``ed function to ``params``) under ``hk.intercept_methods``, and records, for
every call of a supported layer (``recorders``), its input (and with ``outputs=True`` its
output) as ``capture_eqx`` does for Equinox. Nothing in the model changes.

A layer is named by the path of its weight (``w``, ``embeddings``, ``scale``) in the
captured function's first argument, found by identity among the arrays the module reads
(``hk.Module.params_dict``): for Haiku's own params dict, the module name that keys its
params, ``'mlp/~/linear_0'``, as ``sngd_jax.discover`` names the layer. A call whose weight
is not a leaf of that argument (params passed through a ``jax.jit`` inside the loss) cannot
be named and is not recorded (``capture_hk`` warns); one whose weight is a leaf of another
argument (a target network's params) is left out, as in ``capture_eqx``.

Haiku's own transforms (``hk.remat``, ``hk.scan``/``hk.dynamic_unroll``,
``hk.layer_stack``) run on ``jax.checkpoint`` and ``jax.lax.scan``, whose
records leave them through ``transforms``: a layer under ``hk.scan`` or ``hk.dynamic_unroll``
pools its steps, a layer of ``hk.layer_stack`` gets one local Fisher per layer of the stack.

``sngd_jax.dense`` called in a Haiku module records through ``_Interceptor.custom_dense``: the
kernel is named by its path in the params, and must be a ``w`` with a sibling ``b`` (the names
discovery reads, ``HAIKU_DENSE``), or their casts (params of the module whose method runs).

Normalization layers record ``xhat``: the layer is called a second time with its ``scale``
one and its ``offset`` zero (``hk.custom_getter``); in that call the moving averages of
``hk.BatchNorm`` are not updated.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from sngd_jax._src import paths
from sngd_jax._src.capture import custom, tables, transforms
from sngd_jax._src.capture.records import (
    Argnums,
    OtherArgs,
    Record,
    Recorder,
    check_captured_function,
    check_no_trained_left_out,
    derivation_of,
    leaf_paths,
    model_part,
    models_and_rest,
    normalized_argnums,
    split_aux,
    split_models,
    vmapped_by_caller,
)
from sngd_jax._src.frames import caller_stacklevel
from sngd_jax._src.layer_spec import (
    HAIKU_GRU,
    DenseDeclaration,
    haiku_conv_transpose,
    haiku_gru_layers,
)

HAIKU_DENSE = DenseDeclaration(weight="w", bias="b", layout="in_out")
"""What discovery reads as a Haiku dense layer: a ``w`` ``(in, out)`` and a ``b`` (``hk.Linear``'s
names), the params a ``sngd_jax.dense`` call in a Haiku module must pass."""
_LINEN_NAMES = ("kernel", "bias", "embedding")


def _haiku() -> Any:
  """The ``haiku`` module (an optional dependency: ``pip install "sngd_jax[haiku]"``)."""
  try:
    return importlib.import_module("haiku")
  except ImportError as e:
    raise ImportError("sngd: capture_hk needs Haiku: pip install \"sngd_jax[haiku]\"") from e


def _input(args: tuple, kwargs: dict, name: str) -> Any:
  return args[0] if args else kwargs[name]


def _linear(module, args, kwargs, out) -> Record:
  x, z = tables.one_example(_input(args, kwargs, "inputs"), out, 0)
  return x, z, "dense", ()


def _conv_record(module, args, kwargs, out, kernel_dilation, groups: Optional[int]) -> Record:
  """The record of an ``hk.ConvND`` or depthwise conv call (``groups`` None: one group per
  input channel)."""
  r = module.num_spatial_dims
  x, z = tables.one_example(_input(args, kwargs, "inputs"), out, r)
  if module.channel_index != -1:  # channels first: the kernel is laid out as channels last's
    x, z = jnp.moveaxis(x, 1, -1), jnp.moveaxis(z, 1, -1)
  padding = module.padding
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  config = (tuple(module.kernel_shape), tuple(module.stride), padding,
            tuple(module.lhs_dilation), tuple(kernel_dilation),
            x.shape[-1] if groups is None else int(groups))
  return x, z, "conv", config


def _conv(module, args, kwargs, out) -> Record:
  if module.mask is not None:
    return None  # a masked kernel: its inputs are not every patch entry (as linen's)
  return _conv_record(module, args, kwargs, out, module.kernel_dilation,
                      module.feature_group_count)


def _depthwise(module, args, kwargs, out) -> Record:
  # the kernel (*k, 1, C * multiplier) of a conv with one group per input channel
  return _conv_record(module, args, kwargs, out, module.rhs_dilation, None)


def _conv_transpose(module, args, kwargs, out) -> Record:
  """The record of an ``hk.ConvNDTranspose`` call: ``lax.conv_transpose`` of the input with
  the ``(*k, O, C)`` kernel read as ``(*k, C, O)`` (``transpose_kernel=False``), linen's
  ``ConvTranspose`` on that kernel. None (refused by name) channels first, with a ``mask`` or
  an ``output_shape`` (its padding is computed from the output size)."""
  if module.mask is not None or module.channel_index != -1 or module.output_shape is not None:
    return None
  r = module.num_spatial_dims
  x, z = tables.one_example(_input(args, kwargs, "inputs"), out, r)
  padding = module.padding
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return x, z, "conv_transpose", (tuple(module.kernel_shape), tuple(module.stride), padding,
                                  (1,) * r)


def _embed(module, args, kwargs, out) -> Record:
  return _input(args, kwargs, "ids"), out, "embed", ()


def _axes(axes: Any, ndim: int) -> tuple[int, ...]:
  """Haiku's axis spellings (an int, a sequence, a slice) as sorted absolute axes."""
  if isinstance(axes, slice):
    return tuple(range(ndim))[axes]
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def _param_axes(module, xhat) -> tuple[int, ...]:
  """The axes of the input along which a norm's ``scale`` varies (its channels)."""
  hk = _haiku()
  if isinstance(module, (hk.BatchNorm, hk.GroupNorm)):
    return (module.channel_index % xhat.ndim,)
  return _axes(module.param_axis, xhat.ndim)


@functools.lru_cache(maxsize=None)
def recorders() -> dict[type, Any]:
  """Haiku layer class -> recorder ``(module, args, kwargs, out) -> Record`` (``'norm'``:
  recorded from ``xhat``), and the name of the param that holds its weight."""
  hk = _haiku()
  return {hk.Linear: (_linear, "w"), hk.ConvND: (_conv, "w"), hk.Embed: (_embed, "embeddings"),
          hk.DepthwiseConv1D: (_depthwise, "w"), hk.DepthwiseConv2D: (_depthwise, "w"),
          hk.DepthwiseConv3D: (_depthwise, "w"), hk.ConvNDTranspose: (_conv_transpose, "w"),
          hk.LayerNorm: ("norm", "scale"), hk.RMSNorm: ("norm", "scale"),
          hk.BatchNorm: ("norm", "scale"), hk.GroupNorm: ("norm", "scale")}


def _gru_records(module, args, kwargs, w_i, w_h, b) -> list[tuple[Any, Any, str, tuple]]:
  """The records of an ``hk.GRU`` call's three products (``layer_spec.haiku_gru_layers``):
  ``x_t @ w_i + b``, ``h_{t-1} @ w_h[:, :2H]`` and ``(r_t * h_{t-1}) @ w_h[:, 2H:]``, ``r_t``
  computed as Haiku's ``GRU.__call__`` computes it (the same operations on the same arrays:
  under a mixed precision policy, the params and inputs cast to its compute dtype, as Haiku
  casts them for the module)."""
  hk = _haiku()
  x = jnp.asarray(_input(args, kwargs, "inputs"))
  h = jnp.asarray(args[1] if len(args) > 1 else kwargs["state"])
  policy = hk.mixed_precision.get_policy(type(module)) or hk.mixed_precision.current_policy()
  if policy is not None:
    x, h, w_i, w_h, b = policy.cast_to_compute((x, h, w_i, w_h, b))
  size = module.hidden_size
  gates_x = jnp.matmul(x, w_i)
  zr_h = jnp.matmul(h, w_h[:, :2 * size])
  zr = gates_x[..., :2 * size] + zr_h + jnp.broadcast_to(b[:2 * size], zr_h.shape)
  r = jax.nn.sigmoid(zr)[..., size:]
  gated = r * h
  a_h = jnp.matmul(gated, w_h[:, 2 * size:])
  return [(*tables.one_example(rows, out, 0), "dense", ())
          for rows, out in ((x, gates_x + b), (h, zr_h), (gated, a_h))]


def _lookup(module: Any) -> Optional[tuple[Any, str]]:
  for cls in type(module).__mro__:
    found = recorders().get(cls)
    if found is not None:
      return found
  return None


def _param(module: Any, name: str) -> Any:
  """The array ``module`` read as its param ``name`` in this call, or None.

  ``params_dict`` is a module method, so method interceptors run on it: a mixed precision
  policy (``hk.mixed_precision.set_policy``) casts what it returns to the policy's output
  dtype, a copy that is no leaf of the params. The unwrapped method reads the frame's
  params as they were passed.
  """
  hk = _haiku()
  params_dict = getattr(hk.Module.params_dict, "__wrapped__", hk.Module.params_dict)
  return params_dict(module).get(f"{module.module_name}/{name}")


class _Interceptor:
  """The ``hk.intercept_methods`` interceptor of one capture."""

  def __init__(self, rec: Recorder, frozen: OtherArgs):
    self.rec, self.frozen = rec, frozen
    self.unnamed: dict[str, None] = {}
    self.unsupported: dict[str, None] = {}
    self.tables_read: dict[str, None] = {}  # Embed tables read outside their lookup
    self.looking_up: list[Any] = []  # the recorded modules whose __call__ is running
    self.base_called: set[int] = set()  # those of them whose base class's __call__ ran too
    self.plain: list[Any] = []  # the norms being called again with unit scale, zero offset
    self.running: list[Any] = []  # the modules whose methods are running, innermost last
    self.by_dense: set[int] = set()  # ids of the recorded modules whose `sngd_jax.dense` ran
    self.recorded: dict[str, str] = {}  # built-in layers recorded: path -> weight leaf name

  def __call__(self, next_f, args, kwargs, context):
    self.running.append(context.module)
    try:
      return self._intercept(next_f, args, kwargs, context)
    finally:
      self.running.pop()

  def _intercept(self, next_f, args, kwargs, context):
    hk = _haiku()
    module = context.module
    if context.method_name == "embeddings" and isinstance(module, hk.Embed):
      table = next_f(*args, **kwargs)
      if not any(m is module for m in self.looking_up):  # `embed.embeddings`: a tied output
        _, parts = self.rec.trace(_param(module, "embeddings"))  # not a policy's cast copy
        if parts is not None:
          self.tables_read[paths.join(parts[:-1])] = None
      return table
    if context.method_name != "__call__":
      return next_f(*args, **kwargs)
    if self.plain and isinstance(module, hk.ExponentialMovingAverage):
      return _input(args, kwargs, "value")  # the xhat call of a BatchNorm updates no average
    if isinstance(module, hk.GRU):
      out = next_f(*args, **kwargs)
      if type(module).__call__ is hk.GRU.__call__:  # not a subclass's own math: not recorded,
        self._gru(module, args, kwargs)  # `update` names its layers as not captured
      return out
    found = _lookup(module)
    if found is None:
      return next_f(*args, **kwargs)
    recorder, weight_name = found
    if any(m is module for m in self.looking_up):
      # the base class's `__call__`, called by a subclass's (`super().__call__(f(x))`): this
      # call's input is the one the weight multiplies; the subclass's call records nothing
      self.base_called.add(id(module))
    self.looking_up.append(module)
    try:
      out = next_f(*args, **kwargs)
    finally:
      self.looking_up.pop()
    if not any(m is module for m in self.looking_up) and id(module) in self.base_called:
      self.base_called.discard(id(module))
      return out
    if not any(m is module for m in self.looking_up) and id(module) in self.by_dense:
      self.by_dense.discard(id(module))  # a subclass whose product is `sngd_jax.dense`'s:
      return out  # recorded once, by `dense`
    weight = _param(module, weight_name)
    if weight is None:  # no learned scale (create_scale=False): nothing to precondition
      return out
    record = (self._norm(module, next_f, args, kwargs, out) if recorder == "norm"
              else recorder(module, args, kwargs, out))
    if record is None:
      if isinstance(module, hk.ConvNDTranspose):
        self.unsupported[f"{type(module).__name__} {module.module_name!r}"] = None
      return out
    roles, parts = self.rec.trace(weight)
    if parts is None:  # not a weight of the captured params: cannot be named
      if not self.frozen.left_out_call(self.rec, weight, type(module).__name__):
        self.unnamed[f"{type(module).__name__} {module.module_name!r}"] = None
      return out
    x, z, kind, config = record
    if kind == "conv_transpose" and not haiku_conv_transpose(paths.join(parts[:-1])):
      self.unsupported[f"{type(module).__name__} {module.module_name!r}"] = None
      return out
    self.rec.add(paths.join(parts[:-1]), x, z, kind, config, roles=roles)
    self.recorded[paths.join(parts[:-1])] = parts[-1]
    return out

  def _gru(self, module, args, kwargs) -> None:
    """Records an ``hk.GRU`` call as its three dense layers (``_gru_records``), named by the
    module's params (``layer_spec.haiku_gru_layers``)."""
    weights = [_param(module, name) for name in HAIKU_GRU]
    if any(w is None for w in weights):
      return
    (roles_i, parts), (roles_h, _), _ = traced = [self.rec.trace(w) for w in weights]
    if parts is None or any(p is None for _, p in traced):
      if not any(self.frozen.left_out_call(self.rec, w, type(module).__name__)
                 for w, (_, p) in zip(weights, traced, strict=True) if p is None):
        self.unnamed[f"{type(module).__name__} {module.module_name!r}"] = None
      return
    records = _gru_records(module, args, kwargs, *weights)
    for path, roles, record in zip(haiku_gru_layers(paths.join(parts[:-1])),
                                   (roles_i, roles_h, roles_h), records, strict=True):
      x, z, kind, config = record
      self.rec.add(path, x, z, kind, config, roles=roles)
      self.recorded[path] = "w"

  def custom_dense(self, x, y, kernel, bias, layout: str) -> None:
    """Records a ``sngd_jax.dense`` call as the dense layer whose params its kernel and bias
    are (``hk.get_parameter("w", ...)``, ``"b"``: ``HAIKU_DENSE``), named by the kernel's path
    in the params (the module name), as an ``hk.Linear`` call; a kernel or bias cast to another
    dtype (``custom.cast_of``) is read as the param of the module whose method runs."""
    running = self.running[-1] if self.running else None

    def own(name: Optional[str], passed: Any) -> Any:
      """The running module's param ``name`` if ``passed`` is it cast, else None."""
      value = _param(running, name) if running is not None and name else None
      return value if custom.cast_of(passed, value) else None

    roles, parts = self.rec.trace(kernel)
    weight = kernel
    if parts is None and own(HAIKU_DENSE.weight, kernel) is not None:
      weight = own(HAIKU_DENSE.weight, kernel)
      roles, parts = self.rec.trace(weight)
    if parts is None:
      if not self.frozen.left_out_call(self.rec, kernel, "sngd_jax.dense"):
        self.unnamed[f"sngd_jax.dense (kernel {getattr(kernel, 'shape', None)})"] = None
      return
    path = paths.join(parts[:-1])
    bias_name = custom.bias_name(
        self.rec.trace, bias, lambda: own(HAIKU_DENSE.bias, bias), parts, path,
        f"a param of the module that holds the kernel {paths.join(parts)!r} (a computed "
        "array, another module's, or a cast made in another module): pass that module's own "
        "`hk.get_parameter(\"b\", ...)`, or its cast")
    custom.check(path, "Haiku", HAIKU_DENSE, parts[-1], bias_name, layout)
    if self.looking_up and _param(self.looking_up[-1], HAIKU_DENSE.weight) is weight:
      self.by_dense.add(id(self.looking_up[-1]))  # an `hk.Linear` subclass's own product
    x, y = tables.one_example(x, y, 0)
    self.rec.add(path, x, y, "dense", (), roles=roles)
    self.recorded[path] = parts[-1]

  def _norm(self, module, next_f, args, kwargs, out) -> Record:
    """The record of a norm call: ``xhat`` from the same call with unit scale, zero offset."""
    hk = _haiku()

    def unit(next_getter, value, context):
      if context.module is module and context.name == "scale":
        value = jnp.ones_like(value)
      elif context.module is module and context.name == "offset":
        value = jnp.zeros_like(value)
      return next_getter(value)

    self.plain.append(module)
    try:
      with hk.custom_getter(unit):
        xhat = next_f(*args, **kwargs)
    finally:
      self.plain.pop()
    xhat, z, config = tables.norm_record(xhat, out, _param_axes(module, xhat))
    return xhat, z, "norm", config


def _listed(names: list[str], most: int = 4) -> str:
  """The first ``most`` of ``names`` quoted and joined, ``...`` after them when there are more."""
  return ", ".join(map(repr, names[:most])) + (", ..." if len(names) > most else "")


def capture_hk(fn: Callable[..., Any], *, has_aux: bool = False, outputs: bool = False,
               argnums: Argnums = 0) -> Callable[..., Any]:
  """Wraps ``fn(params, *args)`` that applies a Haiku model so it also returns activations.

  Examples:
    ```python
    model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([64, 10])(x)))

    def loss_fn(params, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()

    loss_and_acts = sngd_jax.capture_hk(loss_fn)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    ```

  Supported: ``hk.Linear`` (hence ``hk.nets.MLP``, the projections of
  ``hk.MultiHeadAttention``, the gates of ``hk.LSTM``), ``hk.GRU`` (three dense layers:
  ``'<gru>/w_i'`` with ``b`` over ``x_t``, ``'<gru>/w_h[zr]'``, the first ``2H`` columns of
  ``w_h``, over ``h_{t-1}``, and ``'<gru>/w_h[a]'``, its last ``H``, over ``r_t * h_{t-1}``:
  two layers on one leaf, each with its own local Fisher), ``hk.ConvND`` (``Conv1D``-``Conv3D``),
  ``hk.DepthwiseConv1D``-``3D`` (hence ``hk.SeparableDepthwiseConv2D``), ``hk.Embed``,
  ``hk.LayerNorm``, ``hk.RMSNorm``, ``hk.BatchNorm`` (under ``hk.transform_with_state``) and
  ``hk.GroupNorm``, also under ``hk.remat``, ``hk.dynamic_unroll`` and ``hk.layer_stack``.
  ``hk.ConvNDTranspose`` (``Conv1DTranspose``-``Conv3DTranspose``) is modelled as linen's
  ``ConvTranspose`` on its kernel read ``(*k, C, O)``, channels last, without ``mask`` or
  ``output_shape``, under Haiku's default module name (``conv2_d_transpose``,
  ``conv2_d_transpose_1``, ...): only that name tells ``init`` (which sees the params alone)
  its ``(*k, O, C)`` kernel from a conv's. Another one's calls are not recorded and capture
  warns, naming it.
  A Haiku module of your own is recorded as an ``hk.Linear`` where it computes
  ``sngd_jax.dense(x, w, b)`` on its own ``hk.get_parameter("w", (in, out))`` and ``"b"``.
  A layer under ``hk.scan`` is pooled over its steps, as is one under an ``hk.fori_loop`` of
  static bounds (JAX runs it as a scan); one under ``hk.cond`` or ``hk.switch`` gets the rows
  of the steps (or examples, under a ``jax.vmap``) whose branch called it, the others none;
  one under ``hk.while_loop`` or a ``fori_loop`` of traced bounds is not captured (capture
  warns, naming it and the rewrite). A param named ``kernel``, ``bias`` or ``embedding``
  beside Haiku layers makes discovery read linen's names only: capture warns, naming it.

  Args:
    fn: a function whose first argument is the Haiku params (the dict that
      ``transform(...).init`` returns, or a pytree holding it). The layers of params passed
      as another argument (a target network) are left out; params differentiated together
      with the first are an error that names them.
    has_aux: as in ``sngd_jax.capture``.
    outputs: as in ``sngd_jax.capture``.
    argnums: the position of the params (0), or a tuple of positions of several models'
      params trained by one loss with one optimizer each, as ``sngd_jax.capture``.

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``, activations
    keyed by the layer's path in the params (``'mlp/~/linear_0'``).

  Raises:
    TypeError: when ``fn`` is not callable, saying what to write, or when the params hold a
      Haiku ``FlatMap`` (``hk.data_structures.to_immutable_dict``), naming the conversion.
    ValueError: when the wrapped function is called with an argument left out that is
      differentiated together with the recorded params, naming it and ``argnums``.
  """
  _haiku()
  check_captured_function(fn, "capture_hk")
  positions = normalized_argnums(argnums, "capture_hk")
  several = isinstance(argnums, tuple)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    models, rest = models_and_rest(args, kwargs, positions, several, argnums, "capture_hk")
    if paths.holds_flat_map(models):
      raise TypeError(f"sngd: capture_hk: {paths.FLAT_MAP_FIX}.")
    top: dict[int, tuple[str, ...]] = {}
    for m, model in enumerate(models):  # several models: each one's paths under its part
      top.update(leaf_paths(model, (model_part(m),) if several else ()))
    rec = Recorder(top, outputs)
    rec.derivation = derivation_of((args, kwargs))
    rec.data = transforms.data_leaves(rest, frozenset(top))
    frozen = OtherArgs.of(args, positions, models, top, rest)
    interceptor = _Interceptor(rec, frozen)
    rec.custom_dense = interceptor.custom_dense
    with transforms.recording(rec), _haiku().intercept_methods(interceptor):
      result = fn(*args, **kwargs)
    check_no_trained_left_out(frozen.left_out, fn, "capture_hk", positions)
    value, aux = split_aux(result, has_aux, "capture_hk")
    if interceptor.unsupported:
      warnings.warn(
          f"sngd: capture_hk does not model {', '.join(interceptor.unsupported)}: its calls "
          "are not captured, and `update` reports the layer as not captured; pass "
          "`fisher={path: None}` to leave it to the next transform. An `hk.ConvNDTranspose` is "
          "modelled channels last, without `mask` or `output_shape`, under Haiku's default "
          "module name (`conv2_d_transpose`, `conv_nd_transpose_1`, ...: the one thing in its "
          "params that tells its `(*k, O, C)` kernel from a conv's `(*k, C, O)`)",
          stacklevel=caller_stacklevel())
    if interceptor.tables_read:
      keys = ", ".join(repr(k) for k in interceptor.tables_read)
      warnings.warn(
          f"sngd: capture_hk: the table of hk.Embed {keys} is read outside its lookup "
          "(`embed.embeddings`, as a tied output layer `h @ embed.embeddings.T`): its local "
          "Fisher `diag(f)` models the lookup only, while its gradient holds the other use's "
          "too (rows of tokens absent from the batch get that gradient over the damping "
          "alone). Pass `fisher={"
          + ", ".join(f"{k!r}: None" for k in interceptor.tables_read)
          + "}` to leave the table to the next transform, or untie it (an `hk.Linear` "
          "output layer)", stacklevel=caller_stacklevel())
    if interceptor.unnamed:
      warnings.warn(
          f"sngd: capture_hk could not name {len(interceptor.unnamed)} layer call(s) "
          f"({', '.join(interceptor.unnamed)}): their weight is not a leaf of the params "
          "passed as the captured function's first argument, as when the params go through "
          "a `jax.jit` inside the captured function (jit the whole training step instead), "
          "or when the weights are computed from the params (`jax.lax.stop_gradient(params)` "
          "too, where the captured function is not differentiated; differentiated, calls on "
          "weights no gradient reaches are left out without this warning). Those calls are "
          "not captured: `update` raises naming a layer that has no "
          "other call, and a layer also called on the params themselves gets the local "
          "Fisher of those calls alone; pass `fisher={path: None}` to leave such a layer to "
          "the next transform. To run the model on params that the gradient does not go "
          "through (an inference pass inside the loss, a target network), pass them to the "
          "captured function as an argument after the trained params (`loss(params, "
          "frozen_params, x)`, called as `loss(params, params, x)`): capture leaves out the "
          "calls on them without a warning.",
          stacklevel=caller_stacklevel())
    linen_names = sorted(paths.join(parts) for parts in top.values()
                         if parts[-1] in _LINEN_NAMES)
    haiku_layers = [path for path, name in interceptor.recorded.items()
                    if name in ("w", "embeddings")]
    if linen_names and haiku_layers:
      warnings.warn(
          f"sngd: capture_hk: the params hold the linen name(s) {_listed(linen_names)} (a "
          "param made with `hk.get_parameter('kernel', ...)` or `('bias', ...)`), and a "
          "params tree that holds any of `kernel`, `bias`, `embedding` is read with linen's "
          "names only: `init` does not find the Haiku layers recorded here "
          f"({_listed(haiku_layers)}) by their `w`/`b` and `embeddings` (nor a norm's "
          "`offset`), which pass through unpreconditioned while their records go unused. "
          "Rename the param with Haiku's names (`w` for a kernel, `b` for a bias, "
          "`embeddings` for a table).", stacklevel=caller_stacklevel())
    acts = vmapped_by_caller(rec.freeze(), rest)
    if several:
      acts = split_models(acts, len(positions))
    return (value, (aux, acts)) if has_aux else (value, acts)

  return wrapped
