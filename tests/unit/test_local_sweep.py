"""The local provider's orphan sweep and leftovers, with real (idle) QEMU processes: a
VM state directory whose run is not among the owners is killed and removed, and one
made while the sweep reads the owners (a run created meanwhile) is not touched."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from kiln.api.run import Checkpoint
from kiln.api.template import ImageTemplateSpec
from kiln.providers.base import RunContext, TemplateIdentity
from kiln.providers.local import qemu
from kiln.providers.local.provider import LocalProvider
from kiln.settings import OperatorSettings
from kubehelpers import valid_spec
from vmboot import idle_qemu


def _context(provider: LocalProvider, uid: str) -> RunContext:
    template = TemplateIdentity(namespace="ns", name="t", uid="t-uid")
    return RunContext(
        namespace="ns",
        run_name="r",
        run_uid=uid,
        template=template,
        spec=ImageTemplateSpec.model_validate(valid_spec()),
        checkpoint=Checkpoint(template=template),
        run_dir=provider.settings.data_root / "runs" / uid,
        key_namespace="kiln-system",
    )


async def test_sweep_removes_orphans_and_keeps_owned_vms(tmp_path: Path) -> None:
    provider = LocalProvider(OperatorSettings(data_root=tmp_path))
    root = tmp_path / "vm"
    orphan, owned = idle_qemu(root / "gone-run"), idle_qemu(root / "live-run")
    try:
        assert await provider.leftovers(_context(provider, "gone-run")) == [
            f"QEMU process {orphan.pid}",
            str(root / "gone-run"),
        ]
        late: list[qemu.VmHandle] = []

        async def owners() -> set[str]:
            # A run created after the sweep listed the VMs starts its VM now; the runs
            # read here do not include it yet.
            late.append(idle_qemu(root / "late-run"))
            return {"live-run"}

        removed = await provider.sweep(owners)
        assert removed == [str(root / "gone-run")]
        assert not (root / "gone-run").exists() and not qemu.is_running(orphan)
        assert qemu.is_running(owned) and qemu.is_running(late[0])
        assert await provider.leftovers(_context(provider, "gone-run")) == []
    finally:
        for handle in (orphan, owned, *late):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)


async def test_a_killed_build_vm_is_lost_and_a_running_one_is_not(tmp_path: Path) -> None:
    """Found by the chaos suite: a run whose VM was killed retried its SSH connection for
    minutes (or waited out the 15-minute boot timeout); a VM that is gone is lost at once."""
    provider = LocalProvider(OperatorSettings(data_root=tmp_path))
    ctx = _context(provider, "run-1")
    assert await provider.vm_lost(ctx) is None  # not started yet: nothing to lose
    handle = idle_qemu(tmp_path / "vm" / "run-1")
    ctx.checkpoint.local.vm_started = True
    try:
        assert await provider.vm_lost(ctx) is None
    finally:
        qemu.kill(handle)
    lost = await provider.vm_lost(ctx)
    assert lost is not None and "stopped unexpectedly" in lost
    assert str(tmp_path / "vm" / "run-1" / qemu.SERIAL_LOG) in lost
