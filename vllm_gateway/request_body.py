"""Finding the model a request body addresses, without changing a byte of the body; and, for the rare
request that names a model by a name its server does not know, the body with that one value replaced."""

from __future__ import annotations

import re
from typing import Final

import orjson

from . import errors
from .stream_usage import lacks_usage

# RFC 2046 section 5.1.1: a boundary is 1 to 70 characters, and these are the ones it may use.
MAX_BOUNDARY_LENGTH: Final = 70
BOUNDARY_CHARS: Final = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'()+_,-./:=? ")
# Real clients send a part header block of a hundred bytes or so (Content-Disposition, maybe a
# Content-Type). The bound caps what one part's header search can cost; a longer block is not a
# form field worth routing by.
MAX_PART_HEADER_BYTES: Final = 8 * 1024
# A transcription form has about ten fields. Looking at more parts than this for the model only
# serves a client that wants the gateway to spend its time.
MAX_MULTIPART_PARTS: Final = 64
# Content-Type and Content-Disposition carry two or three parameters (boundary, charset; name,
# filename, filename*). Refusing a header with more bounds the Python-level steps a crafted one
# costs; the bytes between those steps are searched in C.
MAX_HEADER_PARAMETERS: Final = 16

_WHITESPACE = b" \t"


def model_from_body(body: bytes, content_type: bytes) -> tuple[str, bool]:
    """The model the body names, and whether it is a stream whose client did not ask for its usage
    (stream_usage.lacks_usage)."""
    if content_type.startswith(b"multipart/form-data"):
        return model_from_multipart(body, content_type), False
    model, no_usage, problem = json_model(body)
    if problem is not None:
        raise errors.bad_request(problem, code="invalid_json")
    return require_model(model), no_usage


def json_model(body: bytes) -> tuple[object, bool, str | None]:
    """The `model` of a JSON body and lacks_usage(), or why the body is not a JSON object. Plain
    values, not errors, so that it can run in a helper process (body_parser.py) and send its answer back."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return None, False, f"The request body is not valid JSON: {error}"
    if not isinstance(payload, dict):
        return None, False, "The request body must be a JSON object."
    return payload.get("model"), lacks_usage(payload), None


def model_from_multipart(body: bytes, content_type: bytes) -> str:
    """The `model` field of a multipart/form-data body, in time linear in the body's size.

    The parts are walked with bytes.find alone, and the delimiter it looks for is at most 74
    bytes, so each byte of the body is compared a bounded number of times. A bad boundary, a
    malformed part header or one beyond MAX_PART_HEADER_BYTES or MAX_HEADER_PARAMETERS, more
    than MAX_MULTIPART_PARTS parts before the model, or no model at all: each is the same 400
    as a JSON body without a model.
    """
    boundary = multipart_boundary(content_type)
    value = form_field(body, boundary, b"model") if boundary is not None else None
    if value is None:
        return require_model(None)
    try:
        return require_model(value.decode())
    except UnicodeDecodeError:
        return require_model(None)


class _Unparsable(Exception):
    """The body or a header is not well-formed enough to say which part is which."""


def multipart_boundary(content_type: bytes) -> bytes | None:
    """The boundary of a multipart/form-data content type, or None if missing or invalid."""
    media_type = content_type.partition(b";")[0].strip(_WHITESPACE)
    if media_type.lower() != b"multipart/form-data":
        return None
    try:
        boundary = _parameters(content_type).get(b"boundary")
    except _Unparsable:
        return None
    if (
        boundary is None
        or not 0 < len(boundary) <= MAX_BOUNDARY_LENGTH
        or boundary.endswith(b" ")
        or not BOUNDARY_CHARS.issuperset(boundary)
    ):
        return None
    return boundary


def form_field(body: bytes, boundary: bytes, name: bytes) -> bytes | None:
    """The raw value of the first part named `name`; None if the walk ends before one."""
    span = form_field_span(body, boundary, name)
    return None if span is None else body[span[0] : span[1]]


def form_field_span(body: bytes, boundary: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the raw value of the first part named `name` starts and ends; None if the walk ends before one."""
    delimiter = b"\r\n--" + boundary
    # The first delimiter may open the body, without the CRLF that is part of every later one.
    if body.startswith(delimiter[2:]):
        position = len(delimiter) - 2
    else:
        found = body.find(delimiter)  # past a preamble
        if found < 0:
            return None
        position = found + len(delimiter)
    for _ in range(MAX_MULTIPART_PARTS):
        if body.startswith(b"--", position):  # the close delimiter: no part is left
            return None
        # The delimiter line may end in spaces or tabs (RFC 2046 transport padding).
        line_end = body.find(b"\r\n", position, position + MAX_PART_HEADER_BYTES)
        if line_end < 0 or body[position:line_end].strip(_WHITESPACE):
            return None
        headers_start = line_end + 2
        # The blank line that ends the header block; with no headers it follows the delimiter's.
        headers_end = body.find(b"\r\n\r\n", line_end, headers_start + MAX_PART_HEADER_BYTES + 4)
        if headers_end < 0:
            return None
        content_start = headers_end + 4
        content_end = body.find(delimiter, content_start)
        if content_end < 0:
            return None
        try:
            part_name = _part_name(body[headers_start:headers_end])
        except _Unparsable:
            return None
        if part_name == name:
            return content_start, content_end
        position = content_end + len(delimiter)
    return None


