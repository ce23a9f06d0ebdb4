"""Request traces for the simulator and the SLO benchmark: one JSON object per line.

Fields of a record:
  id              unique name
  arrival         seconds from the trace's start (records with `after` are released instead)
  after           ids whose completion releases this one (a workflow stage's parents)
  delay           seconds between the last parent finishing and the release (tool calls, SQL)
  prompt_tokens   prompt length; the first `prefix_tokens` of it are shared by every record
                  with the same `prefix` (a workflow's schema, a fan-out's common prompt)
  output_tokens   tokens generated (exactly: the simulator and the benchmark ignore EOS)
  slo             {ttft_ms, tpot_ms, deadline_ms}; a workflow's deadline_ms counts from its
                  first stage's arrival, and each stage is sent the part of it that is left
  workflow        {id, stage, remaining_stages}
"""

from __future__ import annotations

import array
import functools
import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TraceRecord:
    id: str
    prompt_tokens: int
    output_tokens: int
    arrival: float = 0.0
    after: list[str] = field(default_factory=list)
    delay: float = 0.0
    prefix: str | None = None
    prefix_tokens: int = 0
    slo: dict[str, float] | None = None
    workflow: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"{self.id}: prompt_tokens and output_tokens must be >= 1")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ValueError(f"{self.id}: prefix_tokens must be in [0, prompt_tokens]")
        if self.arrival < 0 or self.delay < 0:
            raise ValueError(f"{self.id}: arrival and delay must be >= 0")


def load_trace(path: str | Path) -> list[TraceRecord]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(TraceRecord(**json.loads(line)))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path}:{n}: {e}") from e
    check_trace(records)
    return records


def check_trace(records: Iterable[TraceRecord]) -> None:
    """Ids are unique and every `after` names an earlier record (so dependencies are acyclic)."""
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate id {r.id!r}")
        missing = [p for p in r.after if p not in seen]
        if missing:
            raise ValueError(f"{r.id}: after names unknown or later ids {missing}")
        seen.add(r.id)


def save_trace(records: Iterable[TraceRecord], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in records:
            d = {k: v for k, v in asdict(r).items() if v not in (None, [], 0) or k == "arrival"}
            d.update(id=r.id, prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens)
            f.write(json.dumps(d) + "\n")


def prompt_ids(rec: TraceRecord, vocab: int = 32000) -> list[int]:
    """Deterministic synthetic token ids: the shared prefix from the prefix's name, the rest
    from the record's id (so only records meant to share a prefix ever hit each other's KV)."""
    return _prompt_ids(rec.id, rec.prefix, rec.prefix_tokens, rec.prompt_tokens, vocab).tolist()


@functools.lru_cache(maxsize=8192)
def _prompt_ids(
    rec_id: str, prefix: str | None, prefix_tokens: int, prompt_tokens: int, vocab: int
) -> array.array:
    """Drawn once per record (a trace is replayed under several policies, knobs and rates; the
    ids depend on none of them), kept compact."""
    shared = _prefix_ids(prefix, prefix_tokens, vocab)
    own = random.Random(f"req:{rec_id}").choices(range(100, vocab), k=prompt_tokens - prefix_tokens)
    return array.array("i", shared + own)


@functools.lru_cache(maxsize=64)
def _prefix_ids(prefix: str | None, n: int, vocab: int) -> list[int]:
    """A workflow's stages share it: drawn once (callers copy it by concatenation)."""
    return random.Random(f"prefix:{prefix}").choices(range(100, vocab), k=n)
