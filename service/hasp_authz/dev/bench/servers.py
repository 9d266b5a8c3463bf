"""Start the ext_authz servers under test and read their CPU time.

A ``ServerGroup`` is one or more processes that together serve one case:
the allow-all floor, hasp-authz with some settings, or several hasp-authz
workers that Envoy balances across. Each listens on a free port on 127.0.0.1
or on a Unix socket in the run's folder.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hasp_authz.dev.processes import ManagedProcess, ProcessFailed
from hasp_authz.dev.redis_server import free_port

BIN_DIR = Path(sys.executable).parent
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """Return the user plus system CPU time of a process, all its threads included.

    With ``thread``, return that one thread's time instead.
    """
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as file:
        stat = file.read()
    # The command name (field 2) may contain spaces, so split after its ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of the whole line.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


@dataclass
class ServerGroup:
    name: str
    addresses: list[str]
    processes: list[ManagedProcess] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def main_thread_cpu_seconds(self) -> float:
        """Return the CPU time of the main threads, where the event loops run."""
        return sum(cpu_seconds(pid, thread=pid) for pid in self.pids)

    @property
    def pids(self) -> list[int]:
        return [p.process.pid for p in self.processes if p.process]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def start_allow_all(
    workdir: Path, *, capture: Path | None = None, uvloop: bool = False
) -> ServerGroup:
    """Start allow_all.py on a free port."""
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "hasp_authz.dev.bench.allow_all"]
    command += ["--listen", address]
    if capture is not None:
        command += ["--capture", str(capture)]
    if uvloop:
        command.append("--uvloop")
    group = ServerGroup("allow-all", [address])
    _start(group, workdir, command, {}, address)
    return group


def start_hasp_authz(
    workdir: Path,
    name: str,
    redis_url: str,
    *,
    env: dict[str, str] | None = None,
    workers: int = 1,
    uvloop: bool = False,
    unix_socket: bool = False,
    two_round_trips: bool = False,
) -> ServerGroup:
    """Start ``workers`` hasp-authz processes, each with its own address.

    Plain runs use the ``hasp-authz serve`` entry point. The options run
    variant.py, which wraps the same server.
    """
    group = ServerGroup(name, [])
    try:
        for index in range(workers):
            if unix_socket:
                address = f"unix:{workdir / f'{name}-{index}.sock'}"
            else:
                address = f"127.0.0.1:{free_port()}"
            command = [str(BIN_DIR / "hasp-authz"), "serve"]
            variant_flags = []
            if uvloop:
                variant_flags.append("--uvloop")
            if two_round_trips:
                variant_flags.append("--two-round-trips")
            if unix_socket:
                variant_flags += ["--unix-socket", address[len("unix:") :]]
            if variant_flags:
                command = [sys.executable, "-m", "hasp_authz.dev.bench.variant"]
                command += variant_flags
            server_env = {
                "HASP_REDIS_URL": redis_url,
                # Each worker serves its metrics on a port of its own, as in a
                # deployment, so the scrape-side cost is the shipped one.
                "HASP_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
                **({} if unix_socket else {"HASP_LISTEN": address}),
                **(env or {}),
            }
            group.addresses.append(address)
            _start(group, workdir, command, server_env, address, f"{name}-{index}")
    except BaseException:
        group.stop()
        raise
    return group


def _start(
    group: ServerGroup,
    workdir: Path,
    command: list[str],
    env: dict[str, str],
    address: str,
    log_name: str | None = None,
) -> None:
    process = ManagedProcess(
        log_name or group.name, command, workdir / f"{log_name or group.name}.log", env
    )
    group.processes.append(process.start())
    if address.startswith("unix:"):
        _wait_for_unix_socket(process, address[len("unix:") :])
    else:
        process.wait_for_port(int(address.rpartition(":")[2]))


def _wait_for_unix_socket(process: ManagedProcess, path: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running:
            raise ProcessFailed(
                f"{process.name} exited during start-up; see {process.log_path}"
            )
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(path)
                return
        except OSError:
            time.sleep(0.05)
    raise ProcessFailed(f"{process.name} did not listen on {path} within {timeout} s")
