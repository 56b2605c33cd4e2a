"""Figures: one printed line each (the ratio last, followed by ` x`), raw numbers in JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 1,000 values is the 990th smallest)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


class Goal(BaseModel):
    """A target the figure's ratio (or one of its values) must meet: value <= limit."""

    what: str = Field(description="What is compared, e.g. 'ratio' or 'p99 s'.")
    value: float
    limit: float

    @property
    def met(self) -> bool:
        return self.value <= self.limit

    def describe(self) -> str:
        if self.met:
            return f"goal {self.what} <= {self.limit:g} met"
        over = self.value - self.limit
        return (
            f"goal {self.what} <= {self.limit:g} missed by {over:.3g} "
            f"({over / self.limit:.0%} over)"
        )


class Figure(BaseModel):
    """One benchmark result: `name: parts, ratio x`, plus raw samples for the JSON file."""

    name: str
    parts: list[str] = Field(description="The middle of the line: 'kiln 84.1 s', ...")
    ratio: float | None = None
    goals: list[Goal] = Field(default_factory=list)
    raw: dict[str, Any] = Field(default_factory=dict)

    def line(self) -> str:
        body = ", ".join(self.parts)
        if self.ratio is not None:
            body += f", {self.ratio:.2f} x"
        return f"{self.name}: {body}"

    def goal_lines(self) -> list[str]:
        return [f"  {self.name}: {goal.describe()}" for goal in self.goals]


def seconds(label: str, value: float) -> str:
    return f"{label} {value:.1f} s"


def write_json(path: Path, figures: list[Figure], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": meta, "figures": [f.model_dump(mode="json") for f in figures]}
    path.write_text(json.dumps(doc, indent=2) + "\n")
