"""A site's node policy against the real ClientApp handlers, in one process (no Flower runtime).

Every malicious request is refused on the client before any file outside the policy is opened
(an audit hook records every ``open``), and nothing the server receives carries the planted secret.
The in-process deployment at the end runs the real ServerApp code with three sites, each on its own
file, and a server config that names no data at all.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from pf2lora_core.config.experiment import Experiment, load
from pf2lora_core.config.keys import ARRAYS_KEY, COMMON, NUM_EXAMPLES
from pf2lora_core.federation import node_policy as P
from pf2lora_core.federation.client_runtime import build_model
from pf2lora_core.federation.protocol import CONFIG_YAML_KEY, DETAILS_KEY, RUN_KEY
from pf2lora_core.run.run_dir import RunDir, new_run_dir
from tests.helpers.sites import LABELS, MIXES, split_sizes, write_site
from tests.helpers.tiny_bert import make_tiny_bert

SECRET = "s3cr3t-HOSPITAL-4711"
OPENED: list[str] = []
WATCHING: list[bool] = [False]


def _audit(event: str, args: tuple) -> None:
    if WATCHING[0] and event == "open" and args and isinstance(args[0], (str, bytes, Path)):
        OPENED.append(str(args[0]))


sys.addaudithook(_audit)  # a hook cannot be removed: it records only while WATCHING


@pytest.fixture(autouse=True)
def flower_task_identity() -> Iterator[None]:
    """Flower builds Messages only inside a run; give this process one for the test."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 42, 1, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@dataclass
class Setup:
    tmp: Path
    model: Path
    sites: list[Path]

    def node_config(self, k: int, **extra: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "partition-id": k, "num-partitions": 3, P.DATA_PATH: str(self.sites[k]),
            P.STATE_DIR: str(self.tmp / f"state_{k}"), P.ALLOW_MODELS: str(self.model),
            P.MAX_LOCAL_STEPS: 5, P.MAX_LENGTH: 64, P.MAX_EXAMPLES_PER_ROUND: 40, P.MAX_NEW_TOKENS: 32,
        }  # fmt: skip
        cfg.update(extra)
        return {k: v for k, v in cfg.items() if v is not None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("policy")
    sites = [write_site(tmp / f"site_{k}.csv", mix, k) for k, mix in enumerate(MIXES)]
    return Setup(tmp, make_tiny_bert(tmp / "tiny-bert"), sites)


def server_exp(setup: Setup, extra: str = "") -> Experiment:
    """What a server composes in deployment: task=files with no data, the label set from config."""
    return load(
        f"federation=deployment federation.connection=x federation.num_clients=3 federation.min_train_clients=1 "
        f"task=files task.label_names=[{','.join(LABELS)}] model.source=path model.name={setup.model} "
        f"rounds=1 local_steps=2 task.batch_size=4 task.eval_batch_size=16 task.max_length=16 flops_rounds=0 "
        f"task.test_fraction=0.25 task.val_fraction=0.25 {extra}"
    )


def message(config_yaml: str, kind: str = MessageType.TRAIN, common: dict | None = None) -> Message:
    config = ConfigRecord({CONFIG_YAML_KEY: config_yaml, RUN_KEY: "run", "server-round": 1})
    content = RecordDict({"config": config, ARRAYS_KEY: ArrayRecord(common or {})})
    msg = Message(content=content, dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def context(node_config: dict[str, Any], node: int = 7) -> Context:
    return Context(run_id=42, node_id=node, node_config=node_config, state=RecordDict(), run_config={})


def edited(exp: Experiment, **changes: Any) -> str:
    """The server's config with dotted keys changed (what a malicious or careless server sends)."""
    cfg = OmegaConf.create(exp.to_yaml())
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return OmegaConf.to_yaml(cfg)


def received(reply: Message) -> str:
    """Everything the server gets back from a reply, as text."""
    parts = [repr(reply.error.code), str(reply.error.reason)] if reply.has_error() else []
    if reply.has_content():
        for name, record in reply.content.items():
            parts.append(name)
            if isinstance(record, ArrayRecord):
                parts += list(record)
            else:
                parts += [f"{k}={v}" for k, v in record.items()]
    return "\n".join(parts)


def call(msg: Message, ctx: Context) -> tuple[Message, list[str]]:
    from client_app.app import app as client_app

    OPENED.clear()
    WATCHING[0] = True
    try:
        reply = client_app(msg, ctx)
    finally:
        WATCHING[0] = False
    return reply, list(OPENED)


def assert_refused(reply: Message, rule: str, opened: list[str], forbidden: Iterable[Path]) -> None:
    assert reply.has_error(), received(reply)
    assert reply.error.code == P.POLICY_REFUSED and f"[{rule}]" in reply.error.reason, reply.error.reason
    assert SECRET not in received(reply)
    for path in forbidden:
        assert not any(str(path) in o for o in opened), (path, opened)
    assert not any(o.endswith((".csv", ".safetensors", ".json")) for o in opened), opened  # no work started


# ------------------------------------------------------------------------------------ one rule each
@pytest.fixture(scope="module")
def secrets(setup: Setup) -> dict[str, Path]:
    """Files and directories outside the policy, each holding the secret."""
    evil = setup.tmp / "evil"
    evil.mkdir(exist_ok=True)
    data = evil / "patients.csv"
    data.write_text(f"text,label\n{SECRET},pos\n")
    model = evil / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "secret": SECRET}))
    return {"data": data, "model": model, "cache": evil / "cache"}


