"""Small helpers shared by the test modules (importable because pytest puts Testing/ on sys.path)."""
import numpy as np


def rotation(axis: int, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` radians about coordinate ``axis``."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r
