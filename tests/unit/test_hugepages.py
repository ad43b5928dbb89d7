"""server/hugepages.py: when `specd` re-executes itself with glibc's huge-page tunable."""
from __future__ import annotations

from server.hugepages import TUNABLE, hugepage_env, thp_mode


def test_sets_the_tunable_where_glibc_and_the_kernel_support_it():
    env = hugepage_env({"PATH": "/bin"}, (2, 36), "madvise")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert hugepage_env({}, (2, 35), "always")["GLIBC_TUNABLES"] == TUNABLE


def test_keeps_other_tunables():
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise")
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


def test_nothing_to_do_when_set_unsupported_or_turned_off():
    assert hugepage_env({"GLIBC_TUNABLES": TUNABLE}, (2, 36), "madvise") is None  # the re-executed process
    assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise") is None  # user's choice
    assert hugepage_env({}, (2, 34), "madvise") is None  # the tunable is new in glibc 2.35
    assert hugepage_env({}, None, "madvise") is None  # musl or unknown libc
    assert hugepage_env({}, (2, 36), "never") is None
    assert hugepage_env({}, (2, 36), None) is None  # no THP in this kernel
    assert hugepage_env({"SPECD_HUGEPAGES": "0"}, (2, 36), "madvise") is None


def test_reads_the_kernel_mode(tmp_path, monkeypatch):
    import server.hugepages as hp

    mode_file = tmp_path / "enabled"
    mode_file.write_text("always [madvise] never\n")
    monkeypatch.setattr(hp, "THP_MODE", mode_file)
    assert thp_mode() == "madvise"
    monkeypatch.setattr(hp, "THP_MODE", tmp_path / "missing")
    assert thp_mode() is None


def test_a_failed_restart_leaves_the_process_running(monkeypatch, capsys):
    import server.hugepages as hp

    monkeypatch.setattr(hp, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hp, "thp_mode", lambda: "madvise")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("SPECD_HUGEPAGES", raising=False)

    def refuse(*args):
        raise PermissionError("no exec here")

    monkeypatch.setattr(hp.os, "execve", refuse)
    hp.reexec_with_hugepages()  # returns instead of raising
    assert "continuing without huge pages" in capsys.readouterr().err
