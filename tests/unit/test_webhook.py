"""Pure unit tests of the webhook decisions (_runners/_release_webhook.py)."""

import base64
import json

import pytest

import _release_webhook as hook

GITHUB_SECRET = "It's a Secret to Everybody"
CONFIG = {
    "webhook": {"secret": "s3cret", "max_body_bytes": 4096},
    "environments": {"dev": {}, "test": {}, "pre": {}, "pro": {}, "live": {"production": True}},
    "triggers": {
        "dev": {"branches": ["dev"]},
        "test": {"branches": ["release/*"]},
        "pre": {"tags": ["v*"]},
        "pro": {"tags": ["v*"]},
        "live": {"tags": ["v*"]},
    },
}


def github_headers(body, secret="s3cret", event="push", delivery="d-1"):
    return {"X-Hub-Signature-256": hook.github_signature(secret, body),
            "X-Github-Event": event, "X-Github-Delivery": delivery}


def test_github_documented_example_vector():
    assert hook.github_signature(GITHUB_SECRET, b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )
    headers = {"X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"}
    assert hook.verify(headers, b"Hello, World!", {"webhook": {"secret": GITHUB_SECRET}}) == "github"


@pytest.mark.parametrize("signature", ["sha256=" + "0" * 64, "", "sha1=abc", "sha256=757107ea"])
def test_wrong_github_signature_is_refused_without_echoing_it(signature):
    with pytest.raises(hook.Refused) as exc:
        hook.verify({"X-Hub-Signature-256": signature}, b"Hello, World!", {"webhook": {"secret": GITHUB_SECRET}})
    assert exc.value.reason == "bad-signature"
    assert GITHUB_SECRET not in str(exc.value) and (not signature or signature not in str(exc.value))


def test_unsigned_and_secretless_requests_are_refused():
    with pytest.raises(hook.Refused) as exc:
        hook.verify({}, b"{}", CONFIG)
    assert exc.value.reason == "unsigned"
    with pytest.raises(hook.Refused) as exc:
        hook.verify(github_headers(b"{}"), b"{}", {})
    assert exc.value.reason == "no-secret"


def test_gitlab_secret_token_is_checked_by_its_digest():
    assert hook.verify({}, b"{}", CONFIG, gitlab_token_sha256=hook.token_digest("s3cret")) == "gitlab"
    with pytest.raises(hook.Refused):
        hook.verify({}, b"{}", CONFIG, gitlab_token_sha256=hook.token_digest("guess"))


def test_gitlab_signing_token_standard_webhooks():
    key = base64.b64encode(b"k" * 32).decode()
    config = {"webhook": {"secret": f"whsec_{key}"}}
    body = b'{"object_kind": "push"}'
    signature = hook.standard_signature(f"whsec_{key}", "msg-1", "1700000000", body)
    headers = {"Webhook-Id": "msg-1", "Webhook-Timestamp": "1700000000",
               "Webhook-Signature": f"v1,bm90IGl0 {signature}"}
    assert hook.verify(headers, body, config, now=1700000010) == "gitlab"
    with pytest.raises(hook.Refused) as exc:
        hook.verify(headers, body, config, now=1700009999)
    assert exc.value.reason == "stale"
    with pytest.raises(hook.Refused):
        hook.verify(dict(headers, **{"Webhook-Id": "msg-2"}), body, config, now=1700000010)


def test_size_limit_and_malformed_json():
    with pytest.raises(hook.Refused) as exc:
        hook.check_size(b"x" * 4097, CONFIG)
    assert exc.value.reason == "too-large"
    hook.check_size(b"x" * 4096, CONFIG)
    for body in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(hook.Refused) as exc:
            hook.parse_payload(body, {})
        assert exc.value.reason == "malformed"
    form = b"payload=" + json.dumps({"ref": "refs/heads/dev"}).encode()
    assert hook.parse_payload(form, {"Content-Type": "application/x-www-form-urlencoded"})["ref"] == "refs/heads/dev"


def test_a_body_salt_trimmed_on_the_bus_is_too_large_not_bad_signature():
    with pytest.raises(hook.Refused, match="trimmed on Salt's event bus") as exc:
        hook.read_push("rainbow", b"VALUE_TRIMMED", github_headers(b"VALUE_TRIMMED"), {"rainbow": CONFIG})
    assert exc.value.reason == "too-large"
    body = b'{"ref": "refs/heads/dev"}'
    with pytest.raises(hook.Refused) as exc:
        hook.check_size(body, CONFIG, {"Content-Length": str(len(body) + 1)})
    assert exc.value.reason == "too-large"
    hook.check_size(body, CONFIG, {"Content-Length": str(len(body))})


