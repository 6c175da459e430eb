"""Datasets shared by the pipelines: the embedded DIGITS set and checked torchvision CIFAR.

DIGITS is scikit-learn's bundled 8x8 handwritten digits (1,797 real samples, 10 classes),
resized to ``size`` x ``size`` with bilinear interpolation, repeated over ``channels`` and
standardised with the training-set mean/std; the train/test split is stratified and fixed
(80/20, seed 0), so every run and every pipeline sees the same 1,437 / 360 samples.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import DatasetDamaged, DatasetMissing

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


def verify_files(folder: str, expected: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """``(missing, damaged)``: the paths of the ``(file name, MD5)`` pairs in ``folder`` that
    are not there, and those whose MD5 differs (torchvision's ``check_integrity``)."""
    from torchvision.datasets.utils import check_integrity

    missing, damaged = [], []
    for name, md5 in expected:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            missing.append(path)
        elif not check_integrity(path, md5):
            damaged.append(path)
    return missing, damaged


def damaged_error(damaged: list[str], fix: str) -> DatasetDamaged:
    """One line naming the damaged files (left in place) and ``fix``."""
    names = ", ".join(damaged[:3]) + (f" (+{len(damaged) - 3} more)" if len(damaged) > 3 else "")
    return DatasetDamaged(f"{names} {'is' if len(damaged) == 1 else 'are'} damaged (MD5 differs "
                          f"from the published sum; nothing was changed): {fix}")


def cifar_files(name: str) -> tuple[str, list[tuple[str, str]], tuple[str, str]]:
    """(folder, [(file, MD5)], (archive, MD5)) of torchvision's CIFAR10 / CIFAR100 class: the
    published sums torchvision itself checks."""
    import torchvision

    cls = getattr(torchvision.datasets, name)
    files = [(f, m) for f, m in [*cls.train_list, *cls.test_list]]
    files.append((cls.meta["filename"], cls.meta["md5"]))
    return cls.base_folder, files, (cls.filename, cls.tgz_md5)


def cifar(
    name: str, root: str, train: bool, transform: Any = None, download: bool = False,
    download_flag: str = "--download",
) -> Dataset:
    """torchvision CIFAR10/CIFAR100 from ``root``, every file checked against its published
    MD5 first: ``DatasetMissing`` when it (or a part) is not there, ``DatasetDamaged`` naming a
    damaged file (left as it is, also with ``download``).  ``download``: torchvision fetches
    and extracts what is missing, using the archive already in ``root`` when it verifies
    (``download_flag``: how the script spells the flag, for the messages)."""
    import torchvision

    if name not in CIFAR_URLS:
        raise ValueError(f"unknown CIFAR dataset {name!r}")
    url, _ = CIFAR_URLS[name]
    folder, files, (archive, archive_md5) = cifar_files(name)
    path = os.path.join(root, folder)
    missing, damaged = verify_files(path, files)
    if download:
        _, bad_archive = verify_files(root, [(archive, archive_md5)])
        damaged += bad_archive if missing else []
    if damaged:
        raise damaged_error(damaged, f"delete {'it' if len(damaged) == 1 else 'them'} and "
                            f"extract {url} into {root} again (or pass {download_flag})")
    if missing and not download:
        if not os.path.isdir(path):
            raise DatasetMissing(
                f"{name} not found in {os.path.abspath(root)}: download {url} and extract it "
                f"there so that {path}/ exists (or pass {download_flag})"
            )
        raise DatasetMissing(
            f"{name} in {path} is incomplete: {', '.join(os.path.basename(m) for m in missing)} "
            f"missing; extract {url} into {root} again (or pass {download_flag})"
        )
    cls = getattr(torchvision.datasets, name)
    try:
        return cls(root=root, train=train, transform=transform, download=download)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # offline, a bad download ...
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = "could not download" if missing else "could not read"
        raise DatasetMissing(f"{what} {name} in {os.path.abspath(root)}: {line}") from None
