"""Suffix tree counts against brute force; removal equals rebuilding; proposers' drafts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.ngram import NgramProposer, ngram_lookup
from tokenmill.spec_decode.suffix import SuffixProposer
from tokenmill.spec_decode.suffix_tree import SuffixTree

seqs_st = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=30), min_size=1, max_size=5)


def brute_counts(seqs: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {(): sum(len(s) for s in seqs)}
    for s in seqs:
        for i in range(len(s)):
            for n in range(1, min(depth, len(s) - i) + 1):
                key = tuple(s[i : i + n])
                counts[key] = counts.get(key, 0) + 1
    return counts


def build(seqs: list[list[int]], depth: int, order: list[int] | None = None) -> SuffixTree:
    tree = SuffixTree(depth)
    for i in range(len(seqs)) if order is None else order:
        tree.extend(i, seqs[i])
    return tree


@settings(max_examples=150, deadline=None)
@given(seqs=seqs_st, depth=st.integers(1, 8))
def test_counts_equal_brute_force_substring_counts(seqs, depth) -> None:
    tree = SuffixTree(depth)
    # interleaved appends, as live requests grow side by side
    longest = max(len(s) for s in seqs)
    for j in range(longest):
        for i, s in enumerate(seqs):
            if j < len(s):
                tree.append(i, s[j])
    assert tree.as_dict() == brute_counts(seqs, depth)
    for s in seqs:
        for i in range(len(s)):
            assert (
                tree.count(s[i : i + depth]) == brute_counts(seqs, depth)[tuple(s[i : i + depth])]
            )


@settings(max_examples=150, deadline=None)
@given(seqs=seqs_st, depth=st.integers(1, 8), data=st.data())
def test_remove_equals_rebuild_without(seqs, depth, data) -> None:
    tree = build(seqs, depth)
    gone = data.draw(st.sets(st.integers(0, len(seqs) - 1)))
    for i in sorted(gone):
        tree.remove(i)
    kept = [i for i in range(len(seqs)) if i not in gone]
    assert tree.as_dict() == build(seqs, depth, kept).as_dict()
    assert tree.as_dict() == brute_counts([seqs[i] for i in kept], depth)


@settings(max_examples=100, deadline=None)
@given(seq=st.lists(st.integers(0, 3), min_size=1, max_size=40), depth=st.integers(1, 8))
def test_active_nodes_are_the_matches_of_the_tail(seq, depth) -> None:
    tree = build([seq], depth)
    active = tree.active_nodes(0)
    assert len(active) == min(depth, len(seq))
    assert tree.match(seq, depth) == active


def test_draft_path_follows_most_frequent_child_above_min_prob() -> None:
    tree = SuffixTree(8)
    tree.extend(0, [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4])
    # "1 2": 3 occurrences, all followed by 3; "1 2 3" then 4 (2 of 3); "1 2 3 4" then 1 (1 of 2)
    node = tree.match([9, 1, 2], 8)[-1]
    tokens, score = tree.draft_path(node, 4, 0.1, tree.node_count(node))
    assert tokens == [3, 4, 1, 2] and score == pytest.approx(1 + 2 / 3 + 1 / 3 + 1 / 3)
    # 2/3 < 0.7 stops after "3"
    assert tree.draft_path(node, 4, 0.7, tree.node_count(node))[0] == [3]
    assert tree.draft_path(node, 1, 0.1, tree.node_count(node))[0] == [3]


def _req(prompt: list[int], output: list[int] = (), rid: str = "r", salt: str | None = None):
    req = Request(rid, list(prompt), SamplingParams(), max_tokens=100, cache_salt=salt)
    req.output_token_ids = list(output)
    return req


def test_suffix_proposer_own_tree_and_adaptive_length() -> None:
    prop = SuffixProposer(max_depth=16, max_spec_factor=1.0, max_spec_offset=0.0)
    text = list(range(10, 30))
    req = _req(text + text[:3])
    # the last 3 tokens matched: drafts up to 3 tokens (factor 1.0 * match length)
    assert prop.propose([req], [8]) == [text[3:6]]
    req.output_token_ids = text[3:8]  # the match grows with the output: so does the draft
    assert prop.propose([req], [8]) == [text[8:16]]
    assert prop.propose([req], [2]) == [text[8:10]]
    assert prop.propose([_req([1, 2, 3], rid="fresh")], [8]) == [[]]
    # the default offset -1: a 3-token match drafts 2 tokens, a 1-token match none
    prop = SuffixProposer(max_depth=16)
    assert prop.propose([_req(text + text[:3], rid="d3")], [8]) == [text[3:5]]
    assert prop.propose([_req(text + text[:1], rid="d1")], [8]) == [[]]


def test_suffix_proposer_global_tree_per_salt_and_eviction() -> None:
    prop = SuffixProposer(max_depth=16, max_cached_requests=2, max_spec_offset=0.0)
    answer = [7, 8, 9, 10, 11, 12]
    first = _req([1, 2], answer, rid="a", salt="tenant")
    prop.propose([first], [4])
    prop.finish(["a"])
    # another request with the same salt that starts producing the answer gets it drafted
    assert prop.propose([_req([5], [7, 8, 9], rid="b", salt="tenant")], [8]) == [[10, 11, 12]]
    # other tenants never see it
    assert prop.propose([_req([5], [7, 8, 9], rid="c")], [8]) == [[]]
    for rid in ("x", "y"):  # two newer outputs evict the oldest
        prop.propose([_req([3], [40, 41, 42], rid=rid, salt="tenant")], [4])
        prop.finish([rid])
    assert prop.propose([_req([5], [7, 8, 9], rid="d", salt="tenant")], [8]) == [[]]


def test_ngram_lookup_prefers_longest_then_latest_match() -> None:
    tokens = np.array([1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3])
    assert ngram_lookup(tokens, 2, 3, 3) == [4, 9, 2]  # "1 2 3" beats the later "2 3"
    assert ngram_lookup(tokens, 1, 2, 2) == [5, 6]  # "2 3": the latest occurrence
    assert ngram_lookup(np.array([1, 2, 3]), 1, 3, 2) == []
    prop = NgramProposer(1, 3)
    req = _req([5, 6, 7, 5, 6], rid="n")
    assert prop.propose([req], [5]) == [[7, 5, 6]]
    req.output_token_ids = [7]  # buffers grow with the output
    assert prop.propose([req], [2]) == [[5, 6]]
    prop.finish(["n"])


def test_removed_nodes_are_reused_and_the_tree_is_invisible_to_the_gc() -> None:
    import gc

    rng = np.random.default_rng(0)
    tree = SuffixTree(max_depth=8)
    tree.extend(0, rng.integers(0, 50, 300).tolist())
    size = len(tree._count)
    for i in range(1, 6):  # add and drop sequences: the node arrays stop growing
        tree.extend(i, rng.integers(0, 50, 300).tolist())
        tree.remove(i)
    assert len(tree._count) <= 2 * size
    # the child dicts hold only ints, so the collector does not track them
    assert not any(gc.is_tracked(kids) for kids in tree._children if kids is not None)
