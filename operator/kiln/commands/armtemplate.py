"""The ARM template language, as far as reading an AIB template needs it.

Files are JSON with comments. A string that starts with `[` and ends with `]` is an
expression (`[[` at the start of such a string is a literal `[`); anything else, such
as the PowerShell line `[Net.ServicePointManager]::SecurityProtocol = ...`, is text.
Expressions are tokenized, parsed by recursive descent into a small tree and evaluated
against the template's parameters and variables and the deployment's scope. What only
Azure can compute at deployment (reference(), uniqueString(), ...) is an error that
says so, never a guess.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


class ArmError(Exception):
    """What cannot be read or evaluated, said in the template's terms."""


TOO_DEEP = "nests deeper than kiln import follows; flatten it"


# --- JSON with comments -----------------------------------------------------------------

_JSON_SCAN = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/|/\*', re.S)


def load_jsonc(text: str) -> Any:
    """JSON that may hold // and /* */ comments (ARM accepts both); errors say where."""
    text = text.removeprefix("\ufeff")

    def blank(match: re.Match[str]) -> str:
        found = match.group(0)
        if found.startswith('"'):
            return found
        if found == "/*":
            raise ArmError(f"{_position(text, match.start())}: the /* comment is never closed")
        return re.sub(r"[^\n]", " ", found)  # keeps every line and column where it was

    try:
        return json.loads(_JSON_SCAN.sub(blank, text), strict=False)
    except json.JSONDecodeError as error:
        raise ArmError(f"{_position(text, error.pos)}: not JSON: {error.msg}") from None
    except RecursionError:
        raise ArmError(TOO_DEEP) from None


def _position(text: str, offset: int) -> str:
    line = text.count("\n", 0, offset) + 1
    return f"line {line}, column {offset - text.rfind(chr(10), 0, offset)}"


# --- expressions: tokens and tree ----------------------------------------------------------

_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)"
    r"|(?P<name>[A-Za-z_$][\w$]*)|(?P<punct>[().,\[\]])"
)


@dataclass(frozen=True)
class Token:
    kind: str  # string, number, name, punct or end
    text: str
    at: int  # character offset in the expression, for messages


@dataclass(frozen=True)
class Literal:
    value: str | int


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True)
class Member:
    target: Node
    name: str


@dataclass(frozen=True)
class Index:
    target: Node
    index: Node


Node = Literal | Call | Member | Index


def tokenize(text: str) -> Iterator[Token]:
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            what = "a string that is never closed" if text[at] == "'" else repr(text[at])
            raise ArmError(f"{what} at character {at + 1}")
        kind = match.lastgroup or ""
        if kind != "space":
            yield Token(kind, match.group(0), at)
        at = match.end()
    yield Token("end", "", len(text))


class _Parser:
    """expression := primary ('.' name | '[' expression ']')*
    primary := string | number | name ['.' name] '(' [expression (',' expression)*] ')'"""

    def __init__(self, text: str) -> None:
        self.tokens = list(tokenize(text))
        self.at = 0

    def parse(self) -> Node:
        node = self.expression()
        self.expect("end")
        return node

    def expression(self) -> Node:
        node = self.primary()
        while True:
            if self.accept("."):
                node = Member(node, self.expect("name").text)
            elif self.accept("["):
                node = Index(node, self.expression())
                self.expect("]")
            else:
                return node

    def primary(self) -> Node:
        token = self.next()
        if token.kind == "string":
            return Literal(token.text[1:-1].replace("''", "'"))
        if token.kind == "number":
            return Literal(int(token.text))
        if token.kind != "name":
            raise self.unexpected(token, "a function, string or number")
        name = token.text
        if self.peek().text == "." and self.peek(1).kind == "name" and self.peek(2).text == "(":
            self.next()
            name += "." + self.next().text  # a user-defined function: namespace.name
        self.expect("(")
        args: list[Node] = []
        if not self.accept(")"):
            args.append(self.expression())
            while self.accept(","):
                args.append(self.expression())
            self.expect(")")
        return Call(name, tuple(args))

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def next(self) -> Token:
        token = self.peek()
        self.at += 1
        return token

    def accept(self, text: str) -> bool:
        if self.peek().kind == "punct" and self.peek().text == text:
            self.at += 1
            return True
        return False

    def expect(self, wanted: str) -> Token:
        token = self.peek()
        if token.kind == wanted or (token.kind == "punct" and token.text == wanted):
            self.at += 1
            return token
        raise self.unexpected(token, "the end" if wanted == "end" else repr(wanted))

    @staticmethod
    def unexpected(token: Token, wanted: str) -> ArmError:
        found = "the end" if token.kind == "end" else repr(token.text)
        return ArmError(f"expected {wanted} at character {token.at + 1}, found {found}")


