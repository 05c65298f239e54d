"""
The web console (``console/``) in real headless Chromium (Debian's chromium +
chromium-driver, Selenium) against a real salt-api serving it (rest_cherrypy
``app``/``static``) on master "mc" with minions mc-web1..2 and a real git
repository: log in, deploy from the page and watch the phases arrive, roll back
through a dropped event stream, a user without rights is refused by the page
and by the server, markup from git and the store stays text, and the browser
logs no error. Screenshots land in tests/artifacts/.
"""

import json
import os
import shutil
import socket
import sqlite3
import time
import urllib.error
import urllib.request

import pytest
from pytestshellutils.utils.ports import get_unused_localhost_port

from tests.conftest import REPO_ROOT, git, make_app_repo, make_file_root, runner_return, start_cluster

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

MINIONS = ("mc-web1", "mc-web2")
ARTIFACTS = os.path.join(REPO_ROOT, "tests", "artifacts")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
EVIL_BRANCH = "<img/src=x/onerror=alert(1)>"  # git refuses spaces in ref names; this form is legal
EVIL_SUBJECT = "<b>bold</b> <img src=x onerror=alert(3)>"
EVIL_AUTHOR = "<img src=x onerror=alert(4)>"
READ = ["release.status", "release.history", "release.stats", "release.refs"]
PILLAR = """\
release:
  rainbow:
    deploy_to: {{ nodes_root }}/mc/{{ grains['id'] }}/rainbow
    user: {{ app_user }}
    shared: [storage]
"""

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMEDRIVER), reason="chromium-driver is not installed")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_app_repo(str(tmp_path_factory.mktemp("console_git") / "rainbow"))
    git(repo.path, "checkout", "-q", "-b", EVIL_BRANCH)
    repo.commit(EVIL_SUBJECT, {"NOTE": "markup in a subject\n"})
    git(repo.path, "checkout", "-q", "master")
    return repo


@pytest.fixture(scope="module")
def mc(salt_factories, repo, nodes_root, tmp_path_factory):
    port = get_unused_localhost_port()
    root = make_file_root(str(tmp_path_factory.mktemp("mc_file_root") / "base"))
    release = {
        "artifact_root": os.path.join(root, "releases"),
        "state_dir": str(tmp_path_factory.mktemp("mc_state")),
        "projects": {"rainbow": {
            "repo": repo.path, "build": ["make dist"], "checks": ["make test"],
            "environments": {"test": {"target": "mc-web*", "batch": 1},
                             "live": {"target": "mc-web*", "production": True},
                             "pro": {"target": "mc-web*"}},
        }},
    }
    # alice may deploy and roll back rainbow on test and live only; viewer may only look.
    acting = {"kwargs": {"project": "rainbow$", "env": "(test|live)$"}}
    overrides = {
        "rest_cherrypy": {"port": port, "host": "127.0.0.1", "disable_ssl": True,
                          "app": os.path.join(REPO_ROOT, "console", "index.html"),
                          "static": os.path.join(REPO_ROOT, "console")},
        "external_auth": {"auto": {
            "alice": [{"@runner": READ + [{"release.deploy": acting}, {"release.rollback": acting},
                                          {"release.unlock": acting}]}],
            "viewer": [{"@runner": READ}],
        }},
        "netapi_enable_clients": ["runner", "runner_async"],
    }
    with start_cluster(salt_factories, "mc", root, release, PILLAR, nodes_root,
                       minion_ids=MINIONS, master_overrides=overrides) as cluster:
        first = cluster.salt_run_cli.run("release.deploy", "rainbow", "env=test", "ref=v1.0.0",
                                         f"author={EVIL_AUTHOR}", "--out=json")
        assert runner_return(first)["result"], first
        api = cluster.master.salt_api_daemon()
        with api.started(start_timeout=120):
            cluster.url = f"http://127.0.0.1:{port}"
            yield cluster
            api.listen_ports.clear()  # see test_triggers: the sweep trips over exiting processes
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1700"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    os.makedirs(ARTIFACTS, exist_ok=True)
    yield driver
    driver.quit()


# ---------------------------------------------------------------- helpers


