"""MRML <-> core conversions: the only place where DiffDef arrays become Slicer nodes and back.

Arrays follow the core's convention, ``(i, j, k)`` with RAS mm geometry (:class:`diffdef.geometry.Grid`);
VTK image data holds ``(k, j, i)``, and :func:`diffdef.geometry.to_kji` / :func:`~diffdef.geometry.from_kji`
are the one crossing. Nothing here needs the Slicer application: it runs on the ``slicer-core`` wheel too.

Deformations: the core's displacement ``u`` (RAS mm, pull-back ``atlas(x) = template(x + u(x))``) is stored as
the *FromParent* transform of a ``vtkMRMLGridTransformNode``: ``FromParent(p) = p + u(p)``. That is Slicer's
resampling convention, so the template placed under the node and hardened becomes the atlas, and ITK
displacement files (:func:`diffdef.io.write_displacement_itk`) load in Slicer with the same meaning.
"""
from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


# --------------------------------------------------------------------------------------------- matrices
def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    array = np.asarray(array, dtype=np.float64)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def numpy_matrix(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


# --------------------------------------------------------------------------------------------- images
def image_data(array: np.ndarray) -> vtk.vtkImageData:
    """``(i, j, k)`` or ``(i, j, k, C)`` array -> vtkImageData (deep copy, origin 0, spacing 1)."""
    from diffdef.geometry import to_kji

    array = np.asarray(array)
    kji = to_kji(array)
    comps = 1 if array.ndim == 3 else array.shape[3]
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[:3])
    scalars = numpy_support.numpy_to_vtk(kji.reshape(-1, comps) if comps > 1 else kji.ravel(), deep=True)
    scalars.SetName("scalars")
    image.GetPointData().SetScalars(scalars)
    return image


def array_from_image(image: vtk.vtkImageData) -> np.ndarray:
    """vtkImageData -> ``(i, j, k)`` / ``(i, j, k, C)`` numpy copy."""
    from diffdef.geometry import from_kji

    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = tuple(reversed(dims)) + ((comps,) if comps > 1 else ())
    return from_kji(flat.reshape(shape))


def grid_of_volume(node):
    """The :class:`~diffdef.geometry.Grid` of a volume node (world = RAS, parent transforms ignored)."""
    from diffdef.geometry import Grid

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return Grid(tuple(node.GetImageData().GetDimensions()), numpy_matrix(m))


def array_from_volume(node) -> np.ndarray:
    """Voxels of a scalar volume node as an ``(i, j, k)`` numpy copy (``slicer.util.arrayFromVolume`` + from_kji)."""
    return array_from_image(node.GetImageData())


def set_volume(node, array: np.ndarray, grid) -> None:
    """Fill a volume node with ``array`` ``(i, j, k)`` on ``grid`` (IJKToRAS = grid.affine)."""
    if tuple(np.asarray(array).shape[:3]) != tuple(grid.shape):
        raise ValueError(f"Array shape {np.asarray(array).shape} does not match grid {grid.shape}.")
    node.SetIJKToRASMatrix(vtk_matrix(grid.affine))
    node.SetAndObserveImageData(image_data(array))


