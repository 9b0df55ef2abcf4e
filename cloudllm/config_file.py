"""cloudllm.yaml: the endpoints `cloudllm apply` keeps deployed, validated by one pydantic model.

Each entry of `endpoints:` is a DeploySpec (cloudllm/spec.py), the same model the CLI flags
and the Python API fill in; `defaults:` holds settings shared by every entry. Mistakes are
reported as one line naming the file, the line and the field, with the fix:

    cloudllm.yaml:9: endpoints[1].max_instances: Input should be greater than or equal to 1 (got 0). ...
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from cloudllm.errors import UserError
from cloudllm.redact import MASK, is_secret_key
from cloudllm.spec import DeploySpec, ServingOptions

# Tag (label on Vertex) that marks the endpoints a file created, so --prune deletes only those.
FILE_TAG = "cloudllm-apply-file"
# Valid as an AWS tag value and a GCP label value.
FILE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"

_NOT_DEFAULTABLE = ("name", "model")
MAX_VALUES = 100_000  # after expanding YAML aliases; a real file has hundreds
MAX_DEPTH = 32  # a real file nests four or five levels; deeper is a mistake or an attack on the parser
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

EndpointDefaults = create_model(
    "EndpointDefaults",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Settings every endpoint gets unless it sets its own; tags, options and serving merge key by key.",
    **{
        key: (field.annotation | None, Field(None, description=field.description))
        for key, field in DeploySpec.model_fields.items()
        if key not in _NOT_DEFAULTABLE
    },
)


class CloudLLMFile(BaseModel):
    """cloudllm.yaml: the endpoints `cloudllm apply -f cloudllm.yaml` creates, updates or leaves as they are."""

    model_config = ConfigDict(extra="forbid", title="cloudllm.yaml")

    file_id: str | None = Field(
        None,
        pattern=FILE_ID_PATTERN,
        description=(
            f"Marks the endpoints this file created (tag `{FILE_TAG}`); `apply --prune` deletes only endpoints carrying it. "
            "Default: from the git repository's folder name and the file's path in it. Set it when the file moves "
            "or is applied from checkouts with other folder names."
        ),
    )
    defaults: EndpointDefaults = Field(  # type: ignore[valid-type]
        default_factory=EndpointDefaults, description="Settings shared by every endpoint (an endpoint's own settings win)."
    )
    endpoints: list[DeploySpec] = Field(
        min_length=1,
        description="The endpoints to keep deployed. A relative `model` path is read from this file's folder.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("defaults"), dict) or not isinstance(data.get("endpoints"), list):
            return data
        defaults = {k: v for k, v in data["defaults"].items() if k in EndpointDefaults.model_fields and v is not None}
        return {**data, "endpoints": [_merge(defaults, e) if isinstance(e, dict) else e for e in data["endpoints"]]}


def _merge(defaults: dict, endpoint: dict) -> dict:
    merged = dict(defaults)
    for key, value in endpoint.items():
        both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_dicts else value
    return merged


def file_schema() -> dict:
    """JSON Schema of cloudllm.yaml, field descriptions included (`cloudllm schema`)."""
    schema = CloudLLMFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


@dataclass
class LoadedFile:
    """A validated cloudllm.yaml: its endpoints with model paths made absolute."""

    path: Path
    file_id: str
    endpoints: list[DeploySpec]
    lines: dict[str, int]  # endpoint name -> line of its entry, for later errors

    def where(self, name: str) -> str:
        return f"{self.path}:{self.lines.get(name, 1)}"


def load_file(path: str | Path) -> LoadedFile:
    """Read and validate cloudllm.yaml; any mistake is a UserError naming file:line and field."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder", f"pass the file: -f {path / 'cloudllm.yaml'}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", "pass the path of your cloudllm.yaml with -f") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text", "save it as a UTF-8 YAML file") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", "check the path and its permissions") from None

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"{path}:1: the file nests deeper than {MAX_DEPTH} levels", "flatten it: settings nest a few levels at most") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{line}: not valid YAML: {problem}", "check the indentation, colons and quotes on that line") from None
    if root is None:
        raise UserError(f"{path}:1: the file is empty", "list your endpoints under `endpoints:` (see `cloudllm schema`)")
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        raise UserError(
            f"{path}:{root.start_mark.line + 1}: expected a mapping with an `endpoints:` list, got {_yaml_kind(root)}",
            "start the file with `endpoints:` followed by `- name: ...` items",
        )
    if _depth(root) > MAX_DEPTH:
        raise UserError(f"{path}:1: the file nests deeper than {MAX_DEPTH} levels", "flatten it: settings nest a few levels at most")
    _check_duplicate_keys(path, root)
    if _expanded_size(root, {}) > MAX_VALUES:
        raise UserError(f"{path}:1: the file expands to more than {MAX_VALUES:,} values (YAML aliases)", "write the settings out, or use `defaults:`")

    data = _expand_env(path, text, data)
    try:
        parsed = CloudLLMFile.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # An unknown key is often the misspelling behind a "missing" one: report it first.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        raise _describe(path, root, first) from None

    base = path.resolve().parent
    lines: dict[str, int] = {}
    for index, spec in enumerate(parsed.endpoints):
        loc = ("endpoints", index)
        if spec.name in lines:
            raise UserError(
                f"{path}:{_line(root, (*loc, 'name'))}: endpoints[{index}].name: {spec.name!r} is listed twice "
                f"(first on line {lines[spec.name]})",
                "give each endpoint its own name",
            )
        lines[spec.name] = _line(root, loc)
        _check_provider(path, root, parsed, index)
        spec.model = str(_resolve_model(path, root, base, spec.model, index))
        spec.adapters = {n: str((base / Path(p).expanduser()).resolve()) for n, p in spec.adapters.items()}  # read from this file's folder too
    return LoadedFile(path=path, file_id=parsed.file_id or default_file_id(path), endpoints=parsed.endpoints, lines=lines)


