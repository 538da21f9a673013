"""sngd_jax: structured natural gradient descent (SNGD) for JAX, Optax and Flax."""

from sngd_jax.alias import sngd_momentum
from sngd_jax.capture import Activations, Captured, capture
from sngd_jax.cost import LayerCost, cost_estimate, format_costs
from sngd_jax.coverage import CoverageReport, ParamCoverage, coverage
from sngd_jax.cpu import limit_lapack_threads
from sngd_jax.factors import PRIORS
from sngd_jax.flax_nnx import capture_nnx
from sngd_jax.layers import FISHER_KINDS, LayerSpec, discover
from sngd_jax.matfun import InverseMethod
from sngd_jax.methods import METHODS as INVERSE_METHODS
from sngd_jax.reconstruct import (
    factor_roots,
    fisher_layer,
    from_reconstructed,
    reconstructed_dense,
    to_reconstructed,
)
from sngd_jax.sketch import Sketch
from sngd_jax.transform import SNGDState, sngd

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "Captured",
    "CoverageReport",
    "FISHER_KINDS",
    "INVERSE_METHODS",
    "LayerCost",
    "InverseMethod",
    "LayerSpec",
    "PRIORS",
    "ParamCoverage",
    "SNGDState",
    "Sketch",
    "capture",
    "capture_nnx",
    "coverage",
    "cost_estimate",
    "discover",
    "format_costs",
    "factor_roots",
    "fisher_layer",
    "from_reconstructed",
    "limit_lapack_threads",
    "reconstructed_dense",
    "sngd",
    "sngd_momentum",
    "to_reconstructed",
]
