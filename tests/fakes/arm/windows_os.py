"""The 'operating system' of a fake Windows VM: what its WinRM guest runs scripts against.

No Windows runs here. This models, from Microsoft's documentation, the parts of Windows
Kiln's Windows steps touch, and no more:

- a file system (case-insensitive paths, directories that must exist, byte contents);
- PowerShell 5.1 statements, one per line or `;` (see FakeWindowsGuest._statement for the
  list); anything else is ignored, as a no-op that succeeds;
- `powershell.exe -File` and `cmd.exe /c "... >> log 2>&1"` (output appended to the file
  as it is written), `$LASTEXITCODE`, `exit N`, `throw` (exit code 1 under -File);
- scheduled tasks (Register-/Start-/Get-/Unregister-ScheduledTask): a task runs its
  action detached from the WinRM shell that started it, as its principal (the admin user
  with S4U, or SYSTEM); a running task is not started twice (MultipleInstances IgnoreNew);
- reboots (`shutdown /r`, `Restart-Computer`): the WinRM endpoint drops shortly after,
  running tasks die with the old boot, and the VM answers again `boot_seconds` later with
  a new LastBootUpTime (Get-CimInstance Win32_OperatingSystem);
- a Windows Update agent (COM Microsoft.Update.*) with a catalogue: updates that need a
  reboot, one that only applies after another is installed, one whose install fails and
  one (optional, BrowseOnly) that stays pending across reboots. A script that creates
  Microsoft.Update.Session is not interpreted line by line: the agent runs the
  documented search/filter/download/install semantics with the parameters the script
  declares (`$parameters = '<json>' | ConvertFrom-Json`) and prints the lines the script
  prints (see WindowsUpdateAgent.run).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import fnmatch
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .models import VmInfo

IMAGE_STATE_COMPLETE = "IMAGE_STATE_COMPLETE"
IMAGE_STATE_GENERALIZED = "IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE"
SYSTEM = "SYSTEM"

ScriptResult = tuple[str, str, int]
Handler = Callable[[str], ScriptResult | None]


class ScriptExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class ScriptThrow(ScriptExit):
    """A terminating error: it ends every script up the call chain (exit code 1)."""

    def __init__(self) -> None:
        super().__init__(1)


class Output:
    """A command's stdout/stderr, read incrementally by Receive."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        self.changed = asyncio.Event()

    def write(self, stream: str, text: str) -> None:
        if text:
            self.chunks.append((stream, text.encode("utf-8")))
            self.changed.set()

    def line(self, text: str, stream: str = "stdout") -> None:
        self.write(stream, text + "\r\n")

    def take(self) -> list[tuple[str, bytes]]:
        chunks, self.chunks = self.chunks, []
        self.changed.clear()
        return chunks


class FileOutput(Output):
    """Both streams appended to a file as they are written (cmd's `>> file 2>&1`)."""

    def __init__(self, fs: FileSystem, path: str) -> None:
        super().__init__()
        self.fs = fs
        self.path = path

    def write(self, stream: str, text: str) -> None:
        if text:
            self.fs.append(self.path, text.encode("utf-8"))


# --- the file system ------------------------------------------------------------------------


class FsError(Exception):
    """A file system call failed (the message is what PowerShell would print)."""


def _norm(path: str) -> str:
    path = path.strip().strip("'\"").replace("/", "\\")
    while "\\\\" in path:
        path = path.replace("\\\\", "\\")
    return path.rstrip("\\").lower() if len(path) > 3 else path.lower()


def _parent(path: str) -> str:
    key = _norm(path)
    return key.rsplit("\\", 1)[0] if "\\" in key[3:] else key[:3]


