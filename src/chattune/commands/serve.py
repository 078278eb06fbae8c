"""`chattune serve MODEL`: an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)
and a chat page at /, on uvicorn; concurrent requests are generated in one batch."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path

from chattune.commands import default
from chattune.commands.generate import add_model_argument
from chattune.errors import ChattuneError

log = logging.getLogger("chattune")
API_KEY_ENV = "CHATTUNE_API_KEY"


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--host", default=default(run_server, "host"),
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=default(run_server, "port"),
                   help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients use (default: the directory's "
                                                               "name)")
    p.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' on /v1 (default: "
                                                    f"${API_KEY_ENV}, which keeps the key out of the process list)")
    p.add_argument("--max-batch-size", type=int, default=default(run_server, "max_batch_size"), metavar="N",
                   help="requests generated together (default: %(default)s; 1 answers one request at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=default(run_server, "batch_wait_ms"), metavar="MS",
                   help="how long an idle server waits for more requests to batch with the first (default: "
                        "%(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=default(run_server, "shutdown_grace"), metavar="SECONDS",
                   help="on SIGTERM / Ctrl-C, how long requests in flight may still run before they are cut short "
                        "(default: %(default)s)")


def run(args) -> int:
    return run_server(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
                      api_key=args.api_key, device=args.device, max_batch_size=args.max_batch_size,
                      batch_wait_ms=args.batch_wait_ms, shutdown_grace=args.shutdown_grace,
                      log_level="debug" if getattr(args, "debug", False) else "info")


def default_model_name(model_path: str) -> str:
    """A local directory's name (resolved, so '.' or 'out/' give a real name); a hub id as given."""
    p = Path(model_path).expanduser()
    return p.resolve().name if p.exists() else model_path


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so that a taken port fails at once, in one line."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ChattuneError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock


def _check(max_batch_size: int, batch_wait_ms: float, shutdown_grace: float) -> None:
    for flag, value, ok, rule in (("--max-batch-size", max_batch_size, max_batch_size >= 1, "at least 1"),
                                  ("--batch-wait-ms", batch_wait_ms, batch_wait_ms >= 0, ">= 0"),
                                  ("--shutdown-grace", shutdown_grace, shutdown_grace >= 0, ">= 0")):
        if not ok:
            raise ChattuneError(f"{flag} must be {rule}, got {value}")


def _ignore(signum, frame) -> None:
    pass


def run_server(model_path: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
               api_key: str | None = None, device: str | None = None, max_batch_size: int = 8,
               batch_wait_ms: float = 10.0, shutdown_grace: float = 3.0, log_level: str = "info") -> int:
    """Load the model as `chattune chat` does and serve it until SIGTERM / Ctrl-C; then stop accepting, give
    requests in flight `shutdown_grace` seconds, cut the rest short and return 0. api_key (default:
    $CHATTUNE_API_KEY) is required on /v1 when set; it is never printed or logged."""
    _check(max_batch_size, batch_wait_ms, shutdown_grace)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    name = served_model_name or default_model_name(model_path)
    from chattune.model.manifest import check_complete

    check_complete(model_path)  # a run whose final save did not finish: one line, before the port opens
    sock = bind(host, port)
    try:
        app = _load_app(model_path, device, name, api_key, max_batch_size, batch_wait_ms, shutdown_grace)
        _serve(app, sock, name, api_key is not None, shutdown_grace, log_level)
    finally:
        sock.close()
    return 0


def _load_app(model_path, device, name, api_key, max_batch_size, batch_wait_ms, shutdown_grace):
    from transformers.utils import logging as hf_logging

    from chattune.inference.engine import Engine
    from chattune.model.load import load_chat_model
    from chattune.serving.app import create_app

    hf_logging.disable_progress_bar()  # the server's log is for requests, not loading bars
    log.info(f"loading {model_path}")
    model, tokenizer = load_chat_model(model_path, device)
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_wait=batch_wait_ms / 1000)
    return create_app(engine, name, api_key, shutdown_grace=shutdown_grace)


def _serve(app, sock: socket.socket, name: str, keyed: bool, shutdown_grace: float, log_level: str) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_grace + 2, lifespan="on")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    if not keyed and not ipaddress.ip_address(host).is_loopback:
        log.warning(f"listening on {host} without an API key: anyone who can reach this machine can use the model "
                    f"(set {API_KEY_ENV})")
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name!r} on http://{shown}:{port} (chat page at /, API at /v1"
          f"{', API key required' if keyed else ''}); Ctrl-C stops", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with a no-op handler in
    # place, a requested stop is then a normal exit (status 0) rather than death by that signal
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
