"""The ``ptycho-runtime`` commands that reach beyond one process: ``triton-repo``, ``serve``, ``infer-many``.

Kept apart from ``cli.infer`` so the single-machine commands never import what
these need (tritonclient, PyTriton, Dask: each an optional extra); a missing
extra is a usage error (exit 2) that names the ``pip install`` to run.

    ptycho-runtime triton-repo BUNDLE OUT_DIR [--name NAME] [--max-batch-size B] [--instances gpu:2|cpu:1]
                               [--tensorrt-fp16] [--max-queue-delay-us US]
    ptycho-runtime serve BUNDLE [--http-port P] [--grpc-port P] [--max-batch-size B] [--max-queue-delay-us US] ...
    ptycho-runtime infer-many BUNDLE SCAN... -o OUT_DIR [--scheduler local|tcp://HOST:8786] [--workers N]
                              [--chunk-frames K] [--refine [SWEEPS] | --no-refine] [--refine-max-sweeps N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..inference.backends import DEVICES
from .common import EXIT_SCANS_FAILED, UsageError, add_scan_arguments

EPILOG = """\
exit codes:
  0  success
  1  unexpected error (a bug: please report it with the --debug traceback)
  2  bad input: missing file, not a bundle, unusable option, missing optional extra
  3  remote failure: the Triton server or Dask scheduler is unreachable, went away, timed out,
     or serves a different model
  4  checksum failure: the bundle is damaged or was modified
  5  infer-many: some scans failed (each is named on stderr); the others were written
