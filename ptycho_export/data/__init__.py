"""Data layer: containers, synthetic scans, the PtychoPINN NPZ contract, grouping.

numpy only (no torch), so data can be prepared, inspected and validated
without the model stack.
"""

from .container import GroupedData, PtychoData
from .grouping import group_neighbors, make_groups
from .npz import load_npz, save_npz
from .simulate import (
    OBJECT_KINDS,
    default_probe,
    extract_patches,
    far_field_amplitude,
    intensity_scale_from_nphotons,
    make_object,
    normalization_factor,
    scan_positions,
    simulate_scan,
)

__all__ = [
    "GroupedData",
    "OBJECT_KINDS",
    "PtychoData",
    "default_probe",
    "extract_patches",
    "far_field_amplitude",
    "group_neighbors",
    "intensity_scale_from_nphotons",
    "load_npz",
    "make_groups",
    "make_object",
    "normalization_factor",
    "save_npz",
    "scan_positions",
    "simulate_scan",
]
