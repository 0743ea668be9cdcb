"""The targets a benchmark prints last: each figure against its bound, PASS or FAIL."""

from __future__ import annotations

Check = tuple[str, float, str, float, str]  # label, value, "<=" or ">=", bound, unit


def passed(check: Check) -> bool:
    _, value, op, target, _ = check
    return value <= target if op == "<=" else value >= target


def checks_text(checks: list[Check], title: str = "Targets") -> str:
    lines = [title]
    if not checks:
        lines.append("  none measured: the run had none of the targets they compare")
    for check in checks:
        label, value, op, target, unit = check
        lines.append(
            f"  {'PASS' if passed(check) else 'FAIL'}  {label:<72} {value:.3f} {unit}  target {op} {target:.3f} {unit}"
        )
    return "\n".join(lines)


def print_targets(checks: list[Check], title: str = "Targets") -> int:
    """Print the checks; 1 when any failed (the script's exit status), else 0."""
    print("\n" + checks_text(checks, title))
    return 0 if all(passed(check) for check in checks) else 1
