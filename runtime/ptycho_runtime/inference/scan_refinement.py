"""Network, then refinement against the scan: the step that makes the fast path the good path.

The network maps each pattern to its patch in one pass; it recovers local
detail but not the phase of regions larger than the probe, and under a probe
it was not trained through its output can be worse than nothing
(docs/independent-scans.md). The scan itself determines both through its
overlap, so ``Bundle.reconstruct(refine=...)``, the CLI, the streaming
reconstructor and the hosts all finish with sweeps of the runtime's batched
refinement (``refinement.refine``) with the scan's own probe.

Three decisions are made here, once for every caller:

- **the probe and its units**: the host's probe (a scan's ``probeGuess``, a
  ptychodus product's probe) at its own absolute scale is brought to the
  units of the measured amplitudes by ``probe_scale.normalise_probe``, the
  NPZ reader's rule; without one, the bundle's training probe is used and
  the record says so;
- **the start**: ``start="auto"`` (the default) runs two sweeps from the
  network's phase at the transmission level the data imply (its amplitude
  set aside) and from a flat object, and finishes whichever then fits the
  measured patterns best (flat only when clearly better, ``FLAT_MARGIN``;
  the network's object with its own amplitude, once a third candidate, never
  ended better by more than 0.003, ``AUTO_STARTS``). The network's phase is
  what one pattern cannot give and the overlap gives slowly; its amplitude
  is the part that goes wrong under a probe it was not trained for
  (docs/independent-scans.md). Under such a probe the network's start is
  noise, fits worse than a flat one after two sweeps, and is dropped: on
  the independent simulators' scans this picks the flat start (ending
  level with the flat control rather than up to 0.025 below it), on the
  project's scans the network's (ending above it; docs/fidelity.md);
- **the probe**: ``refine_probe="auto"`` (the default) keeps the scan's
  probe guess fixed, then compares the misfit reached with the frames'
  Poisson noise floor (``refinement.noise_floor``). Far above it
  (``PROBE_SUSPECT``), the guess cannot explain the data: the sweeps are run
  again from the same start with the probe refined, and the better fit is
  kept (a free probe can also go wrong from a poor start: on a small test
  scan it ran off with a 3 rad ramp). With a guess defocused by 6 rad this
  lifts phase SSIM from 0.023 to 0.922 on the project's scan; with an
  accurate guess nothing changes. ``True`` always refines it (better on
  pty-chi's scan, 0.674 → 0.913; docs/fidelity.md), ``False`` never. With
  the probe refined, a fit still far above the floor after the requested
  sweeps goes on, in blocks of 4, until it is below (then 8 more), up to
  ``max_sweeps`` (``_sweep_until_explained``: a guess of overlap 0.07 with
  the true probe took 48). A fit still far above the floor at the end is
  warned about with the fix;
- **the slow phase**: with the probe fixed, every ``phase_field_every`` (4)
  sweeps the object's slowly varying phase is fitted to every frame's local
  ramp and integrated over the scan in one solve (``refinement.phase_field``):
  what the sweeps move slowest, the phase of regions larger than the probe.
  With it 16 sweeps (the default) reach phase SSIM 0.98 on the project's
  held-out scan, where the sweeps alone reach 0.965 in 30 (docs/fidelity.md,
  "The slow phase"). ``phase_ramp_every`` adds the older fit of the global
  ramp alone (``refinement.phase_ramp``; off by default: the field includes
  it); ``0`` turns either off;
- **the amplitude prior**: ``amplitude_prior="tv"`` (the default) ends with a
  total-variation denoising of the refined amplitude at the strength of its
  own noise (``refinement.object_prior``): the sweeps fit the frames to their
  noise floor, and what is left in the amplitude is shot-noise grain (amplitude
  SSIM 0.838 → 0.952 on the project's scan, and higher on both independent
  simulators' scans; docs/fidelity.md). ``"none"`` returns the data-only object.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import numpy as np

from ..reconstruction.geometry import frame_origin
from ..reconstruction.grouping import GROUPINGS
from ..reconstruction.probe_scale import normalise_probe
from ..reconstruction.stitching import Reconstruction
from ..refinement import DEFAULT_SWEEPS, Refiner, RefineResult, far_field_misfit, refine
from ..refinement.engine import BACKENDS, ENGINES
from ..refinement.noise_floor import poisson_floor
from ..refinement.object_prior import PRIORS, apply_amplitude_prior, well_lit
from ..refinement.phase_field import DEFAULT_EVERY as DEFAULT_FIELD_EVERY
from ..refinement.phase_field import SPACING as PHASE_FIELD_SPACING
from ..refinement.phase_field import PhaseField
from ..refinement.phase_ramp import fit_phase_ramp, ramp_factor

log = logging.getLogger(__name__)

START_CHOICES = ("auto", "network", "network phase", "flat")
NETWORK_STARTS = ("network", "network phase")
"""The starts made from the network's object (``start_candidates``)."""
AUTO_STARTS = ("network phase", "flat")
"""What ``start="auto"`` compares after ``TRIAL_SWEEPS`` (the built-in engine). "flat" is one of them since the
phase-ramp fits: under a probe the network was not trained for its start is noise that the sweeps must undo
(docs/fidelity.md, "The start, flat included"). "network" (its own amplitude) was a third until the trial's two
sweeps were measured against it on eight scans: it won on one (`test.npz` defocused by 12 rad, by 0.003
amplitude SSIM) and tied or lost on the rest, for two more sweeps on every scan (docs/fidelity.md)."""
FLAT_MARGIN = 0.9
"""A flat start replaces the network's only when its misfit after the trial sweeps is below this fraction of the
best network start's: the network's start is kept unless the data clearly say it is worse. Measured ratios (flat
over network): 0.17–0.75 on the scans where the flat start ends better (the independent simulators' scans, exact
and defocused probes); 0.999–2.96 where the network's ends better (the project's scans, exact and defocused)."""
MISFIT_SAMPLE = 256
"""Frames whose far-field misfit decides the start for engines that cannot be resumed (pty-chi), ~0.1 s."""
TRIAL_SWEEPS = 2
"""Sweeps run from every candidate start before the best is kept (they count towards the requested sweeps)."""
PROBE_SUSPECT = 4.0
"""Misfit over the Poisson floor above which a fixed probe guess is judged wrong. Measured after 30 sweeps: 0.93–1.15
with the exact probe (the project's scan and two independent simulators'), 9.0–58 with it defocused by 6 or 12 rad;
after the default 16 with the slow-phase fits, 0.94–1.12 with the exact probe."""
DEFAULT_MAX_SWEEPS = 64
"""``RefineSettings.max_sweeps``: how far a refinement with the probe refined may run past its requested sweeps
while its fit stays above ``PROBE_SUSPECT`` × the noise floor (``_sweep_until_explained``)."""
EXTEND_BLOCK = 4
"""Sweeps between checks of the fit while a refinement runs past its requested sweeps."""
POLISH_SWEEPS = 8
"""Sweeps run once an extended refinement's fit first falls below ``PROBE_SUSPECT`` × the floor. Measured on
ptychodus's scan with a guess of overlap 0.07: the first check below 4× (after sweep 40) finds 2.24×, the 8
sweeps after it end at 1.15×, and the 75 after those gain under 4 %."""

