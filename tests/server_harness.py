"""Run the real `sdtorch serve` in a subprocess on a free loopback port, for tests that speak HTTP to it.

`running_server(*args, env=None)` starts `python -m sdtorch serve --model shapes --port FREE --host 127.0.0.1
*args`, waits until GET /sdapi/v1/samplers answers 200 (at most `START_TIMEOUT_S`), and yields a `Server` with
`.url` (http://127.0.0.1:PORT, no trailing slash), `.port` and `.proc`. Later arguments win over the defaults
(argparse keeps the last `--model`). On exit the process gets SIGTERM, then SIGKILL after `STOP_TIMEOUT_S`. The
server's stderr goes to a temporary file, shown in the assertion message when the server does not come up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 60.0  # importing torch and loading the model takes ~5-10 s here; 60 s covers a busy machine
STOP_TIMEOUT_S = 10.0


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        """The server process's resident set size (VmRSS) in KiB, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS in /proc/{self.proc.pid}/status")

    def get(self, path: str, timeout: float = 30.0):
        """(status, decoded JSON, headers) of GET url+path."""
        return request(self.url + path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 120.0):
        """(status, decoded JSON, headers) of POST url+path with a JSON body."""
        return request(self.url + path, {} if body is None else body, timeout=timeout)


def request(url: str, body=None, timeout: float = 120.0, headers: dict | None = None):
    """(status, JSON body, response headers); an HTTP error status is returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = raw.decode(errors="replace")
        return e.code, payload, dict(e.headers)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL if it is still running after `timeout` seconds; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "sdtorch", "serve", "--model", "shapes", "--port", str(port), "--host",
           "127.0.0.1", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="sdtorch-serve-") as tmp:
        err_path = Path(tmp) / "stderr.txt"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env={**os.environ, **(env or {})})
        server = Server(f"http://127.0.0.1:{port}", port, proc, err_path)
        try:
            _wait_ready(server, cmd)
            yield server
        finally:
            stop(proc)


def _wait_ready(server: Server, cmd: list[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"`{' '.join(cmd)}` exited with {server.proc.returncode} before it answered; "
                                 f"stderr:\n{server.stderr()}")
        try:
            status, _, _ = request(server.url + "/sdapi/v1/samplers", timeout=5)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:  # connection refused while it starts
            last = repr(e)
        time.sleep(0.2)
    raise AssertionError(f"`{' '.join(cmd)}` did not answer GET /sdapi/v1/samplers within {START_TIMEOUT_S:.0f} s "
                         f"({last}); stderr:\n{server.stderr()}")
