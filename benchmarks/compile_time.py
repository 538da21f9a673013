"""Compile time of the training step: SNGD vs its base optimizer, per model.

    python3 -m benchmarks.compile_time                       # every model, 3 rounds
    python3 -m benchmarks.compile_time --models mlp --rounds 1 --parts
    python3 -m benchmarks.compile_time --profile      # where XLA:CPU spends the compile time
    python3 -m benchmarks.compile_time --reductions   # a trace-and-finiteness check, by form
    python3 -m benchmarks.compile_time --options '{"xla_cpu_use_fusion_emitters": false}'

For each model the whole jitted training step (forward, backward, optimizer
update, parameter update) is lowered and compiled with
``jax.jit(step).lower(...).compile()`` for ``sgd(momentum=0.9)`` (the base of
``sngd_momentum``), ``adam`` and ``sngd_momentum`` with its defaults, in
interleaved rounds (so machine load hits them alike; the median of the rounds
is reported) with JAX's compilation cache off. ``--parts`` adds SNGD variants
with one stage replaced by a pass-through, which attributes the compile time to
the stages (statistics, refresh, preconditioning). ``--profile`` compiles the
steps of SGD momentum and SNGD under ``jax.profiler`` and splits XLA:CPU's
compile into its phases (``compile_phases``; writes ``results/compile_profile.json``).

``--options JSON`` compiles Adam's, SGD momentum's and SNGD's steps with and without those
per-``jit`` compiler options (``jax.jit(step, compiler_options=...)``), in interleaved rounds,
and times 50 calls of each compiled step (``options_study``; writes
``results/compile_options.json``).

Writes ``benchmarks/results/compile_time.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Optional
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import eval_tasks, evaluate, harness

HERE = os.path.dirname(os.path.abspath(__file__))


def _tasks():
  return {
      "mlp-256-256": lambda: eval_tasks.mlp("mlp-256-256", "01"),
      "mlp-80x6": lambda: eval_tasks.mlp("mlp-80x6", "01"),
      "cnn": lambda: eval_tasks.cnn(1.0),
      "resnet-bn": lambda: eval_tasks.resnet_bn(1.0),
      "autoencoder": lambda: eval_tasks.autoencoder(1.0),
      "char-lstm": lambda: eval_tasks.char_lstm(1.0),
      "transformer": lambda: eval_tasks.transformer(1.0),
      "mnist1d-cnn": lambda: eval_tasks.mnist1d_cnn(1.0),
      "gru-licenses": lambda: eval_tasks.gru_licenses(1.0),
  }


STAGES = ("sngd_check", "sngd_statistics", "sngd_refresh", "sngd_precondition", "sngd_guard")
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def kernel_counts(hlo_text: str) -> dict[str, int]:
  """Kernels of a compiled XLA:CPU program, by the SNGD stage that emitted them.

  A kernel is a fusion or an unfused instruction of an executed computation
  (the entry, a conditional's branch, a loop's body): everything the runtime
  runs, library calls, copies and conditionals included. XLA:CPU generates
  code only for the fusions among them, one by one, and the compile time
  follows their number (~10-20 ms each on the benchmark machine): count those
  with ``profile_compile`` (``fusions``, ``fusions_by_stage``). The stage is
  read from the ``jax.named_scope`` names in the metadata (``sngd_jax`` labels
  its stages); ``other`` is the model and the base
  optimizer, ``unlabelled`` instructions without a source (copies, XLA's splits of
  reductions).
  """
  counts: dict[str, int] = {}
  for op, key in _instruction_stages(hlo_text).values():
    if op not in _SKIP:
      counts[key] = counts.get(key, 0) + 1
  return counts


def _instruction_stages(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Each instruction of the executed computations of a compiled program (the entry, a
  conditional's branch, a loop's body; not fused bodies) -> ``(opcode, stage)``.

  The stage is the first of ``STAGES`` named in the instruction's metadata (for a
  fusion, in its fused body's), else ``other`` (the model, the base optimizer) or
  ``unlabelled`` (no source: copies, XLA's splits of reductions).
  """
  comps = {}
  for c in re.split(r"\n(?=%|ENTRY)", hlo_text):
    m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", c)
    if m:
      comps[m.group(1)] = c
  called = set(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", hlo_text))

  def stage(text):
    names = re.findall(r'op_name="([^"]+)"', text)
    return next((k for k in STAGES if any(k in n for n in names)),
                "other" if names else "unlabelled")

  out = {}
  for name, comp in comps.items():
    if name in called:  # a fused body or a reduction's scalar function
      continue
    for line in comp.split("\n")[1:]:
      m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = .*? (\w[\w\-]*)\(", line)
      if not m:
        continue
      body = line
      if m.group(2) == "fusion":
        body = comps.get(re.search(r"calls=%?([\w.\-]+)", line).group(1), "")
      out[m.group(1)] = (m.group(2), stage(body))
  return out


def compile_seconds(task, pre, post, kernels: Optional[dict] = None) -> float:
  """Seconds to lower and compile the task's whole training step.

  ``kernels``, a dict, receives ``kernel_counts`` of the compiled program.
  """
  post = optax.with_extra_args_support(post)
  step = evaluate.make_step(task, pre, post)
  xs, ys = jnp.asarray(task.x_train[:256]), jnp.asarray(task.y_train[:256])
  params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
  idx = jnp.arange(task.batch_size, dtype=jnp.int32) % xs.shape[0]
  t0 = time.perf_counter()
  compiled = step.lower(params, extra, s_pre, s_post, xs, ys, idx).compile()
  seconds = time.perf_counter() - t0
  if kernels is not None:
    kernels.update(kernel_counts(compiled.as_text()))
  return seconds


def options_study(models: list[str], options: dict, rounds: int, steps: int = 50):
  """Compile seconds and median ms/step of each optimizer's step, with and without the
  per-``jit`` compiler ``options``, interleaved rounds; the medians over rounds."""
  optimizers = {
      "sgd(momentum)": lambda: (None, optax.sgd(0.01, momentum=0.9)),
      "adam": lambda: (None, optax.adam(1e-3)),
      "sngd_momentum": lambda: (sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9)),
  }
  rows = []
  for name in models:
    task = _tasks()[name]()
    xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    sampler = evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0))
    idxs = [next(sampler) for _ in range(steps + 1)]
    rec: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
      for opt, make in optimizers.items():
        for label, opts in (("default", {}), ("options", options)):
          pre, post = make()
          post = optax.with_extra_args_support(post)
          args = evaluate.init_run(task, pre, post, 0, xs)
          with mock.patch.dict(evaluate.COMPILER_OPTIONS, opts, clear=True):
            step = evaluate.make_step(task, pre, post)
            t0 = time.perf_counter()
            compiled = step.lower(*args, xs, ys, idxs[0]).compile()
            seconds = time.perf_counter() - t0
          ms = []
          state = args
          for i in range(steps):
            t0 = time.perf_counter()
            out = compiled(*state, xs, ys, idxs[i + 1])
            float(out[4])
            ms.append(1e3 * (time.perf_counter() - t0))
            state = out[:4]
          r = rec.setdefault(f"{opt} {label}", {"compile_s": [], "ms_median": []})
          r["compile_s"].append(seconds)
          r["ms_median"].append(float(np.median(ms[5:])))
    med = {k: {m: float(np.median(v)) for m, v in r.items()} for k, r in rec.items()}
    rows.append({"model": name, "median": med, "all": rec, "load": os.getloadavg()})
    print(f"{name}: " + ", ".join(f"{k} {v['compile_s']:.2f} s / {v['ms_median']:.2f} ms"
                                  for k, v in med.items()), flush=True)
  return rows


