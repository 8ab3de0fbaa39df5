"""DiffDef: conditional brain atlases from diffusion-generated deformation fields, in 3D Slicer.

Module / Widget / Logic / Test. The Widget is thin (GUI state in a parameter node, progress and cancel); the Logic
(:class:`DiffDefLib.logic.DiffDefSceneLogic`) takes and returns MRML nodes and calls the core library ``diffdef``,
which is imported only after its Python dependencies are installed (with the user's consent).
"""
from __future__ import annotations

import json
import logging
import os

import ctk
import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from DiffDefLib.logic import DiffDefError, DiffDefSceneLogic

CITATION = ("Starck S., Sideri-Lampretsa V., Kainz B., Menten M. J., Mueller T. T., Rueckert D. "
            "Diff-Def: Diffusion-Generated Deformation Fields for Conditional Atlases. arXiv:2403.16776 (2024).")


class DiffDef(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DiffDef"
        self.parent.categories = ["Registration", "Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DiffDef contributors"]
        self.parent.helpText = """
Generate a <b>conditional brain atlas</b> (for example for a given age and ventricular volume) as a deformation of
the MNI ICBM152 2009a template, made by a latent diffusion model (Diff-Def). Outputs: the atlas T1, its labels
(CSF, gray matter, white matter, lateral ventricles) as a segmentation, and the deformation as a grid transform.
<b>Compare subject</b> registers a patient's T1 (and optional segmentation) to its condition-matched atlas and shows
where it is larger (red) or smaller (blue) as a log-Jacobian overlay, with Dice / HD95 / volumes in a table.
<b>Trajectory</b> makes a sequence of atlases across a condition range (play it with the sequence browser).
"""
        self.parent.acknowledgementText = f"""
Method: {CITATION} Template: MNI ICBM152 2009a (McConnell Brain Imaging Centre; see the licence shipped with the
template). Built on PyTorch, MONAI, SimpleITK and 3D Slicer.
"""


@parameterNodeWrapper
class DiffDefParameterNode:
    """GUI state, saved with the scene. ``conditionValues``: JSON ``{name: value}`` of the current model's conditions."""

    bundlePath: str = ""
    device: str = "auto"
    conditionValues: str = "{}"
    seed: int = 0
    steps: int = 0  # 0: the bundle's default
    samples: int = 0  # diffusion draws averaged into one atlas; 0: the bundle's default
    surfaces: bool = False
    calibrateVolumes: bool = True  # meet each requested volume on the 1 mm grid (diffdef.calibration)
    subjectVolume: slicer.vtkMRMLScalarVolumeNode
    subjectSegmentation: slicer.vtkMRMLSegmentationNode
    trajectoryCondition: str = ""
    trajectoryStart: float = 50.0
    trajectoryStop: float = 80.0
    trajectoryCount: int = 5


class DiffDefWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._conditionSpinBoxes = {}
        self._cancelRequested = False
        self._busy = False
        self._spec = None

    # ------------------------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DiffDef.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DiffDefLogic()

        self.ui.deviceComboBox.clear()
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        self.ui.bundlePathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.ui.extrapolationLabel.setVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.bundlePathLineEdit.connect("currentPathChanged(QString)", self.onBundlePathChanged)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", lambda text: self.onLoadModel())
        self.ui.defaultModelButton.connect("clicked(bool)", self.onDefaultModel)
        self.ui.generateButton.connect("clicked(bool)", self.onGenerate)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.trajectoryButton.connect("clicked(bool)", self.onTrajectory)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)

        self.initializeParameterNode()
        self.ui.bundlePathLineEdit.currentPath = self._parameterNode.bundlePath
        self.updateDependencyStatus()

    def cleanup(self):
        self.removeObservers()
        self._disconnect()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._disconnect()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.subjectVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node and not node.GetAttribute("DiffDef.conditions"):
                self._parameterNode.subjectVolume = node

    def _disconnect(self):
        if self._parameterNode and self._parameterNodeGuiTag:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def setParameterNode(self, inputParameterNode):
        self._disconnect()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # widgets bound through their "SlicerParameterName" property in the .ui
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        ready = self._spec is not None and not self._busy
        self.ui.generateButton.enabled = ready
        self.ui.trajectoryButton.enabled = ready and bool(self._parameterNode and self._parameterNode.trajectoryCondition)
        self.ui.compareButton.enabled = ready and bool(self._parameterNode and self._parameterNode.subjectVolume)

    # ------------------------------------------------------------------------------------------- dependencies
    def updateDependencyStatus(self):
        from DiffDefLib import dependencies

        need = dependencies.missing()
        self.ui.installButton.setVisible(bool(need))
        if need:
            self.ui.statusLabel.text = "Python packages needed: " + ", ".join(need) + " (installed on first use)."
        else:
            self.onLoadModel(quiet=True)

    def ensureDependencies(self) -> bool:
        from DiffDefLib import dependencies

        if not dependencies.missing():
            return True
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            ok = dependencies.install(confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, "DiffDef"),
                                      log=lambda msg: self._status(msg))
            self.ui.installButton.setVisible(bool(dependencies.missing()))
            return ok
        return False

    def onInstallDependencies(self):
        if self.ensureDependencies():
            self.onLoadModel()

    # ------------------------------------------------------------------------------------------- model
    def _bundle(self):
        return self._parameterNode.bundlePath or None

    def onDefaultModel(self):
        self.ui.bundlePathLineEdit.currentPath = ""
        self.onBundlePathChanged("")

    def onBundlePathChanged(self, path):
        if self._parameterNode is None:
            return
        self._parameterNode.bundlePath = path
        self.onLoadModel()

    def onLoadModel(self, quiet=False):
        if self._parameterNode is None or (not quiet and not self.ensureDependencies()):
            return
        try:
            spec = self.logic.condition_spec(self._bundle(), self._parameterNode.device)
        except DiffDefError as exc:
            self._spec = None
            self.ui.modelInfoLabel.text = str(exc)
            if not quiet:
                slicer.util.errorDisplay(str(exc), windowTitle="DiffDef")
            self._checkCanApply()
            return
        self._spec = spec
        gen = self.logic.generator(self._bundle(), self._parameterNode.device)
        self.ui.modelInfoLabel.text = (f"Model: {gen.bundle.path.name} on {gen.device.type}; conditions: "
                                       f"{spec.valid_names()}")
        self._buildConditionWidgets(spec)
        self._checkCanApply()

    def _buildConditionWidgets(self, spec):
        layout = self.ui.conditionsFrame.layout()
        while layout.count():
            item = layout.takeAt(0)
            if item.widget():
                item.widget().deleteLater()
        self._conditionSpinBoxes = {}
        saved = json.loads(self._parameterNode.conditionValues or "{}")
        self.ui.trajectoryConditionComboBox.clear()
        for c in spec.conditions:
            box = qt.QDoubleSpinBox()
            box.setRange(0.0 if c.non_negative else -1e6, 1e6)
            box.setDecimals(1)
            box.setSuffix(f" {c.unit}")
            box.setValue(float(saved.get(c.name, (c.low + c.high) / 2)))
            box.setToolTip(f"{c.describe()}. Values outside the training range are allowed but extrapolated.")
            box.connect("valueChanged(double)", self._onConditionChanged)
            layout.addRow(f"{c.name} ({c.low:g}-{c.high:g} {c.unit}):", box)
            self._conditionSpinBoxes[c.name] = box
            self.ui.trajectoryConditionComboBox.addItem(c.name)
        if spec.names and self._parameterNode.trajectoryCondition not in spec.names:
            self._parameterNode.trajectoryCondition = spec.names[0]
        self._onConditionChanged()

    def _conditions(self) -> dict:
        return {name: box.value for name, box in self._conditionSpinBoxes.items()}

    def _onConditionChanged(self, value=None):
        values = self._conditions()
        self._parameterNode.conditionValues = json.dumps(values)
        warnings = []
        try:
            warnings = self.logic.validate_conditions(self._spec, values) if self._spec else []
        except DiffDefError as exc:
            warnings = [str(exc)]
        self.ui.extrapolationLabel.text = "\n".join(warnings)
        self.ui.extrapolationLabel.setVisible(bool(warnings))

    # ------------------------------------------------------------------------------------------- running
    def _status(self, message):
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def _progress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # keeps the GUI alive and lets the Cancel button be pressed

    def _cancelled(self):
        slicer.app.processEvents()
        return self._cancelRequested

    def onCancel(self):
        self._cancelRequested = True
        self.ui.statusLabel.text = "Cancelling..."

    def _run(self, title, function):
        if self._busy or not self.ensureDependencies():
            return None
        from diffdef.sampling import Cancelled

        self._busy, self._cancelRequested = True, False
        self._checkCanApply()
        self.ui.progressBar.value = 0
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.setVisible(True)
        try:
            with slicer.util.WaitCursor():
                result = function()
            self.ui.statusLabel.text = f"{title} finished in {result.seconds:.1f} s."
            if result.warnings:
                slicer.util.warningDisplay("\n".join(result.warnings), windowTitle="DiffDef")
            return result
        except Cancelled:
            self.ui.statusLabel.text = f"{title} cancelled; the scene is unchanged."
        except DiffDefError as exc:
            self.ui.statusLabel.text = f"{title} failed."
            slicer.util.errorDisplay(str(exc), windowTitle="DiffDef")
        except Exception as exc:  # unexpected: show it, with the traceback in the log
            logging.exception("DiffDef %s failed", title)
            self.ui.statusLabel.text = f"{title} failed."
            slicer.util.errorDisplay(f"{title} failed: {exc}", windowTitle="DiffDef")
        finally:
            self._busy = False
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setVisible(False)
            self._checkCanApply()
        return None

    def _common(self):
        p = self._parameterNode
        return dict(bundle_path=self._bundle(), device=p.device, seed=p.seed, calibrate_volumes=p.calibrateVolumes,
                    progress=self._progress, cancel=self._cancelled)

    def onGenerate(self):
        p = self._parameterNode
        result = self._run("Generate", lambda: self.logic.generate(
            self._conditions(), steps=p.steps or None, samples=p.samples or None, surfaces=p.surfaces,
            **self._common()))
        if result is not None:
            slicer.util.setSliceViewerLayers(background=result.atlas_volume, fit=True)
            self._lastAtlas = result

    def onCompare(self):
        p = self._parameterNode
        atlas = getattr(self, "_lastAtlas", None)
        if atlas is not None and (atlas.atlas.conditions != self.logic.generator(self._bundle(), p.device)
                                  .spec.validate(self._conditions())[0] or atlas.atlas.seed != p.seed
                                  or atlas.atlas.sampling.get("calibrate_volumes") != p.calibrateVolumes
                                  or any(p_value and atlas.atlas.sampling[key] != p_value
                                         for key, p_value in (("steps", p.steps), ("samples", p.samples)))):
            atlas = None
        result = self._run("Compare", lambda: self.logic.compare(
            p.subjectVolume, self._conditions(), subject_segmentation=p.subjectSegmentation, atlas=atlas,
            steps=p.steps or None, samples=p.samples or None, **self._common()))
        if result is not None:
            slicer.util.setSliceViewerLayers(background=result.warped_volume, foreground=result.log_jacobian_volume,
                                             foregroundOpacity=0.5, fit=True)
            self._showTable(result.table)

    def onTrajectory(self):
        p = self._parameterNode
        n = max(2, p.trajectoryCount)
        values = [p.trajectoryStart + (p.trajectoryStop - p.trajectoryStart) * i / (n - 1) for i in range(n)]
        fixed = {k: v for k, v in self._conditions().items() if k != p.trajectoryCondition}
        common = self._common()
        result = self._run("Trajectory", lambda: self.logic.trajectory(
            p.trajectoryCondition, values, fixed, steps=p.steps or None, samples=p.samples or None, **common))
        if result is not None:
            slicer.modules.sequences.toolBar().setActiveBrowserNode(result.browser)
            slicer.modules.sequences.setToolBarVisible(True)

    @staticmethod
    def _showTable(table):
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


