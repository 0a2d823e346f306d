"""A reward scored by another process over HTTP: ``remote:http://127.0.0.1:8123`` anywhere a reward name goes.

Rewards that cannot share the training process (GenEval's detector stack, OCR, VLM judges, a second
GPU) run under ``diffalign reward serve NAME`` (:mod:`diffalign.rewards.serve`); the trainer, ``diffalign
score`` or ``diffalign eval`` name them as

    remote:http://127.0.0.1:8123          the reward the server hosts
    remote:pickscore@127.0.0.1:8123       the same, and check that the server hosts ``pickscore``

The wire format (JSON, both ways; see docs/reward-service.md):

    GET  /health  ->  {"name", "device", "ready", "max_batch", "mode", "differentiable", "card"}
    POST /score   <-  {"prompts": [B strings], "images_npy": base64 of a .npy uint8 array [B, H, W, 3]}
                      or {"prompts": [...], "images_png": [B base64 image files (PNG, JPEG, ...)]}
                  ->  {"scores": [B floats]}
    errors        ->  {"error": "one line", "field": "the request field at fault, or null"}, status 4xx/5xx

Images travel as 8 bits (``round(x·255)``, :func:`~diffalign.rewards.base.to_uint8`): exactly what every
reward's ``mode="exact"`` scores, so a served reward gives the in-process scores bit for bit; scores come
back as JSON numbers (a float32 round-trips exactly). ``.npy`` is read with ``allow_pickle=False``: no
request can make the server unpickle anything. A remote reward has no gradients (``mode="exact"`` only).
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from diffalign.errors import UsageError
from diffalign.rewards.base import Images, RewardCard, RewardModel, to_pil, to_uint8

PREFIX = "remote:"
RETRY_STATUS = (502, 503, 504)  # a proxy or a server still starting: worth another try; 4xx / 500 are not


class RewardServiceError(UsageError):
    """The reward server cannot be reached, or answered an error: one line naming the URL and what to do."""


# ---------------------------------------------------------------------------------------- wire format
def encode_npy(array: np.ndarray) -> str:
    """Base64 of ``array`` saved as ``.npy`` (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_npy(text: str) -> np.ndarray:
    """The array of :func:`encode_npy`'s output; a pickled (object) array is refused (``ValueError``)."""
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)


def encode_images(images: Images) -> dict[str, Any]:
    """The request fields of ``images`` (a ``[B, 3, H, W]`` tensor in [0, 1] or PIL images): one ``uint8
    [B, H, W, 3]`` ``.npy`` when they share a size, else one PNG per image (both lossless at 8 bits)."""
    if isinstance(images, torch.Tensor):
        return {"images_npy": encode_npy(to_uint8(images))}
    from diffalign.data.pairs import to_rgb

    pils = [to_rgb(im) for im in images]
    if len({im.size for im in pils}) <= 1:
        return {"images_npy": encode_npy(np.stack([np.asarray(im, dtype=np.uint8) for im in pils]))}
    files = []
    for im in pils:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"images_png": files}


def prompt_texts(prompts: Sequence[Any]) -> list[str]:
    """Prompts as strings (a ``ShapesPrompt`` or other object with ``.text`` sends its text)."""
    return [p if isinstance(p, str) else str(getattr(p, "text", p)) for p in prompts]


# ---------------------------------------------------------------------------------------- addresses
def is_remote(name: str | Any) -> bool:
    return isinstance(name, str) and name.lower().startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``(base URL, expected reward name or None)`` of ``remote:URL``, ``remote:HOST:PORT`` or
    ``remote:NAME@HOST:PORT`` (``http://`` is added when no scheme is given)."""
    rest = spec[len(PREFIX):] if is_remote(spec) else spec
    name = None
    head, sep, tail = rest.partition("@")
    if sep and "/" not in head and ":" not in head:
        name, rest = head, tail
    url = rest if "://" in rest else f"http://{rest}"
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
        raise UsageError(f"remote reward {spec!r}: expected remote:http://HOST:PORT, remote:HOST:PORT or "
                         "remote:NAME@HOST:PORT (e.g. remote:http://127.0.0.1:8123)")
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}", name


