"""Which resident expert an expert cache evicts: least recently used, or a sequence-level score.

A key is (MoE layer index, expert id). The cache calls `touch` on every access (a hit, or the
load that a miss or a prefetch does) with its clock, which advances once per MoE layer run, so
ages are counted in layer steps; `victim` picks among the evictable residents.

The sequence-level policy follows HOBBIT's reading of a decode step: the MoE layers run in a
fixed cycle, so an expert of the layer that runs next is needed sooner than one of the layer
that just ran, however recent the latter's use. It keeps the expert with the best combined
score of three terms, each in [0, 1]:
- recency: 1 / (1 + age in whole cycles of the layers);
- frequency: the expert's uses over the most used resident's (experts that most tokens pick
  stay, experts a few tokens picked once go first);
- nearness: 1 for the layer that runs next, falling linearly to 1 / L for the layer that just
  ran (L MoE layers), i.e. how many layer steps until the expert's layer runs again.
LRU alone thrashes when the experts used in one cycle of the layers exceed the pool: it evicts
exactly the expert whose layer comes round next. The nearness term is what avoids that.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

Key = tuple[int, int]  # (MoE layer index, expert id)

POLICIES = ("lru", "hobbit")


class EvictionPolicy(Protocol):
    def touch(self, key: Key, clock: int) -> None: ...

    def victim(self, candidates: Collection[Key], clock: int, current_layer: int) -> Key: ...


class LRUPolicy:
    """Evicts the candidate whose last access is the oldest."""

    def __init__(self) -> None:
        self.last_use: dict[Key, int] = {}

    def touch(self, key: Key, clock: int) -> None:
        self.last_use[key] = clock

    def victim(self, candidates: Collection[Key], clock: int, current_layer: int) -> Key:
        # Ties (same layer step) broken by key, so the choice is deterministic.
        return min(candidates, key=lambda k: (self.last_use.get(k, -1), k))


class SequencePolicy:
    """HOBBIT-style: evicts the candidate with the lowest recency + frequency + nearness."""

    def __init__(
        self,
        num_layers: int,
        recency_weight: float = 1.0,
        frequency_weight: float = 1.0,
        nearness_weight: float = 1.0,
    ) -> None:
        self.num_layers = max(1, num_layers)
        self.weights = (recency_weight, frequency_weight, nearness_weight)
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}

    def touch(self, key: Key, clock: int) -> None:
        self.last_use[key] = clock
        self.uses[key] = self.uses.get(key, 0) + 1

    def nearness(self, layer: int, current_layer: int) -> float:
        """1 for the next layer to run; the current layer's experts (already run) come last."""
        steps = (layer - current_layer) % self.num_layers or self.num_layers  # 1..L
        return 1.0 - (steps - 1) / self.num_layers

    def score(self, key: Key, clock: int, current_layer: int, most_uses: int) -> float:
        age = clock - self.last_use.get(key, clock)
        recency = 1.0 / (1.0 + age / self.num_layers)
        frequency = self.uses.get(key, 0) / most_uses if most_uses else 0.0
        w_r, w_f, w_n = self.weights
        return w_r * recency + w_f * frequency + w_n * self.nearness(key[0], current_layer)

    def victim(self, candidates: Collection[Key], clock: int, current_layer: int) -> Key:
        most = max((self.uses.get(k, 0) for k in candidates), default=0)
        return min(candidates, key=lambda k: (self.score(k, clock, current_layer, most), k))


def make_policy(name: str, num_layers: int) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "hobbit":
        return SequencePolicy(num_layers)
    raise ValueError(f"unknown expert cache policy {name!r}; known: {', '.join(POLICIES)}")