def test_model_path_outside_the_allow_list_is_refused(setup: Setup, secrets: dict[str, Path]) -> None:
    msg = message(edited(server_exp(setup), model__name=str(secrets["model"])))
    reply, opened = call(msg, context(setup.node_config(0)))
    assert_refused(reply, "allow-models", opened, [secrets["model"]])


def test_model_with_another_hash_is_refused(setup: Setup) -> None:
    allow = f"{setup.model}{P.HASH_MARK}{'0' * 64}"
    reply, _ = call(message(server_exp(setup).to_yaml()), context(setup.node_config(0, **{P.ALLOW_MODELS: allow})))
    assert reply.has_error() and "[model-hash]" in reply.error.reason, received(reply)


def test_unpinned_hub_model_is_refused(setup: Setup) -> None:
    msg = message(edited(server_exp(setup), model__source="hub", model__name="bert-base-uncased"))
    reply, opened = call(msg, context(setup.node_config(0, **{P.ALLOW_MODELS: "bert-base-uncased"})))
    assert_refused(reply, "model-revision", opened, [])


def test_cache_dir_chosen_by_the_server_is_refused(setup: Setup, secrets: dict[str, Path]) -> None:
    msg = message(edited(server_exp(setup), model__cache_dir=str(secrets["cache"])))
    reply, opened = call(msg, context(setup.node_config(0)))
    assert_refused(reply, "cache-dir", opened, [secrets["cache"]])
    assert not secrets["cache"].exists()


def test_head_module_outside_policy_is_refused(setup: Setup) -> None:
    msg = message(edited(server_exp(setup), model__head_modules=["word_embeddings"]))
    reply, opened = call(msg, context(setup.node_config(0)))
    assert_refused(reply, "trainable-modules", opened, [])


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"local_steps": 6}, P.MAX_LOCAL_STEPS),
        ({"task__max_length": 65}, P.MAX_LENGTH),
        ({"task__batch_size": 21}, P.MAX_EXAMPLES_PER_ROUND),  # 2 steps x 21 > 40
        ({"task__kind": "causal_lm", "generation__max_new_tokens": 33}, P.MAX_NEW_TOKENS),
    ],
)
def test_caps_are_enforced(setup: Setup, changes: dict[str, Any], rule: str) -> None:
    reply, opened = call(message(edited(server_exp(setup), **changes)), context(setup.node_config(0)))
    assert_refused(reply, rule, opened, [])


REFUSED_INTERPOLATION = "config rejected [interpolation]: interpolation in the value at 'task.name'"


