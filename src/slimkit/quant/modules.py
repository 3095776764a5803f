"""Quantized layers that compute on integer kernels (see :mod:`slimkit.quant.kernels`).

All weights live in buffers (no parameters), with ``weight()`` / ``bias()``
accessors returning the dequantized tensors, so the metrics helpers count
them as packed modules. Every module can be rebuilt from its state dict alone
(:func:`slimkit.quant.serialize.load_quantized`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import slimkit.quant.kernels as kernels
import slimkit.quant.onnx_forms as onnx_forms
from slimkit.quant.affine import QSpec, dequantize, pack_int4, unpack_int4
from slimkit.utils import dispatch
from slimkit.utils.cpu import fitted_threads

INT8_CHANNEL = QSpec(8, True, "channel", 0)


class _Cached(nn.Module):
    """Tensors derived from a layer's own (fbgemm's packed weights, a float32 copy), rebuilt when it changes."""

    def _derived(self, name: str, sources: tuple, build):
        """``build()``, cached until one of ``sources`` changes: the key holds each tensor's identity and
        version counter, which every in-place write (``load_state_dict``, ``copy_``) bumps. Tensors made
        under inference_mode have no version counter: then nothing is cached."""
        if any(t is not None and t.is_inference() for t in sources):
            return build()
        key = tuple((id(t), t._version) for t in sources if t is not None)
        slot = self.__dict__.get(_CACHE + name)
        if slot is None or slot[0] != key:
            slot = self.__dict__[_CACHE + name] = (key, build())
        return slot[1]

    def __getstate__(self):
        # Caches are rebuilt on demand, not copied or pickled (fbgemm's packed weights are opaque objects).
        return {k: v for k, v in self.__dict__.items() if not k.startswith(_CACHE)}


_CACHE = "_cached_"


class _Packed(_Cached):
    """Shared accessors: ``bias()`` and the float ``weight()`` the metrics helpers read."""

    bias_value: torch.Tensor | None

    def bias(self) -> torch.Tensor | None:
        return self.bias_value

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        self.register_buffer("bias_value", None if bias is None else bias.detach().float().clone())

    def onnx_problem(self) -> str | None:
        """Why this layer has no ONNX Runtime form, or None (asked by :mod:`slimkit.export`)."""
        return no_onnx_form(self)

    def kernel(self) -> dispatch.KernelChoice | None:
        """The kernel this layer computes with on this machine, and why (for the quantize summary)."""
        return None


class FoldedBatchNorm(nn.Identity):
    """Where a BatchNorm2d was: its affine map now lives in the Conv2d before it (see ``quant.fold``)."""


class QuantLinear(_Packed):
    """int8 x int8 Linear. ``mode``: ``dynamic`` (activation scale per call) or ``static`` (calibrated)."""

    def __init__(self, in_features: int, out_features: int, mode: str, granularity: str = "token"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.granularity = mode, granularity
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features))
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("x_zero", torch.zeros((), dtype=torch.int32))
        self.register_buffer("w_colsum", torch.zeros(out_features, dtype=torch.int32), persistent=False)
        self.register_buffer("in_scale", None)  # SmoothQuant's 1/s per input channel, if used
        self.weight_bits = 8  # codes may use fewer bits (QAT at 4 bits); they are stored packed then
        # SmoothQuant's exponent (searched with "auto") if smoothed: shown by extra_repr, saved by the codec
        self.smoothquant_alpha: float | None = None
        self._set_bias(None)

    @classmethod
    def from_float(
        cls, linear: nn.Linear, q, w_scale, mode, granularity="token", x_qparams=None, in_scale=None
    ):
        mod = cls(linear.in_features, linear.out_features, mode, granularity)
        mod.set_weight(q, w_scale)
        mod._set_bias(linear.bias)
        mod.set_activation(x_qparams, in_scale)
        return mod

    def set_activation(self, x_qparams=None, in_scale=None) -> None:
        if x_qparams is not None:
            self.x_scale.copy_(x_qparams[0].reshape(()))
            self.x_zero.copy_(x_qparams[1].reshape(()))
        if in_scale is not None:
            self.in_scale = in_scale.detach().float().clone()

    def set_weight(self, q: torch.Tensor, w_scale: torch.Tensor) -> None:
        self.qweight.copy_(q)
        self.w_scale.copy_(w_scale.reshape(-1))
        self.refresh()

    def refresh(self) -> None:
        """Recompute derived (non-saved) buffers after loading a state dict."""
        self.w_colsum = self.qweight.to(torch.int32).sum(dim=1)

    def static_terms(self) -> tuple[torch.Tensor, ...]:
        """:func:`kernels.static_terms` of this layer, recomputed only when one of its buffers changed.

        Why cache: on small layers the handful of tiny ops that derive these cost
        more than the GEMM.
        """
        sources = (self.x_scale, self.x_zero, self.w_scale, self.w_colsum, self.bias_value)
        return self._derived("terms", sources, lambda: kernels.static_terms(*sources))

    def kernel(self) -> dispatch.KernelChoice:
        return dispatch.int8_gemm(per_tensor_dynamic=(self.mode, self.granularity) == ("dynamic", "tensor"))

    def pt2_problem(self) -> str | None:
        """Asked by :mod:`slimkit.export.pt2`: fbgemm's packed weights and quantized tensors do not trace."""
        return "int8 activations on slimkit's int8 kernels"

    def weight(self) -> torch.Tensor:
        return dequantize(
            self.qweight, self.w_scale, torch.zeros_like(self.w_scale, dtype=torch.int32), INT8_CHANNEL
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return onnx_forms.export_int8(self, x)
        with fitted_threads():  # one thread while the CPU is oversubscribed (see slimkit.utils.cpu)
            return self._int8_forward(x)

    def qdq_weights(self):
        """This static layer's codes and scales for :mod:`slimkit.export.qdq` (its ONNX QDQ form)."""
        from slimkit.export.qdq import qdq_weights

        return qdq_weights(self.x_scale, self.x_zero, self.weight_codes(), self.w_scale, self.bias_value)

    def weight_codes(self) -> torch.Tensor:
        return self.qweight

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x * self.in_scale
        choice = self.kernel()
        if not choice.on_int_mm:
            return self._fallback_forward(x, choice)
        if self.mode == "dynamic":
            return kernels.dynamic_int8_linear(
                x, self.qweight, self.w_scale, self.w_colsum, self.bias_value, self.granularity
            )
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        out = kernels.static_int8_linear(x2, self.qweight, self.static_terms())
        return out.reshape(*shape[:-1], -1).to(x.dtype)

    def _fallback_forward(self, x: torch.Tensor, choice: dispatch.KernelChoice) -> torch.Tensor:
        """fbgemm's int8 GEMM with the same codes (where ``torch._int_mm`` is slow, or activations per
        tensor at run time, which fbgemm quantizes while packing), or float32."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        weights = (self.qweight, self.w_scale, self.bias_value)
        if choice.kernel == "fp32":
            out = F.linear(x2, self._derived("fp32_weight", weights[:2], self.weight), self.bias_value)
        elif self.mode == "dynamic" and self.granularity == "token":  # bias added after the row rescale
            packed = self._derived(
                "fbgemm_nobias", weights[:2], lambda: kernels.fbgemm_pack(*weights[:2], None)
            )
            out = kernels.fbgemm_token_linear(
                x2, packed, self.out_features, self.bias_value, choice.reduce_range
            )
        else:
            packed = self._derived("fbgemm", weights, lambda: kernels.fbgemm_pack(*weights))
            qparams = None
            if self.mode == "static":
                qparams = kernels.u8_qparams(self.x_scale, self.x_zero, choice.reduce_range)
            out = kernels.fbgemm_int8_linear(x2, packed, qparams, choice.reduce_range)
        return out.reshape(*shape[:-1], -1).to(x.dtype)

    def extra_repr(self) -> str:
        smooth = "" if self.smoothquant_alpha is None else f", smoothquant alpha {self.smoothquant_alpha:g}"
        return f"{self.in_features}, {self.out_features}, int8 {self.mode}, activations per {self.granularity}{smooth}"


class QuantConv2d(_Packed):
    """int8 Conv2d (groups=1) as im2col + ``torch._int_mm``; static or dynamic activations."""

    def __init__(self, conv: nn.Conv2d, mode: str, granularity: str = "tensor"):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.mode, self.granularity = mode, granularity
        k = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        self.register_buffer("qweight", torch.zeros(conv.out_channels, k, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(conv.out_channels))
        self.register_buffer("x_scale", torch.ones(()))
        self.register_buffer("x_zero", torch.zeros((), dtype=torch.int32))
        self.register_buffer("w_colsum", torch.zeros(conv.out_channels, dtype=torch.int32), persistent=False)
        # The GEMM's copy of the codes with columns in (kh, kw, C) order, to match channels-last patches.
        self.register_buffer(
            "qweight_hwc", torch.zeros(conv.out_channels, k, dtype=torch.int8), persistent=False
        )
        self.weight_bits = 8
        self._set_bias(conv.bias)

    set_weight = QuantLinear.set_weight
    set_activation = QuantLinear.set_activation
    static_terms = QuantLinear.static_terms

    def refresh(self) -> None:
        QuantLinear.refresh(self)  # type: ignore[arg-type]
        codes = self.qweight.reshape(self.out_channels, self.in_channels, *self.kernel_size)
        self.qweight_hwc = codes.permute(0, 2, 3, 1).reshape(self.out_channels, -1).contiguous()

    def weight(self) -> torch.Tensor:
        w = QuantLinear.weight(self)  # type: ignore[arg-type]
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    qdq_weights = QuantLinear.qdq_weights
    pt2_problem = QuantLinear.pt2_problem

    def weight_codes(self) -> torch.Tensor:
        return self.qweight.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return onnx_forms.export_int8(self, x)
        with fitted_threads():  # one thread while the CPU is oversubscribed (see slimkit.utils.cpu)
            return self._int8_forward(x)

    def kernel(self) -> dispatch.KernelChoice:
        return dispatch.int8_conv()

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel().on_int_mm:  # torch._int_mm would be slow here: float conv, same weights
            w = self._derived("fp32_weight", (self.qweight, self.w_scale), self.weight)
            out = F.conv2d(x.float(), w, self.bias_value, self.stride, self.padding, self.dilation)
            return out.to(x.dtype)
        n, dtype, x = x.shape[0], x.dtype, x.float()
        if self.mode == "dynamic" and self.granularity == "token":
            # One scale per patch: the float patches themselves are quantized.
            rows, (ho, wo) = _patches(_channels_last(x, self, 0.0), self)
            out = kernels.dynamic_int8_linear(
                rows, self.qweight_hwc, self.w_scale, self.w_colsum, self.bias_value, self.granularity
            )
        else:
            # One scale for the whole input: quantize it before im2col, so the patch
            # matrix (kh * kw times the input) is built and read as int8, not float.
            terms = (
                self.static_terms()
                if self.mode == "static"
                else kernels.dynamic_tensor_terms(x, self.w_scale, self.w_colsum, self.bias_value)
            )
            inv_scale, zero, scale, shift = terms
            xq = kernels.quantize_sliced(x, inv_scale, zero)
            out, (ho, wo) = _int8_conv_rows(_channels_last(xq, self, int(zero)), self, scale, shift)
        return out.reshape(n, ho * wo, -1).transpose(1, 2).reshape(n, -1, ho, wo).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, int8 {self.mode}"


def _out_size(size: int, i: int, conv: QuantConv2d) -> int:
    span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
    return (size - span) // conv.stride[i] + 1  # ``size`` already padded


def _channels_last(x: torch.Tensor, conv: QuantConv2d, fill) -> torch.Tensor:
    """``x`` as ``[N, H + 2ph, W + 2pw, C]``, padded with ``fill`` (0.0, or the int8 code of 0.0)."""
    (ph, pw), (n, c, h, w) = conv.padding, x.shape
    padded = (n, h + 2 * ph, w + 2 * pw, c)
    hwc = x.new_full(padded, fill) if ph or pw else x.new_empty(padded)
    hwc[:, ph : ph + h, pw : pw + w] = x.permute(0, 2, 3, 1)
    return hwc


def _patches(hwc: torch.Tensor, conv: QuantConv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patches as rows ``[N * Ho * Wo, kh * kw * C]`` (columns in ``qweight_hwc`` order), and ``(Ho, Wo)``.

    Channels last, each patch row is ``kh`` runs of ``kw * C`` contiguous values, so
    one strided copy builds the matrix: measured 2-4x faster than from NCHW, and
    3-6x faster than ``F.unfold``.
    """
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    n, h, w, c = hwc.shape
    ho, wo = _out_size(h, 0, conv), _out_size(w, 1, conv)
    s_n, s_h, s_w, s_c = hwc.stride()
    patches = hwc.as_strided((n, ho, wo, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
    return patches.reshape(n * ho * wo, kh * kw * c), (ho, wo)


def _int8_conv_rows(hwc: torch.Tensor, conv: QuantConv2d, scale, shift) -> tuple[torch.Tensor, tuple]:
    """Output rows ``[N * Ho * Wo, O]`` from int8 ``hwc``, a few images at a time.

    Why a few at a time: the whole patch matrix of an early, high-resolution layer is
    hundreds of MB; a slice of about 3 MB stays in cache between the copy and the GEMM.
    """
    n, h, w, c = hwc.shape
    ho, wo = _out_size(h, 0, conv), _out_size(w, 1, conv)
    k = c * conv.kernel_size[0] * conv.kernel_size[1]
    step = max(1, kernels.rows_per_slice(k + 4 * conv.out_channels) // (ho * wo))  # whole images
    out = torch.empty(n * ho * wo, conv.out_channels, device=hwc.device)
    wt = conv.qweight_hwc.t()
    for i in range(0, n, step):
        rows, _ = _patches(hwc[i : i + step], conv)
        kernels.int8_gemm_rescaled(rows, wt, scale, shift, out[i * ho * wo : (i + step) * ho * wo])
    return out, (ho, wo)


class WeightOnlyLinear(_Packed):
    """Linear with int8 (per channel) or int4 (per group, packed two per byte) weights, float activations."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("w_scale", torch.ones(out_features))
            self.register_buffer("w_zero", torch.zeros(out_features, dtype=torch.int8))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("w_scale", torch.ones(out_features, groups))
            self.register_buffer("w_zero", torch.zeros(out_features, groups, dtype=torch.int8))
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales", None, persistent=False)
        self._set_bias(None)

    @property
    def spec(self) -> QSpec:
        if self.bits == 8:
            return QSpec(8, True, "channel", 0)
        return QSpec(4, True, "group", 0, self.group_size)

    @classmethod
    def from_float(cls, linear: nn.Linear, q, scale, zero, bits, group_size):
        mod = cls(linear.in_features, linear.out_features, bits, group_size)
        mod.set_weight(q, scale, zero)
        mod._set_bias(linear.bias)
        return mod

    def set_weight(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.qweight.copy_(q if self.bits == 8 else pack_int4(q))
        self.w_scale.copy_(scale.reshape(self.w_scale.shape))
        self.w_zero.copy_(zero.reshape(self.w_zero.shape).to(torch.int8))
        self.refresh()

    def codes(self) -> torch.Tensor:
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight)

    def refresh(self) -> None:
        if self.bits == 8:
            # The int8 kernel has no zero point: fold it into the (float) weights is not possible,
            # so int8 weight-only is symmetric and the zero buffer stays 0 (checked at quantization).
            # Scales in the kernel's compute dtype: bf16 where the CPU has it (its fast path), like int4.
            self.kernel_weight = self.qweight
            self.kernel_scales = self.w_scale.to(kernels.int4_compute_dtype())
        else:
            self.kernel_weight = kernels.int4_kernel_weight(self.codes())
            self.kernel_scales = kernels.int4_scales_and_zeros(self.w_scale, self.w_zero)

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.w_scale, self.w_zero.to(torch.int32), self.spec)

    def kernel(self) -> dispatch.KernelChoice:
        return dispatch.int8_weight_only() if self.bits == 8 else dispatch.int4_compute()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            out = onnx_forms.export_weight_only(self, x)
        elif self.bits == 8:
            out = kernels.int8_weight_only_linear(x, self.kernel_weight, self.kernel_scales)
        else:
            out = kernels.int4_weight_only_linear(x, self.kernel_weight, self.group_size, self.kernel_scales)
        return out if self.bias_value is None else out + self.bias_value

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"{self.in_features}, {self.out_features}, int{self.bits} weight-only{group}"


class QuantEmbedding(_Packed):
    """Embedding table in int8 with one scale per row; only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(num_embeddings))
        self._set_bias(None)

    @classmethod
    def from_float(cls, emb: nn.Embedding, q, scale):
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        mod.qweight.copy_(q)
        mod.w_scale.copy_(scale.reshape(-1))
        return mod

    def refresh(self) -> None: ...

    def weight(self) -> torch.Tensor:
        return self.qweight.float() * self.w_scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).float() * F.embedding(ids, self.w_scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


class BF16Linear(nn.Linear, _Cached):
    """A Linear whose weights are bfloat16; its GEMM too where the CPU has native bf16, else float32 on
    the bf16 weights (:func:`slimkit.utils.dispatch.bf16_compute`); input/output dtype kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel().kernel == "fp32":  # bf16 GEMMs are slower than fp32 here: same weights, fp32 math
            w, b = self._derived("fp32", (self.weight, self.bias), self._float32_weights)
            return F.linear(x.float(), w, b).to(x.dtype)
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def kernel(self) -> dispatch.KernelChoice:
        return dispatch.bf16_compute()

    def _float32_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # A float32 copy, kept: converting per call would cost more than a one-token GEMV itself.
        with torch.no_grad():
            return self.weight.float(), None if self.bias is None else self.bias.float()

    @classmethod
    def from_float(cls, linear: nn.Linear) -> BF16Linear:
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=torch.bfloat16)
        with torch.no_grad():
            mod.weight.copy_(linear.weight)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    def onnx_problem(self) -> str | None:
        return no_onnx_form(self)


def no_onnx_form(module: nn.Module) -> str | None:  # read by slimkit.export through onnx_problem()
    """Why ``module`` cannot be exported for ONNX Runtime's int8 kernels, or None if it can."""
    if isinstance(module, (QuantLinear, QuantConv2d)) and module.mode == "static":
        return None  # QDQ (slimkit.export.qdq); a static layer has one input scale whatever its label
    if isinstance(module, QuantConv2d):
        return f"int8 {module.mode} Conv2d"
    if isinstance(module, QuantLinear) and (module.mode, module.granularity) != ("dynamic", "tensor"):
        return f"int8 {module.mode} Linear with activations per {module.granularity}"
    if isinstance(module, BF16Linear):
        return "bf16 Linear"
    return None
