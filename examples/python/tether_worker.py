#!/usr/bin/env python3
"""A Tether worker in Python, written from docs/protocol.md alone: it finds
the heads with ListHeads (no Redis), attaches with Reassign, holds the
Heartbeat stream, fails over when its head is lost, and follows redirects
make-before-break. It serves tether.v1.WorkerService/Status and
grpc.health.v1 at --listen, like tether-worker, so tetherctl and grpcurl
see it as any other worker.

    tether_worker.py --heads HOST:PORT[,HOST:PORT...] --id ID --listen HOST:PORT
                     [--token-file F] [--tls-ca F] [--stubs DIR]

As a library (the stubs directory must be importable first, see load_stubs):

    worker = Worker("worker-1", ["head-1:7070"], on_change=print)
    task = asyncio.create_task(worker.run())
    ...
    await worker.stop()        # closes the stream; run() returns

Exit status: 0 after SIGTERM or SIGINT, 2 on bad flags.
"""

import argparse
import asyncio
import logging
import random
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, List, Optional

HERE = Path(__file__).resolve().parent
DEFAULT_STUBS = HERE / "generated"
INSTALL_HINT = "python3 -m pip install -r examples/python/requirements.txt"

try:
    import grpc
    import grpc.aio
except ImportError:
    sys.exit(f"tether_worker: the grpcio package is not installed; run `{INSTALL_HINT}`")

log = logging.getLogger("tether_worker")

# Set by load_stubs().
pb = None
pb_grpc = None

# The most heads a Reassign may name in unavailable_heads.
MAX_UNAVAILABLE = 64
# The metadata key of a RESOURCE_EXHAUSTED refusal naming the limit.
REFUSAL_KEY = "tether-refusal"


def load_stubs(stubs: Path) -> None:
    """Imports the modules generate.py wrote under `stubs`."""
    global pb, pb_grpc
    sys.path.insert(0, str(stubs))
    try:
        from tether.v1 import tether_pb2, tether_pb2_grpc
    except ImportError as e:
        sys.exit(
            f"tether_worker: cannot import the Tether stubs from {stubs} ({e}); "
            f"run `python3 {HERE / 'generate.py'} --out {stubs}`"
        )
    pb, pb_grpc = tether_pb2, tether_pb2_grpc


@dataclass(frozen=True)
class Attachment:
    """What the worker knows about its attachment; passed to on_change."""

    head_id: str = ""
    head_addr: str = ""
    epoch: int = 0
    attached: bool = False
    reassignments: int = 0
    # time.monotonic() of the last HeadBeat; None before the first.
    last_head_beat: Optional[float] = None
    attached_since_ms: int = 0
    # Longest gap between HeadBeats since the worker last became attached
    # from unattached (moves on a Redirect do not reset it), seconds.
    max_head_beat_gap: float = 0.0


@dataclass
class Head:
    """One head as ListHeads gives it."""

    id: str
    addr: str
    state: str = "ready"


@dataclass
class Link:
    """An open, beating Heartbeat stream."""

    head: Head
    epoch: int
    interval: float
    timeout: float
    channel: object
    call: object
    sequence: int = 0

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


