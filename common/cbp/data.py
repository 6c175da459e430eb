"""Datasets shared by the pipelines: the embedded DIGITS set and checked torchvision CIFAR.

DIGITS is scikit-learn's bundled 8x8 handwritten digits (1,797 real samples, 10 classes),
resized to ``size`` x ``size`` with bilinear interpolation, repeated over ``channels`` and
standardised with the training-set mean/std; the train/test split is stratified and fixed
(80/20, seed 0), so every run and every pipeline sees the same 1,437 / 360 samples.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import DatasetMissing

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

CIFAR_URLS = {
    "CIFAR10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "CIFAR100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
}


# per-channel normalisation used by the pipelines' CIFAR transforms
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def digits_arrays(size: int = 32, channels: int = 3):
    """(x_train, y_train, x_test, y_test) as tensors; x in [0, 1] before standardisation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(
        idx,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=y.numpy(),
    )
    tr, te = torch.as_tensor(sorted(tr)), torch.as_tensor(sorted(te))
    return x[tr], y[tr], x[te], y[te]


def digits(train: bool, size: int = 32, channels: int = 3, normalize: bool = True) -> TensorDataset:
    """The embedded DIGITS dataset (see module docstring) as a ``TensorDataset``."""
    xtr, ytr, xte, yte = digits_arrays(size, channels)
    if normalize:
        mean, std = xtr.mean(), xtr.std()
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return TensorDataset(xtr, ytr) if train else TensorDataset(xte, yte)


def cifar(
    name: str, root: str, train: bool, transform: Any = None, download: bool = False
) -> Dataset:
    """torchvision CIFAR10/CIFAR100 from ``root``; ``DatasetMissing`` if it is not there."""
    import torchvision

    if name not in CIFAR_URLS:
        raise ValueError(f"unknown CIFAR dataset {name!r}")
    cls = getattr(torchvision.datasets, name)
    try:
        return cls(root=root, train=train, transform=transform, download=download)
    except RuntimeError:
        url, folder = CIFAR_URLS[name]
        raise DatasetMissing(
            f"{name} not found in {os.path.abspath(root)}: download {url} and extract it "
            f"there so that {os.path.join(root, folder)}/ exists (or pass --download)"
        ) from None
