"""Property-based sweep: no input and no option may poison the optimizer state.

A configuration is a model built from layer types (embedding, dense, conv,
norm, attention, recurrent) and an ``sngd`` configuration (fisher kind,
inverse method, prior, dtype, batch size, ``factor_every``, ``inverse_every``,
``stats_batch_size``, ``max_factor_ratio``, ``max_norm``, ``decay``, and
``axis_name`` under ``shard_map`` on 8 devices). For each, one jitted step is
compiled and fed a sequence of faults, each drawn by hypothesis: adversarial
activations of one layer (scales 1e-30 to 1e30, constant, rank-one,
duplicated rows, all zero, NaN or Inf in one entry), the same patterns in the
model input (so they propagate through the network), NaN/Inf in one gradient
entry, or a clean step; then clean steps.

The oracle is computed in float64 numpy from what ``update`` saw (the gradients
and captured activations the step returns), independently of sngd's checks:

* a step is *bad* if a gradient is not finite, or if it is a factor step
  (``count % factor_every == 0``) and an activation is not finite or some
  layer's local Fisher certainly overflows (``fisher="linear"``: its trace is at
  least ``max|x|^2 / size(x)``, which is then above ``finfo.max / 16``);
* a step is *good* if every gradient is finite and its float sum cannot
  overflow, and, on factor steps, the same holds for the activations and every
  layer's trace is at most ``num_blocks * d * max|x|^2 + num_blocks``, well
  below ``finfo.max / 16``;
* other steps (sums near overflow, rfim weights unknown) are undetermined.

Asserted at every step: params, updates and the whole state are finite; a bad
step is skipped (zero update, the state bitwise unchanged but for
``num_skipped_steps``, which counts it); a good step is taken (the step count
advances); a skipped step of any kind returns zeros and is counted. After the
faults, clean steps are all taken and the last refresh accepts every block
(no factor is left in a state that fails refreshes). Invalid inputs (integer
activations, wrong feature sizes, a missing layer) raise an ``sngd:`` error
naming the layer.

Compilation dominates, so each configuration is compiled once (cached) and its
fault sequences reuse the compiled step. The fast slice runs a few fixed
configurations that together cover every value of every axis; the full sweep
(``-m slow``) draws the configurations too. The 8-device part runs in a
subprocess with ``--xla_force_host_platform_device_count=8`` (as in
``test_sharding.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from forced_devices import NUM_DEVICES, run_on_forced_devices
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from np_reference import all_finite

import sngd_jax
from sngd_jax import inverse as methods
from sngd_jax._src.state import only_sngd_state

KINDS = ("embed", "dense", "conv", "norm", "attention", "recurrent")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}
# Small sizes make every method do its real work: Nystrom of rank 3 keeps sketches of the
# layers wider than 3, blocks of 3 split the factors, auto switches methods above d = 5.
INVERSES = {
    "cholesky": lambda: "cholesky",
    "eigh": lambda: "eigh",
    "denman_beavers": lambda: "denman_beavers",
    "newton_schulz": lambda: "newton_schulz",
    "nystrom": lambda: methods.nystrom(rank=3),
    "blocks": lambda: methods.block_diagonal(block_size=3),
    "auto": lambda: methods.auto(max_dim=5, rank=3),
    "auto_eigh": lambda: methods.auto(max_dim=5, rank=3, small=methods.eigh()),
    "blocks_denman_beavers": lambda: methods.block_diagonal(
        block_size=3, inner=methods.denman_beavers_inverse()),
}
SITES = ("clean", "activation", "model_input", "gradient")
PATTERNS = ("scale", "constant", "rank_one", "duplicate_rows", "zeros", "nan_one", "inf_one")
SCALES = (1e-30, 1e-20, 1e-6, 1.0, 1e6, 1e17, 1e19, 1e20, 1e30, -1e20)
SEQ, FEATURES, VOCAB, CLASSES, LR = 3, 2, 7, 3, 1e-2
HEADROOM = 16.0  # sngd_jax._src.statistics.HEADROOM, restated: the oracle is independent


@dataclasses.dataclass(frozen=True)
class Config:
  kinds: tuple[str, ...] = KINDS
  fisher: str = "linear"
  inverse: str = "cholesky"
  prior: str = "scaled_identity"
  dtype: str = "float32"
  batch: int = 4
  factor_every: int = 1
  inverse_every: int = 1
  stats_batch_size: Optional[int] = None
  max_factor_ratio: Optional[float] = None
  max_norm: Optional[float] = 1.0
  decay: float = 0.9
  devices: int = 1
  accumulate: int = 1  # sngd_jax.MultiSteps over this many micro-batches when above 1

  def optimizer(self):
    tx = self.sngd()
    if self.accumulate > 1:
      tx = sngd_jax.MultiSteps(tx, every_k_schedule=self.accumulate).gradient_transformation()
    return tx

  def sngd(self):
    return sngd_jax.sngd(
        fisher=self.fisher, inverse=INVERSES[self.inverse](), prior=self.prior,
        factor_every=self.factor_every, inverse_every=self.inverse_every,
        stats_batch_size=self.stats_batch_size, max_factor_ratio=self.max_factor_ratio,
        max_norm=self.max_norm, decay=self.decay,
        axis_name="data" if self.devices > 1 else None)


class Zoo(nn.Module):
  """One layer of each kind in ``kinds`` (in :data:`KINDS` order), then a dense head."""

  kinds: tuple[str, ...]
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, tokens, x):
    kw = dict(dtype=self.dtype, param_dtype=self.dtype)
    h = x.astype(self.dtype)
    if "embed" in self.kinds:
      h = jnp.concatenate([nn.Embed(VOCAB, 3, **kw)(tokens), h], axis=-1)
    if "dense" in self.kinds:
      h = nn.relu(nn.Dense(6, **kw)(h))
    if "conv" in self.kinds:
      h = nn.Conv(5, (3,), **kw)(h)
    if "norm" in self.kinds:
      h = nn.LayerNorm(**kw)(h)
    if "attention" in self.kinds:
      h = h + nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=4,
                                              out_features=h.shape[-1], **kw)(h)
    if "recurrent" in self.kinds:
      h = nn.RNN(nn.GRUCell(4, **kw))(h)
    return nn.Dense(CLASSES, **kw)(jnp.mean(h, axis=1))


# ---------------------------------------------------------------- faults inside the step


def _pattern(x, pattern, scale):
  """``x`` (floating) replaced by adversarial pattern number ``pattern`` at ``scale``."""
  work = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  rows = work.reshape(-1, work.shape[-1])
  s = scale.astype(work.dtype)
  ramp = jnp.arange(1, rows.shape[0] + 1, dtype=work.dtype)[:, None] / rows.shape[0]
  flat = work.reshape(-1)
  candidates = {
      "scale": work * s,
      "constant": jnp.full_like(work, s),
      "rank_one": (ramp * jnp.ones_like(rows[:1]) * s).reshape(work.shape),
      "duplicate_rows": jnp.broadcast_to(rows[:1] * s, rows.shape).reshape(work.shape),
      "zeros": jnp.zeros_like(work),
      "nan_one": flat.at[0].set(jnp.nan).reshape(work.shape),
      "inf_one": flat.at[0].set(jnp.inf * jnp.sign(s)).reshape(work.shape),
  }
  out = jnp.select([pattern == i for i in range(len(PATTERNS))],
                   [candidates[p] for p in PATTERNS], work)
  return out.astype(x.dtype)


def _float_layers(acts):
  """Paths of the layers whose captured inputs are floating point (not token ids)."""
  return sorted(p for p, calls in acts.items() if calls[0].kind != "embed")


class Built:
  """A configuration's model, params, optimizer and compiled step."""

  def __init__(self, config: Config):
    self.config = config
    dtype = DTYPES[config.dtype]
    self.model = Zoo(config.kinds, dtype)
    tokens, x, y = clean_batch(config, 0)
    # Initialized in float32 (Flax's orthogonal init has no bfloat16 QR on CPU), then cast.
    params = Zoo(config.kinds, jnp.float32).init(jax.random.key(0), tokens, x)["params"]
    self.params = jax.tree.map(lambda a: a.astype(dtype), params)
    self.tx = config.optimizer()
    self.specs = sngd_jax.discover(self.params, config.fisher)
    self.leaf_count = len(jax.tree.leaves(self.params))
    _, acts = jax.eval_shape(sngd_jax.capture(self.captured_loss, outputs=True), self.params,
                             tokens, x, y)
    self.float_layers = _float_layers(acts)
    self.step = self._compile()

  def captured_loss(self, params, tokens, x, y):
    logits = self.model.apply({"params": params}, tokens, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def _step(self, params, state, tokens, x, y, fault):
    config = self.config
    on_device = jnp.array(True)
    if config.devices > 1:
      on_device = jax.lax.axis_index("data") == fault["device"]
    x = jnp.where((fault["site"] == 2) & on_device,
                  _pattern(x, fault["pattern"], fault["scale"]), x)
    loss_fn = self.captured_loss
    if config.devices > 1:  # the global batch mean, so that the gradients are too
      loss_fn = lambda *a: jax.lax.pmean(self.captured_loss(*a), "data")
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, tokens, x, y)
    acts = dict(acts)
    for i, path in enumerate(self.float_layers):
      hit = (fault["site"] == 1) & (fault["layer"] == i) & on_device
      acts[path] = tuple(c.replace(inputs=jnp.where(hit, _pattern(c.inputs, fault["pattern"],
                                                                  fault["scale"]), c.inputs))
                         for c in acts[path])
    leaves, treedef = jax.tree.flatten(grads)
    bad = jnp.where(fault["pattern"] % 2 == 0, jnp.nan, jnp.inf)
    leaves = [jnp.where((fault["site"] == 3) & (fault["layer"] == j),
                        g.reshape(-1).at[0].set(bad.astype(g.dtype)).reshape(g.shape), g)
              for j, g in enumerate(leaves)]
    grads = jax.tree.unflatten(treedef, leaves)
    updates, state = self.tx.update(grads, state, params, activations=acts)
    params = jax.tree.map(lambda p, u: (p - LR * u).astype(p.dtype), params, updates)
    return params, state, updates, grads, acts, loss

  def _compile(self):
    if self.config.devices == 1:
      return jax.jit(self._step)
    # Auto axes: the jitted shard_map places the host arrays itself.
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    batch = P("data")
    fn = jax.shard_map(self._step, mesh=mesh,
                       in_specs=(P(), P(), batch, batch, batch, P()),
                       out_specs=(P(), P(), P(), P(), batch, P()), check_vma=False)
    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def built(config: Config) -> Built:
  return Built(config)


