"""The ``search`` step: the fastest (or smallest) model within a metric floor, found by searching.

YAML (``slimkit search RECIPE`` runs a recipe whose last step is this one)::

    - type: search
      search:
        floor: {within: 0.01}          # or {value: 0.98}, {within_percent: 10}: on the validation split
        objective: latency             # or size, macs
        budget: {max_evaluations: 30}  # and/or minutes
        seed: 0
        space:
          precision: [bf16, int8, int4]
          prune_ratios: [0.25, 0.5]
          blocks: []                   # whole blocks (transformer layers) that may be dropped
          sparsity: []
          recovery: {enabled: true, top_k: 2, epochs: 2, lr: 0.001, distill: true}
      calibration_samples: 256

The run folder gets ``candidates.jsonl`` (every evaluated candidate), ``search.json`` (the
result: chosen candidate, its validation and test figures, the Pareto front, the closest misses,
the signals and the latency proxy's error), ``search.md`` (the tables), ``search_input.safetensors``
(the model the search started from) and ``recipe.reproduce.yaml``: a recipe that builds the chosen
model from that file with ordinary steps, without searching. When no candidate meets the floor the
closest one is still saved, labelled in ``search.json``/``search.md``, and the command exits 3.

The evaluations are logged, as they finish, in ``.NAME.search/STEP/`` beside the output; the same
command after a crash (kill -9 included) reads them back instead of evaluating them again, and
ends with the result an uninterrupted search would have given.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from slimkit.config import positive_int, to_dict
from slimkit.recipes.output import _STALE
from slimkit.recipes.steps.base import RunContext, StepResult, register_step, under
from slimkit.recipes.steps.prune import PruneStep
from slimkit.recipes.steps.quantize import QuantizeStep
from slimkit.report.sections import NOTES_KEY, Scatter, Section
from slimkit.search import SearchConfig, search
from slimkit.search.result import OBJECTIVE_FIGURE, UNITS, Evaluation, SearchResult, pareto_front
from slimkit.search.space import distills
from slimkit.search.state import saver_for
from slimkit.utils.io import save_weights, write_json, write_text

INPUT_WEIGHTS = "search_input.safetensors"
STEPS_FILE = "search_steps.yaml"
TEACHER = "$SEARCH_INPUT"  # the teacher of a distillation step: the model the search started from


@dataclass(frozen=True)
class SearchStep:
    search: SearchConfig
    calibration_samples: int = 256

    MOVED: ClassVar[dict[str, str]] = {
        "search.calibration_samples": "calibration_samples is the step's own key, beside 'search:'"
    }

    def __post_init__(self):
        positive_int(self.calibration_samples, "calibration_samples")

    def to_yaml(self) -> dict[str, Any]:
        # calibration_samples is written once, as the step's key (the step's value is the one used).
        search = {k: v for k, v in to_dict(self.search).items() if k != "calibration_samples"}
        return {"search": search, "calibration_samples": self.calibration_samples}


def state_folder(run_dir: Path, step: str) -> Path:
    """``.NAME.search/STEP`` beside the output: it outlives the temporary run folder (a crash)."""
    match = _STALE.match(run_dir.name)
    if match is None:  # not under the runner's temporary folder (a test, a rank's scratch folder)
        return run_dir / ".search" / step
    return run_dir.parent / f".{match['name']}.search" / step


def _progress(ctx: RunContext, objective: str):
    unit = UNITS[objective].split(" ")[0]

    def report(e: Evaluation, s: Any) -> None:
        if e.candidate.is_baseline:
            return
        best = s.best()
        left = s.seconds_left()
        total = s.config.budget.max_evaluations
        ctx.log.info(
            "  search [%d%s] %s: %s: %s %.4f, %s %.6g %s%s; best %s; %s",
            s.used,
            f"/{total}" if total else "",
            e.phase,
            e.candidate.label(),
            s.task.metric,
            e.metric,
            objective,
            e.objective,
            unit,
            "" if e.meets_floor else " (misses the floor)",
            f"{best.objective:.6g} {unit}" if best else "none yet",
            f"about {left:.0f} s left" if left is not None else "",
        )

    return report


@register_step(
    "search",
    config=SearchStep,
    doc="search pruning x precision x recovery for the best objective within a metric floor",
    restore=lambda ctx, cfg, saved: _search(ctx, cfg).model,
)
def run_search(ctx: RunContext, cfg: SearchStep) -> StepResult:
    result = _search(ctx, cfg)
    state = state_folder(ctx.run_dir, _step_name(ctx))
    shutil.copyfile(state / "candidates.jsonl", ctx.run_dir / "candidates.jsonl")
    write_json(ctx.run_dir / "search.json", result.to_dict())
    write_text(ctx.run_dir / "search.md", _markdown(result))
    save_weights(ctx.model, ctx.run_dir / INPUT_WEIGHTS)
    write_text(ctx.run_dir / STEPS_FILE, yaml.safe_dump(_recipe_steps(result, cfg), sort_keys=False))
    for line in result.summary_lines():
        ctx.log.info("%s", line)
    ctx.log.info(
        "Pareto front (validation %s vs %s):\n%s", result.metric_name, result.objective, result.front_table()
    )
    saver = saver_for(result.chosen.candidate, result.chosen.kept_float, result.model)
    return StepResult(result.model, saver=saver, notes=_notes(result))


def _step_name(ctx: RunContext) -> str:
    # The runner's checkpoint folder is per step; the step's own name is not in the context.
    return f"step-{ctx.checkpoints.folder.parent.name}" if ctx.checkpoints is not None else "search"


def _search(ctx: RunContext, cfg: SearchStep) -> SearchResult:
    config = dataclasses.replace(cfg.search, calibration_samples=cfg.calibration_samples)
    state = state_folder(ctx.run_dir, _step_name(ctx))
    ctx.log.info("search: state (resumable) in %s", state)
    with under("search"):
        return search(
            ctx.model,
            ctx.task,
            ctx.data,
            config,
            state_dir=state,
            threads=ctx.measure.threads,
            on_candidate=_progress(ctx, config.objective),
            note=lambda message: ctx.log.info("  search: %s", message),
        )


def _notes(result: SearchResult) -> dict[str, Any]:
    c = result.chosen
    return {
        "search_floor_met": result.met_floor,
        "search_chosen": c.candidate.label(),
        "search_val_metric": round(c.metric, 6),
        "search_test_metric": result.test_figure(),
        "search_objective": result.objective,
        "search_objective_value": c.objective,
        "search_candidates": len(result.evaluations) - 1,
        "search_resumed": result.resumed,
        "search_front": [
            {"metric": e.metric, "objective": e.objective, "candidate": e.candidate.label()}
            for e in result.front
        ],
        "latency_proxy_error": result.measured.get("proxy_error"),
        "search_time_s": round(result.seconds, 2),
        NOTES_KEY: _sections(result),
    }


def _sections(result: SearchResult) -> list[dict[str, Any]]:
    """report.html's blocks: every candidate with the front and the chosen one marked (against the
    objective, and against the other cost a user weighs: size, or predicted latency when the search
    minimised size), the chosen per-layer settings, and the per-layer signals."""
    other = "latency" if result.objective == "size" else "size"
    figure = OBJECTIVE_FIGURE[other]
    known = [e for e in result.evaluations if e.figures.get(figure) is not None]
    out = [
        _front_section(
            result, result.evaluations, result.objective, lambda e: e.objective, result.front,
            "Search: Pareto front", " ".join(result.summary_lines()), "search_front",
        ),
        _front_section(
            result, known, other, lambda e: e.figures[figure],
            pareto_front(known, result.higher_is_better, lambda e: e.figures[figure]),
            f"Search: {result.metric_name} vs {other}",
            f"every candidate's validation {result.metric_name} against its {other} "
            f"(the search minimised {result.objective})",
            "search_other_front",
        ),
    ]  # fmt: skip
    return [s.to_json() for s in out + [_settings_section(result), _signals_section(result)]]


def _front_section(result, evaluations, axis, value, front, title, text, key) -> Section:
    """The candidates' validation metric against ``axis`` (``value(e)``), ``front`` and the chosen one marked."""
    on_front = {e.key for e in front}
    rows = [
        {
            "#": e.index,
            "phase": e.phase,
            "candidate": e.candidate.label(),
            f"val {result.metric_name}": round(e.metric, 6),
            axis: value(e),
            "within floor": e.meets_floor,
            "on front": e.key in on_front,
            "chosen": e.key == result.chosen.key,
        }
        for e in evaluations
    ]
    scatter = Scatter(
        x=axis,
        y=f"val {result.metric_name}",
        label="candidate",
        front="on front",
        xlabel=f"{axis} ({UNITS[axis]})",
        ylabel=f"validation {result.metric_name}",
    )
    return Section(title, text, rows or [{"#": "-"}], mark="chosen", scatter=scatter, key=key)


