"""`load_recipe`, the only YAML reader: line numbers, `extends:`, `--set` overrides, ${ENV} interpolation, and errors
that name the file, line and field, what was found, what is allowed, and how to fix it.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from sovtune.config.schema import Recipe
from sovtune.config.validators import looks_like_local_path
from sovtune.core.rundir import RunDir
from sovtune.core.secrets import secret_env_values
from sovtune.errors import RecipeError

KeyPath = tuple[str | int, ...]  # ("train", "learning_rate") or ("data", "train", 0, "path")


class _Located:
    """Where each key of a merged recipe came from (file and 1-based line), and the folder each file's relative paths
    are relative to."""

    def __init__(self) -> None:
        self.where: dict[KeyPath, tuple[str, int]] = {}
        self.bases: dict[str, Path] = {}  # file -> folder its relative paths resolve against
        self.source_paths: dict[str, str] = {}  # file -> the recipe it was resolved from (a run's recipe.yaml)

    def forget_below(self, loc: KeyPath) -> None:
        """Drop what was recorded inside `loc`: a value that replaces it (--set) owns everything below it."""
        for key in [key for key in self.where if len(key) > len(loc) and key[: len(loc)] == loc]:
            del self.where[key]

    def lookup(self, loc: KeyPath) -> tuple[str, int] | None:
        # Down to the empty path: errors about the whole recipe (or a missing section) still name the file.
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.where:
                return self.where[loc[:end]]
        return None


# Recipes are a few levels deep and a few hundred values long: deeper nesting, an alias that contains itself or
# aliases that multiply into millions of values (a "billion laughs" file) are refused instead of hanging.
MAX_NESTING = 32
MAX_VALUES = 100_000
MAX_RECIPE_BYTES = 1 << 20


def _node_to_python(node: yaml.Node, file: str, path: KeyPath, located: _Located) -> Any:
    located.where[path] = (file, node.start_mark.line + 1)
    if len(path) > MAX_NESTING or len(located.where) > MAX_VALUES:
        raise RecipeError(
            f"{file}:{node.start_mark.line + 1}: nested too deeply or expanding to too many values (aliases?); "
            "a recipe is sections of plain values"
        )
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeError(
                    f"{file}:{key_node.start_mark.line + 1}: a key must be a plain name, found a "
                    f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}; write `name: value`"
                )
            key = key_node.value
            if key in out:
                raise RecipeError(f"{file}:{key_node.start_mark.line + 1}: key {key!r} appears twice; keep one")
            out[key] = _node_to_python(value_node, file, path + (key,), located)
            located.where[path + (key,)] = (file, key_node.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_node_to_python(item, file, path + (i,), located) for i, item in enumerate(node.value)]
    return _scalar(node, file)


def _scalar(node: yaml.Node, file: str) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # an unknown tag (!!python/object), or `!!int abc`
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, ValueError) and "digits" in problem:  # Python refuses to parse integers of 4,300+ digits
            raise RecipeError(
                f"{file}:{node.start_mark.line + 1}: a number of {len(str(node.value))} digits; "
                "no setting takes one that large: write a plausible value"
            ) from None
        raise RecipeError(
            f"{file}:{node.start_mark.line + 1}: {problem}; recipes hold plain values: remove the {node.tag} tag"
        ) from None
    finally:
        loader.dispose()


def _read_yaml(path: Path, located: _Located) -> dict[str, Any]:
    file = str(path)
    try:
        if os.path.exists(path) and not os.path.isfile(path):  # a folder, a pipe, /dev/zero: never read endlessly
            raise RecipeError(f"{file}: not a recipe file (a folder or a device); give the path of a .yaml file")
        if os.path.getsize(path) > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{file}: {os.path.getsize(path):,} bytes, not a recipe (at most {MAX_RECIPE_BYTES:,}); check the path"
            )
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{file}: recipe file not found; check the path (recipes live in recipes/)") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{file}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except OSError as exc:
        raise RecipeError(f"{file}: cannot read recipe: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RecipeError(f"{file}: nested too deeply to read; a recipe is sections of plain values") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(
            f"{file}{line}: invalid YAML: {problem}; fix the syntax (indentation, quotes, colons)"
        ) from None
    if node is None:
        raise RecipeError(f"{file}: recipe is empty; see recipes/quickstart.yaml for a complete example")
    if not isinstance(node, yaml.MappingNode):
        raise RecipeError(
            f"{file}:{node.start_mark.line + 1}: a recipe must be a mapping of sections (model:, data:, ...)"
        )
    data: dict[str, Any] = _node_to_python(node, file, (), located)  # a MappingNode gives a dict
    located.where[()] = (file, 0)  # line 0: whole-recipe errors name the file without pointing at line 1
    return data


def _take_source_path(path: Path, data: dict[str, Any], located: _Located) -> None:
    """A resolved recipe saved into a run directory names the recipe file it came from: its relative paths are
    relative to that file's folder, not to the run directory."""
    source_path = data.pop("source_path", None)
    if isinstance(source_path, str) and source_path:
        located.source_paths[str(path)] = source_path
        located.bases[str(path)] = Path(source_path).resolve().parent
    else:
        located.bases[str(path)] = path.parent


