"""Weight sharing (Han et al., "Deep Compression"): a layer's weights as indices into a small codebook.

:func:`cluster` picks ``2**bits`` shared values for a layer's weights: 1-D k-means
with linear initialisation over the weight range (Han et al. found it beats
random and density-based starts because it keeps the few large weights), or
fixed logarithmic / power-of-two levels. When the layer is pruned only its
non-zero weights are clustered; the zeros are kept in a mask and stay exactly zero.

:class:`CodebookLinear` / :class:`CodebookConv2d` hold ``indices`` (uint8, the
weight's shape), an optional ``mask`` and the float ``codebook``. Their forward
gathers ``codebook[indices]`` and runs the float op: no CPU kernel computes on
the indices directly, so weight sharing saves storage, not time. While being
fine-tuned (``trainable``) the codebook is a Parameter: autograd sums the
gradients of all weights of a cluster into its centroid (the gather's
backward), so the weights of a cluster stay tied by construction.

With int8 activations (:meth:`SharedWeights.int8_activations_`, the config's
``activation_bits: 8``, applied when the layer is frozen) the codebook itself is
quantized to int8 with one symmetric scale per layer, so the int8 weight still
takes at most ``2**bits`` values (an int8 codebook, indices unchanged). The int8
matrix is gathered once (a non-persistent buffer, rebuilt by :meth:`refresh` and
on ``load_state_dict``) and the forward runs slimkit's dynamic int8 Linear/Conv2d
(activations per tensor) on it, so the kernel is :mod:`slimkit.utils.dispatch`'s
choice. The file still holds indices + codebook, plus the scale.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.quant.modules import QuantConv2d, QuantLinear, _Cached
from slimkit.utils.dispatch import KernelChoice


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iterations: int = 100) -> np.ndarray:
    """``k`` sorted centroids of 1-D ``values`` (Lloyd's algorithm on the sorted values; deterministic).

    On sorted values a cluster is a contiguous segment, so an iteration is a
    ``searchsorted`` of the midpoints and means from prefix sums: O(k log n).
    Empty clusters keep their centroid (they stay unused codes).
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return np.zeros(k)
    # linear: evenly over [min, max]; density: equally many weights between consecutive starting centroids
    linear = init == "linear"
    centroids = np.linspace(v[0], v[-1], k) if linear else np.quantile(v, (np.arange(k) + 0.5) / k)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    for _ in range(iterations):
        cut = np.searchsorted(v, (centroids[:-1] + centroids[1:]) / 2, side="right")
        starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [v.size]])
        counts = ends - starts
        new = np.where(counts > 0, (prefix[ends] - prefix[starts]) / np.maximum(counts, 1), centroids)
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids


def fixed_levels(values: np.ndarray, k: int, levels: str) -> np.ndarray:
    """Sign-symmetric levels, ``k/2`` per sign: logarithmically spaced, or powers of two, down from max |w|."""
    mags = np.abs(np.asarray(values, dtype=np.float64))
    top = float(mags.max()) if mags.size else 1.0
    top = top if top > 0 else 1.0
    half = k // 2
    if levels == "pow2":
        exps = np.round(np.log2(top)) - np.arange(half)
        pos = 2.0**exps
    else:  # log: from max |w| down to the smallest non-zero |w| (at most 2**-16 below the maximum)
        small = mags[mags > 0].min() if (mags > 0).any() else top
        pos = np.geomspace(top, max(small, top * 2.0**-16), half)
    return np.sort(np.concatenate([-pos, pos]))


