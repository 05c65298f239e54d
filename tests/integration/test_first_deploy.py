"""
A first deploy the way a new user makes one, on master "m14" and two
minions, behind real nginx + PHP-FPM (as www-data): the bundled example app
(shared ``data/`` seeded from the release, ``config/app.php`` rendered with
the release name and a secret, ``webroot: public``, health through nginx),
its metadata kept out of the served tree, hostile releases that try to make
the seed copy read or write outside ``deploy_to``, and a failed first deploy
whose node error leads with its real cause.
"""

import hashlib
import os
import pwd
import shutil

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import AppRepo, git, make_file_root, project_config, start_cluster
from tests.integration.stack_services import Fpm, Nginx, get, readable_root

MINIONS = ("m14-web1", "m14-web2")
SECRET = "m14-app-secret-5e1d"
METADATA = ("RELEASE.json", ".config.sha256.json", ".artifact.sha256")
START_PAGE = os.path.join("pages", "start.txt")

PILLAR = """\
{% set node = grains['id'] %}
release:
  wiki:
    deploy_to: {{ nodes_root }}/{{ node }}/wiki
    user: {{ app_user }}
    shared: [data, storage]
    webroot: public
    keep_releases: 2
    files:
      config/app.php: {template: config/app.php.example}
    secrets:
      app_secret: SECRET
    stack: {kind: php-fpm, listen: "127.0.0.1:FPM_PORT", method: reset}
  sick:
    deploy_to: {{ nodes_root }}/{{ node }}/sick
    user: {{ app_user }}
  hostile:
    deploy_to: {{ nodes_root }}/{{ node }}/hostile
    user: {{ app_user }}
    shared: [data, inner/data]
"""


def hostile_repo(path):
    """Releases whose data/ holds links: out of the release (v-etc), back into it (v-up), data/ a link (v-alias)."""
    os.makedirs(path)
    git(path, "init", "-q", "-b", "master")
    repo = AppRepo(path)
    repo.commit("plain", {"data/ok.txt": "ok\n", "public/index.html": "hostile\n", "inner/.keep": ""})
    os.symlink("/etc", os.path.join(path, "data", "etc"))
    repo.commit("data/etc -> /etc")
    git(path, "tag", "v-etc")
    git(path, "rm", "-q", "data/etc")
    os.symlink("..", os.path.join(path, "data", "up"))
    os.symlink("../public/index.html", os.path.join(path, "data", "page.html"))
    repo.commit("links back into the release")
    git(path, "tag", "v-up")
    os.symlink("../public", os.path.join(path, "inner", "data"))
    repo.commit("inner/data is a link to public/")
    git(path, "tag", "v-alias")
    return repo


@pytest.fixture(scope="module")
def m14(salt_factories, app_repo, tmp_path_factory):
    root, nodes = readable_root("m14-")
    services = []
    try:
        fpm = Fpm(os.path.join(root, "fpm"), get_unused_localhost_port())
        services.append(fpm)
        ports = {m: get_unused_localhost_port() for m in MINIONS}
        release_root_port = get_unused_localhost_port()
        sites = [(ports[m], os.path.join(nodes, m, "wiki", "current", "public"), fpm.port) for m in MINIONS]
        # The same release served from its root, as if the web root were the release root.
        sites.append((release_root_port, os.path.join(nodes, MINIONS[0], "wiki", "current"), fpm.port))
        services.append(Nginx(os.path.join(root, "nginx"), sites))
        file_root = make_file_root(str(tmp_path_factory.mktemp("m14files") / "base"))
        health = {"url": "http://{host}/health.php", "expect": "release", "timeout_s": 2, "retries": 2,
                  "interval_s": 0.2}
        checked = {"test": {"target": "m14-web*", "health": health, "host_grain": "app_addr",
                            "auto_rollback": True}}
        config = {
            "artifact_root": os.path.join(file_root, "releases"),
            "state_dir": str(tmp_path_factory.mktemp("m14state")),
            "projects": {
                "wiki": project_config(app_repo.path, environments=checked),
                # Its health URL is the wiki's page: it names the wiki's release, never sick's.
                "sick": project_config(app_repo.path, environments=checked),
                "hostile": project_config(hostile_repo(str(tmp_path_factory.mktemp("m14git") / "hostile")).path,
                                          build=[], checks=[], environments={"test": {"target": "m14-web*"}}),
            },
        }
        pillar = PILLAR.replace("SECRET", SECRET).replace("FPM_PORT", str(fpm.port))
        grains = {m: {"app_addr": f"127.0.0.1:{ports[m]}"} for m in MINIONS}
        with start_cluster(salt_factories, "m14", file_root, config, pillar, nodes,
                           minion_ids=MINIONS, grains=grains) as cluster:
            cluster.ports, cluster.release_root_port = ports, release_root_port
            yield cluster
    finally:
        for service in reversed(services):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)