def _deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_with_extends(path: Path, located: _Located, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve() if path.exists() else path
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(f"{path}: extends forms a cycle ({cycle}); remove one extends")
    data = _read_yaml(path, located)
    _take_source_path(path, data, located)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        line = located.where.get(("extends",), (str(path), 0))[1]
        raise RecipeError(f"{path}:{line}: extends must be a path to another recipe, found {parent!r}")
    expanded = os.path.expandvars(parent)
    if any(secret in expanded for secret in secret_env_values().values()):
        line = located.where.get(("extends",), (str(path), 0))[1]
        raise RecipeError(f"{path}:{line}: extends: names a secret environment variable; give the path itself")
    parent_path = Path(expanded)
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.exists():
        line = located.where.get(("extends",), (str(path), 0))[1]
        raise RecipeError(f"{path}:{line}: extends: {parent_path} not found; give a path relative to this recipe")
    # Parent lines are recorded first; the child's entries overwrite them where it sets a key.
    child_lines = dict(located.where)
    base = _read_with_extends(parent_path, located, chain + (path,))
    located.where.update(child_lines)
    return _deep_merge(base, data)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, loc: KeyPath, located: _Located) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, loc + (k,), located) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, loc + (i,), located) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in secret_env_values():
            raise RecipeError(
                f"{_where(loc, located)}{_dotted(loc)}: ${{{name}}} is a secret (its name says it holds a credential) "
                "and a recipe value ends up in folder names, logs, the manifest and the model card; remove it "
                "(the commands that need a token read it from the environment themselves)"
            )
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise RecipeError(
            f"{_where(loc, located)}{_dotted(loc)}: environment variable {name} is not set; "
            f"export {name}=... or write ${{{name}:-default}}"
        )

    return _ENV.sub(substitute, value)


def _refuse_secret_values(value: Any, loc: KeyPath, located: _Located, secrets: dict[str, str]) -> None:
    """No recipe value may hold a secret's value (typed in, or expanded by the shell in a --set)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_secret_values(item, loc + (key,), located, secrets)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_secret_values(item, loc + (index,), located, secrets)
    elif isinstance(value, str):
        for name, secret in secrets.items():
            if secret in value:
                raise RecipeError(
                    f"{_where(loc, located)}{_dotted(loc)}: holds the value of ${name}, a secret, which would end up "
                    "in folder names, logs, the manifest and the model card; remove it from the recipe"
                )


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.field=value, e.g. --set train.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError(f"--set {item!r}: empty key part; write e.g. --set train.learning_rate=1e-4")
    if not raw.strip():
        return parts, ""
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError):
        return parts, raw  # not YAML: the text itself
    if _has_mapping_key(node):
        return parts, raw  # `{{ messages }}` is a Jinja template, not a mapping keyed by a mapping
    # The recipe's own limits (nesting, aliases, tags) hold for the command line too.
    return parts, None if node is None else _node_to_python(node, f"--set {key.strip()}", (), _Located())


def _has_mapping_key(node: yaml.Node | None) -> bool:
    """Whether a composed value has a key that is itself a mapping or list (which no recipe has)."""
    pending, seen = [node], 0
    while pending and seen < MAX_VALUES:
        current = pending.pop()
        seen += 1
        if isinstance(current, yaml.MappingNode):
            if any(not isinstance(key, yaml.ScalarNode) for key, _ in current.value):
                return True
            pending.extend(value for _, value in current.value)
        elif isinstance(current, yaml.SequenceNode):
            pending.extend(current.value)
    return False


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, located: _Located) -> None:
    node: Any = data
    loc: KeyPath = ()
    for part in parts[:-1]:
        key = _key_in(node, part, parts)
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            child = node[key] = {}
            # A section that only --set created: its errors (e.g. a misspelt section) must point at --set.
            located.where[loc + (key,)] = ("--set", 0)
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"--set {'.'.join(parts)}: {part} is not a section")
        node, loc = child, loc + (key,)
    key = _key_in(node, parts[-1], parts)
    if value is None and isinstance(node, dict):
        # `--set train.epochs=null` removes the field, back to its default: how a command line drops a setting
        # that conflicts with one it adds (e.g. max_steps for a quick test of a recipe that sets epochs).
        node.pop(key, None)
    else:
        node[key] = value
    located.forget_below(loc + (key,))
    located.where[loc + (key,)] = ("--set", 0)


# Two ways to say when training stops: a --set of one replaces the other where a recipe file set it.
STOPPING_RULES = {("train", "max_steps"): ("train", "epochs"), ("train", "epochs"): ("train", "max_steps")}


def _replace_stopping_rule(data: dict[str, Any], parts: list[str], value: Any, located: _Located) -> None:
    """`--set train.max_steps=20` on a recipe with `epochs: 2` means "stop after 20 steps" (a quick try), not a
    conflict: the recipe's epochs go. Both set in a file, or both on the command line, remain an error."""
    other = STOPPING_RULES.get(tuple(parts))  # type: ignore[arg-type]
    train = data.get("train")
    if other is None or value is None or not isinstance(train, dict) or other[1] not in train:
        return
    if (located.lookup(other) or ("", 0))[0] != "--set":
        del train[other[1]]


