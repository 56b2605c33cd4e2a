"""Pure logic of the Windows steps: durations, update filters and cycles, reboot loops,
and what a job poll on a Windows VM means."""

from __future__ import annotations

import base64

import pytest

from kiln.api.capabilities import Provider
from kiln.api.run import WindowsUpdateProgress
from kiln.api.template import WindowsUpdateStep
from kiln.api.validation import validate_template
from kiln.communicators import winrm_jobs
from kiln.customizers import windows
from kubehelpers import valid_spec

pytestmark = pytest.mark.windows


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("90s", 90), ("2h", 7200), ("1h30m", 5400), ("1h2m3s", 3723), ("0s", 0)],
)
def test_durations_in_aibs_format(text: str, seconds: float) -> None:
    assert windows.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5 m", "1d", "30m1h", "-5m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        windows.parse_duration(text)


def test_filters_default_to_aibs_and_keep_their_order() -> None:
    assert windows.parse_filters(None) == [
        ("exclude", "$_.Title -like '*Preview*'"),
        ("include", "$true"),
    ]
    assert windows.parse_filters(["include:$_.Title -like '*a:b*'"]) == [
        ("include", "$_.Title -like '*a:b*'")
    ]


@pytest.mark.parametrize("rule", ["$true", "include", "include:", "keep:$true", "Include:$true"])
def test_bad_filters_are_refused(rule: str) -> None:
    with pytest.raises(ValueError, match="must be include:<expression> or exclude:<expression>"):
        windows.parse_filters([rule])


def test_a_bad_filter_is_refused_at_apply_time_naming_the_item() -> None:
    spec = valid_spec() | {
        "provider": "azure",
        "location": "westeurope",
        "resourceGroup": "images",
        "subscriptionId": "00000000-0000-0000-0000-000000000000",
        "customize": [{"type": "WindowsUpdate", "filters": ["include:$true", "$_.Title"]}],
    }
    problems = validate_template(spec, Provider.azure)
    assert [p.path for p in problems] == ["spec.customize[0].filters[1]"]


def test_the_update_script_carries_its_parameters_quoted() -> None:
    step = WindowsUpdateStep(type="WindowsUpdate", filters=["exclude:$_.Title -like '*x*'"])
    script = windows.update_script(step, 5, ["b", "a"])
    line = next(x for x in script.splitlines() if x.startswith("$parameters"))
    assert line == (
        '$parameters = \'{"criteria": "BrowseOnly=0 and IsInstalled=0", "filters": '
        '["exclude:$_.Title -like \'\'*x*\'\'"], "limit": 5, "skip": ["a", "b"]}\' '
        "| ConvertFrom-Json"
    )


CYCLE = """Searching for updates: BrowseOnly=0 and IsInstalled=0
KILN-WU found 3
KILN-WU selected id-1 2024-10 Cumulative Update (KB5044281)
KILN-WU skipped id-2 2024-10 Preview (KB5044288)
KILN-WU selected id-3 Defender platform (KB4052623)
KILN-WU installed id-1 2024-10 Cumulative Update (KB5044281)
KILN-WU failed id-3 0x80070643 Defender platform (KB4052623)
KILN-WU reboot True
"""


def test_a_cycle_log_is_read() -> None:
    report = windows.parse_cycle(CYCLE)
    assert report.found == 3 and report.complete and report.reboot
    assert report.selected == {
        "id-1": "2024-10 Cumulative Update (KB5044281)",
        "id-3": "Defender platform (KB4052623)",
    }
    assert report.installed == ["id-1"] and report.failed == {"id-3": "0x80070643"}
    assert not windows.parse_cycle(CYCLE.rsplit("KILN-WU reboot", 1)[0]).complete


