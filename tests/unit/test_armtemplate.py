"""The ARM template language kiln import reads: JSON with comments, expressions, functions."""

from __future__ import annotations

from typing import Any

import pytest

from kiln.commands.armtemplate import (
    ArmError,
    Call,
    DeploymentScope,
    Index,
    Literal,
    Member,
    Template,
    is_expression,
    load_jsonc,
    parse,
)

SUB = "7d1e2f3a-0000-4000-8000-00000000abcd"
SCOPE = DeploymentScope(subscription_id=SUB, resource_group="images", location="westeurope")
DOCUMENT = {
    "parameters": {
        "name": {"type": "string", "defaultValue": "Web_Image"},
        "count": {"type": "int", "defaultValue": 3},
        "region": {"type": "string", "defaultValue": "[resourceGroup().location]"},
        "flags": {"type": "object", "defaultValue": {"Enabled": True, "tags": ["a", "b"]}},
        "required": {"type": "string"},
    },
    "variables": {
        "prefix": "[toLower(parameters('name'))]",
        "full": "[concat(variables('prefix'), '-', parameters('region'))]",
        "nested": {"list": ["[variables('prefix')]", "[[literal]"]},
        "loop": "[variables('loop')]",
    },
}


def evaluate(text: str, scope: DeploymentScope = SCOPE, given: dict[str, Any] | None = None) -> Any:
    return Template(DOCUMENT, given or {}, scope).evaluate(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # parameters and variables, defaults holding expressions, case-insensitive names
        ("[parameters('name')]", "Web_Image"),
        ("[PARAMETERS('NAME')]", "Web_Image"),
        ("[parameters('region')]", "westeurope"),
        ("[variables('full')]", "web_image-westeurope"),
        ("[variables('nested').list]", ["web_image", "[literal]"]),
        ("[parameters('flags').enabled]", True),
        ("[parameters('flags')['tags'][1]]", "b"),
        # the scope
        ("[resourceGroup().name]", "images"),
        ("[resourceGroup().location]", "westeurope"),
        ("[resourceGroup().id]", f"/subscriptions/{SUB}/resourceGroups/images"),
        ("[subscription().subscriptionId]", SUB),
        ("[subscription().id]", f"/subscriptions/{SUB}"),
        # resourceId in its three forms
        (
            "[resourceId('Microsoft.Compute/images', 'web')]",
            f"/subscriptions/{SUB}/resourceGroups/images/providers/Microsoft.Compute/images/web",
        ),
        (
            "[resourceId('other', 'Microsoft.Compute/galleries/images', 'g', 'def')]",
            f"/subscriptions/{SUB}/resourceGroups/other/providers/Microsoft.Compute/"
            "galleries/g/images/def",
        ),
        (
            "[resourceId('s2', 'rg2', 'Microsoft.ManagedIdentity/userAssignedIdentities', 'id')]",
            "/subscriptions/s2/resourceGroups/rg2/providers/Microsoft.ManagedIdentity/"
            "userAssignedIdentities/id",
        ),
        # string functions
        ("[concat('a', 'b', 1, true())]", "ab1True"),
        ("[concat(createArray(1, 2), createArray(3))]", [1, 2, 3]),
        ("[format('{0}-{1}-{0}', 'x', 2)]", "x-2-x"),
        ("[format('{{literal}} {0}', 'y')]", "{literal} y"),
        ("[toLower('MiXed')]", "mixed"),
        ("[toUpper('MiXed')]", "MIXED"),
        ("[string(5)]", "5"),
        ("[string(false())]", "False"),
        ("[string(createObject('a', 1))]", '{"a":1}'),
        ("[string('text')]", "text"),
        ("[replace('a_b_c', '_', '-')]", "a-b-c"),
        ("[trim('  x ')]", "x"),
        ("[split('a,b', ',')]", ["a", "b"]),
        ("[substring('abcdef', 1, 3)]", "bcd"),
        ("[substring('abcdef', 4)]", "ef"),
        ("[startsWith('Windows11', 'windows')]", True),
        ("[endsWith('image.VHD', '.vhd')]", True),
        ("[contains('abc', 'b')]", True),
        ("[contains(createArray('a'), 'b')]", False),
        ("[contains(createObject('Key', 1), 'key')]", True),
        ("[length('abc')]", 3),
        ("[length(createArray(1, 2))]", 2),
        ("[first('abc')]", "a"),
        ("[last(createArray(1, 2))]", 2),
        # logic and conversions
        ("[if(equals(parameters('count'), 3), 'three', 'other')]", "three"),
        (
            "[if(false(), reference('never'), 'taken')]",
            "taken",
        ),  # the other branch is not evaluated
        ("[equals('a', 'A')]", False),
        ("[equals(1, '1')]", False),
        ("[not(empty(''))]", False),
        ("[empty(createArray())]", True),
        ("[empty(null())]", True),
        ("[and(true(), not(false()))]", True),
        ("[or(false(), false())]", False),
        ("[coalesce(null(), 'b')]", "b"),
        ("[json('{\"a\": [1]}').a[0]]", 1),
        ("[int('42')]", 42),
        ("[bool('TRUE')]", True),
        ("[bool(0)]", False),
        ("[null()]", None),
        ("[-1]", -1),
        ("[ concat ( 'spaced' , 'out' ) ]", "spacedout"),
        ("['it''s']", "it's"),
        # not expressions: ARM's rule is a string that starts with [ and ends with ]
        (
            "[System.Net.ServicePointManager]::SecurityProtocol = "
            "[System.Net.SecurityProtocolType]::Tls12",
            "[System.Net.ServicePointManager]::SecurityProtocol = "
            "[System.Net.SecurityProtocolType]::Tls12",
        ),
        ("[[literal]", "[literal]"),  # [[ escapes the [ of a string ending with ]
        ("[[ -f /x ]] && echo", "[[ -f /x ]] && echo"),  # no ] at the end: no escape either
        ("plain", "plain"),
        ("", ""),
    ],
)
def test_expressions_evaluate_as_in_arm(text: str, expected: Any) -> None:
    assert evaluate(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[parameters('required')]",
            "parameter 'required' has no value; give it with --parameters",
        ),
        ("[parameters('nope')]", "the template declares no parameter 'nope'"),
        ("[variables('nope')]", "the template declares no variable 'nope'"),
        ("[variables('loop')]", "variable 'loop' refers to itself"),
        ("[uniqueString(resourceGroup().id)]", "uniqueString() has a value only in an Azure"),
        ("[reference('x').outputs]", "reference() has a value only in an Azure deployment"),
        ("[my.helper('x')]", "my.helper() is a user-defined function"),
        ("[base64ToString('eA==')]", "base64ToString() is not an ARM function kiln import"),
        ("[concat('a', createArray(1))]", "concat() joins either strings or arrays"),
        ("[toLower(1)]", "toLower() needs a string, not an int"),
        ("[replace('a', 'b')]", "replace() does not take 2 argument(s)"),
        ("[format('{0:D2}', 1)]", "'{0:D2}' is not a format item"),
        ("[format('{1}', 'x')]", "format(): {1} has no argument"),
        ("[if('yes', 1, 2)]", "if() needs a bool condition, not a string"),
        ("[resourceId('images', 'x')]", "resourceId() needs a resource type"),
        ("[resourceId('Microsoft.Compute/images')]", "takes 1 name(s), not 0"),
        ("[createArray(1)[3]]", "index 3 is outside the array of 1"),
        ("[resourceGroup().tags]", "the object has no property 'tags'"),
        ("[parameters('name').x]", "'.x' needs an object, not a string"),
        ("[concat('a']", "expected ')' at character 11, found the end"),
        ("[concat('a') 'b']", "expected the end at character 13, found \"'b'\""),
        ("[concat('a]", "a string that is never closed at character 8"),
        ("[concat]", "expected '(' at character 7, found the end"),
        ("[]", "expected a function, string or number at character 1, found the end"),
        ("[a # b]", "'#' at character 3"),
    ],
)
def test_what_cannot_be_evaluated_says_why(text: str, message: str) -> None:
    with pytest.raises(ArmError) as error:
        evaluate(text)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("text", "fix"),
    [
        (
            "[resourceGroup().location]",
            "give --location (or set the operator default KILN_LOCATION)",
        ),
        ("[resourceGroup().name]", "give --resource-group"),
        ("[resourceGroup().id]", "give --resource-group"),
        ("[subscription().subscriptionId]", "give --subscription-id"),
        ("[resourceId('Microsoft.Compute/images', 'x')]", "give --subscription-id"),
        ("[string(resourceGroup())]", "has no value"),
    ],
)
def test_a_scope_value_nobody_gave_names_the_flag(text: str, fix: str) -> None:
    with pytest.raises(ArmError) as error:
        evaluate(text, DeploymentScope())
    assert fix in str(error.value)
    assert evaluate("[resourceGroup().type]", DeploymentScope()) == (
        "Microsoft.Resources/resourceGroups"  # what is known is still usable
    )