def test_pings_other_events_and_deletions_are_ignored():
    with pytest.raises(hook.Ignored, match="ping"):
        hook.pushed_ref("github", {"X-Github-Event": "ping"}, {"zen": "x"})
    with pytest.raises(hook.Ignored, match="not a push"):
        hook.pushed_ref("github", {"X-Github-Event": "issues"}, {})
    with pytest.raises(hook.Ignored, match="deleted"):
        hook.pushed_ref("github", {"X-Github-Event": "push"}, {"ref": "refs/heads/dev", "deleted": True})
    assert hook.pushed_ref("gitlab", {"X-Gitlab-Event": "Tag Push Hook"}, {"ref": "refs/tags/v2"}) == (
        "tag", "v2", "refs/tags/v2")
    assert hook.pushed_ref("github", {"X-Github-Event": "push"}, {"ref": "refs/heads/release/2.0"}) == (
        "branch", "release/2.0", "refs/heads/release/2.0")


def test_refs_map_to_environments_and_production_needs_auto():
    assert hook.environments_for(CONFIG, "branch", "dev") == ["dev"]
    assert hook.environments_for(CONFIG, "branch", "release/2.0") == ["test"]
    assert hook.environments_for(CONFIG, "branch", "feature/x") == []
    # live says production: true and has no auto: true; pro is only a name, not production
    assert hook.environments_for(CONFIG, "tag", "v1.2.0") == ["pre", "pro"]
    auto = dict(CONFIG, triggers=dict(CONFIG["triggers"], live={"tags": ["v*"], "auto": True}))
    assert hook.environments_for(auto, "tag", "v1.2.0") == ["live", "pre", "pro"]


@pytest.mark.parametrize("name", ["pro", "prod", "production", "live"])
def test_production_is_the_flag_never_the_name(name):
    assert not hook.is_production({})
    assert not hook.is_production({"production": "yes"})  # only a real true
    config = {"environments": {name: {"production": True}}, "triggers": {name: {"tags": ["v*"]}}}
    assert hook.environments_for(config, "tag", "v1") == []
    config["environments"][name] = {}
    assert hook.environments_for(config, "tag", "v1") == [name]


def test_unknown_or_bad_project_is_refused():
    for name in ("nope", "../etc", "", "a/b"):
        with pytest.raises(hook.Refused) as exc:
            hook.check_project(name, {"rainbow": CONFIG})
        assert exc.value.reason == "unknown-project"


def test_a_delivery_is_claimed_once_by_id_and_by_body(tmp_path):
    body = b'{"ref": "refs/heads/dev"}'
    first = hook.delivery_keys(github_headers(body, delivery="d-1"), body)
    assert hook.claim_delivery(str(tmp_path), "rainbow", first)
    assert not hook.claim_delivery(str(tmp_path), "rainbow", first)
    # the same signed body under a new delivery id is a replay
    replayed = hook.delivery_keys(github_headers(body, delivery="d-2"), body)
    assert not hook.claim_delivery(str(tmp_path), "rainbow", replayed)
    # the failed claim above must not have left d-2 claimed
    other = b'{"ref": "refs/heads/dev", "after": "1"}'
    fresh = hook.delivery_keys(github_headers(other, delivery="d-2"), other)
    assert hook.claim_delivery(str(tmp_path), "rainbow", fresh)
    hook.forget_delivery(str(tmp_path), "rainbow", first)
    assert hook.claim_delivery(str(tmp_path), "rainbow", first)


def test_read_push_names_pusher_and_envs():
    body = json.dumps({"ref": "refs/heads/release/2.0", "after": "A" * 40, "pusher": {"name": "alice"}}).encode()
    push = hook.read_push("rainbow", body, github_headers(body), {"rainbow": CONFIG})
    assert (push["sender"], push["kind"], push["ref"], push["author"], push["envs"], push["delivery"]) == (
        "github", "branch", "release/2.0", "alice", ["test"], "d-1")
    assert (push["full_ref"], push["after"]) == ("refs/heads/release/2.0", "a" * 40)
