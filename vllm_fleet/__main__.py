"""`python3 -m vllm_fleet COMMAND`, or `python3 path/to/vllm_fleet COMMAND` as lib.sh runs it."""

import os
import sys

if not __package__:
    # Run as a directory, sys.path[0] is the package itself: import it from the directory above
    # instead, so that neither the working directory nor PYTHONPATH picks another vllm_fleet.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vllm_fleet.cli import main

sys.exit(main())
