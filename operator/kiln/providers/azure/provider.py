"""The azure provider: the build happens in an Azure subscription, as AIB does it.

Staging resource group IT_<resourceGroup>_<template>_<guid> with a storage account for
logs; per run a network (or a NIC in the template's subnet), a build VM reached over SSH
with a per-run key and a host key injected through customData, or for a Windows source
over WinRM/HTTPS with a per-run password and a certificate that Azure's VM agent installs
from a per-run Key Vault; capture by deallocate + generalize; distribution to managed
images, gallery image versions and VHD blobs. Each resource is a small spec
(providers/azure/resources); a build is their ordered list, cleanup its reverse, and only
resources tagged as Kiln's own are ever deleted.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

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
from kiln.communicators.winrm import WINRM_HTTPS_PORT
from kiln.distribution import existing_version_message
from kiln.kube import Kube
from kiln.naming import staging_group_name
from kiln.pipeline.logs import COMBINED
from kiln.providers.azure import operations as ops
from kiln.providers.azure import vhdcopy
from kiln.providers.azure.clients import (
    AzureClients,
    IdentityRef,
    make_clients,
    namespace_credential,
    storage_token,
    tenant_of,
    transport_options,
)
from kiln.providers.azure.errors import classify
from kiln.providers.azure.resources import (
    GROUP,
    RUN_TAG,
    VAULT,
    Spec,
    delete,
    deletion_order,
    ensure,
    found,
    images,
    network,
    owned,
    owner,
    parse_id,
    vault,
    vm,
)
from kiln.providers.azure.resources.network import name
from kiln.providers.azure.resources.staging import check_free, storage_account_name
from kiln.providers.azure.resources.staging import specs as staging_specs
from kiln.providers.azure.resources.vm import BUILD_USER
from kiln.providers.base import Endpoint, Owners, ProviderError, RunContext, TemplateIdentity
from kiln.settings import OperatorSettings
from kiln.versions import version_key

WINDOWS_STEPS = (PowerShellStep, WindowsRestartStep, WindowsUpdateStep)
LOG_CONTAINER = "packerlogs"
VHD_CONTAINER = "vhds"
APPEND_BLOCK = 4 * 1024 * 1024  # the largest block an append blob takes


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

    # --- names and staging ----------------------------------------------------------------

    def staging_group(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        if spec.staging_resource_group:
            return spec.staging_resource_group.rstrip("/").rsplit("/", 1)[-1]
        return staging_group_name(spec.resource_group or "", template.name, template.uid)

    def staging_id(self, template: TemplateIdentity, spec: ImageTemplateSpec) -> str:
        group = self.staging_group(template, spec)
        return f"/subscriptions/{self._subscription(spec)}/resourceGroups/{group}"

    def run_dir(self, template: TemplateIdentity, spec: ImageTemplateSpec, run: str) -> Path:
        return self.settings.data_root / "azure" / self.staging_group(template, spec) / run

    async def ensure_staging(self, ctx: RunContext) -> str:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        await check_free(clients, group, ctx.template.uid)
        await ensure(clients, ctx.checkpoint.azure.operations, staging_specs(ctx, group))
        return self.staging_id(ctx.template, ctx.spec)

    async def delete_staging(
        self,
        template: TemplateIdentity,
        staging: str,
        *,
        keep_group: bool,
        service_account: str | None = None,
    ) -> None:
        """The template's vaults are purged first (deleting a group only soft-deletes
        them); then the group goes, or with keep_group what Kiln made in it."""
        _, subscription, _, group = staging.strip("/").split("/")
        clients = await self.clients_for(
            subscription, IdentityRef(template.namespace, service_account)
        )
        ours = owner(template=template.uid)
        current = await ops.find(clients.resource.resource_groups.get(group))
        if current is None or not owned(current.tags, ours):
            return  # never delete what Kiln did not make
        specs = []
        async for resource in clients.resource.resources.list_by_resource_group(group):
            spec = found(resource, group, ours)
            if spec is None and keep_group and owned(resource.tags, ours):
                raise ProviderError(f"Kiln cannot delete {resource.type} {resource.id}")
            if spec is not None and (keep_group or spec.kind is VAULT):
                specs.append(spec)
        if not keep_group:
            specs.append(Spec(GROUP, (group,), ours))
        await delete(clients, deletion_order(specs) if keep_group else specs)

    async def storage_token(self, ctx: RunContext) -> str | None:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        return await storage_token(clients.credential)

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
            data_disks = image.data_disk_images
        elif isinstance(source, ManagedImageSource):
            _, group, parts = parse_id(source.image_id)
            managed = await ops.call(clients.compute.images.get(group, parts[-1]))
            os_type = managed.storage_profile.os_disk.os_type
            generation = managed.hyper_v_generation
            reference, exact = {"id": source.image_id}, source.image_id
            data_disks = managed.storage_profile.data_disks
        else:
            exact = await self._gallery_version(clients, source.image_version_id)
            _, group, parts = parse_id(exact)
            definition = await ops.call(
                clients.compute.gallery_images.get(group, parts[1], parts[3])
            )
            version = await ops.call(
                clients.compute.gallery_image_versions.get(group, parts[1], parts[3], parts[5])
            )
            data_disks = version.storage_profile.data_disk_images
            os_type = definition.os_type
            generation = definition.hyper_v_generation
            reference = {"id": exact}
            ctx.checkpoint.source_version = exact.rsplit("/", 1)[-1]
        ctx.checkpoint.os_type = _enum_value(os_type)
        ctx.checkpoint.azure.source_data_disk_luns = [disk.lun for disk in data_disks or []]
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

    def _build(self, ctx: RunContext, tenant: str = "") -> list[Spec]:
        """The run's build resources in creation order (cleanup is the reverse): a
        Windows VM's Key Vault, the network, the VM. tenant: for creating the vault."""
        staging_id = self.staging_id(ctx.template, ctx.spec)
        group = staging_id.rsplit("/", 1)[-1]
        source, port = self.settings.azure_communicator_source, vm.port(ctx)
        return [
            *([vault.spec(ctx, group, tenant)] if ctx.windows else []),
            *network.specs(ctx, staging_id, source, port),
            vm.spec(ctx, staging_id),
        ]

    async def create_vm(self, ctx: RunContext) -> Endpoint:
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group = self.staging_group(ctx.template, ctx.spec)
        operations = ctx.checkpoint.azure.operations
        tenant = ""
        if ctx.windows and operations.get("vault") != ops.DONE:
            tenant = await tenant_of(clients.credential, self.settings.azure_arm_endpoint)
        *prepared, build_vm = self._build(ctx, tenant)
        await ensure(clients, operations, prepared)
        if ctx.windows:  # the VM's osProfile names the certificate's secret
            await vault.store_certificate(ctx, clients, group)
        await ensure(clients, operations, [build_vm])
        ctx.checkpoint.azure.vm_id = (
            await ops.call(clients.compute.virtual_machines.get(group, build_vm.name))
        ).id
        return Endpoint(
            host=await self._address(ctx, clients, group), port=vm.port(ctx), user=BUILD_USER
        )

    async def _address(self, ctx: RunContext, clients: AzureClients, group: str) -> str:
        nic = await ops.call(clients.network.network_interfaces.get(group, name(ctx, "nic")))
        configuration = nic.ip_configurations[0]
        if configuration.public_ip_address is None:
            return str(configuration.private_ip_address)
        pip = await ops.call(clients.network.public_ip_addresses.get(group, name(ctx, "pip")))
        return str(pip.ip_address)

    async def collect_from_vm(self, ctx: RunContext, communicator: SshCommunicator) -> None:
        """Azure keeps the VM's disk; nothing to fetch before shutdown."""

    async def vm_lost(self, ctx: RunContext) -> str | None:
        """Azure restarts a VM whose host fails: a lost connection is always retried."""
        return None

    async def stop_vm(self, ctx: RunContext) -> bool:
        """Deallocate, then generalize: what capture needs."""
        if ctx.checkpoint.azure.generalized:
            return True
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        group, vm_name = self.staging_group(ctx.template, ctx.spec), name(ctx, "vm")
        await ops.ensure_all(
            ctx.checkpoint.azure.operations,
            {
                "deallocate": lambda **kw: clients.compute.virtual_machines.begin_deallocate(
                    group, vm_name, **kw
                )
            },
            "deallocating the build VM",
        )
        await ops.call(clients.compute.virtual_machines.generalize(group, vm_name))
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
        """The build in reverse order; only what is tagged with this run."""
        clients = await self.clients(ctx.spec, ctx.template.namespace)
        await delete(clients, reversed(self._build(ctx)))

    async def sweep(self, owners: Owners) -> list[str]:
        """Resources tagged with a run UID that owners() does not name, in every
        subscription in use, deleted in dependency order (VM first, network last, vaults
        purged). Every subscription is listed before the owners are read."""
        keys = set(self._clients)
        if self.settings.subscription_id:  # the operator's own identity, where it builds
            keys.add((self.settings.subscription_id, IdentityRef("", None)))
        listed: list[tuple[AzureClients, list[tuple[str, Spec]]]] = []
        for subscription, ref in sorted(keys, key=lambda k: (k[0], k[1].describe())):
            clients = await self.clients_for(subscription, ref)
            candidates = []
            async for r in clients.resource.resources.list(filter=f"tagName eq '{RUN_TAG}'"):
                run = (r.tags or {}).get(RUN_TAG)
                if run and (spec := found(r, parse_id(r.id)[1], owner(run=run))) is not None:
                    candidates.append((run, spec))
            listed.append((clients, candidates))
        keep = await owners()
        removed: list[str] = []
        for clients, candidates in listed:
            orphans = [spec for run, spec in candidates if run not in keep]
            removed += [spec.id for spec in await delete(clients, deletion_order(orphans))]
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
            if owned(resource.tags, owner(run=ctx.run_uid))
        ]

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
        operations = ctx.checkpoint.azure.operations
        key = f"distribute-{target.index}"
        if target.type == TargetKind.ManagedImage:
            assert target.artifact_id is not None
            image = images.managed_image(ctx, target.artifact_id, target.location, target.tags, key)
            await self._replace_managed_image(ctx, clients, *image.path, target.index)
            await ensure(clients, operations, [image])
        elif target.type == TargetKind.SharedImage:
            # the version comes from the plan, saved before this PUT: a run resumed after
            # a crash publishes that version, never a second one
            assert target.gallery_image_id is not None and target.version is not None
            await self._refuse_existing_version(ctx, clients, target, key)
            version = images.gallery_version(
                ctx,
                target.gallery_image_id,
                target.version,
                images.publishing_profile(target),
                target.tags,
                key,
            )
            await ensure(clients, operations, [version])
        else:
            return await self._distribute_vhd(ctx, clients, target)
        return _output(target.run_output_name, target.artifact_id or "")

    async def _refuse_existing_version(
        self, ctx: RunContext, clients: AzureClients, target: PlannedTarget, key: str
    ) -> None:
        """As AIB requires, the version must be new: a gallery version is never PUT over.
        Checked once, before this run's PUT, and the check saved before the PUT goes out,
        so a resumed run never takes its own version for someone else's."""
        operations = ctx.checkpoint.azure.operations
        checked = f"{key}-new"
        if operations.get(checked) == ops.DONE or operations.get(key):
            return
        assert target.gallery_image_id is not None and target.version is not None
        _, group, parts = parse_id(target.gallery_image_id)
        existing = await ops.find(
            clients.compute.gallery_image_versions.get(group, parts[1], parts[3], target.version)
        )
        if existing is not None:
            raise ProviderError(existing_version_message(target), code="GalleryImageVersionExists")
        operations[checked] = ops.DONE
        raise ops.Pending("recording that the gallery version is new", retry_after=0)

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
        group, disk = self.staging_group(ctx.template, ctx.spec), name(ctx, "osdisk")
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


def _read_from(path: Path, offset: int, limit: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(limit)


def _same_id(left: str | None, right: str | None) -> bool:
    """ARM IDs compare case-insensitively."""
    return (left or "").lower() == (right or "").lower()


def _output(name: str, artifact_id: str) -> RunOutput:
    return RunOutput(
        run_output_name=name,
        artifact_id=artifact_id,
        artifact_uri=artifact_id,
        provisioning_state="Succeeded",
    )
