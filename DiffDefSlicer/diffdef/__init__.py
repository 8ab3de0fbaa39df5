"""DiffDef core: conditional brain atlases from diffusion-generated deformation fields.

Pure Python (torch, MONAI, nibabel, SimpleITK); no Slicer, Qt or training imports.
"""
__version__ = "0.1.0"
