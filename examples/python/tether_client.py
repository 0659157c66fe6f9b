#!/usr/bin/env python3
"""A small Python client of Tether, to show how to call heads and workers
from another language with the stubs that generate.py makes from proto/.

    tether_client.py list HOST:PORT                 the workers attached to a head
    tether_client.py status HOST:PORT               what a worker says about itself
    tether_client.py watch HOST:PORT [--count N]    the cluster's membership events

Every command prints one line per item as `key=value` fields separated by
spaces, so that its output is easy to read and to grep. Values never hold
spaces, except `detail=` in events, which is always the last field.

Options (after the command): `--token-file FILE` sends
`authorization: Bearer <contents of FILE>`, for clusters started with
`--auth-token-file`; `--stubs DIR` says where generate.py wrote the stubs;
`--timeout SECONDS` bounds `list` (each page) and `status`.

Exit status: 0 on success, 1 when a call fails (the gRPC status code and
message go to stderr), 2 on bad usage.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

HERE = Path(__file__).resolve().parent
DEFAULT_STUBS = HERE / "generated"
INSTALL_HINT = "python3 -m pip install -r examples/python/requirements.txt"

try:
    import grpc
except ImportError:
    sys.exit(f"tether_client: the grpcio package is not installed; run `{INSTALL_HINT}`")


def fail(message: str) -> NoReturn:
    print(f"tether_client: {message}", file=sys.stderr)
    sys.exit(1)


def load_stubs(stubs: Path):
    """Imports the generated modules from `stubs`, or exits naming the fix."""
    sys.path.insert(0, str(stubs))
    try:
        from tether.v1 import tether_pb2, tether_pb2_grpc
    except ImportError as e:
        fail(
            f"cannot import the Tether stubs from {stubs} ({e}); "
            f"run `python3 {HERE / 'generate.py'} --out {stubs}`"
        )
    return tether_pb2, tether_pb2_grpc


def metadata(token_file):
    """The call metadata: the bearer token when a token file is given."""
    if token_file is None:
        return ()
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        fail(f"cannot read --token-file {token_file}: {e}")
    if not token:
        fail(f"--token-file {token_file} is empty")
    return (("authorization", f"Bearer {token}"),)


def rpc_error(what: str, target: str, e: grpc.RpcError) -> NoReturn:
    fail(f"{what} at {target} failed: {e.code().name}: {e.details()}")


def age_ms(now_ms: int, then_ms: int) -> int:
    """Milliseconds since `then_ms`, 0 if unknown (0) or in the future."""
    return max(0, now_ms - then_ms) if then_ms > 0 else 0


# ListWorkers answers in pages of at most this many workers (the head's
# maximum); a page may hold fewer, only an empty next_page_token ends it.
PAGE_SIZE = 1000


def all_workers(pb, stub, args, md):
    """Every page of a head's ListWorkers: (head id, workers by id)."""
    head_id, workers, token = "", [], ""
    while True:
        request = pb.ListWorkersRequest(page_size=PAGE_SIZE, page_token=token)
        try:
            page = stub.ListWorkers(request, timeout=args.timeout, metadata=md)
        except grpc.RpcError as e:
            rpc_error("ListWorkers", args.target, e)
        head_id = page.head_id
        workers.extend(page.workers)
        if not page.next_page_token:
            return head_id, workers
        if page.next_page_token <= token:
            fail(f"ListWorkers at {args.target}: page token {page.next_page_token!r} after {token!r} does not grow")
        token = page.next_page_token


def list_workers(pb, grpc_pb, channel, args, md) -> None:
    """One line for the head, then one per attached worker (every page)."""
    stub = grpc_pb.HeadServiceStub(channel)
    head_id, workers = all_workers(pb, stub, args, md)
    now = int(time.time() * 1000)
    print(f"head={head_id} workers={len(workers)}")
    for w in workers:
        load = f"{w.load:g}" if w.HasField("load") else "-"
        print(
            f"worker={w.worker_id} epoch={w.epoch} addr={w.worker_addr or '-'}"
            f" sequence={w.last_sequence} load={load}"
            f" attached_for_ms={age_ms(now, w.attached_since_ms)}"
            f" last_beat_age_ms={age_ms(now, w.last_beat_ms)}"
        )


