"""A scan's probe in the units of its measured amplitudes: one rule, for every reader and host.

Files and hosts write probes at an absolute scale of their own (Σ|P|² = 1e14
for 1e6-photon frames is common), while the far-field model every engine
uses, |fftshift(fft2(P·O))|/N = measured amplitude, needs the probe in the
amplitudes' units. The data fix only the product P·O, so when the probe's
scale is not the data's, some assumption must set it; the one here is that
the most transmissive part of the scan has transmission 1. The NPZ reader,
``Bundle.reconstruct(refine=...)`` and the ptychodus host all use it, so an
object's amplitude means the same thing whichever door the scan came in by.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PROBE_CONSISTENT_RATIO", "normalise_probe"]

PROBE_CONSISTENT_RATIO = (0.05, 1.5)
"""Mean pattern energy / Σ|P|² within this range (Σ|O·P|² = pattern energy for a transmission |O|² in it): the
probe is taken to be in the data's units already; otherwise its absolute scale says nothing about the data."""


def normalise_probe(probe: np.ndarray, diffraction: np.ndarray, factor: float) -> tuple[np.ndarray, str]:
    """The probe in the units of the normalised diffraction, and how its scale was chosen.

    ``diffraction`` is the amplitude as read (photon units or as stored),
    ``factor`` the normalisation applied to it. A probe already in the data's
    units is scaled by the same factor. A probe at an unrelated absolute scale
    (Σ|P|² = 1e14 for 1e6-photon frames is common) is rescaled so that Σ|P|²
    equals the pattern energy of the brightest scan positions (99.5th
    percentile): the most transmissive part of the scan is taken as
    transmission 1, which keeps the amplitude of the object near its true
    value instead of absorbing the unknown scale.
    """
    p = np.asarray(probe).astype(np.complex128)
    p_energy = float(np.sum(np.abs(p) ** 2))
    N = diffraction.shape[-1]
    energy = np.sum(diffraction.astype(np.float64).reshape(-1, N * N) ** 2, axis=-1)
    if not (np.isfinite(p_energy) and p_energy > 0):
        raise ValueError("NPZ key 'probeGuess' is all zero or not finite; give the illumination the scan was "
                         "measured with")
    ratio = float(np.mean(energy)) / p_energy
    lo, hi = PROBE_CONSISTENT_RATIO
    if lo <= ratio <= hi:
        return (p * factor).astype(np.complex64), "data units"
    target = float(np.percentile(energy, 99.5)) * factor**2
    return (p * np.sqrt(target / p_energy)).astype(np.complex64), (
        f"rescaled: its Σ|P|² ({p_energy:.3g}) is {ratio:.3g}× off the pattern energy, so it is set to the "
        "brightest patterns' energy (transmission 1 there)")
