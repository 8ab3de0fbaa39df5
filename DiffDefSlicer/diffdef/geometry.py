"""Geometry: the one place that converts between frames and index orders.

Conventions used everywhere in DiffDef:

* Arrays are indexed ``(i, j, k)``, the NIfTI / nibabel order. Torch tensors are
  ``(batch, channel, i, j, k)``. SimpleITK's ``GetArrayFromImage`` returns ``(k, j, i)``;
  only :func:`to_sitk` / :func:`from_sitk` cross that boundary.
* World space is RAS in millimetres (NIfTI, Slicer). ITK / SimpleITK speak LPS; only
  :func:`ras_to_lps` / :func:`lps_to_ras` (used by :func:`to_sitk` / :func:`from_sitk` and
  the displacement exporters) flip x and y.
* VTK / Slicer (``slicer.util.arrayFromVolume``, ``vtkImageData`` scalars) store voxels ``(k, j, i)``, like
  SimpleITK; only :func:`to_kji` / :func:`from_kji` cross that boundary (the Slicer module uses them).
* Pictures (previews, the icon) show arrays reoriented by :func:`to_ras_axes` to axes towards R, A and S.
* A :class:`Grid` is a shape plus a 4x4 voxel-to-RAS affine, voxel centres at integer indices.
* Displacements inside the library are in *voxel units of their grid*, channels ``(di, dj, dk)``,
  in the pull-back convention: ``warped(x) = image(x + u(x))``. :func:`displacement_to_mm` /
  :func:`displacement_from_mm` convert to RAS millimetres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_LPS_FLIP = np.diag([-1.0, -1.0, 1.0])


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """Flip x and y of points or vectors ``(..., 3)``: RAS <-> LPS (the map is its own inverse)."""
    points = np.asarray(points, dtype=np.float64)
    return points * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps


def to_kji(array: np.ndarray) -> np.ndarray:
    """Array ``(i, j, k)`` or ``(i, j, k, C)`` -> C-contiguous ``(k, j, i)`` / ``(k, j, i, C)``, the memory order of
    VTK image data and ``slicer.util.arrayFromVolume`` (components stay last)."""
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"Expected an (i, j, k) or (i, j, k, C) array, got shape {array.shape}.")
    return np.ascontiguousarray(array.transpose((2, 1, 0) + tuple(range(3, array.ndim))))


def from_kji(array: np.ndarray) -> np.ndarray:
    """Array ``(k, j, i)`` or ``(k, j, i, C)`` (VTK / Slicer order) -> ``(i, j, k)`` / ``(i, j, k, C)``."""
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"Expected a (k, j, i) or (k, j, i, C) array, got shape {array.shape}.")
    return np.ascontiguousarray(array.transpose((2, 1, 0) + tuple(range(3, array.ndim))))


def to_ras_axes(array: np.ndarray, grid: "Grid") -> np.ndarray:
    """View of ``array`` ``(i, j, k)`` on ``grid`` with its axes permuted and flipped so that they point, as
    nearly as the grid's direction allows, towards R, A and S (no resampling; for display only)."""
    linear = grid.affine[:3, :3]
    closeness = np.abs(linear / np.linalg.norm(linear, axis=0))  # (world axis, voxel axis) direction cosines
    order = [0, 0, 0]
    for _ in range(3):  # greedy: the closest pair first, so that even 45 degrees gives each axis one voxel axis
        world_axis, voxel_axis = np.unravel_index(int(np.argmax(closeness)), closeness.shape)
        order[world_axis] = int(voxel_axis)
        closeness[world_axis, :] = closeness[:, voxel_axis] = -1.0
    out = np.transpose(np.asarray(array), order + list(range(3, np.ndim(array))))
    for axis, voxel_axis in enumerate(order):
        if linear[axis, voxel_axis] < 0:
            out = np.flip(out, axis)
    return out


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (i, j, k) and ``affine`` voxel index -> RAS mm (4x4)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        affine = np.asarray(self.affine, dtype=np.float64)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"A grid needs three positive sizes, got {self.shape}.")
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise ValueError("A grid affine must be a finite, invertible 4x4 matrix.")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices ``(..., 3)`` -> RAS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm ``(..., 3)`` -> (fractional) voxel indices ``(..., 3)``."""
        inv = np.linalg.inv(self.affine)
        ras = np.asarray(ras, dtype=np.float64)
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def crop(self, start, size) -> "Grid":
        """Sub-grid starting at voxel ``start`` with ``size`` voxels (same spacing)."""
        shift = np.eye(4)
        shift[:3, 3] = np.asarray(start, dtype=np.float64)
        return Grid(tuple(size), self.affine @ shift)

    def downsample(self, factor: int) -> "Grid":
        """Grid of ``factor``-wide blocks: voxel ``n`` covers fine voxels ``factor*n .. factor*n+factor-1``,
        so its centre sits at fine index ``factor*n + (factor-1)/2``."""
        if any(s % factor for s in self.shape):
            raise ValueError(f"Grid shape {self.shape} is not divisible by {factor}.")
        scale = np.diag([factor, factor, factor, 1.0]).astype(np.float64)
        scale[:3, 3] = (factor - 1) / 2.0
        return Grid(tuple(s // factor for s in self.shape), self.affine @ scale)

    def same_as(self, other: "Grid", tol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=tol)

    def require_same(self, other: "Grid", what: str = "image") -> None:
        """Raise a clear error when ``other`` is not this grid."""
        if not self.same_as(other):
            raise ValueError(
                f"The {what} is on another grid (shape {other.shape}, spacing {np.round(other.spacing, 3).tolist()} mm) "
                f"than expected (shape {self.shape}, spacing {np.round(self.spacing, 3).tolist()} mm). "
                "Resample it onto the reference grid first."
            )

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "affine": self.affine.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(tuple(d["shape"]), np.asarray(d["affine"], dtype=np.float64))


def displacement_to_mm(disp: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Voxel-unit displacement ``(B, 3, i, j, k)`` on ``grid`` -> RAS mm, same layout."""
    m = torch.as_tensor(grid.affine[:3, :3], dtype=disp.dtype, device=disp.device)
    return torch.einsum("rc,bc...->br...", m, disp)


