"""Linux customizers: how a Shell step becomes a script, and AIB's deprovisioning."""

from __future__ import annotations

from kiln.api.template import ShellStep
from kiln.api.tenancy import TenancyPolicy
from kiln.customizers.sources import TokenSource, fetch

DEPROVISION_OVERRIDE = "/tmp/DeprovisioningScript.sh"

# AIB runs `waagent -force -deprovision+user` where the Azure agent is installed; Azure's
# guide for cloud-init images adds what the agent leaves (cloud-init's instance data, which
# holds the seed's keys; the machine-id), and images without the agent get those alone.
# The agent deletes /etc/resolv.conf; a link to systemd-resolved's stub is put back.
DEPROVISION_SCRIPT = f"""#!/bin/sh
set -e
if [ -f {DEPROVISION_OVERRIDE} ]; then
    echo "running {DEPROVISION_OVERRIDE} instead of the default deprovisioning"
    sh {DEPROVISION_OVERRIDE}
    rm -f {DEPROVISION_OVERRIDE}
else
    if [ -x /usr/sbin/waagent ]; then
        resolv="$(readlink /etc/resolv.conf || true)"
        /usr/sbin/waagent -force -deprovision+user
        [ -z "$resolv" ] || ln -sfn "$resolv" /etc/resolv.conf
    fi
    cloud-init clean --logs --seed
    rm -f /etc/ssh/ssh_host_*
    truncate -s 0 /etc/machine-id
    rm -f /var/lib/dbus/machine-id
    rm -rf /var/lib/dhcp/* /var/lib/systemd/network/* /tmp/* /var/tmp/*
    find /var/log -type f -exec truncate -s 0 {{}} +
    rm -f /root/.bash_history
fi
export HISTSIZE=0
sync
echo "deprovisioned"
"""


def final_shutdown_command(user: str) -> str:
    """Removes the build user (and the sudo rule cloud-init wrote for it) and Kiln's job
    files, then powers off, once we have gone."""
    inner = (
        f"sleep 2; rm -rf /var/lib/kiln; userdel -f -r {user}; "
        "rm -f /etc/sudoers.d/90-cloud-init-users; sync; systemctl poweroff"
    )
    return f"sudo -n systemd-run --no-block --unit=kiln-final /bin/sh -c '{inner}'"


async def shell_script(
    step: ShellStep, policy: TenancyPolicy, token: TokenSource | None = None
) -> str:
    """The script to run: inline lines under `sh -e` (as Packer does), or the fetched URI."""
    if step.inline:
        return "#!/bin/sh -e\n" + "\n".join(step.inline) + "\n"
    assert step.script_uri is not None
    return (await fetch(step.script_uri, policy, step.sha256_checksum, token=token)).decode()
