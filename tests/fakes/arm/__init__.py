"""A local Azure Resource Manager (and Entra ID) for tests, spoken to by the real azure SDKs.

    from fakes.arm import ArmEmulator
    from azure.mgmt.compute import ComputeManagementClient

    with ArmEmulator(lro_duration=0.1, retry_after=0.05) as arm:   # background thread
        compute = arm.client(ComputeManagementClient)
        # == ComputeManagementClient(arm.credential(), arm.subscription_id,
        #        base_url=arm.url, credential_scopes=[arm.url + "/.default"],
        #        connection_verify=str(arm.ca_path))
        ...
        arm.inventory(); arm.requests; arm.creation_count(vm_id)
        arm.fail_next("PUT", r"/virtualMachines/", 409, "AllocationFailed", "...")

`async with ArmEmulator() as arm:` runs it in the current loop (for the aio clients).
"""

from .backend import DiskBackend, NoopVmBackend, RecordingVmBackend, VmBackend
from .emulator import DEFAULT_CLIENT_ID, DEFAULT_SUBSCRIPTION, DEFAULT_TENANT, ArmEmulator
from .errors import ArmError
from .faults import FailNext
from .models import (
    DEFAULT_LOCATIONS,
    DEFAULT_MARKETPLACE,
    DEFAULT_VM_SIZES,
    InventoryItem,
    MarketplaceImage,
    Plan,
    RequestRecord,
    VmInfo,
)

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_LOCATIONS",
    "DEFAULT_MARKETPLACE",
    "DEFAULT_SUBSCRIPTION",
    "DEFAULT_TENANT",
    "DEFAULT_VM_SIZES",
    "ArmEmulator",
    "ArmError",
    "DiskBackend",
    "FailNext",
    "InventoryItem",
    "MarketplaceImage",
    "NoopVmBackend",
    "Plan",
    "RecordingVmBackend",
    "RequestRecord",
    "VmBackend",
    "VmInfo",
]
