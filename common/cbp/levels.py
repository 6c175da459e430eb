"""Quantization level sets (in units of the per-layer scale)."""

from __future__ import annotations

from dataclasses import dataclass

_LEVELS: dict[str, tuple[float, ...]] = {
    "bin": (-1.0, 1.0),
    "ter": (-1.0, 0.0, 1.0),
    "1bit": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "2bit": (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0),
}
_BITS: dict[str, int] = {"bin": 1, "ter": 2, "1bit": 3, "2bit": 3}

MODES: tuple[str, ...] = tuple(_LEVELS)


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known quantization mode, else raise ``ValueError``."""
    if mode not in _LEVELS:
        raise ValueError(f"unknown quantization mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def levels(mode: str) -> list[float]:
    """Sorted quantization levels of ``mode`` in units of the scale (``bin`` -> [-1, 1])."""
    return list(_LEVELS[check_mode(mode)])


def bits(mode: str) -> int:
    """Storage bits per weight of ``mode`` (1 for bin, 2 for ter, 3 for the shift modes)."""
    return _BITS[check_mode(mode)]


@dataclass(frozen=True)
class LevelSet:
    """Levels q_i, midpoints m_i = (q_i + q_{i+1})/2 and gaps d_i = q_{i+1} - q_i."""

    mode: str
    levels: tuple[float, ...]
    mids: tuple[float, ...]
    gaps: tuple[float, ...]

    @classmethod
    def of(cls, mode: str) -> LevelSet:
        q = tuple(levels(mode))
        mids = tuple((a + b) / 2 for a, b in zip(q[:-1], q[1:]))
        gaps = tuple(b - a for a, b in zip(q[:-1], q[1:]))
        return cls(mode, q, mids, gaps)