def _settings_section(result: SearchResult) -> Section:
    c = result.chosen.candidate
    rows = [{"unit": layer, "setting": p} for layer, p in c.precision]
    rows += [{"unit": f"group {g}", "setting": f"pruned {r:g}"} for g, r in c.prune]
    rows += [{"unit": "blocks", "setting": f"{c.blocks} dropped"}] if c.blocks else []
    rows += [{"unit": "all weights", "setting": f"sparsity {c.sparsity:g}"}] if c.sparsity else []
    rows += [{"unit": "recovery", "setting": "trained"}] if c.recover else []
    return Section(
        "Search: chosen settings",
        "every unit not listed is unchanged (fp32, unpruned)",
        rows or [{"unit": "-", "setting": "unchanged"}],
        key="search_settings",
    )


def _signals_section(result: SearchResult) -> Section:
    signals, rows = result.signals, []
    for layer, times in sorted(signals.layer_ms.items()):
        row: dict[str, Any] = {"layer": layer}
        for precision, ms in times.items():
            row[f"{precision} ms"] = round(ms, 5)
            found = signals.single.get(f"precision|{layer}|{precision}")
            if found is not None:
                row[f"{precision} sensitivity"] = found["sensitivity"]
        rows.append(row)
    check = signals.proxy_check
    text = (
        f"per-layer latency on one example batch and relative output error with the layer alone lowered; "
        f"int8 runs {signals.int8_method}; latency proxy checked on {check.get('candidate')}: predicted "
        f"{check.get('predicted_ms')} ms, measured {check.get('measured_ms')} ms"
        if check
        else "per-layer signals"
    )
    return Section("Search: per-layer signals", text, rows or [{"layer": "-"}], key="search_signals")


