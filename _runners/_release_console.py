"""
Master side: what the web console (``console/``, served by salt-api) asks
for besides status, history and stats: ``refs``, the projects with their
environments (production flag, lock holder) and, for one project, the
branches and tags of its repository with each one's commit, author, date and
subject, for the deploy picker. Read-only: it refreshes the project's mirror,
nothing else.
"""

import _release_run as runs
import _release_source as source

# One line per ref; for an annotated tag the starred (peeled) fields are its commit's.
FIELDS = ("refname", "objectname", "*objectname", "authorname", "*authorname",
          "committerdate:iso-strict", "*committerdate:iso-strict", "subject", "*subject")
FORMAT = "%00".join(f"%({field})" for field in FIELDS)


def refs(opts, project, limit, fetch):
    """
    ``{projects: {name: {env: {production, lock}}}}``; with a project, also its
    ``branches`` and ``tags`` (newest first, each ``{name, commit, author, date,
    subject}``), fetched first unless ``fetch`` is false.
    """
    conf = runs.master_settings(opts)
    if project and project not in conf["projects"]:
        return {"result": False, "error": f"unknown project {project!r}", "retcode": 1}
    ret = {"result": True, "projects": environments(conf, [project] if project else sorted(conf["projects"])),
           "retcode": 0}
    if project:
        ret.update(git_refs(conf, project, int(limit), fetch))
    return ret


def environments(conf, projects):
    """Each project's environments: production or not, and who holds its deploy lock (no token)."""
    locks = runs.records(conf).locks()
    return {
        project: {
            env: {"production": bool(settings.get("production")),
                  "lock": runs.public_owner(locks.read(project, env)) or None}
            for env, settings in sorted(conf["projects"][project]["environments"].items())
        }
        for project in projects
    }


def git_refs(conf, project, limit, fetch):
    """The branches and tags of the project's mirror, refreshed first when ``fetch``."""
    stale = None
    if not fetch:
        repo = source.mirror(conf["state_dir"], project)
    else:
        try:
            repo = source.update_mirror(conf["state_dir"], project, conf["projects"][project]["repo"])
        except source.SourceError as exc:
            # A deploy may be fetching into the same mirror right now: list what it already has.
            repo, stale = source.mirror(conf["state_dir"], project), str(exc)
    listed = repo.git.for_each_ref("--sort=-creatordate", f"--format={FORMAT}", "refs/heads", "refs/tags")
    found = {"branches": [], "tags": []}
    for line in filter(None, listed.splitlines()):
        kind, entry = _entry(line.split("\0"))
        if len(found[kind]) < limit:
            found[kind].append(entry)
    return dict(found, stale=stale)


def _entry(values):
    field = dict(zip(FIELDS, values, strict=True))

    def peeled(name):
        return field[f"*{name}"] or field[name]

    refname = field["refname"]
    kind = "tags" if refname.startswith("refs/tags/") else "branches"
    return kind, {"name": refname.split("/", 2)[2], "commit": peeled("objectname"),
                  "author": peeled("authorname"), "date": peeled("committerdate:iso-strict"),
                  "subject": peeled("subject")}
