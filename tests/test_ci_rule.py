"""The CI rule of tests/conftest.py: under CI=true a skipped test fails unless it is marked gpu."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

TESTS = """
import pytest

def test_skips_itself():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="widget absent")
def test_skipped_by_a_marker():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="no CUDA device")
def test_needs_a_gpu():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False

def test_runs():
    pass
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    return pytester


def test_under_ci_a_skip_fails_and_names_its_reason(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(test_inner=TESTS)
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines([
        "*skipped under CI=true (only tests marked gpu may skip there): no widget here*",
        "*skipped under CI=true (only tests marked gpu may skip there): widget absent*",
    ])  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_under_ci_a_module_that_skips_itself_fails(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    inner.makepyfile(test_inner='import pytest\npytest.skip("no backend", allow_module_level=True)\n')
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*: no backend*"])


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_are_skips(inner, monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    inner.makepyfile(test_inner=TESTS)
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == pytest.ExitCode.OK


def test_chromium_is_found_on_path(tmp_path, monkeypatch):
    from conftest import find_chromium

    fake = tmp_path / "chromium-browser"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() == str(fake)
