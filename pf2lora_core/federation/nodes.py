"""The node directory: which node is which client, who is asked again when, and who is sampled.

Node ids differ from run to run (Flower assigns them), so everything the run decides is keyed by
*client* (partition id): a node is identified by asking it (a query message, sent by the strategy)
and bound to the client it claims unless the claim is refused; sampling draws clients with the
directory's own seeded RNG, so a run (and a resumed run) samples the same clients whatever the
node ids. Flower-free: the strategy asks the nodes and hands the answers here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping

from pf2lora_core.training.runtime import derived_seed

log = logging.getLogger("pf2lora.server")
SAMPLER_SALT = 7_501  # derives the node sampler's seed from the run's seed (any fixed number)


class NodeDirectory:
    """Node id -> client binding, identity back-off and seeded client sampling.

    Parameters
    ----------
    num_clients : int
        Clients (partitions) ``0..num_clients-1`` of the federation.
    seed : int
        The run's seed (the sampler's seed is derived from it).
    node_keys : mapping
        ``federation.node_keys``: public key (text or SHA-256 hex) -> the client it may claim;
        empty = identity by claim alone.
    rebind_clients : bool
        ``federation.rebind_clients``: a new node may take over the client of an offline node.
    """

    def __init__(
        self, num_clients: int, seed: int, node_keys: Mapping[str, int] | None = None, rebind_clients: bool = False
    ) -> None:
        self.num_clients = num_clients
        self.node_keys = dict(node_keys or {})
        self.rebind_clients = rebind_clients
        self._clients: dict[int, int] = {}  # node id -> client
        self._nodes: dict[int, int] = {}  # client -> node id (its inverse: node_of in O(1), binding N nodes in O(N))
        self.ignored: set[int] = set()  # nodes never asked again (claim refused, or every client bound)
        self.backoff: dict[int, tuple[int, int]] = {}  # unidentified node -> (failures, round it is asked again)
        self.sampler = random.Random(derived_seed(seed, SAMPLER_SALT))

    @property
    def clients(self) -> dict[int, int]:
        """Node id -> client. Read it; change it with ``bind`` or by assigning a whole map."""
        return self._clients

    @clients.setter
    def clients(self, value: Mapping[int, int]) -> None:
        self._clients = dict(value)
        self._nodes = {}
        for node, client in self._clients.items():
            self._nodes.setdefault(client, node)

    # ------------------------------------------------------------------------ identity
    def unknown(self, connected: Iterable[int]) -> list[int]:
        """Connected nodes neither bound nor ignored, in order."""
        return sorted(set(connected) - set(self.clients) - self.ignored)

    def due(self, nodes: Iterable[int], connected: set[int], round_now: int) -> list[int]:
        """Which of ``nodes`` to ask for their partition id now.

        None once every client is bound to a connected node (the rest are ignored, logged once); a
        node that failed to answer is asked again only after 1, 2, 4, ... rounds (each query may
        wait minutes).
        """
        nodes = list(nodes)
        if not nodes:  # (every round after the first: nothing to count over all bound nodes)
            return []
        if len({c for n, c in self.clients.items() if n in connected}) >= self.num_clients:
            for node in nodes:
                log.warning("node %d ignored: every partition is mapped to a connected node", node)
                self.ignored.add(node)
            return []
        return [n for n in nodes if self.backoff.get(n, (0, 0))[1] <= round_now]

    def record_answers(
        self,
        asked: Iterable[int],
        claims: Mapping[int, int],
        connected: set[int],
        round_now: int,
        keys: Mapping[int, tuple[str, str]] | None = None,
    ) -> None:
        """Bind each asked node that answered to the client it claims (or ignore it); back off the silent ones.

        ``keys``: node id -> (its public key as text, SHA-256 hex of the key), for ``node_keys``.
        """
        for node in asked:
            if node not in claims:
                failures = self.backoff.get(node, (0, 0))[0] + 1
                self.backoff[node] = (failures, round_now + 2 ** (failures - 1))
                log.warning(
                    "node %d did not identify itself; not sampled, asked again in round %d", node, self.backoff[node][1]
                )
                continue
            self.backoff.pop(node, None)
            reason = self.bind(node, claims[node], connected, (keys or {}).get(node))
            if reason is not None:
                log.warning("node %d %s; node %d ignored", node, reason, node)
                self.ignored.add(node)

    def bind(self, node: int, client: int, connected: set[int], key: tuple[str, str] | None = None) -> str | None:
        """Map ``node`` to the ``client`` it claims; why not, or None when mapped."""
        if not 0 <= client < self.num_clients:
            return f"claims partition {client}, outside [0, num_clients={self.num_clients})"
        holder = self.node_of(client)
        if self.node_keys:  # identity from keys: the claim must match the key's partition
            bound = next((self.node_keys[k] for k in (key or ()) if k in self.node_keys), None)
            if bound is None:
                return f"has no entry in federation.node_keys (public key SHA-256 {key[1] if key else '?'})"
            if bound != client:
                return f"claims client {client} but its public key is client {bound}'s"
        elif holder is not None and holder != node and (holder in connected or not self.rebind_clients):
            state = "connected" if holder in connected else "offline; federation.rebind_clients=false"
            return f"claims client {client}, which node {holder} holds ({state})"
        if holder is not None and holder != node:
            del self._clients[holder]
            log.info("client %d reconnected as node %d (was node %d)", client, node, holder)
        previous = self._clients.get(node)
        if previous is not None and self._nodes.get(previous) == node:
            del self._nodes[previous]
        self._clients[node] = client
        self._nodes[client] = node
        return None

    # ------------------------------------------------------------------------ lookup, sampling
    def node_of(self, client: int) -> int | None:
        return self._nodes.get(client)

    def connected_clients(self, connected: set[int]) -> list[int]:
        """Clients whose bound node is connected, in order."""
        return sorted(c for n, c in self.clients.items() if n in connected)

    def sample(self, clients: list[int], fraction: float, minimum: int) -> list[int]:
        """``fraction`` of ``clients`` (at least ``minimum``), drawn with the directory's own RNG, in order."""
        size = min(len(clients), max(int(len(clients) * fraction), minimum))
        return sorted(self.sampler.sample(clients, size))

    def label(self, node: int) -> str:
        """``client K (node N)`` from the directory's own binding (never from what a reply claims)."""
        return f"client {self.clients.get(node, '?')} (node {node})"
