"""Per-target build recipes (``trt_engines/recipes/*.yaml``): a YAML mapping of build settings,
checked key by key, and the TensorRT version it was written for."""

import os
from typing import Any, Dict

from nexedge.export.trt_rules import check_precision

RECIPE_KEYS = {
    "target": str, "jetpack": str, "tensorrt": str, "notes": str,
    "precision": str, "max_batch": int, "opt_batch": int, "workspace_mib": int,
    "dla_core": int, "version_compatible": bool,
}


def load_recipe(path: str) -> Dict[str, Any]:
    """A per-target build recipe (YAML mapping, keys :data:`RECIPE_KEYS`); errors name the key."""
    import yaml

    if not os.path.exists(path):
        raise FileNotFoundError(f"build recipe not found: {path}")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of build settings, got {type(data).__name__}")
    for key, value in data.items():
        if key not in RECIPE_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}; expected some of {', '.join(RECIPE_KEYS)}")
        want = RECIPE_KEYS[key]
        if value is not None and not (isinstance(value, want) and not (want is int and isinstance(value, bool))):
            raise ValueError(f"{path}: {key} must be {want.__name__}, got {value!r}")
    if "precision" in data:
        check_precision(data["precision"])
    return data


def check_recipe_version(recipe: Dict[str, Any], trt_version: str, path: str = "recipe") -> None:
    """The recipe's ``tensorrt`` (e.g. ``"10.3"``) must prefix the installed version."""
    want = recipe.get("tensorrt")
    if want and not (trt_version == want or trt_version.startswith(str(want) + ".")):
        raise ValueError(f"{path} is for TensorRT {want} ({recipe.get('target', 'its target')}), "
                         f"but this machine has TensorRT {trt_version}")
