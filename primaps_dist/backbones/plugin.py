"""User-supplied backbones: ``backbone.name = "module:function"``.

Contract for the plug-in:

* ``module`` is an importable module name (``my_pkg.features``) or a path to a ``.py`` file
  (``path/to/features.py``); ``function(cfg)`` receives the :class:`~primaps_dist.config.BackboneConfig` and
  returns an ``nn.Module``.
* The module receives the raw images, ``[B, 3, H, W]`` float32 RGB in 0..1 (no normalisation is applied: do your
  own), and returns features ``[B, C, H/stride, W/stride]``.
* The stride comes from the module's ``stride`` attribute or from ``backbone.stride`` (one of them is required;
  when both are given they must agree). ``out_channels`` comes from the module's attribute of that name, or
  from one forward pass on a small blank image.
* The plug-in handles ``cfg.weights`` itself (``weights.load_weights_file`` reads a file with clear errors).
  The builder freezes the module (no gradients, eval mode).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from primaps_dist.backbones.extractor import FeatureExtractor
from primaps_dist.errors import ConfigError, UserError

NAME_KEY = "backbone.name"


def _import_module(module_name: str, spec_text: str) -> ModuleType:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"{NAME_KEY}: plug-in file not found: {path} (from {spec_text!r})")
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            unique = f"primaps_dist_plugin_{digest}"
            spec = importlib.util.spec_from_file_location(unique, path)
            if spec is None or spec.loader is None:
                raise UserError(f"{NAME_KEY}: cannot import plug-in file {path} (from {spec_text!r})")
            module = importlib.util.module_from_spec(spec)
            sys.modules[unique] = module
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except UserError:
        raise
    except ImportError as err:
        raise UserError(
            f"{NAME_KEY}: cannot import plug-in module {module_name!r} from {spec_text!r} ({err})"
        ) from None
    except SyntaxError as err:
        raise UserError(f"{NAME_KEY}: plug-in {spec_text!r} has a syntax error ({err})") from None


def resolve_plugin(spec_text: str) -> Any:
    """The callable named by ``"module:function"`` (UserError naming ``backbone.name`` when it is not there)."""
    module_name, _, function_name = spec_text.rpartition(":")
    if not module_name or not function_name:
        raise UserError(f"{NAME_KEY}: plug-in {spec_text!r} must look like 'module:function'")
    module = _import_module(module_name, spec_text)
    function = getattr(module, function_name, None)
    if function is None or not callable(function):
        raise UserError(f"{NAME_KEY}: module {module_name!r} has no callable {function_name!r} (from {spec_text!r})")
    return function


def plugin_extractor(cfg: Any, device: torch.device) -> FeatureExtractor:
    """Build the plug-in named by ``cfg.name`` and wrap it frozen (see the module docstring for the contract)."""
    function = resolve_plugin(cfg.name)
    module = function(cfg)
    if not isinstance(module, nn.Module):
        raise UserError(f"{NAME_KEY}: plug-in {cfg.name!r} returned {type(module).__name__}, not a torch.nn.Module")
    module_stride = int(getattr(module, "stride", 0) or 0)
    if cfg.stride and module_stride and cfg.stride != module_stride:
        raise ConfigError("backbone.stride", f"{cfg.stride} disagrees with the plug-in's stride {module_stride}")
    stride = cfg.stride or module_stride
    if stride < 1:
        raise ConfigError("backbone.stride", f"plug-in {cfg.name!r} has no 'stride' attribute; set backbone.stride")
    module = module.to(device).eval()
    out_channels = int(getattr(module, "out_channels", 0) or 0)
    if out_channels < 1:
        out_channels = _probe_channels(module, stride, device, cfg.name)
    return FeatureExtractor(module, name=cfg.name, stride=stride, out_channels=out_channels, precision=cfg.precision)


def _probe_channels(module: nn.Module, stride: int, device: torch.device, name: str) -> int:
    side = stride * max(4, -(-64 // stride))
    with torch.no_grad():
        output = module(torch.zeros(1, 3, side, side, device=device))
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        raise UserError(f"{NAME_KEY}: plug-in {name!r} must return a [B, C, h, w] tensor")
    return int(output.shape[1])
