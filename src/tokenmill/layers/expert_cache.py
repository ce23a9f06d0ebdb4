"""Expert offloading: at most a budget of bytes of expert weights in fast memory, as a fixed pool
of slots; every expert's weights stay in slow storage and a miss copies them into a slot.

"Fast" is the compute device, "slow" the checkpoint: experts loaded with `map_experts` (as the
runner loads them) are mapped sources (layers/expert_source.py), views of the file's memory map
that are read only when a slot loads them, so on a CPU host only the pool and the pages in use
take RAM, and a model larger than RAM runs. A slot is an expert module (same quant method, same
tensor shapes) whose tensors live on the compute device; a load writes the expert's checkpoint
bytes into them in the kernels' layout (GGUF blocks into the quantized kernel's tiles) and packs
again what the kernels derive from them (`needs_repack`), as the loader would have: a slot
holding expert e computes exactly what a resident expert e computes, so offloading never
changes a token. Experts given already processed (tests, tools) are the slow store as they
are, or pinned host copies of them on an accelerator, and a load copies their tensors byte for
byte.

Invariants: a key (MoE layer, expert) is in at most one slot; the pool's bytes are
`num_slots * expert_bytes` <= the budget, fixed at construction (nothing is allocated later);
only the cache writes a slot's tensors. Copies are issued on the current stream, so on a GPU a
later kernel reading the slot is ordered after the copy, and a copy into a slot is ordered
after the kernels that read its previous expert.

Mixed-precision misses (`miss_bits`, HOBBIT's token-level loading; lossy, off by default): a
low-bit copy of every expert (layers/expert_lowbit.py) stays on the compute device, outside the
budget (`low_precision_bytes`, on top of `pool_bytes`), and a miss on an expert whose largest
routing weight in the pass is under `miss_threshold` runs that copy instead of loading the
expert. Without `miss_bits` every lookup is served at full precision, as above.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.layers.expert_lowbit import copy_bytes, low_bit_copy
from tokenmill.layers.expert_policy import Key, make_policy
from tokenmill.layers.expert_source import (
    fill_slot,
    is_converted,
    is_mapped,
    materialise,
    source_signature,
)
from tokenmill.layers.expert_tensors import (
    TensorRef,
    expert_tensor_refs,
    fresh_tensors,
    get_ref,
    needs_repack,
)


@dataclass
class ExpertCacheStats:
    """Counts since start. A lookup is one active expert of one layer in one forward pass: a
    hit (resident), a low-precision hit (not resident, served from its low-bit copy) or a miss
    (loaded); bytes are expert weights copied into slots (demand loads and prefetches)."""

    hits: int = 0
    misses: int = 0
    low_precision_hits: int = 0
    bytes_loaded: int = 0
    tokens: int = 0  # token rows through the first MoE layer (prompt and generated)
    prefetches: int = 0  # experts loaded ahead of their layer
    prefetch_predicted: int = 0  # experts predicted for a layer (the router of the layer before)
    prefetch_correct: int = 0  # of those, active when the layer ran
    prefetch_actual: int = 0  # active experts of the layers that had a prediction

    @property
    def hit_rate(self) -> float:
        """The fraction of lookups served resident at full precision."""
        total = self.hits + self.misses + self.low_precision_hits
        return self.hits / total if total else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_loaded / self.tokens if self.tokens else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        """Precision: the fraction of predicted experts that their layer used."""
        return self.prefetch_correct / self.prefetch_predicted if self.prefetch_predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.prefetch_correct / self.prefetch_actual if self.prefetch_actual else 0.0


class ExpertCache:
    """The slot pool shared by the MoE layers `layers` (index = MoE layer index), each a list of
    experts with the same tensor shapes, under `budget_bytes`; `miss_bits` (4 or 2) keeps a
    low-bit copy of every expert for the misses under `miss_threshold` (see the module doc)."""

    def __init__(
        self,
        layers: list[nn.ModuleList],
        budget_bytes: int,
        policy: str = "lru",
        device: torch.device | str = "cpu",
        miss_bits: int | None = None,
        miss_threshold: float = 0.2,
    ) -> None:
        self.device = torch.device(device)
        self.miss_threshold = miss_threshold
        self.layers = layers
        self.budget_bytes = budget_bytes
        for experts in layers:  # in RAM already: processed once, as resident experts are
            for e, expert in enumerate(experts):
                if is_mapped(expert) and is_converted(expert):
                    experts[e] = materialise(expert, self.device)
        self.mapped = is_mapped(layers[0][0])
        if self.mapped:  # slots are built from the source, as the loader builds an expert
            signature = source_signature(layers[0][0])
            if any(source_signature(e) != signature for experts in layers for e in experts):
                raise ValueError("expert offloading needs experts of one shape in all layers")
            template = materialise(layers[0][0], self.device)
        else:
            template = layers[0][0]
            shapes = [(get_ref(r).shape, get_ref(r).dtype) for r in expert_tensor_refs(template)]
            for experts in layers:
                for expert in experts:
                    got = [(get_ref(r).shape, get_ref(r).dtype) for r in expert_tensor_refs(expert)]
                    if got != shapes:
                        raise ValueError(
                            "expert offloading needs experts of one shape in all layers"
                        )
        self.expert_bytes = sum(
            get_ref(r).numel() * get_ref(r).element_size() for r in expert_tensor_refs(template)
        )
        total = sum(len(experts) for experts in layers)
        num_slots = min(total, budget_bytes // self.expert_bytes)
        if num_slots < 1:
            raise ValueError(
                f"an expert memory budget of {budget_bytes} bytes holds no expert "
                f"({self.expert_bytes} bytes each)"
            )
        # Built from the experts where they are now (before they move to pinned host memory);
        # from mapped sources, this reads every expert once at start.
        self.low_precision: list[list[nn.Module]] | None = None
        if miss_bits is not None:
            self.low_precision = [
                [
                    low_bit_copy(
                        materialise(expert, self.device) if self.mapped else expert,
                        miss_bits,
                        self.device,
                    )
                    for expert in experts
                ]
                for experts in layers
            ]
        if self.device.type != "cpu" and not self.mapped:  # slow storage: pinned host copies
            for experts in layers:
                for expert in experts:
                    fresh_tensors(expert, torch.device("cpu"), pin=True)
        self.slots: list[nn.Module] = []
        for _ in range(num_slots):
            # Share the template's tensors while cloning (no copy), then give the clone its own.
            shared = [get_ref(r) for r in expert_tensor_refs(template)]
            shared += [  # opaque: no copy
                lin.packed_weight for lin in needs_repack(template) if lin.packed_weight is not None
            ]
            memo: dict[int, object] = {id(t): t for t in shared}
            slot = copy.deepcopy(template, memo)
            fresh_tensors(slot, self.device, pin=False)
            self.slots.append(slot)
        self._slot_refs = [expert_tensor_refs(s) for s in self.slots]
        self._repack = [needs_repack(s) for s in self.slots]
        self._src_refs: dict[Key, list[TensorRef]] = {}
        self.slot_of: dict[Key, int] = {}
        self.key_in: list[Key | None] = [None] * num_slots
        self.policy = make_policy(policy, len(layers))
        self.clock = 0
        self.current_layer = -1
        self.protected: set[Key] = set()  # active experts of the running layer not yet computed
        self.predicted: dict[int, set[int]] = {}  # layer -> experts predicted for its next run
        self.stats = ExpertCacheStats()

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def pool_bytes(self) -> int:
        return self.num_slots * self.expert_bytes

    @property
    def low_precision_bytes(self) -> int:
        """Bytes of the resident low-bit copies (0 without mixed-precision misses), held on
        the compute device beside the pool and not counted in its budget."""
        if self.low_precision is None:
            return 0
        return sum(copy_bytes(c) for copies in self.low_precision for c in copies)

    def begin_layer(self, layer: int, active: Iterable[int], num_tokens: int) -> None:
        """Layer `layer` is about to run `active` experts on `num_tokens` rows."""
        active = list(active)
        self.clock += 1
        self.current_layer = layer
        self.protected = {(layer, e) for e in active}
        if layer == 0:
            self.stats.tokens += num_tokens
        predicted = self.predicted.pop(layer, None)
        if predicted is not None:
            self.stats.prefetch_predicted += len(predicted)
            self.stats.prefetch_correct += len(predicted & set(active))
            self.stats.prefetch_actual += len(active)

    def get(self, layer: int, expert: int, weight: float = 1.0) -> nn.Module:
        """The module computing expert `expert` of `layer`: its slot, loaded on a miss, or on a
        miss with mixed-precision misses and `weight` (the largest routing weight of its rows)
        under the threshold, its low-bit copy."""
        key = (layer, expert)
        slot = self.slot_of.get(key)
        if slot is None and self.low_precision is not None and weight < self.miss_threshold:
            self.stats.low_precision_hits += 1
            self.protected.discard(key)  # not loaded: nothing to spare for it
            return self.low_precision[layer][expert]
        if slot is None:
            self.stats.misses += 1
            slot = self._load(key, keep=set())
        else:
            self.stats.hits += 1
        self.policy.touch(key, self.clock)
        self.protected.discard(key)
        return self.slots[slot]

    def prefetch(self, layer: int, experts: Iterable[int]) -> None:
        """Loads the experts predicted for `layer`'s next run, never evicting an expert the
        running layer still needs or one this call loaded."""
        experts = sorted(set(experts))
        self.predicted[layer] = set(experts)
        loaded: set[Key] = set()
        for e in experts:
            key = (layer, e)
            if key in self.slot_of:
                continue
            if self._load(key, keep=self.protected | loaded, required=False) is None:
                break  # every slot is needed now: the rest load on demand
            self.stats.prefetches += 1
            self.policy.touch(key, self.clock)
            loaded.add(key)

    def _load(self, key: Key, keep: set[Key], required: bool = True) -> int | None:
        slot = self._free_slot(keep, required)
        if slot is None:
            return None
        expert = self.layers[key[0]][key[1]]
        with torch.no_grad():
            if self.mapped:
                if not fill_slot(expert, self.slots[slot]):
                    scratch = materialise(expert, self.device)
                    for s, d in zip(
                        expert_tensor_refs(scratch), self._slot_refs[slot], strict=True
                    ):
                        get_ref(d).copy_(get_ref(s))
            else:
                src = self._src_refs.get(key)
                if src is None:  # listed once per expert: walking the modules on every miss
                    src = self._src_refs[key] = expert_tensor_refs(expert)
                for s, d in zip(src, self._slot_refs[slot], strict=True):
                    get_ref(d).copy_(get_ref(s), non_blocking=True)
            for lin in self._repack[slot]:
                lin.quant_method.process_after_loading(lin)
        self.stats.bytes_loaded += self.expert_bytes
        self.slot_of[key] = slot
        self.key_in[slot] = key
        return slot

    def _free_slot(self, keep: set[Key], required: bool) -> int | None:
        for slot, key in enumerate(self.key_in):
            if key is None:
                return slot
        # Evict, sparing the running layer's pending experts (they would be loaded again within
        # this layer); a demand load with every slot pending evicts among them all the same.
        candidates = [k for k in self.slot_of if k not in keep and k not in self.protected]
        if not candidates:
            if not required:
                return None
            candidates = list(self.slot_of)
        victim = self.policy.victim(candidates, self.clock, self.current_layer)
        slot = self.slot_of.pop(victim)
        self.key_in[slot] = None
        return slot

    def _all_slot_refs(self) -> list[TensorRef]:
        return [r for refs in self._slot_refs for r in refs]

    def check(self) -> None:
        """Asserts the invariants (tests): the pool within budget, slots and keys one to one."""
        held = sum(get_ref(r).numel() * get_ref(r).element_size() for r in self._all_slot_refs())
        assert held == self.pool_bytes <= self.budget_bytes, (held, self.budget_bytes)
        sources = {
            get_ref(r).data_ptr() for x in self.layers for e in x for r in expert_tensor_refs(e)
        }
        assert not sources & {get_ref(r).data_ptr() for r in self._all_slot_refs()}  # own memory
        assert all(self.key_in[s] == k for k, s in self.slot_of.items())
        assert sum(k is not None for k in self.key_in) == len(self.slot_of) <= self.num_slots
