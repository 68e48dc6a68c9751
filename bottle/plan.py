"""The base plan every backend's plan extends: a frozen record of what `prepare` decided."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class BottlePlan(BaseModel):
    """What a backend's `prepare` decided for one bottle; stored as JSON in the bottle's state directory.

    Subclasses add their own fields and stay frozen and `extra="forbid"`, so a plan read back from disk
    is exactly the plan that was written, and a plan from a newer bottle fails loudly instead of silently
    losing fields.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    backend: str
    name: str
    slug: str
