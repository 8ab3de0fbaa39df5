"""Slicer-side helpers of the DiffDef module: MRML conversions (:mod:`.mrml`), the scene Logic (:mod:`.logic`),
dependency installation (:mod:`.dependencies`). They import no Qt and need no running Slicer application."""
