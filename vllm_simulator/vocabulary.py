"""The simulator's made-up tokens: one word of a lorem text each, and the ids /tokenize gives words.

Not a tokenizer: prompts count whitespace words, so a test can predict every usage number.
"""

from __future__ import annotations

import zlib

import orjson

_LOREM_TEXT = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
    "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
    "cillum eu fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
    "officia deserunt mollit anim id est laborum"
)
LOREM = _LOREM_TEXT.split()
VOCAB = sorted(set(LOREM))
VOCAB_IDS = {word: index for index, word in enumerate(VOCAB)}
# Prebuilt as JSON strings so a streamed chunk is three byte joins.
_TOKEN_TEXT = [[word, " " + word] for word in LOREM]  # [first token form, later token form]
_TOKEN_JSON = [[orjson.dumps(text) for text in forms] for forms in _TOKEN_TEXT]


def token_text(position: int) -> str:
    return _TOKEN_TEXT[position % len(LOREM)][position > 0]


def token_json(position: int) -> bytes:
    """The token at `position` as a JSON string, ready to put in a streamed chunk."""
    return _TOKEN_JSON[position % len(LOREM)][position > 0]


def completion_text(n_tokens: int) -> str:
    return "".join(token_text(i) for i in range(n_tokens))


def token_ids(text: str) -> list[int]:
    # Words outside the lorem text still get a stable id, past the vocabulary's own.
    return [VOCAB_IDS.get(word, len(VOCAB) + zlib.crc32(word.encode()) % 50_000) for word in text.split()]


def detokenized(ids: list[int]) -> str:
    return " ".join(VOCAB[i] if i < len(VOCAB) else "<unk>" for i in ids)
