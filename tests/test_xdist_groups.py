"""tests/xdist_groups.py: under -n alone, the tests of one xdist_group run on one worker."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("xdist")

TESTS = Path(__file__).parent

# A module fixture every test of the group uses records the worker that computed it, as the
# compile fixtures of ONE_WORKER_FIXTURES would be computed.
SANDBOX_CONFTEST = textwrap.dedent("""
    import pytest

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(config, items):
        for item in items:
            if "shared" in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group("compiled"))
""")
SANDBOX_TESTS = textwrap.dedent("""
    import os
    import pytest

    @pytest.fixture(scope="module")
    def shared(tmp_path_factory):
        worker = os.environ["PYTEST_XDIST_WORKER"]
        with open(os.environ["SANDBOX_LOG"], "a") as log:
            log.write(worker + "\\n")
        return worker

    @pytest.mark.parametrize("i", range(8))
    def test_grouped(shared, i):
        assert shared == os.environ["PYTEST_XDIST_WORKER"]
""")


def run_sandbox(tmp_path, *options):
    (tmp_path / "conftest.py").write_text(SANDBOX_CONFTEST)
    (tmp_path / "test_sandbox.py").write_text(SANDBOX_TESTS)
    log = tmp_path / "fixture.log"
    env = {**os.environ, "SANDBOX_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-v", "-p", "no:cacheprovider",
                           "-o", "addopts=", *options, str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return log.read_text().split(), done.stdout


@pytest.mark.slow
def test_n_alone_computes_a_groups_module_fixture_on_one_worker(tmp_path):
    workers, output = run_sandbox(tmp_path, "-p", "xdist_groups")
    assert len(workers) == 1, f"the grouped fixture ran on {workers}:\n{output}"
    assert output.count("PASSED test_sandbox.py::test_grouped") == 8 and "@compiled" in output, output


@pytest.mark.slow
def test_the_check_fails_where_the_scheduler_ignores_groups(tmp_path):
    # pytest-xdist's plain -n (load): the fixture is computed on both workers.
    workers, output = run_sandbox(tmp_path)
    assert sorted(workers) == ["gw0", "gw1"], output


def test_the_suite_collects_its_grouped_tests_without_pytest_xdist():
    # conftest.py marks the tests of ONE_WORKER_FIXTURES with xdist_group; with pytest-xdist off,
    # --strict-markers refused that mark until conftest.py registered it itself.
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                           "-p", "no:cacheprovider", str(TESTS / "test_kernels_compile.py")],
                          cwd=TESTS.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "test_kernels_compile.py::test_cmake_manifest_matches_the_shipped_sources" in done.stdout, done.stdout
