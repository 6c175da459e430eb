"""Checkpoint helpers: atomic save, explicit loading and readable mismatch errors."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch import nn

import cbp
from cbp import checkpoint as ck
from cbp.files import WriteError


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), cbp.QConv2d(2, 3, 3, mode="ter"), cbp.QConv2d(3, 3, 3, bias=True), nn.Flatten(),
        nn.Linear(3, 2),
    )


# ----------------------------------------------------------------------------- save_atomic


def test_save_atomic_writes_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"  # the folder is created
    obj = {"w": torch.arange(4.0), "epoch": 3}
    ck.save_atomic(obj, str(path))
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], torch.arange(4.0))
    ck.save_atomic({"w": torch.ones(2)}, str(path))  # overwrite in place
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


def test_save_atomic_cleans_up_when_save_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    ck.save_atomic({"v": torch.zeros(1)}, str(path))

    def boom(fd):  # the data is in the temporary file, the flush to disk fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(WriteError, match=r"cannot write .*ckpt\.pth: No space"):
        ck.save_atomic({"v": torch.ones(1)}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temp file left
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(1))  # old file intact


def test_save_atomic_failure_without_previous_file(tmp_path, monkeypatch):
    def boom(obj, f, *args, **kwargs):
        raise RuntimeError("cannot pickle")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        ck.save_atomic({}, str(tmp_path / "x.pth"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- load_file


def test_load_file_missing_raises(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ck.CheckpointError, match="nope.pth"):
        ck.load_file(str(missing))
    assert issubclass(ck.CheckpointError, RuntimeError)


def test_load_file_corrupt_raises(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ck.CheckpointError):
        ck.load_file(str(path))


def test_load_file_refuses_pickled_objects_unless_trusted(tmp_path):
    path = tmp_path / "args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "net": {"w": torch.ones(2)}}, path)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_file(str(path))
    assert "trust" in str(info.value)
    obj = ck.load_file(str(path), trust=True)
    assert obj["args"].lr == 0.1 and torch.equal(obj["net"]["w"], torch.ones(2))


def test_load_file_plain_tensors_without_trust(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"net": {"w": torch.ones(2)}, "epoch": 4, "ucs": 0.5}, path)
    obj = ck.load_file(str(path))
    assert obj["epoch"] == 4 and obj["ucs"] == 0.5


# ----------------------------------------------------------------------------- extract_state_dict


@pytest.mark.parametrize("key", [None, "net", "model", "model_state_dict", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_extract_state_dict_formats(key, prefix):
    sd = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2)}
    inner = {prefix + k: v for k, v in sd.items()}
    obj = inner if key is None else {key: inner, "epoch": 7, "optimizer": {"state": {}}}
    out = ck.extract_state_dict(obj)
    assert set(out) == set(sd)
    for k in sd:
        assert torch.equal(out[k], sd[k])


def test_extract_state_dict_partial_prefix_kept_and_module():
    sd = {"module.a": torch.ones(1), "b": torch.zeros(1)}
    assert set(ck.extract_state_dict(sd)) == {"module.a", "b"}
    model = nn.Linear(2, 2)
    assert set(ck.extract_state_dict(model)) == {"weight", "bias"}
    assert set(ck.extract_state_dict({"net": model})) == {"weight", "bias"}


def test_extract_state_dict_rejects_non_state_dict():
    with pytest.raises(ck.CheckpointError):
        ck.extract_state_dict({"epoch": 3, "acc": 0.5})
    with pytest.raises(ck.CheckpointError):
        ck.extract_state_dict([torch.ones(1)])


# ----------------------------------------------------------------------------- load_into


def test_load_into_round_trip_from_file(tmp_path):
    src = small_model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "m.pth"
    ck.save_atomic({"net": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, str(path))
    dst = small_model()
    ck.load_into(dst, str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_load_into_reports_missing_unexpected_and_shape(tmp_path):
    model = small_model()
    sd = dict(model.state_dict())
    del sd["4.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 2, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_into(model, str(path))
    msg = str(info.value)
    assert "missing" in msg and "4.bias" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    assert "shape" in msg and "1.weight" in msg
    assert "bad.pth" in msg
    # nothing was loaded
    assert model.state_dict()["1.weight"].shape == (3, 2, 3, 3)


def test_load_into_fp32_state_keeps_scales():
    fp32 = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Conv2d(2, 3, 3, bias=False), nn.Conv2d(3, 3, 3, bias=True), nn.Flatten(),
        nn.Linear(3, 2),
    )
    state = fp32.state_dict()
    model = small_model()
    with torch.no_grad():
        model[1].scale.fill_(0.125)
        model[2].scale.fill_(0.375)
    with pytest.raises(ck.CheckpointError, match=r"1\.scale"):
        ck.load_into(model, state)
    applied = ck.load_into(model, state, allow_missing=(".scale",))
    assert set(applied) == set(state)
    assert model[1].scale.item() == 0.125 and model[2].scale.item() == 0.375
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    # the quantized forward now uses the loaded weights
    assert torch.equal(model[1].qweight, cbp.quantize(state["1.weight"], 0.125, "ter"))
