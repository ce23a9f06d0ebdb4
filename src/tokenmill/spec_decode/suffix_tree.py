"""A depth-capped suffix trie over token sequences, with occurrence counts. Pure Python.

Every suffix of every sequence, cut at `max_depth` tokens, is a path from the root; a node's
`count` is the number of (sequence, start) pairs whose suffix passes through it, i.e. the number
of occurrences of the node's string (length <= max_depth). A node exists exactly while its count
is positive, so the trie is a function of the multiset of sequences: removing a sequence gives
the same trie as building without it.

Appending a token to a sequence extends each of its `max_depth` most recent suffixes by one node
(the "active" nodes), so the cost per token is O(max_depth) dict operations, whatever the length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, Node] | None = None  # created on the first child (memory)

    def child(self, token: int) -> Node | None:
        return self.children.get(token) if self.children else None


class SuffixTree:
    def __init__(self, max_depth: int = 24) -> None:
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.root = Node()
        self._seqs: dict[int, list[int]] = {}
        # seq_id -> nodes of its last 1, 2, ... min(len, max_depth) tokens (shortest first)
        self._active: dict[int, list[Node]] = {}

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def append(self, seq_id: int, token: int) -> None:
        seq = self._seqs.setdefault(seq_id, [])
        seq.append(token)
        self.root.count += 1  # the root counts suffix starts
        active = self._active.get(seq_id, [])
        new_active: list[Node] = []
        parents = [self.root, *active[: self.max_depth - 1]]  # nodes that may grow one deeper
        for parent in parents:
            if parent.children is None:
                parent.children = {}
            node = parent.children.get(token)
            if node is None:
                node = parent.children[token] = Node()
            node.count += 1
            new_active.append(node)
        self._active[seq_id] = new_active

    def extend(self, seq_id: int, tokens: Iterable[int]) -> None:
        self._seqs.setdefault(seq_id, [])
        self._active.setdefault(seq_id, [])
        for token in tokens:
            self.append(seq_id, token)

    def remove(self, seq_id: int) -> None:
        """Forget a sequence: every node count drops by its occurrences; empty nodes go."""
        seq = self._seqs.pop(seq_id)
        del self._active[seq_id]
        depth = self.max_depth
        for start in range(len(seq)):
            self.root.count -= 1
            parent = self.root
            for token in seq[start : start + depth]:
                assert parent.children is not None
                node = parent.children[token]
                node.count -= 1
                if node.count == 0:
                    del parent.children[token]  # its whole subtree only held this suffix
                    break
                parent = node

    def active_nodes(self, seq_id: int) -> list[Node]:
        """Nodes of the sequence's last 1, 2, ... tokens (shortest first)."""
        return self._active.get(seq_id, [])

    def match(self, context: Sequence[int], max_len: int) -> list[Node]:
        """Nodes of the last 1, 2, ... p tokens of `context` for every p <= max_len that occurs.

        Stops at the first p that does not occur: no longer one can.
        """
        out: list[Node] = []
        n = len(context)
        for p in range(1, min(max_len, self.max_depth, n) + 1):
            node: Node | None = self.root
            for token in context[n - p :]:
                node = node.child(token)
                if node is None:
                    return out
            out.append(node)
        return out

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of `tokens` (len <= max_depth) over all sequences."""
        node: Node | None = self.root
        for token in tokens:
            node = node.child(token)
            if node is None:
                return 0
        return node.count

    def as_dict(self) -> dict[tuple[int, ...], int]:
        """{string: count} for every node; for tests."""
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[tuple[int, ...], Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            out[path] = node.count
            for token, child in (node.children or {}).items():
                stack.append(((*path, token), child))
        return out


def draft_path(
    node: Node, max_tokens: int, min_prob: float, denominator: int
) -> tuple[list[int], float]:
    """Path mode: from `node`, follow the most frequent child while the path's probability (the
    product of count(child) / count(parent)) stays >= min_prob. `denominator` is the first
    step's parent count (a live sequence's own last occurrence has no continuation yet, so its
    caller passes count - 1). Returns (tokens, score), score = sum of the path probabilities,
    the expected number of accepted tokens."""
    tokens: list[int] = []
    prob, score = 1.0, 0.0
    total = denominator
    while len(tokens) < max_tokens and node.children and total > 0:
        token, best = max(node.children.items(), key=lambda kv: kv[1].count)
        prob *= best.count / total
        if prob < min_prob:
            break
        tokens.append(token)
        score += prob
        node, total = best, best.count
    return tokens, score
