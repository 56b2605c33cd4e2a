"""Packer 1.6.6's qemu builder doing the same job as Kiln's local build.

Nothing about the VM is written here: the QEMU arguments come from Kiln's own
`qemu._qemu_argv` (firmware, accelerator, machine, VM size, disk and seed
drives), the provisioners from the ImageTemplate's own steps, the deprovisioning and the
shutdown from Kiln's Linux customizer, the seed ISO from Kiln's seed writer. Packer gets
only what it must substitute itself: the disk path and the forwarded SSH port.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.capture import FIXED_VHD
from bench.env import EXAMPLES
from kiln.api.template import FileStep, ImageTemplateSpec, PlatformImageSource, ShellStep
from kiln.api.tenancy import FileRoot, TenancyPolicy
from kiln.communicators.ssh import generate_keypair
from kiln.customizers.linux import DEPROVISION_SCRIPT, final_shutdown_command
from kiln.providers.local import baseimage, disks, qemu
from kiln.providers.local.provider import BUILD_USER
from kiln.providers.local.seed import SeedConfig, write_seed_iso
from kiln_devtools import demo

PACKER = "packer"
DISK_NAME = "os.qcow2"
PORT_PLACEHOLDER = 1  # replaced by {{ .SSHHostPort }}
# Packer runs QEMU in the foreground and finds the VM itself: no daemon, pid file or QMP.
DROPPED = {"-daemonize": False, "-pidfile": True, "-qmp": True, "-name": True}
STARTED = "Starting VM"
CONNECTED = "Connected to SSH!"
HALTING = "Gracefully halting"
POST_PROCESSING = "Running post-processor"
MARKS = (STARTED, CONNECTED, HALTING, POST_PROCESSING)


def vm_spec(
    source: PlatformImageSource,
    base: baseimage.BaseImage,
    state_dir: Path,
    seed: Path,
    memory_mb: int,
    cache_root: Path,
) -> qemu.VmSpec:
    """The VmSpec the local provider boots for this source (LocalProvider._start_vm)."""
    return qemu.VmSpec(
        name="packer-bench",
        state_dir=state_dir,
        disk=state_dir / DISK_NAME,
        seed_iso=seed,
        generation=baseimage.generation(source.sku),
        memory_mb=memory_mb,
        accel=qemu.accelerator(cache_root, base.disk_path),
    )


def base_image(source: PlatformImageSource, cache_root: Path) -> baseimage.BaseImage:
    """The cached base image the local provider resolves the platform source to."""
    release = baseimage.release_of(source.publisher, source.offer, source.sku)
    if release is None:
        raise ValueError(f"Kiln builds no base image for {source.offer} {source.sku}")
    if source.version.lower() != "latest":
        return baseimage.resolve(
            cache_root, source.publisher, source.offer, source.sku, source.version
        )
    return baseimage.ensure_image(release, cache_root)


def baseimage_format(base: baseimage.BaseImage) -> str:
    return disks.image_format(base.disk_path)


def qemuargs(spec: qemu.VmSpec) -> list[list[str]]:
    """Kiln's QEMU command line as Packer qemuargs, pair by pair."""
    argv = qemu._qemu_argv(spec, PORT_PLACEHOLDER)[1:]
    pairs: list[list[str]] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        value = argv[i + 1] if takes_value else None
        i += 2 if takes_value else 1
        if flag in DROPPED:
            continue
        if value is None:
            pairs.append([flag])
            continue
        value = value.replace(f"file={spec.disk},", "file={{ .OutputDir }}/{{ .Name }},")
        value = value.replace(f":{PORT_PLACEHOLDER}-:22", ":{{ .SSHHostPort }}-:22")
        pairs.append([flag, value])
    pairs.append(["-vnc", "none"])  # Kiln has no display
    return pairs


def file_sources() -> TenancyPolicy:
    """Where the bench's operator reads file:// sources (as `make demo` maps them)."""
    return TenancyPolicy(
        file_source_roots=[FileRoot.parse(f"{demo.EXAMPLES_ROOT}={EXAMPLES.absolute()}")]
    )


def provisioners(spec: ImageTemplateSpec, deprovision_script: Path) -> list[dict[str, Any]]:
    """The template's customize and validate steps, then Kiln's deprovisioning."""
    steps = list(spec.customize or [])
    if spec.validate_ and spec.validate_.in_vm_validations:
        steps += spec.validate_.in_vm_validations
    out: list[dict[str, Any]] = []
    for step in steps:
        if isinstance(step, ShellStep) and step.inline:
            out.append({"type": "shell", "inline": step.inline})
        elif isinstance(step, FileStep) and step.source_uri.startswith("file://"):
            source = str(file_sources().open_file_uri(step.source_uri))
            out.append({"type": "file", "source": source, "destination": step.destination})
        else:
            raise ValueError(f"the Packer peer has no equivalent of step {step.name!r}")
    out.append(
        {
            "type": "shell",
            "script": str(deprovision_script),
            "execute_command": "sudo -n sh -c '{{ .Vars }} {{ .Path }}'",
        }
    )
    return out


