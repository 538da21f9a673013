"""Compile time against depth: a transformer LM written unrolled and with ``nn.scan``.

    python3 -m benchmarks.compile_depth                      # depths 2,4,8, 3 rounds
    python3 -m benchmarks.compile_depth --depths 2,8 --rounds 1

The model is ``examples/scanned_transformer.py``'s (pre-norm blocks of causal
self-attention and a GELU MLP, width 64, 4 heads, context 64, batch 32, on the Zen of
Python), written two ways: ``scan``, its blocks ``nn.scan(nn.remat(Block))`` over depth
with the params stacked on a leading layer axis (how models are written for TPU runs;
SNGD gets ``stacked={"blocks": 1}``), and ``unrolled``, the same blocks called one after
the other. For each depth and form the whole jitted training step (forward, backward,
optimizer update) is lowered and compiled with ``jax.jit(step).lower(...).compile()``
for ``sgd(momentum=0.9)``, ``adam`` and ``sngd_momentum`` at its defaults, in
interleaved rounds with JAX's compilation cache off; the medians and the compiled
fusions are reported. Writes ``benchmarks/results/compile_depth.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import harness
from examples.scanned_transformer import Block, ScannedLM
from examples.transformer_lm import TEXT

HERE = os.path.dirname(os.path.abspath(__file__))


class UnrolledLM(nn.Module):
  """``ScannedLM`` with its blocks called one after the other (``blocks_0`` ...)."""

  vocab: int
  context: int
  width: int = 64
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    x = nn.Embed(self.vocab, self.width)(tokens) + nn.Embed(self.context, self.width)(positions)
    for i in range(self.depth):
      x, _ = nn.remat(Block)(self.heads, name=f"blocks_{i}")(x, None)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _optimizers(form: str):
  stacked = {"blocks": 1} if form == "scan" else None
  return {
      "sgd(momentum)": lambda: optax.sgd(0.01, momentum=0.9),
      "adam": lambda: optax.adam(1e-3),
      "sngd_momentum": lambda: sngd_jax.sngd_momentum(0.01, stacked=stacked),
  }


def compile_once(form: str, depth: int, opt: str, batch: int = 32, context: int = 64):
  """Seconds to lower and compile one training step, and its compiled fusions."""
  chars = sorted(set(TEXT))
  model = (ScannedLM if form == "scan" else UnrolledLM)(len(chars), context, depth=depth)
  tokens = jnp.asarray(np.arange(batch * context).reshape(batch, context) % len(chars),
                       jnp.int32)
  params = model.init(jax.random.key(0), tokens[:1])["params"]
  tx = _optimizers(form)[opt]()
  state = tx.init(params)

  def loss_fn(params, tokens, targets):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  if opt.startswith("sngd"):
    def step(params, state, tokens, targets):
      (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
          params, tokens, targets)
      updates, state = tx.update(grads, state, params, activations=acts)
      return optax.apply_updates(params, updates), state, loss
  else:
    def step(params, state, tokens, targets):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(params, state, tokens, tokens).compile()
  seconds = time.perf_counter() - t0
  return seconds, compiled.as_text().count(" fusion(")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depths", default="2,4,8")
  p.add_argument("--forms", default="unrolled,scan")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=os.path.join(HERE, "results", "compile_depth.json"))
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for depth in [int(d) for d in args.depths.split(",")]:
    for form in args.forms.split(","):
      opts = list(_optimizers(form))
      secs: dict[str, list[float]] = {o: [] for o in opts}
      fusions: dict[str, int] = {}
      for _ in range(args.rounds):
        for o in opts:
          jax.clear_caches()
          s, n = compile_once(form, depth, o)
          secs[o].append(s)
          fusions[o] = n
      med = {o: float(np.median(v)) for o, v in secs.items()}
      rows.append({"depth": depth, "form": form, "median_s": med, "all_s": secs,
                   "fusions": fusions, "load": os.getloadavg()})
      print(f"depth {depth} {form}: " + ", ".join(
          f"{o} {med[o]:.2f} s ({fusions[o]} fusions)" for o in opts), flush=True)
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "rounds": args.rounds, "rows": rows}, f, indent=1)
  print("\n| depth | form | sgd(momentum) s | adam s | sngd_momentum s | x sgd | x adam "
        "| fusions sgd / adam / sngd |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    m, fu = r["median_s"], r["fusions"]
    print(f"| {r['depth']} | {r['form']} | {m['sgd(momentum)']:.2f} | {m['adam']:.2f} | "
          f"{m['sngd_momentum']:.2f} | {m['sngd_momentum'] / m['sgd(momentum)']:.1f} | "
          f"{m['sngd_momentum'] / m['adam']:.1f} | {fu['sgd(momentum)']} / {fu['adam']} / "
          f"{fu['sngd_momentum']} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