def add_volume(scene, array: np.ndarray, grid, name: str, class_name: str = "vtkMRMLScalarVolumeNode",
               window_level: tuple[float, float] | None = None, color_node_id: str | None = None):
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    set_volume(node, array, grid)
    display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode" if class_name == "vtkMRMLScalarVolumeNode"
                                      else "vtkMRMLLabelMapVolumeDisplayNode")
    if color_node_id is None:
        color_node_id = "vtkMRMLColorTableNodeGrey"
    if scene.GetNodeByID(color_node_id) is not None:
        display.SetAndObserveColorNodeID(color_node_id)
    if window_level is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*window_level)
    else:
        lo, hi = float(np.min(array)), float(np.max(array))
        display.AutoWindowLevelOff()
        display.SetWindowLevel(max(hi - lo, 1e-6), (hi + lo) / 2)
    node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def diverging_color_node(scene, name: str = "DiffDef diverging (blue-white-red)"):
    """A blue-white-red colour table for signed maps (log-Jacobian), made once per scene."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    n = 256
    node.SetNumberOfColors(n)
    node.GetLookupTable().SetTableRange(0, n - 1)
    for i in range(n):
        t = i / (n - 1) * 2.0 - 1.0  # -1 .. 1
        if t < 0:  # shrinkage: blue
            rgb = (1.0 + t * 0.8, 1.0 + t * 0.7, 1.0 + t * 0.25)
        else:  # expansion: red
            rgb = (1.0 - t * 0.25, 1.0 - t * 0.7, 1.0 - t * 0.8)
        node.SetColor(i, f"{t:+.2f}", *rgb, 1.0)
    node.SetSaveWithScene(True)
    return node


# --------------------------------------------------------------------------------------------- transforms
def set_grid_transform(node, displacement_mm: np.ndarray, grid) -> None:
    """Store a RAS-mm displacement ``(i, j, k, 3)`` on ``grid`` as the node's FromParent grid transform:
    ``FromParent(p) = p + u(p)`` (trilinear between voxel centres, as :func:`diffdef.fields.sample_points`)."""
    disp = np.asarray(displacement_mm, dtype=np.float32)
    if disp.ndim != 4 or disp.shape[3] != 3 or tuple(disp.shape[:3]) != tuple(grid.shape):
        raise ValueError(f"A displacement must be (i, j, k, 3) on grid {grid.shape}; got {disp.shape}.")
    if not np.all(np.isfinite(disp)):
        raise ValueError("The displacement contains NaN or infinite values.")
    image = image_data(disp)
    spacing = grid.spacing
    image.SetSpacing(*spacing.tolist())
    image.SetOrigin(*grid.affine[:3, 3].tolist())
    direction = np.eye(4)
    direction[:3, :3] = grid.affine[:3, :3] / spacing
    transform = slicer.vtkOrientedGridTransform()
    transform.SetGridDirectionMatrix(vtk_matrix(direction))
    transform.SetDisplacementGridData(image)
    transform.SetInterpolationModeToLinear()
    transform.SetDisplacementScale(1.0)
    transform.SetDisplacementShift(0.0)
    node.SetAndObserveTransformFromParent(transform)


def add_grid_transform(scene, displacement_mm: np.ndarray, grid, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
    set_grid_transform(node, displacement_mm, grid)
    node.CreateDefaultDisplayNodes()
    return node


def displacement_from_grid_transform(node):
    """(displacement ``(i, j, k, 3)`` RAS mm of FromParent, Grid) of a grid transform node made here."""
    from diffdef.geometry import Grid

    transform = node.GetTransformFromParent()
    transform.Update()
    if transform.GetInverseFlag():
        raise ValueError(f"{node.GetName()} stores its grid ToParent; only FromParent grids are read here.")
    image = transform.GetDisplacementGrid()
    direction = numpy_matrix(transform.GetGridDirectionMatrix())[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return array_from_image(image), Grid(tuple(image.GetDimensions()), affine)


# --------------------------------------------------------------------------------------------- segmentations
def register_segmentation_converters() -> None:
    """Register the labelmap <-> closed surface rules (the Segmentations module does this inside Slicer)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in (factory.GetConverterRules() or [])} if hasattr(factory, "GetConverterRules") else set()
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in have:
            factory.RegisterConverterRule(cls())


def oriented_image(array: np.ndarray, grid) -> "slicer.vtkOrientedImageData":
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(image_data(array))
    image.SetImageToWorldMatrix(vtk_matrix(grid.affine))
    return image


def add_segmentation(scene, labels: np.ndarray, grid, label_table, name: str, reference_volume=None,
                     surfaces: bool = False):
    """Label map ``(i, j, k)`` -> segmentation node, one named, coloured segment per ``(value, name, rgb)`` of
    ``label_table`` (background 0 skipped), sharing one labelmap layer (segment id = name)."""
    register_segmentation_converters()
    labels = np.asarray(labels).astype(np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    shared = oriented_image(labels, grid)
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP) if hasattr(segmentation, "SetSourceRepresentationName") \
        else segmentation.SetMasterRepresentationName(BINARY_LABELMAP)
    for value, seg_name, rgb in label_table:
        if value == 0:
            continue
        segment = slicer.vtkSegment()
        segment.SetName(seg_name)
        segment.SetColor(*rgb)
        segment.SetLabelValue(int(value))
        segment.AddRepresentation(BINARY_LABELMAP, shared)
        segmentation.AddSegment(segment, seg_name)
    if surfaces:
        node.CreateClosedSurfaceRepresentation()
    return node


def segment_mask(segmentation_node, segment_id: str, grid) -> np.ndarray:
    """Boolean ``(i, j, k)`` mask of one segment on ``grid``; raises ValueError when the segment's labelmap is on
    another grid (different spacing / axes, or a non-integer shift)."""
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image, True):
        raise ValueError(f"Segment {segment_id!r} of {segmentation_node.GetName()} has no binary labelmap.")
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    image_to_world = numpy_matrix(m)
    out = np.zeros(grid.shape, dtype=bool)
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return out  # empty segment
    # the labelmap's voxel (0,0,0) in the grid's voxels: must be an integer shift with the same axes
    rel = np.linalg.inv(grid.affine) @ image_to_world
    if not np.allclose(rel[:3, :3], np.eye(3), atol=1e-3) or not np.allclose(rel[:3, 3], np.round(rel[:3, 3]), atol=1e-3):
        raise ValueError(
            f"The segmentation {segmentation_node.GetName()!r} is on another grid than the volume "
            f"(spacing {np.round(np.linalg.norm(image_to_world[:3, :3], axis=0), 3).tolist()} mm vs "
            f"{np.round(grid.spacing, 3).tolist()} mm, or shifted by a fraction of a voxel). "
            "Resample it onto the volume (Segment Editor: 'Specify geometry' with the volume as source) first.")
    shift = np.round(rel[:3, 3]).astype(int)
    values = array_from_image(image) if image.GetPointData().GetScalars() is not None else None
    if values is None:
        return out
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    label_value = segment.GetLabelValue() if segment is not None else 1
    mask = values == label_value if values.max() > 1 else values > 0
    lo = np.array(extent[0::2]) + shift
    src = [slice(0, n) for n in mask.shape]
    dst = []
    for ax in range(3):
        a, b = lo[ax], lo[ax] + mask.shape[ax]
        ca, cb = max(a, 0), min(b, grid.shape[ax])
        if cb <= ca:
            return out
        src[ax] = slice(ca - a, cb - a)
        dst.append(slice(ca, cb))
    if mask[tuple(src)].sum() != mask.sum():
        raise ValueError(f"The segmentation {segmentation_node.GetName()!r} extends outside the volume's grid; "
                         "resample it onto the volume first.")
    out[tuple(dst)] = mask[tuple(src)]
    return out


