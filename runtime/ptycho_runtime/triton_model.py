"""Deprecated: split into ``inference.triton_spec`` and ``distributed.triton_repository`` (alias, next release gone)."""

from ._deprecation import warn_moved as _warn_moved

_warn_moved(__name__, "ptycho_runtime.inference.triton_spec and ptycho_runtime.distributed.triton_repository")

from .distributed.triton_repository import *  # noqa: E402,F401,F403
from .distributed.triton_repository import (  # noqa: E402,F401
    MAX_BATCH_LIMIT,
    check_max_batch_size,
    check_queue_delay,
    config_pbtxt,
    parse_instances,
    preferred_batch_sizes,
    write_model_repository,
)
from .inference.triton_spec import *  # noqa: E402,F401,F403
from .inference.triton_spec import _MODEL_NAME  # noqa: E402,F401
