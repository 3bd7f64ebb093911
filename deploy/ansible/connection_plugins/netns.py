# ernie-mesh: run Ansible tasks inside a Linux network namespace on the controller.
"""Connection plugin `netns`: each inventory host is a network namespace on the controller.

Used by the integration test (tests/integration/test_ansible_deploy.py), where the "hosts" of a
cluster are network namespaces with their own addresses on a bridge. Commands run through
`ip netns exec <namespace> /bin/sh -c <cmd>`; files are copied with the local filesystem (every
namespace shares the controller's filesystem, so each host gets its own directory through the
`ernie_root` variable of the roles). Needs root on the controller.

Inventory:
    engine1:
      ansible_connection: netns
      ansible_netns_name: ernie-engine1     # default: ansible_host, then the inventory name
"""

from __future__ import annotations

DOCUMENTATION = """
    name: netns
    short_description: execute on the controller inside a network namespace
    description:
        - Runs commands with C(ip netns exec) in a named network namespace on the controller.
        - Files are transferred with the local filesystem (like the local connection).
    author: ernie-mesh
    options:
        netns_name:
            description: Name of the network namespace (as listed by C(ip netns list)).
            default: inventory_hostname
            vars:
                - name: ansible_netns_name
                - name: ansible_host
        ip_command:
            description: The C(ip) binary.
            default: ip
            vars:
                - name: ansible_netns_ip_command
        become_success_timeout:
            type: int
            default: 10
            description: Seconds to wait for become (unused in practice; the connection runs as root).
            vars:
                - name: ansible_local_become_success_timeout
        become_strip_preamble:
            type: bool
            default: true
            description: Strip internal become output preceding command execution.
            vars:
                - name: ansible_local_become_strip_preamble
    extends_documentation_fragment:
        - connection_pipelining
"""

import shlex

from ansible.errors import AnsibleConnectionFailure
from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.connection.local import Connection as LocalConnection


class Connection(LocalConnection):
    """Local connection whose commands run in a network namespace."""

    transport = "netns"
    has_pipelining = True

    def _namespace(self) -> str:
        name = self.get_option("netns_name")
        if not name or name == "inventory_hostname":
            name = self._play_context.remote_addr
        if not name or "/" in name or name.startswith("."):
            raise AnsibleConnectionFailure(f"netns: bad network namespace name {name!r}")
        return name

    def exec_command(self, cmd, in_data=None, sudoable=True):
        if not isinstance(cmd, str):
            cmd = " ".join(shlex.quote(to_text(c)) for c in cmd)
        wrapped = " ".join(
            [
                shlex.quote(self.get_option("ip_command")),
                "netns",
                "exec",
                shlex.quote(self._namespace()),
                "/bin/sh",
                "-c",
                shlex.quote(to_text(cmd)),
            ]
        )
        return super().exec_command(wrapped, in_data=in_data, sudoable=sudoable)
