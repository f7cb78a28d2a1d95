"""A scan's probe in the units of its measured amplitudes: one rule, for every reader and host.

Files and hosts write probes at an absolute scale of their own (Σ|P|² = 1e14
for 1e6-photon frames is common), while the far-field model every engine
uses, |fftshift(fft2(P·O))|/N = measured amplitude, needs the probe in the
amplitudes' units. The data fix only the product P·O, so when the probe's
scale is not the data's, some assumption must set it. Two conventions are
recognised and keep the probe's absolute scale (and with it the object's true
amplitude): the data's own units (Σ counts = Σ|P·O|², the project's and
PtychoPINN's far field) and the unnormalised FFT (Σ counts = N²·Σ|P·O|²,
pty-chi's ``PlanarPtychographyForwardModel``). Any other scale is replaced by
the assumption that the most transmissive part of the scan has transmission 1.
The NPZ reader and ``ptycho_export.data.load_ptychodus`` use it, and so should
every host that hands the runtime a probe of its own, so that an object's
amplitude means the same thing whichever door the scan came in by.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BRIGHTEST_FRAMES_PERCENTILE", "DATA_UNITS", "PROBE_CONSISTENT_RATIO", "UNNORMALISED_FFT_UNITS",
           "frame_energy", "normalise_probe", "scale_is_relative"]

PROBE_CONSISTENT_RATIO = (0.05, 1.5)
"""Mean pattern energy / Σ|P|² within this range (Σ|O·P|² = pattern energy for a transmission |O|² in it): the
probe is taken to be in the data's units already. The same window applied to that ratio / N² recognises the
unnormalised-FFT convention; outside both, the probe's absolute scale says nothing about the data."""

BRIGHTEST_FRAMES_PERCENTILE = 99.5
"""The pattern energy a probe of unrelated scale is set to: that of the brightest frames, not the single brightest
(one hot frame must not set the scale)."""

DATA_UNITS = "data units"
"""``normalise_probe``'s label for a probe already in the data's units (Σ counts = Σ|P·O|²)."""

UNNORMALISED_FFT_UNITS = "unnormalised-FFT units (Σ counts = N²·Σ|P·O|², pty-chi's convention): probe × N"
"""``normalise_probe``'s label for a probe in the unnormalised-FFT convention; its absolute scale is kept."""

_RESCALED = "rescaled"


def scale_is_relative(probe_scale: str) -> bool:
    """True when ``normalise_probe`` fell back to the brightest-frame rule (``probe_scale`` is its label).

    The object's amplitude is then relative to the brightest frames (taken as
    transmission 1), not absolute: readers warn about it, and callers store
    the label beside the reconstruction.
    """
    return probe_scale.startswith(_RESCALED)


def frame_energy(amplitude: np.ndarray) -> np.ndarray:
    """Σ amplitude² of each [.., N, N] frame, summed in float64 without a float64 copy of the frames (5× faster)."""
    a = np.asarray(amplitude)
    flat = a.reshape(-1, a.shape[-2] * a.shape[-1])
    return np.einsum("ij,ij->i", flat, flat, dtype=np.float64)


def normalise_probe(probe: np.ndarray, diffraction: np.ndarray, factor: float) -> tuple[np.ndarray, str]:
    """The probe in the units of the normalised diffraction, and how its scale was chosen.

    ``diffraction`` is the amplitude as read (photon units or as stored),
    ``factor`` the normalisation applied to it. With r = mean pattern energy /
    Σ|P|², in order:

    - r in ``PROBE_CONSISTENT_RATIO``: the probe is in the data's units and is
      scaled by the same factor (label ``DATA_UNITS``);
    - r / N² in that window: the probe is in the unnormalised-FFT convention,
      |fft2(P·O)| = amplitude, so P·N is the probe of the project's
      |fft2(P·O)|/N; it is scaled by N·factor (label ``UNNORMALISED_FFT_UNITS``);
    - otherwise (Σ|P|² = 1e14 for 1e6-photon frames is common) it is rescaled
      so that Σ|P|² equals the pattern energy of the brightest scan positions
      (``BRIGHTEST_FRAMES_PERCENTILE``): the most transmissive part of the
      scan is taken as transmission 1, which keeps the object's amplitude near
      its true value instead of absorbing the unknown scale (label starting
      "rescaled"; ``scale_is_relative`` tells it).
    """
    p = np.asarray(probe).astype(np.complex128)
    p_energy = float(np.sum(np.abs(p) ** 2))
    N = diffraction.shape[-1]
    energy = frame_energy(diffraction)
    if not (np.isfinite(p_energy) and p_energy > 0):
        raise ValueError("NPZ key 'probeGuess' is all zero or not finite; give the illumination the scan was "
                         "measured with")
    ratio = float(np.mean(energy)) / p_energy
    lo, hi = PROBE_CONSISTENT_RATIO
    if lo <= ratio <= hi:
        return (p * factor).astype(np.complex64), DATA_UNITS
    if lo <= ratio / N**2 <= hi:
        return (p * (N * factor)).astype(np.complex64), UNNORMALISED_FFT_UNITS
    target = float(np.percentile(energy, BRIGHTEST_FRAMES_PERCENTILE)) * factor**2
    return (p * np.sqrt(target / p_energy)).astype(np.complex64), (
        f"{_RESCALED}: its Σ|P|² ({p_energy:.3g}) is {ratio:.3g}× off the pattern energy (neither the data's units "
        f"nor the unnormalised FFT's, N² = {N**2}), so it is set to the brightest patterns' energy: the object's "
        "amplitude is relative to the brightest frames (transmission 1 there), not absolute")
