"""Saving and loading language models: plain Hugging Face folders (float, bf16), packed quantized files,
and lm_head / embeddings kept or quantized by pattern. Tiny Llama (tied embeddings) and Qwen2 (untied)."""

from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from safetensors import safe_open
from torch import nn

from slimkit.errors import ConfigError, ModelError
from slimkit.models.hf_folder import folder_bytes, save_hf_folder
from slimkit.quant import AWQConfig, BF16Config, WeightOnlyConfig, load_quantized, quantize_, save_quantized
from slimkit.quant.methods.awq import AWQLinear
from slimkit.quant.modules import BF16Linear, QuantEmbedding, WeightOnlyLinear
from slimkit.recipes.steps.saving import load_model_folder

transformers = pytest.importorskip("transformers")

from tests.llm_helpers import save_tiny_lm, text_lines, tiny_lm  # noqa: E402

VOCAB, HIDDEN = 320, 64
IDS = {"input_ids": torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**IDS).logits.float()


def _tensors(file) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(file), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (not a dict)


def _tensor_bytes(file) -> int:
    """The file's size less its header: the bytes of the tensors themselves."""
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return file.stat().st_size - 8 - header


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied matrix counted once


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_a_float_causal_lm_is_a_plain_hugging_face_folder(tmp_path, kind):
    model = tiny_lm(kind)
    size = save_hf_folder(model, tmp_path / "model")
    folder = tmp_path / "model"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert size == folder_bytes(folder) == sum(p.stat().st_size for p in folder.iterdir())
    file = folder / "model.safetensors"
    assert _tensor_bytes(file) == 4 * _unique_params(model)  # float32, a tied matrix stored once
    assert ("lm_head.weight" in _tensors(file)) is (kind == "qwen2")  # Llama and GPT-2 tie, Qwen2 does not
    opened = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert (
        opened.dtype == torch.float32
        and json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    )
    assert (opened.lm_head.weight is opened.get_input_embeddings().weight) is (kind != "qwen2")
    assert torch.equal(_logits(opened), _logits(model))
    assert torch.equal(_logits(load_model_folder(tiny_lm(kind, seed=7), folder)), _logits(model))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_bf16_causal_lm_is_a_bfloat16_hugging_face_folder(tmp_path, kind):
    model = tiny_lm(kind)
    quantize_(model, BF16Config())
    assert isinstance(model.lm_head, BF16Linear)  # its own bfloat16 copy of the (tied) table
    save_hf_folder(model, tmp_path / "model")
    file = tmp_path / "model" / "model.safetensors"
    stored = _tensors(file)
    assert {dtype for _, dtype in stored.values()} == {"BF16"}
    # Tied: the head is the table in bfloat16, so it is stored once (94528 values x 2 bytes = 189056).
    assert ("lm_head.weight" in stored) is (kind == "qwen2")
    float_model = tiny_lm(kind)
    assert _tensor_bytes(file) == 2 * _unique_params(float_model)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    opened = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert opened.dtype == torch.bfloat16
    assert (opened.lm_head.weight is opened.model.embed_tokens.weight) is (kind == "llama")
    ref = _logits(model)
    # Hugging Face runs all of it in bfloat16 (slimkit keeps norms, embeddings and the residual in float32):
    # measured 0.0078 (Llama) and 0.0039 (Qwen2) with logits up to 1.4, i.e. bfloat16's 8 bits of mantissa.
    assert (_logits(opened) - ref).abs().max() < 0.02 * ref.abs().max()
    # slimkit rebuilds the same bf16 layers; embeddings and norms come back as their bfloat16 values.
    back = load_model_folder(tiny_lm(kind, seed=7), tmp_path / "model")
    linears = [m for m in back.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, BF16Linear) for m in linears)
    assert (_logits(back) - ref).abs().max() < 0.02 * ref.abs().max()


