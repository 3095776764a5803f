"""The search's newer dimensions: dropped blocks (names mapped onto the shorter model), shared-weight
codebooks for the smallest file, the full-length text example, recovery by bisection along the
front and the time kept for it. Tiny models: seconds each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune import DepthConfig, StructuredConfig, prune_
from slimkit.quant import save_compressed
from slimkit.recipes.steps.prune import PruneStep
from slimkit.recipes.steps.search import SearchStep, _recipe_steps
from slimkit.search import search, strategy
from slimkit.search.config import BudgetConfig, FloorConfig, RecoveryConfig, SearchConfig, SpaceConfig
from slimkit.search.result import Evaluation
from slimkit.search.space import Candidate, renamer
from slimkit.search.state import Search, full_length
from slimkit.tasks import build_task
from slimkit.train import TrainConfig, Trainer
from tests.transfer_helpers import tokenizer, toy_bundle


def _classifier(layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


def test_candidate_blocks_round_trip_and_older_logs_read_as_zero():
    c = Candidate.make(prune={"a": 0.5}, blocks=2)
    assert Candidate.from_dict(c.to_dict()) == c and c.key() != Candidate.make(prune={"a": 0.5}).key()
    assert Candidate.from_dict({"precision": {}, "prune": {}, "sparsity": 0.0, "recover": False}).blocks == 0
    assert "drop 2 blocks" in c.label() and c.shrinks and not c.is_baseline
    many = Candidate.make(prune={f"g{i}": 0.25 * (1 + i % 3) for i in range(5)})
    assert many.label() == "prune 5 groups 0.25-0.75" and "prune a 0.5" in c.label()
    assert c.with_recovery().blocks == 2 and c.with_setting("blocks", None, 1).blocks == 1


def test_depth_indices_drop_those_blocks_and_names_map_onto_the_shorter_model():
    model = _classifier(4)
    summary = prune_(model, DepthConfig(indices=[1, 3]))
    assert len(model.bert.encoder.layer) == 2 and summary.details["dropped"] == [1, 3]
    assert model.config.num_hidden_layers == 2
    rename = renamer(model)
    assert rename("bert.encoder.layer.2.output.dense") == "bert.encoder.layer.1.output.dense"
    assert rename("bert.encoder.layer.1.output.dense") is None
    assert rename("bert.encoder.layer.0") == "bert.encoder.layer.0"
    assert rename("classifier") == "classifier" and renamer(_classifier(2))("bert.encoder.layer.1") == (
        "bert.encoder.layer.1"
    )
    with pytest.raises(ConfigError, match="indices"):
        prune_(_classifier(2), DepthConfig(indices=[5]))
    with pytest.raises(ConfigError, match="indices"):
        DepthConfig(indices=[1, 1])


def test_full_length_example_repeats_each_rows_own_tokens_without_padding():
    ids = torch.tensor([[101, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    out = full_length({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}, 10)
    assert out["input_ids"].shape == (2, 10) and bool(out["attention_mask"].all())
    assert out["input_ids"][0].tolist() == [101, 7, 8, 102, 101, 7, 8, 102, 101, 7]
    assert out["input_ids"][1, :6].tolist() == [101, 9, 102, 101, 9, 102] and "token_type_ids" in out
    with pytest.raises(ConfigError, match="example_tokens"):
        full_length(torch.zeros(2, 3), 8)


@pytest.fixture(scope="module")
def encoder_task():
    data = toy_bundle(n=80)
    task = build_task(data, tokenizer(), max_length=16)
    model = _classifier(3)
    train = TrainConfig(epochs=3, lr=3e-3, batch_size=16, progress=False)
    Trainer(model, train, forward=task.forward, loss_fn=task.loss_fn, collate_fn=task.collate_fn).fit(
        data.train
    )
    return model.eval(), task, data


def test_search_drops_blocks_and_lowers_the_layers_left_by_their_new_names(encoder_task):
    model, task, data = encoder_task
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SearchConfig(
        floor=FloorConfig(within=1.0),  # everything keeps it: the fewest MACs win
        objective="macs",
        budget=BudgetConfig(max_evaluations=12),
        space=SpaceConfig(
            precision=["int8"], prune_ratios=[], blocks=[1, 2, 3], recovery=RecoveryConfig(enabled=False)
        ),
        example_size=8,
        example_tokens=24,
    )
    result = search(model, task, data, config)
    chosen = result.chosen.candidate
    assert chosen.blocks == 2  # 3 would leave none: never tried
    assert len(result.model.bert.encoder.layer) == 1
    depth = dict(result.steps)["depth"]
    assert isinstance(depth, DepthConfig) and len(depth.indices) == 2
    quant = dict(result.steps)["quantize"]
    names = {n for n, _ in result.model.named_modules()}
    assert set(quant.include) <= names  # layers named in the shorter model, dropped ones left out
    assert result.chosen.objective < result.baseline.objective / 2.5  # one block of three left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input unchanged
    assert all(e.candidate.blocks < 3 for e in result.evaluations)


def test_codebook_precision_gives_the_smallest_file_stored_entropy_coded(tmp_path):
    from tests.test_search import _digits

    torch.manual_seed(0)
    data = _digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    Trainer(model, TrainConfig(epochs=6, lr=3e-3, progress=False)).fit(data.train)
    config = SearchConfig(
        floor=FloorConfig(within=0.03),
        objective="size",
        budget=BudgetConfig(max_evaluations=10),
        space=SpaceConfig(
            precision=["int8", "codebook"],
            codebook_bits=4,
            prune_ratios=[],
            recovery=RecoveryConfig(enabled=False),
        ),
    )
    result = search(model.eval(), build_task(data), data, config)
    assert result.met_floor and "codebook" in dict(result.chosen.candidate.precision).values()
    int8 = [e.objective for e in result.evaluations if set(dict(e.candidate.precision).values()) == {"int8"}]
    assert int8 and result.chosen.objective < min(int8)
    assert result.chosen.objective == save_compressed(result.model, tmp_path / "m.safetensors")


class _Stub:
    """Just what :func:`strategy.recover` reads from a search: recovered candidates with sparsity
    up to 0.6 keep the floor; every one untrained misses it."""

    def __init__(self, pool: list[Evaluation], top_k: int):
        self.config = SimpleNamespace(space=SimpleNamespace(recovery=RecoveryConfig(top_k=top_k)))
        self.recoverable, self.higher_is_better = True, True
        self.baseline = Evaluation(0, Candidate(), "baseline", 1.0, {}, {}, 100.0, True, 0.0)
        self.evaluations, self.tried = [self.baseline, *pool], []

    def exhausted(self, reserve=None, next_s=None):
        return False

    def evaluate(self, candidate, phase):
        self.tried.append(candidate.sparsity)
        ok = candidate.sparsity <= 0.6
        found = Evaluation(len(self.evaluations), candidate, phase, 0.9, {}, {}, 1.0, ok, 1.0)
        self.evaluations.append(found)
        return found


def test_recovery_bisects_the_front_from_its_middle():
    levels = [round(0.1 * i, 1) for i in range(1, 10)]
    pool = [
        Evaluation(i, Candidate.make(sparsity=s), "uniform", 1.0 - s, {}, {}, 100.0 * (1 - s), False, 0.0)
        for i, s in enumerate(levels, 1)
    ]
    stub = _Stub(pool, top_k=3)
    strategy.recover(stub)
    # front by objective: 0.9 (most compressed) ... 0.1; middle 0.5 keeps -> 0.8 misses -> 0.7 misses
    assert stub.tried == [0.5, 0.8, 0.7]
    stub = _Stub(pool, top_k=9)
    strategy.recover(stub)
    assert stub.tried == [0.5, 0.8, 0.7, 0.6]  # converged on the most compressed that keeps it


def test_a_minutes_budget_keeps_time_for_recovery():
    s = Search.__new__(Search)
    rec = RecoveryConfig(time_share=0.25)
    s.config = SearchConfig(
        FloorConfig(within=0.1),
        budget=BudgetConfig(max_evaluations=None, minutes=1.0),
        space=SpaceConfig(recovery=rec),
    )
    s.units, s.used, s.spent_s = SimpleNamespace(groups={"a": 4}, blocks=0), 4, 40.0
    assert s.exhausted()  # 40 s + 10 s a candidate > 45 s: the last quarter is recovery's
    assert not s.exhausted(reserve=0)  # recovery itself may use the whole minute...
    assert s.exhausted(reserve=0, next_s=30.0)  # ...but not start one that would overrun it


def test_search_step_writes_dropped_blocks_as_a_prune_step_with_the_fine_tuning_after_it():
    train = TrainConfig(epochs=1, progress=False)
    candidate = Candidate.make(prune={"x": 0.5}, blocks=1, recover=True)
    result = SimpleNamespace(
        chosen=SimpleNamespace(candidate=candidate),
        steps=[
            ("structured", StructuredConfig(ratio=0.0, ratios={"x": 0.5})),
            ("depth", DepthConfig(indices=[1])),
            ("recover", train),
        ],
    )
    space = SpaceConfig(recovery=RecoveryConfig(distill=False))
    steps = _recipe_steps(result, SearchStep(SearchConfig(FloorConfig(within=0.1), space=space)))
    assert [s["name"] for s in steps] == ["search_prune_channels", "search_drop_blocks"]
    assert steps[0].get("train") is None and steps[1]["train"]["epochs"] == 1
    assert steps[1]["depth"]["indices"] == [1]
    rebuilt = PruneStep(depth=DepthConfig(**steps[1]["depth"]))
    assert rebuilt.depth.indices == [1]


def test_cli_codebook_search_is_stored_entropy_coded_and_its_recipe_rebuilds_it(tmp_path):
    import json

    import yaml

    from slimkit.cli import main
    from tests.test_search import _recipe

    body = {
        "floor": {"within": 0.05},
        "objective": "size",
        "budget": {"max_evaluations": 5},
        "space": {
            "precision": ["codebook"],
            "codebook_bits": 4,
            "prune_ratios": [],
            "recovery": {"enabled": False},
        },
    }
    assert main(["search", str(_recipe(tmp_path, body, "cb")), "--quiet"]) == 0
    found = json.loads((tmp_path / "cb" / "search.json").read_text())
    assert "codebook" in found["chosen"]["label"]
    steps = yaml.safe_load((tmp_path / "cb" / "recipe.reproduce.yaml").read_text())["steps"]
    shared = [s for s in steps if s.get("name") == "search_share_weights"]
    assert shared and shared[0]["fine_tune"] is False and "train" not in shared[0]
    assert main(["run", str(tmp_path / "cb" / "recipe.reproduce.yaml"), "--quiet"]) == 0
    searched = json.loads((tmp_path / "cb" / "report.json").read_text())["rows"][-1]
    again = json.loads((tmp_path / "cb_reproduced" / "report.json").read_text())["rows"][-1]
    assert again["metrics"]["accuracy"] == pytest.approx(searched["metrics"]["accuracy"])
    assert again["size_bytes"] == searched["size_bytes"] == found["chosen"]["objective"]
    report = json.loads((tmp_path / "cb" / "report.json").read_text())
    assert searched["size_bytes"] < report["rows"][0]["size_bytes"] / 6  # 4-bit indices, entropy-coded
    # the second view: every candidate's metric against predicted latency, its own front
    other = next(x for x in report["sections"] if x["key"] == "search_other_front")
    front = [r for r in other["rows"] if r["on front"]]
    assert other["scatter"]["x"] == "latency" and front
    for r in front:  # no point of the front is dominated on (accuracy, latency)
        assert not any(
            o["val accuracy"] >= r["val accuracy"]
            and o["latency"] <= r["latency"]
            and (o["val accuracy"] > r["val accuracy"] or o["latency"] < r["latency"])
            for o in other["rows"]
        )


def test_quantize_step_fine_tune_false_converts_untrained_and_is_refused_where_it_means_nothing():
    from slimkit.recipes.steps.quantize import QuantizeStep

    step = QuantizeStep.from_yaml({"codebook": {"bits": 4}, "fine_tune": False}, "steps[0]")
    assert step.train is None and not step.fine_tune and step.to_yaml()["fine_tune"] is False
    assert QuantizeStep.from_yaml({"codebook": {"bits": 4}}, "steps[0]").train is not None  # default
    with pytest.raises(ConfigError, match="fine_tune"):
        QuantizeStep.from_yaml({"int8_dynamic": {}, "fine_tune": False}, "steps[0]")
    with pytest.raises(ConfigError, match="fine_tune"):
        QuantizeStep.from_yaml({"codebook": {}, "fine_tune": False, "train": {"epochs": 1}}, "steps[0]")


def test_one_call_runs_a_pair_model_once_on_the_first_sentences():
    calls = []

    class Encoder(nn.Module):
        def forward(self, input_ids, attention_mask):
            calls.append(input_ids.shape)
            return input_ids.float()

    task = build_task(toy_bundle(8), tokenizer(), max_length=16)
    task.task = "similarity"
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {
        "input_ids": ids,
        "attention_mask": ids,
        "pair_input_ids": ids[:, :2],
        "pair_attention_mask": ids[:, :2],
    }
    assert task.one_call(Encoder(), batch).shape == (2, 3) and calls == [(2, 3)]


def test_a_train_mode_model_with_batchnorm_is_left_exactly_as_it_was(tmp_path):
    """Timing the model (the proxy check, the final side-by-side) once ran it in train mode and moved
    its BatchNorm statistics: the chosen model then differed from the one a resumed search rebuilt."""
    from tests.test_search import _digits

    torch.manual_seed(0)
    data = _digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    Trainer(model, TrainConfig(epochs=3, lr=3e-3, progress=False)).fit(data.train)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SearchConfig(
        floor=FloorConfig(within=0.05),
        budget=BudgetConfig(max_evaluations=6),
        space=SpaceConfig(precision=["int8"], prune_ratios=[0.5], recovery=RecoveryConfig(top_k=1, epochs=1)),
    )
    first = search(model, build_task(data), data, config, state_dir=tmp_path)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = search(model, build_task(data), data, config, state_dir=tmp_path)  # every candidate read back
    assert again.resumed == len(first.evaluations) - 1
    assert again.test_metrics == first.test_metrics
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
