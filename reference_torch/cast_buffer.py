"""One host buffer the reference's streamed blocks are cast into, reused from block to block
(`reference_torch.loading.ReferenceLoader`)."""

import weakref

import torch


class CastBuffer:
    """Host memory the kept tensors are cast into, reused from one block (or shell) to the
    next once the module last built in it is gone: fresh memory costs the kernel a zeroed
    page per 4 KiB (a 7B block in float64 is 1.7 GB), a reused buffer nothing. A buffer
    larger than `HELD_BYTES` is not held between modules but freed with its module, as a
    fresh cast is: a model that large is bound by memory, not time."""

    ALIGN = 64  # bytes: each tensor starts on a cache line
    HELD_BYTES = 2 << 30

    def __init__(self):
        self._bytes: torch.Tensor | None = None
        self._owner: weakref.ref | None = None

    def cast(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict | None:
        """`tensors` cast to `dtype` in the buffer; None where none needs a cast or the
        buffer is still in use."""
        if all(t.dtype == dtype for t in tensors.values()):
            return None  # handed over as they are, as `.to` does
        if self._owner is not None and self._owner() is not None:
            return None
        self._owner = None
        itemsize = torch.empty((), dtype=dtype).element_size()
        sizes = [-(-t.numel() * itemsize // self.ALIGN) * self.ALIGN for t in tensors.values()]
        if self._bytes is None or self._bytes.numel() < sum(sizes):
            self._bytes = None  # freed before the larger one is allocated
            self._bytes = torch.empty(sum(sizes), dtype=torch.uint8)
        out, offset = {}, 0
        for (key, tensor), size in zip(tensors.items(), sizes, strict=True):
            whole = self._bytes[offset : offset + tensor.numel() * itemsize]
            out[key] = whole.view(dtype).view(tensor.shape).copy_(tensor)
            offset += size
        return out

    def built(self, module: torch.nn.Module) -> None:
        """`module` holds the last cast: the buffer is not reused while it lives."""
        self._owner = weakref.ref(module)
        if self._bytes is not None and self._bytes.numel() > self.HELD_BYTES:
            self._bytes = None  # the module's tensors hold it until it is gone
