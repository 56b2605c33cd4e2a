"""The azure provider against the ARM emulator, through the real azure-mgmt SDK clients.

Build VMs here exist only in ARM's books (no SSH): these tests drive the provider's
steps directly, the way the pipeline does, and read the emulator's inventory.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from azure.mgmt.compute import ComputeManagementClient
from azure.mgmt.network import NetworkManagementClient
from azure.mgmt.resource.resources import ResourceManagementClient
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from azurehelpers import WINDOWS_SERVER_2022, create_gallery, create_identity, vnet_and_nsg
from fakes.arm import ArmEmulator, NoopVmBackend
from fakes.arm.winrm_guest import WindowsGuestBackend
from fakes.azurite import Azurite
from kiln import distribution
from kiln.api.run import Checkpoint, RunState
from kiln.api.status import RunOutput
from kiln.api.template import ImageTemplateSpec
from kiln.api.tenancy import TenancyPolicy
from kiln.communicators import winrm
from kiln.communicators.ssh import CommunicatorError, generate_keypair
from kiln.communicators.winrm import (
    CertificateMismatch,
    WinRmCommunicator,
    generate_winrm_credentials,
)
from kiln.naming import BUILD_COMPUTER_NAME
from kiln.pipeline.base import StepEnv
from kiln.pipeline.image import DeprovisionStep, DistributeStep
from kiln.pipeline.logs import COMBINED
from kiln.pipeline.machine import ConnectStep
from kiln.providers.azure import operations, vhdcopy
from kiln.providers.azure.provider import AzureProvider
from kiln.providers.base import ProviderError, RunContext, TemplateIdentity
from kiln.reconcile.runs import final_state
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec

pytestmark = [pytest.mark.integration, pytest.mark.azure]

LOCATION = "westeurope"
T = TypeVar("T")


@pytest.fixture(scope="module")
def arm() -> Iterator[ArmEmulator]:
    with ArmEmulator(lro_duration=0.2, retry_after=0.05) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch, arm: ArmEmulator) -> Iterator[None]:
    monkeypatch.setattr(operations, "WAIT_SECONDS", 2.0)
    for name, value in arm.environment().items():
        if name.startswith("AZURE_"):
            monkeypatch.setenv(name, value)
    yield
    arm.clear_faults()


def settings_for(arm: ArmEmulator, tmp_path: Path) -> OperatorSettings:
    return OperatorSettings(
        data_root=tmp_path,
        azure_arm_endpoint=arm.url,
        azure_authority=arm.url,
        azure_ca_bundle=arm.ca_path,
        subscription_id=arm.subscription_id,
        azure_communicator_source="203.0.113.0/24",
    )


def context(arm: ArmEmulator, tmp_path: Path, **spec: Any) -> RunContext:
    client, host = generate_keypair(), generate_keypair()
    body = {
        **valid_spec(),
        "provider": "azure",
        "location": LOCATION,
        "resourceGroup": "images",
        "subscriptionId": arm.subscription_id,
        **spec,
    }
    template = TemplateIdentity(namespace="default", name="tmpl", uid=str(uuid.uuid4()))
    return RunContext(
        namespace="default",
        run_name="run-1",
        run_uid=str(uuid.uuid4()),
        template=template,
        spec=ImageTemplateSpec.model_validate(body),
        checkpoint=Checkpoint(template=template),
        run_dir=tmp_path / "run-1",
        key_namespace="kiln-system",
        client_private_key=client.private_key.get_secret_value(),
        client_public_key=client.public_key,
        host_private_key=host.private_key.get_secret_value(),
        host_public_key=host.public_key,
    )


async def until_done(action: Callable[[], Awaitable[T]], limit: int = 200) -> T:
    """Call a step again while it says 'not yet', as the driver does."""
    for _ in range(limit):
        try:
            return await action()
        except ProviderError as error:
            if error.fatal:
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("the step never finished")


async def distributed(
    provider: AzureProvider, ctx: RunContext, limit: int = 200
) -> list[RunOutput]:
    """The distribute step's passes until it ends, as the driver runs them; the outputs."""
    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    for _ in range(limit):
        outcome = await DistributeStep().reconcile(ctx, env)
        if outcome.kind != "wait":
            assert ctx.checkpoint.distribution is not None
            return distribution.run_outputs(ctx.checkpoint.distribution)
        await asyncio.sleep(0.05)
    raise AssertionError("the distribute step never finished")


@pytest.fixture
async def provider(arm: ArmEmulator, tmp_path: Path) -> AsyncIterator[AzureProvider]:
    azure = AzureProvider(settings_for(arm, tmp_path), kube=None)  # type: ignore[arg-type]
    yield azure
    await azure.close()


def kinds(arm: ArmEmulator, group: str) -> list[str]:
    """Types of the resources in a group (the group itself left out)."""
    items = arm.inventory(group)
    return sorted(i.type for i in items if i.type != "Microsoft.Resources/resourceGroups")


