"""Datasets: DVS128 Gesture and CIFAR10-DVS frames integrated by spikingjelly itself
(``frames_number`` frames, ``split_by='number'``), and ImageNet through ``ImageFolder``."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Iterable

import torch
from torch.utils.data import Dataset, Subset

from cbp.data import IMAGENET_MEAN, IMAGENET_STD, DatasetMissing, damaged_error, verify_files

DVS128_URL = "https://ibm.ent.box.com/s/3hiq58ww1pbbjrinh367ykfdf60xsfm8/folder/50167556794"
DVS128_FILES = "DvsGesture.tar.gz, gesture_mapping.csv, LICENSE.txt and README.txt"
CIFAR10DVS_URL = "https://figshare.com/articles/dataset/CIFAR10-DVS_New/4724671"
IMAGENET_URL = "https://image-net.org (ILSVRC2012 train/ and val/ in ImageFolder layout)"


def _frames_dir(root: str, T: int) -> str:
    return os.path.join(root, f"frames_number_{T}_split_by_number")


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


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def spikingjelly_dataset(cls, root: str, T: int, name: str, files_hint: str, make):
    """``make()`` (spikingjelly's frame datasets of ``cls`` in ``root``) after checking what
    spikingjelly would read, so that it never downloads, deletes or fails half-way:

    * without a finished ``events_np/`` spikingjelly converts ``download/``: every file of
      ``cls.resource_url_md5()`` must be there with its published MD5 (a damaged one is
      reported and left in place; ``extract/`` alone is not enough);
    * a conversion a stopped run left unfinished (``events_np.building``,
      ``frames_number_<T>_split_by_number.building``) is removed and redone, under a lock
      (``.events_np.lock``) that keeps two runs from converting at once;
    * any other failure of spikingjelly is one line.
    """
    if not root:
        raise DatasetMissing(f"--data-path is required (the {name} root folder)")
    raw, extract, download = (os.path.join(root, n) for n in ("events_np", "extract", "download"))
    frames = _frames_dir(root, T)
    need_raw = os.path.exists(raw + ".building") or not os.path.isdir(raw)
    if need_raw:
        resources = cls.resource_url_md5()
        url = resources[0][1]
        missing, damaged = verify_files(download, [(f, md5) for f, _, md5 in resources])
        if damaged:
            raise damaged_error(damaged, f"download {'it' if len(damaged) == 1 else 'them'} "
                                f"again ({files_hint}) and replace the damaged "
                                f"{'copy' if len(damaged) == 1 else 'copies'}")
        if len(missing) == len(resources):
            raise DatasetMissing(f"{name} not found in {root}: put {files_hint} into "
                                 f"{download}/ (spikingjelly converts events_np/ from there)")
        if missing:
            names = ", ".join(os.path.basename(m) for m in missing)
            raise DatasetMissing(f"{name} in {root} is incomplete: {names} missing from "
                                 f"{download}/ ({url})")
    if need_raw or os.path.exists(frames + ".building") or not os.path.isdir(frames):
        from cbp.files import OutputLock

        with OutputLock([raw]):  # one conversion at a time
            if os.path.exists(raw + ".building"):
                print(f"{root}: a stopped run left the conversion to events_np/ unfinished; "
                      "removing events_np/ and extract/ and converting again")
                for path in (raw, extract, raw + ".building"):
                    _remove(path)
            if os.path.exists(frames + ".building"):
                print(f"{root}: a stopped run left {os.path.basename(frames)}/ unfinished; "
                      "removing it and integrating the frames again")
                for path in (frames, frames + ".building"):
                    _remove(path)
            return _call_spikingjelly(make, name, root)
    return _call_spikingjelly(make, name, root)


def _call_spikingjelly(make, name: str, root: str):
    _spikingjelly_preprocess_threads()
    try:
        return make()
    except (OSError, RuntimeError, ValueError, EOFError, NotImplementedError, KeyError,
            IndexError, tarfile.TarError, zipfile.BadZipFile) as exc:
        left = [n for n in os.listdir(root) if n.endswith(".building")] \
            if os.path.isdir(root) else []
        again = f" (the next run removes the unfinished {', '.join(left)} and converts again)" \
            if left else ""
        raise DatasetMissing(f"cannot read {name} in {root}: {_first_line(exc)}{again}") \
            from None


def dvs128_gesture(root: str | None, T: int) -> tuple[Dataset, Dataset]:
    """(train, test) frame datasets of DVS128 Gesture, official 1176/288 split."""
    from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

    kw = dict(data_type="frame", frames_number=T, split_by="number")
    return spikingjelly_dataset(
        DVS128Gesture, root, T, "DVS128 Gesture", f"{DVS128_FILES} from {DVS128_URL}",
        lambda: (DVS128Gesture(root, train=True, **kw), DVS128Gesture(root, train=False, **kw)))


def cifar10dvs_full(root: str, T: int) -> Dataset:
    """The whole CIFAR10-DVS frame dataset (10 x 1000 samples, DatasetFolder order)."""
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS

    return spikingjelly_dataset(
        CIFAR10DVS, root, T, "CIFAR10-DVS",
        f"the 10 class archives (airplane.zip ... truck.zip) from {CIFAR10DVS_URL}",
        lambda: CIFAR10DVS(root, data_type="frame", frames_number=T, split_by="number"))


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
            try:
                cached = [torch.load(p, weights_only=True) for p in paths]
                if all(c.get("root") == key and max(c["indices"], default=-1) < len(full)
                       for c in cached):
                    return Subset(full, cached[0]["indices"]), Subset(full, cached[1]["indices"])
            except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt
                pass
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
    """Where ``--cache-dataset`` keeps the file list of ``dirpath`` (by its absolute path)."""
    h = hashlib.sha1(os.path.abspath(dirpath).encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".torch", "vision", "datasets", "imagefolder",
                        f"{h}.pt")


def folder_fingerprint(dirpath: str, folders: Iterable[str]) -> str:
    """SHA-1 over the name and modification time of ``dirpath``, its sub-folders and
    ``folders`` (those holding the images): adding, removing or renaming an image changes the
    modification time of the folder that holds it."""
    root = os.path.abspath(dirpath)
    names = {root, *(os.path.abspath(f) for f in folders)}
    with os.scandir(root) as it:
        names.update(e.path for e in it if e.is_dir())
    h = hashlib.sha1()
    for name in sorted(names):
        try:
            stamp = os.stat(name).st_mtime_ns
        except OSError:
            stamp = -1
        h.update(f"{os.path.relpath(name, root)}\0{stamp}\n".encode())
    return h.hexdigest()


def _cached_folder(path: str, dirpath: str) -> dict | None:
    """The cached file list of ``dirpath`` if it still describes the folder, else None."""
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, weights_only=True)
        samples = state["samples"]
        if state.get("root") != os.path.abspath(dirpath) or state.get("fingerprint") != \
                folder_fingerprint(dirpath, {os.path.dirname(p) for p, _ in samples}):
            raise ValueError("stale")
        return state
    except Exception:  # noqa: BLE001 - an old, stale or unreadable cache is rebuilt
        print(f"the cached file list {path} does not match {dirpath} (any more); scanning "
              "the folder again")
        return None


def image_folder(dirpath: str, transform, cache: bool, write_cache: bool = True):
    """``ImageFolder(dirpath)``; with ``cache`` its file list is kept in
    :func:`cache_path` (plain lists, no pickled objects) together with the folder's
    :func:`folder_fingerprint`, and reused by later runs while the folder is unchanged."""
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(dirpath):
        raise DatasetMissing(
            f"ImageNet folder {dirpath} not found: put the ILSVRC2012 images from "
            f"{IMAGENET_URL} there, one sub-folder per class"
        )
    path = cache_path(dirpath)
    state = _cached_folder(path, dirpath) if cache else None
    if state is not None:
        from torchvision.datasets.folder import default_loader
        from torchvision.datasets.vision import VisionDataset

        ds = ImageFolder.__new__(ImageFolder)
        VisionDataset.__init__(ds, dirpath, transform=transform)

        ds.loader, ds.extensions = default_loader, None
        ds.classes, ds.class_to_idx = state["classes"], state["class_to_idx"]
        ds.samples = [(p, int(y)) for p, y in state["samples"]]
        ds.imgs, ds.targets = ds.samples, [y for _, y in ds.samples]
        return ds
    try:
        ds = ImageFolder(os.path.abspath(dirpath) if cache else dirpath, transform)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetMissing(f"ImageNet folder {dirpath}: {_first_line(exc)}") from None
    if cache and write_cache:
        from cbp.checkpoint import save_atomic

        save_atomic({"root": os.path.abspath(dirpath),
                     "fingerprint": folder_fingerprint(dirpath, {os.path.dirname(p)
                                                                 for p, _ in ds.samples}),
                     "classes": ds.classes, "class_to_idx": ds.class_to_idx,
                     "samples": [[p, y] for p, y in ds.samples]}, path)
    return ds
