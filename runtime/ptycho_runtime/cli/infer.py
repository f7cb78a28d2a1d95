"""``ptycho-runtime infer``: reconstruct a PtychoPINN NPZ scan, or ptychodus files, into an object.

The work is ``run_infer`` / ``run_infer_ptychodus`` (callable without argv,
e.g. from a test or a notebook); ``cmd_infer`` only checks which of the two
the arguments ask for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np

from ..files.npz import read_npz_arrays
from ..files.png import check_png_support, write_png
from ..files.reconstruction_file import Provenance, write_reconstruction
from ..inference.backends import DEVICES, PRECISIONS
from ..inference.compatibility import check_scan
from ..inference.scan_refinement import (
    COARSE_SWEEPS_HELP,
    MAX_SWEEPS_HELP,
    PHASE_FIELD_HELP,
    PHASE_RAMP_HELP,
    PROBE_RULE_NAMES,
    START_CHOICES,
    RefineSettings,
    probe_rule,
)
from ..reconstruction.alignment import ALIGN_MODES, DEFAULT_PHASE_ITERATIONS
from ..reconstruction.geometry import DEFAULT_CENTRE
from ..reconstruction.grouping import GROUPINGS, count_groups
from ..refinement import DEFAULT_SWEEPS
from ..refinement.engine import BACKENDS, ENGINES
from ..refinement.object_prior import PRIORS
from .common import EPILOG, EXIT_OK, UsageError, add_scan_arguments, load_bundle_or_usage
from .progress import Progress


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {batch_size})")


def _mismatches(bundle: Any, scan: dict, stream: Optional[TextIO]) -> list[str]:
    """The scan's probe and photon count against what the bundle was trained for, said loudly on ``stream``."""
    if np.shape(scan["diffraction"])[-1] != bundle.N:
        return []  # not this bundle's frame size at all: reconstruct refuses it with the fix
    found = check_scan(bundle.contents.physics, bundle.params, scan.get("probeGuess"), scan.get("nphotons"))
    for message in found:
        print(f"WARNING: {message}", file=stream or sys.stderr, flush=True)
    return found


