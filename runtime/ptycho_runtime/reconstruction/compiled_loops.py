"""numba's compiled loops, at module level so that numba caches them on disk (``compiled`` imports this module).

Importing it imports numba (≈ 0.2 s): only ``compiled.load_kernels`` does,
at the first stitch or refinement that can use the loops.

Every array is float32 (complex64 arrays as their interleaved (re, im)
view), C-contiguous. ``error_model="numpy"`` lets divisions vectorise (numba
otherwise checks each for zero, which keeps the loops scalar: 3-5× slower,
measured); the fast-math flags allowed are reciprocal and re-association
(the misfit's sum), not finite-math: the data are checked finite on entry.

``batch_step`` is the whole batch step in one parallel function, or None
without rocket-fft (numba's numpy.fft): read, FFT, projection, inverse FFT,
correction and spread of each of ``parts`` slices of the batch, the slices
on numba's threads (the frames of a batch are independent and their windows
disjoint). On 2 cores a 12-frame batch takes 207 µs, against 476 µs for the
kernels between scipy's FFTs (measured; docs/fidelity.md, "Compiled passes").
"""

from __future__ import annotations

import numba
import numpy as np

_OPTIONS = dict(cache=True, nogil=True, error_model="numpy", fastmath={"arcp", "contract", "reassoc", "nsz"})
jit = numba.njit(**_OPTIONS)


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


try:
    import rocket_fft  # noqa: F401 - gives numba numpy.fft
except ImportError:
    batch_step = ramp_step = None
else:
    @numba.njit(parallel=True, **_OPTIONS)
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

    @numba.njit(parallel=True, **_OPTIONS)
    def ramp_step(canvas, probe, rows, cols, fy, fx, measured, coords, parts, g, h, f):  # pragma: no cover
        """``phase_field.local_ramps`` for a chunk of frames in one call: each of ``parts`` slices (on numba's
        threads) reads its exit waves, transforms them and the waves times each centred coordinate, and sums
        (``ramp_sums``); ``measured`` [B, N, N] unshifted, ``coords`` [N] the coordinates."""
        B, n = rows.shape[0], probe.shape[0]
        for t in numba.prange(parts):
            lo, hi = t * B // parts, (t + 1) * B // parts
            waves = np.empty((hi - lo, n, n), np.complex64)
            floats = waves.view(np.float32)
            read_waves(canvas, probe, rows[lo:hi], cols[lo:hi], fy[lo:hi], fx[lo:hi], floats, floats[:0], False)
            along_rows, along_cols = np.empty_like(waves), np.empty_like(waves)
            for b in range(hi - lo):
                for i in range(n):
                    for j in range(n):
                        along_rows[b, i, j] = waves[b, i, j] * coords[i]
                        along_cols[b, i, j] = waves[b, i, j] * coords[j]
            spectrum = np.fft.fft2(waves, norm="forward")
            d_rows = np.fft.fft2(along_rows, norm="forward")
            d_cols = np.fft.fft2(along_cols, norm="forward")
            ramp_sums(spectrum.view(np.float32), d_rows.view(np.float32), d_cols.view(np.float32), measured[lo:hi],
                      np.float32(n), g[lo:hi], h[lo:hi], f[lo:hi])
