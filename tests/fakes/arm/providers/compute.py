"""Microsoft.Compute: VMs, OS disks, managed images, galleries, marketplace, SKUs.

VM lifecycle effects (create, deallocate, power off, start, generalize, delete) are handed
to the emulator's VmBackend with a VmInfo (address, admin user, SSH keys, customData).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import uuid
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from .. import diskaccess, ids
from ..errors import ArmError, invalid_parameter, missing_parameter
from ..models import (
    DataDiskInfo,
    MarketplaceImage,
    Operation,
    StoredResource,
    VmInfo,
    WinRmListener,
    iso,
    utcnow,
)
from ..validation import (
    GALLERY_STORAGE_TYPES,
    VM_DISK_TYPES,
    check_enum,
    get_path,
    require,
    valid_ssh_public_key,
    validate_admin_password,
    validate_admin_username,
    validate_compute_name,
    validate_computer_name,
    validate_custom_data,
    validate_gallery_image_name,
    validate_gallery_image_version_name,
    validate_gallery_name,
    version_key,
)
from .base import Ctx, Reply, ResourceType, require_group
from .keyvault import VAULT, find_secret, parse_secret_url, vault_uri, version_of
from .msi import USER_ASSIGNED_IDENTITY
from .network import NIC, nic_addresses, nic_vm

if TYPE_CHECKING:
    from ..emulator import ArmEmulator

VM = "Microsoft.Compute/virtualMachines"
DATA_DISKS = "properties.storageProfile.dataDisks"
DISK = "Microsoft.Compute/disks"
IMAGE = "Microsoft.Compute/images"
GALLERY = "Microsoft.Compute/galleries"
GALLERY_IMAGE = "Microsoft.Compute/galleries/images"
GALLERY_VERSION = "Microsoft.Compute/galleries/images/versions"

POWER_DISPLAY = {
    "starting": "VM starting",
    "running": "VM running",
    "stopping": "VM stopping",
    "stopped": "VM stopped",
    "deallocating": "VM deallocating",
    "deallocated": "VM deallocated",
}


def not_allowed(message: str) -> ArmError:
    return ArmError(409, "OperationNotAllowed", message)


def change_not_allowed(prop: str) -> ArmError:
    return ArmError(
        409, "PropertyChangeNotAllowed", f"Changing property '{prop}' is not allowed.", target=prop
    )


def parent_missing(name: str) -> ArmError:
    return ArmError(
        404,
        "ParentResourceNotFound",
        f"Can not perform requested operation on nested resource. Parent resource '{name}' not "
        "found.",
    )


def load_vault_certificate(secret_value: str) -> tuple[str, str] | None:
    """A VM certificate secret -> (certificate PEM, private key PEM), None when malformed.

    Azure's format: base64 of UTF-8 JSON {"data": base64 PFX, "dataType": "pfx",
    "password": PFX password (may be empty)}.
    """
    try:
        doc = json.loads(base64.b64decode(secret_value, validate=True).decode("utf-8"))
        if not isinstance(doc, dict) or str(doc.get("dataType", "")).lower() != "pfx":
            return None
        pfx = base64.b64decode(doc["data"], validate=True)
        password = doc.get("password") or ""
        key, cert, _ = pkcs12.load_key_and_certificates(pfx, password.encode() or None)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error):
        return None
    if key is None or cert is None:
        return None
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def marketplace_image_id(sub: str, loc: str, img: MarketplaceImage, version: str) -> str:
    return (
        f"/Subscriptions/{sub}/Providers/Microsoft.Compute/Locations/{loc}/Publishers/"
        f"{img.publisher}/ArtifactTypes/VMImage/Offers/{img.offer}/Skus/{img.sku}/Versions/"
        f"{version}"
    )


class ComputeType(ResourceType):
    put_style = "async"
    delete_style = "async+location"
    action_style = "async+location"
    max_name: int = 80
    name_target: str = "resourceName"

    def validate_name(self, name: str) -> None:
        validate_compute_name(name, self.name_target, self.max_name)


# --- image sources ----------------------------------------------------------------------


class ImageSource:
    """What a VM (or image, or gallery version) is built from, resolved and checked."""

    def __init__(
        self,
        *,
        os_type: str,
        hyper_v_generation: str,
        disk_size_gb: int,
        os_state: str = "Generalized",
        marketplace: MarketplaceImage | None = None,
        exact_version: str | None = None,
        resource: StoredResource | None = None,
    ) -> None:
        self.os_type = os_type
        self.hyper_v_generation = hyper_v_generation
        self.disk_size_gb = disk_size_gb
        self.os_state = os_state
        self.marketplace = marketplace
        self.exact_version = exact_version
        self.resource = resource


def platform_image_not_found(ref: dict[str, Any]) -> ArmError:
    urn = ":".join(str(ref.get(k, "")) for k in ("publisher", "offer", "sku", "version"))
    return ArmError(
        404,
        "PlatformImageNotFound",
        f"The platform image '{urn}' is not available. Verify that all fields in the storage "
        "profile are correct. For more details about storage profile information, please refer "
        "to https://aka.ms/storageprofile",
        target="imageReference",
    )


def find_marketplace(
    emu: ArmEmulator, publisher: str, offer: str, sku: str
) -> MarketplaceImage | None:
    for img in emu.marketplace:
        if (
            img.publisher.lower() == publisher.lower()
            and img.offer.lower() == offer.lower()
            and img.sku.lower() == sku.lower()
        ):
            return img
    return None


def latest_gallery_version(emu: ArmEmulator, image_id: str, location: str) -> StoredResource | None:
    versions = [
        v
        for v in emu.resources_of(GALLERY_VERSION, image_id)
        if v.provisioning_state == "Succeeded"
        and not get_path(v.body, "properties.publishingProfile.excludeFromLatest", False)
        and location in target_region_names(v)
    ]
    versions.sort(key=lambda v: version_key(v.name))
    return versions[-1] if versions else None


def target_region_names(version: StoredResource) -> list[str]:
    return [
        r["name"] for r in get_path(version.body, "properties.publishingProfile.targetRegions", [])
    ]


def data_disk_images(source: StoredResource | None) -> list[dict[str, Any]]:
    """The data disks a VM, managed image or gallery version carries: [{lun, sizeGB, caching}]."""
    if source is None or source.type not in (VM, IMAGE, GALLERY_VERSION):
        return []
    props = source.body["properties"]
    if source.type == GALLERY_VERSION:
        return [
            {"lun": d["lun"], "sizeGB": d["sizeInGB"], "caching": d.get("hostCaching", "None")}
            for d in get_path(props, "storageProfile.dataDiskImages", [])
        ]
    return [
        {"lun": d["lun"], "sizeGB": d["diskSizeGB"], "caching": d.get("caching", "None")}
        for d in get_path(props, "storageProfile.dataDisks", [])
    ]


def max_data_disks(size: str) -> int:
    """maxDataDiskCount of a size: two per vCPU, at least four (what Azure's table shows
    for the general-purpose sizes the emulator offers)."""
    return max(4, 2 * SIZE_FACTS.get(size, (2, 8192))[0])


def resolve_image_reference(emu: ArmEmulator, ref: dict[str, Any], location: str) -> ImageSource:
    """Marketplace URN, managed image id, gallery image (version) id -> ImageSource."""
    image_id = (
        ref.get("id") or ref.get("sharedGalleryImageId") or ref.get("communityGalleryImageId")
    )
    if image_id:
        if ref.get("sharedGalleryImageId") or ref.get("communityGalleryImageId"):
            raise invalid_parameter(
                "Shared and community gallery image references are not supported by the ARM "
                "emulator.",
                "imageReference",
            )
        path = ids.parse_path(image_id)
        type_key = path.type_key if path else ""
        if type_key == "microsoft.compute/images":
            img = emu.lookup(image_id)
            if img is None or img.location != location or img.provisioning_state != "Succeeded":
                raise invalid_parameter(
                    f"The Image '{image_id}' cannot be found in '{location}' region.",
                    "imageReference",
                )
            os_disk = get_path(img.body, "properties.storageProfile.osDisk", {})
            return ImageSource(
                os_type=os_disk.get("osType", "Linux"),
                hyper_v_generation=get_path(img.body, "properties.hyperVGeneration", "V1"),
                disk_size_gb=int(os_disk.get("diskSizeGB") or 30),
                os_state=os_disk.get("osState", "Generalized"),
                resource=img,
            )
        if type_key in (
            "microsoft.compute/galleries/images",
            "microsoft.compute/galleries/images/versions",
        ):
            if type_key.endswith("versions"):
                definition = emu.lookup(ids.parent_id(image_id))
                version = emu.lookup(image_id)
                if version is not None and (
                    location not in target_region_names(version)
                    or version.provisioning_state != "Succeeded"
                ):
                    version = None
            else:
                definition = emu.lookup(image_id)
                version = latest_gallery_version(emu, image_id, location) if definition else None
            if definition is None or version is None:
                raise ArmError(
                    404,
                    "GalleryImageNotFound",
                    f"The gallery image {image_id} is not available in {location} region. Please "
                    "contact image owner to replicate to this region, or change your requested "
                    "region.",
                    target="imageReference",
                )
            dprops = definition.body["properties"]
            return ImageSource(
                os_type=dprops.get("osType", "Linux"),
                hyper_v_generation=dprops.get("hyperVGeneration", "V1"),
                disk_size_gb=int(version.meta.get("sizeInGB", 30)),
                os_state=dprops.get("osState", "Generalized"),
                resource=version,
                exact_version=version.name,
            )
        raise invalid_parameter(
            f"The image reference id '{image_id}' is not a managed image or a gallery image.",
            "imageReference.id",
        )
    for field_name in ("publisher", "offer", "sku", "version"):
        if not ref.get(field_name):
            raise missing_parameter(f"imageReference.{field_name}")
    img = find_marketplace(emu, ref["publisher"], ref["offer"], ref["sku"])
    if img is None or not img.offered_in(location):
        raise platform_image_not_found(ref)
    if ref["version"].lower() == "latest":
        version = max(img.versions, key=version_key)
    elif ref["version"] in img.versions:
        version = ref["version"]
    else:
        raise platform_image_not_found(ref)
    return ImageSource(
        os_type=img.os_type,
        hyper_v_generation=img.hyper_v_generation,
        disk_size_gb=img.disk_size_gb,
        marketplace=img,
        exact_version=version,
    )


# --- virtual machines -------------------------------------------------------------------


class VirtualMachines(ComputeType):
    type_name = VM
    max_name = 64
    name_target = "vmName"

    def __init__(self) -> None:
        super().__init__()
        self.actions[("POST", "deallocate")] = self.deallocate
        self.actions[("POST", "poweroff")] = self.power_off
        self.actions[("POST", "start")] = self.start
        self.actions[("POST", "restart")] = self.restart
        self.actions[("POST", "generalize")] = self.generalize
        self.actions[("GET", "instanceview")] = self.instance_view_action
        self.action_done["deallocate"] = self.deallocated
        self.action_done["poweroff"] = self.powered_off
        self.action_done["start"] = self.started
        self.action_done["restart"] = self.started

    # PUT ---------------------------------------------------------------------------------

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        emu = ctx.emu
        assert ctx.path is not None
        res = self.base_resource(ctx, existing, body)
        location = res.location or ""
        props = res.body["properties"]
        if props.get("virtualMachineScaleSet") or props.get("availabilitySet"):
            raise invalid_parameter(
                "Availability sets and scale sets are not supported by the ARM emulator.",
                "availabilitySet",
            )
        size = require(body, "properties.hardwareProfile.vmSize", "hardwareProfile.vmSize")
        if size not in emu.vm_sizes_in(location):
            raise ArmError(
                409,
                "SkuNotAvailable",
                f"The requested VM size for resource 'Following SKUs have failed for Capacity "
                f"Restrictions: {size}' is currently not available in location '{location}'. "
                "Please try another size or deploy to a different location or different zone. "
                "See https://aka.ms/azureskunotavailable for details.",
            )
        storage = props.get("storageProfile")
        if not storage:
            raise missing_parameter("storageProfile")
        os_disk = storage.get("osDisk")
        if not os_disk:
            raise missing_parameter("storageProfile.osDisk")
        create_option = os_disk.get("createOption")
        if not create_option:
            raise missing_parameter("osDisk.createOption")
        create_option = check_enum(
            create_option, {"FromImage", "Attach", "Empty"}, "osDisk.createOption"
        )
        if create_option == "Empty":
            raise invalid_parameter("An OS disk cannot be created empty.", "osDisk.createOption")
        source: ImageSource
        if create_option == "FromImage":
            ref = storage.get("imageReference")
            if not ref:
                raise missing_parameter("imageReference")
            source = resolve_image_reference(emu, ref, location)
        else:
            disk_id = get_path(os_disk, "managedDisk.id")
            if not disk_id:
                raise missing_parameter("osDisk.managedDisk.id")
            disk = emu.lookup(disk_id)
            if disk is None or disk.type != DISK:
                raise ArmError(
                    404,
                    "NotFound",
                    f"Disk {disk_id} was not found.",
                    target="osDisk.managedDisk.id",
                )
            if disk.body.get("managedBy") and not ids.same_id(disk.body.get("managedBy"), res.id):
                raise ArmError(
                    409,
                    "OperationNotAllowed",
                    f"Disk {disk.name} is already attached to VM {disk.body['managedBy']}.",
                )
            os_type = os_disk.get("osType")
            if not os_type:
                raise missing_parameter("osDisk.osType")
            source = ImageSource(
                os_type=os_type,
                hyper_v_generation=get_path(disk.body, "properties.hyperVGeneration", "V1"),
                disk_size_gb=int(get_path(disk.body, "properties.diskSizeGB", 30)),
                os_state="Specialized",
                resource=disk,
            )
            if props.get("osProfile"):
                raise invalid_parameter("Parameter 'osProfile' is not allowed.", "osProfile")
        if source.os_type not in ("Linux", "Windows"):
            raise invalid_parameter(f"Unknown osType '{source.os_type}'.", "osDisk.osType")
        # plan: needed exactly when the marketplace image has one
        plan = res.body.get("plan")
        image_plan = source.marketplace.plan if source.marketplace else None
        if image_plan is not None and not plan:
            raise ArmError(
                400,
                "VMMarketplaceInvalidInput",
                "Creating a virtual machine from Marketplace image or a custom image sourced from "
                "a Marketplace image requires Plan information in the request. VM: "
                f"'{res.id}'.",
            )
        if image_plan is not None and plan:
            given = {k: str(plan.get(k, "")).lower() for k in ("name", "product", "publisher")}
            wanted = {
                k: str(getattr(image_plan, k)).lower() for k in ("name", "product", "publisher")
            }
            if given != wanted:
                raise ArmError(
                    400,
                    "VMMarketplaceInvalidInput",
                    "The purchase information does not match. Unable to deploy from the "
                    "Marketplace image. OfferId in the purchase plan must match the image.",
                )
        # os disk
        managed = os_disk.setdefault("managedDisk", {})
        managed["storageAccountType"] = check_enum(
            managed.get("storageAccountType") or "Standard_LRS",
            VM_DISK_TYPES,
            "osDisk.managedDisk.storageAccountType",
        )
        size_gb = os_disk.get("diskSizeGB")
        if size_gb is not None:
            if not isinstance(size_gb, int) or size_gb > 4095:
                raise invalid_parameter(
                    f"The value {size_gb} of parameter 'osDisk.diskSizeGB' is out of range. The "
                    "value must be between 1 and 4095, inclusive.",
                    "osDisk.diskSizeGB",
                )
            if size_gb < source.disk_size_gb:
                raise invalid_parameter(
                    f"The specified disk size {size_gb} GB is smaller than the size of the "
                    f"corresponding disk in the VM image: {source.disk_size_gb} GB. This is not "
                    "allowed. Please choose equal or greater size or do not specify an explicit "
                    "size.",
                    "osDisk.diskSizeGB",
                )
        os_disk["diskSizeGB"] = size_gb or source.disk_size_gb
        os_disk["osType"] = source.os_type
        os_disk["createOption"] = create_option
        os_disk["deleteOption"] = check_enum(
            os_disk.get("deleteOption") or "Detach", {"Delete", "Detach"}, "osDisk.deleteOption"
        )
        os_disk.setdefault("caching", "ReadWrite")
        disk_name = os_disk.get("name")
        if create_option == "FromImage":
            if existing is None:
                if disk_name:
                    validate_compute_name(disk_name, "osDisk.name")
                    disk_id = ids.format_id(
                        ctx.path.subscription,
                        ctx.path.resource_group,
                        "Microsoft.Compute",
                        ["disks"],
                        [disk_name],
                    )
                    if emu.lookup(disk_id) is not None:
                        raise ArmError(
                            409,
                            "ConflictingUserInput",
                            f"Disk {disk_name} already exists in resource group "
                            f"{(ctx.path.resource_group or '').upper()}. Only "
                            "CreateOption.Attach is supported.",
                            target="/disks/" + disk_name,
                        )
                else:
                    os_disk["name"] = f"{res.name}_OsDisk_1_{uuid.uuid4().hex}"
            else:
                old_name = get_path(existing.body, "properties.storageProfile.osDisk.name")
                if disk_name and disk_name != old_name:
                    raise change_not_allowed("osDisk.name")
                os_disk["name"] = old_name
                if get_path(existing.body, "properties.storageProfile.osDisk.managedDisk.id"):
                    managed["id"] = get_path(
                        existing.body, "properties.storageProfile.osDisk.managedDisk.id"
                    )
        else:
            os_disk["name"] = ids.split(managed["id"])[-1]
        if storage.get("imageReference") and source.exact_version and source.marketplace:
            storage["imageReference"]["exactVersion"] = source.exact_version
        storage["dataDisks"] = self._data_disks(ctx, res, existing, storage, source, size)
        # os profile
        if create_option == "FromImage" and source.os_state == "Generalized":
            self._check_os_profile(props, res, source.os_type)
            self._check_secrets(emu, props, res, source.os_type)
        elif props.get("osProfile"):
            raise invalid_parameter("Parameter 'osProfile' is not allowed.", "osProfile")
        # network
        net = props.get("networkProfile")
        if not net:
            raise missing_parameter("networkProfile")
        if net.get("networkInterfaceConfigurations"):
            raise invalid_parameter(
                "networkInterfaceConfigurations is not supported by the ARM emulator; create the "
                "NIC and reference it.",
                "networkProfile.networkInterfaceConfigurations",
            )
        nics = net.get("networkInterfaces") or []
        if not nics:
            raise missing_parameter("networkProfile.networkInterfaces")
        primaries = 0
        for ref in nics:
            nic_id = ref.get("id")
            nic = emu.lookup(nic_id) if nic_id else None
            if nic is None or nic.type != NIC:
                raise ArmError(
                    404,
                    "NotFound",
                    f"Resource {nic_id} was not found.",
                    target="networkProfile.networkInterfaces",
                )
            if nic.location != location:
                raise invalid_parameter(
                    f"Resource {nic.id} has location '{nic.location}' which is different from the "
                    f"location '{location}' of virtual machine {res.id}.",
                    "networkProfile.networkInterfaces",
                )
            user = nic_vm(emu, nic.id)
            if user is not None and not ids.same_id(user.id, res.id):
                raise ArmError(
                    400,
                    "NicInUse",
                    f"Network Interface {nic.id} is used by existing resource {user.id}. In order "
                    "to use it with a new resource, please ensure that it is dissociated from the "
                    "existing resource.",
                )
            if len(nics) == 1:
                ref.setdefault("properties", {}).setdefault("primary", True)
            primaries += 1 if get_path(ref, "properties.primary", False) else 0
        if primaries != 1:
            raise invalid_parameter(
                f"Virtual machine {res.name} must have one network interface set as the primary.",
                "networkProfile.networkInterfaces",
            )
        # identity
        identity = res.body.get("identity")
        if identity:
            kind = check_enum(
                identity.get("type", "None"),
                {"SystemAssigned", "UserAssigned", "SystemAssigned, UserAssigned", "None"},
                "identity.type",
            )
            identity["type"] = kind
            if "UserAssigned" in kind and not identity.get("userAssignedIdentities"):
                raise invalid_parameter(
                    "The identity type 'UserAssigned' requires userAssignedIdentities.",
                    "identity.userAssignedIdentities",
                )
            if "SystemAssigned" in kind:
                identity["principalId"] = res.meta.setdefault("principalId", str(uuid.uuid4()))
                identity["tenantId"] = emu.tenant_id
            for uid in identity.get("userAssignedIdentities") or {}:
                found = emu.lookup(uid)
                if found is None or found.type != USER_ASSIGNED_IDENTITY:
                    raise ArmError(
                        400,
                        "FailedIdentityOperation",
                        f"Identity operation for resource '{res.id}' failed with error 'Failed "
                        "to perform resource identity operation. Status: 'BadRequest'. "
                        f'Response: \'{{"error":{{"code":"BadRequest","message":"Resource '
                        f"'{uid}' was not found.\"}}}}'.'.",
                    )
                ids_of = found.body["properties"]
                identity["userAssignedIdentities"][uid] = {
                    "principalId": ids_of["principalId"],
                    "clientId": ids_of["clientId"],
                }
        # updates: what Azure refuses to change
        if existing is not None:
            old = existing.body["properties"]
            if get_path(old, "storageProfile.imageReference") and {
                k: v
                for k, v in (get_path(old, "storageProfile.imageReference") or {}).items()
                if k != "exactVersion"
            } != {
                k: v
                for k, v in (storage.get("imageReference") or {}).items()
                if k != "exactVersion"
            }:
                raise change_not_allowed("imageReference")
            for prop in ("adminUsername", "computerName"):
                if get_path(old, f"osProfile.{prop}") != get_path(props, f"osProfile.{prop}"):
                    raise change_not_allowed(f"osProfile.{prop}")
        res.meta["os_type"] = source.os_type
        res.meta["hyper_v_generation"] = source.hyper_v_generation
        res.meta["image_plan"] = image_plan.model_dump() if image_plan else None
        res.meta.setdefault("vmId", str(uuid.uuid4()))
        res.meta.setdefault("power", "starting")
        res.meta.setdefault("generalized", False)
        res.meta["exact_version"] = source.exact_version
        if source.resource is not None and source.resource.type == GALLERY_VERSION:
            res.meta["source_gallery_version"] = source.resource.id
        return res

    def _data_disks(
        self,
        ctx: Ctx,
        res: StoredResource,
        existing: StoredResource | None,
        storage: dict[str, Any],
        source: ImageSource,
        size: str,
    ) -> list[dict[str, Any]]:
        """storageProfile.dataDisks: empty managed disks (createOption Empty) and the image's
        own data disks (FromImage; added at their LUNs when not listed), as Azure checks them."""
        disks = storage.get("dataDisks") or []
        if not isinstance(disks, list):
            raise invalid_parameter("storageProfile.dataDisks must be an array.", "dataDisks")
        from_image = {d["lun"]: d for d in data_disk_images(source.resource)}
        old = {d["lun"]: d for d in get_path(existing.body if existing else {}, DATA_DISKS, [])}
        out: dict[int, dict[str, Any]] = {}
        for disk in disks:
            lun = disk.get("lun")
            if not isinstance(lun, int) or not 0 <= lun <= 63:
                raise invalid_parameter(
                    f"The value {lun} of parameter 'dataDisk.lun' is out of range. The value "
                    "must be between 0 and 63, inclusive.",
                    "dataDisk.lun",
                )
            if lun in out:
                raise invalid_parameter(f"Two data disks use LUN {lun}.", "dataDisks")
            option = check_enum(
                disk.get("createOption"), {"Empty", "FromImage", "Attach"}, "dataDisk.createOption"
            )
            if option == "Attach":
                raise invalid_parameter(
                    "Attaching existing data disks is not supported by the ARM emulator.",
                    "dataDisk.createOption",
                )
            if (option == "FromImage") != (lun in from_image):
                raise invalid_parameter(
                    f"The data disk at LUN {lun} has createOption {option}, but the image "
                    + ("has no data disk at that LUN." if option == "FromImage" else "has one."),
                    "dataDisk.createOption",
                )
            out[lun] = dict(disk)
        for lun, image_disk in from_image.items():
            out.setdefault(lun, {"lun": lun, "createOption": "FromImage"})
            out[lun].setdefault("diskSizeGB", image_disk["sizeGB"])
            out[lun].setdefault("caching", image_disk["caching"])
        if set(old) and set(old) != set(out):
            raise invalid_parameter(
                "Attaching or detaching data disks of an existing VM is not supported by the "
                "ARM emulator.",
                "dataDisks",
            )
        limit = max_data_disks(size)
        if len(out) > limit:
            raise ArmError(
                409,
                "OperationNotAllowed",
                f"The maximum number of data disks allowed to be attached to a VM of this size "
                f"is {limit}.",
            )
        for lun, disk in sorted(out.items()):
            self._data_disk(ctx, res, disk, old.get(lun))
        return [out[lun] for lun in sorted(out)]

    def _data_disk(
        self, ctx: Ctx, res: StoredResource, disk: dict[str, Any], old: dict[str, Any] | None
    ) -> None:
        """One data disk's size, caching, storage type, delete option and name, defaulted."""
        size_gb = disk.get("diskSizeGB")
        if size_gb is None:
            raise missing_parameter("dataDisk.diskSizeGB")
        if not isinstance(size_gb, int) or not 1 <= size_gb <= 32767:
            raise invalid_parameter(
                f"The value {size_gb} of parameter 'dataDisk.diskSizeGB' is out of range. The "
                "value must be between 1 and 32767, inclusive.",
                "dataDisk.diskSizeGB",
            )
        managed = disk.setdefault("managedDisk", {})
        sku = managed["storageAccountType"] = check_enum(
            managed.get("storageAccountType") or "Standard_LRS",
            VM_DISK_TYPES,
            "dataDisk.managedDisk.storageAccountType",
        )
        disk["caching"] = check_enum(
            disk.get("caching") or ("ReadOnly" if sku.startswith("Premium") else "None"),
            {"None", "ReadOnly", "ReadWrite"},
            "dataDisk.caching",
        )
        disk["deleteOption"] = check_enum(
            disk.get("deleteOption") or "Detach", {"Delete", "Detach"}, "dataDisk.deleteOption"
        )
        if old is not None:  # the same VM again: its disks stay
            disk["name"], managed["id"] = old["name"], get_path(old, "managedDisk.id")
            return
        name = disk.setdefault("name", f"{res.name}_disk{disk['lun'] + 2}_{uuid.uuid4().hex}")
        validate_compute_name(name, "dataDisk.name")
        assert ctx.path is not None
        disk_id = ids.format_id(
            ctx.path.subscription, ctx.path.resource_group, "Microsoft.Compute", ["disks"], [name]
        )
        if ctx.emu.lookup(disk_id) is not None:
            raise ArmError(
                409,
                "ConflictingUserInput",
                f"Disk {name} already exists in resource group "
                f"{(ctx.path.resource_group or '').upper()}. Only CreateOption.Attach is "
                "supported.",
                target="/disks/" + name,
            )

    def _check_os_profile(self, props: dict[str, Any], res: StoredResource, os_type: str) -> None:
        osp = props.get("osProfile")
        if not osp:
            raise missing_parameter("osProfile")
        user = osp.get("adminUsername")
        if not user:
            raise missing_parameter("osProfile.adminUsername")
        validate_admin_username(user, os_type)
        osp.setdefault("computerName", res.name)
        validate_computer_name(osp["computerName"], os_type)
        if osp.get("customData") is not None:
            validate_custom_data(osp["customData"])
        password = osp.get("adminPassword")
        if os_type == "Windows":
            if osp.get("linuxConfiguration"):
                raise invalid_parameter(
                    "Parameter 'linuxConfiguration' is not allowed for a Windows image.",
                    "linuxConfiguration",
                )
            if not password:
                raise missing_parameter("adminPassword")
            validate_admin_password(password, os_type)
            windows = osp.setdefault("windowsConfiguration", {})
            windows.setdefault("provisionVMAgent", True)
            windows.setdefault("enableAutomaticUpdates", True)
            return
        if osp.get("windowsConfiguration"):
            raise invalid_parameter(
                "Parameter 'windowsConfiguration' is not allowed for a Linux image.",
                "windowsConfiguration",
            )
        linux = osp.setdefault("linuxConfiguration", {})
        keys = (linux.get("ssh") or {}).get("publicKeys") or []
        disable_pw = bool(linux.get("disablePasswordAuthentication", False))
        if disable_pw and not keys:
            raise invalid_parameter(
                "Authentication using either SSH or by user name and password must be enabled "
                "in Linux profile.",
                "linuxConfiguration",
            )
        if not disable_pw:
            if not password:
                raise missing_parameter("adminPassword")
            validate_admin_password(password, os_type)
        for key in keys:
            path = key.get("path")
            if path != f"/home/{user}/.ssh/authorized_keys":
                raise invalid_parameter(
                    "The value of parameter linuxConfiguration.ssh.publicKeys.path is invalid.",
                    "linuxConfiguration.ssh.publicKeys.path",
                )
            if not key.get("keyData") or not valid_ssh_public_key(key["keyData"]):
                raise invalid_parameter(
                    "The value of parameter linuxConfiguration.ssh.publicKeys.keyData is invalid.",
                    "linuxConfiguration.ssh.publicKeys.keyData",
                )
        linux["disablePasswordAuthentication"] = disable_pw
        linux.setdefault("provisionVMAgent", True)

    def _check_secrets(
        self, emu: ArmEmulator, props: dict[str, Any], res: StoredResource, os_type: str
    ) -> None:
        """osProfile.secrets (certificates from Key Vault) and the WinRM listeners using them."""
        osp = props["osProfile"]
        groups = osp.get("secrets") or []
        if not isinstance(groups, list):
            raise invalid_parameter("osProfile.secrets must be an array.", "osProfile.secrets")
        cert_urls: set[str] = set()
        for group in groups:
            vault_id = get_path(group, "sourceVault.id")
            if not vault_id:
                raise missing_parameter("osProfile.secrets.sourceVault.id")
            vault = emu.lookup(vault_id)
            if vault is None or vault.type != VAULT or vault.subscription != res.subscription:
                raise ArmError(
                    400,
                    "KeyVaultNotFound",
                    f"The Key Vault {vault_id} referenced in osProfile.secrets was not found in "
                    f"subscription {res.subscription}.",
                    target="osProfile.secrets.sourceVault.id",
                )
            if vault.location != res.location:
                raise invalid_parameter(
                    f"The Key Vault {vault_id} is in location '{vault.location}'; a VM can only "
                    f"use a Key Vault in its own location '{res.location}'.",
                    "osProfile.secrets.sourceVault.id",
                )
            if not get_path(vault.body, "properties.enabledForDeployment", False):
                raise ArmError(
                    400,
                    "KeyVaultAccessForbidden",
                    f"Key Vault {vault_uri(vault.name)} either has not been enabled for "
                    f"deployment or the vault id provided, {vault_id}, does not match the Key "
                    "Vault's true resource id.",
                    target="osProfile.secrets.sourceVault.id",
                )
            for cert in group.get("vaultCertificates") or []:
                url = cert.get("certificateUrl")
                if not url:
                    raise missing_parameter("osProfile.secrets.vaultCertificates.certificateUrl")
                if parse_secret_url(url) is None or version_of(url) is None:
                    raise invalid_parameter(
                        f"The certificate URL {url} is invalid: it must be a Key Vault secret "
                        "URL with a version (https://<vault>.vault.azure.net/secrets/<name>/"
                        "<version>).",
                        "osProfile.secrets.vaultCertificates.certificateUrl",
                    )
                found = find_secret(emu, url)
                if found is None or not ids.same_id(found[0].id, vault.id):
                    raise ArmError(
                        400,
                        "KeyVaultSecretDoesNotExist",
                        f"The secret {url} was not found in Key Vault {vault_id}.",
                        target="osProfile.secrets.vaultCertificates.certificateUrl",
                    )
                if os_type == "Windows" and not cert.get("certificateStore"):
                    raise missing_parameter("osProfile.secrets.vaultCertificates.certificateStore")
                cert_urls.add(url.lower())
        listeners = get_path(osp, "windowsConfiguration.winRM.listeners", [])
        for listener in listeners:
            protocol = check_enum(
                listener.get("protocol"), {"Http", "Https"}, "winRM.listeners.protocol"
            )
            listener["protocol"] = protocol
            url = listener.get("certificateUrl")
            if protocol == "Http":
                if url:
                    raise invalid_parameter(
                        "A WinRM listener with protocol Http cannot have a certificateUrl.",
                        "windowsConfiguration.winRM.listeners.certificateUrl",
                    )
                continue
            if not url:
                raise missing_parameter("windowsConfiguration.winRM.listeners.certificateUrl")
            if url.lower() not in cert_urls:
                raise invalid_parameter(
                    f"The WinRM listener certificate {url} must also be listed in "
                    "osProfile.secrets (vaultCertificates.certificateUrl).",
                    "windowsConfiguration.winRM.listeners.certificateUrl",
                )

    def _install_certificates(self, emu: ArmEmulator, res: StoredResource) -> None:
        """What the Windows agent does at provisioning: load each WinRM certificate's PFX."""
        listeners = get_path(
            res.body["properties"], "osProfile.windowsConfiguration.winRM.listeners", []
        )
        out: list[dict[str, Any]] = []
        for listener in listeners:
            url = listener.get("certificateUrl")
            if listener.get("protocol") != "Https" or not url:
                out.append({"protocol": listener.get("protocol", "Http")})
                continue
            found = find_secret(emu, url)
            pems = load_vault_certificate(found[2]) if found is not None else None
            if pems is None:
                raise ArmError(
                    400,
                    "CertificateImproperlyFormatted",
                    f"The secret retrieved from {url} is improperly formatted. Please ensure that "
                    "the secret is a base64 encoded JSON object (UTF-8) with the fields 'data' "
                    "(the base64 PFX), 'dataType' ('pfx') and 'password', and that the PFX opens "
                    "with that password.",
                )
            cert_pem, key_pem = pems
            out.append(
                {
                    "protocol": "Https",
                    "certificate_url": url,
                    "certificate_pem": cert_pem,
                    "private_key_pem": key_pem,
                }
            )
        res.meta["winrm_listeners"] = out

    # effects -----------------------------------------------------------------------------

    def info(self, emu: ArmEmulator, res: StoredResource) -> VmInfo:
        props = res.body["properties"]
        osp = props.get("osProfile") or {}
        keys = get_path(osp, "linuxConfiguration.ssh.publicKeys", [])
        return VmInfo(
            id=res.id,
            name=res.name,
            resource_group=res.resource_group or "",
            location=res.location or "",
            vm_size=get_path(props, "hardwareProfile.vmSize", ""),
            os_type=res.meta.get("os_type", "Linux"),
            computer_name=osp.get("computerName", res.name),
            admin_username=osp.get("adminUsername", ""),
            ssh_public_keys=[k["keyData"] for k in keys],
            disable_password_authentication=bool(
                get_path(osp, "linuxConfiguration.disablePasswordAuthentication", False)
            ),
            custom_data=osp.get("customData"),
            public_ip=res.meta.get("public_ip"),
            private_ip=res.meta.get("private_ip"),
            image_reference=copy.deepcopy(get_path(props, "storageProfile.imageReference", {})),
            plan=res.body.get("plan"),
            os_disk_id=get_path(props, "storageProfile.osDisk.managedDisk.id"),
            os_disk_size_gb=get_path(props, "storageProfile.osDisk.diskSizeGB"),
            data_disks=[
                DataDiskInfo(
                    lun=d["lun"], size_gb=d["diskSizeGB"], id=get_path(d, "managedDisk.id")
                )
                for d in get_path(props, "storageProfile.dataDisks", [])
            ],
            identities=sorted(get_path(res.body, "identity.userAssignedIdentities", {})),
            source_image_id=res.meta.get("source_gallery_version")
            or get_path(props, "storageProfile.imageReference.id"),
            tags=dict(res.tags),
            admin_password=osp.get("adminPassword"),
            winrm_listeners=[WinRmListener(**x) for x in res.meta.get("winrm_listeners", [])],
        )

    async def on_created(self, emu: ArmEmulator, op: Operation | None, res: StoredResource) -> None:
        props = res.body["properties"]
        nics = get_path(props, "networkProfile.networkInterfaces", [])
        primary = next((n for n in nics if get_path(n, "properties.primary", False)), nics[0])
        res.meta["public_ip"], res.meta["private_ip"] = nic_addresses(emu, primary["id"])
        if res.meta.get("os_type") == "Windows" and get_path(props, "osProfile"):
            self._install_certificates(emu, res)
        if op is not None and op.kind == "update":
            return
        os_disk = props["storageProfile"]["osDisk"]
        if os_disk["createOption"] == "FromImage" and not get_path(os_disk, "managedDisk.id"):
            disk = self._create_disk(emu, res, os_disk)
            os_disk["managedDisk"]["id"] = disk.id
        elif os_disk["createOption"] == "Attach":
            disk = emu.lookup(os_disk["managedDisk"]["id"])
            if disk is not None:
                disk.body["managedBy"] = res.id
        for data_disk in props["storageProfile"]["dataDisks"]:
            data_disk["managedDisk"]["id"] = self._create_disk(
                emu, res, data_disk, data_disk["lun"]
            ).id
        res.meta["backend_started"] = True
        await emu.backend.create(self.info(emu, res))
        res.meta["power"] = "running"

    def _create_disk(
        self, emu: ArmEmulator, vm: StoredResource, disk: dict[str, Any], lun: int | None = None
    ) -> StoredResource:
        """The managed disk of the VM's OS disk (lun None) or of one of its data disks."""
        props = vm.body["properties"]
        ref = props["storageProfile"].get("imageReference") or {}
        disk_id = ids.format_id(
            vm.subscription, vm.resource_group, "Microsoft.Compute", ["disks"], [disk["name"]]
        )
        sku = disk["managedDisk"]["storageAccountType"]
        at = {} if lun is None else {"lun": lun}
        if disk["createOption"] == "Empty":
            creation: dict[str, Any] = {"createOption": "Empty"}
        elif ref.get("id"):
            creation = (
                {
                    "createOption": "FromImage",
                    "galleryImageReference": {
                        "id": vm.meta.get("source_gallery_version", ref["id"]),
                        **at,
                    },
                }
                if "/galleries/" in ref["id"].lower()
                else {"createOption": "FromImage", "imageReference": {"id": ref["id"], **at}}
            )
        else:
            img = find_marketplace(emu, ref["publisher"], ref["offer"], ref["sku"])
            assert img is not None
            creation = {
                "createOption": "FromImage",
                "imageReference": {
                    "id": marketplace_image_id(
                        vm.subscription, vm.location or "", img, vm.meta["exact_version"]
                    )
                },
            }
        os_facts = {
            "osType": vm.meta.get("os_type", "Linux"),
            "hyperVGeneration": vm.meta.get("hyper_v_generation", "V1"),
        }
        size = int(disk["diskSizeGB"])
        stored = StoredResource(
            id=disk_id,
            type=DISK,
            name=disk["name"],
            subscription=vm.subscription,
            resource_group=vm.resource_group,
            location=vm.location,
            tags={},
            api_version=vm.api_version,
            body={
                "managedBy": vm.id,
                "sku": {
                    "name": sku,
                    "tier": "Premium" if sku.startswith("Premium") else "Standard",
                },
                "properties": {
                    **(os_facts if lun is None else {}),
                    "creationData": creation,
                    "diskSizeGB": size,
                    "diskSizeBytes": size * 1024**3,
                    "uniqueId": str(uuid.uuid4()),
                    "encryption": {"type": "EncryptionAtRestWithPlatformKey"},
                    "networkAccessPolicy": "AllowAll",
                    "publicNetworkAccess": "Enabled",
                    "timeCreated": iso(utcnow()),
                    "diskState": "Attached",
                },
            },
        )
        emu.store(stored, new=True)
        return stored

    def on_failed(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        res.provisioning_state = "Failed"

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        if res.meta.get("backend_started"):
            await emu.backend.delete(self.info(emu, res))
        props = res.body["properties"]
        disks = get_path(props, "storageProfile.dataDisks", [])
        for attached in [get_path(props, "storageProfile.osDisk", {}), *disks]:
            disk_id = get_path(attached, "managedDisk.id")
            disk = emu.lookup(disk_id) if disk_id else None
            if disk is None:
                continue
            if attached.get("deleteOption") == "Delete":
                await emu.delete_resource(disk)
            else:
                disk.body.pop("managedBy", None)
                disk.body["properties"]["diskState"] = "Unattached"
        for ref in get_path(props, "networkProfile.networkInterfaces", []):
            if get_path(ref, "properties.deleteOption") == "Delete":
                nic = emu.lookup(ref["id"])
                if nic is not None:
                    await emu.delete_resource(nic, skip_check=True)

    # GET ---------------------------------------------------------------------------------

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        props = doc["properties"]
        props["vmId"] = res.meta.get("vmId")
        props["timeCreated"] = iso(res.created_at)
        osp = props.get("osProfile")
        if osp:
            osp.pop("adminPassword", None)
            osp.pop("customData", None)
            osp.setdefault("secrets", [])
            osp.setdefault("allowExtensionOperations", True)
            osp.setdefault("requireGuestProvisionSignal", True)
        if ctx is not None and (ctx.query.get("$expand") or "").lower() == "instanceview":
            props["instanceView"] = self.instance_view(emu, res)

    def instance_view(self, emu: ArmEmulator, res: StoredResource) -> dict[str, Any]:
        now = iso(utcnow())
        state = res.provisioning_state
        display = {
            "Succeeded": "Provisioning succeeded",
            "Creating": "Creating",
            "Updating": "Updating",
            "Deleting": "Deleting",
            "Failed": "Provisioning failed",
        }.get(state, state)
        statuses: list[dict[str, Any]] = [
            {
                "code": f"ProvisioningState/{state.lower()}",
                "level": "Error" if state == "Failed" else "Info",
                "displayStatus": display,
                "time": now,
            }
        ]
        if res.meta.get("generalized"):
            statuses.append(
                {"code": "OSState/generalized", "level": "Info", "displayStatus": "VM generalized"}
            )
        power = res.meta.get("power", "starting")
        statuses.append(
            {
                "code": f"PowerState/{power}",
                "level": "Info",
                "displayStatus": POWER_DISPLAY.get(power, power),
            }
        )
        osp = res.body["properties"].get("osProfile") or {}
        disk_name = get_path(res.body, "properties.storageProfile.osDisk.name")
        view: dict[str, Any] = {
            "computerName": osp.get("computerName", res.name),
            "osName": res.meta.get("os_type", "Linux").lower(),
            "hyperVGeneration": res.meta.get("hyper_v_generation", "V1"),
            "statuses": statuses,
            "disks": [
                {
                    "name": disk_name,
                    "statuses": [
                        {
                            "code": "ProvisioningState/succeeded",
                            "level": "Info",
                            "displayStatus": "Provisioning succeeded",
                            "time": now,
                        }
                    ],
                }
            ],
        }
        if power == "running":
            view["vmAgent"] = {
                "vmAgentVersion": "2.11.1.12",
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info",
                        "displayStatus": "Ready",
                        "time": now,
                    }
                ],
            }
        return view

    async def instance_view_action(self, ctx: Ctx, res: StoredResource) -> Reply:
        return Reply(200, self.instance_view(ctx.emu, res))

    # actions -----------------------------------------------------------------------------

    def _ready(self, res: StoredResource, action: str) -> None:
        if res.provisioning_state in ("Creating", "Deleting"):
            raise not_allowed(
                f"Operation '{action}' is not allowed on VM '{res.name}' since the VM is "
                f"{res.provisioning_state.lower()}."
            )

    async def deallocate(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._ready(res, "deallocate")
        self.busy(ctx, res)
        res.meta["power"] = "deallocating"
        return await self.start_action(ctx, res, "deallocate")

    async def deallocated(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        await emu.backend.deallocate(self.info(emu, res))
        res.meta["power"] = "deallocated"

    async def power_off(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._ready(res, "powerOff")
        self.busy(ctx, res)
        if res.meta.get("power") in ("deallocated", "deallocating"):
            raise not_allowed(
                f"Operation 'powerOff' is not allowed on VM '{res.name}' since the VM is "
                "deallocated."
            )
        res.meta["power"] = "stopping"
        return await self.start_action(ctx, res, "powerOff")

    async def powered_off(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        await emu.backend.power_off(self.info(emu, res))
        res.meta["power"] = "stopped"

    async def start(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._ready(res, "start")
        if res.meta.get("generalized"):
            raise not_allowed(
                f"Operation 'start' is not allowed on VM '{res.name}' since the VM is generalized."
            )
        self.busy(ctx, res)
        res.meta["power"] = "starting"
        return await self.start_action(ctx, res, "start")

    async def restart(self, ctx: Ctx, res: StoredResource) -> Reply:
        self._ready(res, "restart")
        if res.meta.get("power") != "running":
            raise not_allowed(
                f"Operation 'restart' is not allowed on VM '{res.name}' since the VM is not "
                "running."
            )
        return await self.start_action(ctx, res, "restart")

    async def started(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        await emu.backend.start(self.info(emu, res))
        res.meta["power"] = "running"

    async def generalize(self, ctx: Ctx, res: StoredResource) -> Reply:
        """Synchronous in Azure: 200 once the OS state is marked generalized."""
        self._ready(res, "generalize")
        self.busy(ctx, res)
        if res.meta.get("power") not in ("stopped", "deallocated"):
            raise not_allowed(
                f"Operation 'generalize' is not allowed on VM '{res.name}' since the VM is "
                "running. Please stop or deallocate the VM and retry."
            )
        await ctx.emu.backend.generalize(self.info(ctx.emu, res))
        res.meta["generalized"] = True
        ctx.emu.touch()
        return Reply(200)


# --- disks ------------------------------------------------------------------------------


class Disks(ComputeType):
    type_name = DISK
    top_level_fields = ("sku", "zones", "managedBy")

    def __init__(self) -> None:
        super().__init__()
        self.actions[("POST", "begingetaccess")] = self.grant_access
        self.actions[("POST", "endgetaccess")] = self.revoke_access
        self.action_done["begingetaccess"] = self.access_granted
        self.action_done["endgetaccess"] = self.access_revoked

    async def put(self, ctx: Ctx) -> Reply:
        raise ArmError(
            405,
            "UnsupportedEmulatorOperation",
            "Creating disks directly is not implemented by the ARM emulator; OS disks are "
            "created with their VM.",
        )

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        doc["properties"].setdefault("tier", "")

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        if res.body.get("managedBy"):
            raise not_allowed(f"Disk {res.name} is attached to VM {res.body['managedBy']}.")
        if res.body["properties"].get("diskState") == "ActiveSAS":
            raise not_allowed(
                f"Disk {res.name} cannot be deleted while it has an active SAS. End access and "
                "retry."
            )

    async def grant_access(self, ctx: Ctx, res: StoredResource) -> Reply:
        body = ctx.json()
        access = check_enum(body.get("access"), {"None", "Read", "Write"}, "grantAccessData.access")
        seconds = body.get("durationInSeconds")
        if not isinstance(seconds, int) or seconds <= 0:
            raise missing_parameter("grantAccessData.durationInSeconds")
        vm = ctx.emu.lookup(res.body["managedBy"]) if res.body.get("managedBy") else None
        if vm is not None and vm.meta.get("power") != "deallocated":
            raise not_allowed(
                f"Operation 'beginGetAccess' is not allowed on Disk '{res.name}' since the disk "
                f"is attached to VM '{vm.name}' that is not deallocated."
            )
        return await self.start_action(ctx, res, "beginGetAccess", access=access, seconds=seconds)

    async def access_granted(
        self, emu: ArmEmulator, op: Operation, res: StoredResource
    ) -> dict[str, Any]:
        res.body["properties"]["diskState"] = "ActiveSAS"
        url = diskaccess.grant(emu, res, op.params["access"], op.params["seconds"])
        emu.granted_sas.append(url)
        return {"accessSAS": url}

    async def revoke_access(self, ctx: Ctx, res: StoredResource) -> Reply:
        return await self.start_action(ctx, res, "endGetAccess")

    async def access_revoked(self, emu: ArmEmulator, op: Operation, res: StoredResource) -> None:
        diskaccess.revoke(res)
        res.body["properties"]["diskState"] = (
            "Attached" if res.body.get("managedBy") else "Unattached"
        )

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        await emu.backend_hook("delete_disk", res.id)


# --- managed images ---------------------------------------------------------------------


def source_not_found(source_id: str, target: str) -> ArmError:
    return ArmError(
        404, "NotFound", f"The source resource '{source_id}' was not found.", target=target
    )


class Images(ComputeType):
    type_name = IMAGE

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        emu = ctx.emu
        res = self.base_resource(ctx, existing, body)
        props = res.body["properties"]
        generation = check_enum(
            props.get("hyperVGeneration") or "V1", {"V1", "V2"}, "hyperVGeneration"
        )
        props["hyperVGeneration"] = generation
        vm_id = get_path(props, "sourceVirtualMachine.id")
        if existing is not None and not ids.same_id(
            get_path(existing.body, "properties.sourceVirtualMachine.id"), vm_id
        ):
            raise change_not_allowed("sourceVirtualMachine")
        if vm_id:
            vm = emu.lookup(vm_id)
            if vm is None or vm.type != VM:
                raise source_not_found(vm_id, "sourceVirtualMachine")
            if vm.location != res.location:
                raise invalid_parameter(
                    f"Source virtual machine '{vm_id}' is in location '{vm.location}'; the image "
                    f"must be created in the same location, not '{res.location}'.",
                    "sourceVirtualMachine",
                )
            if not vm.meta.get("generalized"):
                raise not_allowed(
                    f"The operation 'Create Image' is not allowed on VM '{vm.name}' since the VM "
                    "is not generalized. Generalize the VM and retry."
                )
            if vm.meta.get("hyper_v_generation", "V1") != generation:
                raise invalid_parameter(
                    f"The hyper-V generation of the source virtual machine "
                    f"({vm.meta.get('hyper_v_generation', 'V1')}) does not match the requested "
                    f"hyperVGeneration ({generation}) of the image.",
                    "hyperVGeneration",
                )
            os_disk = get_path(vm.body, "properties.storageProfile.osDisk", {})
            props["storageProfile"] = {
                "osDisk": {
                    "osType": vm.meta.get("os_type", "Linux"),
                    "osState": "Generalized",
                    "diskSizeGB": os_disk.get("diskSizeGB"),
                    "managedDisk": {"id": get_path(os_disk, "managedDisk.id")},
                    "caching": "ReadWrite",
                    "storageAccountType": get_path(
                        os_disk, "managedDisk.storageAccountType", "Standard_LRS"
                    ),
                },
                "dataDisks": [
                    {
                        "lun": d["lun"],
                        "diskSizeGB": d["diskSizeGB"],
                        "caching": d["caching"],
                        "managedDisk": {"id": get_path(d, "managedDisk.id")},
                        "storageAccountType": get_path(d, "managedDisk.storageAccountType"),
                    }
                    for d in get_path(vm.body, DATA_DISKS, [])
                ],
                "zoneResilient": bool(get_path(props, "storageProfile.zoneResilient", False)),
            }
            res.meta["source_plan"] = vm.meta.get("image_plan")
            return res
        os_disk = get_path(props, "storageProfile.osDisk")
        if not os_disk:
            raise invalid_parameter(
                "Either sourceVirtualMachine or storageProfile.osDisk must be specified.",
                "storageProfile.osDisk",
            )
        check_enum(os_disk.get("osType"), {"Linux", "Windows"}, "storageProfile.osDisk.osType")
        check_enum(
            os_disk.get("osState"), {"Generalized", "Specialized"}, "storageProfile.osDisk.osState"
        )
        sources = [
            get_path(os_disk, "managedDisk.id"),
            get_path(os_disk, "snapshot.id"),
            os_disk.get("blobUri"),
        ]
        if not any(sources):
            raise missing_parameter("storageProfile.osDisk.managedDisk")
        disk_id = get_path(os_disk, "managedDisk.id")
        if disk_id and emu.lookup(disk_id) is None:
            raise source_not_found(disk_id, "storageProfile.osDisk.managedDisk.id")
        os_disk.setdefault("diskSizeGB", 30)
        return res

    async def on_created(self, emu: ArmEmulator, op: Operation | None, res: StoredResource) -> None:
        """The backend keeps a copy of the source disk under the image's id."""
        if op is not None and op.kind != "create":
            return
        props = res.body["properties"]
        source = get_path(props, "sourceVirtualMachine.id") or get_path(
            props, "storageProfile.osDisk.managedDisk.id"
        )
        if source:
            await emu.backend_hook("capture", source, res.id)

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        await emu.backend_hook("discard", res.id)


# --- galleries --------------------------------------------------------------------------


class Galleries(ComputeType):
    type_name = GALLERY

    def validate_name(self, name: str) -> None:
        validate_gallery_name(name)

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        res = self.base_resource(ctx, existing, body)
        res.body["properties"]["identifier"] = {
            "uniqueName": f"{res.subscription}-{res.name.upper()}"
        }
        return res

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        if emu.resources_of(GALLERY_IMAGE, res.id):
            raise ArmError(
                409,
                "CannotDeleteResource",
                "Can not delete resource before nested resources are deleted.",
            )


class GalleryChild(ComputeType):
    """Gallery images and versions: their parent must exist and share its location."""

    def parent(self, ctx: Ctx) -> StoredResource:
        assert ctx.path is not None
        require_group(ctx)
        parent = ctx.emu.lookup(ids.parent_id(ctx.path.resource_id()))
        if parent is None:
            raise parent_missing(ctx.path.names[-2])
        return parent

    async def get(self, ctx: Ctx) -> Reply:
        self.parent(ctx)
        return await super().get(ctx)

    def same_location(self, parent: StoredResource, res: StoredResource) -> None:
        if parent.location != res.location:
            raise invalid_parameter(
                f"The location '{res.location}' of '{res.name}' must match the location "
                f"'{parent.location}' of its parent '{parent.name}'.",
                "location",
            )


class GalleryImages(GalleryChild):
    type_name = GALLERY_IMAGE
    name_target = "galleryImageName"

    def validate_name(self, name: str) -> None:
        validate_gallery_image_name(name)

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        gallery = self.parent(ctx)
        res = self.base_resource(ctx, existing, body)
        self.same_location(gallery, res)
        props = res.body["properties"]
        props["osType"] = check_enum(
            require(body, "properties.osType", "osType"), {"Linux", "Windows"}, "osType"
        )
        props["osState"] = check_enum(
            require(body, "properties.osState", "osState"),
            {"Generalized", "Specialized"},
            "osState",
        )
        for part in ("publisher", "offer", "sku"):
            require(body, f"properties.identifier.{part}", f"identifier.{part}")
        props["hyperVGeneration"] = check_enum(
            props.get("hyperVGeneration") or "V1", {"V1", "V2"}, "hyperVGeneration"
        )
        props["architecture"] = check_enum(
            props.get("architecture") or "x64", {"x64", "Arm64"}, "architecture"
        )
        if existing is not None:
            old = existing.body["properties"]
            for prop in ("osType", "osState", "hyperVGeneration", "identifier"):
                if old.get(prop) != props.get(prop):
                    raise change_not_allowed(f"galleryImage.properties.{prop}")
        for other in ctx.emu.resources_of(GALLERY_IMAGE, gallery.id):
            if other.id.lower() != res.id.lower() and {
                k: str(v).lower() for k, v in other.body["properties"].get("identifier", {}).items()
            } == {k: str(v).lower() for k, v in props["identifier"].items()}:
                raise ArmError(
                    409,
                    "GalleryImageIdentifierAlreadyExists",
                    f"The gallery image identifier (publisher, offer, sku) is already used by "
                    f"gallery image '{other.name}'.",
                )
        return res

    def check_delete(self, emu: ArmEmulator, res: StoredResource) -> None:
        if emu.resources_of(GALLERY_VERSION, res.id):
            raise ArmError(
                409,
                "CannotDeleteResource",
                "Can not delete resource before nested resources are deleted.",
            )


class GalleryImageVersions(GalleryChild):
    type_name = GALLERY_VERSION
    name_target = "galleryImageVersionName"

    def validate_name(self, name: str) -> None:
        validate_gallery_image_version_name(name)

    def build(
        self, ctx: Ctx, existing: StoredResource | None, body: dict[str, Any]
    ) -> StoredResource:
        emu = ctx.emu
        definition = self.parent(ctx)
        gallery = emu.lookup(ids.parent_id(definition.id))
        res = self.base_resource(ctx, existing, body)
        if gallery is not None:
            self.same_location(gallery, res)
        props = res.body["properties"]
        dprops = definition.body["properties"]
        publishing = props.setdefault("publishingProfile", {})
        storage_type = check_enum(
            publishing.get("storageAccountType") or "Standard_LRS",
            GALLERY_STORAGE_TYPES,
            "publishingProfile.storageAccountType",
        )
        replica_count = publishing.get("replicaCount", 1)
        self._replicas(replica_count, "publishingProfile.replicaCount")
        regions = publishing.get("targetRegions") or [{"name": res.location}]
        seen: set[str] = set()
        out_regions = []
        for region in regions:
            name = emu.check_location(region.get("name"), self.type_name)
            assert name is not None
            if name in seen:
                raise invalid_parameter(
                    f"The region '{name}' is listed more than once in targetRegions.",
                    "publishingProfile.targetRegions",
                )
            seen.add(name)
            count = region.get("regionalReplicaCount", replica_count)
            self._replicas(count, "publishingProfile.targetRegions.regionalReplicaCount")
            out = dict(region)
            out["name"] = name
            out["regionalReplicaCount"] = count
            out["storageAccountType"] = check_enum(
                region.get("storageAccountType") or storage_type,
                GALLERY_STORAGE_TYPES,
                "publishingProfile.targetRegions.storageAccountType",
            )
            out_regions.append(out)
        if res.location not in seen:
            raise invalid_parameter(
                f"The target regions of the gallery image version must include its location "
                f"'{res.location}'.",
                "publishingProfile.targetRegions",
            )
        publishing["targetRegions"] = out_regions
        publishing["replicaCount"] = replica_count
        publishing["storageAccountType"] = storage_type
        publishing["excludeFromLatest"] = bool(publishing.get("excludeFromLatest", False))
        publishing.setdefault("replicationMode", "Full")
        source_id = get_path(props, "storageProfile.source.id") or get_path(
            props, "storageProfile.source.virtualMachineId"
        )
        if not source_id:
            raise missing_parameter("galleryImageVersion.properties.storageProfile.source.id")
        if existing is not None:
            old_source = existing.meta.get("source_id")
            if not ids.same_id(old_source, source_id):
                raise change_not_allowed("galleryImageVersion.properties.storageProfile.source.id")
        source = emu.lookup(source_id)
        if source is None:
            raise source_not_found(
                source_id, "galleryImageVersion.properties.storageProfile.source.id"
            )
        if source.location != res.location:
            raise invalid_parameter(
                f"The source '{source_id}' is in location '{source.location}'; it must be in "
                f"the location '{res.location}' of the gallery image version.",
                "galleryImageVersion.properties.storageProfile.source.id",
            )
        generation, os_type, size = self._source_facts(source, dprops)
        if generation != dprops.get("hyperVGeneration", "V1"):
            raise invalid_parameter(
                f"The hyper-V generation of the source ({generation}) does not match the "
                f"hyperVGeneration ({dprops.get('hyperVGeneration', 'V1')}) of gallery image "
                f"'{definition.name}'.",
                "galleryImageVersion.properties.storageProfile.source.id",
            )
        if os_type != dprops.get("osType"):
            raise invalid_parameter(
                f"The OS type of the source ({os_type}) does not match the osType "
                f"({dprops.get('osType')}) of gallery image '{definition.name}'.",
                "galleryImageVersion.properties.storageProfile.source.id",
            )
        res.meta["source_id"] = source.id
        res.meta["sizeInGB"] = size
        props["storageProfile"] = {
            "source": {"id": source.id}
            if source.type != VM
            else {"id": source.id, "virtualMachineId": source.id},
            "osDiskImage": {"sizeInGB": size, "hostCaching": "ReadWrite"},
            "dataDiskImages": [
                {"lun": d["lun"], "sizeInGB": d["sizeGB"], "hostCaching": d["caching"]}
                for d in data_disk_images(source)
            ],
        }
        props.setdefault(
            "safetyProfile",
            {"allowDeletionOfReplicatedLocations": True, "reportedForPolicyViolation": False},
        )
        res.meta["replication"] = dict.fromkeys(seen, "Replicating")
        return res

    def _replicas(self, count: Any, target: str) -> None:
        if not isinstance(count, int) or not 1 <= count <= 100:
            raise invalid_parameter(
                f"The value {count} of parameter '{target}' is out of range. The value must be "
                "between 1 and 100, inclusive.",
                target,
            )

    def _source_facts(self, source: StoredResource, dprops: dict[str, Any]) -> tuple[str, str, int]:
        if source.type == VM:
            if source.provisioning_state != "Succeeded":
                raise not_allowed(
                    f"The source virtual machine '{source.name}' is not in a succeeded state."
                )
            if source.meta.get("power") not in ("stopped", "deallocated"):
                raise not_allowed(
                    f"The source virtual machine '{source.name}' must be stopped (deallocated) "
                    "to capture a gallery image version."
                )
            if dprops.get("osState") == "Generalized" and not source.meta.get("generalized"):
                raise invalid_parameter(
                    f"The source virtual machine '{source.id}' is not generalized but gallery "
                    "image definition osState is 'Generalized'.",
                    "galleryImageVersion.properties.storageProfile.source.id",
                )
            if dprops.get("osState") == "Specialized" and source.meta.get("generalized"):
                raise invalid_parameter(
                    f"The source virtual machine '{source.id}' is generalized but gallery image "
                    "definition osState is 'Specialized'.",
                    "galleryImageVersion.properties.storageProfile.source.id",
                )
            return (
                source.meta.get("hyper_v_generation", "V1"),
                source.meta.get("os_type", "Linux"),
                int(get_path(source.body, "properties.storageProfile.osDisk.diskSizeGB", 30)),
            )
        if source.type == IMAGE:
            if source.provisioning_state != "Succeeded":
                raise not_allowed(f"The source image '{source.name}' is not in a succeeded state.")
            return (
                get_path(source.body, "properties.hyperVGeneration", "V1"),
                get_path(source.body, "properties.storageProfile.osDisk.osType", "Linux"),
                int(get_path(source.body, "properties.storageProfile.osDisk.diskSizeGB", 30)),
            )
        if source.type == GALLERY_VERSION:
            definition = source.meta.get("definition_facts") or {}
            return (
                definition.get("hyperVGeneration", dprops.get("hyperVGeneration", "V1")),
                definition.get("osType", dprops.get("osType")),
                int(source.meta.get("sizeInGB", 30)),
            )
        if source.type == DISK:
            return (
                get_path(source.body, "properties.hyperVGeneration", "V1"),
                get_path(source.body, "properties.osType", "Linux"),
                int(get_path(source.body, "properties.diskSizeGB", 30)),
            )
        raise invalid_parameter(
            f"The source '{source.id}' of type {source.type} cannot be captured into a gallery "
            "image version.",
            "galleryImageVersion.properties.storageProfile.source.id",
        )

    async def on_created(self, emu: ArmEmulator, op: Operation | None, res: StoredResource) -> None:
        if (op is None or op.kind == "create") and res.meta.get("source_id"):
            await emu.backend_hook("capture", res.meta["source_id"], res.id)
        res.meta["replication"] = dict.fromkeys(res.meta.get("replication", {}), "Completed")
        res.body["properties"]["publishingProfile"]["publishedDate"] = iso(utcnow())
        definition = emu.lookup(ids.parent_id(res.id))
        if definition is not None:
            res.meta["definition_facts"] = {
                "hyperVGeneration": definition.body["properties"].get("hyperVGeneration", "V1"),
                "osType": definition.body["properties"].get("osType"),
            }

    async def on_deleted(self, emu: ArmEmulator, res: StoredResource) -> None:
        await emu.backend_hook("discard", res.id)

    def decorate(
        self, emu: ArmEmulator, res: StoredResource, doc: dict[str, Any], ctx: Ctx | None
    ) -> None:
        if ctx is not None and (ctx.query.get("$expand") or "").lower() == "replicationstatus":
            replication = res.meta.get("replication", {})
            states = set(replication.values())
            doc["properties"]["replicationStatus"] = {
                "aggregatedState": "Completed" if states == {"Completed"} else "InProgress",
                "summary": [
                    {
                        "region": region,
                        "state": state,
                        "details": "",
                        "progress": 100 if state == "Completed" else 0,
                    }
                    for region, state in replication.items()
                ],
            }


# --- marketplace, sizes, SKUs -----------------------------------------------------------

SIZE_FACTS = {
    "Standard_B2s": (2, 4096),
    "Standard_B2ms": (2, 8192),
    "Standard_D1_v2": (1, 3584),
    "Standard_DS1_v2": (1, 3584),
    "Standard_DS2_v2": (2, 7168),
    "Standard_D2s_v3": (2, 8192),
    "Standard_D2ds_v4": (2, 8192),
    "Standard_D2s_v5": (2, 8192),
    "Standard_D4s_v5": (4, 16384),
    "Standard_D2ds_v5": (2, 8192),
    "Standard_F2s_v2": (2, 4096),
}


def artifact_not_found() -> ArmError:
    return ArmError(404, "NotFound", "Artifact: VMImage was not found.")


def marketplace_route(ctx: Ctx, location: str, segs: list[str]) -> Reply:
    """`locations/{loc}/publishers[/{p}/artifacttypes/vmimage/offers[/{o}/skus[/{k}/versions[/{v}]]]]`."""
    emu = ctx.emu
    sub = ctx.path.subscription if ctx.path else ""
    loc = location.replace(" ", "").lower()
    images = [m for m in emu.marketplace if m.offered_in(loc)]
    low = [s.lower() for s in segs]
    base = f"/Subscriptions/{sub}/Providers/Microsoft.Compute/Locations/{loc}/Publishers"

    def entry(name: str, id_: str) -> dict[str, Any]:
        return {"location": loc, "name": name, "id": id_}

    def keywords_ok() -> bool:
        expected = [
            "publishers",
            None,
            "artifacttypes",
            "vmimage",
            "offers",
            None,
            "skus",
            None,
            "versions",
            None,
        ]
        return all(e is None or e == got for e, got in zip(expected, low, strict=False))

    if not keywords_ok():
        raise artifact_not_found()
    if len(segs) == 1:
        pubs = sorted({m.publisher for m in images})
        return Reply(200, [entry(p, f"{base}/{p}") for p in pubs])
    images = [m for m in images if m.publisher.lower() == low[1]]
    if len(segs) == 5:
        offers = sorted({m.offer for m in images})
        return Reply(
            200, [entry(o, f"{base}/{segs[1]}/ArtifactTypes/VMImage/Offers/{o}") for o in offers]
        )
    if len(segs) < 7:
        raise artifact_not_found()
    images = [m for m in images if m.offer.lower() == low[5]]
    if len(segs) == 7:
        if not images:
            raise artifact_not_found()
        return Reply(
            200,
            [
                entry(
                    m.sku,
                    f"{base}/{m.publisher}/ArtifactTypes/VMImage/Offers/{m.offer}/Skus/{m.sku}",
                )
                for m in images
            ],
        )
    img = next((m for m in images if m.sku.lower() == low[7]), None)
    if img is None or len(segs) not in (9, 10):
        raise artifact_not_found()
    if len(segs) == 9:
        versions = sorted(img.versions, key=version_key)
        orderby = (ctx.query.get("$orderby") or "").lower().replace(" ", "")
        if orderby == "namedesc":
            versions.reverse()
        top = ctx.query.get("$top")
        if top:
            versions = versions[: int(top)]
        return Reply(200, [entry(v, marketplace_image_id(sub, loc, img, v)) for v in versions])
    v = segs[9]
    if v.lower() == "latest":
        v = max(img.versions, key=version_key)
    if v not in img.versions:
        raise artifact_not_found()
    props: dict[str, Any] = {
        "osDiskImage": {"operatingSystem": img.os_type, "sizeInGb": img.disk_size_gb},
        "dataDiskImages": [],
        "automaticOSUpgradeProperties": {"automaticOSUpgradeSupported": False},
        "hyperVGeneration": img.hyper_v_generation,
        "disallowed": {"vmDiskType": "None"},
        "architecture": img.architecture,
        "imageDeprecationStatus": {"imageState": "Active"},
        "features": [{"name": "IsAcceleratedNetworkSupported", "value": "True"}],
    }
    if img.plan:
        props["plan"] = img.plan.model_dump()
    return Reply(
        200,
        {
            "id": marketplace_image_id(sub, loc, img, v),
            "name": v,
            "location": loc,
            "properties": props,
        },
    )


def vm_sizes_route(ctx: Ctx, location: str) -> Reply:
    sizes = sorted(ctx.emu.vm_sizes_in(location.lower()))
    return Reply(
        200,
        {
            "value": [
                {
                    "name": s,
                    "numberOfCores": SIZE_FACTS.get(s, (2, 8192))[0],
                    "osDiskSizeInMB": 1047552,
                    "resourceDiskSizeInMB": 16384,
                    "memoryInMB": SIZE_FACTS.get(s, (2, 8192))[1],
                    "maxDataDiskCount": max_data_disks(s),
                }
                for s in sizes
            ]
        },
    )


def skus_route(ctx: Ctx) -> Reply:
    """Resource SKUs of virtualMachines, with Location restrictions where a size is absent."""
    emu = ctx.emu
    wanted: str | None = None
    odata = ctx.query.get("$filter") or ""
    if odata:
        m = re.match(r"^\s*location\s+eq\s+'([^']+)'\s*$", odata, re.I)
        if not m:
            raise ArmError(400, "InvalidFilterInQueryString", f"Unsupported $filter '{odata}'.")
        wanted = m.group(1).replace(" ", "").lower()
    locations = [wanted] if wanted else sorted(emu.locations)
    value = []
    for size in sorted(emu.known_vm_sizes()):
        for loc in locations:
            cores, mem = SIZE_FACTS.get(size, (2, 8192))
            restrictions = []
            if size not in emu.vm_sizes_in(loc):
                restrictions.append(
                    {
                        "type": "Location",
                        "values": [loc],
                        "restrictionInfo": {"locations": [loc]},
                        "reasonCode": "NotAvailableForSubscription",
                    }
                )
            value.append(
                {
                    "resourceType": "virtualMachines",
                    "name": size,
                    "tier": "Standard",
                    "size": size.removeprefix("Standard_"),
                    "family": "standard"
                    + size.split("_")[1].rstrip("0123456789").upper()
                    + "Family",
                    "locations": [loc],
                    "locationInfo": [{"location": loc, "zones": [], "zoneDetails": []}],
                    "capabilities": [
                        {"name": "vCPUs", "value": str(cores)},
                        {"name": "MemoryGB", "value": str(mem / 1024)},
                        {"name": "HyperVGenerations", "value": "V1,V2"},
                        {
                            "name": "PremiumIO",
                            "value": "True" if "s" in size.split("_")[1].lower() else "False",
                        },
                    ],
                    "restrictions": restrictions,
                }
            )
    return Reply(200, {"value": value})
