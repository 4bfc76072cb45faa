"""Hand-written kernels (TVMScript PrimFuncs and TIR expressions), one per file.

A kernel file builds PrimFuncs only; the passes in ``compiler/passes/``
decide where a kernel replaces a Relax op.
"""
