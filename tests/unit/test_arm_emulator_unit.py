"""Pure parts of the ARM emulator: Azure's naming and field rules, ids, api-versions, faults."""

from __future__ import annotations

import base64
import importlib.util
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from azurehelpers import SSH_RULE
from fakes.arm import ArmEmulator, apiversions, ids, validation
from fakes.arm.errors import ArmError
from fakes.arm.faults import Faults, retry_headers
from fakes.arm.identity import Identity, TokenError
from fakes.arm.models import StoredResource, VmInfo

pytestmark = pytest.mark.azure


def code_of(fn, *args, **kwargs) -> str | None:
    """The ARM error code `fn` raises, None when it accepts."""
    try:
        fn(*args, **kwargs)
    except ArmError as err:
        return err.code
    return None


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("IT_rg_template_1234", None),
        ("rg(1).x-y", None),
        ("a" * 90, None),
        ("a" * 91, "InvalidResourceGroup"),
        ("ends.", "InvalidResourceGroup"),
        ("has space", "InvalidResourceGroup"),
        ("slash/no", "InvalidResourceGroup"),
        ("grüße", None),
    ],
)
def test_resource_group_names(name: str, code: str | None) -> None:
    assert code_of(validation.validate_resource_group_name, name) == code


def test_resource_group_name_message_names_the_characters() -> None:
    with pytest.raises(ArmError) as info:
        validation.validate_resource_group_name("a b*c")
    assert info.value.message.startswith(
        "The provided resource group name 'a b*c' has these invalid characters: ' *'."
    )


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("abc", True),
        ("kiln0123456789abcdefghij", True),
        ("ab", False),
        ("a" * 25, False),
        ("Upper", False),
        ("has-dash", False),
    ],
)
def test_storage_account_names(name: str, ok: bool) -> None:
    assert (code_of(validation.validate_storage_account_name, name) is None) == ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a", True),
        ("vnet-kiln.1", True),
        ("ends_", True),
        ("_starts", True),
        ("a" * 80, True),
        ("a" * 81, False),
        ("ends.", False),
        ("ends-", False),
        ("-starts", False),
        ("sp ace", False),
    ],
)
def test_network_names(name: str, ok: bool) -> None:
    assert (code_of(validation.validate_network_name, name) is None) == ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("vm1", True),
        ("kiln-build_vm.1", True),
        ("_vm", False),
        ("vm-", False),
        ("vm.", False),
        ("v m", False),
        ("a" * 64, True),
        ("a" * 65, False),
    ],
)
def test_vm_names(name: str, ok: bool) -> None:
    assert (code_of(validation.validate_compute_name, name, "vmName", 64) is None) == ok


def test_compute_name_message_is_computes_own() -> None:
    with pytest.raises(ArmError) as info:
        validation.validate_compute_name("bad-", "vmName", 64)
    assert info.value.target == "vmName"
    assert "is invalid according to its validation rule" in info.value.message


@pytest.mark.parametrize(
    ("name", "os_type", "ok"),
    [
        ("kiln-build", "Linux", True),
        ("a" * 64, "Linux", True),
        ("a" * 65, "Linux", False),
        ("under_score", "Linux", False),
        ("win-build", "Windows", True),
        ("a" * 16, "Windows", False),
        ("12345", "Windows", False),
        ("dot.ted", "Windows", False),
    ],
)
def test_computer_names(name: str, os_type: str, ok: bool) -> None:
    assert (code_of(validation.validate_computer_name, name, os_type) is None) == ok


@pytest.mark.parametrize(
    ("user", "os_type", "ok"),
    [
        ("kiln", "Linux", True),
        ("packer_1", "Linux", True),
        ("root", "Linux", False),
        ("Admin", "Linux", False),
        ("Upper", "Linux", False),
        ("-dash", "Linux", False),
        ("kilnadmin", "Windows", True),
        ("administrator", "Windows", False),
        ("a" * 21, "Windows", False),
    ],
)
def test_admin_usernames(user: str, os_type: str, ok: bool) -> None:
    assert (code_of(validation.validate_admin_username, user, os_type) is None) == ok


