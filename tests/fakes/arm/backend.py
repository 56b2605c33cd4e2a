"""The pluggable part of a VM: what happens on the "host" when ARM creates or stops one.

The emulator owns the ARM side (state, LROs, validation); a VmBackend owns the machine.
The default does nothing, so tests of the provider logic need no QEMU; a later backend
can boot a real SSH target at `vm.address` with `vm.admin_username` and the SSH keys.
A backend may raise ArmError to make the operation fail with that code and message.
"""

from __future__ import annotations

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


class RecordingVmBackend(NoopVmBackend):
    """Remembers every call, for tests that assert what the host was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, VmInfo]] = []

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
