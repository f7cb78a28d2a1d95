"""``ptycho-export``: compile graphs into a bundle, inspect it, verify it, train a model, or evaluate one.

    ptycho-export BUNDLE.h5              add TorchScript + ONNX graphs (same as: ptycho-export bundle BUNDLE)
    ptycho-export inspect BUNDLE [--json]
    ptycho-export verify BUNDLE [--json]
    ptycho-export train --simulate lines --output-dir out/
    ptycho-export evaluate BUNDLE SCAN.npz [--reference [epie|lsqml]] [--json] [-o REPORT.json] [--figure FIG.png]

Layout (imports point down the list):

- ``main``: argv → command → exit code (one error line per failure);
- ``parser``: the argument parser, one function per subcommand;
- ``bundle_command``, ``inspect_command``, ``verify_command``, ``train_command``
  (with ``train_data`` and ``train_report``), ``evaluate_command``: each
  subcommand's work as a plain function (options dataclass in, result out)
  that a test calls without argv, and its printing apart;
- ``output`` and ``errors``: shared tables, JSON, exit codes, ``CliError``.

Heavy imports (torch, onnx, matplotlib) happen inside the commands that need
them, so ``inspect`` and ``--help`` start quickly.
"""

from __future__ import annotations

from ptycho_runtime.format import DEFAULT_OPSET
from ptycho_runtime.inference.parity import DEFAULT_TOLERANCE as PARITY_TOLERANCE

from .bundle_command import CompileOptions, compile_bundle
from .errors import EXIT_CHECKSUM, EXIT_ERROR, EXIT_OK, EXIT_PARITY, EXIT_USAGE, PROG, CliError
from .evaluate_command import EvaluateOptions, run_evaluate
from .inspect_command import inspect_bundle
from .main import main
from .parser import build_parser
from .train_command import TrainOptions, TrainResult, train
from .verify_command import VerifyOptions, run_verify

__all__ = ["DEFAULT_OPSET", "EXIT_CHECKSUM", "EXIT_ERROR", "EXIT_OK", "EXIT_PARITY", "EXIT_USAGE", "PARITY_TOLERANCE",
           "PROG", "CliError", "CompileOptions", "EvaluateOptions", "TrainOptions", "TrainResult", "VerifyOptions",
           "build_parser", "compile_bundle", "inspect_bundle", "main", "run_evaluate", "run_verify", "train"]
