"""
Read a cProfile of one ``salt-run`` back as the pipeline's steps.

A step is any function ``_release_run.step`` called (fetch, build, install,
rollout...), so the table follows ``STEPS`` of whatever pipeline ran, with
no list kept here. cProfile's default clock is wall time: a step's seconds
include what it waited for (git, the minions).
"""

import io
import os
import pstats


def summarise(prof_path, wall_s, text_path):
    """``{"wall_s", "steps": {step: s}, "text": path}``; writes the steps and the top functions to ``text_path``."""
    stats = pstats.Stats(prof_path)
    steps = {}
    for (_, _, name), (_, _, _, cumulative, callers) in stats.stats.items():
        from_step = any(c[2] == "step" and c[0].endswith("_release_run.py") for c in callers)
        if from_step and not name.startswith("__"):
            steps[name] = steps.get(name, 0.0) + cumulative
    lines = [f"{os.path.basename(text_path)}: {wall_s:.2f} s wall of the whole salt-run command", "",
             f"{'step':<16}{'s':>8}"]
    lines += [f"{name:<16}{seconds:>8.2f}" for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1])]
    lines += [f"{'(not in a step)':<16}{wall_s - sum(steps.values()):>8.2f}", "", ""]
    buffer = io.StringIO()
    pstats.Stats(prof_path, stream=buffer).sort_stats("cumulative").print_stats(40)
    with open(text_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + buffer.getvalue())
    return {"wall_s": round(wall_s, 2), "steps": {k: round(v, 2) for k, v in steps.items()}, "text": text_path}
