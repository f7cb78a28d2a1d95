"""``ptycho-export verify BUNDLE``: checksums, then every graph on every backend, against the stored eager outputs.

The work is ``ptycho_export.verify.verify_bundle`` (a report, plain data);
this module prints it and turns it into an exit code (``verify_exit``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .errors import EXIT_CHECKSUM, EXIT_OK, EXIT_PARITY, CliError, error_line
from .output import err_cell, print_json, table


@dataclass(frozen=True)
class VerifyOptions:
    bundle: str | os.PathLike
    backends: Optional[Sequence[str]] = None  # default: every backend, unavailable ones reported as skipped
    tolerance: Optional[float] = None  # default: each graph's export tolerance, 1e-5 for eager


def run_verify(options: VerifyOptions) -> dict[str, Any]:
    """``verify_bundle``'s report; the file is checked before torch is imported."""
    from ptycho_runtime.format import check_bundle_file

    check_bundle_file(options.bundle)  # before torch is imported
    from ..verify import verify_bundle

    return verify_bundle(options.bundle, backends=options.backends, tolerance=options.tolerance)


def print_verify(report: Mapping[str, Any]) -> None:
    print(f"Bundle    {report['bundle']}")
    print("Checksums " + ("ok (every dataset matches its sha256)" if report["checksum"]["ok"]
                          else f"FAILED: {report['checksum']['error']}"))
    if report["cases"]:
        print("Cases     " + ", ".join(f"{c} (batch {b})" for c, b in report["cases"].items()))
    if report["results"]:
        print(table(["backend", "graph", "max rel err", "max abs err", "tolerance", "result"],
                    [[r["backend"], r["graph"], err_cell(r["max_rel"]), err_cell(r["max_abs"]),
                      err_cell(r["tolerance_rel"]), "pass" if r["passed"] else ("ERROR" if r["error"] else "FAIL")]
                     for r in report["results"]]))
    for name, b in report["backends"].items():
        if not b["available"]:
            print(f"skipped {name}: {b['reason']}")
    for r in report["results"]:
        if r["error"]:
            print(f"{r['backend']}/{r['graph']}: {r['error']}")
    print("Result    " + ("PASSED" if report["passed"] else report["status"].replace("_", " ").upper()))


def verify_exit(report: Mapping[str, Any]) -> int:
    """The exit code of a verify report, with its one error line on stderr (nothing verified: ``CliError``)."""
    if not report["checksum"]["ok"]:
        error_line(f"checksum failure: {report['checksum']['error']}")
        return EXIT_CHECKSUM
    if report["status"] == "nothing_verified":
        raise CliError(f"nothing to verify in {report['bundle']}: no eager weights and no graphs")
    if not report["passed"]:
        bad = [r for r in report["results"] if not r["passed"]]
        worst = bad[0]
        detail = worst["error"] or (f"relative error {err_cell(worst['max_rel'])} on {worst.get('worst_output')} > "
                                    f"tolerance {err_cell(worst['tolerance_rel'])}")
        error_line(f"parity mismatch in {len(bad)} backend/graph pair(s); first: "
                   f"{worst['backend']}/{worst['graph']}: {detail}")
        return EXIT_PARITY
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = run_verify(VerifyOptions(bundle=args.bundle, backends=args.backend, tolerance=args.tolerance))
    if args.json:
        print_json(report)
    else:
        print_verify(report)
    return verify_exit(report)
