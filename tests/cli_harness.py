"""Run the real `sdtorch` CLI in a process of its own per call, fast enough for tables of bad inputs.

A plain subprocess per call costs about 2 s here, most of it importing torch. `CLI` instead starts one
helper process that imports sdtorch (and runs no torch operation, so no thread pool exists yet) and
then forks a fresh child for each call: the child changes to the given working folder, points its
stdin/stdout/stderr at files, runs `sdtorch.cli.main(argv)` and exits with its return code. A Python
exception escaping `main` prints its traceback and exits 1, exactly as the installed `sdtorch` script
would. Each call is therefore a separate process running the real entry point, with nothing carried
over from earlier calls.

`assert_clean_error` checks the contract of issue 17 for one bad input: exit code 2, one line on
stderr that starts with "sdtorch: error:" and names the problem, no traceback, and no file created,
changed or removed in the working folder or in the folders given as `watch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_ZYGOTE = r"""
import json, os, sys, traceback
import numpy, PIL.Image, safetensors.torch, torch  # imported, never run: no thread pool before fork
import sdtorch.cli, sdtorch.pipeline, sdtorch.generation, sdtorch.checkpoints
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            fds = [os.open(os.devnull, os.O_RDONLY),
                   os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                   os.open(job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)]
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            sys.stdin = open(0)
            sys.stdout = open(1, "w", buffering=1, errors="backslashreplace")
            sys.stderr = open(2, "w", buffering=1, errors="backslashreplace")
            env = job.get("env") or {}
            os.environ.update(env)
            argv = [os.fsdecode(os.fsencode(a)) if isinstance(a, str) else os.fsdecode(bytes(a)) for a in job["argv"]]
            code = sdtorch.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class CLI:
    """`cli(args, cwd=...) -> (code, stdout, stderr)`; args may hold bytes (for non-UTF-8 argv)."""

    def __init__(self, timeout: float = 120):
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        self.scratch = Path(tempfile.mkdtemp(prefix="sdtorch-cli-"))

    def __call__(self, args, cwd, env: dict | None = None) -> tuple[int, str, str]:
        out, err = self.scratch / "out", self.scratch / "err"
        argv = [list(a) if isinstance(a, bytes) else str(a) for a in args]
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err),
                                          "env": env}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the CLI helper process died")
        code = json.loads(line)
        return code, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def snapshot(folder) -> dict[str, tuple[int, int]]:
    """Every path under `folder` (hidden ones too) with its size and modification time."""
    folder = Path(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def assert_clean_error(cli: CLI, args, fragments=(), cwd=None, watch=()) -> str:
    """Run `args` and assert exit 2, one 'sdtorch: error:' line containing every fragment, no
    traceback, and nothing written in `cwd` or any folder in `watch`. Returns the error line."""
    cwd = Path(cwd or tempfile.mkdtemp(prefix="sdtorch-cwd-"))
    folders = [cwd, *map(Path, watch)]
    before = [snapshot(f) for f in folders]
    code, out, err = cli(args, cwd)
    assert "Traceback" not in err, err
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdtorch: error:"), err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    for folder, old in zip(folders, before):
        assert snapshot(folder) == old, f"{folder} changed: {sorted(set(snapshot(folder)) ^ set(old))}"
    return lines[0]
