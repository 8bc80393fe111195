"""DeviceConstants: the one cache of small tensors made from host data (selection state, scope
indices, the Triton launchers' tables), so that a steady-state step copies nothing host to device."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class DeviceConstants:
    """Tensors made from host data once per key and kept on the device, read-only (callers never
    write them in place): a steady-state step then copies nothing host to device, so it can be
    captured in a CUDA graph. The least recently used entry goes once there are more than `size`."""

    def __init__(self, size: int = 64):
        self._entries: "OrderedDict[tuple, object]" = OrderedDict()
        self._size = size

    def get(self, key: tuple, make: Callable[[], object]):
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        hit = self._entries[key] = make()
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return hit
