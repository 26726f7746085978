"""Start-up hook that makes transformers find hf-outliertune without `import hf_outliertune`.

transformers has no plugin entry points: a checkpoint whose `quantization_config` names the
`hf_outliertune` quant method loads, when the plugin was not imported, as a float model whose int8 /
packed weights are cast to floats (garbage outputs, a warning only). The wheel therefore installs
`hf_outliertune-autoload.pth`, which imports this module when Python starts. It only adds a one-shot
import finder (standard library, no torch import): once `transformers.quantizers.auto` is imported, its
`AutoHfQuantizer.supports_quant_method` is wrapped so that the first config naming `hf_outliertune`
imports the plugin, which registers itself, before transformers decides how to load the checkpoint.

`HF_OUTLIERTUNE_AUTOLOAD=0` turns the hook off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from types import ModuleType
from typing import Any, Callable

QUANT_METHOD = "hf_outliertune"
HOOKED_MODULE = "transformers.quantizers.auto"
DISABLE_ENV = "HF_OUTLIERTUNE_AUTOLOAD"


def _names_plugin(quantization_config: Any) -> bool:
    """True for a config.json `quantization_config` dict that names the hf_outliertune method."""
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == QUANT_METHOD


def _import_plugin() -> None:
    """Import hf_outliertune (which registers it); a failure becomes an error naming the fix."""
    try:
        import hf_outliertune  # noqa: F401  (registers the quant method with transformers)
    except Exception as err:
        raise ImportError(
            f"This checkpoint was saved by hf-outliertune (quant_method {QUANT_METHOD!r}), but importing "
            f"hf_outliertune failed ({type(err).__name__}: {err}). Without it transformers would load the "
            "quantized weights as a float model of garbage. Reinstall it: pip install -U hf-outliertune"
        ) from err


def patch(auto: ModuleType) -> None:
    """Wrap `AutoHfQuantizer.supports_quant_method` of `transformers.quantizers.auto` (once)."""
    cls = getattr(auto, "AutoHfQuantizer", None)
    original: Callable[[Any], bool] | None = getattr(cls, "supports_quant_method", None)
    if original is None or getattr(original, "_hf_outliertune_hook", False):
        return

    def supports_quant_method(quantization_config_dict: Any) -> bool:
        if _names_plugin(quantization_config_dict) and QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
            _import_plugin()
        return original(quantization_config_dict)

    supports_quant_method._hf_outliertune_hook = True  # type: ignore[attr-defined]
    cls.supports_quant_method = staticmethod(supports_quant_method)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader of the hooked module, then `patch`; delegates everything else."""

    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package... of the real loader
        return getattr(self._wrapped, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the hooked module it wraps the spec the other finders return."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != HOOKED_MODULE:
            return None
        uninstall()  # one shot; also keeps the lookup below from reaching this finder again
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def uninstall() -> None:
    """Remove the import finder (the wrapper, once applied, stays)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Arm the hook: patch now if transformers' quantizer registry is loaded, else when it is imported."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    loaded = sys.modules.get(HOOKED_MODULE)
    if loaded is not None:
        patch(loaded)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
