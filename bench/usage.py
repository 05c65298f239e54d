"""
What one benchmarked command costs the master: CPU seconds and peak memory.

"The master" is the command the operator runs (``salt-run``, or ``salt -b``
for the baseline) with every process it starts, plus the ``salt-master``
daemons (and the artifact HTTP server when the bench runs one). Each is
started in its own session, so a process belongs to one by its session id
(``/proc/<pid>/stat`` field 6).

- CPU seconds: the command's own rusage from ``wait4`` (it and every child it
  waited for) plus the growth of the daemons' utime+stime+cutime+cstime.
- Peak memory: the largest sum of PSS (proportional set size: a page shared
  by N processes counts 1/N in each, so forked workers are not counted N
  times) over all those processes, sampled every ``SAMPLE_S``.
"""

import os
import signal
import subprocess
import threading

SAMPLE_S = 0.2
TICKS = os.sysconf("SC_CLK_TCK")


class Done:
    """A finished (or killed) command: what ``subprocess.run`` would give, plus its cost."""

    def __init__(self, cmd, returncode, stdout, stderr, timed_out, cpu_s, peak_mb):
        self.args, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        self.timed_out, self.cpu_s, self.peak_mb = timed_out, cpu_s, peak_mb


def run(cmd, timeout_s, daemons=()):
    """
    Run ``cmd`` in a new session; on timeout its whole session is killed and
    ``timed_out`` set. ``daemons``: the session ids of the master's daemons.
    """
    daemons = set(daemons)
    daemon_cpu = _session_cpu(daemons)
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    sampler = _Sampler({process.pid} | daemons)
    sampler.start()
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    # communicate() reaped it; its rusage is in our children's totals.
    sampler.stop()
    own = _children_cpu() - sampler.children_cpu_before
    return Done(cmd, process.returncode, stdout, stderr, timed_out, round(own + _session_cpu(daemons) - daemon_cpu, 2),
                round(sampler.peak_kb / 1024, 1))


def _children_cpu():
    usage = os.times()
    return usage.children_user + usage.children_system


class _Sampler(threading.Thread):
    """Polls the PSS sum of the given sessions until stopped; keeps the peak."""

    def __init__(self, sessions):
        super().__init__(daemon=True)
        self.sessions, self.peak_kb = sessions, 0
        self.children_cpu_before = _children_cpu()
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(pid) for pid in _pids_of(self.sessions)))
            self._stop_event.wait(SAMPLE_S)

    def stop(self):
        self._stop_event.set()
        self.join()


def _stat_fields(pid):
    """``/proc/<pid>/stat`` fields after the command name (which may hold spaces): index 0 is field 3."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pids_of(sessions):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields and int(fields[3]) in sessions:
                found.append(entry)
    return found


def _session_cpu(sessions):
    total = 0
    for pid in _pids_of(sessions) if sessions else ():
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def _pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
