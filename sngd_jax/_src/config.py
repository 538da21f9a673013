"""The configuration of ``sngd_jax.sngd``: every default, and its validation.

``SNGDConfig`` is the one home of the transform's defaults: ``sngd`` and
``sngd_momentum`` take their keyword defaults from ``DEFAULTS``, and the
state records the static part of the configuration it was made with
(``SNGDState.config``), so that ``sngd_jax.cost_estimate``,
``sngd_jax.coverage`` and ``sngd_jax.factor_roots`` read it instead of
asking again.

The options, by concern (the hyperparameter table of the docs follows this order):

* **What is preconditioned, and how**: ``fisher`` (kind per layer), ``stacked``
  (stack axes the params do not show), ``inverse`` (how damped blocks are inverted).
* **Statistics**: ``decay``, ``factor_every``, ``prior``, ``stats_batch_size``,
  ``max_factor_ratio``.
* **Inverse refreshes**: ``inverse_every``, ``inverse_warmup``, ``damping``, ``abs_damping``.
* **Step control**: ``max_norm`` (trust region).
* **Scale-out**: ``axis_name``, ``shard_refresh``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import flax.core
import jax
import jax.core
import numpy as np
import optax

from sngd_jax._src import layers as layers_lib
from sngd_jax._src import statistics
from sngd_jax._src.frames import caller_stacklevel as caller_stacklevel

AxisName = Union[str, tuple[str, ...]]


def _check_number(name: str, value: Any, low: float, high: float = math.inf,
                  low_open: bool = False) -> None:
  """Validates a hyperparameter given as a Python number (arrays pass: traced or injected)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    bad = value <= low if low_open else value < low
    if bad or value > high or math.isnan(value):
      raise ValueError(f"sngd: `{name}` must be in {'(' if low_open else '['}{low}, {high}], "
                       f"got {value}")


def _check_fisher_arg(fisher: layers_lib.FisherSpec) -> None:
  """Rejects an unknown ``fisher`` kind at construction time, when it can be known."""
  if isinstance(fisher, str):
    layers_lib.resolve_fisher(fisher, "<every layer>")
  elif isinstance(fisher, Mapping):
    for path in fisher:
      layers_lib.resolve_fisher(fisher, path)


UNCALLED = ("error", "skip")
"""What ``update`` does for a layer of the params with no captured call in a step."""


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class SNGDConfig:
  """The options of ``sngd_jax.sngd`` (see its docstring for each).

  Construction validates every option that is a Python value (arrays, e.g.
  hyperparameters injected by ``optax.inject_hyperparams``, are taken as given)
  and raises a ``ValueError`` naming it.
  """

  fisher: layers_lib.FisherSpec = "linear"
  stacked: layers_lib.StackSpec = None
  damping: optax.ScalarOrSchedule = 1e-4
  abs_damping: optax.ScalarOrSchedule = 0.0
  decay: float = 0.975
  factor_every: int = 5
  inverse_every: int = 100
  inverse_warmup: bool = False
  prior: str = "scaled_identity"
  inverse: Any = "auto"  # a key of sngd_jax.inverse.METHODS or an InverseMethod
  axis_name: Optional[AxisName] = None
  shard_refresh: Union[bool, jax.sharding.Mesh] = False
  max_factor_ratio: Optional[float] = None
  stats_batch_size: Optional[int] = None
  max_norm: Optional[optax.ScalarOrSchedule] = 1.0
  uncalled: str = "error"

  def __post_init__(self):
    # Hashable forms, so that the static part can live in the state's tree structure.
    if isinstance(self.fisher, Mapping) and not isinstance(self.fisher, flax.core.FrozenDict):
      object.__setattr__(self, "fisher", flax.core.FrozenDict(self.fisher))
    if self.stacked is not None:
      if not isinstance(self.stacked, Mapping) or not all(
          isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in self.stacked.items()):
        raise ValueError("sngd: `stacked` must map layer path prefixes to a number of leading "
                         f"stack axes (an int >= 0), got {self.stacked!r}")
      object.__setattr__(self, "stacked", flax.core.FrozenDict(self.stacked))
    if self.axis_name is not None and not isinstance(self.axis_name, str):
      object.__setattr__(self, "axis_name", tuple(self.axis_name))
    _check_number("damping", self.damping, 0.0)
    _check_number("abs_damping", self.abs_damping, 0.0)
    _check_number("decay", self.decay, 0.0, 1.0)
    _check_number("factor_every", self.factor_every, 0, low_open=True)
    _check_number("inverse_every", self.inverse_every, 0, low_open=True)
    if self.max_factor_ratio is not None:
      _check_number("max_factor_ratio", self.max_factor_ratio, 1.0)
    if self.uncalled not in UNCALLED:
      raise ValueError(f"sngd: `uncalled` must be one of {UNCALLED}, got {self.uncalled!r}")
    if self.prior not in statistics.PRIORS:
      raise ValueError(f"sngd: unknown prior {self.prior!r}; expected one of "
                       f"{statistics.PRIORS}")
    if _is_number(self.damping) and _is_number(self.abs_damping) \
        and self.damping == 0 and self.abs_damping == 0:
      raise ValueError("sngd: `damping` and `abs_damping` are both 0; the local Fisher of a "
                       "batch is singular in general, so at least one must be positive")
    if isinstance(self.stats_batch_size, numbers.Integral):  # e.g. a NumPy integer
      object.__setattr__(self, "stats_batch_size", int(self.stats_batch_size))
    elif self.stats_batch_size is not None:
      raise TypeError(
          "sngd: `stats_batch_size` must be a Python int (it sets the shape of the sub-batch), "
          f"got {type(self.stats_batch_size).__name__}; with `optax.inject_hyperparams`, list "
          "it in `static_args=(\"stats_batch_size\",)`")
    _check_number("stats_batch_size", self.stats_batch_size, 0, low_open=True)
    if self.max_norm is not None:
      _check_number("max_norm", self.max_norm, 0.0, low_open=True)
    _check_fisher_arg(self.fisher)
    if self.max_norm is None and isinstance(self.fisher, Mapping) and any(
        kind == layers_lib.TIED for kind in self.fisher.values()):
      warnings.warn(
          "sngd: fisher='tied' with max_norm=None: the lookup's 1 / frequency also scales the "
          "output layer's gradient on rows of rare tokens, and without the trust region the "
          "table diverged on the measured model (benchmarks/README.md, *Tied embeddings*); "
          "keep max_norm", stacklevel=caller_stacklevel())

  def static(self) -> SNGDConfig:
    """This configuration with array-valued options (injected hyperparameters) set to None.

    What the state records: everything in it is hashable and known at trace time.
    NumPy scalars (e.g. ``np.float64``) are recorded as the Python numbers they hold.
    """
    arrays = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, np.generic):
        arrays[f.name] = value.item()
      elif isinstance(value, (jax.Array, jax.core.Tracer)) or hasattr(value, "__array__"):
        arrays[f.name] = None
    if not arrays:
      return self
    with warnings.catch_warnings():
      # This configuration was checked when it was made; its injected options read None
      # here (a `max_norm` injected with `fisher='tied'` is not `max_norm=None`).
      warnings.simplefilter("ignore")
      return dataclasses.replace(self, **arrays)


DEFAULTS = SNGDConfig()
"""The default configuration: the one place where each default is defined."""


def value_at(x: optax.ScalarOrSchedule, count: Any) -> Any:
  """A hyperparameter's value at step ``count`` (schedules are called)."""
  return x(count) if callable(x) else x

