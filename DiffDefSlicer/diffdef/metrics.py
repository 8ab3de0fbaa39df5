"""Evaluation metrics for atlases, label maps and deformation fields.

Conventions (see :mod:`diffdef.geometry`): arrays are ``(i, j, k)``, torch tensors ``(B, C, i, j, k)``;
displacements inside the library are in voxel units of their grid, channels ``(di, dj, dk)``; world space is
RAS mm. Each function accepts numpy arrays or torch tensors and checks shapes and finiteness, raising
``ValueError`` with a message that says what was wrong.

* :func:`dice`, :func:`hd95` -- overlap and 95th-percentile Hausdorff distance (mm) per label, background (0)
  excluded, as ``{label: value}``.
* :func:`folding_ratio` -- % of voxels with ``det J <= 0``.
* :func:`smoothness` -- mean ``|grad det J|`` (per voxel, or per mm when a grid is given).
* :func:`centrality` -- mean over voxels of ``|mean_n u_n(x)|`` in mm.
* :func:`ncc`, :func:`local_ncc`, :func:`ssim` -- image similarity.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import Grid, displacement_to_mm

__all__ = ["dice", "hd95", "folding_ratio", "smoothness", "centrality", "ncc", "local_ncc", "ssim"]


# --------------------------------------------------------------------------------------------- input checks
def _tensor(x, name: str, dtype=torch.float64) -> torch.Tensor:
    """numpy / torch -> float tensor (CPU copies stay on CPU); raises on NaN / inf."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(dtype)
    else:
        try:
            t = torch.as_tensor(np.asarray(x), dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"The {name} is not a numeric array ({exc}).") from exc
    if t.numel() == 0:
        raise ValueError(f"The {name} is empty (shape {tuple(t.shape)}).")
    if not torch.isfinite(t).all():
        raise ValueError(f"The {name} contains NaN or infinite values.")
    return t


def _same_shape(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, what: str) -> None:
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"Shape mismatch in {what}: {tuple(a.shape)} vs {tuple(b.shape)}. "
                         "Resample both onto the same grid first.")


def _labels3d(x, name: str) -> np.ndarray:
    """An integer label map ``(i, j, k)`` (or ``(1, 1, i, j, k)`` / ``(1, i, j, k)``) -> numpy int64 (i, j, k)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"The {name} must be a 3-D label map (i, j, k); got shape {tuple(a.shape)}.")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ValueError(f"The {name} contains NaN or infinite values.")
        if not np.all(a == np.round(a)):
            raise ValueError(f"The {name} must hold integer labels; got fractional values.")
    elif a.dtype.kind not in "iub":
        raise ValueError(f"The {name} must hold integer labels; got dtype {a.dtype}.")
    return a.astype(np.int64)


def _label_list(pred: np.ndarray, ref: np.ndarray, labels) -> list[int]:
    if labels is None:
        return [int(v) for v in np.union1d(np.unique(pred), np.unique(ref)) if v != 0]
    return [int(v) for v in labels if int(v) != 0]


def _mask(mask, shape, name: str = "mask", device=None) -> torch.Tensor | None:
    """Boolean mask broadcastable to ``shape`` (a ``(i, j, k)`` mask is broadcast over batch and channel)."""
    if mask is None:
        return None
    m = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    m = m.bool()
    try:
        m = torch.broadcast_to(m, shape)
    except RuntimeError as exc:
        raise ValueError(f"The {name} of shape {tuple(m.shape)} does not fit data of shape {tuple(shape)}.") from exc
    if not m.any():
        raise ValueError(f"The {name} is empty.")
    return m.to(device) if device is not None else m


def _spacing(spacing) -> np.ndarray:
    s = spacing.spacing if isinstance(spacing, Grid) else np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    if not np.all(np.isfinite(s)) or np.any(np.asarray(s) <= 0):
        raise ValueError(f"Voxel spacing must be three positive numbers (mm); got {spacing}.")
    return np.asarray(s, dtype=np.float64)


# ----------------------------------------------------------------------------------------------- label maps
def dice(pred, ref, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice overlap per label, ``2|P∩R| / (|P| + |R|)``, of two integer label maps on the same grid.

    ``labels`` defaults to every non-zero value present in either map; background (0) is always excluded.
    A requested label absent from both maps gives ``nan``. Unitless, in [0, 1].
    """
    p, r = _labels3d(pred, "predicted label map"), _labels3d(ref, "reference label map")
    _same_shape(p, r, "dice")
    out = {}
    for v in _label_list(p, r, labels):
        pv, rv = p == v, r == v
        denom = int(pv.sum()) + int(rv.sum())
        out[v] = float(2.0 * np.logical_and(pv, rv).sum() / denom) if denom else float("nan")
    return out


