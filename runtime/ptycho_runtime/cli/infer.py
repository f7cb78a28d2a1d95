"""``ptycho-runtime infer``: reconstruct a PtychoPINN NPZ scan, or ptychodus files, into an object.

The work is ``run_infer`` / ``run_infer_ptychodus`` (callable without argv,
e.g. from a test or a notebook); ``cmd_infer`` only checks which of the two
the arguments ask for.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, TextIO

import numpy as np

from ..files.npz import read_npz_arrays
from ..files.png import check_png_support, write_png
from ..files.reconstruction_file import Provenance, write_reconstruction
from ..inference.backends import DEVICES, PRECISIONS
from ..reconstruction.alignment import DEFAULT_PHASE_ITERATIONS
from ..reconstruction.geometry import DEFAULT_CENTRE
from ..refinement import DEFAULT_REFINE_ITERATIONS
from .common import EPILOG, EXIT_OK, UsageError, add_scan_arguments, load_bundle_or_usage
from .progress import Progress


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")


def run_infer(bundle_path: str, scan_path: str, output: str, png: Optional[str] = None, backend: str = "auto",
              device: str = "auto", precision: str = "fp32", batch_size: Optional[int] = None,
              units: str = "auto", counts: bool = False, position_centre: str = DEFAULT_CENTRE, refine: int = 0,
              align_phase: int = 0, stream: Optional[TextIO] = None) -> str:
    """Reconstruct the NPZ ``scan_path`` with the bundle; write ``output`` (HDF5) and ``png``; return the summary.

    Progress goes to ``stream`` (stderr by default); the summary line is printed there too.
    """
    if png is not None:
        try:
            check_png_support()  # fail before the (possibly long) inference
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    _check_batch_size(batch_size)
    if refine < 0:
        raise UsageError(f"--refine must be >= 0 sweeps (got {refine})")
    bundle = load_bundle_or_usage(bundle_path, backend, device, precision)
    scan = read_npz_arrays(scan_path, counts=counts, units=units, position_centre=position_centre)
    positions = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    n = positions.shape[0]
    progress = Progress(n, "patterns" if bundle.channels == 1 else "groups", stream)  # one group per position
    t0 = time.perf_counter()
    recon = bundle.reconstruct(scan["diffraction"], positions, counts=False, batch_size=batch_size,
                               align_phase=align_phase, progress=progress.update)
    if refine:
        from ..refinement import refine_epie

        # the file's probe is in the units of its (normalised) diffraction; the bundle's is the training one
        probe = scan["probeGuess"] if scan.get("probeGuess") is not None else bundle.probe
        recon = refine_epie(recon, scan["diffraction"], positions, probe, iterations=refine)
    elapsed = time.perf_counter() - t0
    rate = n / elapsed if elapsed > 0 else float("inf")
    write_reconstruction(Path(output), recon, positions, Provenance.of(bundle), rate, elapsed, scan_path)
    if png is not None:
        write_png(Path(png), recon, title=f"{Path(scan_path).name} — {Path(bundle.path).name} "
                                          f"(N={bundle.N}, gridsize={bundle.gridsize})")
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    summary = (f"reconstructed {n} patterns in {elapsed:.2f} s ({rate:.1f} patterns/s) on {provider}"
               + (f", including {refine} ePIE sweeps" if refine else ""))
    progress.close(summary)
    return summary


def run_infer_ptychodus(bundle_path: str, product: str, patterns: str, output: str, backend: str = "auto",
                        device: str = "auto", precision: str = "fp32", batch_size: Optional[int] = None,
                        align_phase: int = 0, stream: Optional[TextIO] = None) -> str:
    """ptychodus files in, a ptychodus product out: the object on the input product's grid (1+0j uncovered)."""
    _check_batch_size(batch_size)
    try:
        from ..hosts.ptychodus.files import host_scan, output_product, read_input, write_product
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    bundle = load_bundle_or_usage(bundle_path, backend, device, precision)
    parameters = read_input(product, patterns)
    scan = host_scan(parameters)
    n = scan.counts.shape[0]
    progress = Progress(n, "patterns" if bundle.channels == 1 else "groups", stream)
    t0 = time.perf_counter()
    recon = bundle.reconstruct(scan.counts, scan.positions_px, batch_size=batch_size,
                               align_phase=align_phase, progress=progress.update, **scan.reconstruct_kwargs())
    elapsed = time.perf_counter() - t0
    write_product(output, output_product(parameters.product, recon))
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    summary = (f"reconstructed {n} patterns in {elapsed:.2f} s on {provider} onto the {recon.object.shape[0]}×"
               f"{recon.object.shape[1]} object grid of {product} ({recon.n_clipped} patches clipped, "
               f"{recon.n_dropped} dropped at its edge); wrote {output}")
    progress.close(summary)
    return summary