def default_file_id(path: Path) -> str:
    """Stable across checkouts of one repository: '<repo folder>-<path in repo>', slugged."""
    path = path.resolve()
    root = next((p for p in path.parents if (p / ".git").exists()), path.parent)
    raw = f"{root.name}/{path.relative_to(root)}"
    slug = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-") or "cloudllm-yaml"
    if len(slug) > 63:
        slug = f"{slug[:54].rstrip('-')}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
    return slug


def _depth(root: yaml.Node) -> int:
    deepest, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, depth + 1) for child in node.value]
        elif isinstance(node, yaml.MappingNode):
            stack += [(child, depth + 1) for pair in node.value for child in pair]
    return deepest


def _expand_env(path: Path, text: str, value: Any) -> Any:
    """`${VAR}` in a string value becomes the variable's value (a secret stays in the environment,
    never in the file or the endpoint record); an unset one is refused, never sent literally."""
    if isinstance(value, dict):
        return {k: _expand_env(path, text, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(path, text, v) for v in value]
    if not isinstance(value, str):
        return value
    if "\0" in value:
        raise UserError(f"{path}:{_text_line(text, chr(92) + '0')}: a value contains a NUL character", "remove it (paths and names never hold one)")

    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise UserError(f"{path}:{_text_line(text, match.group(0))}: ${{{name}}} is not set in the environment", f"export {name}=... before running cloudllm")
        return os.environ[name]

    return _ENV_REFERENCE.sub(lookup, value)


def _text_line(text: str, needle: str) -> int:
    index = text.find(needle)
    return text.count("\n", 0, index) + 1 if index >= 0 else 1


# --- checks after pydantic ---------------------------------------------------------------------
def _check_provider(path: Path, root: yaml.Node, parsed: CloudLLMFile, index: int) -> None:
    from cloudllm.providers.base import provider_names

    provider = parsed.endpoints[index].provider
    known = provider_names()
    if provider in known:
        return
    loc = _located(root, ("endpoints", index, "provider"))
    close = difflib.get_close_matches(provider, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"{path}:{loc.line}: {loc.field}: unknown provider {provider!r}",
        f"{hint}use one of: {', '.join(known)} (or install a provider plugin)",
    )


def _resolve_model(path: Path, root: yaml.Node, base: Path, model: str, index: int) -> Path:
    resolved = (base / Path(model).expanduser()).resolve()
    if resolved.is_dir():
        return resolved
    loc = _located(root, ("endpoints", index, "model"))
    state = "is not a folder" if resolved.exists() else "does not exist"
    raise UserError(
        f"{path}:{loc.line}: {loc.field}: model folder {model!r} {state} (resolved to {resolved})",
        f"fix the path; a relative path is read from the folder of {path.name}",
    )


def _check_duplicate_keys(path: Path, node: yaml.Node, seen: set | None = None) -> None:
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                if key.value in keys:
                    raise UserError(
                        f"{path}:{key.start_mark.line + 1}: duplicate key {key.value!r} (also on line {keys[key.value]})",
                        "keep one of them: YAML would silently use the last",
                    )
                keys[key.value] = key.start_mark.line + 1
            _check_duplicate_keys(path, value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(path, item, seen)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in the document once aliases are expanded ("billion laughs" files are tiny but huge)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a node inside itself counts once
        if isinstance(node, yaml.MappingNode):
            memo[id(node)] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[id(node)] = 1 + sum(_expanded_size(item, memo) for item in node.value)
    return memo[id(node)]


# --- pydantic errors -> file:line: field ---------------------------------------------------------
@dataclass
class _Location:
    line: int
    field: str  # endpoints[1].serving.max_batch_size
    loc: tuple  # the loc that was found in the YAML (defaults.x when the value came from defaults)
    node: yaml.Node | None  # the value node at loc, when present


def _child(node: yaml.Node, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
    """(node naming the child, child value node) or None."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part], node.value[part]
    return None


def _field_name(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _located(root: yaml.Node, loc: tuple) -> _Location:
    """The line and dotted field of a pydantic error location, looked up in the YAML tree."""
    if loc[:1] == ("endpoints",) and len(loc) >= 3 and isinstance(loc[1], int):
        endpoint = _child(root, "endpoints")
        item = _child(endpoint[1], loc[1]) if endpoint else None
        if item and _child(item[1], loc[2]) is None and _child(root, "defaults") and _child(_child(root, "defaults")[1], loc[2]):
            return _located(root, ("defaults", *loc[2:]))
    node, line, found = root, root.start_mark.line + 1, []
    for index, part in enumerate(loc):
        child = _child(node, part) if node is not None else None
        if child is None:
            if index == len(loc) - 1 or not isinstance(part, (str, int)) or node is None:
                found.append(part)
                node = None
            continue  # a pydantic-internal step (union member, validator name): not in the file
        line = child[0].start_mark.line + 1
        node = child[1]
        found.append(part)
    return _Location(line=line, field=_field_name(tuple(found)) or "file", loc=tuple(found), node=node)


def _model_for(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model whose field the last part of loc names."""
    model: type[BaseModel] | None = CloudLLMFile
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        target = {"endpoints": DeploySpec, "defaults": EndpointDefaults, "serving": ServingOptions}.get(str(part))
        model = target if target is not None else None
    return model


def _describe(path: Path, root: yaml.Node, err: dict) -> UserError:
    loc = tuple(err["loc"])
    kind = err["type"]
    message = err["msg"].removeprefix("Value error, ")
    where = _located(root, loc)
    across_fields = kind == "value_error" and isinstance(where.node, yaml.MappingNode)
    if across_fields:
        # A check across fields (min_instances above max_instances): point at the one named first.
        named = []
        for key, _ in where.node.value:
            if isinstance(key, yaml.ScalarNode) and (found := re.search(rf"\b{re.escape(key.value)}\b", message)):
                named.append((found.start(), key.value))
        if named:
            where = _located(root, (*loc, min(named)[1]))
    prefix = f"{path}:{where.line}: {where.field}"
    key = str(where.loc[-1]) if where.loc else ""
    model = _model_for(where.loc)
    fields = model.model_fields if model else {}

    if kind == "extra_forbidden":
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else "remove it or check its spelling; "
        return UserError(f"{prefix}: unknown setting {key!r}", f"{hint}`cloudllm schema` lists every setting")
    if kind == "missing":
        description = fields[key].description if key in fields else ""
        return UserError(f"{prefix}: {key} is required", f"add `{key}:`" + (f" ({description})" if description else ""))
    if where.loc == ("endpoints",) and kind == "too_short":
        return UserError(f"{prefix}: no endpoints listed", "add at least one `- name: ... model: ...` item under `endpoints:`")
    if kind in ("list_type",):
        return UserError(f"{prefix}: expected a list", f"write {key} as `- ...` items, one per line")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return UserError(f"{prefix}: expected a mapping of settings, got {_kind(err.get('input'))}", "write it as `key: value` lines, indented under it")
    if across_fields:
        return UserError(f"{prefix}: {message}", "change one of the settings named so they agree")
    got = ""
    value = err.get("input")
    if isinstance(value, (str, int, float, bool)) and not isinstance(where.node, yaml.MappingNode):
        shown = MASK if any(is_secret_key(p) for p in where.loc) else repr(value)
        got = f" (got {shown[:80]})"
    description = fields[key].description if key in fields and fields[key].description else ""
    fix = f"set {key} to a valid value: {description}" if description else "fix that value (`cloudllm schema` describes every setting)"
    return UserError(f"{prefix}: {message}{got}", fix)


def _line(root: yaml.Node, loc: tuple) -> int:
    return _located(root, loc).line


def _yaml_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return f"the text {node.value[:40]!r}"
    return "something else"


def _kind(value: Any) -> str:
    return {list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
