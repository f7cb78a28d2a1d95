"""Where a refinement starts: the network's phase or a flat object, tried side by side, and the coarse level.

``start="auto"`` runs ``TRIAL_SWEEPS`` from each candidate start and
finishes whichever then fits the measured patterns best (flat only when
clearly better, ``FLAT_MARGIN``): a start is judged by where a few sweeps
take it, not by its own misfit (``scan_refinement``'s docstring says why).

The trial runs at full resolution. Then ``coarse_sweeps`` of the requested
sweeps run at half resolution (``refinement.coarse_level``): the central
band of every frame, on a canvas of half the pixels, where a sweep costs
about a third and finds the slowly varying phase as well; the chosen start's
coarse correction is carried back to the full grid for the sweeps left, and
so, where the probe is refined, is the coarse probe's: into the probe's band
inside the crop (``CoarseScan.lift_probe``; the band outside it is left to the
full sweeps). The coarse level is skipped where the frames are too small for
it (``coarse_level.usable``); streams and pty-chi do not come here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from ..reconstruction.probe_scale import frame_energy
from ..reconstruction.stitching import Reconstruction
from ..refinement import RefinementCancelled, Refiner, RefineResult, coarse_level
from ..refinement.coarse_level import CoarseScan
from ..refinement.phase_field import PhaseField
from ..refinement.phase_ramp import fit_phase_ramp, ramp_factor
from .refine_settings import RefineSettings

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
TRIAL_SWEEPS = 2
"""Sweeps run from every candidate start before the best is kept (they count towards the requested sweeps)."""
NO_COARSE_LEVEL = {"coarse_sweeps": 0, "coarse_factor": None}
"""The coarse level's record where none ran (copy it before adding to it)."""


class StartRun(NamedTuple):
    """What ``refine_best_start`` ran: the full-resolution refiner and its result, the start chosen, the trial's
    misfits, the coarse level's record, and the chosen start's full-resolution misfits before the coarse level (the
    refiner's own ``misfit`` holds those after it)."""

    refiner: Refiner
    result: RefineResult
    choice: str
    misfit: dict[str, float]
    coarse: dict[str, Any]
    misfit_before: list[float]


def transmission_level(amplitude: np.ndarray, probe: np.ndarray) -> float:
    """The object's RMS transmission the data imply: sqrt(mean frame energy / Σ|P|²), for a probe in data units."""
    energy = float(np.mean(frame_energy(amplitude)))
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


def run_fitting_phase(refiner: Refiner, sweeps: int, amp: np.ndarray, starts: np.ndarray, every: dict[str, int],
                       cancel: Optional[Any], progress: Optional[Callable[[int, int], None]],
                       fits: dict[str, list[dict[str, Any]]], planes: bool = True,
                       sweeps_before: int = 0) -> RefineResult:
    """``refiner.run(sweeps)``, fitting the object's slow phase after every ``every[kind]``-th sweep of its total.

    Kinds: "phase_field" (``phase_field.PhaseField``: the smooth phase, ramp
    included) and "phase_ramp" (``phase_ramp.fit_phase_ramp``: the global
    ramp alone, on a sample of the frames), both with the refiner's probe;
    each fit is applied only when it lowers its misfit, and its record is
    appended to ``fits[kind]``. 0 turns a kind off. ``planes=False`` (the
    probe is being refined) leaves the field's plane to the probe.
    ``sweeps_before``: sweeps of the same refinement that ran on another
    ``Refiner`` (the trial's, the coarse level's): the periods and each
    record's ``after_sweep`` count the whole refinement's sweeps.
    """
    field: Optional[tuple[PhaseField, np.ndarray]] = None  # made at the first fit, with its frames' amplitudes
    done = 0
    result = refiner.run(0) if sweeps == 0 else None
    while done < sweeps:
        chunk = sweeps - done
        for period in every.values():
            if period:
                chunk = min(chunk, period - (sweeps_before + refiner.sweeps_run) % period)
        base = done
        result = refiner.run(chunk, cancel=cancel, progress=None if progress is None else (
            lambda d, _t, base=base: progress(base + d, sweeps)))
        done += chunk
        for kind, period in every.items():
            if not period or (sweeps_before + refiner.sweeps_run) % period:
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
            fits[kind].append(fit.record(sweeps_before + refiner.sweeps_run))
            if factor is not None:
                refiner.multiply_object(factor)
                # the result carries the fit (its record kept: misfit per sweep)
                result = replace(result, reconstruction=replace(result.reconstruction, object=obj * factor))
    return result


