"""Test doubles for the serving stack: a fake scorer and a live server in a thread. Torch-free.

:class:`FakeScorer` stands in for :class:`zreward_fast.runtime.Scorer` wherever the model itself is
not under test (the batcher, the HTTP server, Ray Serve, ``bench/bench_server.py --fake``). It has
the same duck type (``score``, ``dimensions``, ``scale``, ``warmup``), validates its inputs the
same way (``ImageError`` for bad images, ``ValueError``/``TypeError`` for bad prompts and
dimensions), returns deterministic scores derived from the decoded pixels, the prompt and the
dimension, and can simulate latency, slow warm-up and failures. It records the batch size of
every call, which is what batching tests assert on.
"""
from __future__ import annotations

import hashlib
import io
import math
import socket
import threading
import time
from typing import Any, Sequence

import numpy as np

from .. import imaging
from ..dimensions import DIMENSIONS, resolve_dimensions
from ..prompting import check_prompt
from ..scale import ScoreResult, ScoreScale, result_from_probs

FAIL_MARKER = "__fail__"


class FakeScorer:
    """A deterministic stand-in for ``Scorer`` (a test double; it has no model).

    Args:
        dimensions: the dimensions it scores (default: all four, in order).
        scale: the score scale (default ``ScoreScale()``, K = 9).
        latency_s: sleep per ``score`` call (models the fixed cost of a batch).
        latency_per_item_s: extra sleep per item (models the cost that grows with the batch).
        image_size: its square bucket; images are resized to it before hashing, like the real
            scorer (so a server may pre-resize and get identical results).
        fail_marker: a prompt containing it makes ``score`` raise ``ValueError`` for the whole
            call, as a bad input in a batch would.
        error: if set, every ``score`` call raises it (a broken model).
        warmup_s: how long ``warmup`` takes; ``warmup_gate``: if set, ``warmup`` also waits until
            this ``threading.Event`` is set (tests use it to observe "not ready").
        exclusive: run one ``score`` call at a time, as one accelerator does; without it,
            concurrent calls sleep side by side, which flatters unbatched concurrency.
    """

    def __init__(
        self,
        dimensions: Sequence[str] = DIMENSIONS,
        scale: ScoreScale | None = None,
        latency_s: float = 0.0,
        latency_per_item_s: float = 0.0,
        image_size: int = 32,
        fail_marker: str | None = FAIL_MARKER,
        error: BaseException | None = None,
        warmup_s: float = 0.0,
        warmup_gate: threading.Event | None = None,
        exclusive: bool = False,
    ) -> None:
        self._dimensions = tuple(resolve_dimensions(dimensions))
        self._scale = scale or ScoreScale()
        self.latency_s = float(latency_s)
        self.latency_per_item_s = float(latency_per_item_s)
        self.image_size = int(image_size)
        self.fail_marker = fail_marker
        self.error = error
        self.warmup_s = float(warmup_s)
        self.warmup_gate = warmup_gate
        self.warmed_up = False
        self.exclusive = bool(exclusive)
        self.batch_sizes: list[int] = []  # one entry per score() call, in call order
        self._lock = threading.Lock()
        self._device = threading.Lock()

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self._dimensions

    @property
    def scale(self) -> ScoreScale:
        return self._scale

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def warmup(self) -> None:
        if self.warmup_gate is not None:
            self.warmup_gate.wait()
        time.sleep(self.warmup_s)
        self.warmed_up = True

    def score(self, images: Sequence[Any], prompts: Sequence[str], dimensions: Sequence[str] | None = None) -> list[dict[str, ScoreResult]]:
        images, prompts = list(images), list(prompts)
        with self._lock:
            self.batch_sizes.append(len(images))
        if self.error is not None:
            raise self.error
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        dims = resolve_dimensions(dimensions, self._dimensions)
        for i, p in enumerate(prompts):
            try:
                check_prompt(p)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompt {i}: {e}") from e
            if self.fail_marker and self.fail_marker in p:
                raise ValueError(f"prompt {i}: refused by the fake scorer (contains {self.fail_marker!r})")
        pixels = []
        for i, x in enumerate(images):
            try:
                img = imaging.resize_to_bucket(imaging.load_image(x), self.image_size)
            except imaging.ImageError as e:
                raise imaging.ImageError(f"image {i}: {e}") from e
            pixels.append(img.tobytes())
        delay = self.latency_s + self.latency_per_item_s * len(images)
        if self.exclusive:
            with self._device:
                time.sleep(delay)
        elif delay > 0:
            time.sleep(delay)
        return [{d: self._result(px, p, d) for d in dims} for px, p in zip(pixels, prompts)]

    def _result(self, pixels: bytes, prompt: str, dim: str) -> ScoreResult:
        h = hashlib.sha256(pixels + b"\0" + prompt.encode("utf-8") + b"\0" + dim.encode()).digest()
        k = self._scale.num_levels
        logits = [(h[i % len(h)] / 255.0) * 4.0 for i in range(k)]
        m = max(logits)
        e = [math.exp(z - m) for z in logits]
        s = sum(e)
        return result_from_probs([x / s for x in e], self._scale)

    def __repr__(self) -> str:
        return f"FakeScorer(dimensions={list(self._dimensions)}, latency_s={self.latency_s})"


def make_image_bytes(seed: int = 0, size: tuple[int, int] = (32, 32), fmt: str = "PNG") -> bytes:
    """A small random RGB image, encoded (PNG, JPEG or WEBP)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveServer:
    """Runs an ASGI app under uvicorn in a background thread, on a free loopback port.

    For tests and benchmarks that must go through a real socket and a real HTTP parser. The
    listening socket is bound before the thread starts, so there is no port race. ``stop()`` asks
    uvicorn to exit the way SIGTERM does: stop accepting, finish requests in flight, run the
    app's shutdown.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **uvicorn_kwargs: Any) -> None:
        import uvicorn

        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", **uvicorn_kwargs)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="zreward-live-server")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "LiveServer":
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up")
            if time.monotonic() > end:
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def request_stop(self) -> None:
        """Begin a graceful shutdown without waiting for it."""
        self.server.should_exit = True

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise TimeoutError(f"server did not stop within {timeout} s")

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
