"""pty-chi (the APS engines) as a second refinement engine: LSQML or ePIE seeded with the network's object.

The built-in engine (``ptycho_runtime.refinement``) keeps torch-free hosts
able to refine. Where torch and pty-chi are installed, a well-kept engine
with probe (and, upstream, position) correction should not be rewritten by
hand, so ``refine(..., engine="ptychi")`` hands the same problem to
pty-chi: the starting object on the start's own grid, the scan's probe,
the measured amplitudes. LSQML is the default: it converges furthest per
epoch on the project's scans (docs/fidelity.md).

Conventions, checked against pty-chi 2.2.0's source and verified by
reconstructing noiseless simulated scans (tests/torch/test_evaluate.py):

- **data**: pty-chi takes intensities with the DC term at the frame centre
  (``fft_shift=True``) and predicts them as |fft2(probe·patch)|² with numpy's
  unnormalised FFT. Our amplitudes are the unitary |fft2(probe·patch)|/N
  (the runtime's convention), so the intensities handed over are
  (N·amplitude)²: the probe then needs no rescaling and the object keeps
  its transmission scale.
- **positions**: pty-chi's patch centre is pixel (N−1)/2, the same as ours
  (``geometry``); pty-chi adds ``position_origin_coords`` to the positions
  it is given.
- **a half-pixel trap**: pty-chi extracts object patches at round(position)
  + origin and shifts the probe by the rest. For even N and an integer
  origin the patch start is a tie (x.5) that torch rounds to even, so frames
  land ±0.5 px off by the parity of the position (a noiseless raster scan
  reconstructs shifted by 0.5 px). With the origin at (N−1)/2 mod 1 and the
  positions reduced by the same amount, every frame lands exactly.
- **what stays fixed**: the positions, always; the probe unless
  ``refine_probe``. Object/probe-ambiguity removal and LSQML's first-epoch
  probe rescaling are off (both rescale the scan's probe).
- **global state**: a pty-chi task sets torch's default device and dtype;
  they are restored afterwards.

pty-chi imports ``torchvision`` for one Gaussian-blur helper (random initial
guesses, which are never asked for here). PyPI's torchvision wheels are
built against CUDA torch and fail to import next to the CPU torch wheel, so
when torchvision cannot be imported a stand-in that provides only that name
(and raises if it is ever called) is in ``sys.modules`` while ``ptychi`` is
imported, and removed again.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import types
import warnings
from dataclasses import replace
from typing import Any, Iterator, Optional

import numpy as np

from ..reconstruction.stitching import Reconstruction
from .result import CancelFn, ProgressFn, RefinementCancelled, RefineResult, cancel_requested

ALGORITHMS = ("lsqml", "epie")
DEFAULT_ALGORITHM = "lsqml"
DEFAULT_BATCH_SIZE = {"epie": 16, "lsqml": 32}
"""Positions per update. Mini-batch ePIE (16) converges almost as far per epoch as sequential ePIE (1) and
runs ~4x faster per epoch in pty-chi on a CPU; LSQML's own default batching is 32-ish."""
PAD = 2
"""Free-space pixels added around the grid: pty-chi's sub-pixel shifts read one pixel beyond a patch."""
INSTALL_HINT = "install it with: pip install ptychi (it needs torch)"


class PtychiUnavailableError(ImportError):
    """pty-chi (or torch) is not installed, or cannot be imported here; the message names the install."""


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision.transforms")
        return True
    except Exception:  # noqa: BLE001 - ImportError, or the RuntimeError a CUDA-built wheel raises next to CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Provide ``torchvision.transforms.GaussianBlur`` (never called here) while pty-chi is imported."""
    if _torchvision_importable():
        yield
        return

    class GaussianBlur:  # pty-chi uses it only for random initial guesses, which are never requested
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not usable in this environment; the pty-chi engine does not "
                               "support pty-chi features that need it (random initial guesses)")

    tv = types.ModuleType("torchvision")
    tvt = types.ModuleType("torchvision.transforms")
    tvt.GaussianBlur = GaussianBlur  # type: ignore[attr-defined]
    tv.transforms = tvt  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tvt
    try:
        yield
    finally:
        for name in ("torchvision.transforms", "torchvision"):
            if sys.modules.get(name) in (tv, tvt):
                del sys.modules[name]