PHASE_FIELD_HELP = ("fit the object's slowly varying phase (a smooth field, ramp included; without its plane while "
                    "the probe is refined) to every frame's local ramp after every N sweeps: what the sweeps remove "
                    "slowest (0: never; default: %(default)s)")
PHASE_RAMP_HELP = ("with the probe fixed, also fit the object's global phase ramp alone to a sample of the frames "
                   "after every N sweeps (the phase field's fits include the ramp; 0: never; default: %(default)s)")
MAX_SWEEPS_HELP = ("with the probe refined, go on past the requested sweeps, up to N in all, while the fit stays "
                   f"above {PROBE_SUSPECT:g}x the frames' Poisson noise (a probe guess far off took 48; an N no "
                   "larger than the requested sweeps turns this off; default: %(default)s)")
"""The command lines' help for ``--phase-field-every``, ``--phase-ramp-every`` (``infer`` and ``evaluate``) and
``--refine-max-sweeps`` (also ``infer-many``)."""

PROBE_RULE_NAMES = {"auto": "auto", "on": True, "off": False}
"""The command lines' words for ``RefineSettings.refine_probe`` (``--refine-probe [auto|on|off]``)."""


def probe_rule(name: str) -> Union[bool, str]:
    """``RefineSettings.refine_probe`` for a command line's word: "auto", "on" (True) or "off" (False)."""
    if name not in PROBE_RULE_NAMES:
        raise ValueError(f"refine probe must be one of {', '.join(PROBE_RULE_NAMES)} (got {name!r})")
    return PROBE_RULE_NAMES[name]