@pytest.mark.parametrize(
    ("password", "os_type", "ok"),
    [
        ("Str0ng!Passw0rd", "Windows", True),
        ("weakpassword", "Windows", False),
        ("Sh0rt!", "Windows", False),
        ("Ab1!x", "Linux", False),
        ("Abc12!", "Linux", True),
    ],
)
def test_admin_passwords(password: str, os_type: str, ok: bool) -> None:
    assert (code_of(validation.validate_admin_password, password, os_type) is None) == ok


def _openssh(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def test_ssh_public_keys_azure_accepts() -> None:
    assert validation.valid_ssh_public_key(_openssh(ed25519.Ed25519PrivateKey.generate()))
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert validation.valid_ssh_public_key(_openssh(rsa2048) + " kiln@build")
    rsa1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert not validation.valid_ssh_public_key(_openssh(rsa1024))
    assert not validation.valid_ssh_public_key("ssh-rsa AAAAnotakey")
    assert not validation.valid_ssh_public_key("")


def test_custom_data_must_be_base64_and_bounded() -> None:
    ok = base64.b64encode(b"#cloud-config\n").decode()
    assert code_of(validation.validate_custom_data, ok) is None
    assert code_of(validation.validate_custom_data, "not base64!") == "InvalidParameter"
    too_long = base64.b64encode(b"x" * 70000).decode()
    assert code_of(validation.validate_custom_data, too_long) == "InvalidParameter"


@pytest.mark.parametrize(
    ("tags", "code"),
    [
        ({"kiln-template": "t", "kiln.run": "r"}, None),
        ({"kiln.dev/run": "r"}, "InvalidTagNameCharacters"),
        ({"a%b": "r"}, "InvalidTagNameCharacters"),
        ({f"t{i}": "v" for i in range(51)}, "InvalidTagCount"),
        ({"k" * 513: "v"}, "InvalidTagNameLength"),
        ({"k": "v" * 257}, "InvalidTagValueLength"),
        ({"k": 1}, "InvalidRequestContent"),
    ],
)
def test_tags(tags: dict, code: str | None) -> None:
    assert code_of(validation.validate_tags, tags) == code


def test_storage_tag_names_are_shorter() -> None:
    assert (
        code_of(validation.validate_tags, {"k" * 129: "v"}, max_name=128) == "InvalidTagNameLength"
    )


# --- locations and values ---------------------------------------------------------------


def test_locations_normalize_and_must_be_offered() -> None:
    known = {"westus2", "eastus"}
    assert validation.check_location("West US 2", known, "T") == "westus2"
    assert code_of(validation.check_location, None, known, "T") == "LocationRequired"
    assert code_of(validation.check_location, "mars", known, "T") == (
        "LocationNotAvailableForResourceType"
    )


def test_prefixes() -> None:
    assert str(validation.parse_prefix("10.0.0.0/24", "id")) == "10.0.0.0/24"
    assert code_of(validation.parse_prefix, "10.0.0.1/24", "id") == "InvalidCIDRNotation"
    assert code_of(validation.parse_prefix, "10.0.0/24", "id") == "NetcfgInvalidIPAddressPrefix"
    assert code_of(validation.parse_prefix, "10.0.0.0", "id") == "NetcfgInvalidIPAddressPrefix"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("*", True),
        ("22", True),
        ("1000-2000", True),
        ("0", True),
        ("65536", False),
        ("20-10", False),
        ("ssh", False),
    ],
)
def test_port_ranges(value: str, ok: bool) -> None:
    assert validation.valid_port_range(value) == ok


def _rule(**props) -> dict:
    base = {**SSH_RULE["properties"], **props}
    return {"name": "r", "properties": {k: v for k, v in base.items() if v is not None}}


@pytest.mark.parametrize(
    ("props", "code"),
    [
        ({}, None),
        ({"priority": 99}, "SecurityRuleInvalidPriority"),
        ({"priority": 4097}, "SecurityRuleInvalidPriority"),
        ({"protocol": "Gre"}, "SecurityRuleInvalidProtocol"),
        ({"destinationPortRange": "70000"}, "SecurityRuleInvalidPortRange"),
        ({"sourceAddressPrefix": None}, "SecurityRuleParameterMissing"),
        ({"direction": None}, "SecurityRuleParameterMissing"),
    ],
)
def test_security_rules(props: dict, code: str | None) -> None:
    assert code_of(validation.validate_security_rule, _rule(**props), "nsg/r") == code


