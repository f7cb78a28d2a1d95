"""Reading a bundle: ``read_bundle`` (libhdf5 in the parsing process, contents back over a pipe) against the
same parse in this process (``format.reader.read_bundle_in_process``), on the shipped 18 MB model.

The parsing process is started before timing (a process pays that once, ≈ 0.5 s: ``test_cold_start`` sees it),
so the ratio is what the isolation costs per read: the child's parse plus the copy of every array through
the pipe. ``report.py`` prints both rows of the group side by side.
"""

from __future__ import annotations

import pytest

from ptycho_runtime import format as fmt
from ptycho_runtime.format.reader import read_bundle_in_process

from ._common import REPO

SHIPPED = REPO / "models" / "realistic-zoneplate-n64-g2.h5"
GROUP = "bundle read (shipped 18 MB model)"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is not in this checkout")
@pytest.mark.parametrize("where", ["parsing_process", "in_process"])
def test_read_bundle(benchmark, where):
    read = fmt.read_bundle if where == "parsing_process" else read_bundle_in_process
    read(SHIPPED)  # the parsing process started, the file in the page cache
    benchmark.group = GROUP
    contents = benchmark(read, SHIPPED)
    assert contents.params["N"] == 64 and ("onnx", "diffraction_to_obj") in contents.graphs
    benchmark.extra_info.update({"file_mb": SHIPPED.stat().st_size / 1e6, "where": where})
