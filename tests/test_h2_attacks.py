"""HTTP/2 floods and abuse against the sidelink command: each cut, nobody else hurt.

Each attack comes from a hand-framed peer (support.h2peers.RawH2) against sidelink run as
a process of its own, so that its memory is its own to measure and a crash is a crash.
For every attack: the attacker is told ENHANCE_YOUR_CALM with a GOAWAY, or cut off
without a word (never another GOAWAY); sidelink stays up; a canary on a connection of its
own (HTTP/2 and HTTP/1.1) is served all along; and sidelink's RSS stays within a
generous bound. The stream stuck at a zero window is the exception: that stream alone is
reset, after idle_timeout.

The upstream is an h2c pod of support.h2peers on 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import wire
from support.data import CHUNK
from support.h2peers import (
    CANCEL,
    CONTINUATION,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    HEADERS,
    SETTINGS_INITIAL_WINDOW_SIZE,
    STATIC_GET,
    Ending,
    H2Client,
    H2Pods,
    RawH2,
    StreamReset,
    frame,
    header_frames,
    hpack_literal,
    ping_frame,
    request_block,
    rst_frame,
    settings_frame,
)
from support.pods import POD
from support.procs import Sidelink, free_port
from support.wait import until, until_sync

pytestmark = pytest.mark.usefixtures("loop_errors")

KIB = 1024
MIB = 1024 * KIB
# How much sidelink's RSS may grow during an attack: generous, and far below what any of
# these attacks costs a server that buffers, decodes or answers without a limit.
MEMORY_BOUND = 64 * MIB
# How long the attacker waits, once it has sent its flood, to be told off or cut.
CUT_DEADLINE = 10.0
# How long a write may sit unsent before the attacker takes it that sidelink stopped reading.
WRITE_STALL = 2.0
# The canary: a request this often, each answered within this.
CANARY_PACE = 0.02
CANARY_TIMEOUT = 3.0
ADDRESS = "127.0.0.1"


# --- sidelink as a process, and its memory ------------------------------------------------------


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@contextlib.contextmanager
def peak_rss_of(pid: int) -> Iterator[Callable[[], int]]:
    """The highest RSS of process pid while the block runs, sampled from a thread."""
    peak = rss_of(pid)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, rss_of(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()


@dataclass
class Target:
    proc: Sidelink
    port: int
    pods: H2Pods

    @property
    def address(self) -> tuple[str, int]:
        return ADDRESS, self.port

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> None:
        assert self.proc.proc.poll() is None, f"sidelink died: {self.proc.stderr()}"


@contextlib.asynccontextmanager
async def sidelink_under_attack(tmp_path: Path, **route: Any) -> AsyncIterator[Target]:
    """sidelink (a process) in front of one h2c pod; on exit it must still be running."""
    async with H2Pods(POD) as pods:
        port = free_port()
        settings = {
            "name": "app1",
            "listen": f"{ADDRESS}:{port}",
            "service": POD,
            "port": pods.port,
            "protocol": "http",
            "head_timeout": "3s",
            **route,
        }
        cfg = tmp_path / "sidelink.yaml"
        cfg.write_text(yaml.safe_dump({"routes": [settings]}))
        # Errors only: nobody reads its stderr until it exits, and a full pipe would stall it.
        proc = Sidelink(["run", "-c", str(cfg), "--log-level", "error"])
        try:
            await asyncio.to_thread(proc.wait_admin)
            await asyncio.to_thread(
                until_sync, lambda: proc.get("/readyz")[0] == 200, 5, "sidelink ready"
            )
            target = Target(proc, port, pods)
            yield target
            target.alive()
            await served(target)
            target.alive()
        finally:
            proc.close()


async def served(target: Target) -> None:
    """A fresh HTTP/2 connection and a fresh HTTP/1.1 one are each served."""
    async with H2Client.open(target.address) as client:
        assert (await client.request("GET", "/after", timeout=CANARY_TIMEOUT)).status == 200
    reader, writer = await asyncio.open_connection(*target.address)
    try:
        writer.write(wire.get("/after-h1"))
        assert (await wire.read_response(reader, timeout=CANARY_TIMEOUT)).status == 200
    finally:
        await wire.closed(writer)


@dataclass
class Canary:
    """Another client, on connections of its own, asking all along (HTTP/2 and HTTP/1.1)."""

    address: tuple[str, int]
    answered: list[float] = field(default_factory=list)  # when each answer came
    failures: list[str] = field(default_factory=list)
    worst: float = 0.0
    _stop: bool = False
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Canary:
        self.h2 = await H2Client.connect(self.address)
        self.h1 = await asyncio.open_connection(*self.address)
        await self._ask(0)
        assert not self.failures, self.failures
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _ask(self, i: int) -> None:
        began = time.monotonic()
        try:
            r = await self.h2.request("GET", f"/canary/{i}", timeout=CANARY_TIMEOUT)
            if r.status != 200:
                self.failures.append(f"h2 {i}: {r.status}")
            reader, writer = self.h1
            writer.write(wire.get(f"/canary-h1/{i}"))
            h1 = await wire.read_response(reader, timeout=CANARY_TIMEOUT)
            if h1.status != 200:
                self.failures.append(f"h1 {i}: {h1.status}")
        except (AssertionError, OSError, StreamReset, asyncio.IncompleteReadError) as e:
            self.failures.append(f"{i}: {e!r}")
            self._stop = True
            return
        now = time.monotonic()
        self.worst = max(self.worst, now - began)
        self.answered.append(now)

    async def _run(self) -> None:
        i = 1
        while not self._stop:
            await self._ask(i)
            i += 1
            await asyncio.sleep(CANARY_PACE)  # the canary's pace, not a wait

    def since(self, moment: float) -> int:
        return sum(1 for t in self.answered if t >= moment)

    async def __aexit__(self, *exc: object) -> None:
        self._stop = True
        if self._task is not None:
            await self._task
        await self.h2.close()
        await wire.closed(self.h1[1])


async def after_attack(
    canary: Canary, began: float, target: Target, grown: int, ending: Ending
) -> None:
    """What every attack must leave: the canary served throughout, sidelink up and small."""
    print(
        f"attack ended: {ending}; RSS grew {grown / MIB:.1f} MiB; canary worst {canary.worst:.3f}s"
    )
    target.alive()
    # The canary is served after the attack began (it keeps going until the block ends).
    await until(lambda: canary.since(began) >= 3 or canary.failures, CANARY_TIMEOUT, "canary")
    assert not canary.failures, canary.failures
    assert canary.worst < CANARY_TIMEOUT
    assert grown <= MEMORY_BOUND, f"sidelink's RSS grew {grown / MIB:.1f} MiB"


async def flood(raw: RawH2, pieces: Iterator[bytes], limit: int) -> None:
    """Write pieces until sidelink cuts the connection or stops reading, or `limit` bytes."""
    for piece in pieces:
        if raw.ending.written >= limit or not await raw.write(piece, WRITE_STALL):
            return


def batches(frames: Iterator[bytes], size: int = 256 * KIB) -> Iterator[bytes]:
    """Frames joined into writes of about `size` bytes."""
    batch: list[bytes] = []
    length = 0
    for f in frames:
        batch.append(f)
        length += len(f)
        if length >= size:
            yield b"".join(batch)
            batch, length = [], 0
    if batch:
        yield b"".join(batch)


def calm(ending: Ending) -> None:
    assert ending.calmed, f"not cut with ENHANCE_YOUR_CALM (nor closed): {ending}"


# --- the attacks --------------------------------------------------------------------------------


async def test_rapid_reset_is_cut(tmp_path: Path) -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM, thousands of times, in a few writes."""
    rounds = 20_000
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)

            def pairs() -> Iterator[bytes]:
                for _ in range(rounds):
                    sid = raw.next_id()
                    yield header_frames(sid, request_block(raw.encoder, "/rapid")) + rst_frame(
                        sid, CANCEL
                    )

            await flood(raw, batches(pairs(), 64 * KIB), 1 << 30)
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        reached = len(target.pods.seen("/rapid"))
        print(f"streams that reached the pod: {reached} of {rounds}")
        assert reached < rounds