def wait(driver, condition, timeout_s=60):
    # A redraw between two WebDriver calls leaves stale elements: poll again, as a user would look again.
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def log_in(driver, mc, user):
    driver.get(mc.url + "/app")
    driver.execute_script("sessionStorage.clear()")
    driver.get(mc.url + "/app")
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys("any")  # the auto eauth takes any password
    eauth = driver.find_element(By.ID, "eauth")
    eauth.clear()
    eauth.send_keys("auto")
    driver.find_element(By.ID, "login").click()
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "env")).options) == 3)
    choose(driver, "env", "test")
    wait(driver, lambda d: "v1.0.0" in d.find_element(By.ID, "history").text)
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr[data-minion]")) == 2)
    wait(driver, lambda d: len(Select(d.find_element(By.ID, "ref")).options) > 2)


def choose(driver, select_id, value):
    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def shown_nodes(driver):
    # Read the table in one script: the page redraws it on every event, and elements found in
    # one WebDriver call may be gone by the next (StaleElementReferenceException).
    return driver.execute_script(
        "const shown = {};"
        "for (const row of document.querySelectorAll('#nodes tbody tr[data-minion]'))"
        "  shown[row.dataset.minion] = row.querySelectorAll('td')[1].innerText.trim();"
        "return shown;")


def current(mc, minion):
    link = os.path.join(mc.nodes_root, "mc", minion, "rainbow", "current")
    return os.path.basename(os.readlink(link))


def runs(mc):
    with sqlite3.connect(os.path.join(mc.release_config["state_dir"], "history.db")) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY id")]


def browser_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def assert_no_alert(driver):
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def forged(mc, session, fun, kwarg):
    """A request made by hand with a user's own salt-api session: what the server decides."""
    body = json.dumps([{"client": "runner_async", "fun": fun, "kwarg": kwarg}]).encode()
    request = urllib.request.Request(mc.url + "/", body, {"Content-Type": "application/json",
                                                          "Accept": "application/json", "X-Auth-Token": session})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def session_of(driver):
    return json.loads(driver.execute_script("return sessionStorage.getItem('login')"))["token"]


# ---------------------------------------------------------------- tests


def test_a_viewer_sees_the_nodes_but_every_action_is_refused(mc, browser):
    log_in(browser, mc, "viewer")
    release = current(mc, "mc-web1")
    assert shown_nodes(browser) == {m: current(mc, m) for m in MINIONS} == {m: release for m in MINIONS}
    for button in ("plan", "diff", "rollback", "emergency", "unlock"):
        assert not browser.find_element(By.ID, button).is_enabled(), button
    before = len(runs(mc))
    status, body = forged(mc, session_of(browser), "release.rollback", {"project": "rainbow", "env": "test"})
    assert status == 401, (status, body)
    time.sleep(2)
    assert len(runs(mc)) == before and current(mc, "mc-web1") == release
    browser.save_screenshot(os.path.join(ARTIFACTS, "console-viewer.png"))
    assert browser_errors(browser) == []


def test_markup_from_git_and_the_store_stays_text(mc, browser):
    choose(browser, "ref", EVIL_BRANCH)
    assert EVIL_SUBJECT in browser.find_element(By.ID, "ref-detail").text
    option = Select(browser.find_element(By.ID, "ref")).first_selected_option
    assert option.text == f"branch: {EVIL_BRANCH}"
    history = browser.find_element(By.ID, "history").text
    assert EVIL_AUTHOR in history, (history, browser.find_element(By.ID, "action-error").text,
                                    browser.get_log("browser"))
    assert browser.find_elements(By.TAG_NAME, "img") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#history b, #ref-detail b, #ref b") == []
    assert_no_alert(browser)
    assert browser_errors(browser) == []


