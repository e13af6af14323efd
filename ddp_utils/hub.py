"""Publishing a run's export to the Hugging Face Hub (`--push-to-hub`).

Whether the push can happen is checked when the run starts, before any step, instead of
failing after hours of training: offline mode (HF_HUB_OFFLINE), a bad repository id and a
missing token refuse the run (exit 2), and so does a token the hub does not confirm (asked
once, `whoami`): without a network, or a token that is not valid, read-only, or of a user who
cannot create the repository's namespace. (A token only present in the environment proves
nothing: that is how a run without a network used to train to the end and fail there.)
At the end the main process creates the repository (if needed) and
uploads the export folder (model card README.md, samples.png, weights, task.json) to its root
and, when an evaluation kept one, `best/` to `best/`. An upload that fails leaves the export
complete on disk and says how to upload it by hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from accelerate import Accelerator
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from ddp_utils.distributed import raise_together
from ddp_utils.errors import InputError, OutputError

logger = logging.getLogger("ddp_diffusion")

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_repo_id(hub_model_id: str | None, output_dir: str) -> str:
    """The repository: `--hub-model-id`, else the run directory's name (in the token's
    namespace, as diffusers' examples do)."""
    return hub_model_id or Path(output_dir).resolve().name


def check_can_push(repo_id: str) -> None:
    """Refuse, before training, a push that cannot happen: offline, no token, a bad id."""
    offline = [
        name
        for name in OFFLINE_VARIABLES
        if os.environ.get(name, "0").lower() not in ("0", "", "false", "no", "off")
    ]
    if offline:
        raise InputError(
            f"offline mode is on ({offline[0]}={os.environ[offline[0]]}), so nothing can be "
            "uploaded: unset it, or drop --push-to-hub and upload the export later with "
            "`hf upload <repo> <run>/<export>`",
            "push_to_hub",
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InputError(
            f"{repo_id!r} is not a hub repository id (name or user/name): {err}", "hub_model_id"
        ) from None
    token = get_token()
    if token is None:
        raise InputError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with "
            "write access), then run the command again",
            "push_to_hub",
        )
    later = "or drop --push-to-hub and upload the export later with `hf upload <repo> <folder>`"
    try:
        identity = HfApi().whoami(token=token)
    except HfHubHTTPError as err:  # the hub answered: the token is not valid
        raise InputError(
            f"the hub refuses the Hugging Face token ({str(err).splitlines()[0]}): log in again "
            f"with `hf auth login` or set HF_TOKEN to a valid token with write access, {later}",
            "push_to_hub",
        ) from None
    except Exception as err:  # noqa: BLE001 - no network: errors of many types, many layers
        raise InputError(
            f"the Hugging Face token could not be checked with the hub ({type(err).__name__}: "
            f"{err}): without a network the upload at the end would fail too. Run where the "
            f"hub can be reached, {later}",
            "push_to_hub",
        ) from None
    role = (identity.get("auth") or {}).get("accessToken", {}).get("role")
    if role == "read":
        raise InputError(
            "the Hugging Face token can only read: uploading needs one with write access "
            f"(`hf auth login`, or HF_TOKEN), {later}",
            "push_to_hub",
        )
    user = identity.get("name")
    namespaces = {user, *(org.get("name") for org in identity.get("orgs") or [])}
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if user is not None and namespace not in namespaces:
        raise InputError(
            f"the token is {user}'s, who cannot create repositories in {namespace!r} (theirs: "
            f"{', '.join(sorted(n for n in namespaces if n))}): use one of those, or a token "
            "of a member of it",
            "hub_model_id",
        )


def push_to_hub(
    accelerator: Accelerator, repo_id: str, private: bool, folders: dict[str, Path]
) -> None:
    """Upload `folders` ({path in the repository: local folder}; "" is the root) from the main
    process (collective: a failure ends every rank alike, with `OutputError`)."""
    error = None
    if accelerator.is_main_process:
        try:
            api = HfApi()
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            for path_in_repo, folder in folders.items():
                api.upload_folder(
                    repo_id=repo.repo_id,
                    folder_path=folder,
                    path_in_repo=path_in_repo or None,
                    repo_type="model",
                    commit_message=f"Upload {folder.name} (ddp-diffusion)",
                )
            logger.info("pushed %s to %s", ", ".join(str(f) for f in folders.values()), repo)
        except Exception as err:  # noqa: BLE001 - network and hub errors come in many types
            error = OutputError(
                f"could not upload to the hub repository {repo_id} ({type(err).__name__}: "
                f"{err}). The export is complete on disk: upload it with `hf upload {repo_id} "
                f"{next(iter(folders.values()))}`, or run the same command again"
            )
    raise_together(accelerator, error, OutputError("the main process could not upload"))