def parse(text: str) -> Node:
    """The tree of one expression (the text between the outer brackets)."""
    return _Parser(text).parse()


def is_expression(value: str) -> bool:
    return len(value) >= 2 and value[0] == "[" and value[-1] == "]" and value[1] != "["


def literal(value: str) -> str:
    """A string that is not an expression as ARM reads it: `[[x]` is `[x]`."""
    return value[1:] if value.startswith("[[") and value.endswith("]") else value


# --- values ----------------------------------------------------------------------------------


class DeploymentScope(BaseModel):
    """Where the template is deployed: what resourceGroup() and subscription() return."""

    subscription_id: str | None = None
    resource_group: str | None = None
    location: str | None = None

    def over(self, defaults: DeploymentScope) -> DeploymentScope:
        """These values, and the defaults' where these have none."""
        return DeploymentScope.model_validate(
            defaults.model_dump() | self.model_dump(exclude_none=True)
        )


_SCOPE_FIXES = {
    "subscription_id": "--subscription-id (or set the operator default KILN_SUBSCRIPTION_ID)",
    "resource_group": "--resource-group (or set the operator default KILN_RESOURCE_GROUP)",
    "location": "--location (or set the operator default KILN_LOCATION)",
}
# Values only Azure Resource Manager knows, during a deployment.
_DEPLOYMENT_ONLY = {
    "reference", "list", "listkeys", "listsecrets", "listaccountsas", "listservicesas",
    "uniquestring", "guid", "newguid", "utcnow", "deployment", "environment", "copyindex",
    "managementgroup", "tenant", "pickzones", "providers", "extensionresourceid",
}  # fmt: skip


@dataclass(frozen=True)
class _Unknown:
    """A scope value no flag or default gives: an error once something uses it."""

    what: str
    field: str

    def error(self) -> ArmError:
        return ArmError(f"{self.what} has no value; give {_SCOPE_FIXES[self.field]}")


def _known(value: Any) -> Any:
    """The value, checked to hold no unknown scope value."""
    if isinstance(value, _Unknown):
        raise value.error()
    children = value.values() if isinstance(value, dict) else value
    for item in children if isinstance(value, dict | list) else ():
        _known(item)
    return value


