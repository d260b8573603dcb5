"""What a federated run is made of, free of Flower.

A client's side: ``client_runtime`` (load levels, train a round, evaluate), ``private_store`` (its
private level on disk, by round), ``node_policy`` (what a SuperNode agrees to do),
``received_config`` (the server's config text read as bounded plain data, never resolved). The
contract: ``protocol`` (message keys and the metric encoding). The server's side: ``checks`` and ``replies``
(a reply becomes a typed reply or a rejection), ``nodes`` (node id -> client, sampling), ``rounds``
(the round record), ``checkpoint`` and ``resume``. The Flower apps (``server_app``, ``client_app``)
hand these plain data and act on what they decide.
"""