class FileSystem:
    """Paths are case-insensitive; `files` maps the given path to its bytes (or text)."""

    def __init__(self, user: str) -> None:
        self.files: dict[str, bytes | bytearray | str] = {}
        self.dirs: set[str] = {
            _norm(p)
            for p in (
                "C:\\",
                "C:\\Windows",
                "C:\\Windows\\Temp",
                "C:\\Windows\\System32",
                "C:\\ProgramData",
                "C:\\Program Files",
                "C:\\Users",
                f"C:\\Users\\{user}",
            )
        }

    def _key(self, path: str) -> str | None:
        want = _norm(path)
        return next((k for k in self.files if _norm(k) == want), None)

    def is_file(self, path: str) -> bool:
        return self._key(path) is not None

    def is_dir(self, path: str) -> bool:
        return _norm(path) in self.dirs

    def read(self, path: str) -> bytes:
        key = self._key(path)
        if key is None:
            raise FsError(f"Cannot find path '{path}' because it does not exist.")
        value = self.files[key]
        return value.encode() if isinstance(value, str) else bytes(value)

    def write(self, path: str, data: bytes) -> None:
        if not self.is_dir(_parent(path)):
            raise FsError(f"Could not find a part of the path '{path}'.")
        if self.is_dir(path):
            raise FsError(f"Access to the path '{path}' is denied.")
        self.files[self._key(path) or path] = data

    def append(self, path: str, data: bytes) -> None:
        key = self._key(path)
        if key is None:
            self.write(path, data)
            return
        value = self.files[key]
        if not isinstance(value, bytearray):  # appended in place: logs grow line by line
            value = self.files[key] = bytearray(value.encode() if isinstance(value, str) else value)
        value.extend(data)

    def mkdir(self, path: str, force: bool = False) -> None:
        if self.is_file(path) or (self.is_dir(path) and not force):
            raise FsError(f"An item with the specified name {path} already exists.")
        if not self.is_dir(_parent(path)):
            if not force:
                raise FsError(f"Could not find a part of the path '{path}'.")
            self.mkdir(_parent(path), force=True)
        self.dirs.add(_norm(path))

    def remove(self, path: str, recurse: bool = False) -> None:
        key = _norm(path)
        if self.is_file(path):
            del self.files[self._key(path) or path]
            return
        if key not in self.dirs:
            raise FsError(f"Cannot find path '{path}' because it does not exist.")
        inside = [k for k in self.files if _norm(k).startswith(key + "\\")]
        subdirs = [d for d in self.dirs if d.startswith(key + "\\")]
        if (inside or subdirs) and not recurse:
            raise FsError(f"The item at {path} has children and -Recurse was not given.")
        for k in inside:
            del self.files[k]
        self.dirs -= {key, *subdirs}

    def move(self, source: str, destination: str, force: bool = False) -> None:
        if not self.is_dir(_parent(destination)):
            raise FsError(f"Could not find a part of the path '{destination}'.")
        if self.is_dir(source):
            if self.is_dir(destination) or self.is_file(destination):
                raise FsError(f"Cannot create a file when that file already exists: {destination}")
            old, new = _norm(source), _norm(destination)
            self.dirs = {
                new + d[len(old) :] if d == old or d.startswith(old + "\\") else d
                for d in self.dirs
            }
            for k in [k for k in self.files if _norm(k).startswith(old + "\\")]:
                self.files[new + _norm(k)[len(old) :]] = self.files.pop(k)
            return
        data = self.read(source)
        if self.is_file(destination) and not force:
            raise FsError(f"Cannot create a file when that file already exists: {destination}")
        self.write(destination, data)
        self.remove(source)


# --- scheduled tasks --------------------------------------------------------------------------


@dataclass(eq=False)
class ScheduledTask:
    """A registered task: its action and principal; State is Ready or Running."""

    name: str
    execute: str
    argument: str
    user: str
    logon_type: str
    run_level: str
    state: str = "Ready"
    runs: int = 0
    last_result: int | None = None
    task: asyncio.Task[None] | None = None


# --- Windows Update ----------------------------------------------------------------------------


@dataclass(eq=False)
class Update:
    """One catalogue entry (IUpdate's properties, and how its install behaves here)."""

    update_id: str
    title: str
    kb: str
    type: str = "Software"
    browse_only: bool = False
    auto_select: bool = True
    reboot: bool = False  # InstallationBehavior.RebootBehavior: a restart completes it
    fails: int | None = None  # the HResult its install ends with (ResultCode 4, Failed)
    sticky: bool = False  # installs, asks for a restart, and is pending again after it
    requires: tuple[str, ...] = ()  # applicable only once these are installed
    installed: bool = False
    pending_reboot: bool = False
    installs: int = 0

    def properties(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "kbarticleids": [self.kb.removeprefix("KB")],
            "type": self.type,
            "browseonly": self.browse_only,
            "autoselectonwebsites": self.auto_select,
            "isinstalled": self.installed,
            "ishidden": False,
            "rebootrequired": self.pending_reboot,
        }


