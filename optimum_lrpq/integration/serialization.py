"""`save_pretrained` / `push_to_hub` of lrpq-quantized models: atomic writes and the lrpq model card.

transformers has no hook for adding files to what `save_pretrained` writes, and `push_to_hub` always replaces
README.md with the card already on the Hub or its generic template (`add_model_tags` only reaches the front matter).
So every lrpq-quantized model instance (quantized in memory, loaded pre-quantized, or quantized at load time) gets
its own `save_pretrained` and `push_to_hub` (instance attributes; the model class and transformers are untouched)
that call the class's implementation and then:

- write through the one atomic writer (`atomic.staged_output`, merging like `save_pretrained`), so an interrupted
  save never leaves a directory that loads as a valid but partial (or mixed old/new) model;
- add README.md, the lrpq model card (an existing README.md that optimum-lrpq did not write is kept);
- push the saved folder, card included, in one commit (`hub.upload_folder`).
"""

from __future__ import annotations

import os
import tempfile
import types
from typing import Any

from torch import nn

from .atomic import staged_output
from .hub import upload_folder
from .model_card import CARD_NAME, is_lrpq_card, write_model_card

_HUB_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "commit_description", "create_pr", "revision")


def attach_save_methods(model: nn.Module) -> None:
    """Give a quantized model instance the card-writing, atomic `save_pretrained` and `push_to_hub`."""
    model.save_pretrained = types.MethodType(save_pretrained, model)
    model.push_to_hub = types.MethodType(push_to_hub, model)


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                    is_main_process: bool = True, **kwargs: Any) -> None:
    """`PreTrainedModel.save_pretrained`, written atomically and with the lrpq model card (README.md).

    Accepts the same arguments. Files already in `save_directory` that the save does not produce (an image
    processor, a README.md written by hand) are kept, as with transformers. With `push_to_hub=True` the folder is
    then uploaded (`repo_id`, `token`, `private`, `commit_message`, `create_pr`, `revision` are honoured).
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
    hub = {key: kwargs.pop(key) for key in _HUB_ARGUMENTS if key in kwargs}
    if not is_main_process or kwargs.get("distributed_checkpoint"):
        # Other ranks (and sharded distributed checkpoints) follow transformers' own protocol unchanged.
        return type(self).save_pretrained(self, os.fspath(save_directory), is_main_process=is_main_process, **kwargs)
    save_quantized(self, save_directory, **kwargs)
    if push_to_hub:
        repo_id = hub.pop("repo_id", None) or os.path.basename(os.path.abspath(os.fspath(save_directory)))
        upload_folder(save_directory, repo_id, **hub)


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, *, replace: bool = False,
                   overwrite: bool = False, repo_id: str | None = None, tags: list[str] | None = None,
                   base_model: str | None = None, **kwargs: Any) -> None:
    """Save `model` and its card into `save_directory` atomically.

    By default the files are merged into an existing directory (`save_pretrained` semantics); `replace=True`
    replaces it whole and refuses an existing one unless `overwrite=True`. `kwargs` go to `save_pretrained`.
    """
    target = os.path.abspath(os.path.expanduser(os.fspath(save_directory)))
    card_allowed = replace or _may_write_card(os.path.join(target, CARD_NAME))
    with staged_output(save_directory, replace=replace, overwrite=overwrite) as staging:
        type(model).save_pretrained(model, staging, **kwargs)
        if card_allowed:
            write_model_card(model, staging, base_model=base_model, repo_id=repo_id, tags=tags)


def _may_write_card(path: str) -> bool:
    """Write the card unless the target already has a README.md that optimum-lrpq did not write."""
    if not os.path.exists(path):
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        return is_lrpq_card(f.read())


def push_to_hub(self: nn.Module, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                revision: str | None = None, create_pr: bool = False, max_shard_size: int | str | None = "50GB",
                tags: list[str] | None = None, base_model: str | None = None) -> Any:
    """`PreTrainedModel.push_to_hub` that uploads the lrpq model card with the weights, in one commit.

    Same arguments and return value (the `CommitInfo`) as transformers', plus `base_model` (the float model's Hub
    id, default: the one recorded at quantization) for the card. The card's loading snippet names `repo_id`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        card_tags = list(dict.fromkeys([*(self.model_tags or []), *(tags or [])]))
        save_quantized(self, folder, repo_id=repo_id, tags=card_tags, base_model=base_model,
                       max_shard_size=max_shard_size)
        return upload_folder(folder, repo_id, commit_message=commit_message, commit_description=commit_description,
                             private=private, token=token, revision=revision, create_pr=create_pr)
