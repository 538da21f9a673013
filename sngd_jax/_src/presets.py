"""Ready-made configurations of ``sngd_jax.sngd``.

``paper`` is the reference configuration of the paper's code (W. Liu et al.,
arXiv:2412.07441; its method and defaults as ``docs/usage.md`` and
``docs/hyperparameters.md`` describe them), which differs from the
library's defaults (``sngd_jax.DEFAULTS``) in every option that the defaults
amortize or bound:

| option | paper | defaults |
| --- | --- | --- |
| ``fisher`` | ``"rfim"`` per unit on hidden layers, ``"linear"`` first/last | ``"linear"`` |
| ``prior`` | ``"identity"`` | ``"scaled_identity"`` |
| ``decay`` | 0.995 | 0.975 |
| ``factor_every`` | 1 | 5 |
| ``inverse_every`` | 100 | 100 |
| ``inverse`` | ``"cholesky"`` (exact) | ``"auto"`` (rank-128 Nystrom above 512 inputs) |
| ``max_norm`` | None (no trust region) | 1.0 |
| ``damping`` | 1e-4 (times ``tr G``) | 1e-4 |

The reference trains with plain SGD on the preconditioned gradient (lr 0.1,
batch 50) and an L2 term ``1e-3 ||W||^2 / 2`` on the weights in the loss
(``tf.nn.l2_loss``: its gradient is ``1e-3 W``).

One difference of order: the library folds a step's batch into the factors and,
on a refresh step (0, 100, 200, ...), refreshes the inverses *before* that
step's update, which then uses them; the reference updates with the cached
inverse first (the identity at step 0), then folds in the batch and
refreshes. With the identity prior the factor at step 0 is
``0.995 I + 0.005 G^``, so the first step is within ~1% of plain SGD's.

```python
kwargs = sngd_jax.presets.paper(linear_layers=("Dense_0", "Dense_3"))
tx = optax.chain(sngd_jax.sngd(**kwargs), optax.sgd(0.1))
loss_and_acts = sngd_jax.capture(loss_fn, outputs=True)  # rfim reads the layer outputs
```
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any


def paper(linear_layers: Sequence[str] = (), *, rfim: bool = True) -> dict[str, Any]:
  """The keyword arguments of ``sngd_jax.sngd`` for the paper's configuration.

  Args:
    linear_layers: paths of the layers that get the ``"linear"`` local Fisher
      (the reference: the first and the last layer of an MLP); every other
      layer gets the per-unit ``"rfim"``, meant for layers followed by a ReLU
      (or softplus). Paths as ``sngd_jax.discover`` prints them.
    rfim: False gives ``"linear"`` everywhere (the reference's other variant;
      also the configuration compared with the float64 references in tests).

  Returns:
    A dict to pass as ``sngd_jax.sngd(**paper(...))`` or
    ``sngd_jax.sngd_momentum(lr, momentum=0.0, **paper(...))``. With ``rfim``
    the activations must hold the layers' outputs:
    ``sngd_jax.capture(loss_fn, outputs=True)``.
  """
  linear = frozenset(linear_layers)
  if rfim and not linear:
    warnings.warn(
        "sngd: presets.paper() without `linear_layers`: every layer gets the per-unit "
        "'rfim', the first and the last too; the reference gives those 'linear' (the output "
        "layer has no ReLU after it). Pass linear_layers=(first, last), or rfim=False",
        stacklevel=2)
  if rfim:
    fisher: Any = _PaperFisher(linear)
  else:
    fisher = "linear"
  return {
      "fisher": fisher,
      "prior": "identity",
      "decay": 0.995,
      "factor_every": 1,
      "inverse_every": 100,
      "inverse": "cholesky",
      "max_norm": None,
      "damping": 1e-4,
      "abs_damping": 0.0,
  }


class _PaperFisher:
  """``"linear"`` for the listed layer paths, ``"rfim"`` for the others (hashable, so
  that the configuration can live in the state's static part)."""

  def __init__(self, linear: frozenset[str]):
    self.linear = linear

  def __call__(self, path: str) -> str:
    return "linear" if path in self.linear else "rfim"

  def __eq__(self, other):
    return isinstance(other, _PaperFisher) and other.linear == self.linear

  def __hash__(self):
    return hash((_PaperFisher, self.linear))

  def __repr__(self):
    return f"paper_fisher(linear_layers={sorted(self.linear)})"