@dataclass(frozen=True)
class RefineSettings:
    """How to refine after the network (``Bundle.reconstruct(refine=...)``; ``True`` means these defaults).

    ``sweeps`` over all frames; ``engine`` "builtin" (batched rPIE, torch-free)
    or "ptychi"; ``backend``/``device`` of the builtin engine; ``refine_probe``
    True also updates the probe, False keeps it, "auto" (the default) keeps
    it unless the fit then stays far above the noise floor (module docstring;
    the built-in engine only: elsewhere "auto" keeps it); ``start`` "auto"
    (the default: whichever of the network's phase alone and a flat object
    fits the data best after two sweeps), "network", "network phase" or
    "flat"; ``amplitude_prior`` "tv"
    (the default: the refined amplitude denoised at its own noise level,
    module docstring) or "none"; ``phase_field_every`` sweeps between fits of
    the object's slow phase while the probe is fixed (built-in engine; 0:
    none), ``phase_ramp_every`` the same for the global ramp alone (off);
    ``start_groups`` which network groups ``Bundle.reconstruct`` predicts
    for the start when gridsize > 1: "cover" (the default: each frame in at
    least one group, ``grouping.cover_groups``; the refined object is the
    same to 0.002 phase SSIM and the network's pass ~3× shorter,
    docs/fidelity.md) or "all" (one group per frame, as without refinement);
    ``max_sweeps``: with the probe refined, the sweeps in all that a fit
    still above ``PROBE_SUSPECT`` × the noise floor may run to
    (``_sweep_until_explained``; no more than ``sweeps``: no extension; the
    built-in engine on a whole scan only: a stream's sweeps are its own);
    ``progress(done, sweeps)`` after each sweep (``done`` of ``max_sweeps``
    while a refinement runs past its sweeps).
    """

    sweeps: int = DEFAULT_SWEEPS
    engine: str = "builtin"
    backend: str = "auto"
    device: str = "cpu"
    refine_probe: Union[bool, str] = "auto"
    start: str = "auto"
    amplitude_prior: str = "tv"
    phase_ramp_every: int = 0
    phase_field_every: int = DEFAULT_FIELD_EVERY
    start_groups: str = "cover"
    max_sweeps: int = DEFAULT_MAX_SWEEPS
    progress: Optional[Callable[[int, int], None]] = None

    def __post_init__(self) -> None:
        if isinstance(self.sweeps, bool) or not isinstance(self.sweeps, (int, np.integer)) or self.sweeps < 1:
            raise ValueError(f"refine sweeps must be an integer >= 1 (got {self.sweeps!r}); refine=None turns "
                             "refinement off")
        for name, value, allowed in (("engine", self.engine, ENGINES), ("backend", self.backend, BACKENDS),
                                     ("start", self.start, START_CHOICES), ("device", self.device, ("cpu", "cuda")),
                                     ("amplitude_prior", self.amplitude_prior, PRIORS),
                                     ("start_groups", self.start_groups, GROUPINGS)):
            if value not in allowed:
                raise ValueError(f"refine {name} must be one of {', '.join(allowed)} (got {value!r})")
        for name, count, meaning in (("phase_ramp_every", self.phase_ramp_every, "0: no such fits"),
                                     ("phase_field_every", self.phase_field_every, "0: no such fits"),
                                     ("max_sweeps", self.max_sweeps, "no more than sweeps: no extension")):
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
                raise ValueError(f"{name} must be an integer >= 0 ({meaning}; got {count!r})")
        if not (isinstance(self.refine_probe, (bool, np.bool_)) or self.refine_probe == "auto"):
            raise ValueError(f"refine_probe must be True, False or 'auto' (got {self.refine_probe!r})")

    def phase_fit_periods(self, probe_refined: bool) -> dict[str, int]:
        """Sweeps between fits of each kind of slow phase (with the probe refined no ramp fits: it takes the ramp
        up, and the field's fits leave their plane out)."""
        return {"phase_field": int(self.phase_field_every),
                "phase_ramp": 0 if probe_refined else int(self.phase_ramp_every)}

    @property
    def probe_refined_first(self) -> bool:
        """Whether the first refinement updates the probe (only ``refine_probe=True``; "auto" starts fixed)."""
        return not isinstance(self.refine_probe, str) and bool(self.refine_probe)


