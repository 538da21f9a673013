"""Activation capture: what each layer saw, keyed by the layer's path.

* ``records``: the ``Captured`` record and the recorder (frames for scanned cells).
* ``tables``: which layer classes are recorded (linen and NNX), and how.
* ``flax_patches``: the Flax internals patched while capturing, each a small function.
* ``linen`` (``capture``) and ``nnx`` (``capture_nnx``).
"""
