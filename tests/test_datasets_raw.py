"""First contact with the datasets as their publishers ship them (tiny replicas written by
tests/rawdata.py): the DVS128 Gesture archive, the CIFAR10-DVS class zips, the CIFAR python
pickles and an ImageFolder.  Damaged, partial and half-converted data must end in one line
with every file left as it was, or be recovered; conversions must give the samples written."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import rawdata
import torch
import torchvision
from clitools import ok, one_error, run_here, snapshot
from pipelines import ROOT, load_pipeline
from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS
from spikingjelly.datasets.dvs128_gesture import DVS128Gesture

from cbp import data as cbp_data
from cbp.errors import DatasetDamaged, DatasetMissing, LockedError
from cbp.files import OutputLock

SEW_DIR = ROOT / "CBP-QSNN-SEW-ResNet"
STBP_DIR = ROOT / "CBP-QSNN-STBP"
(sdata,) = load_pipeline(SEW_DIR, "sewcommon.data")

pytestmark = pytest.mark.usefixtures("one_thread")

TRIALS = {"train": ["user01_lab", "user02_led"], "test": ["user24_lab"]}
FRAMES = "frames_number_4_split_by_number"


@pytest.fixture
def dvs128(tmp_path, monkeypatch) -> Path:
    """A DVS128 Gesture root holding only ``download/`` as published (2 train recordings, 1
    test recording, each with one sample of every class); the MD5 table is these files'."""
    root = tmp_path / "DVS128Gesture"
    table = rawdata.dvs128_archive(root / "download", TRIALS)
    monkeypatch.setattr(DVS128Gesture, "resource_url_md5", classmethod(lambda cls: table))
    return root