def test_given_parameters_win_and_are_not_expressions() -> None:
    given = {"Name": "[not an expression]"}
    assert evaluate("[parameters('name')]", given=given) == "[not an expression]"


def test_the_command_line_scope_goes_over_the_defaults() -> None:
    flags = DeploymentScope(location="eastus")
    defaults = DeploymentScope(location="westus", resource_group="rg")
    assert flags.over(defaults) == DeploymentScope(location="eastus", resource_group="rg")


def test_resolve_evaluates_keys_drops_nulls_and_records_problems_where_they_are() -> None:
    template = Template(DOCUMENT, {}, SCOPE)
    problems: list[tuple[str, str]] = []
    resolved = template.resolve(
        {
            "ids": {"[resourceId('Microsoft.Compute/images', 'x')]": {}},
            "gone": None,
            "maybe": "[if(true(), null(), 'x')]",
            "made": "[createObject('a', null(), 'b', createArray(null(), 1))]",
            "list": [None, "[parameters('count')]", "[parameters('required')]"],
            "bad": {"deep": "[toLower(1)]"},
        },
        "properties",
        problems,
    )
    image = f"/subscriptions/{SUB}/resourceGroups/images/providers/Microsoft.Compute/images/x"
    assert resolved == {"ids": {image: {}}, "made": {"b": [1]}, "list": [3], "bad": {}}
    assert [path for path, _ in problems] == ["properties.list[2]", "properties.bad.deep"]
    assert problems[1][1] == "[toLower(1)]: toLower() needs a string, not an int"
    with pytest.raises(ArmError):
        template.resolve({"bad": "[toLower(1)]"})


