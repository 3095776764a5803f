"""Calibration machinery shared by the techniques (quantization, pruning): core, imports no technique.

- :mod:`slimkit.calibration.blocks`: :func:`~slimkit.calibration.blocks.calibrate_by_block_`, the
  block-by-block driver (one block's inputs held at a time; collectors fed, layers rebuilt);
- :mod:`slimkit.calibration.held`: :class:`~slimkit.calibration.held.HeldInputs`, a block's inputs kept
  in memory, in bfloat16 or on disk, and ``split_batch`` (micro-batches);
- :mod:`slimkit.calibration.collectors`: statistics of a layer's inputs (``HessianAccumulator`` for
  GPTQ/SparseGPT, ``InputNorm`` for Wanda), each with ``update(x)`` and ``all_reduce_(env)``.
"""