def default_catalogue() -> list[Update]:
    """Updates a fresh Windows Server 2022 image could be offered (ids are made up)."""
    return [
        Update(
            "5f1a8e2c-0001-4c1e-9a51-000000000001",
            "2024-10 Servicing Stack Update "
            "for Microsoft server operating system version 21H2 for x64 (KB5044414)",
            "KB5044414",
        ),
        Update(
            "5f1a8e2c-0002-4c1e-9a51-000000000002",
            "2024-10 Cumulative Update for "
            "Microsoft server operating system version 21H2 for x64 (KB5044281)",
            "KB5044281",
            reboot=True,
            requires=("5f1a8e2c-0001-4c1e-9a51-000000000001",),
        ),
        Update(
            "5f1a8e2c-0003-4c1e-9a51-000000000003",
            "2024-10 Cumulative Update for .NET Framework 3.5, 4.8 and 4.8.1 (KB5044035)",
            "KB5044035",
            reboot=True,
            requires=("5f1a8e2c-0002-4c1e-9a51-000000000002",),
        ),
        Update(
            "5f1a8e2c-0004-4c1e-9a51-000000000004",
            "Windows Malicious Software Removal Tool x64 - v5.129 (KB890830)",
            "KB890830",
        ),
        Update(
            "5f1a8e2c-0005-4c1e-9a51-000000000005",
            "2024-10 Cumulative Update Preview "
            "for Microsoft server operating system version 21H2 (KB5044288)",
            "KB5044288",
            reboot=True,
            auto_select=False,
        ),
        Update(
            "5f1a8e2c-0006-4c1e-9a51-000000000006",
            "Update for Microsoft Defender Antivirus antimalware platform (KB4052623)",
            "KB4052623",
            fails=0x80070643,
        ),
        Update(
            "5f1a8e2c-0007-4c1e-9a51-000000000007",
            "Intel - System - 10.1.1.44 (optional driver)",
            "KB0000000",
            type="Driver",
            browse_only=True,
            auto_select=False,
            reboot=True,
            sticky=True,
        ),
    ]


WU_E_INVALID_CRITERIA = 0x80240032
_CRITERION = re.compile(r"^\s*(\w+)\s*=\s*('?)([^']*)\2\s*$")
_BOOL_CRITERIA = {"isinstalled", "browseonly", "autoselectonwebsites", "ishidden", "rebootrequired"}


def matches_criteria(update: Update, criteria: str) -> bool:
    """IUpdateSearcher::Search: `Name=Value` clauses joined by `and` (the subset here)."""
    props = update.properties()
    for clause in re.split(r"\s+and\s+", criteria.strip(), flags=re.I):
        m = _CRITERION.match(clause)
        if not m:
            raise FsError(f"Search failed with HResult 0x{WU_E_INVALID_CRITERIA:08X}")
        name, value = m.group(1).lower(), m.group(3)
        if name in _BOOL_CRITERIA:
            if bool(int(value)) != bool(props[name]):
                return False
        elif name == "type":
            if value.lower() != update.type.lower():
                return False
        else:
            raise FsError(f"Search failed with HResult 0x{WU_E_INVALID_CRITERIA:08X}")
    return True


_FILTER_TERM = re.compile(
    r"^\$_\.(\w+)\s+(-like|-notlike|-eq|-ne|-match|-notmatch)\s+'((?:[^']|'')*)'$", re.I
)


def filter_matches(expression: str, update: Update) -> bool:
    """A filter's PowerShell expression on $_ (the subset: $true/$false, `$_.Prop`,
    `$_.Prop -like/-notlike/-eq/-ne/-match/-notmatch 'x'`, joined by -and/-or, -not)."""
    expression = expression.strip()
    for joiner, combine in (("-or", any), ("-and", all)):
        parts = re.split(rf"\s+{joiner}\s+", expression, flags=re.I)
        if len(parts) > 1:
            return combine(filter_matches(p, update) for p in parts)
    if expression.startswith("(") and expression.endswith(")"):
        return filter_matches(expression[1:-1], update)
    if expression.lower().startswith("-not "):
        return not filter_matches(expression[5:], update)
    if expression.lower() in ("$true", "$false"):
        return expression.lower() == "$true"
    props = update.properties()
    m = re.match(r"^\$_\.(\w+)$", expression)
    if m:
        return bool(props.get(m.group(1).lower()))
    m = _FILTER_TERM.match(expression)
    if not m:
        raise FsError(f"the fake Windows guest cannot evaluate the filter {expression!r}")
    value = props.get(m.group(1).lower())
    text = " ".join(value) if isinstance(value, list) else str(value)
    pattern, op = m.group(3).replace("''", "'"), m.group(2).lower()
    if op in ("-like", "-notlike"):
        hit = fnmatch.fnmatch(text.lower(), pattern.lower())
    elif op in ("-match", "-notmatch"):
        hit = re.search(pattern, text, re.I) is not None
    else:
        hit = text.lower() == pattern.lower()
    return not hit if op in ("-notlike", "-notmatch", "-ne") else hit


