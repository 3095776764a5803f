"""How candidates are chosen: a sensitivity-guided greedy pass, seeded evolutionary refinement, and
recovery training (the expensive fidelity) for the few most promising candidates.

Every choice depends only on the seed, the signals and the evaluations' figures, never on the
clock or on which evaluations were read back from the log; so a search resumed after a kill
replays the same sequence and ends with the same result as one that was never interrupted.
"""

from __future__ import annotations

import random
from typing import Any

from slimkit.search.result import Evaluation, pareto_front
from slimkit.search.signals import move_key
from slimkit.search.space import Candidate
from slimkit.search.state import Search

MAX_REPEATS = 200  # refinement stops after this many mutations in a row that were all seen before


def greedy(s: Search) -> None:
    """From the baseline, apply single-unit changes least sensitive first (ties: larger gain
    first), keeping each one that stays within the floor and improves the objective. A unit
    already at a level that gains more is not moved back."""
    single, base = s.signals.single, s.baseline.objective
    moves = [m for m in s.units.moves(s.config) if move_key(*m) in single]
    gain = {move_key(*m): base - single[move_key(*m)]["objective"] for m in moves}
    moves = [m for m in moves if gain[move_key(*m)] > 0]
    moves.sort(key=lambda m: (single[move_key(*m)]["sensitivity"], -gain[move_key(*m)], move_key(*m)))
    current, best = Candidate(), base
    for kind, unit, level in moves:
        if s.exhausted():
            return
        now = current.setting(kind, unit)
        if now == level or gain.get(move_key(kind, unit, now), 0.0) >= gain[move_key(kind, unit, level)]:
            continue
        found = s.evaluate(current.with_setting(kind, unit, level), "greedy")
        if found.meets_floor and found.objective < best:
            current, best = found.candidate, found.objective


def refine(s: Search) -> None:
    """Mutate one or two units of a random candidate of the feasible front, seeded, until the
    budget (less the recovery reserve) is spent or the space seems exhausted."""
    rng = random.Random(s.config.seed)
    units = _unit_list(s)
    if not units:
        return
    repeats = 0
    while not s.exhausted() and repeats < MAX_REPEATS:
        parents = _feasible_front(s)
        child = parents[rng.randrange(len(parents))].candidate
        child = Candidate(child.precision, child.prune, child.sparsity, False)
        for _ in range(rng.choice((1, 2))):
            kind, unit = units[rng.randrange(len(units))]
            levels = s.units.levels(kind, unit, s.config)
            child = child.with_setting(kind, unit, levels[rng.randrange(len(levels))])
        if child.key() in s.seen:
            repeats += 1
            continue
        repeats = 0
        s.evaluate(child, "refine")


def recover(s: Search) -> None:
    """Recovery training for the ``top_k`` candidates that removed weights, beat the best feasible
    objective and came closest to the floor (one evaluation each)."""
    rec = s.config.space.recovery
    if not (rec.enabled and s.recoverable):
        return
    best = min([e.objective for e in s.evaluations if e.meets_floor], default=s.baseline.objective)
    pool = [
        e
        for e in s.evaluations
        if e.candidate.shrinks and not e.candidate.recover and e.objective < best and not e.meets_floor
    ]
    pool.sort(key=lambda e: (s.shortfall(e), e.objective, e.key))
    for e in pool[: rec.top_k]:
        if s.exhausted(reserve=0):
            return
        s.evaluate(e.candidate.with_recovery(), "recover")


def _unit_list(s: Search) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        ("precision", layer) for layer in sorted(s.units.layers) if s.units.layers[layer]
    ]
    out += [("prune", group) for group in sorted(s.units.groups)] if s.config.space.prune_levels else []
    out += [("sparsity", None)] if s.config.space.sparsity_levels else []
    return out


def _feasible_front(s: Search) -> list[Evaluation]:
    feasible = [e for e in s.evaluations if e.meets_floor and not e.candidate.recover]
    return sorted(pareto_front(feasible, s.higher_is_better), key=lambda e: e.key) or [s.baseline]
