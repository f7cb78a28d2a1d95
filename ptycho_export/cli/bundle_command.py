"""``ptycho-export [bundle] BUNDLE``: compile a bundle's eager models into TorchScript and ONNX graphs.

``compile_bundle`` is the work (options in, ``add_graphs_to_bundle``'s
summary out); ``print_compile_summary`` the console text. The options are
checked, then the file, before torch is imported, so a wrong file fails in
milliseconds.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Mapping

from ptycho_runtime.format import DEFAULT_OPSET
from ptycho_runtime.inference.parity import DEFAULT_TOLERANCE as PARITY_TOLERANCE

from .errors import EXIT_OK, CliError
from .output import GRAPH_HEADERS, graph_rows, print_json, table


@dataclass(frozen=True)
class CompileOptions:
    """What ``ptycho-export bundle`` takes (the parser's defaults are these)."""

    bundle: str | os.PathLike
    opset: int = DEFAULT_OPSET
    force: bool = False
    no_torchscript: bool = False
    no_onnx: bool = False
    tolerance: float = PARITY_TOLERANCE


def check_opset(opset: int) -> None:
    """Refuse an opset the torch.export exporter or the installed onnx cannot write."""
    import onnx

    top = onnx.defs.onnx_opset_version()
    if not 18 <= opset <= top:
        raise CliError(f"--opset {opset} is not supported: the torch.export ONNX exporter needs opset 18 or newer, "
                       f"and the installed onnx {onnx.__version__} knows opsets up to {top}")


def compile_bundle(options: CompileOptions) -> dict[str, Any]:
    """Add (or refresh) the graphs in the bundle; return ``add_graphs_to_bundle``'s summary.

    Raises ``CliError`` for contradictory options, ``BundleError`` for a file
    that is not a usable bundle, ``export.ParityError`` when a graph does not
    reproduce the eager model (nothing is written then).
    """
    from ptycho_runtime.format import check_bundle_file

    if options.no_torchscript and options.no_onnx:
        raise CliError("--no-torchscript and --no-onnx together leave nothing to compile")
    if not options.no_onnx:
        check_opset(options.opset)  # options first (no file needed), then the file, then torch
    path = check_bundle_file(options.bundle)  # a wrong file fails here, in milliseconds, before torch is imported
    from ..export import add_graphs_to_bundle

    return add_graphs_to_bundle(path, opset=options.opset, torchscript=not options.no_torchscript,
                                onnx=not options.no_onnx, force=options.force, tolerance=options.tolerance)


def print_compile_summary(summary: Mapping[str, Any], options: CompileOptions) -> None:
    print(f"Bundle {summary['bundle']}")
    print(table(GRAPH_HEADERS, graph_rows(summary)))
    n = sum(1 for g in summary["graphs"].values() if g["refreshed"])
    if summary["written"]:
        print(f"Compiled and stored {n} graph(s) in {summary['export_time_s']:.1f} s "
              f"(parity tolerance {options.tolerance:g}, relative).")
    else:
        print("Nothing to do: every requested graph is already in the bundle (use --force to re-export).")
    stale = [name for name, g in summary["graphs"].items()
             if not g["refreshed"] and g.get("opset") not in (None, options.opset) and not options.no_onnx]
    if stale:
        print(f"Note: {', '.join(stale)} were kept at their original opset; --force re-exports them at "
              f"opset {options.opset}.")


def cmd_bundle(args: argparse.Namespace) -> int:
    options = CompileOptions(bundle=args.bundle, opset=args.opset, force=args.force,
                             no_torchscript=args.no_torchscript, no_onnx=args.no_onnx, tolerance=args.tolerance)
    summary = compile_bundle(options)
    if args.json:
        print_json(summary)
    else:
        print_compile_summary(summary, options)
    return EXIT_OK
