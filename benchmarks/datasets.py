"""Small real data sets for examples and benchmarks, read from local files only.

* :func:`load_idx` reads one IDX file (the MNIST format; gzip or raw).
* :func:`load_mnist_dir` reads a directory in the MNIST layout (Fashion-MNIST,
  MNIST, KMNIST: ``train-images-idx3-ubyte[.gz]`` and friends).
* :func:`load_digits` is scikit-learn's 8x8 digits, shipped inside the package.
* :func:`default_dataset` picks Fashion-MNIST when it is installed (Debian
  package ``dataset-fashion-mnist``, files under
  ``/usr/share/datasets/fashion-mnist``), else digits.

Nothing here downloads anything. Images are returned as float32 in ``[0, 1]``
flattened to ``(n, features)``, labels as int32.

IDX format (big-endian): two zero bytes, a type code (``0x08`` uint8, ``0x09``
int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the
number of dimensions ``k``, then ``k`` uint32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
from typing import NamedTuple, Optional

import numpy as np

DEFAULT_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type code -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class Dataset(NamedTuple):
  """A supervised data set split into train and test.

  Attributes:
    name: a short name, e.g. ``'fashion-mnist'``.
    x_train: float32 features in ``[0, 1]``, shape ``(n_train, features)``.
    y_train: int32 labels, shape ``(n_train,)``.
    x_test: float32 features, shape ``(n_test, features)``.
    y_test: int32 labels, shape ``(n_test,)``.
    image_shape: ``(height, width, channels)`` of one example (for CNNs).
    num_classes: number of classes.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  image_shape: tuple[int, int, int]
  num_classes: int


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":  # gzip magic, whatever the file name says
      with gzip.GzipFile(fileobj=f) as g:
        return g.read()
    return f.read()


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Parses the bytes of an IDX file.

  Args:
    data: the (uncompressed) file contents.
    name: used in error messages.

  Returns:
    The array, in native byte order, with the shape stored in the header.

  Raises:
    ValueError: naming the file, for a bad magic number, an unknown type code,
      or a size that does not match the header.
  """
  if len(data) < 4:
    raise ValueError(f"IDX file {name}: {len(data)} bytes, too short for the 4-byte header")
  if data[0] != 0 or data[1] != 0:
    raise ValueError(f"IDX file {name}: magic number must start with two zero bytes, got "
                     f"{data[:4].hex()} (is it an IDX file?)")
  code, ndim = data[2], data[3]
  if code not in IDX_DTYPES:
    raise ValueError(f"IDX file {name}: unknown type code 0x{code:02x}; expected one of "
                     f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"IDX file {name}: header declares {ndim} dimensions but the file has "
                     f"only {len(data)} bytes")
  shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f"IDX file {name}: shape {shape} of {dtype.name} needs {expected} data "
                     f"bytes, the file has {len(data) - header}")
  arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return arr.astype(dtype.newbyteorder("="))


def load_idx(path: str) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or raw (detected from its content).

  Args:
    path: the file.

  Returns:
    The array with the stored shape and dtype (native byte order).
  """
  return parse_idx(_read_bytes(path), name=path)


def _find(directory: str, stem: str) -> str:
  for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def load_mnist_dir(directory: str = DEFAULT_MNIST_DIR, name: Optional[str] = None) -> Dataset:
  """Reads a directory in the MNIST layout (MNIST, Fashion-MNIST, KMNIST).

  Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally
  ending in ``.gz``.

  Args:
    directory: the directory.
    name: the data set name (default: the directory's base name).

  Returns:
    A :class:`Dataset`; images scaled to ``[0, 1]`` and flattened.

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: if a file is malformed or images and labels disagree.
  """
  arrays = {}
  for split, (images, labels) in _SPLITS.items():
    x = load_idx(_find(directory, images))
    y = load_idx(_find(directory, labels))
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
      raise ValueError(f"{directory}: {split} images {x.shape} and labels {y.shape} do not "
                       "form (n, h, w) images with n labels")
    arrays[split] = (x, y)
  h, w = arrays["train"][0].shape[1:]
  scale = 255.0 if arrays["train"][0].dtype == np.uint8 else 1.0

  def features(x):
    return (x.reshape(x.shape[0], -1).astype(np.float32) / scale).astype(np.float32)

  y_all = np.concatenate([arrays["train"][1], arrays["test"][1]])
  return Dataset(
      name=name or os.path.basename(os.path.normpath(directory)),
      x_train=features(arrays["train"][0]), y_train=arrays["train"][1].astype(np.int32),
      x_test=features(arrays["test"][0]), y_test=arrays["test"][1].astype(np.int32),
      image_shape=(int(h), int(w), 1), num_classes=int(y_all.max()) + 1)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with sklearn).

  Args:
    test_fraction: the share of examples held out for testing.
    seed: the seed of the split.

  Returns:
    A :class:`Dataset` with 64 features in ``[0, 1]``.
  """
  from sklearn.datasets import load_digits as sk_load_digits

  bunch = sk_load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, train = perm[:n_test], perm[n_test:]
  return Dataset("digits", x[train], y[train], x[test], y[test], (8, 8, 1), 10)


def load_mnist1d(num_samples: int = 5000, seed: int = 0) -> Dataset:
  """MNIST-1D (Greydanus, 2020), generated procedurally by the ``mnist1d`` package.

  The package generates the data from its templates with no download
  (``make_dataset``); it must be installed (``pip install mnist1d``).

  Args:
    num_samples: total examples (80% train, 20% test).
    seed: the generator seed.

  Returns:
    A :class:`Dataset` with 40 features (standardized by the generator).

  Raises:
    ImportError: if ``mnist1d`` is not installed.
  """
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  data = make_dataset(args)
  return Dataset("mnist1d", np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int32),
                 np.asarray(data["x_test"], np.float32), np.asarray(data["y_test"], np.int32),
                 (1, int(np.asarray(data["x"]).shape[1]), 1), 10)


def default_dataset(directory: str = DEFAULT_MNIST_DIR) -> Dataset:
  """Fashion-MNIST when ``directory`` holds it, else scikit-learn digits.

  Args:
    directory: where to look for MNIST-format IDX files.

  Returns:
    A :class:`Dataset`.
  """
  try:
    return load_mnist_dir(directory, name="fashion-mnist"
                          if "fashion" in directory else None)
  except FileNotFoundError:
    return load_digits()