def worker_status(pb, grpc_pb, channel, args, md) -> None:
    """One line: the worker's head, epoch and beat health."""
    stub = grpc_pb.WorkerServiceStub(channel)
    try:
        s = stub.Status(pb.StatusRequest(), timeout=args.timeout, metadata=md)
    except grpc.RpcError as e:
        rpc_error("Status", args.target, e)
    now = int(time.time() * 1000)
    print(
        f"worker={s.worker_id} head={s.head_id or '-'} head_addr={s.head_addr or '-'}"
        f" epoch={s.epoch} attached={str(s.attached).lower()}"
        f" reassignments={s.reassignments}"
        f" last_head_beat_age_ms={s.last_head_beat_age_ms}"
        f" attached_for_ms={age_ms(now, s.attached_since_ms)}"
        f" max_head_beat_gap_ms={s.max_head_beat_gap_ms}"
    )


def event_kind(pb, kind: int) -> str:
    """`EVENT_KIND_WORKER_ATTACHED` -> `worker_attached`."""
    try:
        name = pb.EventKind.Name(kind)
    except ValueError:
        return f"unknown_{kind}"
    return name.removeprefix("EVENT_KIND_").lower()


def describe(pb, e) -> str:
    """One event as `key=value` fields; empty fields are left out."""
    fields = [f"at_ms={e.at_ms}", f"kind={event_kind(pb, e.kind)}", f"head={e.head_id}"]
    if e.worker_id:
        fields += [f"worker={e.worker_id}", f"epoch={e.epoch}"]
    if e.previous_head_id:
        fields.append(f"previous_head={e.previous_head_id}")
    if e.detail:
        fields.append(f"detail={e.detail}")
    return " ".join(fields)


def watch(pb, grpc_pb, channel, args, md) -> None:
    """Prints events as they come; stops after --count of them if given.

    Events are not replayed: the stream starts with the next event. Once
    the head has accepted the watch, a line saying so goes to stderr, so a
    script can wait for it before it changes the cluster.
    """
    stub = grpc_pb.HeadServiceStub(channel)
    call = stub.WatchEvents(pb.WatchEventsRequest(), metadata=md)
    seen = 0
    try:
        # Returns once the head answered with its headers, which it sends
        # after subscribing this watcher; an immediate refusal ends the
        # call instead, and iterating below raises it.
        call.initial_metadata()
        if not call.done():
            print(f"watching the cluster's events through {args.target}", file=sys.stderr, flush=True)
        for event in call:
            print(describe(pb, event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                call.cancel()
                return
    except grpc.RpcError as e:
        rpc_error(f"WatchEvents (after {seen} events)", args.target, e)
    except KeyboardInterrupt:
        call.cancel()
        return
    fail(f"the head at {args.target} ended the event stream after {seen} events")


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("target", metavar="HOST:PORT", help="the head or worker to ask")
    common.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="send `authorization: Bearer <file contents>` (for --auth-token-file clusters)",
    )
    common.add_argument(
        "--stubs",
        type=Path,
        metavar="DIR",
        default=DEFAULT_STUBS,
        help=f"the directory generate.py wrote to (default: {DEFAULT_STUBS})",
    )
    common.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=5.0,
        help="seconds to wait for an answer to list or status (default: 5)",
    )
    parser = argparse.ArgumentParser(
        description="Ask Tether heads and workers how they are, over gRPC.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "list", parents=[common], help="the workers attached to a head, with their epochs"
    ).set_defaults(run=list_workers)
    commands.add_parser(
        "status", parents=[common], help="which head a worker is attached to, and how"
    ).set_defaults(run=worker_status)
    watch_parser = commands.add_parser(
        "watch", parents=[common], help="print the cluster's membership events as they happen"
    )
    watch_parser.add_argument(
        "--count",
        type=positive_int,
        metavar="N",
        help="exit after N events (default: run until Ctrl-C)",
    )
    watch_parser.set_defaults(run=watch)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    pb, grpc_pb = load_stubs(args.stubs.resolve())
    md = metadata(args.token_file)
    # Plaintext, like a cluster started without --tls-cert. For TLS, use
    # grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem)).
    with grpc.insecure_channel(args.target) as channel:
        args.run(pb, grpc_pb, channel, args, md)


if __name__ == "__main__":
    main()