def assign(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry (sorted codebook; ties go to the larger entry)."""
    cb = codebook.double()
    return torch.bucketize(values.double(), (cb[:-1] + cb[1:]) / 2, right=True).to(torch.uint8)


def cluster(
    weight: torch.Tensor, bits: int, levels: str = "kmeans", init: str = "linear", iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(codebook float32 [2**bits], indices uint8 [weight.shape], mask or None)`` of ``weight``.

    ``mask`` (``weight != 0``) is set when the weight has exact zeros (a pruned
    layer): only the non-zeros are clustered and the zeros stay zero.
    """
    w = weight.detach().float().cpu()
    mask = w != 0 if bool((w == 0).any()) else None
    values = w[mask] if mask is not None else w.reshape(-1)
    k = 2**bits
    if levels == "kmeans":
        centroids = kmeans_1d(values.numpy(), k, init, iterations)
    else:
        centroids = fixed_levels(values.numpy(), k, levels)
    codebook = torch.from_numpy(centroids).float()
    indices = torch.zeros(w.shape, dtype=torch.uint8)
    if mask is not None:
        indices[mask] = assign(values, codebook)
    else:
        indices = assign(values, codebook).reshape(w.shape)
    return codebook, indices, mask


class SharedWeights(_Cached):
    """Indices, optional mask, codebook and bias; ``trainable`` makes codebook and bias Parameters."""

    def _init_shared(self, codebook, indices, mask, bias, trainable: bool) -> None:
        for name, value in (("codebook", codebook), ("bias_value", bias)):
            if value is None:
                self.register_buffer(name, None)
            elif trainable:
                setattr(self, name, nn.Parameter(value.detach().float().clone()))
            else:
                self.register_buffer(name, value.detach().float().clone())
        self.register_buffer("indices", indices.to(torch.uint8))
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool))
        # int8 activations (None: float compute): the codebook's int8 scale, saved; the gathered int8
        # weight, derived, so the file keeps only indices + codebook + scale.
        self.activation_bits: int | None = None
        self.register_buffer("w_scale", None)
        self.register_buffer("qweight", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @property
    def bits(self) -> int:
        return max(1, (self.codebook.numel() - 1).bit_length())

    def weight(self) -> torch.Tensor:
        """The shared weight the layer computes with: ``codebook[indices]`` (zero where the mask is off),
        the int8 codebook times its scale once the activations are int8."""
        values = self.codebook if self.w_scale is None else self.int8_codebook().float() * self.w_scale
        return self._gather(values)

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        w = values[self.indices.long()]
        return w if self.mask is None else torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))

    def int8_codebook(self) -> torch.Tensor:
        """``round(codebook / w_scale)`` as int8 (needs :meth:`int8_activations_` first)."""
        return torch.round(self.codebook.detach() / self.w_scale).clamp_(-127, 127).to(torch.int8)

    def int8_activations_(self) -> SharedWeights:
        """Compute with int8 activations from now on: one symmetric int8 scale for the whole codebook.

        Why one scale per layer rather than per channel: every output channel then reads
        the same ``2**bits`` int8 values, so the table stays exactly shared.
        """
        self.activation_bits = 8
        top = self.codebook.detach().abs().max().float().clamp(min=1e-12)
        self.w_scale = (top / 127.0).reshape(())
        self.refresh()
        return self

    def refresh(self) -> None:
        """Rebuild the gathered int8 weight (after loading a state dict); nothing for a float layer."""
        if self.w_scale is None:
            self.qweight = None
            return
        q = self._gather(self.int8_codebook())
        self.qweight = q.reshape(q.shape[0], -1).contiguous()

    def _int8_layer(self) -> QuantLinear | QuantConv2d:
        """The dynamic int8 layer (activations per tensor) on this layer's very ``qweight``, kept until
        ``qweight``, scale or bias change (a device move or a load makes new tensors)."""
        return self._derived("int8", (self.qweight, self.w_scale, self.bias_value), self._build_int8)

    def _build_int8(self) -> QuantLinear | QuantConv2d:
        if isinstance(self, CodebookConv2d):
            layer = QuantConv2d(_ConvShape(self), "dynamic", "tensor")
        else:
            layer = QuantLinear(self.in_features, self.out_features, "dynamic", "tensor")
        layer.qweight = self.qweight  # shared, not copied
        layer.w_scale = self.w_scale.expand(self.qweight.shape[0]).contiguous()
        layer._set_bias(self.bias_value)
        layer.refresh()
        return layer.to(self.qweight.device)

    def kernel(self) -> KernelChoice | None:
        """The int8 kernel this layer runs (:mod:`slimkit.utils.dispatch`), or None when it computes in float."""
        return None if self.qweight is None else self._int8_layer().kernel()

    def bias(self) -> torch.Tensor | None:
        return self.bias_value

    def freeze_(self) -> SharedWeights:
        """Codebook and bias become buffers (after fine-tuning): the layer has no parameters left."""
        for name in ("codebook", "bias_value"):
            value = getattr(self, name)
            if isinstance(value, nn.Parameter):
                delattr(self, name)
                self.register_buffer(name, value.detach().clone())
        return self

    @property
    def trainable(self) -> bool:
        return isinstance(self.codebook, nn.Parameter)

    def onnx_problem(self) -> str | None:
        """None: the gather and the float op export as ONNX Gather/Where and MatMul/Conv. With int8
        activations: refused (no ONNX form of a shared int8 codebook yet; the float variant exports)."""
        return None if self.w_scale is None else "codebook layer with int8 activations"

    def pt2_problem(self) -> str | None:
        """Asked by :mod:`slimkit.export.pt2`: the int8 variant runs slimkit's int8 kernels, which do not trace."""
        return (
            None if self.w_scale is None else "codebook layer with int8 activations on slimkit's int8 kernels"
        )

    def _shared_repr(self) -> str:
        sparse = "" if self.mask is None else f", nonzero={int(self.mask.sum())}/{self.mask.numel()}"
        int8 = "" if self.w_scale is None else ", int8 activations per tensor"
        return f"bits={self.bits}{sparse}, trainable={self.trainable}{int8}"


