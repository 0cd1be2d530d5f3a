"""A pytest plugin: each benchmark's result written as soon as its test ends, one JSON line each.

    GPUBP_BENCH_LINES=<file> python -m pytest -p benchmark_lines ... --benchmark-json <report>

pytest-benchmark writes its ``--benchmark-json`` report only as the session ends (and, after a
SIGINT, still then); a process that dies hard (a segfault, a CUDA fault that aborts,
``os._exit``) or hangs in C code until it is SIGKILLed writes none, and every benchmark it had
finished is lost with it. With ``GPUBP_BENCH_LINES`` set (``LINES_ENV``) this plugin appends,
when each test's call ends (its ``extra_info`` complete) and again after its teardown for any
benchmark added there, one line per benchmark that test timed to that file: the benchmark as
pytest-benchmark's report holds it (``Metadata.as_dict``: name, fullname, group, params, param,
extra_info, options, stats with its rounds' data), plus the ``datetime`` it was written, and
flushes and fsyncs it, so what finished survives whatever then happens to the process. A
benchmark whose timed function raised is left out, as the report leaves it out.

bench/first_contact.py runs each group of headline benchmarks with it, into
``bench_first_contact_<group>.jsonl`` beside the group's JSON, and bench/gpu_summary.py
(``read_benchmarks``) takes from that file the benchmarks the group's JSON lacks (all of them
where the JSON is missing or cut off), naming each in the summary's ``benchmarks_recovered``.

Without the variable it writes nothing: loaded or not, pytest-benchmark runs as it always does.
"""

from __future__ import annotations

import datetime
import os
import warnings

LINES_ENV = "GPUBP_BENCH_LINES"


class BenchmarkLines:
    """Appends each finished benchmark of the session to ``path`` (``write_new``)."""

    def __init__(self, config, path: str):
        self.config = config
        self.path = path
        self.seen = 0  # pytest-benchmark's list of benchmarks only grows: those before this are written
        self.broken = False  # set once writing failed: the rest of the session writes nothing more

    def pytest_runtest_logreport(self, report):
        if report.when in ("call", "teardown") and not self.broken:
            try:
                self.write_new()
            except Exception as exc:  # noqa: BLE001  (a safety net must never cost the run it guards)
                # It reads pytest-benchmark's internals (its session, Metadata.as_dict): another
                # version of it may lack them. Then the JSON alone records the run, as without this.
                self.broken = True
                warnings.warn(f"{LINES_ENV}: benchmark lines not written ({type(exc).__name__}: {exc}); "
                              "the --benchmark-json report still is", UserWarning, stacklevel=1)

    def write_new(self) -> None:
        session = getattr(self.config, "_benchmarksession", None)  # where its benchmark fixture finds it
        if session is None:
            return
        benchmarks = session.benchmarks
        # As pytest-benchmark's report: not one whose timed function raised, nor one without rounds.
        finished = [bench for bench in benchmarks[self.seen:] if bench and not bench.has_error]
        self.seen = len(benchmarks)
        if not finished:
            return
        from pytest_benchmark.utils import safe_dumps  # what pytest-benchmark writes its report with

        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        text = "".join(safe_dumps({**bench.as_dict(include_data=True), "datetime": when}, ensure_ascii=True) + "\n"
                       for bench in finished)
        with open(self.path, "a") as lines:  # one write: a kill mid-write cuts one line at most
            lines.write(text)
            lines.flush()
            os.fsync(lines.fileno())


def pytest_configure(config):
    path = os.environ.get(LINES_ENV)
    if path:
        config.pluginmanager.register(BenchmarkLines(config, path), "gpubp_benchmark_lines")
