"""
salt-release: ship a git ref to a Salt-managed web cluster, in batches, with an
atomic switch on every node.

The eleven ``salt-run release.*`` commands. Each is a few lines that hand Salt's
loader globals (``__opts__``, ``__salt__``, the progress channel) to one
module per pipeline:

- ``_release_deploy``: fetch -> screen -> build -> check -> package -> stage
  -> plan -> delta -> config_check -> install -> rollout -> prune
- ``_release_rollback``: plan -> choose -> switch_back (or, in an emergency,
  locate -> [choose ->] switch_all)
- ``_release_recover``: survey -> finish | send_back -> settle
- ``_release_run``: the run they share (lock, step, reporter, events, the
  return and history: ``conclude``)
- ``_release_queries``: status, history, stats, report; ``_release_webhook``:
  the git webhook; ``_release_metrics``: the Prometheus metrics;
  ``_release_console``: refs (the web console's picker)

Master configuration (see README.md and ``_utils/release_settings.py``)::

    release:
      artifact_root: /srv/salt/releases
      state_dir: /var/cache/salt/master/release
      projects:
        rainbow:
          repo: https://git.example.com/rainbow.git
          build: ["make dist"]
          checks: ["make test"]
          environments:
            test: {target: 'G@env:test', tgt_type: compound, batch: '100%'}
"""

import functools

import _release_console as console
import _release_deploy as deploy_pipeline
import _release_metrics as metrics_lib
import _release_queries as queries
import _release_recover as recover_pipeline
import _release_rollback as rollback_pipeline
import _release_run as runs
import _release_webhook as hook

__virtualname__ = "release"
__all__ = ["deploy", "rollback", "recover", "unlock", "status", "history", "stats", "report", "metrics",
           "webhook", "refs"]


def __virtual__():
    return __virtualname__


