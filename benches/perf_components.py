#!/usr/bin/env python3
"""CPU of an `sns` process split by component, from a `perf record --call-graph dwarf` profile.

Usage:
    perf record -F 99 --call-graph dwarf,16384 -p PID -o perf.data -- sleep 10
    perf script -i perf.data > perf.txt
    benches/perf_components.py perf.txt [--cpu-seconds S --posts N]

Each sample goes to the innermost frame of its stack that belongs to a component (kernel frames
and frames of no component are passed over). Frames of the gRPC stack (tonic, hyper, h2, prost,
the socket calls under them) are framing: they go to the side they serve, found further out on
the stack (the server's connections, the clients' connections), or to the project component
that called them. Samples whose stack has no component at all are the runtime (scheduler,
timers, I/O driver, idle bookkeeping).

With --cpu-seconds (the process's user + system CPU over the profiled window, from
/proc/PID/stat) and --posts (posts made in that window), each share is also given as CPU
microseconds per post.
"""

import argparse
import re
import sys
from collections import Counter

# Project components, checked per frame in this order (a frame's first match wins).
COMPONENTS = [
    ("log encoding and decoding", r"sns_core::codec|sns_core::event::.*(encode|decode|from_bytes)|storage::file::format"),
    ("state apply and fan-out", r"sns_core::state::"),
    ("snapshots (shadow state, encoding)", r"sns_core::server::snapshots"),
    ("storage handle (queueing appends, reads)", r"sns_core::storage::"),
    ("mirroring to the slave (both sides)", r"sns_core::server::replication"),
    ("sync: reading and applying other clusters' events", r"sns_core::sync::|sns_core::server::sync|sns_core::grpc::events"),
    ("commit pipeline (sequencing, durability, commit gate)", r"sns_core::server::(pipeline|committed|uncommitted)"),
    ("timeline feeds and delivery messages", r"sns_core::server::timeline|sns_core::grpc::sns::(Outbound|post_message)|<sns_core::grpc::sns::Outbound"),
    ("post, follow, list commands (server side)", r"sns_core::grpc::sns|sns_core::server::"),
    ("load generator (clients' sessions, tally)", r"sns_core::session|sns_bins::bench|sns_core::grpc::client"),
    ("heartbeats and coordinator", r"sns_core::coordinator|sns_core::grpc::coord|heartbeat"),
]
COMPONENTS = [(name, re.compile(pattern)) for name, pattern in COMPONENTS]

GRPC_STACK = re.compile(r"\b(h2|hyper|tonic|prost|hyper_util|tower|http_body|mio)::|TcpStream|write_vectored|recv_from|poll_read")
SERVER_SIDE = re.compile(r"h2::server|hyper::proto::h2::server|tonic::transport::server|hyper::server|hyper_util::server|h2::proto::.*server::Peer|server::Peer")
CLIENT_SIDE = re.compile(r"h2::client|hyper::proto::h2::client|tonic::transport::channel|hyper_util::client|client::Peer")

STORAGE_THREAD = "sns-log-writer"


def samples(lines):
    """Yields (comm, frames innermost first) per sample of `perf script` output."""
    comm, frames = None, []
    for line in lines:
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            comm = line.split()[0] if line.split() else "?"
            frames = []
            continue
        parts = line.strip().split(" ", 1)
        frames.append(parts[1] if len(parts) > 1 else parts[0])
    if comm is not None:
        yield comm, frames


def classify(comm, frames):
    if comm.startswith(STORAGE_THREAD):
        return "storage writer threads (write, fdatasync)"
    framing = False
    for frame in frames:
        if "[kernel.kallsyms]" in frame or "([kernel" in frame:
            continue
        if framing or GRPC_STACK.search(frame):
            framing = True
            if SERVER_SIDE.search(frame):
                return "gRPC/HTTP/2 framing and sockets: server connections"
            if CLIENT_SIDE.search(frame):
                return "gRPC/HTTP/2 framing and sockets: client connections"
        for name, pattern in COMPONENTS:
            if pattern.search(frame):
                return f"gRPC/HTTP/2 framing and sockets: under {name}" if framing else name
    if framing:
        return "gRPC/HTTP/2 framing and sockets: unattributed"
    return "runtime (tokio scheduler, timers, I/O driver) and other"


def in_kernel(frames):
    return bool(frames) and "[kernel" in frames[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="`perf script` output")
    parser.add_argument("--cpu-seconds", type=float, help="the process's CPU seconds in the window")
    parser.add_argument("--posts", type=float, help="posts made in the window")
    args = parser.parse_args()
    counts, kernel = Counter(), Counter()
    with open(args.script, encoding="utf-8", errors="replace") as f:
        for comm, frames in samples(f):
            name = classify(comm, frames)
            counts[name] += 1
            if in_kernel(frames):
                kernel[name] += 1
    total = sum(counts.values())
    if total == 0:
        sys.exit("no samples")
    per_post = args.cpu_seconds and args.posts
    header = "| component | share of samples | of which in the kernel |"
    header += " CPU µs per post |" if per_post else ""
    print(header)
    print("|---|---|---|" + ("---|" if per_post else ""))
    for name, n in counts.most_common():
        row = f"| {name} | {100 * n / total:.1f}% | {100 * kernel[name] / total:.1f}% |"
        if per_post:
            row += f" {n / total * args.cpu_seconds / args.posts * 1e6:.1f} |"
        print(row)
    footer = f"| all ({total} samples) | 100% | {100 * sum(kernel.values()) / total:.1f}% |"
    if per_post:
        footer += f" {args.cpu_seconds / args.posts * 1e6:.1f} |"
    print(footer)


if __name__ == "__main__":
    main()