@pytest.mark.parametrize(
    "value",
    [
        "${oc.env:HOSPITAL_DB_PASSWORD}",
        '"\\u0024{oc.env:HOSPITAL_DB_PASSWORD}"',  # YAML escapes: the same string once parsed
        '"\\x24{oc.env:HOSPITAL_DB_PASSWORD}"',
        '"$\\\n    {oc.env:HOSPITAL_DB_PASSWORD}"',  # an escaped line break joins the lines
    ],
)
def test_interpolation_is_refused_unresolved(setup: Setup, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("HOSPITAL_DB_PASSWORD", SECRET)
    text = server_exp(setup).to_yaml().replace("name: files", f"name: {value}", 1)
    assert "${" in str(yaml.safe_load(text)["task"]["name"])
    for kind in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY):
        reply, opened = call(message(text, kind), context(setup.node_config(0)))
        assert_refused(reply, "interpolation", opened, [])
        assert reply.error.reason.startswith(REFUSED_INTERPOLATION), reply.error.reason


def test_a_query_answers_a_malformed_config_in_fixed_words(setup: Setup) -> None:
    """What a QUERY's reply says never depends on the client's environment or an exception's text."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
    )
    for text, rule in (("task: {name: files", "yaml"), (bomb, "alias"), ("a: !!python/name:os.system x", "tag")):
        reply, _ = call(message(text, MessageType.QUERY), context(setup.node_config(0)))
        assert reply.error.code == P.POLICY_REFUSED and reply.error.reason.startswith(f"config rejected [{rule}]: ")
        assert "Error" not in reply.error.reason and "os.system" not in reply.error.reason


def test_site_without_state_dir_refuses_and_says_how(setup: Setup) -> None:
    reply, opened = call(message(server_exp(setup).to_yaml()), context(setup.node_config(0, **{P.STATE_DIR: None})))
    assert_refused(reply, "state-dir", opened, [])
    assert "--node-config" in reply.error.reason and P.STATE_DIR in reply.error.reason


def test_deployment_node_without_data_path_never_reads_the_servers(setup: Setup, secrets: dict[str, Path]) -> None:
    """The server names data; a node with no data-path of its own refuses (and never opens it)."""
    msg = message(edited(server_exp(setup), task__data_files={"train": str(secrets["data"])}))
    reply, opened = call(msg, context(setup.node_config(0, **{P.DATA_PATH: None})))
    assert_refused(reply, "data-path", opened, [secrets["data"]])


def test_unknown_node_config_key_is_refused(setup: Setup) -> None:
    reply, _ = call(message(server_exp(setup).to_yaml()), context(setup.node_config(0, state_dir="/x")))
    assert reply.has_error() and "[node-config]" in reply.error.reason


def test_a_clients_own_error_reaches_the_server_without_data(setup: Setup) -> None:
    """A missing column: the local error lists the site's columns (one named like the secret); the reply does not."""
    site = write_site(setup.tmp / "site_secret_columns.csv", MIXES[0], 0, extra_column=SECRET)
    exp = server_exp(setup)
    msg = message(edited(exp, task__text_columns=["no_such_column"]), common=initial_common(exp))
    reply, _ = call(msg, context(setup.node_config(0, **{P.DATA_PATH: str(site)})))
    assert reply.has_error() and reply.error.code == P.CLIENT_FAILED, received(reply)
    assert reply.error.reason == "the client failed on train; the details are in that SuperNode's log"
    assert SECRET not in received(reply) and "no_such_column" not in received(reply)


def initial_common(exp: Experiment) -> dict:
    model, _ = build_model(exp, device=__import__("torch").device("cpu"))
    return model.export(COMMON)