RefineRequest = Union[None, bool, int, RefineSettings]


def as_settings(refine_request: RefineRequest) -> Optional[RefineSettings]:
    """None/False/0 → None (off); True → the defaults; an int → that many sweeps; settings as given."""
    if refine_request is None or refine_request is False:
        return None
    if refine_request is True:
        return RefineSettings()
    if isinstance(refine_request, RefineSettings):
        return refine_request
    if isinstance(refine_request, (int, np.integer)):
        return None if int(refine_request) == 0 else RefineSettings(sweeps=int(refine_request))
    raise ValueError(f"refine must be None, True/False, a number of sweeps or a RefineSettings (got "
                     f"{type(refine_request).__name__})")


def measured_amplitude(frames: np.ndarray, counts: Optional[bool]) -> np.ndarray:
    """[n, N, N] far-field amplitudes from the host's frames (a new array): sqrt(counts), or the amplitudes."""
    x = np.array(frames, dtype=np.float32)  # a copy: bad pixels are repaired in it, not in the host's frames
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return np.sqrt(np.maximum(x, 0)) if counts else x


def frames_on_grid(starts: np.ndarray, shape: tuple[int, int], N: int) -> np.ndarray:
    """Frames whose (N+1)² bilinear window lies wholly on the canvas (the others cannot be refined there)."""
    low = np.floor(starts)
    return (low[:, 0] >= 0) & (low[:, 1] >= 0) & (low[:, 0] + N + 1 <= shape[1]) & (low[:, 1] + N + 1 <= shape[0])


def transmission_level(amplitude: np.ndarray, probe: np.ndarray) -> float:
    """The object's RMS transmission the data imply: sqrt(mean frame energy / Σ|P|²), for a probe in data units."""
    energy = float(np.mean(np.sum(np.asarray(amplitude, dtype=np.float64) ** 2, axis=(-2, -1))))
    p_energy = float(np.sum(np.abs(np.asarray(probe, dtype=np.complex128)) ** 2))
    return float(np.sqrt(energy / p_energy)) if p_energy > 0 and energy > 0 else 1.0


def start_candidates(obj: np.ndarray, covered: np.ndarray, level: float = 1.0) -> dict[str, np.ndarray]:
    """The starts a refinement can begin from: the network's object, its phase alone, a flat object.

    ``start="auto"`` compares "network phase" and "flat" (``AUTO_STARTS``); a stream the first two
    (``NETWORK_STARTS``).

    "network phase" is the network's phase at the transmission ``level`` the
    data imply (``transmission_level``), not at the network's own amplitude.
    Pixels the network did not cover start as free space (1) in each.
    """
    network = np.where(covered, obj, np.complex64(1.0)).astype(np.complex64)
    phase_only = np.where(covered, np.float32(level) * np.exp(1j * np.angle(network)), np.complex64(1.0))
    return {"network": network, "network phase": phase_only.astype(np.complex64), "flat": np.ones_like(network)}


