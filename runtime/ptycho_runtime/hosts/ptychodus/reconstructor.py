"""The ptychodus reconstructor: a bundle, warm in a worker process, behind ptychodus's Reconstructor API.

ptychodus (``ptychodus/api/reconstruct.py``) calls ``reconstruct(input)`` in a
background thread of its own process and iterates over the outputs: each
``ReconstructOutput`` updates the product shown (and, in batch mode, is saved
as ``product.<progress>.h5``), and after each one ptychodus may stop
iterating (the user pressed stop). So this reconstructor yields after every
micro-batch — progress in percent and the object so far — and closing the
iterator cancels the worker at its next micro-batch boundary.

Then, by default, the network's object is refined against the patterns
(``Bundle.reconstruct(refine=...)``: the runtime's batched engine) with the
product's own probe guess, the probe the data were measured with, and the
output product holds the probe the object goes with (``output_product``).
During the sweeps progress goes on from the network's share
(``INFERENCE_SHARE`` percent) to 100 and each sweep is a point where
ptychodus may stop; the object shown stays the network's until the end.

The bundle runs in a ``BundleWorker`` (a process this reconstructor owns,
started when the model is opened and kept for every later call): the CUDA
context lives there, never in ptychodus's process, and no call after the
first pays a process start or a model load. The model file is the bundle
(``wts.h5``); batch mode finds it as ``model.h5`` in the input folder.

Settings (group ``PtychoRuntime`` in ``settings.ini``): ``Device`` (auto, cpu,
cuda), ``Backend`` (auto, onnx, torchscript), ``BatchSize`` (frame groups
per micro-batch; 0: the runtime's default), ``LiveUpdates`` (yield the object
after each micro-batch; off: one output at the end, and cancellation only
there), ``AlignPhase`` (passes, 0: off), ``OutOfGrid`` (clip, drop),
``StrictPhysics`` (refuse a host whose instrument, counts or probe do not
match the bundle; off: warn), ``Refine`` (on by default; off: the network's
object alone, the input's probes passed through), ``RefineSweeps`` (sweeps
over all patterns, default ``DEFAULT_SWEEPS``), ``RefineProbe`` (also
refine the probe; on by default, since a product's probe is a guess) and
``RefineMaxSweeps`` (0, the default: exactly ``RefineSweeps``; N: with the
probe refined, sweep on up to N in all while the fit stays far above the
patterns' noise, ``RefineSettings.max_sweeps``). A live host keeps its time
per scan bounded by default: on data whose fit the model itself limits (high
dose, background) the extension runs to its limit for nothing.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from ptychodus.api.io import save_ptychopinn_training_data
from ptychodus.api.observer import Observable, Observer
from ptychodus.api.reconstruct import (
    ReconstructInput,
    Reconstructor,
    ReconstructorLibrary,
    ReconstructOutput,
    TrainableReconstructor,
    TrainOutput,
)
from ptychodus.api.settings import SettingsRegistry

from ...refinement import DEFAULT_SWEEPS
from ..worker import BundleWorker, Done, Progress
from .files import host_scan, output_product

LIBRARY_NAME = "ptycho-runtime"     # ptychodus algorithm key: "<library>_<reconstructor>", split at the first "_"
RECONSTRUCTOR_NAME = "PtychoPINN"
ALGORITHM = f"{LIBRARY_NAME}_{RECONSTRUCTOR_NAME}".casefold()
PROGRESS_GOAL = 100                 # percent: the last output is product.000100.h5 in batch mode
INFERENCE_SHARE = 50                # percent of the progress bar the network takes when refinement follows

log = logging.getLogger(__name__)


class PtychoRuntimeSettings(Observable, Observer):
    """The ``[PtychoRuntime]`` group of ptychodus's settings (see the module docstring)."""

    def __init__(self, registry: SettingsRegistry) -> None:
        super().__init__()
        self._group = registry.create_group("PtychoRuntime")
        self._group.add_observer(self)
        self.device = self._group.create_string_parameter("Device", "auto")
        self.backend = self._group.create_string_parameter("Backend", "auto")
        self.batch_size = self._group.create_integer_parameter("BatchSize", 0, minimum=0)
        self.live_updates = self._group.create_boolean_parameter("LiveUpdates", True)
        self.align_phase = self._group.create_integer_parameter("AlignPhase", 0, minimum=0)
        self.out_of_grid = self._group.create_string_parameter("OutOfGrid", "clip")
        self.strict_physics = self._group.create_boolean_parameter("StrictPhysics", False)
        self.refine = self._group.create_boolean_parameter("Refine", True)
        self.refine_sweeps = self._group.create_integer_parameter("RefineSweeps", DEFAULT_SWEEPS, minimum=1)
        self.refine_probe = self._group.create_boolean_parameter("RefineProbe", True)
        self.refine_max_sweeps = self._group.create_integer_parameter("RefineMaxSweeps", 0, minimum=0)
        self.amplitude_prior = self._group.create_boolean_parameter("AmplitudePrior", True)  # TV at the noise level

    def refine_request(self) -> Optional[dict[str, Any]]:
        """The refinement asked for, as the plain data a worker process receives (None: off)."""
        if not bool(self.refine.get_value()):
            return None
        return {"sweeps": int(self.refine_sweeps.get_value()), "refine_probe": bool(self.refine_probe.get_value()),
                "amplitude_prior": "tv" if bool(self.amplitude_prior.get_value()) else "none",
                "max_sweeps": int(self.refine_max_sweeps.get_value())}

    def _update(self, observable: Observable) -> None:
        if observable is self._group:
            self.notify_observers()


