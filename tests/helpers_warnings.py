"""Warning checks shared by the tests."""

import contextlib
import warnings


@contextlib.contextmanager
def no_sngd_warnings():
  """Turns every warning of the library (its messages start with ``"sngd:"``) into an error
  inside the block; other libraries' warnings pass as usual."""
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="sngd:")
    yield
