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