def _refined_note(rec: Any) -> str:
    r = rec.refinement
    if not r:
        return ""
    misfit = r.get("misfit_per_sweep") or [float("nan")]
    return (f"; refined: {r.get('sweeps')} sweeps ({r.get('backend')}, {r.get('batching')} batches, start "
            f"{r.get('start')}, probe {'refined' if r.get('probe_updated') else 'fixed'}), far-field misfit "
            f"{misfit[0]:.3g} → {misfit[-1]:.3g}")


class PtychoRuntimeReconstructor(TrainableReconstructor):
    """A ptycho-export bundle as a ptychodus reconstructor (trainable only in name: ptychodus loads models that way).

    Training happens outside ptychodus: ``ptycho-export train --product
    PRODUCT.h5 --patterns DIFFRACTION.h5``; ``train`` here says so.
    """

    def __init__(self, settings: PtychoRuntimeSettings) -> None:
        self._settings = settings
        self._model_path: Optional[Path] = None
        self._worker: Optional[BundleWorker] = None
        self._worker_key: Optional[tuple] = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return RECONSTRUCTOR_NAME

    def get_progress_goal(self) -> int:
        return PROGRESS_GOAL

    # ------------------------------------------------------------------ the worker

    def _load_kwargs(self) -> dict[str, Any]:
        return {"device": self._settings.device.get_value(), "backend": self._settings.backend.get_value()}

    def worker(self) -> BundleWorker:
        """The worker for the current model and device settings (a new one if either changed)."""
        if self._model_path is None:
            raise RuntimeError("no ptycho-export bundle is loaded: open a bundle (wts.h5) as the model file "
                               "(batch mode: model.h5 in the input folder)")
        key = (self._model_path, tuple(sorted(self._load_kwargs().items())))
        with self._lock:
            if self._worker is None or self._worker_key != key:
                if self._worker is not None:
                    self._worker.close()
                self._worker = BundleWorker(self._model_path, **self._load_kwargs())
                self._worker_key = key
            return self._worker

    def close(self) -> None:
        """Stop the worker process (it also stops when ptychodus exits)."""
        with self._lock:
            if self._worker is not None:
                self._worker.close()
            self._worker = self._worker_key = None

    # ------------------------------------------------------------------ reconstruct

    def reconstruct(self, parameters: ReconstructInput) -> Iterator[ReconstructOutput]:
        scan = host_scan(parameters)
        live = bool(self._settings.live_updates.get_value())
        batch = int(self._settings.batch_size.get_value())
        kwargs = scan.reconstruct_kwargs()
        refine = self._settings.refine_request()
        kwargs.update(batch_size=batch or None, align_phase=int(self._settings.align_phase.get_value()),
                      out_of_grid=self._settings.out_of_grid.get_value(),
                      strict=bool(self._settings.strict_physics.get_value()), refine=refine)
        worker = self.worker()
        log.info("reconstructing %d patterns on a %d×%d object grid with %s%s", scan.counts.shape[0],
                 *scan.grid.shape, self._model_path,
                 "" if refine is None else f", then {refine['sweeps']} refinement sweeps with the product's probe"
                 + (" (refined too)" if refine["refine_probe"] else ""))
        share = PROGRESS_GOAL if refine is None else INFERENCE_SHARE
        shown = None  # the last product shown: refinement sweeps keep showing it
        swept = share  # the progress the sweeps have shown
        events = worker.run(scan.counts, scan.positions_px, snapshots=live, **kwargs)
        try:
            for event in events:
                if isinstance(event, Progress):
                    if not live:
                        continue
                    if event.stage == "refinement":
                        if shown is not None and event.done < event.total:
                            # a refinement run past its sweeps counts on out of RefineSettings.max_sweeps, so its
                            # fraction drops: the bar (and the outputs' names, which are the progress) never go
                            # back, and holds where it was until the extension passes it (no output repeated)
                            now = share + (PROGRESS_GOAL - share) * event.done // event.total
                            if now > swept:
                                swept = now
                                yield ReconstructOutput(shown, progress=swept)
                    elif event.done < event.total or refine is not None:
                        shown = output_product(parameters.product, event.snapshot)
                        yield ReconstructOutput(shown, progress=share * event.done // event.total)
                elif isinstance(event, Done):
                    rec = event.reconstruction
                    log.info("reconstructed in %.2f s in the worker (%d patches clipped, %d dropped at the grid's "
                             "edge)%s", event.seconds, rec.n_clipped, rec.n_dropped, _refined_note(rec))
                    yield ReconstructOutput(output_product(parameters.product, rec), progress=PROGRESS_GOAL)
        finally:
            events.close()  # ptychodus stopped iterating (user cancel): the worker stops at its next micro-batch

    # ------------------------------------------------------------------ the model file

    def is_model_loaded(self) -> bool:
        return self._model_path is not None

    def get_model_file_filter(self) -> str:
        return "ptycho-export bundle (*.h5)"

    def get_model_file_extension(self) -> str:
        return ".h5"

    def load_model_from_file(self, file_path: Path) -> None:
        """Remember the bundle and start its worker in the background (the first reconstruct waits for it)."""
        self._model_path = Path(file_path)
        worker = self.worker()

        def warm() -> None:
            try:
                worker.start()
            except Exception as exc:  # noqa: BLE001 - reported again, as an error, by the first reconstruct
                log.warning("could not load %s: %s", file_path, exc)

        threading.Thread(target=warm, name="ptycho-runtime-warm", daemon=True).start()

    def save_model(self, file_path: Path) -> None:
        if self._model_path is None:
            raise RuntimeError("no ptycho-export bundle is loaded")
        shutil.copyfile(self._model_path, file_path)

    # ------------------------------------------------------------------ training (outside ptychodus)

    def get_training_data_file_filter(self) -> str:
        return "NumPy Zipped Archive (*.npz)"

    def export_training_data(self, file_path: Path, parameters: ReconstructInput) -> None:
        save_ptychopinn_training_data(file_path, parameters)

    def train(self, input_path: Path, output_path: Path) -> Iterator[TrainOutput]:
        raise NotImplementedError("ptycho-export bundles are trained outside ptychodus: ptycho-export train "
                                  "--product PRODUCT.h5 --patterns DIFFRACTION.h5 --output-dir DIR")


class PtychoRuntimeReconstructorLibrary(ReconstructorLibrary):
    """The library ptychodus lists: one reconstructor, ``ptycho-runtime_ptychopinn``; logs under ``ptycho_runtime``."""

    def __init__(self, settings_registry: SettingsRegistry) -> None:
        super().__init__("ptycho_runtime")
        self.settings = PtychoRuntimeSettings(settings_registry)
        self.reconstructor = PtychoRuntimeReconstructor(self.settings)

    @property
    def name(self) -> str:
        return LIBRARY_NAME

    def __iter__(self) -> Iterator[Reconstructor]:
        return iter([self.reconstructor])
