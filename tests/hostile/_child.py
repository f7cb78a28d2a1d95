"""Run one reader over many hostile cases in this process; print one JSON line per case.

``python _child.py READER CASES.json``. After the imports and one legitimate
load, the address space is capped at its current size + 1 GiB (on top of the
cap the parent sets in ``preexec_fn``), so a reader that tries to allocate a
declared shape fails loudly (MemoryError, reported as a non-library error).
"""

import contextlib
import io
import json
import os
import resource
import sys
import time
import warnings

warnings.simplefilter("ignore")
reader, cases_file = sys.argv[1], sys.argv[2]
cases = json.loads(open(cases_file).read())

from ptycho_runtime import format as fmt  # noqa: E402

if reader in ("load_torch_bundle", "export_inspect", "export_verify", "load_bundle_ts"):
    import torch  # noqa: F401,E402  (imported before the cap, as an application would have it)

    torch.set_num_threads(1)


def call(path: str):
    """→ exit code (CLIs) or None (library calls), stderr text."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if reader == "read_bundle":
            fmt.read_bundle(path)
            return None, ""
        if reader == "load_bundle":
            import ptycho_runtime

            ptycho_runtime.load_bundle(path, intra_op_threads=1)
            return None, ""
        if reader == "load_bundle_ts":
            import ptycho_runtime

            ptycho_runtime.load_bundle(path, backend="torchscript")
            return None, ""
        if reader == "load_torch_bundle":
            from ptycho_export.model_manager import load_torch_bundle

            load_torch_bundle(path)
            return None, ""
        if reader == "runtime_info":
            from ptycho_runtime.cli import main

            code = main(["info", path])
        elif reader == "export_inspect":
            from ptycho_export.cli import main

            code = main(["inspect", path])
        elif reader == "export_verify":
            from ptycho_export.cli import main

            code = main(["verify", path, "--backend", "eager", "--backend", "torchscript",
                         "--backend", "onnxruntime-cpu"])
        else:
            raise SystemExit(f"unknown reader {reader}")
    return code, err.getvalue()


def vm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


legit_path = cases[0]["path"]
for i, case in enumerate(cases):
    if i == 1:  # after the legitimate case: cap the address space
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = vm_bytes() + 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    os.chdir(case["cwd"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        code, err = call(case["path"])
        outcome = "ok"
    except fmt.BundleError as exc:
        code, err, outcome = None, str(exc), f"bundle:{type(exc).__name__}"
    except BaseException as exc:  # noqa: BLE001 - exactly what the test is looking for
        code, err, outcome = None, f"{type(exc).__name__}: {exc}"[:500], f"other:{type(exc).__name__}"
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"case": case["name"], "outcome": outcome, "exit": code, "stderr": err[-2000:],
                      "elapsed": elapsed, "rss_growth_kb": rss1 - rss0}), flush=True)