def test_gallery_names_and_versions() -> None:
    assert code_of(validation.validate_gallery_name, "kiln_gallery.1") is None
    assert code_of(validation.validate_gallery_name, "kiln-gallery") == "InvalidParameter"
    assert code_of(validation.validate_gallery_image_name, "ubuntu-24.04_lts") is None
    assert code_of(validation.validate_gallery_image_name, "-ubuntu") == "InvalidParameter"
    assert validation.validate_gallery_image_version_name("1.20.300") == (1, 20, 300)
    for bad in ("1.0", "1.0.0.0", "v1.0.0", "1.0.2147483648"):
        assert code_of(validation.validate_gallery_image_version_name, bad) == "InvalidParameter"


def test_versions_sort_numerically() -> None:
    versions = ["24.04.202411030", "24.04.202409120", "0.20241111.1927", "24.04.202410010"]
    assert max(versions, key=validation.version_key) == "24.04.202411030"
    assert sorted(["1.10.0", "1.9.0", "1.2.0"], key=validation.version_key) == [
        "1.2.0",
        "1.9.0",
        "1.10.0",
    ]


def test_required_fields_use_computes_wording() -> None:
    body = {"properties": {"hardwareProfile": {}}}
    with pytest.raises(ArmError) as info:
        validation.require(body, "properties.hardwareProfile.vmSize", "hardwareProfile.vmSize")
    assert info.value.message == "Required parameter 'hardwareProfile.vmSize' is missing (null)."
    assert validation.get_path(body, "properties.hardwareProfile.vmSize", "x") == "x"


def test_enums_are_case_insensitive() -> None:
    assert validation.check_enum("premium_lrs", validation.VM_DISK_TYPES, "t") == "Premium_LRS"
    assert code_of(validation.check_enum, "Fast_LRS", validation.VM_DISK_TYPES, "t") == (
        "InvalidParameter"
    )


# --- ids --------------------------------------------------------------------------------


def test_paths_parse_into_types_names_and_tail() -> None:
    p = ids.parse_path(
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/d"
    )
    assert p is not None
    assert (p.resource_group, p.namespace, p.types, p.names, p.tail) == (
        "rg",
        "Microsoft.Network",
        ("virtualNetworks", "subnets"),
        ("v", "d"),
        (),
    )
    assert p.type_key == "microsoft.network/virtualnetworks/subnets"
    action = ids.parse_path(
        "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm/deallocate"
    )
    assert action is not None and action.tail == ("deallocate",) and action.name == "vm"
    group = ids.parse_path("/subscriptions/s/resourcegroups/rg")
    assert group is not None and group.namespace is None and group.resource_group == "rg"
    assert ids.parse_path("/tenant/oauth2/v2.0/token") is None


def test_ids_compare_case_insensitively() -> None:
    rid = ids.format_id("s", "RG", "Microsoft.Compute", ["galleries", "images"], ["g", "i"])
    assert (
        rid == "/subscriptions/s/resourceGroups/RG/providers/Microsoft.Compute/galleries/g/images/i"
    )
    assert ids.same_id(rid, rid.lower() + "/")
    assert ids.parent_id(rid).endswith("/galleries/g")


# --- api-versions -----------------------------------------------------------------------


def test_api_version_checks() -> None:
    key = "microsoft.compute/virtualmachines"
    assert apiversions.check("2026-04-01", key, "Microsoft.Compute/virtualMachines")
    assert code_of(apiversions.check, None, key, "T") == "MissingApiVersionParameter"
    assert code_of(apiversions.check, "latest", key, "T") == "InvalidApiVersionParameter"
    assert code_of(apiversions.check, "2015-01-01", key, "T") == "NoRegisteredProviderFound"