class CodebookLinear(SharedWeights):
    def __init__(self, in_features, out_features, codebook, indices, mask=None, bias=None, trainable=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_shared(codebook, indices, mask, bias, trainable)

    @classmethod
    def from_float(cls, module: nn.Linear, shared: tuple, trainable: bool) -> CodebookLinear:
        return cls(module.in_features, module.out_features, *shared, module.bias, trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self._int8_layer()(x)
        return F.linear(x, self.weight().to(x.dtype), _cast(self.bias_value, x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self._shared_repr()}"


class CodebookConv2d(SharedWeights):
    def __init__(self, conv: nn.Conv2d, codebook, indices, mask=None, bias=None, trainable=False):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_shared(codebook, indices, mask, bias, trainable)

    @classmethod
    def from_float(cls, module: nn.Conv2d, shared: tuple, trainable: bool) -> CodebookConv2d:
        return cls(module, *shared, module.bias, trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self._int8_layer()(x)
        w = self.weight().to(x.dtype)
        return F.conv2d(
            x, w, _cast(self.bias_value, x), self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, {self._shared_repr()}"


class _ConvShape:
    """What :class:`QuantConv2d`'s constructor reads of a Conv2d (its bias is set afterwards)."""

    def __init__(self, conv: CodebookConv2d):
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation, self.bias = conv.padding, conv.dilation, None


def _refresh_after_load(module: SharedWeights, _incompatible) -> None:
    module.refresh()


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


def to_float(module: SharedWeights) -> nn.Module:
    """The float layer with the shared weights (undoes the swap; the sharing itself stays in the values)."""
    with torch.no_grad():
        if isinstance(module, CodebookConv2d):
            out = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias_value is not None)  # fmt: skip
        else:
            out = nn.Linear(module.in_features, module.out_features, module.bias_value is not None)
        out.weight.copy_(module.weight())
        if module.bias_value is not None:
            out.bias.copy_(module.bias_value)
    return out.to(module.codebook.device)
