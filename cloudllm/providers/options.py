"""Provider options: each provider declares a pydantic model of the options it reads.

`spec.options` stays a plain dict in cloudllm.yaml, `--option KEY=VALUE` and the Python API.
The provider's `Options` model checks it when the provider is made, so before plan, deploy,
invoke or delete runs; an unknown or mistyped option is one line naming the options the
provider takes. What a provider finds while deploying (the bucket, the project credentials
chose) goes through `Provider.record_options`, which checks it the same way; the core keeps
it in the endpoint's record so later commands reach the endpoint without flags.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from cloudllm.errors import UserError
from cloudllm.redact import MASK, is_secret_key, redact_text


class ProviderOptions(BaseModel):
    """Options the core sets for every provider.

    A plugin that declares no model of its own takes any option (what it read before options
    were typed); subclass StrictOptions to have mistakes refused.
    """

    model_config = ConfigDict(extra="allow")

    force: StrictBool = Field(False, description="Deploy although the fit check says the model does not fit (`deploy --force`).")


class StrictOptions(ProviderOptions):
    """The base of a provider's own options: an option it does not declare is refused."""

    model_config = ConfigDict(extra="forbid")


def check_options(provider: str, model: type[ProviderOptions], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options as given, once `model` accepts them; else UserError naming the provider's options.

    They are returned unconverted: the endpoint's digest covers spec.options as written, so a
    check must not change what an existing endpoint was deployed with. So that what passes reads
    the same unconverted, flags and lists are strict (a string "false" is refused, not taken as
    true); numbers may be strings, which the providers convert.
    """
    given = dict(given or {})
    try:
        model.model_validate(given)
    except ValidationError as exc:
        raise _options_error(provider, model, given, exc) from None
    return given


def _options_error(provider: str, model: type[ProviderOptions], given: dict[str, Any], exc: ValidationError) -> UserError:
    known = sorted(model.model_fields)
    takes = f"the {provider} provider takes {', '.join(known)} (`cloudllm schema` describes them)"
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"][:1])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, known, n=1)
        return UserError(f"the {provider} provider has no option {key!r}{more}", (f"did you mean {close[0]}? " if close else "") + takes)
    value = MASK if is_secret_key(key) else redact_text(str(given.get(key)))
    field = model.model_fields.get(key)
    described = f"{key}: {field.description}" if field and field.description else takes
    return UserError(f"option {key}={value} of the {provider} provider: {first['msg']}{more}", described)


def with_options_schemas(schema: dict[str, Any], options: Mapping[str, dict[str, Any]], spec_defs: tuple[str, ...]) -> dict[str, Any]:
    """`schema` (of cloudllm.yaml) with each provider's `options` schema applied where an entry in `spec_defs` names that provider."""
    defs = schema.setdefault("$defs", {})
    conditions = []
    for provider, options_schema in options.items():
        name = f"{provider}_options"
        defs[name] = {**options_schema, "title": options_schema.get("title", name), "description": f"Options of the {provider} provider."}
        conditions.append(
            {
                "if": {"properties": {"provider": {"const": provider}}, "required": ["provider"]},
                "then": {"properties": {"options": {"$ref": f"#/$defs/{name}"}}},
            }
        )
    for target in spec_defs:
        if target in defs and conditions:
            defs[target] = {**defs[target], "allOf": conditions}
    return schema
