"""Shared pydantic configuration for every object that crosses the Kubernetes boundary."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


class CelRule(BaseModel):
    """One CRD validation rule (x-kubernetes-validations), so the API server refuses a bad
    object at `kubectl apply` instead of Kiln finding it later. `rule` is CEL over `self`,
    the object the rule is declared on; `field_path` is where the error points."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None

    def wire(self) -> dict[str, str]:
        return self.model_dump(by_alias=True, exclude_none=True)


class KubeModel(BaseModel):
    """A model whose wire names are camelCase, as Kubernetes and AIB spell them.

    Unknown fields are errors: a typo in a manifest must be reported, not ignored.
    `cel_rules` (collected along the class hierarchy) become the CRD's validation rules
    for this object; the operator checks the same rules in api/validation.py.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        inherited = (vars(klass).get("cel_rules", ()) for klass in reversed(cls.__mro__))
        rules = [rule for declared in inherited for rule in declared]
        if rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [rule.wire() for rule in dict.fromkeys(rules)]
        return schema

    def wire(self) -> dict[str, Any]:
        """The JSON-ready form with wire names and no unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