def deploy(cluster, project, ref):
    return cluster.run("release.deploy", project, "env=test", f"ref={ref}")


def tree(path):
    """{relative path: bytes, or ('link', target), or 'dir'} of everything under ``path``."""
    found = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                found[rel] = ("link", os.readlink(full))
            elif os.path.isdir(full):
                found[rel] = "dir"
            else:
                with open(full, "rb") as handle:
                    found[rel] = (handle.read(), os.stat(full).st_uid, os.stat(full).st_mode)
    return found


@pytest.fixture(scope="module")
def first(m14):
    result, ret = deploy(m14, "wiki", "v1.0.0")
    assert result.returncode == 0 and ret["result"] is True, ret
    return ret["release"]


# ---------------------------------------------------------------- finding 3: shared paths seeded


def test_first_deploy_seeds_shared_data_from_the_release_and_serves_it(m14, app_repo, first):
    app = pwd.getpwnam("www-data")
    with open(os.path.join(app_repo.path, "data", START_PAGE), "rb") as handle:
        shipped = handle.read()
    for minion in MINIONS:
        deploy_to = m14.deploy_to(minion, "wiki")
        seeded = os.path.join(deploy_to, "shared", "data", START_PAGE)
        with open(seeded, "rb") as handle:
            assert handle.read() == shipped
        for path in (os.path.join(deploy_to, "shared", "data"), os.path.dirname(seeded), seeded):
            assert os.stat(path).st_uid == app.pw_uid, path
        release_data = os.path.join(deploy_to, "releases", first, "data")
        assert os.path.islink(release_data)
        assert os.path.realpath(release_data) == os.path.realpath(os.path.join(deploy_to, "shared", "data"))
        # Served through nginx + FPM: the page from shared data, the release name from the rendered config.
        status, body = get(m14.ports[minion], "/index.php")
        assert status == 200 and body == f"rainbow {first}\n" + shipped.decode(), body
        status, body = get(m14.ports[minion], "/health.php")
        assert status == 200 and first in body and SECRET not in body, body
        assert os.path.getsize(os.path.join(deploy_to, "shared", "data", "visits.log")) > 0


def test_an_existing_shared_path_stays_byte_identical(m14, first):
    before = {}
    for minion in MINIONS:
        data = os.path.join(m14.deploy_to(minion, "wiki"), "shared", "data")
        with open(os.path.join(data, START_PAGE), "w", encoding="utf-8") as handle:
            handle.write(f"edited on {minion}\n")  # what the app wrote since
        before[minion] = tree(data)
    result, ret = deploy(m14, "wiki", "v1.1.0")
    assert result.returncode == 0 and ret["result"] is True, ret
    for minion in MINIONS:
        data = os.path.join(m14.deploy_to(minion, "wiki"), "shared", "data")
        after = tree(data)
        after.pop("visits.log", None), before[minion].pop("visits.log", None)  # the health check's own visits
        assert after == before[minion]
        assert get(m14.ports[minion], "/index.php")[1].endswith(f"edited on {minion}\n")


