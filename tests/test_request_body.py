"""Finding the model in a multipart/form-data body: what real clients send, and what they must not."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import REPO_ROOT
from vllm_gateway.errors import GatewayError
from vllm_gateway.request_body import (
    MAX_HEADER_PARAMETERS,
    MAX_MULTIPART_PARTS,
    MAX_PART_HEADER_BYTES,
    body_with_model,
    model_from_body,
    model_from_multipart,
    require_model,
)

BOUNDARY = "boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def part(
    name: str, value: bytes, *, filename: str | None = None, boundary: str = BOUNDARY, extra_headers: bytes = b""
) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode() + extra_headers + b"\r\n" + value + b"\r\n"
    )


def form(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def missing_model_error() -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        require_model(None)
    return caught.value


def assert_missing_model(call: Callable[[], object]) -> None:
    expected = missing_model_error()
    with pytest.raises(GatewayError) as caught:
        call()
    error = caught.value
    assert (error.status, error.type, error.code, error.param, error.message) == (
        expected.status,
        expected.type,
        expected.code,
        expected.param,
        expected.message,
    )


def sdk_transcription_request(model: str) -> httpx.Request:
    """The request the openai SDK builds for a transcription, caught before it leaves."""
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"text": "hi"})

    client = openai.OpenAI(
        base_url="http://gateway.invalid/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    client.audio.transcriptions.create(model=model, file=("clip.wav", b"RIFF\0\0\r\n--x", "audio/wav"))
    return sent[0]


# ---- What clients send ----------------------------------------------------------------------------


def test_model_is_found_in_the_body_the_openai_sdk_sends() -> None:
    request = sdk_transcription_request("whisper-large")
    content_type = request.headers["content-type"].encode()
    assert content_type.startswith(b"multipart/form-data; boundary=")
    assert model_from_multipart(request.content, content_type) == "whisper-large"
    assert model_from_body(request.content, content_type) == ("whisper-large", False)


def test_model_after_a_file_part_is_found_as_curl_sends_it() -> None:
    # `curl -F file=@a.wav -F model=whisper-1`, byte for byte: file first, a dashed boundary.
    boundary = "------------------------36606dad14b6b146"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + b"RIFF\0\0\r\n"
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n'
        ).encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}".encode()
    assert model_from_multipart(body, content_type) == "whisper-1"


@pytest.mark.parametrize(
    "content_type",
    [
        b"multipart/form-data; boundary=boundary",
        b'multipart/form-data; boundary="boundary"',
        b"multipart/form-data;boundary=boundary",
        b"multipart/form-data; BOUNDARY=boundary",
        b'Multipart/Form-Data; Boundary = "boundary" ',
        b'multipart/form-data; charset=utf-8; boundary="boundary"; foo=bar',
        b'multipart/form-data; note="a; boundary=wrong"; boundary=boundary',
    ],
)
def test_boundary_is_read_quoted_or_not_and_whatever_the_case_of_its_name(content_type: bytes) -> None:
    body = form(part("file", b"\0\1", filename="a.wav"), part("model", b"m"))
    assert model_from_multipart(body, content_type) == "m"


def test_quoted_boundary_may_hold_the_characters_rfc_2046_allows() -> None:
    boundary = "a b'()+_,-./:=?" + "x" * 55  # 70 characters, spaces only inside quotes
    body = form(part("model", b"m", boundary=boundary), boundary=boundary)
    assert model_from_multipart(body, f'multipart/form-data; boundary="{boundary}"'.encode()) == "m"


@pytest.mark.parametrize(
    "content_type",
    [
        b"multipart/form-data",
        b"multipart/form-data; boundary=",
        b'multipart/form-data; boundary=""',
        b"multipart/form-data; boundary=" + b"b" * 71,
        b'multipart/form-data; boundary="boundary',
        b"multipart/form-data; boundary=bound ary",
        b'multipart/form-data; boundary="boundary "',
        b"multipart/form-data; boundary=bound<ary",
        b'multipart/form-data; boundary="bound\\ary"',
        b"multipart/form-data; boundary=boundary; boundary=other",
        b'multipart/form-data; note="boundary=boundary"',
        b"multipart/form-data; boundary",
        b"multipart/mixed; boundary=boundary",
    ],
    ids=lambda value: value.decode()[20:] or "none",
)
def test_missing_or_bad_boundary_is_the_missing_model_error(content_type: bytes) -> None:
    body = form(part("model", b"m"))
    assert_missing_model(lambda: model_from_multipart(body, content_type))


def test_preamble_and_padding_after_a_delimiter_are_allowed() -> None:
    body = (
        b"This is the preamble.\r\n--boundary \t\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\nm\r\n--boundary--\r\n'
    )
    assert model_from_multipart(body, CONTENT_TYPE) == "m"


def test_unquoted_name_and_header_name_in_any_case_are_found() -> None:
    body = b"--boundary\r\ncontent-DISPOSITION: form-data; NAME=model\r\n\r\nm\r\n--boundary--\r\n"
    assert model_from_multipart(body, CONTENT_TYPE) == "m"


def test_value_ends_at_the_next_delimiter_and_keeps_what_is_before_it() -> None:
    body = form(part("model", b"org/model--v2\r\n--not-the-boundary"), part("file", b"x"))
    assert model_from_multipart(body, CONTENT_TYPE) == "org/model--v2\r\n--not-the-boundary"


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; filename="a\\";name=\\"x"; name="model"',  # an escaped quote ends nothing
        b'form-data; filename="C:\\\\dir\\\\"; name="model"',  # an escaped backslash, then the end
        b'form-data; filename="a; name=x.wav"; name="model"',  # a ";" and "name=" inside quotes
    ],
    ids=["escaped-quote", "escaped-backslash", "separator-in-quotes"],
)
def test_quoted_parameters_before_the_name_are_skipped_whole(disposition: bytes) -> None:
    body = b"--boundary\r\nContent-Disposition: " + disposition + b"\r\n\r\nm\r\n--boundary--\r\n"
    assert model_from_multipart(body, CONTENT_TYPE) == "m"


def test_first_of_many_fields_named_model_wins() -> None:
    body = form(part("language", b"en"), part("model", b"first"), part("model", b"second"))
    assert model_from_multipart(body, CONTENT_TYPE) == "first"


# ---- What must not be taken for the model ----------------------------------------------------------


def test_no_model_part_is_the_missing_model_error() -> None:
    body = form(part("file", b"\0", filename="a.wav"), part("language", b"en"))
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))


def test_empty_model_is_the_missing_model_error() -> None:
    body = form(part("model", b""), part("file", b"\0", filename="a.wav"))
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))


def test_model_that_is_not_utf8_is_the_missing_model_error() -> None:
    body = form(part("model", b"\xff\xfe"))
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; name="Model"',
        b'form-data; name="models"',
        b'form-data; filename="model"',
        b'form-data; name="x"; note="name=model"',
        b'form-data; name="model"; name="x"',
    ],
)
def test_only_a_part_named_exactly_model_is_the_model(disposition: bytes) -> None:
    body = b"--boundary\r\nContent-Disposition: " + disposition + b"\r\n\r\nm\r\n--boundary--\r\n"
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))


def test_a_model_field_inside_an_uploaded_file_is_not_the_model() -> None:
    # The file's bytes look like a part header; only the walk from delimiter to delimiter sees
    # that they are content.
    fake = b'Content-Disposition: form-data; name="model"\r\n\r\nsmuggled\r\n'
    body = form(part("file", fake, filename="notes.txt"), part("model", b"real"))
    assert model_from_multipart(body, CONTENT_TYPE) == "real"
    assert_missing_model(lambda: model_from_multipart(form(part("file", fake)), CONTENT_TYPE))


def test_model_beyond_the_part_limit_is_the_missing_model_error() -> None:
    fillers = [part(f"field{index}", b"v") for index in range(MAX_MULTIPART_PARTS)]
    assert_missing_model(lambda: model_from_multipart(form(*fillers, part("model", b"m")), CONTENT_TYPE))
    assert model_from_multipart(form(*fillers[1:], part("model", b"m")), CONTENT_TYPE) == "m"


def test_header_block_longer_than_the_limit_ends_the_search() -> None:
    long_header = b"X-Padding: " + b"p" * MAX_PART_HEADER_BYTES + b"\r\n"
    body = form(part("file", b"\0", extra_headers=long_header), part("model", b"m"))
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))

    fits = b"X-Padding: " + b"p" * (MAX_PART_HEADER_BYTES - 200) + b"\r\n"
    body = form(part("file", b"\0", extra_headers=fits), part("model", b"m"))
    assert model_from_multipart(body, CONTENT_TYPE) == "m"


def test_disposition_with_more_parameters_than_the_limit_ends_the_search() -> None:
    def body_with(extra: int) -> bytes:
        parameters = b"".join(b"; p%d=v" % index for index in range(extra))
        return (
            b'--boundary\r\nContent-Disposition: form-data; name="model"'
            + parameters
            + b"\r\n\r\nm\r\n--boundary--\r\n"
        )

    assert model_from_multipart(body_with(MAX_HEADER_PARAMETERS - 1), CONTENT_TYPE) == "m"
    assert_missing_model(lambda: model_from_multipart(body_with(MAX_HEADER_PARAMETERS), CONTENT_TYPE))


def test_part_with_two_dispositions_ends_the_search() -> None:
    body = (
        b'--boundary\r\nContent-Disposition: form-data; name="x"\r\n'
        b'Content-Disposition: form-data; name="model"\r\n\r\nm\r\n--boundary--\r\n'
    )
    assert_missing_model(lambda: model_from_multipart(body, CONTENT_TYPE))


def test_unterminated_parts_are_the_missing_model_error() -> None:
    for body in (
        b'--boundary\r\nContent-Disposition: form-data; name="model"\r\n\r\nm',
        b'--boundary\r\nContent-Disposition: form-data; name="model"\r\n',
        b'--boundaryX\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--boundary--\r\n',
        b"--boundary--\r\n",
        b"",
        b"no delimiter at all",
    ):
        assert_missing_model(lambda body=body: model_from_multipart(body, CONTENT_TYPE))


# ---- Crafted bodies finish, in time linear in their size -------------------------------------------

# Each call runs in a child process that the test can kill: the old regex held the GIL for the
# whole match, so a watchdog thread in this process could not even notice it overran.
_CALL_IN_CHILD = """
import json, sys, time
from vllm_gateway.errors import GatewayError
from vllm_gateway.request_body import model_from_multipart
body = sys.stdin.buffer.read()
started = time.perf_counter()
try:
    outcome = model_from_multipart(body, sys.argv[1].encode())
