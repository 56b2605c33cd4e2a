"""The pluggable part of a VM: what happens on the "host" when ARM creates or stops one.

The emulator owns the ARM side (state, LROs, validation); a VmBackend owns the machine.
The default does nothing, so tests of the provider logic need no QEMU; a later backend
can boot a real SSH target at `vm.address` with `vm.admin_username` and the SSH keys.
A backend may raise ArmError to make the operation fail with that code and message.

Optional hooks (the emulator calls them only when the backend has them), for a backend
whose VMs have real disks:

- `capture(source_id, target_id)`: a managed image or gallery image version `target_id`
  was made from `source_id` (a VM, OS disk, managed image or gallery image version); keep
  a copy of that disk so VMs created from `target_id` boot from it.
- `discard(target_id)`: that image or version was deleted.
- `delete_disk(disk_id)`: the OS disk was deleted (a VM's delete leaves it unless its
  deleteOption is Delete).
- `disk_vhd(disk_id) -> Path`: the disk as a fixed VHD file; with it, beginGetAccess hands
  out an accessSAS URL served by the emulator itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .models import VmInfo


@runtime_checkable
class VmBackend(Protocol):
    """Called by the emulator, inside the VM's long-running operations."""

    async def create(self, vm: VmInfo) -> None: ...

    async def start(self, vm: VmInfo) -> None: ...

    async def power_off(self, vm: VmInfo) -> None: ...

    async def deallocate(self, vm: VmInfo) -> None: ...

    async def generalize(self, vm: VmInfo) -> None: ...

    async def delete(self, vm: VmInfo) -> None: ...


@runtime_checkable
class DiskBackend(Protocol):
    """The optional hooks of a backend whose VMs have real disks (see the module docstring)."""

    async def capture(self, source_id: str, target_id: str) -> None: ...

    async def discard(self, target_id: str) -> None: ...

    async def delete_disk(self, disk_id: str) -> None: ...

    async def disk_vhd(self, disk_id: str) -> Path: ...


class NoopVmBackend:
    """A VM that exists only in ARM's books."""

    async def create(self, vm: VmInfo) -> None:
        return None

    async def start(self, vm: VmInfo) -> None:
        return None

    async def power_off(self, vm: VmInfo) -> None:
        return None

    async def deallocate(self, vm: VmInfo) -> None:
        return None

    async def generalize(self, vm: VmInfo) -> None:
        return None

    async def delete(self, vm: VmInfo) -> None:
        return None

    async def capture(self, source_id: str, target_id: str) -> None:
        return None

    async def discard(self, target_id: str) -> None:
        return None

    async def delete_disk(self, disk_id: str) -> None:
        return None


class RecordingVmBackend(NoopVmBackend):
    """Remembers every call, for tests that assert what the host was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, VmInfo]] = []
        # ("capture", source_id, target_id), ("discard", id), ("delete_disk", id)
        self.disk_calls: list[tuple[str, ...]] = []

    async def create(self, vm: VmInfo) -> None:
        self.calls.append(("create", vm))

    async def start(self, vm: VmInfo) -> None:
        self.calls.append(("start", vm))

    async def power_off(self, vm: VmInfo) -> None:
        self.calls.append(("power_off", vm))

    async def deallocate(self, vm: VmInfo) -> None:
        self.calls.append(("deallocate", vm))

    async def generalize(self, vm: VmInfo) -> None:
        self.calls.append(("generalize", vm))

    async def delete(self, vm: VmInfo) -> None:
        self.calls.append(("delete", vm))

    async def capture(self, source_id: str, target_id: str) -> None:
        self.disk_calls.append(("capture", source_id, target_id))

    async def discard(self, target_id: str) -> None:
        self.disk_calls.append(("discard", target_id))

    async def delete_disk(self, disk_id: str) -> None:
        self.disk_calls.append(("delete_disk", disk_id))
