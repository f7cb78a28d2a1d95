"""``ptycho-runtime``: reconstruct a scan with a bundle, or show what the runtime sees in one.

    ptycho-runtime infer BUNDLE SCAN.npz -o RECON.h5 [--png RECON.png] [--backend …] [--device …]
    ptycho-runtime infer BUNDLE --product IN_product.h5 --patterns IN_diffraction.h5 -o OUT_product.h5
    ptycho-runtime info BUNDLE [--json]
    ptycho-runtime triton-repo | serve | infer-many ...   (cli_cluster: Triton and Dask)

Never imports torch unless ``--backend torchscript`` is asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from . import __version__
from . import bundle_format as fmt
from .alignment import DEFAULT_PHASE_ITERATIONS
from .backends import DEVICES, PRECISIONS, DeviceUnavailableError
from .geometry import CENTRE_CONVENTIONS, DEFAULT_CENTRE
from .npz import UNITS
from .refinement import DEFAULT_REFINE_ITERATIONS
from .remote import RemoteError

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_BAD_INPUT = 2
EXIT_REMOTE = 3
EXIT_CHECKSUM = 4

EPILOG = """\
exit codes:
  0  success
  1  unexpected error (a bug: please report it with the --debug traceback)
  2  bad input: missing file, not a bundle, bad NPZ, wrong shapes, unusable option
     (e.g. --device cuda without a usable GPU, --backend torchscript without torch)
  3  remote failure: a Triton server or Dask scheduler is unreachable, went away or timed out
  4  checksum failure: the bundle is damaged or was modified (a checksum or the load-time self-test failed)
"""

PNG_HINT = "writing a PNG needs matplotlib: pip install 'ptycho-runtime[png]'"


class UsageError(Exception):
    """Bad input detected by the CLI itself (exit 2)."""


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress on a stream (stderr) that works with and without a terminal.

    On a TTY: one bar redrawn in place. Otherwise (a log file, CI, a pipe):
    one plain line each time another tenth of the work is done, with rate and
    ETA, so a long run is never silent.
    """

    def __init__(self, total: int, unit: str = "patterns", stream: Optional[TextIO] = None,
                 width: int = 30, min_interval_s: float = 0.1, lines: int = 10) -> None:
        self.total = max(int(total), 0)
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.min_interval_s = min_interval_s
        self.lines = max(int(lines), 1)
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_line = 0  # tenths reported so far (no terminal)
        isatty = getattr(self.stream, "isatty", None)
        try:
            self.tty = bool(isatty and isatty())
        except (ValueError, OSError):  # closed stream
            self.tty = False

    def update(self, n: int) -> None:
        """Count ``n`` more units done; draw the bar or print a line if due."""
        self.done += int(n)
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw >= self.min_interval_s or self.done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._status(now, bar=True))
                self.stream.flush()
            return
        step = self.done * self.lines // self.total if self.total else self.lines
        if step > self._last_line:
            self._last_line = step
            self.stream.write(self._status(now, bar=False) + "\n")
            self.stream.flush()

    def _status(self, now: float, bar: bool) -> str:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.done < self.total else 0.0
        text = (f"{self.done}/{self.total} {self.unit} {100 * frac:3.0f}% {elapsed:6.1f} s, {rate:8.1f} {self.unit}/s, "
                f"ETA {eta:5.1f} s")
        if bar:
            filled = int(round(frac * self.width))
            return f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
        return text

    def close(self, final_line: Optional[str] = None) -> None:
        """End the bar (newline on a TTY) and print ``final_line`` (always, TTY or not)."""
        if self.tty:
            self.stream.write("\r\033[K" if final_line else "\n")
        if final_line:
            self.stream.write(final_line + "\n")
        self.stream.flush()


# --------------------------------------------------------------------------- infer


def _load_bundle(path: str, backend: str = "auto", device: str = "auto", precision: str = "fp32"):
    from .bundle import load_bundle

    try:
        return load_bundle(path, backend=backend, device=device, precision=precision)
    except ImportError as exc:  # backend="torchscript" without torch, fp16 without onnx
        raise UsageError(str(exc)) from exc


def _check_png_support() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(PNG_HINT) from None


