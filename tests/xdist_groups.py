"""One pytest-xdist worker per ``xdist_group``, under ``-n`` alone.

pytest-xdist's ``--dist loadgroup`` hands the tests of each ``xdist_group`` mark to one worker,
so a module-scoped fixture that compiles for minutes runs once instead of once per worker. Two
things keep that from happening with the README's ``pytest -n auto``, and this plugin mends both:

- ``-n`` without ``--dist`` schedules with ``load``, which ignores the marks. ``pytest_configure``
  turns ``load`` into ``loadgroup`` on the controller (its scheduler is made after configure).
  An explicit ``--dist`` other than ``load`` is left alone.
- The scheduler finds a test's group in its node id, ``<nodeid>@<group>``, which each worker
  appends while collecting. pytest-xdist 3.8 appends it only when the worker's own command line
  said ``--dist loadgroup``, and by assigning ``Item._nodeid``, which pytest 9.2 no longer reads
  (node ids live in ``Item._id`` there). So a worker appends the suffix here, last of every
  ``pytest_collection_modifyitems``, to any grouped test whose id lacks one. With a plain
  ``load`` scheduler the suffix is inert.

Load it with ``-p xdist_groups`` (``tests/`` on ``sys.path``) or register the module, as
``tests/conftest.py`` does.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"


def group_of(item: pytest.Item) -> str | None:
    """The item's group, as pytest-xdist names a test with several marks: sorted, joined by _."""
    names = {str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
             for mark in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) if names else None


def set_nodeid(item: pytest.Item, nodeid: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9.2
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(nodeid)
    else:
        item._nodeid = nodeid


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # the controller's ids come from the workers
        return
    for item in items:
        group = group_of(item)
        if group is not None and not item.nodeid.endswith(f"@{group}"):
            set_nodeid(item, f"{item.nodeid}@{group}")
