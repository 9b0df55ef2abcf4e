"""The wire side of the Open Inference Protocol v2 over gRPC: the messages and service as KServe's
grpc_predict_v2.proto and Triton's grpc_service.proto number them, built from a table into a
descriptor pool of our own (so only grpcio and protobuf are needed, no generated code), and the
tensor and parameter encodings. The server (grpc_service) and the CLI's client both use it.
"""

from __future__ import annotations

import struct
from typing import Any

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"
PROTO_FILE = "cloudllm_grpc_predict_v2.proto"
INPUT_TENSOR = "text_input"
OUTPUT_TENSOR = "text_output"
FINAL_RESPONSE = "triton_final_response"
PROTOCOL_VERSION = "2"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SAMPLING_TENSORS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty")

# name -> [(field, number, type, label, message type)]; type names are descriptor_pb2's TYPE_*.
_P = "ParametersEntry"
MESSAGES: dict[str, list[tuple]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "BOOL")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "BOOL")],
    "ModelReadyRequest": [("name", 1, "STRING"), ("version", 2, "STRING")],
    "ModelReadyResponse": [("ready", 1, "BOOL")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "STRING"), ("version", 2, "STRING"), ("extensions", 3, "STRING", "REPEATED")],
    "ModelMetadataRequest": [("name", 1, "STRING"), ("version", 2, "STRING")],
    "ModelMetadataResponse": [
        ("name", 1, "STRING"), ("versions", 2, "STRING", "REPEATED"), ("platform", 3, "STRING"),
        ("inputs", 4, "MESSAGE", "REPEATED", "ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, "MESSAGE", "REPEATED", "ModelMetadataResponse.TensorMetadata"),
    ],
    "ModelMetadataResponse.TensorMetadata": [("name", 1, "STRING"), ("datatype", 2, "STRING"), ("shape", 3, "INT64", "REPEATED")],
    "ModelInferRequest": [
        ("model_name", 1, "STRING"), ("model_version", 2, "STRING"), ("id", 3, "STRING"),
        ("parameters", 4, "MESSAGE", "REPEATED", "ModelInferRequest." + _P),
        ("inputs", 5, "MESSAGE", "REPEATED", "ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "MESSAGE", "REPEATED", "ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "BYTES", "REPEATED"),
    ],
    "ModelInferRequest.InferInputTensor": [
        ("name", 1, "STRING"), ("datatype", 2, "STRING"), ("shape", 3, "INT64", "REPEATED"),
        ("parameters", 4, "MESSAGE", "REPEATED", "ModelInferRequest.InferInputTensor." + _P),
        ("contents", 5, "MESSAGE", "OPTIONAL", "InferTensorContents"),
    ],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "STRING"), ("parameters", 2, "MESSAGE", "REPEATED", "ModelInferRequest.InferRequestedOutputTensor." + _P),
    ],
    "ModelInferResponse": [
        ("model_name", 1, "STRING"), ("model_version", 2, "STRING"), ("id", 3, "STRING"),
        ("parameters", 4, "MESSAGE", "REPEATED", "ModelInferResponse." + _P),
        ("outputs", 5, "MESSAGE", "REPEATED", "ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "BYTES", "REPEATED"),
    ],
    "ModelInferResponse.InferOutputTensor": [
        ("name", 1, "STRING"), ("datatype", 2, "STRING"), ("shape", 3, "INT64", "REPEATED"),
        ("parameters", 4, "MESSAGE", "REPEATED", "ModelInferResponse.InferOutputTensor." + _P),
        ("contents", 5, "MESSAGE", "OPTIONAL", "InferTensorContents"),
    ],
    "ModelStreamInferResponse": [("error_message", 1, "STRING"), ("infer_response", 2, "MESSAGE", "OPTIONAL", "ModelInferResponse")],
    "InferParameter": [
        ("bool_param", 1, "BOOL"), ("int64_param", 2, "INT64"), ("string_param", 3, "STRING"),
        ("double_param", 4, "DOUBLE"), ("uint64_param", 5, "UINT64"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "BOOL", "REPEATED"), ("int_contents", 2, "INT32", "REPEATED"), ("int64_contents", 3, "INT64", "REPEATED"),
        ("uint_contents", 4, "UINT32", "REPEATED"), ("uint64_contents", 5, "UINT64", "REPEATED"), ("fp32_contents", 6, "FLOAT", "REPEATED"),
        ("fp64_contents", 7, "DOUBLE", "REPEATED"), ("bytes_contents", 8, "BYTES", "REPEATED"),
    ],
}  # fmt: skip
MAP_OWNERS = [
    "ModelInferRequest", "ModelInferRequest.InferInputTensor", "ModelInferRequest.InferRequestedOutputTensor",
    "ModelInferResponse", "ModelInferResponse.InferOutputTensor",
]  # fmt: skip
METHODS = {  # name -> (request, response, client streams, server streams)
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse", False, False),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse", False, False),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse", False, False),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse", False, False),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse", False, False),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse", False, False),
    "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse", True, True),
}
# Raw little-endian layouts of the numeric tensors a client may send (struct format letters).
RAW_FORMATS = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
               "UINT32": "I", "UINT64": "Q", "FP32": "f", "FP64": "d"}  # fmt: skip
