"""`hf-balanced-reward serve MODEL_DIR`: the reward model over HTTP for RL run on other processes or machines.

- `POST /get_reward`: OpenRLHF's remote reward protocol (`--remote_rm_url`): `{"query": [text, ...]}` (its `prompts`
  and `labels` are accepted and not used) -> `{"rewards": [...], "scores": [...], "extra_logs": {...}}`.
- `POST /v1/rewards`: `{"items": [{"prompt": ..., "response": ...} | {"prompt": ..., "completions": [...]}]}`, texts
  or message lists, per-item `tools` / `chat_template_kwargs` -> each item's reward (and rewards and ranks).
- Both take `"attributes": true` for a multi-attribute model: each attribute's reward as well (`attribute_rewards`);
  the reward stays their weighted sum, from the same forward pass.
- `GET /health` (200 once the model is loaded and a warm-up batch ran), `GET /v1/model` (what the model is).

Every text is scored by `scoring.py`'s contract (what `score`, `reward_function` and training give), batched across
concurrent requests by `serve_batching.Batcher`; each request's body is read and checked by `serve_requests`. Secure
by default: 127.0.0.1, an API key compared in constant time when one is set, no request text in the logs unless
--log_requests. fastapi, uvicorn and torch are imported only when the command runs.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import sys

from .errors import ConfigError, DataError
from .serve_batching import Batcher, QueueFull, RewardModel
from .serve_requests import (RequestError, attributes_flag, check_key, item_result, item_texts, openrlhf_answer,
                             openrlhf_queries, parse_body, presented_key, structured_items)

logger = logging.getLogger(__name__)

API_KEY_ENV = "HF_BALANCED_REWARD_API_KEY"
MAX_BODY_BYTES = 64 * 2**20  # a body past this is refused (413) before it is read whole
SHUTDOWN_TIMEOUT_S = 60  # SIGTERM: how long in-flight requests may take to finish
RETRY_AFTER_S = 1
DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-balanced-reward serve",
        description="Serve a reward model over HTTP: OpenRLHF's POST /get_reward, POST /v1/rewards (prompt + "
        "response or completions), GET /health, GET /v1/model; texts of concurrent requests are batched together.",
    )
    parser.add_argument("model", metavar="MODEL_DIR",
                        help="A saved reward model (one output, or one per attribute: trained with `attributes`): a "
                        "folder, hub id or package:NAME/DIR.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network, "
                        "then set an API key).")
    parser.add_argument("--port", type=int, default=8000, help="Port (default 8000; 0: a free one, printed).")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                        help=f"Key every request but /health must send (Authorization: Bearer KEY, or ?api_key=KEY "
                        f"for clients that send no headers). Default: ${API_KEY_ENV}, which keeps the key out of "
                        "the process list; none: no key asked.")
    parser.add_argument("--max_batch_tokens", type=int, default=8192,
                        help="Most tokens per forward pass, padding included (default 8192).")
    parser.add_argument("--max_wait_ms", type=float, default=5.0,
                        help="Longest a text waits for others to share its batch (default 5).")
    parser.add_argument("--max_queue", type=int, default=1024,
                        help="Most texts waiting; a request that would pass it gets 503 with Retry-After "
                        "(default 1024).")
    parser.add_argument("--max_request_items", type=int, default=256,
                        help="Most texts in one request (each completion counts); more get 413 (default 256).")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps ... (default: the accelerator Accelerate picks, else cpu).")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="Weights' dtype (default float32: rewards equal score's; bfloat16/float16 are faster "
                        "on a GPU and differ slightly).")
    parser.add_argument("--max_length", type=int, default=None,
                        help="Most tokens per text, prompt cut from the left (default: the one the model was "
                        "trained with, as score does).")
    parser.add_argument("--log_requests", action="store_true",
                        help="Log every request's texts and rewards (off by default: texts may be private).")
    return parser


def check_options(args) -> None:
    """ConfigError naming the option, before the model loads."""
    for option, low in (("max_batch_tokens", 1), ("max_queue", 1), ("max_request_items", 1), ("max_wait_ms", 0)):
        if getattr(args, option) < low:
            raise ConfigError(f"--{option} must be at least {low}, got {getattr(args, option)}.")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0 to 65535 (0: a free port), got {args.port}.")
    if args.max_request_items > args.max_queue:
        raise ConfigError(f"--max_request_items {args.max_request_items} is more than --max_queue {args.max_queue}: "
                          "such a request could never be queued; lower the first or raise the second.")
    if args.max_length is not None and args.max_length < 2:
        raise ConfigError(f"--max_length must be at least 2, got {args.max_length}.")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError(f"--api_key (or ${API_KEY_ENV}) is empty; set a key, or unset it to ask for none.")


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the (slow) model load, so that a taken port fails at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on --host {host} --port {port} ({err.strerror or err}); choose another "
                          "--port (0 picks a free one) or stop the process that holds it.") from None
    return sock


def serve_main(argv: list[str] | None = None) -> int:
    """`hf-balanced-reward serve MODEL_DIR [--option value ...]`. Exit status: 0 once stopped by SIGTERM or SIGINT;
    2 for a wrong option, a taken port or a folder that is not a reward model (one output, or one per attribute;
    before anything is served); 1 if the server failed to start."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has already printed
        return stop.code if isinstance(stop.code, int) else 2
    sock = None
    try:
        if missing := [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]:
            raise ConfigError(f"serve needs {' and '.join(missing)}: pip install 'hf-balanced-reward[serve]' (make "
                              "setup installs it).")
        check_options(args)
        if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
            logger.warning(f"--host {args.host} with no API key: anyone who can reach this port can use the model; "
                           f"set ${API_KEY_ENV}.")
        sock = listening_socket(args.host, args.port)
        from .cli import quiet_libraries

        quiet_libraries()
        reward_model = RewardModel(args.model, args.device, args.dtype, args.max_length)
    except (ConfigError, DataError) as err:
        if sock is not None:
            sock.close()
        print(f"hf-balanced-reward: error: {err}", file=sys.stderr)
        return 2
    return run_server(reward_model, sock, args)


