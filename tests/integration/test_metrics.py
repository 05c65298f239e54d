"""
The Prometheus metrics file on a real master ("mx") and two real minions:
after a deploy, a failing deploy and a rollback, the file the master wrote
(``release:metrics_file``) parses with prometheus_client, its counters say
what happened, each node's release is the one its ``current`` link names,
the file is replaced atomically, and a pillar canary secret and the failed
run's error text appear nowhere in it. Then the master restarts and a fresh
runner process, reading the same store, writes the same counters.

The last test restarts the master: keep it last.
"""

import os
import textwrap
import threading
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import _release_metrics as metrics
import _release_store as store
import release_settings as settings
from tests.conftest import make_file_root, project_config, start_cluster
from tests.integration.postgres import postgres_cluster

NODES = ("mx-web1", "mx-web2")
CANARY = "CANARY-" + uuid.uuid4().hex
PILLAR = textwrap.dedent(
    """\
    {% set node = grains['id'] %}
    release:
      rainbow:
        deploy_to: {{ nodes_root }}/{{ node }}/rainbow
        user: {{ app_user }}
        shared: [storage, logs]
        keep_releases: 5
        secrets:
          db_password: CANARY_VALUE
    """
).replace("CANARY_VALUE", CANARY)
LAST_FAMILY = "# TYPE salt_release_env_release_info gauge"


@pytest.fixture(scope="module")
def mx(salt_factories, app_repo, tmp_path_factory):
    nodes_root = tmp_path_factory.mktemp("mxnodes")
    file_root = make_file_root(str(tmp_path_factory.mktemp("mxfiles") / "base"))
    textfile_dir = tmp_path_factory.mktemp("textfile")
    release_config = {
        "artifact_root": os.path.join(file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("mxstate")),
        "metrics_file": str(textfile_dir / "salt_release.prom"),
        "projects": {"rainbow": project_config(app_repo.path, environments={
            "test": {"target": "mx-web*", "batch": 1}, "idle": {"target": "mx-web1"}})},
    }
    with start_cluster(salt_factories, "mx", file_root, release_config, PILLAR, str(nodes_root),
                       minion_ids=NODES) as cluster:
        yield cluster


def metrics_file(cluster):
    return cluster.release_config["metrics_file"]


def read(cluster):
    with open(metrics_file(cluster), encoding="utf-8") as handle:
        return handle.read()


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(parsed, family, sample_name=None, **labels):
    found = [s.value for s in parsed[family].samples if sample_name in (None, s.name)
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (family, labels, parsed[family].samples)
    return found[0]


def counters(text):
    """Every counter and histogram sample of the text: what must survive a restart."""
    parsed = families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parsed.values()
            if f.type in ("counter", "histogram") for s in f.samples}


def current(cluster, minion):
    return os.path.basename(os.readlink(os.path.join(cluster.deploy_to(minion), "current")))


def test_no_run_no_file(mx):
    assert not os.path.exists(metrics_file(mx))


