"""
The ways in besides salt-run, against real daemons: a real salt-api
(rest_cherrypy) with the reactor, the release_fleet ext_pillar and the
release.deployed state on master "m7" with minions m7-web1..2.
"""

import hashlib
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import salt.utils.event
from pytestshellutils.utils.ports import get_unused_localhost_port

import _release_lock as locking
import _release_webhook as hook
from tests.conftest import REPO_ROOT, start_cluster

SECRET = "m7-webhook-secret-do-not-leak"
MINIONS = ("m7-web1", "m7-web2")
PILLAR = """\
release:
  rainbow:
    deploy_to: {{ nodes_root }}/m7/{{ grains['id'] }}/rainbow
    user: {{ app_user }}
    shared: [storage]
"""


@pytest.fixture(scope="module")
def m7_file_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("m7_file_root")
    for folder in ("_modules", "_runners", "_utils", "_states", "_pillar"):
        os.symlink(os.path.join(REPO_ROOT, folder), root / folder)
    os.symlink(os.path.join(REPO_ROOT, "salt", "release"), root / "release")
    (root / "releases").mkdir()
    return str(root)


@pytest.fixture(scope="module")
def m7(salt_factories, app_repo, m7_file_root, nodes_root, tmp_path_factory):
    port = get_unused_localhost_port()
    release = {
        "artifact_root": os.path.join(m7_file_root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("m7_state")),
        "projects": {"rainbow": {
            "repo": app_repo.path, "build": ["make dist"], "checks": ["make test"],
            # production is the flag, never the name: "live" is production, "pro" is not.
            "environments": {"test": {"target": "m7-web*"}, "pro": {"target": "m7-web*"},
                             "live": {"target": "m7-web*", "production": True}},
            "webhook": {"secret": SECRET, "max_body_bytes": 8192},
            "triggers": {"test": {"branches": ["master", "release/*"]}, "pro": {"tags": ["v*"]},
                         "live": {"tags": ["v*"]}},
        }, "bigbody": {
            # A limit above what Salt's bus carries whole: the trimming must be caught.
            "repo": app_repo.path, "environments": {"test": {"target": "m7-web*"}},
            "webhook": {"secret": SECRET, "max_body_bytes": 4 * 1024 * 1024},
            "triggers": {"test": {"branches": ["master"]}},
        }},
    }
    overrides = {
        "rest_cherrypy": {"port": port, "host": "127.0.0.1", "disable_ssl": True, "webhook_disable_auth": True},
        "reactor": [{"salt/netapi/hook/release/*": [
            os.path.join(REPO_ROOT, "salt", "reactor", "release_webhook.sls")]}],
        "external_auth": {"auto": {"ci": ["@runner", "@jobs"]}},
        "netapi_enable_clients": ["runner", "runner_async"],
        "ext_pillar": [{"release_fleet": {}}],
    }
    with start_cluster(salt_factories, "m7", m7_file_root, release, PILLAR, nodes_root,
                       minion_ids=MINIONS, master_overrides=overrides) as cluster:
        api = cluster.master.salt_api_daemon()
        with api.started(start_timeout=120):
            cluster.api_url = f"http://127.0.0.1:{port}"
            yield cluster
            # pytestshellutils' after-stop sweep walks every process on the machine and dies
            # on one that exits mid-walk (NoSuchProcess); the api's own process tree is still
            # terminated, and we check below that nothing listens on the port any more.
            api.listen_ports.clear()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


# ---------------------------------------------------------------- helpers