def _key_in(node: Any, part: str, parts: list[str]) -> str | int:
    """`part` as a key of a mapping, or as an index of a list (`--set data.train.1.weight=0.3`)."""
    if not isinstance(node, list):
        return part
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(
            f"--set {'.'.join(parts)}: {part!r} is not an item of a list of {len(node)}; use an index from 0 to "
            f"{len(node) - 1}"
        )
    return int(part)


# ---------------------------------------------------------------------------------------------------------------
# Paths: each relative path resolves against the folder of the recipe file that set it


def _is_path_field(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("recipe_path"))


def _path_locations(model: type[BaseModel], value: Any, loc: KeyPath) -> Iterator[KeyPath]:
    """Where the raw (unvalidated) recipe data holds a path: fields marked PATH_FIELD, and sources written as their
    path alone (`train: data/train.jsonl`)."""
    if isinstance(value, str):
        string_field = getattr(model, "STRING_FIELD", None)
        if string_field and _is_path_field(model.model_fields[string_field]):
            yield loc
        return
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        if _is_path_field(field):
            if isinstance(item, str):
                yield loc + (key,)
            continue
        section = _model_in_annotation(field.annotation)
        if section is None:
            continue
        if isinstance(item, list):
            for index, element in enumerate(item):
                yield from _path_locations(section, element, loc + (key, index))
        else:
            yield from _path_locations(section, item, loc + (key,))


def _rebased(value: str, base: Path) -> str:
    """`value` as a path relative to `base`, made absolute; absolute paths, hub ids and inline templates unchanged."""
    if "{" in value or "\n" in value:  # an inline chat template
        return value
    expanded = Path(os.path.expanduser(value))
    if expanded.is_absolute():
        return value
    candidate = base / expanded
    if looks_like_local_path(value) or candidate.exists():
        return os.path.normpath(candidate)
    return value  # a hub id (org/name) that is not a folder there


def _rebase_paths(data: dict[str, Any], located: _Located, recipe_dir: Path) -> None:
    """Make absolute every relative path that was set somewhere other than the loaded recipe file: in a recipe it
    extends (from any folder, at any depth) or by --set (relative to the working directory). Paths the loaded file
    sets stay as written: `Recipe.resolve` reads them against its folder."""
    for loc in list(_path_locations(Recipe, data, ())):
        origin = located.lookup(loc)
        if origin is None:
            continue
        base = Path.cwd() if origin[0] == "--set" else located.bases.get(origin[0], recipe_dir)
        if base == recipe_dir:
            continue
        node: Any = data
        for part in loc[:-1]:
            node = node[part]
        node[loc[-1]] = _rebased(node[loc[-1]], base)


