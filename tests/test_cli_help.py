"""Both command lines, as a newcomer meets them: every default and exit code in --help, wrong files refused fast.

No torch needed: building the parsers and refusing a non-bundle must not import it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

from ptycho_export import cli as export_cli
from ptycho_runtime import cli as runtime_cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _undocumented_defaults(parser: argparse.ArgumentParser) -> list[str]:
    """Options whose help does not say their default (flags that default to off need not)."""
    bad = []
    for a in parser._actions:
        if not a.option_strings or a.help in (None, argparse.SUPPRESS) or a.default is argparse.SUPPRESS:
            continue
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction)):
            continue
        if a.required or "required" in a.help:
            continue
        text = a.help
        if "%(default)" in text:
            continue
        if "default" in text.lower() and (a.default is None or str(a.default) in text
                                          or isinstance(a, argparse.BooleanOptionalAction)):
            continue
        if isinstance(a, argparse._AppendAction) and a.default is None and "default" in text:
            continue
        bad.append(f"{parser.prog} {a.option_strings[0]} (default {a.default!r}): {text!r}")
    return bad


@pytest.mark.parametrize("build", [export_cli.build_parser, runtime_cli.build_parser], ids=["export", "runtime"])
def test_every_subcommand_help_shows_defaults_and_exit_codes(build):
    parser = build()
    subs = _subparsers(parser)
    assert subs, "no subcommands found"
    bad = []
    for name, sub in subs.items():
        bad += _undocumented_defaults(sub)
        text = sub.format_help()
        assert "exit codes:" in text and "0  success" in text and "2  " in text, f"{name}: no exit codes in --help"
        assert " (default: None)" not in text and "(default False)" not in text
    assert not bad, "options whose --help hides the default:\n" + "\n".join(bad)


def test_train_help_shows_the_defaults_a_newcomer_asked_for(capsys):
    with pytest.raises(SystemExit):
        export_cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("training epochs; with --time-budget, the most allowed (default 10)",
                     "width multiplier of the U-Net's filters (default 2)", "(1, 2 or 3; default 1)",
                     "groups per step (default 16)", "3 trained and saved, but a compiled graph failed parity"):
        assert expected in text, expected


def test_size_units_are_mib_in_both_clis():
    import importlib
    import inspect
    import pkgutil

    modules = [runtime_cli, export_cli] + [importlib.import_module(f"{export_cli.__name__}.{m.name}")
                                           for m in pkgutil.iter_modules(export_cli.__path__) if m.name != "__main__"]
    assert len(modules) > 5  # every module of the ptycho_export.cli package, not only its __init__
    for module in modules:
        src = inspect.getsource(module)
        assert " MB" not in src and "1e6:" not in src, module.__name__


def test_a_file_that_is_not_a_bundle_fails_fast_without_importing_torch(tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a bundle\n")
    code = textwrap.dedent(f"""
        import sys, time
        t0 = time.perf_counter()
        from ptycho_export.cli import main
        rcs = [main([{str(garbage)!r}]), main(["verify", {str(garbage)!r}]), main(["inspect", {str(garbage)!r}]),
               main(["evaluate", {str(garbage)!r}, "scan.npz"])]
        print(rcs, "torch" in sys.modules, time.perf_counter() - t0)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rcs, rest = proc.stdout.split("]", 1)
    assert rcs == "[2, 2, 2, 2", proc.stdout
    assert rest.split()[0] == "False", "torch was imported before refusing a file that is not a bundle"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ptycho-export: error:")]
    assert len(errors) == 4 and all("not an HDF5 file, not a ptycho-export bundle" in e for e in errors), proc.stderr
