"""The tuning set and the evaluation set of the protocol (benchmarks/README.md, *Protocol*).

* **Tuning set** (defaults may be chosen here): the paper's MLP shapes and
  784-256-256-10 on Fashion-MNIST, inputs standardized per pixel (and ``/255``
  for continuity with the old tables).
* **Evaluation set** (no default was chosen on it): a CNN and a ResNet-style
  network with BatchNorm on Fashion-MNIST (test accuracy), a character LSTM and
  a small causal transformer on the Debian ``fortunes`` corpus (test bits per
  character), and the deep autoencoder of Hinton and Salakhutdinov on
  Fashion-MNIST (test loss).

Each task's target is on the *test* metric, measured on a fixed subset of the
test set (``eval_n`` examples) every ``eval_every`` steps; the final metric is on
the whole test set. Targets were fixed before any timed evaluation run
(README, *Protocol*) and are not changed after seeing the results.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks import datasets, models, tasks


@dataclasses.dataclass
class EvalTask:
  """A training problem of the protocol.

  Attributes:
    name: short name.
    model: a Flax linen module; called as ``model.apply(vars, x, train=...)``
      when ``train_arg`` is set.
    loss: ``'xent'``, ``'sigmoid_xent'`` (autoencoder) or ``'lm'``.
    x_train, y_train, x_test, y_test: numpy arrays (the autoencoder's ``y`` are its
      reconstruction targets, the pixels in ``[0, 1]``, while ``x`` may be standardized).
    metric: ``'accuracy'`` (higher is better), ``'loss'`` or ``'bpc'`` (lower).
    target: the test-metric target.
    batch_size: minibatch size.
    budget_s: seconds of step time per run (compile and evaluation excluded).
    eval_every: steps between evaluations on the test subset.
    eval_n: size of the fixed test subset used for the target.
    batch_stats: whether the model has BatchNorm statistics.
    train_arg: whether ``__call__`` takes ``train``.
    description: one line for the tables.
  """

  name: str
  model: Any
  loss: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  metric: str
  target: float
  batch_size: int = 128
  budget_s: float = 30.0
  eval_every: int = 100
  eval_n: int = 2000
  batch_stats: bool = False
  train_arg: bool = False
  description: str = ""

  @property
  def higher_is_better(self) -> bool:
    return self.metric == "accuracy"

  def reached(self, value: float) -> bool:
    if value is None or not np.isfinite(value):
      return False
    return value >= self.target if self.higher_is_better else value <= self.target


def standardize_per_pixel(ds: datasets.Dataset) -> datasets.Dataset:
  """``(x - mean_p) / std_p`` per input feature over the training set (scikit-learn's
  ``StandardScaler``: a feature with zero variance is only centred)."""
  mean, std = ds.x_train.mean(0), ds.x_train.std(0)
  std = np.where(std > 0, std, 1.0)
  f = lambda x: ((x - mean) / std).astype(np.float32)
  return ds._replace(x_train=f(ds.x_train), x_test=f(ds.x_test))


def standardize_global(ds: datasets.Dataset) -> datasets.Dataset:
  """``(x - mean) / std`` with one mean and std over all pixels (per channel: the usual
  preprocessing of image conv nets, e.g. torchvision's ``Normalize``)."""
  mean, std = float(ds.x_train.mean()), float(ds.x_train.std())
  f = lambda x: ((x - mean) / std).astype(np.float32)
  return ds._replace(x_train=f(ds.x_train), x_test=f(ds.x_test))


def fashion(preprocess: str = "pixel") -> datasets.Dataset:
  ds = datasets.load_mnist_dir(datasets.DEFAULT_MNIST_DIR, name="fashion-mnist")
  if preprocess == "pixel":
    return standardize_per_pixel(ds)
  if preprocess == "global":
    return standardize_global(ds)
  if preprocess == "01":
    return ds
  raise ValueError(preprocess)


# --------------------------------------------------------------------------------------
# Tuning set
# --------------------------------------------------------------------------------------

def mlp(shape: str, preprocess: str = "pixel", budget_s: float = 20.0) -> EvalTask:
  hidden = tasks.MLP_SHAPES[shape]
  ds = fashion(preprocess)
  wide = hidden[0] >= 256
  return EvalTask(
      name=f"{shape}/{preprocess}", model=models.MLP(tuple(hidden) + (10,)), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      metric="accuracy", target=0.88 if wide else 0.86, budget_s=budget_s,
      description=f"MLP 784-{'-'.join(map(str, hidden))}-10, Fashion-MNIST "
                  f"({'standardized per pixel' if preprocess == 'pixel' else '/255'}), batch 128")


# --------------------------------------------------------------------------------------
# Evaluation set
# --------------------------------------------------------------------------------------

def cnn(budget_s: float) -> EvalTask:
  ds = fashion("global")
  return EvalTask(
      name="cnn", model=models.SmallCNN(ds.image_shape, 10), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      metric="accuracy", target=0.88, budget_s=budget_s, train_arg=True,
      description="CNN conv16-pool-conv32-pool-64-10, Fashion-MNIST (standardized), batch 128")


def resnet_bn(budget_s: float) -> EvalTask:
  ds = fashion("global")
  return EvalTask(
      name="resnet-bn", model=models.ResNetBN(ds.image_shape, 10), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      metric="accuracy", target=0.85, budget_s=budget_s, batch_stats=True, train_arg=True,
      description="ResNet-style: stem conv16/2-BN, 2 basic blocks (conv-BN-ReLU-conv-BN), "
                  "global pooling, dense; Fashion-MNIST (standardized), batch 128")


def autoencoder(budget_s: float) -> EvalTask:
  raw = fashion("01")
  ds = standardize_per_pixel(raw)
  return EvalTask(
      name="autoencoder", model=models.Autoencoder(), loss="sigmoid_xent",
      x_train=ds.x_train, y_train=raw.x_train, x_test=ds.x_test, y_test=raw.x_test,
      metric="loss", target=240.0, budget_s=budget_s,
      description="deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, sigmoid "
                  "cross-entropy summed over pixels), Fashion-MNIST inputs standardized per "
                  "pixel, targets in [0, 1], batch 128")


def char_lstm(budget_s: float, batch: int = 64, length: int = 32) -> EvalTask:
  xtr, ytr, xte, yte, vocab = tasks.char_windows(tasks.fortunes_text(), length)
  return EvalTask(
      name="char-lstm", model=models.CharLSTM(vocab), loss="lm", x_train=xtr, y_train=ytr,
      x_test=xte, y_test=yte, metric="bpc", target=2.8, batch_size=batch, budget_s=budget_s,
      eval_n=1000,
      description=f"char-LSTM (embed 32, LSTM 128) on Debian fortunes, {length}-char windows, "
                  f"batch {batch}; test bits per character")


def transformer(budget_s: float, batch: int = 32, length: int = 64) -> EvalTask:
  xtr, ytr, xte, yte, vocab = tasks.char_windows(tasks.fortunes_text(), length)
  return EvalTask(
      name="transformer", model=models.TransformerLM(vocab, length), loss="lm",
      x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, metric="bpc", target=2.8,
      batch_size=batch, budget_s=budget_s, eval_n=1000, train_arg=True,
      description=f"causal transformer (2 pre-LN blocks, width 64, 4 heads) on Debian "
                  f"fortunes, {length}-char windows, batch {batch}; test bits per character")


# --------------------------------------------------------------------------------------
# Held-out set 2 (added 2026-12-05, after every default was fixed; README, *Held-out set 2*):
# two workloads of layer kinds and data the evaluation set does not hold (1-D convs on
# MNIST-1D; a GRU on another corpus). Their targets come from a probe of Adam alone (its
# recommended learning rate, seed 0, half the budget), fixed before any SNGD run on them.
# --------------------------------------------------------------------------------------

# Adam (lr 1e-3, seed 0, 15 s budget; results/eval/*_heldout2_probe.json) had 0.9575 test
# accuracy and 2.926 test bits/char at its last evaluation of a multiple of 100 steps (steps 1200
# and 500), rounded outwards: the targets.
MNIST1D_TARGET = 0.955
GRU_TARGET = 2.95


def mnist1d_cnn(budget_s: float) -> EvalTask:
  ds = datasets.load_mnist1d(num_samples=20000, seed=0)
  length = ds.x_train.shape[1]
  return EvalTask(
      name="mnist1d-cnn", model=models.Conv1DNet(length), loss="xent",
      x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
      metric="accuracy", target=MNIST1D_TARGET, budget_s=budget_s, train_arg=True,
      description="1-D CNN conv32(k5)-conv32(k5)-pool-conv64(k3)-pool-dense64-10 on MNIST-1D "
                  "(20,000 generated signals of 40, seed 0; 16,000 train), batch 128")


def gru_licenses(budget_s: float, batch: int = 64, length: int = 32) -> EvalTask:
  xtr, ytr, xte, yte, vocab = tasks.char_windows(tasks.licenses_text(), length)
  return EvalTask(
      name="gru-licenses", model=models.CharGRU(vocab), loss="lm", x_train=xtr, y_train=ytr,
      x_test=xte, y_test=yte, metric="bpc", target=GRU_TARGET, batch_size=batch,
      budget_s=budget_s, eval_n=741,
      description=f"char-GRU (embed 32, GRU 128) on Debian's licence texts "
                  f"(/usr/share/common-licenses), {length}-char windows, batch {batch}; "
                  f"test bits per character")


HELDOUT_TASKS = {
    "mnist1d-cnn": mnist1d_cnn,
    "gru-licenses": gru_licenses,
}


EVAL_TASKS = {
    "cnn": cnn,
    "resnet-bn": resnet_bn,
    "autoencoder": autoencoder,
    "char-lstm": char_lstm,
    "transformer": transformer,
}