def write_reconstruction(path: Path, recon, positions: np.ndarray, bundle, patterns_per_second: float,
                         elapsed_s: float, scan_path: str) -> None:
    """The reconstruction as HDF5, written to a temporary file and renamed into place."""
    scalars, arrays = fmt.split_params(bundle.params)
    params_json = json.dumps(scalars, sort_keys=True, default=str)
    with fmt.atomic_bundle_write(path) as f:
        f.create_dataset("object", data=recon.object.astype(np.complex64, copy=False))
        f.create_dataset("amplitude", data=recon.amplitude.astype(np.float32))
        f.create_dataset("phase", data=recon.phase.astype(np.float32))
        f.create_dataset("weight", data=recon.weight)
        f.create_dataset("x_coords", data=recon.x_coords)
        f.create_dataset("y_coords", data=recon.y_coords)
        f.create_dataset("positions", data=np.asarray(positions, dtype=np.float64))
        f["positions"].attrs["columns"] = "x, y (object pixels, patch centres)"
        for key, value in arrays.items():
            name = "probe" if key == "probe" else f"params/{key}"
            f.create_dataset(name, data=value)
        f.attrs["format"] = "ptycho-runtime-reconstruction"
        f.attrs["producer"] = f"ptycho-runtime {__version__}"
        f.attrs["params_json"] = params_json
        f.attrs["bundle_path"] = str(Path(bundle.path).resolve())
        f.attrs["scan_path"] = str(Path(scan_path).resolve())
        f.attrs["backend"] = bundle.backend
        f.attrs["device"] = bundle.device
        f.attrs["providers"] = json.dumps(bundle.providers)
        f.attrs["patterns_per_second"] = float(patterns_per_second)
        f.attrs["elapsed_s"] = float(elapsed_s)
        f.attrs["n_patterns"] = int(np.asarray(positions).shape[0])
        f.attrs["N"] = bundle.N
        f.attrs["gridsize"] = bundle.gridsize
        f.attrs["intensity_scale"] = bundle.intensity_scale
        f.attrs["description"] = (
            "object = Σ w·patch / Σ w (complex64); amplitude/phase = |object|, angle(object); weight = Σ w "
            "(0 = not covered); x_coords/y_coords = object-pixel coordinates of the columns/rows, in the frame "
            "of positions.")


