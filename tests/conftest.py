"""Shared fixtures (tiny models, isolated caches, Chromium, throwaway PostgreSQL databases) and the CI rule.

CI rule: with ``CI=true`` in the environment a skipped test is a failure, unless it is marked ``gpu`` (the
only thing CI's machine cannot provide). Everything else a test needs is installed by ``make test``, so a skip
there means a broken set-up, and it must not pass unnoticed.

PostgreSQL: the first test that asks for it starts one throwaway cluster for the session (``initdb`` in a
temp folder, ``pg_ctl start`` on a free port on 127.0.0.1, as the ``postgres`` user when running as root); each
test gets a fresh database that is dropped afterwards, and the cluster is stopped and deleted at the end.
Under ``make test`` (pytest-xdist) each test process is a session of its own, with its own cluster.
Without the server binaries (``apt-get install -y postgresql``) those tests skip outside CI and fail in it.
"""

from __future__ import annotations

import itertools
import os
import shutil

import pytest

from feedback_ui.pg_cluster import PostgresCluster, find_postgres_bin
from rlhf.testing import build_tiny_model


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


# CI: no silent skips


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _forbid_skip(report, node) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and node.get_closest_marker("gpu") is None:
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (only tests marked gpu may skip there): {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if in_ci():
        _forbid_skip(report, item)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if in_ci():  # a module that skips itself while being imported
        _forbid_skip(report, collector)
    return report


# models and caches


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Every test runs torch on one thread: the tiny models' matrices gain nothing from a second one, and on a
    2-core machine shared with the processes some tests launch, a second thread only adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama causal LM + local tokenizer saved with save_pretrained."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep caches and TensorBoard logs of every test inside its tmp folder."""
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "rlhf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# Chromium


def find_chromium() -> str | None:
    """Debian's Chromium on PATH (``chromium``, ``chromium-browser``), else /usr/bin/chromium; None if absent."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium_path():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH or at /usr/bin/chromium: apt-get install -y chromium (make test does)")
    return path


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser(chromium_path):
    """Debian's Chromium (found by find_chromium), driven by Playwright; never a downloaded build."""
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


# PostgreSQL


@pytest.fixture(scope="session")
def postgres_cluster():
    """One throwaway PostgreSQL cluster for the session (started on first use, stopped and deleted at the end)."""
    bindir = find_postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql "
                    "(make test does)")  # fmt: skip
    cluster = PostgresCluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request, tmp_path):
    """Makes fresh, empty databases on the parameter's backend: ``new_db()`` -> a SQLite file path or a
    PostgreSQL URL (dropped after the test)."""
    if request.param == "sqlite":
        numbers = itertools.count()
        yield lambda: str(tmp_path / f"db{next(numbers)}.db")
        return
    cluster = request.getfixturevalue("postgres_cluster")
    made = []

    def make() -> str:
        made.append(cluster.new_database())
        return made[-1]

    yield make
    for url in made:
        cluster.drop_database(url)


@pytest.fixture
def db_url(new_db):
    """A fresh, empty database, once on SQLite and once on PostgreSQL (a file path or a URL)."""
    return new_db()
