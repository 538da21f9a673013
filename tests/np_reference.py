"""Independent float64 numpy references for the layer-coverage tests.

Everything here is written from the layer's math with explicit loops or
plain numpy, without sngd_jax, so the tests compare two implementations.
Also here: the ``sngd()`` settings under which one step's factor or update is
the reference (``ONE_STEP``, :func:`one_step_kwargs`), the float64 conversions
the tests start from (:func:`f64`, :func:`np64`), a tree's finiteness read in float64
(:func:`all_finite`), and the assertions that compare a state's factor or a layer's update
with the reference (:func:`assert_factor`, :func:`assert_dense_update`).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

DAMPING = 1e-3

# sngd() settings under which every step is a factor step, whose factor is that step's batch
# estimate G^ (no decay, no prior, no trust region).
ONE_STEP = dict(decay=0.0, prior="none", max_norm=None, factor_every=1)

# The token id of padding in the row-mask tests' token batches.
PAD = 0


def one_step_kwargs():
  """sngd() settings under which one update is exactly the damped batch solve."""
  return dict(decay=0.0, prior="none", damping=DAMPING, inverse_every=1, max_norm=None)


def f64(tree):
  """Every array of ``tree`` as a float64 JAX array (params a float64 test starts from)."""
  return jax.tree.map(lambda a: a.astype(jnp.float64), tree)


def np64(a):
  """``a`` as a float64 numpy array."""
  return np.asarray(a, np.float64)


def all_finite(tree) -> bool:
  """Whether every inexact leaf of ``tree`` is finite, read as float64 numpy."""
  return all(bool(np.all(np.isfinite(np.asarray(leaf, np.float64))))
             for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact))


def damped_solve(g_factor, grad, damping=DAMPING):
  """``(G + damping * tr(G) I)^{-1} grad`` for one ``d x d`` block."""
  g_factor = np.asarray(g_factor, np.float64)
  d = g_factor.shape[-1]
  return np.linalg.solve(g_factor + damping * np.trace(g_factor) * np.eye(d), grad)


def augmented(kernel_grad, bias_grad, in_dim):
  """``[gW; gb^T]`` of shape ``(in_dim (+1), out)`` from leaf gradients."""
  g = np.asarray(kernel_grad, np.float64).reshape(in_dim, -1)
  if bias_grad is None:
    return g
  return np.concatenate([g, np.asarray(bias_grad, np.float64).reshape(1, -1)])


def linear_factor(rows, bias=True):
  """``E[x~ x~^T]`` over rows (one sample per row), by a sum of outer products."""
  rows = np.asarray(rows, np.float64)
  if bias:
    rows = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
  g = np.zeros((rows.shape[1], rows.shape[1]))
  for r in rows:
    g += np.outer(r, r)
  return g / rows.shape[0]


def gram(rows, bias=True):
  """``(1/n) sum_r x~_r x~_r^T`` over the given rows (bias column appended unless ``bias`` is
  False): :func:`linear_factor`."""
  return linear_factor(rows, bias=bias)


def dense_update(rows, kernel_grad, bias_grad):
  """Expected preconditioned ``(kernel, bias)`` of a dense-structured layer."""
  kernel_grad = np.asarray(kernel_grad, np.float64)
  in_dim = rows.shape[1]
  g = augmented(kernel_grad, bias_grad, in_dim)
  pre = damped_solve(linear_factor(rows, bias_grad is not None), g)
  kernel = pre[:in_dim].reshape(kernel_grad.shape)
  bias = None if bias_grad is None else pre[in_dim].reshape(np.shape(bias_grad))
  return kernel, bias


def assert_dense_update(rows, g, u, name="", rtol=1e-8, atol=1e-12):
  """``u``, one dense layer's update (``{'kernel', 'bias'}``, or no bias), is
  :func:`dense_update` of its gradient ``g`` over ``rows``; ``name`` goes in the error."""
  kernel, bias = dense_update(rows, g["kernel"], g.get("bias"))
  np.testing.assert_allclose(u["kernel"], kernel, rtol=rtol, atol=atol, err_msg=name)
  if bias is not None:
    np.testing.assert_allclose(u["bias"], bias, rtol=rtol, atol=atol, err_msg=name)


def normalized_factor(state, path):
  """An ``sngd`` state's factor of layer ``path`` over its weight, ``G_t / w_t``, in numpy."""
  return np.asarray(state.factors[path][...]) / np.asarray(state.weights[path][...])


