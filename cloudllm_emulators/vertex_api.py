"""What the Vertex AI emulator's modules share: Google's error shape, the aiplatform_v1 types, the
resource path pattern. Below vertex.py and vertex_tenancy.py, so neither imports the other to get them."""

from __future__ import annotations

import json

LOCATION = r"projects/[^/]+/locations/[^/]+"  # the prefix of every regional resource name in a route


class ApiError(Exception):
    """An error answered the way Google APIs answer: HTTP status + google.rpc code name."""

    CODES = {
        "INVALID_ARGUMENT": (400, 3),
        "FAILED_PRECONDITION": (400, 9),
        "NOT_FOUND": (404, 5),
        "ALREADY_EXISTS": (409, 6),
        "ABORTED": (409, 10),
        "INTERNAL": (500, 13),
        "UNAVAILABLE": (503, 14),
        "UNIMPLEMENTED": (501, 12),
        "DEADLINE_EXCEEDED": (504, 4),
        "RESOURCE_EXHAUSTED": (429, 8),
    }

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def http_status(self) -> int:
        return self.CODES[self.status][0]

    @property
    def rpc_code(self) -> int:
        return self.CODES[self.status][1]

    def body(self) -> dict:
        return {"error": {"code": self.http_status, "message": self.message, "status": self.status}}


def aiplatform_types():
    from google.cloud import aiplatform_v1

    return aiplatform_v1


def to_json(message) -> dict:
    from google.protobuf import json_format

    pb = type(message).pb(message) if hasattr(type(message), "pb") else message
    return json.loads(json_format.MessageToJson(pb, use_integers_for_enums=True))


def parse_message(cls, data: bytes | dict):
    """A request body as the real type. Unknown fields are refused, as Vertex AI refuses them
    ("Invalid JSON payload received. Unknown name ..."): the clients and this fake share the proto."""
    from google.protobuf import json_format

    pb = cls.pb(cls())
    try:
        if isinstance(data, dict):
            json_format.ParseDict(data, pb)
        else:
            json_format.Parse(data or b"{}", pb)
    except json_format.ParseError as exc:
        raise ApiError("INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}") from None
    return cls.wrap(pb)
