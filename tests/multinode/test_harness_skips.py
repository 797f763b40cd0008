"""The harness skips only where it cannot run here (not root, no apt-get); an install that is tried and
fails is an error. Fake apt-get scripts on PATH stand in for the real one: nothing is installed."""
from __future__ import annotations

import pytest

import mn_harness as mh

MISSING = {"omoe-test-no-such-command": "omoe-test-no-such-package"}


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """as_root(rc): run as root with an apt-get on PATH that exits rc (and installs nothing)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setattr(mh, "POLICY_RC", tmp_path / "policy-rc.d")  # never the machine's own
    monkeypatch.setattr(mh, "_apt_updated", True)  # no `apt-get update` round

    def as_root(rc: int | None):
        monkeypatch.setattr(mh, "_is_root", lambda: True)
        if rc is not None:
            apt = bin_dir / "apt-get"
            apt.write_text(f"#!/bin/sh\necho \"fake apt-get $*\"\nexit {rc}\n")
            apt.chmod(0o755)
        monkeypatch.setenv("PATH", str(bin_dir))  # no real apt-get behind it
        return bin_dir
    return as_root


def test_not_root_is_a_reason_to_skip(monkeypatch):
    monkeypatch.setattr(mh, "_is_root", lambda: False)
    why = mh.ensure_commands(MISSING)
    assert why is not None
    assert why.startswith("omoe-test-no-such-command not found, and not root")
    assert "apt-get install omoe-test-no-such-package" in why


def test_no_apt_get_is_a_reason_to_skip(fake_apt):
    fake_apt(None)
    assert mh.ensure_commands(MISSING) == ("omoe-test-no-such-command not found, and no apt-get on this machine "
                                           "to install omoe-test-no-such-package")


def test_a_failed_install_is_an_error_not_a_skip(fake_apt):
    fake_apt(100)
    with pytest.raises(mh.InstallFailed, match=r"apt-get install omoe-test-no-such-package failed \(rc=100\): "
                                                r"fake apt-get install"):
        mh.ensure_commands(MISSING)
    assert not mh.POLICY_RC.exists()  # the no-service-start policy it added for the install is gone again


def test_an_install_that_leaves_the_command_missing_is_an_error(fake_apt):
    fake_apt(0)
    with pytest.raises(mh.InstallFailed, match=r"still missing after apt-get install: \['omoe-test-no-such-command'\]"):
        mh.ensure_commands(MISSING)


def test_nothing_to_install_needs_neither_root_nor_apt(monkeypatch):
    monkeypatch.setattr(mh, "_is_root", lambda: False)
    assert mh.ensure_commands({"sh": "dash"}) is None