def assert_factor(state, path, rows):
  """The state's :func:`normalized_factor` of ``path`` is ``E[x~ x~^T]`` over ``rows``
  (:func:`linear_factor`), to float32 statistics' accuracy."""
  want = linear_factor(rows)
  np.testing.assert_allclose(normalized_factor(state, path), want, rtol=2e-5,
                             atol=2e-6 * np.abs(want).max())


# --- convolution ------------------------------------------------------------

def same_padding(size, k, stride, dilation):
  """lax's 'SAME' padding for one spatial dim (input already dilated)."""
  k_eff = (k - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + k_eff - size, 0)
  return total // 2, total - total // 2


def transpose_pads(k, s, padding, d=1):
  """``lax.conv_transpose``'s padding ``(low, high)`` of the stride-dilated input, per
  spatial dim (its documented rule): kernel size ``k``, stride ``s``, dilation ``d``."""
  k = (k - 1) * d + 1
  if padding == "SAME":
    total = k + s - 2
    low = k - 1 if s > k - 1 else -(-total // 2)
  else:  # VALID
    total = k + s - 2 + max(k - s, 0)
    low = k - 1
  return low, total - low


def conv_patches(x, kernel_size, strides, padding, kernel_dilation, input_dilation,
                 groups):
  """Conv input patches by loops, rows ordered (example, position, group).

  Args:
    x: ``(n, *spatial, C)``.
    kernel_size, strides, kernel_dilation, input_dilation: per spatial dim.
    padding: ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'CAUSAL'`` or pairs.
    groups: feature groups.

  Returns:
    ``(rows, out_spatial)``; each row lists ``x[..., c]`` for kernel offsets
    ``k`` (row-major) then channels ``c`` of the group, the kernel's layout.
  """
  x = np.asarray(x, np.float64)
  rank = len(kernel_size)
  # input dilation: zeros between input pixels
  for i, d in enumerate(input_dilation):
    if d > 1:
      size = x.shape[1 + i]
      shape = list(x.shape)
      shape[1 + i] = (size - 1) * d + 1
      y = np.zeros(shape)
      idx = [slice(None)] * x.ndim
      idx[1 + i] = slice(None, None, d)
      y[tuple(idx)] = x
      x = y
  if padding == "CIRCULAR":
    pads = [((k - 1) * d // 2, ((k - 1) * d + 1) // 2)
            for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)], mode="wrap")
  elif padding == "CAUSAL":
    x = np.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
  elif padding == "SAME":
    pads = [same_padding(x.shape[1 + i], kernel_size[i], strides[i], kernel_dilation[i])
            for i in range(rank)]
    x = np.pad(x, [(0, 0)] + pads + [(0, 0)])
  elif padding != "VALID":  # explicit pairs; a negative one crops, as in lax.conv
    x = np.pad(x, [(0, 0)] + [(max(lo, 0), max(hi, 0)) for lo, hi in padding] + [(0, 0)])
    x = x[(slice(None),) + tuple(slice(max(-lo, 0), x.shape[1 + i] - max(-hi, 0))
                                 for i, (lo, hi) in enumerate(padding))]
  cg = x.shape[-1] // groups
  out = [(x.shape[1 + i] - (kernel_size[i] - 1) * kernel_dilation[i] - 1) // strides[i] + 1
         for i in range(rank)]
  rows = []
  for b in range(x.shape[0]):
    for pos in itertools.product(*[range(s) for s in out]):
      for g in range(groups):
        row = []
        for k in itertools.product(*[range(s) for s in kernel_size]):
          idx = tuple(pos[i] * strides[i] + k[i] * kernel_dilation[i] for i in range(rank))
          for c in range(cg):
            row.append(x[(b,) + idx + (g * cg + c,)])
        rows.append(row)
  return np.asarray(rows), tuple(out)


# --- recurrent cells ----------------------------------------------------------

def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _affine(p):
  """``lin(name, v)``: ``v @ kernel + bias`` of the layer ``p[name]`` in float64 (no bias term
  where the layer has none)."""
  return lambda name, v: v @ np.asarray(p[name]["kernel"], np.float64) + (
      np.asarray(p[name]["bias"], np.float64) if "bias" in p[name] else 0.0)