def _dotted(loc: KeyPath) -> str:
    # A key with spaces, newlines or symbols is quoted, so the error stays one readable line.
    parts = (str(p) if re.fullmatch(r"[\w-]+", str(p)) else repr(str(p)) for p in loc)
    return ".".join(parts) if loc else "(top level)"


def _where(loc: KeyPath, located: _Located) -> str:
    found = located.lookup(loc)
    if found is None:
        return ""
    file, line = found
    return f"{file}: " if line == 0 else f"{file}:{line}: "


def _section_model(loc: KeyPath) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for did-you-mean suggestions)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        found = _model_in_annotation(field.annotation)
        if found is None:
            return None
        model = found
    return model


def _model_in_annotation(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in_annotation(arg)
        if found is not None:
            return found
    return None


def _describe_error(err: ErrorDetails, located: _Located) -> str:
    # Drop pydantic's own steps (list[str], function-after[...], literal[...]); keep the user's keys, even "[".
    loc: KeyPath = tuple(p for p in err["loc"] if not (isinstance(p, str) and re.fullmatch(r"[a-z-]+\[.*\]", p)))
    kind = err["type"]
    where = _where(loc, located)
    field = _dotted(loc)
    found = err.get("input")
    if kind == "extra_forbidden" and loc:
        parent = _section_model(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        allowed = [a for a in allowed if a != "source_path"]
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {_dotted(loc[:-1] + (guess[0],))!r}?" if guess else f"allowed: {', '.join(allowed)}"
        return f"{where}{field}: unknown key; {hint}"
    if kind == "missing":
        parent = _section_model(loc[:-1]) if len(loc) > 1 else Recipe
        help_text = ""
        if parent is not None and loc[-1] in parent.model_fields and parent.model_fields[loc[-1]].description:
            help_text = f" ({parent.model_fields[loc[-1]].description})"
        return f"{where}{field}: required field is missing; add it{help_text}"
    message = err["msg"]
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        guess = difflib.get_close_matches(str(found), re.findall(r"'([^']+)'", expected), n=1, cutoff=0.6)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return f"{where}{field}: found {found!r}, allowed: {expected}{hint}"
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        return f"{where}{field}: {message}" if loc else f"{where}{message}"
    if kind in ("model_type", "dict_type"):  # pydantic says "instance of TrainSection": name the YAML shape instead
        return (
            f"{where}{field}: expected a mapping of settings (indented `name: value` lines), found {_yaml_kind(found)}"
        )
    shown = "" if isinstance(found, (dict, list)) else f", found {_short(found)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        shown += _allowed_range(loc)
    # Lower-case only the first letter: the rest may quote a pattern or a value verbatim.
    return f"{where}{field}: {message[:1].lower()}{message[1:]}{shown}"


def _short(value: Any) -> str:
    """A found value as the error line shows it: a 5,000-digit number or a long text is cut, not printed whole."""
    text = (
        repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"a {len(str(abs(value)))}-digit number"
    )
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _allowed_range(loc: KeyPath) -> str:
    """' (allowed: 1 to 4096)': both bounds of a numeric field, so a refused value says what would be accepted."""
    model = _section_model(loc[:-1]) if loc else None
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    if field is None:
        return ""
    bounds = {
        name: getattr(item, name) for item in field.metadata for name in ("gt", "ge", "lt", "le") if hasattr(item, name)
    }
    whole = field.annotation in (int, Optional[int])
    low = bounds.get("ge", bounds["gt"] + 1 if whole and "gt" in bounds else None)
    high = bounds.get("le", bounds["lt"] - 1 if whole and "lt" in bounds else None)
    lower = f"{low:,}" if low is not None else f"more than {bounds['gt']:,}" if "gt" in bounds else None
    upper = f"{high:,}" if high is not None else f"less than {bounds['lt']:,}" if "lt" in bounds else None
    if lower and upper:
        return f" (allowed: {lower} to {upper})"
    return f" (allowed: at least {lower})" if lower else f" (allowed: at most {upper})" if upper else ""


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list (`- ` items)"
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), recorded: bool = False) -> Recipe:
    """Read, merge (`extends:`), override (`--set`), interpolate and validate a recipe file.

    `recorded`: the resolved recipe a run directory holds. It was resolved when the run started, so it is read as
    literal values: no ${ENV} is interpolated (a run folder from elsewhere must not pull this machine's secrets into
    its fields) and no `extends:` is followed.
    """
    path = Path(path)
    located = _Located()
    if recorded:
        data = _read_yaml(path, located)
        _take_source_path(path.resolve() if path.exists() else path, data, located)
    else:
        data = _read_with_extends(path, located)
    if recorded and "extends" in data:
        raise RecipeError(
            f"{path}:{located.where[('extends',)][1]}: a run's recorded recipe is already resolved and has no extends; "
            "restore recipe.yaml from the run"
        )
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(data, parts, value, located)
        _replace_stopping_rule(data, parts, value, located)
    if not recorded:
        data = _interpolate(data, (), located)
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]", "-", path.stem))
    top = str(path.resolve() if path.exists() else path)
    data["source_path"] = located.source_paths.get(top, str(path.resolve()))
    _rebase_paths(data, located, Path(data["source_path"]).resolve().parent)
    _refuse_secret_values(data, (), located, secret_env_values())
    return validate_recipe(data, located)


