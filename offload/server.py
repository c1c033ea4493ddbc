"""An OpenAI-compatible HTTP API over one loaded ``Engine``: ``create_app`` builds the FastAPI app.

What it is: POST /v1/chat/completions (messages in the tokenizer's chat format; ``stream`` as
server-sent ``chat.completion.chunk`` events ending with ``data: [DONE]``), POST /v1/completions
(a prompt string, BOS + its tokens as ``offload generate``), GET /v1/models, GET /health and
GET /metrics (running totals, JSON). Requests run one at a time, in arrival order, on one worker
thread that alone touches the engine (the event loop keeps answering meanwhile); at most
``queue_size`` wait, past that a 503 with Retry-After. A client that goes away stops its
generation at the next token. Errors are OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``. Every response carries the engine's numbers
in an ``offload`` field (the final chunk's, when streamed).

What it is not: a batcher (one sequence decodes at a time), a printer or logger (it never writes
to the terminal), a process runner (``cli/serve.py`` loads the model and runs uvicorn), or a full
OpenAI API: ``n`` > 1, logprobs, tools and penalties other than none are refused or ignored
(frequency/presence penalties are accepted and ignored, as are unknown fields).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload.engine import Engine, GenerationSettings
from offload.errors import OffloadError
from offload.sampling import SamplingSettings
from offload.tokenizer import Message

MIB = 2**20
RETRY_AFTER_S = 2  # the Retry-After of a 503 (queue full)
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "interrupted": "stop"}


# ---- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's JSON shape with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- request bodies -------------------------------------------------------------------------------

class _Body(BaseModel):
    """Fields common to both endpoints. Strict types (a string is not a number); unknown fields
    are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    logprobs: Optional[Union[bool, int]] = None
    frequency_penalty: Optional[float] = None  # accepted, ignored
    presence_penalty: Optional[float] = None  # accepted, ignored
    user: Optional[str] = None


class TextPart(BaseModel):
    """One part of a message's content given as a list: text only."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Body):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)


class CompletionRequest(_Body):
    """POST /v1/completions: one prompt string."""

    prompt: str
    echo: bool = False


# ---- the worker: one request at a time on the engine --------------------------------------------

@dataclass
class Job:
    """One request's generation, as the worker runs it; ``events`` receives ("token", text),
    then ("done", Generation) or ("error", exception), on the event loop."""

    prompt_ids: list[int]
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    stream: bool = True  # False: no "token" events (the text is the Generation's, at "done")
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: Optional[float] = None

    def emit(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed (shutdown): nobody is listening
            pass


class Metrics:
    """Running totals since the app was created (GET /metrics)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.counts = dict(requests=0, completed=0, cancelled=0, rejected_queue_full=0, client_errors=0,
                           server_errors=0, prompt_tokens=0, reused_prompt_tokens=0, completion_tokens=0)
        self.generation_seconds = 0.0
        self.lock = threading.Lock()

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, amount in amounts.items():
                if name == "generation_seconds":
                    self.generation_seconds += amount
                else:
                    self.counts[name] += int(amount)


class Worker:
    """One thread that runs jobs in FIFO order; the only thread that touches the engine.
    ``submit`` refuses (False) when ``queue_size`` jobs wait already."""

    def __init__(self, engine: Engine, queue_size: int, metrics: Metrics):
        self.engine = engine
        self.queue_size = queue_size
        self.metrics = metrics
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.waiting = 0  # jobs submitted and not started
        self.busy = False
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="offload-worker", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(timeout=10)
            self.thread = None

    def submit(self, job: Job) -> bool:
        with self.lock:
            if self.waiting >= self.queue_size and (self.busy or self.waiting):
                return False
            self.waiting += 1
        self.jobs.put(job)
        return True

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            with self.lock:
                self.waiting -= 1
                self.busy = True
            try:
                if job.cancelled.is_set():
                    self.metrics.add(cancelled=1)
                    job.emit("done", None)
                else:
                    self._run(job)
            finally:
                with self.lock:
                    self.busy = False

    def _run(self, job: Job) -> None:
        job.started_at = time.perf_counter()
        generation = None
        try:
            generation = self.engine.generate(job.prompt_ids, job.settings, should_stop=job.cancelled.is_set)
            events = iter(generation)
            try:
                for event in events:
                    if event.text and job.stream:
                        job.emit("token", event.text)
                    if job.cancelled.is_set():
                        generation.stats.stop_reason = "interrupted"
                        break
            finally:
                events.close()
        except Exception as exc:  # one request's failure: a 500 for it, the engine starts afresh
            try:
                self.engine.reset()
            except Exception:
                pass
            job.emit("error", exc)
            return
        stats = generation.stats
        self.metrics.add(prompt_tokens=stats.prompt_tokens, reused_prompt_tokens=stats.reused_tokens,
                         completion_tokens=stats.generated_tokens,
                         generation_seconds=stats.prefill_seconds + stats.decode_seconds)
        self.metrics.add(**({"cancelled": 1} if job.cancelled.is_set() else {"completed": 1}))
        job.emit("done", generation)