def clean_batch(config: Config, seed: int):
  rng = np.random.default_rng(seed)
  b = config.batch * config.devices
  tokens = jnp.asarray(rng.integers(0, VOCAB, size=(b, SEQ)), jnp.int32)
  x = jnp.asarray(rng.normal(size=(b, SEQ, FEATURES)), jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=(b,)), jnp.int32)
  return tokens, x, y


def fault_arrays(site="clean", layer=0, pattern="scale", scale=1.0, device=0):
  return {"site": jnp.int32(SITES.index(site)), "layer": jnp.int32(layer),
          "pattern": jnp.int32(PATTERNS.index(pattern)), "scale": jnp.float32(scale),
          "device": jnp.int32(device)}


# ---------------------------------------------------------------- the oracle (float64 numpy)


def _stat_dtype(config: Config):
  return np.float64 if config.dtype == "float64" else np.float32


def _sum_verdict(arrays, acc_dtype) -> str:
  """'bad' (a non-finite entry), 'good' (finite, its float sum cannot overflow) or '?'."""
  big = np.finfo(acc_dtype).max
  verdict = "good"
  for a in arrays:
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)):
      return "bad"
    if a.size and np.max(np.abs(a)) * a.size > big / 2:
      verdict = "?"
  return verdict


def _sub_batch(a, config: Config):
  """What the statistics read: the first ``stats_batch_size`` rows on every device."""
  a = np.asarray(a)
  if config.stats_batch_size is None:
    return a
  a = a.reshape((config.devices, -1) + a.shape[1:])[:, :config.stats_batch_size]
  return a.reshape((-1,) + a.shape[2:])


