"""Save and load trained models as one pickle-free HDF5 bundle (CONFIG-001 on load).

The layout and the reader live in ``ptycho_runtime.bundle_format`` (one
definition for writer and reader); this module adds what needs torch:
turning models into tensors and tensors back into models.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import h5py
import numpy as np
import torch
from torch import nn

from ptycho_runtime import bundle_format as fmt

from . import __version__, params
from .config import ModelConfig
from .model import count_parameters, create_torch_model_with_gridsize

REQUIRED_MODELS = fmt.MODEL_NAMES


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__}


def _split_params(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scalars go to JSON, arrays (the probe) to datasets, complex kept complex."""
    scalars: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[key] = value
        elif isinstance(value, os.PathLike):
            scalars[key] = os.fspath(value)
        else:
            scalars[key] = value
    return scalars, arrays


def _probe_of(models: Mapping[str, nn.Module]) -> np.ndarray:
    pair = models["autoencoder"].physics.probe.detach().cpu().numpy()
    return (pair[0] + 1j * pair[1]).astype(np.complex64)


def _write_model(group: h5py.Group, model: nn.Module, architecture: dict[str, Any]) -> None:
    fmt.write_json(group, "architecture_json", {**architecture, "class": type(model).__name__})
    group.attrs["n_parameters"] = count_parameters(model)
    sd_group = group.create_group("state_dict")
    for key, tensor in model.state_dict().items():
        fmt.write_payload(sd_group, key, tensor.detach().cpu().numpy())


def save_torch_bundle(models_dict: Mapping[str, nn.Module], base_path: Union[str, os.PathLike], config: Any,
                      intensity_scale: Optional[float] = None, probe: Optional[np.ndarray] = None,
                      history: Optional[Mapping[str, Any]] = None,
                      training_summary: Optional[Mapping[str, Any]] = None,
                      physics: Optional[Mapping[str, Optional[float]]] = None) -> Path:
    """Write ``autoencoder`` and ``diffraction_to_obj`` with their params to one HDF5 bundle.

    ``config`` is a TrainingConfig/InferenceConfig/ModelConfig; its fields are
    written over the live ``params.cfg`` to form the bundle's params.
    ``intensity_scale`` is the scale the training inputs were multiplied by
    (the normalisation contract; default: params.cfg's, else the model's).
    ``probe`` defaults to the probe inside the autoencoder. ``physics``: the
    instrument (``bundle_format.PHYSICS_KEYS``; written to ``/physics`` so
    the runtime can check a host against it). The write is
    atomic: the previous file at ``base_path`` survives any failure.
    """
    for name in REQUIRED_MODELS:
        if name not in models_dict:
            raise ValueError(f"save_torch_bundle needs both models; '{name}' is missing from models_dict "
                             f"(got {sorted(models_dict)}). Pass the dict returned by create_torch_model_with_gridsize.")
    values = params.update_legacy_dict(copy.deepcopy(params.cfg), config)
    # the architecture comes from the model itself, so the bundle always rebuilds what was saved
    model_cfg: ModelConfig = models_dict["diffraction_to_obj"].model_config
    params.update_legacy_dict(values, replace(model_cfg, intensity_scale=0.0))  # the scale is decided below
    scaler = models_dict["diffraction_to_obj"].scaler
    trained_scale = float(scaler.scale().detach())
    if intensity_scale is None:
        intensity_scale = values.get("intensity_scale") or trained_scale
    values["intensity_scale"] = float(intensity_scale)
    values["probe"] = np.asarray(probe if probe is not None else _probe_of(models_dict)).astype(np.complex64)
    architecture = asdict(model_cfg)
    architecture["intensity_scale"] = float(intensity_scale)
    scalars, arrays = _split_params(values)
    fmt.check_writable_params(scalars, arrays)  # never write a bundle the readers would refuse

    target = Path(base_path)
    with fmt.atomic_bundle_write(target) as f:
        fmt.write_header(f, producer=f"ptycho-export {__version__}", versions=_versions())
        pgroup = f.create_group("params")
        fmt.write_json(pgroup, "config_json", scalars)
        agroup = pgroup.create_group("arrays")
        for key, arr in arrays.items():
            fmt.write_payload(agroup, key, arr)
        mgroup = f.create_group("models")
        for name in REQUIRED_MODELS:
            _write_model(mgroup.create_group(name), models_dict[name], architecture)
        tgroup = f.create_group("training")
        summary = {"intensity_scale": float(intensity_scale), "trained_intensity_scale": trained_scale,
                   **(dict(training_summary) if training_summary else {})}
        fmt.write_json(tgroup, "summary_json", summary)
        hgroup = tgroup.create_group("history")
        for key, series in (history or {}).items():
            fmt.write_payload(hgroup, key, np.asarray(series, dtype=np.float64))
        if physics:
            fmt.write_physics(f, physics)
    return target