def segment_volume_ml(segmentation_node, segment_id: str) -> float:
    """Volume of a segment from its binary labelmap (voxel count x voxel volume), via the module logic."""
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, image, True)
    if image.GetPointData().GetScalars() is None:
        return 0.0
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    count = int(np.count_nonzero(values == label_value)) if values.max() > 1 else int(np.count_nonzero(values))
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return count * abs(np.linalg.det(numpy_matrix(m)[:3, :3])) / 1000.0


# --------------------------------------------------------------------------------------------- tables
def add_table(scene, name: str, columns: dict[str, list]):
    """Table node from ``{column name: values}`` (str columns as strings, the rest as doubles)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    n = len(next(iter(columns.values()))) if columns else 0
    for col, values in columns.items():
        arr = vtk.vtkStringArray() if values and isinstance(values[0], str) else vtk.vtkDoubleArray()
        arr.SetName(col)
        arr.SetNumberOfValues(n)
        for r, v in enumerate(values):
            arr.SetValue(r, v if isinstance(arr, vtk.vtkStringArray) else float(v))
        table.AddColumn(arr)
    node.Modified()
    return node


def table_rows(node) -> list[dict]:
    table = node.GetTable()
    cols = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    return [{c.GetName(): c.GetValue(r) for c in cols} for r in range(table.GetNumberOfRows())]


# --------------------------------------------------------------------------------------------- display
def show_in_slice_views(scene, background=None, foreground=None, foreground_opacity: float = 0.5,
                        label=None) -> None:
    """Set the slice views' layers through their composite nodes (MRML only; no-op in a scene without views)."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        c = composites.GetItemAsObject(i)
        if background is not None:
            c.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            c.SetForegroundVolumeID(foreground.GetID())
            c.SetForegroundOpacity(foreground_opacity)
        if label is not None:
            c.SetLabelVolumeID(label.GetID())


def count_nodes(scene) -> int:
    return scene.GetNumberOfNodes()


# --------------------------------------------------------------------------------------------- scene files
def _safe_file_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "node"


def save_scene(scene, folder, scene_name: str = "DiffDef.mrml") -> str:
    """Write every storable node (default storage node, default format) and the ``.mrml`` file into ``folder``;
    the result opens in Slicer with File > Add Data. Works without the application (``slicer-core``)."""
    import os

    folder = os.path.abspath(str(folder))
    os.makedirs(folder, exist_ok=True)
    used = set()
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if not node.IsA("vtkMRMLStorableNode") or not node.GetSaveWithScene():
            continue
        if node.IsA("vtkMRMLVolumeNode") and node.GetImageData() is None:
            continue
        storage = node.GetStorageNode()
        if storage is None:
            storage = node.CreateDefaultStorageNode()
            if storage is None:
                continue
            scene.AddNode(storage)
            node.SetAndObserveStorageNodeID(storage.GetID())
        base = _safe_file_name(node.GetName())
        ext = storage.GetDefaultWriteFileExtension()
        stem, n = base, 1
        while f"{stem}.{ext}" in used:
            n += 1
            stem = f"{base}_{n}"
        used.add(f"{stem}.{ext}")
        storage.SetFileName(os.path.join(folder, f"{stem}.{ext}"))
        if hasattr(storage, "SetUseCompression"):
            storage.SetUseCompression(True)
        if not storage.WriteData(node):
            raise RuntimeError(f"Could not write {node.GetName()} ({node.GetClassName()}) to {storage.GetFileName()}.")
    path = os.path.join(folder, scene_name)
    scene.SetRootDirectory(folder)
    scene.SetURL(path)
    if not scene.Commit():
        raise RuntimeError(f"Could not write the scene file {path}.")
    return path


def load_scene(path, scene=None):
    """Read a ``.mrml`` scene (and its data) into a new scene, with the node classes and segmentation converter
    rules the Slicer modules register at startup."""
    if scene is None:
        scene = slicer.vtkMRMLScene()
    register_segmentation_converters()
    sequences = slicer.vtkSlicerSequencesLogic()
    sequences.SetMRMLScene(scene)  # registers the sequence browser node class
    scene.SetURL(str(path))
    if not scene.Connect():
        raise RuntimeError(f"Could not read the scene {path}.")
    sequences.SetMRMLScene(None)
    return scene
