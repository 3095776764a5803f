"""Distillation: loss values, students made from the teacher, the callback on the one loop, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.data import load_digits
from slimkit.distill import (
    DistillationCallback,
    DistillConfig,
    DistillResult,
    distill_,
    layer_dropped_student,
)
from slimkit.distill.cache import TeacherCache
from slimkit.distill.hooks import find_layer_list, uniform_layer_map
from slimkit.distill.losses import attention_loss, kd_loss, match_loss
from slimkit.distill.students import MLP
from slimkit.errors import ConfigError
from slimkit.metrics import count_parameters
from slimkit.models import DigitsCNN
from slimkit.train import TrainConfig, Trainer


def _softmax(xs, t):
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def _hand_kl(teacher, student, t):
    p, q = _softmax(teacher, t), _softmax(student, t)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# -- losses -------------------------------------------------------------------------
def test_kd_loss_matches_hand_computed_value():
    # s = [1, 2, 3], t = [3, 2, 1]: log(p_i / q_i) = (t_i - s_i) / T = (2, 0, -2) / T, so
    # KL = (2 / T) * (p_0 - p_2) with p = softmax(t / T); times T^2 that is 2 T (p_0 - p_2).
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    e = math.e
    p0, p2 = e**3 / (e**3 + e**2 + e), e / (e**3 + e**2 + e)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(2 * (p0 - p2), rel=1e-5)  # 1.15042
    assert kd_loss(s, t, 1.0).item() == pytest.approx(1.15042, abs=1e-4)
    q0, q2 = e**1.5 / (e**1.5 + e + e**0.5), e**0.5 / (e**1.5 + e + e**0.5)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(4 * (q0 - q2), rel=1e-5)
    # A batch is averaged over samples.
    s2 = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    t2 = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 4.0]])
    expected = 4.0 * (_hand_kl([3, 2, 1], [1, 2, 3], 2.0) + _hand_kl([0, 0, 4], [0.5, -1, 2], 2.0)) / 2
    assert kd_loss(s2, t2, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_zero_when_student_equals_teacher():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits + 1.0, 3.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    assert kd_loss(logits, logits * 2, 3.0).item() > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 10.0])
def test_kd_loss_is_scaled_by_t_squared(temperature):
    s, t = [0.2, 1.5, -0.7, 0.1], [1.0, -0.5, 2.0, 0.3]
    value = kd_loss(torch.tensor([s]), torch.tensor([t]), temperature).item()
    assert value == pytest.approx(temperature**2 * _hand_kl(t, s, temperature), rel=1e-5)


def test_t_squared_keeps_gradient_scale():
    # Without T^2 the soft-target gradient shrinks like 1/T^2 (Hinton et al.); with it, it stays put.
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(64, 10, generator=gen) * 0.1
    norms = []
    for temperature in (4.0, 16.0):
        s = (torch.randn(64, 10, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_()
        kd_loss(s, t, temperature).backward()
        norms.append(s.grad.norm().item())
    assert norms[1] / norms[0] == pytest.approx(1.0, rel=0.1)


def test_match_and_attention_losses():
    a = torch.randn(3, 4, 8)
    assert match_loss(a, a, "mse").item() == 0.0
    assert match_loss(a, 2 * a, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert match_loss(a, a + 1, "mse").item() == pytest.approx(1.0)
    probs = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    assert attention_loss(probs, probs).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_loss(torch.full_like(probs, 0.2), probs).item() > 0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_temperature_must_be_positive(bad):
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=bad)
    with pytest.raises(ConfigError, match="temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), bad)


def test_uniform_layer_map():
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(2, 12) == [5, 11]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]


# -- students -------------------------------------------------------------------------
def _tiny_bert(layers=6, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg._attn_implementation = "eager"
    return transformers.BertModel(cfg).eval()


def test_layer_dropped_student_copies_the_chosen_teacher_weights():
    teacher = _tiny_bert()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = layer_dropped_student(teacher, every=2, start=1)
    _, t_layers = find_layer_list(teacher)
    prefix, s_layers = find_layer_list(student)
    assert prefix == "encoder.layer" and len(s_layers) == 3 and len(t_layers) == 6
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for s_i, t_i in enumerate([1, 3, 5]):
        s_state, t_state = s_layers[s_i].state_dict(), t_layers[t_i].state_dict()
        assert s_state.keys() == t_state.keys()
        for key in s_state:
            assert torch.equal(s_state[key], t_state[key]), key
    for key, value in student.embeddings.state_dict().items():
        assert torch.equal(value, teacher.embeddings.state_dict()[key])
    for key, value in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(value, before[key])
    ids = torch.randint(0, 100, (2, 7))
    assert student(input_ids=ids).last_hidden_state.shape == (2, 7, 32)


def test_layer_dropped_student_rejects_bad_indices():
    teacher = _tiny_bert(layers=4)
    with pytest.raises(ConfigError, match="keep"):
        layer_dropped_student(teacher, keep=[0, 4])
    with pytest.raises(ConfigError, match="layers_every"):
        layer_dropped_student(teacher, every=0)
    assert len(find_layer_list(layer_dropped_student(teacher, keep=[3]))[1]) == 1


def test_a_pruned_copy_of_the_teacher_recovers_by_distillation(digits_teacher):
    # Distillation does not import pruning: the caller prunes a copy, then distils it in place.
    from slimkit.prune import StructuredConfig, prune_

    data, teacher = digits_teacher
    before = copy.deepcopy(teacher.state_dict())
    example = torch.stack([data.train[i][0] for i in range(8)])
    student = copy.deepcopy(teacher)
    prune_(student, StructuredConfig(ratio=0.75), example_inputs=example)
    assert count_parameters(student) < 0.3 * count_parameters(teacher)
    x, y = _stack(data.test)
    with torch.no_grad():
        pruned_acc = (student.eval()(x).argmax(1) == y).float().mean().item()
    result = distill_(
        student, teacher, data.train, DistillConfig(), TrainConfig(epochs=3, lr=3e-3, progress=False)
    )
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        recovered_acc = (student.eval()(x).argmax(1) == y).float().mean().item()
    assert recovered_acc > max(pruned_acc + 0.05, 0.9), (pruned_acc, recovered_acc)
    assert isinstance(result, DistillResult)
    assert result.teacher_params == count_parameters(teacher)
    assert result.student_params == count_parameters(student)
    assert len(result.train.history) == 3
    assert set(result.losses) == {"distill_output", "distill_task"}
    assert result.losses == {k: v for k, v in result.train.history[-1].items() if k.startswith("distill_")}


# -- the callback on the one loop --------------------------------------------------------
@pytest.fixture(scope="module")
def digits_teacher():
    torch.manual_seed(0)
    data = load_digits(seed=0)
    teacher = DigitsCNN(width=16)
    Trainer(teacher, TrainConfig(epochs=6, lr=3e-3, progress=False, seed=0)).fit(data.train)
    return data, teacher.eval()


def _held_out_loss(model, dataset):
    x, y = dataset.tensors if hasattr(dataset, "tensors") else _stack(dataset)
    with torch.no_grad():
        return nn.functional.cross_entropy(model.eval()(x), y).item()


def _stack(dataset):
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))])
    return torch.stack(xs), torch.stack(ys)


def test_student_learns_faster_with_kd(digits_teacher):
    data, teacher = digits_teacher
    x, y = _stack(data.train)
    few = TensorDataset(x[:150], y[:150])  # little data: where soft targets help most
    cfg = TrainConfig(epochs=100, max_steps=60, batch_size=32, lr=1e-2, progress=False, seed=3)
    losses = {}
    for name, kd in (("plain", False), ("kd", True)):
        torch.manual_seed(5)
        student = MLP(64, 10, hidden=(32,))
        if kd:
            distill_(student, teacher, few, DistillConfig(temperature=4.0, alpha=0.9), cfg)
        else:
            Trainer(student, cfg).fit(few)
        losses[name] = _held_out_loss(student, data.test)
    assert losses["kd"] < 0.9 * losses["plain"], losses


def test_hidden_distillation_with_projection_and_cache(digits_teacher, tmp_path):
    data, teacher = digits_teacher
    teacher_state = copy.deepcopy(teacher.state_dict())
    cfg = DistillConfig(
        hidden_weight=1.0, layer_map={"features.5": "features.5"}, cache=str(tmp_path / "t.st")
    )
    x, y = _stack(data.train)
    subset = TensorDataset(x[:400], y[:400])
    results = []
    for _ in range(2):  # the second run reads every teacher output from the cache file
        torch.manual_seed(0)
        student = DigitsCNN(width=4)
        result = distill_(student, teacher, subset, cfg, TrainConfig(epochs=2, lr=3e-3, progress=False))
        results.append((result, student))
    hist = results[0][0].train.history
    assert results[0][0].losses["distill_hidden"] == hist[-1]["distill_hidden"]
    assert hist[-1]["distill_hidden"] < hist[0]["distill_hidden"]
    for a, b in zip(results[0][1].parameters(), results[1][1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    cache = TeacherCache(tmp_path / "t.st")
    assert len(cache) == len(subset)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k])
    assert not teacher.training


def test_cache_of_an_outputs_only_run_is_refilled_for_hidden_distillation(digits_teacher, tmp_path):
    data, teacher = digits_teacher
    x, y = _stack(data.train)
    subset = TensorDataset(x[:64], y[:64])
    path = str(tmp_path / "t.st")
    train = TrainConfig(epochs=1, lr=1e-3, progress=False)
    distill_(DigitsCNN(width=4), teacher, subset, DistillConfig(cache=path), train)
    assert not any(k.startswith("layer:") for e in TeacherCache(path).entries.values() for k in e)
    hidden = DistillConfig(hidden_weight=1.0, layer_map={"features.5": "features.5"}, cache=path)
    result = distill_(
        DigitsCNN(width=4), teacher, subset, hidden, train
    )  # used to fail on the cached entries
    assert result.losses["distill_hidden"] > 0
    entries = TeacherCache(path).entries
    assert len(entries) == 64 and all("layer:features.5#0" in e for e in entries.values())


def test_projection_is_trained(digits_teacher):
    data, teacher = digits_teacher
    cb = DistillationCallback(
        teacher, DistillConfig(hidden_weight=1.0, layer_map={"features.2": "features.2"})
    )
    student = DigitsCNN(width=4)
    cb.check(student, next(iter(torch.utils.data.DataLoader(data.train, batch_size=4))))
    before = cb.projections["features__2"].weight.clone()
    Trainer(student, TrainConfig(epochs=1, lr=1e-2, progress=False), callbacks=[cb]).fit(data.train)
    assert cb.projections["features__2"].weight.shape == (16, 4, 1, 1)
    assert not torch.equal(before, cb.projections["features__2"].weight)


# -- bad input: clear errors before any weight changes --------------------------------------
def _unchanged_after(fn, student):
    before = copy.deepcopy(student.state_dict())
    fn()
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("student", "config", "match"),
    [
        (lambda: DigitsCNN(num_classes=5), DistillConfig(), "student: has 5 classes but the teacher has 10"),
        (
            lambda: DigitsCNN(width=4),
            DistillConfig(hidden_weight=1.0, layer_map={"features.5": "features.5"}, projection=False),
            "set projection: true",
        ),
        (
            lambda: DigitsCNN(width=4),
            DistillConfig(hidden_weight=1.0, layer_map={"features.9": "features.5"}),
            "student has no layer matching 'features.9'",
        ),
        (
            lambda: DigitsCNN(width=4),
            DistillConfig(hidden_weight=1.0, layer_map={"features.5": "encoder.7"}),
            "teacher has no layer",
        ),
        (lambda: DigitsCNN(width=4), DistillConfig(hidden_weight=1.0), "no nn.ModuleList"),
    ],
)
def test_unmatchable_setups_fail_before_training(digits_teacher, student, config, match):
    data, teacher = digits_teacher
    model = student()

    def run():
        with pytest.raises(Exception, match=match):
            distill_(model, teacher, data.train, config, TrainConfig(epochs=1, progress=False))

    _unchanged_after(run, model)


def test_attention_and_hidden_distillation_on_a_transformer():
    teacher = _tiny_bert(layers=4, seed=0)
    student = _tiny_bert(layers=2, seed=1)  # a fresh student: far from the teacher at the start
    cb = DistillationCallback(
        teacher, DistillConfig(output_loss="none", hidden_weight=1.0, attention_weight=1.0)
    )
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cb.check(student, batch)
    assert cb.layer_map == {"encoder.layer.0": "encoder.layer.1", "encoder.layer.1": "encoder.layer.3"}
    assert set(cb.attention_map) == {"encoder.layer.0.attention.self", "encoder.layer.1.attention.self"}
    dataset = [{"input_ids": ids[i], "attention_mask": batch["attention_mask"][i]} for i in range(4)]
    trainer = Trainer(
        student,
        TrainConfig(epochs=30, batch_size=4, lr=1e-2, progress=False),
        callbacks=[cb],
        loss_fn=lambda out, b: out.last_hidden_state.sum() * 0.0,
    )
    result = trainer.fit(dataset)
    first, last = result.history[0], result.history[-1]
    assert last["distill_hidden"] < 0.5 * first["distill_hidden"]
    assert last["distill_attention"] < 0.5 * first["distill_attention"]


def test_cache_keeps_token_states_without_padding(tmp_path):
    # Two sentences of 3 and 5 tokens, first batched together (padded to 5), then each alone.
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    states = torch.randn(2, 5, 4)
    emb = torch.randn(2, 4)
    cache = TeacherCache(tmp_path / "c.safetensors")
    cache.put({"input_ids": ids, "attention_mask": mask}, {"out": [emb], "layer:enc.0": [states]})
    cache.save()
    reloaded = TeacherCache(tmp_path / "c.safetensors")
    alone = {"input_ids": ids[:1, :3], "attention_mask": mask[:1, :3]}
    got = reloaded.get(alone)
    assert torch.equal(got["out"][0], emb[:1])
    assert torch.equal(got["layer:enc.0"][0], states[:1, :3])
    # Re-batched in the other order: the short sentence is padded again with zeros.
    swapped = {"input_ids": ids.flip(0), "attention_mask": mask.flip(0)}
    got = reloaded.get(swapped)
    assert torch.equal(got["layer:enc.0"][0][1, :3], states[0, :3])
    assert torch.equal(got["layer:enc.0"][0][1, 3:], torch.zeros(2, 4))
    assert reloaded.get({"input_ids": ids[:1, :2], "attention_mask": mask[:1, :2]}) is None  # unseen
    assert (reloaded.hits, reloaded.misses) == (2, 1)
