"""The router's approximate radix tree: per-tenant prefix matches, splits, bounded eviction."""

from __future__ import annotations

import random

import pytest

from tokenmill.router.radix import ApproxRadixTree


def brute_match(served: dict[str, list[str]], text: str) -> dict[str, int]:
    """Each tenant's longest common prefix of `text` with anything it served."""
    out: dict[str, int] = {}
    for tenant, texts in served.items():
        best = 0
        for s in texts:
            n = 0
            while n < min(len(s), len(text)) and s[n] == text[n]:
                n += 1
            best = max(best, n)
        if best:
            out[tenant] = best
    return out


def test_match_and_split() -> None:
    tree = ApproxRadixTree()
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    m = tree.match("hello world!")
    assert m.length == 12
    assert m.per_tenant == {"a": 11, "b": 6}
    assert m.best() == ("a", 11)
    assert tree.match("help").per_tenant == {"a": 3, "b": 3}
    assert tree.match("xyz").per_tenant == {}
    assert tree.match("").best() == (None, 0)
    assert tree.tenant_chars("a") == 11 and tree.tenant_chars("b") == 11
    # the shared "hello " node was split from each edge: root -> "hello " -> {"world", "there"}
    assert tree.num_nodes() == 3


def test_insert_prefix_of_existing_and_extension() -> None:
    tree = ApproxRadixTree()
    tree.insert("abcdef", "a")
    tree.insert("abc", "b")  # splits the edge; b holds only the upper part
    tree.insert("abcdefgh", "a")  # extends a's path
    assert tree.match("abcdefgh").per_tenant == {"a": 8, "b": 3}
    assert tree.tenant_chars("a") == 8 and tree.tenant_chars("b") == 3


def test_random_against_brute_force() -> None:
    rng = random.Random(0)
    tree = ApproxRadixTree()
    served: dict[str, list[str]] = {}
    alphabet = "ab"  # a small alphabet makes long shared prefixes and many splits
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        tenant = rng.choice("xyz")
        tree.insert(text, tenant)
        served.setdefault(tenant, []).append(text)
        probe = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert tree.match(probe).per_tenant == brute_match(served, probe)


def test_eviction_keeps_each_tenant_bounded_and_lru() -> None:
    tree = ApproxRadixTree(max_chars_per_tenant=100, evict_to=0.5)
    for i in range(10):
        tree.insert(f"{i:02d}" + "x" * 18, "a")  # 20 chars each, disjoint after 1 char
        assert tree.tenant_chars("a") <= 100
    # the most recent text survives whole, the oldest is gone
    assert tree.match("09" + "x" * 18).per_tenant == {"a": 20}
    assert "a" not in tree.match("00" + "x" * 18).per_tenant or (
        tree.match("00" + "x" * 18).per_tenant["a"] < 20
    )


def test_eviction_of_one_tenant_leaves_the_others() -> None:
    tree = ApproxRadixTree(max_chars_per_tenant=30, evict_to=0.5)
    tree.insert("shared prefix one", "b")
    for i in range(5):
        tree.insert(f"shared prefix {i} and more", "a")
    assert tree.tenant_chars("a") <= 30
    assert tree.match("shared prefix one").per_tenant["b"] == 17
    assert tree.tenant_chars("b") == 17


def test_touch_refreshes_lru_order() -> None:
    tree = ApproxRadixTree(max_chars_per_tenant=25, evict_to=1.0)
    tree.insert("aaaaaaaaaa", "t")
    tree.insert("bbbbbbbbbb", "t")
    tree.insert("aaaaaaaaaa", "t")  # a is now newer than b
    tree.insert("cccccccccc", "t")  # 30 chars > 25: b goes
    m = tree.match
    assert m("aaaaaaaaaa").per_tenant == {"t": 10}
    assert m("cccccccccc").per_tenant == {"t": 10}
    assert m("bbbbbbbbbb").per_tenant == {}
    assert tree.tenant_chars("t") == 20


def test_remove_tenant() -> None:
    tree = ApproxRadixTree()
    tree.insert("common text a", "a")
    tree.insert("common text b", "b")
    tree.remove_tenant("a")
    assert tree.match("common text a").per_tenant == {"b": 12}
    assert tree.tenant_chars("a") == 0 and "a" not in tree.tenants()
    tree.remove_tenant("b")
    assert tree.num_nodes() == 0


def test_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_chars_per_tenant"):
        ApproxRadixTree(max_chars_per_tenant=0)
    with pytest.raises(ValueError, match="evict_to"):
        ApproxRadixTree(evict_to=0.0)
