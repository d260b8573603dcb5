"""Simulated availability: a sampled client that does not answer a training round (``federation.dropout_rate``).

Real federations lose clients mid-round (a phone goes offline, a site's job is pre-empted): the
server then gets no reply, or the SuperLink's ``NODE_UNAVAILABLE`` error on the node's behalf, and
the round goes on with the others. A simulation has every node online, so this draws, for each
(run seed, client, round), whether the client is unavailable for that round's training:
``P(drop) = dropout_rate``, independent across clients and rounds, the same draw on a resumed run
and under either engine. A dropped client does no work and changes no state (its private level
stays as it was), and answers with ``CLIENT_UNAVAILABLE``; the server records it as a missing
reply, like a node that went offline (``server_app.strategy``). Evaluation is never dropped: the
per-round curves and the final evaluation measure the models, they are not the federation's
dynamics. Flower-free and torch-free (the ClientApp decides before loading anything).
"""

from __future__ import annotations

import numpy as np

DROPOUT_SALT = 9_203  # separates this draw from every other seed derived from (seed, client, round)
CLIENT_UNAVAILABLE = 4003  # error code of a simulated drop-out (Flower's own codes are small integers)
UNAVAILABLE_REASON = "client unavailable this round (simulated drop-out, federation.dropout_rate={rate:g})"


def drops_out(seed: int, client: int, server_round: int, rate: float) -> bool:
    """Whether ``client`` fails to answer training round ``server_round`` of the run seeded ``seed``."""
    if rate <= 0.0:
        return False
    return bool(np.random.default_rng([seed, DROPOUT_SALT, client, server_round]).random() < rate)
