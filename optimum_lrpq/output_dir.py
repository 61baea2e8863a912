"""Atomic output directories: write everything into a temporary sibling, then rename it into place.

An interrupted save (an error, Ctrl-C, a killed process) never leaves a directory at the target path that looks
like a complete model: either the previous content stays, or nothing is there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


class OutputExistsError(FileExistsError):
    pass


def check_output(path: str | os.PathLike, overwrite: bool) -> str:
    """Absolute `path`, after checking it may be written (call it before any expensive work)."""
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(target):
        if not overwrite:
            raise OutputExistsError(f"The output directory {path} already exists; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another output.")
        if not os.path.isdir(target):
            raise OutputExistsError(f"The output path {path} exists and is not a directory.")
    return target


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, overwrite: bool) -> Iterator[str]:
    """Yield a temporary directory next to `path`; on success rename it to `path` (replacing it if `overwrite`).

    On any failure or Ctrl-C the temporary directory is removed and `path` is left as it was.
    """
    target = check_output(path, overwrite)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        if os.path.exists(target):
            if not overwrite:
                raise OutputExistsError(f"The output directory {path} appeared while writing; pass overwrite to "
                                        "replace it.")
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(target, os.path.join(old, name))
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
