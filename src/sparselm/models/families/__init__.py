"""The built-in model families, one module each. Every module of this package is imported with
``sparselm.models`` and registers its family and presets: adding an architecture is adding a file
here, with no list to edit."""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