def test_after_a_cycle_restart_then_next_then_done() -> None:
    progress = WindowsUpdateProgress()
    decision = windows.decide_after_cycle(progress, windows.parse_cycle(CYCLE), 1000)
    assert decision.action == "restart"
    assert (progress.installed, progress.failed, progress.pending) == (
        1,
        {"id-3": "0x80070643"},
        {"id-1": 1},
    )
    progress.cycle = 2
    second = (
        "KILN-WU found 1\nKILN-WU selected id-4 t\nKILN-WU installed id-4 t\nKILN-WU reboot False"
    )
    assert windows.decide_after_cycle(progress, windows.parse_cycle(second), 1000).action == "next"
    assert progress.pending == {"id-4": 1}, "id-1 stuck after the restart"
    progress.cycle = 3
    done = windows.decide_after_cycle(progress, windows.parse_cycle("KILN-WU reboot False"), 1000)
    assert (done.action, done.message) == ("done", "2 update(s) installed in 3 cycle(s); 1 failed")


def test_the_same_update_pending_cycle_after_cycle_is_a_reboot_loop() -> None:
    progress = WindowsUpdateProgress()
    sticky = "KILN-WU selected id-9 Driver X\nKILN-WU installed id-9 Driver X\nKILN-WU reboot True"
    for cycle in range(1, windows.REBOOT_LOOP_CYCLES):
        progress.cycle = cycle
        assert windows.decide_after_cycle(progress, windows.parse_cycle(sticky), 1000).action == (
            "restart"
        )
    progress.cycle = windows.REBOOT_LOOP_CYCLES
    decision = windows.decide_after_cycle(progress, windows.parse_cycle(sticky), 1000)
    assert decision.action == "failed"
    assert decision.message.startswith("reboot loop: Driver X was installed and the VM restarted 3")


def test_the_update_limit_ends_the_step() -> None:
    progress = WindowsUpdateProgress()
    log = "KILN-WU selected a t\nKILN-WU installed a t\nKILN-WU selected b u\n"
    log += "KILN-WU installed b u\nKILN-WU reboot False"
    decision = windows.decide_after_cycle(progress, windows.parse_cycle(log), 2)
    assert decision.action == "done" and decision.message.endswith("updateLimit 2 reached")
    incomplete = windows.decide_after_cycle(WindowsUpdateProgress(), windows.parse_cycle(""), 2)
    assert incomplete.action == "failed"


def facts(**values: str) -> str:
    names = ("dir", "launched", "started", "exit", "task", "exit-again", "log")
    return "".join(f"KILN {name}\r\n{values.get(name, '')}\r\n" for name in names)


@pytest.mark.parametrize(
    ("printed", "needs_launch", "running", "exit_code"),
    [
        ({"dir": "False"}, False, False, None),
        ({"dir": "True", "launched": "False", "started": "False"}, True, True, None),
        (
            {"dir": "True", "launched": "True", "started": "True", "task": "Running"},
            False,
            True,
            None,
        ),
        (
            {"dir": "True", "launched": "True", "started": "True", "task": "Ready"},
            False,
            False,
            None,
        ),
        ({"dir": "True", "started": "True", "task": "Ready", "exit-again": "3"}, False, False, 3),
        ({"dir": "True", "started": "True", "exit": "-1073741510"}, False, False, -1073741510),
    ],
)
def test_what_a_poll_of_a_windows_job_means(
    printed: dict[str, str], needs_launch: bool, running: bool, exit_code: int | None
) -> None:
    parsed = winrm_jobs.parse_facts(facts(**printed, log=base64.b64encode(b"out\r\n").decode()))
    assert (parsed.needs_launch, parsed.running, parsed.exit_code) == (
        needs_launch,
        running,
        exit_code,
    )
    assert parsed.log == (b"out\r\n" if parsed.exists else b"")


def test_job_paths_refuse_what_would_break_their_quoting() -> None:
    with pytest.raises(ValueError):
        winrm_jobs.job_dir("a b")
    with pytest.raises(ValueError):
        winrm_jobs.windows_path("C:\\it's\\x")
    with pytest.raises(ValueError):
        winrm_jobs.windows_path("relative\\x")
    assert winrm_jobs.parent_of("C:/x.txt") == "C:\\"
    assert winrm_jobs.parent_of("D:\\a\\b.txt") == "D:\\a"
