#!/usr/bin/env python3
"""The vLLM API gateway: `python vllm_api_server.py [serve|models|keys ...] --help`.

Server settings (port 1024, concurrency 100, keep-alive 300 s, httptools, 20 requests/minute per key,
...) are declared in vllm_gateway/settings.py and set through GATEWAY_* environment variables.
"""

import sys

from vllm_gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
