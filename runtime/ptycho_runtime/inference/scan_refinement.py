"""Network, then refinement against the scan: the step that makes the fast path the good path.

The network maps each pattern to its patch in one pass; it recovers local
detail but not the phase of regions larger than the probe, and under a probe
it was not trained through its output can be worse than nothing
(docs/independent-scans.md). The scan itself determines both through its
overlap, so ``Bundle.reconstruct(refine=...)``, the CLI, the streaming
reconstructor and the hosts all finish with sweeps of the runtime's batched
refinement (``refinement.refine``) with the scan's own probe.

These decisions are made here, once for every caller:

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
- **the coarse level**: after the start's trial sweeps, ``coarse_sweeps`` (4 of
  the default 16) run on each frame's central band at half resolution, where
  a sweep costs about a third (``refine_start``, ``refinement.coarse_level``):
  the same quality as 16 full sweeps in 16 % less time (docs/fidelity.md);
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
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from ..reconstruction.geometry import frame_origin
from ..reconstruction.probe_scale import normalise_probe
from ..reconstruction.stitching import Reconstruction
from ..refinement import Refiner, RefineResult, refine
from ..refinement.exit_waves import frame_misfits
from ..refinement.noise_floor import poisson_floor
from ..refinement.object_prior import apply_amplitude_prior, well_lit
from ..refinement.phase_field import SPACING as PHASE_FIELD_SPACING

# the settings and the starts live in their own modules; their names are re-exported here, where callers look
from .refine_settings import (  # noqa: F401
    COARSE_SWEEPS_HELP,
    DEFAULT_COARSE_SWEEPS,
    DEFAULT_MAX_SWEEPS,
    MAX_SWEEPS_HELP,
    NETWORK_STARTS,
    PHASE_FIELD_HELP,
    PHASE_RAMP_HELP,
    PROBE_RULE_NAMES,
    PROBE_SUSPECT,
    START_CHOICES,
    RefineRequest,
    RefineSettings,
    as_settings,
    probe_rule,
)
from .refine_start import (  # noqa: F401
    AUTO_STARTS,
    FLAT_MARGIN,
    NO_COARSE_LEVEL,
    TRIAL_SWEEPS,
    choose_start,
    refine_best_start,
    run_fitting_phase,
    start_candidates,
    transmission_level,
)

log = logging.getLogger(__name__)

MISFIT_SAMPLE = 256
"""Frames whose far-field misfit decides the start for engines that cannot be resumed (pty-chi), ~0.1 s."""
EXTEND_BLOCK = 4
"""Sweeps between checks of the fit while a refinement runs past its requested sweeps."""
POLISH_SWEEPS = 8
"""Sweeps run once an extended refinement's fit first falls below ``PROBE_SUSPECT`` × the floor. Measured on
ptychodus's scan with a guess of overlap 0.07: the first check below 4× (after sweep 40) finds 2.24×, the 8
sweeps after it end at 1.15×, and the 75 after those gain under 4 %."""



def measured_amplitude(frames: np.ndarray, counts: Optional[bool]) -> np.ndarray:
    """[n, N, N] far-field amplitudes from the host's frames (a new array): sqrt(counts), or the amplitudes."""
    x = np.array(frames, dtype=np.float32)  # a copy: bad pixels are repaired in it, not in the host's frames
    x = x.reshape(-1, x.shape[-2], x.shape[-1])
    return np.sqrt(np.maximum(x, 0)) if counts else x


def frames_on_grid(starts: np.ndarray, shape: tuple[int, int], N: int) -> np.ndarray:
    """Frames whose (N+1)² bilinear window lies wholly on the canvas (the others cannot be refined there)."""
    low = np.floor(starts)
    return (low[:, 0] >= 0) & (low[:, 1] >= 0) & (low[:, 0] + N + 1 <= shape[1]) & (low[:, 1] + N + 1 <= shape[0])


def _misfit(obj: np.ndarray, amplitude: np.ndarray, probe: np.ndarray, starts: np.ndarray) -> float:
    """``far_field_misfit`` (mean over the pixels) on every k-th frame, about ``MISFIT_SAMPLE`` of them, batched."""
    frames = np.arange(0, amplitude.shape[0], max(1, amplitude.shape[0] // MISFIT_SAMPLE))
    N = amplitude.shape[-1]
    return float(frame_misfits(obj, amplitude, probe, starts, frames).sum()) / (len(frames) * N * N)


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
        result = run_fitting_phase(refiner, block, amp, starts, settings.phase_fit_periods(True), cancel, progress,
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
        run = refine_best_start(recon, candidates, amp, pos, starts, P, settings, cancel, phase_fits)
        refiner, result, choice, misfit, coarse, misfit_before = run
    else:  # another engine cannot be stopped and resumed here: the starts are compared as they are
        misfit = {name: _misfit(obj, amp, P, starts) for name, obj in candidates.items()}
        coarse, misfit_before = dict(NO_COARSE_LEVEL), []
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
        retry_fits: dict[str, list[dict[str, Any]]] = {"phase_field": [], "phase_ramp": []}
        again = refine_best_start(recon, {choice: candidates[choice]}, amp, pos, starts, P,
                                  replace(settings, refine_probe=True), cancel, retry_fits)
        retry, second = again.refiner, again.result
        second_fit = _fit_over_floor(second, floor)
        probe_check.update(fixed_misfit_over_floor=fit, refined_probe_misfit_over_floor=second_fit)
        if second_fit is not None and second_fit < fit:  # the better fit is kept: a free probe can also run off
            refiner, result, fit = retry, second, second_fit
            phase_fits, coarse, misfit_before = retry_fits, again.coarse, again.misfit_before  # what it ran
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
        # the full-resolution sweeps' misfits: the trial's, then those after the coarse level (recorded apart)
        "misfit_per_sweep": [float(v) for v in (misfit_before + refiner.misfit if refiner is not None
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
    record.update(coarse)  # how many of the sweeps ran at the coarse level (after the trial's), at what factor
    refined = np.where(recon.covered, obj, np.complex64(fill)).astype(np.complex64)
    return replace(result.reconstruction, object=refined, probe=result.probe, refinement=record)

