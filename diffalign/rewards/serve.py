"""``diffalign reward serve``: host one reward over HTTP, for trainers and scorers in other processes.

    diffalign reward serve shapes-eval --port 8123            # then method.reward: remote:http://127.0.0.1:8123
    diffalign reward serve pickscore --weights DIR --device cuda:1 --max-batch 32
    diffalign reward serve ./my_reward_folder --allow-pickle  # a folder with a reward.yaml, as `diffalign score`

Standard library only (``http.server.ThreadingHTTPServer``): ``GET /health`` and ``POST /score``, JSON both
ways (the format is in :mod:`diffalign.rewards.remote` and docs/reward-service.md). Requests are scored one
at a time, in arrival order, each with the reward's ``mode="exact"`` on the 8-bit images sent. A bad request is
a 400 whose ``error`` names the field; more than ``--max-batch`` images a 413. The server binds 127.0.0.1
unless ``--host`` says otherwise, and has no authentication: anyone who can reach the port can score.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from diffalign.rewards.base import RewardModel
from diffalign.rewards.remote import decode_npy

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class BadRequest(ValueError):
    """A request the server cannot score: answered with ``status`` and ``{"error", "field"}``."""

    def __init__(self, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field, self.status = field, status


def parse_score_request(body: dict[str, Any], max_batch: int) -> tuple[list[Image.Image], list[str]]:
    """``(images, prompts)`` of a ``POST /score`` body; :class:`BadRequest` naming the field otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'prompts' and 'images_npy' or 'images_png'")
    prompts = body.get("prompts")
    if not isinstance(prompts, list):
        raise BadRequest("'prompts' must be a list of strings, one per image", "prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise BadRequest(f"prompts[{i}] must be a string, got {type(p).__name__}", f"prompts[{i}]")
    given = [k for k in ("images_npy", "images_png") if k in body]
    if len(given) != 1:
        raise BadRequest("give exactly one of 'images_npy' (base64 .npy, uint8 [B, H, W, 3]) and 'images_png' "
                         f"(a list of base64 image files); got {given or 'neither'}", "images")
    if given == ["images_npy"]:
        if not isinstance(body["images_npy"], str):
            raise BadRequest("'images_npy' must be a base64 string of a .npy file", "images_npy")
        try:
            arr = decode_npy(body["images_npy"])
        except (ValueError, binascii.Error, OSError, EOFError) as e:
            raise BadRequest(f"'images_npy' is not a base64 .npy array without pickled objects ({e})",
                             "images_npy") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise BadRequest(f"'images_npy' must be uint8 [B, H, W, 3], got {arr.dtype} {list(arr.shape)}",
                             "images_npy")
        count = len(arr)
    else:
        files = body["images_png"]
        if not isinstance(files, list):
            raise BadRequest("'images_png' must be a list of base64 image files", "images_png")
        count, arr = len(files), None
    if count > max_batch:
        raise BadRequest(f"{count} images in one request, more than this server's max_batch {max_batch}: split "
                         "the request (GET /health gives max_batch)", "images", status=413)
    if count != len(prompts):
        raise BadRequest(f"{count} images but {len(prompts)} prompts (one prompt per image)", "prompts")
    if arr is not None:
        images = [Image.fromarray(a) for a in arr]
    else:
        from diffalign.data.pairs import to_rgb

        images = []
        for i, item in enumerate(body["images_png"]):
            try:
                im = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
                im.load()
            except (TypeError, ValueError, binascii.Error, OSError, SyntaxError, Image.DecompressionBombError) as e:
                raise BadRequest(f"images_png[{i}] is not a base64 image file PIL can decode "
                                 f"({type(e).__name__}: {str(e)[:200]})", f"images_png[{i}]") from None
            images.append(to_rgb(im))
    return images, prompts


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one :class:`~diffalign.rewards.base.RewardModel`; ``serve_forever()`` to run,
    ``shutdown()`` from another thread to stop. ``port=0`` takes a free port (``server.port`` says which).

    Args:
        reward: the reward (put in ``mode="exact"``).
        host, port: where to listen (127.0.0.1 by default: this machine only).
        max_batch: most images one request may carry (413 beyond).
        max_body_mb: largest request body read (413 beyond).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, reward: RewardModel, host: str = "127.0.0.1", port: int = 0, max_batch: int = 64,
                 max_body_mb: float = 512.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        reward.mode = "exact"
        self.reward, self.max_batch, self.max_body = reward.eval(), int(max_batch), int(max_body_mb * 2**20)
        self.lock = threading.Lock()  # one request scores at a time: the reward model is not shared by threads
        self.requests_scored = 0
        super().__init__((host, port), RewardHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def health(self) -> dict[str, Any]:
        card = self.reward.card
        return {"name": self.reward.name, "device": str(self.reward.device), "ready": True,
                "max_batch": self.max_batch, "mode": "exact", "differentiable": False,
                "card": asdict(card) if card is not None else None}

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        import torch

        with self.lock, torch.no_grad():
            scores = self.reward.score(images, prompts)
            self.requests_scored += 1
        return [float(s) for s in scores.detach().float().cpu()]


class RewardHandler(BaseHTTPRequestHandler):
    """``GET /health``, ``POST /score``; every answer is JSON."""

    server: RewardServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, field: str | None = None) -> None:
        self._send(status, {"error": message, "field": field})

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0].rstrip("/") == "/health":
            self._send(200, self.server.health())
        else:
            self._error(404, f"no endpoint GET {self.path}; try GET /health or POST /score")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0].rstrip("/") != "/score":
            self._error(404, f"no endpoint POST {self.path}; try POST /score")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "a Content-Length header is required")
            return
        if length > self.server.max_body:
            self.close_connection = True  # the body is not read: this connection cannot carry another request
            self._error(413, f"request body of {length} bytes is over this server's limit of "
                        f"{self.server.max_body} (--max-body-mb); send fewer images per request", "body")
            return
        t0 = time.perf_counter()
        try:
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(f"the body is not JSON ({e})", "body") from None
            images, prompts = parse_score_request(body, self.server.max_batch)
        except BadRequest as e:
            self._error(e.status, str(e), e.field)
            return
        try:
            scores = self.server.score(images, prompts)
        except Exception as e:  # the reward itself failed: say so, keep serving
            self._error(500, f"reward {self.server.reward.name!r} failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}")
            return
        self._send(200, {"scores": scores, "name": self.server.reward.name,
                         "seconds": round(time.perf_counter() - t0, 6)})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)


