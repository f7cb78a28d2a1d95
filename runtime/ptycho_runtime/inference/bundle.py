"""``load_bundle`` and ``Bundle``: a verified bundle, a backend, and the inference API.

Normalisation contract (the same as training; see the graph metadata): the
graphs take the diffraction amplitude in photon units. ``predict`` accepts
either the normalised amplitude of the PtychoPINN NPZ contract (multiplied by
the bundle's ``intensity_scale`` here, exactly as training multiplied its
inputs) or, with ``counts=True``, raw detector counts (square root taken:
sqrt(counts) is already in photon units).

Trust: ``load_bundle`` reads the file under the reader policy of
``format`` (nothing outside the file is followed, every size is
bounded, every checksum verified, params checked), checks the chosen graph
against the params and, for ONNX, op by op before onnxruntime sees it, and
then (``self_test=True``, the default) re-runs the stored parity cases through
``predict``: a bundle whose params no longer match its graph — e.g. an edited
``intensity_scale`` with every checksum recomputed — fails to load.

Thread safety: a ``Bundle`` holds no per-call state. ``predict`` and
``reconstruct`` may be called from several threads at once (onnxruntime
sessions are thread-safe; each call gets its own buffers and IOBinding).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

from .. import format as fmt
from ..reconstruction.alignment import align_patch_phases, check_align, overlap_factors
from ..reconstruction.geometry import DEFAULT_CENTRE, ObjectGrid, make_grid, scan_positions_px
from ..reconstruction.grouping import GROUPINGS, cover_groups, group_neighbors
from ..reconstruction.inputs import check_positions, check_scan_positions, prepare_diffraction, repair_bad_pixels
from ..reconstruction.stitching import MAX_CANVAS_PIXELS, Reconstruction, StitchCanvas, probe_window
from .backends import OnnxBackend, TorchScriptBackend, check_device_precision
from .compatibility import HostPhysics, check_host
from .parity import SELF_TEST_TOLERANCE, graph_input, relative_error
from .scan_refinement import RefineRequest, as_settings, measured_amplitude, refine_scan
from .streaming import StreamingReconstructor

BACKENDS = ("auto", "onnx", "torchscript", "triton")
INFERENCE_MODEL = "diffraction_to_obj"
log = logging.getLogger("ptycho_runtime.bundle")  # a stable name: hosts configure the "ptycho_runtime" logger


class ReconstructionCancelled(RuntimeError):
    """A host cancelled ``Bundle.reconstruct`` (its ``cancel`` was set); raised between micro-batches."""


def _check_cancel(cancel: Any) -> None:
    if cancel is None:
        return
    stop = cancel.is_set() if hasattr(cancel, "is_set") else cancel()
    if stop:
        raise ReconstructionCancelled("reconstruction cancelled by the host")


@dataclass(frozen=True)
class BundleInfo:
    path: str
    format_version: int
    N: int
    gridsize: int
    intensity_scale: float
    output_mode: str
    backend: str
    device: str
    precision: str
    providers: list[str]
    graphs: list[str]


class Bundle:
    """A loaded model bundle, ready for batched inference and stitching. Make it with ``load_bundle``."""

    def __init__(self, contents: fmt.BundleContents, backend: str = "auto", device: str = "auto",
                 precision: str = "fp32", tensorrt: bool = False, intra_op_threads: Optional[int] = None,
                 cuda_graph_batch: Optional[int] = None, self_test: bool = True, *, url: Optional[str] = None,
                 model_name: Optional[str] = None, timeout_s: Optional[float] = None,
                 retries: Optional[int] = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        check_device_precision(device, precision)
        self.contents = contents
        self.path = contents.path
        p = contents.params
        fmt.validate_params(p, self.path)  # read_bundle did too; a caller may hand in edited contents
        self.N = int(p["N"])
        self.gridsize = int(p["gridsize"])
        self.channels = self.gridsize**2
        self.intensity_scale = float(p["intensity_scale"])
        self.output_mode = str(p.get("output_mode", "amp_phase"))
        self.probe = None if p.get("probe") is None else np.asarray(p["probe"])

        if backend == "auto":
            backend = "onnx" if ("onnx", INFERENCE_MODEL) in contents.graphs else "torchscript"
        if backend != "triton" and (url is not None or model_name is not None):
            raise ValueError("url and model_name apply to backend='triton' only")
        record = None if backend == "triton" else contents.graph(backend, INFERENCE_MODEL)  # clear error if absent
        if backend == "triton":  # the graph runs on a Triton server; the rest stays here (triton_backend)
            from .triton_backend import TritonBackend

            self._backend = TritonBackend(contents, url, model_name, timeout_s, retries)
            self._pair = self.output_mode
        elif backend == "onnx":
            if cuda_graph_batch is not None and int(cuda_graph_batch) > fmt.MAX_GRAPH_BATCH:
                raise ValueError(f"cuda_graph_batch must be at most {fmt.MAX_GRAPH_BATCH}, the largest batch a "
                                 f"graph's tensor sizes are checked for (got {cuda_graph_batch})")
            fmt.check_onnx_graph(record.data, ("onnx", INFERENCE_MODEL), p, self.path)
            self._backend = OnnxBackend(record.data, device, precision, tensorrt, intra_op_threads,
                                        cuda_graph_batch=cuda_graph_batch)
            self._pair = self.output_mode
        else:
            assert record is not None
            fmt.check_torchscript_archive(record.data, INFERENCE_MODEL, self.path)
            self._backend = TorchScriptBackend(record.data, device, precision)
            self._pair = "real_imag"
        self.backend = backend
        if self_test:  # at load: the smallest stored case is enough to catch params that do not fit the graph
            self.self_test(smallest_only=True)
        log.info("loaded %s: N=%d, gridsize=%d, %s on %s (%s)", self.path, self.N, self.gridsize, self.backend,
                 self.device, ", ".join(self.providers))

    # ------------------------------------------------------------------ metadata

    @property
    def params(self) -> dict[str, Any]:
        """The params the model was trained with (a copy: N, gridsize, intensity_scale, probe, …)."""
        return copy.deepcopy(self.contents.params)

    @property
    def physics(self) -> dict[str, Optional[float]]:
        """The instrument the model was trained for (``format.PHYSICS_KEYS``; empty for older bundles)."""
        return dict(self.contents.physics)

    def check_host(self, host: HostPhysics, counts: Optional[np.ndarray] = None, strict: bool = False) -> list[str]:
        """Compare a host's geometry, probe and counts with this bundle (``compatibility.check_host``)."""
        return check_host(self.contents.physics, self.contents.params, host, counts=counts, strict=strict)

    def restore_params(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """CONFIG-001 for hosts that keep a legacy ``params.cfg``-style dict: write every param into it."""
        cfg.update(self.params)
        return cfg

    @property
    def device(self) -> str:
        """Where inference really runs: "cuda" or "cpu" (after any fallback)."""
        return self._backend.device

    @property
    def precision(self) -> str:
        """The precision inference really runs at: "fp32" or "fp16" (fp16 only on CUDA)."""
        return self._backend.precision

    @property
    def providers(self) -> list[str]:
        """The execution providers of the session, best first (ONNX), or ["torch-cpu"/"torch-cuda"]."""
        return list(self._backend.providers)

    @property
    def on_gpu(self) -> bool:
        """True when inference runs on a GPU."""
        return bool(self._backend.on_gpu)

    def info(self) -> BundleInfo:
        return BundleInfo(str(self.path), int(self.contents.header["format_version"]), self.N, self.gridsize,
                          self.intensity_scale, self.output_mode, self.backend, self.device,
                          self.precision, self.providers,
                          [f"{k}/{m}" for k, m in sorted(self.contents.graphs)])

    def __repr__(self) -> str:
        return (f"Bundle({str(self.path)!r}, N={self.N}, gridsize={self.gridsize}, backend={self.backend!r}, "
                f"device={self.device!r})")

    # ------------------------------------------------------------------ self-test

    def self_test(self, smallest_only: bool = False) -> dict[str, float]:
        """Re-run the stored parity cases through ``predict`` and compare with the stored eager outputs.

        Cheap (batches 1 and 7; at load only the smallest). The inputs are in ``predict``'s units, so the
        bundle's ``intensity_scale``, the graph and the backend are all on the
        path. The tolerance is the runtime's (``parity.SELF_TEST_TOLERANCE``),
        never the file's. Returns the relative error per case; raises
        ``BundleIntegrityError`` when a case disagrees.
        """
        cases = self.contents.parity
        if not cases:
            raise fmt.BundleIntegrityError(
                f"{self.path} holds no parity vectors, so the runtime cannot check that its params match its "
                f"graph. Add them with: ptycho-export --force {self.path} (or load with self_test=False).",
                self.path, "/parity")
        tol = SELF_TEST_TOLERANCE.get((self.device, self.precision), max(SELF_TEST_TOLERANCE.values()))
        errors: dict[str, float] = {}
        chosen = sorted(cases.items(), key=lambda kv: (_case_size(kv[1]), kv[0]))[:1] if smallest_only else \
            sorted(cases.items())
        for name, case in chosen:
            ref_re = case.get(f"{INFERENCE_MODEL}.object_real")
            ref_im = case.get(f"{INFERENCE_MODEL}.object_imag")
            if ref_re is None or ref_im is None:
                raise fmt.BundleIntegrityError(
                    f"{self.path}: /parity/{name} lacks the eager object of {INFERENCE_MODEL}; re-export with: "
                    f"ptycho-export --force {self.path}", self.path, f"/parity/{name}")
            try:
                if "input.amplitude" in case:
                    out = self.predict(case["input.amplitude"])
                else:  # legacy cases, stored in graph units
                    out = self.infer(graph_input(case, self.intensity_scale))
            except fmt.BundleError:
                raise
            except Exception as exc:  # noqa: BLE001 - stored inputs the model cannot run are a damaged bundle
                raise fmt.BundleIntegrityError(
                    f"{self.path}: the stored parity case {name} does not run ({type(exc).__name__}); the bundle is "
                    f"damaged or was modified. Re-export it with: ptycho-export --force {self.path}",
                    self.path, f"/parity/{name}") from None
            rel = max(relative_error(ref_re, out.real)[1], relative_error(ref_im, out.imag)[1])
            errors[name] = rel
            if not rel <= tol:
                raise fmt.BundleIntegrityError(
                    f"{self.path}: self-test failed on parity case {name}: relative error {rel:.3g} exceeds the "
                    f"runtime's tolerance {tol:g}. The params (e.g. intensity_scale) do not match the graph: the "
                    f"bundle was modified after export. Re-export it, or copy it again from its source.",
                    self.path, f"/parity/{name}")
        return errors

    # ------------------------------------------------------------------ inference

    def default_batch_size(self) -> int:
        """Patterns per inference batch when none is given: 256 on a GPU, 64 on the CPU."""
        return 256 if self._backend.on_gpu else 64

    def prepare(self, diffraction: np.ndarray, counts: Optional[bool] = None) -> np.ndarray:
        """Check frames and convert them to the graph's input: float32 [n, C, N, N] in photon units.

        ``diffraction`` is the normalised amplitude (NPZ contract) or, with
        ``counts=True``, detector counts. With ``counts=None`` (the default)
        whole-number data that look like raw counts are refused rather than
        silently taken as amplitudes; ``counts=False`` says they are amplitudes.
        """
        return prepare_diffraction(diffraction, self.N, self.channels, counts, self.intensity_scale)

    def predict(self, diffraction: np.ndarray, offsets: Optional[np.ndarray] = None,
                batch_size: Optional[int] = None, counts: Optional[bool] = None) -> np.ndarray:
        """Diffraction → complex64 object patches [n, C, N, N].

        ``diffraction``: [n, C, N, N] (or [n, N, N] when C = 1), normalised
        amplitude (NPZ contract) or, with ``counts=True``, detector counts
        (see ``prepare`` for ``counts=None``).
        ``offsets`` [n, C, 1, 2] are accepted for PtychoPINN compatibility and
        checked, but the inference graph does not need them.
        """
        x = self.prepare(diffraction, counts)
        if offsets is not None:
            off = np.asarray(offsets)
            if off.shape != (x.shape[0], self.channels, 1, 2):
                raise ValueError(f"offsets must have shape [{x.shape[0]}, {self.channels}, 1, 2] to match the "
                                 f"diffraction (got {list(off.shape)})")
        return self.infer(x, batch_size)

    def run_graph(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph alone on one prepared batch [b, C, N, N] → its two real output maps (no batching, no combining).

        What a server or a benchmark times: the verified, self-tested session without the normalisation or
        complex assembly around it.
        """
        return self._backend.run(np.ascontiguousarray(x))

    def infer(self, x: np.ndarray, batch_size: Optional[int] = None,
              progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Run the graph on prepared input (``prepare``'s output) in batches → complex64 patches [n, C, N, N].

        ``progress(k)`` is called after each batch of k patterns (groups).
        """
        bs = self._batch_size(batch_size)
        out = np.empty(x.shape, np.complex64)
        for i in range(0, x.shape[0], bs):
            a, b = self._backend.run(np.ascontiguousarray(x[i:i + bs]))
            _combine_into(out[i:i + bs], a, b, self._pair)
            if progress is not None:
                progress(min(bs, x.shape[0] - i))
        return out

    def stitch_window(self, window: Union[str, np.ndarray, None] = "probe") -> Optional[np.ndarray]:
        """The stitching weights: ``"probe"`` → ``probe_window`` of the bundle's probe (None without one)."""
        if isinstance(window, str):
            if window != "probe":
                raise ValueError(f"window must be 'probe', an [N, N] array or None (got {window!r})")
            return None if self.probe is None else probe_window(self.probe)
        return window

    def reconstruct(self, diffraction: np.ndarray, positions: np.ndarray, counts: Optional[bool] = None,
                    batch_size: Optional[int] = None, object_shape: Optional[tuple[int, int]] = None,
                    crop: Optional[int] = None, window: Union[str, np.ndarray, None] = "probe",
                    align_phase: int = 0, progress: Optional[Callable[[int], None]] = None, *,
                    grid: Optional[ObjectGrid] = None, pixel_size_m: Optional[float | tuple[float, float]] = None,
                    object_centre_m: Optional[tuple[float, float]] = None, units: str = "pixels",
                    frame_centre: str = DEFAULT_CENTRE, bad_pixels: Optional[np.ndarray] = None,
                    out_of_grid: str = "clip", fill: complex = 0.0, cancel: Optional[Any] = None,
                    on_batch: Optional[Callable[[int, int, Callable[[], Reconstruction]], None]] = None,
                    host: Optional[HostPhysics] = None, strict: bool = False,
                    max_canvas_pixels: int = MAX_CANVAS_PIXELS, align: str = "none", refine: RefineRequest = None,
                    probe: Optional[np.ndarray] = None, groups: Optional[str] = None) -> Reconstruction:
        """Predict and stitch a scan into the full object, on the host's object grid.

        ``positions`` (x, y), one per frame: [n, 2] for n frames [n, N, N] —
        with gridsize > 1 the frames are grouped with their nearest neighbours
        exactly as in training — or, for pre-grouped input [n, C, N, N],
        [n, C, 2]. ``units``: "pixels" (object pixels) or "metres".
        ``frame_centre``: the frame pixel a position names, "(N-1)/2" (the
        default: PtychoPINN, ptychodus) or "N/2" (``geometry``).

        The object grid: ``grid`` (an ``ObjectGrid``) or its parts
        ``object_shape`` (H, W), ``pixel_size_m`` (x, y or one number) and
        ``object_centre_m`` (x, y) — the ptychodus convention: metres
        ``centre + pixel · (u − (W−1)/2)``. With a shape the result is that
        array (origin 0, 0); without one the canvas is sized to the scan. A
        patch partly outside the grid is clipped (``out_of_grid="clip"``) or
        dropped ("drop"); wholly outside, dropped; counted in the result's
        ``n_clipped``/``n_dropped``, never an error. Uncovered pixels are ``fill``.

        Input: ``counts=True`` for detector counts, ``counts=False`` for the
        normalised amplitude; ``counts=None`` (default) takes amplitudes but
        refuses whole-number frames that look like raw counts (``prepare``);
        ``bad_pixels`` [N, N] (True = bad) are filled from their neighbours
        before inference (``inputs.repair_bad_pixels``).

        Unit guards (before any inference, ValueError naming the fix): raw
        counts without ``counts=``, all-zero or constant frames, positions
        that all land on one spot (metres given as pixels), and, without a
        grid shape, a position far from the rest or a canvas above
        ``max_canvas_pixels`` (``inputs.check_scan_positions``).

        Weighting: ``window`` — "probe" (default: |probe|², which beats a
        crop because it trusts each patch where it was lit), an [N, N] array,
        or None for the ``crop`` (default N/2) central square; an explicit
        ``crop`` wins. ``align_phase`` passes of phase alignment
        (``alignment.align_patch_phases``, e.g. ``DEFAULT_PHASE_ITERATIONS``)
        put overlapping patches on one phase first. Off by default: it undoes
        random per-patch phase offsets (phase SSIM 0.72 → 0.95 on true
        patches with ±1 rad offsets) but measured no gain on today's networks
        and costs a few seconds per 1,000 patterns. ``align`` instead solves the
        overlaps once by least squares (``alignment.ALIGN_MODES``; "ramps": a phase
        offset and a damped ramp per pattern, phase SSIM 0.297 → 0.383 on the
        held-out scan, and a better start for ePIE, ``docs/fidelity.md``). Off
        by default, so that the batch, streaming and multi-worker paths agree.

        Host hooks, between micro-batches of ``batch_size`` groups:
        ``progress(k)`` after each batch of k groups; ``on_batch(done, total,
        snapshot)`` with ``snapshot()`` building the object so far (without
        phase alignment); ``cancel`` — an Event-like object (``is_set()``) or
        a callable returning True — stops the call with ``ReconstructionCancelled``.

        ``host`` (a ``HostPhysics``): check the host's instrument, probe and
        (with ``counts=True``) count level against the bundle first
        (``check_host``): warnings, or ``PhysicsMismatchError`` with ``strict``.

        ``refine``: then refine the stitched object against the frames
        themselves (``scan_refinement.refine_scan``: the batched engine, 20
        sweeps by default; ``True``, a number of sweeps, or a
        ``RefineSettings``; None: off, the default) with ``probe`` — the
        scan's probe at any absolute scale — or, without one, the bundle's
        training probe. The result then carries ``probe`` and ``refinement``
        (the record of what ran, with ``network_groups``: the settings'
        ``start_groups`` rule, how many groups the network predicted, of how
        many frames); ``cancel`` also stops the sweeps.

        ``groups`` (gridsize > 1, flat frames): "all" (a group per frame) or
        "cover" (each frame in at least one group, about a third of them at
        gridsize 2; ``Bundle.group``). None (the default): the refine
        settings' ``start_groups`` ("cover") when refining, else "all".
        """
        t0 = time.perf_counter()
        settings = as_settings(refine)
        if host is not None:
            self.check_host(host, counts=diffraction if counts else None, strict=strict)
        the_grid = make_grid(grid, object_shape, pixel_size_m, object_centre_m)
        pos_px = scan_positions_px(positions, self.N, units, the_grid, frame_centre)
        if groups is None:
            groups = settings.start_groups if settings is not None else "all"
        x, pos = self.group(diffraction, pos_px, counts, groups)
        repair_bad_pixels(x, bad_pixels)
        w = None if crop is not None else self.stitch_window(window)
        flat_pos = pos.reshape(-1, 2)
        fixed_shape = the_grid.shape if the_grid is not None else None
        check_scan_positions(flat_pos, self.N, fixed_shape, max_canvas_pixels)
        if fixed_shape is not None:
            canvas = StitchCanvas(fixed_shape, self.N, (0, 0), crop=crop, window=w, out_of_grid=out_of_grid,
                                  fill=fill, max_pixels=max_canvas_pixels)
        else:
            canvas = StitchCanvas.for_positions(flat_pos, self.N, crop=crop, window=w, fill=fill,
                                                max_pixels=max_canvas_pixels)
        bs = self._batch_size(batch_size)
        total = x.shape[0]
        # Unaligned: each batch goes onto the canvas as it comes (the live object is the result so far).
        # Aligned: patches are kept, aligned at the end, and a second canvas shows the live object if asked for.
        if align_phase and align != "none":
            raise ValueError(f"give align={align!r} (the least-squares solve) or align_phase={align_phase} "
                             "(iterative passes), not both")
        check_align(align)  # before any inference
        patches = np.empty(x.shape, np.complex64) if align_phase or align != "none" else None
        live = canvas if patches is None else (
            StitchCanvas(canvas.shape, self.N, canvas.origin, crop=crop, window=w, out_of_grid=out_of_grid,
                         fill=fill, max_pixels=max_canvas_pixels) if on_batch is not None else None)
        for i in range(0, total, bs):
            _check_cancel(cancel)
            out = self.infer(x[i:i + bs], bs)
            if patches is not None:
                patches[i:i + bs] = out
            if live is not None:
                live.add(out.reshape(-1, self.N, self.N), pos[i:i + bs].reshape(-1, 2))
            if progress is not None:
                progress(out.shape[0])
            if on_batch is not None:
                on_batch(min(i + bs, total), total, live.result)
        _check_cancel(cancel)
        if patches is not None:
            flat = patches.reshape(-1, self.N, self.N)
            if align != "none":
                flat = flat * overlap_factors(patches, pos, align, window=w, crop=crop)
            else:
                flat = flat * align_patch_phases(flat, flat_pos, window=w, crop=crop,
                                                 iterations=align_phase)[:, None, None].astype(np.complex64)
            canvas.add(flat, flat_pos)
        rec = canvas.result()
        if the_grid is not None and the_grid.pixel_size_m is not None:
            rec = dataclasses.replace(rec, pixel_size_m=the_grid.pixel_size_m,
                                      centre_m=the_grid.centre_of(canvas.origin, canvas.shape))
        if settings is not None:
            amplitude = repair_bad_pixels(measured_amplitude(diffraction, counts), bad_pixels)
            rec = refine_scan(rec, amplitude, np.asarray(pos_px).reshape(-1, 2),
                              self.probe if probe is None else probe, settings, fill=fill, cancel=cancel,
                              probe_source="the bundle's training probe" if probe is None else "the host's probe")
            network_groups = {"rule": groups, "groups": int(total), "frames": int(amplitude.shape[0])}
            rec = dataclasses.replace(rec, refinement={**rec.refinement, "network_groups": network_groups})
        dt = time.perf_counter() - t0
        log.info("reconstructed %d frame group(s) of %s on a %d×%d grid in %.3f s (%d clipped, %d dropped at "
                 "the grid's edge)", total, self.path,
                 rec.object.shape[0], rec.object.shape[1], dt, rec.n_clipped, rec.n_dropped)
        if rec.n_dropped or rec.n_clipped:
            log.warning("%d patch(es) were clipped and %d dropped: they lie partly or wholly outside the %d×%d "
                        "object grid", rec.n_clipped, rec.n_dropped, *rec.object.shape)
        return rec

    def _batch_size(self, batch_size: Optional[int]) -> int:
        bs = self.default_batch_size() if batch_size is None else int(batch_size)  # 0 is an error, not 'default'
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        return min(bs, fmt.MAX_GRAPH_BATCH)  # the graphs' tensor sizes are checked up to it (format.graph_sizes)

    def group(self, diffraction: np.ndarray, positions: np.ndarray, counts: Optional[bool] = None,
              groups: str = "all") -> tuple[np.ndarray, np.ndarray]:
        """Prepared graph input [g, C, N, N] and positions [g, C, 2], grouped as ``reconstruct`` groups them.

        Flat frames [n, N, N] with positions [n, 2] are grouped with their nearest
        neighbours when gridsize > 1 (as training's ``make_groups`` does):
        every frame's group (``groups="all"``, g = n) or a cover of the frames
        (``"cover"``, ``grouping.cover_groups``: each frame at least once, g ≈ n/3
        at gridsize 2). Pre-grouped input is checked and prepared as it is.
        """
        if groups not in GROUPINGS:
            raise ValueError(f"groups must be one of {', '.join(GROUPINGS)} (got {groups!r})")
        d = np.asarray(diffraction)
        pos = np.asarray(positions)
        if d.ndim == 3 and self.channels > 1:
            # flat frames: group them with their neighbours, as make_groups does in training
            pos = check_positions(pos, d.shape[0], 1)[:, 0]  # [n, 2]
            idx = group_neighbors(pos[:, 0], pos[:, 1], self.gridsize)
            if groups == "cover":
                idx = idx[cover_groups(idx, d.shape[0])]
            x = prepare_diffraction(d, self.N, 1, counts, self.intensity_scale)[:, 0]
            return x[idx], pos[idx]
        x = prepare_diffraction(d, self.N, self.channels, counts, self.intensity_scale)
        return x, check_positions(pos, x.shape[0], self.channels)

    def stream(self, **kwargs: Any) -> StreamingReconstructor:
        """A StreamingReconstructor on this bundle (see ``inference.streaming``)."""
        return StreamingReconstructor(self, **kwargs)


def _case_size(case: dict[str, np.ndarray]) -> int:
    x = case.get("input.amplitude", case.get("input.diffraction"))
    return int(np.shape(x)[0]) if x is not None else 0


def _combine_into(out: np.ndarray, a: np.ndarray, b: np.ndarray, pair: str) -> None:
    """Fill complex64 ``out`` from the two real maps, without complex128 temporaries."""
    if pair == "amp_phase":
        out.real = a * np.cos(b)
        out.imag = a * np.sin(b)
    else:
        out.real = a
        out.imag = b


def load_bundle(path: str | os.PathLike, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                tensorrt: bool = False, intra_op_threads: Optional[int] = None,
                cuda_graph_batch: Optional[int] = None, self_test: bool = True, *, url: Optional[str] = None,
                model_name: Optional[str] = None, timeout_s: Optional[float] = None,
                retries: Optional[int] = None) -> Bundle:
    """Open a bundle (file, or folder with ``wts.h5``), verify format and checksums, start a backend.

    ``backend``: "auto" (ONNX if the bundle has it, else TorchScript), "onnx"
    or "torchscript" (needs torch). ``device``: "auto" | "cpu" | "cuda";
    ``precision``: "fp32" | "fp16" (CUDA only). Checksums are verified before
    any graph bytes reach onnxruntime or torch. GPU options: ``tensorrt=True``
    (TensorRT provider first), ``cuda_graph_batch=B`` (CUDA graph for a fixed batch).
    ``self_test``: re-run the stored parity cases through ``predict`` (cheap;
    catches params that no longer match the graph). Every problem with the
    file raises a ``BundleError`` subclass (see ``ptycho_runtime.format``).

    ``backend="triton"`` runs the graph on a Triton server at ``url``
    ("HOST:GRPC_PORT") as ``model_name`` (default "ptycho"), with per-call
    ``timeout_s`` and ``retries`` (``triton_backend``); everything else runs
    here, and ``device``/``precision`` are the server's. The server's model config must match this bundle (else
    ``ServerModelMismatchError``); an unreachable server raises
    ``ServerUnavailableError``. Needs ``pip install 'ptycho-runtime[triton]'``.
    """
    return Bundle(fmt.read_bundle(path), backend, device, precision, tensorrt, intra_op_threads, cuda_graph_batch,
                  self_test, url=url, model_name=model_name, timeout_s=timeout_s, retries=retries)
