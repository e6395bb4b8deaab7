"""Push a finished output folder (fused model or PEFT export) to the Hugging Face hub.

The folder is always complete on disk before a push starts, so every failure here (offline, no token, a
rejected token, the network) is a PoetError that says the local output is fine and how to upload it later.
The token comes from huggingface_hub's usual sources: HF_TOKEN, or the token saved by `hf auth login`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import PoetError
from ..models import HUB_ID


def check_repo_id(repo_id: str) -> None:
    """Reject a malformed repo id before any work starts (the push itself comes last)."""
    if not HUB_ID.match(repo_id or ""):
        raise PoetError(f"--push-to-hub '{repo_id}' is not a Hugging Face repo id; write it as owner/name "
                        "(your user or organisation, then the repo name)")


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set since (tests set it late)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None,
                commit_message: str = "Upload with poet-mlx") -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload `folder` to it. Returns the repo URL."""
    check_repo_id(repo_id)
    folder = Path(folder)
    later = (f"The local output in {folder} is complete; upload it later with "
             f"`hf upload {repo_id} {folder} .{' --private' if private else ''}`")
    if _offline():
        raise PoetError(f"cannot push to {repo_id}: Hugging Face offline mode is on (HF_HUB_OFFLINE). {later} "
                        "once online")
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PoetError(f"cannot push to {repo_id}: not logged in to the Hugging Face hub (no HF_TOKEN and no saved "
                        f"token). Run `hf auth login` or set HF_TOKEN to a token with write access. {later}")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message)
    except Exception as exc:  # network, auth, permissions, quota: all reported the same way
        raise PoetError(f"pushing to {repo_id} failed ({_reason(exc)}). {later}") from None
    return str(url)


def _reason(exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return f"HTTP {status}: the token is invalid or lacks write access to this repo"
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