def test_seed_never_reads_or_writes_outside_deploy_to(m14):
    # data/etc -> /etc: the unpack refuses the whole release; no node gets a shared/data.
    result, ret = deploy(m14, "hostile", "v-etc")
    assert result.returncode != 0 and ret["result"] is False, ret
    for minion in MINIONS:
        assert not os.path.lexists(os.path.join(m14.deploy_to(minion, "hostile"), "shared", "data"))
    # Links back into the release (data/up -> .., data/page.html -> ../public/...): only plain files seed.
    result, ret = deploy(m14, "hostile", "v-up")
    assert result.returncode == 0 and ret["result"] is True, ret
    for minion in MINIONS:
        shared = os.path.join(m14.deploy_to(minion, "hostile"), "shared")
        assert tree(os.path.join(shared, "data")).keys() == {"ok.txt"}
        assert os.listdir(os.path.join(shared, "inner", "data")) == []
    # inner/data a link to public/: a path reached through a link seeds nothing, the existing one stays.
    shutil.rmtree(os.path.join(m14.deploy_to(MINIONS[0], "hostile"), "shared", "inner"))
    result, ret = deploy(m14, "hostile", "v-alias")
    assert result.returncode == 0 and ret["result"] is True, ret
    for minion in MINIONS:
        shared = os.path.join(m14.deploy_to(minion, "hostile"), "shared")
        assert os.listdir(os.path.join(shared, "inner", "data")) == []
        assert tree(os.path.join(shared, "data")).keys() == {"ok.txt"}


# ---------------------------------------------------------------- finding 4: metadata outside the served tree


def test_metadata_is_not_served_when_the_web_root_is_the_release_root(m14, first):
    deploy_to = m14.deploy_to(MINIONS[0], "wiki")
    running = os.path.basename(os.readlink(os.path.join(deploy_to, "current")))
    assert get(m14.release_root_port, "/VERSION")[0] == 200  # nginx does serve the release root
    for name in METADATA:
        assert get(m14.release_root_port, f"/{name}")[0] == 404, name
        assert not os.path.lexists(os.path.join(deploy_to, "releases", running, name))
        assert os.path.isfile(os.path.join(deploy_to, "meta", running, name)), name
    listed = m14.salt_cli.run("release.list", "wiki", minion_tgt=MINIONS[0]).data
    assert listed["served"] == os.path.join(deploy_to, "current", "public")


def test_prune_removes_the_meta_with_its_release(m14, first):
    result, ret = deploy(m14, "wiki", "master")
    assert result.returncode == 0 and ret["result"] is True, ret
    for minion in MINIONS:
        deploy_to = m14.deploy_to(minion, "wiki")
        releases = sorted(os.listdir(os.path.join(deploy_to, "releases")))
        assert len(releases) == 2 and first not in releases, releases
        assert sorted(os.listdir(os.path.join(deploy_to, "meta"))) == releases


def test_a_release_of_the_previous_layout_is_still_recognised(m14, first):
    """Upgrade path: metadata in the release root (as the previous version wrote it) is read there."""
    minion = MINIONS[1]
    deploy_to = m14.deploy_to(minion, "wiki")
    running = os.path.basename(os.readlink(os.path.join(deploy_to, "current")))
    for name in METADATA:
        shutil.move(os.path.join(deploy_to, "meta", running, name), os.path.join(deploy_to, "releases", running, name))
    os.rmdir(os.path.join(deploy_to, "meta", running))
    artifact = os.path.join(m14.release_config["artifact_root"], "wiki", f"{running}.tar.gz")
    with open(artifact, "rb") as handle:
        sha = hashlib.sha256(handle.read()).hexdigest()
    again = m14.salt_cli.run("release.install", "wiki", running, f"source=salt://releases/wiki/{running}.tar.gz",
                             f"source_hash=sha256={sha}", minion_tgt=minion)
    assert again.returncode == 0 and again.data["changed"] is False, again


# ---------------------------------------------------------------- finding 5: the first cause leads


def test_a_failed_first_deploy_says_its_health_failure_first(m14, first):
    result, ret = deploy(m14, "sick", "v1.0.0")
    assert result.returncode != 0 and ret["result"] is False, ret
    for minion in MINIONS:
        error = ret["nodes"][minion]["error"]
        assert error.startswith(f"http://127.0.0.1:{m14.ports[minion]}/health.php: HTTP 200, expected 'sick_"), error
        assert error.endswith("; then no previous release to go back to"), error
