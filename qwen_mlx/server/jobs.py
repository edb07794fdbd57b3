"""Jobs: a bounded queue and the one worker thread that owns MLX and the resident pipeline.

Requests are checked on their own thread (``Engine.check``), then queued as a :class:`Job`. The
worker runs one job at a time; each step updates the job (progress, ETA) and wakes whoever
listens (a waiting request, a progress stream). Cancelling a job (interrupt, a client that went
away, shutdown) stops it within one step and keeps none of its images.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen_mlx.messages import one_line

from .engine import Cancelled, CancelToken, Engine, Plan, Result, Step

log = logging.getLogger("qwen_mlx.server")

KEEP_FINISHED = 32  # finished jobs kept for their images (url responses, the web page)


class QueueFull(Exception):
    """Every queue slot is taken; ``retry_after`` seconds is a fair guess."""

    def __init__(self, size: int, retry_after: int):
        super().__init__(f"the queue is full ({size} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server no longer accepts jobs."""


@dataclass
class Job:
    plan: Plan
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    token: CancelToken = field(default_factory=CancelToken)
    state: str = "queued"  # queued, running, done, cancelled, error
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    image: int = 0  # index of the image being made
    step: int = 0
    total: int = 0
    step_seconds: float | None = None  # running mean over this job
    results: list[Result] = field(default_factory=list)
    error: str | None = None
    status: int = 200  # the HTTP status the job's answer gets
    version: int = 0
    _listeners: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.total = self.plan.steps
        self.done = threading.Event()

    @property
    def n(self) -> int:
        return len(self.plan.seeds)

    @property
    def finished_ok(self) -> bool:
        return self.state == "done"

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (on the worker thread) after every change; returns the remover."""
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def touch(self) -> None:
        self.version += 1
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener must never stop the worker
                log.exception("progress listener failed")

    def on_step(self, s: Step) -> None:
        self.image, self.step, self.total = s.image, s.step, s.total
        done = s.image * s.total + s.step
        mean = self.step_seconds
        self.step_seconds = s.seconds if mean is None else mean + (s.seconds - mean) / done
        self.touch()

    def finish(self, state: str, error: str | None = None, status: int = 200) -> None:
        self.state, self.error, self.status = state, error, status
        self.finished = time.time()
        if state != "done":
            self.results = []
        self.done.set()
        self.touch()

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        if self.total <= 0:
            return 0.0
        return min(1.0, (self.image + self.step / self.total) / self.n)

    @property
    def eta(self) -> float | None:
        """Seconds left (steps left times the mean step), once a step has run."""
        if self.state in ("done", "cancelled", "error"):
            return 0.0
        if self.step_seconds is None:
            return None
        left = (self.n - self.image) * self.total - self.step
        return left * self.step_seconds

    def snapshot(self) -> dict:
        out = {
            "id": self.id,
            "state": self.state,
            "image": self.image + (self.state == "running"),
            "images": self.n,
            "step": self.step,
            "steps": self.total,
            "progress": round(self.progress, 4),
            "eta": None if self.eta is None else round(self.eta, 2),
            "elapsed": round((self.finished or time.time()) - (self.started or time.time()), 2),
            "seeds": self.plan.seeds,
            "width": self.plan.width,
            "height": self.plan.height,
        }
        if self.error:
            out["error"] = self.error
        if self.state == "done":
            base = f"/api/jobs/{self.id}/images"
            out["results"] = [
                {"url": f"{base}/{i}.png", "seed": r.seed, "metadata": r.metadata}
                for i, r in enumerate(self.results)
            ]
        return out


class Worker:
    """One thread owns the engine (built on it by ``factory``) and runs queued jobs in order."""

    def __init__(
        self,
        factory: Callable[[], Engine],
        max_queue: int = 8,
        on_fatal: Callable[[str], None] | None = None,
    ):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.factory = factory
        self.max_queue = max_queue
        self.on_fatal = on_fatal
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.fatal: str | None = None  # why the engine can run no more jobs
        self.ready = threading.Event()
        self.accepting = True
        self.current: Job | None = None
        self.last: Job | None = None
        self.memory: dict[str, int] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._closed = False
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self._thread = threading.Thread(target=self._main, name="qwen-mlx-worker", daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        return self

    # -- any thread

    def submit(self, plan: Plan) -> Job:
        job = Job(plan)
        with self._cond:
            if not self.accepting or self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue), self.retry_after())
            self._queue.append(job)
            self._jobs[job.id] = job
            self._prune()
            self._cond.notify()
        return job

    def retry_after(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, round(mean * (len(self._queue) + 1)))

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        """Stop ``job``: a queued one never runs, a running one stops within one step."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                queued = True
            else:
                queued = False
        job.token.cancel(reason)
        if queued:
            job.finish("cancelled", f"{reason} before it started", 409)

    def interrupt(self) -> bool:
        """Cancel the running job (A1111 ``interrupt``); False if none runs."""
        job = self.current
        if job is None:
            return False
        self.cancel(job, "interrupted")
        return True

    @property
    def job_count(self) -> int:
        with self._cond:
            return len(self._queue) + (self.current is not None)

    def close(self, reason: str = "the server is shutting down", timeout: float = 30.0) -> None:
        """Stop accepting, cancel every job, wait for the worker (it stops within one step)."""
        with self._cond:
            self.accepting = False
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            current = self.current
            self._cond.notify_all()
        for job in queued:
            job.token.cancel(reason)
            job.finish("cancelled", reason, 503)
        if current is not None:
            current.token.cancel(reason)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stop_accepting(self) -> None:
        with self._cond:
            self.accepting = False

    # -- the worker thread

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def _main(self) -> None:
        try:
            self.engine = self.factory()
            self._record_memory()
        except Exception as e:  # noqa: BLE001 - reported by /health and the serve command
            self.load_error = one_line(e)
            log.debug("loading failed", exc_info=True)
            self.ready.set()
            return
        self.ready.set()
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 - the engine is unusable: the server stops
            self._fail(one_line(e))
            return
        if self.fatal is not None:
            return  # out of step: the others see this process end
        try:
            self.engine.close()
        except Exception:  # noqa: BLE001 - stopping anyway
            log.debug("closing the engine failed", exc_info=True)

    def _serve(self) -> None:
        idle = self.engine.idle_seconds  # None: wait for a job however long it takes
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(idle)
                if self._queue:
                    job = self.current = self._queue.popleft()
                elif self._closed:
                    return
                else:  # idle: let the engine check on its processes
                    job = None
            if job is None:
                self.engine.idle()
                continue
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.current, self.last = None, job
                    self._prune()
                self._record_memory()
            if self.fatal is not None:
                return

    def _fail(self, reason: str) -> None:
        """The engine can run no more jobs (a process of the group died or left its step):
        refuse the queue and tell whoever stops the server."""
        self.fatal = reason
        log.debug("stopping: %s", reason)
        with self._cond:
            self.accepting = False
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
        for job in queued:
            job.token.cancel("the server is stopping")
            job.finish("cancelled", f"the server is stopping: {reason}", 503)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _run(self, job: Job) -> None:
        try:
            self._answer(job)
        except Exception as e:  # noqa: BLE001 - _answer finished the job
            from qwen_mlx.distributed import in_step

            if self.engine.world is not None and not in_step(e):
                # rank 0 failed alone (or another process died): the group is out of step
                self._fail(f"the job failed on this process, out of step with the others: "
                           f"{job.error}")  # fmt: skip

    def _answer(self, job: Job) -> None:
        """Run ``job`` and finish it (state, error, HTTP status); re-raise a failure."""
        from qwen_mlx.errors import NonFiniteError, QwenMLXError

        job.state, job.started = "running", time.time()
        job.touch()
        try:
            for result in self.engine.run(job.plan, job.token, job.on_step):
                job.results.append(result)
                job.touch()
        except Cancelled as e:
            status = 503 if job.token.reason.startswith("the server") else 409
            job.finish("cancelled", f"the job was cancelled: {one_line(e)}", status)
            raise
        except NonFiniteError as e:
            job.finish("error", one_line(e), 500)
            raise
        except MemoryError as e:
            job.finish("error", f"out of memory: {one_line(e)}", 500)
            raise
        except (QwenMLXError, ValueError) as e:
            job.finish("error", one_line(e), 400)
            raise
        except Exception as e:  # noqa: BLE001 - one line to the client, the trace to the log
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.finish("error", f"unexpected {type(e).__name__}: {one_line(e)}", 500)
            raise
        job.finish("done")
        self._durations.append(job.finished - job.started)

    def _record_memory(self) -> None:
        import mlx.core as mx

        mx.clear_cache()
        self.memory = {
            "active": int(mx.get_active_memory()),
            "cache": int(mx.get_cache_memory()),
            "peak": int(mx.get_peak_memory()),
        }
