"""Activation capture: what each layer saw, keyed by the layer's path.

* ``records``: the ``Captured`` record and the recorder (frames for scanned cells).
* ``tables``: which layer classes are recorded (linen and NNX), and how.
* ``swap``: the per-thread swap of a class's method or a module's function while capturing.
* ``flax_patches``: the Flax internals patched while capturing, each a small function.
* ``linen`` (``capture``; it imports ``nnx`` to record an ``nnx.bridge.ToLinen``'s layers),
  ``nnx`` (the recording of NNX layer calls) and ``nnx_capture`` (``capture_nnx``).
"""
