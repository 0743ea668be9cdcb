"""The fleet's rules: model config checks, memory fractions, CPU placement and each server's command.

The bash scripts (scripts/lib.sh) evaluate vllm_model_configs.sh and control the processes; for the
rules they run this package with the machine's plain python3 (`python3 vllm_fleet COMMAND`, see
cli.py), often before any virtualenv exists: it uses the standard library only and never imports
vllm_gateway.
"""
