"""An HTTP node source speaking the work-queue source interface: serves the
nodes of a CSV file (`level,name,parent[,k=v;...]`, read at each request) as

    GET /items -> {"kind": "ItemList", "apiVersion": "v1",
                   "items": [{"level", "name", "parent", "attributes"}, ...]}

    python examples/items_source.py nodes.csv 8080
    [redbike-nodes]
    source.api = http http://127.0.0.1:8080/items
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from redbike.nodes import INSTANCE
from redbike.nodesources import SourceError, parse_csv


def items(path: str) -> dict[str, object]:
    nodes = parse_csv(Path(path).read_text(encoding="utf-8"), path)
    return {"kind": "ItemList", "apiVersion": "v1", "items": [
        {"level": n.level, "name": n.name, "parent": "" if n.parent == INSTANCE else n.parent,
         "attributes": dict(n.attributes)} for n in nodes]}


class Handler(BaseHTTPRequestHandler):
    path_of_nodes = "nodes.csv"

    def do_GET(self) -> None:
        if self.path.rstrip("/") != "/items":
            self.send_error(404)
            return
        try:
            body = json.dumps(items(self.path_of_nodes)).encode()
        except (OSError, SourceError) as exc:  # redbike then keeps its last good list
            self.send_error(500, " ".join(str(exc).split()))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: items_source.py NODES.csv PORT", file=sys.stderr)
        return 2
    Handler.path_of_nodes = argv[1]
    server = ThreadingHTTPServer(("127.0.0.1", int(argv[2])), Handler)
    print(f"serving {argv[1]} at http://127.0.0.1:{argv[2]}/items", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
