"""GPTQ: quantize weights column by column, pushing each column's error onto the columns not yet quantized.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2022). With ``H = 2 X^T X`` from calibration inputs
``X`` of a Linear layer, the error of quantizing column ``i`` is spread over
columns ``j > i`` through the inverse Hessian's Cholesky factor, which
minimises the layer's output error ``||X W^T - X Q^T||`` rather than the weight
error that round-to-nearest minimises. ``H`` is gathered by
:class:`slimkit.calibration.collectors.HessianAccumulator` (SparseGPT uses it too).

A pruned layer (at least ``SPARSE_FRACTION`` of its weights exactly zero, as
after Wanda or SparseGPT) keeps its zeros: a pruned weight is written as the
code of 0 and its drift is pushed onto the weights not yet quantized like any
rounding error (SparseGPT's joint prune-and-quantize sweep), so sparsity and
int4 compose without GPTQ refilling the pruned weights.
"""

from __future__ import annotations

import torch

from slimkit.calibration.collectors import inverse_hessian_factor_
from slimkit.quant.affine import QSpec, dequantize, minmax, qparams, quantize

SPARSE_FRACTION = 0.1  # dense trained weights are almost never exactly zero; pruned layers are
ROW_CHUNK_BYTES = 64 << 20  # float64 working copy of the weight rows quantized in one pass


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zero points of ``weight`` (``[N, K]``) shaped as for :func:`quantize_tensor`.

    ``overwrite``: ``hessian`` (float64) is the caller's to lose: it is worked on in
    place instead of copied (one ``K x K`` float64 matrix less at once).

    ``act_order``: columns are quantized in order of decreasing Hessian diagonal.
    With groups, each group's scale and zero point are then fixed beforehand
    from the float weights of the group in storage order ("static groups"), so
    the stored layout is the same as without it.

    Output rows are independent given ``H`` (each row's errors move along its own columns), so a
    tall layer is quantized ``ROW_CHUNK_BYTES`` of float64 rows at a time: SmolLM2's tied lm_head
    (49152 x 576) would otherwise need a 226 MB float64 working copy at once.
    """
    n_out, k = weight.shape
    sparse = int(torch.count_nonzero(weight)) <= (1 - SPARSE_FRACTION) * weight.numel()
    h = hessian.double()
    if h is hessian and not overwrite:
        h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that are always zero: their columns do not matter
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)  # ties: storage order, everywhere
        torch.index_select(torch.index_select(h, 0, perm), 1, perm, out=h)  # h is ours (see above)
    hinv = inverse_hessian_factor_(h, damp)  # once: every row chunk shares it
    rows = n_out if spec.granularity == "tensor" else max(1, ROW_CHUNK_BYTES // (8 * k))  # tensor: one scale
    parts = [
        _gptq_rows(weight[i : i + rows], hinv, perm, dead, spec, block_size, sparse)
        for i in range(0, n_out, rows)
    ]
    if len(parts) == 1:
        return parts[0]
    codes, scales, zeros = zip(*parts, strict=True)
    return torch.cat(codes), torch.cat(scales), torch.cat(zeros)


def _gptq_rows(weight, hinv, perm, dead, spec: QSpec, block_size: int, sparse: bool):
    """GPTQ on some of the output rows, given the (permuted, with ``perm``) inverse-Hessian factor."""
    w = weight.detach().double().clone()
    n_out, k = w.shape
    keep = (weight != 0) if sparse else None
    w[:, dead] = 0.0
    group = spec.group_size if spec.granularity == "group" else None
    if perm is not None:
        return _gptq_act_order(w, hinv, perm, spec, block_size, group, keep)
    if group:
        block_size = max(group, block_size // group * group)  # groups never straddle blocks
    col_spec = QSpec(spec.bits, spec.symmetric, "channel", 0)
    scales, zeros = [], []
    if not group:
        scale, zero = qparams(*minmax(w.float(), spec), spec)
        fixed = (scale.expand(n_out), zero.expand(n_out)) if spec.granularity == "tensor" else (scale, zero)
    current = {}

    def params(col: int, w1: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not group:
            return fixed
        if col % group == 0:  # a group's scales come from its columns as the errors left them
            current["p"] = qparams(*minmax(w1[:, i : i + group].float(), col_spec), col_spec)
            scales.append(current["p"][0])
            zeros.append(current["p"][1])
        return current["p"]

    codes = _sweep(w, hinv, block_size, col_spec, params, keep)
    if group:
        return codes, torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
    return codes, scale, zero


def _sweep(
    w: torch.Tensor, hinv: torch.Tensor, block_size: int, col_spec: QSpec, params, keep=None
) -> torch.Tensor:
    """GPTQ's column sweep: quantize each column, spread its error over the columns not yet quantized.

    ``params(col, w1, i)`` gives the column's scale and zero point (``w1`` is the current block,
    ``i`` the column's index in it). ``w`` is updated in place. ``keep``: where False the code
    is that of 0 (a pruned weight stays pruned).
    """
    n_out, k = w.shape
    codes = torch.zeros(n_out, k, dtype=torch.int8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col_scale, col_zero = params(i1 + i, w1, i)
            col = w1[:, i].float()
            q = quantize(col, col_scale, col_zero, col_spec)
            if keep is not None:
                q = torch.where(keep[:, i1 + i], q, col_zero.to(torch.int8).expand(n_out))
            codes[:, i1 + i] = q
            err = (col - dequantize(q, col_scale, col_zero, col_spec)).double() / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def _gptq_act_order(
    w: torch.Tensor,
    hinv: torch.Tensor,
    perm: torch.Tensor,
    spec: QSpec,
    block_size: int,
    group: int | None,
    keep=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_out, k = w.shape
    col_spec = QSpec(spec.bits, spec.symmetric, "channel", 0)
    if group:
        g_params = [
            qparams(*minmax(w[:, g : g + group].float(), col_spec), col_spec) for g in range(0, k, group)
        ]
        scale = torch.stack([s for s, _ in g_params], dim=1)
        zero = torch.stack([z for _, z in g_params], dim=1)
    else:
        scale, zero = qparams(*minmax(w.float(), spec), spec)
    w = w[:, perm]

    def params(col: int, _w1: torch.Tensor, _i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if group:  # scales fixed in advance, per original column group
            g = int(perm[col]) // group
            return scale[:, g], zero[:, g]
        if spec.granularity == "tensor":
            return scale.expand(n_out), zero.expand(n_out)
        return scale, zero

    codes = _sweep(w, hinv, block_size, col_spec, params, None if keep is None else keep[:, perm])
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, scale, zero


def layer_output_error(weight: torch.Tensor, dequantized: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared difference of ``x @ W^T`` between the float and the quantized weights."""
    return float((x @ weight.t() - x @ dequantized.t()).pow(2).mean())
