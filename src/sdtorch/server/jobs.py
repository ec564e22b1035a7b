"""One worker thread that runs the server's jobs in order from a bounded queue, and the progress it reports.

The HTTP handlers never run a model: they check a request, `submit` a function, and await its future, so the
event loop stays free and /progress answers while a job runs. One model is in memory and one job runs at a time
(a generation, or loading another model). `interrupt` stops the running job at its next sampler step and the job
returns what it has; `skip` ends the current image and goes on with the next. A full queue raises `Busy`.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass

from ..errors import SDTorchError

PREVIEW_EVERY_S = 0.5  # at most this often a preview is decoded, and only while a client asks for one
PREVIEW_WANTED_S = 3.0  # a /progress call asking for the image keeps previews coming this long


class Busy(SDTorchError):
    """The queue is full: the client should retry later (HTTP 503 with Retry-After)."""


class Stopped(SDTorchError):
    """The server is shutting down; the job was not run."""


@dataclass
class Progress:
    """What GET /sdapi/v1/progress reports (A1111's `state`): the job, its images and steps, and a preview."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    job_timestamp: str = "0"
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    preview: bytes | None = None
    textinfo: str | None = None

    def fraction(self) -> float:
        if not self.job_count or not self.sampling_steps:
            return 0.0
        done = self.job_no * self.sampling_steps + self.sampling_step
        return min(done / (self.job_count * self.sampling_steps), 1.0)


class Worker:
    """Runs submitted functions one at a time on its own thread; each gets this worker (for `step` and the flags)."""

    def __init__(self, queue_size: int):
        if queue_size < 1:
            raise SDTorchError(f"the queue size must be at least 1, got {queue_size}")
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.lock = threading.Lock()
        self.progress = Progress()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._stopping = threading.Event()
        self._preview_wanted_until = 0.0
        self._last_preview = 0.0
        self.thread = threading.Thread(target=self._loop, name="sdtorch-worker", daemon=True)
        self.thread.start()

    # -- the handlers' side ------------------------------------------------------------------------------------
    def submit(self, fn, job: str = "generate") -> concurrent.futures.Future:
        """Queue `fn(worker)`; its future holds what it returns or raises. Busy when the queue is full."""
        if self._stopping.is_set():
            raise Stopped("the server is shutting down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self.queue.put_nowait((fn, job, future))
        except queue.Full:
            raise Busy(f"the queue is full ({self.queue.maxsize} waiting); retry later") from None
        return future

    def pending(self) -> int:
        return self.queue.qsize()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    def want_preview(self) -> None:
        self._preview_wanted_until = time.monotonic() + PREVIEW_WANTED_S

    def snapshot(self) -> Progress:
        with self.lock:
            return Progress(**vars(self.progress))

    def stop(self, timeout: float | None = None) -> None:
        """`shutdown`, then wait up to `timeout` seconds for the running job to end."""
        self.shutdown()
        self.thread.join(timeout)

    def shutdown(self) -> None:
        """Stop taking jobs, interrupt the running one and fail the queued ones with Stopped; returns at once
        (safe in a signal handler)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._interrupt.set()
        while True:
            try:
                _, _, future = self.queue.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(Stopped("the server is shutting down; the job was not run"))
        self.queue.put((None, "", None))

    # -- the job's side ----------------------------------------------------------------------------------------
    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def begin(self, job_count: int, sampling_steps: int, job_timestamp: str) -> None:
        with self.lock:
            self.progress.job_count, self.progress.sampling_steps = job_count, sampling_steps
            self.progress.job_timestamp = job_timestamp

    def next_image(self, job_no: int) -> None:
        self._skip.clear()
        with self.lock:
            self.progress.job_no, self.progress.sampling_step, self.progress.skipped = job_no, 0, False

    def step(self, step) -> bool | None:
        """The generation callback: records the step, decodes a preview if a client wants one, and returns False
        (stop this image) when interrupted or skipped."""
        now = time.monotonic()
        preview = None
        if now < self._preview_wanted_until and now - self._last_preview >= PREVIEW_EVERY_S:
            from ..images import png_bytes, to_pil

            preview = png_bytes(to_pil(step.preview().float().cpu())[0])
            self._last_preview = now
        with self.lock:
            self.progress.sampling_step = step.index + 1
            self.progress.sampling_steps = step.total
            if preview is not None:
                self.progress.preview = preview
            if self._skip.is_set():
                self.progress.skipped = True
            if self._interrupt.is_set():
                self.progress.interrupted = True
        return False if (self._interrupt.is_set() or self._skip.is_set()) else None

    def _loop(self) -> None:
        while True:
            fn, job, future = self.queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            if not self._stopping.is_set():
                self._interrupt.clear()
            self._skip.clear()
            with self.lock:
                self.progress = Progress(job=job, started=time.time(), job_count=1)
            result = error = None
            try:
                result = fn(self)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                error = e
            with self.lock:  # idle again before the request hears, so its next /progress says so
                self.progress = Progress()
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
