"""The benchmark tasks of the full suite (real data, installed offline).

Every task reads local files only: Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (any MNIST-format directory works), the English text
of the Debian package ``fortunes`` for the character-level LSTM, and
scikit-learn's digits as the fallback when Fashion-MNIST is absent.
"""

from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import numpy as np

from benchmarks import datasets, models
from benchmarks.harness import Task

FORTUNES_DIR = "/usr/share/games/fortunes"
LICENSES_DIR = "/usr/share/common-licenses"

# The paper's MLP shapes (hidden widths), plus 256-256.
MLP_SHAPES = {
    "mlp-80-80-80": (80, 80, 80),
    "mlp-80-60-40-40-40-20": (80, 60, 40, 40, 40, 20),
    "mlp-20-20-20": (20, 20, 20),
    "mlp-80x6": (80,) * 6,
    "mlp-256-256": (256, 256),
}


def _mlp(name: str, hidden, ds: datasets.Dataset, batch: int) -> Task:
  wide = hidden[0] >= 256
  return Task(
      name=name, model=models.MLP(tuple(hidden) + (ds.num_classes,)), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      batch_size=batch, loss_target=0.15 if wide else 0.3, acc_target=0.88 if wide else 0.85,
      description=f"MLP {ds.x_train.shape[1]}-{'-'.join(map(str, hidden))}-{ds.num_classes} "
                  f"on {ds.name}, batch {batch}")


def autoencoder(ds: datasets.Dataset, batch: int) -> Task:
  return Task(
      name="autoencoder", model=models.Autoencoder(), loss="sigmoid_xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      batch_size=batch, loss_target=260.0, acc_target=None,
      description=f"autoencoder {ds.x_train.shape[1]}-1000-500-250-30 (sigmoid cross-entropy "
                  f"summed over pixels) on {ds.name}, batch {batch}")


def cnn(ds: datasets.Dataset, batch: int) -> Task:
  return Task(
      name="cnn", model=models.CNN(ds.image_shape, ds.num_classes), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      batch_size=batch, loss_target=0.3, acc_target=0.88, layers=("conv", "dense"),
      description=f"CNN conv32-pool-conv64-pool-128-10 on {ds.name}, batch {batch}")


def resnet(ds: datasets.Dataset, batch: int) -> Task:
  return Task(
      name="resnet", model=models.ResNet(ds.image_shape, ds.num_classes), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      batch_size=batch, loss_target=0.4, acc_target=0.85, layers=("conv", "dense"),
      description=f"ResNet-style (stem + 2 residual blocks, 32 ch, no norm) on {ds.name}, "
                  f"batch {batch}")


def fortunes_text(directory: str = FORTUNES_DIR) -> str:
  """The English text of the fortune databases (Debian package ``fortunes``)."""
  files = sorted(f for f in glob.glob(os.path.join(directory, "*"))
                 if os.path.isfile(f) and not f.endswith((".dat", ".u8")))
  if not files:
    raise FileNotFoundError(f"no fortune files in {directory} (apt-get install fortunes)")
  return _read_all(files)


def _read_all(files: list[str]) -> str:
  """The files' contents, concatenated in the order given (Latin-1: every byte reads)."""
  parts = []
  for f in files:
    with open(f, encoding="latin-1") as fh:
      parts.append(fh.read())
  return "".join(parts)


def licenses_text(directory: str = LICENSES_DIR) -> str:
  """The licence texts every Debian system ships (package ``base-files``), in name order."""
  files = sorted(f for f in glob.glob(os.path.join(directory, "*"))
                 if os.path.isfile(f) and not os.path.islink(f))
  if not files:
    raise FileNotFoundError(f"no licence texts in {directory}")
  return _read_all(files)


def char_windows(text: str, length: int, test_fraction: float = 0.1):
  """Non-overlapping windows of ``length + 1`` byte tokens: inputs and next-char targets.

  Characters outside printable ASCII and newline map to one "other" token.
  The last ``test_fraction`` of the text is held out.
  """
  codes = np.frombuffer(text.encode("latin-1"), np.uint8).astype(np.int32)
  vocab = [10] + list(range(32, 127))
  table = np.full(256, len(vocab), np.int32)
  table[vocab] = np.arange(len(vocab))
  tokens = table[codes]
  split = int(len(tokens) * (1 - test_fraction))

  def windows(t):
    n = (len(t) - 1) // length
    x = t[:n * length].reshape(n, length)
    y = t[1:n * length + 1].reshape(n, length)
    return x, y

  (xtr, ytr), (xte, yte) = windows(tokens[:split]), windows(tokens[split:])
  return xtr, ytr, xte[:2000], yte[:2000], len(vocab) + 1


def char_lstm(batch: int, length: int = 64) -> Task:
  xtr, ytr, xte, yte, vocab = char_windows(fortunes_text(), length)
  return Task(
      name="char-lstm", model=models.CharLSTM(vocab), loss="lm", x_train=xtr, y_train=ytr,
      x_test=xte, y_test=yte, batch_size=batch, loss_target=1.6, acc_target=2.5,
      layers=("embed", "lstm", "dense"),
      description=f"char-LSTM (embed 32, LSTM 128) on the Debian fortunes corpus "
                  f"({len(xtr) * length / 1e6:.1f}M train chars), {length}-char windows, "
                  f"batch {batch}; test metric bits/char, target <= 2.5")


TASKS: dict[str, Callable[[datasets.Dataset, int], Task]] = {
    **{name: (lambda ds, b, name=name, h=h: _mlp(name, h, ds, b))
       for name, h in MLP_SHAPES.items()},
    "autoencoder": autoencoder,
    "cnn": cnn,
    "resnet": resnet,
    "char-lstm": lambda ds, b: char_lstm(b),
}


def build(name: str, ds: datasets.Dataset, batch: int = 128) -> tuple[Optional[Task], str]:
  """The task, or None and the reason it cannot run here."""
  try:
    return TASKS[name](ds, batch), ""
  except FileNotFoundError as e:
    return None, str(e)