def test_the_parser_builds_a_tree() -> None:
    assert parse("resourceGroup().location") == Member(Call("resourceGroup", ()), "location")
    assert parse("variables('a')[0]") == Index(Call("variables", (Literal("a"),)), Literal(0))
    assert parse("ns.f(1, 'x')") == Call("ns.f", (Literal(1), Literal("x")))
    assert is_expression("[x()]") and not is_expression("[[x()]") and not is_expression("[x] y")


def test_json_with_comments_loads_and_strings_keep_what_looks_like_one() -> None:
    text = (
        '// head\n{\n  "a": 1, /* in */ "b": "http://x/*y*/",\n  /* multi\n line */ "c": [2]\n}\n'
    )
    assert load_jsonc("\ufeff" + text) == {"a": 1, "b": "http://x/*y*/", "c": [2]}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{\n  "a": 1,\n  "b": \n}', "line 4, column 1: not JSON: Expecting value"),
        ('{"a": 1 /* open', "line 1, column 9: the /* comment is never closed"),
        ('// only\n{"a": 1}}', "line 2, column 9: not JSON: Extra data"),
        ("<xml/>", "line 1, column 1: not JSON"),
        ('{\n  // c\n  "a": tru\n}', "line 3, column 8: not JSON: Expecting value"),
    ],
)
def test_what_is_not_json_is_named_by_line_and_column(text: str, where: str) -> None:
    with pytest.raises(ArmError) as error:
        load_jsonc(text)
    assert str(error.value).startswith(where)


def test_what_nests_too_deep_for_python_is_an_error_not_a_crash() -> None:
    with pytest.raises(ArmError, match="nests deeper than kiln import follows"):
        evaluate("[" + "concat(" * 5000 + "'a'" + ")" * 5000 + "]")
    with pytest.raises(ArmError, match="nests deeper than kiln import follows"):
        load_jsonc("[" * 100_000 + "]" * 100_000)