def write_png(path: Path, recon, title: str = "") -> None:
    """Amplitude and phase side by side, with colour bars; written atomically.

    A ``matplotlib.figure.Figure`` drawn on its own Agg canvas: no pyplot and
    no ``matplotlib.use``, so a host application's backend and figure registry
    are left alone.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(PNG_HINT) from None
    x, y = recon.x_coords, recon.y_coords
    extent = (x[0] - 0.5, x[-1] + 0.5, y[-1] + 0.5, y[0] - 0.5)
    covered = recon.covered
    amp = np.ma.masked_where(~covered, recon.amplitude)
    # ptychography cannot tell the global phase: show the phase relative to the weighted mean phasor, so
    # an object near ±π does not wrap across the whole image (the HDF5 output keeps the raw phase)
    offset = np.angle(np.sum(recon.object[covered] * recon.weight[covered])) if covered.any() else 0.0
    phase = np.ma.masked_where(~covered, np.angle(recon.object * np.exp(-1j * offset)))
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], amp, "amplitude", "gray"),
              (axes[1], phase, f"phase (rad, global offset {offset:+.2f} removed)", "viridis"))
    for ax, img, label, cmap in panels:
        im = ax.imshow(img, cmap=cmap, extent=extent, interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("x (pixels)")
        ax.set_ylabel("y (pixels)")
        fig.colorbar(im, ax=ax, shrink=0.9)
    if title:
        fig.suptitle(title)
    with fmt.atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def cmd_infer(args: argparse.Namespace) -> int:
    from .npz import read_npz_arrays

    if (args.scan is None) == (args.product is None):
        raise UsageError("give a PtychoPINN NPZ scan, or a ptychodus product with --product and --patterns")
    if args.product is not None:
        return _infer_ptychodus(args)
    if args.patterns is not None:
        raise UsageError("--patterns goes with --product (a ptychodus diffraction file and its product file)")
    out = Path(args.output)
    png = Path(args.png) if args.png else None
    if png is not None:
        _check_png_support()  # fail before the (possibly long) inference
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.refine < 0:
        raise UsageError(f"--refine must be >= 0 sweeps (got {args.refine})")
    bundle = _load_bundle(args.bundle, args.backend, args.device, args.precision)
    scan = read_npz_arrays(args.scan, counts=args.counts, units=args.units, position_centre=args.position_centre)
    positions = np.stack([scan["xcoords"], scan["ycoords"]], axis=1)
    n = positions.shape[0]
    progress = Progress(n, "patterns" if bundle.channels == 1 else "groups")  # every position anchors one group
    t0 = time.perf_counter()
    recon = bundle.reconstruct(scan["diffraction"], positions, counts=False, batch_size=args.batch_size,
                               align_phase=args.align_phase, progress=progress.update)
    if args.refine:
        from .refinement import refine_epie

        # the file's probe is in the units of its (normalised) diffraction; the bundle's is the training one
        probe = scan["probeGuess"] if scan.get("probeGuess") is not None else bundle.probe
        recon = refine_epie(recon, scan["diffraction"], positions, probe, iterations=args.refine)
    elapsed = time.perf_counter() - t0
    rate = n / elapsed if elapsed > 0 else float("inf")
    write_reconstruction(out, recon, positions, bundle, rate, elapsed, args.scan)
    if png is not None:
        write_png(png, recon, title=f"{Path(args.scan).name} — {Path(bundle.path).name} "
                                    f"(N={bundle.N}, gridsize={bundle.gridsize})")
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    progress.close(f"reconstructed {n} patterns in {elapsed:.2f} s ({rate:.1f} patterns/s) on {provider}"
                   + (f", including {args.refine} ePIE sweeps" if args.refine else ""))
    return EXIT_OK


def _infer_ptychodus(args: argparse.Namespace) -> int:
    """ptychodus files in, a ptychodus product out: the object on the input product's grid (1+0j uncovered)."""
    if args.patterns is None:
        raise UsageError("--product needs --patterns: the ptychodus diffraction file (counts, bad pixels)")
    if args.png or args.counts or args.units != "auto" or args.position_centre != DEFAULT_CENTRE:
        raise UsageError("--png, --counts, --units and --position-centre apply to NPZ scans, not to --product "
                         "(ptychodus patterns are counts; its positions are metres on the product's grid)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {args.batch_size})")
    try:
        from .ptychodus.files import host_scan, output_product, read_input, write_product
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    bundle = _load_bundle(args.bundle, args.backend, args.device, args.precision)
    parameters = read_input(args.product, args.patterns)
    scan = host_scan(parameters)
    n = scan.counts.shape[0]
    progress = Progress(n, "patterns" if bundle.channels == 1 else "groups")
    t0 = time.perf_counter()
    recon = bundle.reconstruct(scan.counts, scan.positions_px, batch_size=args.batch_size,
                               align_phase=args.align_phase, progress=progress.update, **scan.reconstruct_kwargs())
    elapsed = time.perf_counter() - t0
    write_product(args.output, output_product(parameters.product, recon))
    provider = bundle.providers[0] if bundle.providers else bundle.backend
    progress.close(f"reconstructed {n} patterns in {elapsed:.2f} s on {provider} onto the {recon.object.shape[0]}×"
                   f"{recon.object.shape[1]} object grid of {args.product} ({recon.n_clipped} patches clipped, "
                   f"{recon.n_dropped} dropped at its edge); wrote {args.output}")
    return EXIT_OK


# --------------------------------------------------------------------------- info


