"""``train.push_to_hub``: upload a run's ``final/`` (weights and its ``README.md`` model card) to the
Hugging Face Hub, as TRL's and diffusers' trainers do (same option names: ``push_to_hub``,
``hub_model_id``, ``hub_private_repo``).

Offline-safe: nothing here touches the network unless ``train.push_to_hub`` is true. The token is
huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``); it is never part of a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffalign.errors import UsageError


def hub_repo_id(cfg) -> str:
    """The repository to push to: ``train.hub_model_id`` (``name`` or ``owner/name``), else the run
    directory's name (as TRL uses ``output_dir``'s)."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


def check_push_to_hub(cfg) -> None:
    """Before training: a push that cannot happen is a :class:`~diffalign.errors.UsageError` now, not
    after the run (offline with ``HF_HUB_OFFLINE=1``; a ``hub_model_id`` without ``push_to_hub`` is
    only a setting and is left alone)."""
    if not cfg.push_to_hub:
        return
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        raise UsageError("train.push_to_hub is true but HF_HUB_OFFLINE=1 is set: nothing can be uploaded; unset "
                         "HF_HUB_OFFLINE, or set train.push_to_hub=false and upload final/ later "
                         "(huggingface-cli upload REPO final/)")
    repo = hub_repo_id(cfg)
    if repo.count("/") > 1 or not repo.strip("/"):
        raise UsageError(f"train.hub_model_id {repo!r} must be 'name' or 'owner/name'")


def push_to_hub(folder: str | Path, cfg, *, commit_message: str | None = None, api: Any = None) -> str | None:
    """Upload ``folder`` (a run's ``final/``) to ``train.hub_model_id`` when ``train.push_to_hub``;
    returns the repository's URL (None when not asked).

    ``HfApi().create_repo(repo_id, private=hub_private_repo, exist_ok=True)``, then
    ``upload_folder(repo_id, folder_path=folder)``: the repository is created (or reused) and the folder's
    files, its ``README.md`` model card among them, become one commit.
    """
    if not cfg.push_to_hub:
        return None
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder}: no README.md model card to push with the weights")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    repo = api.create_repo(hub_repo_id(cfg), private=cfg.hub_private_repo, exist_ok=True)
    repo_id = getattr(repo, "repo_id", None) or hub_repo_id(cfg)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                      commit_message=commit_message or "diffalign: upload final/ (weights and model card)")
    url = f"https://huggingface.co/{repo_id}"
    print(f"pushed {folder} to {url}")
    return url


def push_run(run) -> None:
    """The loop's hook after ``final/`` is written: push it (main process only) when asked."""
    cfg = run.recipe.train
    if cfg.push_to_hub and run.accelerator.is_main_process:
        push_to_hub(run.output_dir / "final", cfg,
                    commit_message=f"diffalign {run.recipe.method.name}: {run.global_step} steps")
    if cfg.push_to_hub:
        run.accelerator.wait_for_everyone()


__all__ = ["check_push_to_hub", "hub_repo_id", "push_run", "push_to_hub"]