class WindowsUpdateAgent:
    """The Windows Update agent: a catalogue, search, install, and what a reboot completes."""

    def __init__(self, catalogue: list[Update] | None = None, install_seconds: float = 0.2):
        self.updates = default_catalogue() if catalogue is None else catalogue
        self.install_seconds = install_seconds
        self.searches: list[str] = []

    @property
    def reboot_required(self) -> bool:
        return any(u.pending_reboot for u in self.updates)

    def _installed(self, update_id: str) -> bool:
        return any(u.update_id == update_id and u.installed for u in self.updates)

    def search(self, criteria: str) -> list[Update]:
        self.searches.append(criteria)
        return [
            u
            for u in self.updates
            if not u.pending_reboot
            and all(self._installed(r) for r in u.requires)
            and matches_criteria(u, criteria)
        ]

    async def install(self, update: Update) -> int | None:
        """The HResult of a failed install, else None."""
        await asyncio.sleep(self.install_seconds)
        update.installs += 1
        if update.fails is not None:
            return update.fails
        if update.reboot:
            update.pending_reboot = True
        else:
            update.installed = True
        return None

    def rebooted(self) -> None:
        for update in self.updates:
            if update.pending_reboot:
                update.pending_reboot = False
                update.installed = not update.sticky

    async def run(self, script: str, out: Output) -> int:
        """What Kiln's Windows Update script does (customizers/windows.py), on this agent."""
        m = re.search(
            r"^\$parameters\s*=\s*'((?:[^']|'')*)'\s*\|\s*ConvertFrom-Json", script, re.M | re.I
        )
        if not m:
            out.line("The Windows Update script declares no $parameters", "stderr")
            return 1
        parameters = json.loads(m.group(1).replace("''", "'"))
        if self.reboot_required:
            out.line("a restart is pending from an earlier install; restarting first")
            out.line("KILN-WU reboot True")
            return 0
        out.line(f"Searching for updates: {parameters['criteria']}")
        try:
            found = self.search(parameters["criteria"])
        except FsError as error:
            out.line(str(error), "stderr")
            return 1
        out.line(f"KILN-WU found {len(found)}")
        filters = [f.split(":", 1) for f in parameters["filters"]]
        selected: list[Update] = []
        for update in found:
            include = False
            for kind, expression in filters:
                try:
                    hit = filter_matches(expression, update)
                except FsError as error:
                    out.line(str(error), "stderr")
                    return 1
                if hit:
                    include = kind == "include"
                    break
            if update.update_id in parameters["skip"]:
                include = False
            if include and len(selected) < parameters["limit"]:
                selected.append(update)
                out.line(f"KILN-WU selected {update.update_id} {update.title}")
            else:
                out.line(f"KILN-WU skipped {update.update_id} {update.title}")
        for update in selected:
            failure = await self.install(update)
            if failure is None:
                out.line(f"KILN-WU installed {update.update_id} {update.title}")
            else:
                out.line(f"KILN-WU failed {update.update_id} 0x{failure:08X} {update.title}")
        out.line(f"KILN-WU reboot {self.reboot_required}")
        return 0


# --- the guest -------------------------------------------------------------------------------

_IMAGE_STATE = re.compile(r"get-itemproperty.*setup\\state.*imagestate")
_ARG = r"'(?:[^']|'')*'|\"[^\"]*\"|\S+"


def _params(text: str) -> dict[str, str]:
    """`-Name value` pairs and `-Switch` flags of a cmdlet call (values as written)."""
    found: dict[str, str] = {}
    for m in re.finditer(rf"-(\w+)(?::(\$\w+)|\s+(?!-)({_ARG}|\(.*?\)\)?))?", text):
        found[m.group(1).lower()] = m.group(2) or m.group(3) or "$true"
    return found


def split_statements(script: str) -> list[str]:
    """Lines and `;`-separated statements (quotes and braces respected), comments dropped."""
    out: list[str] = []
    for line in script.replace("\r\n", "\n").split("\n"):
        current, quote, depth = "", "", 0
        for ch in line:
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == ";" and depth == 0:
                out.append(current)
                current = ""
                continue
            elif ch == "#" and not current.strip():
                current = ""
                break
            current += ch
        out.append(current)
    return [s.strip() for s in out if s.strip()]


def _block_end(statements: list[str], index: int) -> int:
    """The index after the `}` closing the block opened just before statements[index]."""
    depth = 1
    while index < len(statements) and depth:
        text = statements[index]
        depth += text.count("{") - text.count("}")
        index += 1
    return index


@dataclass
class _Stream:
    """A .NET FileStream opened by [IO.File]::Open."""

    path: str
    position: int = 0


