"""The protocol's phases (benchmarks/protocol.py), shared by evaluate.py and kfac_eval.py."""

from benchmarks import protocol


def _record(opt, lr, seed, steps_to_target=None, final=1.0, diverged=False):
  return {"optimizer": opt, "lr": lr, "seed": seed, "steps_to_target": steps_to_target,
          "final_metric": None if diverged else final, "diverged": diverged}


def test_score_orders_reached_then_final_then_diverged():
  reached_fast = _record("a", 1, 0, steps_to_target=100, final=0.5)
  reached_slow_better = _record("a", 2, 0, steps_to_target=200, final=0.9)
  not_reached = _record("a", 3, 0, final=0.95)
  diverged = _record("a", 4, 0, diverged=True)
  ranked = sorted([diverged, not_reached, reached_slow_better, reached_fast],
                  key=lambda r: protocol.score(r, higher_is_better=True))
  assert [r["lr"] for r in ranked] == [1, 2, 3, 4]
  # Not reached: the better final metric wins (lower is better for a loss).
  lo, hi = _record("a", 1, 0, final=200.0), _record("a", 2, 0, final=250.0)
  assert min([hi, lo], key=lambda r: protocol.score(r, False)) is lo


def test_tune_and_seed_extends_an_edge_once_then_runs_seeds():
  # "a": steps to target fall with the lr, so the best is always the top of the grid;
  # "b": best in the interior; "ref": a one-point reference, never extended.
  def steps(opt, lr):
    return {"a": int(1000 / lr), "b": abs(lr - 1.0) * 100 + 10}.get(opt, 50)

  batches = []

  def run_batch(plan):
    batches.append(plan)
    return [_record(o, lr, s, steps_to_target=steps(o, lr)) for o, lr, s in plan]

  grids = {"a": (1.0, 3.16, 10.0), "b": (0.316, 1.0, 3.16), "ref": (0.5,)}
  records, best = protocol.tune_and_seed("t", list(grids), 3, grids, True, run_batch,
                                         max_extend=1)
  assert batches[0] == [(o, lr, 0) for o in grids for lr in sorted(grids[o])]
  assert batches[1] == [("a", 31.6, 0)]  # one extension, on the top edge, for "a" only
  assert best == {"a": 31.6, "b": 1.0, "ref": 0.5}  # the extension (still an edge) is kept
  assert batches[2] == [(o, best[o], s) for o in grids for s in (1, 2)]
  assert len(batches) == 3 and len(records) == 7 + 1 + 6


def test_tune_and_seed_without_extension_or_seeds():
  calls = []

  def run_batch(plan):
    calls.append(plan)
    return [_record(o, lr, s, final=lr) for o, lr, s in plan]

  _, best = protocol.tune_and_seed("t", ["a"], 1, {"a": (1.0, 2.0)}, True, run_batch, 0)
  assert best == {"a": 2.0} and len(calls) == 1  # best final metric; no extension, no seeds


def test_run_summary_and_format():
  # Steps of 2 s then 1, 1, 3 s; evaluations at steps 2 and 4 (walls 3 and 7 s).
  times = [2.0, 1.0, 1.0, 3.0]
  evals = [{"step": 0, "wall": 0.0, "metric": 300.0}, {"step": 2, "wall": 3.0, "metric": None},
           {"step": 3, "wall": 4.0, "metric": 250.0}, {"step": 4, "wall": 7.0, "metric": 230.0}]
  s = protocol.run_summary(times, evals, lambda m: m <= 240.0, compile_s=5.0)
  assert s["steps"] == 4 and s["wall_s"] == 7.0
  assert s["median_step_ms"] == 1000.0  # the first step is left out: median of 1, 1, 3
  assert abs(s["mean_step_ms"] - 5000.0 / 3) < 1e-9
  assert (s["steps_to_target"], s["wall_to_target"]) == (4, 7.0)
  assert s["wall_to_target_with_compile"] == 12.0
  never = protocol.run_summary(times, evals, lambda m: m <= 100.0, compile_s=5.0)
  assert never["steps_to_target"] is never["wall_to_target_with_compile"] is None
  line = protocol.format_run({"optimizer": "sngd", "lr": 0.01, "seed": 2, "compile_s": 5.0,
                              "final_metric": 230.0, **s})
  assert "sngd lr=0.01" in line and "steps=     4" in line and "to-target 7.0 (4 steps)" in line
  assert "clipped" not in line
