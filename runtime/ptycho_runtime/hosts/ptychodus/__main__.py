"""``python -m ptycho_runtime.hosts.ptychodus [ptychodus arguments]``: ptychodus 1.7 with our reconstructor registered.

ptychodus 1.7 has no plugin hook for reconstructors: ``ModelCore`` builds a
hard-coded list of libraries and hands it to ``ProcessingCore``. So this
entry point replaces the ``ProcessingCore`` name that ``ptychodus.model.core``
uses with a subclass (``RegisteringProcessingCore``) that appends our library
to that list, then runs ptychodus's own ``main``. Nothing else changes: the
GUI, batch mode (``-b reconstruct -i IN -o OUT``) and settings files work as
with ``ptychodus``; select ``Algorithm = ptycho-runtime_ptychopinn`` under
``[Processing]`` and give the bundle as the model file (``IN/model.h5``).

It also makes an unknown algorithm an error. Released ptychodus logs an
unknown ``Algorithm`` at debug level, keeps "none", and a batch run then
reconstructs nothing and exits 0. Here the rejected name is remembered and
any reconstruct call fails with a ``ValueError`` naming it and listing the
known ones, so batch mode logs the error and exits with ptychodus's failure
code.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional, Sequence

from ptychodus.model import core as _core
from ptychodus.model.processing import ProcessingCore

from .reconstructor import PtychoRuntimeReconstructorLibrary

log = logging.getLogger("ptycho_runtime.ptychodus")


class UnknownAlgorithmError(ValueError):
    """The settings name a reconstruction algorithm that no registered library provides."""


class RegisteringProcessingCore(ProcessingCore):
    """ptychodus's ``ProcessingCore`` with our library appended, and unknown algorithm names made errors."""

    def __init__(self, task_manager: Any, settings_registry: Any, product_api: Any,
                 algorithm_libraries: Sequence[Any]) -> None:
        self.ptycho_runtime_library = PtychoRuntimeReconstructorLibrary(settings_registry)
        super().__init__(task_manager, settings_registry, product_api,
                         [*algorithm_libraries, self.ptycho_runtime_library])
        _refuse_unknown_algorithms(self.algorithm_parameter, self.processing_api)


def _refuse_unknown_algorithms(parameter: Any, api: Any) -> None:
    """Remember a rejected algorithm name; make ``reconstruct`` raise ``UnknownAlgorithmError`` for it."""
    rejected: dict[str, str] = {}
    set_value = parameter.set_value

    def checked_set_value(value: str, *, notify: bool = True) -> None:
        known = set(parameter.available_reconstructors())
        if value.strip().casefold() in known:
            rejected.clear()
        else:
            rejected["name"] = value
            log.error('unknown reconstruction algorithm "%s"; known: %s', value, ", ".join(sorted(known)))
        set_value(value, notify=notify)

    parameter.set_value = checked_set_value
    reconstruct = api.reconstruct

    def checked_reconstruct(*, algorithm: Optional[str] = None, **kwargs: Any) -> int:
        if algorithm is not None:
            checked_set_value(algorithm)
        known = sorted(parameter.available_reconstructors())
        if rejected or parameter.get_value() not in known:
            name = rejected.get("name", parameter.get_value())
            raise UnknownAlgorithmError(f'unknown reconstruction algorithm "{name}": set [Processing] Algorithm to '
                                        f'one of {", ".join(known)}')
        return reconstruct(**kwargs)

    api.reconstruct = checked_reconstruct


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ptychodus (its own ``main`` and arguments) with ``RegisteringProcessingCore`` in place."""
    from ptychodus.__main__ import main as ptychodus_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    _core.ProcessingCore = RegisteringProcessingCore  # the one change: before ModelCore is built
    return int(ptychodus_main())


if __name__ == "__main__":
    sys.exit(main())
