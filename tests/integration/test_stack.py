"""
Stack handlers on real services: PHP-FPM with OPcache behind nginx, and
Tomcat, started as the app user (www-data) on loopback ports. Deploys go
through the real runner on master "m5"; rollbacks are ``release.activate``
of the earlier release through Salt.
"""

import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import AppRepo, git, start_cluster
from tests.integration.stack_services import (
    Fpm,
    Nginx,
    TomcatBase,
    app_ids,
    as_app_user,
    children,
    get,
    proc_uids,
    wait_port,
)

MINION = "m5-web1"
REQUESTS = 50
# Every release's files get this mtime on the node: far past OPcache's
# file_update_protection, and the same for A and B (Jasper's stale-class case).
FIXED_MTIME = 1577836800  # 2020-01-01
PHP_PROJECTS = ("phpreset", "phpreload", "phpoff")
LOAD_MAX_REQUESTS = 3000
LOAD_MAX_SECONDS = 120

PHP_A = {"public/index.php": '<?php echo "release A\\n";\n'}
PHP_B = {"public/index.php": '<?php echo "release B\\n";\n', "public/only_b.php": '<?php echo "only in B\\n";\n'}
JSP_A = {"web/index.jsp": '<%@ page contentType="text/plain" %>release A\n'}
JSP_B = {"web/index.jsp": '<%@ page contentType="text/plain" %>release B\n'}


def make_repo(path, first, second):
    os.makedirs(path)
    git(path, "init", "-q", "-b", "master")
    repo = AppRepo(path)
    repo.commit("release A", first)
    git(path, "tag", "v1.0.0")
    repo.commit("release B", second)
    git(path, "tag", "v2.0.0")
    return repo


class Stack:
    def __init__(self, cluster, nodes, site_ports, fpms, tomcat):
        self.cluster = cluster
        self.nodes = nodes
        self.site_ports = site_ports
        self.fpms = fpms
        self.tomcat = tomcat

    def deploy_to(self, project):
        return os.path.join(self.nodes, MINION, project)

    def release_dir(self, project, name):
        return os.path.join(self.deploy_to(project), "releases", name)


def php_stack(project, fpm):
    listen = f"127.0.0.1:{fpm.port}"
    if project == "phpreset":
        return {"kind": "php-fpm", "listen": listen, "method": "reset"}
    if project == "phpreload":
        return {"kind": "php-fpm", "listen": listen, "method": "reload", "pid": fpm.pid_file}
    return None  # phpoff: no handler, to show what goes wrong without one


def pillar_sls(nodes, fpms, tomcat):
    release = {}
    for project in PHP_PROJECTS + ("jsp",):
        release[project] = {"deploy_to": os.path.join(nodes, MINION, project), "user": "www-data"}
    for project in PHP_PROJECTS:
        if php_stack(project, fpms[project]):
            release[project]["stack"] = php_stack(project, fpms[project])
    release["jsp"]["stack"] = {
        "kind": "tomcat", "catalina_base": tomcat.base, "app": "ROOT", "port": f"127.0.0.1:{tomcat.port}",
        "start": tomcat.start_command, "stop": tomcat.stop_command,
        "environment": tomcat.environment(), "timeout": 120,
    }
    return "release: " + json.dumps(release, indent=1) + "\n"


def master_config(file_root, state_dir, php_repo, jsp_repo):
    def project(repo):
        return {"repo": repo.path, "build": [], "checks": [], "environments": {"test": {"target": MINION}}}

    projects = {name: project(php_repo) for name in PHP_PROJECTS}
    projects["jsp"] = project(jsp_repo)
    return {"artifact_root": os.path.join(file_root, "releases"), "state_dir": state_dir, "projects": projects}


