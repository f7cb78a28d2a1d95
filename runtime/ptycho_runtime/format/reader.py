"""The one parser of the format, under the reader policy (see ``format.schema``), run in the parsing process.

``read_bundle_in_process`` and ``check_bundle_file_in_process`` run libhdf5
in the calling process, so only ``format.parser_process`` calls them; everyone else
calls ``format.read_bundle`` / ``check_bundle_file`` (``format.isolated``),
which run them in that child under a time and memory limit.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from .checks import check_graph_metadata, is_int, short, validate_params, validate_physics
from .contents import BundleContents, GraphRecord
from .errors import BundleError, BundleFormatError, BundleParamsError, fix_damaged, resolve_bundle_path
from .policy import DatasetPlan, Policy, attr_value, check_header, open_h5, read_plan
from .schema import (
    ALLOWED_N,
    GRAPH_KINDS,
    MAX_EPOCHS,
    MAX_GRAPH_BYTES,
    MAX_HISTORY_METRICS,
    MAX_PARAM_ARRAYS,
    MAX_PARITY_BATCH,
    MAX_PARITY_CASES,
    MAX_PARITY_ENTRIES,
    MAX_TENSORS_PER_MODEL,
    MODEL_NAMES,
    WEIGHT_BYTES_PER_SCALE2,
)

_WRAPPED = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError, UnicodeError,
            RecursionError, MemoryError, ZeroDivisionError, EOFError)


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[Path, h5py.File, int, dict[str, Any]]]:
    """Resolve, open as a regular HDF5 file, check the header; any other failure inside becomes a BundleFormatError."""
    p = resolve_bundle_path(path)
    f, size = open_h5(p)
    try:
        try:
            yield p, f, size, check_header(f, p)
        except BundleError:
            raise
        except _WRAPPED as exc:
            raise BundleFormatError(f"{p} is damaged or incomplete ({type(exc).__name__}). {fix_damaged(p)}",
                                    p) from None
    finally:
        with contextlib.suppress(Exception):
            f.close()


def check_bundle_file_in_process(path: str | os.PathLike) -> Path:
    """Fail fast on anything that is not a bundle: a regular HDF5 file with this format's header.

    Reads no payload (milliseconds), so commands can refuse a wrong file
    before importing torch or onnx; ``read_bundle_in_process`` still checks everything
    else. Returns the resolved path; raises only ``BundleError`` subclasses.
    """
    with _opened(path) as (p, *_):
        return p


def read_bundle_in_process(path: str | os.PathLike) -> BundleContents:
    """Open a bundle under the reader policy; return its verified contents in memory.

    Order: regular-file check, HDF5 magic, header, a walk of the whole tree by
    schema (links, storage, filters, dtypes, declared sizes) *before* any
    payload is read, then every payload read and checksum-verified, then
    params, weights and graph metadata checked against each other. Raises only
    ``BundleError`` subclasses.
    """
    with _opened(path) as (p, f, size, header):
        return _read_verified(f, p, header, size)


NO_ATTRS: tuple[str, ...] = ()  # groups carry no attributes the reader reads
ROOT_GROUPS = ("params", "models", "training", "graphs", "parity", "physics")


@dataclass
class _Plans:
    """The datasets still to read, planned (checked) by the walk: (what, key, plan)."""

    json: list[tuple[str, tuple, DatasetPlan]] = field(default_factory=list)
    arrays: list[tuple[str, tuple, DatasetPlan]] = field(default_factory=list)


def _read_verified(f: h5py.File, p: Path, header: dict[str, Any], file_size: int) -> BundleContents:
    """The reader policy in order: params first (they bound everything else), plan the rest, read, cross-check."""
    pol = Policy(f, p, file_size)
    root = pol.children(f, lambda n: n in ROOT_GROUPS, len(ROOT_GROUPS), "group")
    if "params" not in root:
        raise BundleFormatError(f"{p} has no /params: the params it was trained with are missing. "
                                f"{fix_damaged(p)}", p, "/params")
    params = _read_params(pol, root["params"], p)
    contents = BundleContents(path=p, header=header, params=params, file_size=file_size)
    plans = _Plans()
    if "models" in root:
        _plan_models(pol, root["models"], contents, plans)
    if "training" in root:
        _plan_training(pol, root["training"], contents, plans)
    if "graphs" in root:
        _plan_graphs(pol, root["graphs"], plans)
    if "parity" in root:
        _plan_parity(pol, root["parity"], params, plans)
    if "physics" in root:
        _plan_physics(pol, root["physics"], plans)
    _read_planned(pol, plans, contents)
    _cross_check(contents, pol)
    return contents


def _read_params(pol: Policy, pg: h5py.Group, p: Path) -> dict[str, Any]:
    """/params: config_json and the array params, read and validated (N, gridsize and epochs bound the rest)."""
    pol.check_attrs(pg, NO_ATTRS)
    pkids = pol.mixed(pg, {"config_json": "dataset", "arrays": "group"})
    if "config_json" not in pkids:
        raise BundleFormatError(f"{p} has no /params/config_json: the params it was trained with are missing. "
                                f"{fix_damaged(p)}", p, "/params/config_json")
    params = read_plan(pol, pol.dataset(pkids["config_json"], "json", 0))
    if not isinstance(params, dict):
        raise BundleParamsError(f"{p}: /params/config_json is not a JSON object. {fix_damaged(p)}", p,
                                "/params/config_json")
    N = params.get("N")
    N_bound = N if is_int(N) and N in ALLOWED_N else max(ALLOWED_N)
    if "arrays" in pkids:
        arrays = pol.children(pkids["arrays"], None, MAX_PARAM_ARRAYS, "dataset")
        plans = {}
        for key, ds in arrays.items():
            if key in params:
                raise BundleParamsError(
                    f"{p}: /params/arrays/{key} shadows the scalar param '{key}' of config_json; a key may be "
                    f"stored once. {fix_damaged(p)}", p, ds.name)
            plans[key] = pol.dataset(ds, "array", N_bound * N_bound * 16, "biufc")
        for key, plan in plans.items():
            params[key] = read_plan(pol, plan)
    validate_params(params, p)
    return params


def _plan_models(pol: Policy, group: h5py.Group, contents: BundleContents, plans: _Plans) -> None:
    """/models/<name>: architecture JSON and every tensor, the weights bounded by what the params allow."""
    params = contents.params
    models = pol.children(group, lambda n: n in MODEL_NAMES, len(MODEL_NAMES), "group")
    weight_cap = params.get("n_filters_scale", 1) ** 2 * WEIGHT_BYTES_PER_SCALE2[params["N"]]
    for name, g in models.items():
        pol.check_attrs(g, ("n_parameters",))
        kids = pol.mixed(g, {"architecture_json": "dataset", "state_dict": "group"})
        if "architecture_json" not in kids or "state_dict" not in kids:
            raise pol.bad(g.name, "lacks architecture_json or state_dict")
        plans.json.append(("arch", (name,), pol.dataset(kids["architecture_json"], "json", 0)))
        total = 0
        for key, ds in pol.children(kids["state_dict"], None, MAX_TENSORS_PER_MODEL, "dataset").items():
            plan = pol.dataset(ds, "array", weight_cap, "biufc")
            total += plan.nbytes
            if total > weight_cap:
                raise pol.limit(kids["state_dict"].name, f"holds more than {weight_cap} bytes of weights, the "
                                f"most a model with N={params['N']}, n_filters_scale="
                                f"{params.get('n_filters_scale', 1)} can have")
            plans.arrays.append(("weight", (name, key), plan))
        n_par = attr_value(g, "n_parameters")
        if is_int(n_par):
            contents.n_parameters[name] = int(n_par)


def _plan_training(pol: Policy, tg: h5py.Group, contents: BundleContents, plans: _Plans) -> None:
    """/training: the summary (read now: its epoch count bounds the history) and the per-epoch history."""
    pol.check_attrs(tg, NO_ATTRS)
    kids = pol.mixed(tg, {"summary_json": "dataset", "history": "group"})
    if "summary_json" in kids:
        contents.training = read_plan(pol, pol.dataset(kids["summary_json"], "json", 0))
        if not isinstance(contents.training, dict):
            raise pol.bad(kids["summary_json"].name, "is not a JSON object")
    history_group = kids.get("history")
    if history_group is None:
        return
    epochs = MAX_EPOCHS
    for key in ("epochs_run", "nepochs", "epochs"):
        v = contents.training.get(key)
        if is_int(v) and 0 <= v <= MAX_EPOCHS:
            epochs = max(int(v), 1)
            break
    for key, ds in pol.children(history_group, None, MAX_HISTORY_METRICS, "dataset").items():
        plans.arrays.append(("history", (key,), pol.dataset(ds, "array", epochs * 8, "fiu", ndim=1)))


def _plan_graphs(pol: Policy, group: h5py.Group, plans: _Plans) -> None:
    """/graphs/<kind>/<model>: the graph bytes and their metadata."""
    for kind, kg in pol.children(group, lambda n: n in GRAPH_KINDS, len(GRAPH_KINDS), "group").items():
        pol.check_attrs(kg, NO_ATTRS)
        for model, g in pol.children(kg, lambda n: n in MODEL_NAMES, len(MODEL_NAMES), "group").items():
            pol.check_attrs(g, NO_ATTRS)
            kids = pol.children(g, lambda n: n in ("bytes", "metadata_json"), 2, "dataset")
            if len(kids) != 2:
                raise pol.bad(g.name, "needs both bytes and metadata_json")
            plans.arrays.append(("graph", (kind, model), pol.dataset(kids["bytes"], "array", MAX_GRAPH_BYTES,
                                                                     "u", ndim=1)))
            plans.json.append(("graph_meta", (kind, model), pol.dataset(kids["metadata_json"], "json", 0)))


def _plan_parity(pol: Policy, group: h5py.Group, params: Mapping[str, Any], plans: _Plans) -> None:
    """/parity/b<batch>: the fixed inputs and eager outputs, each bounded by the batch and the params."""
    cases = pol.children(group, lambda n: bool(re.fullmatch(r"b[0-9]{1,2}", n)), MAX_PARITY_CASES, "group")
    per = MAX_PARITY_BATCH * params["gridsize"] ** 2 * params["N"] ** 2 * 8
    for case, g in cases.items():
        pol.check_attrs(g, NO_ATTRS)
        for key, ds in pol.children(g, _parity_key, MAX_PARITY_ENTRIES, "dataset").items():
            plans.arrays.append(("parity", (case, key), pol.dataset(ds, "array", per, "f", ndim=4)))


def _plan_physics(pol: Policy, phg: h5py.Group, plans: _Plans) -> None:
    """/physics/metadata_json (optional)."""
    pol.check_attrs(phg, NO_ATTRS)
    kids = pol.children(phg, lambda n: n == "metadata_json", 1, "dataset")
    if "metadata_json" in kids:
        plans.json.append(("physics", (), pol.dataset(kids["metadata_json"], "json", 0)))


def _read_planned(pol: Policy, plans: _Plans, contents: BundleContents) -> None:
    """Read and checksum-verify every planned dataset into ``contents``."""
    for what, key, plan in plans.json:
        value = read_plan(pol, plan)
        if not isinstance(value, dict):
            raise pol.bad(plan.ds.name, "is not a JSON object")
        if what == "arch":
            contents.architectures[key[0]] = value
        elif what == "physics":
            contents.physics = validate_physics(value, contents.path)
        else:
            contents.graphs[key] = GraphRecord(key[0], key[1], b"", value)
    for what, key, plan in plans.arrays:
        value = read_plan(pol, plan)
        if what == "weight":
            contents.state_dicts.setdefault(key[0], {})[key[1]] = value
        elif what == "history":
            contents.history[key[0]] = value
        elif what == "graph":
            if plan.ds.dtype != np.uint8:
                raise pol.bad(plan.ds.name, "should be uint8 bytes")
            contents.graphs[key].data = value.tobytes()
        else:
            contents.parity.setdefault(key[0], {})[key[1]] = value
    for name in MODEL_NAMES:  # every model with weights has a state_dict group, maybe empty
        if name in contents.architectures:
            contents.state_dicts.setdefault(name, {})


def _cross_check(contents: BundleContents, pol: Policy) -> None:
    """Architectures, graph metadata and parity shapes against the params."""
    p, params = contents.path, contents.params
    for name, arch in contents.architectures.items():
        for key in ("N", "gridsize", "n_filters_scale", "output_mode"):
            if key in arch and key in params and arch[key] != params[key]:
                raise BundleParamsError(
                    f"{p}: /models/{name}/architecture_json has {key}={short(arch[key])} but the params say "
                    f"{short(params[key])}; the bundle was edited. {fix_damaged(p)}", p,
                    f"/models/{name}/architecture_json")
    for (kind, model), rec in contents.graphs.items():
        check_graph_metadata(rec.metadata, kind, model, params, rec.data, p, f"/graphs/{kind}/{model}")
    _check_parity_shapes(contents, pol)


def _parity_key(name: str) -> bool:
    if name in ("input.amplitude", "input.diffraction", "input.offsets"):
        return True
    model, _, output = name.partition(".")
    return model in MODEL_NAMES and bool(re.fullmatch(r"[a-z_]{1,32}", output))


def _check_parity_shapes(contents: BundleContents, pol: Policy) -> None:
    N, C = contents.params["N"], contents.params["gridsize"] ** 2
    for case, arrays in contents.parity.items():
        b = int(case[1:])
        for key, arr in arrays.items():
            expected = (b, C, 1, 2) if key == "input.offsets" else (b, C, N, N)
            if arr.shape != expected or arr.dtype != np.float32:
                raise pol.bad(f"/parity/{case}/{key}", f"has {arr.dtype} {list(arr.shape)}; expected float32 "
                                                       f"{list(expected)}")
        if "input.amplitude" not in arrays and "input.diffraction" not in arrays:
            raise pol.bad(f"/parity/{case}", "has no input.amplitude")
