"""Inverse methods (private: the public names are in ``sngd_jax.inverse``)."""
