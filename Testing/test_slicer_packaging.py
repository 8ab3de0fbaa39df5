"""Static checks of the Slicer extension: CMake lists, the .ui, the module source. No Slicer needed."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "DiffDefSlicer"


def cmake_listed_files(cmake: Path) -> list[str]:
    """Every file named in the set(...) lists of a CMakeLists.txt, ${MODULE_NAME} expanded (globs excluded)."""
    text = re.sub(r"#.*", "", cmake.read_text())
    name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text)
    out = []
    for block in re.findall(r"set\(\s*MODULE_PYTHON_\w+\s+(.*?)\)", text, flags=re.S):
        for token in block.split():
            if token.startswith("${") and token.endswith("}") and "/" not in token:
                continue  # a variable holding a glob
            out.append(token.replace("${MODULE_NAME}", name.group(1) if name else "DiffDef"))
    return out


def test_every_listed_file_exists():
    listed = cmake_listed_files(MODULE / "CMakeLists.txt")
    assert listed
    missing = [f for f in listed if not (MODULE / f).is_file()]
    assert not missing, f"CMakeLists.txt names missing files: {missing}"


def test_every_core_and_lib_module_and_resource_is_listed():
    listed = set(cmake_listed_files(MODULE / "CMakeLists.txt"))
    for package in ("diffdef", "DiffDefLib"):
        for path in sorted((MODULE / package).glob("*.py")):
            assert f"{package}/{path.name}" in listed, f"{package}/{path.name} is not in MODULE_PYTHON_SCRIPTS"
    for resource in ("DiffDef.py", "Resources/UI/DiffDef.ui", "Resources/Icons/DiffDef.png"):
        assert resource in listed
    for path in sorted((MODULE / "Resources" / "Template").glob("*.nii.gz")):
        assert f"Resources/Template/{path.name}" in listed
    assert "Resources/Models/default/*" in (MODULE / "CMakeLists.txt").read_text()


def test_extension_metadata():
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key}\s+"[^"]+"\)', top), key
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\)', top)
    assert "add_subdirectory(DiffDefSlicer)" in top
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "DiffDef.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert s4ext["depends"].strip() == "PyTorch" and s4ext["category"].strip() == "Registration"
    assert "slicerMacroBuildScriptedModule" in (MODULE / "CMakeLists.txt").read_text()


def test_icons_are_real_128px_pngs():
    from PIL import Image

    for path in (ROOT / "DiffDef.png", MODULE / "Resources" / "Icons" / "DiffDef.png"):
        with Image.open(path) as im:
            assert im.size == (128, 128)
            pixels = set(im.convert("L").tobytes())
            assert len(pixels) > 20, "the icon looks like a placeholder"


def ui_widget_names() -> set[str]:
    tree = ET.parse(MODULE / "Resources" / "UI" / "DiffDef.ui")
    return {w.get("name") for w in tree.iter("widget")}


def test_every_widget_the_widget_uses_exists_in_the_ui():
    source = (MODULE / "DiffDef.py").read_text()
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
            used.add(node.attr)
    assert used, "the Widget uses no self.ui.<name>?"
    missing = used - ui_widget_names()
    assert not missing, f"DiffDef.py uses widgets that are not in DiffDef.ui: {sorted(missing)}"


def test_parameter_names_in_ui_exist_in_parameter_node():
    tree = ET.parse(MODULE / "Resources" / "UI" / "DiffDef.ui")
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    module = ast.parse((MODULE / "DiffDef.py").read_text())
    cls = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "DiffDefParameterNode")
    fields = {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
    assert bound and bound <= fields, f"unknown parameters bound in the .ui: {sorted(bound - fields)}"


def test_module_structure():
    module = ast.parse((MODULE / "DiffDef.py").read_text())
    classes = {n.name: [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in n.bases]
               for n in module.body if isinstance(n, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["DiffDef"]
    assert "ScriptedLoadableModuleWidget" in classes["DiffDefWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["DiffDefLogic"]
    assert "ScriptedLoadableModuleTest" in classes["DiffDefTest"]
    text = (MODULE / "DiffDef.py").read_text()
    for needle in ("parent.title", "parent.categories", "parent.contributors", "parent.helpText",
                   "parent.acknowledgementText", "arXiv:2403.16776"):
        assert needle in text
    # nothing heavy at import time: the core and torch are imported inside functions only
    top_imports = {a.name.split(".")[0] for n in module.body if isinstance(n, ast.Import) for a in n.names}
    top_imports |= {n.module.split(".")[0] for n in module.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top_imports & {"torch", "diffdef", "monai"}
