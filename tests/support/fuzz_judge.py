"""The judge of the HTTP front's fuzz (tests/test_front_fuzz.py): what came back on a case's connection
(`Conversation`, parsed as it arrives) against what the gateway owes that kind of case, and the report
of every failure grouped by cause.

    conversation = Conversation(case)
    conversation.feed(data); conversation.close()    # as the bytes and the EOF arrive
    failures = judge(conversation, liveness=10.0, close_bound=6.0)
    print(report(failures, ["what ran"], seed, shown=20))   # seed: FUZZ_SEED, to rebuild the cases
"""

from __future__ import annotations

import collections
import json
import time
from dataclasses import dataclass

from tests.support.fuzz_requests import COMPLETE, EITHER, INCOMPLETE, PIPELINED, Case
from tests.support.http_wire import Malformed, WireResponse, take_response

# OpenAI's error shape, typed: {"message": str, "type": str, "param": null|str, "code": str}. A null
# code (FastAPI's own 405 and body-parsing 400 today) fails the test; False would only ask for the keys.
ERROR_CODE_IS_A_STRING = True


class Conversation:
    """What came back on one case's connection, parsed as it arrives."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.buffer = b""
        self.responses: list[WireResponse] = []
        self.eof = False
        self.reset = False
        self.malformed: str | None = None
        self.answered = 0.0  # when the first final answer was complete
        self.timed_out = False
        self.send_error = ""
        self.started = time.monotonic()
        self.ended = 0.0

    @property
    def final(self) -> list[WireResponse]:
        return [r for r in self.responses if not r.interim]

    def feed(self, data: bytes) -> None:
        self.buffer += data
        self._parse()

    def close(self, reset: bool = False) -> None:
        self.eof, self.reset = True, reset
        self._parse()

    def _parse(self) -> None:
        while self.malformed is None:
            final = self.final
            if final and final[-1].closes and self.buffer:
                self.malformed = f"bytes after a response that said connection: close: {self.buffer[:80]!r}"
                return
            try:
                response, used = take_response(self.buffer, self.eof, self.case.head_only and not final)
            except Malformed as error:
                self.malformed = str(error)
                return
            if response is None:
                return
            self.responses.append(response)
            self.buffer = self.buffer[used:]
            if not response.interim and not self.answered:
                self.answered = time.monotonic()

    def settled(self) -> bool:
        if self.malformed or self.eof:
            return True
        final = self.final
        if self.case.kind in (COMPLETE, EITHER):
            return len(final) >= self.case.answers and not final[-1].closes
        return False  # incomplete and pipelined ones wait for the gateway to close


@dataclass
class Failure:
    cause: str
    case: Case
    detail: str


def error_shape_problem(response: WireResponse) -> str | None:
    if not (response.header("content-type") or "").startswith("application/json"):
        return f"content-type {response.header('content-type')!r}"
    try:
        body = json.loads(response.body)
    except ValueError:
        return "the body is not JSON"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return "not {error: {message, type, param, code}}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message or type not a string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return "param neither null nor a string"
    if ERROR_CODE_IS_A_STRING and not isinstance(error["code"], str):
        return f"error.code is {error['code']!r}, not a string"
    return None


def judge(conversation: Conversation, liveness: float, close_bound: float) -> list[Failure]:
    """What is wrong with one case's conversation: `liveness` is the bound for a complete request's answer (or
    close), `close_bound` for the close of an incomplete or uncertain one; the connection was left by then."""
    case = conversation.case
    failures = []

    def fail(cause: str, detail: str = "") -> None:
        failures.append(Failure(cause, case, detail))

    final = conversation.final
    got = "; ".join(r.summary() for r in conversation.responses) or "nothing"
    if conversation.send_error:
        got += f" ({conversation.send_error})"
    if conversation.malformed:
        fail("malformed response", conversation.malformed)
    for response in conversation.responses:
        if response.status >= 500:
            source = "relayed from the simulator" if response.from_simulator else "from the gateway"
            fail(f"{response.status} {source}", response.summary())
        elif response.status >= 400 and not response.from_simulator and not case.head_only:
            problem = error_shape_problem(response)
            if problem:
                fail(f"gateway {response.status} not in OpenAI's error shape: {problem}", response.summary())
    if case.expect:
        statuses = tuple(r.status for r in final[: len(case.expect)])
        if statuses != case.expect:
            fail(
                f"control {case.category}: answers {statuses}, expected {case.expect}",
                f"got {got}{', then EOF' if conversation.eof else ''}",
            )
    waited = f"{(conversation.ended or time.monotonic()) - conversation.started:.1f} s"
    if conversation.timed_out:
        if case.kind == COMPLETE:
            if len(final) < case.answers:
                fail(f"complete request: no answer nor close within {liveness:g} s", f"got {got}")
            else:
                fail("said connection: close but kept the connection open", f"got {got}")
        elif case.kind == EITHER:
            fail(f"left hanging: no answer nor close within {close_bound:g} s", f"got {got}")
        elif case.kind == INCOMPLETE:
            fail(
                f"incomplete request: connection not closed within {close_bound:g} s"
                + (" (after an answer)" if final else ""),
                f"got {got}",
            )
        else:
            fail(f"junk after a complete request: connection not closed within {liveness:g} s", f"got {got}")
    if case.kind == PIPELINED and conversation.eof and not conversation.malformed:
        if not final:
            fail(
                "lost answer: a complete request followed by junk got no answer before EOF",
                f"{'reset' if conversation.reset else 'EOF'} after {waited}",
            )
        elif not final[0].closes and (len(final) < 2 or final[1].status != 400):
            fail("junk after an answered request got no 400 before EOF", f"got {got}")
    return failures


def report(failures: list[Failure], lines: list[str], seed: int, shown: int) -> str:
    """`lines`, then the failures grouped by cause, then the first `shown` in full (with how to rebuild them)."""
    by_cause: dict[str, list[Failure]] = collections.defaultdict(list)
    for failure in failures:
        by_cause[failure.cause].append(failure)
    out = [*lines, f"failures by cause ({len(failures)} in all, {len({f.case.index for f in failures})} cases):"]
    for cause, group in sorted(by_cause.items(), key=lambda item: -len(item[1])):
        categories = collections.Counter(f.case.category for f in group)
        example = group[0]
        indexes = sorted({f.case.index for f in group if f.case.index >= 0})
        out.append(f"  {len(group):5d}  {cause}")
        out.append(f"         in {dict(categories.most_common(6))}")
        if indexes:
            out.append(f"         cases {', '.join(map(str, indexes[:12]))}{', ...' if len(indexes) > 12 else ''}")
        out.append(f"         e.g. case {example.case.index} ({example.case.note[:120]}): {example.detail[:200]}")
    out.append(f"first {min(shown, len(failures))} failures (FUZZ_SEED={seed} FUZZ_ONLY=<index>,... rebuilds cases):")
    for failure in sorted(failures, key=lambda f: f.case.index)[:shown]:
        case = failure.case
        out.append(f"  case {case.index} [{case.category}, {case.kind}] {failure.cause}")
        out.append(f"      {case.note[:160]}")
        out.append(f"      sent {len(case.raw)} bytes: {case.raw[:240]!r}{'...' if len(case.raw) > 240 else ''}")
        out.append(f"      {failure.detail[:240]}")
    return "\n".join(out)
