"""Does this model fit this instrument? The host's geometry, counts and probe checked against the bundle's.

A network learns one instrument: the object pixel size (set by photon
energy, detector distance and detector pixel), the photon budget it was
trained at (``nphotons``: input amplitudes far from it are outside what it
saw) and the probe it was trained through. Applied to another instrument it
still returns a plausible-looking image, so the runtime compares what the host
says with what the bundle recorded (``/physics/metadata_json``,
``format.PHYSICS_KEYS``, and the params' ``nphotons`` and ``probe``)
and says so with numbers: a warning on the ``ptycho_runtime`` logger, or, with
``strict=True``, a ``PhysicsMismatchError``. What either side does not know
is not checked (old bundles have no physics metadata).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 0.05   # relative: energy, distance, pixel sizes
COUNTS_FACTOR = 2.0         # mean counts per frame within nphotons / 2 … nphotons × 2
PROBE_SIMILARITY = 0.9      # |<host, bundle>| / (|host| |bundle|) at least this
HC_EV_M = 1.239841984e-6    # h c in eV·m: wavelength = HC_EV_M / energy


class PhysicsMismatchError(ValueError):
    """The host's instrument does not match the one the bundle was trained for (``strict=True``)."""


@dataclass(frozen=True)
class HostPhysics:
    """What a host knows about its instrument and scan (None: unknown, not checked).

    ``object_pixel_size_m`` is the pitch of the host's object grid;
    ``probe_pixel_size_m`` the pitch of its probe (the patches' pitch: the two
    must agree for patches to be placed right); ``probe`` [N, N] its probe.
    """

    photon_energy_eV: Optional[float] = None
    detector_distance_m: Optional[float] = None
    detector_pixel_size_m: Optional[float] = None
    object_pixel_size_m: Optional[float] = None
    probe_pixel_size_m: Optional[float] = None
    probe: Optional[np.ndarray] = None


def object_pixel_size(photon_energy_eV: float, detector_distance_m: float, detector_pixel_size_m: float,
                      N: int) -> float:
    """Far-field sample-plane pixel: λ z / (N · detector pixel)."""
    return HC_EV_M / photon_energy_eV * detector_distance_m / (N * detector_pixel_size_m)


def _known(v: Any) -> bool:
    return v is not None and np.isfinite(v) and v > 0


def check_host(physics: Mapping[str, Optional[float]], params: Mapping[str, Any], host: HostPhysics,
               counts: Optional[np.ndarray] = None, strict: bool = False) -> list[str]:
    """Compare a host with a bundle's ``physics`` and ``params``; return the mismatches (logged as warnings).

    ``counts`` [n, …] are the host's detector counts (their mean total per
    frame is compared with ``nphotons``). With ``strict`` any mismatch raises
    ``PhysicsMismatchError`` listing them all.
    """
    N = int(params["N"])
    found: list[str] = []
    bundle = dict(physics)
    if all(_known(bundle.get(k)) for k in ("photon_energy_eV", "detector_distance_m", "detector_pixel_size_m")) \
            and not _known(bundle.get("object_pixel_size_m")):
        bundle["object_pixel_size_m"] = object_pixel_size(bundle["photon_energy_eV"], bundle["detector_distance_m"],
                                                          bundle["detector_pixel_size_m"], N)
    for key, label in (("photon_energy_eV", "photon energy {:.6g} eV"), ("detector_distance_m", "detector distance "
                       "{:.6g} m"), ("detector_pixel_size_m", "detector pixel {:.4g} m"),
                       ("object_pixel_size_m", "object pixel {:.4g} m")):
        h, b = getattr(host, key), bundle.get(key)
        if _known(h) and _known(b) and abs(h / b - 1) > GEOMETRY_TOLERANCE:
            found.append(f"the host's {label.format(h)} differs from the bundle's {label.split(' {')[0]} "
                         f"{b:.6g} by {100 * (h / b - 1):+.1f}% (tolerance {100 * GEOMETRY_TOLERANCE:.0f}%): the "
                         "model was trained for another instrument")
    if _known(host.object_pixel_size_m) and _known(host.probe_pixel_size_m) and \
            abs(host.object_pixel_size_m / host.probe_pixel_size_m - 1) > GEOMETRY_TOLERANCE:
        found.append(f"the host's object pixel {host.object_pixel_size_m:.4g} m differs from its probe pixel "
                     f"{host.probe_pixel_size_m:.4g} m: the network's patches have the probe's pitch, so they "
                     "cannot be stitched on this object grid without resampling")
    nphotons = params.get("nphotons")
    if counts is not None and _known(nphotons):
        c = np.asarray(counts)
        per_frame = float(c.reshape(c.shape[0], -1).sum(axis=1, dtype=np.float64).mean()) if c.size else 0.0
        ratio = per_frame / float(nphotons)
        if not (1 / COUNTS_FACTOR <= ratio <= COUNTS_FACTOR):
            found.append(f"the host's patterns hold {per_frame:.4g} counts per frame on average, {ratio:.3g}× the "
                         f"{float(nphotons):.4g} photons the model was trained at (accepted: ×{1 / COUNTS_FACTOR:g} "
                         f"to ×{COUNTS_FACTOR:g}); its inputs are outside what it saw")
    bprobe = params.get("probe")
    if host.probe is not None and bprobe is not None:
        hp, bp = np.asarray(host.probe), np.asarray(bprobe)
        if hp.shape != bp.shape:
            found.append(f"the host's probe is {list(hp.shape)}, the bundle's {list(bp.shape)}")
        else:
            denom = float(np.linalg.norm(hp) * np.linalg.norm(bp))
            sim = abs(np.vdot(bp, hp)) / denom if denom > 0 else 0.0
            if sim < PROBE_SIMILARITY:
                found.append(f"the host's probe matches the bundle's to {sim:.3f} (normalised overlap; accepted "
                             f"≥ {PROBE_SIMILARITY}): the model was trained through another probe")
    for message in found:
        log.warning("physics check: %s", message)
    if strict and found:
        raise PhysicsMismatchError("the host does not match the bundle (strict check): " + "; ".join(found))
    return found


def check_scan(physics: Mapping[str, Optional[float]], params: Mapping[str, Any], probe: Optional[np.ndarray] = None,
               nphotons: Optional[float] = None) -> list[str]:
    """A scan file's probe and mean photons per frame against the bundle's (``check_host`` plus the count level).

    For hosts that read a scan file (``ptycho-runtime infer``, ``infer-many``)
    rather than hold an instrument: files seldom carry the geometry, but they
    do carry the probe and, in photon units, the count level. Mismatches are
    logged as warnings and returned.
    """
    found = check_host(physics, params, HostPhysics(probe=probe))
    trained = params.get("nphotons")
    if nphotons is not None and _known(trained):
        ratio = float(nphotons) / float(trained)
        if not (1 / COUNTS_FACTOR <= ratio <= COUNTS_FACTOR):
            message = (f"the scan holds {float(nphotons):.4g} photons per frame, {ratio:.3g}x the {float(trained):.4g} "
                       f"the model was trained at (accepted: x{1 / COUNTS_FACTOR:g} to x{COUNTS_FACTOR:g})")
            log.warning("physics check: %s", message)
            found.append(message)
    return found
