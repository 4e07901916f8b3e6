"""Code (HumanEval / MBPP / LiveCodeBench-style): the last fenced code block of the answer runs
with the record's tests in a sandboxed subprocess; it scores 1 when the tests pass.

A record is `{"prompt", "test", "entry_point"?}`: HumanEval's `test` defines `check(candidate)`
and is called with `entry_point`; MBPP's is plain `assert` lines. The sandbox, in layers:
- a fresh `python -I` process in its own session, killed (with its children) after `timeout_s`;
- `resource.setrlimit`: address space, CPU seconds, written file size, open files, no core dumps;
- an empty temporary working directory, deleted afterwards, and a Python audit hook (which code
  cannot remove) refusing writes, deletes and renames outside it, sockets, subprocesses, `exec*`
  and `ctypes`; in a network namespace too where `unshare -n` is allowed.
This is the protection HumanEval's own harness offers, plus what the kernel enforces; it is not a
security boundary against hostile code. A hang, crash or refused action scores 0 and the run goes
on.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from nemotron_jax import rewards
from nemotron_jax.eval.grading import Benchmark, Grade, answer_region

PROMPT = ("Complete the following Python code. Put the complete solution in one fenced ```python code "
          "block.\n\n```python\n{prompt}\n```")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Runs first in the child: limits, then the audit hook, then the program (argv[1]) in this cwd.
_GUARD = r'''
import os, resource, sys
limits = {limits}
for name, value in limits.items():
    try:
        resource.setrlimit(getattr(resource, name), (value, value))
    except (ValueError, OSError):
        pass
sys.dont_write_bytecode = True
ROOT = os.path.realpath(os.getcwd())
program = open(sys.argv[1]).read()

def inside(path):
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    full = os.path.realpath(os.path.join(ROOT, path))
    return full == ROOT or full.startswith(ROOT + os.sep)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writes and not (isinstance(path, int) or inside(path)):
            raise PermissionError(f"sandbox: no writes outside the working directory ({{path}})")
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
                   "os.truncate", "shutil.rmtree", "os.utime"):
        if args and not (isinstance(args[0], int) or inside(args[0])):
            raise PermissionError(f"sandbox: {{event}} outside the working directory")
    elif event == "os.rename":
        if not (inside(args[0]) and inside(args[1])):
            raise PermissionError("sandbox: os.rename outside the working directory")
    elif event.startswith(("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                           "os.system", "pty.", "ctypes.", "os.kill", "os.killpg", "os.chdir", "os.chroot")):
        if event not in ("socket.gethostname", "socket.getservbyname"):
            raise PermissionError(f"sandbox: {{event}} is not allowed")

sys.addaudithook(hook)
namespace = {{"__name__": "__main__"}}
exec(compile(program, "solution.py", "exec"), namespace)
'''


def last_code_block(text: str) -> str | None:
    """The body of the last fenced code block (any language tag), or None."""
    blocks = _FENCE.findall(text)
    return blocks[-1][1] if blocks else None


@functools.cache
def _network_wrapper() -> tuple[str, ...]:
    """`unshare -rn` (no network interfaces) where this system lets us, else nothing."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return (unshare, "-rn") if ok else ()


def run_sandboxed(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> dict[str, Any]:
    """Run `program` in the sandbox: {"passed": exit status 0 in time, "status", "stderr" tail}."""
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": max(1, int(timeout_s) + 1), "RLIMIT_FSIZE": 16 << 20,
              "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    with tempfile.TemporaryDirectory(prefix="nj-sandbox-") as tmp:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        with open(os.path.join(tmp, "guard.py"), "w") as f:
            f.write(_GUARD.format(limits=repr(limits)))
        with open(os.path.join(tmp, "program.py"), "w") as f:
            f.write(program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work,
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        cmd = [*_network_wrapper(), sys.executable, "-I", os.path.join(tmp, "guard.py"),
               os.path.join(tmp, "program.py")]
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            _, err = proc.communicate()
            status = f"timed out after {timeout_s:g}s"
    return {"passed": status == "passed", "status": status, "stderr": err.decode(errors="replace")[-500:]}


def program_for(code: str, record: dict[str, Any]) -> str:
    """The candidate code followed by the record's tests (and HumanEval's `check(entry_point)`)."""
    parts = [record.get("test_setup_code") or "", code, str(record["test"])]
    entry = record.get("entry_point")
    if entry and "def check(" in str(record["test"]):
        parts.append(f"check({entry})")
    return "\n\n".join(p for p in parts if p) + "\n"


class Code(Benchmark):
    """Python tasks graded by running their tests; `timeout_s` and `memory_mb` bound each run."""

    name = "code"
    template = PROMPT
    keys = ("prompt", "test")
    votes = False

    def __init__(self, template: str | None = None, system: str | None = None, timeout_s: float = 10.0,
                 memory_mb: int = 1024, workers: int | None = None):
        super().__init__(template, system)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))

    def check(self, record: dict[str, Any]) -> None:
        super().check(record)
        if not isinstance(record["test"], str):
            raise ValueError("code record key 'test' must be a string of Python test code "
                             f"(got {type(record['test']).__name__}; stdin/stdout test lists are not supported)")

    def reference(self, record: dict[str, Any]) -> str:
        return str(record.get("entry_point") or "")

    def extract(self, text: str, record: dict[str, Any]) -> str | None:
        return last_code_block(text)

    def grade_many(self, responses: Sequence[str], records: Sequence[dict[str, Any]], thinking: bool) -> list[Grade]:
        codes = []
        for response, record in zip(responses, records, strict=True):
            region = answer_region(response, thinking)
            codes.append((region is None, None if region is None else self.extract(region, record)))
        jobs = {i: program_for(code, records[i]) for i, (_, code) in enumerate(codes) if code is not None}
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:  # threads only wait on processes
            runs = dict(zip(jobs, pool.map(lambda p: run_sandboxed(p, self.timeout_s, self.memory_mb),
                                           jobs.values()), strict=True))
        out = []
        for i, (response, (truncated, code)) in enumerate(zip(responses, codes, strict=True)):
            run = runs.get(i, {"passed": False, "status": "no code block" if not truncated else "truncated"})
            out.append(Grade(code, float(run["passed"]), bool(rewards.format(response, thinking)), truncated,
                             {"status": run["status"]}))
        return out


def _selftest() -> None:  # pragma: no cover - `python -m nemotron_jax.eval.grade_code`
    print(json.dumps(run_sandboxed("assert 1 + 1 == 2"), indent=2))


if __name__ == "__main__":  # pragma: no cover
    _selftest()
