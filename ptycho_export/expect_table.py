"""The README's "What to expect" table, made from the demo's own evaluation files.

The table is meant to be what the demo printed, not figures typed in by hand
that drift from it (issue 17's docs target). ``scripts/demo.sh`` prints it at
the end of every run, so a user compares like with like, and
``python -m ptycho_export.expect_table OUT --readme README.md`` writes it
between the README's two markers (atomically: a temporary file beside the
README, then a rename).

OUT is the demo's output folder: ``OUT/evaluation.json`` (the shipped bundle,
with the flat-start control and the pty-chi reference) and, where present,
``OUT/brief/evaluation.json`` (the bundle the demo trained), both written by
``ptycho-export evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

START = "<!-- what-to-expect:start (written by: python -m ptycho_export.expect_table OUT --readme README.md) -->"
END = "<!-- what-to-expect:end -->"
HEADER = ("| method | phase SSIM | amplitude SSIM | phase RMSE (rad) | wall time |\n"
          "|---|---|---|---|---|")


def _row(label: str, entry: dict[str, Any], bold: bool = False) -> str:
    m = entry["metrics"]
    cells = [f"{m['phase_ssim']:.3f}", f"{m['amplitude_ssim']:.3f}", f"{m['phase_rmse_rad']:.3f}"]
    if bold:
        cells = [f"**{c}**" for c in cells]
    return f"| {label} | " + " | ".join(cells) + f" | {entry['wall_time_s']:.1f} s |"


def _reference_label(ref: dict[str, Any]) -> str:
    probe = "probe known" if str(ref.get("probe", "")).startswith("known") else "probe refined"
    return f"{ref.get('engine', 'reference')}, {ref.get('iterations', '?')} iterations, flat object, {probe}"


def expect_table(shipped: dict[str, Any], brief: Optional[dict[str, Any]] = None) -> str:
    """The table (markdown) and its summary line from ``evaluate``'s JSON reports of the demo.

    ``shipped`` must hold the network, the refined object and the flat
    control; its pty-chi reference and ``brief`` are added where present.
    """
    for key in ("network", "refined", "refine_control"):
        if key not in shipped:
            raise ValueError(f"the shipped bundle's evaluation has no {key!r} entry: it must come from "
                             "`ptycho-export evaluate BUNDLE SCAN --refine` (scripts/demo.sh runs it so)")
    sweeps = shipped["refined"].get("sweeps", "?")
    lines = [HEADER,
             _row("shipped network alone", shipped["network"]),
             _row(f"shipped network + {sweeps} refinement sweeps (`--refine`, what `infer` does by default)",
                  shipped["refined"], bold=True),
             _row(f"the same {sweeps} sweeps from a flat object (the control)", shipped["refine_control"])]
    ref = shipped.get("reference")
    if ref is not None:
        lines.append(_row(_reference_label(ref), ref))
    if brief is not None and "network" in brief:
        lines.append(_row("bundle trained by the demo (`brief/wts.h5`), alone", brief["network"]))
        if "refined" in brief:
            lines.append(_row(f"the same + {brief['refined'].get('sweeps', '?')} refinement sweeps", brief["refined"]))
    summary = []
    if ref is not None and shipped.get("refined_speedup"):
        summary.append(f"network + refinement {shipped['refined_speedup']:.1f}× faster than the "
                       f"{ref.get('engine', 'reference')} row, network included")
    gain = shipped.get("network_start_gain")
    if gain:
        verdict = shipped.get("network_start_verdict")
        summary.append(f"the network's start against the flat start: phase SSIM {gain['phase_ssim']:+.3f}, "
                       f"amplitude SSIM {gain['amplitude_ssim']:+.3f}" + (f" ({verdict})" if verdict else ""))
    table, sentence = "\n".join(lines), "; ".join(summary)
    return table + (f"\n\n{sentence[0].upper()}{sentence[1:]}." if summary else "")


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between its START and END markers replaced by ``block``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README needs exactly one {START!r} line followed by one {END!r} line")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n\n{block}\n\n{END}{tail}"  # blank lines: the table is its own markdown block


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc} (run scripts/demo.sh OUT first)") from exc


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (no half-written file),
    keeping the file's permissions (mkstemp's file is private)."""
    mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptycho_export.expect_table", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the demo's output folder (scripts/demo.sh OUT)")
    parser.add_argument("--readme", type=Path, help="also write the table into this README, between its markers")
    args = parser.parse_args(argv)
    try:
        shipped = _read(args.out / "evaluation.json")
        brief_path = args.out / "brief" / "evaluation.json"
        table = expect_table(shipped, _read(brief_path) if brief_path.exists() else None)
        if args.readme is not None:
            write_atomically(args.readme, replace_block(args.readme.read_text(encoding="utf-8"), table))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: an evaluation JSON under {args.out} lacks {exc}: is it from `ptycho-export evaluate`?",
              file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
