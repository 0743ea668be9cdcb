"""The targets a benchmark prints last: each figure against its bound, PASS or FAIL."""

from __future__ import annotations

Check = tuple[str, float, str, float, str]  # label, value, "<=" or ">=", bound, unit


def print_targets(checks: list[Check]) -> int:
    """Print the checks; 1 when any failed (the script's exit status), else 0."""
    print("\nTargets")
    failed = 0
    for label, value, op, target, unit in checks:
        ok = value <= target if op == "<=" else value >= target
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {label:<72} {value:.3f} {unit}  target {op} {target:.3f} {unit}")
    return 1 if failed else 0
