"""`no_host_sync()`: fail on any tensor operation that makes the host wait for the device (on CUDA: `.item()`,
`nonzero`, boolean-mask indexing, `int(tensor)`, ...). On a CPU nothing waits, so the operations themselves are
intercepted (a `TorchFunctionMode` sees every torch call from Python) and raise `HostSync`; on CUDA,
`torch.cuda.set_sync_debug_mode("error")` catches the real synchronisations as well."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# Each of these needs a value (or a data-dependent shape) on the host.
_SYNCING = {
    T.item, T.tolist, T.nonzero, torch.nonzero, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy,
    torch.argwhere, T.argwhere, torch.masked_select, T.masked_select, torch.unique, T.unique,
    torch.equal, T.equal, torch.is_nonzero, T.is_nonzero,
}


class HostSync(AssertionError):
    pass


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _NoSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING:
            raise HostSync(f"host sync: {getattr(func, '__qualname__', func)}")
        if func in (T.__getitem__, T.__setitem__, T.index_put_, T.index_put) and len(args) > 1 and _bool_index(args[1]):
            raise HostSync(f"host sync: boolean-mask indexing ({getattr(func, '__qualname__', func)})")
        if func in (torch.repeat_interleave, T.repeat_interleave) and "output_size" not in kwargs and len(args) > 1:
            raise HostSync("host sync: repeat_interleave without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _checks_off(cuda: bool):
    from torch.overrides import _pop_mode_temporarily

    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    try:
        with _pop_mode_temporarily():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def no_host_sync(exempt=()):
    """`exempt`: `(owner, attribute)` pairs naming functions that are not l1ra's and may sync (transformers' causal
    mask helper reads a padded batch's attention mask on the host); they run unchecked."""
    cuda = torch.cuda.is_available()
    previous = torch.cuda.get_sync_debug_mode() if cuda else None
    originals = []
    for owner, name in exempt:
        function = getattr(owner, name)
        originals.append((owner, name, function))

        def unchecked(*args, __function=function, **kwargs):
            with _checks_off(cuda):
                return __function(*args, **kwargs)

        setattr(owner, name, unchecked)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        with _NoSync():
            yield
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(previous)
        for owner, name, function in originals:
            setattr(owner, name, function)
