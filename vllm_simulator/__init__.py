"""vLLM SIMULATOR: a stand-in for vLLM's OpenAI server with no model behind it, for tests, benchmarks
and GPU-less demos. A separate program from the gateway: `python -m vllm_simulator --help`.
"""
