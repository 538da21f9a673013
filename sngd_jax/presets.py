"""Ready-made configurations of :func:`sngd_jax.sngd` (see :func:`paper`)."""

from sngd_jax._src.presets import paper as paper

__all__ = ["paper"]
