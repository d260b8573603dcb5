"""ClientApp: thin glue between Flower messages and ``pf2lora_core.federation.client_runtime.ClientRuntime``.

The private level lives in ``context.state`` (fast, within a run) and is mirrored to disk
(``PrivateStore``, atomic) so that a restarted process resumes from its last completed round. In
deployment the SuperNode's node config ``state-dir`` puts it on that machine's own disk.
A round always starts from the private level of the newest round *before* it: a round run again
after a server resume does not build on what its first attempt produced.

torch, transformers and peft are imported only by the train / evaluate handlers: in deployment
every message starts a fresh ClientApp process, and the identity query must not pay seconds of
imports on every node.

The received config is the server's *request*. Before any work it is checked against this node's
own policy (``pf2lora_core.federation.node_policy``, from the node config): the text is read as
bounded, plain data (``pf2lora_core.federation.received_config``: no alias, tag or interpolation,
nothing resolved), a request outside policy is refused naming the rule, and on a site the data,
state and cache directories are the node's, never the server's. Every handler catches its own
errors: details go to this SuperNode's log only; the reply carries an error code and words chosen
by this code, never an exception's type or text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pf2lora_core.config.keys import (
    ARRAYS_KEY,
    COMPUTE_SECONDS,
    FLOPS_PER_CLIENT_EVALUATION,
    METRICS_KEY,
    NUM_EXAMPLES,
    NUM_VALIDATION,
    PRIVATE_META_KEY,
    PRIVATE_STATE_KEY,
    REFIT_BASE_META,
    REFIT_COMMON_META,
    REFIT_META_KEY,
    REFIT_STATE_KEY,
)
from pf2lora_core.federation.availability import CLIENT_UNAVAILABLE, UNAVAILABLE_REASON, drops_out
from pf2lora_core.federation.node_policy import (
    ALLOW_FRESH_PRIVATE,
    CLIENT_FAILED,
    LABEL_HISTOGRAM,
    POLICY_REFUSED,
    STATE_DIR,
    NodePolicy,
    PolicyError,
    check_request,
    check_uplink,
    is_site,
    localize,
)
from pf2lora_core.federation.protocol import (
    CLIENT_KEY,
    CONFIG_YAML_KEY,
    DETAILS_KEY,
    RUN_KEY,
    TRAINED_BEFORE_KEY,
    encode_details,
    flatten_eval,
)
from pf2lora_core.federation.received_config import parse_received_config
from pf2lora_core.run.console import quiet_libraries, stream_handler

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from pf2lora_core.federation.client_runtime import ClientRuntime
    from pf2lora_core.federation.private_store import PrivateState, PrivateStore

app = ClientApp()
log = logging.getLogger("pf2lora.client")
STATE_DIR_NODE_KEY = STATE_DIR  # node config: where this SuperNode keeps private adapters
ALLOW_FRESH_NODE_KEY = ALLOW_FRESH_PRIVATE  # node config: a lost private level may start afresh
SERVER_ROUND_KEY = "server-round"  # set by the server in every train / evaluate config
# the whole reason a failed client gives; which handler failed is the only variable part
FAILED_REASON = "the client failed on {handler}; the details are in that SuperNode's log"
OOM_REASON = (
    "the client ran out of GPU memory on {handler} (its cache is freed); lower task.batch_size or "
    "task.max_length, or give each client more of a GPU (a larger federation.client_gpus: fewer "
    "clients share one)"
)


def _out_of_memory(err: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")  # no torch imported: it cannot be torch's out-of-memory error
    return torch is not None and isinstance(err, torch.OutOfMemoryError)


# A Ray worker (or the in-process engine) serves many nodes the same config text: every node's
# identity query at round 1, and two reads per train message. Parsing it costs about 15 ms, so
# without a cache the identity queries alone cost 15 ms x the federation's size. Keyed by the
# exact text; a refused text raises and is never cached; a few entries cover a run and a resume.
RECEIVED_CACHE_SIZE = 4


def _setup_logging() -> None:
    if not log.handlers:  # to the SuperNode's stderr as it is at each record, not as it was at import
        log.addHandler(stream_handler("stderr", "%(asctime)s pf2lora-client %(levelname)s %(message)s"))
        log.setLevel(logging.INFO)
        log.propagate = False
        quiet_libraries()


def guarded(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run a handler; a failure is logged here in full and answered with a code and a data-free reason.

    Flower would send ``str(exception)`` to the server, and exception messages may quote data
    (a column name, a label value, an environment variable resolved into the config). Even an
    exception's type says something (a KeyError vs a ValueError tells whether a key parsed), so
    the reply carries a ``PolicyError``'s own text (composed by our code) or fixed words.
    """

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        _setup_logging()
        oom = False
        try:
            return handler(msg, context)
        except PolicyError as err:  # our own text: rule names, numbers, the server's own key paths
            cause = f" ({type(err.__cause__).__name__}: {err.__cause__})" if err.__cause__ else ""
            log.warning("%s%s", err, cause)  # the parser's detail stays in this log
            return Message(Error(code=POLICY_REFUSED, reason=str(err)), reply_to=msg)
        except Exception as err:
            log.exception("client failed on %s", msg.metadata.message_type)
            oom = _out_of_memory(err)
        # out of the except block: the traceback's frames (the failed step's tensors) are released
        if oom:  # freed now, or the next round on this node fails the same way
            from pf2lora_core.training.runtime import free_device_memory

            free_device_memory()
            return Message(Error(code=CLIENT_FAILED, reason=OOM_REASON.format(handler=handler.__name__)), reply_to=msg)
        return Message(Error(code=CLIENT_FAILED, reason=FAILED_REASON.format(handler=handler.__name__)), reply_to=msg)

    return run


