"""What a step would launch on a GPU, counted on CPU tensors under the Triton interpreter.

`DeviceWork` is a TorchDispatchMode plus a hook on Triton launches. Inside it:

- every Triton launch counts as one device launch (the aten ops the interpreter runs to emulate a
  kernel do not count);
- every aten op that would run a kernel on a device tensor counts as one launch: views,
  allocations (empty), and ops whose tensors all come from host data (torch.tensor(...) and what
  is computed from it alone: host work on CUDA too) do not;
- gmt_kernels::radix_select runs what CUDA runs, the Triton select kernel (on CPU tensors the
  dispatcher would pick the C++ kernel), and the Triton backend's ops are opened up so that the
  aten ops of their Python launchers count too;
- `host_data` lists every op that makes a tensor out of host data (lift_fresh: torch.tensor,
  pin_memory) or reads a device value on the host (_local_scalar_dense: .item()); on a GPU these
  are host-to-device copies or synchronisations, which a captured CUDA graph cannot contain.

With `stub_kernels=True` Triton launches are counted but not run, so that the host time of a step
can be measured without the interpreter's cost (tensors then keep their values).
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::t", "aten::select", "aten::slice",
    "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::transpose",
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_reshape_alias", "aten::view_as_real", "aten::unbind", "aten::split", "aten::lift_fresh",
    "aten::is_nonzero", "aten::_has_compatible_shallow_copy_type", "aten::resolve_conj", "aten::resolve_neg",
    "aten::is_same_size", "aten::_local_scalar_dense",
}
_HOST_DATA = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::_pin_memory", "aten::pin_memory",
              "aten::_local_scalar_dense"}


def _tensors(tree):
    out = []
    for x in torch.utils._pytree.tree_leaves(tree):
        if isinstance(x, torch.Tensor):
            out.append(x)
    return out


class DeviceWork(TorchDispatchMode):
    def __init__(self, stub_kernels: bool = False):
        super().__init__()
        self.launches: Counter = Counter()  # what was launched, by name
        self.host_data: list = []  # ops that took host data or synchronised
        self.stub_kernels = stub_kernels
        self._host_born: dict = {}  # id -> weakref of tensors made from host data alone
        self._in_kernel = 0

    @property
    def total(self) -> int:
        return sum(self.launches.values())

    # -- Triton launches ------------------------------------------------------------------------

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > 1:  # re-entered to see inside a gmt_kernels op: the hook is in place
            return super().__enter__()
        self._original_run = InterpretedFunction.run
        work = self

        def counted_run(kernel, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            work.launches[f"triton:{kernel.__name__}"] += 1
            if work.stub_kernels:
                return None
            work._in_kernel += 1
            try:
                return work._original_run(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                work._in_kernel -= 1

        InterpretedFunction.run = counted_run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        self._depth -= 1
        if self._depth == 0:
            InterpretedFunction.run = self._original_run
        return super().__exit__(*exc)

    # -- aten ops ------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_kernel:
            return func(*args, **kwargs)
        name = func._schema.name
        if name.startswith("gmt_kernels::"):
            return self._gmt_op(name, args, kwargs)
        if name in _HOST_DATA:
            self.host_data.append(name)
        inputs = _tensors((args, kwargs))
        out = func(*args, **kwargs)
        if name in ("aten::lift_fresh", "aten::lift_fresh_copy") or (inputs and all(self._is_host_born(t) for t in inputs)):
            for t in _tensors(out):
                self._host_born[id(t)] = weakref.ref(t)
        elif name not in _NO_KERNEL and not name.startswith("profiler::") and not self._is_view(func, inputs, out):
            self.launches[name] += 1
        return out

    @staticmethod
    def _is_view(func, inputs, out) -> bool:
        """reshape, flatten, contiguous ... that returned a view of their input: no kernel ran."""
        if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
            return False  # an in-place op returns its input, and it ran
        storages = {t.untyped_storage().data_ptr() for t in inputs if t.untyped_storage().nbytes()}
        outs = _tensors(out)
        return bool(outs) and all(t.untyped_storage().data_ptr() in storages for t in outs)

    def _is_host_born(self, t) -> bool:
        ref = self._host_born.get(id(t))
        return ref is not None and ref() is t

    def _gmt_op(self, name, args, kwargs):
        from . import _histogram_kernel, _masked_adamw_kernel
        from .select import launch_select

        impl = {
            "gmt_kernels::triton_radix_histogram": _histogram_kernel,
            "gmt_kernels::triton_masked_adamw": _masked_adamw_kernel,
            "gmt_kernels::radix_select": launch_select,  # what the CUDA key runs
            "gmt_kernels::triton_radix_select": launch_select,
        }.get(name)
        if impl is None:
            raise RuntimeError(f"DeviceWork counts the Triton backend's ops; {name} runs another backend's kernel.")
        with self:  # the launcher's own aten ops count too
            return impl(*args, **kwargs)