def _markdown(result: SearchResult) -> str:
    head = "# Search result" + ("" if result.met_floor else ": BEST EFFORT, MISSES THE FLOOR")
    lines = [head, "", *[f"- {line}" for line in result.summary_lines()], "", "## Pareto front", ""]
    lines += [
        f"| # | validation {result.metric_name} | {result.objective} | candidate |",
        "|---|---|---|---|",
    ]
    for e in result.front:
        mark = " (chosen)" if e.key == result.chosen.key else ""
        lines.append(f"| {e.index} | {e.metric:.4f} | {e.objective:.6g} | {e.candidate.label()}{mark} |")
    lines += ["", "## Chosen per-layer settings", ""]
    lines += [f"- `{layer}`: {p}" for layer, p in result.chosen.candidate.precision] or ["- every layer fp32"]
    lines += [f"- group `{g}`: pruned {r:g}" for g, r in result.chosen.candidate.prune]
    blocks = dict(result.steps).get("depth")
    lines += [f"- blocks dropped: {blocks.indices}"] if blocks is not None else []
    return "\n".join(lines) + "\n"


def _recipe_steps(result: SearchResult, cfg: SearchStep) -> list[dict[str, Any]]:
    """The chosen candidate as ordinary recipe steps (the order the search built it in)."""
    steps, candidate = [], result.chosen.candidate
    recipe_steps = dict(result.steps)
    train = plain_train = recipe_steps.get("recover")  # restore_best off: the last epoch, as searched
    # Plain fine-tuning (no distillation, no sparsity) follows the last structural step.
    fine_tune = (
        plain_train
        if train is not None and not distills(cfg.search, candidate) and not candidate.sparsity
        else None
    )
    if "structured" in recipe_steps:
        body = PruneStep(
            structured=recipe_steps["structured"],
            train=None if "depth" in recipe_steps else fine_tune,
            calibration_samples=cfg.calibration_samples,
        )
        steps.append({"type": "prune", "name": "search_prune_channels", **body.to_yaml()})
    if "depth" in recipe_steps:
        body = PruneStep(depth=recipe_steps["depth"], train=fine_tune)
        steps.append({"type": "prune", "name": "search_drop_blocks", **body.to_yaml()})
    if "magnitude" in recipe_steps:
        body = PruneStep(magnitude=recipe_steps["magnitude"], train=plain_train)
        steps.append({"type": "prune", "name": "search_prune_weights", **body.to_yaml()})
    if train is not None and distills(cfg.search, candidate):
        rec = cfg.search.space.recovery
        distill = {"temperature": rec.temperature, "alpha": rec.alpha}
        steps.append(
            {
                "type": "distill",
                "name": "search_recover",
                "student": "current",
                "teacher": TEACHER,
                "distill": distill,
                "train": dataclasses.asdict(plain_train),
            }
        )
    if "quantize" in recipe_steps:
        body = QuantizeStep(recipe_steps["quantize"], calibration_samples=cfg.calibration_samples)
        steps.append({"type": "quantize", "name": "search_quantize", **body.to_yaml()})
    if "codebook" in recipe_steps:  # the centroids as clustered, as the search built them
        body = QuantizeStep(recipe_steps["codebook"], fine_tune=False)
        steps.append({"type": "quantize", "name": "search_share_weights", **body.to_yaml()})
    return steps or [{"type": "evaluate", "name": "search_unchanged"}]


def missed_floor(run_dir: str | Path) -> list[str] | None:
    """For the CLI: None when the run has no search or its search met the floor, else the lines
    that say how far the closest candidates missed it (the exit code is then 3)."""
    path = Path(run_dir) / "search.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("met_floor", True):
        return None
    lines = [
        f"no candidate within the floor ({data['metric']} {data['floor_text']}, {data['floor']:.4f}); closest:"
    ]
    lines += [f"  missed by {c['missed_by']:.4f}: {c['label']}" for c in data["closest"]]
    lines.append(
        f"the best-effort model in {run_dir} is labelled as missing the floor (search.json, search.md)"
    )
    return lines
