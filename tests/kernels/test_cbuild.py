"""kernels/cbuild.py: a library is named by its source and what that source includes, so editing an
included kernel (kernels/decoder/cpu.c includes the rowscale, rope and attention sources) rebuilds it."""
import shutil

import pytest

from kernels import cbuild

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