def import_ptychi() -> tuple[Any, Any, str]:
    """``(ptychi.api, PtychographyTask, version)``; PtychiUnavailableError with the install command if absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise PtychiUnavailableError(f"the pty-chi engine needs torch and pty-chi; {INSTALL_HINT}") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ptychi")
    except PackageNotFoundError:
        raise PtychiUnavailableError(f"the pty-chi engine needs pty-chi, which is not installed; "
                                     f"{INSTALL_HINT}") from None
    with _torchvision_stand_in():
        try:
            import ptychi.api as api
            from ptychi.api.task import PtychographyTask
        except ImportError as exc:
            raise PtychiUnavailableError(f"pty-chi {ver} is installed but cannot be imported ({exc}); "
                                         f"{INSTALL_HINT}") from None
    return api, PtychographyTask, ver


@contextlib.contextmanager
def _torch_defaults_restored() -> Iterator[None]:
    import torch

    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_default_device(device)


def _options(api: Any, algorithm: str, iterations: int, batch_size: int, seed: int, origin: float,
             refine_probe: bool, device: str) -> Any:
    if algorithm == "epie":
        opts = api.EPIEOptions()
        opts.object_options.alpha = 1.0  # the textbook ePIE step (Maiden & Rodenburg 2009); pty-chi's default is 0.1
    else:
        opts = api.LSQMLOptions()
        opts.reconstructor_options.noise_model = api.NoiseModels.GAUSSIAN  # scale-free on normalised amplitudes
        opts.reconstructor_options.rescale_probe_intensity_in_first_epoch = False  # the probe's scale is the data's
    opts.data_options.fft_shift = True  # our frames have DC at the centre
    opts.object_options.optimizable = True
    opts.object_options.step_size = 1.0
    opts.object_options.remove_object_probe_ambiguity.enabled = False  # would rescale the scan's probe
    opts.object_options.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    opts.object_options.position_origin_coords = (float(origin), float(origin))
    opts.probe_options.optimizable = bool(refine_probe)
    opts.probe_position_options.optimizable = False  # positions stay fixed (docs/fidelity.md)
    opts.reconstructor_options.num_epochs = int(iterations)
    opts.reconstructor_options.batch_size = int(batch_size)
    opts.reconstructor_options.default_device = api.Devices.GPU if device == "cuda" else api.Devices.CPU
    opts.reconstructor_options.random_seed = int(seed)
    return opts


def run_ptychi(amplitude: np.ndarray, positions: np.ndarray, probe: np.ndarray, start: Reconstruction, *,
               algorithm: str = DEFAULT_ALGORITHM, iterations: int, batch_size: Optional[int] = None,
               refine_probe: bool = False, device: str = "cpu", seed: int = 0,
               progress: Optional[ProgressFn] = None,
               cancel: Optional[CancelFn] = None) -> tuple[Reconstruction, np.ndarray, dict[str, Any]]:
    """``iterations`` pty-chi epochs from ``start``'s object; returns (object on start's grid, probe, record).

    ``amplitude`` [n, N, N] in the probe's units (DC at N/2), ``positions``
    [n, 2] (x, y) on ``start``'s grid, ``probe`` [N, N]. Epochs run in about
    twenty chunks; ``progress(done, total)`` is called after each and
    ``cancel`` (a callable or a ``threading.Event``) checked before each (a
    True stops early: the record says ``"cancelled": True`` and how many
    epochs ran; ``refine_ptychi`` turns that into ``RefinementCancelled``). The record names the
    engine, algorithm, epochs, batch size, device, whether the probe was
    updated, the loss per epoch and the wall time (task building included,
    the import not).
    """
    algorithm = str(algorithm).lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown pty-chi algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (got {device!r})")
    batch_size = DEFAULT_BATCH_SIZE[algorithm] if batch_size is None else int(batch_size)
    if isinstance(iterations, bool) or int(iterations) < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be integers >= 1 (got {iterations!r}, {batch_size!r})")
    iterations = int(iterations)
    amp = np.asarray(amplitude, dtype=np.float64)
    P = np.asarray(probe, dtype=np.complex64)
    if amp.ndim != 3 or amp.shape[1:] != P.shape or P.shape[0] != P.shape[1]:
        raise ValueError(f"amplitude must be [n, N, N] with the probe's [N, N] (got {list(amp.shape)} and "
                         f"{list(P.shape)})")
    n, N = amp.shape[0], P.shape[0]
    pos = np.asarray(positions, dtype=np.float64)
    if pos.shape != (n, 2) or not np.all(np.isfinite(pos)):
        raise ValueError(f"positions must be finite (x, y) pairs, shape [{n}, 2] (got {list(pos.shape)})")
    api, PtychographyTask, ver = import_ptychi()

    H, W = start.object.shape
    x0, y0 = float(start.x_coords[0]) - PAD, float(start.y_coords[0]) - PAD
    seed_object = np.ones((1, H + 2 * PAD, W + 2 * PAD), np.complex64)
    seed_object[0, PAD:PAD + H, PAD:PAD + W] = np.where(start.covered, start.object, np.complex64(1.0))
    parity = ((N - 1) / 2) % 1  # 0.5 for even N: the half-pixel tie in pty-chi's snapping (module docstring)
    intensities = ((N * amp) ** 2).astype(np.float32)  # unitary amplitude → pty-chi's unnormalised-FFT intensity
    opts = _options(api, algorithm, iterations, batch_size, seed, parity, refine_probe, device)
    chunk = max(1, iterations // 20)
    done, cancelled = 0, False
    with _torch_defaults_restored(), warnings.catch_warnings():
        # pty-chi's internal loss bookkeeping triggers this torch warning; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar")
        t0 = time.perf_counter()
        task = PtychographyTask(
            opts,
            diffraction_data=intensities,
            object_data=seed_object,
            probe_data=P[None, None],
            probe_position_x_px=(pos[:, 0] - x0 - parity).astype(np.float32),
            probe_position_y_px=(pos[:, 1] - y0 - parity).astype(np.float32),
        )
        while done < iterations:
            if cancel_requested(cancel):
                cancelled = True
                break
            step = min(chunk, iterations - done)
            task.run(n_epochs=step)
            done += step
            if progress is not None:
                progress(done, iterations)
        obj = task.get_data("object").cpu().numpy()[0, PAD:PAD + H, PAD:PAD + W]
        new_probe = task.get_data("probe").cpu().numpy()[0, 0] if refine_probe else P.copy()
        elapsed = time.perf_counter() - t0
        table = getattr(getattr(task.reconstructor, "loss_tracker", None), "table", None)
        loss = [] if table is None else [float(v) for v in table["loss"].to_numpy()]
        del task
    name = {"epie": "ePIE", "lsqml": "LSQML"}[algorithm]
    record: dict[str, Any] = {
        "engine": "ptychi", "engine_version": ver, "algorithm": name, "backend": "torch", "device": device,
        "sweeps": done, "sweeps_requested": iterations, "batching": f"pty-chi random, {batch_size} positions",
        "batch_size": batch_size, "probe_updated": bool(refine_probe), "positions_updated": False,
        "cancelled": cancelled, "loss": loss, "wall_s": elapsed,
    }
    recon = replace(start, object=obj.astype(np.complex64), weight=start.weight.copy())  # same grid and metres
    return recon, new_probe.astype(np.complex64), record


def refine_ptychi(start: Reconstruction, amplitude: np.ndarray, positions: np.ndarray, probe: np.ndarray, *,
                  iterations: int, algorithm: str = DEFAULT_ALGORITHM, refine_probe: bool = False,
                  device: str = "cpu", batch_size: Optional[int] = None, seed: int = 0,
                  progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> RefineResult:
    """``refine(..., engine="ptychi")``: pty-chi from ``start``, as a ``RefineResult`` like the built-in engine's.

    A cancel raises ``RefinementCancelled`` whose ``partial`` holds the epochs that ran.
    """
    recon, new_probe, record = run_ptychi(amplitude, positions, probe, start, algorithm=algorithm,
                                          iterations=iterations, batch_size=batch_size, refine_probe=refine_probe,
                                          device=device, seed=seed, progress=progress, cancel=cancel)
    result = RefineResult(reconstruction=recon, probe=new_probe, record=record)
    if record["cancelled"]:
        raise RefinementCancelled(f"pty-chi refinement cancelled after {record['sweeps']} of {iterations} epochs",
                                  partial=result)
    return result
