#!/usr/bin/env python3
"""Check a DeepSpeed hostfile before launching (stdlib only; the launch scripts call it).

    python3 launch/check_hostfile.py HOSTFILE [--node-rank R]

A hostfile lists one node per line as ``HOST slots=N`` (N ≥ 1: the ranks started on that node); blank lines and
``#`` comments are ignored. DeepSpeed's own parser proceeds on the local node alone when the file is missing, and
accepts trailing junk or ``slots=0``; this check refuses all of these and duplicate hosts, naming the file and line.

On success prints ``NODES RANKS FIRST_HOST SLOTS`` on stdout: the number of nodes, of ranks, the first host (rank 0
runs there; the default master address) and the slots of node ``R`` (of the first node without ``--node-rank``).
On failure prints ``error: HOSTFILE:LINE: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import re
import sys

LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


class HostfileError(ValueError):
    """A hostfile the launcher must not use; the message names the file and line."""


def parse(path: str) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` in file order (the order of global ranks)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise HostfileError(f"{path}: cannot read the hostfile ({e.strerror}); write one line 'HOST slots=N' "
                            "per node (see launch/hostfile.example)") from e
    hosts: dict[str, tuple[int, int]] = {}  # host -> (line number, slots)
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise HostfileError(f"{path}:{number}: malformed line {raw.strip()!r}: expected 'HOST slots=N' with N >= 1")
        host = m.group(1)
        if host in hosts:
            hint = " (on several nodes, name each by its own hostname)" if host == "localhost" else ""
            raise HostfileError(f"{path}:{number}: host {host!r} is already listed on line {hosts[host][0]}{hint}")
        hosts[host] = (number, int(m.group(2)))
    if not hosts:
        raise HostfileError(f"{path}: no hosts: write one line 'HOST slots=N' per node")
    return [(host, slots) for host, (_, slots) in hosts.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hostfile")
    p.add_argument("--node-rank", type=int, default=None, help="this node's position in the hostfile (0-based)")
    args = p.parse_args(argv)
    try:
        hosts = parse(args.hostfile)
        node = 0 if args.node_rank is None else args.node_rank
        if not 0 <= node < len(hosts):
            raise HostfileError(f"{args.hostfile}: node rank {node} is out of range: the hostfile lists "
                                f"{len(hosts)} node(s), so NODE_RANK must be 0..{len(hosts) - 1}")
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(len(hosts), sum(s for _, s in hosts), hosts[0][0], hosts[node][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