class Template:
    """An ARM template's parameters and variables, evaluated when an expression uses them."""

    def __init__(
        self, document: Mapping[str, Any], given: Mapping[str, Any], scope: DeploymentScope
    ) -> None:
        declared = document.get("parameters") or {}
        self._declared = {name.lower(): value for name, value in declared.items()}
        self._given = {name.lower(): value for name, value in given.items()}
        self._variables = {k.lower(): v for k, v in (document.get("variables") or {}).items()}
        self.undeclared = [name for name in given if name.lower() not in self._declared]
        self.scope = scope
        self._done: dict[tuple[str, str], Any] = {}
        self._busy: set[tuple[str, str]] = set()
        self._scoped: dict[str, Callable[..., Any]] = {
            "parameters": self._parameter,
            "variables": self._variable,
            "resourcegroup": self._resource_group,
            "subscription": self._subscription,
            "resourceid": self._resource_id,
        }

    def resolve(
        self, value: Any, path: str = "", problems: list[tuple[str, str]] | None = None
    ) -> Any:
        """The value with its expressions (keys too) evaluated and nulls dropped. With
        problems, what fails is recorded there as (path, message) and left out; else raised."""
        try:
            if isinstance(value, str):
                return _without_nulls(self.evaluate(value))
        except ArmError as error:
            if problems is None:
                raise
            problems.append((path, f"{value}: {error}"))
            return None
        if isinstance(value, list):
            items = (self.resolve(v, f"{path}[{i}]", problems) for i, v in enumerate(value))
            return [item for item in items if item is not None]
        if isinstance(value, dict):
            resolved = {}
            for key, item in value.items():
                name = self.resolve(key, path, problems)
                if name is None:
                    continue
                if not isinstance(name, str):
                    name = _text(name)
                item = self.resolve(item, _join(path, name), problems)
                if item is not None:
                    resolved[name] = item
            return resolved
        return value

    def evaluate(self, value: str) -> Any:
        if not is_expression(value):
            return literal(value)
        try:
            return _known(self._eval(parse(value[1:-1])))
        except RecursionError:
            raise ArmError(TOO_DEEP) from None

    def _eval(self, node: Node) -> Any:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Member):
            return _member(self._eval(node.target), node.name)
        if isinstance(node, Index):
            return _index(self._eval(node.target), _known(self._eval(node.index)))
        return self._call(node)

    def _call(self, call: Call) -> Any:
        name = call.name.lower()
        if name == "if":  # only the branch the condition picks is evaluated, as in ARM
            if len(call.args) != 3:
                raise ArmError("if() takes a condition, a true value and a false value")
            condition = _known(self._eval(call.args[0]))
            if not isinstance(condition, bool):
                raise ArmError(f"if() needs a bool condition, not {_kind(condition)}")
            return self._eval(call.args[1 if condition else 2])
        if "." in name:
            raise ArmError(f"{call.name}() is a user-defined function; put its value in its place")
        if name in _DEPLOYMENT_ONLY:
            raise ArmError(
                f"{call.name}() has a value only in an Azure deployment; "
                "put that value in its place"
            )
        function = self._scoped.get(name) or FUNCTIONS.get(name)
        if function is None:
            raise ArmError(
                f"{call.name}() is not an ARM function kiln import evaluates; "
                "put its value in its place"
            )
        args = [_known(self._eval(arg)) for arg in call.args]
        try:
            inspect.signature(function).bind(*args)
        except TypeError:
            raise ArmError(f"{call.name}() does not take {len(args)} argument(s)") from None
        return function(*args)

    def _parameter(self, name: Any) -> Any:
        key = _string(name, "parameters").lower()
        if key not in self._declared:
            raise ArmError(f"the template declares no parameter '{name}'")
        if key in self._given:
            return self._given[key]  # values from a parameters file are never expressions
        declared = self._declared[key]
        if not isinstance(declared, dict) or "defaultValue" not in declared:
            raise ArmError(f"parameter '{name}' has no value; give it with --parameters FILE")
        return self._once("parameter", key, declared["defaultValue"])

    def _variable(self, name: Any) -> Any:
        key = _string(name, "variables").lower()
        if key not in self._variables:
            raise ArmError(f"the template declares no variable '{name}'")
        return self._once("variable", key, self._variables[key])

    def _once(self, kind: str, key: str, raw: Any) -> Any:
        if (kind, key) in self._done:
            return self._done[kind, key]
        if (kind, key) in self._busy:
            raise ArmError(f"{kind} '{key}' refers to itself")
        self._busy.add((kind, key))
        try:
            value = self.resolve(raw)
        except ArmError as error:
            raise ArmError(f"in {kind} '{key}': {error}") from None
        finally:
            self._busy.discard((kind, key))
        self._done[kind, key] = value
        return value

    def _scope_value(self, field: str, what: str) -> Any:
        return getattr(self.scope, field) or _Unknown(what, field)

    def _require(self, field: str, what: str) -> str:
        return _known(self._scope_value(field, what))

    def _resource_group(self) -> dict[str, Any]:
        subscription = self.scope.subscription_id
        group = self.scope.resource_group
        return {
            "id": f"/subscriptions/{subscription}/resourceGroups/{group}"
            if subscription and group
            else _Unknown("resourceGroup().id", "subscription_id" if group else "resource_group"),
            "name": self._scope_value("resource_group", "resourceGroup().name"),
            "type": "Microsoft.Resources/resourceGroups",
            "location": self._scope_value("location", "resourceGroup().location"),
        }

    def _subscription(self) -> dict[str, Any]:
        subscription = self._scope_value("subscription_id", "subscription().subscriptionId")
        return {
            "id": f"/subscriptions/{subscription}"
            if isinstance(subscription, str)
            else _Unknown("subscription().id", "subscription_id"),
            "subscriptionId": subscription,
        }

    def _resource_id(self, *segments: Any) -> str:
        """resourceId([subscriptionId], [resourceGroupName], type, name, ...)."""
        texts = [_string(segment, "resourceId") for segment in segments]
        at = next((i for i, text in enumerate(texts) if "/" in text), None)
        if at is None or at > 2:
            raise ArmError("resourceId() needs a resource type such as 'Microsoft.Compute/images'")
        namespace, *kinds = texts[at].split("/")
        names = texts[at + 1 :]
        if len(names) != len(kinds):
            raise ArmError(
                f"resourceId(): {texts[at]} takes {len(kinds)} name(s), not {len(names)}"
            )
        subscription = (
            texts[0]
            if at == 2
            else self._require("subscription_id", "subscription().subscriptionId")
        )
        group = texts[at - 1] if at else self._require("resource_group", "resourceGroup().name")
        path = "/".join(f"{kind}/{name}" for kind, name in zip(kinds, names, strict=True))
        return f"/subscriptions/{subscription}/resourceGroups/{group}/providers/{namespace}/{path}"


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value if item is not None]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _member(target: Any, name: str) -> Any:
    if not isinstance(target, dict):
        raise ArmError(f"'.{name}' needs an object, not {_kind(target)}")
    for key, value in target.items():
        if key.lower() == name.lower():  # ARM property names ignore case
            return _known(value)
    raise ArmError(f"the object has no property '{name}'")


