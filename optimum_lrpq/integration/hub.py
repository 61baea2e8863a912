"""Uploading a saved model folder to the Hugging Face Hub in one commit."""

from __future__ import annotations

import os
from typing import Any

DEFAULT_COMMIT_MESSAGE = "Upload LRP-QViT quantized model"


def upload_folder(folder: str | os.PathLike, repo_id: str, *, commit_message: str | None = None,
                  commit_description: str | None = None, private: bool | None = None,
                  token: bool | str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
    """Upload a saved model folder (weights, config, card, ...) to `repo_id` in one commit; return the CommitInfo.

    Unlike transformers' `push_to_hub`, the folder's own README.md (the lrpq model card) is what the Hub gets.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                             commit_description=commit_description)


def upload_model_folder(directory: str | os.PathLike, repo_id: str, *, token: str | None = None,
                        private: bool | None = None, commit_message: str | None = None) -> str:
    """Upload a saved quantized model folder (weights, config, processor, README.md card, plot) in one commit.

    Unlike transformers' `push_to_hub`, this keeps the card written by `write_model_card`. Returns the commit URL.
    """
    return upload_folder(directory, repo_id, token=token, private=private, commit_message=commit_message).commit_url