def _factor_verdict(b: Built, micro_acts) -> str:
  """'bad' / 'good' / '?' for the statistics of a factor step (see the module docstring).

  ``micro_acts``: the activations of each micro-batch of the step (one without
  accumulation); their statistics are averaged weighted by rows.
  """
  config = b.config
  stat = _stat_dtype(config)
  acc = np.float64 if config.dtype == "float64" else np.float32
  inputs, outputs = [], []
  for acts in micro_acts:
    for calls in acts.values():
      for c in calls:
        outputs.append(_sub_batch(c.outputs, config))
        if c.kind != "embed":
          inputs.append(_sub_batch(c.inputs, config))
  verdict = _sum_verdict(inputs, acc)
  if verdict == "bad":
    return "bad"
  out_verdict = _sum_verdict(outputs, acc)
  if out_verdict == "bad" and config.accumulate == 1:
    return "bad"  # the activations, outputs included, are checked for finiteness
  if out_verdict != "good":
    verdict = "?"  # accumulated: only the estimates are checked (an Inf z is a finite weight)
  bound = float(np.finfo(stat).max) / HEADROOM
  for path in micro_acts[0]:
    spec = b.specs[path]
    if spec.structure == "diagonal":
      continue  # token frequencies: their trace is 1
    xs = [np.asarray(_sub_batch(c.inputs, config), np.float64)
          for acts in micro_acts for c in acts[path]]
    m2 = max(float(np.max(np.abs(x))) ** 2 for x in xs)
    size = sum(x.size for x in xs)
    upper = spec.num_blocks * (spec.dim * m2 + 1.0)
    if spec.structure == "per_channel":
      upper = spec.out_dim * (m2 + 1.0)
    if spec.fisher == "linear" and m2 / size > 2 * bound:
      return "bad"
    if upper > bound / 4:
      verdict = "?"
  return verdict