def _index(target: Any, index: Any) -> Any:
    if isinstance(target, list) and isinstance(index, int) and not isinstance(index, bool):
        if not 0 <= index < len(target):
            raise ArmError(f"index {index} is outside the array of {len(target)}")
        return target[index]
    if isinstance(target, dict) and isinstance(index, str):
        return _member(target, index)
    raise ArmError(f"cannot index {_kind(target)} with {_kind(index)}")


# --- functions ---------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    kinds = {bool: "a bool", int: "an int", str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), "null")


def _string(value: Any, function: str) -> str:
    if not isinstance(value, str):
        raise ArmError(f"{function}() needs a string, not {_kind(value)}")
    return value


def _text(value: Any) -> str:
    """A value as string() prints it: bools as True/False, arrays and objects as JSON."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else str(value)


def _concat(*values: Any) -> Any:
    if not values:
        raise ArmError("concat() needs at least one argument")
    if all(isinstance(value, list) for value in values):
        return [item for value in values for item in value]
    if any(isinstance(value, list | dict) for value in values):
        raise ArmError("concat() joins either strings or arrays")
    return "".join(_text(value) for value in values)


_FORMAT_ITEM = re.compile(r"\{\{|\}\}|\{(\d+)\}|\{[^}]*\}?|\}")


def _format(template: Any, *values: Any) -> str:
    """.NET composite formatting as ARM's format() does it: {0}, {1}; {{ and }} escape."""

    def item(match: re.Match[str]) -> str:
        found = match.group(0)
        if found in ("{{", "}}"):
            return found[0]
        if match.group(1) is None:
            raise ArmError(
                f"format(): {found!r} is not a format item kiln import knows; use "
                "{0}, {1}, ... and write {{ or }} for a brace"
            )
        position = int(match.group(1))
        if position >= len(values):
            raise ArmError(f"format(): {found} has no argument")
        return _text(values[position])

    return _FORMAT_ITEM.sub(item, _string(template, "format"))