@pytest.fixture(scope="module")
def stack(salt_factories, file_root, tmp_path_factory):
    # Not under pytest's tmp dirs: those are 0700 and www-data must read the releases.
    root = tempfile.mkdtemp(prefix="m5-", dir="/tmp")
    os.chmod(root, 0o755)
    nodes = os.path.join(root, "nodes")
    os.makedirs(nodes)
    services = []
    tomcat = None
    try:
        fpms = {p: Fpm(os.path.join(root, p), get_unused_localhost_port()) for p in PHP_PROJECTS}
        services.extend(fpms.values())
        site_ports = {p: get_unused_localhost_port() for p in PHP_PROJECTS}
        services.append(Nginx(os.path.join(root, "nginx"), [
            (site_ports[p], os.path.join(nodes, MINION, p, "current", "public"), fpms[p].port)
            for p in PHP_PROJECTS
        ]))
        tomcat = TomcatBase(os.path.join(root, "tomcat"), get_unused_localhost_port(),
                            get_unused_localhost_port(), os.path.join(nodes, MINION, "jsp", "current", "web"))
        git_root = tmp_path_factory.mktemp("stack-git")
        config = master_config(
            file_root, str(tmp_path_factory.mktemp("stack-state")),
            make_repo(str(git_root / "php"), PHP_A, PHP_B), make_repo(str(git_root / "jsp"), JSP_A, JSP_B),
        )
        with start_cluster(salt_factories, "m5", file_root, config, pillar_sls(nodes, fpms, tomcat),
                           nodes, minion_ids=(MINION,)) as cluster:
            yield Stack(cluster, nodes, site_ports, fpms, tomcat)
    finally:
        if tomcat:
            tomcat.shutdown()
        for service in reversed(services):
            service.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def backdate(path):
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(os.path.join(folder, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)


def deploy(stack, project, ref):
    """Deploy through the real runner, then backdate the new release's files on the node."""
    result, ret = stack.cluster.run("release.deploy", project, "env=test", f"ref={ref}")
    assert result.returncode == 0 and ret["result"], ret
    backdate(stack.release_dir(project, ret["release"]))
    return ret["release"]


def roll_back(stack, project, name):
    """Activate an earlier release through Salt; returns the node's activate return."""
    result = stack.cluster.salt_cli.run("release.activate", project, name, "env=test", minion_tgt=MINION)
    assert result.returncode == 0, result
    assert result.data["release"] == name and result.data["changed"], result.data
    return result.data


def bodies(port, path="/index.php", count=REQUESTS):
    answers = [get(port, path) for _ in range(count)]
    return [body.strip() if status == 200 else f"HTTP {status}: {body.strip()}" for status, body in answers]


def uid_of(path):
    return os.lstat(path).st_uid


# ---------------------------------------------------------------- PHP


@pytest.mark.parametrize("project", ["phpreset", "phpreload"])
def test_php_serves_each_switched_release(stack, project):
    port = stack.site_ports[project]
    release_a = deploy(stack, project, "v1.0.0")
    assert bodies(port) == ["release A"] * REQUESTS

    deploy(stack, project, "v2.0.0")
    assert bodies(port) == ["release B"] * REQUESTS
    assert bodies(port, "/only_b.php", 5) == ["only in B"] * 5

    activated = roll_back(stack, project, release_a)
    assert activated["reload"]["kind"] == "php-fpm", activated
    assert bodies(port) == ["release A"] * REQUESTS
    assert get(port, "/only_b.php")[0] == 404


def test_php_without_handler_keeps_serving_the_old_release(stack):
    """The control: the same switch with no stack handler serves stale code."""
    port = stack.site_ports["phpoff"]
    deploy(stack, "phpoff", "v1.0.0")
    assert bodies(port) == ["release A"] * REQUESTS

    release_b = deploy(stack, "phpoff", "v2.0.0")
    assert os.readlink(os.path.join(stack.deploy_to("phpoff"), "current")) == f"releases/{release_b}"
    assert bodies(port) == ["release A"] * REQUESTS
    assert "only in B" not in bodies(port, "/only_b.php", 5)


def test_php_reload_under_load_loses_no_request(stack):
    port = stack.site_ports["phpreload"]
    deploy(stack, "phpreload", "v1.0.0")
    seen, failures, done = [], [], threading.Event()

    def load():
        started = time.monotonic()
        while not done.is_set() and len(seen) < LOAD_MAX_REQUESTS and time.monotonic() - started < LOAD_MAX_SECONDS:
            try:
                status, body = get(port, "/index.php")
            except OSError as exc:
                failures.append(repr(exc))
                continue
            seen.append(body.strip())
            if status != 200 or body.strip() not in ("release A", "release B"):
                failures.append(f"HTTP {status}: {body.strip()[:200]}")
            time.sleep(0.005)

    worker = threading.Thread(target=load)
    started = time.monotonic()
    worker.start()
    try:
        deploy(stack, "phpreload", "v2.0.0")
        time.sleep(1)
    finally:
        done.set()
        worker.join()
    elapsed = time.monotonic() - started
    print(f"\nreload under load: {len(seen)} requests in {elapsed:.1f} s, {len(failures)} failed, "
          f"{seen.count('release A')} A then {seen.count('release B')} B")
    assert failures == []
    assert "release A" in seen and seen[-1] == "release B"
    assert seen == sorted(seen)  # A, A, ..., B, B: no old answer once the new one was served


def test_php_services_and_writable_files_belong_to_the_app_user(stack):
    uid, _ = app_ids()
    for project, fpm in stack.fpms.items():
        master = fpm.proc.pid
        workers = children(master)
        assert workers, f"{project}: FPM has no workers"
        for pid in [master] + workers:
            assert proc_uids(pid) == [uid] * 4, (project, pid)
        for name in ("fpm.pid", "fpm.log"):
            assert uid_of(os.path.join(fpm.dir, name)) == uid
    deploy_to = stack.deploy_to("phpreset")
    script = os.path.join(deploy_to, ".stack", "opcache-reset.php")
    assert uid_of(script) == 0 and stat.S_IMODE(os.lstat(script).st_mode) == 0o644
    assert uid_of(os.path.dirname(script)) == 0
    release = os.path.realpath(os.path.join(deploy_to, "current"))
    for folder, dirs, files in os.walk(release):
        for name in dirs + files:
            info = os.lstat(os.path.join(folder, name))
            assert info.st_uid == 0 and not info.st_mode & 0o022, os.path.join(folder, name)


# ---------------------------------------------------------------- Tomcat


def work_sources(tomcat):
    """Every generated servlet source Jasper left in work/ for the ROOT context."""
    found = {}
    for folder, _, files in os.walk(os.path.join(tomcat.base, "work", "Catalina", "localhost", "ROOT")):
        for name in files:
            if name.endswith(".java"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    found[name] = handle.read()
    return found


def switch_and_restart_by_hand(stack, name):
    """What a deployer without the handler does: switch the link and restart Tomcat, keeping work/."""
    tomcat, current = stack.tomcat, os.path.join(stack.deploy_to("jsp"), "current")
    os.symlink(f"releases/{name}", current + ".tmp")
    os.replace(current + ".tmp", current)
    env = dict(tomcat.environment(), PATH=os.environ["PATH"])
    for command in (tomcat.stop_command, tomcat.start_command):
        subprocess.run(["/bin/sh", "-c", command], env=env, cwd="/", check=True, timeout=120,
                       capture_output=True, **as_app_user())
    wait_port(tomcat.port)


def test_tomcat_rollback_compiles_afresh_as_the_app_user(stack):
    tomcat = stack.tomcat
    release_a = deploy(stack, "jsp", "v1.0.0")
    assert bodies(tomcat.port, "/", 5) == ["release A"] * 5
    release_b = deploy(stack, "jsp", "v2.0.0")
    assert bodies(tomcat.port, "/", 5) == ["release B"] * 5
    # B's compiled JSP now carries the same mtime A's JSP has: without a clean work/, a restart serves B.
    leftover = os.path.join(tomcat.base, "temp", "leftover")
    subprocess.run(["touch", leftover], check=True, **as_app_user())

    activated = roll_back(stack, "jsp", release_a)
    steps = [step["step"] for step in activated["reload"]["steps"]]
    assert steps == ["stop", "stopped", "clean", "start", "started"], activated
    assert "work/Catalina/localhost/ROOT" in activated["reload"]["steps"][2]["removed"]
    assert bodies(tomcat.port, "/", REQUESTS) == ["release A"] * REQUESTS
    sources = work_sources(tomcat)
    assert list(sources) == ["index_jsp.java"]
    assert "release A" in sources["index_jsp.java"] and "release B" not in sources["index_jsp.java"]
    assert not os.path.exists(leftover)

    uid, _ = app_ids()
    assert proc_uids(tomcat.jvm_pid()) == [uid] * 4
    for name in ("work", "temp", "logs", "run"):
        for folder, dirs, files in os.walk(os.path.join(tomcat.base, name)):
            for entry in [folder] + [os.path.join(folder, n) for n in dirs + files]:
                assert uid_of(entry) == uid, entry
    for folder, dirs, files in os.walk(os.path.join(tomcat.base, "conf")):
        for entry in [folder] + [os.path.join(folder, n) for n in dirs + files]:
            assert uid_of(entry) == 0 and not os.lstat(entry).st_mode & 0o022, entry

    # The control: a restart that keeps work/ serves A's compiled JSP for B (same mtime) ...
    switch_and_restart_by_hand(stack, release_b)
    assert bodies(tomcat.port, "/", 5) == ["release A"] * 5
    # ... and activating B again runs the handler (it never ran for B), which mends it.
    activated = stack.cluster.salt_cli.run("release.activate", "jsp", release_b, "env=test", minion_tgt=MINION)
    assert activated.data["changed"] is False and activated.data["reload"]["kind"] == "tomcat", activated
    assert bodies(tomcat.port, "/", 5) == ["release B"] * 5
