"""Model families: one file each (module, weight map and registry record), shared blocks in layers.py.

Importing this package imports each of its modules once; every family file
registers its :class:`~.registry.Family` record where it is defined, so a new
family is one new file here (see :mod:`.registry`).
"""

from __future__ import annotations

import importlib
import pkgutil

from .registry import Family, OptionalPart, families, family_names, get_family, register, route

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Family", "OptionalPart", "families", "family_names", "get_family", "register", "route"]