@pytest.fixture
def cifar10dvs(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "CIFAR10DVS"
    table = rawdata.cifar10dvs_zips(root / "download", per_class=2)
    monkeypatch.setattr(CIFAR10DVS, "resource_url_md5", classmethod(lambda cls: table))
    return root


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- DVS128 Gesture
def test_dvs128_archive_converted_and_unfinished_conversions_redone(dvs128, capsys):
    train, test = sdata.dvs128_gesture(str(dvs128), 4)
    assert (len(train), len(test)) == (22, 11)  # 11 labels x 2 train / 1 test recordings
    assert sorted(train.targets) == sorted(list(range(11)) * 2)
    frames, label = test[0]
    assert frames.shape == (4, 2, 128, 128) and float(frames.sum()) == 40  # 40 events a label
    assert not list(dvs128.glob("*.building")) and not list(dvs128.glob(".*.lock"))

    # a frame integration killed midway: marker left, a sample missing
    (dvs128 / f"{FRAMES}.building").touch()
    next((dvs128 / FRAMES / "train" / "0").iterdir()).unlink()
    train, test = sdata.dvs128_gesture(str(dvs128), 4)
    assert f"left {FRAMES}/ unfinished" in capsys.readouterr().out
    assert (len(train), len(test)) == (22, 11) and not (dvs128 / f"{FRAMES}.building").exists()

    # a conversion of the archive killed midway: events_np/ half written
    (dvs128 / "events_np.building").touch()
    shutil.rmtree(dvs128 / "events_np" / "test")
    sdata.dvs128_gesture(str(dvs128), 4)
    assert "conversion to events_np/ unfinished" in capsys.readouterr().out
    assert count_files(dvs128 / "events_np" / "test") == 11
    assert not (dvs128 / "events_np.building").exists()


def test_dvs128_damaged_archive_is_one_line_and_stays(dvs128):
    archive = dvs128 / "download" / "DvsGesture.tar.gz"
    rawdata.damage(archive)
    (dvs128 / "events_np.building").touch()  # even with a conversion to redo
    before = snapshot(dvs128)
    with pytest.raises(DatasetDamaged) as exc:
        sdata.dvs128_gesture(str(dvs128), 4)
    assert str(exc.value).startswith(f"{archive} is damaged (MD5 differs from the published "
                                     "sum; nothing was changed): download it again")
    assert snapshot(dvs128) == before
    assert sorted(os.listdir(dvs128)) == ["download", "events_np.building"]


def test_dvs128_folders_spikingjelly_cannot_use(dvs128, tmp_path):
    # extract/ alone: spikingjelly would look for download/ and try to fetch it
    only_extract = tmp_path / "only_extract"
    (only_extract / "extract" / "DvsGesture").mkdir(parents=True)
    with pytest.raises(DatasetMissing, match=r"DVS128 Gesture not found in .*only_extract: put "
                       r"DvsGesture.tar.gz, gesture_mapping.csv"):
        sdata.dvs128_gesture(str(only_extract), 4)
    assert os.listdir(only_extract) == ["extract"]
    # one published file missing
    (dvs128 / "download" / "README.txt").unlink()
    with pytest.raises(DatasetMissing, match="is incomplete: README.txt missing from"):
        sdata.dvs128_gesture(str(dvs128), 4)
    assert os.listdir(dvs128) == ["download"]


def test_dvs128_conversion_waits_for_no_one(dvs128):
    """A conversion another live run holds is not entered (nor its partial files removed)."""
    (dvs128 / "events_np.building").touch()
    with OutputLock([str(dvs128 / "events_np")]), \
            pytest.raises(LockedError, match="events_np is being written by another run"):
        sdata.dvs128_gesture(str(dvs128), 4)
    assert (dvs128 / "events_np.building").exists() and not (dvs128 / "events_np").exists()


# ----------------------------------------------------------------------------- CIFAR10-DVS
def test_cifar10dvs_zips_converted_damaged_and_empty_download(cifar10dvs, tmp_path):
    bird = cifar10dvs / "download" / "bird.zip"
    rawdata.damage(bird)
    before = snapshot(cifar10dvs)
    with pytest.raises(DatasetDamaged, match=f"^{bird} is damaged"):
        sdata.cifar10dvs_full(str(cifar10dvs), 4)
    assert snapshot(cifar10dvs) == before
    rawdata.damage(bird)  # flipped back: the published bytes again
    full = sdata.cifar10dvs_full(str(cifar10dvs), 4)
    assert len(full) == 20 and sorted(full.targets) == sorted(list(range(10)) * 2)
    assert float(full[0][0].sum()) == 40
    cache = tmp_path / "dts_cache"
    for _ in range(2):  # the second time the split cache is unreadable: rebuilt
        train, test = sdata.cifar10dvs(str(cifar10dvs), 4, str(cache))
        assert (len(train), len(test)) == (20, 0)  # 2 files a class: ceil(1.8) = 2 train
        (cache / "train_set_4.pt").write_bytes(b"cut short")
    empty = tmp_path / "empty"
    (empty / "download").mkdir(parents=True)
    with pytest.raises(DatasetMissing, match=r"CIFAR10-DVS not found in .*empty: put the 10 "
                       r"class archives \(airplane.zip"):
        sdata.cifar10dvs_full(str(empty), 4)
    assert os.listdir(empty) == ["download"] and not os.listdir(empty / "download")


# ----------------------------------------------------------------------------- CIFAR-10/100
@pytest.fixture(params=["CIFAR10", "CIFAR100"])
def cifar(request, tmp_path, monkeypatch):
    name = request.param
    attrs = rawdata.cifar_python(tmp_path / "data", name)
    for key, value in attrs.items():
        monkeypatch.setattr(getattr(torchvision.datasets, name), key, value)
    folder = tmp_path / "data" / ("cifar-10-batches-py" if name == "CIFAR10" else
                                  "cifar-100-python")
    return name, tmp_path / "data", folder, attrs


def test_cifar_pickles_checked_before_torchvision(cifar, tmp_path):
    name, root, folder, attrs = cifar
    train = cbp_data.cifar(name, str(root), True)
    assert len(train) == (20 if name == "CIFAR10" else 4) and len(cbp_data.cifar(name, str(root),
                                                                               False)) == 4
    with pytest.raises(DatasetMissing, match=f"{name} not found in .*nowhere.*pass --download"):
        cbp_data.cifar(name, str(tmp_path / "nowhere"), True)
    with pytest.raises(DatasetMissing, match=r"\(or pass -download\)$"):  # TSSL-BP's spelling
        cbp_data.cifar(name, str(tmp_path / "nowhere"), True, download_flag="-download")

    victim = folder / attrs["test_list"][0][0]
    rawdata.damage(victim)
    before = snapshot(root)
    for download in (False, True):  # --download does not replace it either
        with pytest.raises(DatasetDamaged, match=f"^{victim} is damaged .*delete it and extract"):
            cbp_data.cifar(name, str(root), True, download=download)
        assert snapshot(root) == before
    victim.unlink()
    with pytest.raises(DatasetMissing, match=f"{name} in {folder} is incomplete: "
                       f"{victim.name} missing"):
        cbp_data.cifar(name, str(root), False)
    # --download with a damaged archive already there: reported, not fetched over
    archive = root / getattr(torchvision.datasets, name).filename
    archive.write_bytes(b"not the archive")
    with pytest.raises(DatasetDamaged, match=f"^{archive} is damaged"):
        cbp_data.cifar(name, str(root), False, download=True)
    assert archive.read_bytes() == b"not the archive"


# ----------------------------------------------------------------------------- commands
def test_commands_give_one_line_on_damaged_and_empty_data(dvs128, cifar10dvs, tmp_path,
                                                         monkeypatch):
    rawdata.damage(dvs128 / "download" / "DvsGesture.tar.gz")
    proc = run_here(SEW_DIR / "DVS128Gesture" / "main_quantize_cbp.py",
                    ["--model", "SEWResNet", "--connect_f", "ADD", "--device", "cpu", "--T", "4",
                     "--data-path", str(dvs128), "--test-only"], tmp_path)
    one_error(proc.returncode, proc.stderr, "DvsGesture.tar.gz is damaged")
    for zip_file in (cifar10dvs / "download").iterdir():
        zip_file.unlink()
    before = snapshot(tmp_path)
    proc = run_here(SEW_DIR / "CIFAR10DVS" / "main_quantize_cbp.py",
                    ["-model", "SEWResNet", "-cnf", "ADD", "-device", "cpu", "-T", "4",
                     "-data_dir", str(cifar10dvs), "-test-only"], tmp_path)
    one_error(proc.returncode, proc.stderr, "CIFAR10-DVS not found")
    assert snapshot(tmp_path) == before and (cifar10dvs / "download").is_dir()
    assert not (cifar10dvs / "events_np.building").exists()


def test_stbp_at_zero_accuracy_still_writes_the_announced_files(tmp_path, monkeypatch):
    """Tiny test sets can keep the accuracy at 0.0 in every epoch (here: a network that never
    spikes predicts class 0, which no test image has): the first epoch is the best."""
    attrs = rawdata.cifar_python(tmp_path / "datasets", "CIFAR10")
    for key, value in attrs.items():
        monkeypatch.setattr(torchvision.datasets.CIFAR10, key, value)
    net = ["--dataset", "CIFAR10", "--width", "0.0625", "--T", "2", "--batch_size", "10",
           "--num_epochs", "1", "--device", "cpu", "--no_progress"]
    out = ok(run_here(STBP_DIR / "main_train_fp32.py", [*net, "--init_gain", "1e-6"], tmp_path))
    assert "Test Acc: 0.0.." in out and "Best Test Accuracy : 0.0;" in out
    pre = tmp_path / "trained_params" / "STBP_CIFAR10_fp32_pretrained.pth"
    assert pre.is_file() and (tmp_path / "checkpoint" / "CIFAR10_best.pth").is_file()
    out = ok(run_here(STBP_DIR / "main_quantize_cbp.py", [*net, "--quant", "bin"], tmp_path))
    assert "test_acc, cfs = 0.0" in out
    assert (tmp_path / "trained_params" / "STBP_CIFAR10_bin_cbp_prequantized.pth").is_file()


# ----------------------------------------------------------------------------- ImageNet
def test_imagenet_file_list_cache_follows_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from PIL import Image

    val = tmp_path / "imagenet" / "val"
    for c in ("n01", "n02"):
        (val / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(val / c / f"{i}.JPEG", format="JPEG")
    monkeypatch.chdir(tmp_path)
    assert len(sdata.image_folder("imagenet/val", None, cache=True)) == 4
    cache = Path(sdata.cache_path("imagenet/val"))
    assert cache.is_file() and cache == Path(sdata.cache_path(str(val)))  # keyed on the folder
    monkeypatch.chdir(tmp_path / "imagenet")  # same folder, typed differently: cache reused
    assert len(sdata.image_folder("val", None, cache=True)) == 4
    assert capsys.readouterr().out == ""
    time.sleep(0.02)  # past the file system's clock tick
    for i in (2, 3):
        Image.new("RGB", (8, 8)).save(val / "n02" / f"{i}.JPEG", format="JPEG")
    ds = sdata.image_folder("val", None, cache=True)
    assert len(ds) == 6 and "does not match" in capsys.readouterr().out
    assert sorted(ds.targets) == [0, 0, 1, 1, 1, 1]
    assert len(torch.load(cache, weights_only=True)["samples"]) == 6
    assert len(sdata.image_folder(str(val), None, cache=True)) == 6
    assert capsys.readouterr().out == ""
