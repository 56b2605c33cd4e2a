"""Microsoft.Network: virtual networks (+ subnets), NSGs (+ rules), public IPs, NICs.

Addresses come from loopback so a VM backend can bind them locally: public IPs from
127.0.2.x, NIC private IPs from 127.0.3.x (a static private IP is kept as given).
"""

from __future__ import annotations

import copy
import ipaddress
import re
import uuid
from typing import TYPE_CHECKING, Any

from .. import ids
from ..errors import ArmError, invalid_resource_reference
from ..models import Operation, StoredResource
from ..validation import parse_prefix, validate_network_name, validate_security_rule
from .base import Ctx, Reply, ResourceType, require_group

if TYPE_CHECKING:
    from ..emulator import ArmEmulator

VNET = "Microsoft.Network/virtualNetworks"
SUBNET = "Microsoft.Network/virtualNetworks/subnets"
NSG = "Microsoft.Network/networkSecurityGroups"
RULE = "Microsoft.Network/networkSecurityGroups/securityRules"
PIP = "Microsoft.Network/publicIPAddresses"
NIC = "Microsoft.Network/networkInterfaces"
VM = "Microsoft.Compute/virtualMachines"


def bad_format(message: str) -> ArmError:
    return ArmError(400, "InvalidRequestFormat", f"Cannot parse the request. {message}")


def ref_id(value: Any) -> str | None:
    """The `id` of a `{"id": ...}` reference, if any."""
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return None


def etag() -> str:
    return f'W/"{uuid.uuid4()}"'


class NetworkType(ResourceType):
    """Network RP conventions: 201/200 + Azure-AsyncOperation, "Updating", etags."""

    put_style = "async"
    delete_style = "async+location"
    creating_state = "Updating"
    updating_state = "Updating"
    top_level_fields = ("sku", "zones", "extendedLocation")

    def validate_name(self, name: str) -> None:
        validate_network_name(name)

    def stamp(self, res: StoredResource) -> None:
        res.meta["etag"] = etag()
        res.meta.setdefault("resourceGuid", str(uuid.uuid4()))

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        doc["etag"] = res.meta.get("etag", etag())
        doc["properties"].setdefault("resourceGuid", res.meta.get("resourceGuid"))


# --- references between network resources ------------------------------------------------


def nic_ip_configs(emu: ArmEmulator) -> list[tuple[StoredResource, dict[str, Any]]]:
    """Every (nic, ipConfiguration) pair."""
    out = []
    for nic in emu.resources_of(NIC):
        for cfg in nic.body["properties"].get("ipConfigurations", []):
            out.append((nic, cfg))
    return out


def ip_config_id(nic: StoredResource, cfg: dict[str, Any]) -> str:
    return f"{nic.id}/ipConfigurations/{cfg['name']}"


def subnet_users(emu: ArmEmulator, subnet_id: str) -> list[str]:
    return [
        ip_config_id(nic, cfg)
        for nic, cfg in nic_ip_configs(emu)
        if ids.same_id(ref_id(cfg.get("properties", {}).get("subnet")), subnet_id)
    ]


def find_subnet(emu: ArmEmulator, subnet_id: str) -> tuple[StoredResource, dict[str, Any]] | None:
    vnet = emu.lookup(ids.parent_id(subnet_id))
    if vnet is None or vnet.type != VNET:
        return None
    name = ids.split(subnet_id)[-1]
    for s in vnet.body["properties"].get("subnets", []):
        if s["name"].lower() == name.lower():
            return vnet, s
    return None


# --- virtual networks and subnets ---------------------------------------------------------


