"""The stat-time size rule: tar-like callers get true sizes, scanners (ls -l) fetch nothing more."""

from __future__ import annotations

from dicomfuse.core.paths import DicomPath
from dicomfuse.core.sizes import StatProbePolicy


def p(name: str) -> DicomPath:
    return DicomPath.parse(f"/s/1.1/1.2/{name}.dcm")


def test_tar_like_caller_gets_every_size():
    rule = StatProbePolicy()
    for n in ("1.3", "1.4", "1.5"):
        assert rule.should_fetch(100, p(n))
        assert rule.should_fetch(100, p(n))  # a second stat of the same file
        rule.opened(100, p(n))


def test_scanner_gets_one_fetch_per_folder():
    rule = StatProbePolicy()
    assert rule.should_fetch(200, p("1.3"))
    assert not rule.should_fetch(200, p("1.4"))
    assert not rule.should_fetch(200, p("1.5"))
    assert rule.should_fetch(300, p("1.4"))  # another process is not affected
    assert rule.should_fetch(200, DicomPath.parse("/s/1.1/1.9/1.6.dcm"))  # nor another folder


def test_unknown_caller_never_fetches_and_state_is_bounded():
    rule = StatProbePolicy(max_entries=3)
    assert not rule.should_fetch(None, p("1.3"))
    for caller in range(10):
        rule.should_fetch(caller, p("1.3"))
    assert len(rule._pending) == 3
