"""Reading and writing images and displacement fields with their geometry. Every write is atomic
(temporary file in the target folder, then rename) and refuses to replace a file unless ``overwrite``.

NIfTI goes through nibabel (RAS affine as stored); NRRD and other ITK formats through SimpleITK, converted at
the one LPS boundary in :mod:`diffdef.geometry`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .geometry import Grid, from_sitk, to_sitk

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False):
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output or pass overwrite (--overwrite) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_suffix(path), dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp creates 0600, and some writers (safetensors) replace the file: give the result the permissions
        # a plain open() would, after it is written
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_image(path, ndim: int = 3) -> tuple[np.ndarray, Grid]:
    """Read a scalar image -> (array (i, j, k), Grid). Raises a clear error for missing, unreadable or non-3-D files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        if _is_nifti(path):
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
            affine = img.affine
        else:
            import SimpleITK as sitk

            image = sitk.ReadImage(str(path))
            if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
                raise ValueError(f"{path} is a {image.GetDimension()}-D image with "
                                 f"{image.GetNumberOfComponentsPerPixel()} components; a 3-D scalar image is needed.")
            data, grid = from_sitk(image)
            affine = grid.affine
    except (ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # nibabel / ITK raise many types for corrupt files
        raise ValueError(f"Cannot read {path} as an image ({exc}). Is it a NIfTI or NRRD file?") from exc
    data = np.squeeze(data, axis=tuple(range(3, data.ndim))) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != ndim:
        raise ValueError(f"{path} has shape {data.shape}: a {ndim}-D image is needed "
                         "(take one volume of a 4-D series first).")
    return np.asarray(data), Grid(data.shape[:3], affine)


def write_image(path, array: np.ndarray, grid: Grid, overwrite: bool = False) -> Path:
    """Write a scalar (i, j, k) or 4-D (i, j, k, t) array on ``grid``; NIfTI via nibabel, else SimpleITK."""
    path = Path(path)
    array = np.asarray(array)
    if array.shape[:3] != grid.shape:
        raise ValueError(f"Array shape {array.shape} does not match grid shape {grid.shape}.")
    with atomic_path(path, overwrite) as tmp:
        if _is_nifti(path):
            img = nib.Nifti1Image(array, grid.affine)
            img.header.set_xyzt_units("mm")
            img.set_qform(grid.affine, code=1)
            img.set_sform(grid.affine, code=1)
            nib.save(img, str(tmp))
        else:
            import SimpleITK as sitk

            sitk.WriteImage(to_sitk(array, grid), str(tmp), useCompression=True)
    return path


def write_displacement_itk(path, disp_ras_mm: np.ndarray, grid: Grid, overwrite: bool = False) -> Path:
    """Write an (i, j, k, 3) RAS-mm displacement as an ITK / ANTs displacement field (LPS vectors).

    ``.nii.gz`` / ``.nii`` gives ANTs' layout (5-D ``(i, j, k, 1, 3)``, intent vector, RAS affine in the header,
    as ITK's NIfTI writer makes it; written with nibabel, about 3x faster than ITK's writer); ``.nrrd`` and other
    ITK formats (SimpleITK, fast zlib level) are what Slicer loads as a grid transform. float32 input stays
    float32 (other numbers are written as float64). Meaning (ITK resampling convention): a point p of this grid
    maps to p + u(p) in the moving image.
    """
    import SimpleITK as sitk

    disp = np.asarray(disp_ras_mm)
    if disp.dtype != np.float32:
        disp = disp.astype(np.float64)
    if disp.ndim != 4 or disp.shape[3] != 3:
        raise ValueError(f"A displacement needs 3 components per voxel, got shape {disp.shape}.")
    if disp.shape[:3] != grid.shape:
        raise ValueError(f"Array shape {disp.shape} does not match grid shape {grid.shape}.")
    if not np.all(np.isfinite(disp)):
        raise ValueError("The displacement contains NaN or infinite values.")
    flip = (-1.0, -1.0, 1.0)  # RAS -> LPS components (geometry.ras_to_lps), done in the array's own dtype
    path = Path(path)
    with atomic_path(path, overwrite) as tmp:
        if _is_nifti(path):
            data = np.empty(grid.shape + (1, 3), dtype=disp.dtype, order="F")
            for c in range(3):
                np.multiply(disp[..., c], flip[c], out=data[..., 0, c])
            img = nib.Nifti1Image(data, grid.affine)
            img.header.set_intent("vector")
            img.header.set_xyzt_units("mm")
            img.set_qform(grid.affine, code=1)
            img.set_sform(grid.affine, code=1)
            nib.save(img, str(tmp))
        else:
            data = np.empty(grid.shape[::-1] + (3,), dtype=disp.dtype)
            for c in range(3):
                np.multiply(disp[..., c].T, flip[c], out=data[..., c])
            image = sitk.GetImageFromArray(data, isVector=True)
            del data
            image.CopyInformation(to_sitk(np.zeros(grid.shape, np.uint8), grid))  # geometry at the one boundary
            sitk.WriteImage(image, str(tmp), True, 1)
    return path


def read_displacement_itk(path) -> tuple[np.ndarray, Grid]:
    """Read an ITK displacement field -> (i, j, k, 3) RAS mm vectors, Grid."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} components; a 3-D displacement needs 3.")
    return from_sitk(image)
