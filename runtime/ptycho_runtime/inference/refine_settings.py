"""``RefineSettings``: what a caller asks of the refinement after the network, checked once for every caller.

The choices themselves are made in ``scan_refinement`` (the probe, the slow
phase, the prior), ``refine_start`` (the start, the coarse level) and
``stream_refinement`` (a stream's own sweeps); this module only names them,
so that the command lines, the hosts and the API share one set of defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from ..reconstruction.grouping import GROUPINGS
from ..refinement import DEFAULT_SWEEPS
from ..refinement.engine import BACKENDS, ENGINES
from ..refinement.object_prior import PRIORS
from ..refinement.phase_field import DEFAULT_EVERY as DEFAULT_FIELD_EVERY

START_CHOICES = ("auto", "network", "network phase", "flat")
NETWORK_STARTS = ("network", "network phase")
"""The starts made from the network's object (``start_candidates``)."""
PROBE_SUSPECT = 4.0
"""Misfit over the Poisson floor above which a fixed probe guess is judged wrong. Measured after 30 sweeps: 0.93–1.15
with the exact probe (the project's scan and two independent simulators'), 9.0–58 with it defocused by 6 or 12 rad;
after the default 16 with the slow-phase fits, 0.94–1.12 with the exact probe."""
DEFAULT_MAX_SWEEPS = 64
"""``RefineSettings.max_sweeps``: how far a refinement with the probe refined may run past its requested sweeps
while its fit stays above ``PROBE_SUSPECT`` × the noise floor (``_sweep_until_explained``)."""
DEFAULT_COARSE_SWEEPS = 4
"""``RefineSettings.coarse_sweeps``: sweeps run at half resolution (``refinement.coarse_level``) after the start's
trial. Of the default 16: 2 trial, 4 coarse, 10 full. Measured with ``evaluate … --refine`` on 2 CPU cores (phase /
amplitude SSIM, with none in brackets): the held-out scan 0.980 / 0.948 (0.979 / 0.951), the training scan
0.978 / 0.947 (0.980 / 0.950), pty-chi's 0.965 / 0.898 (0.958 / 0.896), ptychodus's 0.990 / 0.964 (0.991 / 0.964),
the flat control's refinement 1.49 s against 1.78 s on average. Six were faster still (1.45 s) and lost up to
0.010 phase and 0.007 amplitude SSIM (docs/fidelity.md, "A coarse level first")."""
PHASE_FIELD_HELP = ("fit the object's slowly varying phase (a smooth field, ramp included; without its plane while "
                    "the probe is refined) to every frame's local ramp after every N sweeps: what the sweeps remove "
                    "slowest (0: never; default: %(default)s)")
PHASE_RAMP_HELP = ("with the probe fixed, also fit the object's global phase ramp alone to a sample of the frames "
                   "after every N sweeps (the phase field's fits include the ramp; 0: never; default: %(default)s)")
MAX_SWEEPS_HELP = ("with the probe refined, go on past the requested sweeps, up to N in all, while the fit stays "
                   f"above {PROBE_SUSPECT:g}x the frames' Poisson noise (a probe guess far off took 48; an N no "
                   "larger than the requested sweeps turns this off; default: %(default)s)")
COARSE_SWEEPS_HELP = ("of the refinement's sweeps, run N on a half-resolution level after the start's two trial "
                      "sweeps (each frame's central band: a third of the cost, and the slow phase found as well); "
                      "at least as many full-resolution sweeps follow (0: none; default: %(default)s)")
"""The command lines' help for ``--phase-field-every``, ``--phase-ramp-every``, ``--coarse-sweeps`` (``infer`` and
``evaluate``) and ``--refine-max-sweeps`` (also ``infer-many``)."""

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
    ``coarse_sweeps``: how many of the ``sweeps`` run on the coarse level
    after the start's trial, with at least as many full ones after them
    (``refine_start``: the built-in engine on a whole scan, the probe
    refined or not; 0: none);
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
    coarse_sweeps: int = DEFAULT_COARSE_SWEEPS
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
                                     ("max_sweeps", self.max_sweeps, "no more than sweeps: no extension"),
                                     ("coarse_sweeps", self.coarse_sweeps, "0: none")):
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


