"""The build of the gateway that the suite's own processes import, chosen on import.

In scripts/test.sh's compiled phase (GATEWAY_COMPILED=1) that is the compiled build, chosen as
vllm_api_server.py chooses it (its folder first on sys.path); else the sources. tests/conftest.py imports
this first, and so does the fork server that the tests' gateways are forked from (tests/support/forked.py),
before it imports the gateway.
"""

import os

if os.environ.get("GATEWAY_COMPILED") == "1":
    from vllm_api_server import choose_build

    choose_build()
