"""Tiny datasets in the formats their publishers ship, for the first-contact tests: the DVS128
Gesture archive (AEDAT 3.1 recordings, label CSVs, trial lists), the CIFAR10-DVS class zips
(AEDAT 2.0), the CIFAR-10/100 python pickles and an ImageFolder tree; and the MD5 tables that
make the checking code accept them (the tests cannot hold the published sums' files)."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np

CIFAR10DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                      "ship", "truck")
DVS128_EXTRA = ("gesture_mapping.csv", "LICENSE.txt", "README.txt")


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- AEDAT 3.1
def aedat31(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> bytes:
    """One polarity-event packet (type 1, 8-byte events) after the text header."""
    head = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n"
    n = len(t)
    packet = struct.pack("<HHIIIIII", 1, 1, 8, 4, 0, n, n, n)
    words = (x.astype(np.uint32) << 17) | (y.astype(np.uint32) << 2) | \
        (p.astype(np.uint32) << 1) | 1
    body = np.empty(2 * n, dtype="<u4")
    body[0::2], body[1::2] = words, t.astype(np.uint32)
    return head + packet + body.tobytes()


def dvs128_archive(download: Path, trials: dict[str, list[str]], n: int = 40,
                   labels: tuple[int, ...] = tuple(range(1, 12))) -> list[tuple[str, str, str]]:
    """``download/DvsGesture.tar.gz`` (``DvsGesture/`` with one recording per trial name, its
    ``_labels.csv`` and the two trial lists) and the three other published files; returns the
    resource table ``(file, url, md5)`` of these files.  Each recording holds ``n`` events per
    label, label k between k and k+1 seconds."""
    download.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for split, names in trials.items():
        members[f"DvsGesture/trials_to_{split}.txt"] = "".join(
            f"{name}.aedat\n" for name in names).encode()
        for name in names:
            t = np.concatenate([np.sort(rng.integers(k * 10**6, (k + 1) * 10**6, n))
                                for k in labels])
            xy = rng.integers(0, 128, (2, len(t)))
            members[f"DvsGesture/{name}.aedat"] = aedat31(t, xy[0], xy[1],
                                                          rng.integers(0, 2, len(t)))
            members[f"DvsGesture/{name}_labels.csv"] = (
                "class,startTime_usec,endTime_usec\n"
                + "".join(f"{k},{k * 10**6},{(k + 1) * 10**6}\n" for k in labels)).encode()
    with tarfile.open(download / "DvsGesture.tar.gz", "w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for name in DVS128_EXTRA:
        (download / name).write_text(f"{name}\n")
    url = "https://example.invalid/dvs128"
    return [(f, url, md5(download / f)) for f in ("DvsGesture.tar.gz", *DVS128_EXTRA)]


# ----------------------------------------------------------------------------- AEDAT 2.0
def aedat20(t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> bytes:
    """Big-endian (address, timestamp) pairs after the text header, in the address layout of
    the CIFAR10-DVS recordings (polarity bit 0, x bits 1-7, y bits 8-14)."""
    head = b"#!AER-DAT2.0\r\n# This is a raw AE data file\r\n"
    addr = (y.astype(np.uint32) << 8) | (x.astype(np.uint32) << 1) | p.astype(np.uint32)
    body = np.empty(2 * len(t), dtype=">u4")
    body[0::2], body[1::2] = addr, t.astype(np.uint32)
    return head + body.tobytes()


def cifar10dvs_zips(download: Path, per_class: int = 2, n: int = 40
                    ) -> list[tuple[str, str, str]]:
    """``download/<class>.zip`` holding ``<class>/cifar10_<class>_<i>.aedat``; returns the
    resource table ``(file, url, md5)``."""
    download.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    table = []
    for c in CIFAR10DVS_CLASSES:
        with zipfile.ZipFile(download / f"{c}.zip", "w") as z:
            for i in range(per_class):
                t = np.sort(rng.integers(0, 10**6, n))
                xy = rng.integers(0, 128, (2, n))
                z.writestr(f"{c}/cifar10_{c}_{i}.aedat",
                           aedat20(t, xy[0], xy[1], rng.integers(0, 2, n)))
        table.append((f"{c}.zip", "https://example.invalid/cifar10dvs", md5(download / f"{c}.zip")))
    return table


# ----------------------------------------------------------------------------- CIFAR
def cifar_python(root: Path, name: str = "CIFAR10", per_file: int = 4) -> dict:
    """torchvision's layout (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``
    or ``cifar-100-python/train, test, meta``) with ``per_file`` images per file; returns the
    class attributes (``train_list``, ``test_list``, ``meta``) that match these files."""
    rng = np.random.default_rng(2)
    ten = name == "CIFAR10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    train = [f"data_batch_{i}" for i in range(1, 6)] if ten else ["train"]
    test = ["test_batch"] if ten else ["test"]
    key = "labels" if ten else "fine_labels"
    for f in train + test:
        entry = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 key: [int(v) for v in rng.integers(1, 10, per_file)]}  # never class 0
        (folder / f).write_bytes(pickle.dumps(entry))
    meta_name, meta_key = ("batches.meta", "label_names") if ten else ("meta", "fine_label_names")
    (folder / meta_name).write_bytes(pickle.dumps(
        {meta_key: [f"c{i}" for i in range(10 if ten else 100)]}))
    return {"train_list": [[f, md5(folder / f)] for f in train],
            "test_list": [[f, md5(folder / f)] for f in test],
            "meta": {"filename": meta_name, "key": meta_key, "md5": md5(folder / meta_name)}}


def damage(path: Path) -> None:
    """Flip the last byte (a download cut short or corrupted: the MD5 differs)."""
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF
    Path(path).write_bytes(bytes(data))
