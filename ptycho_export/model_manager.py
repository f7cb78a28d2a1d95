"""Save and load trained models as one pickle-free HDF5 bundle (CONFIG-001 on load).

The layout and the reader live in ``ptycho_runtime.format`` (one
definition for writer and reader); this module adds what needs torch:
turning models into tensors and tensors back into models.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import h5py
import numpy as np
import torch
from torch import nn

from ptycho_runtime import format as fmt

from . import __version__, params
from .config import ModelConfig
from .model import build_models, count_parameters

REQUIRED_MODELS = fmt.MODEL_NAMES


def _versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "h5py": h5py.__version__}


def _numpy_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors → numpy; everything else as it is (``fmt.split_params`` decides JSON vs dataset)."""
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in values.items()}


def _probe_of(models: Mapping[str, nn.Module]) -> np.ndarray:
    pair = models["autoencoder"].physics.probe.detach().cpu().numpy()
    return (pair[0] + 1j * pair[1]).astype(np.complex64)


def _model_record(model: nn.Module, architecture: dict[str, Any]) -> fmt.ModelRecord:
    return fmt.ModelRecord({**architecture, "class": type(model).__name__},
                           {k: t.detach().cpu().numpy() for k, t in model.state_dict().items()},
                           count_parameters(model))


def save_torch_bundle(models_dict: Mapping[str, nn.Module], base_path: Union[str, os.PathLike], config: Any,
                      intensity_scale: Optional[float] = None, probe: Optional[np.ndarray] = None,
                      history: Optional[Mapping[str, Any]] = None,
                      training_summary: Optional[Mapping[str, Any]] = None,
                      physics: Optional[Mapping[str, Optional[float]]] = None) -> Path:
    """Write ``autoencoder`` and ``diffraction_to_obj`` with their params to one HDF5 bundle.

    ``config`` is a TrainingConfig or ModelConfig; its fields are written over
    a copy of the live ``params.cfg`` (read, not changed) to form the
    bundle's params, as PtychoPINN saves its params. ``intensity_scale`` is
    the scale the training inputs were multiplied by (the normalisation
    contract; default: params.cfg's, else the model's). ``probe`` defaults to
    the probe inside the autoencoder. ``physics``: the instrument
    (``bundle_format.PHYSICS_KEYS``; written to ``/physics`` so the runtime can check a host
    against it). The layout is ``fmt.write_bundle``'s;
    the write is atomic: the previous file at ``base_path`` survives any failure.
    """
    for name in REQUIRED_MODELS:
        if name not in models_dict:
            raise ValueError(f"save_torch_bundle needs both models; '{name}' is missing from models_dict "
                             f"(got {sorted(models_dict)}). Pass the dict returned by "
                             "create_torch_model_with_gridsize.")
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
    summary = {"intensity_scale": float(intensity_scale), "trained_intensity_scale": trained_scale,
               **(dict(training_summary) if training_summary else {})}
    return fmt.write_bundle(base_path, _numpy_params(values),
                            {name: _model_record(models_dict[name], architecture) for name in REQUIRED_MODELS},
                            producer=f"ptycho-export {__version__}", versions=_versions(), training=summary,
                            history=history, physics=physics)


def _check_required_params(bundle_params: Mapping[str, Any], path: Path) -> None:
    """The params a model cannot be rebuilt without, the training probe included (the runtime needs it too).

    Without this check ``build_models`` would fall back to the default
    simulated probe and load a model whose physics is not the one it was
    trained with.
    """
    missing = [k for k in ("N", "gridsize") if bundle_params.get(k) is None]
    if missing:
        raise fmt.BundleParamsError(f"Cannot reconstruct model architecture: the bundle {path} has no "
                                    f"{' or '.join(missing)} in its params. Re-save the model with save_torch_bundle.",
                                    path, "/params/config_json")
    if bundle_params.get("probe") is None:
        raise fmt.BundleParamsError(f"The bundle {path} has no probe in its params (/params/arrays/probe): the "
                                    "model's physics cannot be rebuilt without the probe it was trained with. "
                                    "Re-save the model with save_torch_bundle, which stores it.", path,
                                    "/params/arrays/probe")


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


def models_from_contents(contents: fmt.BundleContents, names: Sequence[str] = REQUIRED_MODELS
                         ) -> dict[str, nn.Module]:
    """Rebuild models from a read bundle's own params and load their weights strictly; ``params.cfg`` untouched.

    The path for library code (export, verify) that needs the eager models
    but must not change the host's global state. Models are in eval mode on
    the CPU. Every problem with the bundle raises a ``BundleError`` subclass.
    """
    bundle_params = contents.params
    _check_required_params(bundle_params, contents.path)
    for name in names:
        if name not in contents.state_dicts:
            raise fmt.BundleFormatError(
                f"{contents.path} has no eager weights for '{name}' (models present: "
                f"{sorted(contents.state_dicts) or 'none'}); it cannot be loaded into PyTorch.")
    try:
        config = params.model_config_from_params(bundle_params)
        models = build_models(config, bundle_params.get("probe"), bundle_params.get("intensity_scale"),
                              float(bundle_params.get("nphotons", 1e9)))
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
    for m in models.values():
        m.eval()
    return models


def load_torch_bundle(base_path: Union[str, os.PathLike], model_name: Optional[str] = None
                      ) -> tuple[Union[nn.Module, dict[str, nn.Module]], dict[str, Any]]:
    """Load a bundle: verify it, rebuild, load weights strictly, then restore ``params.cfg`` (CONFIG-001).

    Returns ``(model, params)`` for a ``model_name``, or ``({"autoencoder", "diffraction_to_obj"}, params)``.
    Models are in eval mode on the CPU. The file is read under the reader
    policy of ``ptycho_runtime.format`` (params validated, the model
    size bounded by them); every problem with it raises a ``BundleError``
    subclass, and ``params.cfg`` is only updated once the models load, so a
    refused bundle leaves no trace in it. Library code that must not touch
    ``params.cfg`` uses ``models_from_contents``.
    """
    if model_name is not None and model_name not in REQUIRED_MODELS:  # a caller's mistake, not the file's
        raise ValueError(f"model_name must be one of {', '.join(REQUIRED_MODELS)} or None (got {model_name!r})")
    contents = fmt.read_bundle(base_path)
    names = REQUIRED_MODELS if model_name is None else (model_name,)
    models = models_from_contents(contents, names)
    params.restore_params(params.cfg, contents.params)  # CONFIG-001
    returned_params = copy.deepcopy(contents.params)
    if model_name is not None:
        return models[model_name], returned_params
    return models, returned_params