def cmd_infer(args: argparse.Namespace) -> int:
    """The parsed ``infer`` arguments → ``run_infer`` or ``run_infer_ptychodus``."""
    if (args.scan is None) == (args.product is None):
        raise UsageError("give a PtychoPINN NPZ scan, or a ptychodus product with --product and --patterns")
    if args.product is not None:
        if args.patterns is None:
            raise UsageError("--product needs --patterns: the ptychodus diffraction file (counts, bad pixels)")
        if args.png or args.counts or args.units != "auto" or args.position_centre != DEFAULT_CENTRE:
            raise UsageError("--png, --counts, --units and --position-centre apply to NPZ scans, not to --product "
                             "(ptychodus patterns are counts; its positions are metres on the product's grid)")
        run_infer_ptychodus(args.bundle, args.product, args.patterns, args.output, args.backend, args.device,
                            args.precision, args.batch_size, args.align_phase)
        return EXIT_OK
    if args.patterns is not None:
        raise UsageError("--patterns goes with --product (a ptychodus diffraction file and its product file)")
    run_infer(args.bundle, args.scan, args.output, args.png, args.backend, args.device, args.precision,
              args.batch_size, args.units, args.counts, args.position_centre, args.refine, args.align_phase)
    return EXIT_OK


def add_infer_command(sub: argparse._SubParsersAction) -> None:
    """The ``infer`` subcommand and its options."""
    p = sub.add_parser("infer", help="reconstruct a PtychoPINN NPZ scan, or ptychodus files, into an object",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("scan", metavar="SCAN.npz", nargs="?", default=None,
                   help="PtychoPINN NPZ: diffraction, xcoords, ycoords, probeGuess")
    p.add_argument("--product", metavar="IN_product.h5", default=None,
                   help="instead of SCAN.npz: a ptychodus product file (positions, probe, object grid); with "
                        "--patterns, writes a ptychodus product (needs pip install 'ptycho-runtime[ptychodus]'; "
                        "default: none)")
    p.add_argument("--patterns", metavar="IN_diffraction.h5", default=None,
                   help="the ptychodus diffraction file (counts, bad pixels) that goes with --product (default: none)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.h5",
                   help="reconstruction to write (HDF5; a ptychodus product with --product)")
    p.add_argument("--png", metavar="RECON.png",
                   help="also write amplitude and phase as a PNG (needs matplotlib; default: none)")
    p.add_argument("--backend", choices=("auto", "onnx", "torchscript"), default="auto",
                   help="auto: ONNX if the bundle has it, else TorchScript (needs torch) (default %(default)s)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="auto: CUDA if it really works here, else the CPU (default %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16 needs CUDA (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="patterns (groups) per inference batch (default: 64 on CPU, 256 on GPU)")
    add_scan_arguments(p)
    p.add_argument("--refine", nargs="?", type=int, const=DEFAULT_REFINE_ITERATIONS, default=0, metavar="SWEEPS",
                   help="after the network, run SWEEPS ePIE sweeps over the scan with the known probe (the NPZ's "
                        f"probeGuess, else the bundle's), starting from the network's object (default: off; "
                        f"{DEFAULT_REFINE_ITERATIONS} sweeps when given without a number; docs/fidelity.md)")
    p.add_argument("--align-phase", type=int, default=0, metavar="PASSES",
                   help=f"passes of patch phase alignment before stitching (0: off, the default; "
                        f"{DEFAULT_PHASE_ITERATIONS} is plenty)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_infer)
