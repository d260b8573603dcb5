"""The node directory on plain node ids: binding, refusals, back-off and seeded sampling."""

from __future__ import annotations

from pf2lora_core.federation.nodes import NodeDirectory


def test_claims_bind_nodes_and_refusals_say_why() -> None:
    d = NodeDirectory(num_clients=3, seed=0)
    d.record_answers([10, 11, 12, 13], {10: 0, 11: 1, 12: 7, 13: 0}, connected={10, 11, 12, 13}, round_now=1)
    assert d.clients == {10: 0, 11: 1}
    assert d.ignored == {12, 13}  # outside [0, 3) / client 0 held by a connected node
    assert d.bind(14, 0, connected={10}) == "claims client 0, which node 10 holds (connected)"
    assert d.label(10) == "client 0 (node 10)" and d.label(99) == "client ? (node 99)"


def test_an_offline_clients_node_is_taken_over_only_with_rebind() -> None:
    strict = NodeDirectory(2, 0)
    strict.clients = {10: 0}
    assert "offline; federation.rebind_clients=false" in strict.bind(20, 0, connected={20})
    loose = NodeDirectory(2, 0, rebind_clients=True)
    loose.clients = {10: 0}
    assert loose.bind(20, 0, connected={20}) is None and loose.clients == {20: 0}


def test_node_keys_decide_identity() -> None:
    d = NodeDirectory(2, 0, node_keys={"abc": 1})
    assert d.bind(10, 1, set(), key=("pem", "abc")) is None
    assert "public key is client 1's" in d.bind(11, 0, set(), key=("pem", "abc"))
    assert "has no entry in federation.node_keys" in d.bind(12, 0, set(), key=("pem", "zzz"))


def test_silent_nodes_are_asked_again_after_1_2_4_rounds() -> None:
    d = NodeDirectory(2, 0)
    asked_in = []
    for rnd in range(1, 9):
        due = d.due([10], connected={10}, round_now=rnd)
        if due:
            asked_in.append(rnd)
            d.record_answers(due, {}, connected={10}, round_now=rnd)
    assert asked_in == [1, 2, 4, 8]


def test_once_every_client_is_bound_new_nodes_are_ignored() -> None:
    d = NodeDirectory(1, 0)
    d.clients = {10: 0}
    assert d.due([11], connected={10, 11}, round_now=1) == [] and 11 in d.ignored
    assert d.unknown({10, 11, 12}) == [12]


def test_sampling_is_seeded_by_the_run_and_not_by_node_ids() -> None:
    a, b = NodeDirectory(10, seed=3), NodeDirectory(10, seed=3)
    draws = [a.sample(list(range(10)), 0.3, 1) for _ in range(5)]
    assert draws == [b.sample(list(range(10)), 0.3, 1) for _ in range(5)]
    assert all(len(x) == 3 and x == sorted(x) for x in draws)
    assert a.sample([1, 2], 0.0, 1) in ([1], [2]) and a.sample([1, 2], 0.1, 5) == [1, 2]


class CountedClient(int):
    """A client id that counts how often it is compared for equality (a scan over bound clients does)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountedClient.comparisons += 1
        return int(self) == other

    __hash__ = int.__hash__


def test_binding_and_finding_nodes_is_linear_in_the_federation() -> None:
    """Issue 28: ``node_of`` scanned every binding, so identifying N nodes cost O(N^2) (4096 nodes: 8M
    comparisons) and every sampled client scanned all N bindings each round."""
    n = 2000
    d = NodeDirectory(num_clients=n, seed=0)
    CountedClient.comparisons = 0
    nodes = list(range(100, 100 + n))
    d.record_answers(nodes, {node: CountedClient(k) for k, node in enumerate(nodes)}, set(nodes), round_now=1)
    assert len(d.clients) == n
    for k in range(0, n, 7):
        assert d.node_of(CountedClient(k)) == 100 + k
    assert CountedClient.comparisons <= 4 * n  # a scan: about n^2 / 2 = 2,000,000


def test_a_rebound_client_is_found_at_its_new_node() -> None:
    d = NodeDirectory(2, 0, rebind_clients=True)
    d.clients = {10: 0, 11: 1}
    assert d.bind(20, 0, connected={11, 20}) is None
    assert d.node_of(0) == 20 and d.node_of(1) == 11 and d.clients == {11: 1, 20: 0}
