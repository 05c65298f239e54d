"""
Build commands run as the build user, in a clean environment, and cannot read
the master's secrets or write outside their tree: real processes (bubblewrap,
setpriv, a real system user), under both sandbox modes.
"""

import os
import shutil
import stat
import tempfile

import pytest

import _release_artifact as artifact
import _release_sandbox as sandbox

SECRET = "s3cr3t-webhook-key"
MODES = ["bwrap", "none"] if shutil.which("bwrap") else ["none"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="builds drop from root to the build user")


@pytest.fixture
def master():
    """A master's layout in a world-traversable place, secrets in their usual spots, naive modes."""
    top = tempfile.mkdtemp(prefix="release-sbx-")
    os.chmod(top, 0o755)
    paths = {name: os.path.join(top, name) for name in ("etc", "pki", "cache", "artifacts", "state")}
    for folder, mode in (("etc", 0o700), ("pki", 0o700), ("cache", 0o700), ("artifacts", 0o755), ("state", 0o755)):
        os.makedirs(paths[folder], mode=mode)
    os.makedirs(os.path.join(paths["state"], "git", "other.git"), mode=0o755)
    os.makedirs(os.path.join(paths["state"], "builds"), mode=0o755)
    files = {
        "config": os.path.join(paths["etc"], "master"),
        "pki": os.path.join(paths["pki"], "master.pem"),
        "history": os.path.join(paths["state"], "history.db"),
        "mirror": os.path.join(paths["state"], "git", "other.git", "config"),
    }
    for path in files.values():
        with open(path, "w") as handle:
            handle.write(f"{SECRET}\n")
        os.chmod(path, 0o644)
    tree = os.path.join(paths["state"], "builds", "tree")
    os.makedirs(tree)
    with open(os.path.join(tree, "Makefile"), "w") as handle:
        handle.write("all:\n\techo built > BUILD\n")
    opts = {"conf_file": files["config"], "pki_dir": paths["pki"], "cachedir": paths["cache"]}
    conf = {"state_dir": paths["state"], "artifact_root": paths["artifacts"]}
    yield dict(paths, files=files, tree=tree, opts=opts, conf=conf)
    shutil.rmtree(top)


def _jail(master, mode):
    return sandbox.jail_for({"build_sandbox": mode}, master["conf"], master["opts"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("target", ["config", "pki", "history", "mirror"])
def test_a_build_cannot_read_the_masters_secrets(master, mode, target):
    path = master["files"][target]
    command = f"cat {path}"
    with pytest.raises(artifact.ArtifactError) as caught:
        artifact.run_commands([command], master["tree"], "build", 30, jail=_jail(master, mode))
    assert SECRET not in caught.value.tail
    with open(path) as handle:
        assert handle.read() == f"{SECRET}\n"


@pytest.mark.parametrize("mode", MODES)
def test_a_build_cannot_write_outside_its_tree(master, mode):
    targets = [os.path.join(master["state"], "pwned"), os.path.join(master["artifacts"], "pwned"),
               os.path.join(os.path.dirname(master["tree"]), "pwned"), "/etc/pwned-by-build",
               master["files"]["history"]]
    for target in targets:
        with pytest.raises(artifact.ArtifactError):
            artifact.run_commands([f"echo x > {target}"], master["tree"], "build", 30, jail=_jail(master, mode))
    assert not any(os.path.exists(t) for t in targets[:-1])
    with open(master["files"]["history"]) as handle:
        assert handle.read() == f"{SECRET}\n"


@pytest.mark.parametrize("mode", MODES)
def test_a_build_runs_as_the_build_user_in_a_clean_env_and_root_gets_the_tree_back(master, mode, monkeypatch):
    monkeypatch.setenv("MASTER_SECRET", SECRET)
    out = artifact.run_commands(["make -s", "id -un; env | sort"], master["tree"], "build", 30,
                                jail=_jail(master, mode))
    assert out.splitlines()[0] == sandbox.DEFAULT_USER
    assert SECRET not in out
    assert {line.split("=")[0] for line in out.splitlines()[1:]} <= {"PATH", "HOME", "TMPDIR", "LANG", "PWD",
                                                                    "SHLVL", "_", "OLDPWD"}
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in out
    built = os.path.join(master["tree"], "BUILD")
    with open(built) as handle:
        assert handle.read() == "built\n"
    for path in (master["tree"], built):
        assert os.lstat(path).st_uid == 0 and os.lstat(path).st_gid == 0
    assert stat.S_IMODE(os.stat(master["state"]).st_mode) == 0o700


def test_without_bwrap_an_exposed_secret_place_refuses_the_build(master):
    os.chmod(master["etc"], 0o755)
    with pytest.raises(artifact.ArtifactError, match=f"{master['etc']} is readable by other users"):
        artifact.run_commands(["touch ran"], master["tree"], "build", 30, jail=_jail(master, "none"))
    assert not os.path.exists(os.path.join(master["tree"], "ran"))


@pytest.mark.parametrize("mode", MODES)
def test_a_build_over_its_time_is_killed_with_its_children(master, mode):
    marker = os.path.join(master["tree"], "late")
    command = f"(sleep 3; touch {marker}) & sleep 30"
    with pytest.raises(artifact.ArtifactError, match="ran over 1 s"):
        artifact.run_commands([command], master["tree"], "build", 1, jail=_jail(master, mode))
    import time

    time.sleep(3.5)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("mode", MODES)
def test_output_is_capped_and_says_so(master, mode):
    jail = dataclass_replace(_jail(master, mode), output_kib=1)
    out = artifact.run_commands(["seq 1 100000"], master["tree"], "build", 30, jail=jail)
    assert out.splitlines()[-1] == "[output cut to its last 1 KiB]"
    assert out.splitlines()[-2] == "100000"


def dataclass_replace(jail, **changes):
    import dataclasses

    return dataclasses.replace(jail, **changes)


@pytest.mark.skipif("bwrap" not in MODES, reason="bubblewrap is not installed")
def test_bwrap_hides_the_secret_places_even_when_their_modes_are_open(master):
    for folder in ("etc", "pki", "cache"):
        os.chmod(master[folder], 0o755)
    for path in master["files"].values():
        command = f"cat {path}"
        with pytest.raises(artifact.ArtifactError) as caught:
            artifact.run_commands([command], master["tree"], "build", 30, jail=_jail(master, "bwrap"))
        assert SECRET not in caught.value.tail
    # The same reads as the build user without the sandbox would succeed: the tmpfs is what stops them.
    out = artifact.run_commands([f"cat {master['files']['config']}"], master["tree"], "build", 30,
                                jail=sandbox.Jail(user=sandbox.DEFAULT_USER, mode="none"))
    assert SECRET in out