def hd95(pred, ref, spacing: Grid | Sequence[float] | float = 1.0, labels: Sequence[int] | None = None
         ) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance per label, in mm (MONAI's ``compute_hausdorff_distance``).

    Distances are between the boundary voxels of the two masks, scaled by ``spacing`` (mm along i, j, k, or a
    :class:`~diffdef.geometry.Grid`, whose column norms are used: exact for orthogonal, possibly oblique,
    grids). Background excluded. A label absent from both maps gives ``nan``; present in only one, ``inf``.
    """
    from monai.metrics import compute_hausdorff_distance

    p, r = _labels3d(pred, "predicted label map"), _labels3d(ref, "reference label map")
    _same_shape(p, r, "hd95")
    sp = _spacing(spacing)
    out = {}
    for v in _label_list(p, r, labels):
        pv, rv = p == v, r == v
        if not pv.any() and not rv.any():
            out[v] = float("nan")
        elif not pv.any() or not rv.any():
            out[v] = float("inf")
        else:
            pt = torch.from_numpy(pv)[None, None]
            rt = torch.from_numpy(rv)[None, None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI's internal deprecation notice
                out[v] = float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95,
                                                          spacing=sp.tolist())[0, 0])
    return out


# --------------------------------------------------------------------------------------- deformation fields
def _det_j(x) -> torch.Tensor:
    """A displacement ``(B, 3, i, j, k)`` (voxel units) -> det J ``(B, 1, i, j, k)``; anything else is taken
    to be a det J map already."""
    from .fields import jacobian_determinant

    t = _tensor(x, "displacement or Jacobian determinant")
    if t.ndim == 5 and t.shape[1] == 3:
        return jacobian_determinant(t)
    if t.ndim == 5 and t.shape[1] != 1:
        raise ValueError(f"Expected a displacement (B, 3, i, j, k) or a det J map (B, 1, i, j, k); "
                         f"got {tuple(t.shape)} ({t.shape[1]} channels).")
    if t.ndim not in (3, 4, 5):
        raise ValueError(f"Expected a displacement (B, 3, i, j, k) or a 3-D det J map; got shape {tuple(t.shape)}.")
    return t


def folding_ratio(field, mask=None) -> float:
    """Percentage (0..100) of voxels where the map folds, ``det J <= 0``.

    ``field`` is a displacement ``(B, 3, i, j, k)`` in voxel units (det J computed with
    :func:`diffdef.fields.jacobian_determinant`) or a det J map ``(i, j, k)`` / ``(B, 1, i, j, k)``.
    ``mask`` (``(i, j, k)`` or broadcastable) restricts the voxels counted. For a velocity-integrated
    (diffeomorphic) field the expected value is 0.
    """
    det = _det_j(field)
    m = _mask(mask, det.shape, device=det.device)
    folded = det <= 0
    if m is not None:
        return float(100.0 * folded[m].double().mean())
    return float(100.0 * folded.double().mean())


def smoothness(field, mask=None, grid: Grid | None = None) -> float:
    """Mean magnitude of the spatial gradient of det J, ``mean_x |grad det J(x)|``.

    ``field`` as in :func:`folding_ratio`. Central differences (one-sided at the border). Units: 1/voxel, or
    1/mm when ``grid`` is given (the gradient is then taken with respect to RAS mm, oblique grids included).
    Lower is smoother; 0 for any affine map.
    """
    det = _det_j(field)
    while det.ndim < 5:
        det = det[None]
    if min(det.shape[2:]) < 2:
        raise ValueError(f"smoothness needs at least 2 voxels along each axis; got {tuple(det.shape[2:])}.")
    g = torch.stack(torch.gradient(det[:, 0], dim=(1, 2, 3)), dim=1)  # (B, 3, i, j, k), d/d(i, j, k)
    if grid is not None:
        if tuple(grid.shape) != tuple(det.shape[2:]):
            raise ValueError(f"The grid {grid.shape} does not match the field {tuple(det.shape[2:])}.")
        # d/dx = A^-T d/d(ijk), A the voxel->RAS matrix
        inv_t = torch.as_tensor(np.linalg.inv(grid.affine[:3, :3]).T, dtype=g.dtype, device=g.device)
        g = torch.einsum("rc,bc...->br...", inv_t, g)
    mag = g.norm(dim=1, keepdim=True)
    m = _mask(mask, mag.shape, device=mag.device)
    return float(mag[m].mean() if m is not None else mag.mean())


def centrality(displacements, grid: Grid | None = None, mask=None) -> float:
    """Centrality of an atlas with respect to a set of images, in mm.

    ``displacements``: the N displacements from the atlas to each image, as a stack ``(N, 3, i, j, k)`` or a
    sequence of ``(3, i, j, k)`` / ``(1, 3, i, j, k)`` arrays, all on one grid. They are RAS mm vectors, or
    voxel units of ``grid`` when ``grid`` is given (then converted to mm). Returns

        ``mean_{x in mask} || (1/N) sum_n u_n(x) ||_2``   (mm),

    the average length of the mean displacement field: 0 when the atlas sits at the centre of the set.
    """
    if isinstance(displacements, (list, tuple)):
        if not displacements:
            raise ValueError("centrality needs at least one displacement.")
        items = [_tensor(d, f"displacement {n}") for n, d in enumerate(displacements)]
        items = [d[None] if d.ndim == 4 else d for d in items]
        for n, d in enumerate(items):
            if d.ndim != 5 or d.shape[0] != 1:
                raise ValueError(f"Displacement {n} must be (3, i, j, k) or (1, 3, i, j, k); got {tuple(d.shape)}.")
            _same_shape(d, items[0], f"centrality (displacement {n} vs 0)")
        stack = torch.cat(items)
    else:
        stack = _tensor(displacements, "displacements")
    if stack.ndim != 5 or stack.shape[1] != 3:
        raise ValueError(f"Displacements must be stacked as (N, 3, i, j, k); got {tuple(stack.shape)} "
                         f"({stack.shape[1] if stack.ndim > 1 else '?'} components).")
    if grid is not None:
        if tuple(grid.shape) != tuple(stack.shape[2:]):
            raise ValueError(f"The grid {grid.shape} does not match the displacements {tuple(stack.shape[2:])}.")
        stack = displacement_to_mm(stack, grid)
    norm = stack.mean(dim=0).norm(dim=0)  # (i, j, k)
    m = _mask(mask, norm.shape, device=norm.device)
    return float(norm[m].mean() if m is not None else norm.mean())


# ------------------------------------------------------------------------------------------------- images
def _pair(a, b, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = _tensor(a, f"first image ({what})"), _tensor(b, f"second image ({what})")
    _same_shape(ta, tb, what)
    return ta, tb


def ncc(a, b, mask=None) -> float:
    """Global normalised cross-correlation (Pearson r) of two images over all voxels (or ``mask``), in [-1, 1].

    Raises when an image is constant over the voxels used (r undefined).
    """
    ta, tb = _pair(a, b, "ncc")
    m = _mask(mask, ta.shape, device=ta.device)
    if m is not None:
        ta, tb = ta[m], tb[m]
    da, db = ta.flatten() - ta.mean(), tb.flatten() - tb.mean()
    denom = torch.sqrt((da * da).sum() * (db * db).sum())
    if denom <= 0:
        raise ValueError("ncc is undefined for a constant image.")
    return float((da * db).sum() / denom)


def local_ncc(a, b, window: int = 9, eps: float = 1e-5) -> float:
    """Mean local normalised cross-correlation in cubic ``window``-voxel neighbourhoods (signed, in [-1, 1]).

    Per window: ``cov(a, b) / sqrt(var(a) var(b) + eps)`` (box window, windows fully inside the image), then
    averaged. Unlike VoxelMorph's loss this is not squared, so anti-correlation is negative.
    """
    ta, tb = _pair(a, b, "local_ncc")
    while ta.ndim < 5:
        ta, tb = ta[None], tb[None]
    if ta.ndim != 5 or min(ta.shape[2:]) < window:
        raise ValueError(f"local_ncc needs 3-D images at least {window} voxels wide; got {tuple(ta.shape)}.")
    pool = lambda x: F.avg_pool3d(x, window, stride=1)
    ma, mb = pool(ta), pool(tb)
    var_a = (pool(ta * ta) - ma * ma).clamp_min(0)
    var_b = (pool(tb * tb) - mb * mb).clamp_min(0)
    cov = pool(ta * tb) - ma * mb
    return float((cov / torch.sqrt(var_a * var_b + eps)).mean())


def ssim(a, b, data_range: float, win_size: int = 7, kernel_sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 3-D images, Gaussian window, in float64.

    Per window: ``(2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with
    ``C1 = (0.01 data_range)^2``, ``C2 = (0.03 data_range)^2``; ``data_range`` is the intensity range (1.0 for
    images in 0..1). Windows of ``win_size`` voxels (Gaussian, ``kernel_sigma`` voxels) lie fully inside the
    image. Same definition as MONAI's ``SSIMMetric`` (which computes in float32; tests compare the two).
    Unitless, 1 for identical images.
    """
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}.")
    ta, tb = _pair(a, b, "ssim")
    while ta.ndim < 5:
        ta, tb = ta[None], tb[None]
    if ta.ndim != 5 or min(ta.shape[2:]) < win_size:
        raise ValueError(f"ssim needs 3-D images at least {win_size} voxels wide; got {tuple(ta.shape)}.")
    x = torch.arange(win_size, dtype=torch.float64, device=ta.device) - (win_size - 1) / 2.0
    g = torch.exp(-0.5 * (x / kernel_sigma) ** 2)
    g = g / g.sum()
    channels = ta.shape[1]
    # the Gaussian window is separable: three 1-D convolutions give the 3-D one at a fraction of the time and
    # memory (a 1 mm brain in float64 fits easily)
    kernels = [g.view(shape).expand(channels, 1, -1, -1, -1) for shape in
               ((1, 1, win_size, 1, 1), (1, 1, 1, win_size, 1), (1, 1, 1, 1, win_size))]

    def filt(t):
        for k in kernels:
            t = F.conv3d(t, k, groups=channels)
        return t

    mu_a, mu_b = filt(ta), filt(tb)
    var_a = filt(ta * ta) - mu_a * mu_a
    var_b = filt(tb * tb) - mu_b * mu_b
    cov = filt(ta * tb) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())