def kernel_scaling(sizes=(10, 40, 160)) -> list[tuple[int, int, float]]:
  """Compile time against kernel count: ``n`` independent small reductions per program.

  Returns ``(n, fusions, seconds)`` per size: how XLA:CPU's compile time grows with
  the number of kernels, whatever they compute.
  """
  out = []
  for n in sizes:
    xs = [jnp.ones((100 + i, 37)) for i in range(n)]
    f = jax.jit(lambda xs: [jnp.sum(jnp.sin(x) * (i + 1)) + jnp.max(x * i)
                            for i, x in enumerate(xs)])
    t0 = time.perf_counter()
    compiled = f.lower(xs).compile()
    out.append((n, compiled.as_text().count(" fusion("), time.perf_counter() - t0))
  return out


PHASES = {
    "total": "PjRtCpuClient::Compile",
    "hlo_passes": ("HLO passes through layout assignment", "HLO passes after layout assignment"),
    "fusion_emitter": "FusionCompiler::Compile",
    "llvm_codegen": "JitCompiler::Compile",
}
"""XLA:CPU's compile phases, by the names of its profiler events (jaxlib 0.10)."""


def reduction_forms(sizes=(257, 513, 1025), rounds: int = 5) -> list[dict[str, Any]]:
  """Compile time of a factor's trace-and-finiteness check, alone in a program, by form.

  ``slice``: the form before ``792810d``, a finiteness sum plus the trace as a strided
  slice and a sum; ``where``: one masked sum with the mask built in the program
  (``statistics.checked_block_trace`` above ``d = 1024``); ``constant``: one sum of the
  factor times a constant identity (``checked_block_trace`` up to ``d = 1024``).
  Minimum of ``rounds`` compiles each (caches cleared), and the compiled fusions.
  """
  out = []
  for d in sizes:
    eye = np.eye(d, dtype=np.float32)
    forms = {
        "slice": lambda g, d=d: (jnp.isfinite(jnp.sum(g / g.size)),
                                 jnp.sum(g.reshape(-1)[::d + 1])),
        "where": lambda g, d=d: jnp.sum(jnp.where(jnp.eye(d, dtype=bool), g, 0 * g)),
        "constant": lambda g, eye=eye: jnp.sum(g * eye),
    }
    g = jnp.ones((d, d), jnp.float32)
    for name, fn in forms.items():
      seconds = []
      for r in range(rounds):
        jax.clear_caches()
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(g + r).compile()
        seconds.append(time.perf_counter() - t0)
      text = compiled.as_text()
      entry = text[text.index("ENTRY"):]
      fusions = re.findall(r"%([\w.\-]+) = \S+ fusion\(", entry)
      out.append({"d": d, "form": name, "compile_ms_min": 1000 * min(seconds),
                  "compile_ms_all": [1000 * t for t in seconds], "fusions": fusions})
  return out