# ---- responses ------------------------------------------------------------------------------------

def engine_numbers(generation, job: Job) -> dict:
    """The ``offload`` field: the engine's numbers for one request."""
    stats = generation.stats
    cache = generation.cache_stats
    total = cache.total() if cache is not None else None
    return {
        "generation_tokens_per_s": round(stats.generation_tokens_per_s, 3),
        "prompt_tokens_per_s": round(stats.prompt_tokens_per_s, 3),
        "prompt_tokens_prefilled": stats.prompt_tokens,
        "prompt_tokens_reused": stats.reused_tokens,
        "first_token_s": round(stats.first_token_seconds, 6),
        "queue_wait_s": round((job.started_at or job.queued_at) - job.queued_at, 6),
        "expert_hit_rate": round(total.hit_rate, 6) if total is not None and total.requests else None,
        "mib_moved_per_token": (round(total.bytes_moved / max(1, stats.generated_tokens) / MIB, 6)
                                if total is not None else 0.0),
        "stop_reason": stats.stop_reason,
    }


def usage(job: Job, generation) -> dict:
    prompt = len(job.prompt_ids)
    completion = generation.stats.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- the app --------------------------------------------------------------------------------------

def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None, cors: Optional[str] = None,
               queue_size: int = 8) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``. ``api_key``: every /v1 and /metrics
    request must bear ``Authorization: Bearer KEY`` (GET /health never needs it). ``cors``: an
    origin (or ``*``) allowed cross-origin; none is without it. ``queue_size``: requests that may
    wait while one generates (more: 503). Prints nothing."""
    if queue_size < 0:
        raise OffloadError(f"queue_size must be >= 0, got {queue_size}")
    metrics = Metrics()
    worker = Worker(engine, queue_size, metrics)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="offload", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics = worker, metrics
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors], allow_methods=["*"], allow_headers=["*"],
                           allow_credentials=cors != "*")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.add(**({"client_errors": 1} if exc.status < 500 else {"server_errors": 1}))
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.add(client_errors=1)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                                  code="invalid_json")
        param = ".".join(loc) or None
        if param is None:
            return error_response(400, "the body must be a JSON object", code="invalid_json")
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        if first.get("type") == "missing":
            code = "missing_required_parameter"
        else:
            code = "invalid_value"
            if "input" in first and not isinstance(first["input"], (dict, list)):
                message += f" (got {first['input']!r})"
        return error_response(400, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, type=kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        metrics.add(server_errors=1)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing API key: send Authorization: Bearer KEY" if not given
                           else "incorrect API key", type="authentication_error", code="invalid_api_key")

    def check_common(body: _Body) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model {body.model!r} not found: this server serves {model_name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one sequence decodes at a time), got {body.n}", param="n",
                           code="unsupported_value")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")

    def settings_for(body: _Body, prompt_len: int, max_tokens: Optional[int], reuse: bool) -> GenerationSettings:
        context = engine.context_length
        if prompt_len > context:
            raise APIError(400, f"the prompt takes {prompt_len} tokens and the context holds {context}: "
                           "shorten it", param="messages" if reuse else "prompt", code="context_length_exceeded")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop", code="invalid_value")
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop strings, got {len(stops)}", param="stop", code="invalid_value")
        limit = context - prompt_len if max_tokens is None else max_tokens
        try:
            sampling = SamplingSettings(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
            return GenerationSettings(max_new_tokens=limit, stop=stops, sampling=sampling, reuse_prefix=reuse)
        except OffloadError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    async def submit(request: Request, prompt_ids: list[int], settings: GenerationSettings, stream: bool) -> Job:
        job = Job(prompt_ids, settings, asyncio.get_running_loop(), stream)
        if not worker.submit(job):
            metrics.add(rejected_queue_full=1)
            raise APIError(503, f"the server is busy: {worker.queue_size} requests wait already; retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        return job

    async def next_event(request: Request, job: Job, watch: bool) -> tuple[str, Any]:
        """The job's next event; with ``watch``, a client gone meanwhile cancels the job."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.25 if watch else None)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    watch = False  # wait for the worker's "done" below, so the engine is free again

    def failed(exc: Exception) -> APIError:
        if isinstance(exc, OffloadError):
            return APIError(400, str(exc), code="invalid_value")
        return APIError(500, f"the engine failed on this request: {type(exc).__name__}: {exc}", type="server_error",
                        code="engine_error")

    async def run(request: Request, body: _Body, prompt_ids: list[int], settings: GenerationSettings,
                  kind: str):
        metrics.add(requests=1)
        job = await submit(request, prompt_ids, settings, body.stream)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.stream:
            try:
                while True:
                    kind_, value = await next_event(request, job, watch=True)
                    if kind_ == "error":
                        raise failed(value)
                    else:
                        generation = value
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            if generation is None:  # cancelled before it started
                raise APIError(499, "client closed the request", code="cancelled")
            text = generation.text
            finish = FINISH.get(generation.stats.stop_reason, "stop")
            if kind == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": finish}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                obj = "text_completion"
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(job, generation),
                                 "offload": engine_numbers(generation, job)})

        # stream: the first event decides between an error status and a 200 stream
        try:
            first = await next_event(request, job, watch=True)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        if first[0] == "error":
            raise failed(first[1])
        if first[0] == "done" and first[1] is None:
            raise APIError(499, "client closed the request", code="cancelled")
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: Optional[str], finish: Optional[str] = None, role: bool = False) -> dict:
            if kind == "chat":
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice]}

        async def stream() -> AsyncIterator[str]:
            event = first
            try:
                if kind == "chat":
                    yield _sse(chunk("", role=True))
                while True:
                    if event[0] == "token":
                        yield _sse(chunk(event[1]))
                    elif event[0] == "error":  # after the 200: an error event, then the end
                        err = failed(event[1])
                        metrics.add(**({"client_errors": 1} if err.status < 500 else {"server_errors": 1}))
                        yield _sse({"error": {"message": err.message, "type": err.type, "param": None,
                                              "code": err.code}})
                        break
                    else:
                        generation = event[1]
                        final = chunk(None if kind == "chat" else "",
                                      FINISH.get(generation.stats.stop_reason, "stop"))
                        final["usage"] = usage(job, generation)
                        final["offload"] = engine_numbers(generation, job)
                        yield _sse(final)
                        break
                    event = await job.events.get()
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()  # a client gone mid-stream: the worker stops at its next token

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        authorize(request)
        check_common(body)
        messages = [Message(m.role, m.text()) for m in body.messages]
        try:
            ids = engine.tokenizer.encode_messages(messages)
        except OffloadError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        settings = settings_for(body, len(ids), limit, reuse=True)
        return await run(request, body, ids, settings, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        authorize(request)
        check_common(body)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        try:
            ids = engine.tokenizer.encode(body.prompt, bos=True)
        except OffloadError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        settings = settings_for(body, len(ids), body.max_tokens, reuse=True)
        return await run(request, body, ids, settings, "completion")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "offload"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": worker.busy, "waiting": worker.waiting}

    @app.get("/metrics")
    async def get_metrics(request: Request):
        authorize(request)
        with metrics.lock:
            counts = dict(metrics.counts)
            seconds = metrics.generation_seconds
        return {**counts, "generation_seconds": round(seconds, 6),
                "tokens_per_s": round(counts["completion_tokens"] / seconds, 3) if seconds else 0.0,
                "busy": worker.busy, "waiting": worker.waiting, "queue_size": worker.queue_size,
                "uptime_s": round(time.time() - metrics.started, 3), "model": model_name,
                "context_length": engine.context_length}

    return app