def coarse_sweeps(settings: RefineSettings, N: int) -> int:
    """How many of the settings' sweeps run at the coarse level, none where it does not apply.

    After the trial's sweeps, at least as many sweeps at full resolution
    follow the coarse level as run on it (the fine detail is theirs). None
    where frames of N pixels have no coarse level.
    """
    if not coarse_level.usable(N):
        return 0
    return max(0, min(int(settings.coarse_sweeps), (settings.sweeps - TRIAL_SWEEPS) // 2))


def refine_best_start(recon: Reconstruction, candidates: dict[str, np.ndarray], amp: np.ndarray, pos: np.ndarray,
                      starts: np.ndarray, probe: np.ndarray, settings: RefineSettings, cancel: Optional[Any],
                      fits: dict[str, list[dict[str, Any]]]) -> StartRun:
    """Run ``TRIAL_SWEEPS`` from each candidate start, keep the one that then fits the data best, finish it.

    A start is judged by where a few sweeps take it, not by its own misfit:
    the network's object under a foreign probe can fit worse than a flat one
    (its amplitude is off) and still lead to a better object (its phase is
    right), which is what the measurements showed (docs/fidelity.md). The
    trial runs at full resolution, because what tells a network's start under
    a foreign probe from a good one is its fine detail, which the coarse band
    does not see (trial misfits there: flat over network 1.010 on pty-chi's
    scan, where flat is right, against 1.009 on the project's scan with a
    defocused guess, where the network's is). Then, with a coarse level
    (``coarse_sweeps``), every start, a single one too, goes on there
    before its correction is carried back to the full grid for the sweeps
    left (``StartRun`` says what is returned).
    """
    options: dict[str, Any] = {"backend": settings.backend, "device": settings.device,
                               "refine_probe": settings.probe_refined_first}

    first: list[Refiner] = []  # the first refiner made: the others share its frames (Refiner.add_frames_of)

    def full(obj: np.ndarray, guess: np.ndarray = probe) -> Refiner:
        refiner = Refiner(replace(recon, object=obj), guess, **options)
        if first:
            return refiner.add_frames_of(first[0])
        first.append(refiner.add_frames(amp, pos))
        return refiner

    coarse = coarse_sweeps(settings, amp.shape[-1])
    trial = min(TRIAL_SWEEPS, settings.sweeps) if len(candidates) > 1 or coarse else 0
    refiners = {name: full(obj) for name, obj in candidates.items()}
    progress = settings.progress
    for k in range(trial):  # side by side, so progress counts trial sweeps as the sweeps they are
        for refiner in refiners.values():
            refiner.run(1, cancel=cancel)
        if progress is not None:
            progress(k + 1, settings.sweeps)
    misfit = {name: (r.misfit[-1] if r.misfit else float("nan")) for name, r in refiners.items()}
    choice = choose_start(misfit) if len(refiners) > 1 else next(iter(refiners))
    refiner, done = refiners[choice], trial
    record: dict[str, Any] = {"coarse_sweeps": coarse, "coarse_factor": coarse_level.FACTOR} if coarse else dict(
        NO_COARSE_LEVEL)
    before: list[float] = []
    if coarse:
        t0 = time.perf_counter()
        before = [float(v) for v in refiner.misfit]
        now = refiner.run(0)
        here, probe_now = now.reconstruction.object, now.probe
        refiners.clear()  # their canvases are not needed past here (the frames stay, in first[0], for the full level)
        del refiner
        level = CoarseScan(recon, amp, starts, probe_now)
        lower = level.refiner(here, **options)
        coarse_fits: dict[str, list[dict[str, Any]]] = {"phase_field": [], "phase_ramp": []}  # in coarse pixels
        try:
            stage = run_fitting_phase(lower, coarse, level.amplitude, level.starts,
                                      settings.phase_fit_periods(settings.probe_refined_first), cancel,
                                      None if progress is None else (
                                          lambda d, _t: progress(d + trial, settings.sweeps)),
                                      coarse_fits, planes=not settings.probe_refined_first, sweeps_before=trial)
        except RefinementCancelled as exc:  # its partial result is on the coarse grid: hand it on on the full one
            part = exc.partial
            if part is not None:
                lifted = level.lift(here, lower.start.object, part.reconstruction.object)
                part = RefineResult(replace(recon, object=lifted, weight=recon.weight.copy()), probe,
                                    {**part.record, "coarse_level": True})
            raise RefinementCancelled(str(exc), part) from None
        lifted_probe = (level.lift_probe(probe_now, level.probe, stage.probe) if settings.probe_refined_first
                        else probe_now)
        refiner = full(level.lift(here, lower.start.object, stage.reconstruction.object), lifted_probe)
        done += coarse
        record.update(coarse_misfit_per_sweep=[float(v) for v in lower.misfit],  # in the coarse frames' units
                      coarse_wall_s=time.perf_counter() - t0,
                      coarse_phase_field_fits=coarse_fits["phase_field"],
                      coarse_phase_ramp_fits=coarse_fits["phase_ramp"])
    after = None if progress is None else (lambda d, _t: progress(d + done, settings.sweeps))
    result = run_fitting_phase(refiner, settings.sweeps - done, amp, starts,
                               settings.phase_fit_periods(settings.probe_refined_first), cancel, after,
                               fits, planes=not settings.probe_refined_first,
                               sweeps_before=done if coarse else 0)
    return StartRun(refiner, result, choice, misfit, record, before)


def choose_start(misfit: dict[str, float]) -> str:
    """The network start that fits best, or "flat" where it fits clearly better still (``FLAT_MARGIN``)."""
    network = {name: value for name, value in misfit.items() if name != "flat"}
    if not network:
        return "flat"
    best = min(network, key=network.get)
    return "flat" if "flat" in misfit and misfit["flat"] < FLAT_MARGIN * network[best] else best


