"""compile_time.py's measurements: kernel counts by stage and the profile of XLA:CPU's compile."""

import numpy as np
import optax

import sngd_jax
from benchmarks import compile_time, eval_tasks


def test_profile_splits_the_compile_into_phases_and_counts_fusions():
  """The profiler's event names are read for this jaxlib (a renamed event gives zeros and
  fails here), and SNGD's step compiles more fusions than its base optimizer's."""
  task = eval_tasks.mlp("mlp-20-20-20", "pixel")
  base = compile_time.profile_compile(task, None, optax.sgd(0.01, momentum=0.9))
  sngd = compile_time.profile_compile(task, sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9))
  for p in (base, sngd):
    assert p["fusions"] > 0 and p["fusion_emitter"] > 0 and p["llvm_codegen"] > 0
    assert p["hlo_passes"] > 0 and p["total"] >= p["hlo_passes"]
  assert sngd["fusions"] > base["fusions"]  # counts, not times: no timing claim in a test
  # Every compiled fusion is matched to an instruction of the program and attributed.
  for p in (base, sngd):
    assert sum(p["fusions_by_stage"].values()) == p["fusions"]
    assert "unmatched" not in p["fusions_by_stage"]
  assert not any(k.startswith("sngd_") for k in base["fusions_by_stage"])
  assert sngd["fusions_by_stage"].get("sngd_refresh", 0) > 0
  assert sngd["fusions_by_stage"].get("sngd_statistics", 0) > 0


def test_kernel_counts_attribute_kernels_to_sngd_stages():
  """Every SNGD stage that runs on every step or under its schedule emits kernels, and the
  base optimizer's step has none of them."""
  task = eval_tasks.mlp("mlp-20-20-20", "pixel")
  base, sngd = {}, {}
  compile_time.compile_seconds(task, None, optax.sgd(0.01, momentum=0.9), kernels=base)
  compile_time.compile_seconds(task, sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9),
                               kernels=sngd)
  assert not any(k.startswith("sngd_") for k in base)
  for stage in ("sngd_check", "sngd_statistics", "sngd_refresh", "sngd_precondition"):
    assert sngd.get(stage, 0) > 0, stage
  assert sum(sngd.values()) > sum(base.values())


def test_refresh_groups_variants_set_and_restore_the_library_settings():
  """``refresh_groups.variant`` patches the refresh's settings and restores them; ``loop`` is
  the library before the closed form and the written-out groups (every CPU group of several
  blocks in ``lax.map``)."""
  from benchmarks import refresh_groups
  from sngd_jax._src.inverse import dense
  from sngd_jax._src.inverse import refresh as R
  before = (dense.SMALL_DIM, R.UNROLL_MAX, R.UNROLL_LAYERS_MAX)
  assert before == (2, 8, 16)
  with refresh_groups.variant("loop"):
    assert (dense.SMALL_DIM, R.UNROLL_MAX, R.UNROLL_LAYERS_MAX) == (0, 0, 0)
    assert not sngd_jax.inverse.cholesky().batch_safe(2)
  with refresh_groups.variant("library"):
    assert (dense.SMALL_DIM, R.UNROLL_MAX, R.UNROLL_LAYERS_MAX) == before
  assert (dense.SMALL_DIM, R.UNROLL_MAX, R.UNROLL_LAYERS_MAX) == before
  assert refresh_groups.max_rel_diff({"a": np.ones(3)}, {"a": np.array([1.0, 1.5, 1.0])}) == 0.5


