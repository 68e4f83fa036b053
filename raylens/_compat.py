"""Import shims for third-party packages that do not import cleanly on a CPU-only stack.

Only one problem lives here today: ``overcomplete`` 0.3.0 imports
``torchvision.transforms`` (for its vision models, which raylens never uses) and
``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9) when the package is
imported. PyPI's torchvision is a CUDA build that breaks a CPU-only torch (and with
it transformers' model imports), so ``scripts/setup.sh`` uninstalls it. Before
importing overcomplete we therefore:

* register a minimal stand-in module for ``torchvision`` / ``torchvision.transforms``
  while overcomplete is imported, when the real one is absent (any attribute access returns a placeholder that
  raises if it is ever *called*), and
* restore ``matplotlib.cm.get_cmap`` from ``matplotlib.colormaps`` when missing.

Everything else in raylens imports overcomplete through :func:`import_overcomplete`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__all__ = ["import_overcomplete"]


class _Unavailable:
    """Placeholder for a torchvision object; fails loudly if actually used."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"torchvision.{self._name} is not installed (raylens removes the CUDA-only "
            "PyPI torchvision on CPU machines); overcomplete's vision models need it."
        )

    def __getattr__(self, item: str) -> "_Unavailable":
        if item.startswith("_"):
            raise AttributeError(item)
        return _Unavailable(f"{self._name}.{item}")


def _install_torchvision_stub() -> bool:
    """Register the stand-in; returns True when it was installed (and must be removed)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    tv = types.ModuleType("torchvision")
    tv.__raylens_stub__ = True
    transforms = types.ModuleType("torchvision.transforms")
    def _getattr(name: str):
        if name.startswith("_"):  # keep inspect/pickle/importlib probes honest
            raise AttributeError(name)
        return _Unavailable(f"transforms.{name}")

    transforms.__getattr__ = _getattr  # type: ignore[attr-defined]
    tv.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = tv
    sys.modules["torchvision.transforms"] = transforms
    return True


def _restore_get_cmap() -> None:
    try:
        import matplotlib
        import matplotlib.cm as cm
    except ImportError:  # pragma: no cover - matplotlib is a dependency of overcomplete
        return
    if not hasattr(cm, "get_cmap"):
        cm.get_cmap = lambda name=None, lut=None: (  # type: ignore[attr-defined]
            matplotlib.colormaps[name] if lut is None else matplotlib.colormaps[name].resampled(lut)
        )


def import_overcomplete():
    """Import and return the ``overcomplete`` package on a CPU-only stack.

    Returns:
        The imported ``overcomplete`` module.

    Raises:
        ImportError: if overcomplete itself (or one of its real dependencies) is missing.
    """
    if "overcomplete" in sys.modules:
        return sys.modules["overcomplete"]
    import torch  # noqa: F401  (import torch before the stub exists)

    stubbed = _install_torchvision_stub()
    _restore_get_cmap()
    try:
        return importlib.import_module("overcomplete")
    finally:
        # The stand-in only has to exist while overcomplete binds its names; leaving it
        # in sys.modules would make transformers' ``find_spec("torchvision")`` fail.
        if stubbed:
            sys.modules.pop("torchvision.transforms", None)
            sys.modules.pop("torchvision", None)
