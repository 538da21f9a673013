"""Inverse methods and matrix functions of damped local Fisher blocks (public).

``sngd(inverse=...)`` takes a key of ``METHODS`` or an
``InverseMethod`` made by a factory here, e.g.
``sngd_jax.inverse.auto(max_dim=1024)`` or ``sngd_jax.inverse.nystrom(rank=64)``.

* Protocol: ``InverseMethod`` (``identity``, ``refresh``, ``apply``,
  optional ``sketch``, ``info``, ``batch_safe`` and ``host``), ``MethodInfo``.
* Exact: ``cholesky`` (the default up to 512 layer inputs, ``d = 513``), ``eigh``.
* Iterative roots: ``denman_beavers_inverse``, ``newton_schulz_inverse``
  (``(G + rho I)^{-1} = Z Z`` from ``Z = (G + rho I)^{-1/2}``); the roots
  themselves: ``eigh_roots``, ``denman_beavers``, ``newton_schulz``,
  ``sqrt_and_inv_sqrt``, ``Roots``, ``ROOTS``.
* Large blocks: ``nystrom`` (rank-``r`` model, Woodbury apply),
  ``block_diagonal`` (block-Jacobi), ``auto`` (the size rule).
* Scale-out: ``shard_method`` (refresh split over devices).
* ``host_refresh``: opt-in, a method whose CPU refresh runs in NumPy/LAPACK in one host
  callback (faster compile; the step then runs synchronously); ``xla_only``: one
  whose CPU refresh stays in XLA even then.
* Damping: ``damping_shift``, ``damp``.
"""

from sngd_jax._src.inverse.base import InverseMethod as InverseMethod
from sngd_jax._src.inverse.base import MethodInfo as MethodInfo
from sngd_jax._src.inverse.base import damp as damp
from sngd_jax._src.inverse.base import damping_shift as damping_shift
from sngd_jax._src.inverse.blocks import block_diagonal as block_diagonal
from sngd_jax._src.inverse.dense import cholesky as cholesky
from sngd_jax._src.inverse.dense import eigh as eigh
from sngd_jax._src.inverse.host import host_refresh as host_refresh
from sngd_jax._src.inverse.host import xla_only as xla_only
from sngd_jax._src.inverse.nystrom import NystromRep as NystromRep
from sngd_jax._src.inverse.nystrom import nystrom as nystrom
from sngd_jax._src.inverse.registry import METHODS as METHODS
from sngd_jax._src.inverse.registry import auto as auto
from sngd_jax._src.inverse.roots import ROOTS as ROOTS
from sngd_jax._src.inverse.roots import Roots as Roots
from sngd_jax._src.inverse.roots import denman_beavers as denman_beavers
from sngd_jax._src.inverse.roots import denman_beavers_inverse as denman_beavers_inverse
from sngd_jax._src.inverse.roots import eigh_roots as eigh_roots
from sngd_jax._src.inverse.roots import newton_schulz as newton_schulz
from sngd_jax._src.inverse.roots import newton_schulz_inverse as newton_schulz_inverse
from sngd_jax._src.inverse.roots import sqrt_and_inv_sqrt as sqrt_and_inv_sqrt
from sngd_jax._src.inverse.sharded import shard_method as shard_method

__all__ = [
    "METHODS",
    "ROOTS",
    "InverseMethod",
    "MethodInfo",
    "NystromRep",
    "Roots",
    "auto",
    "block_diagonal",
    "cholesky",
    "damp",
    "damping_shift",
    "denman_beavers",
    "denman_beavers_inverse",
    "eigh",
    "eigh_roots",
    "host_refresh",
    "newton_schulz",
    "newton_schulz_inverse",
    "nystrom",
    "shard_method",
    "xla_only",
    "sqrt_and_inv_sqrt",
]
