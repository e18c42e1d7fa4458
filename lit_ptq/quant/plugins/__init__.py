"""Model-family plugins: each module in this package registers one family on import, except
``toolkit`` (what the families share: attention, MLP and residual points, the ``seed``
placement, the ``blocks`` and ``norm_linear_pairs`` helpers) and the ``_``-prefixed modules
(quantized layers of one model library).

Adding a family is one new file here: it imports its models (this package is the only part
of ``lit_ptq.quant`` that does), defines quantized subclasses of their modules (with the
toolkit's mixins where they fit) and calls :func:`lit_ptq.quant.registry.register_family`.
Every module of the package is imported when ``lit_ptq.quant`` is.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["load_plugins"]


def load_plugins() -> list[str]:
    """Import every plugin module of this package (once); return their names."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names