def displacement_from_mm(disp_mm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """RAS mm displacement ``(B, 3, i, j, k)`` -> voxel units of ``grid``."""
    m = torch.as_tensor(np.linalg.inv(grid.affine[:3, :3]), dtype=disp_mm.dtype, device=disp_mm.device)
    return torch.einsum("rc,bc...->br...", m, disp_mm)


def to_sitk(array: np.ndarray, grid: Grid, is_vector: bool = False):
    """Array ``(i, j, k)`` (or ``(i, j, k, 3)`` RAS vectors when ``is_vector``) -> SimpleITK image (LPS).

    Vector components are converted RAS -> LPS; this is the single (i,j,k)->(k,j,i) boundary.
    """
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.shape[:3] != grid.shape:
        raise ValueError(f"Array shape {array.shape} does not match grid shape {grid.shape}.")
    if is_vector:
        if array.ndim != 4 or array.shape[3] != 3:
            raise ValueError(f"A displacement needs 3 components per voxel, got shape {array.shape}.")
        data = np.ascontiguousarray(ras_to_lps(array).transpose(2, 1, 0, 3))
        image = sitk.GetImageFromArray(data, isVector=True)
    else:
        if array.ndim != 3:
            raise ValueError(f"Expected a 3-D array, got shape {array.shape}.")
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    lps_affine = _LPS_FLIP @ grid.affine[:3, :3]
    spacing = grid.spacing
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(ras_to_lps(grid.affine[:3, 3]).tolist())
    image.SetDirection((lps_affine / spacing).flatten().tolist())
    return image


def from_sitk(image) -> tuple[np.ndarray, Grid]:
    """SimpleITK image -> (array ``(i, j, k)`` or ``(i, j, k, 3)`` with RAS vectors, Grid)."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise ValueError(f"Expected a 3-D image, got a {image.GetDimension()}-D one.")
    data = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FLIP @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras(np.asarray(image.GetOrigin()))
    if image.GetNumberOfComponentsPerPixel() > 1:
        if image.GetNumberOfComponentsPerPixel() != 3:
            raise ValueError(f"A displacement needs 3 components, the image has {image.GetNumberOfComponentsPerPixel()}.")
        array = lps_to_ras(data.transpose(2, 1, 0, 3))
    else:
        array = data.transpose(2, 1, 0)
    return array, Grid(array.shape[:3], affine)
