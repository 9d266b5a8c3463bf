"""Sample a running server with py-spy and sum the samples by thread and function.

py-spy (pinned by ``make bench``; see the Makefile) reads the process's stacks
from outside at a fixed rate, so the server runs unchanged. Its raw
("collapsed") output has one line per distinct stack: the thread, then the
frames from the outermost to the innermost, separated by ``;``, then the
sample count. Threads that wait in a system call are not sampled.

A function's *self* share counts the samples where it is innermost, its
*total* share the samples where it is anywhere on the stack. py-spy reads
Python frames only, so time in grpc's Cython and C code counts as the Python
frame below it. That is ``Handle._run`` (a callback or task step that the
event loop runs) on the main thread and ``Thread.run`` on grpc's poller thread.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# "name (path/to/file.py:123)" -> name, path
_FRAME_RE = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")
# "thread (123): MainThread"
_THREAD_RE = re.compile(r"^thread \(\d+\):?\s*(?P<name>.*)$")
PRODUCT_PREFIX = "hasp_authz/"
# The command-line entry point is below every sample of the main thread.
ENTRY_PREFIX = "hasp_authz/cli/"


@dataclass(frozen=True)
class Profile:
    samples: int
    thread_share: list[tuple[str, float]]
    self_share: list[tuple[str, float]]
    # Total shares of hasp_authz functions only.
    product_share: list[tuple[str, float]]


def find_py_spy() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("py-spy")


def start_py_spy(pid: int, seconds: float, output: Path) -> subprocess.Popen:
    """Start sampling ``pid`` for ``seconds`` at 250 Hz into ``output``."""
    py_spy = find_py_spy()
    if py_spy is None:
        raise FileNotFoundError("py-spy not found; make bench installs it into .venv")
    command = [
        py_spy, "record",
        "--pid", str(pid),
        "--duration", str(max(1, round(seconds))),
        "--rate", "250",
        "--threads",
        "--format", "raw",
        "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def summarize(raw_text: str, top: int = 15) -> Profile:
    """Sum py-spy's collapsed stacks into shares per thread and per function."""
    threads: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw_text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = _THREAD_RE.match(frames[0])
        if thread is not None:
            threads[_thread_label(thread["name"])] += count
            frames = frames[1:]
        functions = [_function(frame) for frame in frames]
        if not functions:
            continue
        samples += count
        self_counts[functions[-1]] += count
        for name in set(functions):
            if PRODUCT_PREFIX in name and ENTRY_PREFIX not in name:
                total_counts[name] += count
    return Profile(
        samples=samples,
        thread_share=_shares(threads, samples, top),
        self_share=_shares(self_counts, samples, top),
        product_share=_shares(total_counts, samples, top),
    )


def _thread_label(name: str) -> str:
    if "_poll_wrapper" in name:
        return "grpc.aio poller thread"
    if name == "MainThread":
        return "main thread (event loop)"
    return name or "unnamed thread"


def _function(frame: str) -> str:
    match = _FRAME_RE.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['name']} ({match['path']})"


def _shares(counts: collections.Counter[str], samples: int, top: int):
    return [(name, count / samples) for name, count in counts.most_common(top)]