def post(cluster, path, body, headers):
    request = urllib.request.Request(cluster.api_url + path, body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def hook_call(cluster, body, headers, project="rainbow", timeout_s=180):
    """POST the hook, then wait for the webhook runner's return; returns (return, events seen)."""
    opts = cluster.master.config
    with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as bus:
        status, answer = post(cluster, f"/hook/release/{project}", body, headers)
        assert status == 200 and answer == {"success": True}, (status, answer)
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            event = bus.get_event(wait=5, full=True)
            if not event:
                continue
            seen.append(event)
            data = event["data"]
            if event["tag"].endswith("/ret") and data.get("fun") == "runner.release.webhook":
                return data["return"], seen
    raise AssertionError(f"no webhook runner return within {timeout_s} s")


def github(body, delivery, event="push", secret=SECRET):
    return {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": hook.github_signature(secret, body)}


def push_body(cluster, ref, pusher="alice", **extra):
    """A push of ``ref`` as the sender writes it: ``after`` is what the ref names now."""
    return json.dumps(dict({"ref": ref, "after": ref_id(cluster, ref), "pusher": {"name": pusher}},
                           **extra)).encode()


def ref_id(cluster, ref):
    return git_out(cluster.release_config["projects"]["rainbow"]["repo"], "rev-parse", ref)


def git_out(repo, *args):
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout.strip()


def current(cluster, minion):
    link = os.path.join(cluster.nodes_root, "m7", minion, "rainbow", "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def rows(cluster, query, *params):
    with sqlite3.connect(os.path.join(cluster.release_config["state_dir"], "history.db")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(query, params)]


def assert_no_secret(cluster, *texts):
    for text in texts:
        assert SECRET not in json.dumps(text, default=str)
    with open(os.path.join(cluster.release_config["state_dir"], "history.db"), "rb") as handle:
        assert SECRET.encode() not in handle.read()


def refused(ret, seen, reason):
    assert ret["refused"] and ret["reason"] == reason and ret["retcode"] == 1, ret
    assert any(e["tag"] == f"release/{ret['project']}/webhook/refused" and e["data"]["reason"] == reason
               for e in seen), [e["tag"] for e in seen]


# ---------------------------------------------------------------- webhook


def test_signed_github_push_deploys_once_per_delivery(m7):
    body = push_body(m7, "refs/heads/master", pusher="alice")
    ret, seen = hook_call(m7, body, github(body, "gh-1"))
    deployed = ret["deploys"]["test"]
    assert ret["result"] and deployed["result"], ret
    assert deployed["release"].endswith("_alice") and "_master_" in deployed["release"]
    assert [current(m7, m) for m in MINIONS] == [deployed["release"]] * 2
    row = rows(m7, "SELECT * FROM runs WHERE release = ?", deployed["release"])[0]
    assert (row["kind"], row["trigger"], row["who"], row["result"]) == ("deploy", "webhook", "alice", 1)
    signature = github(body, "gh-1")["X-Hub-Signature-256"]
    assert_no_secret(m7, ret)
    assert signature not in json.dumps(ret)

    again, _ = hook_call(m7, body, github(body, "gh-1"))
    assert again["result"] and again["deploys"] == {} and "handled before" in again["comment"]
    replay, _ = hook_call(m7, body, github(body, "gh-1-replayed-under-a-new-id"))
    assert replay["deploys"] == {}, replay
    assert len(rows(m7, "SELECT id FROM runs WHERE kind = 'deploy' AND trigger = 'webhook'")) == 1


def test_wrong_or_missing_signature_is_refused_and_recorded(m7):
    before = [current(m7, m) for m in MINIONS]
    body = push_body(m7, "refs/heads/release/2.0", pusher="mallory")
    ret, seen = hook_call(m7, body, github(body, "gh-bad", secret="guessed"))
    refused(ret, seen, "bad-signature")
    unsigned = {k: v for k, v in github(body, "gh-none").items() if k != "X-Hub-Signature-256"}
    ret, seen = hook_call(m7, body, unsigned)
    refused(ret, seen, "unsigned")
    assert [current(m7, m) for m in MINIONS] == before
    reasons = [json.loads(r["details"])["reason"] for r in
               rows(m7, "SELECT * FROM runs WHERE kind = 'refused' AND trigger = 'webhook' ORDER BY id")]
    assert reasons[-2:] == ["bad-signature", "unsigned"]


def test_unknown_project_oversize_and_malformed_bodies_are_refused(m7):
    body = push_body(m7, "refs/heads/master")
    ret, seen = hook_call(m7, body, github(body, "gh-unknown"), project="nosuch")
    refused(ret, seen, "unknown-project")
    big = push_body(m7, "refs/heads/master", padding="x" * 9000)
    ret, seen = hook_call(m7, big, github(big, "gh-big"))
    refused(ret, seen, "too-large")
    # salt-api itself answers 400 to malformed application/json and fires nothing;
    # sent as text/plain the raw body reaches the runner, which refuses it.
    bad = b'{"ref": "refs/heads/master",'
    assert post(m7, "/hook/release/rainbow", bad, github(bad, "gh-json"))[0] == 400
    ret, seen = hook_call(m7, bad, dict(github(bad, "gh-text"), **{"Content-Type": "text/plain"}))
    refused(ret, seen, "malformed")
    projects = {r["project"] for r in rows(m7, "SELECT project FROM runs WHERE kind = 'refused'")}
    assert "nosuch" in projects


def test_pings_deploy_nothing(m7):
    before = len(rows(m7, "SELECT id FROM runs WHERE kind = 'deploy'"))
    ping = json.dumps({"zen": "Design for failure.", "hook_id": 1}).encode()
    ret, _ = hook_call(m7, ping, github(ping, "gh-ping", event="ping"))
    assert ret["result"] and ret["deploys"] == {} and "ping" in ret["comment"]
    assert len(rows(m7, "SELECT id FROM runs WHERE kind = 'deploy'")) == before


def test_a_body_salt_trims_on_the_bus_is_refused_as_too_large(m7):
    # ~1.1 MB, signed, under bigbody's own 4 MiB limit: salt-api still answers 200 (no 413),
    # and the body reaches the reactor as VALUE_TRIMMED, whose signature never matches.
    big = push_body(m7, "refs/heads/master", padding="x" * 1_100_000)
    ret, seen = hook_call(m7, big, github(big, "gh-huge"), project="bigbody")
    refused(ret, seen, "too-large")
    assert "trimmed" in ret["error"], ret
    row = rows(m7, "SELECT * FROM runs WHERE project = 'bigbody' AND kind = 'refused' ORDER BY id DESC")[0]
    assert json.loads(row["details"])["reason"] == "too-large" and "trimmed" in row["error"]
    assert not rows(m7, "SELECT id FROM runs WHERE project = 'bigbody' AND kind = 'deploy'")


def test_gitlab_token_deploys_and_stays_out_of_job_args_and_history(m7):
    ref = "refs/heads/release/2.0"
    body = json.dumps({"object_kind": "push", "ref": ref, "after": ref_id(m7, ref),
                       "user_username": "gitlab-bob"}).encode()
    headers = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook",
               "X-Gitlab-Event-UUID": "gl-1", "X-Gitlab-Token": SECRET}
    ret, seen = hook_call(m7, body, headers)
    deployed = ret["deploys"]["test"]
    assert deployed["result"] and deployed["release"].endswith("_gitlab-bob") and "_release-2.0_" in deployed["release"]
    assert current(m7, "m7-web1") == deployed["release"]
    # salt-api's own hook event carries every header (documented); nothing after it does.
    after_hook = [e for e in seen if not e["tag"].startswith("salt/netapi/hook/")]
    assert any(e["tag"].endswith("/new") for e in after_hook)  # the runner's job args were seen
    assert_no_secret(m7, ret, after_hook)
    wrong = dict(headers, **{"X-Gitlab-Token": "nope", "X-Gitlab-Event-UUID": "gl-2"})
    ret, seen = hook_call(m7, body, wrong)
    refused(ret, seen, "bad-signature")


def test_push_while_locked_is_refused_then_redelivery_deploys(m7):
    path = locking.lock_path(m7.release_config["state_dir"], "rainbow", "test")
    owner = locking.acquire(path, "ops", "manual", "maintenance")
    body = push_body(m7, "refs/heads/master", pusher="carol")
    try:
        ret, seen = hook_call(m7, body, github(body, "gh-locked"))
    finally:
        locking.release(path, owner["token"])
    assert not ret["result"] and ret["deploys"]["test"]["failed_step"] == "lock", ret
    assert any(e["tag"] == "release/rainbow/webhook/refused" and e["data"]["reason"] == "locked" for e in seen)
    ret, _ = hook_call(m7, body, github(body, "gh-locked"))  # GitHub's "Redeliver"
    assert ret["result"] and ret["deploys"]["test"]["release"].endswith("_carol"), ret


# ---------------------------------------------------------------- CI through /run


def test_ci_script_deploys_through_salt_api_run_and_streams_progress(m7):
    env = dict(os.environ, SALT_API_URL=m7.api_url, SALT_API_USER="ci", SALT_API_PASSWORD="any",
               SALT_API_EAUTH="auto")
    script = os.path.join(REPO_ROOT, "examples", "ci", "release-deploy")
    done = subprocess.run([sys.executable, script, "rainbow", "test", "v1.0.0", "jenkins"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("fetched v1.0.0") for line in lines), lines
    assert any(line.startswith("DONE: rainbow_test_v1.0.0_") for line in lines), lines
    release = next(line.split()[1] for line in lines if line.startswith("DONE: "))
    assert [current(m7, m) for m in MINIONS] == [release] * 2
    row = rows(m7, "SELECT * FROM runs WHERE release = ?", release)[0]
    assert (row["trigger"], row["who"], row["result"]) == ("ci", "jenkins", 1)
    failing = subprocess.run([sys.executable, script, "rainbow", "test", "no-such-ref"],
                             env=env, capture_output=True, text=True, timeout=300, check=False)
    assert failing.returncode == 1 and "FAILED" in failing.stdout, failing.stdout + failing.stderr


# ---------------------------------------------------------------- highstate


def fleet_release(m7):
    last = "SELECT release FROM runs WHERE kind = 'deploy' AND result = 1 ORDER BY id DESC LIMIT 1"
    return rows(m7, last)[0]["release"]


def state_apply(m7, minion, *args):
    result = m7.salt_cli.run("state.apply", "release", *args, minion_tgt=minion)
    states = {ret["__id__"]: ret for ret in result.data.values()} if isinstance(result.data, dict) else {}
    assert set(states) == {"release-rainbow", "release-rainbow-pruned"}, result  # deployed, then pruned
    return result, states["release-rainbow"]


def test_highstate_brings_a_drifted_node_back(m7):
    fleet = fleet_release(m7)
    other = next(r for r in os.listdir(os.path.join(m7.nodes_root, "m7", "m7-web2", "rainbow", "releases"))
                 if r != fleet and not r.startswith("."))
    m7.salt_cli.run("release.activate", "rainbow", other, minion_tgt="m7-web2")
    assert current(m7, "m7-web2") == other

    result, state = state_apply(m7, "m7-web2", "test=True")
    assert state["result"] is None and state["changes"] == {"old": other, "new": fleet}, state
    assert current(m7, "m7-web2") == other

    result, state = state_apply(m7, "m7-web2")
    assert result.returncode == 0 and state["result"] is True, state
    assert state["changes"] == {"old": other, "new": fleet}
    assert current(m7, "m7-web2") == fleet
    result, state = state_apply(m7, "m7-web2")
    assert state["result"] is True and state["changes"] == {} and "already runs" in state["comment"]


def test_highstate_gives_a_new_node_the_fleet_release(m7):
    fleet = fleet_release(m7)
    node = os.path.join(m7.nodes_root, "m7", "m7-web1")
    subprocess.run(["rm", "-rf", node], check=True)  # a node that never had the project
    result, state = state_apply(m7, "m7-web1")
    assert state["result"] is True and state["changes"] == {"old": None, "new": fleet}, state
    assert current(m7, "m7-web1") == fleet
    assert node_manifest(m7, "m7-web1")["name"] == fleet


def test_a_release_named_by_hand_is_found_with_its_staged_checksum(m7):
    # Release artifacts only: a release may also have a .delta.tar.gz beside it.
    staged = sorted(f for f in os.listdir(os.path.join(m7.release_config["artifact_root"], "rainbow"))
                    if f.endswith(".tar.gz") and not f.endswith(".delta.tar.gz"))
    pinned = next(f[: -len(".tar.gz")] for f in staged if "_release-2.0_" in f)
    tarball = os.path.join(m7.release_config["artifact_root"], "rainbow", pinned + ".tar.gz")
    with open(tarball + ".sha256", encoding="utf-8") as handle:
        recorded = handle.read().split()[0]
    with open(tarball, "rb") as handle:
        assert recorded == hashlib.sha256(handle.read()).hexdigest()
    result = m7.salt_cli.run("state.single", "release.deployed", "rainbow", f"release={pinned}",
                             minion_tgt="m7-web1")
    state = next(iter(result.data.values()))
    assert state["result"] is True and state["changes"]["new"] == pinned, state
    assert current(m7, "m7-web1") == pinned


# ---------------------------------------------------------------- exact refs, production flag
# Last: these deploy "pro" onto the nodes the tests above judge by "test".


def node_manifest(cluster, minion):
    deploy_to = os.path.join(cluster.nodes_root, "m7", minion, "rainbow")
    path = os.path.join(deploy_to, "meta", os.path.basename(os.readlink(os.path.join(deploy_to, "current"))),
                        "RELEASE.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_a_tag_push_deploys_the_tags_commit_to_non_production_only(m7):
    repo = m7.release_config["projects"]["rainbow"]["repo"]
    # "pro" shares m7-web1..2 with "test", and a node refuses a fence lower than the last
    # deploy's of any environment: start pro's fence counter above test's.
    fence = locking.lock_path(m7.release_config["state_dir"], "rainbow", "pro") + ".fence"
    os.makedirs(os.path.dirname(fence), exist_ok=True)
    with open(fence, "w", encoding="utf-8") as handle:
        handle.write("1000\n")
    # A branch named like the tag, on another commit: a bare "v1.1.0" would be ambiguous.
    git_out(repo, "branch", "v1.1.0", "release/2.0")
    try:
        tag_commit = git_out(repo, "rev-parse", "refs/tags/v1.1.0^{commit}")
        assert git_out(repo, "rev-parse", "refs/heads/v1.1.0") != tag_commit
        body = push_body(m7, "refs/tags/v1.1.0", pusher="tagger")  # after: the annotated tag's own id
        ret, _ = hook_call(m7, body, github(body, "gh-tag-exact"))
    finally:
        git_out(repo, "branch", "-D", "v1.1.0")
    # "pro" has no production flag: a plain environment. "live" says production: true, no auto: true.
    assert sorted(ret["deploys"]) == ["pro"], ret
    assert ret["deploys"]["pro"]["result"], json.dumps(ret["deploys"]["pro"], default=str)[:3000]
    assert ret["ref"] == "refs/tags/v1.1.0"
    for minion in MINIONS:
        manifest = node_manifest(m7, minion)
        assert (manifest["commit"], manifest["full_ref"]) == (tag_commit, "refs/tags/v1.1.0"), manifest
    assert not rows(m7, "SELECT id FROM runs WHERE env = 'live' AND kind = 'deploy'")


def test_a_push_whose_ref_moved_since_deploys_nothing(m7):
    before = [current(m7, m) for m in MINIONS]
    body = json.dumps({"ref": "refs/heads/master", "after": ref_id(m7, "refs/tags/v1.0.0"),
                       "pusher": {"name": "late"}}).encode()
    ret, _ = hook_call(m7, body, github(body, "gh-raced"))
    deployed = ret["deploys"]["test"]
    assert not deployed["result"] and "newer push raced" in deployed["error"], deployed
    assert [current(m7, m) for m in MINIONS] == before


def test_what_the_master_keeps_is_private_after_real_deploys(m7):
    def mode(path):
        return stat.S_IMODE(os.lstat(path).st_mode)

    state = m7.release_config["state_dir"]
    assert mode(state) == 0o700
    history = [n for n in os.listdir(state) if n.startswith("history.db")]
    assert history and all(mode(os.path.join(state, n)) == 0o600 for n in history), history
    locks = os.path.join(state, "locks")
    assert os.listdir(locks) and all(mode(os.path.join(locks, n)) == 0o600 for n in os.listdir(locks))
    published = os.path.join(state, "fleet", "rainbow")
    assert os.listdir(published) and all(mode(os.path.join(published, n)) in (0o600, 0o640)
                                         for n in os.listdir(published))
    staged = os.path.join(m7.release_config["artifact_root"], "rainbow")
    assert os.listdir(staged)
    for name in os.listdir(staged):
        assert mode(os.path.join(staged, name)) in (0o600, 0o640), name
