"""
Node configuration from pillar, with real gpg: per-node rendered files, a
file only one node gets, rollback bringing old config back, a dry run, bad
inputs refused before any node is touched, and a GPG-encrypted canary secret
that must appear nowhere but in the rendered files on the nodes.

Own cluster: master "m3", minions m3-web1..3.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
import threading
import uuid

import pytest
import salt.utils.event

from tests.conftest import REPO_ROOT, project_config, runner_return, start_cluster

MINIONS = ("m3-web1", "m3-web2", "m3-web3")
GPG_UID = "salt-release test <test@example.invalid>"
OTHER_UID = "someone else <other@example.invalid>"
CANARY = "CANARY-" + uuid.uuid4().hex
PAY_CANARY = "PAYKEY-" + uuid.uuid4().hex
SECRET_FILES = ("config/db.php", "config/pay.php")

PAY_TEMPLATE = "<?php return ['key' => '{{ secrets.pay_api_key }}', 'node' => '{{ grains.id }}'];\n"
BAD_TEMPLATES = {
    "broken.j2": "{% if secrets.db_password %}\nunterminated\n",
    "undefined.j2": "line one\n{{ secrets.db_pasword }}\n",
}

RELEASE_SLS = textwrap.dedent(
    """\
    release:
      rainbow:
        deploy_to: {nodes_root}/{{{{ grains['id'] }}}}/rainbow
        user: www-data
        shared: [storage, logs]
        files:
          config/db.php: {{template: config/db.php.example}}
          config/pay.php: {{source: salt://rainbow/pay.php.j2, owner: app}}
    """
)
ENV_DEFAULT_SLS = "release:\n  rainbow:\n    db_host: 10.0.0.10\n"
NODE_SLS = "release:\n  rainbow:\n    db_host: {host}\n"
CRON_SLS = ("release:\n  rainbow:\n    files:\n"
            "      crontab.xml: {contents: '<cron>* * * * * php artisan schedule:run</cron>'}\n")


# ---------------------------------------------------------------- gpg


def gpg(home, *args, stdin=None):
    done = subprocess.run(["gpg", "--homedir", home, "--batch", "--yes", *args], input=stdin,
                          capture_output=True, text=True, check=True)
    return done.stdout


def new_keyring(uid):
    home = tempfile.mkdtemp(prefix="g3", dir="/tmp")  # short: gpg-agent's socket lives here
    gpg(home, "--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key", uid,
        "default", "default", "never")
    return home


def encrypt(home, uid, text):
    return gpg(home, "--trust-model", "always", "--armor", "--encrypt", "-r", uid, stdin=text)


def gpg_yaml(home, uid, secrets):
    """A '#!yaml|gpg' pillar SLS with each secret encrypted."""
    lines = ["#!yaml|gpg", "release:", "  rainbow:", "    secrets:"]
    for key, value in secrets.items():
        lines.append(f"      {key}: |")
        lines.extend("        " + line for line in encrypt(home, uid, value).strip().splitlines())
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def keyrings():
    homes = {"master": new_keyring(GPG_UID), "other": new_keyring(OTHER_UID)}
    yield homes
    for home in homes.values():
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], check=False)
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- cluster


class Pillar:
    """The m3 master's pillar tree; tests rewrite it and the deploy refreshes it."""

    def __init__(self, root, nodes_root, keyrings):
        self.root, self.nodes_root, self.keyrings = root, nodes_root, keyrings
        self.node_hosts = {"m3-web1": "10.0.1.1", "m3-web2": "10.0.1.2"}

    def write(self, bad_web3=None):
        """The standard pillar, plus an optional bad SLS that only m3-web3 gets."""
        files = {
            "release.sls": RELEASE_SLS.format(nodes_root=self.nodes_root),
            "env_test.sls": ENV_DEFAULT_SLS,
            "cron.sls": CRON_SLS,
            "secrets.sls": self.secrets,
        }
        top = {"'*'": ["release", "secrets"], "'G@env:test'": ["match: compound", "env_test"]}
        for minion, host in self.node_hosts.items():
            files[f"node_{minion.replace('-', '_')}.sls"] = NODE_SLS.format(host=host)
            top[f"'{minion}'"] = [f"node_{minion.replace('-', '_')}"]
        top["'m3-web1'"].append("cron")
        if bad_web3:
            files["bad.sls"] = bad_web3
            top.setdefault("'m3-web3'", []).append("bad")
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root)
        files["top.sls"] = "base:\n" + "".join(
            f"  {target}:\n" + "".join(f"    - {sls}\n" for sls in sls_list)
            for target, sls_list in top.items()
        )
        for name, text in files.items():
            with open(os.path.join(self.root, name), "w", encoding="utf-8") as handle:
                handle.write(text)

    @property
    def secrets(self):
        return gpg_yaml(self.keyrings["master"], GPG_UID,
                        {"db_password": CANARY, "pay_api_key": PAY_CANARY})


class Recorder(threading.Thread):
    """Every event on the m3 master bus, subscribed before the first deploy."""

    def __init__(self, opts):
        super().__init__(daemon=True)
        self.opts, self.events, self.stop = opts, [], threading.Event()
        self.ready = threading.Event()

    def run(self):
        with salt.utils.event.get_master_event(self.opts, self.opts["sock_dir"], listen=True) as bus:
            bus.subscribe("")
            self.ready.set()
            while not self.stop.is_set():
                event = bus.get_event(wait=0.5, full=True)
                if event:
                    self.events.append(event)


@pytest.fixture(scope="module")
def m3(salt_factories, app_repo, nodes_root, keyrings, tmp_path_factory):
    file_root = tmp_path_factory.mktemp("m3_files")
    for folder in ("_modules", "_runners", "_utils", "_states"):
        os.symlink(os.path.join(REPO_ROOT, folder), file_root / folder)
    (file_root / "releases").mkdir()
    (file_root / "rainbow").mkdir()
    (file_root / "rainbow" / "pay.php.j2").write_text(PAY_TEMPLATE)
    for name, text in BAD_TEMPLATES.items():
        (file_root / "rainbow" / name).write_text(text)
    pillar = Pillar(str(tmp_path_factory.mktemp("m3_pillar") / "base"), nodes_root, keyrings)
    pillar.write()
    config = {
        "artifact_root": str(file_root / "releases"),
        "state_dir": str(tmp_path_factory.mktemp("m3_state")),
        "projects": {"rainbow": project_config(
            app_repo.path, environments={"test": {"target": "m3-web*", "batch": 1}})},
    }
    overrides = {
        "file_roots": {"base": [str(file_root)]},
        "pillar_roots": {"base": [pillar.root]},
        "gpg_keydir": keyrings["master"],
        "log_level_logfile": "debug",
    }
    with start_cluster(salt_factories, "m3", str(file_root), config, "", nodes_root,
                       minion_ids=MINIONS, master_overrides=overrides) as cluster:
        cluster.pillar = pillar
        cluster.outputs = []
        cluster.recorder = Recorder(cluster.master.config)
        cluster.recorder.start()
        assert cluster.recorder.ready.wait(30)
        yield cluster
        cluster.recorder.stop.set()
        cluster.recorder.join(5)


def salt_run(cluster, *args):
    """``salt-run`` at debug log level; keeps the printed output for the canary search."""
    result = cluster.salt_run_cli.run(*args, "--out=json", "--log-level=debug")
    cluster.outputs.append(result.stdout + result.stderr)
    return result, runner_return(result)


def deploy(cluster, ref, *extra):
    return salt_run(cluster, "release.deploy", "rainbow", "env=test", f"ref={ref}", *extra)


def node_file(cluster, minion, rel):
    return os.path.join(cluster.deploy_to(minion), "current", rel)


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def snapshot(cluster):
    """What a node has: its releases, where current points, and every file's sha256."""
    state = {}
    for minion in MINIONS:
        root = cluster.deploy_to(minion)
        releases = os.path.join(root, "releases")
        current = os.path.join(root, "current")
        files = {}
        for dirpath, _, names in os.walk(releases):
            for name in names:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    with open(path, "rb") as handle:
                        files[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
        state[minion] = {"releases": sorted(os.listdir(releases)) if os.path.isdir(releases) else [],
                         "current": os.readlink(current) if os.path.islink(current) else None,
                         "files": files}
    return state


# ---------------------------------------------------------------- tests


def test_nodes_get_their_own_config(m3):
    res, ret = deploy(m3, "v1.0.0")
    assert res.returncode == 0 and ret["result"], json.dumps(ret, indent=1)
    hosts = {"m3-web1": "10.0.1.1", "m3-web2": "10.0.1.2", "m3-web3": "10.0.0.10"}
    rendered = {}
    for minion, host in hosts.items():
        db = read(node_file(m3, minion, "config/db.php"))
        assert f"'host' => '{host}'" in db and f"'password' => '{CANARY}'" in db
        pay = read(node_file(m3, minion, "config/pay.php"))
        assert PAY_CANARY in pay and f"'node' => '{minion}'" in pay
        rendered[minion] = db
        # The runner's return names each file with its sha256, matching the node.
        files = ret["nodes"][minion]["files"]
        with open(node_file(m3, minion, "config/db.php"), "rb") as handle:
            assert files["config/db.php"]["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert len(set(rendered.values())) == 3
    crons = [m for m in MINIONS if os.path.exists(node_file(m3, m, "crontab.xml"))]
    assert crons == ["m3-web1"]
    assert "schedule:run" in read(node_file(m3, "m3-web1", "crontab.xml"))


def test_modes_protect_secrets_and_code(m3):
    import pwd  # pylint: disable=import-outside-toplevel

    app = pwd.getpwnam("www-data")
    release = os.path.realpath(os.path.join(m3.deploy_to("m3-web1"), "current"))
    expect = {"config/db.php": (0, app.pw_gid, 0o640), "config/pay.php": (app.pw_uid, app.pw_gid, 0o600),
              "crontab.xml": (0, app.pw_gid, 0o640)}
    for rel, (uid, gid, mode) in expect.items():
        info = os.stat(os.path.join(release, rel))
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, gid, mode), rel
    for dirpath, dirs, names in os.walk(release):
        assert ".git" not in dirs
        for name in dirs + names:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                continue
            assert not info.st_mode & 0o002, f"{path} is world-writable"
            if os.path.relpath(path, release) not in expect:
                # Code: root's, never writable by the app user.
                assert info.st_uid == 0 and not info.st_mode & 0o020, path


def test_dry_run_shows_which_files_would_change(m3):
    m3.pillar.node_hosts["m3-web2"] = "10.0.2.2"
    m3.pillar.write()
    before = snapshot(m3)
    res, ret = deploy(m3, "v1.1.0", "diff=True")
    assert res.returncode == 0 and ret["result"], json.dumps(ret, indent=1)
    assert snapshot(m3) == before
    statuses = {m: {p: e["status"] for p, e in ret["nodes"][m]["files"].items()} for m in MINIONS}
    assert statuses["m3-web2"]["config/db.php"] == "changed"
    assert statuses["m3-web1"]["config/db.php"] == "unchanged"
    assert statuses["m3-web3"] == {"config/db.php": "unchanged", "config/pay.php": "unchanged"}
    assert "config/db.php changed" in res.stdout


def test_rollback_brings_back_the_previous_config(m3):
    old = os.path.basename(os.readlink(os.path.join(m3.deploy_to("m3-web2"), "current")))
    res, ret = deploy(m3, "v1.1.0")
    assert res.returncode == 0 and ret["result"], json.dumps(ret, indent=1)
    assert "'host' => '10.0.2.2'" in read(node_file(m3, "m3-web2", "config/db.php"))
    back = m3.salt_cli.run("release.activate", "rainbow", old, minion_tgt="m3-web2")
    assert back.returncode == 0, back
    assert "'host' => '10.0.1.2'" in read(node_file(m3, "m3-web2", "config/db.php"))
    forward = m3.salt_cli.run("release.activate", "rainbow", ret["release"], minion_tgt="m3-web2")
    assert forward.returncode == 0, forward


def _files(spec):
    return "release:\n  rainbow:\n    files:\n" + "".join(f"      {k}: {v}\n" for k, v in spec.items())


BAD_INPUTS = {
    "template-escapes": (_files({"config/escape.php": "{template: ../../etc/passwd}"}),
                         "config/escape.php: template path must be a relative path inside the release"),
    "absolute-target": (_files({"/etc/evil.conf": "{contents: x}"}),
                        "target path must be a relative path inside the release: '/etc/evil.conf'"),
    "target-in-shared": (_files({"storage/app.conf": "{contents: x}"}),
                         "target 'storage/app.conf' lies inside the shared path 'storage'"),
    "jinja-syntax": (_files({"config/broken.php": "{source: 'salt://rainbow/broken.j2'}"}),
                     "config/broken.php: Jinja syntax error at line"),
    "undefined-variable": (_files({"config/undef.php": "{source: 'salt://rainbow/undefined.j2'}"}),
                           "config/undef.php: undefined variable at line 2"),
    "undecryptable-secret": (None, "pillar failed to render (SLS: bad)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_node_changes(m3, keyrings, case):
    sls, message = BAD_INPUTS[case]
    if sls is None:  # encrypted to a key the master does not hold
        sls = gpg_yaml(keyrings["other"], OTHER_UID, {"extra": "not for this master"})
    m3.pillar.write(bad_web3=sls)
    before = snapshot(m3)
    try:
        res, ret = deploy(m3, "v1.0.0")
    finally:
        m3.pillar.write()
    assert res.returncode == 1 and ret["retcode"] == 1 and not ret["result"], ret
    assert ret["failed_step"] == "config_check", ret
    assert "m3-web3" in ret["error"] and "no node was touched" in ret["error"]
    assert message in ret["nodes"]["m3-web3"]["error"], ret["nodes"]["m3-web3"]
    assert snapshot(m3) == before


def _holders(root, needles, skip=()):
    """Files under ``root`` whose bytes contain any needle."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or path in skip or not os.path.isfile(path):
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            if any(n.encode() in data for n in needles):
                found.append(path)
    return found


def test_canary_secret_appears_only_in_rendered_files(m3):
    needles = (CANARY, PAY_CANARY)
    # Secrets reached the nodes, in the rendered files only.
    for minion, daemon in zip(MINIONS, m3.minions, strict=True):
        holders = _holders(m3.deploy_to(minion), needles)
        assert holders, f"no rendered secret on {minion}"
        for path in holders:
            assert path.endswith(SECRET_FILES), path
            assert not os.stat(path).st_mode & 0o007, path
        assert not _holders(os.path.join(daemon.config["cachedir"], "release"), needles)
    assert not any(n in out for out in m3.outputs for n in needles)
    events = json.dumps(m3.recorder.events, default=str)
    assert len(m3.recorder.events) > 50 and "release/rainbow/test/m3-web1/configure" in events
    assert not any(n in events for n in needles)
    master = m3.master.config
    logs = [master["log_file"]] + [m.config["log_file"] for m in m3.minions]
    for log_file in logs:
        assert os.path.getsize(log_file) > 0
        assert not any(n in read(log_file) for n in needles), log_file
    assert "[DEBUG" in read(logs[0])
    for root in (os.path.join(master["cachedir"], "jobs"), m3.release_config["state_dir"],
                 m3.release_config["artifact_root"]):
        assert not _holders(root, needles), root
    # Wider: every file of every daemon. The one holder is Salt's own pillar cache on
    # the master (written whenever minion_data_cache is on, the default), root-only,
    # beside the gpg private key that decrypts the same secrets anyway.
    for daemon in m3.minions:
        assert not _holders(daemon.config["root_dir"], needles), daemon.id
    pillar_cache = os.path.join(master["cachedir"], "pillar")
    for path in _holders(master["root_dir"], needles):
        assert os.path.dirname(path) == pillar_cache, path
        assert not os.stat(path).st_mode & 0o077, path