def stop_quietly_on_signals():
    """SIGTERM / SIGINT handlers that do nothing, for the time uvicorn serves: it handles both (stops accepting,
    finishes in-flight requests) and then raises the signal again, which these absorb so the command exits 0.
    Returns the handlers to restore."""
    return {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}


# --- the app ------------------------------------------------------------------------------------------------------


def build_app(reward_model: RewardModel, batcher: Batcher, args):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    state = {"ready": False, "worker": None}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["worker"] = asyncio.create_task(batcher.run())
        await batcher.score_now(reward_model.tokenize([""], ["Warm-up: one batch before the server says ready."])[0])
        state["ready"] = True
        yield
        state["ready"] = False
        state["worker"].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state["worker"]
        if unscored := batcher.close():  # only when requests outlived SHUTDOWN_TIMEOUT_S
            logger.warning(f"stopped with {unscored} texts unscored: their requests got no answer.")

    # No /docs or /openapi.json: bodies are read and checked here (to name each bad field), so they would say little.
    app = FastAPI(title="hf-balanced-reward", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def answer_request_error(request, err: RequestError):
        return JSONResponse({"detail": err.message}, err.status, headers=err.headers)

    async def read_json(request: Request):
        """The body of a POST, once its key is checked: 401, 413 past MAX_BODY_BYTES, 400 if not JSON."""
        check_key(presented_key(request.headers, request.query_params), args.api_key)
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            raise RequestError(413 if declared.isdigit() else 400, f"Content-Length {declared}: a body must be at "
                               f"most {MAX_BODY_BYTES} bytes; split the request.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(413, f"the body passes {MAX_BODY_BYTES} bytes; split the request.")
        return parse_body(bytes(body))

    def token_ids(where: str, prompts, responses, names: list[str], options=None) -> tuple[list, list[str]]:
        """Token ids and cuts of the texts named `names` (of `where` in the request); 422 naming what fails."""
        try:
            ids, cuts = reward_model.tokenize(prompts, responses, options)
        except (ConfigError, DataError) as err:
            raise RequestError(422, f"{where}: {err}") from None
        except Exception as err:  # the chat template refused the messages
            raise RequestError(422, f"{where}: the chat template could not render it ({err}).") from None
        if empty := [name for name, one in zip(names, ids) if not one]:
            raise RequestError(422, f"{empty[0]} is empty, and this tokenizer adds no special token to a text: "
                               "nothing to score. Send a non-empty text.")
        return ids, cuts

    def wants_attributes(body: dict) -> bool:
        """The body's `attributes` flag; 422 when it asks them of a one-output model."""
        wanted = attributes_flag(body)
        if wanted and reward_model.attributes is None:
            raise RequestError(422, f"'attributes' is true, but {reward_model.name} has one output: it was not "
                               "trained with `attributes`, so it has no per-attribute rewards. Leave 'attributes' "
                               "out for its reward.")
        return wanted

    async def rewards_of(ids: list[list[int]], attributes: bool) -> tuple[list[float], list[dict] | None]:
        """(rewards, each text's {attribute: reward} when `attributes`, else None): one forward pass gives both."""
        try:
            done = batcher.submit(ids)
        except QueueFull as err:
            raise RequestError(503, str(err), {"Retry-After": str(RETRY_AFTER_S)}) from None
        try:
            values = await done
        except RuntimeError as err:
            raise RequestError(500, str(err)) from None
        return [reward for reward, _ in values], [one for _, one in values] if attributes else None

    def log_request(endpoint: str, texts, rewards, by_attribute) -> None:
        if args.log_requests:
            logged = {"texts": texts, "rewards": rewards}
            if by_attribute is not None:
                logged["attribute_rewards"] = by_attribute
            logger.info(f"{endpoint} " + json.dumps(logged, ensure_ascii=False))

    @app.get("/health")
    async def health():
        worker = state["worker"]
        if worker is not None and worker.done():
            return JSONResponse({"status": "broken", "detail": "the batching worker stopped; restart the server."},
                                503)
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ready", "waiting": len(batcher.waiting), "scored": batcher.scored,
                             "batches": batcher.batches})

    @app.get("/v1/model")
    async def model(request: Request):
        check_key(presented_key(request.headers, request.query_params), args.api_key)
        return JSONResponse(reward_model.info(args))

    @app.post("/get_reward")
    async def get_reward(request: Request):
        body = await read_json(request)
        queries = openrlhf_queries(body, args.max_request_items)
        attributes = wants_attributes(body)
        names = reward_model.attributes["names"] if attributes else ()
        if not queries:  # OpenRLHF shards a list of queries over its reward URLs: a replica may get none
            return JSONResponse(openrlhf_answer([], [], [] if attributes else None, names))
        ids, cuts = token_ids("query", [""] * len(queries), queries, [f"query[{i}]" for i in range(len(queries))])
        rewards, by_attribute = await rewards_of(ids, attributes)
        log_request("/get_reward", queries, rewards, by_attribute)
        return JSONResponse(openrlhf_answer(rewards, [cut != "kept" for cut in cuts], by_attribute, names))

    @app.post("/v1/rewards")
    async def v1_rewards(request: Request):
        body = await read_json(request)
        items = structured_items(body, args.max_request_items)
        attributes = wants_attributes(body)
        all_ids, all_cuts, sizes = [], [], []
        for i, item in enumerate(items):
            prompts, responses, options = item_texts(item)
            names = [f"items[{i}]." + ("response" if "response" in item else f"completions[{k}]")
                     for k in range(len(responses))]
            ids, cuts = token_ids(f"items[{i}]", prompts, responses, names, options)
            all_ids += ids
            all_cuts += cuts
            sizes.append(len(ids))
        all_rewards, all_attributes = await rewards_of(all_ids, attributes)
        log_request("/v1/rewards", items, all_rewards, all_attributes)
        results, start = [], 0
        for item, size in zip(items, sizes):
            part = slice(start, start + size)
            results.append(item_result(item, all_rewards[part], all_cuts[part],
                                       all_attributes[part] if attributes else None))
            start += size
        return JSONResponse({"items": results, "max_length": reward_model.max_length})

    return app


