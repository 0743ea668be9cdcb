"""Everything that is not a relay goes to the FastAPI application through this small ASGI bridge:
one exchange becomes one ASGI `http` scope, its body one `http.request` message."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import GatewayError
from .exchange import ClientDisconnected, Exchange

Scope = dict[str, Any]


async def serve_asgi(
    app: Any,
    exchange: Exchange,
    server: tuple[str, int] | None,
    client: tuple[str, int] | None,
    scheme: str,
    app_state: dict[str, Any],
    log_rejection: Callable[[Exchange, int], None],
) -> None:
    """Run `app` for this exchange once its body has arrived; no complete response (an error) is
    answered by the connection."""
    try:
        body = await exchange.read_body()  # small (max_small_body), so the app is handed it whole
    except GatewayError as error:
        log_rejection(exchange, error.status)
        exchange.respond_error(error)
        return
    except ClientDisconnected:
        return
    state = app_state.copy()
    if exchange.key is not None:
        state["key"] = exchange.key  # checked when the head arrived (access.check_head)
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": exchange.http_version,
        "server": server,
        "client": client,
        "scheme": scheme,
        "method": exchange.method,
        "root_path": "",
        "path": exchange.path,
        "raw_path": exchange.raw_path,
        "query_string": exchange.query_string,
        "headers": exchange.headers,
        "state": state,
    }
    body_sent = False
    response: dict[str, Any] = {}
    loop = exchange.connection.loop

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        while not exchange.client_gone and not exchange.done:
            exchange.body_waiter = loop.create_future()
            await exchange.body_waiter
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if exchange.done:
            return
        if message["type"] == "http.response.start":
            response.update(message)
            return
        body, more = message.get("body", b""), message.get("more_body", False)
        headers = list(response.get("headers", []))
        if not exchange.head_sent:
            if more:
                exchange.start(response["status"], headers, body)
            else:
                exchange.respond(response["status"], headers, body)
        elif more:
            exchange.write(body)
            await exchange.drain()
        else:
            exchange.end(body)

    await app(scope, receive, send)
