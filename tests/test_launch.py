"""Local simulations get their own SuperLink ports, so two checkouts on one machine never share one."""

from __future__ import annotations

import socket

from pf2lora_core.launch import LOCAL_PORT_VARS, private_superlink_ports


def test_fresh_distinct_free_ports_unless_chosen() -> None:
    ports = private_superlink_ports({})
    assert set(ports) == set(LOCAL_PORT_VARS)
    assert len(set(ports.values())) == len(LOCAL_PORT_VARS)
    for port in ports.values():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", int(port)))  # nothing listens there
    chosen = private_superlink_ports({LOCAL_PORT_VARS[1]: "40123"})
    assert chosen[LOCAL_PORT_VARS[1]] == "40123" and chosen[LOCAL_PORT_VARS[0]] != "40123"