async def test_cancels_are_not_rapid_resets(tmp_path: Path) -> None:
    """A client that cancels calls once their answer began (a watch, a download it stops),
    and more than half of all its calls before their answer (deadlines that ran out), but
    no more than Envoy's budget (250), keeps its connection and its long call in flight."""
    async with (
        sidelink_under_attack(tmp_path) as target,
        H2Client.open(target.address) as client,
    ):
        long_call = client.start("GET", "/slow/3")
        for _ in range(3):
            sids = [client.start("GET", f"/big/{MIB}") for _ in range(50)]
            for sid in sids:
                await client.headers(sid)
                client.reset(sid)
        for _ in range(4):  # 50 calls at a time, each given up on before its answer
            sids = [client.start("GET", "/slow/1") for _ in range(50)]
            await asyncio.sleep(0.05)
            for sid in sids:
                client.reset(sid)
        assert (await client.request("GET", "/after-cancels")).status == 200
        assert (await client.response(long_call)).status == 200
        assert client.goaway is None


@pytest.mark.parametrize("kind", ["full", "empty"])
async def test_continuation_flood_is_cut(tmp_path: Path, kind: str) -> None:
    """CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION frames without end
    (full ones, whose header bytes a server may buffer, or empty ones, which cost it only
    their handling)."""
    if kind == "full":
        unit = hpack_literal(b"x-flood", b"f" * 118)  # 128 bytes: 128 to a 16 KiB frame
        continuation = frame(CONTINUATION, 0, 1, unit * 128)
        limit = 256 * MIB
    else:
        continuation = frame(CONTINUATION, 0, 1, b"")
        limit = 32 * MIB  # 3.7 million frames
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)
            block = request_block(raw.encoder, "/continued")
            await raw.write(frame(HEADERS, END_STREAM, raw.next_id(), block))
            piece = continuation * max(1, MIB // len(continuation))
            await flood(raw, iter(lambda: piece, None), limit)
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        assert ending.written < limit, f"{limit} bytes of CONTINUATION taken without a cut"
        assert target.pods.seen("/continued") == []


async def test_hpack_bomb_is_cut(tmp_path: Path) -> None:
    """One 4 KB header put in the dynamic table, then a block referring to it 60,000 times
    (60 KB on the wire, 240 MB decoded)."""
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)
            # A fair request first: it carries the header and leaves it in the table.
            seed = STATIC_GET + hpack_literal(b"x-bomb", b"b" * 4000, index=True)
            await raw.write(header_frames(raw.next_id(), seed))
            status, _ = await raw.response(1)
            assert status == 200
            (first,) = target.pods.seen("/")
            assert first.header("x-bomb") == "b" * 4000
            bomb = STATIC_GET + b"\xbe" * 60_000  # index 62: the newest entry, x-bomb
            await raw.write(header_frames(raw.next_id(), bomb))
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        assert len(target.pods.seen("/")) == 1, "the bomb reached the pod"


