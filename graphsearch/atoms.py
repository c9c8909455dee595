"""Channel atoms: the unit the analysis ties together.

Every channel that some op creates (a conv's output channel, a model input channel, a padded
channel) is an *atom*. Ops that force channels to be pruned together (an add, a depthwise
conv, a head of attention) *union* atoms; the union-find classes that remain are the channels
a plan can keep or drop. Unions are vectorised over whole channel vectors, so the analysis of a
ResNet-50 costs a few hundred numpy calls, not one Python call per channel.
"""

from __future__ import annotations

import numpy as np

NO_ATOM = -1  # a position that carries no channel identity (a scalar, a constant)


def sorted_unique(x) -> np.ndarray:
    """`np.unique(x)` by counting, or by sorting (numpy's hash-based unique is several times
    slower on the few-thousand-entry integer arrays of a graph)."""
    return sorted_counts(x)[0]


def sorted_counts(x) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(x, return_counts=True)`. Non-negative integers below a few times their
    number (atoms, group ids, the pair codes built from them) are counted, in linear time;
    anything else is sorted."""
    s = np.asarray(x).reshape(-1)
    if s.size and s.dtype.kind == "i" and s.min() >= 0 and s.max() < 4 * s.size + 1024:
        counts = np.bincount(s)
        values = np.flatnonzero(counts)
        return values.astype(s.dtype, copy=False), counts[values]
    s = np.sort(s)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1]))) if s.size else \
        np.zeros(0, np.int64)
    return s[starts], np.diff(np.append(starts, s.size))


class AtomTable:
    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self.count = 0
        self._fixed: list[tuple[np.ndarray, str]] = []
        self._apart: list[np.ndarray] = []  # fixed atoms whose classes make a group alone

    def fresh(self, n: int) -> np.ndarray:
        """Allocate `n` new atoms, each its own class."""
        start = self.count
        if start + n > len(self._parent):
            grown = np.zeros(max(2 * len(self._parent), start + n), dtype=np.int64)
            grown[:start] = self._parent[:start]
            self._parent = grown
        self._parent[start:start + n] = np.arange(start, start + n)
        self.count = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, atoms: np.ndarray) -> np.ndarray:
        """Class representative (the oldest atom of the class) of every entry; NO_ATOM stays."""
        atoms = np.asarray(atoms, dtype=np.int64)
        # (the common case: no NO_ATOM, no masking; a bare ufunc reduce, not ndarray.all's
        # Python wrapper: this runs for every argument of every node)
        whole = not atoms.size or np.minimum.reduce(atoms, axis=None) >= 0
        valid = None if whole else atoms >= 0
        x = atoms if whole else np.where(valid, atoms, 0)
        parent = self._parent
        while True:
            p = parent[x]
            if not (p != x).any():
                break
            parent[x] = parent[p]  # path halving
            x = p
        if not whole:
            return np.where(valid, x, NO_ATOM)
        return x.copy() if x is atoms else np.asarray(x)  # (a fresh array, as np.where's)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie a[i] to b[i] for every i (arrays of equal shape); NO_ATOM entries are skipped."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        while a.size:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            ra, rb = ra[differ], rb[differ]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            # Several pairs may share a root: minimum.at keeps the smallest, the loop does the rest.
            np.minimum.at(self._parent, hi, lo)
            if np.array_equal(self._parent[hi], lo):  # each root took its own pair's: done
                return
            a, b = a[differ], b[differ]

    def union_all(self, atoms: np.ndarray) -> None:
        """Tie every atom of the array into one class."""
        flat = np.asarray(atoms, dtype=np.int64).ravel()
        flat = flat[flat >= 0]
        if flat.size > 1:
            self.union(flat[:-1], flat[1:])

    def fix(self, atoms: np.ndarray, reason: str) -> None:
        """Record that these atoms (and whatever they end up tied to) cannot be pruned."""
        flat = np.unique(np.asarray(atoms, dtype=np.int64).ravel())
        flat = flat[flat >= 0]
        if flat.size:
            self._fixed.append((flat, reason))

    def fix_apart(self, atoms: np.ndarray, reason: str) -> None:
        """Fix these atoms (`fix`), and give their classes a group of their own: the other
        channels of the spaces that made them (the query heads of a fused projection whose
        key/value head is kept: multi-query attention) stay prunable."""
        self.fix(atoms, reason)
        flat = np.asarray(atoms, dtype=np.int64).ravel()
        if (flat >= 0).any():
            self._apart.append(flat[flat >= 0])

    def apart(self) -> np.ndarray:
        """The class representatives that `fix_apart` set apart, resolved after all unions."""
        if not self._apart:
            return np.zeros(0, dtype=np.int64)
        return sorted_unique(self.find(np.concatenate(self._apart)))

    def fixed_reasons(self) -> dict[int, list[str]]:
        """Class representative -> reasons it cannot be pruned, resolved after all unions."""
        out: dict[int, list[str]] = {}
        for atoms, reason in self._fixed:
            for root in np.unique(self.find(atoms)).tolist():
                reasons = out.setdefault(root, [])
                if reason not in reasons:
                    reasons.append(reason)
        return out

    def fixed_by(self, label: np.ndarray) -> dict[int, set[str]]:
        """`label[root]` (a group id per class representative, say) -> the reasons its
        classes cannot be pruned, resolved after all unions: one lookup for every fixed
        atom, not one per class."""
        if not self._fixed:
            return {}
        flat = np.concatenate([a for a, _ in self._fixed])
        owner = np.repeat(np.arange(len(self._fixed), dtype=np.int64),
                          [len(a) for a, _ in self._fixed])
        labels = np.asarray(label, dtype=np.int64)[self.find(flat)]
        span = int(labels.max()) + 1 if labels.size else 1
        code = sorted_unique(owner * span + labels)
        out: dict[int, set[str]] = {}
        for k, lab in zip((code // span).tolist(), (code % span).tolist()):
            out.setdefault(lab, set()).add(self._fixed[k][1])
        return out