def _sdk_default_versions() -> dict[str, set[str]]:
    """Read the installed SDKs' request builders: {emulated type key: default versions}."""
    out: dict[str, set[str]] = {}
    packages = [
        "azure.mgmt.compute",
        "azure.mgmt.network",
        "azure.mgmt.storage",
        "azure.mgmt.resource.resources",
        "azure.mgmt.keyvault",
    ]
    builder = re.compile(r"\ndef build_\w+_request\(.*?(?=\ndef |\nclass |\Z)", re.S)
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.origin is not None
        source = (Path(spec.origin).parent / "operations" / "_operations.py").read_text()
        for m in builder.finditer(source):
            body = m.group(0)
            version = re.search(r'_params\.pop\("api-version", "([^"]+)"\)', body)
            url = re.search(r'_url = "(/subscriptions/[^"]+)"', body)
            if not (version and url):
                continue
            path = ids.parse_path(re.sub(r"\{(\w+)\}", r"\1", url.group(1)))
            if path is None:
                continue
            if path.namespace is None:
                key = "microsoft.resources/resourcegroups"
            elif path.types and path.types[0].lower() == "locations":
                key = f"{path.namespace.lower()}/locations" + (
                    "/publishers" if "publishers" in [t.lower() for t in path.types] else ""
                )
            else:
                key = path.type_key
                if path.tail and f"{key}/{path.tail[0].lower()}" in apiversions.BY_TYPE:
                    key = f"{key}/{path.tail[0].lower()}"
            if key in apiversions.BY_TYPE:
                out.setdefault(key, set()).add(version.group(1))
    return out


def test_sdk_default_api_versions_are_accepted() -> None:
    """If an SDK upgrade changes a default api-version, this says which table entry to add."""
    defaults = _sdk_default_versions()
    for key in (
        "microsoft.resources/resourcegroups",
        "microsoft.storage/storageaccounts",
        "microsoft.network/virtualnetworks",
        "microsoft.network/networkinterfaces",
        "microsoft.compute/virtualmachines",
        "microsoft.compute/disks",
        "microsoft.compute/galleries/images/versions",
        "microsoft.compute/locations/publishers",
        "microsoft.compute/skus",
        "microsoft.keyvault/vaults",
        "microsoft.keyvault/vaults/secrets",
        "microsoft.keyvault/locations",
        "microsoft.keyvault/deletedvaults",
    ):
        assert defaults.get(key), f"no SDK request builder found for {key}"
    missing = {
        k: v - apiversions.BY_TYPE[k] for k, v in defaults.items() if v - apiversions.BY_TYPE[k]
    }
    assert missing == {}


# --- faults -----------------------------------------------------------------------------


def test_fail_next_is_consumed_per_stage_and_method() -> None:
    faults = Faults()
    faults.fail_next("PUT", r"/virtualMachines/vm1$", 409, "Conflict", "busy", times=2)
    faults.fail_next("*", r"/disks/", 500, stage="response")
    assert faults.take("GET", "/x/virtualMachines/vm1", "request") is None
    first = faults.take("PUT", "/x/virtualMachines/vm1", "request")
    assert first is not None and (first.status, first.code, first.message) == (
        409,
        "Conflict",
        "busy",
    )
    assert faults.take("PUT", "/x/virtualMachines/vm1", "request") is not None
    assert faults.take("PUT", "/x/virtualMachines/vm1", "request") is None
    assert faults.take("DELETE", "/x/disks/d", "request") is None
    lost = faults.take("DELETE", "/x/disks/d", "response")
    assert lost is not None and lost.code == "InternalServerError"


def test_failure_rate_is_seeded_and_spares_reads_from_409() -> None:
    def sample(seed: int) -> list[int | None]:
        faults = Faults()
        faults.set_failure_rate(0.5, statuses=(409, 429), retry_after=0.05, seed=seed)
        out = []
        for i in range(40):
            err = faults.take("GET" if i % 2 else "PUT", "/p", "request")
            out.append(err.status if err else None)
        return out

    a, b = sample(3), sample(3)
    assert a == b and any(a) and None in a
    assert all(status != 409 for i, status in enumerate(a) if i % 2)  # GETs never get 409
    faults = Faults()
    faults.set_failure_rate(1.0, statuses=(429,), retry_after=0.25)
    err = faults.take("GET", "/p", "request")
    assert err is not None and err.headers == {"Retry-After": "0.25"}


