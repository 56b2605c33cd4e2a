"""The azure provider: the build happens in an Azure subscription, as AIB does it.

Staging resource group IT_<resourceGroup>_<template>_<guid> with a storage account for
logs; per run a network (or a NIC in the template's subnet), a build VM reached over SSH
with a per-run key and a host key injected through customData, or for a Windows source
over WinRM/HTTPS with a per-run password and a certificate that Azure's VM agent installs
from a per-run Key Vault; capture by deallocate + generalize; distribution to managed
images, gallery image versions and VHD blobs.
Everything Kiln creates is tagged with the template and run; only tagged resources are
ever deleted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from kiln.api.capabilities import Provider, capabilities
from kiln.api.distribution import PlannedTarget, TargetKind
from kiln.api.run import VhdCopy
from kiln.api.status import RunOutput
from kiln.api.template import (
    FileStep,
    ImageTemplateSpec,
    ManagedImageSource,
    PlatformImageSource,
    PowerShellStep,
    ShellStep,
    WindowsRestartStep,
    WindowsUpdateStep,
)
from kiln.communicators.ssh import SshCommunicator
from kiln.communicators.winrm import WINRM_HTTPS_PORT, key_vault_certificate
from kiln.kube import Kube
from kiln.naming import BUILD_COMPUTER_NAME, staging_group_name
from kiln.pipeline.logs import COMBINED
from kiln.providers.azure import operations as ops
from kiln.providers.azure import vhdcopy
from kiln.providers.azure.clients import (
    AzureClients,
    IdentityRef,
    make_clients,
    namespace_credential,
    tenant_of,
    transport_options,
)
from kiln.providers.azure.errors import classify
from kiln.providers.base import Endpoint, ProviderError, RunContext, TemplateIdentity
from kiln.settings import OperatorSettings
from kiln.versions import version_key

WINDOWS_STEPS = (PowerShellStep, WindowsRestartStep, WindowsUpdateStep)
BUILD_USER = "packer"
SSH_PORT = 22
VAULT_TYPE = "Microsoft.KeyVault/vaults"
WINRM_SECRET = "winrm-certificate"
LOG_CONTAINER = "packerlogs"
VHD_CONTAINER = "vhds"
APPEND_BLOCK = 4 * 1024 * 1024  # the largest block an append blob takes
ROLE_TAG, TEMPLATE_TAG, RUN_TAG = "kiln-role", "kiln-template-uid", "kiln-run-uid"
_ARM_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/(?P<ns>[^/]+)/"
    r"(?P<rest>.+)$",
    re.I,
)


def parse_id(resource_id: str) -> tuple[str, str, list[str]]:
    """(subscription, resource group, [type, name, type, name, ...]) of an ARM ID."""
    match = _ARM_ID.match(resource_id)
    if not match:
        raise ProviderError(f"{resource_id!r} is not an Azure resource ID")
    return match["sub"], match["rg"], match["rest"].split("/")


def storage_account_name(template_uid: str) -> str:
    """3-24 lowercase letters and digits, unique per template (accounts are global)."""
    return "kiln" + hashlib.sha256(template_uid.encode()).hexdigest()[:20]


def vault_name(run_uid: str) -> str:
    """3-24 characters starting with a letter, unique per run (vault names are global)."""
    return "kiln" + hashlib.sha256(run_uid.encode()).hexdigest()[:20]


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def check_steps_fit(spec: ImageTemplateSpec, os_type: str) -> None:
    """The template's steps must suit the source image's OS, and Kiln must run them."""
    phases = [("customize", spec.customize or [])]
    if spec.validate_ and spec.validate_.in_vm_validations:
        phases.append(("validate.inVMValidations", spec.validate_.in_vm_validations))
    for phase, steps in phases:
        for index, step in enumerate(steps):
            where = f"spec.{phase}[{index}] ({step.type})"
            if os_type == "Linux" and isinstance(step, WINDOWS_STEPS):
                raise ProviderError(
                    f"{where} needs Windows, but the source image runs Linux; use Shell steps"
                )
            if os_type == "Windows" and isinstance(step, ShellStep):
                raise ProviderError(
                    f"{where} needs Linux, but the source image runs Windows; use PowerShell steps"
                )
            if (
                os_type == "Windows"
                and not capabilities(Provider.azure).windows_customizers
                and isinstance(step, (*WINDOWS_STEPS, FileStep))
            ):
                raise ProviderError(
                    f"{where}: Kiln does not run customizers on Windows build VMs yet (the "
                    "VM, its WinRM connection and sysprep work); remove the step, or keep "
                    "this template on AIB for now"
                )


class AzureProvider:
    name = "azure"

    def __init__(self, settings: OperatorSettings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self._clients: dict[tuple[str, IdentityRef], AzureClients] = {}
        self._account_keys: dict[str, tuple[str, str]] = {}  # account -> (endpoint, key)

    def _subscription(self, spec: ImageTemplateSpec) -> str:
        subscription = spec.subscription_id or self.settings.subscription_id
        if not subscription:
            raise ProviderError(
                "no Azure subscription: set spec.subscriptionId or KILN_SUBSCRIPTION_ID"
            )
        return subscription

    async def clients(self, spec: ImageTemplateSpec, namespace: str) -> AzureClients:
        """Clients signed in as the template's identity (see IdentityRef)."""
        ref = IdentityRef(namespace, spec.service_account_name)
        return await self.clients_for(self._subscription(spec), ref)

    async def clients_for(self, subscription: str, ref: IdentityRef) -> AzureClients:
        key = (subscription, ref)
        if key not in self._clients:
            credential = await namespace_credential(self.settings, self.kube, ref)
            self._clients[key] = make_clients(self.settings, credential, subscription)
        return self._clients[key]

    async def close(self) -> None:
        for clients in self._clients.values():
            await clients.close()
        self._clients.clear()

    # --- names and tags ----------------------------------------------------------------

    def staging_group(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        if spec.staging_resource_group:
            return spec.staging_resource_group.rstrip("/").rsplit("/", 1)[-1]
        return staging_group_name(spec.resource_group or "", template.name, template.uid)

    def staging_id(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        group = self.staging_group(template, spec)
        return f"/subscriptions/{self._subscription(spec)}/resourceGroups/{group}"

    def run_dir(self, template: TemplateIdentity, spec: ImageTemplateSpec, run: str) -> Path:
        return self.settings.data_root / "azure" / self.staging_group(template, spec) / run

    @staticmethod
    def _tags(ctx: RunContext, role: str, run: bool = True) -> dict[str, str]:
        tags = dict(ctx.spec.managed_resource_tags or {})
        tags |= {
            "createdBy": "AzureVMImageBuilder",
            "imageTemplateName": ctx.template.name,
            "imageTemplateResourceGroupName": ctx.spec.resource_group or "",
            ROLE_TAG: role,
            TEMPLATE_TAG: ctx.template.uid,
        }
        if run:
            tags[RUN_TAG] = ctx.run_uid
        return tags

    def _names(self, ctx: RunContext) -> dict[str, str]:
        prefix = f"kiln-{ctx.run_uid[:8]}"
        return {kind: f"{prefix}-{kind}" for kind in ("vnet", "nsg", "pip", "nic", "vm", "osdisk")}

    # --- staging -------------------------------------------------------------------------

    async def ensure_staging(self, ctx: RunContext) -> str:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        location = ctx.spec.location
        exists = await ops.call(clients.resource.resource_groups.check_existence(group))
        if exists:
            current = await ops.call(clients.resource.resource_groups.get(group))
            owner = (current.tags or {}).get(TEMPLATE_TAG)
            if owner != ctx.template.uid:
                resources = [
                    r async for r in clients.resource.resources.list_by_resource_group(group)
                ]
                if owner is not None or resources:
                    raise ProviderError(
                        f"staging resource group {group} is not empty and not this template's; "
                        "spec.stagingResourceGroup must name an empty or new group"
                    )
        body = {"location": location, "tags": self._tags(ctx, "staging", run=False)}
        await ops.call(clients.resource.resource_groups.create_or_update(group, body))
        account = storage_account_name(ctx.template.uid)
        account_body = {
            "location": location,
            "sku": {"name": "Standard_LRS"},
            "kind": "StorageV2",
            "tags": self._tags(ctx, "staging-storage", run=False),
            "properties": {"minimumTlsVersion": "TLS1_2", "allowBlobPublicAccess": False},
        }
        operations = ctx.checkpoint.azure.operations
        await ops.ensure_all(
            operations,
            {
                "storage": lambda **kw: clients.storage.storage_accounts.begin_create(
                    group, account, account_body, **kw
                )
            },
            "creating the staging storage account",
        )
        return self.staging_id(ctx.template, ctx.spec)

    async def delete_staging(
        self,
        template: TemplateIdentity,
        staging: str,
        *,
        keep_group: bool,
        service_account: str | None = None,
    ) -> None:
        parts = staging.strip("/").split("/")  # subscriptions/SUB/resourceGroups/NAME
        ref = IdentityRef(template.namespace, service_account)
        clients = await self.clients_for(parts[1], ref)
        await self._delete_group(clients, parts[3], template, keep_group)

    async def _delete_group(
        self, clients: AzureClients, group: str, template: TemplateIdentity, keep_group: bool
    ) -> None:
        if not await ops.call(clients.resource.resource_groups.check_existence(group)):
            return
        current = await ops.call(clients.resource.resource_groups.get(group))
        if (current.tags or {}).get(TEMPLATE_TAG) != template.uid:
            return  # never delete what Kiln did not make
        vaults = [
            resource
            async for resource in clients.resource.resources.list_by_resource_group(group)
            if (resource.type or "").lower() == VAULT_TYPE.lower()
        ]
        for resource in vaults:
            await self._delete_vault(
                clients, group, resource.name, resource.location, TEMPLATE_TAG, template.uid
            )
        if not keep_group:
            poller = await ops.call(clients.resource.resource_groups.begin_delete(group))
            await ops.call(poller.result())
            return
        ours = [
            resource
            async for resource in clients.resource.resources.list_by_resource_group(group)
            if (resource.tags or {}).get(TEMPLATE_TAG) == template.uid
        ]
        kinds = _deletable(clients)
        for resource in sorted(
            ours, key=lambda r: list(kinds).index(r.type) if r.type in kinds else 99
        ):
            if resource.type not in kinds:
                raise ProviderError(f"Kiln cannot delete {resource.type} {resource.id}")
            operation_group, long_running = kinds[resource.type]
            if long_running:
                poller = await ops.call(operation_group.begin_delete(group, resource.name))
                await ops.call(poller.result())
            else:
                await ops.call(operation_group.delete(group, resource.name))

    async def publish_logs(self, ctx: RunContext) -> None:
        """The customization log to the staging account, as AIB's packerlogs/<run>/: an
        append blob that gets only the bytes it lacks (the log only grows)."""
        log = ctx.run_dir / COMBINED
        if not log.exists():
            return
        service = await self._staging_blobs(ctx)
        async with service:
            container = service.get_container_client(LOG_CONTAINER)
            blob = container.get_blob_client(f"{ctx.run_name}/{COMBINED}")
            try:
                uploaded = (await blob.get_blob_properties()).size
            except ResourceNotFoundError:
                if not await container.exists():
                    await container.create_container()
                await blob.create_append_blob()
                uploaded = 0
            while chunk := await asyncio.to_thread(_read_from, log, uploaded, APPEND_BLOCK):
                await blob.append_block(chunk, appendpos_condition=uploaded)
                uploaded += len(chunk)
            ctx.checkpoint.log_uri = blob.url.split("?", 1)[0]

    async def _staging_blobs(self, ctx: RunContext) -> BlobServiceClient:
        """A client for the template's staging account; its key is listed once per
        account and operator process, not on every upload."""
        group = self.staging_group(ctx.template, ctx.spec)
        name = storage_account_name(ctx.template.uid)
        if name not in self._account_keys:
            clients = await self.clients(ctx.spec, ctx.template.namespace)
            account = await ops.call(clients.storage.storage_accounts.get_properties(group, name))
            keys = await ops.call(clients.storage.storage_accounts.list_keys(group, name))
            key_list = getattr(keys, "keys_property", None) or keys.keys
            self._account_keys[name] = (account.primary_endpoints.blob, key_list[0].value)
        endpoint, key = self._account_keys[name]
        return BlobServiceClient(endpoint, credential=key, **transport_options(self.settings))

    # --- source --------------------------------------------------------------------------

    async def resolve_source(self, ctx: RunContext) -> str:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        source = ctx.spec.source
        if isinstance(source, PlatformImageSource):
            version = source.version
            if version.lower() == "latest":
                version = await self._latest_platform_version(clients, ctx.spec)
            image = await ops.call(
                clients.compute.virtual_machine_images.get(
                    ctx.spec.location, source.publisher, source.offer, source.sku, version
                )
            )
            os_type = image.os_disk_image.operating_system if image.os_disk_image else "Linux"
            generation = image.hyper_v_generation
            reference: dict[str, Any] = {
                "publisher": source.publisher,
                "offer": source.offer,
                "sku": source.sku,
                "version": version,
            }
            exact = ":".join((source.publisher, source.offer, source.sku, version))
            ctx.checkpoint.source_version = version
        elif isinstance(source, ManagedImageSource):
            _, group, parts = parse_id(source.image_id)
            managed = await ops.call(clients.compute.images.get(group, parts[-1]))
            os_type = managed.storage_profile.os_disk.os_type
            generation = managed.hyper_v_generation
            reference, exact = {"id": source.image_id}, source.image_id
        else:
            exact = await self._gallery_version(clients, source.image_version_id)
            _, group, parts = parse_id(exact)
            definition = await ops.call(
                clients.compute.gallery_images.get(group, parts[1], parts[3])
            )
            os_type = definition.os_type
            generation = definition.hyper_v_generation
            reference = {"id": exact}
            ctx.checkpoint.source_version = exact.rsplit("/", 1)[-1]
        ctx.checkpoint.os_type = _enum_value(os_type)
        ctx.checkpoint.azure.hyper_v_generation = _enum_value(generation) if generation else "V1"
        check_steps_fit(ctx.spec, ctx.checkpoint.os_type)
        ctx.checkpoint.azure.image_reference = reference
        return exact

    async def _latest_platform_version(self, clients: AzureClients, spec: ImageTemplateSpec) -> str:
        source = spec.source
        assert isinstance(source, PlatformImageSource)
        images = await ops.call(
            clients.compute.virtual_machine_images.list(
                spec.location, source.publisher, source.offer, source.sku
            )
        )
        if not images:
            raise ProviderError(
                f"no versions of {source.publisher}:{source.offer}:{source.sku} in {spec.location}"
            )
        return max((image.name for image in images), key=version_key)

    async def _gallery_version(self, clients: AzureClients, version_id: str) -> str:
        _, group, parts = parse_id(version_id)
        gallery, definition, version = parts[1], parts[3], parts[5]
        if version.lower() != "latest":
            await ops.call(
                clients.compute.gallery_image_versions.get(group, gallery, definition, version)
            )
            return version_id
        versions = [
            v
            async for v in clients.compute.gallery_image_versions.list_by_gallery_image(
                group, gallery, definition
            )
            if not (v.publishing_profile and v.publishing_profile.exclude_from_latest)
            and v.provisioning_state == "Succeeded"
        ]
        if not versions:
            raise ProviderError(f"{version_id}: the image definition has no version to use")
        newest = max(versions, key=lambda v: version_key(v.name))
        return f"{version_id.rsplit('/', 1)[0]}/{newest.name}"

    async def latest_source_version(self, spec: ImageTemplateSpec, namespace: str) -> str | None:
        clients = await self.clients(spec, namespace)
        source = spec.source
        if isinstance(source, PlatformImageSource):
            return await self._latest_platform_version(clients, spec)
        if isinstance(source, ManagedImageSource):
            return None
        return await self._gallery_version(clients, source.image_version_id)

    # --- build VM ------------------------------------------------------------------------

    @staticmethod
    def _vm_size(ctx: RunContext) -> str:
        """AIB's defaults: Standard_D1_v2 for Gen1 images, Standard_D2ds_v4 for Gen2."""
        profile = ctx.spec.vm_profile
        if profile and profile.vm_size:
            return profile.vm_size
        return "Standard_D2ds_v4" if _generation(ctx) == "V2" else "Standard_D1_v2"

    def _custom_data(self, ctx: RunContext) -> str:
        """cloud-init: the host key Kiln generated, so the VM is verified, never trusted."""
        config = {
            "ssh_deletekeys": True,
            "ssh_keys": {
                "ed25519_private": ctx.host_private_key,
                "ed25519_public": ctx.host_public_key,
            },
        }
        document = "#cloud-config\n" + yaml.safe_dump(config)
        return base64.b64encode(document.encode()).decode()

    @staticmethod
    def _port(ctx: RunContext) -> int:
        return WINRM_HTTPS_PORT if ctx.windows else SSH_PORT

    def _os_profile(self, ctx: RunContext, vault_id: str, certificate_url: str) -> dict[str, Any]:
        """Linux: key login only, host key via cloud-init. Windows: password login over
        a WinRM HTTPS listener whose certificate the VM agent installs from Key Vault."""
        if not ctx.windows:
            return {
                "computerName": BUILD_COMPUTER_NAME,
                "adminUsername": BUILD_USER,
                "customData": self._custom_data(ctx),
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {
                        "publicKeys": [
                            {
                                "path": f"/home/{BUILD_USER}/.ssh/authorized_keys",
                                "keyData": ctx.client_public_key,
                            }
                        ]
                    },
                },
            }
        assert ctx.winrm is not None
        return {
            "computerName": BUILD_COMPUTER_NAME,
            "adminUsername": BUILD_USER,
            "adminPassword": ctx.winrm.password.get_secret_value(),
            "secrets": [
                {
                    "sourceVault": {"id": vault_id},
                    "vaultCertificates": [
                        {"certificateUrl": certificate_url, "certificateStore": "My"}
                    ],
                }
            ],
            "windowsConfiguration": {
                "provisionVMAgent": True,
                "enableAutomaticUpdates": False,
                "winRM": {"listeners": [{"protocol": "Https", "certificateUrl": certificate_url}]},
            },
        }

    async def _winrm_vault(self, ctx: RunContext, clients: AzureClients, group: str) -> str:
        """The vault ID; the certificate's secret URL goes to the checkpoint (one version)."""
        assert ctx.winrm is not None
        name = vault_name(ctx.run_uid)
        body = {
            "location": ctx.spec.location,
            "tags": self._tags(ctx, "winrm-vault"),
            "properties": {
                "tenantId": await tenant_of(clients.credential, self.settings.azure_arm_endpoint),
                "sku": {"family": "A", "name": "standard"},
                "accessPolicies": [],
                "enabledForDeployment": True,
                "softDeleteRetentionInDays": 7,
            },
        }
        await ops.ensure_all(
            ctx.checkpoint.azure.operations,
            {
                "vault": lambda **kw: clients.keyvault.vaults.begin_create_or_update(
                    group, name, body, **kw
                )
            },
            "creating the Key Vault for the WinRM certificate",
        )
        if ctx.checkpoint.azure.winrm_certificate_url is None:
            secret = await ops.call(
                clients.keyvault.secrets.create_or_update(
                    group,
                    name,
                    WINRM_SECRET,
                    {
                        "properties": {
                            "value": key_vault_certificate(ctx.winrm),
                            "contentType": "application/x-pkcs12",
                        }
                    },
                )
            )
            ctx.checkpoint.azure.winrm_certificate_url = secret.properties.secret_uri_with_version
        return f"{self.staging_id(ctx.template, ctx.spec)}/providers/{VAULT_TYPE}/{name}"

    async def _network(self, ctx: RunContext, clients: AzureClients, group: str) -> str:
        """The NIC's ID: in the template's subnet, or on a new network with a public IP."""
        names = self._names(ctx)
        location = ctx.spec.location
        operations = ctx.checkpoint.azure.operations
        network = clients.network
        vnet_config = ctx.spec.vm_profile.vnet_config if ctx.spec.vm_profile else None
        ip_configuration: dict[str, Any]
        if vnet_config and vnet_config.subnet_id:
            ip_configuration = {"subnet": {"id": vnet_config.subnet_id}}
            nsg_ref: dict[str, Any] = {}
        else:
            vnet = {
                "location": location,
                "tags": self._tags(ctx, "network"),
                "properties": {
                    "addressSpace": {"addressPrefixes": ["10.0.0.0/24"]},
                    "subnets": [{"name": "build", "properties": {"addressPrefix": "10.0.0.0/24"}}],
                },
            }
            nsg = {
                "location": location,
                "tags": self._tags(ctx, "network"),
                "properties": {
                    "securityRules": [
                        {
                            "name": "AllowCommunicator",
                            "properties": {
                                "protocol": "Tcp",
                                "access": "Allow",
                                "direction": "Inbound",
                                "priority": 100,
                                "sourceAddressPrefix": self.settings.azure_communicator_source,
                                "sourcePortRange": "*",
                                "destinationAddressPrefix": "*",
                                "destinationPortRange": str(self._port(ctx)),
                            },
                        }
                    ]
                },
            }
            pip = {
                "location": location,
                "tags": self._tags(ctx, "network"),
                "sku": {"name": "Standard"},
                "properties": {"publicIPAllocationMethod": "Static"},
            }
            await ops.ensure_all(
                operations,
                {
                    "vnet": lambda **kw: network.virtual_networks.begin_create_or_update(
                        group, names["vnet"], vnet, **kw
                    ),
                    "nsg": lambda **kw: network.network_security_groups.begin_create_or_update(
                        group, names["nsg"], nsg, **kw
                    ),
                    "pip": lambda **kw: network.public_ip_addresses.begin_create_or_update(
                        group, names["pip"], pip, **kw
                    ),
                },
                "creating the build network",
            )
            prefix = f"{self.staging_id(ctx.template, ctx.spec)}/providers/Microsoft.Network"
            ip_configuration = {
                "subnet": {"id": f"{prefix}/virtualNetworks/{names['vnet']}/subnets/build"},
                "publicIPAddress": {"id": f"{prefix}/publicIPAddresses/{names['pip']}"},
            }
            nsg_ref = {
                "networkSecurityGroup": {"id": f"{prefix}/networkSecurityGroups/{names['nsg']}"}
            }
        nic = {
            "location": location,
            "tags": self._tags(ctx, "network"),
            "properties": {
                **nsg_ref,
                "ipConfigurations": [
                    {
                        "name": "build",
                        "properties": {"privateIPAllocationMethod": "Dynamic", **ip_configuration},
                    }
                ],
            },
        }
        await ops.ensure_all(
            operations,
            {
                "nic": lambda **kw: network.network_interfaces.begin_create_or_update(
                    group, names["nic"], nic, **kw
                )
            },
            "creating the build VM's network interface",
        )
        created = await ops.call(network.network_interfaces.get(group, names["nic"]))
        return str(created.id)

    async def create_vm(self, ctx: RunContext) -> Endpoint:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        names = self._names(ctx)
        # The network and a Windows VM's Key Vault do not depend on each other.
        prepared = await asyncio.gather(
            self._network(ctx, clients, group),
            self._winrm_vault(ctx, clients, group) if ctx.windows else _nothing(),
            return_exceptions=True,
        )
        errors = [outcome for outcome in prepared if isinstance(outcome, BaseException)]
        if errors:  # a fatal error before one that only says "not yet"
            raise min(errors, key=lambda e: isinstance(e, ProviderError) and not e.fatal)
        nic_id, vault_id = (str(outcome) for outcome in prepared)
        profile = ctx.spec.vm_profile
        os_disk: dict[str, Any] = {
            "name": names["osdisk"],
            "createOption": "FromImage",
            "deleteOption": "Delete",
            "managedDisk": {"storageAccountType": "Standard_LRS"},
        }
        if profile and profile.os_disk_size_gb:
            os_disk["diskSizeGB"] = profile.os_disk_size_gb
        vm: dict[str, Any] = {
            "location": ctx.spec.location,
            "tags": self._tags(ctx, "build-vm"),
            "properties": {
                "hardwareProfile": {"vmSize": self._vm_size(ctx)},
                "storageProfile": {
                    "imageReference": ctx.checkpoint.azure.image_reference,
                    "osDisk": os_disk,
                },
                "osProfile": self._os_profile(
                    ctx, vault_id, ctx.checkpoint.azure.winrm_certificate_url or ""
                ),
                "networkProfile": {
                    "networkInterfaces": [{"id": nic_id, "properties": {"primary": True}}]
                },
            },
        }
        source = ctx.spec.source
        if isinstance(source, PlatformImageSource) and source.plan_info:
            plan = source.plan_info
            vm["plan"] = {
                "name": plan.plan_name,
                "product": plan.plan_product,
                "publisher": plan.plan_publisher,
            }
        if profile and profile.user_assigned_identities:
            vm["identity"] = {
                "type": "UserAssigned",
                "userAssignedIdentities": {
                    identity: {} for identity in profile.user_assigned_identities
                },
            }
        operations = ctx.checkpoint.azure.operations
        await ops.ensure_all(
            operations,
            {
                "vm": lambda **kw: clients.compute.virtual_machines.begin_create_or_update(
                    group, names["vm"], vm, **kw
                )
            },
            "creating the build VM",
        )
        ctx.checkpoint.azure.vm_id = (
            await ops.call(clients.compute.virtual_machines.get(group, names["vm"]))
        ).id
        return Endpoint(
            host=await self._address(ctx, clients, group), port=self._port(ctx), user=BUILD_USER
        )

    async def _address(self, ctx: RunContext, clients: AzureClients, group: str) -> str:
        names = self._names(ctx)
        nic = await ops.call(clients.network.network_interfaces.get(group, names["nic"]))
        configuration = nic.ip_configurations[0]
        if configuration.public_ip_address is None:
            return str(configuration.private_ip_address)
        pip = await ops.call(clients.network.public_ip_addresses.get(group, names["pip"]))
        return str(pip.ip_address)

    async def collect_from_vm(self, ctx: RunContext, communicator: SshCommunicator) -> None:
        """Azure keeps the VM's disk; nothing to fetch before shutdown."""

    async def stop_vm(self, ctx: RunContext) -> bool:
        """Deallocate, then generalize: what capture needs."""
        if ctx.checkpoint.azure.generalized:
            return True
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group, name = self.staging_group(ctx.template, ctx.spec), self._names(ctx)["vm"]
        await ops.ensure_all(
            ctx.checkpoint.azure.operations,
            {
                "deallocate": lambda **kw: clients.compute.virtual_machines.begin_deallocate(
                    group, name, **kw
                )
            },
            "deallocating the build VM",
        )
        await ops.call(clients.compute.virtual_machines.generalize(group, name))
        ctx.checkpoint.azure.generalized = True
        return True

    async def capture(self, ctx: RunContext) -> None:
        """Azure captures from the generalized VM in each distributor."""

    def describe_vm(self, ctx: RunContext) -> str:
        endpoint = ctx.checkpoint.endpoint
        secret = f"the operator's Secret {ctx.key_secret}"
        host = endpoint.host if endpoint else "?"
        if ctx.windows:
            how = (
                f"WinRM over HTTPS to {host}:{WINRM_HTTPS_PORT} as {BUILD_USER}, password and "
                f"certificate in {secret} (winrm-password, winrm-certificate)"
            )
        else:
            how = f"ssh {BUILD_USER}@{host} with the key in {secret} (ssh-privatekey)"
        return (
            f"the build VM {ctx.checkpoint.azure.vm_id or ''} is kept: {how}; "
            "delete the run to remove it"
        )

    async def delete_vm(self, ctx: RunContext) -> None:
        """Build resources in reverse order; only those tagged with this run."""
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        names = self._names(ctx)
        run_resources = {
            "Microsoft.Compute/virtualMachines": names["vm"],
            "Microsoft.Compute/disks": names["osdisk"],
            "Microsoft.Network/networkInterfaces": names["nic"],
            "Microsoft.Network/publicIPAddresses": names["pip"],
            "Microsoft.Network/networkSecurityGroups": names["nsg"],
            "Microsoft.Network/virtualNetworks": names["vnet"],
        }
        for kind, (operation_group, _) in _deletable(clients).items():
            if kind in run_resources:
                await self._delete_if_ours(ctx, operation_group, group, run_resources[kind])
        if ctx.windows:  # only Windows build VMs get a Key Vault
            await self._delete_vault(
                clients, group, vault_name(ctx.run_uid), ctx.spec.location, RUN_TAG, ctx.run_uid
            )

    async def sweep(self, keep: set[str]) -> list[str]:
        """Resources tagged with a run UID not in keep, in every subscription in use,
        deleted in dependency order (VM first, network last, vaults purged)."""
        keys = set(self._clients)
        if self.settings.subscription_id:  # the operator's own identity, where it builds
            keys.add((self.settings.subscription_id, IdentityRef("", None)))
        removed: list[str] = []
        for subscription, ref in sorted(keys, key=lambda k: (k[0], k[1].describe())):
            clients = await self.clients_for(subscription, ref)
            tagged = [
                r
                async for r in clients.resource.resources.list(filter=f"tagName eq '{RUN_TAG}'")
                if (r.tags or {}).get(RUN_TAG) not in keep
            ]
            kinds = _deletable(clients)
            order = [*kinds, VAULT_TYPE]
            tagged.sort(key=lambda r: order.index(r.type) if r.type in order else len(order))
            for resource in tagged:
                _, group, _ = parse_id(resource.id)
                owner = (resource.tags or {})[RUN_TAG]
                if resource.type == VAULT_TYPE:
                    await self._delete_vault(
                        clients, group, resource.name, resource.location, RUN_TAG, owner
                    )
                elif resource.type in kinds:
                    operation_group, _ = kinds[resource.type]
                    poller = await ops.call(operation_group.begin_delete(group, resource.name))
                    await ops.call(poller.result())
                else:
                    continue
                removed.append(resource.id)
        return removed

    async def leftovers(self, ctx: RunContext) -> list[str]:
        """Resource IDs in the staging group still tagged with this run."""
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        if not await ops.call(clients.resource.resource_groups.check_existence(group)):
            return []
        return [
            resource.id
            async for resource in clients.resource.resources.list_by_resource_group(group)
            if (resource.tags or {}).get(RUN_TAG) == ctx.run_uid
        ]

    @staticmethod
    async def _delete_vault(
        clients: AzureClients, group: str, name: str, location: str, tag: str, owner: str
    ) -> None:
        """Delete, then purge: a soft-deleted vault would keep its name and its secret."""
        vaults = clients.keyvault.vaults
        vault = await ops.find(vaults.get(group, name))
        if vault is not None:
            if (vault.tags or {}).get(tag) != owner:
                return  # never delete what Kiln did not make
            await ops.call(vaults.delete(group, name))
        deleted = await ops.find(vaults.get_deleted(name, location))
        if deleted is None or (deleted.properties.tags or {}).get(tag) != owner:
            return
        poller = await ops.call(vaults.begin_purge_deleted(name, location))
        await ops.call(poller.result())

    async def _delete_if_ours(
        self, ctx: RunContext, operation_group: Any, group: str, name: str
    ) -> None:
        resource = await ops.find(operation_group.get(group, name))
        if resource is None or (resource.tags or {}).get(RUN_TAG) != ctx.run_uid:
            return  # gone, or never made by Kiln for this run
        poller = await ops.call(operation_group.begin_delete(group, name))
        await ops.call(poller.result())

    # --- distribution ----------------------------------------------------------------------

    async def gallery_versions(self, ctx: RunContext, target: PlannedTarget) -> list[str]:
        assert target.gallery_image_id is not None
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        _, group, parts = parse_id(target.gallery_image_id)
        versions = clients.compute.gallery_image_versions.list_by_gallery_image(
            group, parts[1], parts[3]
        )
        try:
            return [v.name async for v in versions]
        except AzureError as error:
            raise classify(error) from error

    async def distribute(self, ctx: RunContext, target: PlannedTarget) -> RunOutput:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        if target.type == TargetKind.ManagedImage:
            return await self._distribute_managed(ctx, clients, target)
        if target.type == TargetKind.SharedImage:
            return await self._distribute_shared(ctx, clients, target)
        return await self._distribute_vhd(ctx, clients, target)

    async def _distribute_managed(
        self, ctx: RunContext, clients: AzureClients, target: PlannedTarget
    ) -> RunOutput:
        assert target.artifact_id is not None
        _, group, parts = parse_id(target.artifact_id)
        await self._replace_managed_image(ctx, clients, group, parts[-1], target.index)
        body = {
            "location": target.location,
            "tags": target.tags,
            "properties": {
                "sourceVirtualMachine": {"id": ctx.checkpoint.azure.vm_id},
                "hyperVGeneration": _generation(ctx),
            },
        }
        images = clients.compute.images
        await ops.ensure_all(
            ctx.checkpoint.azure.operations,
            {
                f"distribute-{target.index}": lambda **kw: images.begin_create_or_update(
                    group, parts[-1], body, **kw
                )
            },
            f"creating managed image {parts[-1]}",
        )
        return _output(target.run_output_name, target.artifact_id)

    async def _replace_managed_image(
        self, ctx: RunContext, clients: AzureClients, group: str, name: str, index: int
    ) -> None:
        """As AIB does, a managed image that exists already is overwritten: Azure refuses
        to change an image's source (PropertyChangeNotAllowed), so an image made from
        another VM is deleted first. One made from this run's VM is this run's own image
        (a resumed run), and is kept."""
        operations = ctx.checkpoint.azure.operations
        key = f"distribute-{index}-replace"
        if operations.get(key) != ops.DONE:
            existing = await ops.find(clients.compute.images.get(group, name))
            source = getattr(existing, "source_virtual_machine", None) if existing else None
            if existing is None or (source and _same_id(source.id, ctx.checkpoint.azure.vm_id)):
                operations[key] = ops.DONE
                return
        await ops.ensure_all(
            operations,
            {key: lambda **kw: clients.compute.images.begin_delete(group, name, **kw)},
            f"deleting the previous managed image {name}, which this build replaces",
        )

    async def _distribute_shared(
        self, ctx: RunContext, clients: AzureClients, target: PlannedTarget
    ) -> RunOutput:
        """The version number comes from the plan, saved before this PUT: a run resumed
        after a crash publishes that version, never a second one."""
        assert target.gallery_image_id is not None and target.version is not None
        _, group, parts = parse_id(target.gallery_image_id)
        gallery, definition, version = parts[1], parts[3], target.version
        profile: dict[str, Any] = {
            "targetRegions": [
                {
                    "name": r.name,
                    "regionalReplicaCount": r.replica_count,
                    "storageAccountType": r.storage_account_type,
                }
                for r in target.regions
            ],
            "excludeFromLatest": target.exclude_from_latest,
        }
        if target.replication_mode:
            profile["replicationMode"] = target.replication_mode
        body = {
            "location": target.location,
            "tags": target.tags,
            "properties": {
                "publishingProfile": profile,
                "storageProfile": {"source": {"id": ctx.checkpoint.azure.vm_id}},
            },
        }
        versions = clients.compute.gallery_image_versions
        await ops.ensure_all(
            ctx.checkpoint.azure.operations,
            {
                f"distribute-{target.index}": lambda **kw: versions.begin_create_or_update(
                    group, gallery, definition, version, body, **kw
                )
            },
            f"publishing {definition} {version}",
        )
        return _output(target.run_output_name, target.artifact_id or "")

    async def _distribute_vhd(
        self, ctx: RunContext, clients: AzureClients, target: PlannedTarget
    ) -> RunOutput:
        """Read access to the OS disk, one slice of the page copy, access revoked; the
        copy's id is saved before its blob is created and its progress after each slice."""
        copies = ctx.checkpoint.azure.vhd_copies
        state = copies.get(str(target.index))
        if state is None:
            copies[str(target.index)] = VhdCopy(copy_id=uuid.uuid4().hex)
            raise ops.Pending("recording the VHD copy before it starts", retry_after=0)
        group, disk = self.staging_group(ctx.template, ctx.spec), self._names(ctx)["osdisk"]
        destination = await self._vhd_blob(ctx, target)
        async with destination:
            poller = await ops.call(
                clients.compute.disks.begin_grant_access(
                    group, disk, {"access": "Read", "durationInSeconds": 3600}
                )
            )
            access = await ops.call(poller.result())
            options = transport_options(self.settings)
            try:
                async with BlobClient.from_blob_url(access.access_sas, **options) as source:
                    done = await vhdcopy.copy_slice(source, destination, state)
            finally:
                revoke = await ops.call(clients.compute.disks.begin_revoke_access(group, disk))
                await ops.call(revoke.result())
        url = destination.url.split("?", 1)[0]
        if not done:
            share = state.offset * 100 // (state.size or 1)
            raise ops.Pending(f"copying the OS disk to {url}: {share}%", retry_after=0)
        return RunOutput(
            run_output_name=target.run_output_name,
            artifact_id=url,
            artifact_uri=url,
            provisioning_state="Succeeded",
        )

    async def _vhd_blob(self, ctx: RunContext, target: PlannedTarget) -> BlobClient:
        """The target's uri (a SAS in it, else the template's identity), or the staging
        account's vhds container."""
        options = transport_options(self.settings)
        uri = ctx.spec.distribute[target.index].uri if target.artifact_id else None
        if uri:  # the SAS is read from the spec, never kept in the plan
            credential = (
                None
                if "?" in uri
                else (await self.clients(ctx.spec, ctx.template.namespace)).credential
            )
            return BlobClient.from_blob_url(uri, credential=credential, **options)
        service = await self._staging_blobs(ctx)
        async with service:
            container = service.get_container_client(VHD_CONTAINER)
            try:
                if not await container.exists():
                    await container.create_container()
            except AzureError as error:
                raise classify(error) from error
            url = container.get_blob_client(f"{ctx.run_name}-{target.run_output_name}.vhd").url
        _, key = self._account_keys[storage_account_name(ctx.template.uid)]
        return BlobClient.from_blob_url(url, credential=key, **options)


def _deletable(clients: AzureClients) -> dict[str, tuple[Any, bool]]:
    """What Kiln creates, in the order it can be deleted: (operation group, long-running)."""
    compute, network = clients.compute, clients.network
    return {
        "Microsoft.Compute/virtualMachines": (compute.virtual_machines, True),
        "Microsoft.Compute/disks": (compute.disks, True),
        "Microsoft.Network/networkInterfaces": (network.network_interfaces, True),
        "Microsoft.Network/publicIPAddresses": (network.public_ip_addresses, True),
        "Microsoft.Network/networkSecurityGroups": (network.network_security_groups, True),
        "Microsoft.Network/virtualNetworks": (network.virtual_networks, True),
        "Microsoft.Storage/storageAccounts": (clients.storage.storage_accounts, False),
    }


async def _nothing() -> str:
    return ""


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(limit)


def _same_id(left: str | None, right: str | None) -> bool:
    """ARM IDs compare case-insensitively."""
    return (left or "").lower() == (right or "").lower()


def _generation(ctx: RunContext) -> str:
    """The source image's Hyper-V generation, as resolved (V1 when Azure names none)."""
    return ctx.checkpoint.azure.hyper_v_generation or "V1"


def _output(name: str, artifact_id: str) -> RunOutput:
    return RunOutput(
        run_output_name=name,
        artifact_id=artifact_id,
        artifact_uri=artifact_id,
        provisioning_state="Succeeded",
    )