def request(msg: Message, context: Context) -> tuple[NodePolicy, str, bool]:
    """This node's policy, the request checked against it and localized (as YAML), and whether this is a site.

    Nothing here opens a file: the text is parsed as data (no interpolation), compared with the
    policy, and the node's own data / state / cache paths are put in place of the server's.
    """
    from omegaconf import OmegaConf

    policy = NodePolicy.from_node_config(context.node_config)
    cfg = received(msg)
    check_request(policy, cfg)
    local, ignored = localize(policy, cfg)
    if ignored:
        log.info("site data: training on this node's data-path only; the server's %s ignored", ", ".join(ignored))
    return policy, OmegaConf.to_yaml(local), is_site(policy, cfg)


def received(msg: Message) -> DictConfig:
    """The server's config of this message as plain data (``ConfigRejectedError`` names what is wrong with it).

    Read-only and shared: parsed once per process and text (``RECEIVED_CACHE_SIZE``); ``localize``
    copies it before anything changes.
    """
    return _parsed(str(msg.content["config"][CONFIG_YAML_KEY]))


@functools.lru_cache(maxsize=RECEIVED_CACHE_SIZE)
def _parsed(text: str) -> DictConfig:
    from omegaconf import OmegaConf

    cfg = parse_received_config(text)
    OmegaConf.set_readonly(cfg, True)  # shared by every message with this text: nobody may change it
    return cfg


def _setup(msg: Message, context: Context) -> tuple[ClientRuntime, int, PrivateStore, NodePolicy, bool]:
    from pf2lora_core.federation.client_runtime import runtime_for
    from pf2lora_core.federation.private_store import PrivateStore

    policy, config_yaml, site = request(msg, context)
    runtime = runtime_for(config_yaml)
    client = _client_id(context, runtime.exp.federation.num_clients)
    root = str(context.node_config.get(STATE_DIR_NODE_KEY, runtime.exp.federation.state_dir))
    return runtime, client, PrivateStore(root, str(msg.content["config"][RUN_KEY]), client), policy, site


