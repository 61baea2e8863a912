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


# Exception classes (by name, anywhere in the MRO) of HTTP clients for "the Hub could not be reached".
_NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "NetworkError", "TimeoutException", "TransportError",
                             "ProxyError", "SSLError"})


def upload_failure_message(folder: str | os.PathLike, repo_id: str, err: BaseException) -> str:
    """One line for a failed upload of the saved folder `folder` (kept where it is) to `repo_id`: what failed, why,
    and what to do (unset HF_HUB_OFFLINE, log in, or upload the folder later with `hf upload`)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    folder = os.fspath(folder)
    later = f"upload the folder later with `hf upload {repo_id} {folder}`"
    reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    response = getattr(err, "response", None) if isinstance(err, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    if isinstance(err, OfflineModeIsEnabled):
        fix = f"HF_HUB_OFFLINE is set: unset it where the Hub is reachable, or {later}"
    elif isinstance(err, LocalTokenNotFoundError) or status in (401, 403):
        fix = f"Log in with `hf auth login` (or set HF_TOKEN to a token with write access to {repo_id}), then {later}"
    elif isinstance(err, (ConnectionError, TimeoutError)) or any(
            cls.__name__ in _NETWORK_ERRORS for cls in type(err).__mro__):
        fix = f"The Hugging Face Hub is unreachable from here; {later}"
    else:
        fix = later[0].upper() + later[1:]
    return f"Saved {folder}, but uploading it to {repo_id} failed: {reason}. {fix}."
