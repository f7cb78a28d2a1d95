"""Cold start in a fresh interpreter: import + load + first inference of one pattern, runtime vs eager.

Each round starts a new Python process (timed around ``subprocess.run``: the
benchmark's own statistics). The child times its phases with
``time.perf_counter`` and prints them, with its peak RSS, as JSON:

- ``runtime``: ``import ptycho_runtime`` → ``load_bundle(path, device)`` (checksums,
  ONNX Runtime session) → first ``predict`` of one pattern;
- ``eager``: ``import torch`` + ``from ptycho_export.model_manager import load_torch_bundle``
  → ``load_torch_bundle(path, "diffraction_to_obj")`` (+ ``.cuda()``) → first forward.

The OS page cache is warm (the warm-up round reads the bundle), so this is a
warm-disk cold start: what a restarted service or a new worker pays.

Footprint = the child's peak RSS from ``/proc/self/status`` VmHWM. ``ru_maxrss``
(also recorded) is not the child's own on Linux: the high-water mark of the
parent (this pytest process, holding models) is carried across fork+exec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ._common import COLD_SIZES, CUDA_EP, REPO, SMOKE, common_info, ort_providers, torch_cuda_available

CHILD_PRELUDE = r"""
import json, resource, sys, time
def peak_rss_mib():
    # VmHWM: peak RSS of this process image. ru_maxrss is not usable here: Linux carries the parent's
    # high-water mark across fork+exec, so a child of a big pytest process reports the parent's RSS.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

RUNTIME_CHILD = CHILD_PRELUDE + r"""
t0 = time.perf_counter()
import numpy as np
import ptycho_runtime
t1 = time.perf_counter()
b = ptycho_runtime.load_bundle(sys.argv[1], device=sys.argv[2])
t2 = time.perf_counter()
C, N = b.channels, b.N
y = b.predict(np.random.default_rng(0).uniform(0, 1, (1, C, N, N)).astype(np.float32))  # not constant
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_mib": peak_rss_mib(),
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_imported": "torch" in sys.modules, "provider": b.providers[0], "out_shape": list(y.shape)}))
"""

EAGER_CHILD = CHILD_PRELUDE + r"""
t0 = time.perf_counter()
import torch
from ptycho_export.model_manager import load_torch_bundle
t1 = time.perf_counter()
model, params = load_torch_bundle(sys.argv[1], "diffraction_to_obj")
dev = torch.device(sys.argv[2])
model = model.to(dev)
t2 = time.perf_counter()
C, N = int(params["gridsize"]) ** 2, int(params["N"])
with torch.inference_mode():
    y = model(torch.full((1, C, N, N), 0.5 * float(params["intensity_scale"])).to(dev)).cpu()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_mib": peak_rss_mib(),
                  "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_imported": True, "provider": "torch " + dev.type, "out_shape": list(y.shape)}))
"""

CASES = [pytest.param(N, g, device, path, id=f"N{N}_g{g}-{device}-{path}",
                      marks=[pytest.mark.gpu] if device == "cuda" else [])
         for (N, g) in COLD_SIZES for device in ("cpu", "cuda") for path in ("runtime", "eager")]


def _run_child(code: str, bundle_path, device: str) -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    proc = subprocess.run([sys.executable, "-c", code, str(bundle_path), device], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("N,gridsize,device,path", CASES)
def test_cold_start(benchmark, bench_bundles, N, gridsize, device, path):
    if device == "cuda":
        if path == "runtime" and CUDA_EP not in ort_providers():
            pytest.skip(f"onnxruntime has no {CUDA_EP}")
        if path == "eager" and not torch_cuda_available():
            pytest.skip("torch sees no CUDA device")
    bb = bench_bundles(N, gridsize)
    code = RUNTIME_CHILD if path == "runtime" else EAGER_CHILD
    results: list[dict] = []
    walls: list[float] = []

    def once():
        t0 = time.perf_counter()
        r = _run_child(code, bb.path, device)
        walls.append(time.perf_counter() - t0)
        results.append(r)
        return r

    benchmark.group = f"cold_start_N{N}_g{gridsize}_{device}"
    rounds = 1 if SMOKE else int(os.environ.get("PTYCHO_BENCH_COLD_ROUNDS", "3"))
    if benchmark.disabled:
        benchmark.pedantic(once, rounds=1, warmup_rounds=0)
    else:
        benchmark.pedantic(once, rounds=rounds, warmup_rounds=1, iterations=1)
        results, walls = results[-rounds:], walls[-rounds:]
    if device == "cuda" and results[-1]["provider"] not in (CUDA_EP, "TensorrtExecutionProvider", "torch cuda"):
        pytest.skip(f"cold start on cuda ran on {results[-1]['provider']}")
    if path == "runtime":
        assert not results[-1]["torch_imported"], "importing ptycho_runtime pulled in torch"
    med = {k: float(np.median([r[k] for r in results]))
           for k in ("import_s", "load_s", "first_inference_s", "total_s")}
    wall = float(np.median(walls))
    benchmark.extra_info.update({
        "kind": "cold_start", "path": path, "device": device, "provider": results[-1]["provider"], "N": N,
        "gridsize": gridsize, "rounds": len(results), **med, "wall_s": wall,
        "interpreter_overhead_s": wall - med["total_s"],
        "peak_rss_mib": float(max(r["peak_rss_mib"] for r in results)),
        "ru_maxrss_mib": float(max(r["ru_maxrss_mib"] for r in results)),
        "bundle_mib": bb.path.stat().st_size / 2**20, "raw": results, **common_info(),
    })
