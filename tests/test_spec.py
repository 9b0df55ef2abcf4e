"""DeploySpec validation: names valid on every provider, ranges, and one-line errors."""

from __future__ import annotations

import pytest

from cloudllm.errors import UserError
from cloudllm.spec import DeploySpec, check_endpoint_name, default_endpoint_name, spec_from_kwargs


@pytest.mark.parametrize("name", ["a", "demo", "my-model-2", "A1", "x" * 63, "a--b"])
def test_valid_names(name: str) -> None:
    assert check_endpoint_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "my_model", "x" * 64, "a b", "émoji", "a.b", "../x"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UserError, match="invalid endpoint name"):
        check_endpoint_name(name)


def test_default_name_from_folder(tmp_path) -> None:
    assert default_endpoint_name(tmp_path / "My_Model.v2") == "My-Model-v2"
    assert default_endpoint_name(tmp_path / "models--acme--tiny-llama") == "tiny-llama"
    assert default_endpoint_name(tmp_path / "___") == "model"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_instances": 3, "max_instances": 2}, "above max_instances"),
        ({"rollout": "sideways"}, "rollout"),
        ({"rollout": "canary:0"}, "rollout"),
        ({"serving": {"max_new_tokens": 0}}, "serving.max_new_tokens"),
        ({"serving": {"bogus": 1}}, "unknown setting 'serving.bogus'"),
        ({"serving": {"intra_op_threads": 0}}, "serving.intra_op_threads"),
        ({"serving": {"intra_op_threads": "many"}}, "serving.intra_op_threads"),
        ({"runtime": "triton"}, "runtime"),
        ({"name": "bad_name"}, "invalid endpoint name"),
    ],
)
def test_bad_specs_give_one_line(tmp_path, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        spec_from_kwargs(tmp_path / "m", **kwargs)
    assert "\n" not in err.value.line()


def test_schema_documents_every_field() -> None:
    schema = DeploySpec.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