async def test_a_build_leaves_only_staging_and_outputs(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ids = create_gallery(arm, "outputs", "kiln", "base", LOCATION)
    image_id, definition_id = ids["image"], ids["gallery"]
    ctx = context(
        arm,
        tmp_path,
        distribute=[
            {
                "type": "ManagedImage",
                "runOutputName": "img",
                "imageId": image_id,
                "location": LOCATION,
            },
            {
                "type": "SharedImage",
                "runOutputName": "sig",
                "galleryImageId": definition_id,
                "targetRegions": [{"name": LOCATION}, {"name": "northeurope", "replicaCount": 2}],
                "versioning": {"scheme": "Latest", "major": 1},
            },
        ],
    )
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    group = staging.rsplit("/", 1)[-1]
    assert group.startswith("IT_images_tmpl_")
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]
    exact = await provider.resolve_source(ctx)
    assert exact == "Debian:debian-12:12-gen2:0.20241111.1927"
    endpoint = await until_done(lambda: provider.create_vm(ctx))
    assert endpoint.host.startswith("127.0.2.") and endpoint.port == 22
    assert endpoint.user == "packer"
    vm = arm.vm_info(ctx.checkpoint.azure.vm_id)
    user_data = yaml.safe_load(base64.b64decode(vm.custom_data or ""))
    assert user_data["ssh_keys"]["ed25519_public"] == ctx.host_public_key
    assert vm.ssh_public_keys == [ctx.client_public_key]
    nsg = arm.client(NetworkManagementClient).network_security_groups.get(
        group, f"kiln-{ctx.run_uid[:8]}-nsg"
    )
    rule = nsg.security_rules[0]
    assert (rule.source_address_prefix, rule.destination_port_range) == ("203.0.113.0/24", "22")
    assert await until_done(lambda: provider.stop_vm(ctx))
    outputs = await distributed(provider, ctx)
    assert [o.provisioning_state for o in outputs] == ["Succeeded", "Succeeded"]
    assert outputs[0].artifact_id == image_id
    assert outputs[1].artifact_id == f"{definition_id}/versions/1.0.0"
    version = arm.client(ComputeManagementClient).gallery_image_versions.get(
        "outputs", "kiln", "base", "1.0.0"
    )
    regions = {r.name: r.regional_replica_count for r in version.publishing_profile.target_regions}
    assert regions == {LOCATION: 1, "northeurope": 2}
    await provider.delete_vm(ctx)
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]
    assert arm.creation_count(ctx.checkpoint.azure.vm_id) == 1
    await provider.delete_staging(ctx.template, staging, keep_group=False)
    assert arm.client(ResourceManagementClient).resource_groups.check_existence(group) is False
    assert arm.client(ComputeManagementClient).images.get("outputs", "base").id == image_id


