"""The config document: what bash hands over after evaluating the model config, and the records back.

lib.sh's load_config sources vllm_model_configs.sh (a bash file of `vllm_model key=value` calls)
and writes what it collected as NUL-terminated fields, since a value may hold any byte but NUL:

    file PATH              the config file, first
    model N WORD...        one `vllm_model` call and its N words
    binding ENTRY          one GPU_CPU_BINDING entry
    variable NAME VALUE    a variable the file set that is not in the environment
    unevaluated            bash failed evaluating the file (and said why on stderr)

Bytes that are not UTF-8 survive the round trip (surrogateescape, as os.fsdecode does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


class DocumentError(ValueError):
    """The document is not what lib.sh writes; the message says where it went wrong."""


@dataclass
class ConfigDocument:
    file: str = ""
    calls: list[list[str]] = field(default_factory=list)  # the words of each vllm_model call
    bindings: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    evaluated: bool = True


def decode_fields(data: bytes) -> list[str]:
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise DocumentError("the last field is not NUL-terminated")
    return [os.fsdecode(part) for part in data[:-1].split(b"\0")]


def encode_fields(values: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(value) + b"\0" for value in values)


def read_document(data: bytes) -> ConfigDocument:
    document = ConfigDocument()
    fields = iter(decode_fields(data))
    for tag in fields:
        if tag == "file":
            document.file = take(fields, tag)
        elif tag == "model":
            count = take(fields, tag)
            if not count.isdigit():
                raise DocumentError(f"model: word count {count!r} is not a number")
            document.calls.append([take(fields, tag) for _ in range(int(count))])
        elif tag == "binding":
            document.bindings.append(take(fields, tag))
        elif tag == "variable":
            name = take(fields, tag)
            document.variables[name] = take(fields, tag)
        elif tag == "unevaluated":
            document.evaluated = False
        else:
            raise DocumentError(f"unknown record {tag!r}")
    return document


def write_document(document: ConfigDocument) -> bytes:
    """The document as lib.sh writes it (for tests and for anyone driving the commands by hand)."""
    values = ["file", document.file]
    for words in document.calls:
        values += ["model", str(len(words)), *words]
    for entry in document.bindings:
        values += ["binding", entry]
    for name, value in document.variables.items():
        values += ["variable", name, value]
    if not document.evaluated:
        values.append("unevaluated")
    return encode_fields(values)


def take(fields: Iterator[str], tag: str) -> str:
    try:
        return next(fields)
    except StopIteration:
        raise DocumentError(f"{tag}: the document ends inside the record") from None
