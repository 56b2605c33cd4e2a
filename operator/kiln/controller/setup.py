"""Operator start-up: kopf's storage under kiln.dev, settings, clients and providers."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from kiln import GROUP
from kiln.kube import Kube, load_client
from kiln.reconcile.sweeper import sweep_forever
from kiln.runtime import Runtime
from kiln.settings import load_settings


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO  # kopf.info() posts only at INFO or below
    settings.watching.server_timeout = 300
    memo.runtime = Runtime(load_settings(), Kube(load_client()))
    memo.sweeper = asyncio.create_task(sweep_forever(memo.runtime))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    memo.sweeper.cancel()
    await memo.runtime.close()