except GatewayError as error:
    outcome = error.code
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started}))
"""
# A liveness bound, not a speed requirement: the linear walk needs milliseconds for 4 MiB, while
# the old regex needed hours (it took 4 s for 112 KB and grew with the square, or the cube).
LIVENESS_SECONDS = 5.0
CRAFTED_SIZE = 4 * 1024 * 1024


def call_in_child(body: bytes, content_type: bytes) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CALL_IN_CHILD, content_type.decode()],
        input=body,
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=LIVENESS_SECONDS * 6,
    )  # room for the interpreter to start
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "unit",
    [
        b'Content-Disposition: form-data; name="x"\r\n',  # header lines, never a blank line
        b"--boundary\r\n",  # delimiters, never a header block
        b"Content-Disposition:",  # quadratic for the old regex
        b'Content-Disposition: form-data; name="model"\r\n',  # quadratic for the old regex
        b'Content-Disposition: name="model"',  # cubic for the old regex
    ],
    ids=["header-lines", "delimiters", "disposition-no-newline", "model-header-lines", "model-disposition-no-newline"],
)
def test_crafted_4_mib_body_finishes_with_the_missing_model_error(unit: bytes) -> None:
    body = unit * (CRAFTED_SIZE // len(unit))
    for crafted in (body, b"--boundary\r\n" + body):  # with and without a first delimiter
        result = call_in_child(crafted, CONTENT_TYPE)
        assert result["outcome"] == "missing_model"
        assert result["seconds"] < LIVENESS_SECONDS


# -- naming another model: only the model's value changes (request_body.body_with_model) --


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"alias","messages":[]}',
        b'{ "messages" : [{"model": "alias"}],\n  "model" :\t"alias" , "seed": 123456789012345678901234567890}',
        b'{"m\\u006fdel":"alias","prompt":"the \\"model\\": \\"alias\\" inside a string"}',
        b'{"nested":{"model":"alias"},"list":[{"model":"x"}],"model":"first","model":"alias"}',
        b'{"prompt":"' + b"\\\\" * 1000 + b'","model":"alias"}',
    ],
)
def test_a_json_body_names_another_model_with_every_other_byte_kept(body: bytes) -> None:
    renamed = body_with_model(body, b"application/json", "canonical")
    assert model_from_body(renamed, b"application/json")[0] == "canonical"
    # The last `"alias"` in the body is the top-level model's value; all around it is unchanged.
    at = body.rindex(b'"alias"')
    assert renamed == body[:at] + b'"canonical"' + body[at + len(b'"alias"') :]


def test_a_model_name_that_needs_escapes_is_written_as_valid_json() -> None:
    renamed = body_with_model(b'{"model":"a"}', b"application/json", 'odd "name"\\')
    assert json.loads(renamed) == {"model": 'odd "name"\\'}


def test_a_form_body_names_another_model_in_its_model_field_only() -> None:
    body = form(part("file", b'model="alias"', filename="clip.wav"), part("model", b"alias"), part("x", b"alias"))
    renamed = body_with_model(body, CONTENT_TYPE, "canonical")
    assert model_from_multipart(renamed, CONTENT_TYPE) == "canonical"
    assert renamed == body.replace(b"\r\n\r\nalias\r\n", b"\r\n\r\ncanonical\r\n", 1)