def _run_fitting_phase(refiner: Refiner, sweeps: int, amp: np.ndarray, starts: np.ndarray, every: dict[str, int],
                       cancel: Optional[Any], progress: Optional[Callable[[int, int], None]],
                       fits: dict[str, list[dict[str, Any]]], planes: bool = True) -> RefineResult:
    """``refiner.run(sweeps)``, fitting the object's slow phase after every ``every[kind]``-th sweep of its total.

    Kinds: "phase_field" (``phase_field.PhaseField``: the smooth phase, ramp
    included) and "phase_ramp" (``phase_ramp.fit_phase_ramp``: the global
    ramp alone, on a sample of the frames), both with the refiner's probe;
    each fit is applied only when it lowers its misfit, and its record is
    appended to ``fits[kind]``. 0 turns a kind off. ``planes=False`` (the
    probe is being refined) leaves the field's plane to the probe.
    """
    field: Optional[tuple[PhaseField, np.ndarray]] = None  # made at the first fit, with its frames' amplitudes
    done = 0
    result = refiner.run(0) if sweeps == 0 else None
    while done < sweeps:
        chunk = sweeps - done
        for period in every.values():
            if period:
                chunk = min(chunk, period - refiner.sweeps_run % period)
        base = done
        result = refiner.run(chunk, cancel=cancel, progress=None if progress is None else (
            lambda d, _t, base=base: progress(base + d, sweeps)))
        done += chunk
        for kind, period in every.items():
            if not period or refiner.sweeps_run % period:
                continue
            obj = result.reconstruction.object
            if kind == "phase_field":
                if field is None:
                    made = PhaseField(obj.shape, result.probe, starts)
                    field = (made, amp[made.frames])
                factor, fit = field[0].fit(obj, field[1], result.probe, planes=planes)
            else:
                fit = fit_phase_ramp(obj, amp, result.probe, starts)
                factor = ramp_factor(obj.shape, fit.rad_per_px) if fit.applied else None
            fits[kind].append(fit.record(refiner.sweeps_run))
            if factor is not None:
                refiner.multiply_object(factor)
                # the result carries the fit (its record kept: misfit per sweep)
                result = replace(result, reconstruction=replace(result.reconstruction, object=obj * factor))
    return result


def _refine_best_start(recon: Reconstruction, candidates: dict[str, np.ndarray], amp: np.ndarray, pos: np.ndarray,
                       starts: np.ndarray, probe: np.ndarray, settings: RefineSettings, cancel: Optional[Any],
                       fits: dict[str, list[dict[str, Any]]]) -> tuple[Refiner, RefineResult, str, dict[str, float]]:
    """Run ``TRIAL_SWEEPS`` from each candidate start, keep the one that then fits the data best, finish it.

    A start is judged by where a few sweeps take it, not by its own misfit:
    the network's object under a foreign probe can fit worse than a flat one
    (its amplitude is off) and still lead to a better object (its phase is
    right), which is what the measurements showed (docs/fidelity.md).
    """
    trial = min(TRIAL_SWEEPS, settings.sweeps) if len(candidates) > 1 else 0
    refiners = {name: Refiner(replace(recon, object=obj), probe, backend=settings.backend, device=settings.device,
                              refine_probe=settings.probe_refined_first).add_frames(amp, pos)
                for name, obj in candidates.items()}
    progress = settings.progress
    for k in range(trial):  # side by side, so progress counts trial sweeps as the sweeps they are
        for refiner in refiners.values():
            refiner.run(1, cancel=cancel)
        if progress is not None:
            progress(k + 1, settings.sweeps)
    misfit = {name: (r.misfit[-1] if r.misfit else float("nan")) for name, r in refiners.items()}
    choice = _choose_start(misfit) if trial else next(iter(refiners))
    after_trial = None if progress is None else (lambda d, _t: progress(d + trial, settings.sweeps))
    result = _run_fitting_phase(refiners[choice], settings.sweeps - trial, amp, starts,
                                settings.phase_fit_periods(settings.probe_refined_first), cancel, after_trial,
                                fits, planes=not settings.probe_refined_first)
    return refiners[choice], result, choice, misfit