@dataclass
class _Context:
    """Who a script runs as, and its PowerShell session's variables."""

    user: str
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class FakeWindowsGuest:
    """The 'operating system' of one Windows VM: what ran in it and what it looks like."""

    vm: VmInfo
    scripts: list[str] = field(default_factory=list)
    image_state: str = IMAGE_STATE_COMPLETE
    handler: Handler | None = None
    shutdown_requested: bool = False
    restart_requested: bool = False
    on_restart: Callable[[], None] | None = None
    boot_time: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    boots: int = 1
    tasks: dict[str, ScheduledTask] = field(default_factory=dict)
    task_starts: list[str] = field(default_factory=list)  # every task start, for tests
    updates: WindowsUpdateAgent = field(default_factory=WindowsUpdateAgent)
    fs: FileSystem = field(init=False)

    def __post_init__(self) -> None:
        self.fs = FileSystem(self.vm.admin_username)

    @property
    def files(self) -> dict[str, bytes | bytearray | str]:
        return self.fs.files

    @property
    def computer_name(self) -> str:
        return self.vm.computer_name

    @property
    def variables(self) -> dict[str, Any]:
        return self._last.variables if hasattr(self, "_last") else {}

    async def run(self, script: str, out: Output, user: str | None = None) -> int:
        """Run a script as a new powershell.exe, writing to `out` as it goes; its exit code."""
        self.scripts.append(script)
        if self.handler is not None:
            result = self.handler(script)
            if result is not None:
                stdout, stderr, code = result
                out.write("stdout", stdout)
                out.write("stderr", stderr)
                return code
        ctx = self._last = _Context(user or self.vm.admin_username)
        try:
            await self._script(script, out, ctx)
        except ScriptExit as done:
            return done.code
        return 0

    async def _script(self, script: str, out: Output, ctx: _Context) -> None:
        if re.search(r"-comobject\s+'?microsoft\.update\.session", script, re.I):
            raise ScriptExit(await self.updates.run(script, out))
        statements = split_statements(script)
        index = 0
        while index < len(statements):
            statement = statements[index]
            index += 1
            m = re.match(r"^if\s*\(\s*(test-path\b.*)\)\s*\{$", statement, re.I)
            if m and self._test_path(m.group(1)[len("test-path") :], ctx) == "False":
                index = _block_end(statements, index)  # the branch not taken
                continue
            await self._statement(statement, out, ctx)

    async def _call(self, m: re.Match[str], out: Output, ctx: _Context) -> None:
        """`& 'script.ps1'`: runs in a child scope; its exit code becomes $LASTEXITCODE."""
        path = self._value(m.group(1), ctx)
        script = self.fs.read(path).decode("utf-8-sig")
        child = _Context(ctx.user, dict(ctx.variables))
        try:
            await self._script(script, out, child)
        except ScriptThrow:
            raise
        except ScriptExit as done:
            ctx.variables["lastexitcode"] = done.code
            return
        if "lastexitcode" in child.variables:
            ctx.variables["lastexitcode"] = child.variables["lastexitcode"]

    # one statement ---------------------------------------------------------------------

    async def _statement(self, text: str, out: Output, ctx: _Context) -> None:
        text = re.sub(r"\s*\|\s*Out-Null\s*$", "", text, flags=re.I)
        text = re.sub(r"^\$null\s*=\s*|^\[void\]", "", text, flags=re.I)
        low = text.lower()
        quiet = re.search(r"-erroraction\s+silentlycontinue", low) is not None
        stop = re.search(r"-erroraction\s+stop", low) is not None
        try:
            try:
                await self._dispatch(text, low, out, ctx)
            except (KeyError, AttributeError, TypeError):
                raise FsError("You cannot call a method on a null-valued expression.") from None
        except FsError as error:
            if stop:
                out.line(str(error), "stderr")
                raise ScriptThrow from None
            if not quiet:
                out.line(str(error), "stderr")

    async def _dispatch(self, text: str, low: str, out: Output, ctx: _Context) -> None:
        if "sysprep.exe" in low:
            if "/generalize" in low:
                self.image_state = IMAGE_STATE_GENERALIZED
            if "/shutdown" in low:
                self.shutdown_requested = True
            return
        m = re.match(r"^\$(\w+)\s*=\s*(.+)$", text, re.S)
        if m:
            ctx.variables[m.group(1).lower()] = await self._expression(m.group(2), out, ctx)
            return
        for pattern, action in self._simple(ctx):
            m = re.match(pattern, text, re.I | re.S)
            if m:
                result = action(m, out)
                if asyncio.iscoroutine(result):
                    await result
                return

    def _simple(self, ctx: _Context) -> list[tuple[str, Callable[[re.Match[str], Output], Any]]]:
        v = lambda raw: self._value(raw, ctx)  # noqa: E731
        return [
            (r"^(write-output|write-host|echo)\b\s*(.*)$", lambda m, o: o.line(v(m.group(2)))),
            (
                r"^write-error\b\s*(?:-message\s+)?(.*)$",
                lambda m, o: o.line(v(m.group(1)), "stderr"),
            ),
            (r"^exit\b\s*(.*)$", lambda m, o: self._exit(v(m.group(1)) or "0")),
            (r"^throw\b\s*(.*)$", lambda m, o: self._throw(v(m.group(1)), o)),
            (
                r"^(\$env:computername|hostname|hostname\.exe)$",
                lambda m, o: o.line(self.computer_name),
            ),
            (r"^(whoami|\$env:username)$", lambda m, o: o.line(self._whoami(ctx, m.group(1)))),
            (r".*" + _IMAGE_STATE.pattern, lambda m, o: o.line(self.image_state)),
            (r"^start-sleep\b\s*(-seconds|-s|-milliseconds|-m)?\s*([\d.]+)\s*$", self._sleep),
            (r"^test-path\b(.*)$", lambda m, o: o.line(self._test_path(m.group(1), ctx))),
            (r"^new-item\b(.*)$", lambda m, o: self._new_item(m.group(1), ctx)),
            (r"^(set-content|add-content)\b(.*)$", lambda m, o: self._content(m, ctx)),
            (r"^get-content\b(.*)$", lambda m, o: self._get_content(m.group(1), o, ctx)),
            (r"^move-item\b(.*)$", lambda m, o: self._move(m.group(1), ctx)),
            (r"^remove-item\b(.*)$", lambda m, o: self._remove(m.group(1), ctx)),
            (r"^\(get-filehash\b(.*)\)\.hash$", lambda m, o: o.line(self._hash(m.group(1), ctx))),
            (
                r"^\(get-ciminstance\b.*win32_operatingsystem.*\)\.lastbootuptime.*$",
                lambda m, o: o.line(self.boot_time.isoformat()),
            ),
            (r"^register-scheduledtask\b(.*)$", lambda m, o: self._register(m.group(1), ctx)),
            (r"^start-scheduledtask\b(.*)$", lambda m, o: self._start_task(m.group(1), ctx)),
            (
                r"^\(get-scheduledtask\b(.*)\)\.state$",
                lambda m, o: self._task_state(m.group(1), o, ctx),
            ),
            (
                r"^get-scheduledtask\b(.*)\|\s*unregister-scheduledtask\b.*$",
                lambda m, o: self._unregister(m.group(1), ctx),
            ),
            (r"^\$(\w+)\.seek\((\d+)", lambda m, o: self._seek(m, ctx)),
            (r"^\$(\w+)\.close\(\)$", lambda m, o: None),
            (
                r"^\[convert\]::tobase64string\(\$(\w+),\s*0,\s*\$(\w+)\)$",
                lambda m, o: o.line(self._b64(m, ctx)),
            ),
            (r"^cmd(?:\.exe)?\s+/c\s+\"(.*)\"$", lambda m, o: self._cmd(m.group(1), ctx)),
            (
                r"^(shutdown(?:\.exe)?\s+.*/r\b.*|restart-computer\b.*)$",
                lambda m, o: self._restart(),
            ),
            (r"^&\s*(" + _ARG + r")\s*$", lambda m, o: self._call(m, o, ctx)),
            (
                r"^(\d+)\.\.(\d+)\s*\|\s*foreach-object\s*\{(.*)\}$",
                lambda m, o: self._foreach(m, o, ctx),
            ),
        ]

    # expressions --------------------------------------------------------------------------

    async def _expression(self, raw: str, out: Output, ctx: _Context) -> Any:
        raw = raw.strip()
        if _IMAGE_STATE.search(raw.lower()):
            return self.image_state
        m = re.match(r"^\[(?:system\.)?io\.file\]::open\(\s*(" + _ARG + r")", raw, re.I)
        if m:
            path = self._value(m.group(1).rstrip(","), ctx)
            if not self.fs.is_file(path):
                raise FsError(f"Could not find file '{path}'.")
            return _Stream(path)
        m = re.match(r"^new-object\s+byte\[\]\s+(\d+)$", raw, re.I)
        if m:
            return bytes(int(m.group(1)))
        m = re.match(r"^\$(\w+)\.read\(\$(\w+),\s*0,\s*(\d+)\)$", raw, re.I)
        if m:
            stream: _Stream = ctx.variables[m.group(1).lower()]
            data = self.fs.read(stream.path)[stream.position : stream.position + int(m.group(3))]
            stream.position += len(data)
            ctx.variables[m.group(2).lower()] = data
            return len(data)
        m = re.match(r"^new-scheduledtask(action|principal|settingsset)\b(.*)$", raw, re.I)
        if m:
            return {"kind": m.group(1).lower(), **_params(m.group(2))}
        m = re.match(r"^\(get-ciminstance\b.*win32_operatingsystem.*\)\.lastbootuptime", raw, re.I)
        if m:
            return self.boot_time.isoformat()
        return self._value(raw, ctx)

    def _value(self, raw: str, ctx: _Context) -> str:
        """A PowerShell argument: 'literal', "expanding" or a bare word ($variables expand)."""
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == "'":
            return raw[1:-1].replace("''", "'")
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        raw = re.sub(r"\$env:computername", self.computer_name, raw, flags=re.I)
        raw = re.sub(r"\$env:(systemroot|windir)", r"C:\\Windows", raw, flags=re.I)
        return re.sub(
            r"\$(\w+)", lambda m: str(ctx.variables.get(m.group(1).lower(), m.group(0))), raw
        )

    def _path(self, args: str, ctx: _Context, *names: str) -> str:
        params = _params(args)
        for name in (*names, "literalpath", "path", "filepath"):
            if name in params:
                return self._value(params[name], ctx)
        first = re.match(rf"\s*({_ARG})", args)
        return self._value(first.group(1), ctx) if first else ""

    # cmdlets --------------------------------------------------------------------------------

    def _exit(self, code: str) -> None:
        raise ScriptExit(int(code) if re.fullmatch(r"-?\d+", code.strip()) else 0)

    def _throw(self, message: str, out: Output) -> None:
        out.line(message or "ScriptHalted", "stderr")
        raise ScriptThrow

    def _whoami(self, ctx: _Context, asked: str) -> str:
        if asked.lower() == "$env:username":
            return f"{self.computer_name.upper()}$" if ctx.user == SYSTEM else ctx.user
        if ctx.user == SYSTEM:
            return "nt authority\\system"
        return f"{self.computer_name.lower()}\\{ctx.user.lower()}"

    async def _sleep(self, m: re.Match[str], out: Output) -> None:
        seconds = float(m.group(2))
        if (m.group(1) or "").lower() in ("-milliseconds", "-m"):
            seconds /= 1000
        await asyncio.sleep(seconds)

    def _test_path(self, args: str, ctx: _Context) -> str:
        path, kind = self._path(args, ctx), (_params(args).get("pathtype") or "any").lower()
        if kind == "container":
            return str(self.fs.is_dir(path))
        if kind == "leaf":
            return str(self.fs.is_file(path))
        return str(self.fs.is_dir(path) or self.fs.is_file(path))

    def _new_item(self, args: str, ctx: _Context) -> None:
        params = _params(args)
        path, force = self._path(args, ctx), "force" in params
        if (params.get("itemtype") or "").strip("'\"").lower() == "directory":
            self.fs.mkdir(path, force=force)
        elif self.fs.is_file(path) and not force:
            raise FsError(f"The file '{path}' already exists.")
        else:
            self.fs.write(path, b"")

    def _content(self, m: re.Match[str], ctx: _Context) -> None:
        args = m.group(2)
        params = _params(args)
        path, raw = self._path(args, ctx), params.get("value", "")
        b64 = re.search(r"frombase64string\('([A-Za-z0-9+/=]*)'\)", raw, re.I)
        text = "" if b64 else self._value(raw, ctx) + "\r\n"
        data = base64.b64decode(b64.group(1)) if b64 else text.encode()
        if m.group(1).lower() == "add-content":
            self.fs.append(path, data)
        else:
            self.fs.write(path, data)

    def _get_content(self, args: str, out: Output, ctx: _Context) -> None:
        data = self.fs.read(self._path(args, ctx)).decode("utf-8", "replace")
        if "raw" in _params(args):
            out.write("stdout", data)
            return
        for line in data.splitlines():
            out.line(line)

    def _move(self, args: str, ctx: _Context) -> None:
        params = _params(args)
        self.fs.move(
            self._path(args, ctx),
            self._value(params.get("destination", ""), ctx),
            force="force" in params,
        )

    def _remove(self, args: str, ctx: _Context) -> None:
        self.fs.remove(self._path(args, ctx), recurse="recurse" in _params(args))

    def _hash(self, args: str, ctx: _Context) -> str:
        return hashlib.sha256(self.fs.read(self._path(args, ctx))).hexdigest().upper()

    def _register(self, args: str, ctx: _Context) -> None:
        params = _params(args)
        name = self._value(params.get("taskname", ""), ctx)
        action = ctx.variables.get(params.get("action", "").lstrip("$").lower()) or {}
        principal = ctx.variables.get(params.get("principal", "").lstrip("$").lower()) or {}
        user = self._value(principal.get("userid", "''"), ctx)
        logon = self._value(principal.get("logontype", "''"), ctx).lower()
        if user.upper() in (SYSTEM, "NT AUTHORITY\\SYSTEM") and logon == "serviceaccount":
            user = SYSTEM
        elif user.lower() != self.vm.admin_username.lower() or logon not in ("s4u", "password"):
            raise FsError("No mapping between account names and security IDs was done.")
        if name.lower() in (n.lower() for n in self.tasks) and "force" not in params:
            raise FsError(f"Cannot create a file when that file already exists: {name}")
        self.tasks[name] = ScheduledTask(
            name=name,
            execute=self._value(action.get("execute", "''"), ctx),
            argument=self._value(action.get("argument", "''"), ctx),
            user=user,
            logon_type=logon,
            run_level=self._value(principal.get("runlevel", "'Limited'"), ctx),
        )

    def _task(self, args: str, ctx: _Context) -> ScheduledTask:
        name = self._value(_params(args).get("taskname", "''"), ctx)
        task = next((t for n, t in self.tasks.items() if n.lower() == name.lower()), None)
        if task is None:
            raise FsError(
                f"No MSFT_ScheduledTask objects found with property 'TaskName' equal to '{name}'."
            )
        return task

    def _start_task(self, args: str, ctx: _Context) -> None:
        task = self._task(args, ctx)
        if task.state == "Running":
            return  # MultipleInstances IgnoreNew: the running instance goes on
        task.state, task.runs = "Running", task.runs + 1
        self.task_starts.append(task.name)
        task.task = asyncio.get_running_loop().create_task(self._run_task(task))

    async def _run_task(self, task: ScheduledTask) -> None:
        try:
            code = await self._native(f"{task.execute} {task.argument}", Output(), task.user)
            task.last_result = code
        finally:
            task.state = "Ready"

    def _task_state(self, args: str, out: Output, ctx: _Context) -> None:
        out.line(self._task(args, ctx).state)

    def _unregister(self, args: str, ctx: _Context) -> None:
        pattern = self._value(_params(args).get("taskname", "'*'"), ctx).lower()
        for name in [n for n in self.tasks if fnmatch.fnmatch(n.lower(), pattern)]:
            task = self.tasks.pop(name)
            if task.task is not None:
                task.task.cancel()

    def _seek(self, m: re.Match[str], ctx: _Context) -> None:
        ctx.variables[m.group(1).lower()].position = int(m.group(2))

    def _b64(self, m: re.Match[str], ctx: _Context) -> str:
        data: bytes = ctx.variables.get(m.group(1).lower(), b"")
        count = int(ctx.variables.get(m.group(2).lower(), 0))
        return base64.b64encode(data[:count]).decode()

    async def _cmd(self, inner: str, ctx: _Context) -> None:
        """`cmd.exe /c "command >> file 2>&1"`: the command's output appended to file."""
        m = re.match(r"^(.*?)\s*>>\s*(\S+)\s+2>&1$", inner)
        out: Output = Output()
        if m:
            inner, log = m.group(1), m.group(2)
            if not self.fs.is_file(log):
                self.fs.write(log, b"")
            out = FileOutput(self.fs, log)
        ctx.variables["lastexitcode"] = await self._native(inner, out, ctx.user)

    async def _native(self, command: str, out: Output, user: str) -> int:
        """powershell.exe [...] -File path (or -Command / -EncodedCommand) as `user`."""
        m = re.search(r"-file\s+(" + _ARG + ")", command, re.I)
        if not m:
            from .winrm_guest import script_of

            return await self.run(script_of(command), out, user)
        try:
            script = self.fs.read(self._value(m.group(1), _Context(user))).decode("utf-8-sig")
        except FsError as error:
            out.line(str(error), "stderr")
            return -196608  # powershell.exe: the -File argument does not exist
        return await self.run(script, out, user)

    def _restart(self) -> None:
        self.restart_requested = True
        if self.on_restart is not None:
            self.on_restart()

    async def _foreach(self, m: re.Match[str], out: Output, ctx: _Context) -> None:
        for number in range(int(m.group(1)), int(m.group(2)) + 1):
            if number % 500 == 0:
                await asyncio.sleep(0)  # a long loop must not stall the emulator
            ctx.variables["_"] = str(number)
            for statement in split_statements(m.group(3)):
                await self._statement(statement, out, ctx)

    # power --------------------------------------------------------------------------------

    def went_down(self) -> None:
        """The old boot ends: running tasks die with it (no exit code is written)."""
        for task in self.tasks.values():
            if task.task is not None and not task.task.done():
                task.task.cancel()
            task.state = "Ready"

    def booted(self) -> None:
        """A new boot: a later LastBootUpTime; updates that waited for it are completed."""
        self.boot_time = max(
            datetime.datetime.now(datetime.UTC), self.boot_time + datetime.timedelta(seconds=1)
        )
        self.boots += 1
        self.restart_requested = False
        self.updates.rebooted()
