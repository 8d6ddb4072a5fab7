"""Training-step memory without a GPU allocator to ask: the bytes autograd saves for backward."""

from __future__ import annotations

import torch


class SavedTensorBytes:
    """Within `with SavedTensorBytes() as saved:`, counts the bytes of the tensors autograd saves for
    backward (distinct storages): the activation memory a training step holds at its peak."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
