"""Settings, bundle cache and timing helpers shared by the benchmark modules.

Environment:
- ``PTYCHO_BENCH_SMOKE=1``: one small model (N=64, gridsize 1, n_filters_scale 1), batches (1, 8),
  fewer positions and rounds: a functional check that finishes in well under a minute.
- ``PTYCHO_BENCH_SIZES=64x1,128x1`` / ``PTYCHO_BENCH_BATCHES=1,8``: override the sizes / batches.
- ``PTYCHO_BENCH_TARGET_S``: wall time aimed at per timed case (default 1.5 s).
- ``PTYCHO_BENCH_CACHE``: where built bundles are kept (default ``benchmarks/.cache``).
- ``PTYCHO_BENCH_THREADS``: torch threads and onnxruntime intra-op threads (default: each library's own
  default, i.e. one per core); 1 makes runs on a busy machine comparable (see README).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SMOKE = os.environ.get("PTYCHO_BENCH_SMOKE", "").strip().lower() not in ("", "0", "false", "no")
N_FILTERS_SCALE = 1 if SMOKE else 2  # 2 is the default architecture (params.cfg, ModelConfig)
SEED = 0


def _sizes() -> list[tuple[int, int]]:
    given = os.environ.get("PTYCHO_BENCH_SIZES")
    if given:
        out = []
        for item in given.split(","):
            n, g = item.lower().strip().split("x")
            out.append((int(n), int(g)))
        return out
    return [(64, 1)] if SMOKE else [(64, 1), (64, 2), (128, 1)]


def _batches() -> tuple[int, ...]:
    given = os.environ.get("PTYCHO_BENCH_BATCHES")
    if given:
        return tuple(int(b) for b in given.split(","))
    return (1, 8) if SMOKE else (1, 8, 64, 256)


THREADS = int(os.environ["PTYCHO_BENCH_THREADS"]) if os.environ.get("PTYCHO_BENCH_THREADS") else None
SIZES = _sizes()
BATCHES = _batches()
TARGET_S = float(os.environ.get("PTYCHO_BENCH_TARGET_S", "0.5" if SMOKE else "1.5"))
# end-to-end reconstruction: a 64×64-pattern scan of this many random positions
RECON_POSITIONS = 256 if SMOKE else 2000
RECON_OBJECT = 384 if SMOKE else 1024  # object side in pixels (≈2× overlap of the N/2 stitching crops)
RECON_BATCH = 64
COLD_SIZES = [s for s in SIZES if s[1] == 1][:2] or SIZES[:1]

MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

CPU_PATHS = ("eager", "eager_channels_last", "torchscript", "ort_cpu")
GPU_PATHS = ("eager_cuda", "ort_cuda", "ort_tensorrt_fp16")
PATHS = CPU_PATHS + GPU_PATHS


def torch_cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"


def ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def runtime_on_gpu(bb, want: str, **kwargs):
    """The runtime's ONNX backend on a GPU provider, or pytest.skip with the reason."""
    import pytest

    available = ort_providers()
    if CUDA_EP not in available:
        pytest.skip(f"onnxruntime has no {CUDA_EP} (providers: {available}); install onnxruntime-gpu on a CUDA host")
    if want == TRT_EP and TRT_EP not in available:
        pytest.skip(f"onnxruntime has no {TRT_EP} (providers: {available})")
    try:
        rt = bb.runtime(backend="onnx", device="cuda", **kwargs)
    except Exception as exc:  # noqa: BLE001 - DeviceUnavailableError, missing CUDA/TensorRT libraries, …
        pytest.skip(f"{want} unusable: {type(exc).__name__}: {exc}")
    if rt.providers[0] != want:
        pytest.skip(f"{want} requested but the session runs on {rt.providers}")
    return rt


def gpu_name() -> Optional[str]:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - any failure: no GPU name to report
        return None


def malloc_env() -> dict[str, Optional[str]]:
    return {k: os.environ.get(k) for k in MALLOC_VARS}


def malloc_tuned() -> bool:
    return all(os.environ.get(k) for k in MALLOC_VARS)


def group_name(N: int, gridsize: int, batch: int) -> str:
    return f"N{N}_g{gridsize}_b{batch}"


# --------------------------------------------------------------------------- bundles


