"""The runtime's compiled loops (numba): the refinement's batch step and fits, and the stitching's splat.

Why: a numpy batch step, after its two FFTs, is some twenty passes over the
batch's [B, N, N] arrays (the bilinear read, the probe multiply, the modulus
projection, the gain, the bilinear spread, the windows' copies), each a
separate ufunc call; on a 1,000-frame sweep at N = 64 they took ≈ 51 of its
≈ 78 ms (profiled). The loops here do them in one pass each, reading and
writing the canvas in place (``refinement.numba_backend``), and the slow-phase fit's
per-frame sums in one more (``refinement.phase_field``); the FFTs stay scipy's (or
numpy's). The stitching's splat of a chunk of patches (``stitching``) is
one more: a bilinear splat and three slice adds per patch in numpy. Each loop
computes what its numpy counterpart computes, term for term, so they agree
to rounding; numpy stays the reference, and the path where numba is absent.

numba is optional (``pip install ptycho-runtime[fast]``). The kernels are
compiled on first use and cached on disk by numba (a few seconds once per
machine); loading numba and the cached kernels costs ≈ 0.5 s per process
after that, which ``load_kernels`` spends ahead where a host wants it out of
its first reconstruction (``refinement.engine.prepare_backend``).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Optional

import numpy as np

_KERNELS: Optional[SimpleNamespace] = None


TINY = 1e-20  # |Ψ| below this has no phase to keep (numpy_backend.TINY, the same: a test holds them equal)


def numba_available() -> bool:
    """Whether numba can be imported here (without importing it: ``backend="auto"`` asks this on every refinement).

    rocket-fft (numpy's FFT inside numba, the [fast] extra's third package)
    is optional on top: without it the batch step's FFTs are scipy's, between
    the compiled loops (``_batch_step``)."""
    return importlib.util.find_spec("numba") is not None


def _compile(cache: bool) -> SimpleNamespace:
    """The four kernels, as numba dispatchers (compiled at their first call, from numba's cache when it has them).

    Every array is float32 (complex64 arrays as their interleaved (re, im)
    view), C-contiguous. ``error_model="numpy"`` lets divisions vectorise (numba
    otherwise checks each for zero, which keeps the loops scalar: 3-5× slower,
    measured); the fast-math flags allowed are reciprocal and re-association
    (the misfit's sum), not finite-math: the data are checked finite on entry.
    """
    import numba

    jit = numba.njit(cache=cache, nogil=True, error_model="numpy", fastmath={"arcp", "contract", "reassoc", "nsz"})

    @jit
    def read_waves(canvas, probe, rows, cols, fy, fx, waves, patches, keep):  # pragma: no cover - compiled
        """waves[b] = P·o_b, o_b read bilinearly from the canvas (rows first, then columns, as
        ``interpolate_windows``); ``patches[b] = o_b`` when ``keep`` (the probe step needs them)."""
        n = probe.shape[0]
        m = 2 * n
        t = np.empty(m + 2, np.float32)
        u = np.empty(m, np.float32)
        for b in range(rows.shape[0]):
            r0, c0, y, x = rows[b], 2 * cols[b], fy[b], fx[b]
            for i in range(n):
                top = canvas[r0 + i, c0:c0 + m + 2]
                bottom = canvas[r0 + i + 1, c0:c0 + m + 2]
                for k in range(m + 2):
                    t[k] = top[k] + (bottom[k] - top[k]) * y
                for k in range(m):
                    u[k] = t[k] + (t[k + 2] - t[k]) * x
                p, w = probe[i], waves[b, i]
                for j in range(n):
                    w[2 * j] = p[2 * j] * u[2 * j] - p[2 * j + 1] * u[2 * j + 1]
                    w[2 * j + 1] = p[2 * j] * u[2 * j + 1] + p[2 * j + 1] * u[2 * j]
                if keep:
                    patches[b, i, :] = u

    @jit
    def project(spectrum, measured, inv_n2, tiny):  # pragma: no cover - compiled
        """Ψ ← Ψ·(A/|Ψ| − 1) in place on the flat spectrum (norm="forward" units); returns Σ(|Ψ| − A)²."""
        total = np.float32(0.0)
        for k in range(measured.shape[0]):
            re, im = spectrum[2 * k], spectrum[2 * k + 1]
            mag = np.sqrt(re * re + im * im)
            a = measured[k] * inv_n2
            d = mag - a
            total += d * d
            f = a / max(mag, tiny) - np.float32(1.0)
            spectrum[2 * k] = re * f
            spectrum[2 * k + 1] = im * f
        return total

    @jit
    def correct(factor, dpsi):  # pragma: no cover - compiled
        """dpsi[b] ← factor·dpsi[b] in place: the object's correction from F⁻¹(Ψ' − Ψ)."""
        for b in range(dpsi.shape[0]):
            for i in range(dpsi.shape[1]):
                f, d = factor[i], dpsi[b, i]
                for j in range(dpsi.shape[2] // 2):
                    fr, fi, dr, di = f[2 * j], f[2 * j + 1], d[2 * j], d[2 * j + 1]
                    d[2 * j] = fr * dr - fi * di
                    d[2 * j + 1] = fr * di + fi * dr

    @jit
    def spread(canvas, delta, rows, cols, fy, fx):  # pragma: no cover - compiled
        """canvas += the bilinear spread of each delta[b] onto its (N+1)² window (``bilinear_spread``'s order:
        rows, then columns). The batch's windows share no pixel; they are added one after the other anyway."""
        n, m = delta.shape[1], delta.shape[2]
        r = np.zeros(m, np.float32)
        for b in range(delta.shape[0]):
            r0, c0, y, x = rows[b], 2 * cols[b], fy[b], fx[b]
            y1, x1 = np.float32(1.0) - y, np.float32(1.0) - x
            for i in range(n + 1):
                if i == 0:
                    for k in range(m):
                        r[k] = delta[b, 0, k] * y1
                elif i == n:
                    for k in range(m):
                        r[k] = delta[b, n - 1, k] * y
                else:
                    here, above = delta[b, i], delta[b, i - 1]
                    for k in range(m):
                        r[k] = here[k] * y1 + above[k] * y
                row = canvas[r0 + i, c0:c0 + m + 2]
                row[0] += r[0] * x1
                row[1] += r[1] * x1
                for k in range(2, m):
                    row[k] += r[k] * x1 + r[k - 2] * x
                row[m] += r[m - 2] * x
                row[m + 1] += r[m - 1] * x

    @jit
    def probe_sums(patches, dpsi, num, den):  # pragma: no cover - compiled
        """num = Σ_b conj(o_b)·dpsi_b, den = Σ_b |o_b|² over the batch (the probe step's sums)."""
        num[:] = 0
        den[:] = 0
        for b in range(patches.shape[0]):
            for i in range(patches.shape[1]):
                o, d, s, q = patches[b, i], dpsi[b, i], num[i], den[i]
                for j in range(den.shape[1]):
                    orr, oi, dr, di = o[2 * j], o[2 * j + 1], d[2 * j], d[2 * j + 1]
                    s[2 * j] += orr * dr + oi * di
                    s[2 * j + 1] += orr * di - oi * dr
                    q[j] += orr * orr + oi * oi

    @jit
    def ramp_sums(spectrum, d_rows, d_cols, measured, n, g, h, f):  # pragma: no cover - compiled
        """``phase_field.local_ramps``'s sums per frame, in float64: f = Σ r², g_a = 2 Σ r·J_a,
        H_ab = 2 Σ J_a·J_b, with r = |Ψ|·N − A and J_a = (Im Ψ·Re Φ_a − Re Ψ·Im Φ_a)·N/|Ψ| (Ψ the spectrum,
        Φ_a the spectra of the wave times row / column coordinates; all [B, N, 2N] floats, A [B, N, N])."""
        for b in range(spectrum.shape[0]):
            ff = g0 = g1 = h00 = h01 = h11 = 0.0
            for i in range(spectrum.shape[1]):
                s, p, q, a = spectrum[b, i], d_rows[b, i], d_cols[b, i], measured[b, i]
                for j in range(a.shape[0]):
                    sr, si = s[2 * j], s[2 * j + 1]
                    mag = np.sqrt(sr * sr + si * si)
                    r = mag * n - a[j]
                    inv = n / max(mag, np.float32(1e-30))
                    j0 = (si * p[2 * j] - sr * p[2 * j + 1]) * inv
                    j1 = (si * q[2 * j] - sr * q[2 * j + 1]) * inv
                    ff += r * r
                    g0 += r * j0
                    g1 += r * j1
                    h00 += j0 * j0
                    h01 += j0 * j1
                    h11 += j1 * j1
            f[b] = ff
            g[b, 0], g[b, 1] = 2 * g0, 2 * g1
            h[b, 0, 0], h[b, 1, 1] = 2 * h00, 2 * h11
            h[b, 0, 1] = h[b, 1, 0] = 2 * h01

    @jit
    def splat(re, im, wsum, patches, window, rows, cols, fy, fx):  # pragma: no cover - compiled
        """``StitchCanvas._add_inside``'s splat: each patch [h, w] (complex64, as floats [h, 2w]) times ``window``
        [h, w], and the window itself, spread bilinearly (rows, then columns) onto the (h+1)×(w+1) box at
        (rows[b], cols[b]) of the float64 canvases, cut at the canvas's far edge."""
        H, W = re.shape
        h, w = window.shape
        vr, vi, vw = np.zeros((2, w)), np.zeros((2, w)), np.zeros((2, w))  # this row and the one above
        tr, ti, tw = np.empty(w), np.empty(w), np.empty(w)
        for b in range(patches.shape[0]):
            r, c, y, x = rows[b], cols[b], fy[b], fx[b]
            dh, dw = min(h + 1, H - r), min(w + 1, W - c)
            vr[:], vi[:], vw[:] = 0.0, 0.0, 0.0
            for i in range(dh):
                cur, old = i % 2, 1 - i % 2
                if i < h:
                    p, q = patches[b, i], window[i]
                    for j in range(w):
                        vr[cur, j] = p[2 * j] * q[j]
                        vi[cur, j] = p[2 * j + 1] * q[j]
                        vw[cur, j] = q[j]
                else:
                    vr[cur, :], vi[cur, :], vw[cur, :] = 0.0, 0.0, 0.0
                for j in range(w):
                    tr[j] = vr[cur, j] * (1 - y) + vr[old, j] * y
                    ti[j] = vi[cur, j] * (1 - y) + vi[old, j] * y
                    tw[j] = vw[cur, j] * (1 - y) + vw[old, j] * y
                a, e, g = re[r + i], im[r + i], wsum[r + i]
                for j in range(dw):
                    left = j - 1
                    if j < w:
                        a[c + j] += tr[j] * (1 - x) + (tr[left] * x if j else 0.0)
                        e[c + j] += ti[j] * (1 - x) + (ti[left] * x if j else 0.0)
                        g[c + j] += tw[j] * (1 - x) + (tw[left] * x if j else 0.0)
                    else:
                        a[c + j] += tr[left] * x
                        e[c + j] += ti[left] * x
                        g[c + j] += tw[left] * x

    kernels = SimpleNamespace(read_waves=read_waves, project=project, correct=correct, spread=spread,
                              probe_sums=probe_sums, ramp_sums=ramp_sums, splat=splat)
    kernels.batch_step = _batch_step(kernels, cache)
    return kernels


def _batch_step(k: SimpleNamespace, cache: bool):
    """The whole batch step in one parallel compiled function, or None where numba has no FFT (rocket-fft absent).

    Read, FFT, projection, inverse FFT, correction and spread of each of
    ``parts`` slices of the batch, the slices on numba's threads: the frames
    of a batch are independent and their windows disjoint. With rocket-fft's
    pocketfft inside numba the FFTs need no Python call either; on 2 cores a
    12-frame batch takes 207 µs against 476 µs for the kernels between scipy's
    FFTs (measured; docs/fidelity.md, "Compiled passes").
    """
    try:
        import rocket_fft  # noqa: F401 - gives numba numpy.fft
    except ImportError:
        return None
    import numba

    read_waves, project, correct, spread = k.read_waves, k.project, k.correct, k.spread

    @numba.njit(cache=cache, nogil=True, parallel=True, error_model="numpy",
                fastmath={"arcp", "contract", "reassoc", "nsz"})
    def batch_step(canvas, probe, factor, rows, cols, fy, fx, measured, inv_n2, tiny, parts, keep, patches,
                   kept):  # pragma: no cover - compiled
        """``NumpyBackend.run_batch``'s object update (complex arrays as floats); returns the Σ misfit in
        norm="forward" units. With ``keep``, ``patches`` gets o_b and ``kept`` F⁻¹(Ψ' − Ψ)/N² for the probe step."""
        B, n = rows.shape[0], probe.shape[0]
        misfits = np.zeros(parts)
        for t in numba.prange(parts):
            lo, hi = t * B // parts, (t + 1) * B // parts
            waves = np.empty((hi - lo, n, n), np.complex64)
            floats = waves.view(np.float32)
            read_waves(canvas, probe, rows[lo:hi], cols[lo:hi], fy[lo:hi], fx[lo:hi], floats,
                       patches[lo:hi] if keep else patches, keep)
            spectrum = np.fft.fft2(waves, norm="forward")
            misfits[t] = project(spectrum.reshape(-1).view(np.float32), measured[lo:hi].reshape(-1), inv_n2, tiny)
            delta = np.fft.ifft2(spectrum).view(np.float32)
            if keep:
                kept[lo:hi] = delta
            correct(factor, delta)
            spread(canvas, delta, rows[lo:hi], cols[lo:hi], fy[lo:hi], fx[lo:hi])
        return misfits.sum()

    return batch_step


def load_kernels() -> SimpleNamespace:
    """Import numba and compile (or load from its cache) the kernels, once per process; raises ImportError
    without numba.

    A host calls this at start-up to keep numba's import and the kernels'
    loading (≈ 0.5 s with a warm cache) out of its first reconstruction.
    Where numba cannot write its cache (a read-only install with no user
    cache directory) the kernels are compiled without one.
    """
    global _KERNELS
    if _KERNELS is None:
        try:
            kernels = _compile(cache=True)
            _warm(kernels)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            kernels = _compile(cache=False)
            _warm(kernels)
        _KERNELS = kernels
    return _KERNELS


def available_kernels() -> Optional[SimpleNamespace]:
    """The kernels where numba is installed and they load, else None (the caller then runs its numpy code).

    A broken numba is not an error here (``refinement.engine.make_backend``
    warns about it where a backend was asked for).
    """
    if not numba_available():
        return None
    try:
        return load_kernels()
    except Exception:  # noqa: BLE001 - numba's errors (typing, LLVM) share no narrower base
        return None


def _warm(k: SimpleNamespace) -> None:
    """Call each kernel once on a tiny input: compiles it (or loads it from the cache) now, not mid-sweep."""
    canvas = np.zeros((6, 12), np.float32)
    probe = np.ones((4, 8), np.float32)
    rows, cols = np.zeros(1, np.int64), np.zeros(1, np.int64)
    f = np.zeros(1, np.float32)
    waves = np.zeros((1, 4, 8), np.float32)
    k.read_waves(canvas, probe, rows, cols, f, f, waves, waves, True)
    k.project(waves.reshape(-1), np.zeros(16, np.float32), np.float32(1.0), np.float32(TINY))
    k.correct(probe, waves)
    k.spread(canvas, waves, rows, cols, f, f)
    k.probe_sums(waves, waves, probe.copy(), np.zeros((4, 4), np.float32))
    k.splat(np.zeros((6, 6)), np.zeros((6, 6)), np.zeros((6, 6)), waves, np.ones((4, 4)), rows, cols, np.zeros(1),
            np.zeros(1))
    if k.batch_step is not None:
        k.batch_step(canvas, probe, probe, rows, cols, f, f, np.zeros((1, 4, 4), np.float32), np.float32(1.0),
                     np.float32(TINY), 1, False, waves[:0], waves[:0])
        import numba

        if numba.threading_layer() == "workqueue":  # not thread-safe: a host refining in two threads would abort
            k.batch_step = None
    k.ramp_sums(waves, waves, waves, np.zeros((1, 4, 4), np.float32), np.float32(4), np.zeros((1, 2)),
                np.zeros((1, 2, 2)), np.zeros(1))