def expected(b: Built, count: int, micro_grads, micro_acts) -> str:
  """The oracle's verdict on one optimizer step made of these micro-batches."""
  config = b.config
  acc = np.float64 if config.dtype == "float64" else np.float32
  grads_verdict = _sum_verdict([g for grads in micro_grads for g in jax.tree.leaves(grads)],
                               acc)
  if grads_verdict != "good":
    return grads_verdict
  if count % config.factor_every:
    return "good"
  return _factor_verdict(b, micro_acts)


# ---------------------------------------------------------------- the checks


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(u), np.asarray(v))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def check_invalid_inputs(b: Built, layer: int) -> None:
  """Integer activations, a wrong feature size and a missing layer: errors naming the layer."""
  tokens, x, y = clean_batch(b.config, 0)
  if b.config.devices > 1:
    tokens, x, y = tokens[:b.config.batch], x[:b.config.batch], y[:b.config.batch]
  (_, acts), grads = jax.eval_shape(
      jax.value_and_grad(sngd_jax.capture(b.captured_loss, outputs=True), has_aux=True),
      b.params, tokens, x, y)
  # Under shard_map the update runs per device with axis_name bound; the checks are static,
  # so a one-device tracing of the same transform without axis_name raises the same errors.
  tx = dataclasses.replace(b.config, devices=1).sngd()
  state = jax.eval_shape(tx.init, b.params)
  path = b.float_layers[layer % len(b.float_layers)]
  call = acts[path][0]
  as_int = call.replace(inputs=jax.ShapeDtypeStruct(call.inputs.shape, jnp.int32))
  wider = call.replace(inputs=jax.ShapeDtypeStruct(call.inputs.shape[:-1]
                                                    + (call.inputs.shape[-1] + 1,),
                                                    call.inputs.dtype))
  cases = {"integer": {**acts, path: (as_int,)}, "wrong_size": {**acts, path: (wider,)},
           "missing": {p: c for p, c in acts.items() if p != path}}
  for bad_acts in cases.values():
    with pytest.raises((TypeError, ValueError), match=rf"^sngd: .*{re.escape(repr(path))}"):
      jax.eval_shape(lambda g, s, a: tx.update(g, s, activations=a), grads, state, bad_acts)