def test_deploy_failure_and_rollback_are_counted(mx):
    result, first = mx.run("release.deploy", "rainbow", "env=test", "ref=v1.0.0")
    assert result.returncode == 0 and first["result"], first
    parsed = families(read(mx))
    assert value(parsed, "salt_release_deploys", env="test") == 1
    assert value(parsed, "salt_release_deploy_failures", env="test") == 0

    result, failed = mx.run("release.deploy", "rainbow", "env=test", "ref=no-such-ref-anywhere")
    assert result.returncode != 0 and not failed["result"], failed
    result, second = mx.run("release.deploy", "rainbow", "env=test", "ref=v1.1.0")
    assert result.returncode == 0 and second["result"], second

    old_text, old_inode = read(mx), os.stat(metrics_file(mx)).st_ino
    with open(metrics_file(mx), encoding="utf-8") as old_handle:
        seen = Watcher(mx)
        result, back = mx.run("release.rollback", "rainbow", "env=test")
        seen.stop()
        assert result.returncode == 0 and back["result"], back
        # Replaced by rename: a new inode, and the old one still holds its whole text.
        assert os.stat(metrics_file(mx)).st_ino != old_inode
        assert old_handle.read() == old_text
    assert seen.count > 10 and all(text.endswith("\n") and LAST_FAMILY in text for text in seen.reads), seen.reads

    text = read(mx)
    parsed = families(text)
    assert value(parsed, "salt_release_deploys", env="test") == 3
    assert value(parsed, "salt_release_deploy_failures", env="test") == 1
    assert value(parsed, "salt_release_rollbacks", env="test", kind="normal") == 1
    assert value(parsed, "salt_release_rollbacks", env="test", kind="emergency") == 0
    assert value(parsed, "salt_release_deploy_duration_seconds", "salt_release_deploy_duration_seconds_count",
                 env="test") == 3
    assert value(parsed, "salt_release_lock_held", env="test") == 0
    assert value(parsed, "salt_release_deploys", env="idle") == 0
    # MTTR: the failed deploy was followed by a good one.
    assert value(parsed, "salt_release_mttr_seconds", env="test") > 0
    # What the nodes run, judged by their current links.
    assert {s.labels["minion"]: s.labels["release"] for s in parsed["salt_release_node_release_info"].samples} == {
        m: current(mx, m) for m in NODES}
    assert {current(mx, m) for m in NODES} == {first["release"]}
    assert [s.labels["release"] for s in parsed["salt_release_env_release_info"].samples] == [first["release"]]
    assert CANARY not in text and failed["error"] not in text and "no-such-ref-anywhere" not in text


def test_the_command_writes_where_it_is_told(mx, tmp_path):
    out = tmp_path / "now.prom"
    result, ret = mx.run("release.metrics", f"out={out}")
    assert result.returncode == 0 and ret["file"] == str(out)
    assert counters(out.read_text()) == counters(read(mx))


def test_a_postgresql_store_gives_the_same_metrics(tmp_path):
    """Masters sharing a PostgreSQL store write the figures SQLite would, lock included."""
    conf = settings.master({"release": {"artifact_root": "/srv/salt/releases", "projects": {
        "rainbow": {"repo": "/git/rainbow", "environments": {"pro": {"target": "web*"}}}}}})
    with postgres_cluster() as url:
        texts = []
        for backend in ("sqlite", url):
            db = store.Store(str(tmp_path / "state"), backend)
            for kind, result, nodes, details in (
                ("deploy", True, {"web1": {"release": "r1"}}, {}),
                ("deploy", False, {"web1": {"release": "r1", "rolled_back": True}}, {}),
                ("rollback", True, {"web1": {"release": "r0"}}, {"emergency": True}),
            ):
                run_id = db.start_run(kind, "rainbow", "pro")
                db.finish_run(run_id, result, 42.0, "boom", dict(details, nodes=nodes))
            owner = db.locks().acquire("rainbow", "pro", "alice", "j1", "deploy")
            texts.append(metrics.exposition(conf, db))
            db.locks().release("rainbow", "pro", owner["token"])
    sqlite_text, pg_text = texts
    assert counters(pg_text) == counters(sqlite_text) and counters(pg_text)
    parsed = families(pg_text)
    assert value(parsed, "salt_release_lock_held", env="pro") == 1
    assert value(parsed, "salt_release_rollbacks", kind="emergency") == 1
    assert value(parsed, "salt_release_rollbacks", kind="auto") == 1
    assert value(parsed, "salt_release_node_release_info", minion="web1") == 1
    assert "boom" not in pg_text


def test_counters_survive_a_master_restart(mx):
    before = read(mx)
    mx.master.terminate()
    mx.master.start(start_timeout=120)
    os.unlink(metrics_file(mx))
    result, ret = mx.run("release.metrics")
    assert result.returncode == 0 and ret["result"], ret
    after = read(mx)
    assert ret["metrics"] == after
    assert counters(after) == counters(before) and counters(after)
    assert CANARY not in after


class Watcher:
    """Read the metrics file over and over in a thread while a run writes it; keeps each distinct text read."""

    def __init__(self, cluster):
        self.path, self.reads, self.done = metrics_file(cluster), set(), threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.done.is_set():
            with open(self.path, encoding="utf-8") as handle:
                self.reads.add(handle.read())
            self.count += 1

    def stop(self):
        self.done.set()
        self.thread.join()