def _answers_errors(command):
    """
    A command whose DeployError (say, an unreachable store) is a failed return,
    not a traceback. Defined here, not in a sibling: Salt injects
    ``__jid_event__`` into the globals of the function it calls.
    """

    @functools.wraps(command)
    def answer(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except runs.DeployError as exc:
            return {"result": False, "error": str(exc), "retcode": 1}

    return answer


def _loader():
    """
    What the pipelines need of Salt's loader, passed explicitly; ``jid`` is the
    Salt job this call runs as (Salt injects ``__jid__``), so that the history
    row of a ``runner_async`` call names the job its caller was given.
    """
    return {"opts": __opts__, "functions": __salt__, "progress": _progress, "jid": globals().get("__jid__")}


def _progress(message):
    """A live progress line: ``salt-run`` prints it as it comes."""
    jid_event = globals().get("__jid_event__")
    if jid_event is not None:
        jid_event.fire_event({"message": message}, "progress")


@_answers_errors
def deploy(project, env, ref, author=None, wait=0, trigger="cli", test=False, force=False, **kwargs):
    """
    Deploy a git ref (branch, tag or commit) of a project to an environment.
    ``test=True`` prints the plan (waves, batches, each node's current and new
    release, the load-balancer steps) and changes nothing. A commit whose
    release a rollback marked bad is only deployed again with ``force=True``.
    ``diff=True`` is a dry run: it builds, lets each node render its config
    and reports per node the files and their sha256 (changed, new, unchanged,
    removed); it installs nothing, leaves nothing staged, publishes nothing
    and records a ``plan`` run that no statistic counts.

    CLI Example:

    .. code-block:: bash

        salt-run release.deploy rainbow env=test ref=v1.1.0
        salt-run release.deploy rainbow env=pro ref=master author=alice wait=60
        salt-run release.deploy rainbow env=pro ref=v1.2.0 test=True
        salt-run release.deploy rainbow env=pro ref=v1.2.0 diff=True
    """
    if test:
        return deploy_pipeline.plan_only(runs.begin(_loader(), project, env, ref, author, "plan", {}, record=False))
    diff = bool(kwargs.get("diff"))
    run = runs.begin(_loader(), project, env, ref, author, trigger, kwargs, kind="plan" if diff else "deploy")
    run.force = bool(force)
    run.expect_commit = kwargs.get("expect_commit")
    return deploy_pipeline.deploy(run, wait, diff=diff)


@_answers_errors
def rollback(project, env, to=None, emergency=False, author=None, wait=0, trigger="cli", **kwargs):
    """
    Send every node of an environment back to the release it ran before its
    current one (never one marked bad), or to release ``to`` (refused, with no
    node touched, unless every node has it). The releases left are marked bad.
    Normal mode goes through the environment's waves and batches with drain,
    switch, reload, health check and put-back; ``emergency=True`` switches
    every node at once with no drain. Holds the deploy lock; returns like
    ``release.deploy``.

    CLI Example:

    .. code-block:: bash

        salt-run release.rollback rainbow env=pro
        salt-run release.rollback rainbow env=pro to=rainbow_pro_v1.1.0_master_2026-11-26_101500_alice
        salt-run release.rollback rainbow env=pro emergency=True
    """
    run = runs.begin(_loader(), project, env, to or "previous", author, trigger, kwargs, kind="rollback")
    run.to = to
    return rollback_pipeline.rollback(run, wait, emergency=emergency)


@_answers_errors
def recover(project, env, mode="finish", author=None, **kwargs):
    """
    Finish or undo the newest deploy or rollback of an environment after its
    runner (or its master) died mid-rollout. Reads the run's journal from the
    store and each node's real state (``release.list``, the load balancer's
    status), takes over the dead run's lock (recorded), then either switches
    the remaining nodes to the run's release (``mode=finish``) or sends the
    switched ones back (``mode=rollback``), through the same rollout; drained
    nodes that are healthy go back into the load balancer. The dead run is
    closed as failed, "recovered by" this one. Run it on either master when
    both share a PostgreSQL store.

    CLI Example:

    .. code-block:: bash

        salt-run release.recover rainbow env=pro
        salt-run release.recover rainbow env=pro mode=rollback
    """
    run = runs.begin(_loader(), project, env, f"recover {mode}", author, "cli", kwargs, kind="recover")
    return recover_pipeline.recover(run, mode)


@_answers_errors
def unlock(project, env, force=False):
    """
    Break a deploy lock left behind by a run that died. Refused while the
    holder may still be running (its pid is alive on this master, or the lock
    is younger than ``lock_ttl_s`` on another host) unless ``force=True``.
    Every break is recorded and fired as an event.

    CLI Example:

    .. code-block:: bash

        salt-run release.unlock rainbow env=pro
        salt-run release.unlock rainbow env=pro force=True
    """
    return runs.unlock(__opts__, project, env, force)


@_answers_errors
def status(project, env, **kwargs):
    """
    Per node of the environment: the current release, the previous one, the
    rollback target, bad marks and what else is kept; nodes out of step with
    the rest (or that did not answer) are flagged.

    CLI Example:

    .. code-block:: bash

        salt-run release.status rainbow env=pro
    """
    return queries.status(_loader(), project, env, kwargs)


@_answers_errors
def history(project, env=None, limit=20, phases=False, **kwargs):
    """
    The latest runs of a project (deploys, rollbacks, unlocks, refused
    attempts), newest first; ``phases=True`` adds each run's node phases.

    CLI Example:

    .. code-block:: bash

        salt-run release.history rainbow env=pro limit=5 phases=True
    """
    return queries.history(__opts__, project, env, limit, phases)


@_answers_errors
def stats(project, env=None, days=30, **kwargs):
    """
    Deployment statistics over the last ``days`` days: deploys, failures,
    rollbacks, success rate, median and 95th-percentile duration, the mean
    time to recover (failed deploy to the next good release) and ``recoveries``,
    how many recoveries that mean is over. Dry runs (``diff=True``) count nowhere.

    CLI Example:

    .. code-block:: bash

        salt-run release.stats rainbow env=pro days=90
    """
    return queries.stats(__opts__, project, env, days)


@_answers_errors
def report(project, out, env=None, days=30, **kwargs):
    """
    Write one self-contained HTML page (inline SVG, no script, no external
    asset): the deploy timeline, the last run's node phases as a Gantt chart,
    the release spread per environment (asked of the nodes now) and the
    statistics.

    CLI Example:

    .. code-block:: bash

        salt-run release.report rainbow out=/var/www/reports/rainbow.html
    """
    return queries.report(__opts__, project, out, env, days)


@_answers_errors
def metrics(out=None, **kwargs):
    """
    The deployment metrics in Prometheus's text format (what every run writes
    to ``release:metrics_file`` for node_exporter's textfile collector), built
    from the store: written to ``out`` or ``release:metrics_file`` when either
    is set, and returned under ``metrics``.

    CLI Example:

    .. code-block:: bash

        salt-run release.metrics
        salt-run release.metrics out=/var/lib/prometheus/node-exporter/salt_release.prom
        salt-run --out=json release.metrics | jq -r .metrics
    """
    conf = runs.master_settings(__opts__)
    return metrics_lib.on_demand(conf, runs.records(conf), out)


@_answers_errors
def refs(project=None, limit=100, fetch=True, **kwargs):
    """
    What the web console shows besides status, history and stats: every
    project's environments (production flag, deploy lock holder) and, for
    ``project``, its branches and tags, newest first, with each one's commit,
    author, date and subject (``fetch=False``: as the mirror has them).

    CLI Example:

    .. code-block:: bash

        salt-run release.refs
        salt-run release.refs rainbow limit=20
    """
    return console.refs(__opts__, project, limit, fetch)


@_answers_errors
def webhook(project, body="", headers=None, gitlab_token_sha256=None, **kwargs):
    """
    Deploy what a verified git push asks for; called by the reactor on
    ``salt/netapi/hook/release/<project>`` (see ``salt/reactor/release_webhook.sls``).
    Refusals fire ``release/<project>/webhook/refused`` and leave a history row.

    CLI Example (what the reactor runs):

    .. code-block:: bash

        salt-run release.webhook rainbow body='{"ref": "refs/heads/dev", ...}' \\
            headers='{"X-Hub-Signature-256": "sha256=...", "X-Github-Event": "push"}'
    """
    return hook.handle(__opts__, project, body, headers, gitlab_token_sha256, deploy)
