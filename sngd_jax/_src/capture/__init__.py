"""Activation capture: what each layer saw, keyed by the layer's path.

* :mod:`.records`: the :class:`Captured` record and the recorder (frames for scanned cells).
* :mod:`.tables`: which layer classes are recorded (linen and NNX), and how.
* :mod:`.flax_patches`: the Flax internals patched while capturing, each a small function.
* :mod:`.linen` (:func:`capture`) and :mod:`.nnx` (:func:`capture_nnx`).
"""
