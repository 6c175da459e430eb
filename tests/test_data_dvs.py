"""DIGITS as emulated DVS events: the saccade path, the event generation and the frames."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pipelines import load_pipeline

SEW_DIR = Path(__file__).resolve().parents[1] / "CBP-QSNN-SEW-ResNet"
(emu,) = load_pipeline(SEW_DIR, "sewcommon.dvs_emulator")
DVS_CONTRAST, DVS_LOG_EPS = emu.DVS_CONTRAST, emu.DVS_LOG_EPS
digits_dvs, emulate_dvs, saccade_path = emu.digits_dvs, emu.emulate_dvs, emu.saccade_path

pytestmark = pytest.mark.usefixtures("one_thread")


def test_saccade_path_is_a_closed_triangle():
    p = saccade_path(4.0, steps=8)
    assert p.shape == (25, 2)
    assert p[0].tolist() == [0, 0] and p[8].tolist() == [2, 4] and p[16].tolist() == [4, 0]
    assert p[-1].tolist() == [0, 0]
    assert p[4].tolist() == [1, 2]  # halfway along the first saccade


def test_dark_image_emits_nothing():
    ev = emulate_dvs(torch.zeros(2, 1, 8, 8), amplitude=2.0)
    assert all(len(e["t"]) == 0 for e in ev)


def test_whole_pixel_step_emits_the_crossed_contrast_steps():
    # one lit pixel moved by exactly one pixel: the pixel it leaves goes 1 -> 0 and the one it
    # enters 0 -> 1, each crossing trunc(ln(1 + eps) - ln(eps)) / C) contrast steps at once
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 3, 3] = 1.0
    ev = emulate_dvs(img, amplitude=2.0, contrast=DVS_CONTRAST)[0]  # steps of 1/8 pixel
    n = math.trunc((math.log(1 + DVS_LOG_EPS) - math.log(DVS_LOG_EPS)) / DVS_CONTRAST)
    assert n == 15
    on = np.zeros((8, 8), int)
    off = np.zeros((8, 8), int)
    np.add.at(on, (ev["y"][ev["p"] == 1], ev["x"][ev["p"] == 1]), 1)
    np.add.at(off, (ev["y"][ev["p"] == 0], ev["x"][ev["p"] == 0]), 1)
    # the path is closed, so every pixel ends where it started: ON and OFF balance exactly
    assert np.array_equal(on, off)
    assert on.sum() > 0 and on[3, 3] > 0 and on[0, 0] == 0
    assert np.all(np.diff(ev["t"]) >= 0)  # sorted by time
    # no single micro-step crosses more steps than the full dark -> lit change
    per_step = np.zeros((25, 8, 8), int)
    np.add.at(per_step, (ev["t"], ev["y"], ev["x"]), 1)
    assert per_step.max() <= n


def test_digits_dvs_frames():
    test = digits_dvs(False, T=4, size=16)
    x, y = test.tensors
    assert x.shape == (360, 4, 2, 16, 16) and y.shape == (360,)
    assert torch.equal(x, x.round()) and float(x.min()) == 0  # event counts
    per_frame = x.sum((2, 3, 4))  # split_by number: N // T events per frame, the rest last
    n = per_frame.sum(1)
    assert torch.equal(per_frame[:, :3], (n // 4).unsqueeze(1).expand(-1, 3))
    assert torch.equal(x[:, :, 0].sum((1, 2, 3)), x[:, :, 1].sum((1, 2, 3)))  # ON == OFF
    assert torch.equal(x, digits_dvs(False, T=4, size=16).tensors[0])  # deterministic
    assert len(digits_dvs(True, T=4, size=16)) == 1437
