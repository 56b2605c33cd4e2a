"""Azure's input rules (names, lengths, fields), as pure functions raising ArmError.

Each rule mirrors what the real resource provider rejects, with its error code and
message wording, so the Kiln provider is tested against the same refusals it will meet.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from .errors import ArmError, invalid_parameter, missing_parameter

_MISSING = object()


def get_path(body: Mapping[str, Any] | None, path: str, default: Any = None) -> Any:
    """`get_path(vm, "properties.hardwareProfile.vmSize")`; default when any step is absent."""
    cur: Any = body
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return default if cur is None else cur


def require(body: Mapping[str, Any], path: str, shown: str | None = None) -> Any:
    """A required property, else compute's "Required parameter 'x' is missing (null)."."""
    value = get_path(body, path, _MISSING)
    if value is _MISSING or value == "" or value == []:
        raise missing_parameter(shown or path.removeprefix("properties."))
    return value


def normalize_location(location: str) -> str:
    """ARM accepts display names ("West US 2") and normalizes to "westus2"."""
    return location.replace(" ", "").lower()


def check_location(
    location: Any, known: set[str], type_name: str, *, required: bool = True
) -> str | None:
    """Location must be present and one the resource type is offered in."""
    if location in (None, ""):
        if not required:
            return None
        raise ArmError(
            400, "LocationRequired", "The location property is required for this definition."
        )
    if not isinstance(location, str):
        raise ArmError(400, "InvalidRequestContent", "The location must be a string.")
    loc = normalize_location(location)
    if loc not in known:
        raise ArmError(
            400,
            "LocationNotAvailableForResourceType",
            f"The provided location '{location}' is not available for resource type "
            f"'{type_name}'. List of available regions for the resource type is "
            f"'{','.join(sorted(known))}'.",
        )
    return loc


# Names -------------------------------------------------------------------------------------

_RG_CHARS = re.compile(r"[-\w._()]", re.UNICODE)


def validate_resource_group_name(name: str) -> None:
    """1-90 letters, digits, '-', '.', '_', '(', ')'; must not end with a period."""
    bad = "".join(sorted({c for c in name if not _RG_CHARS.fullmatch(c)}))
    if bad:
        raise ArmError(
            400,
            "InvalidResourceGroup",
            f"The provided resource group name '{name}' has these invalid characters: '{bad}'. "
            "The name can only be a letter, digit, '-', '.', '(', ')' or '_'.",
        )
    if not 1 <= len(name) <= 90 or name.endswith("."):
        raise ArmError(
            400,
            "InvalidResourceGroup",
            f"The provided resource group name '{name}' is invalid. It must be 1-90 characters "
            "long and cannot end with a period.",
        )


_STORAGE_NAME = re.compile(r"^[a-z0-9]{3,24}$")


def validate_storage_account_name(name: str) -> None:
    if not _STORAGE_NAME.match(name):
        raise ArmError(
            400,
            "AccountNameInvalid",
            f"{name} is not a valid storage account name. Storage account name must be between "
            "3 and 24 characters in length and use numbers and lower-case letters only.",
        )


_NETWORK_NAME = re.compile(r"^\w(?:[\w.\-]*\w)?$")


def validate_network_name(name: str) -> None:
    """Network RP: 1-80 chars, start with a word char, end with a word char or '_'."""
    if not _NETWORK_NAME.match(name) or len(name) > 80:
        raise ArmError(
            400,
            "InvalidResourceName",
            f"Resource name {name} is invalid. The name can be up to 80 characters long. It must "
            "begin with a word character, and it must end with a word character or with '_'. "
            "The name may contain word characters or '.', '-', '_'.",
        )


_COMPUTE_NAME = r"^[^_\W][\w\-._]{0,79}(?<![-.])$"
_COMPUTE_NAME_RE = re.compile(_COMPUTE_NAME)


def validate_compute_name(name: str, target: str, max_length: int = 80) -> None:
    """Compute RP's entity name rule (VMs, disks, images), with its exact message."""
    if not _COMPUTE_NAME_RE.match(name) or len(name) > max_length:
        pattern = _COMPUTE_NAME.replace("79", str(max_length - 1))
        raise invalid_parameter(
            f"The entity name '{target}' is invalid according to its validation rule: {pattern}.",
            target=target,
        )


_LINUX_HOST_BAD = set("`~!@#$%^&*()=+_[]{}\\|;:'\",<>/?")
_WINDOWS_HOST_BAD = _LINUX_HOST_BAD | {"."}


