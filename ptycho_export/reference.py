"""An iterative reference reconstruction with pty-chi (the APS engines), known probe, fixed positions.

``ptycho-export evaluate --reference`` puts a network's reconstruction next to
what a standard iterative engine gets from the same scan in a bounded number
of iterations: that is the comparison (quality, and speed-up over iterative)
users of PtychoPINN ask for. pty-chi (``pip install ptychi``, PyTorch based)
is what ptychodus uses as its iterative back end; it is an optional extra
(``pip install 'ptycho-export[reference]'``).

Conventions, checked against pty-chi 2.2.0's source and verified by
reconstructing noiseless simulated scans (see tests/torch/test_evaluate.py):

- **data**: pty-chi takes intensities with the DC term at the frame centre
  (``fft_shift=True`` moves it to the corner) and predicts them as
  |fft2(probe·patch)|² with numpy's unnormalised ("backward") FFT. Our NPZ
  holds the unitary amplitude |fft2(probe·patch)|/N (PtychoPINN contract,
  ``ptycho_export.data.simulate.far_field_amplitude``), so the intensities
  handed over are (N·diffraction)²: the known probe then needs no rescaling
  and the object comes out at its true transmission scale.
- **positions**: pty-chi's patch centre is pixel (N−1)/2 (``image_proc.
  extract_patches_fourier_shift``), the same as ours (``ptycho_runtime.geometry``);
  a frame at canvas position c starts at canvas pixel c − (N−1)/2. pty-chi
  adds ``position_origin_coords`` (``determine_position_origin_coords_by=
  SPECIFIED``) to the positions it is given.
- **a half-pixel trap**: by default pty-chi extracts object patches at
  "snapped" positions, round(position) + origin, and shifts the probe by the
  sub-pixel rest (``forward_models.get_probe_grid_position_data``, path
  without probe-grid resampling); the patch start is then round(snapped −
  (N−1)/2). For even N and an integer origin that is a tie (x.5), which
  torch rounds to even, so frames land ±0.5 px off depending on the parity of
  the position (measured: a noiseless raster scan reconstructs shifted by
  0.5 px, and the true object does not minimise pty-chi's own loss). With the
  origin at (N−1)/2 mod 1 = 0.5 and the positions handed over reduced by the
  same 0.5, snapped − (N−1)/2 is an integer and every frame lands exactly:
  positions given = object pixels − canvas origin − 0.5, origin = 0.5.
- **what stays fixed**: the probe and the positions (not optimised), and its
  object/probe-ambiguity removal and LSQML's first-epoch probe rescaling are
  switched off (both rescale the known probe).
- **global state**: a pty-chi task sets torch's default device and dtype;
  they are restored afterwards, so training code in the same process is not
  affected.

pty-chi imports ``torchvision`` for one Gaussian-blur helper (used to make
random initial guesses, which we never ask for). PyPI's torchvision wheels
are built against CUDA torch and fail to import next to the CPU torch wheel
this project pins, so when torchvision cannot be imported a stand-in module
that provides only that name (and raises if it is ever called) is put in
``sys.modules`` for the duration of ``import ptychi`` and removed again.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ptycho_runtime.reconstruction.stitching import Reconstruction, StitchCanvas, canvas_bounds

__all__ = ["ALGORITHMS", "DEFAULT_BATCH_SIZE", "DEFAULT_ITERATIONS", "ReferenceResult", "ReferenceUnavailableError",
           "import_ptychi", "run_reference"]

ALGORITHMS = ("epie", "lsqml")
DEFAULT_ITERATIONS = {"epie": 100, "lsqml": 50}
"""Epochs (passes over all positions): enough for a near-converged object on a CPU in minutes."""
DEFAULT_BATCH_SIZE = {"epie": 16, "lsqml": 32}
"""Positions per update. Mini-batch ePIE (16) converges almost as far per epoch as sequential ePIE (1) and
runs ~4x faster per epoch in pty-chi on a CPU."""
INSTALL_HINT = "install it with: pip install 'ptycho-export[reference]' (or: pip install ptychi)"


class ReferenceUnavailableError(ImportError):
    """pty-chi is not installed (or cannot be imported here)."""


@dataclass
class ReferenceResult:
    """A pty-chi reconstruction on the scan's object-pixel grid, with what it cost."""

    reconstruction: Reconstruction
    algorithm: str
    iterations: int
    batch_size: int
    wall_time_s: float
    engine: str
    loss: list[float] = field(default_factory=list)


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
    """Provide ``torchvision.transforms.GaussianBlur`` (never called by us) while pty-chi is imported."""
    if _torchvision_importable():
        yield
        return

    class GaussianBlur:  # pty-chi uses it only for random initial guesses, which run_reference never requests
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("torchvision is not usable in this environment; ptycho_export.reference does not "
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
    """``(ptychi.api, PtychographyTask, version)``; ReferenceUnavailableError with the install command if absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ReferenceUnavailableError(f"the iterative reference needs torch and pty-chi; {INSTALL_HINT}") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("ptychi")
    except PackageNotFoundError:
        raise ReferenceUnavailableError(f"the iterative reference needs pty-chi, which is not installed; "
                                        f"{INSTALL_HINT}") from None
    with _torchvision_stand_in():
        try:
            import ptychi.api as api
            from ptychi.api.task import PtychographyTask
        except ImportError as exc:
            raise ReferenceUnavailableError(f"pty-chi {ver} is installed but cannot be imported ({exc}); "
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


def _options(api: Any, algorithm: str, iterations: int, batch_size: int, seed: int, origin: float = 0.0) -> Any:
    if algorithm == "epie":
        opts = api.EPIEOptions()
        opts.object_options.alpha = 1.0  # the textbook ePIE step (Maiden & Rodenburg 2009); pty-chi's default is 0.1
    else:
        opts = api.LSQMLOptions()
        opts.reconstructor_options.noise_model = api.NoiseModels.GAUSSIAN  # scale-free: NPZ amplitudes are normalised
        opts.reconstructor_options.rescale_probe_intensity_in_first_epoch = False  # the probe is known
    opts.data_options.fft_shift = True  # our frames have DC at the centre
    opts.object_options.optimizable = True
    opts.object_options.step_size = 1.0
    opts.object_options.remove_object_probe_ambiguity.enabled = False  # would rescale the known probe
    opts.object_options.determine_position_origin_coords_by = api.ObjectPosOriginCoordsMethods.SPECIFIED
    opts.object_options.position_origin_coords = (float(origin), float(origin))
    opts.probe_options.optimizable = False
    opts.probe_position_options.optimizable = False
    opts.reconstructor_options.num_epochs = int(iterations)
    opts.reconstructor_options.batch_size = int(batch_size)
    opts.reconstructor_options.default_device = api.Devices.CPU
    opts.reconstructor_options.random_seed = int(seed)
    return opts


def run_reference(diffraction: np.ndarray, positions: np.ndarray, probe: np.ndarray, algorithm: str = "epie",
                  iterations: Optional[int] = None, batch_size: Optional[int] = None,
                  seed: int = 0) -> ReferenceResult:
    """Reconstruct a scan with pty-chi's ePIE or LSQML, the probe known and fixed.

    Args:
        diffraction: [n, N, N] normalised amplitudes (the NPZ contract), DC at the centre.
        positions: [n, 2] (x, y) frame centres in object pixels (frame pixel (N−1)/2).
        probe: [N, N] complex, at the scale the amplitudes were normalised with.
        algorithm: "epie" or "lsqml".
        iterations / batch_size: epochs and positions per update (defaults in
            ``DEFAULT_ITERATIONS`` / ``DEFAULT_BATCH_SIZE``).
        seed: pty-chi's random seed (batch order).

    Returns a ``ReferenceResult`` whose reconstruction lives on the same kind of
    canvas as ``Bundle.reconstruct`` (``x_coords``/``y_coords`` in object
    pixels) with ``weight`` = Σ|probe|² over positions (the illumination).
    ``wall_time_s`` covers building the task and running it (not the import).
    """
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown reference algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    iterations = DEFAULT_ITERATIONS[algorithm] if iterations is None else int(iterations)
    batch_size = DEFAULT_BATCH_SIZE[algorithm] if batch_size is None else int(batch_size)
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be >= 1 (got {iterations}, {batch_size})")
    d = np.asarray(diffraction, dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    p = np.asarray(probe)
    if d.ndim != 3 or d.shape[1] != d.shape[2]:
        raise ValueError(f"diffraction must have shape [n, N, N] (got {list(d.shape)})")
    n, N = d.shape[0], d.shape[1]
    if pos.shape != (n, 2):
        raise ValueError(f"positions must have shape [{n}, 2] to match the diffraction (got {list(pos.shape)})")
    if p.shape != (N, N):
        raise ValueError(f"probe must have shape ({N}, {N}) to match the frames (got {p.shape})")
    api, PtychographyTask, ver = import_ptychi()
    (x0, y0), (H, W) = canvas_bounds(pos, N, margin=2)  # pty-chi's sub-pixel shifts read one pixel beyond a patch
    intensities = ((N * d) ** 2).astype(np.float32)  # unitary amplitude → pty-chi's unnormalised-FFT intensity
    parity = ((N - 1) / 2) % 1  # 0.5 for even N: see the module docstring (half-pixel tie in pty-chi's snapping)
    opts = _options(api, algorithm, iterations, batch_size, seed, origin=parity)
    with _torch_defaults_restored(), warnings.catch_warnings():
        # pty-chi's internal loss bookkeeping triggers this torch warning; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*Converting a tensor with requires_grad=True to a scalar")
        t0 = time.perf_counter()
        task = PtychographyTask(
            opts,
            diffraction_data=intensities,
            object_data=np.ones((1, H, W), np.complex64),
            probe_data=p.astype(np.complex64)[None, None],
            probe_position_x_px=(pos[:, 0] - x0 - parity).astype(np.float32),
            probe_position_y_px=(pos[:, 1] - y0 - parity).astype(np.float32),
        )
        task.run()
        obj = task.get_data("object").detach().cpu().numpy()[0]
        elapsed = time.perf_counter() - t0
        table = getattr(getattr(task.reconstructor, "loss_tracker", None), "table", None)
        loss = [] if table is None else [float(v) for v in table["loss"].to_numpy()]
        del task
    canvas = StitchCanvas((H, W), N, (x0, y0), window=np.abs(p) ** 2)
    canvas.add(np.ones((n, N, N), np.complex64), pos)
    weight = canvas.result().weight
    recon = Reconstruction(object=obj.astype(np.complex64), weight=weight,
                           x_coords=x0 + np.arange(W, dtype=np.float64), y_coords=y0 + np.arange(H, dtype=np.float64))
    name = {"epie": "ePIE", "lsqml": "LSQML"}[algorithm]
    return ReferenceResult(reconstruction=recon, algorithm=algorithm, iterations=iterations, batch_size=batch_size,
                           wall_time_s=elapsed, engine=f"pty-chi {ver} {name}", loss=loss)
