"""sngd_jax: structured natural gradient descent (SNGD) for JAX, Optax and Flax.

Every name the documentation tells users to call is exported here; inverse
methods and matrix functions are in the public namespace ``sngd_jax.inverse``.
"""

from sngd_jax import inverse as inverse
from sngd_jax import presets as presets
from sngd_jax._src.accumulation import MultiSteps as MultiSteps
from sngd_jax._src.accumulation import MultiStepsState as MultiStepsState
from sngd_jax._src.alias import sngd_adam as sngd_adam
from sngd_jax._src.alias import sngd_momentum as sngd_momentum
from sngd_jax._src.capture.custom import dense as dense
from sngd_jax._src.capture.equinox import capture_eqx as capture_eqx
from sngd_jax._src.capture.haiku import capture_hk as capture_hk
from sngd_jax._src.capture.linen import capture as capture
from sngd_jax._src.capture.nnx_capture import capture_nnx as capture_nnx
from sngd_jax._src.capture.records import Activations as Activations
from sngd_jax._src.capture.records import Captured as Captured
from sngd_jax._src.capture.row_mask import with_row_mask as with_row_mask
from sngd_jax._src.config import DEFAULTS as DEFAULTS
from sngd_jax._src.config import SNGDConfig as SNGDConfig
from sngd_jax._src.cost import LayerCost as LayerCost
from sngd_jax._src.cost import cost_estimate as cost_estimate
from sngd_jax._src.cost import format_costs as format_costs
from sngd_jax._src.coverage import CoverageReport as CoverageReport
from sngd_jax._src.coverage import ParamCoverage as ParamCoverage
from sngd_jax._src.coverage import coverage as coverage
from sngd_jax._src.cpu import limit_lapack_threads as limit_lapack_threads
from sngd_jax._src.diagnostics import trust_region_scale as trust_region_scale
from sngd_jax._src.layer_spec import dense_layer as dense_layer
from sngd_jax._src.layers import FISHER_KINDS as FISHER_KINDS
from sngd_jax._src.layers import LayerSpec as LayerSpec
from sngd_jax._src.layers import discover as discover
from sngd_jax._src.reconstruct import damped_factors as damped_factors
from sngd_jax._src.reconstruct import factor_roots as factor_roots
from sngd_jax._src.reconstruct import fisher_layer as fisher_layer
from sngd_jax._src.reconstruct import from_reconstructed as from_reconstructed
from sngd_jax._src.reconstruct import reconstructed_dense as reconstructed_dense
from sngd_jax._src.reconstruct import to_reconstructed as to_reconstructed
from sngd_jax._src.sketch import Sketch as Sketch
from sngd_jax._src.state import SNGDState as SNGDState
from sngd_jax._src.statistics import PRIORS as PRIORS
from sngd_jax._src.train_state import TrainState as TrainState
from sngd_jax._src.train_state import with_activations as with_activations
from sngd_jax._src.transform import sngd as sngd

__version__ = "0.2.0"

__all__ = [
    "Activations",
    "Captured",
    "CoverageReport",
    "DEFAULTS",
    "FISHER_KINDS",
    "LayerCost",
    "LayerSpec",
    "MultiSteps",
    "MultiStepsState",
    "PRIORS",
    "ParamCoverage",
    "SNGDConfig",
    "SNGDState",
    "Sketch",
    "TrainState",
    "capture",
    "capture_eqx",
    "capture_hk",
    "capture_nnx",
    "cost_estimate",
    "coverage",
    "damped_factors",
    "dense",
    "dense_layer",
    "discover",
    "factor_roots",
    "fisher_layer",
    "format_costs",
    "from_reconstructed",
    "inverse",
    "limit_lapack_threads",
    "presets",
    "reconstructed_dense",
    "sngd",
    "sngd_adam",
    "sngd_momentum",
    "to_reconstructed",
    "trust_region_scale",
    "with_activations",
    "with_row_mask",
]
