"""Greedy decoding with a static KV cache and the one-token step compiled by ``torch.compile``.

Why: at batch 1 a decoded token of a small LLM is mostly not matrix work. SmolLM2-135M with int4
weights spends about 7 of its 20 ms per token in the int4/int8 GEMMs (profiled); the rest is
~2,000 small eager ops (norms, rotary, KV-cache concatenation, dtype casts) and Python around them.
Compiling the step with inductor fuses those ops and removes the Python, and a static cache
(preallocated for prompt + new tokens, written in place) gives every step the same shapes, so one
graph serves every step at a given batch size: 20 -> 12 ms per token there.

Costs: the first step at each batch size compiles (about a minute for SmolLM2 on 2 cores; later
runs in a new process reuse inductor's on-disk cache); inductor needs a C++ compiler. The prompt
itself (prefill) runs eager: one forward over many tokens is GEMM-bound already, and compiling it
would need one graph per prompt length. Results equal eager decoding up to float rounding (the
fused kernels sum in another order), so greedy tokens can differ where two logits nearly tie.
"""

from __future__ import annotations

import time

import torch
import torch._dynamo.config as dynamo_config
from torch import nn

from slimkit.metrics.generation import _next_token, _options
from slimkit.metrics.modes import eval_mode

RECOMPILE_LIMIT = 64  # graphs per code object: models x batch sizes compiled in one process


class CompileUnavailable(RuntimeError):
    """``torch.compile`` could not build the decoding step here (no C++ compiler, unsupported model)."""


class CompiledDecoding:
    """A causal LM decoded greedily through a static KV cache with its one-token step compiled.

    Use it where :func:`slimkit.metrics.generation.compare_generation_speed` takes a model (its
    ``prefill``/``decode`` replace the eager ones) or call :meth:`generate`. The wrapped model is
    not changed; the compiled graph and the caches (one per batch size) live on this object.
    """

    def __init__(self, model: nn.Module, max_cache_len: int):
        if not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len: must be an integer >= 2, got {max_cache_len!r}")
        self.model, self.max_cache_len = model, max_cache_len
        self._key, self._extra = _options(model, last_only=True)
        self._step = torch.compile(model.forward, dynamic=False)
        self._caches: dict[int, object] = {}
        self.compile_s: dict[int, float] = {}  # first decoded step per batch size, compile included

    def _cache(self, batch: int):
        from transformers import StaticCache

        if batch not in self._caches:
            self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        cache = self._caches[batch]
        cache.reset()  # same tensors every run: the compiled graph was built for them
        return cache

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(first new token per row, the next position), the prompt written into the static cache, eager."""
        batch, length = input_ids.shape
        if length >= self.max_cache_len:
            raise ValueError(f"prompt of {length} tokens does not fit max_cache_len {self.max_cache_len}")
        cache = self._cache(batch)
        out = self.model(input_ids=input_ids, cache_position=torch.arange(length), **self._args(cache))
        return _next_token(out), length

    def decode(self, token: torch.Tensor, position: int, steps: int) -> torch.Tensor:
        """``steps`` compiled one-token passes from ``token`` at ``position``; the ``[batch, steps]`` tokens fed in."""
        return torch.stack([token, *self._produce(token, position, steps)[:-1]], dim=1)

    def _produce(self, token: torch.Tensor, position: int, steps: int) -> list[torch.Tensor]:
        """The token each of ``steps`` one-token passes produces, the first fed ``token``."""
        if position + steps > self.max_cache_len:
            raise ValueError(f"{position} + {steps} positions exceed max_cache_len {self.max_cache_len}")
        batch, produced = token.shape[0], []
        cache = self._caches[batch]
        # Every (model, batch size) is one more graph of the same code (the model class's forward), and
        # dynamo stops compiling a code after `recompile_limit` graphs (8), then runs it eager without a
        # word: raise the limit, and make running past it an error rather than a silent eager step.
        # Patched once around the loop, not per token: the loop is what decode timing measures.
        limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        with dynamo_config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            for i in range(steps):
                start = (
                    time.perf_counter() if batch not in self.compile_s else None
                )  # the first step compiles
                out = self._run(token[:, None], torch.tensor([position + i]), cache)
                token = _next_token(out).clone()  # the graph may reuse its output buffers on the next call
                produced.append(token)
                if start is not None:
                    self.compile_s[batch] = time.perf_counter() - start
        return produced

    def _run(self, ids: torch.Tensor, position: torch.Tensor, cache):
        try:
            return self._step(input_ids=ids, cache_position=position, **self._args(cache))
        except Exception as err:  # inductor's own errors (compiler missing, unsupported op) vary widely
            if type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise CompileUnavailable(f"torch.compile could not build the decoding step: {err}") from err
            raise

    def _args(self, cache) -> dict:
        return {self._key: cache, **self._extra}

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompt followed by ``max_new_tokens`` greedy tokens (no early stop), ``[batch, prompt + new]``."""
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        with eval_mode(self.model), torch.inference_mode():
            token, position = self.prefill(ids)
            new = [token, *self._produce(token, position, max_new_tokens - 1)]
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1)
