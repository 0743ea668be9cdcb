"""The gateway's HTTP/1.1 server, run by uvicorn in place of its own protocol: bytes to requests
(reader), one request and its response (exchange), the connection's lifetime (protocol), its flow
control and clocks (flow, timers), what the app hands it (hooks), FastAPI behind it (asgi_bridge),
the event loop that accepts in batches and the open-files limit (event_loop, file_limits), and the
same front on a second port (listener). It knows nothing of models, keys' limits or the relay: the
app's hooks decide those."""
