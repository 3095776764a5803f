"""Weight sharing (codebook quantization), its centroid fine-tuning and the entropy-coded container."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit import quant
from slimkit.errors import ConfigError, ModelError
from slimkit.quant.codebook import CodebookLinear, SharedWeights, cluster, kmeans_1d, to_float
from slimkit.train import TrainConfig, Trainer
from slimkit.utils import entropy


def _pruned_mlp(seed: int = 0, sparsity: float = 0.7) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            w = layer.weight
            w[w.abs() < w.abs().flatten().kthvalue(int(sparsity * w.numel())).values] = 0
    return model


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"levels": "cube"}, "levels"),
     ({"activation_bits": 4}, "activation_bits"), ({"activation_bits": True}, "activation_bits"),
     ({"activation_bits": "8"}, "activation_bits")],
)  # fmt: skip
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        quant.CodebookConfig(**kwargs)
    assert err.value.path == field
    assert "2 to 8" in str(err.value) or field != "bits"


def test_kmeans_linear_init_finds_the_cluster_means():
    values = np.array([-1.1, -1.0, -0.9, 0.45, 0.5, 0.55, 1.9, 2.0, 2.1])
    centroids = kmeans_1d(values, 3, "linear")
    np.testing.assert_allclose(centroids, [-1.0, 0.5, 2.0], atol=1e-12)
    assert np.array_equal(kmeans_1d(values[::-1], 3), centroids)  # deterministic, order-free


def test_pruned_layer_clusters_only_nonzeros_and_keeps_zeros():
    w = _pruned_mlp()[0].weight
    codebook, indices, mask = cluster(w, bits=3)
    assert mask is not None and torch.equal(mask, w != 0)
    assert codebook.numel() == 8 and bool((codebook.diff() > 0).all())
    shared = torch.where(mask, codebook[indices.long()], torch.zeros(()))
    assert int((shared == 0).sum()) == int((w == 0).sum())  # no non-zero weight rounded to an exact zero
    # Every kept weight sits on its nearest centroid.
    nearest = (w[mask][:, None] - codebook[None]).abs().argmin(1)
    assert torch.equal(nearest.to(torch.uint8), indices[mask])


def test_centroid_gradients_are_the_summed_weight_gradients_and_weights_stay_tied():
    model = _pruned_mlp()
    zeros = {i: model[i].weight == 0 for i in (0, 2)}
    quant.prepare_(model, quant.CodebookConfig(bits=4))
    layer = model[0]
    assert isinstance(layer, CodebookLinear) and layer.trainable
    x = torch.randn(8, 32)
    model(x).pow(2).sum().backward()
    # The same loss through a float copy of the shared weight: summing its gradient per cluster gives the centroids'.
    w = layer.weight().detach().requires_grad_(True)
    nn.functional.linear(torch.relu(nn.functional.linear(x, w, layer.bias_value)), model[2].weight(),
                         model[2].bias_value).pow(2).sum().backward()  # fmt: skip
    expected = torch.zeros(16).index_add_(0, layer.indices[layer.mask].long(), w.grad[layer.mask])
    torch.testing.assert_close(layer.codebook.grad, expected, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    before = layer.codebook.detach().clone()
    data = TensorDataset(torch.randn(64, 32), torch.randint(0, 10, (64,)))
    Trainer(model, TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False)).fit(data)
    quant.convert_(model)
    assert (layer.codebook - before).abs().max() > 1e-3  # the centroids moved
    for i in (0, 2):
        shared = model[i]
        weight = shared.weight()
        assert torch.equal(weight == 0, zeros[i])  # pruned zeros stayed exactly zero
        assert torch.equal(weight[shared.mask], shared.codebook[shared.indices[shared.mask].long()])
        assert weight[shared.mask].unique().numel() <= 16  # tied: at most one value per cluster
        assert not any(True for _ in shared.parameters())  # frozen after convert_


@pytest.mark.parametrize("save", ["compressed", "quantized"])
def test_save_load_reproduces_indices_and_shared_weights_exactly(tmp_path, save):
    model = _pruned_mlp()
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    for m in (model, conv):
        quant.quantize_(m, quant.CodebookConfig(bits=5, overrides={"2": {"bits": 3}}))
        quant.convert_(m)
    for m, fresh, x in ((model, _pruned_mlp(seed=3), torch.randn(4, 32)),
                        (conv, nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(128, 5)),
                         torch.randn(2, 3, 6, 6))):  # fmt: skip
        path = tmp_path / ("m.safetensors" if save == "quantized" else "m.slim")
        size = getattr(quant, f"save_{save}")(m, path)
        assert size == path.stat().st_size
        getattr(quant, f"load_{save}")(fresh, path)
        assert _same_state(m, fresh)  # indices, masks, codebooks and biases bit for bit
        assert torch.equal(fresh(x), m(x))
    assert model[2].codebook.numel() == 8 and model[0].codebook.numel() == 32


def test_entropy_coding_beats_packed_indices_on_a_skewed_distribution(tmp_path):
    rng = np.random.default_rng(0)
    codes = np.minimum(rng.geometric(0.35, 20000) - 1, 31).astype(np.uint8)  # 5-bit symbols, skewed
    packed = entropy.encode("bitpack", codes.tobytes())
    coder, best = entropy.encode_best(codes.tobytes())
    assert len(packed) == 1 + 20000 * 5 // 8
    assert coder == "huffman" and len(best) < 0.6 * len(packed)
    assert entropy.decode(coder, best, codes.size) == codes.tobytes()
    # The same through a whole model file: entropy-coded file < the b-bit packed one.
    model = nn.Sequential(nn.Linear(200, 100))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(rng.laplace(0, 0.05, (100, 200))).float())
    quant.quantize_(model, quant.CodebookConfig(bits=5))
    quant.convert_(model)
    plain = quant.save_compressed(model, tmp_path / "p.slim", ("raw", "bitpack"))
    coded = quant.save_compressed(model, tmp_path / "c.slim")
    assert coded < 0.85 * plain


@pytest.mark.parametrize(
    "data", [b"", bytes([7]) * 50, bytes(range(256)) * 3, bytes([0, 1, 1, 2, 2, 2, 2] * 100)]
)
def test_every_coder_round_trips(data):
    for coder in entropy.CODERS:
        assert entropy.decode(coder, entropy.encode(coder, data), len(data)) == data


def test_gaps_round_trip_through_varints():
    positions = np.array([0, 1, 5, 200, 70000, 70001, 2**33])
    gaps = entropy.positions_to_gaps(positions)
    assert gaps.tolist() == [0, 0, 3, 194, 69799, 0, 2**33 - 70002]
    encoded = entropy.varint_encode(gaps)
    assert encoded.size == 1 + 1 + 1 + 2 + 3 + 1 + 5
    assert np.array_equal(entropy.gaps_to_positions(entropy.varint_decode(encoded)), positions)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda b: b[:5], "header truncated"),
        (lambda b: b[:8] + b"[" + b[9:], "header corrupt"),
        (lambda b: b.replace(b'"U8",[', b'"U8",[1', 1), "header corrupt"),
        (lambda b: b[:-3], "payload truncated"),
        (lambda b: b[:-3] + bytes([b[-3] ^ 0xFF]) + b[-2:], "payload corrupt"),
    ],
)
def test_corrupt_container_is_a_clear_error_and_leaves_the_model_alone(tmp_path, damage, words):
    model = _pruned_mlp()
    quant.quantize_(model, quant.CodebookConfig(bits=4))
    quant.convert_(model)
    path = tmp_path / "m.slim"
    quant.save_compressed(model, path)
    path.write_bytes(damage(path.read_bytes()))
    fresh = _pruned_mlp(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ModelError, match=words):
        quant.load_compressed(fresh, path)
    assert all(isinstance(fresh[i], nn.Linear) for i in (0, 2))
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_a_file_for_another_architecture_is_refused_before_the_model_changes(tmp_path):
    model = _pruned_mlp()
    quant.quantize_(model, quant.CodebookConfig(bits=4))
    quant.convert_(model)
    quant.save_compressed(model, tmp_path / "m.slim")
    other = nn.Sequential(nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 10))
    with pytest.raises(ModelError, match="does not fit"):
        quant.load_compressed(other, tmp_path / "m.slim")
    assert isinstance(other[0], nn.Linear) and isinstance(other[2], nn.Linear)


def test_pow2_and_log_levels():
    model = nn.Sequential(nn.Linear(64, 32))
    quant.prepare_(model, quant.CodebookConfig(bits=4, levels="pow2"))
    layer = model[0]
    exps = torch.log2(layer.codebook.abs())
    assert not layer.trainable and torch.equal(exps, exps.round())  # shifts: not trained, stay powers of two
    assert torch.equal(layer.codebook[8:], -layer.codebook[:8].flip(0))
    codebook, _, _ = cluster(torch.linspace(-1, 1, 101).reshape(1, -1), bits=3, levels="log")
    ratios = codebook[4:][1:] / codebook[4:][:-1]
    torch.testing.assert_close(ratios, torch.full((3,), float(ratios[0])))  # geometric spacing
    assert float(codebook.max()) == 1.0


def _int8_pair(bits: int = 5):
    """A pruned MLP and a CNN, each converted twice: float codebook and ``activation_bits: 8``."""
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    pairs = []
    for float_model, x in ((_pruned_mlp(), torch.randn(64, 32)), (cnn, torch.randn(16, 3, 6, 6))):
        int8_model = copy.deepcopy(float_model)
        for m, act in ((float_model, None), (int8_model, 8)):
            quant.quantize_(m, quant.CodebookConfig(bits=bits, activation_bits=act))
            quant.convert_(m)
        pairs.append((float_model, int8_model, x))
    return pairs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_activations_stay_close_to_the_float_codebook_on_a_shared_int8_table():
    for float_model, int8_model, x in _int8_pair(bits=5):
        with torch.no_grad():
            assert _rel(int8_model(x), float_model(x)) < 0.02
        layers = [m for m in int8_model.modules() if isinstance(m, SharedWeights)]
        assert len(layers) == 2
        for layer in layers:
            assert layer.kernel() is not None and layer.qweight.dtype == torch.int8
            table = torch.round(layer.codebook / layer.w_scale).to(torch.int8)
            assert int(table.abs().max()) == 127  # the one symmetric scale spans the codebook
            expected = table[layer.indices.long()].reshape(layer.qweight.shape[0], -1)
            if layer.mask is not None:
                kept = layer.mask.reshape(expected.shape)
                expected = torch.where(kept, expected, torch.zeros((), dtype=torch.int8))
                assert bool((layer.qweight[~kept] == 0).all())  # pruned zeros stay zero
                assert layer.qweight[kept].unique().numel() <= 2**5
            else:
                assert layer.qweight.unique().numel() <= 2**5
            assert torch.equal(layer.qweight, expected)
            torch.testing.assert_close(
                layer.weight().reshape(expected.shape), expected.float() * layer.w_scale
            )


@pytest.mark.parametrize("save", ["compressed", "quantized"])
def test_int8_activation_layers_round_trip_exactly_and_the_file_does_not_grow(tmp_path, save):
    for float_model, int8_model, x in _int8_pair(bits=4):
        sizes = []
        for m in (float_model, int8_model):
            path = tmp_path / ("m.safetensors" if save == "quantized" else "m.slim")
            sizes.append(getattr(quant, f"save_{save}")(m, path))
        fresh = copy.deepcopy(float_model)  # a float model of the same architecture
        for name, layer in list(fresh.named_children()):
            if isinstance(layer, SharedWeights):
                setattr(fresh, name, to_float(layer))
        getattr(quant, f"load_{save}")(fresh, path)
        assert _same_state(int8_model, fresh)  # indices, masks, codebooks, scales bit for bit
        with torch.no_grad():
            assert torch.equal(fresh(x), int8_model(x))
        assert all(m.qweight is not None for m in fresh.modules() if isinstance(m, SharedWeights))
        assert "qweight" not in " ".join(int8_model.state_dict())  # derived, not stored
        # Per layer only the 4-byte scale and its header entries: the weights' bytes do not grow.
        assert sizes[1] - sizes[0] <= 2 * 128


def test_load_state_dict_rebuilds_the_gathered_int8_weight():
    _, model, x = _int8_pair()[0]
    before, out = model[0].qweight.clone(), model(x)
    state = model.state_dict()
    state["0.codebook"] = -state["0.codebook"]  # same scale; torch.round is symmetric
    model.load_state_dict(state)
    assert torch.equal(model[0].qweight, -before)
    assert not torch.equal(model(x), out)  # the int8 layer computes with the new table, not a stale one