class Refused(Exception):
    """A head did not adopt the worker. kind: bound, unusable or held."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Worker:
    """Keeps one worker attached to one live head until stop()."""

    def __init__(
        self,
        worker_id: str,
        heads: List[str],
        *,
        worker_addr: str = "",
        token: Optional[str] = None,
        tls_ca: Optional[bytes] = None,
        connect_timeout: float = 1.0,
        max_backoff: float = 5.0,
        on_change: Optional[Callable[[Attachment], None]] = None,
    ):
        if pb is None:
            raise RuntimeError("call load_stubs() first")
        self.worker_id = worker_id
        self.bootstrap = list(heads)
        self.worker_addr = worker_addr
        self.token = token
        self.tls_ca = tls_ca
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.on_change = on_change
        # A random token naming this process (ReassignRequest.instance).
        self.instance = secrets.token_hex(12)
        self.attachment = Attachment()
        self._known: List[Head] = []
        self._version = 0
        self._stopping = asyncio.Event()
        self._told_unimplemented = False

    # -- public ---------------------------------------------------------

    async def stop(self) -> None:
        """Ends run(): closes the stream; the head releases the worker."""
        self._stopping.set()

    async def run(self) -> None:
        """Attaches, holds, moves; returns after stop()."""
        backoff = 0.1
        previous: Optional[str] = None
        lost: Optional[tuple] = None  # (head id, until monotonic)
        held = 0
        failures = 0
        while not self._stopping.is_set():
            avoid = lost[0] if lost and time.monotonic() < lost[1] else None
            reason = pb.REASSIGN_REASON_HEAD_LOST if previous else pb.REASSIGN_REASON_STARTUP
            try:
                link = await self._establish(None, avoid, previous, reason, only_prefer=False)
            except Refused as e:
                if e.kind == "held":
                    held += 1
                    if held == 1:
                        log.error(
                            "another process runs under this worker id; worker ids must be unique: %s", e
                        )
                    await self._sleep(self.max_backoff)
                    continue
                failures += 1
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, self.max_backoff)
                (log.warning if failures >= 3 else log.debug)("no head available: %s", e)
                if failures > 1:
                    lost = None
                await self._sleep(delay)
                continue
            backoff, held, failures = 0.1, 0, 0
            self._attached(link, from_unattached=True)
            log.info("attached head=%s epoch=%d", link.head.id, link.epoch)
            why = await self._hold(link)
            if why is None:
                return
            lost_id, message = why
            self._publish(replace(self.attachment, attached=False))
            log.warning("lost head=%s reason=%s; moving", lost_id, message)
            lost = (lost_id, time.monotonic() + link.timeout)
            previous = lost_id
            await self._sleep(random.uniform(0, 0.02))

    # -- discovery ------------------------------------------------------

    def _channel(self, addr: str):
        options = [("grpc.enable_retries", 0)]
        if self.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_ca)
            return grpc.aio.secure_channel(addr, creds, options=options)
        return grpc.aio.insecure_channel(addr, options=options)

    def _metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _bootstrap_addrs(self) -> List[str]:
        """Each bootstrap entry, a name counting as every address it has."""
        out = []
        for entry in self.bootstrap:
            host, _, port = entry.rpartition(":")
            if self.tls_ca is not None:
                out.append(entry)
                continue
            try:
                infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
                for info in infos:
                    ip = info[4][0]
                    out.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
            except OSError:
                out.append(entry)
        return out

    async def _list_at(self, addr: str):
        channel = self._channel(addr)
        try:
            stub = pb_grpc.HeadServiceStub(channel)
            return await stub.ListHeads(
                pb.ListHeadsRequest(worker_id=self.worker_id),
                timeout=self.connect_timeout * 2,
                metadata=self._metadata(),
            )
        finally:
            await channel.close()

    async def discover(self, ask_first: Optional[Head] = None, avoid: Optional[str] = None) -> List[Head]:
        """The live heads in preference order, from the first head that
        answers ListHeads: ask_first, the last list (but never `avoid`),
        then the bootstrap addresses. Falls back to the last list."""
        addrs: List[str] = []
        for a in ([ask_first.addr] if ask_first else []) + [
            h.addr for h in self._known if h.id != avoid
        ] + self._bootstrap_addrs():
            if a and a not in addrs:
                addrs.append(a)
        errors = []
        for addr in addrs:
            try:
                answer = await self._list_at(addr)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    why = (
                        f"the head at {addr} does not implement ListHeads: it runs a "
                        "tether-head older than this worker; upgrade it"
                    )
                    if not self._told_unimplemented:
                        self._told_unimplemented = True
                        log.error(why)
                    errors.append(why)
                else:
                    errors.append(f"{addr}: {e.code().name}: {e.details()}")
                continue
            states = {pb.HEAD_STATE_DRAINING: "draining", pb.HEAD_STATE_STALE: "stale"}
            self._known = [Head(h.head_id, h.addr, states.get(h.state, "ready")) for h in answer.heads]
            self._version = answer.version
            return list(self._known)
        known = [h for h in self._known if h.id != avoid]
        if known:
            return known
        raise Refused(
            "unusable",
            f"no head answered ListHeads (bootstrap {','.join(self.bootstrap)}): {'; '.join(errors)}",
        )

    # -- attaching ------------------------------------------------------

    async def _establish(self, prefer: Optional[Head], skip: Optional[str], previous: Optional[str],
                         reason: int, only_prefer: bool) -> Link:
        """Tries heads in order until one adopts the worker and beats."""
        order: List[Head] = [prefer] if prefer else []
        if not only_prefer:
            listed = await self.discover(avoid=skip)
            order += [h for h in listed if h.state != "draining" and h.id != skip
                      and all(o.id != h.id for o in order)]
        if not order:
            raise Refused("unusable", "no live head is listed")
        unavailable = [previous] if previous and reason == pb.REASSIGN_REASON_HEAD_LOST else []
        at_bound, refusals = [], []
        for head in order:
            try:
                return await self._open(head, previous, reason, unavailable[:MAX_UNAVAILABLE])
            except Refused as e:
                if e.kind == "held":
                    raise
                refusals.append(f"{head.id}: {e}")
                (at_bound if e.kind == "bound" else unavailable).append(head if e.kind == "bound" else head.id)
        # Every head refused: ask those at their load bound again, naming
        # all the others unavailable, which waives the bound.
        for head in at_bound:
            others = [h.id for h in order if h.id != head.id][:MAX_UNAVAILABLE]
            try:
                return await self._open(head, previous, reason, others)
            except Refused as e:
                if e.kind == "held":
                    raise
                refusals.append(f"{head.id} (over its bound): {e}")
        raise Refused("unusable", f"every head tried refused ({'; '.join(refusals)})")

    async def _open(self, head: Head, previous: Optional[str], reason: int, unavailable: List[str]) -> Link:
        """Reassign on `head`, open Heartbeat, wait for the first HeadBeat."""
        channel = self._channel(head.addr)
        try:
            stub = pb_grpc.HeadServiceStub(channel)
            try:
                answer = await stub.Reassign(
                    pb.ReassignRequest(
                        worker_id=self.worker_id,
                        worker_addr=self.worker_addr,
                        previous_head_id=previous or "",
                        reason=reason,
                        instance=self.instance,
                        unavailable_heads=unavailable,
                    ),
                    timeout=self.connect_timeout * 2,
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as e:
                why = f"{e.code().name}: {e.details()}"
                limit = dict(e.trailing_metadata() or ()).get(REFUSAL_KEY)
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise Refused("held", why)
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and limit == "load-bound":
                    raise Refused("bound", why)
                raise Refused("unusable", why)
            if answer.head_id != head.id:
                raise Refused("unusable", f"answered as head {answer.head_id!r}, listed as {head.id!r}")
            interval = max(answer.heartbeat_interval_ms, 1) / 1000
            timeout = max(answer.heartbeat_timeout_ms / 1000, 2 * interval)
            call = stub.Heartbeat(metadata=self._metadata())
            try:
                await call.write(pb.WorkerBeat(
                    worker_id=self.worker_id, epoch=answer.epoch, sequence=0,
                    stream_secret=answer.stream_secret,
                ))
                first = await asyncio.wait_for(call.read(), timeout)
            except asyncio.TimeoutError:
                call.cancel()
                raise Refused("unusable", f"no first HeadBeat within {timeout}s")
            except grpc.aio.AioRpcError as e:
                raise Refused("unusable", f"stream refused: {e.code().name}: {e.details()}")
            if first is grpc.aio.EOF:
                raise Refused("unusable", "the head ended the stream before its first beat")
            if first.head_id != head.id or first.epoch != answer.epoch:
                call.cancel()
                raise Refused("unusable", f"first beat from {first.head_id!r} epoch {first.epoch}")
            self._note_version(first.heads_version)
            return Link(head, answer.epoch, interval, timeout, channel, call)
        except BaseException:
            await channel.close()
            raise

    def _note_version(self, version: int) -> bool:
        return version != 0 and version != self._version

    # -- holding --------------------------------------------------------

    async def _hold(self, link: Link):
        """Holds the stream until the head is lost (returns (id, why)) or
        stop() (returns None), following redirects make-before-break."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + link.timeout
        next_tick = loop.time() + link.interval
        reader = asyncio.ensure_future(link.call.read())
        stopping = asyncio.ensure_future(self._stopping.wait())
        moving: Optional[asyncio.Task] = None
        refreshing: Optional[asyncio.Task] = None
        asked_version = 0
        old_dead = False
        try:
            while True:
                pending = {stopping}
                if not old_dead:
                    pending.add(reader)
                if moving:
                    pending.add(moving)
                if refreshing:
                    pending.add(refreshing)
                wake = next_tick if old_dead else min(next_tick, deadline)
                done, _ = await asyncio.wait(pending, timeout=max(0.0, wake - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    await link.close()
                    return None
                now = loop.time()
                if not old_dead and now >= deadline and reader not in done:
                    if moving:
                        old_dead = True
                    else:
                        return await self._lose(link, f"no HeadBeat within {link.timeout}s")
                if not old_dead and now >= next_tick:
                    next_tick = now + link.interval
                    link.sequence += 1
                    try:
                        await asyncio.wait_for(link.call.write(pb.WorkerBeat(sequence=link.sequence)),
                                               link.interval)
                    except (asyncio.TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                        pass  # silence shows up as missing HeadBeats
                if refreshing and refreshing in done:
                    refreshing.exception()  # failures are fine: the next loss retries
                    refreshing = None
                if not old_dead and reader in done:
                    try:
                        beat = reader.result()
                    except grpc.aio.AioRpcError as e:
                        beat, error = None, f"stream error: {e.code().name}: {e.details()}"
                    else:
                        error = "the head ended the stream" if beat is grpc.aio.EOF else None
                    if error:
                        if moving:
                            old_dead = True
                        else:
                            return await self._lose(link, error)
                    else:
                        if beat.head_id != link.head.id or beat.epoch != link.epoch:
                            return await self._lose(link, f"beat from {beat.head_id!r} epoch {beat.epoch}")
                        deadline = now + link.timeout
                        self._beat_arrived()
                        if (refreshing is None and beat.heads_version != asked_version
                                and self._note_version(beat.heads_version)):
                            asked_version = beat.heads_version
                            refreshing = asyncio.ensure_future(self.discover(ask_first=link.head))
                        if beat.HasField("redirect") and moving is None:
                            log.info("head=%s asks us to move to=%s reason=%s", link.head.id,
                                     beat.redirect.suggested_head_id,
                                     pb.RedirectReason.Name(beat.redirect.reason))
                            moving = asyncio.ensure_future(self._follow(beat.redirect, link.head.id))
                        reader = asyncio.ensure_future(link.call.read())
                if moving and moving in done:
                    task, moving = moving, None
                    try:
                        new = task.result()
                    except Refused as e:
                        if old_dead:
                            return await self._lose(link, f"stream lost during a move that failed: {e}")
                        log.debug("move failed; staying for now: %s", e)
                        continue
                    log.info("moved from=%s to=%s epoch=%d", link.head.id, new.head.id, new.epoch)
                    # The new head beats: only now close the old stream.
                    self._attached(new, from_unattached=False)
                    reader.cancel()
                    await link.close()
                    link = new
                    old_dead = False
                    deadline = loop.time() + link.timeout
                    next_tick = loop.time() + link.interval
                    reader = asyncio.ensure_future(link.call.read())
        finally:
            for t in (reader, stopping, moving, refreshing):
                if t:
                    t.cancel()

    async def _follow(self, redirect, current: str) -> Link:
        draining = redirect.reason == pb.REDIRECT_REASON_DRAIN
        prefer = None
        if redirect.suggested_head_id:
            prefer = Head(redirect.suggested_head_id, redirect.suggested_head_addr)
        elif not draining:
            raise Refused("unusable", "a rebalance without a suggested head")
        reason = pb.REASSIGN_REASON_HEAD_DRAINING if draining else pb.REASSIGN_REASON_REBALANCE
        return await self._establish(prefer, current, current, reason, only_prefer=not draining)

    async def _lose(self, link: Link, why: str):
        await link.close()
        return (link.head.id, why)

    # -- status ---------------------------------------------------------

    def _publish(self, attachment: Attachment) -> None:
        self.attachment = attachment
        if self.on_change:
            self.on_change(attachment)

    def _attached(self, link: Link, from_unattached: bool) -> None:
        a, now = self.attachment, time.monotonic()
        gap = 0.0 if from_unattached else max(a.max_head_beat_gap, now - (a.last_head_beat or now))
        self._publish(Attachment(
            head_id=link.head.id, head_addr=link.head.addr, epoch=link.epoch, attached=True,
            reassignments=a.reassignments + (1 if a.head_id else 0), last_head_beat=now,
            attached_since_ms=int(time.time() * 1000), max_head_beat_gap=gap,
        ))

    def _beat_arrived(self) -> None:
        a, now = self.attachment, time.monotonic()
        gap = max(a.max_head_beat_gap, now - a.last_head_beat) if a.last_head_beat else a.max_head_beat_gap
        # Not published: a beat changes no attachment, only timings.
        self.attachment = replace(a, last_head_beat=now, max_head_beat_gap=gap)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


# -- the worker's own gRPC server ---------------------------------------

SERVING, NOT_SERVING = 1, 2


def _health_request(data: bytes) -> str:
    """The `service` field of a grpc.health.v1.HealthCheckRequest (field 1,
    a string): decoded by hand to need no extra package."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        if key & 7 == 2:
            n, i = _varint(data, i)
            if key >> 3 == 1:
                return data[i:i + n].decode()
            i += n
        elif key & 7 == 0:
            _, i = _varint(data, i)
        else:
            break
    return ""


def _varint(data: bytes, i: int):
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def serve(worker: Worker, listen: str):
    """A grpc.aio server with WorkerService/Status and grpc.health.v1 Check
    (`""` always SERVING, `tether.v1.WorkerService` SERVING while attached)."""

    def authorized(context) -> bool:
        if not worker.token:
            return True
        return dict(context.invocation_metadata()).get("authorization") == f"Bearer {worker.token}"

    class Status(pb_grpc.WorkerServiceServicer):
        async def Status(self, request, context):
            if not authorized(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            a = worker.attachment
            age = int((time.monotonic() - a.last_head_beat) * 1000) if a.last_head_beat else 0
            return pb.WorkerStatus(
                worker_id=worker.worker_id, head_id=a.head_id, head_addr=a.head_addr, epoch=a.epoch,
                attached=a.attached, reassignments=a.reassignments, last_head_beat_age_ms=age,
                attached_since_ms=a.attached_since_ms if a.attached else 0,
                max_head_beat_gap_ms=int(a.max_head_beat_gap * 1000),
            )

    async def check(request: str, context):
        if request == "":
            status = SERVING
        elif request == "tether.v1.WorkerService":
            status = SERVING if worker.attachment.attached else NOT_SERVING
        else:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request!r}")
        return bytes([0x08, status])

    health = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=_health_request, response_serializer=lambda b: b),
    })
    server = grpc.aio.server()
    pb_grpc.add_WorkerServiceServicer_to_server(Status(), server)
    server.add_generic_rpc_handlers((health,))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    return server


# -- the command line ---------------------------------------------------

def head_addr(text: str) -> str:
    host, sep, port = text.rpartition(":")
    ok = sep and host and port.isdigit() and 0 < int(port) < 65536 and "/" not in host
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return text


def heads_list(text: str) -> List[str]:
    return [head_addr(t) for t in text.split(",")]


async def main_async(args) -> int:
    token = args.token_file.read_text().strip() if args.token_file else None
    tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
    worker = Worker(args.id, args.heads, worker_addr=args.advertise or args.listen, token=token,
                    tls_ca=tls_ca, connect_timeout=args.connect_timeout, max_backoff=args.max_backoff)
    server = serve(worker, args.listen)
    await server.start()
    log.info("worker serving id=%s listen=%s heads=%s", args.id, args.listen, ",".join(args.heads))
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, lambda: asyncio.ensure_future(worker.stop()))
    await worker.run()
    await server.stop(1)
    log.info("stopped")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", required=True, type=heads_list, help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--id", required=True, help="this worker's id, unique in the cluster")
    parser.add_argument("--listen", required=True, type=head_addr, help="HOST:PORT to serve Status and health")
    parser.add_argument("--advertise", type=head_addr, help="HOST:PORT reported to heads (default --listen)")
    parser.add_argument("--token-file", type=Path, help="bearer token sent to heads and required by Status")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate: dial heads over TLS")
    parser.add_argument("--stubs", type=Path, default=DEFAULT_STUBS, help="where generate.py wrote the stubs")
    parser.add_argument("--connect-timeout", type=float, default=1.0, help="seconds")
    parser.add_argument("--max-backoff", type=float, default=5.0, help="seconds")
    args = parser.parse_args()
    for f in (args.token_file, args.tls_ca):
        if f and not f.is_file():
            parser.error(f"cannot read {f}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s tether_worker: %(message)s")
    load_stubs(args.stubs)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
