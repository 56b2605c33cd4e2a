"""QEMU helpers that need no VM: overlays, ports, specs, finding VMs, the KVM verdict cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.providers.local import disks, qemu

GIB = 1024**3


@pytest.fixture
def base(tmp_path: Path) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-utils")
    path = tmp_path / "base.qcow2"
    disks.run_tool(["qemu-img", "create", "-q", "-f", "qcow2", path, "2G"])
    return path


@pytest.mark.parametrize(
    ("size_gb", "expected"), [(None, 2 * GIB), (0, 2 * GIB), (2, 2 * GIB), (5, 5 * GIB)]
)
def test_overlay_grows(tmp_path: Path, base: Path, size_gb: int | None, expected: int) -> None:
    overlay = tmp_path / "os.qcow2"
    qemu.create_overlay(base, overlay, size_gb)
    info = disks.image_info(overlay)
    assert info["virtual-size"] == expected
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"


def test_overlay_refuses_to_shrink(tmp_path: Path, base: Path) -> None:
    with pytest.raises(ValueError, match="smaller than the source image"):
        qemu.create_overlay(base, tmp_path / "os.qcow2", 1)
    assert not (tmp_path / "os.qcow2").exists()


def test_free_port_is_bindable() -> None:
    port = qemu.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_spec_and_handle_roundtrip_json(tmp_path: Path) -> None:
    spec = qemu.VmSpec(name="b1", state_dir=tmp_path / "vm", disk=tmp_path / "os.qcow2")
    assert qemu.VmSpec.model_validate_json(spec.model_dump_json()) == spec
    assert spec.accel == qemu.TCG_ARGS and spec.memory_mb == 1024 and spec.cpus == 2
    handle = qemu.VmHandle(
        name="b1",
        pid=1,
        state_dir=spec.state_dir,
        pidfile=spec.state_dir / "qemu.pid",
        qmp_socket=spec.state_dir / "qmp.sock",
        serial_log=spec.state_dir / "serial.log",
        ssh_port=2222,
    )
    assert qemu.VmHandle.model_validate_json(handle.model_dump_json()) == handle


def test_state_dir_too_long_for_qmp_socket(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="too long"):
        qemu.VmSpec(name="b", state_dir=tmp_path / ("x" * 120), disk=tmp_path / "d")


def test_find_ignores_missing_stale_and_foreign_pids(tmp_path: Path) -> None:
    assert qemu.find(tmp_path) is None
    (tmp_path / "qemu.pid").write_text("garbage\n")
    assert qemu.find(tmp_path) is None
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")  # alive, but not a qemu
    assert qemu.find(tmp_path) is None


def test_accelerator_uses_cached_verdict(tmp_path: Path) -> None:
    verdict = {"kvm": True, "host_kernel": platform.release(), "checked": "x"}
    (tmp_path / "accel.json").write_text(json.dumps(verdict))
    assert qemu.accelerator(tmp_path) == qemu.KVM_ARGS
    verdict["kvm"] = False
    (tmp_path / "accel.json").write_text(json.dumps(verdict))
    assert qemu.accelerator(tmp_path) == qemu.TCG_ARGS


@pytest.mark.parametrize("generation", ["V1", "V2"])
def test_vms_boot_by_firmware_alone(tmp_path: Path, generation: str) -> None:
    spec = qemu.VmSpec(
        name="b", state_dir=tmp_path / "vm", disk=tmp_path / "os.qcow2", generation=generation
    )
    spec.state_dir.mkdir()
    argv = qemu._qemu_argv(spec, 2222)
    assert not {"-kernel", "-initrd", "-append", "-bios"} & set(argv)
    assert "virtio-net-pci,netdev=net0,romfile=" in argv  # no network boot to try first
    pflash = [a for a in argv if a.startswith("if=pflash")]
    if generation == "V1":
        assert pflash == []  # QEMU's own SeaBIOS
        return
    variables = spec.state_dir / qemu.UEFI_VARS
    assert pflash == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_CODE}",
        f"if=pflash,format=raw,unit=1,file={variables}",
    ]
    assert variables.read_bytes() == qemu.OVMF_VARS.read_bytes()  # this VM's own copy
    variables.write_bytes(b"changed by the guest")
    qemu._qemu_argv(spec, 2222)
    assert variables.read_bytes() == b"changed by the guest"  # kept across boots


def test_data_disks_are_virtio_drives_named_by_lun(tmp_path: Path) -> None:
    data = [tmp_path / "lun0.qcow2", tmp_path / "lun1.qcow2"]
    for path, size in zip(data, (1, 2), strict=True):
        qemu.create_data_disk(path, size)
    assert [disks.virtual_size(p) for p in data] == [1 << 30, 2 << 30]
    spec = qemu.VmSpec(
        name="b",
        state_dir=tmp_path / "vm",
        disk=tmp_path / "os.qcow2",
        data_disks=data,
        cpus=1,
        memory_mb=2048,
        generation="V1",
    )
    argv = qemu._qemu_argv(spec, 2222)
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [
        f"file={spec.disk},if=none,id=os,format=qcow2,discard=unmap",
        f"file={data[0]},if=none,id=lun0,format=qcow2,discard=unmap",
        f"file={data[1]},if=none,id=lun1,format=qcow2,discard=unmap",
    ]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[:3] == [  # the OS disk first: the guest's vda
        "virtio-blk-pci,drive=os",
        "virtio-blk-pci,drive=lun0,serial=lun0",
        "virtio-blk-pci,drive=lun1,serial=lun1",
    ]
    assert argv[argv.index("-smp") + 1] == "1" and argv[argv.index("-m") + 1] == "2048"
