"""Shared pydantic configuration for every object that crosses the Kubernetes boundary."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class KubeModel(BaseModel):
    """A model whose wire names are camelCase, as Kubernetes and AIB spell them.

    Unknown fields are errors: a typo in a manifest must be reported, not ignored.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready form with wire names and no unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
