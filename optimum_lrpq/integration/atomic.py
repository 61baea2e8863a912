"""The one atomic writer: everything is written into a temporary sibling directory, then moved into place.

An interrupted save (an error, Ctrl-C, a killed process) never leaves a directory at the target path that loads as a
complete model: either the previous content stays, or nothing is there. Two ways to move into place:

- `replace=True`: the staged directory replaces the target as a whole (the CLI, `LRPQuantizer.save`);
- `replace=False`: its files are merged into an existing target like `save_pretrained` does (files the save does not
  produce, e.g. an image processor, are kept), with config.json removed first and written last, so that a partial
  merge never loads as a model.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

CONFIG_NAME = "config.json"
# Weight files transformers writes (single file, shards, shard index); stale ones are removed like it does.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$|model\.safetensors\.index\.json$")


class OutputExistsError(FileExistsError):
    pass


def check_output(path: str | os.PathLike, overwrite: bool) -> str:
    """Absolute `path`, after checking it may be replaced (call it before any expensive work)."""
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(target):
        if not overwrite:
            raise OutputExistsError(f"The output directory {path} already exists; pass --overwrite "
                                    "(overwrite=True) to replace it, or choose another output.")
        if not os.path.isdir(target):
            raise OutputExistsError(f"The output path {path} exists and is not a directory.")
    return target


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, *, replace: bool = True, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory next to `path`; on success move its content to `path`.

    `replace=True` replaces an existing `path` whole (only with `overwrite=True`); `replace=False` merges into it.
    On any failure or Ctrl-C the temporary directory is removed and `path` is left as it was.
    """
    target = check_output(path, overwrite) if replace else os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not replace and os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"Provided path ({path}) should be a directory, not a file")
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield staging
        if replace:
            _replace(staging, target, path, overwrite)
        else:
            _merge_into(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_file(path: str | os.PathLike, overwrite: bool) -> str:
    """Absolute `path`, after checking that a file may be written there (call it before any expensive work): not a
    directory, not an existing file unless `overwrite`, and its nearest existing parent a writable directory."""
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(target):
        raise OutputExistsError(f"The output path {path} is a directory; give the file to write, e.g. "
                                f"{os.path.join(os.fspath(path), 'model.onnx')}.")
    if os.path.exists(target) and not overwrite:
        raise OutputExistsError(f"The output file {path} already exists; pass --overwrite (overwrite=True) to "
                                "replace it, or choose another output.")
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputExistsError(f"Cannot write {path}: {parent} is a file, not a directory.")
    if not os.access(parent, os.W_OK):
        raise OutputExistsError(f"Cannot write {path}: no write permission in {parent}.")
    return target


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a file name in a temporary sibling directory of `path`; on success move what was written there next to
    `path` (a writer may add side files named after it, e.g. ONNX external data), the file itself last.

    An existing `path` is replaced only with `overwrite=True`. On any failure or Ctrl-C nothing is moved."""
    target = check_output_file(path, overwrite)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield os.path.join(staging, name)
        written = sorted(os.listdir(staging))
        if name not in written:
            raise FileNotFoundError(f"nothing was written to {path}")
        for filename in [f for f in written if f != name] + [name]:
            os.replace(os.path.join(staging, filename), os.path.join(parent, filename))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace(staging: str, target: str, path: str | os.PathLike, overwrite: bool) -> None:
    if os.path.exists(target):
        if not overwrite:
            raise OutputExistsError(f"The output directory {path} appeared while writing; pass overwrite to "
                                    "replace it.")
        parent, name = os.path.split(target)
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.replace(target, os.path.join(old, name))
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _merge_into(staging: str, target: str) -> None:
    """A missing target is a single rename. Into an existing directory: drop its config.json first (from then on it
    does not load as a model), replace the weights and other files (removing stale weight shards, as
    `save_pretrained` does), then move config.json in last."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    new = set(os.listdir(staging))
    if CONFIG_NAME in new and os.path.exists(os.path.join(target, CONFIG_NAME)):
        os.remove(os.path.join(target, CONFIG_NAME))
    for existing in os.listdir(target):
        if _WEIGHT_FILE.match(existing) and existing not in new:
            os.remove(os.path.join(target, existing))
    for filename in sorted(new - {CONFIG_NAME}) + ([CONFIG_NAME] if CONFIG_NAME in new else []):
        destination = os.path.join(target, filename)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(staging, filename), destination)