def run_infer(bundle_path: str, scan_path: str, output: str, png: Optional[str] = None, backend: str = "auto",
              device: str = "auto", precision: str = "fp32", batch_size: Optional[int] = None,
              units: str = "auto", counts: bool = False, position_centre: str = DEFAULT_CENTRE,
              refine: Optional[int] = None, align_phase: int = 0, stream: Optional[TextIO] = None,
              align: str = "none", refine_settings: Optional[RefineSettings] = None,
              accept_mismatch: bool = False) -> str:
    """Reconstruct the NPZ ``scan_path`` with the bundle; write ``output`` (HDF5) and ``png``; return the summary.

    ``refine``: sweeps of refinement against the scan after the network
    (None: the default sweeps when the scan has a probeGuess, else none; 0:
    off), with the scan's probe, as ``refine_settings`` say (engine, backend,
    probe refinement, start). A scan whose probe or photon count is beyond
    what the bundle was trained for is warned about on ``stream``, and
    refused without refinement unless ``accept_mismatch`` (the network alone
    is then not to be trusted). Progress goes to ``stream`` (stderr by
    default); the summary line is printed there too.
    """
    if png is not None:
        try:
            check_png_support()  # fail before the (possibly long) inference
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    _check_batch_size(batch_size)
    if refine is not None and refine < 0:
        raise UsageError(f"--refine must be >= 0 sweeps (got {refine})")
    if align != "none" and align_phase:
        raise UsageError("give --align (the least-squares overlap solve) or --align-phase (iterative passes), not both")
    bundle = load_bundle_or_usage(bundle_path, backend, device, precision)
    scan = read_npz_arrays(scan_path, counts=counts, units=units, position_centre=position_centre)
    probe = scan.get("probeGuess")
    sweeps = (DEFAULT_SWEEPS if probe is not None else 0) if refine is None else refine
    settings = dataclasses.replace(refine_settings or RefineSettings(), sweeps=sweeps) if sweeps else None
    found = _mismatches(bundle, scan, stream)
    if found and settings is None and not accept_mismatch:
        raise UsageError("the network alone cannot be trusted on this scan (see the warnings above): let the data "
                         "correct it with --refine (the default when the scan has a probeGuess), or pass "
                         "--accept-mismatch to keep the network's object as it is")
    positions = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    n = positions.shape[0]
    groups = settings.start_groups if settings is not None else "all"
    progress = Progress(count_groups(positions[:, 0], positions[:, 1], bundle.gridsize, groups),
                        "patterns" if bundle.channels == 1 else "groups", stream)  # all: one group per position
    t0 = time.perf_counter()
    # the file's probe is in the units of its (normalised) diffraction; the bundle's is the training one
    recon = bundle.reconstruct(scan["diffraction"], positions, counts=False, batch_size=batch_size,
                               align_phase=align_phase, align=align, progress=progress.update, refine=settings,
                               probe=probe)
    elapsed = time.perf_counter() - t0
    rate = n / elapsed if elapsed > 0 else float("inf")
    write_reconstruction(Path(output), recon, positions, Provenance.of(bundle), rate, elapsed, scan_path,
                         notes={"probe_scale": scan.get("probe_scale"), "mismatches": found})
    done = recon.refinement
    denoised = bool(done and (done.get("amplitude_prior") or {}).get("applied"))
    if png is not None:
        write_png(Path(png), recon, title=f"{Path(scan_path).name} — {Path(bundle.path).name} "
                                          f"(N={bundle.N}, gridsize={bundle.gridsize})"
                                          + (f" + {sweeps} refinement sweeps" if settings else "")
                                          + (" + TV amplitude" if denoised else ""))
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    summary = (f"reconstructed {n} patterns in {elapsed:.2f} s ({rate:.1f} patterns/s) on {provider}"
               + (f", including {done['sweeps']} refinement sweeps ({done['backend']}, "
                  + (f"{done['coarse_sweeps']} at half resolution, " if done.get("coarse_sweeps") else "")
                  + f"start: {done['start']}, "
                  f"probe: {done['probe_source']}"
                  + (", amplitude denoised (TV at its noise level)" if denoised else "") + ")"
                  if done else ", network only (no refinement)"))
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
    settings = RefineSettings(engine=args.refine_engine, backend=args.refine_backend,
                              refine_probe=probe_rule(args.refine_probe), start=args.refine_start,
                              amplitude_prior=args.amplitude_prior, phase_ramp_every=args.phase_ramp_every,
                              phase_field_every=args.phase_field_every, start_groups=args.start_groups,
                              max_sweeps=args.refine_max_sweeps, coarse_sweeps=args.coarse_sweeps)
    run_infer(args.bundle, args.scan, args.output, args.png, args.backend, args.device, args.precision,
              args.batch_size, args.units, args.counts, args.position_centre, args.refine, args.align_phase,
              align=args.align, refine_settings=settings, accept_mismatch=args.accept_mismatch)
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
    p.add_argument("--refine", nargs="?", type=int, const=DEFAULT_SWEEPS, default=None, metavar="SWEEPS",
                   help="after the network, refine the object against the scan for SWEEPS sweeps (the batched "
                        "engine, the NPZ's probeGuess, else the bundle's probe; docs/fidelity.md). Default: "
                        f"{DEFAULT_SWEEPS} sweeps when the scan has a probeGuess, else off")
    p.add_argument("--no-refine", dest="refine", action="store_const", const=0,
                   help="the network's object only (fastest; not to be trusted under a probe or photon count "
                        "the bundle was not trained for; default: refine when the scan has a probeGuess)")
    p.add_argument("--refine-engine", choices=ENGINES, default="builtin",
                   help="builtin (batched rPIE, torch-free) or ptychi (pty-chi LSQML; needs torch and ptychi) "
                        "(default %(default)s)")
    p.add_argument("--refine-backend", choices=BACKENDS, default="auto",
                   help="the builtin engine's backend (default %(default)s: numba on the CPU where it is "
                        "installed, the [fast] extra, else numpy)")
    p.add_argument("--refine-probe", nargs="?", choices=tuple(PROBE_RULE_NAMES), const="on", default="auto",
                   help="refine the probe with the object: on (the bare flag), off, or auto: keep the probe guess "
                        "unless the fit then stays far above the frames' Poisson noise, and then refine it "
                        "(default: %(default)s)")
    p.add_argument("--refine-start", choices=START_CHOICES, default=RefineSettings.start,
                   help="auto: the network's phase alone or a flat object, whichever fits the patterns "
                        "best after two sweeps; or one of them (default: %(default)s)")
    p.add_argument("--amplitude-prior", choices=PRIORS, default=RefineSettings.amplitude_prior,
                   help="after the sweeps: tv denoises the refined amplitude at the strength of its own shot noise "
                        "(the fit stays at the noise floor); none keeps the data-only object (default: %(default)s)")
    p.add_argument("--phase-ramp-every", type=int, default=RefineSettings.phase_ramp_every, metavar="N",
                   help=PHASE_RAMP_HELP)
    p.add_argument("--phase-field-every", type=int, default=RefineSettings.phase_field_every, metavar="N",
                   help=PHASE_FIELD_HELP)
    p.add_argument("--refine-max-sweeps", type=int, default=RefineSettings.max_sweeps, metavar="N",
                   help=MAX_SWEEPS_HELP)
    p.add_argument("--coarse-sweeps", type=int, default=RefineSettings.coarse_sweeps, metavar="N",
                   help=COARSE_SWEEPS_HELP)
    p.add_argument("--start-groups", choices=GROUPINGS, default=RefineSettings.start_groups,
                   help="gridsize > 1, refining: the network predicts a cover of the frames (each in at least one "
                        "group, about a third of them: a faster start, the same refined object) or all groups "
                        "(default: %(default)s)")
    p.add_argument("--accept-mismatch", action="store_true",
                   help="with --no-refine, write the network's object even when the scan's probe or photon count "
                        "is beyond what the bundle was trained for (default: refuse)")
    p.add_argument("--align", default="none", choices=ALIGN_MODES,
                   help="phase-align the patches over their overlaps by one least-squares solve before stitching "
                        "(default: none; 'ramps' is the measured best: docs/fidelity.md)")
    p.add_argument("--align-phase", type=int, default=0, metavar="PASSES",
                   help=f"passes of patch phase alignment before stitching (0: off, the default; "
                        f"{DEFAULT_PHASE_ITERATIONS} is plenty)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_infer)
