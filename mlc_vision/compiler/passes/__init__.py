"""Relax-level passes of our pipelines, one per file (``compiler/pipeline.py`` orders them)."""