def _part_name(header_block: bytes) -> bytes | None:
    """The `name` parameter of a part's Content-Disposition header, quotes removed."""
    # Found with find rather than line by line, so a block of thousands of short lines stays cheap.
    marker = b"\r\ncontent-disposition"
    lowered = b"\r\n" + header_block.lower()
    found = lowered.find(marker)
    if found < 0:
        return None
    after_name = found + len(marker)
    if lowered.find(marker, after_name) >= 0:
        raise _Unparsable  # a second disposition: parsers disagree on which one names the part
    line_end = lowered.find(b"\r\n", after_name)
    rest = header_block[after_name - 2 : None if line_end < 0 else line_end - 2]
    spacing, colon, value = rest.partition(b":")
    if not colon or spacing.strip(_WHITESPACE):
        return None  # another header whose name merely begins the same way
    return _parameters(value).get(b"name")


def _parameters(value: bytes) -> dict[bytes, bytes]:
    """The `; name=value` parameters of a header value (RFC 2045), names in lower case.

    Quoted values come back without their quotes and with any backslash escapes left as sent:
    neither a valid boundary nor the field name `model` contains a backslash or a quote, so an
    escaped value can never be mistaken for one. A name given twice is refused, because parsers
    disagree about which one wins and the backend must see the same boundary and field names.
    """
    # Escapes are resolved first, in C: inside a quoted string `\x` stands for x, and a valid
    # header has backslashes nowhere else (RFC 2045 counts `\` among the tspecials). Each escape
    # pair becomes two NULs, which no valid value holds, so every quote left in `plain` opens or
    # closes a quoted string, and every index still points at the same byte of `value`.
    plain = value.replace(b"\\\\", b"\0\0").replace(b'\\"', b"\0\0")
    params: dict[bytes, bytes] = {}
    end = len(plain)
    position = plain.find(b";")
    steps = 0
    while 0 <= position < end:
        steps += 1  # empty parameters count too: a run of ";" must not be free to walk
        if steps > MAX_HEADER_PARAMETERS:
            raise _Unparsable
        position += 1
        semicolon = plain.find(b";", position)
        if semicolon < 0:
            semicolon = end
        equals = plain.find(b"=", position, semicolon)
        if equals < 0:
            if plain[position:semicolon].strip(_WHITESPACE):
                raise _Unparsable  # a parameter without a value
            position = semicolon  # an empty one, as a trailing ";" makes
            continue
        key = plain[position:equals].strip(_WHITESPACE).lower()
        text = plain[equals + 1 : semicolon].lstrip(_WHITESPACE)
        if text.startswith(b'"'):
            opening = semicolon - len(text)
            close = plain.find(b'"', opening + 1)
            if close < 0:
                raise _Unparsable
            text = value[opening + 1 : close]
            semicolon = plain.find(b";", close + 1)
            if semicolon < 0:
                semicolon = end
            if plain[close + 1 : semicolon].strip(_WHITESPACE):
                raise _Unparsable  # something between the closing quote and the next parameter
        else:
            text = text.rstrip(_WHITESPACE)
            if any(char in text for char in b' \t"\\\0'):
                raise _Unparsable  # an unquoted value is a token: no spaces, quotes or escapes
        if not key or key in params:
            raise _Unparsable
        params[key] = text
        position = semicolon
    return params


# A JSON string (escapes included) or a bracket: in valid JSON nothing else opens or closes a level.
# Possessive, so that a long string is matched in one step.
_JSON_STRING_OR_BRACKET = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[{}\[\]]', re.DOTALL)
# `model` spelt with an escape for each letter, and its quotes: longer tokens are never the key.
MAX_KEY_BYTES: Final = 5 * 6 + 2
_STRING_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\]++|\\.)*+")', re.DOTALL)


def body_with_model(body: bytes, content_type: bytes, model: str) -> bytes:
    """The body, already read by model_from_body, naming `model` instead: only the bytes of the
    model's value change, so every other field reaches the backend exactly as the client wrote it (a
    re-serialisation would, for one, turn an integer beyond 64 bits into a float)."""
    if content_type.startswith(b"multipart/form-data"):
        boundary = multipart_boundary(content_type)
        span = form_field_span(body, boundary, b"model") if boundary is not None else None
        value = model.encode()
    else:
        span = json_model_span(body)
        value = orjson.dumps(model)
    if span is None:  # not a body model_from_body accepted
        return body
    return body[: span[0]] + value + body[span[1] :]


def json_model_span(body: bytes) -> tuple[int, int] | None:
    """Where the string value of a JSON object's top-level `model` starts and ends (its last one,
    which is the one JSON parsers keep), for a body orjson parsed: in valid JSON, counting brackets
    outside strings tells the levels. Linear in the body, and one step per string or bracket; a large
    body gets here in the body parser's helper process (body_parser.py)."""
    found = None
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(body):
        start, end = match.span()
        opening = body[start]
        if opening == 0x22:  # '"': a key when at the top level and followed by a colon
            if depth == 1 and end - start <= MAX_KEY_BYTES and _is_model_key(body[start:end]):
                value = _STRING_VALUE.match(body, end)
                if value is not None:
                    found = value.span(1)
        elif opening in b"{[":
            depth += 1
        else:
            depth -= 1
    return found


def _is_model_key(token: bytes) -> bool:
    """Whether a JSON string token says `model`, escapes such as `mod\\u0065l` included."""
    if token == b'"model"':
        return True
    return b"\\" in token and orjson.loads(token) == "model"


def require_model(model: object) -> str:
    if not isinstance(model, str) or not model:
        raise errors.missing_model()
    return model
