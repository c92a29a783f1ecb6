"""Count the calls that would make the host wait for a CUDA device, on a CPU run.

On a GPU, PyTorch queues kernels and the host runs ahead, until a call needs a value or a size that only the
device knows. On a CPU all of these calls are free, so a regression that adds one per step is invisible until
someone profiles on a GPU. :class:`SyncCounter` (a ``TorchFunctionMode`` plus a patched
``torch.cuda.synchronize``) counts them by call site while a block runs:

* a device value read on the host: ``item``, ``tolist``, ``float()`` / ``int()`` / ``bool()`` / ``index`` of a
  tensor, ``cpu()``, ``numpy()`` (on a CPU run every tensor counts: on the GPU run it lives on the device);
* ops whose output size depends on the data: ``nonzero`` / ``argwhere``, ``unique``, ``bincount`` (CUDA reads
  the maximum), ``masked_select``, one-argument ``where``, ``repeat_interleave`` without ``output_size``,
  indexing (get or set) with a boolean tensor;
* explicit ``torch.cuda.synchronize`` (patched into a counting no-op, so it can be counted without CUDA).

Tensors that live on the host in a GPU run too are tracked and never counted: those made by a factory without
a ``device`` argument (``torch.tensor(...)``, ``torch.rand(..., generator=cpu_generator)``), the results of
``cpu()`` / ``numpy()``, and everything computed only from such tensors. So ``values = t.cpu()`` followed by
``int(values[0])`` and ``bool(values[1] > 0)`` counts once.

Limit: on a CPU run ``host.to(device)`` without a dtype change returns ``host`` itself, which then stays a host
tensor here although the GPU run would have a device copy.

Not counted: host-to-device copies (blocking ones do wait on a GPU), and ``.to(device)`` (on a CPU run it
cannot be told apart from a no-op). Calls made from inside torch itself (an optimizer reading its step
counter on the host) are kept apart under ``torch-internal``: they are not syncs of this project's code.

A call site is the first frame outside torch's dispatch wrappers: ``primaps_dist/em/stats.py`` for the
package, ``other`` for tests and scripts.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_TORCH_ROOT = str(Path(torch.__file__).parent)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2] / "primaps_dist")
# Frames of torch that only forward a call to the mode (the user's call site is above them).
_FORWARDING_FILES = {
    str(Path(_TORCH_ROOT) / name) for name in ("overrides.py", "_tensor.py", "functional.py", "_jit_internal.py")
}

_READ_BACKS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__float__: "float()",
    torch.Tensor.__int__: "int()",
    torch.Tensor.__bool__: "bool()",
    torch.Tensor.__index__: "index()",
    torch.Tensor.cpu: "cpu()",
    torch.Tensor.numpy: "numpy()",
}
_DATA_DEPENDENT = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "nonzero",
    torch.Tensor.argwhere: "nonzero",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
}


_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye,
}
_TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy}


def _tensors_in(values: Any) -> list[torch.Tensor]:
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(_tensors_in(value))
    return found


def _may_move(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` may copy to another device (a GPU in a GPU run): ``to``/``cuda`` with a device."""
    if func is torch.Tensor.cuda:
        return True
    if func is not torch.Tensor.to:
        return False
    targets = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(target, (torch.device, str, int, torch.Tensor)) for target in targets)


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


def _sync_kind(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Which synchronising call ``func(*args, **kwargs)`` is, or None."""
    try:
        kind = _READ_BACKS.get(func) or _DATA_DEPENDENT.get(func)
    except TypeError:  # unhashable callables
        return None
    if kind is not None:
        return kind
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "nonzero"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if kwargs.get("output_size") is None and isinstance(repeats, torch.Tensor):
            return "repeat_interleave"
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _is_bool_index(args[1]):
        return "bool-index"
    return None


def _call_site() -> str:
    """``primaps_dist/<module>.py``, ``torch-internal`` or ``other``: the first frame that is not a wrapper."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename == __file__ or filename in _FORWARDING_FILES:
            frame = frame.f_back
            continue
        if filename.startswith(_TORCH_ROOT):
            return "torch-internal"
        if filename.startswith(_PACKAGE_ROOT):
            return "primaps_dist/" + Path(filename).relative_to(_PACKAGE_ROOT).as_posix()
        return "other"
    return "other"


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as counter: ...``; then ``counter.total()``, ``counter.by_site``, ``counter.by_kind``.

    :meth:`reset` starts a new count (e.g. per training step); :meth:`snapshot` returns the count so far.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_site: Counter[str] = Counter()
        self.by_kind: Counter[tuple[str, str]] = Counter()
        self._saved_synchronize = None
        self._host: dict[int, weakref.ref] = {}  # id -> weakref of tensors that are on the host in a GPU run

    def _on_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark_host(self, result: Any) -> None:
        for tensor in _tensors_in(result if isinstance(result, (list, tuple)) else [result]):
            key = id(tensor)
            self._host[key] = weakref.ref(tensor, lambda _ref, key=key: self._host.pop(key, None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors_in(list(args) + list(kwargs.values()))
        host_inputs = bool(inputs) and all(self._on_host(tensor) for tensor in inputs)
        kind = _sync_kind(func, args, kwargs)
        if kind is not None and not host_inputs:
            self.record_call(kind)
        result = func(*args, **kwargs)
        try:
            is_factory, to_host = func in _FACTORIES, func in _TO_HOST
        except TypeError:
            is_factory = to_host = False
        if (host_inputs and not _may_move(func, args, kwargs)) or to_host or (is_factory and kwargs.get("device") is None):
            self._mark_host(result)
        return result

    def record_call(self, kind: str) -> None:
        site = _call_site()
        self.by_site[site] += 1
        self.by_kind[(site, kind)] += 1

    def _counting_synchronize(self, device: Any = None) -> None:
        self.record_call("cuda.synchronize")

    def __enter__(self) -> "SyncCounter":
        self._saved_synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = self._counting_synchronize
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize = self._saved_synchronize
        return super().__exit__(*exc)

    def total(self, include_torch_internal: bool = False) -> int:
        """Synchronising calls of the project's code (and of tests/scripts); torch's own only if asked."""
        return sum(n for site, n in self.by_site.items() if include_torch_internal or site != "torch-internal")

    def package_total(self, prefix: str = "primaps_dist/") -> int:
        """Calls made from package modules whose path starts with ``prefix``."""
        return sum(n for site, n in self.by_site.items() if site.startswith(prefix))

    def snapshot(self) -> Counter[str]:
        return Counter(self.by_site)

    def reset(self) -> None:
        self._host.clear()
        self.by_site.clear()
        self.by_kind.clear()

    def report(self) -> str:
        """One line per (site, kind), most frequent first."""
        return "\n".join(f"{n:5d}  {site}  {kind}" for (site, kind), n in self.by_kind.most_common())
