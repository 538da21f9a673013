"""The implementation of sngd_jax (private: import from ``sngd_jax``)."""
