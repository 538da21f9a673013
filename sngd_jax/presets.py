"""Ready-made configurations of ``sngd_jax.sngd`` (see ``paper``)."""

from sngd_jax._src.presets import paper as paper

__all__ = ["paper"]