# ---------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="host one reward over HTTP (GET /health, POST /score)",
                           description=__doc__.splitlines()[0])
    serve.add_argument("reward", metavar="NAME", help="a registered reward name, or a folder with a reward.yaml")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8123, help="port (default 8123; 0 takes a free one)")
    serve.add_argument("--port-file", help="write the bound port to this file once the server listens")
    serve.add_argument("--max-batch", type=int, default=64, help="most images per request (and per forward pass)")
    serve.add_argument("--max-body-mb", type=float, default=512.0, help="largest request body in MiB")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--weights", help="local weights (file, folder or hub id) of the reward")
    serve.add_argument("--benchmark-scale", action="store_true", help="HPSv2: report 100 * cosine")
    serve.add_argument("--allow-pickle", action="store_true",
                       help="also load pickled (.pt/.pth/.bin) reward checkpoints; by default only safetensors load, "
                            "since unpickling a file can run code")
    serve.add_argument("--verbose", action="store_true", help="log every request on stderr")


def run(args: argparse.Namespace) -> int:
    import signal

    from diffalign.errors import UsageError
    from diffalign.rewards.registry import is_reward, list_rewards, load_reward
    from diffalign.rewards.remote import is_remote

    if args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    if is_remote(args.reward) or not is_reward(args.reward):
        raise UsageError(f"unknown reward {args.reward!r}; registered: {', '.join(list_rewards())} (or a folder "
                         "with a reward.yaml)")
    kw: dict[str, Any] = {"batch_size": args.max_batch, "allow_pickle": args.allow_pickle}
    if args.weights:
        kw["weights"] = args.weights
    if args.benchmark_scale:
        kw["benchmark_scale"] = True
    reward = load_reward(args.reward, **kw).to(args.device)
    try:
        server = RewardServer(reward, args.host, args.port, args.max_batch, args.max_body_mb)
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port "
                         "(0 takes a free one)") from None
    server.verbose = args.verbose
    if args.host not in LOCAL_HOSTS:
        print(f"warning: listening on {args.host}, not only this machine; the server has no authentication",
              file=sys.stderr)
    if args.port_file:
        from diffalign.data.files import atomic_write

        atomic_write(args.port_file, lambda tmp: tmp.write_text(f"{server.port}\n"))
    print(f"serving reward {reward.name!r} on {server.url} (device {reward.device}, max_batch {args.max_batch}); "
          f"use it as remote:{server.url}", file=sys.stderr, flush=True)

    def stop(signum, frame):  # SIGTERM: stop serving and return 0, like Ctrl-C
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"stopped after {server.requests_scored} scoring request(s)", file=sys.stderr)
    return 0