def bundle_report(path: str) -> dict[str, Any]:
    """What the runtime sees in a bundle (everything JSON-serialisable)."""
    from .backends import import_onnxruntime

    try:
        ort = import_onnxruntime()
    except ImportError as exc:
        raise UsageError(str(exc)) from None

    contents = fmt.read_bundle(path)
    p = contents.params
    graphs = []
    for (kind, model), rec in sorted(contents.graphs.items()):
        meta = rec.metadata
        parity = meta.get("parity") or {}
        graphs.append({
            "kind": kind,
            "model": model,
            "size_bytes": len(rec.data),
            "parity_max_rel": parity.get("max_rel"),
            "parity_passed": parity.get("passed"),
            "exporter": meta.get("exporter"),
            "opset": meta.get("opset"),
        })
    report: dict[str, Any] = {
        "path": str(contents.path),
        "format_version": int(contents.header.get("format_version", 0)),
        "producer": contents.header.get("producer"),
        "created_utc": contents.header.get("created_utc"),
        "N": p.get("N"),
        "gridsize": p.get("gridsize"),
        "intensity_scale": p.get("intensity_scale"),
        "output_mode": p.get("output_mode", "amp_phase"),
        "models": sorted(contents.state_dicts),
        "parity_cases": sorted(contents.parity),
        "graphs": graphs,
        "runtime": {
            "ptycho_runtime_version": __version__,
            "onnxruntime_version": ort.__version__,
            "available_providers": list(ort.get_available_providers()),
            "torch_installed": _torch_installed(),
        },
    }
    from .bundle import Bundle

    try:
        b = Bundle(contents)  # the defaults of load_bundle, without reading the file again
        report["default_load"] = {"backend": b.backend, "device": b.device, "precision": b.precision,
                                  "providers": b.providers}
    except fmt.BundleError as exc:
        if not isinstance(exc, fmt.BundleGraphMissingError):
            raise  # a damaged, hostile or inconsistent bundle is an error (exit 2/4), not a report line
        report["default_load"] = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: info must work on bundles the runtime cannot run
        report["default_load"] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def _torch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _format_report(r: dict[str, Any]) -> str:
    lines = [
        f"bundle           {r['path']}",
        f"format version   {r['format_version']}  ({r.get('producer')}, {r.get('created_utc')})",
        f"N                {r['N']}",
        f"gridsize         {r['gridsize']}",
        f"intensity_scale  {r['intensity_scale']}",
        f"output_mode      {r['output_mode']}",
        f"eager models     {', '.join(r['models']) or 'none'}",
        "graphs:",
    ]
    if not r["graphs"]:
        lines.append("  (none: add graphs with ptycho-export)")
    for g in r["graphs"]:
        par = g["parity_max_rel"]
        par_s = "n/a" if par is None else f"{par:.2e}" + ("" if g["parity_passed"] in (None, True) else " FAILED")
        lines.append(f"  {g['kind'] + '/' + g['model']:<32} {g['size_bytes'] / 2**20:8.2f} MiB  parity max rel {par_s}")
    rt = r["runtime"]
    lines += [
        f"onnxruntime      {rt['onnxruntime_version']}  providers: {', '.join(rt['available_providers'])}",
        f"torch installed  {'yes' if rt['torch_installed'] else 'no'}",
    ]
    d = r["default_load"]
    if "error" in d:
        lines.append(f"default load     cannot run: {d['error']}")
    else:
        lines.append(f"default load     backend={d['backend']} device={d['device']} precision={d['precision']} "
                     f"providers={', '.join(d['providers'])}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    report = bundle_report(args.bundle)
    if args.json:
        print(json.dumps(report, indent=1, sort_keys=True, default=str))
    else:
        print(_format_report(report))
    return EXIT_OK


# --------------------------------------------------------------------------- main


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """--units, --counts and --position-centre: how to read a user's NPZ (both CLIs, one wording; docs/data.md)."""
    p.add_argument("--units", choices=UNITS, default="auto",
                   help="what the NPZ 'diffraction' holds: counts, photons (sqrt of counts, the PtychoPINN and "
                        "ptychodus convention), normalised (arbitrary-scale amplitude) or auto (told from the "
                        "values; default)")
    p.add_argument("--counts", action="store_true", help="same as --units counts")
    p.add_argument("--position-centre", choices=CENTRE_CONVENTIONS, default=DEFAULT_CENTRE,
                   help="frame pixel the NPZ positions name: (N-1)/2 (PtychoPINN, ptychodus; default) or N/2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptycho-runtime",
        description="Run ptycho-export bundles: reconstruct a scan, or inspect a bundle (no torch needed).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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

    p = sub.add_parser("info", help="what the runtime sees in a bundle, and where it would run",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file (wts.h5) or the folder holding it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_info)

    from .cli_cluster import add_cluster_commands

    add_cluster_commands(sub)  # triton-repo, serve, infer-many
    return parser


def _error(message: str) -> None:
    message = " ".join(str(message).split())  # one line
    print(f"ptycho-runtime: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on bad usage
    debug = getattr(args, "debug", False)
    # runtime warnings (e.g. the CUDA → CPU fallback) reach stderr through logging's last-resort handler
    try:
        return int(args.func(args))
    except fmt.BundleIntegrityError as exc:  # checksum mismatch or failed self-test: damaged or modified
        if debug:
            raise
        _error(exc)
        return EXIT_CHECKSUM
    except RemoteError as exc:  # a Triton server or Dask cluster: the deployment, not the input
        if debug:
            raise
        _error(exc)
        return EXIT_REMOTE
    except (UsageError, fmt.BundleError, FileNotFoundError, IsADirectoryError, DeviceUnavailableError,
            ValueError, TypeError) as exc:
        if debug:
            raise
        _error(exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
