"""How candidates are chosen: a sensitivity-guided greedy pass, coarse structural candidates, seeded
evolutionary refinement, and recovery training (the expensive fidelity) for a few candidates of the
front, chosen by bisection.

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


def uniform(s: Search) -> None:
    """Coarse structural candidates on top of the best feasible one's precisions: every group at
    one prune ratio, a number of blocks dropped and a sparsity level, in every combination (mild
    first). Few of them keep the floor untrained; they are what recovery training starts from."""
    space, best = s.config.space, s.best()
    precision = dict(best.candidate.precision) if best is not None else {}
    groups = sorted(s.units.groups)
    ratios = [0.0, *space.prune_levels] if groups else [0.0]
    combos = [
        (blocks, ratio, sparsity)
        for blocks in [0, *s.units.block_levels(s.config)]
        for ratio in ratios
        for sparsity in [0.0, *space.sparsity_levels]
        if blocks or ratio or sparsity
    ]
    for blocks, ratio, sparsity in combos:
        candidate = Candidate.make(precision, {g: ratio for g in groups}, sparsity, False, blocks)
        if s.exhausted():
            return
        if candidate.key() not in s.seen:
            s.evaluate(candidate, "uniform")


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
        child = child.with_recovery(False)
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
    """Recovery training (one evaluation each, ``top_k`` at most) along the front of candidates
    that removed weights, beat the best feasible objective and missed the floor untrained, by
    bisection: the middle one first, then the more compressed half when it kept the floor after
    recovery, else the less compressed half."""
    rec = s.config.space.recovery
    if not (rec.enabled and s.recoverable):
        return
    best = min([e.objective for e in s.evaluations if e.meets_floor], default=s.baseline.objective)
    pool = [
        e
        for e in s.evaluations
        if e.candidate.shrinks and not e.candidate.recover and e.objective < best and not e.meets_floor
    ]
    front = sorted(pareto_front(pool, s.higher_is_better), key=lambda e: (e.objective, e.key))
    low, high, last_s = 0, len(front) - 1, None
    for _ in range(rec.top_k):
        if low > high or s.exhausted(reserve=0, next_s=last_s):
            return
        middle = (low + high) // 2
        found = s.evaluate(front[middle].candidate.with_recovery(), "recover")
        last_s = found.seconds
        if found.meets_floor:
            high = middle - 1  # index 0 is the most compressed
        else:
            low = middle + 1


def _unit_list(s: Search) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [
        ("precision", layer) for layer in sorted(s.units.layers) if s.units.layers[layer]
    ]
    out += [("prune", group) for group in sorted(s.units.groups)] if s.config.space.prune_levels else []
    out += [("blocks", None)] if s.units.block_levels(s.config) else []
    out += [("sparsity", None)] if s.config.space.sparsity_levels else []
    return out


def _feasible_front(s: Search) -> list[Evaluation]:
    feasible = [e for e in s.evaluations if e.meets_floor and not e.candidate.recover]
    return sorted(pareto_front(feasible, s.higher_is_better), key=lambda e: e.key) or [s.baseline]
