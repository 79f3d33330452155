"""Keep Serve's per-replica gRPC port on the node's own address.

Ray Serve 2.60 starts an inter-deployment gRPC server in every replica, right after the deployment's constructor,
on `[::]` (every interface) and without Ray's token auth, whatever address the node has. On a node started on
loopback only (what the `livetalk` CLI starts) that is the one port reachable from the network. Each deployment's
constructor calls `bind_replica_server_to_node_address()`, which makes that server bind to the node's address
instead: 127.0.0.1 on a loopback-only node, the node's cluster address on a cluster (as Ray's own ports do).
"""

from __future__ import annotations

import ipaddress


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def bind_replica_server_to_node_address() -> None:
    try:
        from ray.serve._private import replica
        from ray.util import get_node_ip_address
    except ImportError:  # a Ray without this server
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "binds_node_address", False):
        return
    node = _host(get_node_ip_address())

    def add_port_on_node_address(server, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{node}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    add_port_on_node_address.binds_node_address = True
    replica.add_port_to_grpc_server = add_port_on_node_address
