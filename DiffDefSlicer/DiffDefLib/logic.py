"""The DiffDef Logic on an MRML scene: takes and returns MRML nodes, calls the core (:mod:`diffdef`).

It needs no Slicer application (no ``slicer.app``, ``slicer.modules``, Qt): the module's ``DiffDefLogic`` adds
Slicer's ``ScriptedLoadableModuleLogic`` on top of it, and the tests run it on the ``slicer-core`` wheel.

Every operation is a transaction on the scene: inputs are checked and all the heavy work is done before the first
node is added, and if anything still fails (or the user cancels) the nodes added so far are removed, so a failed
Generate / Compare / Trajectory leaves the scene as it was. User-facing problems raise :class:`DiffDefError` with a
message that says what to do.

The core (``diffdef``, torch, MONAI) is imported lazily, after :mod:`DiffDefLib.dependencies` made sure it can be.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import mrml

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]

#: Segment names (lower case, no punctuation) accepted for each template label of :data:`diffdef.template.LABELS`.
SEGMENT_ALIASES = {
    1: ("csf", "cerebrospinal fluid"),
    2: ("gray matter", "grey matter", "gm", "cortex", "cortical gray matter"),
    3: ("white matter", "wm", "cerebral white matter"),
    4: ("lateral ventricles", "lateral ventricle", "ventricles", "ventricle"),
}


class DiffDefError(Exception):
    """A problem the user can fix (bad input, invalid bundle, unavailable device); the message says how."""


@dataclass
class GenerateResult:
    atlas_volume: object
    segmentation: object
    transform: object
    jacobian_volume: object | None
    atlas: object  # diffdef.generate.Atlas
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class CompareResult:
    transform: object
    log_jacobian_volume: object
    table: object
    warped_volume: object
    comparison: object  # diffdef.compare.Comparison
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class TrajectoryResult:
    sequence: object
    label_sequence: object
    browser: object
    values: list
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


def _subrange(progress: ProgressFn | None, lo: float, hi: float, prefix: str = "") -> ProgressFn | None:
    if progress is None:
        return None
    return lambda f, msg: progress(lo + (hi - lo) * float(f), prefix + msg)


class DiffDefSceneLogic:
    """Generate / Compare / Trajectory on ``scene`` (a ``vtkMRMLScene``)."""

    def __init__(self, scene=None):
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self._generators: dict = {}

    # ------------------------------------------------------------------------------------------- model
    def generator(self, bundle_path=None, device: str = "auto"):
        """A cached :class:`diffdef.generate.AtlasGenerator`; invalid bundle / device -> :class:`DiffDefError`."""
        from diffdef.bundle import BundleError
        from diffdef.generate import AtlasGenerator

        path = str(bundle_path) if bundle_path else None
        key = (path, device)
        if key not in self._generators:
            try:
                self._generators[key] = AtlasGenerator(path, device=device)
            except BundleError as exc:
                raise DiffDefError(f"The model bundle cannot be used: {exc}") from exc
            except FileNotFoundError as exc:
                raise DiffDefError(f"The model bundle cannot be used: {exc}") from exc
            except ValueError as exc:  # resolve_device: unknown device, or CUDA without a GPU
                raise DiffDefError(str(exc)) from exc
            except RuntimeError as exc:  # e.g. a CUDA device that fails to initialise
                raise DiffDefError(f"The device {device!r} cannot be used ({exc}); choose 'cpu'.") from exc
        return self._generators[key]

    def condition_spec(self, bundle_path=None, device: str = "cpu"):
        return self.generator(bundle_path, device).spec

    @staticmethod
    def validate_conditions(spec, conditions: dict) -> list[str]:
        from diffdef.conditions import ConditionError

        try:
            return spec.validate(conditions)[1]
        except ConditionError as exc:
            raise DiffDefError(str(exc)) from exc

    # ------------------------------------------------------------------------------------------- scene
    def _sequences_logic(self):
        """Slicer's Sequences module logic; outside the application one is made for this scene (it registers the
        sequence browser node class, as the module does at startup)."""
        import slicer

        try:
            return slicer.modules.sequences.logic()
        except AttributeError:
            pass
        if getattr(self, "_own_sequences_logic", None) is None:
            self._own_sequences_logic = slicer.vtkSlicerSequencesLogic()
            self._own_sequences_logic.SetMRMLScene(self.scene)
        return self._own_sequences_logic

    @contextlib.contextmanager
    def _transaction(self):
        """Remove every node added inside the block when it raises (the scene stays as it was)."""
        scene = self.scene
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        scene.StartState(scene.BatchProcessState)
        try:
            yield
        except BaseException:
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            for node in added:
                if node is not None and node.GetID() not in before and scene.IsNodePresent(node):
                    scene.RemoveNode(node)
            raise
        finally:
            scene.EndState(scene.BatchProcessState)

    # ------------------------------------------------------------------------------------------- generate
    def generate(self, conditions: dict, bundle_path=None, device: str = "auto", seed: int = 0,
                 steps: int | None = None, guidance: float | None = None, samples: int | None = None,
                 name: str | None = None, jacobian: bool = False, surfaces: bool = False,
                 calibrate_volumes: bool = True, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None) -> GenerateResult:
        """Atlas for ``conditions`` -> scalar volume (IJKToRAS = template affine), segmentation (named, coloured
        segments), grid transform (FromParent p -> p + u(p), RAS mm) and optionally the Jacobian determinant.
        ``steps``, ``guidance``, ``samples`` (diffusion draws averaged; None = the bundle's): see
        :meth:`diffdef.generate.AtlasGenerator.velocity`; ``calibrate_volumes``: meet each requested volume on the
        1 mm grid (:mod:`diffdef.calibration`)."""
        t0 = time.perf_counter()
        gen = self.generator(bundle_path, device)
        warnings = self.validate_conditions(gen.spec, conditions)
        sampling = self._sampling(steps, guidance, samples, calibrate_volumes)
        atlas = self._generate_atlas(gen, conditions, seed, sampling, jacobian, progress, cancel)
        if progress:
            progress(0.97, "Adding the atlas to the scene")
        name = name or self.atlas_name(gen.spec, atlas.conditions)
        with self._transaction():
            result = self._atlas_nodes(atlas, name, surfaces)
        result.warnings = list(atlas.warnings)
        result.seconds = time.perf_counter() - t0
        if progress:
            progress(1.0, "Done")
        return result

    @staticmethod
    def _sampling(steps, guidance, samples, calibrate_volumes) -> dict:
        """``AtlasGenerator.generate``'s sampling options (None = the bundle's), checked."""
        for what, n in (("sampling steps", steps), ("averaged samples", samples)):
            if n is not None and int(n) < 1:
                raise DiffDefError(f"The number of {what} must be at least 1 (got {n}).")
        return {"steps": steps, "guidance": guidance, "samples": samples, "calibrate_volumes": bool(calibrate_volumes)}

    @staticmethod
    def _generate_atlas(gen, conditions, seed, sampling, jacobian, progress, cancel):
        from diffdef.conditions import ConditionError

        try:
            return gen.generate(conditions, seed=int(seed), **sampling, jacobian=jacobian,
                                progress=_subrange(progress, 0.0, 0.95), cancel=cancel)
        except ConditionError as exc:
            raise DiffDefError(str(exc)) from exc

    @staticmethod
    def atlas_name(spec, values: dict) -> str:
        parts = [f"{c.name} {values[c.name]:g}" for c in spec.conditions if values.get(c.name) is not None]
        return "DiffDef atlas" + (f" ({', '.join(parts)})" if parts else "")

    def _atlas_nodes(self, atlas, name: str, surfaces: bool) -> GenerateResult:
        from diffdef.template import LABELS

        scene = self.scene
        volume = mrml.add_volume(scene, atlas.t1, atlas.grid, name, window_level=(1.0, 0.5))
        volume.SetAttribute("DiffDef.conditions", repr(atlas.conditions))
        volume.SetAttribute("DiffDef.seed", str(atlas.seed))
        segmentation = mrml.add_segmentation(scene, atlas.labels, atlas.grid, LABELS, name + " labels",
                                             reference_volume=volume, surfaces=surfaces)
        transform = mrml.add_grid_transform(scene, atlas.displacement_mm, atlas.grid, name + " deformation")
        transform.SetAttribute("DiffDef.meaning", "FromParent: atlas point p -> template point p + u(p) (RAS mm)")
        jac = None
        if atlas.jacobian is not None:
            jac = mrml.add_volume(scene, atlas.jacobian.astype(np.float32), atlas.grid, name + " Jacobian",
                                  window_level=(1.0, 1.0))
        mrml.show_in_slice_views(scene, background=volume)
        return GenerateResult(volume, segmentation, transform, jac, atlas)

    # ------------------------------------------------------------------------------------------- compare
    def subject_arrays(self, volume_node, segmentation_node=None) -> tuple[np.ndarray, object, np.ndarray | None, list]:
        """(subject ``(i, j, k)`` float32, its Grid, labels ``(i, j, k)`` uint8 or None, warnings); raises
        :class:`DiffDefError` for a missing / 2-D / non-scalar volume, a segmentation on another grid, or an
        empty segmentation."""
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise DiffDefError("Choose a scalar (T1-weighted) volume as the subject.")
        image = volume_node.GetImageData()
        if image is None or image.GetPointData().GetScalars() is None:
            raise DiffDefError(f"The volume {volume_node.GetName()!r} has no voxels.")
        dims = image.GetDimensions()
        if min(dims) < 2:
            raise DiffDefError(f"The volume {volume_node.GetName()!r} is {sum(d > 1 for d in dims)}-D "
                               f"({dims[0]} x {dims[1]} x {dims[2]} voxels): a 3-D brain T1 is needed.")
        if image.GetNumberOfScalarComponents() != 1:
            raise DiffDefError(f"The volume {volume_node.GetName()!r} has {image.GetNumberOfScalarComponents()} "
                               "components per voxel: a scalar (grey-level) T1 is needed.")
        if volume_node.GetParentTransformNode() is not None:
            raise DiffDefError(f"The volume {volume_node.GetName()!r} is under a transform: harden or remove it first.")
        grid = mrml.grid_of_volume(volume_node)
        array = mrml.array_from_volume(volume_node).astype(np.float32)
        if not np.all(np.isfinite(array)) or float(array.max()) <= float(array.min()):
            raise DiffDefError(f"The volume {volume_node.GetName()!r} is constant or has NaN voxels.")
        labels, warnings = None, []
        if segmentation_node is not None:
            labels, warnings = self._subject_labels(segmentation_node, grid)
        return array, grid, labels, warnings

    @staticmethod
    def _subject_labels(segmentation_node, grid) -> tuple[np.ndarray, list]:
        if segmentation_node.GetParentTransformNode() is not None:
            raise DiffDefError(f"The segmentation {segmentation_node.GetName()!r} is under a transform: "
                               "harden or remove it first.")
        segmentation = segmentation_node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise DiffDefError(f"The segmentation {segmentation_node.GetName()!r} is empty: it has no segments.")
        from diffdef.template import LABEL_NAMES

        labels = np.zeros(grid.shape, dtype=np.uint8)
        warnings, used = [], []
        for n in range(segmentation.GetNumberOfSegments()):
            seg_id = segmentation.GetNthSegmentID(n)
            seg_name = segmentation.GetSegment(seg_id).GetName()
            key = re.sub(r"[^a-z ]+", " ", seg_name.lower()).strip()
            key = re.sub(r"\s+", " ", key)
            value = next((v for v, names in SEGMENT_ALIASES.items() if key in names), None)
            if value is None:
                warnings.append(f"Segment {seg_name!r} is not one of the atlas labels "
                                f"({', '.join(LABEL_NAMES[v] for v in SEGMENT_ALIASES)}); it is ignored.")
                continue
            try:
                mask = mrml.segment_mask(segmentation_node, seg_id, grid)
            except ValueError as exc:
                raise DiffDefError(str(exc)) from exc
            labels[mask] = value
            if mask.any():
                used.append(value)
        if not used:
            raise DiffDefError(
                f"The segmentation {segmentation_node.GetName()!r} is empty for the atlas labels: it needs at least one "
                f"non-empty segment named {', '.join(repr(LABEL_NAMES[v]) for v in SEGMENT_ALIASES)}.")
        return labels, warnings

    def compare(self, subject_volume, conditions: dict, subject_segmentation=None, bundle_path=None,
                device: str = "auto", seed: int = 0, atlas=None, name: str | None = None, show: bool = True,
                steps: int | None = None, guidance: float | None = None, samples: int | None = None,
                calibrate_volumes: bool = True, progress: ProgressFn | None = None,
                cancel: CancelFn | None = None) -> CompareResult:
        """Register the subject to its condition-matched atlas (affine, then the learned deformable registration,
        :func:`diffdef.compare.compare_subject`) -> grid transform (subject into atlas space), log-Jacobian map
        (positive = subject larger, diverging colours, foreground of the slice views), table of metrics, and the
        subject resampled into atlas space. ``atlas``: a :class:`diffdef.generate.Atlas` (or a
        :class:`GenerateResult`) for these conditions, to skip generating it again; otherwise it is generated with
        ``steps``, ``guidance`` and ``samples`` (None = the bundle's) and ``calibrate_volumes``."""
        t0 = time.perf_counter()
        sampling = self._sampling(steps, guidance, samples, calibrate_volumes)
        array, grid, labels, warnings = self.subject_arrays(subject_volume, subject_segmentation)
        gen = self.generator(bundle_path, device)
        warnings = self.validate_conditions(gen.spec, conditions) + warnings
        if isinstance(atlas, GenerateResult):
            atlas = atlas.atlas
        from diffdef.compare import compare_subject
        from diffdef.conditions import ConditionError

        try:
            comparison = compare_subject(gen, array, grid, conditions, subject_labels=labels, seed=int(seed),
                                         atlas=atlas, progress=_subrange(progress, 0.0, 0.95), cancel=cancel,
                                         sampling=sampling)
        except ConditionError as exc:
            raise DiffDefError(str(exc)) from exc
        except ValueError as exc:  # the core's clear messages about the subject
            raise DiffDefError(str(exc)) from exc
        if progress:
            progress(0.97, "Adding the comparison to the scene")
        name = name or f"DiffDef {subject_volume.GetName()} vs atlas"
        with self._transaction():
            result = self._compare_nodes(comparison, name, show)
        result.warnings = warnings + list(getattr(comparison, "warnings", []) or [])
        result.seconds = time.perf_counter() - t0
        if progress:
            progress(1.0, "Done")
        return result

    @staticmethod
    def comparison_rows(comparison) -> dict[str, list]:
        """The metrics table of a comparison as columns Metric, Segment, Value, Unit: folding ratio, centrality
        (mean |u| over the subject's brain), the affine volume ratio, then per segment the atlas and subject
        volumes, their difference, and Dice / HD95 when the subject has a segmentation."""
        rows = [("Folding ratio", "", comparison.folding_ratio, "%"),
                ("Centrality (mean displacement)", "", comparison.mean_displacement_mm, "mm"),
                ("Affine volume ratio (subject / atlas)", "", comparison.affine_volume_ratio, "")]
        for row in comparison.rows():
            name = row["name"]
            rows += [("Atlas volume", name, row["atlas_ml"], "ml"),
                     ("Subject volume (aligned)", name, row["subject_ml"], "ml"),
                     ("Volume difference", name, row["difference_percent"], "%")]
            if "dice" in row:
                rows += [("Dice", name, row["dice"], ""), ("HD95", name, row["hd95_mm"], "mm")]
        cols = ("Metric", "Segment", "Value", "Unit")
        return {c: [r[i] if i != 2 else float(r[i]) for r in rows] for i, c in enumerate(cols)}

    @staticmethod
    def total_displacement_mm(comparison) -> np.ndarray:
        """``t(y) = affine_ras(y + w(y)) - y`` on the atlas grid: atlas point -> subject scanner point. Exact
        everywhere under trilinear interpolation (the affine part is linear), so one grid transform holds it."""
        grid = comparison.grid
        ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in grid.shape], indexing="ij"), axis=-1)
        y = grid.voxel_to_world(ijk).astype(np.float32)
        a = np.asarray(comparison.affine_ras, dtype=np.float64)
        moved = y + comparison.inverse_displacement_mm
        return (moved @ a[:3, :3].T.astype(np.float32) + a[:3, 3].astype(np.float32) - y).astype(np.float32)

    def _compare_nodes(self, comparison, name: str, show: bool) -> CompareResult:
        scene = self.scene
        atlas_grid = comparison.grid
        transform = mrml.add_grid_transform(scene, self.total_displacement_mm(comparison), atlas_grid,
                                            name + " transform")
        transform.SetAttribute("DiffDef.meaning", "FromParent: atlas point y -> subject point affine(y + w(y)) (RAS mm); "
                                                  "put the subject under this transform to see it in atlas space")
        transform.SetAttribute("DiffDef.affine_ras", repr(np.asarray(comparison.affine_ras).round(6).tolist()))
        logj = np.asarray(comparison.log_jacobian, dtype=np.float32)
        limit = float(max(np.percentile(np.abs(logj), 99.5), 1e-3))
        color = mrml.diverging_color_node(scene)
        logj_node = mrml.add_volume(scene, logj, atlas_grid, name + " log-Jacobian", window_level=(2 * limit, 0.0),
                                    color_node_id=color.GetID())
        logj_node.SetAttribute("DiffDef.meaning", "log det J of the atlas -> subject map: > 0 subject locally larger")
        warped = mrml.add_volume(scene, np.asarray(comparison.subject_in_atlas, dtype=np.float32), atlas_grid,
                                 name + " subject in atlas space", window_level=(1.0, 0.5))
        table = mrml.add_table(scene, name + " metrics", self.comparison_rows(comparison))
        if show:
            mrml.show_in_slice_views(scene, background=warped, foreground=logj_node, foreground_opacity=0.5)
        return CompareResult(transform, logj_node, table, warped, comparison)

    # ------------------------------------------------------------------------------------------- trajectory
    def trajectory(self, condition: str, values, fixed_conditions: dict | None = None, bundle_path=None,
                   device: str = "auto", seed: int = 0, steps: int | None = None, guidance: float | None = None,
                   samples: int | None = None, name: str | None = None, calibrate_volumes: bool = True,
                   progress: ProgressFn | None = None, cancel: CancelFn | None = None) -> TrajectoryResult:
        """Atlases for ``condition`` at each of ``values`` (the others fixed, same seed) -> a sequence of atlas
        volumes and one of label maps, indexed by the condition, and a sequence browser that plays them."""
        import slicer

        t0 = time.perf_counter()
        gen = self.generator(bundle_path, device)
        if condition not in gen.spec.names:
            raise DiffDefError(f"Unknown condition {condition!r}; the model has {', '.join(gen.spec.names)}.")
        values = [float(v) for v in values]
        if len(values) < 2:
            raise DiffDefError("A trajectory needs at least two values.")
        sampling = self._sampling(steps, guidance, samples, calibrate_volumes)
        unit = next(c.unit for c in gen.spec.conditions if c.name == condition)
        warnings = []
        for v in values:
            warnings += self.validate_conditions(gen.spec, dict(fixed_conditions or {}, **{condition: v}))
        atlases = []
        for n, v in enumerate(values):
            cond = dict(fixed_conditions or {}, **{condition: v})
            atlases.append(self._generate_atlas(gen, cond, seed, sampling, False,
                                                _subrange(progress, n / len(values) * 0.95, (n + 1) / len(values) * 0.95,
                                                          f"Atlas {n + 1}/{len(values)}: "), cancel))
        if progress:
            progress(0.96, "Building the sequence")
        name = name or f"DiffDef trajectory ({condition})"
        scene = self.scene
        with self._transaction():
            seq_logic = self._sequences_logic()
            seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
            lab_seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name + " labels"))
            for s in (seq, lab_seq):
                s.SetIndexName(condition)
                s.SetIndexUnit(unit)
                s.SetIndexType(s.NumericIndex)
            tmp = slicer.vtkMRMLScene()  # data nodes are built outside the scene and copied into the sequences
            for v, atlas in zip(values, atlases):
                vol = tmp.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{name} {condition} {v:g}")
                mrml.set_volume(vol, atlas.t1, atlas.grid)
                lab = tmp.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{name} labels {condition} {v:g}")
                mrml.set_volume(lab, atlas.labels, atlas.grid)
                seq.SetDataNodeAtValue(vol, f"{v:g}")
                lab_seq.SetDataNodeAtValue(lab, f"{v:g}")
            browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", scene.GenerateUniqueName(name + " browser"))
            browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
            browser.AddSynchronizedSequenceNodeID(lab_seq.GetID())
            browser.SetPlaybackLooped(True)
            browser.SetPlaybackRateFps(2.0)
            seq_logic.UpdateProxyNodesFromSequences(browser)
            proxy = browser.GetProxyNode(seq)
            if proxy is not None:
                if proxy.GetDisplayNode() is None:
                    proxy.CreateDefaultDisplayNodes()
                mrml.show_in_slice_views(scene, background=proxy)
        if progress:
            progress(1.0, "Done")
        return TrajectoryResult(seq, lab_seq, browser, values, sorted(set(warnings)), time.perf_counter() - t0)
