"""The layers a calibration run has replaced, kept only to put them back on error, their weights on disk.

Block-by-block calibration replaces a model's layers one at a time and must
leave the model as it was if anything fails, so it keeps every replaced
layer until the end. Kept in memory, those float layers are the whole model
again by the last block: GPTQ int4 g64 of SmolLM2-135M's blocks peaked at
1.87x the fp32 model's bytes, 0.8x of it float layers no longer in the model
(1.41x with them on disk and GPTQ's float64 work done in place).
:class:`Replaced` keeps the module objects (so a restore puts back the very
same modules and parameters: ties, identities and ``requires_grad`` as they
were) but moves each parameter's data to a temporary file as soon as the
layer is out of the model, and reads it back only on :meth:`restore`.

A parameter still used by the model (a weight tied to a layer not replaced
yet, or shared by the new layer) stays in memory. A caller that kept its own
reference to a layer being replaced sees that layer's parameters emptied
(zero elements) once the run succeeds: the layer is no longer part of the model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn


class Replaced:
    """``replace(name, new)`` swaps a layer of ``model``; ``restore()`` puts every replaced layer back."""

    def __init__(self, model: nn.Module, offload: bool = True):
        self.model = model
        self.offload = offload
        self.modules: dict[str, nn.Module] = {}
        self._saved: dict[int, tuple[nn.Parameter, Path]] = {}  # id(parameter) -> (it, its file)
        self._folder: tempfile.TemporaryDirectory | None = None

    def replace(self, name: str, new: nn.Module) -> None:
        old = self.model.get_submodule(name)
        self.modules.setdefault(name, old)
        self.model.set_submodule(name, new)
        if self.offload:
            self._offload(old)

    def restore(self) -> None:
        """Every replaced layer back in the model, with its parameters' data read back."""
        for param, path in self._saved.values():
            param.data = torch.load(path, weights_only=True)
        self._saved.clear()
        for name, module in self.modules.items():
            self.model.set_submodule(name, module)
        self.close()

    def close(self) -> None:
        """Forget the replaced layers (after success: their float weights are freed) and the files."""
        self.modules = {}
        self._saved.clear()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None

    def _offload(self, module: nn.Module) -> None:
        # Storage still reachable from the model would not be freed by emptying the parameter (and a
        # parameter object the model still holds must keep its data): those stay as they are.
        live = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())}
        for param in module.parameters():
            if id(param) in self._saved or param.numel() == 0:
                continue
            if param.untyped_storage().data_ptr() in live:
                continue
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="slimkit-replaced-")
            path = Path(self._folder.name) / f"{len(self._saved)}.pt"
            torch.save(param.data, path)
            self._saved[id(param)] = (param, path)
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
