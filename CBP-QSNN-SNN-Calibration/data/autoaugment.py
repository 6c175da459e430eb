"""AutoAugment's CIFAR-10 policy and Cutout, as used for every training loader here.

``CIFAR10Policy`` picks one of 25 sub-policies uniformly per image; a sub-policy applies
operation 1 with probability p1, then operation 2 with probability p2.  Magnitude index m in
0..9 selects the strength from the per-operation ranges below.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)

RANGES: dict[str, np.ndarray | list] = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    # bits kept by posterize: 8,8,7,7,6,6,5,5,4,4 (plain int, NumPy >= 1.24 has no np.int)
    "posterize": [int(v) for v in np.round(np.linspace(8, 4, 10))],
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": [0] * 10,
    "equalize": [0] * 10,
    "invert": [0] * 10,
}

CIFAR10_SUBPOLICIES = [
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.8, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
]


def _sign() -> int:
    return random.choice([-1, 1])


def _affine(img: Image.Image, coeffs: tuple, resample=None) -> Image.Image:
    kwargs = {"fillcolor": FILL}
    if resample is not None:
        kwargs["resample"] = resample
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, **kwargs)


def _rotate(img: Image.Image, deg: float) -> Image.Image:
    # positive angle only; rotated in RGBA and composited over grey so the corners are grey
    rot = img.convert("RGBA").rotate(deg)
    grey = Image.new("RGBA", rot.size, (128,) * 4)
    return Image.composite(rot, grey, rot).convert(img.mode)


def apply_op(name: str, img: Image.Image, m) -> Image.Image:
    """Apply the named operation with magnitude ``m`` (a value from ``RANGES``)."""
    bicubic = Image.Resampling.BICUBIC
    if name == "shearX":
        return _affine(img, (1, m * _sign(), 0, 0, 1, 0), bicubic)
    if name == "shearY":
        return _affine(img, (1, 0, 0, m * _sign(), 1, 0), bicubic)
    if name == "translateX":
        return _affine(img, (1, 0, m * img.size[0] * _sign(), 0, 1, 0))
    if name == "translateY":
        return _affine(img, (1, 0, 0, 0, 1, m * img.size[1] * _sign()))
    if name == "rotate":
        return _rotate(img, m)
    enhancers = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                 "sharpness": ImageEnhance.Sharpness, "brightness": ImageEnhance.Brightness}
    if name in enhancers:
        return enhancers[name](img).enhance(1 + m * _sign())
    if name == "posterize":
        return ImageOps.posterize(img, int(m))
    if name == "solarize":
        return ImageOps.solarize(img, m)
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    raise ValueError(f"unknown augmentation {name!r}")


class SubPolicy:
    def __init__(self, p1: float, operation1: str, magnitude_idx1: int, p2: float,
                 operation2: str, magnitude_idx2: int) -> None:
        self.p1, self.op1, self.m1 = p1, operation1, RANGES[operation1][magnitude_idx1]
        self.p2, self.op2, self.m2 = p2, operation2, RANGES[operation2][magnitude_idx2]

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p1:
            img = apply_op(self.op1, img, self.m1)
        if random.random() < self.p2:
            img = apply_op(self.op2, img, self.m2)
        return img


class CIFAR10Policy:
    """AutoAugment's CIFAR-10 policy (used for CIFAR-100 too)."""

    def __init__(self) -> None:
        self.policies = [SubPolicy(*p) for p in CIFAR10_SUBPOLICIES]

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.policies[random.randint(0, len(self.policies) - 1)](img)

    def __repr__(self) -> str:
        return "AutoAugment CIFAR10 Policy"


class Cutout:
    """Zero ``n_holes`` square patches of side ``length`` (clipped at the border) of a
    (C, H, W) tensor; each centre is drawn uniformly among the pixels."""

    def __init__(self, n_holes: int, length: int) -> None:
        self.n_holes = n_holes
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.size(1), img.size(2)
        mask = torch.ones(h, w, dtype=img.dtype)
        half = self.length // 2
        for _ in range(self.n_holes):
            y, x = np.random.randint(h), np.random.randint(w)
            y1, y2 = int(np.clip(y - half, 0, h)), int(np.clip(y + half, 0, h))
            x1, x2 = int(np.clip(x - half, 0, w)), int(np.clip(x + half, 0, w))
            mask[y1:y2, x1:x2] = 0.0
        return img * mask.expand_as(img)