async def test_header_block_over_64_kib_is_cut_and_one_under_it_is_served(
    tmp_path: Path,
) -> None:
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        # 32 KiB of headers: within the limit, served as any request.
        fair = [(f"x-fair-{i}", f"{i:04d}" * 250) for i in range(32)]
        async with H2Client.open(target.address) as client:
            r = await client.request("GET", "/fair", headers=fair)
            assert r.status == 200
        (seen,) = target.pods.seen("/fair")
        assert seen.header("x-fair-31") == "0031" * 250

        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)
            huge = [(f"x-huge-{i}", f"{i:04d}" * 250) for i in range(80)]  # 80 KiB decoded
            block = request_block(raw.encoder, "/huge", extra=huge)
            await raw.write(header_frames(raw.next_id(), block))
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        assert target.pods.seen("/huge") == []


async def test_settings_flood_is_cut(tmp_path: Path) -> None:
    """50,000 SETTINGS frames, none of their acknowledgements read."""
    count = 50_000
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)
            one = settings_frame({SETTINGS_INITIAL_WINDOW_SIZE: 65535})
            await flood(raw, batches(iter([one] * count), 64 * KIB), 1 << 30)
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        acks = ending.frames["SETTINGS"]
        print(f"SETTINGS frames sidelink sent back: {acks} for {count}")
        assert acks < count


