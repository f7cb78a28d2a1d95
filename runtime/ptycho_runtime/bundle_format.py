"""Deprecated: the bundle format is the sub-package ``ptycho_runtime.format`` (this path goes away in the next release).

``bundle_format`` was one 1.4k-line module; it is now ``format.schema``
(layout, limits), ``format.errors``, ``format.checksum``, ``format.atomic``,
``format.params`` (value checks), ``format.contents``, ``format.policy`` (the
safe HDF5 walk), ``format.reader`` and ``format.isolated`` (``read_bundle``), ``format.graphs`` (ONNX / TorchScript
checks) and ``format.writer``. Every name it had, public or not, is here
unchanged; patch the defining module, not this one.
"""

from importlib import import_module as _import_module

from ._deprecation import warn_moved as _warn_moved

_warn_moved(__name__, "ptycho_runtime.format")

_MODULES = ("schema", "errors", "checksum", "atomic", "checks", "contents", "policy", "graphs", "reader",
            "isolated", "writer")
for _name in _MODULES:
    globals().update({k: v for k, v in vars(_import_module(f"ptycho_runtime.format.{_name}")).items()
                      if not k.startswith("__")})
del _name

# the helpers that were private to the one module and are shared between the new ones under public names
_fix_damaged, _is_int, _is_number, _short = fix_damaged, is_int, is_number, short  # noqa: F821
_Policy, _DatasetPlan, _read_plan, _attr_value, _scalar_attr = Policy, DatasetPlan, read_plan, attr_value, scalar_attr  # noqa: F821
_open_h5, _check_graph_metadata = open_h5, check_graph_metadata  # noqa: F821


def atomic_bundle_write(path, copy_existing=False):  # noqa: ANN001, ANN201 - the old name, unchanged behaviour
    """Deprecated name of ``format.atomic_h5_write`` (it writes any HDF5 file, not only bundles)."""
    _warn_moved("ptycho_runtime.bundle_format.atomic_bundle_write", "ptycho_runtime.format.atomic_h5_write")
    return atomic_h5_write(path, copy_existing)  # noqa: F821