def run_sequence(config: Config, faults: list[dict], recovery: int) -> dict:
  """Runs the faults then ``recovery`` clean steps, asserting the per-step properties.

  With accumulation a step is ``config.accumulate`` calls; the fault hits one of them.
  """
  b = built(config)
  params, opt_state = b.params, b.tx.init(b.params)
  counts = {"bad": 0, "good": 0, "?": 0, "skipped": 0, "held": 0}
  steps = [dict(f, clean=False) for f in faults]
  steps += [dict(site="clean", clean=True) for _ in range(recovery)]
  refresh_ok_at_end = None
  clean = fault_arrays()
  for t, f in enumerate(steps):
    before = only_sngd_state(opt_state)
    fault = fault_arrays(**{k: v for k, v in f.items() if k != "clean"})
    hit = f.get("device", 0) % config.accumulate
    micro_grads, micro_acts = [], []
    for micro in range(config.accumulate):
      tokens, x, y = clean_batch(config, 1 + (t * config.accumulate + micro) % 3)
      params, opt_state, updates, grads, acts, _ = b.step(
          params, opt_state, tokens, x, y, fault if micro == hit else clean)
      micro_grads.append(grads)
      micro_acts.append(acts)
      # Within a cycle MultiSteps' accumulators carry what the micro-batches gave (a bad one
      # too: the step it completes is skipped); they are zeroed when the cycle completes.
      assert all_finite((params, updates, only_sngd_state(opt_state))), (t, micro, config)
    assert all_finite(opt_state), (t, config)
    state = only_sngd_state(opt_state)
    verdict = expected(b, int(before.count), micro_grads, micro_acts)
    counts[verdict] += 1
    where = f"step {t} ({f}), verdict {verdict}, config {config}"
    skipped = int(state.num_skipped_steps) - int(before.num_skipped_steps)
    advanced = int(state.count) - int(before.count)
    assert skipped in (0, 1) and advanced in (0, 1), where
    if skipped:
      assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates)), where
      counts["skipped"] += 1
    if not advanced:  # a rejected step: nothing but the counter moves
      assert skipped == 1, where
      assert _same(state.replace(num_skipped_steps=before.num_skipped_steps), before), where
      counts["held"] += 1
    if verdict == "bad":
      assert not advanced, where
    if verdict == "good" or (f["clean"] and config.max_norm is not None):
      # Without the trust region an accepted out-of-scale batch may move the params so far
      # that clean batches overflow too: the oracle's verdict is then "bad" and holds.
      assert advanced, where
    if f["clean"] and advanced and int(before.count) % config.inverse_every == 0:
      refresh_ok_at_end = int(state.num_refresh_failures) == int(before.num_refresh_failures)
  assert int(only_sngd_state(opt_state).num_skipped_steps) == counts["skipped"]
  if recovery and config.max_norm is not None:
    assert refresh_ok_at_end, f"the last clean refresh failed, config {config}"
  return counts


# ---------------------------------------------------------------- strategies


def fault_strategy():
  """One step's fault; ``layer`` is reduced modulo the layer (or gradient leaf) count."""
  return st.fixed_dictionaries(dict(
      site=st.sampled_from(SITES), layer=st.integers(0, 63), pattern=st.sampled_from(PATTERNS),
      scale=st.sampled_from(SCALES), device=st.integers(0, NUM_DEVICES - 1)))


def config_strategy(devices: int = 1):
  kinds = st.lists(st.sampled_from(KINDS), min_size=1, max_size=3, unique=True).map(
      lambda ks: tuple(k for k in KINDS if k in ks))
  return st.builds(
      Config, kinds=kinds, fisher=st.sampled_from(["linear", "rfim"]),
      inverse=st.sampled_from(sorted(INVERSES)),
      prior=st.sampled_from(sngd_jax.PRIORS), dtype=st.sampled_from(sorted(DTYPES)),
      batch=st.sampled_from([1, 4]), factor_every=st.sampled_from([1, 2]),
      inverse_every=st.sampled_from([1, 3]), stats_batch_size=st.sampled_from([None, 2]),
      max_factor_ratio=st.sampled_from([None, 100.0]), max_norm=st.sampled_from([1.0, None]),
      decay=st.sampled_from([0.0, 0.9, 0.975]), devices=st.just(devices),
      accumulate=st.sampled_from([1, 2] if devices == 1 else [1]))


def _x64(config: Config):
  return jax.enable_x64(config.dtype == "float64")


def sweep_one(config: Config, faults: list[dict], recovery: int = 4) -> dict:
  with _x64(config):
    b = built(config)
    faults = [dict(f, layer=f["layer"] % (b.leaf_count if f["site"] == "gradient"
                                          else len(b.float_layers))) for f in faults]
    check_invalid_inputs(b, faults[0]["layer"] if faults else 0)
    return run_sequence(config, faults, recovery)


