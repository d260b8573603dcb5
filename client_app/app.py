"""ClientApp: thin glue between Flower messages and ``pf2lora_core.client.ClientRuntime``.

The private level lives in ``context.state`` (fast, within a run) and is mirrored to disk
(``PrivateStore``, atomic) so that a restarted process resumes from its last completed round. In
deployment the SuperNode's node config ``state-dir`` puts it on that machine's own disk.
A round always starts from the private level of the newest round *before* it: a round run again
after a server resume does not build on what its first attempt produced.

torch, transformers and peft are imported only by the train / evaluate handlers: in deployment
every message starts a fresh ClientApp process, and the identity query must not pay seconds of
imports on every node.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pf2lora_core.constants import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    GLOBAL,
    METRICS_KEY,
    NUM_EXAMPLES,
    PERSONALIZED,
    PRIVATE_META_KEY,
    PRIVATE_STATE_KEY,
)
from pf2lora_core.logs import stream_handler
from pf2lora_core.protocol import (
    CLIENT_KEY,
    CONFIG_YAML_KEY,
    DETAILS_KEY,
    RUN_KEY,
    TRAINED_BEFORE_KEY,
    encode_details,
    flatten_eval,
)

if TYPE_CHECKING:
    from pf2lora_core.client import ClientRuntime
    from pf2lora_core.state import PrivateState, PrivateStore

app = ClientApp()
log = logging.getLogger("pf2lora.client")
STATE_DIR_NODE_KEY = "state-dir"  # node config: where this SuperNode keeps private adapters
# node config: start the private level afresh when it is lost although the server says this client
# trained before (default false: that is an error naming the state directory)
ALLOW_FRESH_NODE_KEY = "allow-fresh-private"
SERVER_ROUND_KEY = "server-round"  # set by the server in every train / evaluate config


def _setup_logging() -> None:
    if not log.handlers:  # to the SuperNode's stderr as it is at each record, not as it was at import
        log.addHandler(stream_handler("stderr", "%(asctime)s pf2lora-client %(levelname)s %(message)s"))
        log.setLevel(logging.INFO)
        log.propagate = False


def _setup(msg: Message, context: Context) -> tuple[ClientRuntime, int, PrivateStore]:
    from pf2lora_core.client import runtime_for
    from pf2lora_core.state import PrivateStore

    _setup_logging()
    config = msg.content["config"]
    runtime = runtime_for(str(config[CONFIG_YAML_KEY]))
    client = _client_id(context, runtime.exp.federation.num_clients)
    root = str(context.node_config.get(STATE_DIR_NODE_KEY, runtime.exp.federation.state_dir))
    return runtime, client, PrivateStore(root, str(config[RUN_KEY]), client)


def _client_id(context: Context, num_clients: int) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError(
            "node config lacks 'partition-id'; start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"'
        )
    client = int(context.node_config["partition-id"])
    declared = int(context.node_config.get("num-partitions", num_clients))
    if declared != num_clients or not 0 <= client < num_clients:
        raise ValueError(
            f"partition-id={client}, num-partitions={declared} do not fit federation.num_clients={num_clients}; "
            "make the federation's num-supernodes equal federation.num_clients"
        )
    return client


def _private(
    context: Context, store: PrivateStore, before_round: int, msg: Message, required: bool
) -> PrivateState | None:
    """This client's private level of the newest round < ``before_round``.

    context.state first (same process lifetime), else disk (a restarted SuperNode, a resumed run),
    else None (fresh init). ``required`` (the algorithm has a private level): when the server says
    this client's reply was aggregated in an earlier round, a missing level is an error unless
    the node config allows a fresh start.
    """
    from pf2lora_core.state import ROUND_META, STEPS_META, PrivateState, tensor_digest

    if PRIVATE_STATE_KEY in context.state.array_records:
        meta = context.state[PRIVATE_META_KEY]
        if int(meta[ROUND_META]) < before_round:
            return PrivateState(
                tensors=context.state[PRIVATE_STATE_KEY].to_torch_state_dict(),
                round=int(meta[ROUND_META]),
                steps_total=int(meta[STEPS_META]),
            )
    trained_before = int(msg.content["config"].get(TRAINED_BEFORE_KEY, 0)) if required else 0
    allow = str(context.node_config.get(ALLOW_FRESH_NODE_KEY, "false")).lower() in ("1", "true", "yes")
    state = store.load_required(before_round, trained_before, allow)
    if state is not None:
        log.info(
            "client %s: private adapter of round %d restored from %s (digest %s)",
            store.dir.name.removeprefix("client_"), state.round, store.dir, tensor_digest(state.tensors),
        )  # fmt: skip
    return state


def _keep_private(context: Context, store: PrivateStore, state: PrivateState) -> None:
    """Mirror the private level to context.state and (atomically) to disk."""
    from pf2lora_core.state import ROUND_META, STEPS_META

    context.state[PRIVATE_STATE_KEY] = ArrayRecord(state.tensors)
    context.state[PRIVATE_META_KEY] = ConfigRecord({ROUND_META: state.round, STEPS_META: state.steps_total})
    store.save(state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pf2lora_core.state import PrivateState

    runtime, client, store = _setup(msg, context)
    server_round = int(msg.content["config"][SERVER_ROUND_KEY])
    common = msg.content[ARRAYS_KEY].to_torch_state_dict()
    previous = _private(context, store, server_round, msg, runtime.has_private)
    out = runtime.train(client, server_round, common, previous.tensors if previous else None)
    if out.private:
        steps = (previous.steps_total if previous else 0) + runtime.exp.local_steps
        _keep_private(context, store, PrivateState(out.private, server_round, steps))
    metrics = {CLIENT_KEY: client, NUM_EXAMPLES: out.num_examples, **out.metrics}
    content = RecordDict({ARRAYS_KEY: ArrayRecord(out.common), METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Identify this node: its partition id (the server maps node ids to clients when they connect).

    Reads only ``federation.num_clients`` of the resolved config (no torch import: this is cheap).
    """
    from omegaconf import OmegaConf

    num_clients = int(OmegaConf.create(str(msg.content["config"][CONFIG_YAML_KEY])).federation.num_clients)
    client = _client_id(context, num_clients)
    return Message(content=RecordDict({METRICS_KEY: MetricRecord({CLIENT_KEY: client})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    runtime, client, store = _setup(msg, context)
    common = msg.content[ARRAYS_KEY].to_torch_state_dict()
    # evaluation of round r uses the private level round r's training produced
    private = _private(context, store, int(msg.content["config"][SERVER_ROUND_KEY]) + 1, msg, runtime.has_private)
    out = runtime.evaluate(client, common, private.tensors if private else None)
    metrics = flatten_eval(client, out.num_examples, {PERSONALIZED: out.personalized, GLOBAL: out.global_})
    metrics[COMPUTE_SECONDS] = out.seconds
    details = ConfigRecord({DETAILS_KEY: encode_details({"rank": out.rank})})
    content = RecordDict({METRICS_KEY: MetricRecord(metrics), DETAILS_KEY: details})
    return Message(content=content, reply_to=msg)
