"""What the master writes where: health problems without the served body, store
URLs without passwords, private modes, the report's temp file, unlock's arguments."""

import http.server
import os
import stat
import threading

import pytest

import _release_run as runs
import _release_store as store
import release_health as health
import release_safe_fs as safe_fs

LEAK = "db_password=hunter2-do-not-leak"


@pytest.fixture()
def leaky_app():
    """An app whose failing health page prints its config."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"Fatal error: cannot connect ({LEAK})".encode()
            self.send_response(200)
            self.send_header("X-Release", LEAK)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/health"
    server.shutdown()


def test_a_failed_health_check_never_echoes_the_served_body(leaky_app):
    ok, problem = health.check_health(leaky_app, "20260101_r1", retries=1)
    assert not ok
    assert "hunter2" not in problem and LEAK not in problem
    assert "HTTP 200" in problem and "20260101_r1" in problem and "sha256" in problem and "bytes" in problem


@pytest.mark.parametrize("url", [
    "postgresql://release:hunter2@db:5432/release",
    "postgresql://db/release?sslmode=require&password=hunter2",
    "connection to server failed: host=db password=hunter2 dbname=release",
])
def test_store_urls_and_driver_errors_lose_their_password(url):
    assert "hunter2" not in store.safe_url(url)
    assert "db" in store.safe_url(url)


def test_state_dir_and_history_are_private_even_when_they_were_not(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "history.db").touch()
    os.chmod(state / "history.db", 0o644)
    db = store.Store(str(state))
    db.record("unlock", "rainbow", "test", result=True, who="ops")
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    for name in os.listdir(state):
        if name.startswith("history.db"):
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name


def test_the_report_never_follows_a_link_planted_at_its_temp_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    out = tmp_path / "report.html"
    planted = tmp_path / "report.html.tmp"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        safe_fs.write_atomically(str(out), "<html>", tmp=str(planted))
    assert victim.read_text() == "root's file\n" and not out.exists()
    assert planted.is_symlink()  # the planted link is left alone, not unlinked through
    safe_fs.write_atomically(str(out), "<html>")
    assert out.read_text() == "<html>" and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == [
        "report.html.tmp"]


@pytest.mark.parametrize("project, env, said", [
    ("nosuch", "test", "unknown project 'nosuch'"),
    ("rainbow", "nowhere", "has no environment 'nowhere'"),
])
def test_unlock_refuses_an_unknown_project_or_environment(tmp_path, monkeypatch, project, env, said):
    conf = {"state_dir": str(tmp_path / "state"), "projects": {"rainbow": {"environments": {"test": {}}}}}
    monkeypatch.setattr(runs, "master_settings", lambda opts: conf)
    ret = runs.unlock({}, project, env, force=True)
    assert ret["result"] is False and ret["retcode"] == 1 and said in ret["error"]
    assert not os.path.exists(conf["state_dir"])  # nothing opened, nothing recorded
