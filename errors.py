"""Errors that read well in ComfyUI's error dialog.

The dialog names an exception by ``module.qualname`` of its type unless the module is
``builtins`` (``full_type_name`` in ComfyUI's ``execution.py``, the same on 0.3.64 and the 0.38
line), so an error of this pack would read ``ComfyUI-UltraRes.models.clear.stripes.StripeError``.
A subclass of :class:`NamedError` presents itself as defined in ``builtins``: the dialog says
``StripeError``. It still pickles (a rank process hands its error to the host), rebuilt from
the module it was really defined in. Host-free: the core (``kernels``, ``models``) uses it.
"""

from __future__ import annotations

import importlib

__all__ = ["NamedError"]


class NamedError(Exception):
    """Base of the pack's errors a user may see: shown by its bare class name, still pickled."""

    defined_in = __name__

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.defined_in = cls.__module__
        cls.__module__ = "builtins"

    def __reduce__(self):
        return _rebuild, (self.defined_in, type(self).__qualname__, self.args)


def _rebuild(module: str, qualname: str, args: tuple) -> NamedError:
    return getattr(importlib.import_module(module), qualname)(*args)