def validate_computer_name(name: str, os_type: str) -> None:
    if os_type == "Windows":
        if (
            not name
            or len(name) > 15
            or name.isdigit()
            or any(c in _WINDOWS_HOST_BAD for c in name)
        ):
            raise invalid_parameter(
                "Windows computer name cannot be more than 15 characters long, be entirely "
                "numeric, or contain the following characters: ` ~ ! @ # $ % ^ & * ( ) = + _ "
                "[ ] { } \\ | ; : . ' \" , < > / ?.",
                target="computerName",
            )
        return
    if not name or len(name) > 64 or any(c in _LINUX_HOST_BAD for c in name):
        raise invalid_parameter(
            "Linux host name cannot exceed 64 characters in length or contain the following "
            "characters: ` ~ ! @ # $ % ^ & * ( ) = + _ [ ] { } \\ | ; : ' \" , < > / ?.",
            target="computerName",
        )


DISALLOWED_ADMIN_NAMES = frozenset(
    [
        "administrator",
        "admin",
        "user",
        "user1",
        "test",
        "user2",
        "test1",
        "user3",
        "admin1",
        "1",
        "123",
        "a",
        "actuser",
        "adm",
        "admin2",
        "aspnet",
        "backup",
        "console",
        "david",
        "guest",
        "john",
        "owner",
        "root",
        "server",
        "sql",
        "support",
        "support_388945a0",
        "sys",
        "test2",
        "test3",
        "user4",
        "user5",
    ]
)
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_.\-]*$")


def validate_admin_username(name: str, os_type: str) -> None:
    if name.lower() in DISALLOWED_ADMIN_NAMES:
        raise invalid_parameter("The Admin Username specified is not allowed.", "adminUsername")
    if os_type == "Windows":
        if len(name) > 20 or name.endswith(".") or any(c in '\\/"[]:|<>+=;,?*@' for c in name):
            raise invalid_parameter(
                "Windows admin user name cannot be more than 20 characters long, end with a "
                'period(.), or contain the following characters: \\ / " [ ] : | < > + = ; , ? '
                "* @.",
                "adminUsername",
            )
        return
    if len(name) > 64 or not _LINUX_USER.match(name) or name.endswith("."):
        raise invalid_parameter(
            "Linux admin user name cannot contain upper case character A-Z, special characters "
            '\\/"[]:|<>+=;,?*@#()! or start with $ or -',
            "adminUsername",
        )


# Passwords Azure refuses outright, whatever their complexity.
DISALLOWED_PASSWORDS = frozenset(
    [
        "abc@123",
        "iloveyou!",
        "P@$$w0rd",
        "P@ssw0rd",
        "P@ssword123",
        "Pa$$word",
        "pass@word1",
        "Password!",
        "Password1",
        "Password1!",
        "Password22",
    ]
)


def validate_admin_password(password: str, os_type: str) -> None:
    if password in DISALLOWED_PASSWORDS:
        raise invalid_parameter("The supplied password is not allowed.", "adminPassword")
    low, high = (8, 123) if os_type == "Windows" else (6, 72)
    classes = sum(
        [
            any(c.islower() for c in password),
            any(c.isupper() for c in password),
            any(c.isdigit() for c in password),
            any(not c.isalnum() for c in password),
        ]
    )
    if not low <= len(password) <= high or classes < 3 or any(ord(c) < 32 for c in password):
        raise invalid_parameter(
            f"The supplied password must be between {low}-{high} characters long and must "
            "satisfy at least 3 of password complexity requirements from the following: 1) "
            "Contains an uppercase character 2) Contains a lowercase character 3) Contains a "
            "numeric digit 4) Contains a special character 5) Control characters are not allowed",
            "adminPassword",
        )


_VAULT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,22}[A-Za-z0-9]$")


def validate_vault_name(name: str) -> None:
    """Key Vault: 3-24 letters, digits, hyphens; a letter first, no '--', no '-' last."""
    if not _VAULT_NAME.match(name) or "--" in name:
        raise ArmError(
            400,
            "VaultNameNotValid",
            f"The vault name '{name}' is invalid. A vault's name must be between 3-24 "
            "alphanumeric characters. The name must begin with a letter, end with a letter or "
            "digit, and not contain consecutive hyphens. Follow this link for more information: "
            "https://go.microsoft.com/fwlink/?linkid=2147742",
        )


def valid_ssh_public_key(key_data: str) -> bool:
    """Azure takes OpenSSH `ssh-rsa` keys of at least 2048 bits, and `ssh-ed25519` keys."""
    try:
        key = load_ssh_public_key(key_data.strip().encode())
    except (ValueError, TypeError, binascii.Error):
        return False
    if isinstance(key, rsa.RSAPublicKey):
        return key.key_size >= 2048
    return isinstance(key, ed25519.Ed25519PublicKey)