async def test_a_second_build_replaces_the_managed_image_and_saves_its_version_first(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ids = create_gallery(arm, "again", "kiln", "base", LOCATION)
    distribute = [
        {"type": "ManagedImage", "runOutputName": "img", "imageId": ids["image"]}
        | {"location": LOCATION},
        {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": ids["gallery"]}
        | {"versioning": {"scheme": "Latest", "major": 1}},
    ]
    first = context(arm, tmp_path / "1", distribute=distribute)
    second = context(arm, tmp_path / "2", distribute=distribute)
    second.template = first.template  # two runs of one template
    second.checkpoint.template = first.template
    versions = arm.client(ComputeManagementClient).gallery_image_versions
    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    step = DistributeStep()
    for ctx in (first, second):
        await until_done(lambda ctx=ctx: provider.ensure_staging(ctx))
        await provider.resolve_source(ctx)
        await until_done(lambda ctx=ctx: provider.create_vm(ctx))
        assert await until_done(lambda ctx=ctx: provider.stop_vm(ctx))
        existing = {v.name for v in versions.list_by_gallery_image("again", "kiln", "base")}
        # pass 1 plans, pass 2 decides the version number: each pass ends persisted, and
        # nothing is published before the number is saved
        assert (await step.reconcile(ctx, env)).message.startswith("planned the distribution")
        decided_pass = await step.reconcile(ctx, env)
        assert decided_pass.kind == "wait" and "decided gallery version" in decided_pass.message
        assert ctx.checkpoint.distribution is not None
        decided = ctx.checkpoint.distribution.targets[1].version
        assert decided is not None and decided not in existing
        assert {v.name for v in versions.list_by_gallery_image("again", "kiln", "base")} == (
            existing
        )
        new = await step.reconcile(ctx, env)  # the version is checked to be new, and saved
        assert "recording that the gallery version is new" in new.message
        await step.reconcile(ctx, env)  # the PUTs go out
        assert ctx.checkpoint.azure.operations.pop("distribute-1")  # crash before the token
        outputs = await distributed(provider, ctx)
        # the managed image exists after the first build: the second overwrites it (AIB)
        image = arm.client(ComputeManagementClient).images.get("again", "base")
        assert image.source_virtual_machine.id.lower() == ctx.checkpoint.azure.vm_id.lower()
        assert outputs[1].artifact_id.endswith(f"/versions/{decided}")
    names = sorted(v.name for v in versions.list_by_gallery_image("again", "kiln", "base"))
    assert names == ["1.0.0", "1.0.1"]  # one version per run, never a second one
    for ctx in (first, second):
        await provider.delete_vm(ctx)


async def test_a_gallery_version_that_exists_already_is_never_published_over(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    """AIB requires a version distinct from the gallery's: an explicit version, or the
    Source scheme's (the source image's version), that exists fails its target at once,
    naming it and the fix; nothing is PUT, nothing is retried."""
    explicit = create_gallery(arm, "taken", "kiln", "pinned", LOCATION)["gallery"]
    source = create_gallery(arm, "taken", "kiln", "sourced", LOCATION)["gallery"]
    distribute = [
        {"type": "SharedImage", "runOutputName": "pinned"}
        | {"galleryImageId": f"{explicit}/versions/1.2.3"},
        {"type": "SharedImage", "runOutputName": "sourced", "galleryImageId": source}
        | {"versioning": {"scheme": "Source"}},
    ]
    versions = arm.client(ComputeManagementClient).gallery_image_versions
    runs = []
    for index in (1, 2):
        ctx = context(arm, tmp_path / str(index), distribute=distribute)
        await until_done(lambda ctx=ctx: provider.ensure_staging(ctx))
        await provider.resolve_source(ctx)
        await until_done(lambda ctx=ctx: provider.create_vm(ctx))
        assert await until_done(lambda ctx=ctx: provider.stop_vm(ctx))
        runs.append(ctx)
    first, second = runs
    outputs = await distributed(provider, first)
    assert [o.provisioning_state for o in outputs] == ["Succeeded", "Succeeded"]
    published = versions.get("taken", "kiln", "pinned", "1.2.3")
    sourced = versions.get("taken", "kiln", "sourced", "0.20241111.1927")

    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    passes = []
    for _ in range(10):
        passes.append(await DistributeStep().reconcile(second, env))
        if passes[-1].kind != "wait":
            break
    outcome = passes[-1]
    assert outcome.kind == "failed" and len(passes) == 2, [p.message for p in passes]
    assert second.checkpoint.distribution is not None
    pinned, by_source = second.checkpoint.distribution.targets
    assert pinned.message == (
        f"spec.distribute[0] (pinned): {explicit}/versions/1.2.3 exists already; a gallery "
        "image version is never overwritten (AIB requires a new version): put a new version "
        "in galleryImageId, or remove /versions/... from it to let versioning pick the next "
        "one, or delete that version first"
    )
    assert by_source.message is not None and by_source.message.startswith(
        f"spec.distribute[1] (sourced): {source}/versions/0.20241111.1927 exists already"
    )
    assert "build from a newer source image, or use versioning Latest" in by_source.message
    assert {pinned.error_code, by_source.error_code} == {"GalleryImageVersionExists"}
    assert (pinned.retries, by_source.retries) == (0, 0)
    assert "distribute-0" not in second.checkpoint.azure.operations  # no PUT went out
    for kept, name, number in ((published, "pinned", "1.2.3"), (sourced, "sourced", sourced.name)):
        now = versions.get("taken", "kiln", name, number)
        assert now.storage_profile.source.id == kept.storage_profile.source.id
        assert now.storage_profile.source.id.lower() == first.checkpoint.azure.vm_id.lower()
    for ctx in runs:
        await provider.delete_vm(ctx)


async def test_the_log_goes_to_an_append_blob_that_gets_only_what_it_lacks(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with ArmEmulator(
        lro_duration=0.2,
        retry_after=0.05,
        blob_endpoint=azurite.blob_endpoint,
        storage_account_key=azurite.account_key,
    ) as arm:
        for name, value in arm.environment().items():
            if name.startswith("AZURE_"):
                monkeypatch.setenv(name, value)
        azure = AzureProvider(settings_for(arm, tmp_path), kube=None)  # type: ignore[arg-type]
        try:
            ctx = context(arm, tmp_path)
            await until_done(lambda: azure.ensure_staging(ctx))
            log = ctx.run_dir / COMBINED
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_bytes(b"==> customize[0]\nfirst\n")
            await azure.publish_logs(ctx)
            with log.open("ab") as handle:
                handle.write(b"second\n" * 1000)
            await azure.publish_logs(ctx)
            await azure.publish_logs(ctx)  # nothing new: nothing sent
            assert ctx.checkpoint.log_uri and "?" not in ctx.checkpoint.log_uri
            service = BlobServiceClient(azurite.blob_endpoint, credential=azurite.account_key)
            blob = service.get_blob_client("packerlogs", f"{ctx.run_name}/{COMBINED}")
            assert blob.get_blob_properties().blob_type == "AppendBlob"
            assert blob.download_blob().readall() == log.read_bytes()
            listings = [r for r in arm.requests if r.path.endswith("/listKeys")]
            assert len(listings) == 1  # once per account, not per upload
        finally:
            await azure.close()


async def test_the_sweeper_removes_what_runs_that_are_gone_left_by_their_tag(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    live, gone, late = (context(arm, tmp_path / n) for n in ("live", "gone", "late"))
    gone.template = gone.checkpoint.template = live.template  # one staging group
    late.template = late.checkpoint.template = live.template

    async def build(ctx: RunContext) -> str:
        staging = await until_done(lambda: provider.ensure_staging(ctx))
        await provider.resolve_source(ctx)
        await until_done(lambda: provider.create_vm(ctx))
        return staging

    for ctx in (live, gone):
        staging = await build(ctx)
    leftovers = await provider.leftovers(gone)
    assert any("/virtualMachines/" in item for item in leftovers)
    assert any("/networkInterfaces/" in item for item in leftovers)

    async def owners() -> set[str]:
        # a run created after the sweep listed the resources builds its VM now; the
        # runs read here do not include it yet
        await build(late)
        return {live.run_uid}

    removed = await provider.sweep(owners)
    assert sorted(removed) == sorted(leftovers)
    assert await provider.leftovers(gone) == []
    for ctx in (live, late):  # an owner's resources stay, and so do the late run's
        assert any("/virtualMachines/" in item for item in await provider.leftovers(ctx))
    assert "Microsoft.Storage/storageAccounts" in kinds(
        arm, staging.rsplit("/", 1)[-1]
    )  # not a run's resource
    await provider.delete_vm(live)
    await provider.delete_vm(late)


async def test_transient_failures_are_retried_without_duplicates(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ctx = context(arm, tmp_path)
    before = arm.creations()  # the module's emulator: other tests' resources are there
    arm.set_failure_rate(0.1, statuses=(429, 500, 503), retry_after=0.05, seed=7)
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    await until_done(lambda: provider.resolve_source(ctx))
    await until_done(lambda: provider.create_vm(ctx))
    await until_done(lambda: provider.stop_vm(ctx))
    await until_done(lambda: provider.delete_vm(ctx))
    arm.clear_faults()
    assert any(r.status in (429, 500, 503) for r in arm.requests)
    created = {k: v - before.get(k, 0) for k, v in arm.creations().items()}
    created = {k: v for k, v in created.items() if v}
    assert created and all(count == 1 for count in created.values()), created
    group = staging.rsplit("/", 1)[-1]
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]


async def test_a_vm_create_resumes_from_its_continuation_token(
    arm: ArmEmulator, tmp_path: Path
) -> None:
    settings = settings_for(arm, tmp_path)
    ctx = context(arm, tmp_path)
    first = AzureProvider(settings, kube=None)  # type: ignore[arg-type]
    await until_done(lambda: first.ensure_staging(ctx))
    await first.resolve_source(ctx)
    arm.set_lro_duration(6.0, "Microsoft.Compute/virtualMachines", "create")
    try:
        with pytest.raises(ProviderError, match="creating the build VM"):
            for _ in range(20):
                await first.create_vm(ctx)  # network first, then the VM: still running
        token = ctx.checkpoint.azure.operations["vm"]
        assert token and token != operations.DONE
        await first.close()  # the operator dies here
        second = AzureProvider(settings, kube=None)  # type: ignore[arg-type]
        await until_done(lambda: second.create_vm(ctx))
        assert arm.creation_count(ctx.checkpoint.azure.vm_id) == 1
        await second.delete_vm(ctx)
        await second.close()
    finally:
        arm.set_lro_duration(0.2, "Microsoft.Compute/virtualMachines", "create")


async def test_a_delete_cut_short_by_a_crash_is_sent_again_and_joins_the_one_in_flight(
    arm: ArmEmulator, tmp_path: Path
) -> None:
    """Deletes keep no continuation token (resources.delete says why): the restarted
    operator's pass reads the VM again, sends its DELETE again, and waits on the delete
    Azure still runs; the build's resources end deleted, with no error."""
    settings = settings_for(arm, tmp_path)
    ctx = context(arm, tmp_path)
    first = AzureProvider(settings, kube=None)  # type: ignore[arg-type]
    await until_done(lambda: first.ensure_staging(ctx))
    await first.resolve_source(ctx)
    await until_done(lambda: first.create_vm(ctx))
    vm_id = ctx.checkpoint.azure.vm_id
    assert vm_id

    def vm_deletes() -> list[int]:
        return [
            r.status
            for r in arm.requests
            if r.method == "DELETE" and r.path.lower() == vm_id.lower()
        ]

    arm.set_lro_duration(6.0, "Microsoft.Compute/virtualMachines", "delete")
    try:
        cleanup = asyncio.ensure_future(first.delete_vm(ctx))
        deadline = time.monotonic() + 30
        while not vm_deletes():
            assert time.monotonic() < deadline and not cleanup.done(), "no DELETE was sent"
            await asyncio.sleep(0.05)
        cleanup.cancel()  # the operator dies while Azure deletes the VM
        with pytest.raises(asyncio.CancelledError):
            await cleanup
        await first.close()
        second = AzureProvider(settings, kube=None)  # type: ignore[arg-type]
        assert vm_id.lower() in [i.lower() for i in await second.leftovers(ctx)]  # deleting
        await second.delete_vm(ctx)  # the restarted operator's cleanup pass
        assert vm_deletes() == [202, 202]  # sent again; the second joined the first
        assert await second.leftovers(ctx) == []
        await second.close()
    finally:
        arm.set_lro_duration(0.2, "Microsoft.Compute/virtualMachines", "delete")


async def test_an_unavailable_size_is_fatal_with_azures_message(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ctx = context(arm, tmp_path, vmProfile={"vmSize": "Standard_NoSuchSize"})
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    await provider.resolve_source(ctx)
    with pytest.raises(ProviderError) as failure:
        await until_done(lambda: provider.create_vm(ctx))
    assert failure.value.fatal
    assert "SkuNotAvailable" in str(failure.value)
    await provider.delete_vm(ctx)
    assert kinds(arm, staging.rsplit("/", 1)[-1]) == ["Microsoft.Storage/storageAccounts"]


async def test_vnet_config_builds_privately(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    network = arm.client(NetworkManagementClient)
    arm.client(ResourceManagementClient).resource_groups.create_or_update(
        "corp-net", {"location": LOCATION}
    )
    network.virtual_networks.begin_create_or_update(
        "corp-net",
        "corp",
        {
            "location": LOCATION,
            "properties": {
                "addressSpace": {"addressPrefixes": ["10.8.0.0/16"]},
                "subnets": [{"name": "builds", "properties": {"addressPrefix": "10.8.1.0/24"}}],
            },
        },
    ).result()
    subnet = network.subnets.get("corp-net", "corp", "builds").id
    ctx = context(arm, tmp_path, vmProfile={"vnetConfig": {"subnetId": subnet}})
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    await provider.resolve_source(ctx)
    endpoint = await until_done(lambda: provider.create_vm(ctx))
    assert endpoint.host.startswith("127.0.3.")
    group = staging.rsplit("/", 1)[-1]
    assert "Microsoft.Network/publicIPAddresses" not in kinds(arm, group)
    assert "Microsoft.Network/virtualNetworks" not in kinds(arm, group)
    await provider.delete_vm(ctx)
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]


async def test_the_build_vm_gets_the_templates_identities_as_aib_assigns_them(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    template = create_identity(arm, "identities", "aib-template", LOCATION)
    extra = create_identity(arm, "identities", "build-extra", LOCATION)
    ctx = context(
        arm,
        tmp_path,
        identity={"type": "UserAssigned", "userAssignedIdentities": {template.id: {}}},
        vmProfile={"userAssignedIdentities": [extra.id, template.id.upper()]},
    )
    await until_done(lambda: provider.ensure_staging(ctx))
    await provider.resolve_source(ctx)
    await until_done(lambda: provider.create_vm(ctx))
    vm = arm.client(ComputeManagementClient).virtual_machines.get(
        provider.staging_group(ctx.template, ctx.spec), f"kiln-{ctx.run_uid[:8]}-vm"
    )
    assert vm.identity.type == "UserAssigned"
    assigned = {i.lower(): v.client_id for i, v in vm.identity.user_assigned_identities.items()}
    assert assigned == {
        template.id.lower(): template.properties["clientId"],
        extra.id.lower(): extra.properties["clientId"],
    }  # the template's once, though named twice
    await provider.delete_vm(ctx)
    missing = extra.id.replace("/build-extra", "/deleted-since")
    gone = context(arm, tmp_path, vmProfile={"userAssignedIdentities": [missing]})
    staging = await until_done(lambda: provider.ensure_staging(gone))
    await provider.resolve_source(gone)
    with pytest.raises(ProviderError) as failure:
        await until_done(lambda: provider.create_vm(gone))
    assert failure.value.fatal and "FailedIdentityOperation" in str(failure.value)
    assert missing in str(failure.value)  # Azure's message names the identity
    await provider.delete_vm(gone)
    assert kinds(arm, staging.rsplit("/", 1)[-1]) == ["Microsoft.Storage/storageAccounts"]


async def test_additional_data_disks_are_captured_with_the_os_disk(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ids = create_gallery(arm, "disks", "kiln", "data", LOCATION)
    ctx = context(
        arm,
        tmp_path,
        additionalDataDisks=[{"sizeGB": 2}, {"sizeGB": 5}],
        distribute=[
            {"type": "ManagedImage", "runOutputName": "img", "imageId": ids["image"]}
            | {"location": LOCATION},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": ids["gallery"]}
            | {"versioning": {"scheme": "Latest", "major": 1}},
        ],
    )
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    group = staging.rsplit("/", 1)[-1]
    await provider.resolve_source(ctx)
    await until_done(lambda: provider.create_vm(ctx))
    compute = arm.client(ComputeManagementClient)
    vm = compute.virtual_machines.get(group, f"kiln-{ctx.run_uid[:8]}-vm")
    assert [(d.lun, d.disk_size_gb, d.create_option) for d in vm.storage_profile.data_disks] == [
        (0, 2, "Empty"),
        (1, 5, "Empty"),
    ]
    assert kinds(arm, group).count("Microsoft.Compute/disks") == 3  # the OS disk and two
    assert await until_done(lambda: provider.stop_vm(ctx))
    outputs = await distributed(provider, ctx)
    assert [o.provisioning_state for o in outputs] == ["Succeeded", "Succeeded"]
    image = compute.images.get("disks", "data")
    assert [(d.lun, d.disk_size_gb) for d in image.storage_profile.data_disks] == [(0, 2), (1, 5)]
    version = compute.gallery_image_versions.get("disks", "kiln", "data", "1.0.0")
    data_images = version.storage_profile.data_disk_images
    assert [(d.lun, d.size_in_gb) for d in data_images] == [(0, 2), (1, 5)]
    await provider.delete_vm(ctx)
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]  # disks went with the VM
    # built on that image, a template's own data disks come after the image's
    source = {"type": "ManagedImage", "imageId": ids["image"]}
    again = context(arm, tmp_path, source=source, additionalDataDisks=[{"sizeGB": 3}])
    await until_done(lambda: provider.ensure_staging(again))
    await provider.resolve_source(again)
    assert again.checkpoint.azure.source_data_disk_luns == [0, 1]
    await until_done(lambda: provider.create_vm(again))
    again_group = provider.staging_group(again.template, again.spec)
    vm = compute.virtual_machines.get(again_group, f"kiln-{again.run_uid[:8]}-vm")
    disks = [(d.lun, d.disk_size_gb, d.create_option) for d in vm.storage_profile.data_disks]
    assert disks == [(0, 2, "FromImage"), (1, 5, "FromImage"), (2, 3, "Empty")]
    await provider.delete_vm(again)


async def test_a_custom_staging_group_must_be_empty_and_is_emptied_not_removed(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    resource = arm.client(ResourceManagementClient)
    network = arm.client(NetworkManagementClient)
    for group in ("busy-staging", "my-staging"):
        resource.resource_groups.create_or_update(group, {"location": LOCATION})
    vnet_and_nsg(network, "busy-staging", LOCATION)
    prefix = f"/subscriptions/{arm.subscription_id}/resourceGroups"
    busy = context(arm, tmp_path, stagingResourceGroup=f"{prefix}/busy-staging")
    with pytest.raises(ProviderError, match="not empty and not this template's"):
        await until_done(lambda: provider.ensure_staging(busy))
    ctx = context(arm, tmp_path, stagingResourceGroup=f"{prefix}/my-staging")
    staging = await until_done(lambda: provider.ensure_staging(ctx))
    assert staging == f"{prefix}/my-staging"
    tags = resource.resource_groups.get("my-staging").tags
    assert tags["createdBy"] == "AzureVMImageBuilder" and tags["imageTemplateName"] == "tmpl"
    assert kinds(arm, "my-staging") == ["Microsoft.Storage/storageAccounts"]
    await provider.delete_staging(ctx.template, staging, keep_group=True)
    assert resource.resource_groups.check_existence("my-staging")
    assert kinds(arm, "my-staging") == []


async def test_a_marketplace_plan_goes_on_the_build_vm(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    plan = {
        "planName": "cis-ubuntu2204-l1-gen2",
        "planProduct": "cis-ubuntu-linux-2204-l1",
        "planPublisher": "center-for-internet-security-inc",
    }
    source = {
        "type": "PlatformImage",
        "publisher": "center-for-internet-security-inc",
        "offer": "cis-ubuntu-linux-2204-l1",
        "sku": "cis-ubuntu2204-l1-gen2",
        "version": "latest",
        "planInfo": plan,
    }
    ctx = context(arm, tmp_path, source=source)
    await until_done(lambda: provider.ensure_staging(ctx))
    assert await provider.resolve_source(ctx) == (
        "center-for-internet-security-inc:cis-ubuntu-linux-2204-l1:cis-ubuntu2204-l1-gen2:2.1.0"
    )
    await until_done(lambda: provider.create_vm(ctx))
    vm = arm.vm_info(ctx.checkpoint.azure.vm_id)
    assert vm.plan == {
        "name": plan["planName"],
        "product": plan["planProduct"],
        "publisher": plan["planPublisher"],
    }
    await provider.delete_vm(ctx)


async def test_windows_steps_on_a_linux_source_are_refused_clearly(
    arm: ArmEmulator, provider: AzureProvider, tmp_path: Path
) -> None:
    ctx = context(arm, tmp_path, customize=[{"type": "PowerShell", "inline": ["Get-Date"]}])
    with pytest.raises(ProviderError, match="needs Windows, but the source image runs Linux"):
        await provider.resolve_source(ctx)
    assert ctx.checkpoint.os_type == "Linux"


@pytest.fixture(scope="module")
def arm_windows() -> Iterator[ArmEmulator]:
    """An emulator whose Windows VMs have a WinRM guest (Linux VMs exist in ARM only)."""
    backend = WindowsGuestBackend(NoopVmBackend())
    with ArmEmulator(backend=backend, lro_duration=0.2, retry_after=0.05) as emulator:
        yield emulator


@pytest.fixture
def windows_arm(monkeypatch: pytest.MonkeyPatch, arm_windows: ArmEmulator) -> ArmEmulator:
    """arm_windows, with the environment credentials of its own identity."""
    for name, value in arm_windows.environment().items():
        if name.startswith("AZURE_"):
            monkeypatch.setenv(name, value)
    return arm_windows


async def windows_vm(
    arm: ArmEmulator, tmp_path: Path, **spec: Any
) -> tuple[AzureProvider, RunContext]:
    """A provider and a run whose Windows build VM is created and answering WinRM."""
    provider = AzureProvider(settings_for(arm, tmp_path), kube=None)  # type: ignore[arg-type]
    ctx = context(arm, tmp_path, source=WINDOWS_SERVER_2022, customize=[], **spec)
    await until_done(lambda: provider.ensure_staging(ctx))
    assert await provider.resolve_source(ctx) == (
        "MicrosoftWindowsServer:WindowsServer:2022-datacenter-azure-edition:20348.2762.241006"
    )
    assert ctx.windows
    ctx.winrm = generate_winrm_credentials(BUILD_COMPUTER_NAME)
    endpoint = await until_done(lambda: provider.create_vm(ctx))
    ctx.checkpoint.endpoint = endpoint
    return provider, ctx


async def test_a_windows_build_vm_is_reached_over_winrm_pinned_to_its_certificate(
    windows_arm: ArmEmulator, tmp_path: Path
) -> None:
    arm = windows_arm
    provider, ctx = await windows_vm(arm, tmp_path)
    assert ctx.winrm is not None
    endpoint = ctx.checkpoint.endpoint
    assert endpoint is not None and (endpoint.port, endpoint.user) == (5986, "packer")
    vm = arm.resource(ctx.checkpoint.azure.vm_id)
    os_profile = vm["properties"]["osProfile"]
    assert "adminPassword" not in os_profile and "linuxConfiguration" not in os_profile
    listener = os_profile["windowsConfiguration"]["winRM"]["listeners"][0]
    assert listener["protocol"] == "Https"
    url = listener["certificateUrl"]
    assert os_profile["secrets"][0]["vaultCertificates"][0]["certificateUrl"] == url
    stored = json.loads(base64.b64decode(arm.vault_secret(url) or ""))
    assert stored["dataType"] == "pfx" and stored["data"] == ctx.winrm.pfx.get_secret_value()
    group = provider.staging_group(ctx.template, ctx.spec)
    vault = arm.resource(os_profile["secrets"][0]["sourceVault"]["id"])
    assert vault["properties"]["enabledForDeployment"] is True
    assert vault["tags"]["kiln-run-uid"] == ctx.run_uid
    nsg = arm.client(NetworkManagementClient).network_security_groups.get(
        group, f"kiln-{ctx.run_uid[:8]}-nsg"
    )
    assert [rule.destination_port_range for rule in nsg.security_rules] == ["5986"]

    communicator = WinRmCommunicator()
    await communicator.connect(endpoint.host, 5986, "packer", ctx.winrm, timeout=10)
    result = await communicator.run_powershell("Write-Output 'hello from windows'")
    assert (result.exit_status, result.stdout.strip()) == (0, "hello from windows")
    guest = arm.backend.guest(ctx.checkpoint.azure.vm_id)
    assert guest.scripts[-1].endswith("Write-Output 'hello from windows'")
    # every command ends: at its deadline, or at once when its caller is cancelled
    began = time.monotonic()
    with pytest.raises(CommunicatorError, match="past its deadline"):
        await communicator.run_powershell("Start-Sleep -Seconds 120", timeout=1)
    assert time.monotonic() - began < winrm.POLL_SECONDS + 5
    call = asyncio.ensure_future(communicator.run_powershell("Start-Sleep -Seconds 120"))
    await asyncio.sleep(1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    result = await communicator.run_powershell("Write-Output 'still answering'")
    assert result.stdout.strip() == "still answering"
    await communicator.close()

    stranger = generate_winrm_credentials(BUILD_COMPUTER_NAME)
    with pytest.raises(CertificateMismatch):
        await WinRmCommunicator().connect(endpoint.host, 5986, "packer", stranger, timeout=10)

    await provider.delete_vm(ctx)
    assert kinds(arm, group) == ["Microsoft.Storage/storageAccounts"]
    assert arm.deleted_vaults() == []  # deleted and purged
    await provider.close()


async def test_a_windows_vm_is_sysprepped_then_captured(
    windows_arm: ArmEmulator, tmp_path: Path
) -> None:
    arm = windows_arm
    ids = create_gallery(arm, "winout", "kilnwin", "server", LOCATION, os_type="Windows")
    target = {"type": "ManagedImage", "runOutputName": "image", "imageId": ids["image"]}
    provider, ctx = await windows_vm(arm, tmp_path, distribute=[target | {"location": LOCATION}])
    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    assert (await ConnectStep().reconcile(ctx, env)).kind == "done"
    outcome = await DeprovisionStep().reconcile(ctx, env)
    assert outcome.kind == "done", outcome.message
    guest = arm.backend.guest(ctx.checkpoint.azure.vm_id)
    assert guest.image_state == "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
    assert "Sysprep.exe /oobe /generalize /quiet /quit /mode:vm" in guest.scripts[-1]
    log = (ctx.run_dir / "customization.log").read_text()
    assert ">>> Sysprepping VM ..." in log
    assert "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE\n>>> Sysprep complete" in log
    assert "$" not in log
    ctx.checkpoint.poweroff_requested = False  # as if the operator died before saving it
    scripts = len(guest.scripts)
    assert (await DeprovisionStep().reconcile(ctx, env)).kind == "done"
    assert not any("Sysprep.exe" in script for script in guest.scripts[scripts:])
    assert await provider.stop_vm(ctx)
    assert (await distributed(provider, ctx))[0].artifact_id == ids["image"]
    await provider.delete_vm(ctx)
    assert arm.deleted_vaults() == []
    # The image built here runs Windows: a template built on it is a Windows build again.
    source = {"type": "ManagedImage", "imageId": ids["image"]}
    again = context(arm, tmp_path, source=source, customize=[])
    await provider.resolve_source(again)
    assert again.windows and again.checkpoint.azure.hyper_v_generation == "V2"
    await provider.close()


async def test_a_deprovisioning_script_on_the_vm_replaces_sysprep(
    windows_arm: ArmEmulator, tmp_path: Path
) -> None:
    provider, ctx = await windows_vm(windows_arm, tmp_path)
    guest = windows_arm.backend.guest(ctx.checkpoint.azure.vm_id)
    guest.files["C:\\DeprovisioningScript.ps1"] = "Write-Output custom"
    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    outcome = await DeprovisionStep().reconcile(ctx, env)
    assert outcome.kind == "done", outcome.message
    assert guest.scripts[-1].endswith("& 'C:\\DeprovisioningScript.ps1'\nexit $LASTEXITCODE\n")
    assert not any("Sysprep.exe" in script for script in guest.scripts)
    assert "running C:\\DeprovisioningScript.ps1" in (ctx.run_dir / "customization.log").read_text()
    await provider.delete_vm(ctx)
    await provider.close()


# --- distribution: partial failures and resumed VHD copies ------------------------------

DISK_MIB = 16


class DiskBackend(NoopVmBackend):
    """VMs only in ARM's books whose OS disks export as a sparse fixed-size VHD: data in
    the first, third and last 4 MiB pages (the emulator serves it at the access SAS)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def disk_vhd(self, disk_id: str) -> Path:
        path = self.directory / f"{uuid.uuid5(uuid.NAMESPACE_URL, disk_id.lower())}.vhd"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.truncate(DISK_MIB * 1024 * 1024 + 512)
                for page in (0, 2, DISK_MIB // 4 - 1):
                    handle.seek(page * 4 * 1024 * 1024 + 4096)
                    handle.write(f"page {page} of {disk_id}".encode() * 100)
                handle.seek(DISK_MIB * 1024 * 1024)
                handle.write(b"conectix".ljust(512, b"\0"))
        return path


@pytest.fixture
def blob_arm(
    azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ArmEmulator]:
    with ArmEmulator(
        lro_duration=0.1,
        retry_after=0.05,
        blob_endpoint=azurite.blob_endpoint,
        storage_account_key=azurite.account_key,
        backend=DiskBackend(tmp_path / "disks"),
    ) as emulator:
        for name, value in emulator.environment().items():
            if name.startswith("AZURE_"):
                monkeypatch.setenv(name, value)
        yield emulator


async def built(arm: ArmEmulator, tmp_path: Path, **spec: Any) -> tuple[AzureProvider, RunContext]:
    """A provider and a run whose build VM is generalized: ready to distribute."""
    provider = AzureProvider(settings_for(arm, tmp_path), kube=None)  # type: ignore[arg-type]
    ctx = context(arm, tmp_path, **spec)
    await until_done(lambda: provider.ensure_staging(ctx))
    await provider.resolve_source(ctx)
    await until_done(lambda: provider.create_vm(ctx))
    assert await until_done(lambda: provider.stop_vm(ctx))
    return provider, ctx


def os_disk_id(arm: ArmEmulator, provider: AzureProvider, ctx: RunContext) -> str:
    group = provider.staging_group(ctx.template, ctx.spec)
    [disk] = [i.id for i in arm.inventory(group) if i.type == "Microsoft.Compute/disks"]
    return disk


def expired_sas_uri(azurite: Azurite, container: str, blob: str) -> str:
    """A blob URL whose SAS expired an hour ago (Azurite checks it as Azure does)."""
    service = BlobServiceClient(azurite.blob_endpoint, credential=azurite.account_key)
    if not service.get_container_client(container).exists():
        service.create_container(container)
    sas = generate_blob_sas(
        azurite.account_name,
        container,
        blob,
        account_key=azurite.account_key,
        permission=BlobSasPermissions(read=True, create=True, write=True),
        expiry=datetime.now(UTC) - timedelta(hours=1),
    )
    return f"{azurite.blob_endpoint.rstrip('/')}/{container}/{blob}?{sas}"


async def test_a_failing_target_leaves_the_others_published(
    blob_arm: ArmEmulator, azurite: Azurite, tmp_path: Path
) -> None:
    """Every target is tried: a VHD whose SAS expired fails alone, with Azure Storage's
    code; the managed image, the gallery version and the staging VHD are published and
    the run ends PartiallySucceeded."""
    arm = blob_arm
    ids = create_gallery(arm, "partial", "kiln", "base", LOCATION)
    expired = expired_sas_uri(azurite, "team", "os.vhd")
    provider, ctx = await built(
        arm,
        tmp_path,
        distribute=[
            {"type": "ManagedImage", "runOutputName": "img", "imageId": ids["image"]}
            | {"location": LOCATION},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": ids["gallery"]},
            {"type": "VHD", "runOutputName": "vhd"},
            {"type": "VHD", "runOutputName": "expired", "uri": expired},
        ],
    )
    try:
        outputs = {o.run_output_name: o for o in await distributed(provider, ctx)}
        assert ctx.checkpoint.distribution is not None
        targets = {t.run_output_name: t for t in ctx.checkpoint.distribution.targets}
        assert [t.state for t in targets.values()] == ["Succeeded"] * 3 + ["Failed"]
        # Azure answers an expired SAS AuthenticationFailed; Azurite AuthorizationFailure
        assert targets["expired"].error_code in ("AuthenticationFailed", "AuthorizationFailure")
        assert "writing the VHD blob failed" in (targets["expired"].message or "")
        assert "sig=" not in ctx.checkpoint.model_dump_json()  # no SAS in the checkpoint
        state, reason, message = final_state(ctx.checkpoint)
        assert (state, reason) == (RunState.PartiallySucceeded, "PartiallySucceeded")
        assert "3 of 4 outputs distributed" in message and "expired:" in message
        compute = arm.client(ComputeManagementClient)
        assert compute.gallery_image_versions.get("partial", "kiln", "base", "0.0.1")
        assert compute.images.get("partial", "base").id == ids["image"]
        blob = BlobServiceClient(azurite.blob_endpoint, credential=azurite.account_key)
        vhd = blob.get_blob_client("vhds", f"{ctx.run_name}-vhd.vhd")
        disk = await arm.backend.disk_vhd(os_disk_id(arm, provider, ctx))
        assert outputs["vhd"].artifact_id == vhd.url
        assert vhd.get_blob_properties().size == disk.stat().st_size
    finally:
        await provider.delete_vm(ctx)
        await provider.close()


async def test_a_vhd_copy_resumes_where_it_stopped(
    blob_arm: ArmEmulator, azurite: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page a slice: the copy's progress is saved after each; a busy server, an
    expired SAS and an operator restart are all resumed from there, not from the start."""
    arm = blob_arm
    monkeypatch.setattr(vhdcopy, "SLICE_SECONDS", 0.0)  # one 4 MiB page per pass
    provider, ctx = await built(arm, tmp_path, distribute=[{"type": "VHD", "runOutputName": "vhd"}])
    env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
    step = DistributeStep()
    try:
        assert (await step.reconcile(ctx, env)).message.startswith("planned")
        first = await step.reconcile(ctx, env)
        assert "recording the VHD copy" in first.message  # the copy id saved first
        copy_id = ctx.checkpoint.azure.vhd_copies["0"].copy_id
        copied = await step.reconcile(ctx, env)
        assert "copying the OS disk" in copied.message
        assert ctx.checkpoint.azure.vhd_copies["0"].offset == 4 * 1024 * 1024
        arm.fail_disk_reads(503, times=3)  # azure-core retries twice, then Kiln does
        busy = await step.reconcile(ctx, env)
        assert busy.reason == "RetryingServerBusy" and "ServerBusy" in busy.message
        assert ctx.checkpoint.azure.vhd_copies["0"].offset == 4 * 1024 * 1024
        arm.fail_disk_reads(403)  # the SAS expired between two reads: a new grant goes on
        expired = await step.reconcile(ctx, env)
        assert expired.reason == "RetryingAuthenticationFailed"
        await step.reconcile(ctx, env)
        assert ctx.checkpoint.azure.vhd_copies["0"].offset == 8 * 1024 * 1024
        # the operator restarts: a new provider reads the checkpoint back from status
        await provider.close()
        provider = AzureProvider(settings_for(arm, tmp_path), kube=None)  # type: ignore[arg-type]
        env = StepEnv(provider=provider, kube=None, policy=TenancyPolicy())  # type: ignore[arg-type]
        ctx.checkpoint = Checkpoint.model_validate(ctx.checkpoint.wire())
        [output] = await distributed(provider, ctx)
        assert output.provisioning_state == "Succeeded"
        reads = [r for m, r, status in arm.disk_reads.log if m == "GET" and status == 206]
        offsets = [int((r or "=0-").split("=", 1)[1].split("-", 1)[0]) for r in reads]
        assert sorted(offsets) == [p * 4 * 1024 * 1024 for p in range(DISK_MIB // 4 + 1)]
        assert len(offsets) == len(set(offsets))  # no page was read twice: never restarted
        service = BlobServiceClient(azurite.blob_endpoint, credential=azurite.account_key)
        blob = service.get_blob_client("vhds", f"{ctx.run_name}-vhd.vhd")
        assert blob.get_blob_properties().metadata[vhdcopy.COPY_ID] == copy_id
        disk = await arm.backend.disk_vhd(os_disk_id(arm, provider, ctx))
        assert blob.download_blob().readall() == disk.read_bytes()
        assert ctx.checkpoint.distribution.targets[0].retries == 0  # reset by the success
    finally:
        await provider.delete_vm(ctx)
        await provider.close()