def _choose_start(misfit: dict[str, float]) -> str:
    """The network start that fits best, or "flat" where it fits clearly better still (``FLAT_MARGIN``)."""
    network = {name: value for name, value in misfit.items() if name != "flat"}
    if not network:
        return "flat"
    best = min(network, key=network.get)
    return "flat" if "flat" in misfit and misfit["flat"] < FLAT_MARGIN * network[best] else best


def _misfit(obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, starts: np.ndarray) -> float:
    step = max(1, amplitude.shape[0] // MISFIT_SAMPLE)
    return far_field_misfit(obj, amplitude[::step], probe, starts[::step])


def _fit_over_floor(result: RefineResult, floor: Optional[float]) -> Optional[float]:
    """The last sweep's misfit over the noise floor (None when the floor is unknown or no misfit was recorded)."""
    misfit = result.record.get("misfit") or []
    return float(misfit[-1]) / floor if misfit and floor else None


def _sweep_until_explained(refiner: Refiner, result: RefineResult, amp: np.ndarray, starts: np.ndarray,
                           settings: RefineSettings, floor: Optional[float], cancel: Optional[Any],
                           fits: dict[str, list[dict[str, Any]]]) -> tuple[RefineResult, int, int]:
    """Run a refinement with the probe refined past its sweeps while its fit stays above ``PROBE_SUSPECT`` × floor.

    A probe guess far off (ptychodus's scan with a defocused guess, overlap
    0.07 with its probe) holds the fit near 6× the floor for some 20 sweeps
    and then escapes within a few (docs/fidelity.md, "Sweeps until the data
    are explained"). The rules that stop on a stalled misfit, worked through on
    that trajectory, stop before the escape, so the rule is the fit alone: blocks of ``EXTEND_BLOCK`` sweeps
    until it is below ``PROBE_SUSPECT`` × floor, then ``POLISH_SWEEPS`` more,
    never past ``settings.max_sweeps`` in all. A fit already below it adds
    nothing. The caller runs it only with the probe refined (a fixed probe is
    not corrected by more sweeps; the field fits here leave their plane to the
    probe). Where the model, not the probe, limits the fit (a high-dose scan:
    300–390× the floor, wandering), a later block can end worse than an
    earlier one, so the best-fitting result seen is returned, as the probe
    retry keeps the better of its two. Returns it, the sweeps it has past the
    requested ones, and the sweeps run past them.
    """
    done = settings.sweeps
    fit = _fit_over_floor(result, floor)
    best, best_fit, best_done = result, fit, done
    polished = False
    while done < settings.max_sweeps and fit is not None:
        if fit > PROBE_SUSPECT:
            block = EXTEND_BLOCK
        elif done > settings.sweeps and not polished:
            block, polished = POLISH_SWEEPS, True
        else:
            break
        block = min(block, settings.max_sweeps - done)
        progress = None if settings.progress is None else (
            lambda d, _t, base=done: settings.progress(base + d, settings.max_sweeps))
        result = _run_fitting_phase(refiner, block, amp, starts, settings.phase_fit_periods(True), cancel, progress,
                                    fits, planes=False)
        done += block
        fit = _fit_over_floor(result, floor)
        if fit is not None and fit < best_fit:  # best_fit is a number: the loop runs only from a known fit
            best, best_fit, best_done = result, fit, done
    return best, best_done - settings.sweeps, done - settings.sweeps


def _warn_if_poor_fit(fit: Optional[float], probe_updated: bool) -> None:
    """Warn, with the fix, when the kept result fits the frames far above their noise floor."""
    if fit is None or fit <= PROBE_SUSPECT:
        return
    fix = ("a probe guess far off may need more sweeps than the extension's limit (--refine-max-sweeps, "
           "RefineSettings.max_sweeps, the ptychodus host's RefineMaxSweeps; a defocused guess of overlap 0.07 "
           "took 48), or positions, background or bad pixels are off" if probe_updated else
           "the probe guess is probably wrong: refine it (--refine-probe on, RefineSettings(refine_probe=True))")
    log.warning("the refined object fits the frames %.1f× worse than their Poisson noise explains: %s; do not "
                "trust it as it is", fit, fix)


def refine_scan(recon: Reconstruction, amplitude: np.ndarray, positions: np.ndarray, probe: np.ndarray,
                settings: RefineSettings, *, probe_source: str, fill: complex = 1.0,
                cancel: Optional[Any] = None) -> Reconstruction:
    """Refine the network's ``recon`` against the measured ``amplitude`` [n, N, N] at ``positions`` [n, 2].

    ``positions`` (x, y) are on ``recon``'s grid; ``probe`` [N, N] at any
    absolute scale (``normalise_probe`` brings it to the amplitudes' units);
    ``probe_source`` says whose probe it is, for the record. Frames whose
    window leaves a fixed host grid are left out (counted). Returns the
    refined object on the same grid with ``probe`` (the one used, refined
    or not) and ``refinement`` (the engine's record plus the start chosen,
    the probe's source and scale, the frames used) set; pixels the stitch
    did not cover are ``fill`` again. The amplitude prior of the settings is
    applied last, to the refined pixels, and its record kept under
    ``refinement["amplitude_prior"]``, with the misfit after it. ``cancel``
    is checked between batches (``refinement.RefinementCancelled``).
    """
    amp = np.asarray(amplitude, dtype=np.float32)
    N = amp.shape[-1]
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if pos.shape[0] != amp.shape[0]:
        raise ValueError(f"refinement needs one position per frame ({amp.shape[0]} frames, {pos.shape[0]} positions)")
    P, scale_note = normalise_probe(np.asarray(probe), amp, 1.0)
    starts = frame_origin(pos, N) - np.array([float(recon.x_coords[0]), float(recon.y_coords[0])])
    keep = frames_on_grid(starts, recon.object.shape, N)
    if not keep.any():
        raise ValueError("no frame lies wholly on the object grid, so none can be refined; reconstruct on a canvas "
                         "sized to the scan (no grid shape), or refine=None")
    amp, pos, starts = amp[keep], pos[keep], starts[keep]
    candidates = start_candidates(recon.object, recon.covered, transmission_level(amp, P))
    # pty-chi cannot be stopped for trial sweeps, and the raw misfit does not tell when a flat start would do better
    auto = AUTO_STARTS if settings.engine == "builtin" else NETWORK_STARTS
    names = auto if settings.start == "auto" else (settings.start,)
    candidates = {name: candidates[name] for name in names}
    t0 = time.perf_counter()
    refiner: Optional[Refiner] = None
    phase_fits: dict[str, list[dict[str, Any]]] = {"phase_field": [], "phase_ramp": []}
    if settings.engine == "builtin":
        refiner, result, choice, misfit = _refine_best_start(recon, candidates, amp, pos, starts, P, settings,
                                                             cancel, phase_fits)
    else:  # another engine cannot be stopped and resumed here: the starts are compared as they are
        misfit = {name: _misfit(obj, amp, P, starts) for name, obj in candidates.items()}
        choice = min(misfit, key=misfit.get)
        result = refine(replace(recon, object=candidates[choice]), amp, pos, P, sweeps=settings.sweeps,
                        engine=settings.engine, backend=settings.backend, device=settings.device,
                        refine_probe=settings.probe_refined_first, progress=settings.progress, cancel=cancel)
    floor = poisson_floor(amp)
    fit = _fit_over_floor(result, floor)
    probe_check: dict[str, Any] = {"noise_floor": floor, "probe_rule": settings.refine_probe,
                                   "probe_suspect_above": PROBE_SUSPECT}
    if settings.refine_probe == "auto" and refiner is not None and fit is not None and fit > PROBE_SUSPECT:
        log.warning("refinement with the probe guess (%s) fixed ends at %.1f× the Poisson noise floor of the "
                    "frames: the guess does not explain the data (wrong focus or optics?); refining again with "
                    "the probe refined", probe_source, fit)
        retry = Refiner(replace(recon, object=candidates[choice]), P, backend=settings.backend,
                        device=settings.device, refine_probe=True).add_frames(amp, pos)
        retry_fits: dict[str, list[dict[str, Any]]] = {"phase_field": [], "phase_ramp": []}
        second = _run_fitting_phase(retry, settings.sweeps, amp, starts, settings.phase_fit_periods(True), cancel,
                                    settings.progress, retry_fits, planes=False)
        second_fit = _fit_over_floor(second, floor)
        probe_check.update(fixed_misfit_over_floor=fit, refined_probe_misfit_over_floor=second_fit)
        if second_fit is not None and second_fit < fit:  # the better fit is kept: a free probe can also run off
            refiner, result, fit = retry, second, second_fit
            phase_fits = retry_fits  # the result kept ran these
    extended = extension_run = 0
    if refiner is not None and result.record.get("probe_updated"):
        result, extended, extension_run = _sweep_until_explained(refiner, result, amp, starts, settings, floor,
                                                                 cancel, phase_fits)
        fit = _fit_over_floor(result, floor)
    probe_check["misfit_over_floor"] = fit  # of the result kept
    _warn_if_poor_fit(fit, bool(result.record.get("probe_updated")))
    obj, prior = apply_amplitude_prior(result.reconstruction.object, well_lit(recon.weight), recon.covered,
                                       settings.amplitude_prior)
    if prior.get("applied"):  # the prior must stay within the data's noise: the record shows what it cost
        before, after = (_misfit(o, amp, result.probe, starts) for o in (result.reconstruction.object, obj))
        prior["misfit_ratio"] = after / before if before > 0 else None
        prior["misfit_over_floor"] = after / floor if floor else None
    wall_s = time.perf_counter() - t0
    record = {k: v for k, v in result.record.items() if k != "misfit"}
    free_probe = bool(record.get("probe_updated"))  # the kept result's: no ramp fits, the field's without planes
    builtin = settings.engine == "builtin"
    record.update(probe_check)
    record.update({
        "start": choice, "start_rule": settings.start, "start_misfit": misfit, "wall_s": wall_s,
        "sweeps": settings.sweeps + extended, "sweeps_requested": settings.sweeps,
        "sweeps_extended": extended, "extension_sweeps_run": extension_run,
        "max_sweeps": settings.max_sweeps if builtin else None,  # the extension is the built-in engine's
        "misfit_per_sweep": [float(v) for v in (refiner.misfit if refiner is not None
                                                else result.record.get("misfit", []))],
        "probe_source": probe_source + (", refined" if record.get("probe_updated") else ""),
        "probe_scale": scale_note, "frames_refined": int(keep.sum()), "frames_outside_grid": int((~keep).sum()),
        "amplitude_prior": prior,
        # what the kept result ran: with a free probe no ramp fits and the field's without planes; with another
        # engine neither
        "phase_ramp_every": settings.phase_ramp_every if builtin and not free_probe else 0,
        "phase_ramp_fits": phase_fits["phase_ramp"],
        "phase_field_every": settings.phase_field_every if builtin else 0,
        "phase_field_planes": not free_probe,
        "phase_field_spacing_px": PHASE_FIELD_SPACING,
        "phase_field_fits": phase_fits["phase_field"],
    })
    refined = np.where(recon.covered, obj, np.complex64(fill)).astype(np.complex64)
    return replace(result.reconstruction, object=refined, probe=result.probe, refinement=record)
