"""Weights for backbones: reading local checkpoint files safely, and creating timm models with weights.

Three sources, as configured by ``backbone.weights``:

* ``"random"``: timm's random initialisation (for tests and benchmarks).
* ``"pretrained"``: timm's pretrained weights from the Hugging Face hub (or its local cache). Without network
  this fails fast with a :class:`UserError` that tells the user to download the file and set
  ``backbone.weights=PATH``.
* a path: a ``.pth``/``.pt``/``.bin`` file read with ``torch.load(weights_only=True)`` (never unpickles code) or a
  ``.safetensors`` file. It goes through timm's own loading, so the model's checkpoint filter applies (the
  original DINO release ``dino_deitsmall8_pretrain.pth`` loads into ``vit_small_patch8_224.dino``). Any mismatch is a
  one-line :class:`UserError` naming the file and the first mismatching key.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from primaps_dist.errors import UserError

WEIGHTS_KEY = "backbone.weights"
HUB_PROBE_TIMEOUT_S = 3.0

# Containers that training scripts commonly wrap a state dict in (DINO: "teacher"/"student", Lightning:
# "state_dict", many repos: "model"). The first one present is used.
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "student", "module")
_STRIP_PREFIXES = ("module.", "backbone.", "model.")


def load_weights_file(path: str | os.PathLike, key: str = WEIGHTS_KEY) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``path`` (.safetensors, or a torch pickle without code).

    Wrapped checkpoints are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, DINO's ``{"teacher": ...}``)
    and a prefix shared by the backbone's keys (``module.``, ``backbone.``, ``model.``) is removed; with a
    ``backbone.`` prefix, keys outside it (e.g. a DINO projection head) are dropped.

    Raises:
        UserError naming ``key`` and the file: missing file, not a checkpoint, a pickle that needs code,
        or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise UserError(f"{key}: {path} is not a readable safetensors file ({_first_line(err)})") from None
    else:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several unrelated types for a bad file
            raise UserError(f"{key}: {path} {_torch_load_problem(path, err)}") from None
    state_dict = _unwrap(loaded)
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(state_dict, Mapping):
        tensors = {str(name): value for name, value in state_dict.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{key}: {path} contains no state dict of tensors")
    return _strip_prefix(tensors)


def _torch_load_problem(path: Path, err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, phrased for the user."""
    advice = "save a plain state dict with torch.save(model.state_dict(), path), or use .safetensors"
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"holds Python objects ({found.group(1)}) besides tensors; refusing to unpickle code ({advice})"
    with open(path, "rb") as handle:
        is_pickle = handle.read(1) == b"\x80"
    if is_pickle:
        return f"is a Python pickle that the safe tensor loader cannot read; refusing to unpickle it ({advice})"
    if isinstance(err, EOFError):
        return "is not a PyTorch checkpoint (empty or truncated)"
    if "Weights only load failed" in str(err):
        return "is not a PyTorch checkpoint (neither a torch zip archive nor a tensor pickle)"
    return f"is not a PyTorch checkpoint ({_first_line(err)})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _unwrap(loaded: Any) -> Any:
    while isinstance(loaded, Mapping):
        if any(isinstance(value, torch.Tensor) for value in loaded.values()):
            return loaded
        for wrapper in _WRAPPER_KEYS:
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
        else:
            return loaded
    return loaded


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        inside = {name[len(prefix):]: value for name, value in state_dict.items() if name.startswith(prefix)}
        if prefix == "backbone." and inside:
            return inside
        if inside and len(inside) == len(state_dict):
            return inside
    return state_dict


def first_mismatch(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> str | None:
    """A readable description of the first difference between ``state_dict`` and ``model``'s, or None."""
    expected = model.state_dict()
    for name, value in expected.items():
        if name not in state_dict:
            return f"key {name!r} is missing from the file"
        if tuple(state_dict[name].shape) != tuple(value.shape):
            return (
                f"key {name!r} has shape {list(state_dict[name].shape)} in the file, "
                f"{list(value.shape)} in the model"
            )
    for name in state_dict:
        if name not in expected:
            return f"key {name!r} in the file is not in the model"
    return None


# ------------------------------------------------------------------------------------------------ the hub


def _hub_endpoint_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout_s``.

    huggingface_hub retries a failing request five times with back-off (about 45 s per file without network),
    so the builder probes once and switches the hub to offline mode (local cache only) when nothing answers.
    With a proxy configured the direct probe says nothing, so it is skipped.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable() -> Iterator[None]:
    """Run the body with the hub in offline mode (cache only) when the endpoint does not answer quickly."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _hub_endpoint_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


# ------------------------------------------------------------------------------------------------ timm


def create_timm_model(model_name: str, weights: str, key: str = WEIGHTS_KEY, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)`` with ``weights`` = ``"random"``, ``"pretrained"`` or a path.

    The model is the full timm model (with its classifier, as the checkpoints have it), in eval mode, on the CPU;
    weights are loaded strictly. Raises UserError (naming ``key``) for unusable weights, ``TypeError`` when the
    model does not take one of ``kwargs`` (callers use this to probe e.g. ``dynamic_img_size``).
    """
    import timm

    if not timm.is_model(model_name):
        raise UserError(f"backbone.name: unknown timm model {model_name!r}")
    if weights == "random":
        return timm.create_model(model_name, pretrained=False, **kwargs).eval()
    if weights == "pretrained":
        try:
            with _hub_offline_unless_reachable():
                model = timm.create_model(model_name, pretrained=True, **kwargs)
        except TypeError:
            raise
        except Exception as err:
            raise UserError(
                f"{key}: could not get the pretrained weights of {model_name} from the Hugging Face hub "
                f"({_first_line(err)}); download the weights file on a machine with internet and set "
                f"{key}=PATH"
            ) from None
        return model.eval()
    state_dict = load_weights_file(weights, key)
    return load_timm_state_dict(model_name, state_dict, source=str(weights), key=key, **kwargs)


def load_timm_state_dict(
    model_name: str, state_dict: dict[str, torch.Tensor], *, source: str, key: str = WEIGHTS_KEY, **kwargs: Any
) -> nn.Module:
    """Create ``model_name`` and load ``state_dict`` through timm (its checkpoint filter applies), strictly."""
    import timm

    # timm loads strictly only when the model's class count equals the pretrained config's; keep it that way
    # so that a file that does not fit is an error instead of a silently half-random model.
    kwargs.pop("num_classes", None)
    try:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state_dict), **kwargs
        )
    except TypeError:
        raise
    except Exception as err:
        with torch.device("meta"):  # shapes only: no memory, no slow random init
            reference = timm.create_model(model_name, pretrained=False, **kwargs)
        problem = first_mismatch(state_dict, reference) or _first_line(err)
        raise UserError(f"{key}: {source} does not fit {model_name}: {problem}") from None
    # The overlay keeps a reference to the state dict in the model's config; drop it to free the memory.
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg["state_dict"] = None
    return model.eval()