# No shrinking: every smaller configuration it would try costs a compilation; a failure's
# assertion message names the configuration and the step.
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FAULTS = st.lists(fault_strategy(), min_size=3, max_size=8)

# The fast slice: three small configurations that together take every value of most axes
# (methods combined: auto with eigh below d = 5, blocks of Denman-Beavers).
FAST = {
    "dense_conv_f32_accumulated": Config(kinds=("dense", "conv"), inverse="auto_eigh",
                                         stats_batch_size=2, max_factor_ratio=100.0,
                                         accumulate=2),
    "recurrent_rfim_bf16": Config(kinds=("recurrent",), fisher="rfim", inverse="newton_schulz",
                                  prior="none", dtype="bfloat16", factor_every=2,
                                  inverse_every=3, max_norm=None, decay=0.0),
    "embed_norm_attention_f16": Config(kinds=("embed", "norm", "attention"), inverse="nystrom",
                                       prior="identity", dtype="float16", batch=1,
                                       decay=0.975),
    "dense_f64": Config(kinds=("dense",), inverse="blocks_denman_beavers", dtype="float64",
                        factor_every=2, max_norm=None),
}


@pytest.mark.parametrize("name", sorted(FAST))
@settings(max_examples=3, **SETTINGS)
@given(faults=FAULTS)
def test_sweep_fast(name, faults):
  sweep_one(FAST[name], faults)


@pytest.mark.slow
@pytest.mark.parametrize("inverse", sorted(INVERSES))
def test_every_inverse_method_survives_the_overflowing_batch(inverse):
  """One fixed sequence per method: 1e20 input, NaN activation, Inf gradient, 1e30 constant."""
  config = Config(kinds=("dense", "norm"), inverse=inverse, prior="none")
  faults = [dict(site="model_input", layer=0, pattern="scale", scale=1e20, device=0),
            dict(site="activation", layer=1, pattern="nan_one", scale=1.0, device=0),
            dict(site="gradient", layer=2, pattern="inf_one", scale=1.0, device=0),
            dict(site="activation", layer=0, pattern="constant", scale=1e30, device=0)]
  counts = sweep_one(config, faults)
  assert counts["held"] == counts["bad"] == 4


@pytest.mark.slow
@settings(max_examples=60, **SETTINGS)
@given(config=config_strategy(), faults=FAULTS)
def test_sweep_full(config, faults):
  sweep_one(config, faults)


# ---------------------------------------------------------------- 8 devices (shard_map)

multi = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices: run in a subprocess by test_sweep_on_8_forced_devices")


def _run_forced_devices(marker: str, log_dir) -> None:
  if jax.device_count() >= NUM_DEVICES:
    pytest.skip("this session already has 8 devices; the tests below run directly")
  summary = run_on_forced_devices(__file__, ["-m", marker, "-k", "multi"], timeout=1800,
                                  log_dir=log_dir)
  assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary


@pytest.mark.slow
def test_sweep_full_on_8_forced_devices(tmp_path):
  _run_forced_devices("slow", tmp_path)


ONE_DEVICE_FAULTS = [  # each on device 3's shard only (a gradient is replicated)
    dict(site="model_input", layer=0, pattern="scale", scale=1e20, device=3),
    dict(site="activation", layer=1, pattern="nan_one", scale=1.0, device=3),
    dict(site="gradient", layer=2, pattern="inf_one", scale=1.0, device=3),
    dict(site="activation", layer=0, pattern="constant", scale=1e30, device=3),
    dict(site="activation", layer=0, pattern="zeros", scale=1.0, device=3),
]


@multi
def test_multi_device_fault_on_one_shard_skips_on_all():
  """``axis_name`` under shard_map (run by ``test_sharding.py``'s 8-device subprocess too)."""
  config = Config(kinds=("dense", "norm"), stats_batch_size=1, devices=NUM_DEVICES, batch=1,
                  max_factor_ratio=100.0)
  counts = sweep_one(config, ONE_DEVICE_FAULTS)
  assert counts["held"] == counts["bad"] == 4 and counts["good"] == 1 + 4


@multi
@pytest.mark.slow
@settings(max_examples=15, **SETTINGS)
@given(config=config_strategy(NUM_DEVICES), faults=FAULTS)
def test_multi_device_sweep_full(config, faults):
  sweep_one(config, faults)