def lstm_forward(p, xs, names=("ii", "if", "ig", "io", "hi", "hf", "hg", "ho")):
  """LSTM over time (batch-major ``xs (B, T, I)``); returns the h_{t-1} of every step.

  ``p[name]`` holds ``kernel`` (and ``bias`` for the hidden layers):
  ``i = s(x Wii + h Whi + bhi)``, f, ``g = tanh(...)``, o;
  ``c' = f c + i g``, ``h' = o tanh(c')``.
  """
  ii, if_, ig, io, hi, hf, hg, ho = names
  b, t, _ = xs.shape
  hdim = np.asarray(p[hi]["kernel"]).shape[0]
  h, c = np.zeros((b, hdim)), np.zeros((b, hdim))
  lin = _affine(p)
  prev, outs = [], []
  for step in range(t):
    x = xs[:, step]
    prev.append(h)
    i = sigmoid(lin(ii, x) + lin(hi, h))
    f = sigmoid(lin(if_, x) + lin(hf, h))
    g = np.tanh(lin(ig, x) + lin(hg, h))
    o = sigmoid(lin(io, x) + lin(ho, h))
    c = f * c + i * g
    h = o * np.tanh(c)
    outs.append(h)
  return np.stack(prev, 1), np.stack(outs, 1)


def gru_forward(p, xs):
  """Flax's GRU over time: returns (h_{t-1} per step, outputs), batch-major.

  ``r = s(x Wir + bir + h Whr)``, ``z = s(x Wiz + biz + h Whz)``,
  ``n = tanh(x Win + bin + r (h Whn + bhn))``, ``h' = (1 - z) n + z h``.
  """
  b, t, _ = xs.shape
  hdim = np.asarray(p["hr"]["kernel"]).shape[0]
  h = np.zeros((b, hdim))
  lin = _affine(p)
  prev, outs = [], []
  for step in range(t):
    x = xs[:, step]
    prev.append(h)
    r = sigmoid(lin("ir", x) + lin("hr", h))
    z = sigmoid(lin("iz", x) + lin("hz", h))
    n = np.tanh(lin("in", x) + r * lin("hn", h))
    h = (1.0 - z) * n + z * h
    outs.append(h)
  return np.stack(prev, 1), np.stack(outs, 1)


# --- attention ---------------------------------------------------------------

def mha_forward(p, x, num_heads):
  """Self-attention in numpy; returns the per-head output fed to ``out`` (B, T, H, hd)."""
  x = np.asarray(x, np.float64)
  proj = lambda name: np.einsum("btd,dhk->bthk", x, np.asarray(p[name]["kernel"], np.float64)) \
      + np.asarray(p[name]["bias"], np.float64)
  q, k, v = proj("query"), proj("key"), proj("value")
  hd = q.shape[-1]
  logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(hd), k)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


# --- normalization --------------------------------------------------------------

def channel_update(xhat, g_scale, g_bias):
  """Per channel c: solve the damped ``E[[xhat^2, xhat], [xhat, 1]]`` (n, C) rows."""
  xhat = np.asarray(xhat, np.float64)
  out_s, out_b = np.zeros(xhat.shape[1]), np.zeros(xhat.shape[1])
  for c in range(xhat.shape[1]):
    col = xhat[:, c]
    if g_bias is None:
      gm = np.array([[np.mean(col * col)]])
      out_s[c] = damped_solve(gm, np.array([g_scale[c]]))[0]
    else:
      gm = np.array([[np.mean(col * col), np.mean(col)], [np.mean(col), 1.0]])
      out_s[c], out_b[c] = damped_solve(gm, np.array([g_scale[c], g_bias[c]]))
  return out_s, (None if g_bias is None else out_b)


def haiku_gru(w_i, w_h, b, xs):
  """``hk.GRU`` over time in float64 (time-major ``xs (T, n, D)``, zero initial state;
  ``w_h``'s columns ``[z, r, a]``): the rows of each of its products, ``(T, n, .)`` each:
  ``x_t`` (``w_i``), ``h_{t-1}`` (the ``z, r`` columns of ``w_h``), ``r_t * h_{t-1}`` (the
  candidate's), and the outputs ``h_t``."""
  w_i, w_h, b, xs = (np64(a) for a in (w_i, w_h, b, xs))
  hidden = w_h.shape[0]
  h = np.zeros((xs.shape[1], hidden))
  states, gated, outs = [], [], []
  for x in xs:
    gx = x @ w_i
    zr = sigmoid(gx[:, :2 * hidden] + h @ w_h[:, :2 * hidden] + b[:2 * hidden])
    z, r = zr[:, :hidden], zr[:, hidden:]
    a = np.tanh(gx[:, 2 * hidden:] + (r * h) @ w_h[:, 2 * hidden:] + b[2 * hidden:])
    states.append(h)
    gated.append(r * h)
    h = (1 - z) * h + z * a
    outs.append(h)
  return xs, np.stack(states), np.stack(gated), np.stack(outs)
