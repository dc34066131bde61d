"""stream.imaging._inside (a claim check stays under the imaging root) agrees with pathlib's
reading of it, ``path == root or root in path.parents``, which it computes without the parents."""

from __future__ import annotations

import itertools
from pathlib import Path

from stream.imaging import _inside

PATHS = [
    "/", "//", "/data", "/data/", "/data/x", "/data/x/y.nii.gz", "/datax", "/datax/y", "/dat", "//data",
    "//data/x", "/data/./x", "/data/../data/x", "/other/data/x", ".", "data", "data/x", "x", "../data",
    "/data/x/../y", "/tmp/root/VP-0000/seg.nii.gz", "/tmp/root", "/tmp/rootx/a", "/tmp",
]


def test_inside_agrees_with_pathlib_parents() -> None:
    for path_text, root_text in itertools.product(PATHS, repeat=2):
        path, root = Path(path_text), Path(root_text)
        assert _inside(path, root) == (path == root or root in path.parents), (path_text, root_text)
