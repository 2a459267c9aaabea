"""A node fetcher for a `script` node source: prints the nodes of a fleet of
HOSTS database hosts with DBS logical databases each, one CSV row
`level,name,parent` per node (the README's 500-host example).

    [redbike-nodes]
    levels = host > db
    source.fleet = script python examples/node_fetcher.py 500 10

A real fetcher would ask an inventory; whatever it prints replaces the
source's node list, and a non-zero exit keeps the last good one.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        hosts, dbs = (int(arg) for arg in argv[1:3])
    except ValueError:
        print("usage: node_fetcher.py HOSTS DBS", file=sys.stderr)
        return 2
    for h in range(1, hosts + 1):
        print(f"host,db-host-{h},")
        for d in range(1, dbs + 1):
            print(f"db,db-host-{h}-db{d},db-host-{h}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