# ---------------------------------------------------------------------------------------- the client
class RemoteReward(RewardModel):
    """A reward hosted by ``diffalign reward serve``: ``score`` posts the images and prompts, in requests of
    at most ``batch_size`` images (and never more than the server's ``max_batch``).

    Construction asks ``GET /health`` (with the same retries), so a server that is down, or one hosting
    another reward than ``NAME@``, fails at once and not after the first rollout. A request that cannot
    connect, times out, or gets 502/503/504 is tried ``retries`` more times, waiting ``backoff · 2^k``
    seconds before try ``k + 1``; then :class:`RewardServiceError` (one line: the URL, the cause, how to start
    the server). A 4xx/500 answer is not retried: its message is raised as it came.

    Args:
        url: the server's base URL (``http://127.0.0.1:8123``).
        expect: the reward name the server must host (``remote:NAME@...``), or None.
        timeout: seconds each request may take to connect and to answer (120; a VLM judge on a batch of
            64 can need minutes: raise it, or lower ``batch_size``).
        retries: further tries after the first (3).
        backoff: seconds before the first retry, doubling after each (1.0).
        batch_size: images per request (64), capped by the server's ``max_batch``.
        mode: "exact" only: no gradients cross a process boundary.
        max_workers: threads of :meth:`score_async` (1: requests reach the server in submission order).
    """

    differentiable = False

    def __init__(self, url: str, expect: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, batch_size: int = 64, mode: str = "exact", max_workers: int = 1):
        if timeout <= 0 or retries < 0 or backoff < 0 or batch_size < 1 or max_workers < 1:
            raise UsageError(f"remote reward {url}: timeout must be > 0, retries and backoff >= 0, batch_size "
                             f"and max_workers >= 1 (got {timeout}, {retries}, {backoff}, {batch_size}, "
                             f"{max_workers})")
        if mode != "exact":
            raise UsageError(f"remote reward {url}: mode {mode!r}: a served reward has no gradients (its images "
                             "cross a process boundary as 8-bit arrays); use mode 'exact'")
        super().__init__(mode=mode, batch_size=batch_size)
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), float(timeout), int(retries), backoff
        self.name = f"remote:{self.url}"  # until the server says which reward it hosts
        self.max_workers = max_workers
        self._pool: ThreadPoolExecutor | None = None
        self.info = self.health()
        served = str(self.info.get("name", ""))
        if expect is not None and served.lower() != expect.lower():
            raise RewardServiceError(f"reward server {self.url} hosts {served!r}, not {expect!r} "
                                     f"(remote:{expect}@...): start `diffalign reward serve {expect}` there")
        self.name = served or self.name
        self.server_batch = int(self.info.get("max_batch") or batch_size)
        card = self.info.get("card")
        self.card = RewardCard(**card) if isinstance(card, dict) and "name" in card else None

    @classmethod
    def from_spec(cls, spec: str, **kw) -> RemoteReward:
        """A :class:`RemoteReward` of ``remote:...`` (:func:`parse_spec`); ``kw`` go to the constructor."""
        url, expect = parse_spec(spec)
        return cls(url, expect=expect, **kw)

    # ---- HTTP
    def request(self, path: str, body: dict | None = None) -> dict:
        """The JSON answer of ``GET path`` (``body=None``) or ``POST path`` with a JSON ``body``, with retries."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRY_STATUS:
                    raise RewardServiceError(f"reward server {self.url}{path} answered {e.code}: {message}") from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            except json.JSONDecodeError as e:
                raise RewardServiceError(f"reward server {self.url}{path}: the answer is not JSON ({e})") from None
        tries = self.retries + 1
        raise RewardServiceError(f"reward server {self.url} did not answer {path} after {tries} "
                                 f"tr{'y' if tries == 1 else 'ies'} ({last}; timeout {self.timeout:g} s): is "
                                 "`diffalign reward serve NAME --port PORT` running there?")

    def health(self) -> dict:
        """The server's ``GET /health``: its reward's name, device, ``max_batch``, card."""
        info = self.request("/health")
        if not info.get("ready", False):
            raise RewardServiceError(f"reward server {self.url} is not ready: {info}")
        return info

    # ---- scoring
    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        scores: list[float] = []
        step = max(1, min(self.batch_size, self.server_batch))
        for i in range(0, len(prompts), step):
            chunk = images[i:i + step]
            answer = self.request("/score", {"prompts": prompt_texts(prompts[i:i + step]), **encode_images(chunk)})
            got = answer.get("scores")
            if not isinstance(got, list) or len(got) != len(chunk):
                raise RewardServiceError(f"reward server {self.url}/score: expected {len(chunk)} scores, got "
                                         f"{answer!r:.200}")
            scores.extend(float(s) for s in got)
        return torch.tensor(scores, dtype=torch.float32)

    def score(self, images: Images, prompts: Sequence[Any]) -> torch.Tensor:
        """Scores ``[B]`` (CPU float32) of ``images`` for ``prompts``, from the server."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return torch.zeros(0)
        return self._score(images, list(prompts))

    def score_async(self, images: Images, prompts: Sequence[Any]) -> Future:
        """:meth:`score` on a worker thread: returns at once; ``future.result()`` gives the scores ``[B]`` (or
        raises what :meth:`score` would). Tensors are copied to 8-bit CPU images first, so the caller may
        reuse or free them."""
        if isinstance(images, torch.Tensor):
            images = to_pil(images)  # the same 8 bits that would go on the wire
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="remote-reward")
        return self._pool.submit(self.score, images, list(prompts))

    def close(self) -> None:
        """Stop the :meth:`score_async` threads (after the requests in flight)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, url={self.url!r}"


def _error_message(e: urllib.error.HTTPError) -> str:
    """The ``error`` (and ``field``) of a JSON error answer, else its first line of text."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:
        raw = ""
    try:
        body = json.loads(raw)
        message = str(body.get("error", raw))
        return f"{message} (field {body['field']!r})" if body.get("field") else message
    except (json.JSONDecodeError, AttributeError):
        return (raw.strip().splitlines() or [e.reason or ""])[0][:300]
