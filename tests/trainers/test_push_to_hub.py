"""``train.push_to_hub``: ``final/`` with its model card goes to the Hub through ``HfApi.create_repo`` +
``upload_folder`` (monkeypatched here), only when asked; a run that does not ask never touches the network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from diffalign.cli import main


def _train(model_dir, data, out, *extra) -> int:
    return main(["train", "-", f"--model.pretrained={model_dir}", f"--data.source={data}", "--data.resolution=32",
                 f"--train.output_dir={out}", "--train.batch_size=2", "--train.max_steps=2",
                 "--train.checkpointing_steps=0", "--model.lora_rank=4", *extra])


class FakeHfApi:
    """Records the calls a push makes (and the files of the folder at upload time)."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, *args, **kwargs):
        FakeHfApi.calls.append(("init", kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

        class Url(str):
            pass

        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return url

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeHfApi.calls.append(("upload_folder", {**kwargs, "files": files}))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def test_push_to_hub_uploads_final_with_its_model_card(tiny_models, pair_parquet, tmp_path, fake_hub, capsys):
    out = tmp_path / "run"
    assert _train(tiny_models["sd"], pair_parquet, out, "--train.push_to_hub=true",
                  "--train.hub_model_id=me/tiny-dpo", "--train.hub_private_repo=true") == 0
    assert [name for name, _ in fake_hub] == ["init", "create_repo", "upload_folder"]
    assert fake_hub[1][1] == {"repo_id": "me/tiny-dpo", "private": True, "exist_ok": True}
    upload = fake_hub[2][1]
    assert upload["repo_id"] == "me/tiny-dpo" and Path(upload["folder_path"]) == out / "final"
    assert "README.md" in upload["files"] and "pytorch_lora_weights.safetensors" in upload["files"]
    assert upload["commit_message"] == "diffalign diffusion-dpo: 2 steps"
    assert "pushed" in capsys.readouterr().out


def test_push_to_hub_defaults_to_the_run_directory_name_and_the_hubs_privacy(tmp_path, fake_hub):
    from diffalign.trainers.config import TrainConfig
    from diffalign.trainers.hub import push_to_hub

    final = tmp_path / "my-run" / "final"
    final.mkdir(parents=True)
    (final / "README.md").write_text("---\nlibrary_name: diffusers\n---\n")
    cfg = TrainConfig(output_dir=str(tmp_path / "my-run"), push_to_hub=True)
    assert push_to_hub(final, cfg) == "https://huggingface.co/someone/my-run"
    assert fake_hub[1][1] == {"repo_id": "my-run", "private": None, "exist_ok": True}
    assert fake_hub[2][1]["repo_id"] == "someone/my-run"
    assert push_to_hub(final, TrainConfig(output_dir=str(tmp_path / "my-run"))) is None  # not asked: no call
    assert len(fake_hub) == 3


def test_nothing_network_related_happens_when_not_asked(tiny_models, pair_parquet, tmp_path, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    def no_hub(*args, **kwargs):
        raise AssertionError("HfApi used by a run that did not ask to push")

    def no_network(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network connection to {address} by a run that did not ask to push")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(huggingface_hub, "HfApi", no_hub)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # and it runs offline
    out = tmp_path / "run"
    assert _train(tiny_models["sd"], pair_parquet, out, "--train.hub_model_id=me/unused") == 0
    assert (out / "final" / "README.md").is_file()


def test_push_to_hub_offline_is_refused_before_training(tiny_models, pair_parquet, tmp_path, monkeypatch, capsys,
                                                        fake_hub):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    assert _train(tiny_models["sd"], pair_parquet, out, "--train.push_to_hub=true") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffalign train: error: train.push_to_hub is true but HF_HUB_OFFLINE=1 is set")
    assert len(err.splitlines()) == 1
    assert not out.exists() and fake_hub == []
