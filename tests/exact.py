"""``sngd()`` with the plain math that the float64 references compute.

The shipped defaults amortize the statistics (``factor_every=5``, ``decay=0.975``)
and bound the update in the local-Fisher metric (``max_norm=1.0``). Tests that
compare an update with an independent reference use this instead: statistics at
every step with ``decay=0.995`` and no trust region, unless a test says otherwise.
The trust region and the amortization have their own tests (``test_trust_region.py``,
``test_transform.py``).
"""

import jax
from np_reference import ONE_STEP

import sngd_jax

EXACT = {"factor_every": 1, "decay": 0.995, "max_norm": None}


def exact_sngd(**kwargs):
  """``sngd_jax.sngd(**kwargs)`` with :data:`EXACT` filling the arguments not given."""
  return sngd_jax.sngd(**{**EXACT, **kwargs})


def factors_after_one_step(params, grads, acts, **kwargs):
  """The state after one jitted ``update`` from ``init`` of ``sngd(**ONE_STEP, **kwargs)``
  (:data:`np_reference.ONE_STEP`): its factors are that step's batch estimates."""
  tx = sngd_jax.sngd(**{**ONE_STEP, **kwargs})
  _, state = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
      grads, tx.init(params), acts)
  return state