def test_a_model_with_integer_layers_has_no_folder_form(tmp_path):
    model = tiny_lm("llama")
    quantize_(model, WeightOnlyConfig(bits=4, group_size=32))
    with pytest.raises(
        ModelError, match=r"'model.layers.0.self_attn.q_proj.qweight' .* no Hugging Face folder"
    ):
        save_hf_folder(model, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def _linear_bytes(layer: nn.Linear, bits: int, group: int | None, awq: bool = False) -> int:
    n_in, n_out = layer.in_features, layer.out_features
    if bits == 8:
        return n_out * n_in + n_out * (4 + 1)  # int8 codes, float32 scale and int8 zero per row
    groups = n_out * (n_in // group)
    return n_out * n_in // 2 + groups * (4 + 1) + (4 * n_in if awq else 0)  # + AWQ's input scales


CASES = {
    "int4_g32_sym": (WeightOnlyConfig(bits=4, group_size=32), 4, 32),
    "int4_g64_asym": (WeightOnlyConfig(bits=4, group_size=64, symmetric=False), 4, 64),
    "int4_g32_asym": (WeightOnlyConfig(bits=4, group_size=32, symmetric=False), 4, 32),
    "int8": (WeightOnlyConfig(bits=8), 8, None),
    "gptq_g32": (WeightOnlyConfig(bits=4, group_size=32, algorithm="gptq"), 4, 32),
    "awq_g32": (AWQConfig(group_size=32), 4, 32),
    "int4_head_float": (WeightOnlyConfig(bits=4, group_size=32, overrides={"lm_head": None}), 4, 32),
    "int4_emb": (WeightOnlyConfig(bits=4, group_size=32, quantize_embeddings=True), 4, 32),
    "int4_emb_head_float": (
        WeightOnlyConfig(bits=4, group_size=32, quantize_embeddings=True, overrides={"lm_head": None}),
        4,
        32,
    ),
}


def _expected_bytes(float_model: nn.Module, config, bits: int, group: int | None) -> int:
    """Tensor bytes the packed file must hold: codes, scales, zeros, float norms and tables."""
    head_float = "lm_head" in config.overrides
    awq = isinstance(config, AWQConfig)
    total = 0
    for name, module in float_model.named_modules():
        if isinstance(module, nn.Linear) and not (name == "lm_head" and head_float):
            total += _linear_bytes(module, bits, group, awq)
        elif isinstance(module, nn.Embedding):
            total += VOCAB * HIDDEN + 4 * VOCAB if config.quantize_embeddings else 4 * VOCAB * HIDDEN
        elif type(module).__name__.endswith("RMSNorm"):
            total += 4 * HIDDEN
    if head_float and config.quantize_embeddings:  # the float head no longer shares the (int8) table
        total += 4 * VOCAB * HIDDEN
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_llm_round_trip_is_exact_and_packed(tmp_path, case):
    config, bits, group = CASES[case]
    float_model = tiny_lm("llama")
    model = copy.deepcopy(float_model)
    calibration = [
        {"input_ids": torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(s))}
        for s in range(3)
    ]
    quantize_(model, config, calibration_data=calibration)
    path = tmp_path / "model.safetensors"
    size = save_quantized(model, path)
    assert size == path.stat().st_size
    assert _tensor_bytes(path) == _expected_bytes(float_model, config, bits, group)
    stored = _tensors(path)
    head_float = "lm_head" in config.overrides
    assert ("lm_head.weight" in stored) is (head_float and config.quantize_embeddings)
    assert ("model.embed_tokens.weight" in stored) is (not config.quantize_embeddings)
    loaded = load_quantized(tiny_lm("llama", seed=7), path)
    assert torch.equal(_logits(loaded), _logits(model))
    head = (nn.Linear,) if head_float else (AWQLinear if isinstance(config, AWQConfig) else WeightOnlyLinear,)
    assert type(loaded.lm_head) in head
    if head_float and not config.quantize_embeddings:  # still one tensor for the table and the head
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_packed_sizes_against_float(tmp_path):
    """What each choice stores on the tiny Llama (float32 file: 378112 tensor bytes)."""
    float_bytes = 4 * _unique_params(tiny_lm("llama"))
    sizes = {}
    for case in ("int4_g32_sym", "int4_head_float", "int4_emb", "int4_emb_head_float", "int8"):
        config, bits, group = CASES[case]
        sizes[case] = _expected_bytes(tiny_lm("llama"), config, bits, group)
    assert float_bytes == 378112
    # A quantized head tied to a float table adds its codes (the table is still needed in float):
    assert sizes["int4_g32_sym"] - sizes["int4_head_float"] == 320 * 64 // 2 + 320 * 2 * 5
    # int8 table + int4 head is the smallest; int8 table + float head stores the float matrix once.
    assert sizes["int4_emb"] < sizes["int4_head_float"] < sizes["int4_g32_sym"] < sizes["int4_emb_head_float"]
    assert sizes["int4_emb_head_float"] - sizes["int4_emb"] == 4 * 320 * 64 - (320 * 64 // 2 + 320 * 2 * 5)


def test_lm_head_and_embeddings_are_chosen_by_pattern():
    model = tiny_lm("llama")
    summary = quantize_(model, WeightOnlyConfig(bits=8, overrides={"lm_head": None}))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in summary.skipped and len(summary.quantized) == 14

    model = tiny_lm("llama")
    quantize_(model, WeightOnlyConfig(bits=8, quantize_embeddings=True))
    assert (
        isinstance(model.model.embed_tokens, QuantEmbedding)
        and model.model.embed_tokens.qweight.dtype == torch.int8
    )
    assert isinstance(model.lm_head, WeightOnlyLinear)

    # An override keeps the table float even with quantize_embeddings; include picks the head alone.
    model = tiny_lm("llama")
    summary = quantize_(
        model, WeightOnlyConfig(bits=8, quantize_embeddings=True, overrides={"model.embed_tokens": None})
    )
    assert type(model.model.embed_tokens) is nn.Embedding and "model.embed_tokens" in summary.skipped
    model = tiny_lm("llama")
    summary = quantize_(model, WeightOnlyConfig(bits=8, include=["lm_head"]))
    assert list(summary.quantized) == ["lm_head"]
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


@pytest.mark.parametrize(
    "config, where",
    [
        (
            WeightOnlyConfig(bits=8, overrides={"lm_haed": None}),
            "overrides.lm_haed: pattern 'lm_haed' matches no module",
        ),
        (
            WeightOnlyConfig(bits=8, include=["model.embed*", "head"]),
            "include: pattern 'head' matches no module",
        ),
        (
            WeightOnlyConfig(
                bits=8, overrides={"model.embed_tokens": WeightOnlyConfig(bits=4, group_size=32)}
            ),
            "overrides.model.embed_tokens: matches embedding tables only",
        ),
    ],
)
def test_a_pattern_that_selects_nothing_is_named(config, where):
    model = tiny_lm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=where.replace(".", r"\.").replace("*", r"\*")):
        quantize_(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- through the CLI ------------------------------------------------------------------------------------
def _recipe(tmp_path, folder, steps, out):
    import yaml

    text = tmp_path / "corpus.txt"
    text.write_text(text_lines(200))
    recipe = {
        "model": {"hf": str(folder), "hf_task": "causal_lm"},
        "data": {"name": "text", "path": str(text), "seq_len": 32},
        "steps": steps,
        "measure": {
            "repeats": 1,
            "warmup": 0,
            "generation": {
                "prompt_tokens": 8,
                "new_tokens": 4,
                "batch_sizes": [1],
                "repeats": 1,
                "warmup": 0,
            },
        },
        "output": str(out),
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_recipe_writes_a_folder_that_hugging_face_opens(tmp_path, capsys):
    from slimkit.cli import main

    source = save_tiny_lm(tmp_path / "tiny", "llama")
    out = tmp_path / "run"
    assert main(["run", _recipe(tmp_path, source, [{"type": "evaluate"}], out)]) == 0
    assert (
        f"model: {out / 'model'} (a Hugging Face folder"
        in capsys.readouterr().err + (out / "run.log").read_text()
    )
    assert not (out / "model.safetensors").exists()
    folder = out / "model"
    opened = transformers.AutoModelForCausalLM.from_pretrained(folder)
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert torch.equal(_logits(opened), _logits(original))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert (
        tokenizer("line 0001")["input_ids"]
        == transformers.AutoTokenizer.from_pretrained(source)("line 0001")["input_ids"]
    )
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["size_bytes"] == folder_bytes(
        folder
    )  # config, generation config and weights; not the tokenizer
    assert _tensor_bytes(folder / "model.safetensors") == 4 * _unique_params(original)
    assert main(["generate", str(out), "line 0001", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("line 0001")


def test_bf16_recipe_folder_and_resume(tmp_path, monkeypatch, capsys):
    from slimkit.cli import main
    from slimkit.recipes.resume import STOP_AFTER_STEP, partial_folder

    source = save_tiny_lm(tmp_path / "tiny", "llama")
    out = tmp_path / "run"
    steps = [{"type": "quantize", "name": "bf16", "bf16": {}}, {"type": "evaluate"}]
    recipe = _recipe(tmp_path, source, steps, out)
    monkeypatch.setenv(STOP_AFTER_STEP, "bf16")
    assert main(["run", recipe, "-q"]) == 130
    meta = json.loads((partial_folder(out) / "partial.json").read_text())
    assert [(s["format"], s["weights_name"]) for s in meta["steps"]] == [("hf_folder", "model")]
    monkeypatch.delenv(STOP_AFTER_STEP)
    assert main(["run", recipe, "-q", "--resume"]) == 0
    folder = out / "model"
    opened = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert opened.dtype == torch.bfloat16
    # The same tensors as the bf16 model written directly (the restored values are bfloat16 already).
    direct = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    values = _unique_params(direct)
    quantize_(direct, BF16Config())
    save_hf_folder(direct, tmp_path / "direct")
    from safetensors.torch import load_file

    resumed, written = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "direct" / "model.safetensors"),
    )
    assert resumed.keys() == written.keys() and all(torch.equal(resumed[k], written[k]) for k in written)
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["size_bytes"] for r in rows] == [folder_bytes(folder)] * 2
    assert _tensor_bytes(folder / "model.safetensors") == 2 * values
    capsys.readouterr()
    assert main(["generate", str(out), "line 0001", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("line 0001")


def test_recipe_pattern_that_matches_nothing_exits_2(tmp_path, capsys):
    from slimkit.cli import main

    source = save_tiny_lm(tmp_path / "tiny", "llama")
    steps = [{"type": "quantize", "weight_only": {"bits": 8, "overrides": {"lm_haed": None}}}]
    assert main(["run", _recipe(tmp_path, source, steps, tmp_path / "run"), "-q"]) == 2
    assert (
        "steps[0].weight_only.overrides.lm_haed: pattern 'lm_haed' matches no module"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()
