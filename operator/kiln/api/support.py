"""What Kiln does with each AIB property, per provider, in one table.

The README's property table is rendered from it (a test keeps them equal), and a
template that sets a property a provider does not use gets a PropertiesNotUsed
condition and event naming it and saying why: nothing is accepted in silence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kiln.api.capabilities import Provider
from kiln.api.template import (
    ImageTemplateSpec,
    PlatformImageSource,
    SharedImageDistributor,
    State,
)


@dataclass(frozen=True)
class Use:
    """What one provider does with a property; used False: it is accepted but ignored."""

    text: str
    used: bool = True


def ignored(why: str) -> Use:
    return Use(text=f"not used: {why}", used=False)


def _profile(spec: ImageTemplateSpec) -> object:
    return spec.vm_profile


def _vnet(spec: ImageTemplateSpec) -> object:
    return spec.vm_profile.vnet_config if spec.vm_profile else None


def _shared(spec: ImageTemplateSpec) -> Iterable[SharedImageDistributor]:
    return (d for d in spec.distribute if isinstance(d, SharedImageDistributor))


def _set(value: object) -> bool:
    return value is not None and value != [] and value != {} and value != ""


@dataclass(frozen=True)
class Property:
    path: str  # under spec, as AIB names it
    local: Use
    azure: Use
    is_set: Callable[[ImageTemplateSpec], bool]

    def use(self, provider: Provider) -> Use:
        return self.local if provider == Provider.local else self.azure


def _attr(getter: Callable[[ImageTemplateSpec], object], field: str) -> Callable[..., bool]:
    return lambda spec: _set(getattr(getter(spec), field, None))


NO_MARKETPLACE = "the local provider has no marketplace, so no purchase plan"
NO_AZURE_VM = "the local build VM is a QEMU process, not an Azure VM"
REACHES_PRIVATE_IP = (
    "Kiln needs no proxy VM or container instance: the operator reaches the build VM's "
    "private IP itself (it must run where the subnet is routable)"
)
VM_BOOT = (
    "AIB's boot optimization is done inside the Image Builder service and has no API "
    "Kiln could call; the image is published unoptimized"
)

PROPERTIES: tuple[Property, ...] = (
    Property(
        "source.planInfo",
        ignored(NO_MARKETPLACE),
        Use("the build VM's purchase plan"),
        lambda s: isinstance(s.source, PlatformImageSource) and s.source.plan_info is not None,
    ),
    Property(
        "identity",
        ignored("the local provider uses no Azure identity; scripts are fetched by the operator"),
        Use(
            "assigned to the build VM, as AIB does; Kiln itself acts in Azure (and reads "
            "private scripts) with the namespace's federated identity, spec.serviceAccountName"
        ),
        lambda s: s.identity is not None and s.identity.type == "UserAssigned",
    ),
    Property(
        "vmProfile.vmSize",
        Use("vCPUs and memory of Azure's size, capped by the host"),
        Use("the build VM's size"),
        _attr(_profile, "vm_size"),
    ),
    Property(
        "vmProfile.osDiskSizeGB",
        Use("grows the OS disk and its file system"),
        Use("the OS disk's size"),
        _attr(_profile, "os_disk_size_gb"),
    ),
    Property(
        "vmProfile.userAssignedIdentities",
        ignored(NO_AZURE_VM),
        Use("assigned to the build VM"),
        _attr(_profile, "user_assigned_identities"),
    ),
    Property(
        "vmProfile.vnetConfig.subnetId",
        ignored(f"{NO_AZURE_VM}; it is reached on loopback"),
        Use("the build VM's NIC in that subnet, private IP only"),
        _attr(_vnet, "subnet_id"),
    ),
    Property(
        "vmProfile.vnetConfig.proxyVmSize",
        ignored(NO_AZURE_VM),
        ignored(REACHES_PRIVATE_IP),
        _attr(_vnet, "proxy_vm_size"),
    ),
    Property(
        "vmProfile.vnetConfig.containerInstanceSubnetId",
        ignored(NO_AZURE_VM),
        ignored(REACHES_PRIVATE_IP),
        _attr(_vnet, "container_instance_subnet_id"),
    ),
    Property(
        "additionalDataDisks",
        Use("empty qcow2 disks on the build VM, captured beside the OS disk"),
        Use("empty managed data disks, captured into the managed image and gallery version"),
        _attr(lambda s: s, "additional_data_disks"),
    ),
    Property(
        "optimize.vmBoot",
        ignored(VM_BOOT),
        ignored(VM_BOOT),
        lambda s: bool(
            s.optimize and s.optimize.vm_boot and s.optimize.vm_boot.state == State.Enabled
        ),
    ),
    Property(
        "optimize.workload",
        Use("scriptUri runs (checksum checked) after the customizers"),
        Use("scriptUri runs (checksum checked) after the customizers"),
        lambda s: bool(s.optimize and s.optimize.workload),
    ),
    Property(
        "managedResourceTags",
        ignored("the local provider creates no Azure resources to tag"),
        Use("tags on the staging group and every resource Kiln creates"),
        _attr(lambda s: s, "managed_resource_tags"),
    ),
    Property(
        "distribute[].replicationMode",
        ignored("local replicas are hard links, always complete"),
        Use("the gallery version's replication mode"),
        lambda s: any(d.replication_mode for d in _shared(s)),
    ),
    Property(
        "distribute[].targetRegions[].storageAccountType",
        ignored("local replicas are files, with no storage type"),
        Use("each region's replica storage"),
        lambda s: (
            any(r.storage_account_type for d in _shared(s) for r in d.target_regions or [])
            or any(d.storage_account_type for d in _shared(s))
        ),
    ),
)


@dataclass(frozen=True)
class NotUsed:
    path: str
    why: str

    def __str__(self) -> str:
        return f"spec.{self.path} ({self.why.removeprefix('not used: ')})"


def not_used(spec: ImageTemplateSpec, provider: Provider) -> list[NotUsed]:
    """The properties the template sets that the provider accepts but does not use."""
    return [
        NotUsed(p.path, p.use(provider).text)
        for p in PROPERTIES
        if not p.use(provider).used and p.is_set(spec)
    ]


def describe_not_used(found: list[NotUsed], provider: Provider) -> str:
    listed = "; ".join(str(n) for n in found)
    return (
        f"The {provider} provider does not use {listed}. The build ignores them; remove "
        "them to silence this."
    )


def markdown_table() -> str:
    """The README's table: property, what Kiln does on each provider."""
    lines = ["| property | local | azure |", "|---|---|---|"]
    lines += [f"| `{p.path}` | {p.local.text} | {p.azure.text} |" for p in PROPERTIES]
    return "\n".join(lines) + "\n"