def _bool(value: Any, function: str) -> bool:
    if not isinstance(value, bool):
        raise ArmError(f"{function}() needs a bool, not {_kind(value)}")
    return value


def _to_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ArmError(f"int() cannot convert {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int):
        return value != 0
    raise ArmError(f"bool() cannot convert {value!r}")


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, str):
        return _text(item) in container
    if isinstance(container, dict):
        return _string(item, "contains").lower() in (key.lower() for key in container)
    if isinstance(container, list):
        return item in container
    raise ArmError(f"contains() needs a string, array or object, not {_kind(container)}")


def _create_object(*pairs: Any) -> dict[str, Any]:
    if len(pairs) % 2:
        raise ArmError("createObject() takes names and values in pairs")
    return {_string(pairs[i], "createObject"): pairs[i + 1] for i in range(0, len(pairs), 2)}


def _json(value: Any) -> Any:
    try:
        return json.loads(_string(value, "json"))
    except json.JSONDecodeError as error:
        raise ArmError(f"json(): {error}") from None


def _length(value: Any) -> int:
    if not isinstance(value, str | list | dict):
        raise ArmError(f"length() needs a string, array or object, not {_kind(value)}")
    return len(value)


def _substring(value: Any, start: Any, length: Any = None) -> str:
    text = _string(value, "substring")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (start, length or 0)):
        raise ArmError("substring() needs an int start and length")
    end = len(text) if length is None else start + length
    if not 0 <= start <= end <= len(text):
        raise ArmError(f"substring(): {start} and {length} do not fit {text!r}")
    return text[start:end]


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str | list | dict):
        raise ArmError(f"empty() needs a string, array or object, not {_kind(value)}")
    return not value


def _end(value: Any, function: str, last: bool) -> Any:
    if not isinstance(value, str | list):
        raise ArmError(f"{function}() needs a string or array, not {_kind(value)}")
    if not value:
        return "" if isinstance(value, str) else None
    return value[-1 if last else 0]


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "concat": _concat,
    "format": _format,
    "tolower": lambda value: _string(value, "toLower").lower(),
    "toupper": lambda value: _string(value, "toUpper").upper(),
    "string": _text,
    "replace": lambda value, old, new: _string(value, "replace").replace(
        _string(old, "replace"), _string(new, "replace")
    ),
    "trim": lambda value: _string(value, "trim").strip(),
    "split": lambda value, delimiter: _string(value, "split").split(_string(delimiter, "split")),
    "substring": _substring,
    "startswith": lambda value, prefix: (
        _string(value, "startsWith").lower().startswith(_string(prefix, "startsWith").lower())
    ),
    "endswith": lambda value, suffix: (
        _string(value, "endsWith").lower().endswith(_string(suffix, "endsWith").lower())
    ),
    "contains": _contains,
    "length": _length,
    "empty": _empty,
    "first": lambda value: _end(value, "first", last=False),
    "last": lambda value: _end(value, "last", last=True),
    "equals": lambda left, right: type(left) is type(right) and left == right,
    "not": lambda value: not _bool(value, "not"),
    "and": lambda first, *more: all([_bool(v, "and") for v in (first, *more)]),
    "or": lambda first, *more: any([_bool(v, "or") for v in (first, *more)]),
    "coalesce": lambda *values: next((v for v in values if v is not None), None),
    "createarray": lambda *values: list(values),
    "createobject": _create_object,
    "json": _json,
    "int": _to_int,
    "bool": _to_bool,
    "true": lambda: True,
    "false": lambda: False,
    "null": lambda: None,
}
