"""CPU only: keep the LAPACK library's threads from competing with XLA's.

On CPU, jaxlib runs its LAPACK kernels (Cholesky, ``eigh``, triangular solves:
every inverse refresh) through SciPy's LAPACK, i.e. SciPy's bundled OpenBLAS,
which it loads at the first such call. OpenBLAS keeps a pool of worker threads
that busy-wait for a while after each call; on a machine with few cores they
take the cores from XLA's own thread pool, which runs everything else in the
step: the refresh step and the steps after it take longer. The effect is
measured in ``benchmarks/results/profile_step.json`` (with the cap) and
``benchmarks/results/profile_step_no_lapack_cap.json`` (without it); see
``docs/performance.md``.

``limit_lapack_threads`` caps only that library (the OpenBLAS under
``scipy.libs``; NumPy's own BLAS, used by NumPy code, is left alone). It does
nothing useful on GPU/TPU, where the solvers are the accelerator's.
"""

from __future__ import annotations

import os

_SCIPY_MARKERS = ("scipy.libs", "scipy/.libs", "scipy_openblas-")


def limit_lapack_threads(num_threads: int = 1) -> list[dict]:
  """Caps the threads of the BLAS/LAPACK library that jaxlib's CPU kernels use.

  Loads SciPy's LAPACK (as jaxlib would at its first LAPACK call) and limits
  its BLAS thread pool with ``threadpoolctl``; if ``threadpoolctl`` is not
  installed and SciPy is not loaded yet, sets ``OPENBLAS_NUM_THREADS`` for the
  library it is about to load instead. Call it once at start-up, e.g. before
  training on CPU. The limit lasts for the process.

  Args:
    num_threads: the thread count for that library (1 is best when XLA has
      all cores, which it takes by default).

  Returns:
    ``threadpoolctl``'s info of the libraries that were limited (empty when the
    environment variable was used).

  Raises:
    ValueError: ``num_threads < 1``.
  """
  if num_threads < 1:
    raise ValueError(f"sngd: `num_threads` must be at least 1, got {num_threads}")
  try:
    import threadpoolctl
  except ImportError:
    import sys
    if "scipy" in sys.modules:
      raise ImportError("sngd: limit_lapack_threads needs `threadpoolctl` once SciPy is "
                        "loaded (pip install threadpoolctl)") from None
    os.environ["OPENBLAS_NUM_THREADS"] = str(num_threads)
    return []
  import scipy.linalg.cython_lapack  # noqa: F401  (jaxlib's LAPACK: loads its OpenBLAS)

  controller = threadpoolctl.ThreadpoolController()
  limited = []
  for pool in controller.lib_controllers:
    if pool.user_api == "blas" and any(m in pool.filepath for m in _SCIPY_MARKERS):
      pool.set_num_threads(num_threads)
      limited.append(pool.info())
  return limited
