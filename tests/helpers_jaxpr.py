"""Walking a jaxpr: every equation, including those of nested jaxprs (cond, loops, pjit)."""


def eqns(jaxpr):
  """Yields every equation of ``jaxpr`` and of the jaxprs in its equations' params."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for x in v if isinstance(v, (tuple, list)) else (v,):
        sub = x.jaxpr if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns") else x
        if hasattr(sub, "eqns"):
          yield from eqns(sub)


def scan_output_counts(jaxpr):
  """The number of outputs of every ``scan`` in ``jaxpr`` (nested ones included), in order."""
  return [len(e.outvars) for e in eqns(jaxpr) if e.primitive.name == "scan"]