async def test_ping_flood_is_cut(tmp_path: Path) -> None:
    """100,000 PINGs, none of their acknowledgements read."""
    count = 100_000
    async with (
        sidelink_under_attack(tmp_path) as target,
        Canary(target.address) as canary,
    ):
        with peak_rss_of(target.pid) as peak:
            base = peak()
            began = time.monotonic()
            raw = await RawH2.open(target.address)
            pings = (ping_frame(i.to_bytes(8, "big")) for i in range(count))
            await flood(raw, batches(pings, 64 * KIB), 1 << 30)
            ending = await raw.outcome(CUT_DEADLINE)
            await raw.close()
            await after_attack(canary, began, target, peak() - base, ending)
        calm(ending)
        print(f"PING acks sidelink sent: {ending.frames['PING']} for {count}")
        assert ending.frames["PING"] < count


async def test_a_stream_stuck_at_a_zero_window_is_reset_after_idle_timeout(
    tmp_path: Path,
) -> None:
    async with (
        sidelink_under_attack(tmp_path, idle_timeout="1s") as target,
        Canary(target.address) as canary,
        H2Client.open(target.address, initial_window=16 * KIB) as client,
    ):
        began = time.monotonic()
        sid = client.start("GET", f"/big/{16 * CHUNK}", keep=False, read=False)
        await until(lambda: client.received(sid) >= 16 * KIB, 5, "the window to fill")
        with pytest.raises(StreamReset) as reset:
            await client.response(sid, timeout=8)
        took = time.monotonic() - began
        print(f"stream reset ({reset.value}) after {took:.2f}s")
        assert not reset.value.refused
        assert 0.9 <= took <= 6, took
        assert client.received(sid) == 16 * KIB
        (seen,) = target.pods.seen(f"/big/{16 * CHUNK}")
        await until(lambda: seen.reset_by_peer is not None, 5, "the pod's stream reset too")
        assert seen.sent < 16 * CHUNK
        target.alive()
        assert not canary.failures, canary.failures
        assert canary.since(began) >= 3


@pytest.mark.parametrize("attack", ["header block over 64 KiB", "PING flood"])
async def test_the_cut_attacker_is_told_enhance_your_calm(tmp_path: Path, attack: str) -> None:
    """SPEC: floods are cut with GOAWAY ENHANCE_YOUR_CALM. Here the attacker sends one
    write and reads everything, so nothing stands between that GOAWAY and it."""
    async with sidelink_under_attack(tmp_path) as target:
        raw = await RawH2.open(target.address)
        if attack == "PING flood":
            await raw.write(b"".join(ping_frame(i.to_bytes(8, "big")) for i in range(5000)))
        else:
            huge = [(f"x-huge-{i}", f"{i:04d}" * 250) for i in range(80)]
            await raw.write(
                header_frames(raw.next_id(), request_block(raw.encoder, "/h", extra=huge))
            )
        ending = await raw.outcome(CUT_DEADLINE)
        await raw.close()
        assert ending.goaways, f"cut without a GOAWAY: {ending}"
        assert [g.error_code for g in ending.goaways] == [ENHANCE_YOUR_CALM], ending
