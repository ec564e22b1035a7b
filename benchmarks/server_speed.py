"""Speed of `sdtorch serve` with the built-in shapes model: throughput and latency at 1 and N concurrent clients,
and the server's overhead at one client against the same generation called from Python in this process.

The server is the real `python -m sdtorch serve` in a subprocess on a free loopback port (tests/server_harness.py),
with --queue-size equal to the number of clients so that no request is refused (a refused one would be a 503,
not a latency). Every request is POST /sdapi/v1/txt2img with its own seed: 64x64, 10 steps, DPM++ 2M, CFG 1.5
(the model's defaults). Latency is the client's wall time per request (HTTP, JSON, PNG and base64 included);
at N clients it includes the time spent waiting in the queue, since the server runs one job at a time.

Overhead: the same requests generated with `sdtorch.load("shapes")` + `generation.generate` in this process,
interleaved one for one with the server's (so a change in the machine's load hits both alike), while the server
is idle. ratio = median server latency / median Python latency (goal: < 1.05). The Python side runs on one
worker thread, as the server's jobs do (server/jobs.py): on this machine a process whose first torch work runs
on the main thread was seen to stay several times slower for many calls (12 s, then 1.9 s, then 0.5 s; in one
run a median of 8.6 s), which would flatter the server.

    python benchmarks/server_speed.py [--requests 40] [--clients 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_harness import request, running_server  # noqa: E402

warnings.filterwarnings("ignore")
PROMPT = "a large red circle in the top left on a white background"
BODY = dict(prompt=PROMPT, width=64, height=64, steps=10, cfg_scale=1.5, sampler_name="DPM++ 2M")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def one_request(url: str, seed: int) -> float:
    t0 = time.perf_counter()
    status, body, _ = request(url + "/sdapi/v1/txt2img", {**BODY, "seed": seed}, timeout=600)
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise SystemExit(f"request with seed {seed}: HTTP {status}: {body}")
    if json.loads(body["info"])["all_seeds"] != [seed]:
        raise SystemExit(f"request with seed {seed} got another image's info")
    return elapsed


def run_clients(url: str, clients: int, requests: int, first_seed: int) -> tuple[list[float], float]:
    """`requests` requests spread over `clients` threads, each sending its next request when the last returns;
    (latencies, wall time)."""
    seeds = iter(range(first_seed, first_seed + requests))
    import threading

    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                seed = next(seeds, None)
            if seed is None:
                return
            t = one_request(url, seed)
            with lock:
                latencies.append(t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return latencies, time.perf_counter() - t0


def report(label: str, latencies: list[float], wall: float) -> None:
    print(f"{label:<22} {len(latencies) / wall * 60:8.1f} req/min   p50 {percentile(latencies, 50):7.3f} s   "
          f"p95 {percentile(latencies, 95):7.3f} s   ({len(latencies)} requests in {wall:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40, help="requests per measurement (default: 40)")
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients of the second measurement")
    ap.add_argument("--warmup", type=int, default=5, help="requests (and Python runs) before measuring")
    args = ap.parse_args()
    import sdtorch
    from sdtorch import generation

    print(f"date {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"command {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"request: txt2img 64x64, {BODY['steps']} steps {BODY['sampler_name']}, CFG {BODY['cfg_scale']}, "
          f"built-in shapes model, one image each")

    model = sdtorch.load("shapes")

    def python_generate(seed: int) -> float:
        req = generation.resolve(PROMPT, model, None, width=64, height=64, steps=BODY["steps"],
                                 guidance=BODY["cfg_scale"], sampler="dpmpp_2m", seed=seed)
        t0 = time.perf_counter()
        result = generation.generate(model, req)
        result.pil()
        return time.perf_counter() - t0

    worker = ThreadPoolExecutor(1, thread_name_prefix="python-generate")
    with running_server("--queue-size", str(max(args.clients, 1))) as server:
        for i in range(args.warmup):
            one_request(server.url, 10_000 + i)
            worker.submit(python_generate, 10_000 + i).result()
        ours_server, ours_python = [], []
        t0 = time.perf_counter()
        for i in range(args.requests):  # one client, interleaved with the same generation in this process
            ours_server.append(one_request(server.url, 20_000 + i))
            ours_python.append(worker.submit(python_generate, 20_000 + i).result())
        interleaved_wall = time.perf_counter() - t0
        many, many_wall = run_clients(server.url, args.clients, args.requests, 30_000)

    # at one client the requests are back to back, so the server's own wall time is the sum of its latencies
    report("1 client", ours_server, sum(ours_server))
    report(f"{args.clients} clients", many, many_wall)
    p_server, p_python = statistics.median(ours_server), statistics.median(ours_python)
    print(f"python generate        {60 / p_python:8.1f} img/min   p50 {p_python:7.3f} s   "
          f"p95 {percentile(ours_python, 95):7.3f} s   (same requests, interleaved; {interleaved_wall:.1f} s for both)")
    print(f"overhead at 1 client: server p50 / python p50 = {p_server / p_python:.3f}  (goal < 1.05; "
          f"{(p_server - p_python) * 1000:+.1f} ms per request)")


if __name__ == "__main__":
    main()
