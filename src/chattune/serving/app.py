"""The OpenAI-compatible HTTP app of `chattune serve`: /v1/models, /v1/chat/completions, /v1/completions,
/health, and a chat page at /. Generation runs in the batching Engine (chattune.inference.engine); this
module checks requests, renders prompts, and turns engine events into OpenAI's response objects and SSE
chunks."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from chattune.data.template import CALL_START, tool_template_problem
from chattune.inference.decoding import SamplingParams
from chattune.inference.engine import EngineClosed, Event, PromptTooLong
from chattune.serving import tools
from chattune.serving.errors import APIError, error_body, install_error_handlers
from chattune.serving.schemas import ChatCompletionRequest, CompletionRequest, template_messages

PAGE = Path(__file__).with_name("static") / "index.html"


class ShuttingDown(Exception):
    """The server is stopping and the request's grace period is over."""


def _to_loop(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, event: Event) -> None:
    """Engine sink: called in the worker thread, hands the event to the request's event loop."""
    loop.call_soon_threadsafe(queue.put_nowait, (index, event))


class _Job:
    """The engine requests of one HTTP request (one per prompt) and their merged events."""

    def __init__(self, engine, prompts: list[list[int]], params: SamplingParams):
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.requests = []
        try:
            for i, ids in enumerate(prompts):
                self.requests.append(engine.submit(ids, params, functools.partial(_to_loop, loop, self.queue, i)))
        except BaseException:
            self.cancel()
            raise
        self.prompt_tokens = sum(len(p) for p in prompts)

    async def events(self, http_request: Request | None = None, shutdown: anyio.Event | None = None,
                     grace: float = 0.0):
        """(index, event) until every request has ended. Stops early when the client disconnects (seen
        through http_request), and raises ShuttingDown `grace` seconds after `shutdown` is set."""
        open_, deadline = len(self.requests), None
        while open_:
            if deadline is None and shutdown is not None and shutdown.is_set():
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() >= deadline:
                raise ShuttingDown
            try:
                index, event = await asyncio.wait_for(self.queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if http_request is not None and await http_request.is_disconnected():
                    return
                continue
            open_ -= event.last
            yield index, event

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj) -> dict:
    return {"data": obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}


