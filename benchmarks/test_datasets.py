"""Tests of the IDX reader and the data set loaders, on files written byte by byte here."""

import gzip
import importlib.util
import os
import struct

import numpy as np
import pytest

from benchmarks import datasets


def idx_bytes(array: np.ndarray, code: int) -> bytes:
  """An IDX file written from the spec: 0, 0, type code, ndim, big-endian sizes, data."""
  header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
  dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
  return header + array.astype(dtype).tobytes()


def write(path, data: bytes, gz: bool) -> str:
  path = str(path) + (".gz" if gz else "")
  if gz:
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("code,values", [
    (0x08, np.arange(24).reshape(2, 3, 4) * 10),
    (0x09, np.arange(-12, 12).reshape(4, 6)),
    (0x0B, np.array([-30000, 1, 30000])),
    (0x0C, np.array([[-2**31, 7], [2**31 - 1, 0]])),
    (0x0D, np.array([1.5, -2.25, 3e10])),
    (0x0E, np.array([[np.pi, -1e-300]])),
])
def test_load_idx_roundtrip(tmp_path, gz, code, values):
  path = write(tmp_path / "a-idx", idx_bytes(values, code), gz)
  out = datasets.load_idx(path)
  assert out.shape == values.shape
  assert out.dtype == datasets.IDX_DTYPES[code].newbyteorder("=")
  np.testing.assert_array_equal(out, values.astype(out.dtype))


def test_load_idx_big_endian_sizes(tmp_path):
  # 300 = 0x0000012C: a little-endian reader would see 0x2C010000.
  values = (np.arange(300) % 256).reshape(300, 1)
  data = idx_bytes(values, 0x08)
  assert data[4:8] == b"\x00\x00\x01\x2c"
  np.testing.assert_array_equal(datasets.load_idx(write(tmp_path / "b", data, False)), values)


@pytest.mark.parametrize("data,match", [
    (b"\x00\x00", "too short"),
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "two zero bytes"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown type code 0x07"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x01", "declares 3 dimensions"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", "needs 3 data bytes, the file has 2"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06", "needs 1 data bytes, the file has 2"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_rejects_malformed(tmp_path, data, match, gz):
  path = write(tmp_path / "bad", data, gz)
  with pytest.raises(ValueError, match=match) as err:
    datasets.load_idx(path)
  assert path in str(err.value)


def make_mnist_dir(root, n_train=5, n_test=3, gz=True):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, (img, lab), n in [("train", datasets._SPLITS["train"], n_train),
                               ("test", datasets._SPLITS["test"], n_test)]:
    x = rng.integers(0, 256, size=(n, 4, 3))
    y = rng.integers(0, 7, size=(n,))
    y[0] = 6
    write(os.path.join(root, img), idx_bytes(x, 0x08), gz)
    write(os.path.join(root, lab), idx_bytes(y, 0x08), gz)
    arrays[split] = (x, y)
  return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_dir(tmp_path, gz):
  arrays = make_mnist_dir(str(tmp_path), gz=gz)
  ds = datasets.load_mnist_dir(str(tmp_path), name="tiny")
  assert ds.name == "tiny" and ds.image_shape == (4, 3, 1) and ds.num_classes == 7
  for x, y, (rx, ry) in [(ds.x_train, ds.y_train, arrays["train"]),
                         (ds.x_test, ds.y_test, arrays["test"])]:
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x, rx.reshape(len(rx), -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, ry)


def test_load_mnist_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
    datasets.load_mnist_dir(str(tmp_path))
  make_mnist_dir(str(tmp_path), gz=False)
  # Labels that disagree with the images in count.
  write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(2), 0x08), False)
  with pytest.raises(ValueError, match="test images"):
    datasets.load_mnist_dir(str(tmp_path))


def test_default_dataset_falls_back_to_digits(tmp_path):
  ds = datasets.default_dataset(str(tmp_path / "absent"))
  assert ds.name == "digits"
  assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert set(np.unique(ds.y_train)) == set(range(10))
  # The split is a partition of sklearn's 1,797 images.
  assert len(ds.y_train) + len(ds.y_test) == 1797


@pytest.mark.skipif(not os.path.exists(datasets.DEFAULT_MNIST_DIR),
                    reason="dataset-fashion-mnist not installed")
def test_default_dataset_fashion_mnist():
  ds = datasets.default_dataset()
  assert ds.name == "fashion-mnist"
  assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
  assert ds.num_classes == 10 and np.bincount(ds.y_test).tolist() == [1000] * 10


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d not installed")
def test_mnist1d_generates_offline():
  ds = datasets.load_mnist1d(num_samples=200, seed=1)
  assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
  assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == set(range(10))