class DiffDefLogic(ScriptedLoadableModuleLogic, DiffDefSceneLogic):
    """The module logic: Slicer's parameter node plus :class:`DiffDefLib.logic.DiffDefSceneLogic` on
    ``slicer.mrmlScene`` (generate / compare / trajectory take and return MRML nodes)."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        DiffDefSceneLogic.__init__(self, scene or slicer.mrmlScene)

    def getParameterNode(self):
        return DiffDefParameterNode(super().getParameterNode())


class DiffDefTest(ScriptedLoadableModuleTest):
    """Self-test in the application: generate with the shipped model, check geometry, the transform and the
    segment volumes against the core, compare the atlas with itself, make a two-frame trajectory."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DiffDef1()

    def test_DiffDef1(self):
        import numpy as np

        from DiffDefLib import dependencies, mrml

        if dependencies.missing():
            self.delayDisplay("DiffDef self-test skipped: Python dependencies are not installed yet.")
            return
        from diffdef.bundle import DEFAULT_BUNDLE

        if not (DEFAULT_BUNDLE / "model.json").is_file():
            self.delayDisplay("DiffDef self-test skipped: no bundled model.")
            return
        logic = DiffDefLogic()
        spec = logic.condition_spec(None, "cpu")
        conditions = {c.name: (c.low + c.high) / 2 for c in spec.conditions}
        self.delayDisplay("Generating an atlas")
        result = logic.generate(conditions, device="cpu", steps=2)
        atlas = result.atlas
        ijk_to_ras = vtk.vtkMatrix4x4()
        result.atlas_volume.GetIJKToRASMatrix(ijk_to_ras)
        np.testing.assert_allclose(mrml.numpy_matrix(ijk_to_ras), atlas.grid.affine, atol=1e-6)
        p = atlas.grid.voxel_to_world(np.array([90.0, 110.0, 80.0]))
        moved = np.array(result.transform.GetTransformFromParent().TransformPoint(*p))
        np.testing.assert_allclose(moved - p, atlas.displacement_mm[90, 110, 80], atol=1e-4)
        for name, ml in atlas.label_volumes_ml.items():
            self.assertAlmostEqual(mrml.segment_volume_ml(result.segmentation, name), ml, places=3)
        self.delayDisplay("Comparing the atlas with itself")
        cmp = logic.compare(result.atlas_volume, conditions, device="cpu", atlas=result)
        self.assertGreater(cmp.table.GetNumberOfRows(), 3)
        self.delayDisplay("DiffDef self-test passed")