def compile_phases(trace_dir: str, hlo_text: Optional[str] = None) -> dict[str, Any]:
  """Milliseconds per compile phase (``PHASES``) in a ``jax.profiler`` trace of one compile.

  ``fusion_emitter`` is the per-fusion MLIR pipeline (``fusions`` counts the fusions it
  compiled, ``fusion_ms_min/median/max`` spread their times), ``llvm_codegen`` LLVM's
  code generation for all kernels, ``hlo_passes`` the HLO optimization pipeline. The
  phases may overlap (XLA compiles kernels on its thread pool), so they need not sum
  to ``total``. Given the compiled program's text, ``fusions_by_stage`` attributes the
  compiled fusions to the stages, by the instruction each was compiled for.
  """
  import glob
  import gzip
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))
  events = [e for e in json.load(gzip.open(path[-1]))["traceEvents"] if e.get("ph") == "X"]
  out = {}
  for phase, names in PHASES.items():
    names = (names,) if isinstance(names, str) else names
    hits = [e for e in events if any(e["name"].startswith(n) for n in names)]
    out[phase] = sum(e["dur"] for e in hits) / 1e3
    if phase == "fusion_emitter":
      out["fusions"] = len(hits)
      ms = sorted(e["dur"] / 1e3 for e in hits)
      out["fusion_ms_min"], out["fusion_ms_median"], out["fusion_ms_max"] = (
          (ms[0], ms[len(ms) // 2], ms[-1]) if ms else (0.0, 0.0, 0.0))
      if hlo_text is not None:
        stages, by_stage = _instruction_stages(hlo_text), {}
        for e in hits:
          name = re.sub(r"_kernel_module$", "", re.sub(r"^__compute_module_", "",
                                                       e["args"].get("module", "")))
          key = stages.get(name, ("", "unmatched"))[1]
          by_stage[key] = by_stage.get(key, 0) + 1
        out["fusions_by_stage"] = by_stage
  return out


def profile_compile(task, pre, post) -> dict[str, Any]:
  """``compile_phases`` of one compile of the task's training step (lowered beforehand)."""
  import tempfile
  post = optax.with_extra_args_support(post)
  xs, ys = jnp.asarray(task.x_train[:256]), jnp.asarray(task.y_train[:256])
  params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
  idx = jnp.arange(task.batch_size, dtype=jnp.int32) % xs.shape[0]
  lowered = evaluate.make_step(task, pre, post).lower(params, extra, s_pre, s_post, xs, ys, idx)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    try:
      compiled = lowered.compile()
    finally:
      jax.profiler.stop_trace()
    return compile_phases(d, compiled.as_text())


def _profile_main(models: list[str], out: str) -> int:
  rows = []
  for name in models:
    task = _tasks()[name]()
    row = {"model": name}
    for v, pre in (("sgd(momentum)", None), ("sngd_momentum", sngd_jax.sngd())):
      row[v] = profile_compile(task, pre, optax.sgd(0.01, momentum=0.9))
    rows.append(row)
    print(name, {v: {k: (round(x) if isinstance(x, float) else x) for k, x in row[v].items()}
                 for v in row if v != "model"}, flush=True)
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "unit": "ms", "rows": rows}, f, indent=1)
  print("\n| model | optimizer | compile ms | HLO passes ms | fusions | fusion emitter ms "
        "(per fusion) | one fusion ms: min / median / max | LLVM codegen ms |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    for v in ("sgd(momentum)", "sngd_momentum"):
      p = r[v]
      print(f"| {r['model']} | {v} | {p['total']:.0f} | {p['hlo_passes']:.0f} | {p['fusions']} | "
            f"{p['fusion_emitter']:.0f} ({p['fusion_emitter'] / max(p['fusions'], 1):.1f}) | "
            f"{p['fusion_ms_min']:.1f} / {p['fusion_ms_median']:.1f} / {p['fusion_ms_max']:.1f} | "
            f"{p['llvm_codegen']:.0f} |")
  print("\nfusions of the SNGD step by stage (the base optimizer's: `other` and `unlabelled`):\n")
  print("| model | sgd(momentum) | sngd_momentum | " + " | ".join(STAGES)
        + " | other | unlabelled |")
  print("|---|---|---|" + "---|" * (len(STAGES) + 2))
  for r in rows:
    f = r["sngd_momentum"].get("fusions_by_stage", {})
    print(f"| {r['model']} | {r['sgd(momentum)']['fusions']} | {r['sngd_momentum']['fusions']} | "
          + " | ".join(str(f.get(k, 0)) for k in STAGES + ("other", "unlabelled")) + " |")
  return 0


def _passthrough_parts():
  """SNGD variants with one stage replaced by a pass-through (for attribution only)."""
  from sngd_jax._src import precondition as pre_lib
  from sngd_jax._src import transform

  def no_stats(config, inputs, state, grads_finite):
    return state.factors, state.weights, jnp.array(True), jnp.zeros((), jnp.int32)

  def no_refresh(config, method, specs, factors, weights, state, finite):
    return state.inverses, jnp.zeros((), jnp.int32), jnp.array(False)

  def no_apply(specs, leaves, index, inverses, factor_dtypes, method):
    pres = {p: pre_lib.augmented(s, leaves, index, factor_dtypes[p]) for p, s in specs.items()}
    return pres, jnp.zeros((), jnp.float32)

  return {
      "sngd without statistics": mock.patch.object(transform, "_update_statistics", no_stats),
      "sngd without refresh": mock.patch.object(transform, "_refresh", no_refresh),
      "sngd without preconditioning": mock.patch.object(pre_lib, "precondition", no_apply),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(_tasks()))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--parts", action="store_true")
  p.add_argument("--out", default=os.path.join(HERE, "results", "compile_time.json"))
  p.add_argument("--profile", action="store_true",
                 help="only: XLA:CPU's compile phases for SGD momentum and SNGD (compile_phases)")
  p.add_argument("--scaling", action="store_true",
                 help="only: compile time against the number of kernels (kernel_scaling)")
  p.add_argument("--reductions", action="store_true",
                 help="only: a factor's trace-and-finiteness check by form (reduction_forms)")
  p.add_argument("--options", default=None,
                 help="only: JSON compiler options, with and without (options_study)")
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  if args.options:
    options = json.loads(args.options)
    rows = options_study(args.models.split(","), options, args.rounds)
    out = args.out if args.out != p.get_default("out") else os.path.join(
        HERE, "results", "compile_options.json")
    with open(out, "w") as f:
      json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
                 "options": options, "rounds": args.rounds, "rows": rows}, f, indent=1)
    print("\n| model | optimizer | compile s: default / options | ms/step: default / options |")
    print("|---|---|---|---|")
    for r in rows:
      m = r["median"]
      for opt in ("sgd(momentum)", "adam", "sngd_momentum"):
        d, o = m[f"{opt} default"], m[f"{opt} options"]
        print(f"| {r['model']} | {opt} | {d['compile_s']:.2f} / {o['compile_s']:.2f} | "
              f"{d['ms_median']:.2f} / {o['ms_median']:.2f} |")
    return 0
  if args.profile:
    out = args.out if args.out != p.get_default("out") else os.path.join(
        HERE, "results", "compile_profile.json")
    return _profile_main(args.models.split(","), out)
  if args.reductions:
    rows = reduction_forms()
    out = args.out if args.out != p.get_default("out") else os.path.join(
        HERE, "results", "compile_reductions.json")
    with open(out, "w") as f:
      json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
                 "rows": rows}, f, indent=1)
    print("| d | form | compile ms (min of 5) | fusions |\n|---|---|---|---|")
    for r in rows:
      print(f"| {r['d']} | {r['form']} | {r['compile_ms_min']:.0f} | {', '.join(r['fusions'])} |")
    return 0
  if args.scaling:
    for n, fusions, seconds in kernel_scaling():
      print(f"{n} reductions: {fusions} fusions, compiled in {seconds:.2f} s")
    return 0
  variants = {
      "sgd(momentum)": lambda: (None, optax.sgd(0.01, momentum=0.9)),
      "adam": lambda: (None, optax.adam(1e-3)),
      "sngd_momentum": lambda: (sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9)),
      "sngd_adam": lambda: (sngd_jax.sngd(), optax.adam(1e-3)),
      "sngd_momentum (host refresh)": lambda: (
          sngd_jax.sngd(inverse=sngd_jax.inverse.host_refresh(sngd_jax.inverse.auto())),
          optax.sgd(0.01, momentum=0.9)),
  }
  parts = _passthrough_parts() if args.parts else {}
  rows = []
  for name in args.models.split(","):
    task = _tasks()[name]()
    times = {v: [] for v in list(variants) + list(parts)}
    kernels = {v: {} for v in variants}
    for _ in range(args.rounds):
      for v, make in variants.items():
        times[v].append(compile_seconds(task, *make(), kernels=kernels[v]))
      for v, patch in parts.items():
        with patch:
          times[v].append(compile_seconds(task, sngd_jax.sngd(),
                                          optax.sgd(0.01, momentum=0.9)))
    med = {v: float(np.median(t)) for v, t in times.items()}
    rows.append({"model": name, "description": task.description, "median_s": med,
                 "all_s": times, "kernels": kernels, "load": os.getloadavg()})
    print(f"{name}: " + ", ".join(f"{v} {s:.2f}s" for v, s in med.items())
          + f"; sngd / sgd {med['sngd_momentum'] / med['sgd(momentum)']:.2f}x, "
          f"/ adam {med['sngd_momentum'] / med['adam']:.2f}x; load {os.getloadavg()}",
          flush=True)
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "rounds": args.rounds, "rows": rows}, f, indent=1)
  print("\n| model | sgd(momentum) s | adam s | sngd_momentum s | x sgd | x adam |"
        + "".join(f" {v} s |" for v in parts))
  print("|---|---|---|---|---|---|" + "---|" * len(parts))
  for r in rows:
    m = r["median_s"]
    print(f"| {r['model']} | {m['sgd(momentum)']:.2f} | {m['adam']:.2f} | "
          f"{m['sngd_momentum']:.2f} | {m['sngd_momentum'] / m['sgd(momentum)']:.2f} | "
          f"{m['sngd_momentum'] / m['adam']:.2f} |" + "".join(f" {m[v]:.2f} |" for v in parts))
  print("\nkernels of the compiled step (XLA:CPU), by stage:\n")
  print("| model | sgd(momentum) | adam | sngd_momentum | " + " | ".join(STAGES)
        + " | other | unlabelled |")
  print("|---|---|---|---|" + "---|" * (len(STAGES) + 2))
  for r in rows:
    k = r["kernels"]
    ks = k["sngd_momentum"]
    print(f"| {r['model']} | {sum(k['sgd(momentum)'].values())} | {sum(k['adam'].values())} | "
          f"{sum(ks.values())} | " + " | ".join(str(ks.get(x, 0)) for x in STAGES)
          + f" | {ks.get('other', 0)} | {ks.get('unlabelled', 0)} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
