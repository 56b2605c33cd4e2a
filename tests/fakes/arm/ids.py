"""ARM resource ids and request paths: parsing and formatting, case-insensitively as ARM does."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArmPath:
    """A parsed ARM path: `/subscriptions/S[/resourceGroups/G[/providers/NS/T1/N1[/T2/N2..]]]`.

    `types` and `names` pair up; one extra trailing segment (a collection or an action) is
    kept in `tail`, because only the resource-type registry knows which of the two it is.
    """

    subscription: str
    resource_group: str | None = None
    namespace: str | None = None
    types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    tail: tuple[str, ...] = field(default_factory=tuple)

    @property
    def type_key(self) -> str:
        """Lower-case `namespace/type[/child]` used to look up the handler."""
        return "/".join([(self.namespace or "").lower(), *(t.lower() for t in self.types)])

    @property
    def name(self) -> str:
        return self.names[-1]

    def resource_id(self) -> str:
        return format_id(
            self.subscription, self.resource_group, self.namespace, self.types, self.names
        )


def format_id(
    subscription: str,
    resource_group: str | None,
    namespace: str | None = None,
    types: tuple[str, ...] | list[str] = (),
    names: tuple[str, ...] | list[str] = (),
) -> str:
    """The canonical id: `/subscriptions/S/resourceGroups/G/providers/NS/T/N[/T2/N2]`."""
    out = f"/subscriptions/{subscription}"
    if resource_group is not None:
        out += f"/resourceGroups/{resource_group}"
    if namespace:
        out += f"/providers/{namespace}"
        for t, n in zip(types, names, strict=False):
            out += f"/{t}/{n}"
    return out


def split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def parse_path(path: str) -> ArmPath | None:
    """Parse a request path or a resource id; None when it is not subscription-scoped."""
    seg = split(path)
    if len(seg) < 2 or seg[0].lower() != "subscriptions":
        return None
    sub = seg[1]
    rest = seg[2:]
    rg: str | None = None
    if len(rest) >= 2 and rest[0].lower() == "resourcegroups":
        rg = rest[1]
        rest = rest[2:]
    if len(rest) >= 2 and rest[0].lower() == "providers":
        ns = rest[1]
        rest = rest[2:]
        types: list[str] = []
        names: list[str] = []
        while len(rest) >= 2:
            types.append(rest[0])
            names.append(rest[1])
            rest = rest[2:]
        return ArmPath(sub, rg, ns, tuple(types), tuple(names), tuple(rest))
    return ArmPath(sub, rg, None, (), (), tuple(rest))


def same_id(a: str | None, b: str | None) -> bool:
    """ARM ids compare case-insensitively (trailing slashes ignored)."""
    if a is None or b is None:
        return False
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def key(resource_id: str) -> str:
    """Dictionary key of a resource id."""
    return resource_id.rstrip("/").lower()


def parent_id(resource_id: str) -> str:
    """The id one type/name pair up (a subnet's vnet, a version's image definition)."""
    seg = split(resource_id)
    return "/" + "/".join(seg[:-2])
