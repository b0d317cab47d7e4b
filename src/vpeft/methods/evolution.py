"""The evolutionary search that NOAH and GLoRA share: per-layer choices scored by validation accuracy.

A candidate is a list with one dict per searched unit (a block for NOAH, a Linear layer for
GLoRA) mapping each searched key to one of its choices. The search keeps a pool of feasible
candidates (parameter count within the budget); every generation ranks the pool by score, keeps
the best ``parents`` and refills the pool with children: a per-unit crossover of two parents,
then a mutation that redraws each key with probability ``mutation_prob``. Scores are cached, so
a candidate is evaluated once. Test data never reaches it: the caller passes the validation split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vpeft.errors import ConfigError

Candidate = list[dict[str, Any]]


_SAMPLED = "_vpeft_subnet_sampled"


def sampling_hook(draw: Callable[[], None], reset: Callable[[], None]) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook for a supernet: a training forward calls ``draw`` (a random subnet); the first
    evaluation forward after it calls ``reset`` (the supernet's evaluation subnet), unless a subnet was
    set since (:func:`subnet_set`), so a search scores each candidate as itself."""

    def hook(module: nn.Module, args: tuple) -> None:
        if module.training:
            draw()
            setattr(module, _SAMPLED, True)
        elif getattr(module, _SAMPLED, False):
            reset()
            setattr(module, _SAMPLED, False)

    return hook


def subnet_set(model: nn.Module) -> None:
    """Record that a subnet was set on ``model``: evaluation uses it, not the supernet's evaluation subnet."""
    setattr(model, _SAMPLED, False)


def sample(choices: dict[str, Sequence[Any]], units: int, rng: random.Random) -> Candidate:
    """One candidate drawn uniformly: every key of every unit independently."""
    return [{k: rng.choice(v) for k, v in choices.items()} for _ in range(units)]


@torch.no_grad()
def top1(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Fraction of correct predictions of ``model`` (in evaluation mode) over ``batches``."""
    model.eval()
    correct = seen = 0
    device = next(model.parameters()).device
    for x, y in batches:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        correct += (model(x).argmax(-1) == y).sum().item()
        seen += len(y)
    return correct / max(1, seen)


def evolve(
    choices: dict[str, Sequence[Any]],
    units: int,
    score: Callable[[Candidate], float],
    count: Callable[[Candidate], int],
    budget: int,
    *,
    population: int,
    generations: int,
    parents: int | None = None,
    mutation_prob: float,
    rng: random.Random,
    what: str,
) -> dict[str, Any]:
    """Evolutionary search over ``units`` units; returns the best candidate, its score and the history.

    ``parents`` defaults to half the population (at least 2). ``what`` names the method in errors.
    """
    if population < 2 or generations < 1:
        raise ConfigError(f"{what}: the search needs population >= 2 and generations >= 1")
    keep = max(2, population // 2) if parents is None else max(2, min(parents, population))
    scored: dict[str, float] = {}

    def cached(candidate: Candidate) -> float:
        key = json.dumps(candidate, sort_keys=True)
        if key not in scored:
            scored[key] = score(candidate)
        return scored[key]

    def random_feasible() -> Candidate:
        for _ in range(1000):
            candidate = sample(choices, units, rng)
            if count(candidate) <= budget:
                return candidate
        raise ConfigError(f"{what}: no candidate of the search space fits a budget of {budget} parameters")

    pool = [random_feasible() for _ in range(population)]
    history = []
    for generation in range(generations):
        ranked = sorted(pool, key=cached, reverse=True)
        history.append({"generation": generation, "best_val": cached(ranked[0]), "best_params": count(ranked[0])})
        selected = ranked[:keep]
        children: list[Candidate] = []
        tries = 0
        while len(children) < population - len(selected) and tries < 100 * population:
            tries += 1
            a, b = rng.sample(selected, 2)
            child = [dict(rng.choice((x, y))) for x, y in zip(a, b, strict=True)]  # crossover per unit
            for unit in child:  # mutation
                for k in choices:
                    if rng.random() < mutation_prob:
                        unit[k] = rng.choice(choices[k])
            if count(child) <= budget:
                children.append(child)
        pool = selected + children
    best = max(pool, key=cached)
    return {"best": best, "score": cached(best), "params": count(best), "history": history, "evaluated": len(scored)}