def test_servers_data_path_is_ignored_and_the_site_trains_on_its_own(
    setup: Setup, secrets: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    exp = server_exp(setup)
    msg = message(edited(exp, task__data_files={"train": str(secrets["data"])}), common=initial_common(exp))
    reply, opened = call(msg, context(setup.node_config(1)))
    assert not reply.has_error(), reply.error.reason
    assert not any(str(secrets["data"]) in o for o in opened)
    assert any(str(setup.sites[1]) in o for o in opened)  # its own file
    assert SECRET not in received(reply)
    n = sum(MIXES[1])
    n_train = n - round(0.25 * n) - round(exp.task.val_fraction * n)  # test, then validation, carved out
    assert reply.content["metrics"][NUM_EXAMPLES] == P.NodePolicy(site=True).reported_count(n_train)
    assert all(P.LORA_MARK in k or ".classifier." in f".{k}" for k in reply.content[ARRAYS_KEY])


def test_diagnostics_leave_only_when_the_node_opts_in(setup: Setup) -> None:
    exp = server_exp(setup)
    common = initial_common(exp)
    for opt_in in (False, True):
        extra = {P.SHARE_DATA_STATS: opt_in, P.SHARE_SPECTRA: opt_in}
        reply, _ = call(message(exp.to_yaml(), MessageType.EVALUATE, common), context(setup.node_config(2, **extra)))
        assert not reply.has_error(), reply.error.reason
        details = json.loads(reply.content[DETAILS_KEY][DETAILS_KEY])
        spectra = [m.get("singular_values") for m in details["rank"]["modules"].values()]
        n_test = round(0.25 * sum(MIXES[2]))
        if opt_in:
            assert all(spectra) and sum(details[P.LABEL_HISTOGRAM]["test"]) == n_test
            assert reply.content["metrics"][NUM_EXAMPLES] == n_test
        else:
            assert not any(spectra) and P.LABEL_HISTOGRAM not in details
            assert reply.content["metrics"][NUM_EXAMPLES] == P.NodePolicy(site=True).reported_count(n_test)


def test_uplink_outside_lora_and_head_is_refused() -> None:
    policy = P.NodePolicy(site=True)
    P.check_uplink(policy, ["a.query.lora_A.weight", "base_model.model.classifier.weight"], ["classifier"])
    with pytest.raises(P.PolicyError, match="trainable-modules"):
        P.check_uplink(policy, ["bert.embeddings.word_embeddings.weight"], ["classifier"])


def test_coarse_counts() -> None:
    policy = P.NodePolicy(site=True)
    assert [policy.reported_count(n) for n in (3, 17, 123, 4567)] == [10, 17, 120, 4600]
    assert P.NodePolicy(site=True, share_data_stats=True).reported_count(123) == 123


# ------------------------------------------------------------- the whole deployment, in one process
@dataclass
class SiteGrid:
    """Flower's grid in one process: every node a ``Context`` with its own node config, the real ClientApp."""

    contexts: dict[int, Context]
    received: list[str]

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from client_app.app import app as client_app

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            self.received.append(received(reply))
            replies.append(reply)
        return replies


def test_in_process_deployment_each_site_on_its_own_file(setup: Setup, tmp_path: Path) -> None:
    """Three sites, each on its own file with its own label mix; the server names no data at all."""
    from server_app.app import run_experiment

    exp = server_exp(setup, f"run_dir={tmp_path / 'run'} federation.fraction_evaluate=1.0")
    assert not exp.task.data_files
    share = {P.SHARE_DATA_STATS: True}
    grid = SiteGrid({100 + k: context(setup.node_config(k, **share), 100 + k) for k in range(3)}, [])
    summary = run_experiment(grid, exp, RunDir(new_run_dir("", "", str(tmp_path / "run"))))
    for k, client in enumerate(summary.to_json()["clients"]):
        hists = split_sizes(MIXES[k])  # stratified: each label gives its share
        assert client["label_histogram"] == hists, (k, client)
        assert client["num_train"] == sum(hists["train"]) and client["num_test"] == sum(hists["test"])
    assert SECRET not in "".join(grid.received)


def test_hub_revision_must_match_the_pinned_one(setup: Setup) -> None:
    hub = {"model__source": "hub", "model__name": "org/bert", "model__revision": "abc"}
    cfg = OmegaConf.create(edited(server_exp(setup), **hub))
    pinned = P.NodePolicy.from_node_config(setup.node_config(0, **{P.ALLOW_MODELS: "org/bert@abc"}))
    P.check_request(pinned, cfg)  # the pinned revision: allowed
    other = P.NodePolicy.from_node_config(setup.node_config(0, **{P.ALLOW_MODELS: "org/bert@def"}))
    with pytest.raises(P.PolicyError, match="model-revision"):
        P.check_request(other, cfg)


def test_simulated_partitions_keep_the_pooled_path() -> None:
    """No policy key and a simulation run: nothing is localized (today's pooled-and-partitioned data)."""
    policy = P.NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2})
    cfg = OmegaConf.create({"federation": {"kind": "simulation"}, "task": {"data_files": {"train": "x.csv"}}})
    assert not P.is_site(policy, cfg)
    assert P.localize(policy, cfg) == (cfg, [])