def _check_architecture_keys(bundle_params: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in ("N", "gridsize") if bundle_params.get(k) is None]
    if missing:
        raise fmt.BundleParamsError(f"Cannot reconstruct model architecture: the bundle {path} has no "
                                    f"{' or '.join(missing)} in its params. Re-save the model with save_torch_bundle.",
                                    path, "/params/config_json")


def _load_state(model: nn.Module, arrays: Mapping[str, np.ndarray], name: str, path: Path) -> None:
    """Strict load: every tensor present, none extra, same shape and dtype."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise fmt.BundleFormatError(
            f"Weights of '{name}' in {path} do not match the architecture rebuilt from its params: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}. The bundle is from an incompatible version.")
    tensors = {}
    for key, ref in expected.items():
        arr = np.asarray(arrays[key])
        try:
            t = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
        except (TypeError, ValueError):  # a dtype torch has no tensor type for
            raise fmt.BundleFormatError(f"Tensor {name}.{key} in {path} has dtype {arr.dtype}; the architecture "
                                        f"expects {ref.dtype}.", path, f"/models/{name}/state_dict/{key}") from None
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise fmt.BundleFormatError(
                f"Tensor {name}.{key} in {path} has shape {tuple(t.shape)} {t.dtype}; the architecture "
                f"expects {tuple(ref.shape)} {ref.dtype}.")
        tensors[key] = t
    model.load_state_dict(tensors, strict=True)


def load_torch_bundle(base_path: Union[str, os.PathLike], model_name: Optional[str] = None
                      ) -> tuple[Union[nn.Module, dict[str, nn.Module]], dict[str, Any]]:
    """Load a bundle: verify it, restore ``params.cfg`` (CONFIG-001), rebuild, load weights strictly.

    Returns ``(model, params)`` for a ``model_name``, or ``({"autoencoder", "diffraction_to_obj"}, params)``.
    Models are in eval mode on the CPU. The file is read under the reader
    policy of ``ptycho_runtime.bundle_format`` (params validated, the model
    size bounded by them); every problem with it raises a ``BundleError``
    subclass, and ``params.cfg`` is only updated once the models load.
    """
    if model_name is not None and model_name not in REQUIRED_MODELS:  # a caller's mistake, not the file's
        raise ValueError(f"model_name must be one of {', '.join(REQUIRED_MODELS)} or None (got {model_name!r})")
    contents = fmt.read_bundle(base_path)
    bundle_params = contents.params
    _check_architecture_keys(bundle_params, contents.path)
    names = REQUIRED_MODELS if model_name is None else (model_name,)
    for name in names:
        if name not in contents.state_dicts:
            raise fmt.BundleFormatError(
                f"{contents.path} has no eager weights for '{name}' (models present: "
                f"{sorted(contents.state_dicts) or 'none'}); it cannot be loaded into PyTorch.")

    # CONFIG-001: the models are built from the bundle's params over the live params.cfg; params.cfg itself
    # is updated only after they load, so a refused bundle leaves no trace in it
    cfg = params.restore_params(copy.deepcopy(params.cfg), bundle_params)
    try:
        models = create_torch_model_with_gridsize(int(cfg["gridsize"]), int(cfg["N"]), cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise fmt.BundleParamsError(f"The params of {contents.path} do not describe a model this version can build "
                                    f"({exc}). Re-export the bundle.", contents.path, "/params/config_json") from None
    for name in names:
        try:
            _load_state(models[name], contents.state_dicts[name], name, contents.path)
        except fmt.BundleError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:
            raise fmt.BundleFormatError(f"The weights of '{name}' in {contents.path} cannot be loaded "
                                        f"({type(exc).__name__}). Re-export the bundle.", contents.path,
                                        f"/models/{name}/state_dict") from None
    params.restore_params(params.cfg, bundle_params)
    for m in models.values():
        m.eval()
    returned_params = copy.deepcopy(bundle_params)
    if model_name is not None:
        return models[model_name], returned_params
    return models, returned_params