def _source_digest() -> str:
    """Hash of the sources a bundle's bytes depend on, so an edited model or exporter rebuilds the cache."""
    import ptycho_export
    import ptycho_runtime

    h = hashlib.sha256()
    roots = [Path(ptycho_export.__file__).parent, Path(ptycho_runtime.__file__).parent]
    names = ["model.py", "physics.py", "config.py", "params.py", "model_manager.py", "export.py", "bundle_format.py"]
    for root in roots:
        for name in names:
            p = root / name
            if p.exists():
                h.update(name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def bundle_key(N: int, gridsize: int, n_filters_scale: int) -> dict[str, Any]:
    import onnx
    import torch

    import ptycho_export
    import ptycho_runtime

    return {"N": N, "gridsize": gridsize, "n_filters_scale": n_filters_scale, "seed": SEED,
            "ptycho_export": getattr(ptycho_export, "__version__", "?"),
            "ptycho_runtime": getattr(ptycho_runtime, "__version__", "?"),
            "torch": torch.__version__, "onnx": onnx.__version__, "sources": _source_digest()}


def cache_dir() -> Path:
    d = Path(os.environ.get("PTYCHO_BENCH_CACHE", HERE / ".cache"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_bundle(path: Path, N: int, gridsize: int, n_filters_scale: int) -> dict[str, Any]:
    """Freshly initialised default-architecture model → bundle with TorchScript + ONNX graphs (atomic)."""
    import torch

    from ptycho_export.config import ModelConfig
    from ptycho_export.export import add_graphs_to_bundle
    from ptycho_export.model import build_models
    from ptycho_export.model_manager import save_torch_bundle

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        config = ModelConfig(N=N, gridsize=gridsize, n_filters_scale=n_filters_scale)
        torch.manual_seed(SEED)
        models = build_models(config)  # an explicit config: params.cfg plays no part
        save_torch_bundle(models, tmp, config)
        t0 = time.perf_counter()
        summary = add_graphs_to_bundle(tmp)
        summary["wall_s"] = time.perf_counter() - t0
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return summary


def cached_bundle(N: int, gridsize: int, n_filters_scale: int = N_FILTERS_SCALE) -> Path:
    """Path of a verified cached bundle for these settings; built (≈10–20 s) if missing or stale."""
    from ptycho_runtime import format as fmt

    key = bundle_key(N, gridsize, n_filters_scale)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    stem = f"bundle_N{N}_g{gridsize}_s{n_filters_scale}"
    path = cache_dir() / f"{stem}_{digest}.h5"
    if path.exists():
        try:
            fmt.read_bundle(path)  # format + checksums
            return path
        except Exception:  # noqa: BLE001 - corrupt or from an incompatible reader: rebuild
            path.unlink()
    for old in list(cache_dir().glob(f"{stem}_*.h5")) + list(cache_dir().glob(f"{stem}_*.json")):
        old.unlink(missing_ok=True)  # stale keys for the same settings
    summary = build_bundle(path, N, gridsize, n_filters_scale)
    path.with_suffix(".json").write_text(json.dumps({"key": key, "build": summary}, indent=1, default=str))
    return path


@dataclass(eq=False)
class BenchBundle:
    """One cached bundle and everything the benchmarks build from it (built lazily, once per session)."""

    N: int
    gridsize: int
    path: Path
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.gridsize**2

    def release(self) -> None:
        """Drop models, sessions and inputs (keep the small facts), so sizes do not pile up in memory."""
        keep = ("contents", "n_params", "flops")
        self._cache = {k: v for k, v in self._cache.items() if k in keep}

    def _memo(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def contents(self):
        from ptycho_runtime import format as fmt

        return self._memo("contents", lambda: fmt.read_bundle(self.path))

    @property
    def intensity_scale(self) -> float:
        return float(self.contents.params["intensity_scale"])

    @property
    def eager(self):
        """The bundle's diffraction_to_obj rebuilt in eager PyTorch (CPU, eval)."""
        def make():
            from ptycho_export.model_manager import models_from_contents

            return models_from_contents(self.contents, ["diffraction_to_obj"])["diffraction_to_obj"]  # no CONFIG-001

        return self._memo("eager", make)

    @property
    def n_params(self) -> int:
        from ptycho_export.model import count_parameters

        return self._memo("n_params", lambda: int(count_parameters(self.eager)))

    @property
    def flops_per_pattern(self) -> int:
        return self._memo("flops", lambda: count_flops(self.eager, self.N, self.channels)[0])

    def input(self, batch: int) -> np.ndarray:
        """Deterministic float32 [batch, C, N, N] in photon units (the graphs' input contract)."""
        def make():
            rng = np.random.default_rng(1000 + batch)
            x = rng.random((batch, self.channels, self.N, self.N), dtype=np.float32)
            return np.ascontiguousarray(x * np.float32(self.intensity_scale))

        return self._memo(f"input{batch}", make)

    def torchscript(self):
        def make():
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = self.contents.graph("torchscript", "diffraction_to_obj").data
                return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()

        return self._memo("torchscript", make)

    def runtime(self, **kwargs: Any):
        """``ptycho_runtime.load_bundle(path, **kwargs)``, once per distinct kwargs."""
        from ptycho_runtime import load_bundle

        if THREADS and kwargs.get("device", "auto") == "cpu":
            kwargs = {**kwargs, "intra_op_threads": THREADS}
        key = "runtime:" + json.dumps(kwargs, sort_keys=True)
        return self._memo(key, lambda: load_bundle(self.path, **kwargs))


def count_flops(model, N: int, channels: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward pass per pattern (torch.utils.flop_counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.ones(1, channels, N, N)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


# --------------------------------------------------------------------------- timing


def timed_pedantic(benchmark, fn: Callable[[], Any], target_s: Optional[float] = None, min_rounds: int = 5,
                   max_rounds: int = 200, slow_rounds: int = 3, estimate_s: Optional[float] = None
                   ) -> Optional[np.ndarray]:
    """Run ``fn`` under ``benchmark.pedantic`` with rounds sized so the case takes about ``target_s``.

    One untimed call first (first-call work: allocator growth, TorchScript
    profiling, TensorRT engine build) and, when it was quick, a second one to
    size the rounds; then ``pedantic(rounds, warmup_rounds=1)``. A call so slow
    that ``min_rounds`` would overshoot the target several times (e.g. batch
    256 at N=128 on two CPU cores) gets ``slow_rounds`` rounds and no further
    warm-up (the untimed call, or the caller's, was it). Returns the raw per-round seconds, or
    None when benchmarks are disabled (then ``fn`` runs once, as a functional
    check). With ``estimate_s`` (the caller warmed up on a smaller call and
    extrapolated) no untimed full-size call is made.
    """
    target_s = TARGET_S if target_s is None else target_s
    if benchmark.disabled:
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0)
        return None
    if estimate_s is not None:
        dt, untimed = float(estimate_s), 0
    else:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        untimed = 1
    if dt < 1.0 and estimate_s is None:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        untimed += 1
    if dt * min_rounds > 3 * target_s and dt > 1.0:
        rounds, warmup = slow_rounds, 0
    else:
        rounds, warmup = int(max(min_rounds, min(max_rounds, target_s / max(dt, 1e-6)))), 1
    load0, cpu0, wall0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    benchmark.extra_info.update({
        "untimed_calls": untimed + warmup,
        # contention indicators: the host's 1-minute load average around the case (> CPU count: other
        # processes were competing), and this process's CPU seconds per wall second while it ran
        "loadavg_1m": max(load0, os.getloadavg()[0]),
        "cpu_per_wall": (cpu1 - cpu0) / max(wall1 - wall0, 1e-9),
    })
    return np.asarray(benchmark.stats.stats.data, dtype=np.float64)


def latency_info(data: Optional[np.ndarray], items: int) -> dict[str, Any]:
    """p50/p99 per call (ms) and throughput from raw per-round timings."""
    if data is None or data.size == 0:
        return {}
    p50, p99 = np.percentile(data, [50, 99])
    return {"rounds": int(data.size), "p50_ms": float(p50 * 1e3), "p99_ms": float(p99 * 1e3),
            "min_ms": float(data.min() * 1e3), "patterns_per_s": float(items / p50),
            "us_per_pattern": float(p50 / items * 1e6)}


def thread_info() -> dict[str, Any]:
    import torch

    return {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "bench_threads": THREADS}


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnxruntime", "numpy", "h5py"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def common_info() -> dict[str, Any]:
    return {"smoke": SMOKE, "n_filters_scale": N_FILTERS_SCALE, "malloc_tuned": malloc_tuned(),
            "malloc_env": malloc_env(), **thread_info(), "versions": versions()}
