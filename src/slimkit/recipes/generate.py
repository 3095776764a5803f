"""``slimkit generate RUN_DIR "prompt"``: text from a finished run's language model.

A run folder keeps one model: the one the last step left, in the format that
step saved it (a Hugging Face folder ``model/`` for a float or bf16 language
model; sparse, structurally pruned or quantized safetensors otherwise).
It is rebuilt the way the run built it, from ``recipe.resolved.yaml``'s
``model:`` section, then filled from the saved file by the loader matching the
file's slimkit metadata. A run whose last step exported to ONNX keeps no
PyTorch model and is refused. Models of earlier steps are not saved, so
``--step`` may only name the last step.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from slimkit.config import from_dict
from slimkit.errors import ModelError
from slimkit.metrics.generation import greedy_generate
from slimkit.models.causal_lm import is_causal_lm
from slimkit.models.loading import ModelConfig, load_model
from slimkit.recipes.steps.saving import HF_FOLDER
from slimkit.utils.io import load_weights

WEIGHTS = "model.safetensors"
FOLDER = HF_FOLDER.file_name


def read_resolved(run_dir: Path) -> dict:
    """The run's ``recipe.resolved.yaml`` as plain data (ModelError when it is not a finished run)."""
    file = run_dir / "recipe.resolved.yaml"
    if not file.is_file():
        raise ModelError(f"{run_dir}: not a finished slimkit run (no recipe.resolved.yaml)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ModelError(f"{file}: cannot be read ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("steps"), list) or "model" not in raw:
        raise ModelError(f"{file}: not a resolved slimkit recipe")
    return raw


def check_step(raw: dict, run_dir: Path, step: str | None) -> None:
    """``--step``: only the last step's model is kept, so only the last step may be named."""
    names = [s.get("name", s.get("type")) for s in raw["steps"] if isinstance(s, dict)]
    if step is None or (names and step == names[-1]):
        return
    if step not in names:
        raise ModelError(f"--step: {run_dir} has no step {step!r} (steps: {', '.join(map(str, names))})")
    raise ModelError(
        f"--step {step}: a run folder keeps only the final model (after step {names[-1]!r}); "
        "run the recipe up to that step to see its model"
    )


def fill_model(model: nn.Module, file: Path) -> nn.Module:
    """Load ``file`` into ``model`` with the loader its metadata asks for."""
    from safetensors import safe_open

    if file.is_dir():  # a Hugging Face folder (bf16 layers rebuilt as the run had them)
        return HF_FOLDER.loader(model, file)

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # a compressed sparse file or a damaged one: the sparse loader decides
        meta = {"slimkit_sparse": ""} if file.stat().st_size else {}
        if not meta:
            raise ModelError(f"{file}: not a readable safetensors file ({err})") from None
    if "slimkit_quant" in meta:
        from slimkit.quant.serialize import load_quantized

        _match_depth(model, file)
        return load_quantized(model, file)
    if "slimkit_structure" in meta:
        from slimkit.prune.sparse_io import load_pruned

        return load_pruned(model, file)
    if "slimkit_sparse" in meta:
        from slimkit.prune.sparse_io import load_sparse

        return load_sparse(model, file)
    _match_depth(model, file)
    return load_weights(model, file)


def _match_depth(model: nn.Module, file: Path) -> None:
    """A depth-pruned model quantized afterwards: its file holds blocks 0..n-1 of a shorter list (the
    kept blocks, renumbered), so the model built from the recipe's ``model:`` drops its last blocks
    first; every block's weights then come from the file. (Width-pruned shapes are not rebuilt here.)"""
    from safetensors import safe_open

    from slimkit.models.blocks import find_layer_list
    from slimkit.prune.depth import drop_blocks_

    try:
        name, blocks = find_layer_list(model)
    except ModelError:  # a model without a block list: nothing to match
        return
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    prefix = f"{name}."
    found = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    if found and max(found) + 1 < len(blocks):
        drop_blocks_(model, name, list(range(max(found) + 1)))


def final_model_file(run_dir: Path, refusal: str) -> Path:
    """The saved final model (a Hugging Face folder or a safetensors file); ``refusal`` ends the
    message for a run that kept none (one ending with export keeps only its ONNX file)."""
    file = run_dir / FOLDER if (run_dir / FOLDER).is_dir() else run_dir / WEIGHTS
    if not file.exists():
        found = sorted(p.name for p in run_dir.glob("model*"))
        raise ModelError(
            f"{run_dir}: no {FOLDER}/ or {WEIGHTS} (found: {', '.join(found) or 'nothing'}); "
            f"a run that ends with export keeps an ONNX model, which {refusal}"
        )
    return file


def load_run_model(run_dir: str | Path, step: str | None = None):
    """``(model, tokenizer)`` of a finished run: its final model, rebuilt and loaded as the run saved it."""
    run_dir = Path(run_dir)
    raw = read_resolved(run_dir)
    check_step(raw, run_dir, step)
    file = final_model_file(run_dir, "generate does not run")
    cfg = from_dict(ModelConfig, {**raw["model"], "weights": None}, "model")
    model, tokenizer = load_model(cfg)
    if not is_causal_lm(model) or tokenizer is None:
        raise ModelError(
            f"{run_dir}: the run's model ({type(model).__name__}) is not a causal language model"
        )
    return fill_model(model, file).eval(), tokenizer


def generate_text(run_dir: str | Path, prompt: str, step: str | None = None, max_new_tokens: int = 64) -> str:
    """The prompt and its greedy continuation (KV cache), stopping at the tokenizer's end-of-text token."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ModelError(f"--max-new-tokens: must be a positive integer, got {max_new_tokens!r}")
    model, tokenizer = load_run_model(run_dir, step)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ModelError("prompt: the prompt has no tokens")
    out = greedy_generate(model, ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
