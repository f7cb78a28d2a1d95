"""In-memory containers for ptychographic scans and for grouped training batches.

``PtychoData`` mirrors the PtychoPINN NPZ contract one field per key, so that
loading, simulating and saving all meet in one validated type: a wrong shape
or dtype fails at construction, naming the field, instead of deep inside a
model.  ``GroupedData`` is what the model consumes: diffraction patterns
gathered into groups of ``C = gridsize**2`` neighbouring scan positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

import numpy as np

IndexLike = Union[Sequence[int], np.ndarray]


def _as_array(name: str, value: object, dtype: np.dtype, ndim: int, what: str) -> np.ndarray:
    """Cast ``value`` to ``dtype`` and check its rank; refuse complex → real casts."""
    arr = np.asarray(value)
    if np.iscomplexobj(arr) and not np.issubdtype(np.dtype(dtype), np.complexfloating):
        raise ValueError(f"{name} must be real ({what}); got complex dtype {arr.dtype}")
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array ({what}); got dtype object")
    if arr.ndim != ndim:
        raise ValueError(f"{name} has shape {arr.shape}; expected {what}")
    return np.ascontiguousarray(arr, dtype=dtype)


def _check_shape(name: str, arr: np.ndarray, expected: tuple, what: str) -> None:
    if arr.shape != expected:
        raise ValueError(f"{name} has shape {arr.shape}; expected {what} = {expected}")


@dataclass
class PtychoData:
    """One ptychographic scan: diffraction amplitudes, positions and probe.

    Attributes:
        diffraction: float32 (n, N, N) normalised diffraction *amplitude*
            (square root of counts, scaled so mean Σ X² ≈ (N/2)²).
        xcoords, ycoords: float64 (n,) scan positions in object pixels; the
            position is the patch centre, frame pixel (N−1)/2 (x = column, y = row).
        probe: complex64 (N, N) illumination.
        object: complex64 (M, M') ground-truth / initial object, or None.
        patches: complex64 (n, N, N) ground-truth object patches (NPZ ``Y``), or None.
        scan_index: int64 (n,) scan number of each pattern, or None.
        nphotons: mean photons (counts) per pattern when the data's units tell
            it (counts or photon-unit amplitudes), else None. It fixes the
            intensity scale, so the Poisson likelihood sees the real counts.
        physics: the instrument (``ptycho_runtime.format.PHYSICS_KEYS``:
            photon energy, detector distance and pixel, object pixel) when the
            data says it, else None; training writes it into the bundle.
    """

    diffraction: np.ndarray
    xcoords: np.ndarray
    ycoords: np.ndarray
    probe: np.ndarray
    object: Optional[np.ndarray] = None
    patches: Optional[np.ndarray] = None
    scan_index: Optional[np.ndarray] = None
    nphotons: Optional[float] = None
    physics: Optional[dict] = None

    def __post_init__(self) -> None:
        self.diffraction = _as_array(
            "diffraction", self.diffraction, np.float32, 3, "(n, N, N) float amplitude"
        )
        if self.nphotons is not None:
            if not (np.isfinite(self.nphotons) and self.nphotons > 0):
                raise ValueError(f"nphotons must be a positive finite number or None (got {self.nphotons!r})")
            self.nphotons = float(self.nphotons)
        n, h, w = self.diffraction.shape
        if h != w:
            raise ValueError(
                f"diffraction has shape {self.diffraction.shape}; expected square patterns (n, N, N)"
            )
        if n == 0:
            raise ValueError("diffraction holds no patterns (n = 0)")
        N = h
        self.xcoords = _as_array("xcoords", self.xcoords, np.float64, 1, f"(n,) = ({n},)")
        self.ycoords = _as_array("ycoords", self.ycoords, np.float64, 1, f"(n,) = ({n},)")
        _check_shape("xcoords", self.xcoords, (n,), "(n,)")
        _check_shape("ycoords", self.ycoords, (n,), "(n,)")
        self.probe = _as_array("probe", self.probe, np.complex64, 2, f"(N, N) = ({N}, {N})")
        _check_shape("probe", self.probe, (N, N), "(N, N)")
        if self.object is not None:
            self.object = _as_array("object", self.object, np.complex64, 2, "(M, M') complex")
        if self.patches is not None:
            self.patches = _as_array(
                "patches", self.patches, np.complex64, 3, f"(n, N, N) = ({n}, {N}, {N})"
            )
            _check_shape("patches", self.patches, (n, N, N), "(n, N, N)")
        if self.scan_index is not None:
            si = np.asarray(self.scan_index)
            if si.size and not np.issubdtype(si.dtype, np.integer):
                if not np.all(np.isfinite(si)) or np.any(si != np.round(si)):
                    raise ValueError("scan_index must hold integers")
            self.scan_index = _as_array("scan_index", si, np.int64, 1, f"(n,) = ({n},)")
            _check_shape("scan_index", self.scan_index, (n,), "(n,)")
        for name in ("xcoords", "ycoords"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"{name} contains NaN or infinite values")

    @property
    def n(self) -> int:
        """Number of diffraction patterns."""
        return int(self.diffraction.shape[0])

    @property
    def N(self) -> int:
        """Patch / pattern side length in pixels."""
        return int(self.diffraction.shape[-1])

    def subset(self, indices: IndexLike) -> "PtychoData":
        """Patterns at ``indices`` (in the given order); the object and probe are shared."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise ValueError(f"boolean mask has shape {idx.shape}; expected ({self.n},)")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size == 0:
            raise ValueError("subset needs at least one index")
        if idx.min() < -self.n or idx.max() >= self.n:
            raise ValueError(f"subset indices must lie in [0, {self.n}); got {idx.min()}..{idx.max()}")
        return PtychoData(
            diffraction=self.diffraction[idx],
            xcoords=self.xcoords[idx],
            ycoords=self.ycoords[idx],
            probe=self.probe,
            object=self.object,
            patches=None if self.patches is None else self.patches[idx],
            scan_index=None if self.scan_index is None else self.scan_index[idx],
            nphotons=self.nphotons,
            physics=self.physics,
        )

    def split(
        self, fraction: float = 0.8, seed: int = 0, mode: str = "spatial"
    ) -> Tuple["PtychoData", "PtychoData"]:
        """Split into (train, test) with ``round(fraction * n)`` training patterns.

        ``mode="spatial"`` (default) sorts positions by row coordinate y (ties by
        x): the top part of the scan trains, the bottom part tests.  This is the
        usual ptychography protocol, because a random split would put every
        test pattern next to overlapping training patterns and overstate
        generalisation; ``seed`` is unused there.  Patches near the border
        still overlap the other side by up to N/2 pixels.
        ``mode="random"`` draws a random split with ``numpy.random.default_rng(seed)``.
        Both subsets keep the original pattern order.
        """
        if not (0.0 < fraction < 1.0):
            raise ValueError(f"fraction must be in (0, 1) (got {fraction!r})")
        n_train = int(round(fraction * self.n))
        if n_train < 1 or n_train > self.n - 1:
            raise ValueError(
                f"fraction={fraction} of n={self.n} patterns leaves an empty train or test set"
            )
        if mode == "spatial":
            order = np.lexsort((self.xcoords, self.ycoords))
        elif mode == "random":
            order = np.random.default_rng(seed).permutation(self.n)
        else:
            raise ValueError(f"mode must be 'spatial' or 'random' (got {mode!r})")
        return self.subset(np.sort(order[:n_train])), self.subset(np.sort(order[n_train:]))


@dataclass
class GroupedData:
    """Patterns gathered into groups of C = gridsize² neighbouring positions.

    Attributes:
        diffraction: float32 [B, C, N, N].
        offsets: float32 [B, C, 1, 2]; last axis (x, y) = member position minus
            the group centroid, in object pixels (sums to 0 over C).
        positions: float64 [B, C, 2] global (x, y) of each member.
        indices: int64 [B, C] into the source ``PtychoData``.
        patches: complex64 [B, C, N, N] ground truth, or None.
    """

    diffraction: np.ndarray
    offsets: np.ndarray
    positions: np.ndarray
    indices: np.ndarray
    patches: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.diffraction = _as_array(
            "diffraction", self.diffraction, np.float32, 4, "[B, C, N, N] float"
        )
        B, C, h, w = self.diffraction.shape
        if h != w:
            raise ValueError(f"diffraction has shape {self.diffraction.shape}; expected [B, C, N, N]")
        g = int(round(np.sqrt(C)))
        if g * g != C:
            raise ValueError(f"group size C={C} is not a perfect square (gridsize**2)")
        self.offsets = _as_array("offsets", self.offsets, np.float32, 4, f"[B, C, 1, 2] = [{B}, {C}, 1, 2]")
        _check_shape("offsets", self.offsets, (B, C, 1, 2), "[B, C, 1, 2]")
        self.positions = _as_array("positions", self.positions, np.float64, 3, f"[B, C, 2] = [{B}, {C}, 2]")
        _check_shape("positions", self.positions, (B, C, 2), "[B, C, 2]")
        self.indices = _as_array("indices", self.indices, np.int64, 2, f"[B, C] = [{B}, {C}]")
        _check_shape("indices", self.indices, (B, C), "[B, C]")
        if self.patches is not None:
            self.patches = _as_array(
                "patches", self.patches, np.complex64, 4, f"[B, C, N, N] = [{B}, {C}, {h}, {h}]"
            )
            _check_shape("patches", self.patches, (B, C, h, h), "[B, C, N, N]")

    @property
    def B(self) -> int:
        """Number of groups."""
        return int(self.diffraction.shape[0])

    @property
    def C(self) -> int:
        """Patterns per group (gridsize**2)."""
        return int(self.diffraction.shape[1])

    @property
    def N(self) -> int:
        """Pattern side length in pixels."""
        return int(self.diffraction.shape[-1])

    @property
    def gridsize(self) -> int:
        """sqrt(C)."""
        return int(round(np.sqrt(self.C)))

    def subset(self, indices: IndexLike) -> "GroupedData":
        """Groups at ``indices`` (e.g. a mini-batch)."""
        idx = np.atleast_1d(np.asarray(indices))
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return GroupedData(**{k: (None if v is None else v[idx]) for k, v in kw.items()})
