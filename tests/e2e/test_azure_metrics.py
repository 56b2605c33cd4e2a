"""The cloud API metrics after a real azure build against the ARM emulator: every ARM
request the emulator answered is counted once, by operation and status code, throttling
included (the SDK retries a 429, and each attempt counts)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from azurehelpers import (
    WINDOWS_SERVER_2022,
    create_gallery,
    managed_image_target,
    operator_settings,
)
from conftest import ControlPlane, OperatorProcess, sample
from fakes.arm import ArmEmulator
from kiln.metrics import arm_operation
from kubehelpers import Kiln, run, template, wait_ended

pytestmark = [pytest.mark.e2e, pytest.mark.azure]

NAMESPACE = "azure-metrics"
LOCATION = "westeurope"


@pytest.fixture(scope="module")
def metrics_operator(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
    data = tmp_path_factory.mktemp("azure-metrics")
    operator = OperatorProcess(
        control_plane.kubeconfig,
        data,
        data / "operator.log",
        **operator_settings(arm_qemu, NAMESPACE, LOCATION),
    )
    operator.start()
    yield operator
    operator.stop()


def test_cloud_requests_and_throttling_are_counted_as_the_emulator_saw_them(
    control_plane: ControlPlane, arm_qemu: ArmEmulator, metrics_operator: OperatorProcess
) -> None:
    ids = create_gallery(arm_qemu, "metricsout", "kilnmetrics", "win", LOCATION, os_type="Windows")
    manifest = template(
        "win",
        source=WINDOWS_SERVER_2022,
        customize=[],
        distribute=[managed_image_target(ids["image"], LOCATION)],
    )
    manifest["spec"]["provider"] = "azure"
    arm_qemu.clear_requests()  # from here on, only the operator talks to the emulator
    arm_qemu.fail_next(
        "PUT",
        r"/providers/Microsoft\.Network/virtualNetworks/[^/]+$",
        429,
        "TooManyRequests",
        times=2,
        retry_after=1,
    )
    try:
        with config.new_client_from_config(config_file=str(control_plane.kubeconfig)) as api:
            kiln = Kiln(api, NAMESPACE)
            kiln.create("imagetemplates", manifest)
            kiln.create("imagebuildruns", run("win-1", "win"))
            body = wait_ended(kiln, "win-1", timeout=900)
    finally:
        arm_qemu.clear_faults()
    assert body["status"]["runState"] == "Succeeded", body["status"]["message"]

    seen = Counter(
        (arm_operation(r.method, r.path), str(r.status))
        for r in arm_qemu.requests
        if r.path.lower().startswith("/subscriptions")
    )
    scraped = metrics_operator.metrics()
    counted = {
        (dict(labels)["operation"], dict(labels)["code"]): value
        for (name, labels), value in scraped.items()
        if name == "kiln_cloud_api_requests_total"
    }
    assert counted == {key: float(n) for key, n in seen.items()}
    vnet = "PUT Microsoft.Network/virtualNetworks"
    assert counted[(vnet, "429")] == 2
    assert sample(scraped, "kiln_cloud_api_throttled_total") == 2
    assert sample(scraped, "kiln_build_runs_total", provider="azure", result="Succeeded") == 1
    assert sample(scraped, "kiln_build_runs_in_flight", provider="azure") == 0
    assert (
        sample(scraped, "kiln_build_step_duration_seconds_count", provider="azure", step="vm") == 1
    )