def _client_id(context: Context, num_clients: int) -> int:
    if "partition-id" not in context.node_config:
        raise PolicyError(
            "node-config",
            "node config lacks 'partition-id'; start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"',
        )
    client = int(context.node_config["partition-id"])
    declared = int(context.node_config.get("num-partitions", num_clients))
    if declared != num_clients or not 0 <= client < num_clients:
        raise PolicyError(
            "node-config",
            f"partition-id={client}, num-partitions={declared} do not fit federation.num_clients={num_clients}; "
            "make the federation's num-supernodes equal federation.num_clients",
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
    from pf2lora_core.federation.private_store import ROUND_META, STEPS_META, PrivateState, tensor_digest

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
    """Write the private level (atomically) to disk, then mirror it to context.state.

    Disk first: a refused save (``StaleRoundError``: the disk holds a newer round) raises before
    context.state changes, so the reply is an error and no later round builds on this one.
    """
    from pf2lora_core.federation.private_store import ROUND_META, STEPS_META

    store.save(state)
    context.state[PRIVATE_STATE_KEY] = ArrayRecord(state.tensors)
    context.state[PRIVATE_META_KEY] = ConfigRecord({ROUND_META: state.round, STEPS_META: state.steps_total})


def _refit_key(common: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, str]:
    """What a re-fit was made for: the exact common level, and the private level it started from."""
    from pf2lora_core.federation.private_store import tensor_digest

    return {REFIT_COMMON_META: tensor_digest(common), REFIT_BASE_META: tensor_digest(base) if base else "initial"}


def _keep_refit(context: Context, common: Mapping[str, Any], base: Mapping[str, Any] | None, refit: Mapping) -> None:
    """Keep the private level an evaluation re-fitted to ``common`` (from ``base``) for the next training.

    In ``context.state`` only: a restarted node re-fits again (J passes), to the same tensors
    (``ClientRuntime.refit`` draws from one stream per common level), so nothing differs but the cost.
    """
    context.state[REFIT_STATE_KEY] = ArrayRecord(dict(refit))
    context.state[REFIT_META_KEY] = ConfigRecord(_refit_key(common, base))


def _refit_for(context: Context, common: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict | None:
    """The private level re-fitted to exactly ``common`` from exactly ``base``, if an evaluation made it; else None.

    The evaluation of round r re-fits the private level to the common level round r produced, and
    round r + 1 trains from that same common level: the training starts from that re-fit instead of
    re-fitting again (issue 29: never fit the private level twice to one common adapter). Both
    digests must match bit for bit, so any other common level or private level re-fits as before.
    """
    if REFIT_STATE_KEY not in context.state.array_records or REFIT_META_KEY not in context.state.config_records:
        return None
    meta = context.state[REFIT_META_KEY]
    want = _refit_key(common, base)
    if any(str(meta.get(k, "")) != v for k, v in want.items()):
        return None
    return context.state[REFIT_STATE_KEY].to_torch_state_dict()


def _dropped_out(msg: Message, context: Context) -> Message | None:
    """A simulated drop-out's reply (``federation.dropout_rate``), or None: this client answers the round.

    Decided before anything is loaded or changed: a client that drops out does no work and keeps
    its private level as it was, as one that went offline would.
    """
    cfg = received(msg)
    fed = cfg.federation
    rate = float(fed.get("dropout_rate", 0.0))
    if rate <= 0.0 or fed.get("kind") != "simulation":  # (a deployment's nodes drop out on their own)
        return None
    client = _client_id(context, int(fed.num_clients))
    server_round = int(msg.content["config"][SERVER_ROUND_KEY])
    if not drops_out(int(cfg.seed), client, server_round, rate):
        return None
    log.info("client %d: unavailable for round %d (simulated drop-out, rate %g)", client, server_round, rate)
    return Message(Error(code=CLIENT_UNAVAILABLE, reason=UNAVAILABLE_REASON.format(rate=rate)), reply_to=msg)


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    from pf2lora_core.federation.private_store import PrivateState

    unavailable = _dropped_out(msg, context)
    if unavailable is not None:
        return unavailable
    runtime, client, store, policy, site = _setup(msg, context)
    server_round = int(msg.content["config"][SERVER_ROUND_KEY])
    if runtime.has_private:  # a private level this round could not save (the disk is ahead): refuse before training
        store.check_writable(server_round)
    common = msg.content[ARRAYS_KEY].to_torch_state_dict()
    previous = _private(context, store, server_round, msg, runtime.has_private)
    start = previous.tensors if previous else None
    refit = _refit_for(context, common, start) if runtime.exp.algorithm.refits_private else None
    out = runtime.train(client, server_round, common, start if refit is None else refit, fitted=refit is not None)
    if site:
        check_uplink(policy, out.common, runtime.head_modules)
    if out.private:
        steps = (previous.steps_total if previous else 0) + runtime.exp.local_steps
        _keep_private(context, store, PrivateState(out.private, server_round, steps))
    metrics = {CLIENT_KEY: client, NUM_EXAMPLES: _count(policy, site, out.num_examples), **out.metrics}
    content = RecordDict({ARRAYS_KEY: ArrayRecord(out.common), METRICS_KEY: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
@guarded
def query(msg: Message, context: Context) -> Message:
    """Identify this node: its partition id (the server maps node ids to clients when they connect).

    Reads only ``federation.num_clients`` of the resolved config (no torch import: this is cheap).
    """
    cfg = received(msg)
    NodePolicy.from_node_config(context.node_config)  # a malformed node config fails at once, not in round 1
    num_clients = int(cfg.federation.num_clients)
    client = _client_id(context, num_clients)
    return Message(content=RecordDict({METRICS_KEY: MetricRecord({CLIENT_KEY: client})}), reply_to=msg)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    runtime, client, store, policy, site = _setup(msg, context)
    common = msg.content[ARRAYS_KEY].to_torch_state_dict()
    # evaluation of round r uses the private level round r's training produced
    private = _private(context, store, int(msg.content["config"][SERVER_ROUND_KEY]) + 1, msg, runtime.has_private)
    evaluated_round = int(msg.content["config"][SERVER_ROUND_KEY])
    count = evaluated_round <= int(runtime.exp.cfg.flops_rounds)  # as training counts its first rounds
    out = runtime.evaluate(client, common, private.tensors if private else None, count=count, x_round=evaluated_round)
    if out.private is not None:  # the level as evaluated (re-fitted to this common level): what export writes
        from pf2lora_core.federation.private_store import PrivateState

        store.save_evaluated(PrivateState(out.private, evaluated_round, private.steps_total if private else 0))
        _keep_refit(context, common, private.tensors if private else None, out.private)
    # test and validation, both models
    metrics = flatten_eval(client, _count(policy, site, out.num_examples), out.results())
    metrics[NUM_VALIDATION] = _count(policy, site, out.num_validation)
    metrics[COMPUTE_SECONDS] = out.seconds
    if out.flops is not None:
        metrics[FLOPS_PER_CLIENT_EVALUATION] = out.flops
    details = ConfigRecord({DETAILS_KEY: encode_details(_diagnostics(runtime, client, policy, site, out.rank))})
    content = RecordDict({METRICS_KEY: MetricRecord(metrics), DETAILS_KEY: details})
    return Message(content=content, reply_to=msg)


def _count(policy: NodePolicy, site: bool, n: int) -> int:
    """An example count as it leaves: exact in simulation, coarse on a site unless it shares data stats."""
    return policy.reported_count(n) if site else n


def _diagnostics(runtime: ClientRuntime, client: int, policy: NodePolicy, site: bool, rank: dict) -> dict[str, Any]:
    """What an evaluation reply tells about this client beyond its metrics; on a site, only what it opted in to.

    Per-module singular values (they include the private level) need ``share-spectra``; the label
    histograms of its train / test split need ``share-data-stats``.
    """
    if not site:
        return {"rank": rank}
    if not policy.share_spectra:
        modules = {name: {**m, "singular_values": []} for name, m in rank["modules"].items()}  # shape kept
        rank = {**rank, "modules": modules}
    out: dict[str, Any] = {"rank": rank}
    if policy.share_data_stats:
        split = runtime.split(client)
        out[LABEL_HISTOGRAM] = {
            "train": split.train_label_hist,
            "validation": split.validation_label_hist,
            "test": split.test_label_hist,
        }
    return out
