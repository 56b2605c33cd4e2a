"""Azure VM sizes the local provider knows: vCPUs and memory, as Azure's size pages list
them. The local build VM gets the size's shape, capped by what the host has."""

from __future__ import annotations

from pydantic import BaseModel


class VmShape(BaseModel):
    cpus: int
    memory_mb: int


def _gib(cpus: int, gib: float) -> VmShape:
    return VmShape(cpus=cpus, memory_mb=int(gib * 1024))


# Common sizes of build VMs (Azure names sizes case-insensitively).
VM_SIZES: dict[str, VmShape] = {
    "Standard_B1s": _gib(1, 1),
    "Standard_B1ms": _gib(1, 2),
    "Standard_B2s": _gib(2, 4),
    "Standard_B2ms": _gib(2, 8),
    "Standard_B4ms": _gib(4, 16),
    "Standard_D1_v2": _gib(1, 3.5),
    "Standard_D2_v2": _gib(2, 7),
    "Standard_DS1_v2": _gib(1, 3.5),
    "Standard_DS2_v2": _gib(2, 7),
    "Standard_DS3_v2": _gib(4, 14),
    "Standard_D2_v3": _gib(2, 8),
    "Standard_D2s_v3": _gib(2, 8),
    "Standard_D4s_v3": _gib(4, 16),
    "Standard_D2s_v4": _gib(2, 8),
    "Standard_D2ds_v4": _gib(2, 8),
    "Standard_D4ds_v4": _gib(4, 16),
    "Standard_D2s_v5": _gib(2, 8),
    "Standard_D4s_v5": _gib(4, 16),
    "Standard_D8s_v5": _gib(8, 32),
    "Standard_D2ds_v5": _gib(2, 8),
    "Standard_D4ds_v5": _gib(4, 16),
    "Standard_D2as_v5": _gib(2, 8),
    "Standard_D4as_v5": _gib(4, 16),
    "Standard_E2s_v3": _gib(2, 16),
    "Standard_E2s_v5": _gib(2, 16),
    "Standard_F2s_v2": _gib(2, 4),
    "Standard_F4s_v2": _gib(4, 8),
}
_BY_LOWER = {name.lower(): shape for name, shape in VM_SIZES.items()}


def vm_shape(size: str) -> VmShape | None:
    return _BY_LOWER.get(size.lower())


def known_sizes_cel() -> str:
    """The table's names, lower case, as a CEL list literal."""
    return "[" + ", ".join(f"'{name}'" for name in _BY_LOWER) + "]"


def unknown_size_message(provider: str) -> str:
    return (
        f"is not a VM size the {provider} provider knows; use one of "
        + ", ".join(VM_SIZES)
        + " (or leave it unset)"
    )


def capped(size: str, shape: VmShape, host_cpus: int, host_memory_mb: int) -> tuple[VmShape, str]:
    """The shape the host can give (at most its CPUs, half its memory), and a message
    saying what the VM got and what was capped."""
    limit_memory = max(256, host_memory_mb // 2)
    got = VmShape(cpus=min(shape.cpus, host_cpus), memory_mb=min(shape.memory_mb, limit_memory))
    message = f"{size}: {got.cpus} vCPU(s), {got.memory_mb} MiB"
    cuts = []
    if got.cpus < shape.cpus:
        cuts.append(f"{shape.cpus} vCPUs capped to the host's {host_cpus} CPUs")
    if got.memory_mb < shape.memory_mb:
        cuts.append(f"{shape.memory_mb} MiB capped to half the host's memory")
    return got, message + (f" ({'; '.join(cuts)})" if cuts else "")
