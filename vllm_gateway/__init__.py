"""An OpenAI-compatible gateway for a fleet of vLLM servers on one host.

The request path lives in `proxy.py`; everything else is configuration, state and admin around it.
"""

__version__ = "0.1.0"
