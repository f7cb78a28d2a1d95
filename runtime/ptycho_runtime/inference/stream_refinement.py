"""Refinement of a live stream's canvas between micro-batches, so the picture improves while the scan runs.

The network's canvas is what a stream can show at once; refinement against
the frames makes it good (``scan_refinement``). A stream cannot wait for the
last frame to refine, so ``StreamRefinement`` keeps one ``Refiner`` for the
whole scan: each micro-batch's frames are added as they reach the canvas,
with the newest network canvas as the start of every pixel no refined frame
has read yet (``Refiner.add_frames(..., start=...)``), and sweeps over all
the frames seen so far run between micro-batches and while the stream is
idle. ``sweeps`` of the settings counts the sweeps over *all* frames: after
the last frame arrives, the stream runs until that many sweeps have run
since (``close()`` finishes them).

Decisions made once, on the first micro-batch refined, and kept for the
scan: the probe's units (``normalise_probe`` on those frames) and the start
("auto": the network's object or its phase alone, judged by the candidates'
own misfit on those frames, since a live stream has no time for the trial
sweeps ``scan_refinement.refine_scan`` runs; a flat start is not a candidate
here: before any sweep the network's phase fits better than flat on every
scan measured, even on those where after two sweeps it no longer does, so
the raw misfit cannot tell when to drop it; docs/fidelity.md).

The fit is judged against the frames' Poisson noise floor as in
``scan_refinement`` (``refinement.noise_floor``, averaged over the frames as
they come): each picture's record holds ``misfit_over_floor``, and a stream
whose sweeps are done far above the floor (``PROBE_SUSPECT``) warns once, with
the fix. A stream cannot rerun with the probe refined, as a whole scan does.

The object's slow phase is fitted every ``phase_field_every`` sweeps (of
the stream's total) over all frames seen so far, as ``scan_refinement``
does (``refinement.phase_field``; without its plane while the probe is
refined); the field extends smoothly past the frames seen, and pixels no frame has read yet
still take the next network canvas.

The amplitude prior of the settings (``refinement.object_prior``) is applied
to a picture only once every frame seen has had its sweeps (``owed`` is 0),
and never fed back into the sweeps: it removes the grain of a converged
object, and would only slow the fit of one still converging.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np

from ..reconstruction.geometry import frame_origin
from ..reconstruction.probe_scale import normalise_probe
from ..reconstruction.stitching import Reconstruction
from ..refinement import RefinementCancelled, Refiner, far_field_misfit
from ..refinement.batching import window_corners
from ..refinement.noise_floor import poisson_floor
from ..refinement.object_prior import apply_amplitude_prior, well_lit
from ..refinement.phase_field import PhaseField
from .scan_refinement import (
    MISFIT_SAMPLE,
    NETWORK_STARTS,
    PROBE_SUSPECT,
    RefineSettings,
    frames_on_grid,
    start_candidates,
    transmission_level,
)

log = logging.getLogger(__name__)


class StreamRefinement:
    """One ``Refiner`` over a stream's frames; thread-safe (the stream's worker and its host both call it).

    ``probe`` [N, N] at any absolute scale (the host's, or the bundle's
    training probe; ``probe_source`` says which, for the record); ``fill``
    the value of pixels no patch covered; ``cancel`` (an Event-like object or
    a callable) stops refinement for good at its next batch: the stream goes
    on with the network alone for new pixels, and the record says
    ``cancelled``.
    """

    def __init__(self, settings: RefineSettings, probe: np.ndarray, N: int, *, probe_source: str,
                 fill: complex = 0.0, cancel: Optional[Any] = None) -> None:
        if settings.engine != "builtin":
            raise ValueError(f"a stream refines with the built-in engine only (got engine={settings.engine!r}): "
                             "refine the final object with Bundle.reconstruct(refine=RefineSettings(engine="
                             "'ptychi')) instead")
        P = np.asarray(probe)
        if P.shape != (N, N):
            raise ValueError(f"the refinement probe must be [{N}, {N}] like the frames (got {list(P.shape)})")
        if not np.all(np.isfinite(P)) or not np.any(P):  # checked now: in the worker thread it would end the stream
            raise ValueError("the refinement probe must be finite and not all zero: pass the scan's probe guess")
        self.settings, self.N, self.fill, self.cancel = settings, int(N), fill, cancel
        self.probe_source = probe_source
        self._probe_in = P
        self._refiner: Optional[Refiner] = None
        self._lock = threading.Lock()       # one add or sweep at a time
        self._view_lock = threading.Lock()  # guards the published view, so a snapshot never waits for a sweep
        self._view: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]] = None
        self._final: Optional[tuple[Any, np.ndarray, dict[str, Any]]] = None  # (view, its object with the prior)
        self._mask: Optional[np.ndarray] = None  # pixels a refined frame's window reads
        self._choice = ""
        self._start_misfit: dict[str, float] = {}
        self._scale_note = ""
        self.sweeps_since_add = 0
        self.frames_outside_grid = 0
        self.cancelled = False
        self._wall_s = 0.0  # the sweeps' time, summed over the stream
        self._seen: set[tuple[float, float]] = set()  # positions already added
        self._floor_sum, self._floor_frames = 0.0, 0  # Σ floor·frames over the micro-batches whose floor is known
        self._floor_unknown = False  # some frames are not counts: no floor is claimed
        self._warned = False
        self.frames_repeated = 0
        self._amplitudes: list[np.ndarray] = []  # every frame refined, for the phase-field fits
        self._starts: list[np.ndarray] = []
        self._field: Optional[PhaseField] = None  # made for the frames held when a fit is next due
        self._field_amplitude: Optional[np.ndarray] = None  # the measured amplitudes of its frames
        self._field_fits: list[dict[str, Any]] = []

    @property
    def owed(self) -> int:
        """Sweeps still to run for every frame seen so far to have had ``settings.sweeps`` of them."""
        if self._refiner is None or self.cancelled:
            return 0
        return max(0, self.settings.sweeps - self.sweeps_since_add)

    @property
    def n_frames(self) -> int:
        return 0 if self._refiner is None else self._refiner.n_frames

    def add(self, canvas: Reconstruction, amplitude: np.ndarray, positions: np.ndarray) -> None:
        """Frames just stitched: measured ``amplitude`` [k, N, N], ``positions`` [k, 2] (x, y) on ``canvas``'s frame.

        ``canvas`` is the network's canvas with these frames in it; frames
        whose window leaves a fixed grid are left out (counted), and so is a
        frame at a position already added: pre-grouped input (gridsize > 1)
        repeats each frame in several groups, and refining it once per group
        would weigh it several times.
        """
        with self._lock:
            if self.cancelled:
                return
            pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
            amp = np.asarray(amplitude, dtype=np.float32).reshape(-1, self.N, self.N)
            starts = frame_origin(pos, self.N) - np.array([float(canvas.x_coords[0]), float(canvas.y_coords[0])])
            keep = frames_on_grid(starts, canvas.object.shape, self.N)
            self.frames_outside_grid += int((~keep).sum())
            for j in np.flatnonzero(keep):
                key = (round(float(pos[j, 0]), 6), round(float(pos[j, 1]), 6))
                if key in self._seen:
                    keep[j] = False
                    self.frames_repeated += 1
                else:
                    self._seen.add(key)
            if not keep.any():
                return
            amp, pos, starts = amp[keep], pos[keep], starts[keep]
            floor = poisson_floor(amp)
            if floor is None:
                self._floor_unknown = True
            else:
                self._floor_sum += floor * amp.shape[0]
                self._floor_frames += amp.shape[0]
            if self._refiner is None:
                self._begin(canvas, amp, pos, starts)
            else:
                self._refiner.add_frames(amp, pos, start=self._as_start(canvas))
            self._amplitudes.append(amp)
            self._starts.append(starts)
            self._field, self._field_amplitude = None, None  # made again for the frames now held
            rows, cols, _ = window_corners(starts)
            side = self.N + 1
            for r, c in zip(rows, cols, strict=True):
                self._mask[r:r + side, c:c + side] = True
            self.sweeps_since_add = 0

    def _begin(self, canvas: Reconstruction, amp: np.ndarray, pos: np.ndarray, starts: np.ndarray) -> None:
        s = self.settings
        self._P, self._scale_note = normalise_probe(self._probe_in, amp, 1.0)
        self._level = transmission_level(amp, self._P)
        candidates = start_candidates(canvas.object, canvas.covered, self._level)
        step = max(1, amp.shape[0] // MISFIT_SAMPLE)
        self._start_misfit = {name: far_field_misfit(candidates[name], amp[::step], self._P, starts[::step])
                              for name in NETWORK_STARTS}
        self._choice = (min(self._start_misfit, key=self._start_misfit.get) if s.start == "auto" else s.start)
        self._refiner = Refiner(self._as_start(canvas), self._P, backend=s.backend, device=s.device,
                                refine_probe=s.probe_refined_first)
        self._refiner.add_frames(amp, pos)
        self._mask = np.zeros(canvas.object.shape, dtype=bool)

    def _as_start(self, canvas: Reconstruction) -> Reconstruction:
        """The canvas as the start chosen for this scan (the network's object, its phase, or flat)."""
        return replace(canvas, object=start_candidates(canvas.object, canvas.covered, self._level)[self._choice])

    def sweep(self, most: int, stop: Optional[Callable[[], bool]] = None) -> int:
        """Up to ``most`` sweeps over all frames added, fewer once none is owed or ``stop()`` says inference waits.

        Returns the sweeps run. Each one is published for ``apply`` at once;
        ``settings.progress(done, sweeps)`` follows it, counting the sweeps
        since the last frames arrived.
        """
        done = 0
        with self._lock:
            while done < most and self.owed and not (stop is not None and stop()):
                try:
                    result = self._refiner.run(1, cancel=self.cancel)
                except RefinementCancelled as exc:
                    self.cancelled = True
                    if exc.partial is not None:
                        self._publish(exc.partial.reconstruction.object, exc.partial.probe, exc.partial.record)
                    break
                obj = self._fit_phase_field(result.reconstruction.object, result.probe)
                self._publish(obj, result.probe, result.record, self.sweeps_since_add + 1)
                done += 1
                if self.settings.progress is not None:
                    self.settings.progress(self.sweeps_since_add, self.settings.sweeps)
        return done

    def _fit_phase_field(self, obj: np.ndarray, probe: np.ndarray) -> np.ndarray:
        """``obj`` with the slow phase fitted to every frame seen, when a fit is due (else as it is)."""
        every = self.settings.phase_field_every
        r = self._refiner
        if not every or r.sweeps_run % every:
            return obj
        if self._field is None:
            self._field = PhaseField(obj.shape, probe, np.concatenate(self._starts))
            self._field_amplitude = _take(self._amplitudes, self._field.frames)
        factor, fit = self._field.fit(obj, self._field_amplitude, probe,
                                      planes=not self.settings.probe_refined_first)
        self._field_fits.append(fit.record(r.sweeps_run))
        if factor is None:
            return obj
        r.multiply_object(factor)
        return obj * factor

    @property
    def noise_floor(self) -> Optional[float]:
        """The frames' Poisson floor of the misfit, averaged over those added (None unless all are counts)."""
        if self._floor_unknown or not self._floor_frames:
            return None
        return self._floor_sum / self._floor_frames

    def _fit_over_floor(self) -> Optional[float]:
        floor, misfit = self.noise_floor, self._refiner.misfit
        return float(misfit[-1]) / floor if floor and misfit else None

    def _warn_once_if_poor_fit(self, fit: Optional[float], probe_updated: bool) -> None:
        if self._warned or fit is None or fit <= PROBE_SUSPECT or self.owed:
            return
        self._warned = True
        fix = ("more sweeps (settings.sweeps)" if probe_updated else
               "refine the probe too (RefineSettings(refine_probe=True)), or refine the whole scan afterwards with "
               "Bundle.reconstruct(refine=True), which refines a probe guess the data reject")
        log.warning("the streamed object fits the frames %.1f× worse than their Poisson noise explains (probe: "
                    "%s): do not trust it as it is; %s", fit, self.probe_source, fix)

    def _publish(self, obj: np.ndarray, probe: np.ndarray, engine_record: dict[str, Any],
                 sweeps: Optional[int] = None) -> None:
        """Make ``obj`` the picture ``apply`` shows, after ``sweeps`` since the last frames arrived (None: as counted).

        The count moves with the picture, under the same lock: a sweep is no
        longer owed only once a snapshot shows it.
        """
        r = self._refiner
        sweeps = self.sweeps_since_add if sweeps is None else sweeps
        self._wall_s += float(engine_record.get("wall_s", 0.0))
        fit = self._fit_over_floor()
        record = {k: v for k, v in engine_record.items() if k != "misfit"}
        record.update({
            "wall_s": self._wall_s,
            "sweeps": sweeps, "sweeps_requested": self.settings.sweeps,
            "sweeps_total": r.sweeps_run, "frames": r.n_frames, "streamed": True,
            "cancelled": self.cancelled or bool(engine_record.get("cancelled")),
            "start": self._choice, "start_rule": self.settings.start, "start_misfit": dict(self._start_misfit),
            "misfit_per_sweep": [float(v) for v in r.misfit],
            "probe_source": self.probe_source + (", refined" if record.get("probe_updated") else ""),
            "probe_rule": self.settings.refine_probe,  # "auto" keeps the probe here: a stream cannot rerun
            "probe_scale": self._scale_note, "frames_refined": r.n_frames,
            "frames_outside_grid": self.frames_outside_grid, "frames_repeated": self.frames_repeated,
            "noise_floor": self.noise_floor, "misfit_over_floor": fit, "probe_suspect_above": PROBE_SUSPECT,
            "phase_field_every": self.settings.phase_field_every,
            "phase_field_fits": list(self._field_fits),
        })
        with self._view_lock:
            self._view = (obj, probe, self._mask.copy(), record)
            self.sweeps_since_add = sweeps
        self._warn_once_if_poor_fit(fit, bool(engine_record.get("probe_updated")))

    def apply(self, canvas: Reconstruction) -> Reconstruction:
        """The network's ``canvas`` with the refined object where refined (and covered); as is before any sweep.

        Once no sweep is owed, the amplitude prior is applied too (once per
        published picture; the record's ``amplitude_prior`` says whether).
        """
        with self._view_lock:
            view = self._view
        if view is None:
            return canvas
        obj, probe, mask, record = view
        take = mask & canvas.covered
        out = np.where(take, obj, canvas.object).astype(np.complex64)
        record = dict(record)
        rule = self.settings.amplitude_prior
        if rule == "none":
            record["amplitude_prior"] = {"rule": rule}
        elif self.cancelled or self.owed:
            record["amplitude_prior"] = {"rule": rule, "applied": False, "why_not": (
                "refinement was cancelled" if self.cancelled else
                "sweeps still owed: the prior is applied once they have run")}
        else:
            final = self._final
            if final is None or final[0] is not view or final[1].shape != out.shape:
                prior_obj, prior = apply_amplitude_prior(out, well_lit(canvas.weight), take, rule)
                final = self._final = (view, prior_obj, prior)
            out = np.where(take, final[1], out).astype(np.complex64)  # the canvas outside may have moved on
            record["amplitude_prior"] = dict(final[2])
        return replace(canvas, object=out, probe=np.array(probe, copy=True), refinement=record)


def _take(parts: list[np.ndarray], index: np.ndarray) -> np.ndarray:
    """``np.concatenate(parts)[index]`` for a sorted ``index``, without concatenating every frame first."""
    out, offset = [], 0
    for part in parts:
        inside = index[(index >= offset) & (index < offset + part.shape[0])]
        out.append(part[inside - offset])
        offset += part.shape[0]
    return np.concatenate(out)