CONTENT_FIELDS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                  "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}  # fmt: skip


def build_descriptors() -> tuple[Any, dict[str, type]]:
    """A descriptor pool holding the service, and the message classes by name."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    proto = descriptor_pb2.FileDescriptorProto(name=PROTO_FILE, package=PACKAGE, syntax="proto3")
    made: dict[str, Any] = {}
    for full in sorted(MESSAGES, key=lambda n: n.count(".")):
        parent, _, short = full.rpartition(".")
        owner = made[parent].nested_type if parent else proto.message_type
        made[full] = owner.add(name=short)
    for owner in MAP_OWNERS:
        entry = made[owner].nested_type.add(name=_P)
        entry.options.map_entry = True
        _field(entry, "key", 1, "STRING", "OPTIONAL", None)
        _field(entry, "value", 2, "MESSAGE", "OPTIONAL", "InferParameter")
    for full, fields in MESSAGES.items():
        for spec in fields:
            name, number, kind = spec[:3]
            _field(made[full], name, number, kind, spec[3] if len(spec) > 3 else "OPTIONAL", spec[4] if len(spec) > 4 else None)
    choice = made["InferParameter"]  # its fields are one oneof
    choice.oneof_decl.add(name="parameter_choice")
    for field in choice.field:
        field.oneof_index = 0
    service = proto.service.add(name=SERVICE.rsplit(".", 1)[1])
    for name, (request, response, client_streams, server_streams) in METHODS.items():
        service.method.add(name=name, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}",
                           client_streaming=client_streams, server_streaming=server_streams)  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    classes = {name: _message_class(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in MESSAGES if "." not in name}
    return pool, classes


def _field(message: Any, name: str, number: int, kind: str, label: str, type_name: str | None) -> None:
    from google.protobuf import descriptor_pb2

    F = descriptor_pb2.FieldDescriptorProto
    field = message.field.add(name=name, number=number, type=getattr(F, f"TYPE_{kind}"), label=getattr(F, f"LABEL_{label}"))
    if type_name:
        field.type_name = f".{PACKAGE}.{type_name}"


def _message_class(descriptor: Any) -> type:
    from google.protobuf import message_factory

    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory().GetPrototype(descriptor)  # protobuf < 4.21


# --- tensors ------------------------------------------------------------------------------------


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's raw BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ValueError("a BYTES element is cut short (its 4-byte length is incomplete)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ValueError(f"a BYTES element claims {size} bytes past the end of the tensor")
        items.append(raw[offset : offset + size])
        offset += size
    return items


def tensor_values(request: Any, index: int) -> list[Any]:
    """The values of request.inputs[index], from raw_input_contents or its typed contents."""
    tensor = request.inputs[index]
    datatype = tensor.datatype.upper()
    if request.raw_input_contents:
        if index >= len(request.raw_input_contents):
            raise ValueError(f"input {tensor.name!r} has no raw contents (raw_input_contents has {len(request.raw_input_contents)})")
        raw = request.raw_input_contents[index]
        if datatype == "BYTES":
            return decode_bytes_tensor(raw)
        if datatype not in RAW_FORMATS:
            raise ValueError(f"input {tensor.name!r} has datatype {datatype}, which this server does not read")
        size = struct.calcsize(RAW_FORMATS[datatype])
        if len(raw) % size:
            raise ValueError(f"input {tensor.name!r}: {len(raw)} bytes is not a whole number of {datatype} values")
        return list(struct.unpack(f"<{len(raw) // size}{RAW_FORMATS[datatype]}", raw))
    if datatype not in CONTENT_FIELDS:
        raise ValueError(f"input {tensor.name!r} has datatype {datatype}, which this server does not read")
    return list(getattr(tensor.contents, CONTENT_FIELDS[datatype]))


def parameter_value(parameter: Any) -> Any:
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None