def test_deploy_from_the_page_shows_phases_as_they_arrive(mc, browser):
    log_in(browser, mc, "alice")
    before = {m: current(mc, m) for m in MINIONS}
    choose(browser, "ref", "v1.1.0")
    browser.find_element(By.ID, "plan").click()
    wait(browser, lambda d: d.find_element(By.ID, "confirm").is_displayed())
    plan = browser.find_element(By.ID, "confirm-body").text
    assert all(m in plan and before[m] in plan for m in MINIONS), plan
    assert before == {m: current(mc, m) for m in MINIONS}  # the plan changed nothing
    browser.find_element(By.ID, "go").click()
    # Phases show while the run goes on: the first arrives before the final table does.
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#phases .phase"), timeout_s=120)
    assert not browser.find_elements(By.ID, "final")
    wait(browser, lambda d: d.find_elements(By.ID, "final"), timeout_s=180)
    assert browser.find_element(By.ID, "live-state").text == "succeeded"
    final = browser.find_element(By.ID, "final").text
    deployed = {m: current(mc, m) for m in MINIONS}
    assert all(deployed[m] != before[m] and "_v1.1.0_" in deployed[m] and deployed[m] in final for m in MINIONS)
    phases = {c.get_attribute("data-phase") for c in browser.find_elements(By.CSS_SELECTOR, "#phases .phase")}
    assert {"install", "activate"} <= phases, phases
    chips = browser.execute_script(
        "return Array.from(document.querySelectorAll('#phases .phase'))"
        ".map((c) => [c.closest('tr').dataset.minion, c.textContent]);")
    for minion in MINIONS:  # the dry run and the real render are told apart, each shown once
        texts = [text for shown, text in chips if shown == minion]
        assert sum(t.startswith("config check") for t in texts) == 1, texts
        assert sum(t.startswith("configure") for t in texts) <= 1, texts
    wait(browser, lambda d: shown_nodes(d) == deployed)
    assert runs(mc)[-1]["trigger"] == "console" and runs(mc)[-1]["who"] == "alice"
    browser.save_screenshot(os.path.join(ARTIFACTS, "console-deploy.png"))
    assert browser_errors(browser) == []


def test_production_asks_for_its_name_and_the_acl_holds_per_env(mc, browser):
    choose(browser, "env", "live")
    wait(browser, lambda d: d.find_element(By.ID, "production-badge").is_displayed())
    browser.find_element(By.ID, "rollback").click()
    go = browser.find_element(By.ID, "go")
    assert browser.find_element(By.ID, "typed-label").is_displayed() and not go.is_enabled()
    browser.find_element(By.ID, "typed").send_keys("liv")
    assert not go.is_enabled()
    browser.find_element(By.ID, "typed").send_keys("e")
    assert go.is_enabled()
    browser.find_element(By.ID, "cancel").click()
    # pro is not in alice's ACL: disabled on the page, refused by the server.
    choose(browser, "env", "pro")
    wait(browser, lambda d: not d.find_element(By.ID, "rollback").is_enabled())
    status, body = forged(mc, session_of(browser), "release.deploy",
                          {"project": "rainbow", "env": "pro", "ref": "v1.0.0"})
    assert status == 401, (status, body)
    choose(browser, "env", "test")
    assert browser_errors(browser) == []


def test_rollback_through_a_dropped_event_stream(mc, browser):
    wait(browser, lambda d: d.find_element(By.ID, "rollback").is_enabled())
    before = {m: current(mc, m) for m in MINIONS}
    count = len(runs(mc))
    browser.find_element(By.ID, "rollback").click()
    browser.find_element(By.ID, "go").click()
    wait(browser, lambda d: "job" in d.find_element(By.ID, "live-title").text)
    # The stream drops while the rollback runs, and comes back after it ended.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    # Chromium's offline mode keeps an open stream alive: cut it as a dropped connection would,
    # with the page's own error path (its reconnects fail until the network is back).
    browser.execute_script("state.stream.onerror()")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (len(runs(mc)) > count and runs(mc)[-1]["finished_at"]):
        time.sleep(1)
    assert runs(mc)[-1]["kind"] == "rollback" and runs(mc)[-1]["result"] == 1
    # The history row names the Salt job the page was given: how the page finds its run there.
    assert f"(job {runs(mc)[-1]['jid']})" in browser.find_element(By.ID, "live-title").text
    assert browser.find_elements(By.ID, "final") == []  # nothing reached the page meanwhile
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    browser.get_log("browser")  # what the offline spell logged (failed requests) is expected
    wait(browser, lambda d: d.find_elements(By.ID, "final"), timeout_s=60)
    assert browser.find_element(By.ID, "live-state").text == "succeeded"
    back = {m: current(mc, m) for m in MINIONS}
    assert all(back[m] != before[m] and "_v1.0.0_" in back[m] for m in MINIONS), back
    wait(browser, lambda d: shown_nodes(d) == back)
    assert browser.find_elements(By.CSS_SELECTOR, "#phases .phase")  # refilled from the history
    browser.save_screenshot(os.path.join(ARTIFACTS, "console-rollback.png"))
    assert_no_alert(browser)
    assert browser_errors(browser) == []
