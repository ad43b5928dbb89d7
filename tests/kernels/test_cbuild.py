"""specd_kernels/cbuild.py: a library is named by its source and what that source includes, so editing an
included kernel (specd_kernels/decoder/cpu.c includes the rowscale, rope and attention sources) rebuilds it."""
import shutil

import pytest

from specd_kernels import cbuild

pytestmark = pytest.mark.skipif(shutil.which(cbuild.compiler()) is None, reason="no C compiler")


def test_editing_an_included_file_renames_the_library(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "part.c").write_text("int part(void) { return 1; }\n")
    main = tmp_path / "main" / "cpu.c"
    main.parent.mkdir()
    main.write_text('#include "../lib/part.c"\nint whole(void) { return part() + 1; }\n')
    before = cbuild.library_path(main)
    (tmp_path / "lib" / "part.c").write_text("int part(void) { return 2; }\n")
    assert cbuild.library_path(main) != before
    lib = cbuild.load(main, (("whole", (), cbuild.I32),))
    assert lib is not None and lib.whole() == 3


def test_a_compiler_without_openmp_builds_the_pthread_fallback(tmp_path, monkeypatch):
    """-fopenmp is tried first; a compiler that refuses it still builds the library, without OpenMP."""
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cbuild.compiler()} "$@"\n')
    wrapper.chmod(0o755)
    source = tmp_path / "omp" / "cpu.c"
    source.parent.mkdir()
    source.write_text("int with_openmp(void) {\n#ifdef _OPENMP\n    return 1;\n#else\n    return 0;\n#endif\n}\n")
    monkeypatch.setenv("SPECD_CACHE", str(tmp_path / "cache"))
    assert cbuild.load(source, (("with_openmp", (), cbuild.I32),)).with_openmp() == 1
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("SPECD_CACHE", str(tmp_path / "cache-no-openmp"))
    cbuild.load.cache_clear()
    assert cbuild.load(source, (("with_openmp", (), cbuild.I32),)).with_openmp() == 0
