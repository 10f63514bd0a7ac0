"""Channel atoms: the indivisible units that structural pruning removes, and which tensor indices they make.

Every index of every dimension of every tensor in a traced model is labelled with an *atom*. Two indices
that must be removed together (an output channel of a conv and the matching input channel of the next one,
two operands of a residual add, a BatchNorm's scale and its channel) carry atoms that are *unified*: a
union-find keeps one representative (root) per class. Atom :data:`FROZEN` is the class of indices that must
never be removed (batch, tokens, pixels, the model's inputs and outputs, anything an unknown operation
touches).

Some indices are made of several units at once: after ``view(B, T, H * D) -> (B, T, H, D)`` index
``h * D + d`` of the flat dimension is the pair (head ``h``, position ``d``). Such an atom is an *alias*
of a tuple of component atoms, and the index is removed when any of its components is removed. Keeping
both the head and the position as units is what makes the result rectangular: removing a head removes
``D`` consecutive channels everywhere the flat layout appears, and removing a position removes one channel
of every head.

An ``expand`` of a size-1 dimension makes *copies*: ``n`` indices that all hold the one value of the source.
Removing any of them asks nothing of the source, so they get fresh atoms rather than frozen ones, marked as
copies until they are unified with an atom of another kind. A compound index drops its copy components, as it
drops its frozen ones: in ``repeat_kv``'s ``(kv_heads, n_rep) -> heads`` under grouped-query attention, the
query head follows its key/value head alone, while under multi-query attention (one key/value head, so no
compound) the copies meet the query heads and leave them free to be removed.

This module is a data structure only; the rules that say which atoms to unify live in
:mod:`prunekit.structured.graph.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: The atom of indices that can never be removed.
FROZEN = 0


class AtomTable:
    """A union-find over atoms, with aliases (an atom that stands for a tuple of atoms) and frozen classes.

    Atoms are non-negative integers; dimensions are numpy ``int64`` arrays of atoms, one per index.
    """

    def __init__(self) -> None:
        self._parent: list[int] = [FROZEN]
        self._alias: dict[int, tuple[int, ...]] = {}
        self._leaves_cache: dict[int, tuple[int, ...]] | None = None
        self._copies: set[int] = set()  # roots of classes made only of broadcast copies
        #: Human-readable notes on layouts that could not be reconciled (their atoms were frozen instead).
        self.conflicts: list[str] = []

    # -- creation -------------------------------------------------------------------------------------------
    def new(self, n: int) -> np.ndarray:
        """``n`` fresh, independent atoms."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._leaves_cache = None
        return np.arange(start, start + n, dtype=np.int64)

    def copies(self, n: int) -> np.ndarray:
        """``n`` fresh atoms for the copies that broadcasting a size-1 dimension makes (see the module doc)."""
        atoms = self.new(n)
        self._copies.update(atoms.tolist())
        return atoms

    def is_copy(self, atom: int) -> bool:
        """Whether ``atom``'s class is made only of broadcast copies."""
        return self.find(int(atom)) in self._copies

    @staticmethod
    def frozen(n: int) -> np.ndarray:
        """A dimension of ``n`` indices that can never be removed."""
        return np.zeros(n, dtype=np.int64)

    def compound(self, components: Sequence[int]) -> int:
        """One fresh atom standing for the tuple ``components``: removed when any component is removed.
        Frozen components and broadcast copies are dropped; one remaining component is returned as is."""
        live = tuple(int(c) for c in components if self.find(int(c)) != FROZEN and not self.is_copy(int(c)))
        if not live:
            return FROZEN
        if len(live) == 1:
            return live[0]
        atom = int(self.new(1)[0])
        self._alias[atom] = live
        return atom

    # -- union-find -----------------------------------------------------------------------------------------
    def find(self, atom: int) -> int:
        parent = self._parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]
            atom = parent[atom]
        return atom

    def is_frozen(self, atom: int) -> bool:
        return self.find(int(atom)) == FROZEN

    def union(self, a: int, b: int) -> None:
        """Declare that the indices labelled ``a`` and ``b`` must be removed together."""
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        self._leaves_cache = None
        if rb == FROZEN:
            ra, rb = rb, ra
        if ra == FROZEN:
            self.freeze(rb)
            return
        alias_a, alias_b = self._alias.pop(ra, None), self._alias.pop(rb, None)
        self._parent[rb] = ra
        if rb not in self._copies:
            self._copies.discard(ra)
        self._copies.discard(rb)
        if alias_a is None and alias_b is None:
            return
        for alias in (alias_a, alias_b):
            if alias is not None and self._reaches(alias, ra):
                self._conflict("an index would contain itself", [ra, *alias])
                return
        if alias_a is None or alias_b is None:
            self._alias[ra] = alias_a if alias_a is not None else alias_b  # type: ignore[assignment]
            return
        self._alias[ra] = alias_a
        self._unify_components(alias_a, alias_b, [ra])

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unify two dimensions index by index (they must have the same length)."""
        if a.shape != b.shape:
            raise ValueError(f"cannot unify dimensions of sizes {a.shape} and {b.shape}")
        if a is b:
            return
        for x, y in zip(a.tolist(), b.tolist(), strict=False):
            if x != y:
                self.union(x, y)

    def freeze(self, atom: int) -> None:
        """Make ``atom``'s class unremovable, and every component it is made of."""
        root = self.find(int(atom))
        if root == FROZEN:
            return
        self._leaves_cache = None
        self._copies.discard(root)
        alias = self._alias.pop(root, None)
        self._parent[root] = FROZEN
        if alias is not None:
            for component in alias:
                self.freeze(component)

    def freeze_array(self, atoms: Iterable[int] | np.ndarray) -> None:
        for atom in np.unique(np.asarray(atoms, dtype=np.int64)).tolist():
            self.freeze(atom)

    def _reaches(self, components: Iterable[int], root: int) -> bool:
        """Whether ``root`` is among ``components`` or the components of their aliases (a cycle)."""
        stack, seen = [self.find(int(c)) for c in components], set()
        while stack:
            r = stack.pop()
            if r == root:
                return True
            if r in seen:
                continue
            seen.add(r)
            stack.extend(self.find(c) for c in self._alias.get(r, ()))
        return False

    def _unify_components(self, a: tuple[int, ...], b: tuple[int, ...], on_conflict: list[int]) -> None:
        """One index described as two tuples: unify them unit by unit, or freeze ``on_conflict`` when they
        are not made of the same number of units (a layout split two incompatible ways)."""
        leaves_a, leaves_b = self._expand(a), self._expand(b)
        if len(leaves_a) == len(leaves_b):
            for x, y in zip(leaves_a, leaves_b, strict=True):
                self.union(x, y)
        else:
            self._conflict(f"an index split two ways ({len(leaves_a)} vs {len(leaves_b)} units)", on_conflict)

    def _conflict(self, message: str, atoms: Iterable[int]) -> None:
        self.conflicts.append(message)
        for atom in list(atoms):
            self.freeze(atom)

    # -- reading the result ---------------------------------------------------------------------------------
    def _expand(self, components: tuple[int, ...]) -> tuple[int, ...]:
        out: list[int] = []
        for component in components:
            out.extend(self.leaves(component))
        return tuple(out)

    def leaves(self, atom: int) -> tuple[int, ...]:
        """The independent units (roots without alias, frozen ones dropped) that index ``atom`` is made of."""
        root = self.find(int(atom))
        if root == FROZEN:
            return ()
        if self._leaves_cache is None:
            self._leaves_cache = {}
        cached = self._leaves_cache.get(root)
        if cached is None:
            alias = self._alias.get(root)
            cached = (root,) if alias is None else self._expand(alias)
            self._leaves_cache[root] = cached
        return cached

    def split_leaves(self, atom: int) -> tuple[int, ...] | None:
        """The top-level components of ``atom``'s alias (roots), or ``None`` when it has none."""
        alias = self._alias.get(self.find(int(atom)))
        return None if alias is None else tuple(self.find(c) for c in alias)

    def set_alias(self, atom: int, components: Sequence[int]) -> None:
        """Declare that index ``atom`` is the tuple ``components`` (unifying with an existing alias)."""
        root = self.find(int(atom))
        if root == FROZEN:
            for component in components:
                self.freeze(component)
            return
        self._leaves_cache = None
        target = tuple(int(c) for c in components)
        if self._reaches(target, root):
            self._conflict("an index would contain itself", [root, *target])
            return
        existing = self._alias.get(root)
        if existing is None:
            self._alias[root] = target
            return
        self._unify_components(existing, target, [root, *target])

    def removed(self, atoms: np.ndarray, pruned: set[int]) -> np.ndarray:
        """Boolean mask over a dimension: which indices go when the units in ``pruned`` are removed."""
        return np.fromiter(
            (any(leaf in pruned for leaf in self.leaves(a)) for a in atoms.tolist()), dtype=bool, count=atoms.size
        )