MAX_CUSTOM_DATA = 87380


def validate_custom_data(custom_data: Any) -> None:
    ok = isinstance(custom_data, str) and len(custom_data) <= MAX_CUSTOM_DATA
    if ok:
        try:
            base64.b64decode(custom_data, validate=True)
        except (binascii.Error, ValueError):
            ok = False
    if not ok:
        raise invalid_parameter(
            "Custom data in OSProfile must be in Base64 encoding and with a maximum length of "
            f"{MAX_CUSTOM_DATA} characters.",
            "customData",
        )


_TAG_RESERVED = set("<>%&\\?/")


def validate_tags(tags: Any, *, max_name: int = 512) -> dict[str, str]:
    """At most 50 tags; names up to 512 (storage: 128) without <>%&\\?/, values up to 256."""
    if tags is None:
        return {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise ArmError(
            400,
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized: 'tags must be an "
            "object of strings'.",
        )
    if len(tags) > 50:
        raise ArmError(
            400,
            "InvalidTagCount",
            f"The number of tags ({len(tags)}) exceeds the maximum of 50 per resource.",
        )
    bad = [k for k in tags if any(c in _TAG_RESERVED or ord(c) < 32 for c in k)]
    if bad:
        raise ArmError(
            400,
            "InvalidTagNameCharacters",
            f"The tag names '{','.join(bad)}' have reserved characters '<,>,%,&,\\,?,/' or "
            "control characters.",
        )
    for k, v in tags.items():
        if not k or len(k) > max_name:
            raise ArmError(
                400,
                "InvalidTagNameLength",
                f"The tag name '{k}' exceeds the maximum length of {max_name} characters.",
            )
        if len(v) > 256:
            raise ArmError(
                400,
                "InvalidTagValueLength",
                f"The tag value '{v[:40]}...' of tag '{k}' exceeds the maximum length of 256.",
            )
    return dict(tags)


# Network values --------------------------------------------------------------------------


def parse_prefix(prefix: Any, resource_id: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR prefix with no host bits, as the network RP insists."""
    try:
        iface = ipaddress.ip_interface(str(prefix))
        if "/" not in str(prefix):
            raise ValueError
    except ValueError:
        raise ArmError(
            400,
            "NetcfgInvalidIPAddressPrefix",
            f"IP address prefix {prefix} of resource {resource_id} is not formatted correctly. "
            "Value must be in the form 'x.x.x.x/x'.",
        ) from None
    if iface.ip != iface.network.network_address:
        raise ArmError(
            400,
            "InvalidCIDRNotation",
            f"The address prefix {prefix} in resource {resource_id} has an invalid CIDR "
            f"notation. For the given prefix length, the address prefix should be "
            f"{iface.network}.",
        )
    return iface.network


_PORT_RANGE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


def valid_port_range(value: Any) -> bool:
    if value == "*":
        return True
    m = _PORT_RANGE.match(str(value))
    if not m:
        return False
    low = int(m.group(1))
    high = int(m.group(2) or low)
    return 0 <= low <= high <= 65535


SECURITY_RULE_PROTOCOLS = {"tcp", "udp", "icmp", "esp", "ah", "*"}


def validate_security_rule(rule: Mapping[str, Any], rule_id: str) -> None:
    """One NSG rule: protocol, access, direction, priority 100-4096, ports, addresses."""
    props = rule.get("properties") or {}
    name = rule.get("name")
    if not name:
        raise ArmError(400, "InvalidRequestFormat", "Security rule name is required.")
    validate_network_name(name)
    for field_name in ("protocol", "access", "direction", "priority"):
        if props.get(field_name) in (None, ""):
            raise ArmError(
                400,
                "SecurityRuleParameterMissing"
                if field_name != "priority"
                else "InvalidRequestFormat",
                f"Security rule {rule_id} is missing required property '{field_name}'.",
            )
    if str(props["protocol"]).lower() not in SECURITY_RULE_PROTOCOLS:
        raise ArmError(
            400,
            "SecurityRuleInvalidProtocol",
            f"Security rule {rule_id} has invalid Protocol. Value provided: {props['protocol']}. "
            "Allowed values: Tcp, Udp, Icmp, Esp, Ah, *.",
        )
    if props["access"] not in ("Allow", "Deny"):
        raise ArmError(
            400,
            "InvalidRequestFormat",
            f"Security rule {rule_id} has invalid access {props['access']}: Allow or Deny.",
        )
    if props["direction"] not in ("Inbound", "Outbound"):
        raise ArmError(
            400,
            "InvalidRequestFormat",
            f"Security rule {rule_id} has invalid direction {props['direction']}.",
        )
    priority = props["priority"]
    if not isinstance(priority, int) or not 100 <= priority <= 4096:
        raise ArmError(
            400,
            "SecurityRuleInvalidPriority",
            f"Security rule has invalid Priority. Value provided: {priority} Allowed range "
            "100-4096.",
        )
    for side in ("source", "destination"):
        single = props.get(f"{side}PortRange")
        many = props.get(f"{side}PortRanges") or []
        ranges = ([single] if single not in (None, "") else []) + list(many)
        if not ranges:
            raise ArmError(
                400,
                "SecurityRuleParameterMissing",
                f"Security rule {rule_id} is missing {side}PortRange or {side}PortRanges.",
            )
        for r in ranges:
            if not valid_port_range(r):
                raise ArmError(
                    400,
                    "SecurityRuleInvalidPortRange",
                    f"Security rule {rule_id} has invalid Port range. Value provided: {r}. Value "
                    "should be an integer OR integer range with '-' delimiter. Valid range "
                    "0-65535.",
                )
        prefix = props.get(f"{side}AddressPrefix")
        prefixes = props.get(f"{side}AddressPrefixes") or []
        asgs = props.get(f"{side}ApplicationSecurityGroups") or []
        if prefix in (None, "") and not prefixes and not asgs:
            raise ArmError(
                400,
                "SecurityRuleParameterMissing",
                f"Security rule {rule_id} is missing {side}AddressPrefix, "
                f"{side}AddressPrefixes or {side}ApplicationSecurityGroups.",
            )


# Compute values --------------------------------------------------------------------------

_VERSION_NAME = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def validate_gallery_name(name: str) -> None:
    """Alphanumerics with single '.' or '_' between them, up to 80 characters."""
    if len(name) > 80 or not re.fullmatch(r"[A-Za-z0-9]+(?:[._][A-Za-z0-9]+)*", name):
        raise invalid_parameter(
            f"The gallery name '{name}' is invalid. The gallery name can contain only "
            "alphanumerics, underscores and periods, must start and end with an alphanumeric "
            "character and be at most 80 characters long.",
            "galleryName",
        )


def validate_gallery_image_name(name: str) -> None:
    if len(name) > 80 or not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._\-]*[A-Za-z0-9])?", name):
        raise invalid_parameter(
            f"The gallery image name '{name}' is invalid. It can contain only alphanumerics, "
            "hyphens, periods and underscores, must start and end with an alphanumeric "
            "character and be at most 80 characters long.",
            "galleryImageName",
        )


def validate_gallery_image_version_name(name: str) -> tuple[int, int, int]:
    """`Major.Minor.Patch`, each a 32-bit integer."""
    m = _VERSION_NAME.match(name)
    if not m or any(int(g) > 2**31 - 1 for g in m.groups()):
        raise invalid_parameter(
            f"The gallery image version name '{name}' is invalid. The name should follow the "
            "format 'Major(int32).Minor(int32).Patch(int32)'.",
            "galleryImageVersionName",
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def version_key(version: str) -> tuple[int, ...]:
    """Sort key for dotted versions ("12.20240211.1"); non-numeric parts sort first."""
    out: list[int] = []
    for part in version.split("."):
        out.append(int(part) if part.isdigit() else -1)
    return tuple(out)


VM_DISK_TYPES = {
    "Standard_LRS",
    "Premium_LRS",
    "StandardSSD_LRS",
    "UltraSSD_LRS",
    "Premium_ZRS",
    "StandardSSD_ZRS",
    "PremiumV2_LRS",
}
GALLERY_STORAGE_TYPES = {"Standard_LRS", "Standard_ZRS", "Premium_LRS"}
STORAGE_SKUS = {
    "Standard_LRS",
    "Standard_GRS",
    "Standard_RAGRS",
    "Standard_ZRS",
    "Premium_LRS",
    "Premium_ZRS",
    "Standard_GZRS",
    "Standard_RAGZRS",
}
STORAGE_KINDS = {"Storage", "StorageV2", "BlobStorage", "FileStorage", "BlockBlobStorage"}


def check_enum(value: Any, allowed: set[str], target: str) -> str:
    """Compute's message for a value outside an enum (case-insensitive like the RP)."""
    for a in allowed:
        if isinstance(value, str) and value.lower() == a.lower():
            return a
    raise invalid_parameter(
        f"The value '{value}' of parameter '{target}' is not allowed. Allowed values are "
        f"'{', '.join(sorted(allowed))}'.",
        target,
    )