def test_padded_refresh_gives_the_library_inverses():
  """``padded_refresh.padded`` (every dense block in one zero-padded group) gives the inverses
  of the library's ``refresh_inverses`` (one group per size), against float64 numpy too, and
  keeps the old inverse of a rejected block."""
  from types import SimpleNamespace

  import jax.numpy as jnp

  from benchmarks import padded_refresh
  from sngd_jax._src.inverse import refresh as R
  rng = np.random.default_rng(0)
  specs, factors, weights, old = {}, {}, {}, {}
  for p, shape in (("a", (5, 5)), ("b", (3, 9, 9)), ("c", (9, 9))):
    x = rng.standard_normal(shape[:-2] + (2 * shape[-1], shape[-1]))
    factors[p] = jnp.asarray(np.swapaxes(x, -1, -2) @ x / x.shape[-2], jnp.float32)
    specs[p] = SimpleNamespace(dim=shape[-1], structure="dense")
    weights[p] = jnp.float32(2.0)
    old[p] = jnp.full((int(np.prod(shape[:-2])),) + shape[-2:], 7.0, jnp.float32)  # (b, d, d)
  factors["c"] = factors["c"].at[0, 0].set(jnp.nan)  # rejected: keeps its old inverse
  method = sngd_jax.inverse.cholesky()
  lib, lib_failures = R.refresh_inverses(specs, factors, weights, old, method, 1e-3, 1e-8)
  pad, pad_failures = padded_refresh.padded(specs, factors, weights, old, method, 1e-3, 1e-8)
  assert int(lib_failures) == int(pad_failures) == 1
  np.testing.assert_array_equal(np.asarray(pad["c"]), 7.0)
  for p in ("a", "b"):
    g = np.asarray(factors[p], np.float64) / 2.0
    eye = np.eye(g.shape[-1])
    shift = 1e-3 * np.trace(g, axis1=-2, axis2=-1)[..., None, None] + 1e-8
    expected = np.linalg.inv(g + shift * eye)
    np.testing.assert_allclose(np.asarray(lib[p]), expected.reshape(old[p].shape), rtol=2e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(pad[p]), np.asarray(lib[p]), rtol=2e-5, atol=1e-7)


def test_options_study_compiles_with_and_without_the_options(monkeypatch):
  """``--options``: every optimizer's step is compiled and run with and without the per-jit
  compiler options, and the options reach the compile (an unknown one fails it)."""
  import pytest

  monkeypatch.setattr(compile_time, "_tasks",
                      lambda: {"tiny": lambda: eval_tasks.mlp("mlp-20-20-20", "pixel")})
  (row,) = compile_time.options_study(["tiny"], {"xla_cpu_use_fusion_emitters": False},
                                      rounds=1, steps=7)
  assert set(row["median"]) == {f"{o} {label}" for o in ("sgd(momentum)", "adam", "sngd_momentum")
                                for label in ("default", "options")}
  for r in row["median"].values():
    assert r["compile_s"] > 0 and r["ms_median"] > 0 and np.isfinite(r["ms_median"])
  with pytest.raises(Exception, match="xla_no_such_option_for_this_test"):
    compile_time.options_study(["tiny"], {"xla_no_such_option_for_this_test": 1}, rounds=1,
                               steps=7)


def test_compile_depth_compares_one_model_written_two_ways():
  """``compile_depth``'s unrolled LM is the scanned one with its blocks called in turn: with
  the scanned params unstacked into ``blocks_i``, the logits agree (a renamed layer or a
  different block would fail here, and the two forms' compile times would compare two
  models)."""
  import jax
  import jax.numpy as jnp

  from benchmarks import compile_depth
  vocab, context, depth = 11, 8, 3
  tokens = jnp.asarray(np.arange(2 * context).reshape(2, context) % vocab, jnp.int32)
  scanned = compile_depth.ScannedLM(vocab, context, width=16, depth=depth, heads=2)
  unrolled = compile_depth.UnrolledLM(vocab, context, width=16, depth=depth, heads=2)
  params = scanned.init(jax.random.key(0), tokens)["params"]
  flat = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    flat[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["blocks"])
  assert jax.tree.structure(flat) == jax.tree.structure(
      unrolled.init(jax.random.key(0), tokens)["params"])
  np.testing.assert_allclose(unrolled.apply({"params": flat}, tokens),
                             scanned.apply({"params": params}, tokens), rtol=2e-5, atol=2e-5)
