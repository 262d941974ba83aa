"""gRPC pods and callers for the HTTP/2 tests: grpcio with generic handlers, raw bytes.

No protoc: every method of the service `sidelink.test.Pod` takes and returns bytes
(identity serializers), and every answer carries the name of the pod that gave it, so a
test counts where each call landed from what the caller got back.

    Who      unary: the pod's name (after the pod's `delay`)
    Stream   server streaming: the request is a count N; N messages, each the name
    Sum      client streaming: the name, then how many messages came ("127.0.0.2 5")
    Chat     bidi: one answer (the name) per message, as each comes
    Echo     unary: sha256(request) then the request, byte for byte (the 16 MB test)
    Slow     unary: the request is a number of seconds to wait (ending early when the
             call ends); the answer is the name; the deadline the pod saw (from
             `grpc-timeout`) is kept
    Endless  server streaming: the name every 10 ms until the call ends; how it ended
             (cancelled, and when) is kept
    Stats    unary: what the pod kept, as JSON (how a test reads a pod in another process)

`GrpcPods` runs one grpcio server per loopback address (127.0.0.2, ...), all on one port
(a DNS answer carries no port), in this process (grpcio serves from its own threads, so
sidelink's loop stays free); each pod stops gracefully (`stop(grace)`: GOAWAY, in-flight
calls finish) on its own. `PodProcess` is one pod in a process of its own
(`python -m support.grpc_servers HOST PORT`, run from tests/), for the test that SIGKILLs
it. `Caller` wraps a channel to sidelink with one method per RPC; `GrpcLoad` runs N
callers in threads (sidelink's loop serves on meanwhile) doing a mix of calls over one
channel, and records every outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

SERVICE = "sidelink.test.Pod"
MB = 1024 * 1024
# Large enough for the 16 MB messages both ways (with the 32 bytes of digest on top).
MAX_MESSAGE = 64 * MB
MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
# grpcio binds with SO_REUSEPORT by default: two pods could then share one address and
# port unseen. Each pod must own its socket.
SERVER_OPTIONS = [*MESSAGE_OPTIONS, ("grpc.so_reuseport", 0)]
# The client must not retry on its own (grpcio's transparent retries): what the tests
# count is what sidelink did.
CLIENT_OPTIONS = [*MESSAGE_OPTIONS, ("grpc.enable_retries", 0)]
WORKERS = 64  # handler threads per pod: above every test's calls in flight at once
ENDLESS_EVERY = 0.01
STOP_GRACE = 5.0
TESTS_DIR = Path(__file__).resolve().parent.parent


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


# --- one pod's service -----------------------------------------------------------------


@dataclass
class Ended:
    """When an Endless call ended, as the pod saw it (it never ends on its own)."""

    after: float  # seconds from the call's start to its end
    at: float  # time.monotonic() when it ended


class Servicer:
    """The service one pod serves, and what it saw: calls per method, deadlines, ends."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.encoded = name.encode()
        self.delay = delay
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.deadlines: list[float | None] = []  # time_remaining() at the start of Slow
        self.slow_ended: list[float] = []  # seconds each Slow call lasted, pod side
        self.endless_started = 0
        self.endless_ended: list[Ended] = []

    def _begin(self, kind: str) -> None:
        with self.lock:
            self.calls[kind] += 1
            self.in_flight += 1

    def _end(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def who(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin("Who")
        try:
            if self.delay:
                time.sleep(self.delay)
            return self.encoded
        finally:
            self._end()

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin("Stream")
        try:
            for _ in range(int(request or b"1")):
                if self.delay:
                    time.sleep(self.delay)
                yield self.encoded
        finally:
            self._end()

    def sum(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._begin("Sum")
        try:
            count = sum(1 for _ in requests)
            return b"%s %d" % (self.encoded, count)
        finally:
            self._end()

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin("Chat")
        try:
            for _ in requests:
                yield self.encoded
        finally:
            self._end()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin("Echo")
        try:
            return hashlib.sha256(request).digest() + request
        finally:
            self._end()

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._begin("Slow")
        began = time.monotonic()
        try:
            with self.lock:
                self.deadlines.append(context.time_remaining())
            ended = threading.Event()
            context.add_callback(ended.set)
            ended.wait(float(request or b"0"))
            return self.encoded
        finally:
            with self.lock:
                self.slow_ended.append(time.monotonic() - began)
            self._end()

    def endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._begin("Endless")
        began = time.monotonic()
        with self.lock:
            self.endless_started += 1

        def ended() -> None:
            now = time.monotonic()
            with self.lock:
                self.endless_ended.append(Ended(now - began, now))

        context.add_callback(ended)
        try:
            while context.is_active():
                yield self.encoded
                time.sleep(ENDLESS_EVERY)
        finally:
            self._end()

    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            return json.dumps(
                {
                    "name": self.name,
                    "calls": dict(self.calls),
                    "in_flight": self.in_flight,
                    "deadlines": self.deadlines,
                    "endless_started": self.endless_started,
                    "endless_ended": [e.__dict__ for e in self.endless_ended],
                }
            ).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Who": grpc.unary_unary_rpc_method_handler(self.who),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Sum": grpc.stream_unary_rpc_method_handler(self.sum),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
                "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
                "Endless": grpc.unary_stream_rpc_method_handler(self.endless),
                "Stats": grpc.unary_unary_rpc_method_handler(self.stats),
            },
        )


def serve(host: str, port: int, servicer: Servicer) -> tuple[grpc.Server, int]:
    """A started grpcio server for servicer on host:port (0: any); raises OSError if taken."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"pod-{host}"),
        handlers=[servicer.handler()],
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=None,
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio raises where it used to return 0
        server.stop(None)
        raise OSError(f"cannot bind {host}:{port}: {e}") from e
    if bound == 0:
        server.stop(None)
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    return server, bound


# --- pods in this process ---------------------------------------------------------------


class GrpcPod:
    """One grpcio server on one loopback address, named after it."""

    def __init__(self, host: str, port: int, delay: float = 0.0) -> None:
        self.host = host
        self.servicer = Servicer(host, delay)
        self.server, self.port = serve(host, port, self.servicer)
        self.stopped = False

    def __repr__(self) -> str:
        s = self.servicer
        state = "stopped" if self.stopped else "serving"
        return f"<GrpcPod {self.host}:{self.port} {state} calls={dict(s.calls)}>"

    @property
    def calls(self) -> int:
        return sum(self.servicer.calls.values())

    def stop(self, grace: float | None = STOP_GRACE) -> None:
        """Graceful with a grace (GOAWAY, in-flight calls get `grace` to finish), blocking
        until the server is down; at once with None."""
        self.stopped = True
        self.server.stop(grace).wait()


class GrpcPods:
    """Pods on several loopback addresses sharing one port; a context manager.

    More pods join on the same port with add() (a rollout's new pods); each stops on its
    own (GrpcPod.stop); on exit every pod still up stops at once.
    """

    def __init__(self, hosts: Sequence[str], delay: float = 0.0) -> None:
        self.delay = delay
        self.pods: list[GrpcPod] = []
        for _ in range(20):
            try:
                port = 0
                for host in hosts:
                    self.pods.append(GrpcPod(host, port, delay))
                    port = self.pods[-1].port
            except OSError:  # that port is taken on a later address: try another
                self.close()
                self.pods = []
                continue
            self.port = port
            return
        raise AssertionError(f"no common free port on {hosts}")

    def __iter__(self) -> Iterator[GrpcPod]:
        return iter(self.pods)

    def __getitem__(self, index: int) -> GrpcPod:
        return self.pods[index]

    def __repr__(self) -> str:
        return f"<GrpcPods port={self.port} {self.pods}>"

    def add(self, host: str) -> GrpcPod:
        pod = GrpcPod(host, self.port, self.delay)
        self.pods.append(pod)
        return pod

    def calls(self, kind: str | None = None) -> dict[str, int]:
        """Calls each pod served (of one method, or all)."""
        return {
            p.host: (p.servicer.calls[kind] if kind else sum(p.servicer.calls.values()))
            for p in self.pods
        }

    def close(self) -> None:
        for pod in self.pods:
            if not pod.stopped:
                pod.stop(None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- a pod in a process of its own --------------------------------------------------------


class PodProcess:
    """`python -m support.grpc_servers HOST PORT`: one pod in a process, to be SIGKILLed.

    The process prints "ready PORT" once it serves; SIGTERM stops it gracefully.
    """

    def __init__(self, host: str, port: int, delay: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "support.grpc_servers", host, str(port), f"--delay={delay}"],
            cwd=TESTS_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __repr__(self) -> str:
        return f"<PodProcess {self.host}:{self.port} pid={self.proc.pid} rc={self.proc.poll()}>"

    def ready(self, timeout: float = 20.0) -> None:
        """Wait for the process's "ready" line (blocking: call it from a thread)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            raise AssertionError(f"{self} did not start: {line!r} {self.proc.stderr.read()!r}")

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone (blocking: no one else runs meanwhile)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stats(self) -> dict[str, Any]:
        """What the pod kept, asked directly (not through sidelink)."""
        with grpc.insecure_channel(f"{self.host}:{self.port}") as channel:
            answer = channel.unary_unary(method("Stats"))(b"", timeout=5)
        stats: dict[str, Any] = json.loads(answer)
        return stats

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.grpc_servers")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=STOP_GRACE)
    args = parser.parse_args(argv)
    try:
        server, port = serve(args.host, args.port, Servicer(args.host, args.delay))
    except OSError as e:
        print(f"error {e}", flush=True)
        return 1
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(f"ready {port}", flush=True)
    done.wait()
    server.stop(args.grace).wait()
    return 0


# --- callers ------------------------------------------------------------------------------


class Caller:
    """A channel to sidelink's listener with one method per RPC; each returns pod names."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.channel = grpc.insecure_channel(f"{address[0]}:{address[1]}", options=CLIENT_OPTIONS)
        c = self.channel
        self._who = c.unary_unary(method("Who"))
        self._stream = c.unary_stream(method("Stream"))
        self._sum = c.stream_unary(method("Sum"))
        self._chat = c.stream_stream(method("Chat"))
        self._echo = c.unary_unary(method("Echo"))
        self._slow = c.unary_unary(method("Slow"))
        self._endless = c.unary_stream(method("Endless"))

    def who(self, timeout: float | None = 10.0) -> str:
        return bytes(self._who(b"", timeout=timeout)).decode()

    def stream(self, n: int = 3, timeout: float | None = 10.0) -> list[str]:
        return [bytes(m).decode() for m in self._stream(b"%d" % n, timeout=timeout)]

    def sum(self, n: int = 3, timeout: float | None = 10.0) -> tuple[str, int]:
        pod, count = bytes(self._sum(iter([b"x"] * n), timeout=timeout)).decode().split()
        return pod, int(count)

    def chat(self, n: int = 3, timeout: float | None = 10.0) -> list[str]:
        return [bytes(m).decode() for m in self._chat(iter([b"x"] * n), timeout=timeout)]

    def echo(self, payload: bytes, timeout: float | None = 60.0) -> bytes:
        return bytes(self._echo(payload, timeout=timeout))

    def slow(self, seconds: float, timeout: float | None = None) -> str:
        return bytes(self._slow(b"%f" % seconds, timeout=timeout)).decode()

    def endless(self, timeout: float | None = None) -> Any:
        """The call object (iterate it for messages, cancel() it)."""
        return self._endless(b"", timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sidelink_error(error: grpc.RpcError) -> str | None:
    """The `sidelink-error` of a failed call's trailing metadata (None when absent)."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "sidelink-error":
            return str(value)
    return None


# --- load ---------------------------------------------------------------------------------

# Each kind of RPC, and the method a call of that kind goes to.
METHOD_OF = {"unary": "Who", "server_stream": "Stream", "client_stream": "Sum", "bidi": "Chat"}
KINDS = tuple(METHOD_OF)


@dataclass
class Outcome:
    kind: str
    started: float  # monotonic
    seconds: float
    code: grpc.StatusCode
    pods: tuple[str, ...]  # who answered (every message's sender)
    error: str | None = None  # details, and sidelink-error, of a failure

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


def call_one(caller: Caller, kind: str, timeout: float) -> tuple[str, ...]:
    """One call of kind; the pods that answered it; raises grpc.RpcError, or
    AssertionError for an answer that is not what the pod sends."""
    if kind == "unary":
        return (caller.who(timeout),)
    if kind == "server_stream":
        pods = caller.stream(3, timeout)
        assert len(pods) == 3, pods
        return tuple(pods)
    if kind == "client_stream":
        pod, count = caller.sum(3, timeout)
        assert count == 3, (pod, count)
        return (pod,)
    if kind == "bidi":
        pods = caller.chat(3, timeout)
        assert len(pods) == 3, pods
        return tuple(pods)
    raise ValueError(kind)


@dataclass
class GrpcLoad:
    """`callers` threads calling through one channel (`caller`) until stopped, each call
    of the next kind in `kinds` in turn; every outcome recorded. A context manager: the
    callers run inside the block and stop on exit (each ends the call it is in)."""

    caller: Caller
    callers: int = 8
    kinds: Sequence[str] = KINDS
    timeout: float = 5.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:
        return f"<GrpcLoad x{self.callers} done={self.count} failed={len(self.failed)}>"

    @property
    def count(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if not o.ok]

    def mark(self) -> int:
        """An index into outcomes: `load.outcomes[mark:]` are those recorded since."""
        return len(self.outcomes)

    def shares(self, since: int = 0) -> Counter[str]:
        """Successful calls per pod (by the first message's sender), from index `since`."""
        return Counter(o.pods[0] for o in list(self.outcomes)[since:] if o.ok and o.pods)

    def errors(self, since: int = 0) -> Counter[str]:
        return Counter(f"{o.kind} {o.code.name} {o.error}" for o in self.failed[since:])

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stopping.is_set():
            kind = self.kinds[i % len(self.kinds)]
            i += 1
            started = time.monotonic()
            pods: tuple[str, ...] = ()
            code, error = grpc.StatusCode.OK, None
            try:
                pods = call_one(self.caller, kind, self.timeout)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                error = f"{e.details()!r} sidelink-error={sidelink_error(e)}"  # type: ignore[attr-defined]
            except AssertionError as e:
                code, error = grpc.StatusCode.UNKNOWN, f"wrong answer: {e}"
            with self._lock:
                self.outcomes.append(
                    Outcome(kind, started, time.monotonic() - started, code, pods, error)
                )

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(self.callers)
        ]
        for thread in self._threads:
            thread.start()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join(self.timeout + 5.0)
            assert not thread.is_alive(), f"{self}: a caller did not end"

    async def stop(self) -> None:
        """Stop the callers and wait for them (in a thread: sidelink's loop serves on)."""
        self._stopping.set()
        await asyncio.to_thread(self._join)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@contextlib.contextmanager
def pod_processes(
    hosts: Sequence[str], port: int, delay: float = 0.0
) -> Iterator[list[PodProcess]]:
    """Pods in processes of their own on hosts, all on port, started in parallel."""
    pods = [PodProcess(h, port, delay) for h in hosts]
    try:
        for pod in pods:
            pod.ready()
        yield pods
    finally:
        for pod in pods:
            pod.close()


if __name__ == "__main__":
    sys.exit(main())