"""


def _usage(exc: ImportError) -> Exception:
    return UsageError(str(exc))


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from ..distributed.triton_repository import write_model_repository

    model_dir = write_model_repository(args.bundle, args.out_dir, name=args.name, max_batch_size=args.max_batch_size,
                                       instances=args.instances, tensorrt_fp16=args.tensorrt_fp16,
                                       max_queue_delay_us=args.max_queue_delay_us)
    print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / '1' / 'model.onnx'}; serve with: tritonserver "
          f"--model-repository {Path(args.out_dir).resolve()}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..distributed.serve import serve

    try:
        serve(args.bundle, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
              max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us, model_name=args.name,
              device=args.device, instances=args.instances, host=args.host, intra_op_threads=args.threads)
    except ImportError as exc:
        raise _usage(exc) from None
    return 0


def cmd_infer_many(args: argparse.Namespace) -> int:
    from ..distributed.infer_many import dask_client, infer_many
    from ..inference.scan_refinement import RefineSettings
    from ..refinement import DEFAULT_SWEEPS

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {args.workers})")
    if args.refine is not None and args.refine < 0:
        raise UsageError(f"--refine must be >= 0 sweeps (got {args.refine}; 0 or --no-refine: off)")
    if args.refine_max_sweeps < 0:
        raise UsageError(f"--refine-max-sweeps must be >= 0 (got {args.refine_max_sweeps})")
    sweeps = args.refine if args.refine is not None else DEFAULT_SWEEPS  # on by default, as infer
    refine = RefineSettings(sweeps=sweeps, max_sweeps=args.refine_max_sweeps) if sweeps else 0
    threads = None
    if args.scheduler == "local":  # share this machine's cores between the worker processes
        threads = max(1, (os.cpu_count() or 1) // (args.workers or 2))
    written: list[Any] = []

    def report(r: Any) -> None:
        if r.ok:
            written.append(r)
            how = f", refined ({r.refinement.get('sweeps')} sweeps)" if r.refinement else ""
            print(f"{Path(r.scan).name} -> {r.output}: {r.n_patterns} patterns in {r.elapsed_s:.2f} s{how}",
                  file=sys.stderr)
        else:
            print(f"{Path(r.scan).name}: FAILED: {r.error}", file=sys.stderr)

    try:
        with dask_client(args.scheduler, args.workers) as client:
            results = infer_many(client, args.bundle, args.scans, args.output, chunk_frames=args.chunk_frames,
                                 batch_size=args.batch_size, units="counts" if args.counts else args.units,
                                 position_centre=args.position_centre, device=args.device,
                                 intra_op_threads=threads, on_result=report, refine=refine)
    except ImportError as exc:
        raise _usage(exc) from None
    failed = [r for r in results if not r.ok]
    print(f"infer-many: {len(results) - len(failed)} of {len(results)} scans written to {args.output}"
          + (f"; {len(failed)} failed" if failed else ""), file=sys.stderr)
    return EXIT_SCANS_FAILED if failed else 0


def add_cluster_commands(sub: Any) -> None:
    """Add ``triton-repo``, ``serve`` and ``infer-many`` to the ``ptycho-runtime`` sub-command parser."""
    from ..distributed.infer_many import DEFAULT_CHUNK_FRAMES
    from ..distributed.triton_repository import (
        DEFAULT_INSTANCES,
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_QUEUE_DELAY_US,
        DEFAULT_MODEL_NAME,
    )
    from ..inference.scan_refinement import MAX_SWEEPS_HELP, RefineSettings
    from ..refinement import DEFAULT_SWEEPS

    fmt_class = argparse.RawDescriptionHelpFormatter

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    def batching(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default=DEFAULT_MODEL_NAME,
                       help=f"Triton model name (default {DEFAULT_MODEL_NAME}; clients pass it as model_name)")
        p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, metavar="B",
                       help=f"largest batch Triton forms from queued requests (default {DEFAULT_MAX_BATCH_SIZE})")
        p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US, metavar="US",
                       help="longest a request waits for others to batch with, in microseconds (default "
                            f"{DEFAULT_MAX_QUEUE_DELAY_US})")

    p = sub.add_parser("triton-repo", help="write a Triton model repository (model.onnx + config.pbtxt) for a bundle",
                       description="Write OUT_DIR/NAME/1/model.onnx (the bundle's verified diffraction_to_obj "
                                   "graph) and OUT_DIR/NAME/config.pbtxt for Triton's ONNX Runtime backend, with "
                                   "dynamic batching and the bundle's identity (ptycho.sha256, N, gridsize, "
                                   "intensity_scale, output_mode) as parameters the triton client backend checks.",
                       epilog=EPILOG, formatter_class=fmt_class)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("out_dir", metavar="OUT_DIR", help="model repository folder (other models in it are kept)")
    batching(p)
    p.add_argument("--instances", default=DEFAULT_INSTANCES, metavar="KIND:COUNT",
                   help=f"instance group: gpu:K or cpu:K model instances (default {DEFAULT_INSTANCES})")
    p.add_argument("--tensorrt-fp16", action="store_true",
                   help="run through ONNX Runtime's TensorRT accelerator in fp16 (GPU instances only)")
    common(p)
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("serve", help="serve a bundle with a real Triton server (PyTriton), for triton clients",
                       description="Start Triton Inference Server (from nvidia-pytriton) with the bundle's graph "
                                   "bound to the runtime's ONNX Runtime session, with dynamic batching. Clients "
                                   "use load_bundle(BUNDLE, backend='triton', url='HOST:GRPC_PORT'). Needs "
                                   "pip install 'ptycho-runtime[serve]' in a venv from a Python that ships "
                                   "libpython (e.g. Debian's python3.11), numpy<2. Stops on Ctrl-C or SIGTERM.",
                       epilog=EPILOG, formatter_class=fmt_class)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all interfaces)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port, the one clients use (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    batching(p)
    p.add_argument("--device", choices=DEVICES, default="auto", help="where the ONNX session runs (default auto)")
    p.add_argument("--instances", type=int, default=1, metavar="K",
                   help="model instances sharing the session: batches run at once (default 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="ONNX Runtime intra-op threads (default: one per core)")
    common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("infer-many", help="reconstruct many scans on a Dask cluster (one HDF5 per scan)",
                       description="Reconstruct every SCAN with the bundle on a Dask cluster: each worker loads "
                                   "the bundle once, reconstructs chunks of frames into partial canvases, and "
                                   "the partials are summed exactly. Writes OUT_DIR/<scan stem>.h5 as "
                                   "'ptycho-runtime infer' does. A scan that fails is reported and skipped; the "
                                   "others are written. Bundle, scans and OUT_DIR must be visible to every worker "
                                   "under the same path. Needs pip install 'ptycho-runtime[dask]'.",
                       epilog=EPILOG, formatter_class=fmt_class)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("scans", metavar="SCAN", nargs="+", help="PtychoPINN NPZ scans")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the reconstructions")
    p.add_argument("--scheduler", default="local", metavar="local|tcp://HOST:8786",
                   help="'local' (a LocalCluster of --workers processes on this machine; default) or the address "
                        "of a running Dask scheduler")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local: worker processes (default 2); remote: wait for at least N workers")
    p.add_argument("--chunk-frames", type=int, default=DEFAULT_CHUNK_FRAMES, metavar="K",
                   help=f"frames (groups) per task (default {DEFAULT_CHUNK_FRAMES})")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="patterns (groups) per inference batch inside a task (default: 64 on CPU, 256 on GPU)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where each worker runs the graph (default %(default)s)")
    refine = p.add_mutually_exclusive_group()
    refine.add_argument("--refine", nargs="?", type=int, const=DEFAULT_SWEEPS, default=None, metavar="SWEEPS",
                        help="after the network, refine each scan's object against its frames with its own "
                             f"probeGuess, SWEEPS sweeps (default: on, {DEFAULT_SWEEPS} sweeps, as infer; 0: off)")
    refine.add_argument("--no-refine", dest="refine", action="store_const", const=0,
                        help="the network's object alone, no refinement (default: refine each scan that has a "
                             "probeGuess)")
    p.add_argument("--refine-max-sweeps", type=int, default=RefineSettings.max_sweeps, metavar="N",
                   help=MAX_SWEEPS_HELP)
    add_scan_arguments(p)
    common(p)
    p.set_defaults(func=cmd_infer_many)
