"""Dense layers you write yourself: ``sngd_jax.dense``.

``dense(x, kernel, bias)`` computes ``x @ kernel + bias`` and, while a capture runs, records
the call as the framework's own dense layer would be recorded (one record per call, rows =
every leading position of ``x``, the bias row appended by the statistics): a hand-written
layer (``self.param('kernel', ...)`` in linen, ``nnx.Param`` in NNX, an ``eqx.Module`` with
``weight``/``bias`` fields declared by ``sngd_jax.dense_layer``, ``hk.get_parameter('w', ...)``
in Haiku) then gets SNGD like ``nn.Dense``, ``nnx.Linear``, ``eqx.nn.Linear`` or
``hk.Linear``.

Outside a capture it is the matmul and nothing else (one Python check of the active
recorder while tracing), so its gradients are those of ``x @ kernel + bias``.

Each capture names the layer in its own way (``Recorder.custom_dense``): linen by the module
whose method is running (the innermost call ``nn.intercept_methods`` saw), the kernel being one
of its params;
NNX, Equinox and Haiku by the kernel's path in the captured model or params (followed out
through the transforms like a built-in layer's weight); a kernel or bias cast to another dtype
before the call (``cast_of``: the param's shape, another dtype) is read as the param of the
module whose method runs (linen, Haiku: its ``w``/``b``), or whose ``__call__`` runs (NNX: a
module holding a ``kernel`` Variable; Equinox: a ``dense_layer``-declared module). The names
and layout must be those that ``sngd_jax.discover`` reads from the params, else the call
raises an error naming the layer (``check``): a kernel stored the other way round would
otherwise be preconditioned on the wrong side.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sngd_jax._src.capture import transforms
from sngd_jax._src.layer_spec import DENSE_LAYOUTS, DenseDeclaration

FLAX_DENSE = DenseDeclaration(weight="kernel", bias="bias", layout="in_out")
"""What linen and NNX discover as a dense layer: a ``kernel`` ``(in, out)`` and a ``bias``."""


def _array(value: Any) -> Any:
  """The array an ``nnx.Variable`` holds (itself for an array or None)."""
  if isinstance(value, nnx.Variable):
    return value.get_value()
  return value


def dense(x: jax.Array, kernel: Any, bias: Any = None, *, layout: str = "in_out",
          dtype: Any = None) -> jax.Array:
  """A dense layer you write yourself: ``x @ kernel + bias``, recorded for SNGD.

  Call it where a hand-written layer multiplies its kernel, with the param arrays
  themselves, so that ``sngd_jax.capture`` / ``capture_nnx`` / ``capture_eqx`` /
  ``capture_hk`` record the layer's input ``x`` (and its output ``y`` for ``fisher="rfim"``)
  as for the framework's ``Dense``/``Linear``: ``G = E[x~ x~^T]``, ``x~ = [x; 1]`` with a
  bias, over every leading position of ``x`` (batch, tokens). Outside a capture it is just the
  matmul.

  Examples:
    ```python
    class MyDense(nn.Module):                      # linen; NNX: nnx.Param's, same call
      features: int
      @nn.compact
      def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return sngd_jax.dense(x, w, b)             # x @ w + b, recorded as 'MyDense_0'
    ```

  The layer is named by its params: in linen and NNX its kernel must be the param named
  ``kernel``, stored ``(in, out)``, of the module that calls ``dense`` (linen) or of one
  module of the model (NNX), with ``bias`` its sibling ``bias``; in Equinox the weight and
  bias must be the fields that ``@sngd_jax.dense_layer`` declared on the module's class,
  in the declared layout; in Haiku the module's ``hk.get_parameter('w', (in, out))`` and
  ``hk.get_parameter('b', (out,))``, ``hk.Linear``'s names. Other names or layouts raise an
  error naming the layer.

  Args:
    x: the input, ``(..., in)``.
    kernel: the kernel param (an array, or an ``nnx.Param``): ``(in, out)`` for
      ``layout='in_out'``, ``(out, in)`` for ``'out_in'``.
    bias: the bias param ``(out,)``, or None.
    layout: ``'in_out'``: ``y = x @ kernel``; ``'out_in'``: ``y = x @ kernel.T``
      (``kernel @ x`` for one example, as Equinox layers compute).
    dtype: if given, ``x``, ``kernel`` and ``bias`` are cast to it before the product (as
      Flax's ``dtype=``). The record holds ``x`` as passed, before the cast, as
      ``nn.Dense(dtype=...)``'s does. A kernel or bias cast before the call
      (``kernel.astype(jnp.bfloat16)``, inside the ``__call__`` of the module holding it in
      NNX and Equinox) is read as the param too: any array of the param's shape in another
      dtype.

  Returns:
    ``y = x @ kernel + bias`` (``kernel.T`` for ``'out_in'``), shape ``(..., out)``.
  """
  if layout not in DENSE_LAYOUTS:
    raise ValueError(
        f"sngd_jax.dense: layout={layout!r}; expected 'in_out' (a (in, out) kernel, "
        "y = x @ kernel, as Flax's Dense) or 'out_in' (a (out, in) weight, y = weight @ x, "
        "as eqx.nn.Linear)")
  kernel, bias = _array(kernel), _array(bias)
  if jnp.ndim(kernel) != 2:
    want = "(in, out)" if layout == "in_out" else "(out, in)"
    raise ValueError(
        f"sngd_jax.dense: the kernel must be 2-D, {want} for layout={layout!r}, "
        f"got shape {jnp.shape(kernel)}. A kernel with stack axes is applied per layer of the "
        "stack (under `nn.scan`/`nnx.scan`/`jax.lax.scan` or `jax.vmap`, where it is 2-D)")
  out = jnp.shape(kernel)[1 if layout == "in_out" else 0]
  if bias is not None and jnp.shape(bias) != (out,):
    raise ValueError(
        f"sngd_jax.dense: the bias must have shape ({out},) for a kernel of shape "
        f"{jnp.shape(kernel)} with layout={layout!r}, got {jnp.shape(bias)}")
  xs, k, b = x, kernel, bias
  if dtype is not None:
    xs, k = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
    b = None if bias is None else jnp.asarray(bias, dtype)
  if layout == "in_out":
    y = jnp.matmul(xs, k)
  elif jnp.ndim(xs) == 1:
    y = jnp.matmul(k, xs)  # one example, as Equinox's Linear computes it
  else:
    y = jnp.matmul(xs, k.T)
  if b is not None:
    y = y + b
  rec = transforms.active()
  if rec is not None and rec.custom_dense is not None:
    # The input as passed, before the `dtype` cast, as the framework's Dense records it
    # (bfloat16 activations of float32 inputs gave another factor than `nn.Dense(dtype=)`).
    rec.custom_dense(x, y, kernel, bias, layout)
  return y


def cast_of(passed: Any, param: Any) -> bool:
  """Whether ``passed``, given to ``dense`` in place of the layer's own ``param``, is that
  param cast to another dtype (``kernel.astype(jnp.bfloat16)``): the same shape, another dtype.

  A cast is the usual way to compute a layer in lower precision, and the built-in layers
  record such a call (``nn.Dense(dtype=jnp.bfloat16)`` casts its kernel): the layer's factor
  is built from its input rows, whatever the kernel's dtype. A transposed or sliced copy has
  another shape, and a copy in the param's own dtype is not taken for it, so neither is read
  as the param.
  """
  if passed is None or param is None:
    return False
  return (jnp.shape(passed) == jnp.shape(param)
          and jnp.result_type(passed) != jnp.result_type(param))


def bias_name(trace: Callable[[Any], tuple[Any, Optional[tuple[str, ...]]]], bias: Any,
              own_bias: Callable[[], Any], kernel_parts: tuple[str, ...], path: str,
              not_its_own: str) -> Optional[str]:
  """The name of the bias param passed to ``dense`` beside the kernel at ``kernel_parts``
  (None when no bias was passed), read from its path in the params or model (``trace``), or
  from that of ``own_bias()``, the param of the module whose method runs, when ``bias`` is
  its cast (``cast_of``). Raises ``ValueError`` naming the layer ``path`` when the bias is no
  param of the kernel's module; ``not_its_own`` says what it is then (after ``"the bias is
  not "``), and what to pass instead.
  """
  if bias is None:
    return None
  bias_parts = trace(bias)[1]
  if bias_parts is None and (own := own_bias()) is not None:
    bias_parts = trace(own)[1]
  if bias_parts is None or bias_parts[:-1] != kernel_parts[:-1]:
    raise ValueError(f"sngd_jax.dense: layer {path!r}: the bias is not {not_its_own}")
  return bias_parts[-1]


def check(path: str, framework: str, expected: DenseDeclaration, kernel_name: str,
          bias_name: Optional[str], layout: str) -> None:
  """Raises unless a ``dense`` call's params are what ``discover`` reads as its layer.

  Args:
    path: the layer path.
    framework: ``'linen'``, ``'NNX'``, ``'Haiku'`` or the Equinox class (for the message).
    expected: the names and layout that discovery reads (``FLAX_DENSE``, Haiku's ``w``/``b``,
      or the class's ``dense_layer`` declaration).
    kernel_name: the name of the param passed as the kernel.
    bias_name: the name of the param passed as the bias (None: no bias passed).
    layout: the layout the call declared.
  """
  problems = []
  if kernel_name != expected.weight:
    problems.append(f"its kernel is the param {kernel_name!r}, not {expected.weight!r}")
  if layout != expected.layout:
    problems.append(f"it declares layout={layout!r}, not {expected.layout!r}")
  if bias_name is not None and bias_name != expected.bias:
    problems.append(f"its bias is the param {bias_name!r}, not {expected.bias!r}"
                    if expected.bias else f"its bias {bias_name!r} was not declared")
  if not problems:
    return
  shape = "(in, out)" if expected.layout == "in_out" else "(out, in)"
  if framework in ("linen", "NNX"):
    rule = (f"sngd finds a {framework} dense layer by its params: a kernel named 'kernel' "
            f"stored inputs first, {shape} (`x @ kernel`, layout='in_out'), and an optional "
            "sibling 'bias' of shape (out,); a kernel named otherwise is not preconditioned, "
            "and one stored (out, in) would be preconditioned on the wrong side. Name the "
            "params 'kernel' and 'bias' and store the kernel (in, out)")
  elif framework == "Haiku":
    rule = ("sngd finds a Haiku dense layer by its params, named as `hk.Linear`'s: a kernel "
            f"`hk.get_parameter('w', ...)` stored inputs first, {shape} (`x @ w`, "
            "layout='in_out'), and an optional `hk.get_parameter('b', ...)` of shape (out,) in "
            "the same module; a kernel named otherwise is not preconditioned (a `kernel` or "
            "`bias` param also keeps every Haiku layer of the params from being found), and one "
            "stored (out, in) would be preconditioned on the wrong side. Name the params 'w' and "
            "'b' and store the kernel (in, out)")
  else:
    rule = (f"`@sngd_jax.dense_layer` declared {framework} with weight {expected.weight!r} "
            f"stored {shape} (layout={expected.layout!r}) and bias {expected.bias!r}: pass "
            "those fields in that layout, or declare the class as it is")
  if kernel_name == expected.weight:
    leave = f"; or compute the layer without sngd_jax.dense and pass `fisher={{{path!r}: None}}`"
  elif framework == "Haiku" and kernel_name in ("kernel", "bias", "embedding"):
    leave = ("; computed without sngd_jax.dense, a param named so would still make `init` "
             "read the params with linen's names")
  else:
    leave = "; or compute the layer without sngd_jax.dense (its params then pass through)"
  raise ValueError(f"sngd_jax.dense: layer {path!r}: {'; '.join(problems)}. {rule}{leave}.")
