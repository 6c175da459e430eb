"""Datasets: DVS128 Gesture and CIFAR10-DVS frames integrated by spikingjelly itself
(``frames_number`` frames, ``split_by='number'``), and ImageNet through ``ImageFolder``."""

from __future__ import annotations

import hashlib
import math
import os
import sys

import torch
from torch.utils.data import Dataset, Subset

from cbp.data import IMAGENET_MEAN, IMAGENET_STD, DatasetMissing

DVS128_URL = "https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794"
DVS128_FILES = "DvsGesture.tar.gz, gesture_mapping.csv, LICENSE.txt and README.txt"
CIFAR10DVS_URL = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671"
IMAGENET_URL = "https://image-net.org (ILSVRC2012 train/ and val/ in ImageFolder layout)"


def _frames_dir(root: str, T: int) -> str:
    return os.path.join(root, f"frames_number_{T}_split_by_number")


def _have_any(root: str, names: list[str]) -> bool:
    return any(os.path.exists(os.path.join(root, n)) for n in names)


def _ast_thread_safe(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """CPython before 3.11.8 / 3.12.2 can raise ``SystemError: AST constructor recursion
    depth mismatch`` when threads parse concurrently, which numpy does for every ``.npz``
    header spikingjelly reads while it integrates events in its thread pool."""
    return version >= (3, 12, 2) or (3, 11, 8) <= version < (3, 12)


def _spikingjelly_preprocess_threads() -> None:
    """Integrate events in one thread on interpreters with the AST race above, unless the
    user chose a thread count with ``SJ_MAX_THREADS_NUMBER_FOR_DATASETS_PREPROCESS``."""
    if _ast_thread_safe() or "SJ_MAX_THREADS_NUMBER_FOR_DATASETS_PREPROCESS" in os.environ:
        return
    from spikingjelly import configure

    configure.max_threads_number_for_datasets_preprocess = 1


def dvs128_gesture(root: str | None, T: int) -> tuple[Dataset, Dataset]:
    """(train, test) frame datasets of DVS128 Gesture, official 1176/288 split."""
    if not root:
        raise DatasetMissing("--data-path is required (the DVS128 Gesture root folder)")
    if not (_have_any(root, [os.path.basename(_frames_dir(root, T)), "events_np", "extract"])
            or os.path.isfile(os.path.join(root, "download", "DvsGesture.tar.gz"))):
        raise DatasetMissing(
            f"DVS128 Gesture not found in {root}: download {DVS128_FILES} from {DVS128_URL} "
            f"into {os.path.join(root, 'download')}/"
        )
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    _spikingjelly_preprocess_threads()

    kw = dict(data_type="frame", frames_number=T, split_by="number")
    return DVS128Gesture(root, train=True, **kw), DVS128Gesture(root, train=False, **kw)


def cifar10dvs_full(root: str, T: int) -> Dataset:
    """The whole CIFAR10-DVS frame dataset (10 x 1000 samples, DatasetFolder order)."""
    if not _have_any(root, [os.path.basename(_frames_dir(root, T)), "events_np", "extract",
                            "download"]):
        raise DatasetMissing(
            f"CIFAR10-DVS not found in {root}: put the 10 class archives (airplane.zip ... "
            f"truck.zip) from {CIFAR10DVS_URL} into {os.path.join(root, 'download')}/"
        )
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    _spikingjelly_preprocess_threads()

    return CIFAR10DVS(root, data_type="frame", frames_number=T, split_by="number")


def split_per_class(targets: list[int], train_ratio: float, num_classes: int
                    ) -> tuple[list[int], list[int]]:
    """The reference split: per class, the first ceil(ratio * n) indices (in dataset order)
    train, the rest test."""
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, y in enumerate(targets):
        per_class[int(y)].append(i)
    train, test = [], []
    for idx in per_class:
        pos = math.ceil(len(idx) * train_ratio)
        train.extend(idx[:pos])
        test.extend(idx[pos:])
    return train, test


def cifar10dvs(root: str, T: int, cache_dir: str | None) -> tuple[Dataset, Dataset]:
    """(train, test) = the reference's per-class 9:1 split; the index lists are cached in
    ``<cache_dir>/{train,test}_set_<T>.pt`` together with the dataset folder they belong to."""
    full = cifar10dvs_full(root, T)
    key = os.path.abspath(root)
    paths = None
    if cache_dir:
        paths = [os.path.join(cache_dir, f"{s}_set_{T}.pt") for s in ("train", "test")]
        if all(os.path.isfile(p) for p in paths):
            cached = [torch.load(p, weights_only=True) for p in paths]
            if all(c.get("root") == key and max(c["indices"], default=-1) < len(full)
                   for c in cached):
                return Subset(full, cached[0]["indices"]), Subset(full, cached[1]["indices"])
    train, test = split_per_class(full.targets, 0.9, 10)
    if paths is not None:
        from cbp.checkpoint import save_atomic

        for p, idx in zip(paths, (train, test)):
            save_atomic({"root": key, "indices": idx}, p)
    return Subset(full, train), Subset(full, test)


# ----------------------------------------------------------------------------- ImageNet


def imagenet_transforms(train: bool, crop: int = 224, resize: int = 256):
    import torchvision.transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), norm])


def cache_path(dirpath: str) -> str:
    h = hashlib.sha1(dirpath.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".torch", "vision", "datasets", "imagefolder",
                        f"{h}.pt")


def image_folder(dirpath: str, transform, cache: bool, write_cache: bool = True):
    """``ImageFolder(dirpath)``; with ``cache`` its file list is kept in
    ``~/.torch/vision/datasets/imagefolder/<sha1(dirpath)[:10]>.pt`` (plain lists, no pickled
    objects) and reused by later runs."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(dirpath):
        raise DatasetMissing(
            f"ImageNet folder {dirpath} not found: put the ILSVRC2012 images from "
            f"{IMAGENET_URL} there, one sub-folder per class"
        )
    path = cache_path(dirpath)
    if cache and os.path.isfile(path):
        state = torch.load(path, weights_only=True)
        from torchvision.datasets.folder import default_loader
        from torchvision.datasets.vision import VisionDataset

        ds = ImageFolder.__new__(ImageFolder)
        VisionDataset.__init__(ds, dirpath, transform=transform)

        ds.loader, ds.extensions = default_loader, None
        ds.classes, ds.class_to_idx = state["classes"], state["class_to_idx"]
        ds.samples = [(p, int(y)) for p, y in state["samples"]]
        ds.imgs, ds.targets = ds.samples, [y for _, y in ds.samples]
        return ds
    ds = ImageFolder(dirpath, transform)
    if cache and write_cache:
        from cbp.checkpoint import save_atomic

        save_atomic({"classes": ds.classes, "class_to_idx": ds.class_to_idx,
                     "samples": [[p, y] for p, y in ds.samples]}, path)
    return ds
