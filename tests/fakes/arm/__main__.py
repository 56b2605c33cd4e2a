"""`python -m fakes.arm --port 0 --state-dir DIR`: run the ARM emulator by hand.

Prints the URL, CA path and credentials (also written to DIR/connection.json) and serves
until interrupted; state persists in DIR/state.json across restarts. With `--qemu`, VMs
are real QEMU machines (fakes.arm.qemu_backend, files under DIR/qemu) and the marketplace
is the locally cached Debian 12 image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

from .emulator import DEFAULT_CLIENT_ID, DEFAULT_SUBSCRIPTION, DEFAULT_TENANT, ArmEmulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fakes.arm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--subscription-id", default=DEFAULT_SUBSCRIPTION)
    parser.add_argument("--tenant-id", default=DEFAULT_TENANT)
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=None, help="default: random, printed")
    parser.add_argument("--blob-endpoint", default="https://{account}.blob.core.windows.net/")
    parser.add_argument("--storage-account-key", default=None)
    parser.add_argument("--lro-duration", type=float, default=2.0)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--qemu", action="store_true", help="real QEMU VMs, WinRM Windows guests")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    extra: dict[str, Any] = {}
    if args.qemu:
        from .qemu_backend import QemuWindowsVmBackend, debian12_marketplace, windows_marketplace

        extra["backend"] = QemuWindowsVmBackend(args.state_dir / "qemu")
        extra["marketplace"] = [*debian12_marketplace(), *windows_marketplace()]
    arm = ArmEmulator(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        subscription_id=args.subscription_id,
        tenant_id=args.tenant_id,
        client_id=args.client_id,
        client_secret=args.client_secret,
        blob_endpoint=args.blob_endpoint,
        storage_account_key=args.storage_account_key,
        lro_duration=args.lro_duration,
        retry_after=args.retry_after,
        **extra,
    )
    async with arm:
        info = {
            "url": arm.url,
            "ca_path": str(arm.ca_path),
            "tenant_id": arm.tenant_id,
            "client_id": arm.client_id,
            "client_secret": arm.client_secret,
            "subscription_id": arm.subscription_id,
            "credential_scope": f"{arm.url}/.default",
        }
        (args.state_dir / "connection.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info, indent=2), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
