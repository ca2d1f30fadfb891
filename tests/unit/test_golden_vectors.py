"""
The golden vectors of C{protocol-spec/vectors/} against the implementation,
and the specification C{protocol-spec/README.md} against both.

The vectors are the reference: they were generated once and reviewed, and
every test here fails if the implementation's bytes ever change.  Three
independent readings of each vector must agree:

  - the JSON C{fields}, turned into a message object by this module;
  - the implementation's encoder and decoders (L{jobworker.protocol.wire});
  - a decoder driven only by the field tables of the README, so that the
    spec cannot drift from the bytes either.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import struct
import types
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.limits import Limits
from jobworker.protocol import messages as m, wire
from jobworker.protocol.framing import FrameBuffer

SPEC_DIR = Path(__file__).resolve().parents[2] / "protocol-spec"
VECTOR_DIR = SPEC_DIR / "vectors"
README = SPEC_DIR / "README.md"

MESSAGE_CLASSES = {
    cls.__name__: cls
    for cls in vars(m).values()
    if isinstance(cls, type) and issubclass(cls, m.Message) and hasattr(cls, "TYPE")
}


# -- loading -------------------------------------------------------------------


def _load_files() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(VECTOR_DIR.glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        document["path"] = path.name
        documents.append(document)
    return documents


FILES = _load_files()
VECTORS = [
    pytest.param(document["message"], vector, id=vector["name"])
    for document in FILES
    for vector in document["vectors"]
]
OUTPUT_VECTORS = [param for param in VECTORS if param.values[0] == "Output"]


def from_json(hint: Any, value: Any) -> Any:
    """
    Build a field value of type C{hint} from its JSON description, refusing
    anything the JSON conventions of the README do not allow.
    """
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        # StartRequest.limits is Limits | InvalidLimits: the wire and the
        # vectors carry Limits; InvalidLimits only stands in, after decoding,
        # for values out of range.
        return from_json(typing.get_args(hint)[0], value)
    if origin is tuple:
        assert isinstance(value, list), value
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_json(args[0], item) for item in value)
        assert len(value) == len(args), value
        return tuple(from_json(arg, item) for arg, item in zip(args, value))
    if hint is bool:
        assert isinstance(value, bool), value
        return value
    if hint is int:
        assert isinstance(value, int) and not isinstance(value, bool), value
        return value
    if hint is str:
        assert isinstance(value, str), value
        return value
    if hint is bytes:
        assert isinstance(value, str) and value == value.lower(), value
        return bytes.fromhex(value)
    if hint is uuid.UUID:
        assert isinstance(value, str) and str(uuid.UUID(value)) == value, value
        return uuid.UUID(value)
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        assert isinstance(value, int) and not isinstance(value, bool), value
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return record_from_json(hint, value)
    raise AssertionError(f"no JSON reading for {hint!r}")


def record_from_json(cls: type, value: dict[str, Any], omitted: frozenset[str] = frozenset()) -> Any:
    """
    A message or record from its JSON description; every field must be
    given, in wire order, so that no default hides a missing one; but those
    C{omitted} (the fields an earlier version's layout lacks), which must
    not be.
    """
    names = [f.name for f in dataclasses.fields(cls) if f.name not in omitted]
    assert list(value) == names, f"{cls.__name__}: fields {list(value)} != {names}"
    hints = typing.get_type_hints(cls)
    return cls(**{name: from_json(hints[name], value[name]) for name in names})


def version_of(vector: dict[str, Any]) -> int:
    """
    The protocol version of a vector's frame: the current one unless it
    names an earlier one.
    """
    return int(vector.get("version", m.PROTOCOL_VERSION))


def message_of(message_name: str, vector: dict[str, Any]) -> m.Message:
    later = {field for field, _, since in _spec_layouts()[message_name] if since > version_of(vector)}
    return record_from_json(MESSAGE_CLASSES[message_name], vector["fields"], frozenset(later))


def split_frame(frame: bytes) -> tuple[int, bytes]:
    """
    Check a frame's header the way a receiver does; return (type, body).
    """
    assert len(frame) >= wire.HEADER_SIZE + 1
    (length,) = struct.unpack(">I", frame[: wire.HEADER_SIZE])
    assert length == len(frame) - wire.HEADER_SIZE, "the length counts the type byte and the body"
    assert 1 <= length <= wire.MAX_FRAME_LIMIT
    return frame[wire.HEADER_SIZE], frame[wire.HEADER_SIZE + 1 :]


# -- the vector files themselves -----------------------------------------------


def test_files_are_well_formed() -> None:
    names = []
    for document in FILES:
        cls = MESSAGE_CLASSES[document["message"]]
        assert document["type"] == cls.TYPE, document["path"]
        assert document["vectors"], document["path"]
        for vector in document["vectors"]:
            assert set(vector) - {"version"} == {"name", "description", "fields", "frame"}, vector["name"]
            if "version" in vector:
                # Only an earlier version's layout is marked, one still spoken.
                assert vector["version"] in m.SUPPORTED_VERSIONS - {m.PROTOCOL_VERSION}, vector["name"]
            assert re.fullmatch(r"(?:[0-9a-f]{2})+", vector["frame"]), vector["name"]
            names.append(vector["name"])
    assert len(names) == len(set(names)), "vector names must be unique"


def test_every_message_type_has_a_vector() -> None:
    covered = {document["message"] for document in FILES}
    assert MESSAGE_CLASSES, "no message classes found"
    assert sorted(set(MESSAGE_CLASSES) - covered) == []


def test_type_bytes_are_distinct() -> None:
    types = [cls.TYPE for cls in MESSAGE_CLASSES.values()]
    assert len(types) == len(set(types))


# -- the implementation against the vectors -----------------------------------


@pytest.mark.parametrize(("message_name", "vector"), VECTORS)
def test_encode(message_name: str, vector: dict[str, Any]) -> None:
    message = message_of(message_name, vector)
    assert wire.encode_message(message, version_of(vector)).hex() == vector["frame"]


@pytest.mark.parametrize(("message_name", "vector"), VECTORS)
def test_decode(message_name: str, vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["frame"])
    message_type, body = split_frame(frame)
    assert message_type == MESSAGE_CLASSES[message_name].TYPE
    decoded = wire.decode_body(message_type, body, version_of(vector))
    expected = message_of(message_name, vector)
    assert type(decoded) is type(expected)
    assert decoded == expected


def test_version_3_list_requests_are_the_current_ones_without_the_flag() -> None:
    """
    A version 3 ListRequest is read as version 3 only: its frame is one of
    the current version less its last byte (the newest_first flag), so read
    in the other version's layout, either is malformed.
    """
    seen = {3: 0, m.PROTOCOL_VERSION: 0}
    for document in FILES:
        if document["message"] != "ListRequest":
            continue
        for vector in document["vectors"]:
            version = version_of(vector)
            seen[version] += 1
            message_type, body = split_frame(bytes.fromhex(vector["frame"]))
            other = m.PROTOCOL_VERSION if version == 3 else 3
            with pytest.raises(ProtocolError):
                wire.decode_body(message_type, body, other)
            message = message_of("ListRequest", vector)
            if version == 3:
                current = split_frame(wire.encode_message(message))[1]
                assert current == body + b"\x00"
    assert seen[3] >= 3 and seen[m.PROTOCOL_VERSION] >= 2, seen


def test_a_newest_first_list_request_cannot_be_encoded_in_version_3() -> None:
    with pytest.raises(ValueError, match="version 4"):
        wire.encode_message(m.ListRequest(1, newest_first=True), 3)


@pytest.mark.parametrize(("message_name", "vector"), VECTORS)
def test_framing_reassembles_byte_by_byte(message_name: str, vector: dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["frame"])
    frames = FrameBuffer(wire.MAX_FRAME_LIMIT)
    received = [item for byte in frame for item in frames.receive(bytes([byte]))]
    assert received == [split_frame(frame)]
    assert len(frames) == 0


@pytest.mark.parametrize(("message_name", "vector"), VECTORS)
def test_truncated_or_extended_body_is_refused(message_name: str, vector: dict[str, Any]) -> None:
    """
    Every body is consumed exactly (section 3): one byte less is malformed,
    and so is one byte more, except for Output whose data runs to the end.
    """
    message_type, body = split_frame(bytes.fromhex(vector["frame"]))
    version = version_of(vector)
    with pytest.raises(ProtocolError) as error:
        wire.decode_body(message_type, body[:-1] if message_name != "Output" else body[:12], version)
    assert error.value.code is ErrorCode.PROTOCOL_ERROR
    if message_name != "Output":
        with pytest.raises(ProtocolError) as error:
            wire.decode_body(message_type, body + b"\x00", version)
        assert error.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(("message_name", "vector"), OUTPUT_VECTORS)
def test_output_fast_path_matches_schema(message_name: str, vector: dict[str, Any]) -> None:
    message = message_of(message_name, vector)
    assert isinstance(message, m.Output)
    fields = {"stream_id": message.stream_id, "fd": message.fd, "offset": message.offset, "data": message.data}
    body = wire.SCHEMAS[m.Output].build(fields)
    generic = wire.frame_header(len(body) + 1, m.Output.TYPE) + body
    fast = wire.encode_output(message.stream_id, message.fd, message.offset, message.data)
    assert fast == generic == bytes.fromhex(vector["frame"])
    parsed = wire.SCHEMAS[m.Output].parse(split_frame(fast)[1])
    assert {name: parsed[name] for name in fields} == fields


# -- the specification against the vectors --------------------------------------


def _readme() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def _cells(line: str) -> list[str]:
    return [cell.strip().strip("`").strip() for cell in line.strip().strip("|").split("|")]


def table_after(heading: re.Pattern[str], lines: list[str] | None = None) -> list[dict[str, str]]:
    """
    The rows of the first Markdown table after the heading that matches
    C{heading}, as dicts keyed by the header cells.
    """
    lines = _readme() if lines is None else lines
    for index, line in enumerate(lines):  # noqa: B007 - index is used after the loop
        if line.startswith("#") and heading.search(line.lstrip("#").strip()):
            break
    else:
        raise AssertionError(f"README has no heading matching {heading.pattern!r}")
    rows: list[list[str]] = []
    for line in lines[index + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append(_cells(line))
        elif rows:
            break
    assert len(rows) >= 2 and set(rows[1][0]) <= set("-:"), f"no table under {heading.pattern!r}"
    header = rows[0]
    return [dict(zip(header, row)) for row in rows[2:]]


def _enum_rows(heading: str) -> set[tuple[int, str]]:
    return {(int(row["Value"]), row["Name"]) for row in table_after(re.compile(heading))}


@pytest.mark.parametrize(
    ("heading", "enumeration"),
    [
        (r"^10\.3 Error codes$", ErrorCode),
        (r"^11\.1 Job states$", m.JobState),
        (r"^11\.2 Network$", m.Network),
        (r"^11\.3 End reasons$", m.EndReason),
    ],
)
def test_spec_tables_list_every_code(heading: str, enumeration: type[enum.IntEnum]) -> None:
    """
    The README's tables list exactly the codes of the implementation: a new
    code without a row, or a row for a code that no longer exists, fails.
    """
    assert _enum_rows(heading) == {(member.value, member.name) for member in enumeration}


def test_spec_error_code_tiers() -> None:
    rows = table_after(re.compile(r"^10\.3 Error codes$"))
    for row in rows:
        # The implementation's convention: codes from 100 up end the connection.
        assert row["Tier"] == ("connection" if int(row["Value"]) >= 100 else "request"), row


def test_spec_lists_every_message_type() -> None:
    rows = table_after(re.compile(r"^6\.1 Message types$"))
    assert {row["Message"]: int(row["Type"], 16) for row in rows} == {
        name: cls.TYPE for name, cls in MESSAGE_CLASSES.items()
    }


# A decoder that knows only the README: the primitive types of section 4 and
# the field tables of section 6.

_FIXED = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q", "i32": ">i"}
_ARRAY = re.compile(r"^array\((u16|u32), (\w+)\)$")
_RECORDS = ("Limits", "JobUsage", "JobStatus", "EnvEntry", "Label")


# A field's row in the README that begins "(version N)": the field is in
# the layouts of version N on, not in an earlier version's.
_SINCE = re.compile(r"^\(version (\d+)\)")


@functools.cache
def _spec_layouts() -> dict[str, list[tuple[str, str, int]]]:
    """
    Message or record name -> [(field, type, first version with it)] from
    the README's tables.
    """
    lines = _readme()
    layouts = {}
    for line in lines:
        if not line.startswith("#### "):
            continue
        title = line[5:].replace("`", "").strip()
        match = re.fullmatch(r"(?:0x[0-9a-f]{2} )?(\w+)", title)
        if match is None:
            continue
        name = match.group(1)
        rows = table_after(re.compile("^" + re.escape(line.lstrip("#").strip()) + "$"), lines)
        layouts[name] = [
            (row["Field"], row["Type"], int(since.group(1)) if (since := _SINCE.match(row["Meaning"])) else 0)
            for row in rows
        ]
    return layouts


class _SpecReader:
    def __init__(self, data: bytes, layouts: dict[str, list[tuple[str, str, int]]], version: int) -> None:
        self.data = data
        self.position = 0
        self.layouts = layouts
        self.version = version

    def take(self, size: int) -> bytes:
        assert self.position + size <= len(self.data), "body too short for the spec's layout"
        piece = self.data[self.position : self.position + size]
        self.position += size
        return piece

    def read(self, kind: str) -> Any:
        if kind in _FIXED:
            fmt = _FIXED[kind]
            return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        if kind == "flag":
            byte = self.take(1)[0]
            assert byte in (0, 1), "a flag is 0x00 or 0x01"
            return byte == 1
        if kind == "text":
            return self.take(self.read("u16")).decode("utf-8")
        if kind == "job_id":
            return str(uuid.UUID(bytes=self.take(16)))
        if kind == "bytes":
            return self.take(len(self.data) - self.position).hex()
        array = _ARRAY.match(kind)
        if array is not None:
            count = self.read(array.group(1))
            return [self.read(array.group(2)) for _ in range(count)]
        if kind in self.layouts:
            values = {
                name: self.read(field_kind) for name, field_kind, since in self.layouts[kind] if since <= self.version
            }
            # The README's JSON conventions: an EnvEntry (and a Label) is a
            # [name, value] pair.
            return list(values.values()) if kind in ("EnvEntry", "Label") else values
        raise AssertionError(f"the README does not define the type {kind!r}")


def test_spec_defines_every_layout() -> None:
    layouts = _spec_layouts()
    assert sorted(set(MESSAGE_CLASSES) | set(_RECORDS)) == sorted(layouts)
    records: list[tuple[str, Any]] = [*MESSAGE_CLASSES.items()]
    records += [("Limits", Limits), ("JobUsage", m.JobUsage), ("JobStatus", m.JobStatus)]
    for name, cls in records:
        assert [field for field, _, _ in layouts[name]] == [f.name for f in dataclasses.fields(cls)], name


@pytest.mark.parametrize(("message_name", "vector"), VECTORS)
def test_spec_tables_decode_vector(message_name: str, vector: dict[str, Any]) -> None:
    """
    Someone with only the README can read every vector: its field tables
    consume each body exactly and give the JSON description back.
    """
    layouts = _spec_layouts()
    message_type, body = split_frame(bytes.fromhex(vector["frame"]))
    rows = table_after(re.compile(r"^6\.1 Message types$"))
    assert {int(row["Type"], 16): row["Message"] for row in rows}[message_type] == message_name
    reader = _SpecReader(body, layouts, version_of(vector))
    decoded = reader.read(message_name)
    assert reader.position == len(body), "bytes left over after the spec's layout"
    assert decoded == vector["fields"]


# -- the walkthroughs ------------------------------------------------------------


def _walkthroughs() -> dict[str, bytes]:
    """
    Vector name -> the bytes spelled out in the README's walkthrough blocks.
    """
    found: dict[str, bytes] = {}
    lines = _readme()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```") and index + 1 < len(lines) and lines[index + 1].startswith("vector: "):
            name = lines[index + 1].split(":", 1)[1].strip()
            data = bytearray()
            index += 2
            while not lines[index].startswith("```"):
                hex_part = re.split(r" {2,}", lines[index].strip(), maxsplit=1)[0]
                for token in hex_part.split():
                    assert re.fullmatch(r"[0-9a-f]{2}", token), f"walkthrough {name}: {lines[index]!r}"
                    data.append(int(token, 16))
                index += 1
            found[name] = bytes(data)
        index += 1
    return found


def test_walkthroughs_match_their_vectors() -> None:
    walkthroughs = _walkthroughs()
    assert len(walkthroughs) >= 2
    frames = {vector["name"]: vector["frame"] for document in FILES for vector in document["vectors"]}
    for name, data in walkthroughs.items():
        assert name in frames, f"walkthrough of unknown vector {name}"
        assert data.hex() == frames[name], f"walkthrough {name} differs from its vector"
