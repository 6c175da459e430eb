"""DIGITS as events from an emulated DVS (the embedded demo data of the DVS128 Gesture script):
each digit moves along three saccades in front of a simulated event camera, and the events are
integrated into frames by spikingjelly, as the real DVS datasets are."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cbp.data import digits_arrays

DVS_CONTRAST = 0.15  # log-intensity step per event, as a DVS pixel's contrast threshold
DVS_LOG_EPS = 0.1  # log(I + eps): dark pixels do not produce unbounded changes
DVS_STEPS_PER_SACCADE = 8


def saccade_path(amplitude: float, steps: int = DVS_STEPS_PER_SACCADE) -> torch.Tensor:
    """(3 * steps + 1, 2) pixel offsets (dx, dy) of three saccades tracing a triangle
    (0, 0) -> (a/2, a) -> (a, 0) -> (0, 0), the motion N-MNIST used to record MNIST."""
    corners = torch.tensor([[0.0, 0.0], [amplitude / 2, amplitude], [amplitude, 0.0], [0.0, 0.0]])
    frac = torch.arange(steps, dtype=torch.float32).unsqueeze(1) / steps
    pts = [corners[i] + frac * (corners[i + 1] - corners[i]) for i in range(3)]
    return torch.cat(pts + [corners[3:]])


def _shift(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Translate [N, 1, H, W] images by (dx, dy) pixels with bilinear sampling, zeros outside."""
    n, _, h, w = images.shape
    theta = torch.tensor([[1.0, 0.0, -2.0 * dx / w], [0.0, 1.0, -2.0 * dy / h]])
    grid = F.affine_grid(theta.expand(n, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def emulate_dvs(images: torch.Tensor, amplitude: float,
                contrast: float = DVS_CONTRAST) -> list[dict[str, np.ndarray]]:
    """Events a DVS pixel array would emit while ``images`` ([N, 1, H, W], intensity in [0, 1])
    moves along :func:`saccade_path`: at each micro-step every pixel compares log(I + eps)
    with its reference level and emits one event per ``contrast`` crossed, polarity 1 (ON)
    for brighter and 0 (OFF) for darker, then moves its reference by the crossed steps.
    Returns one ``{'t', 'x', 'y', 'p'}`` dict of int64 arrays per image, sorted by ``t``."""
    path = saccade_path(amplitude)
    start = torch.log(_shift(images, 0.0, 0.0) + DVS_LOG_EPS)
    # the reference level is always start + n * contrast; tracking the integer n (instead of
    # accumulating floats) makes a closed path end exactly where it began
    n = torch.zeros_like(start)
    per_step = []
    for k in range(1, len(path)):
        level = torch.log(_shift(images, float(path[k, 0]), float(path[k, 1])) + DVS_LOG_EPS)
        x = (level - start) / contrast
        new = torch.where(x > n, torch.floor(x), torch.ceil(x))
        per_step.append((new - n)[:, 0].to(torch.int64))
        n = new
    steps = torch.stack(per_step, 1).numpy()  # [N, K, H, W] signed event counts
    out = []
    for counts in steps:
        k, y, x = np.nonzero(counts)
        c = counts[k, y, x]
        reps = np.abs(c)
        out.append({"t": np.repeat(k, reps).astype(np.int64),
                    "x": np.repeat(x, reps).astype(np.int64),
                    "y": np.repeat(y, reps).astype(np.int64),
                    "p": np.repeat((c > 0).astype(np.int64), reps)})
    return out


def digits_dvs(train: bool, T: int, size: int = 16) -> TensorDataset:
    """DIGITS as two-polarity event frames ``[T, 2, size, size]`` (event counts, channel 0 OFF,
    1 ON): each digit, resized to ``size`` x ``size``, is moved along three saccades of
    ``size / 4`` pixels in front of an emulated DVS (:func:`emulate_dvs`), and its events are
    integrated into ``T`` frames of equal event count by spikingjelly's
    ``integrate_events_by_fixed_frames_number(..., split_by='number')``, as the DVS datasets
    are.  Same 1,437 / 360 split as :func:`digits`; deterministic."""
    from spikingjelly.datasets.utils import integrate_events_by_fixed_frames_number

    xtr, ytr, xte, yte = digits_arrays(size, channels=1)
    x, y = (xtr, ytr) if train else (xte, yte)
    frames = [
        integrate_events_by_fixed_frames_number(ev, "number", T, size, size)
        for ev in emulate_dvs(x, amplitude=size / 4)
    ]
    return TensorDataset(torch.from_numpy(np.stack(frames)).float(), y)