def new_batcher(reward_model: RewardModel, args) -> Batcher:
    """The batcher of `reward_model`: its values carry each text's reward and, for an attribute model, each
    attribute's, so that a request may ask for either."""
    return Batcher(reward_model.score_values, args.max_batch_tokens, args.max_wait_ms / 1000, args.max_queue)


def run_server(reward_model: RewardModel, sock: socket.socket, args) -> int:
    """Serve until SIGTERM or SIGINT: then stop accepting, score what waits, answer every request in flight, exit
    0."""
    import uvicorn

    batcher = new_batcher(reward_model, args)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    ready = (f"hf-balanced-reward serve: {reward_model.name} ready on {url} (max_length {reward_model.max_length}, "
             f"{reward_model.device}, {reward_model.dtype}; API key {'required' if args.api_key else 'not asked'})")

    class RewardServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # listening now: the line a supervisor (or a test) waits for
                print(ready, flush=True)

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if batcher.loop is not None:
                batcher.loop.call_soon_threadsafe(batcher.drain)

    config = uvicorn.Config(build_app(reward_model, batcher, args), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S, lifespan="on")
    server = RewardServer(config)
    previous = stop_quietly_on_signals()
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    if not server.started:
        print("hf-balanced-reward: error: the server did not start (see the message above).", file=sys.stderr)
        return 1
    print("hf-balanced-reward serve: stopped.", flush=True)
    return 0
