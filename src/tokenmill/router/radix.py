"""An approximate radix tree of what each worker has served, as SGLang's router keeps.

The tree holds request texts (a prompt, rendered messages, or token ids spelled as characters),
not KV blocks: the router cannot see a worker's cache, so it assumes that a worker holds the
prefixes of what it served recently. Every node records the workers ("tenants") that served a
text through it and when; a tenant is on a node only if it is on every node above it (an insert
marks the whole path), so a tenant's cached prefix of a text is the depth of the deepest node on
the text's path that still names it.

Each tenant's share is bounded (`max_chars_per_tenant`): past the bound its least recently used
leaves (nodes naming it with no child naming it) lose it until it is back under
`evict_to` of the bound; a node no tenant names any more is removed. Pure Python, no locks: the
router calls it from its event loop only.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    text: str  # the edge label from the parent; "" at the root only
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)  # first char -> child
    tenants: dict[str, int] = field(default_factory=dict)  # tenant -> last access tick


@dataclass(frozen=True)
class PrefixMatch:
    """The longest prefix of a text each tenant is believed to hold (characters)."""

    length: int  # the text's length
    per_tenant: dict[str, int]

    def best(self) -> tuple[str | None, int]:
        """The tenant with the longest match and that length (None, 0 when nobody matches)."""
        if not self.per_tenant:
            return None, 0
        tenant = max(self.per_tenant, key=lambda t: self.per_tenant[t])
        return tenant, self.per_tenant[tenant]


class ApproxRadixTree:
    def __init__(self, max_chars_per_tenant: int = 1 << 22, evict_to: float = 0.9) -> None:
        if max_chars_per_tenant < 1:
            raise ValueError(f"max_chars_per_tenant must be >= 1, got {max_chars_per_tenant}")
        if not 0.0 < evict_to <= 1.0:
            raise ValueError(f"evict_to must be in (0, 1], got {evict_to}")
        self.max_chars_per_tenant = max_chars_per_tenant
        self.evict_to = evict_to
        self._root = _Node("", None)
        self._tick = 0
        self._chars: dict[str, int] = {}  # tenant -> characters on the nodes naming it

    def tenant_chars(self, tenant: str) -> int:
        return self._chars.get(tenant, 0)

    def tenants(self) -> list[str]:
        return list(self._chars)

    def match(self, text: str) -> PrefixMatch:
        """Each tenant's longest prefix of `text` in the tree; touches nothing."""
        per_tenant: dict[str, int] = {}
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            n = _common_prefix(child.text, text, pos)
            for t in child.tenants:
                per_tenant[t] = pos + n
            if n < len(child.text):
                break
            node, pos = child, pos + n
        return PrefixMatch(len(text), per_tenant)

    def insert(self, text: str, tenant: str) -> None:
        """Records that `tenant` served `text` (every prefix of it), now; may evict."""
        self._tick += 1
        node, pos = self._root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                child = _Node(text[pos:], node)
                node.children[text[pos]] = child
            n = _common_prefix(child.text, text, pos)
            if n < len(child.text):
                child = self._split(child, n)
            if tenant not in child.tenants:
                self._chars[tenant] = self._chars.get(tenant, 0) + len(child.text)
            child.tenants[tenant] = self._tick
            node, pos = child, pos + n
        if self._chars.get(tenant, 0) > self.max_chars_per_tenant:
            self._evict(tenant, int(self.max_chars_per_tenant * self.evict_to))

    def remove_tenant(self, tenant: str) -> None:
        """Forgets everything `tenant` served (its cache is gone: it restarted or left)."""
        self._evict(tenant, 0)
        self._chars.pop(tenant, None)

    def num_nodes(self) -> int:
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count - 1

    def _split(self, child: _Node, n: int) -> _Node:
        """Cuts `child`'s edge after n characters; returns the new upper node."""
        assert child.parent is not None and 0 < n < len(child.text)
        upper = _Node(child.text[:n], child.parent, tenants=dict(child.tenants))
        child.parent.children[child.text[0]] = upper
        child.text = child.text[n:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def _evict(self, tenant: str, target_chars: int) -> None:
        # Tenant leaves in LRU order; removing a leaf may make its parent a tenant leaf, which
        # is older than or as old as the child (an insert touches the whole path).
        leaves = sorted(
            (n for n in self._tenant_nodes(tenant) if _is_tenant_leaf(n, tenant)),
            key=lambda n: n.tenants[tenant],
        )
        while leaves and self._chars.get(tenant, 0) > target_chars:
            node = leaves.pop(0)
            parent = node.parent
            del node.tenants[tenant]
            self._chars[tenant] -= len(node.text)
            if not node.tenants and not node.children:
                assert parent is not None
                del parent.children[node.text[0]]
            if parent is not None and parent is not self._root and _is_tenant_leaf(parent, tenant):
                _insort_by_tick(leaves, parent, tenant)

    def _tenant_nodes(self, tenant: str) -> list[_Node]:
        found: list[_Node] = []
        stack = [c for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(c for c in node.children.values() if tenant in c.tenants)
        return found


def _common_prefix(label: str, text: str, pos: int) -> int:
    if text.startswith(label, pos):
        return len(label)
    n, limit = 0, min(len(label), len(text) - pos)
    while n < limit and label[n] == text[pos + n]:
        n += 1
    return n


def _is_tenant_leaf(node: _Node, tenant: str) -> bool:
    return tenant in node.tenants and not any(tenant in c.tenants for c in node.children.values())


def _insort_by_tick(leaves: list[_Node], node: _Node, tenant: str) -> None:
    tick = node.tenants[tenant]
    i = 0
    while i < len(leaves) and leaves[i].tenants[tenant] <= tick:
        i += 1
    leaves.insert(i, node)