def post_processor(out: Path) -> dict[str, Any]:
    """What Kiln's capture makes: a standalone qcow2, a fixed VHD, their checksums."""
    disk = out / DISK_NAME
    fixed = " ".join(FIXED_VHD)
    return {
        "type": "shell-local",
        "inline": [
            f"qemu-img convert -f qcow2 -O qcow2 {disk} {out}/disk.qcow2",
            f"qemu-img convert -f qcow2 {fixed} {disk} {out}/disk.vhd",
            f"cd {out} && sha256sum disk.qcow2 disk.vhd > SHA256SUMS",
        ],
    }


def write_template(
    spec: ImageTemplateSpec,
    base: baseimage.BaseImage,
    work: Path,
    *,
    memory_mb: int,
    cache_root: Path,
) -> Path:
    """Packer's JSON template plus its key, seed ISO and deprovisioning script in work."""
    work.mkdir(parents=True, exist_ok=True)
    client, host = generate_keypair("packer-bench"), generate_keypair("host")
    key = work / "id_ed25519"
    key.touch(mode=0o600)
    key.write_text(client.private_key.get_secret_value())
    seed = work / "seed.iso"
    write_seed_iso(
        SeedConfig(
            instance_id=f"packer-{os.getpid()}-{time.time_ns()}",
            hostname="kiln-build",
            user=BUILD_USER,
            authorized_key=client.public_key,
            host_private_key=host.private_key,
            host_public_key=host.public_key,
        ),
        seed,
    )
    deprovision = work / "deprovision.sh"
    deprovision.write_text(DEPROVISION_SCRIPT)
    out = work / "output"
    state = work / "vm"
    state.mkdir(exist_ok=True)
    assert isinstance(spec.source, PlatformImageSource)
    vm = vm_spec(spec.source, base, state, seed, memory_mb, cache_root)
    builder = {
        "type": "qemu",
        "iso_url": str(base.disk_path),
        "iso_checksum": "none",
        "disk_image": True,
        "use_backing_file": True,
        # Packer 1.6.6 names no backing format, which current qemu-img refuses.
        "qemu_img_args": {"create": ["-F", baseimage_format(base)]},
        "disk_size": f"{disks.round_up_mib(base.disk_virtual_size) // disks.MIB}M",  # as Kiln's
        "skip_resize_disk": True,
        "skip_compaction": True,
        "format": "qcow2",
        "output_directory": str(out),
        "vm_name": DISK_NAME,
        "headless": True,
        "memory": vm.memory_mb,
        "cpus": vm.cpus,
        "qemuargs": qemuargs(vm),
        "communicator": "ssh",
        "ssh_username": BUILD_USER,
        "ssh_private_key_file": str(key),
        "ssh_timeout": "15m",
        "disable_vnc": True,  # no boot command to type, and no boot_wait before SSH
        "shutdown_command": final_shutdown_command(BUILD_USER),
        "shutdown_timeout": "5m",
    }
    template = {
        "builders": [builder],
        "provisioners": provisioners(spec, deprovision),
        "post-processors": [post_processor(out)],
    }
    path = work / "packer.json"
    path.write_text(json.dumps(template, indent=2))
    return path


def _env(work: Path) -> dict[str, str]:
    return dict(
        os.environ,
        PACKER_CACHE_DIR=str(work / "packer_cache"),
        PACKER_CONFIG_DIR=str(work),
        PACKER_LOG="1",
        PACKER_LOG_PATH=str(work / "packer.log"),
        CHECKPOINT_DISABLE="1",
    )


def validate(template: Path) -> None:
    """`packer validate`: the template is one Packer accepts, without booting anything."""
    proc = subprocess.run(
        [PACKER, "validate", str(template)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(template.parent),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"packer validate failed: {proc.stdout}{proc.stderr}")


class PackerTimes(BaseModel):
    total: float
    boot_to_ssh: float  # from `Starting VM` to `Connected to SSH!`
    steps: dict[str, float]  # provisioning (login to halt), shutdown, post-processing


def build(template: Path, timeout: float = 3600) -> PackerTimes:
    """`packer build`, timing it and its boot to the first SSH login from its own output."""
    started = time.monotonic()
    marks: dict[str, float] = {}
    lines: list[str] = []
    with subprocess.Popen(
        [PACKER, "build", "-machine-readable", "-force", str(template)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(template.parent),
        cwd=template.parent,
    ) as proc:
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                for mark in MARKS:
                    if mark in line and mark not in marks:
                        marks[mark] = time.monotonic()
            code = proc.wait(timeout=60)
        finally:
            watchdog.cancel()
    total = time.monotonic() - started
    (template.parent / "packer.out").write_text("".join(lines))
    if code != 0 or len(marks) != len(MARKS):
        raise RuntimeError(f"packer build failed ({code}): {''.join(lines[-30:])}")
    steps = {
        "provision": marks[HALTING] - marks[CONNECTED],
        "shutdown": marks[POST_PROCESSING] - marks[HALTING],
        "post-process": started + total - marks[POST_PROCESSING],
    }
    return PackerTimes(total=total, boot_to_ssh=marks[CONNECTED] - marks[STARTED], steps=steps)
