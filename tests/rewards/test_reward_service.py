"""The reward service: `diffalign reward serve` hosts a reward over HTTP, `remote:URL` scores with it.

What a user relies on: the served scores are the in-process scores bit for bit (so a GRPO run with a served
reward is the same run), a server that is down is one clear error after a few quick retries (never a hang),
and a bad request is a 400 that names the field.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.cli import main
from diffalign.rewards import is_reward, load_reward
from diffalign.rewards.remote import RemoteReward, RewardServiceError, encode_npy, parse_spec
from diffalign.rewards.serve import RewardServer
from diffalign.shapes.grammar import parse_prompt, scene_for_prompt
from diffalign.shapes.scene import render
from tests.run_helpers import read_metrics

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a photo of a red square", "a photo of three triangles", "a photo of a blue circle",
            "a photo of a circle left of a square"]


@pytest.fixture
def serve():
    """``serve(reward, **kw)``: a :class:`RewardServer` on 127.0.0.1 (a free port) in a thread, stopped after."""
    servers = []

    def start(reward, **kw) -> RewardServer:
        server = RewardServer(reward, "127.0.0.1", 0, **kw)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def shapes_images(n: int = 8) -> tuple[list[Image.Image], list[str]]:
    """Rendered scenes, half scored against their own caption and half against another (scores 1 and < 1)."""
    rng = random.Random(0)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    images = [render(scene_for_prompt(parse_prompt(c), rng)) for c in captions]
    return images, [c if i % 2 == 0 else CAPTIONS[(i + 1) % len(CAPTIONS)] for i, c in enumerate(captions)]


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/score", data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- in-process server
def test_brightness_served_equals_in_process_exactly(serve):
    local = load_reward("brightness")
    server = serve(load_reward("brightness"), max_batch=3)
    remote = load_reward(f"remote:{server.url}", batch_size=64)
    assert remote.name == "brightness" and remote.server_batch == 3 and remote.card.name == "brightness"
    x = torch.rand(7, 3, 20, 24, generator=torch.Generator().manual_seed(0))  # 7 images > max_batch: 3 requests
    prompts = ["p"] * 7
    assert torch.equal(remote.score(x, prompts), local.score(x, prompts))
    assert server.requests_scored == 3
    # images sent as PNG files score the same
    pils = [Image.fromarray((np.random.default_rng(i).random((10, 12, 3)) * 255).astype(np.uint8)) for i in range(3)]
    files = []
    for im in pils:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(base64.b64encode(buf.getvalue()).decode())
    status, answer = post(server.url, {"prompts": prompts[:3], "images_png": files})
    assert status == 200 and torch.equal(torch.tensor(answer["scores"]), local.score(pils, prompts[:3]))
    # score_async returns before the answer; its result is the same
    assert torch.equal(remote.score_async(x, prompts).result(timeout=10), local.score(x, prompts))
    remote.close()


def test_shapes_eval_served_equals_in_process_exactly(serve):
    images, prompts = shapes_images(8)
    local = load_reward("shapes-eval").score(images, prompts)
    assert (local == 1).any() and (local < 1).any()
    server = serve(load_reward("shapes-eval"))
    remote = load_reward(f"remote:shapes-eval@{server.url.removeprefix('http://')}")
    assert torch.equal(remote.score(images, prompts), local)
    tensor = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(remote.score(tensor, [parse_prompt(p) for p in prompts]), local)  # ShapesPrompt -> text
    # PIL images of different sizes travel as PNG files, with the same result
    mixed = [im.resize((im.width + 8 * (i % 2), im.height)) for i, im in enumerate(images)]
    assert torch.equal(remote.score(mixed, prompts), load_reward("shapes-eval").score(mixed, prompts))


def test_health_names_the_reward_device_and_batch(serve):
    server = serve(load_reward("shapes-eval"), max_batch=5)
    with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
        health = json.loads(resp.read())
    assert health["name"] == "shapes-eval" and health["device"] == "cpu" and health["ready"] is True
    assert health["max_batch"] == 5 and health["differentiable"] is False and health["card"]["name"] == "shapes-eval"


def test_bad_requests_are_400_naming_the_field(serve):
    server = serve(load_reward("brightness"), max_batch=4)
    url = server.url
    good = encode_npy(np.zeros((2, 8, 8, 3), np.uint8))
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickled payload
    pickled = base64.b64encode(buf.getvalue()).decode()
    cases = [
        ({"images_npy": good}, "prompts", "list of strings"),
        ({"prompts": "a", "images_npy": good}, "prompts", "list of strings"),
        ({"prompts": ["a", 3], "images_npy": good}, "prompts[1]", "must be a string"),
        ({"prompts": ["a"], "images_npy": good}, "prompts", "2 images but 1 prompts"),
        ({"prompts": ["a", "b"]}, "images", "exactly one of"),
        ({"prompts": ["a"], "images_npy": pickled}, "images_npy", "without pickled objects"),
        ({"prompts": ["a", "b"], "images_npy": encode_npy(np.zeros((2, 8, 8, 3), np.float32))}, "images_npy",
         "uint8"),
        ({"prompts": ["a"], "images_npy": encode_npy(np.zeros((8, 8, 3), np.uint8))}, "images_npy", "[B, H, W, 3]"),
        ({"prompts": ["a"], "images_png": [base64.b64encode(b"not an image").decode()]}, "images_png[0]",
         "cannot identify"),
    ]
    for body, field, words in cases:
        status, answer = post(url, body)
        assert status == 400 and answer["field"] == field and words in answer["error"], (body.keys(), answer)
    status, answer = post(url, b"{not json")
    assert status == 400 and answer["field"] == "body"
    status, answer = post(url, {"prompts": ["a"] * 5, "images_npy": encode_npy(np.zeros((5, 8, 8, 3), np.uint8))})
    assert status == 413 and "max_batch 4" in answer["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nope", timeout=5)
    assert e.value.code == 404
    assert server.requests_scored == 0
    # the server still scores after all that
    assert post(url, {"prompts": ["a", "b"], "images_npy": good}) == (200, {"scores": [0.0, 0.0], "name": "brightness",
                                                                            "seconds": pytest.approx(0, abs=5)})


def test_a_failing_reward_is_500_with_its_message_and_not_retried(serve):
    server = serve(load_reward("shapes-eval"))
    remote = RemoteReward(server.url, retries=3, backoff=5.0)  # a retry would take 5 s
    t0 = time.perf_counter()
    with pytest.raises(RewardServiceError, match=r"answered 500: reward 'shapes-eval' failed: ValueError: 'hello' "
                                                 "is not a caption"):
        remote.score([Image.new("RGB", (16, 16))], ["hello"])
    assert time.perf_counter() - t0 < 3


def test_server_down_is_a_clear_error_after_retries_without_hanging():
    port = free_port()  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(RewardServiceError) as e:
        load_reward(f"remote:http://127.0.0.1:{port}", retries=2, backoff=0.05, timeout=1.0)
    message = str(e.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "after 3 tries" in message
    assert "ConnectionRefusedError" in message and "diffalign reward serve" in message
    assert time.perf_counter() - t0 < 3
    # a server that accepts the connection and never answers: the timeout ends each try
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.perf_counter()
        with pytest.raises(RewardServiceError, match=r"after 2 tries \(.*timed out.*timeout 0.3 s\)"):
            RemoteReward(f"http://127.0.0.1:{silent.getsockname()[1]}", retries=1, backoff=0.05, timeout=0.3)
        assert time.perf_counter() - t0 < 3


def test_remote_specs_and_their_errors(serve):
    assert parse_spec("remote:http://127.0.0.1:8123") == ("http://127.0.0.1:8123", None)
    assert parse_spec("remote:pickscore@10.0.0.2:9000") == ("http://10.0.0.2:9000", "pickscore")
    assert parse_spec("remote:hpsv2.1@https://host:443/") == ("https://host:443", "hpsv2.1")
    assert is_reward("remote:http://127.0.0.1:1") and not is_reward("remotely")
    for bad in ("remote:", "remote:127.0.0.1", "remote:ftp://h:1", "remote:h:notaport"):
        with pytest.raises(ValueError, match="remote:http://HOST:PORT"):
            parse_spec(bad)
    server = serve(load_reward("brightness"))
    with pytest.raises(RewardServiceError, match="hosts 'brightness', not 'shapes-eval'"):
        load_reward(f"remote:shapes-eval@{server.url}")
    with pytest.raises(ValueError, match="no gradients"):
        load_reward(f"remote:{server.url}", mode="differentiable")
    with pytest.raises(ValueError, match="--weights to `diffalign reward serve`"):
        load_reward(f"remote:{server.url}", weights="x")


def test_diffalign_score_with_a_served_reward(serve, tmp_path):
    images, prompts = shapes_images(4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    server = serve(load_reward("shapes-eval"))
    out = tmp_path / "scores.json"
    assert main(["score", "--reward", f"shapes-eval,remote:{server.url}", "--images", str(folder),
                 "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r[f"remote:{server.url}"] for r in rows] == [r["shapes-eval"] for r in rows]
    assert len({r["shapes-eval"] for r in rows}) > 1


# ---------------------------------------------------------------------------------------- a served GRPO reward
def start_subprocess_server(reward: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / "port.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffalign", "reward", "serve", reward, "--port", "0",
                             "--port-file", str(port_file)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not port_file.is_file():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate()[1]}")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}"


def grpo_run(out: Path, reward: str, *extra: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    assert main(["train", str(REPO / "pipelines" / "shapes-grpo.yaml"), f"--method.reward={reward}",
                 "--method.num_steps=3", "--method.images_per_prompt=2", "--method.sample_batch_size=2",
                 "--train.batch_size=4", "--train.max_steps=2", f"--train.output_dir={out}",
                 "--train.checkpointing_steps=0", *extra]) == 0
    rows = [{k: v for k, v in r.items() if not k.endswith("seconds") and k not in ("time", "elapsed")}
            for r in read_metrics(out)]
    return rows, load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_grpo_with_a_reward_served_by_another_process_is_the_same_run(tmp_path):
    proc, url = start_subprocess_server("brightness", tmp_path)
    try:
        rows_local, lora_local = grpo_run(tmp_path / "local", "brightness")
        rows_remote, lora_remote = grpo_run(tmp_path / "remote", f"remote:brightness@{url}")
        rows_async, lora_async = grpo_run(tmp_path / "async", f"remote:{url}", "--method.async_reward=true")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    # 2 epochs of 4 images: one request per rollout, then (async) one per sampler call of 2 images
    assert proc.returncode == 0 and "stopped after 6 scoring request(s)" in err, err
    assert len(rows_local) == 2 and rows_local[0]["reward_std"] > 0
    assert rows_remote == rows_local and rows_async == rows_local  # rewards, loss, grad norm: every number
    assert lora_remote.keys() == lora_local.keys() == lora_async.keys()
    assert all(torch.equal(lora_remote[k], lora_local[k]) and torch.equal(lora_async[k], lora_local[k])
               for k in lora_local)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in lora_local.values())


def test_training_with_a_served_reward_that_is_down_is_one_line(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    rc = main(["train", str(REPO / "pipelines" / "shapes-grpo.yaml"), f"--method.reward=remote:{url}",
               f'--method.reward_options={{"remote:{url}": {{"retries": 1, "backoff": 0.05, "timeout": 1}}}}',
               f"--train.output_dir={tmp_path / 'run'}", "--train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "after 2 tries (ConnectionRefusedError" in err[-1] and "diffalign reward serve" in err[-1]
    assert not (tmp_path / "run" / "final").exists()