def create_app(engine, served_model_name: str, api_key: str | None = None, shutdown_grace: float = 3.0) -> FastAPI:
    """The app around a started-on-startup Engine. With api_key, /v1 routes need `Authorization: Bearer KEY`."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await run_in_threadpool(engine.close)

    # no /docs: its page loads scripts from a CDN, and the server must work offline
    app = FastAPI(title="chattune", lifespan=lifespan, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    created = int(time.time())

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send it as 'Authorization: Bearer KEY'",
                           param=None, code="invalid_api_key")

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "chattune"}

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                           param="model", code="model_not_found")

    def checked_params(body) -> SamplingParams:
        check_model(body.model)
        body.unsupported()
        return body.sampling(engine.vocab_size)

    def start(prompts: list[list[int]], params: SamplingParams, param: str) -> _Job:
        try:
            return _Job(engine, prompts, params)
        except PromptTooLong as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except EngineClosed as e:
            raise APIError(503, str(e), "server_error") from None

    async def run(job: _Job, http_request: Request) -> tuple[list[dict], int]:
        """Every choice's text and finish reason, or raises when generation failed."""
        choices = [{"text": [], "finish_reason": None, "tokens": 0} for _ in job.requests]
        try:
            async for i, ev in job.events(http_request):
                if ev.error:
                    raise APIError(500, ev.error, "server_error")
                choices[i]["text"].append(ev.text)
                choices[i]["finish_reason"], choices[i]["tokens"] = ev.finish_reason, ev.completion_tokens
        finally:
            job.cancel()  # frees the slots of a client that went away; no-op for finished requests
        return choices, sum(c["tokens"] for c in choices)

    def stream(job: _Job, chunk, include_usage: bool, first=None, pieces=None) -> EventSourceResponse:
        """SSE of the job's events: chunk(i, payload, finish) builds one chunk; pieces(i, event) -> [(payload,
        finish)] turns an event into chunk contents (by default its text, then its finish reason)."""
        shutdown = anyio.Event()  # sse-starlette sets it when the server starts shutting down
        pieces = pieces or (lambda i, ev: ([(ev.text, None)] if ev.text else [])
                            + ([(None, ev.finish_reason)] if ev.finish_reason else []))

        async def body():
            completion, failure = 0, None
            try:
                if first is not None:
                    yield _sse(chunk(0, first, None))
                async for i, ev in job.events(shutdown=shutdown, grace=shutdown_grace):
                    if ev.error:
                        failure = ev.error
                        break
                    for payload, finish in pieces(i, ev):
                        yield _sse(chunk(i, payload, finish))
                    if ev.finish_reason:
                        completion += ev.completion_tokens
            except ShuttingDown:
                failure = "the server is shutting down; the reply was cut short"
            finally:
                job.cancel()  # a client that disconnects mid-stream frees its slot at the next step
            if failure:
                yield _sse(error_body(failure, "server_error"))
            elif include_usage:
                yield _sse(chunk(None, None, None) | {"choices": [], "usage": _usage(job.prompt_tokens, completion)})
            yield _sse("[DONE]")

        # on shutdown a stream has `shutdown_grace` seconds to finish, then ends itself with an error event;
        # sse-starlette's own (longer) grace only cancels a stream that failed to end
        return EventSourceResponse(body(), sep="\n", shutdown_event=shutdown, shutdown_grace_period=shutdown_grace + 1)

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.accepting else "shutting down", "model": served_model_name, **engine.stats}
        return JSONResponse(body, status_code=200 if engine.accepting else 503)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @functools.cache
    def tool_problem() -> str | None:
        try:
            return tool_template_problem(engine.tokenizer)
        except Exception as e:  # a template the sandbox blocks: the messages' rendering will say so too
            return str(e)

    def tool_plan(body: ChatCompletionRequest, params: SamplingParams) -> tools.ToolPlan:
        """The request's tool settings; with tool_choice "none" the call tag is banned through `params`."""
        plan = tools.plan(body)
        uses_tools = plan.tools or any(m.tool_calls or m.role == "tool" for m in body.messages)
        if uses_tools and (problem := tool_problem()):
            raise APIError(400, f"this server's model cannot take tools: {problem}", param="tools")
        if plan.ban_call_tag and (tag := engine.token_id(CALL_START)) is not None:
            params.logit_bias = {**params.logit_bias, tag: -100.0}
        return plan

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, http_request: Request) -> Response:
        params = checked_params(body)
        plan = tool_plan(body, params)
        messages = template_messages(body.messages)
        try:
            ids = await run_in_threadpool(engine.encode_chat, messages, plan.tools, plan.reply_start)
        except Exception as e:  # a model's own template may reject a conversation (roles, alternation)
            raise APIError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        job = start([ids], params, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call_ids = f"call_{rid[9:33]}"  # call ids: call_<24 hex>_<k>, unique per request

        def chunk(i, delta, finish):
            delta = {"role": "assistant", "content": ""} if delta is ROLE else delta or {}
            choices = [] if i is None else [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": served_model_name,
                    "system_fingerprint": None, "choices": choices}

        if body.stream:
            deltas = [tools.DeltaStream(plan, call_ids) for _ in job.requests]

            def pieces(i, ev):
                out = [(d, None) for d in deltas[i].feed(ev.text)]
                if ev.finish_reason:
                    rest, finish = deltas[i].finish(ev.finish_reason)
                    out += [(d, None) for d in rest] + [(None, finish)]
                return out

            return stream(job, chunk, body.include_usage, first=ROLE, pieces=pieces)
        choices, completion = await run(job, http_request)
        replies = [tools.reply_message(plan, "".join(c["text"]), c["finish_reason"], call_ids) for c in choices]
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": now, "model": served_model_name,
            "system_fingerprint": None, "usage": _usage(job.prompt_tokens, completion),
            "choices": [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                        for i, (message, finish) in enumerate(replies)]})

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, http_request: Request) -> Response:
        params = checked_params(body)
        prompts = [await run_in_threadpool(engine.encode_text, p) for p in body.prompt]
        job = start(prompts, params, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish):
            choices = [] if i is None else [{"index": i, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]
            return {"id": rid, "object": "text_completion", "created": now, "model": served_model_name,
                    "system_fingerprint": None, "choices": choices}

        if body.stream:
            return stream(job, chunk, body.include_usage)
        choices, completion = await run(job, http_request)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": now, "model": served_model_name,
            "system_fingerprint": None, "usage": _usage(job.prompt_tokens, completion),
            "choices": [{"index": i, "text": "".join(c["text"]), "logprobs": None,
                         "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)]})

    return app


ROLE = object()  # marks the first chat chunk, which carries the assistant role and no text yet
