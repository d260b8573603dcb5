"""In-process engine: the real ServerApp, strategy and ClientApp in one process, without SuperLink or Ray.

``InProcessGrid`` implements Flower's ``Grid`` interface (``flwr.serverapp.Grid``) by handing every
message straight to the ``ClientApp`` of its destination node. Each node has its own ``Context``
(node id, ``partition-id`` / ``num-partitions`` node config, a ``state`` RecordDict that lives for
the run), exactly what a simulated SuperNode gets. Messages and replies cross the "wire" as
Flower's protobuf (``message_to_proto`` / ``message_from_proto``), so a ClientApp never sees the
server's objects and the server never sees the client's: what the server receives is what
``flwr run`` would deliver.

Nodes run one after another. A reply counts as arriving within ``send_and_receive``'s timeout when
that node's own handler finished within it (in a real federation all nodes run at once, so each
node's time starts with the push); a reply that took longer is dropped and logged, as the
SuperLink would leave it unpulled. A ClientApp that raises is answered with Flower's own
``CLIENT_APP_RAISED_EXCEPTION`` error reply.

``run(overrides)`` runs one experiment through ``server_app.app.serve`` (the body of the
ServerApp's ``main``) on this grid and returns its run directory. It is what ``make demo
ENGINE=inprocess``, ``python -m server_app.inprocess [overrides]``, the benchmarks that write
``results/`` and the algorithm round tests use: a run costs its compute, not a Flower and Ray
start-up (about 45 s on 2 cores). With the same seed and the same number of torch threads it
writes the same ``summary.json`` numbers as ``flwr run`` (``tests/e2e/test_inprocess.py``).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger("pf2lora.inprocess")
PARTITION_ID = "partition-id"  # Flower's node-config keys of a simulated SuperNode
NUM_PARTITIONS = "num-partitions"


def _wire(message: Message) -> Message:
    """``message`` as the other side receives it: serialised and parsed again (a copy sharing nothing)."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` calls in this process, one ``Context`` per node.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (the product's ``client_app.app.app``).
    num_nodes : int
        Nodes ``0..num_nodes-1`` get ``partition-id`` = their index, ``num-partitions`` = ``num_nodes``.
    run_id : int
        The run's id (also seeds the node ids, which look like Flower's random 63-bit ids).
    run_config : dict
        Every node's ``context.run_config`` (the app's run config, as ``flwr run --run-config``).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int, run_config: dict | None = None) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        ids = random.Random(run_id).sample(range(2, 2**63), num_nodes)  # 1 is the SuperLink's own id
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={PARTITION_ID: k, NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for k, node in enumerate(ids)
        }
        self._run = Run.create_empty(run_id)
        self._replies: dict[str, Message | None] = {}  # message id -> reply (None: not in time)
        self._timeout: float | None = None  # of the send_and_receive in progress

    # ---------------------------------------------------------------------------- Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; the reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as the SuperLink does on push
            self._replies[msg.metadata.message_id] = self._deliver(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for mid in message_ids:
            reply = self._replies.pop(mid, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Replies in the order of ``messages``; those a node took longer than ``timeout`` to produce are left out."""
        self._timeout = timeout
        try:
            return list(self.pull_messages(self.push_messages(messages)))
        finally:
            self._timeout = None

    # ---------------------------------------------------------------------------- delivery
    def _deliver(self, msg: Message) -> Message | None:
        node = int(msg.metadata.dst_node_id)
        context = self.contexts.get(node)
        if context is None:  # the SuperLink answers for a node it does not know
            return self._error_reply(msg, ErrorCode.NODE_UNAVAILABLE, f"node {node} is not part of this federation")
        start = time.monotonic()
        try:
            reply = self.client_app(_wire(msg), context)
        except Exception as err:  # a SuperNode turns an exception of the ClientApp into an error reply
            log.warning("ClientApp on node %d raised %s: %s", node, type(err).__name__, err)
            reply = self._error_reply(msg, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}")
        took = time.monotonic() - start
        if self._timeout is not None and took > self._timeout:
            log.warning(
                "node %d replied after %.1f s, past the %.1f s timeout: reply dropped", node, took, self._timeout
            )
            return None
        reply = _wire(reply)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return reply

    @staticmethod
    def _error_reply(msg: Message, code: int, reason: str) -> Message:
        return Message(Error(code=code, reason=reason), reply_to=msg)


@contextlib.contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """The identity a ServerApp process has (Flower sets it before ``main``): its messages need a run id."""
    previous = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = run_id, run_id, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = previous


def run(overrides: list[str] | str = (), run_id: int | None = None) -> Path:
    """One experiment through the real ServerApp and ClientApp in this process; returns its run directory.

    ``overrides``: Hydra overrides, as for ``make demo`` / ``flwr run --run-config "overrides='...'"``.
    Raises ``ConfigError`` for a bad configuration (before any work) and whatever the ServerApp raises.
    """
    from client_app.app import app as client_app
    from pf2lora_core.config.experiment import load, split_overrides
    from pf2lora_core.tools.launch import join_overrides
    from server_app.app import serve

    items = split_overrides(overrides) if isinstance(overrides, str) else list(overrides)
    text = join_overrides(items)
    exp = load(items)  # the federation's size; ConfigError here, before any node exists
    if exp.federation.kind != "simulation":
        from pf2lora_core.config.schema import ConfigError

        raise ConfigError(
            f"federation.kind={exp.federation.kind}: the in-process engine runs simulations only; "
            f"submit a deployment with `flwr run . {exp.federation.connection}`"
        )
    run_id = run_id if run_id is not None else random.getrandbits(63)
    run_config = {"overrides": text}
    grid = InProcessGrid(client_app, exp.federation.num_clients, run_id, run_config)
    context = Context(
        run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=run_config
    )
    with server_identity(run_id):
        return serve(grid, context)


def main(argv: list[str] | None = None) -> int:
    """``python -m server_app.inprocess [hydra overrides]``: ``make demo ENGINE=inprocess``."""
    from pf2lora_core.config.schema import ConfigError
    from pf2lora_core.tools.launch import sigterm_as_interrupt

    items = list(sys.argv[1:] if argv is None else argv)
    try:
        from pf2lora_core.config.experiment import load
        from pf2lora_core.training.runtime import device_report

        print(f"device: {device_report(str(load(items).cfg.device), None)}")  # every client runs in this process
        with sigterm_as_interrupt():
            run(items)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run stopped; `resume=<run dir>` continues it from its last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