def validate_recipe(data: dict[str, Any], located: _Located | None = None) -> Recipe:
    located = located or _Located()
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = _describe_error(errors[0], located)
        more = f" (+{len(errors) - 1} more: run `sovtune check` after fixing this one)" if len(errors) > 1 else ""
        raise RecipeError(first + more) from None


@dataclass(frozen=True)
class RunOptIns:
    """What the command line lets a run directory's recorded recipe do.

    A run folder, bundle or pulled repository is data: its recipe.yaml travels with it, so the settings in it that
    run code or unpickle take effect only when the person at the command line opts in with the flag named in
    OPT_IN_FLAGS. Without it the command refuses, naming the flag.
    """

    trust_remote_code: bool = False
    allow_pickle_weights: bool = False  # also lets a received adapter's .bin weights load
    allow_user_metrics: bool = False


OPT_IN_FLAGS = {
    "trust_remote_code": "--trust-remote-code",
    "allow_pickle_weights": "--allow-pickle-weights",
    "allow_user_metrics": "--allow-user-metrics",
}


def load_run_recipe(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    recipe_path: Path | None = None,
    opt_ins: RunOptIns = RunOptIns(),
    evaluates: bool = False,
) -> Recipe:
    """The recipe of a run directory: the resolved recipe it recorded, or `recipe_path` when given (an adapter trained
    elsewhere); its output.dir is the run directory.

    The recorded recipe is checked against `opt_ins` (see RunOptIns); its user metrics only when the command
    `evaluates` (other commands never import them). A recipe given as `recipe_path` is the user's own and loads as
    any recipe does.
    """
    if recipe_path is not None:
        if not Path(recipe_path).is_file():
            raise RecipeError(
                f"{recipe_path}: no recipe found; pass --recipe RECIPE (the recipe the adapter was trained with)"
            )
        return load_recipe(recipe_path, [*overrides, f"output.dir={run_dir}"])
    path = RunDir(run_dir) / RunDir.RECIPE
    if path.is_symlink():
        raise RecipeError(
            f"{path}: a symbolic link; a run's recorded recipe is read only as a regular file inside the run, "
            "replace the link with the file (or pass --recipe RECIPE)"
        )
    if not path.is_file():
        raise RecipeError(f"{path}: no recipe found; pass --recipe RECIPE (the recipe the adapter was trained with)")
    recipe = load_recipe(path, [*overrides, f"output.dir={run_dir}"], recorded=True)
    asked = {
        "trust_remote_code": ["model.trust_remote_code: true"] if recipe.model.trust_remote_code else [],
        "allow_pickle_weights": ["model.allow_pickle_weights: true"] if recipe.model.allow_pickle_weights else [],
        "allow_user_metrics": [
            f"eval.datasets[{index}].user_metrics ({', '.join(user.module for user in dataset.user_metrics)})"
            for index, dataset in enumerate(recipe.eval.datasets)
            if dataset.user_metrics and evaluates
        ],
    }
    for name, settings in asked.items():
        if settings and not getattr(opt_ins, name):
            raise RecipeError(
                f"{path}: {'; '.join(settings)} would {_OPT_IN_EFFECT[name]}; a run folder is data and its recipe "
                f"cannot decide that: pass {OPT_IN_FLAGS[name]} if you have reviewed it and trust it"
            )
    return recipe


_OPT_IN_EFFECT = {
    "trust_remote_code": "run code shipped with the model",
    "allow_pickle_weights": "unpickle weights (a pickle can run any code)",
    "allow_user_metrics": "import and run these Python files",
}
