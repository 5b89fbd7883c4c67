"""One measured number, its target, and the table the runner prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Result", "markdown_table"]


@dataclass(frozen=True)
class Result:
    """A measurement.  ``limit`` is the target's bound (``value <= limit`` or ``value < limit``
    when ``strict``); None when the issue sets no target for this number."""

    bench: str
    metric: str
    value: float
    unit: str
    limit: float | None = None
    strict: bool = False
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.limit is None:
            return None
        return self.value < self.limit if self.strict else self.value <= self.limit

    def target_text(self) -> str:
        if self.limit is None:
            return ""
        return f"{'<' if self.strict else '<='} {_fmt(self.limit)} {self.unit}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(results: Sequence[Result]) -> str:
    rows = ["| benchmark | metric | value | target | met | note |", "|---|---|---|---|---|---|"]
    for r in results:
        met = "" if r.met is None else ("yes" if r.met else "**NO**")
        rows.append(f"| {r.bench} | {r.metric} | {_fmt(r.value)} {r.unit} | {r.target_text()} | {met} | {r.note} |")
    return "\n".join(rows)
