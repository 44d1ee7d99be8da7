"""Small helpers shared by the benchmark scripts (imported from the same directory)."""

from __future__ import annotations


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    """``x`` formatted with ``spec``, or ``none`` for a missing value."""
    return none if x is None else format(x, spec)


def ok(row: dict | None) -> dict | None:
    """A result row, or None when it is missing or records an error."""
    return row if row and "error" not in row else None


def ratio(a: dict | None, b: dict | None, key: str = "median_ms") -> float | None:
    """``a[key] / b[key]`` for two valid rows, else None."""
    a, b = ok(a), ok(b)
    return None if a is None or b is None else a[key] / b[key]


def reset_peak_rss() -> bool:
    """Reset the peak-RSS counter to the current RSS (Linux >= 4.0). False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