def check_subnet(
    emu: ArmEmulator,
    vnet_id: str,
    space: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    subnet: dict[str, Any],
    location: str | None,
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """One subnet's fields; returns its prefixes."""
    name = subnet.get("name")
    if not name:
        raise bad_format("A subnet must have a name.")
    validate_network_name(name)
    sid = f"{vnet_id}/subnets/{name}"
    props = subnet.setdefault("properties", {})
    raw = ([props["addressPrefix"]] if props.get("addressPrefix") else []) + list(
        props.get("addressPrefixes") or []
    )
    if not raw:
        raise ArmError(
            400,
            "NetcfgInvalidSubnet",
            f"Subnet '{name}' is not valid in virtual network '{ids.split(vnet_id)[-1]}'. "
            "An address prefix is required.",
        )
    prefixes = [parse_prefix(p, sid) for p in raw]
    for p in prefixes:
        if not any(p.version == s.version and p.subnet_of(s) for s in space):  # type: ignore[arg-type]
            raise ArmError(
                400,
                "NetcfgSubnetRangeOutsideVnet",
                f"Subnet '{name}' is not valid because its IP address range is outside the IP "
                f"address range of virtual network '{ids.split(vnet_id)[-1]}'.",
            )
    nsg = ref_id(props.get("networkSecurityGroup"))
    if nsg is not None:
        found = emu.lookup(nsg)
        if found is None or found.type != NSG or found.location != location:
            raise invalid_resource_reference(nsg, sid)
    return prefixes


def check_subnets(
    emu: ArmEmulator,
    vnet_id: str,
    space: list[Any],
    subnets: list[dict[str, Any]],
    location: str | None,
) -> None:
    seen: dict[str, list[Any]] = {}
    for s in subnets:
        prefixes = check_subnet(emu, vnet_id, space, s, location)
        if s["name"].lower() in seen:
            raise ArmError(
                400,
                "DuplicateResourceName",
                f"Resource {vnet_id} has two child resources with the same name ({s['name']}).",
            )
        for other_name, other in seen.items():
            if any(a.overlaps(b) for a in prefixes for b in other):
                raise ArmError(
                    400,
                    "NetcfgSubnetRangesOverlap",
                    f"Subnet '{s['name']}' is not valid because its IP address range overlaps "
                    f"with that of an existing subnet '{other_name}' in virtual network "
                    f"'{ids.split(vnet_id)[-1]}'.",
                )
        seen[s["name"].lower()] = prefixes


def in_use_subnet(subnet_id: str, users: list[str]) -> ArmError:
    return ArmError(
        400,
        "InUseSubnetCannotBeDeleted",
        f"Subnet {ids.split(subnet_id)[-1]} is in use by {users[0]} and cannot be deleted. In "
        "order to delete the subnet, delete all the resources within the subnet. See "
        "aka.ms/deletesubnet.",
    )


def child_resource(
    parent: StoredResource, child_id: str, type_name: str, props: dict[str, Any]
) -> dict[str, Any]:
    """A child (subnet, security rule) as ARM shows it: it shares its parent's etag."""
    return {
        "id": child_id,
        "name": child_id.rsplit("/", 1)[-1],
        "type": type_name,
        "etag": parent.meta.get("etag"),
        "properties": props,
    }


def render_subnet(emu: ArmEmulator, vnet: StoredResource, s: dict[str, Any]) -> dict[str, Any]:
    sid = f"{vnet.id}/subnets/{s['name']}"
    props = copy.deepcopy(s.get("properties", {}))
    props["provisioningState"] = "Succeeded" if vnet.provisioning_state != "Failed" else "Failed"
    users = subnet_users(emu, sid)
    if users:
        props["ipConfigurations"] = [{"id": u} for u in users]
    props.setdefault("privateEndpointNetworkPolicies", "Disabled")
    props.setdefault("privateLinkServiceNetworkPolicies", "Enabled")
    return child_resource(vnet, sid, SUBNET, props)


class VirtualNetworks(NetworkType):
    type_name = VNET

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        res = self.base_resource(ctx, existing, body)
        props = res.body["properties"]
        raw = (props.get("addressSpace") or {}).get("addressPrefixes") or []
        if not raw:
            raise ArmError(
                400,
                "VnetAddressSpaceMustBeSpecified",
                f"Address space of virtual network {res.id} must be specified (addressSpace."
                "addressPrefixes).",
            )
        space = [parse_prefix(p, res.id) for p in raw]
        subnets = props.setdefault("subnets", [])
        check_subnets(ctx.emu, res.id, space, subnets, res.location)
        if existing is not None:
            kept = {s["name"].lower() for s in subnets}
            for s in existing.body["properties"].get("subnets", []):
                sid = f"{existing.id}/subnets/{s['name']}"
                users = subnet_users(ctx.emu, sid)
                if s["name"].lower() not in kept and users:
                    raise in_use_subnet(sid, users)
        self.stamp(res)
        return res

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        super().decorate(emu, res, doc, ctx)
        props = doc["properties"]
        props["subnets"] = [
            render_subnet(emu, res, s) for s in res.body["properties"].get("subnets", [])
        ]
        props.setdefault("virtualNetworkPeerings", [])
        props.setdefault("enableDdosProtection", False)

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        for s in res.body["properties"].get("subnets", []):
            sid = f"{res.id}/subnets/{s['name']}"
            users = subnet_users(emu, sid)
            if users:
                raise in_use_subnet(sid, users)


class InlineChild(ResourceType):
    """A child kept inside its parent's body (subnets, security rules): ops run on the parent."""

    parent_type: str
    list_key: str

    def parent(self, ctx: Ctx) -> StoredResource:
        assert ctx.path is not None
        require_group(ctx)
        pid = ids.parent_id(ctx.path.resource_id())
        parent = ctx.emu.lookup(pid)
        if parent is None:
            raise ArmError(
                404,
                "ParentResourceNotFound",
                "Can not perform requested operation on nested resource. Parent resource "
                f"'{ctx.path.names[-2]}' not found.",
            )
        return parent

    def children(self, parent: StoredResource) -> list[dict[str, Any]]:
        return parent.body["properties"].setdefault(self.list_key, [])

    def find(self, parent: StoredResource, name: str) -> dict[str, Any] | None:
        return next((c for c in self.children(parent) if c["name"].lower() == name.lower()), None)

    def render_child(
        self, emu: ArmEmulator, parent: StoredResource, child: dict[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def validate_children(
        self, emu: ArmEmulator, parent: StoredResource, children: list[dict[str, Any]]
    ) -> None:
        raise NotImplementedError

    def check_child_delete(
        self, emu: ArmEmulator, parent: StoredResource, child: dict[str, Any]
    ) -> None:
        """Raise when the child is in use."""

    async def get(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        parent = self.parent(ctx)
        child = self.find(parent, ctx.path.name)
        if child is None:
            raise self.not_found(ctx)
        return Reply(200, self.render_child(ctx.emu, parent, child))

    async def head(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        parent = self.parent(ctx)
        return Reply(204 if self.find(parent, ctx.path.name) else 404)

    async def put(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        parent = self.parent(ctx)
        self.busy(ctx, parent)
        self.validate_name(ctx.path.name)
        body = ctx.json()
        child = {"name": ctx.path.name, "properties": copy.deepcopy(body.get("properties") or {})}
        existing = self.find(parent, ctx.path.name)
        if existing is None:
            new_list = [*self.children(parent), child]
        else:
            new_list = [child if c is existing else c for c in self.children(parent)]
        self.validate_children(ctx.emu, parent, new_list)
        parent.body["properties"][self.list_key] = new_list
        parent.meta["etag"] = etag()
        if existing is None:
            ctx.emu.count_creation(f"{parent.id}/{self.list_key}/{ctx.path.name}", self.type_name)
        parent.provisioning_state = "Updating"
        op = ctx.emu.start_operation(ctx, parent, "update")
        return ctx.emu.lro_reply(
            ctx, op, 200 if existing else 201, self.render_child(ctx.emu, parent, child), "async"
        )

    async def delete(self, ctx: Ctx) -> Reply:
        assert ctx.path is not None
        parent = self.parent(ctx)
        child = self.find(parent, ctx.path.name)
        if child is None:
            return Reply(204)
        self.busy(ctx, parent)
        self.check_child_delete(ctx.emu, parent, child)
        parent.body["properties"][self.list_key] = [
            c for c in self.children(parent) if c is not child
        ]
        parent.meta["etag"] = etag()
        parent.provisioning_state = "Updating"
        op = ctx.emu.start_operation(ctx, parent, "update")
        return ctx.emu.lro_reply(ctx, op, 202, None, "async+location")

    async def patch(self, ctx: Ctx) -> Reply:
        raise ArmError(
            405, "UnsupportedEmulatorOperation", "PATCH of a child resource is not supported."
        )

    def list(self, ctx: Ctx, scope_id: str) -> Reply:
        parent = ctx.emu.lookup(scope_id)
        if parent is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{scope_id}' was not found.")
        return Reply(
            200, {"value": [self.render_child(ctx.emu, parent, c) for c in self.children(parent)]}
        )


class Subnets(InlineChild):
    type_name = SUBNET
    parent_type = VNET
    list_key = "subnets"

    def render_child(
        self, emu: ArmEmulator, parent: StoredResource, child: dict[str, Any]
    ) -> dict[str, Any]:
        return render_subnet(emu, parent, child)

    def validate_children(
        self, emu: ArmEmulator, parent: StoredResource, children: list[dict[str, Any]]
    ) -> None:
        raw = (parent.body["properties"].get("addressSpace") or {}).get("addressPrefixes") or []
        space = [parse_prefix(p, parent.id) for p in raw]
        check_subnets(emu, parent.id, space, children, parent.location)

    def check_child_delete(
        self, emu: ArmEmulator, parent: StoredResource, child: dict[str, Any]
    ) -> None:
        sid = f"{parent.id}/subnets/{child['name']}"
        users = subnet_users(emu, sid)
        if users:
            raise in_use_subnet(sid, users)


# --- network security groups --------------------------------------------------------------

DEFAULT_RULES = [
    ("AllowVnetInBound", "Inbound", 65000, "Allow", "VirtualNetwork", "VirtualNetwork"),
    ("AllowAzureLoadBalancerInBound", "Inbound", 65001, "Allow", "AzureLoadBalancer", "*"),
    ("DenyAllInBound", "Inbound", 65500, "Deny", "*", "*"),
    ("AllowVnetOutBound", "Outbound", 65000, "Allow", "VirtualNetwork", "VirtualNetwork"),
    ("AllowInternetOutBound", "Outbound", 65001, "Allow", "*", "Internet"),
    ("DenyAllOutBound", "Outbound", 65500, "Deny", "*", "*"),
]


def check_rules(nsg_id: str, rules: list[dict[str, Any]]) -> None:
    seen_names: set[str] = set()
    seen_priority: dict[tuple[str, int], str] = {}
    for rule in rules:
        rid = f"{nsg_id}/securityRules/{rule.get('name')}"
        validate_security_rule(rule, rid)
        lname = rule["name"].lower()
        if lname in seen_names:
            raise ArmError(
                400,
                "DuplicateResourceName",
                f"Resource {nsg_id} has two child resources with the same name ({rule['name']}).",
            )
        seen_names.add(lname)
        props = rule["properties"]
        slot = (props["direction"], props["priority"])
        if slot in seen_priority:
            raise ArmError(
                400,
                "SecurityRuleConflict",
                f"Security rule {rule['name']} conflicts with rule {seen_priority[slot]}. Rules "
                "cannot have the same Priority and Direction.",
            )
        seen_priority[slot] = rule["name"]


def render_rule(nsg: StoredResource, rule: dict[str, Any], default: bool = False) -> dict[str, Any]:
    kind = "defaultSecurityRules" if default else "securityRules"
    props = copy.deepcopy(rule["properties"])
    props["provisioningState"] = "Succeeded"
    props.setdefault("sourceAddressPrefixes", [])
    props.setdefault("destinationAddressPrefixes", [])
    props.setdefault("sourcePortRanges", [])
    props.setdefault("destinationPortRanges", [])
    return child_resource(nsg, f"{nsg.id}/{kind}/{rule['name']}", f"{NSG}/{kind}", props)


class NetworkSecurityGroups(NetworkType):
    type_name = NSG

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        res = self.base_resource(ctx, existing, body)
        check_rules(res.id, res.body["properties"].setdefault("securityRules", []))
        self.stamp(res)
        return res

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        super().decorate(emu, res, doc, ctx)
        props = doc["properties"]
        props["securityRules"] = [
            render_rule(res, r) for r in res.body["properties"].get("securityRules", [])
        ]
        props["defaultSecurityRules"] = [
            render_rule(
                res,
                {
                    "name": name,
                    "properties": {
                        "description": name,
                        "protocol": "*",
                        "sourcePortRange": "*",
                        "destinationPortRange": "*",
                        "sourceAddressPrefix": src,
                        "destinationAddressPrefix": dst,
                        "access": access,
                        "priority": prio,
                        "direction": direction,
                    },
                },
                default=True,
            )
            for name, direction, prio, access, src, dst in DEFAULT_RULES
        ]
        nics = [
            n.id
            for n in emu.resources_of(NIC)
            if ids.same_id(ref_id(n.body["properties"].get("networkSecurityGroup")), res.id)
        ]
        if nics:
            props["networkInterfaces"] = [{"id": n} for n in nics]
        subnets = [
            f"{v.id}/subnets/{s['name']}"
            for v in emu.resources_of(VNET)
            for s in v.body["properties"].get("subnets", [])
            if ids.same_id(ref_id(s.get("properties", {}).get("networkSecurityGroup")), res.id)
        ]
        if subnets:
            props["subnets"] = [{"id": s} for s in subnets]

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        doc = self.render(emu, res)
        users = [
            u["id"]
            for u in doc["properties"].get("networkInterfaces", [])
            + doc["properties"].get("subnets", [])
        ]
        if users:
            raise ArmError(
                400,
                "InUseNetworkSecurityGroupCannotBeDeleted",
                f"Network security group {res.id} cannot be deleted because it is in use by the "
                f"following resources: {', '.join(users)}. In order to delete the Network "
                "security group, remove the association with the resource(s).",
            )


class SecurityRules(InlineChild):
    type_name = RULE
    parent_type = NSG
    list_key = "securityRules"

    def render_child(
        self, emu: ArmEmulator, parent: StoredResource, child: dict[str, Any]
    ) -> dict[str, Any]:
        return render_rule(parent, child)

    def validate_children(
        self, emu: ArmEmulator, parent: StoredResource, children: list[dict[str, Any]]
    ) -> None:
        check_rules(parent.id, children)


# --- public IP addresses ------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z][a-z0-9-]{1,61}[a-z0-9]$")


class PublicIPAddresses(NetworkType):
    type_name = PIP

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        res = self.base_resource(ctx, existing, body)
        props = res.body["properties"]
        sku = (res.body.get("sku") or {}).get("name", "Basic")
        tier = (res.body.get("sku") or {}).get("tier", "Regional")
        if sku == "Basic":
            raise ArmError(
                400,
                "IPv4BasicSkuPublicIpCountLimitReached",
                "Cannot create more than 0 IPv4 Basic SKU public IP addresses for this "
                "subscription in this region. Basic SKU public IPs are retired: use the "
                "Standard SKU.",
            )
        if sku not in ("Standard", "StandardV2"):
            raise bad_format(f"Public IP SKU '{sku}' is not valid.")
        method = props.get("publicIPAllocationMethod") or "Static"
        if method != "Static":
            raise ArmError(
                400,
                "StandardSkuPublicIPAddressesMustBeStatic",
                f"Standard sku publicIp {res.id} must have AllocationMethod set to Static.",
            )
        version = props.get("publicIPAddressVersion") or "IPv4"
        if version != "IPv4":
            raise bad_format("The ARM emulator assigns IPv4 public addresses only.")
        label = (props.get("dnsSettings") or {}).get("domainNameLabel")
        if label is not None and not _DNS_LABEL.match(label):
            raise ArmError(
                400,
                "InvalidDomainNameLabel",
                f"The domain name label {label} is invalid. It must conform to the following "
                "regular expression: ^[a-z][a-z0-9-]{1,61}[a-z0-9]$.",
            )
        if existing is not None and (existing.body.get("sku") or {}).get("name") != sku:
            raise ArmError(
                409, "PropertyChangeNotAllowed", "Changing property 'sku' is not allowed."
            )
        props["publicIPAllocationMethod"] = "Static"
        props["publicIPAddressVersion"] = "IPv4"
        props.setdefault("idleTimeoutInMinutes", 4)
        res.body["sku"] = {"name": sku, "tier": tier}
        if "ipAddress" not in res.meta:
            res.meta["ipAddress"] = ctx.emu.allocate_ip("public")
        self.stamp(res)
        return res

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        super().decorate(emu, res, doc, ctx)
        props = doc["properties"]
        props["ipAddress"] = res.meta.get("ipAddress")
        props["ipTags"] = props.get("ipTags", [])
        label = (props.get("dnsSettings") or {}).get("domainNameLabel")
        if label:
            props["dnsSettings"]["fqdn"] = f"{label}.{res.location}.cloudapp.azure.com"
        user = pip_user(emu, res.id)
        if user:
            props["ipConfiguration"] = {"id": user}

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        user = pip_user(emu, res.id)
        if user:
            raise ArmError(
                400,
                "PublicIPAddressCannotBeDeleted",
                f"Public IP address {res.id} can not be deleted since it is still allocated to "
                f"resource {user}. In order to delete the public IP, disassociate/detach the "
                "Public IP address from the resource.",
            )

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        emu.release_ip(res.meta.get("ipAddress"))


def pip_user(emu: ArmEmulator, pip_id: str, except_nic: str | None = None) -> str | None:
    for nic, cfg in nic_ip_configs(emu):
        if except_nic and ids.same_id(nic.id, except_nic):
            continue
        if ids.same_id(ref_id(cfg.get("properties", {}).get("publicIPAddress")), pip_id):
            return ip_config_id(nic, cfg)
    return None


# --- network interfaces -------------------------------------------------------------------


class NetworkInterfaces(NetworkType):
    type_name = NIC

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        emu = ctx.emu
        res = self.base_resource(ctx, existing, body)
        props = res.body["properties"]
        configs = props.get("ipConfigurations") or []
        if not configs:
            raise ArmError(
                400,
                "NetworkInterfaceMustHaveAtLeastOneIpConfiguration",
                f"Network interface {res.id} must have at least one IP configuration.",
            )
        nsg = ref_id(props.get("networkSecurityGroup"))
        if nsg is not None:
            found = emu.lookup(nsg)
            if found is None or found.type != NSG or found.location != res.location:
                raise invalid_resource_reference(nsg, res.id)
        names: set[str] = set()
        primaries = 0
        old_ips = {
            c["name"].lower(): c.get("properties", {}).get("privateIPAddress")
            for c in (existing.body["properties"].get("ipConfigurations", []) if existing else [])
        }
        for cfg in configs:
            name = cfg.get("name")
            if not name:
                raise bad_format("An IP configuration must have a name.")
            validate_network_name(name)
            if name.lower() in names:
                raise ArmError(
                    400,
                    "DuplicateResourceName",
                    f"Resource {res.id} has two child resources with the same name ({name}).",
                )
            names.add(name.lower())
            cid = f"{res.id}/ipConfigurations/{name}"
            cp = cfg.setdefault("properties", {})
            subnet_id = ref_id(cp.get("subnet"))
            if subnet_id is None:
                raise ArmError(
                    400,
                    "SubnetIsRequired",
                    f"IP configuration {cid} must reference a subnet.",
                )
            found_subnet = find_subnet(emu, subnet_id)
            if found_subnet is None or found_subnet[0].location != res.location:
                raise invalid_resource_reference(subnet_id, res.id)
            pip = ref_id(cp.get("publicIPAddress"))
            if pip is not None:
                found = emu.lookup(pip)
                if found is None or found.type != PIP or found.location != res.location:
                    raise invalid_resource_reference(pip, res.id)
                user = pip_user(emu, pip, except_nic=res.id)
                if user:
                    raise ArmError(
                        400,
                        "PublicIPAddressInUse",
                        f"Resource {cid} is referencing public IP address {pip} that is already "
                        f"allocated to resource {user}.",
                    )
            method = cp.get("privateIPAllocationMethod") or "Dynamic"
            if method not in ("Dynamic", "Static"):
                raise bad_format(f"privateIPAllocationMethod '{method}' is not valid.")
            if method == "Static":
                address = cp.get("privateIPAddress")
                sprops = found_subnet[1]["properties"]
                raw = [sprops.get("addressPrefix"), *(sprops.get("addressPrefixes") or [])]
                prefixes = [ipaddress.ip_network(p) for p in raw if p]
                try:
                    ok = any(ipaddress.ip_address(address) in p for p in prefixes)
                except ValueError:
                    ok = False
                if not ok:
                    raise ArmError(
                        400,
                        "PrivateIPAddressNotInSubnet",
                        f"IP configuration {cid} has private IP address {address} that does not "
                        f"belong to subnet {subnet_id}.",
                    )
            else:
                cp["privateIPAddress"] = old_ips.get(name.lower()) or emu.allocate_ip("private")
            cp["privateIPAllocationMethod"] = method
            cp.setdefault("privateIPAddressVersion", "IPv4")
            if len(configs) == 1:
                cp.setdefault("primary", True)
            primaries += 1 if cp.get("primary") else 0
        if primaries != 1:
            raise ArmError(
                400,
                "NetworkInterfaceMustHaveOnePrimaryIpConfiguration",
                f"Network interface {res.id} must have exactly one primary IP configuration.",
            )
        props.setdefault("enableAcceleratedNetworking", False)
        props.setdefault("enableIPForwarding", False)
        props.setdefault("nicType", "Standard")
        self.stamp(res)
        if existing is not None:
            # addresses no longer used by this NIC go back to the pool
            kept = {c["properties"].get("privateIPAddress") for c in configs}
            for ip in old_ips.values():
                if ip and ip not in kept:
                    emu.release_ip(ip)
        return res

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        super().decorate(emu, res, doc, ctx)
        props = doc["properties"]
        out = []
        for cfg in res.body["properties"].get("ipConfigurations", []):
            cp = copy.deepcopy(cfg["properties"])
            cp["provisioningState"] = (
                "Succeeded" if res.provisioning_state != "Failed" else "Failed"
            )
            out.append(
                {
                    "id": f"{res.id}/ipConfigurations/{cfg['name']}",
                    "name": cfg["name"],
                    "type": f"{NIC}/ipConfigurations",
                    "etag": res.meta.get("etag"),
                    "properties": cp,
                }
            )
        props["ipConfigurations"] = out
        vm = nic_vm(emu, res.id)
        if vm is not None:
            props["virtualMachine"] = {"id": vm.id}
            props["primary"] = True
            props["macAddress"] = res.meta.setdefault(
                "macAddress", "00-0D-3A-" + "-".join(f"{b:02X}" for b in uuid.uuid4().bytes[:3])
            )

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        vm = nic_vm(emu, res.id)
        if vm is not None:
            raise ArmError(
                400,
                "NicInUse",
                f"Network Interface {res.id} is used by existing resource {vm.id}. In order to "
                "delete the network interface, it must be dissociated from the resource. To "
                "learn more, see aka.ms/deletenic.",
            )

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        for cfg in res.body["properties"].get("ipConfigurations", []):
            if cfg["properties"].get("privateIPAllocationMethod") == "Dynamic":
                emu.release_ip(cfg["properties"].get("privateIPAddress"))

    def on_failed(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        res.provisioning_state = "Failed"


def nic_vm(emu: ArmEmulator, nic_id: str) -> StoredResource | None:
    for vm in emu.resources_of(VM):
        for ref in (vm.body["properties"].get("networkProfile") or {}).get("networkInterfaces", []):
            if ids.same_id(ref.get("id"), nic_id):
                return vm
    return None


def nic_addresses(emu: ArmEmulator, nic_id: str) -> tuple[str | None, str | None]:
    """(public IP, private IP) of a NIC's primary IP configuration."""
    nic = emu.lookup(nic_id)
    if nic is None:
        return None, None
    configs = nic.body["properties"].get("ipConfigurations", [])
    cfg = next(
        (c for c in configs if c["properties"].get("primary")), configs[0] if configs else None
    )
    if cfg is None:
        return None, None
    private = cfg["properties"].get("privateIPAddress")
    pip_id = ref_id(cfg["properties"].get("publicIPAddress"))
    pip = emu.lookup(pip_id) if pip_id else None
    return (pip.meta.get("ipAddress") if pip else None), private
