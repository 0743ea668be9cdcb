"""`python -m vllm_simulator ...` runs the simulator's command line (cli.py)."""

from vllm_simulator.cli import main

if __name__ == "__main__":
    main()
