"""Reading a YAML recipe: every key an option, each key once, each value of its option's type.

A typo in a recipe is the most common mistake, so its answer must not wait for torch and transformers (several
seconds): `recipe_keys_checked_early` reads the option names from the source of the option dataclasses, with `ast`,
and names an unknown key before anything heavy is imported. The exact check (types, choices) follows once the
argument parser exists.
"""

import ast
import importlib.util
import os
import re

import yaml

from .errors import UsageError, did_you_mean

PROG = "hf-balanced-reward"
TYPE_NAMES = {"float": "a number", "int": "an integer", "string_to_bool": "true or false", "str": "text"}


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                    "keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, which reads 1e-5 (no dot) as text; read it as the number it is, as YAML 1.2 does.
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_recipe(path: str) -> dict:
    """The recipe's mapping, or a UsageError naming the file and the line of a YAML mistake."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=UniqueKeyLoader)
    except OSError as err:
        raise UsageError(f"cannot read config '{path}': {err.strerror}.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(f"config '{path}' is not valid YAML: {problem}{where}.") from None
    values = values or {}
    if not isinstance(values, dict):
        raise UsageError(f"config '{path}' must be a mapping of option: value, got {type(values).__name__}.")
    return values


def check_keys(values: dict, valid_keys, path: str) -> None:
    for key in values:
        if key == "search" and key not in valid_keys:
            raise UsageError(f"config '{path}' has a search: block, which `{PROG} tune --config {path}` reads; "
                             "train takes the recipe without it.")
        if key not in valid_keys:
            raise UsageError(
                f"config '{path}' has unknown key '{key}'{did_you_mean(key, valid_keys)}. "
                f"See `{PROG} train --help` for the options."
            )


def config_path_in(argv: list[str]) -> str | None:
    """The value of `--config PATH` or `--config=PATH` (the last one given)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def dataclass_fields_in_source(path: str, class_name: str) -> list[str] | None:
    """The init field names a dataclass declares in its own body, read from its source file without importing it;
    None when the file or class is not found (then only the exact, slower check runs)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            names = []
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                if "ClassVar" in ast.unparse(item.annotation):
                    continue
                call = item.value if isinstance(item.value, ast.Call) else None
                if call and any(kw.arg == "init" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                                for kw in call.keywords):
                    continue
                names.append(item.target.id)
            return names
    return None


def training_option_names() -> list[str] | None:
    """Every key `train` accepts: `ScriptArguments` (cli_arguments.py), `BalancedRewardConfig` (config.py) and the
    `TrainingArguments` it extends, as declared in the installed sources; None when any cannot be read."""
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [(os.path.join(here, "cli_arguments.py"), "ScriptArguments"),
               (os.path.join(here, "config.py"), "BalancedRewardConfig"),
               (os.path.join(spec.submodule_search_locations[0], "training_args.py"), "TrainingArguments")]
    names = []
    for path, class_name in sources:
        found = dataclass_fields_in_source(path, class_name)
        if not found:
            return None
        names += found
    return names


def recipe_keys_checked_early(argv: list[str]) -> None:
    """Before transformers is imported: a YAML mistake or an unknown key in the `--config` recipe, answered at once.
    Does nothing when the option names cannot be read from source (the exact check still runs later)."""
    path = config_path_in(argv)
    if path is None:
        return
    values = load_recipe(path)
    names = training_option_names()
    if names is not None:
        check_keys(values, names, path)


def checked_recipe_values(parser, values: dict, path: str) -> dict:
    """Recipe values converted to the option's type. argparse applies `type` only to defaults given as strings, so a
    YAML list or mapping where a number belongs would otherwise reach the config unchecked."""
    checked = {}
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        convert = getattr(action, "type", None)
        # Mapping options (loss_kwargs, model_init_kwargs, ...) parse as text on the command line and are checked
        # by the config itself.
        if action is None or convert is None or value is None or (isinstance(value, dict) and convert is str):
            checked[key] = value
            continue
        expected = TYPE_NAMES.get(getattr(convert, "__name__", ""), getattr(convert, "__name__", "a value"))
        many = action.nargs in ("+", "*")
        try:
            if many != isinstance(value, list) or isinstance(value, dict):
                raise TypeError
            for one in value if many else [value]:
                # int() would truncate 4.7 to 4 and read true as 1: an integer option takes an integer only.
                if convert is int and (isinstance(one, bool) or not isinstance(one, (int, str))):
                    raise TypeError
            checked[key] = [convert(v) for v in value] if many else convert(value)
        except (TypeError, ValueError):
            shape = f"a list of {expected}" if many else expected
            raise UsageError(f"config '{path}': {key} must be {shape}, got {value!r}.") from None
        if action.choices and not set(checked[key] if many else [checked[key]]) <= set(action.choices):
            raise UsageError(f"config '{path}': {key}={value!r} is not one of: "
                             f"{', '.join(map(str, action.choices))}.")
    return checked