def test_retry_after_headers() -> None:
    assert retry_headers(2) == {"Retry-After": "2"}
    assert retry_headers(0.05) == {"Retry-After": "0.05"}
    assert retry_headers(0.05, integer_only=True) == {"retry-after-ms": "50"}
    assert retry_headers(1.0, integer_only=True) == {"Retry-After": "1"}


# --- identity ---------------------------------------------------------------------------


def test_tokens_verify_only_when_issued_here_for_the_audience() -> None:
    ident = Identity("tenant", "client", "secret")
    token = ident.issue("https://127.0.0.1:1")
    claims = ident.verify(f"Bearer {token}", {"https://127.0.0.1:1/"})
    assert claims["tid"] == "tenant" and claims["appid"] == "client"

    def refused(header: str | None, audiences: set[str] = {"https://127.0.0.1:1"}) -> str:  # noqa: B006
        with pytest.raises(TokenError) as info:
            ident.verify(header, audiences)
        return info.value.code

    assert refused(None) == "AuthenticationFailed"
    assert refused("Basic abc") == "AuthenticationFailedInvalidHeader"
    assert refused(f"Bearer {token}x") == "InvalidAuthenticationToken"
    assert refused(f"Bearer {Identity('tenant', 'client', 's').issue('a')}") == (
        "InvalidAuthenticationToken"
    )
    assert refused(f"Bearer {ident.issue('https://127.0.0.1:1', lifetime=-10)}") == (
        "ExpiredAuthenticationToken"
    )
    assert refused(f"Bearer {token}", {"https://management.azure.com"}) == (
        "InvalidAuthenticationTokenAudience"
    )


def test_vm_info_address_prefers_the_public_ip() -> None:
    info = VmInfo(
        id="/x",
        name="vm",
        resource_group="rg",
        location="westus2",
        vm_size="Standard_B2s",
        os_type="Linux",
        computer_name="vm",
        admin_username="kiln",
        private_ip="127.0.3.4",
        custom_data=base64.b64encode(b"hi").decode(),
    )
    assert info.address == "127.0.3.4" and info.custom_data_bytes == b"hi"
    assert info.model_copy(update={"public_ip": "127.0.2.9"}).address == "127.0.2.9"


def test_emulators_of_one_process_never_hand_out_the_same_address() -> None:
    first, second = ArmEmulator(), ArmEmulator()
    address = first.allocate_ip("public")
    held = StoredResource.model_construct(
        id="/x", type="Microsoft.Network/publicIPAddresses", body={}, meta={"ipAddress": address}
    )
    first.state.resources["/x"] = held
    assert second.allocate_ip("public") != address


def test_an_address_leased_by_another_process_is_never_handed_out() -> None:
    """Two test runs side by side (two processes) must not give two VMs one address."""
    emulator = ArmEmulator()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LEASE],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert holder.stdout is not None
        held = holder.stdout.readline().strip()
        assert held.startswith("127.0.2.")
        emulator.state.next_public_ip = int(held.rsplit(".", 1)[1])
        assert emulator.allocate_ip("public") != held
    finally:
        holder.kill()
        holder.wait(timeout=10)
    emulator.state.next_public_ip = int(held.rsplit(".", 1)[1])
    assert emulator.allocate_ip("public") == held


_HOLD_LEASE = """
import time
from fakes.arm import emulator
held = next(f"127.0.2.{n}" for n in range(200, 255) if emulator._LEASES.take(f"127.0.2.{n}"))
print(held, flush=True)
time.sleep(60)
"""


def test_an_address_whose_ssh_port_is_taken_is_never_handed_out() -> None:
    """A VM left running by a run that died holds its address with no lease at all."""
    emulator = ArmEmulator()
    with socket.socket() as leftover:
        leftover.bind(("127.0.2.250", 22))
        leftover.listen()
        emulator.state.next_public_ip = 250
        assert emulator.allocate_ip("public") == "127.0.2.251"
