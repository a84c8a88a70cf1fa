"""A stand-in W&B server for the outage tests: it answers the calls an online run and `wandb sync` make (GraphQL,
the file stream, file uploads) with the least the wandb 0.31 client accepts, keeps the history rows it is sent,
and can go away and come back on the same address.  Found by trying: every GraphQL call may answer
{"data": {}} except CreateRunFiles, which must name an upload URL for each file, and RunResumeStatus, which for
a run the server holds answers what wandb-core's runbranch/resume.go reads (the last history row and the line
counts: the client resumes at the step after that row)."""
from __future__ import annotations

import gzip
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeWandbServer:
    def __init__(self):
        with socket.socket() as probe:            # a free port, kept across stop() / start()
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.steps: set[int] = set()              # `_step` of every history row received
        self.received: dict[str, list[dict]] = {}  # run id -> history rows in the order received (duplicates kept)
        self._httpd: ThreadingHTTPServer | None = None

    def start(self) -> "FakeWandbServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                try:
                    request = json.loads(raw)
                except ValueError:                # a file upload
                    request = {}
                if self.path.endswith("/file_stream"):     # /files/<entity>/<project>/<run>/file_stream
                    history = request.get("files", {}).get("wandb-history.jsonl", {})
                    rows = [json.loads(line) for line in history.get("content", [])]
                    owner.steps.update(row["_step"] for row in rows)
                    owner.received.setdefault(self.path.split("/")[-2], []).extend(rows)
                if "RunResumeStatus" in str(request.get("query", "")):
                    self._reply({"data": {"model": owner._resume_status(request.get("variables", {}))}})
                    return
                if "CreateRunFiles" in str(request.get("query", "")):
                    files = request.get("variables", {}).get("files", [])
                    self._reply({"data": {"createRunFiles": {"runID": "run", "uploadHeaders": [], "files": [
                        {"name": f, "uploadUrl": f"{owner.url}/upload/{f}"} for f in files]}}})
                    return
                self._reply({"data": {}})

            do_PUT = do_POST

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def _resume_status(self, variables: dict) -> dict | None:
        rows = self.received.get(variables.get("name"), [])
        if not rows:
            return None                                    # a new run
        last = rows[-1]
        bucket = {"id": variables["name"], "name": variables["name"], "displayName": variables["name"],
                  "summaryMetrics": json.dumps({"_step": last["_step"]}), "config": "{}", "tags": [], "notes": None,
                  "historyLineCount": len(rows), "eventsLineCount": 0, "logLineCount": 0,
                  "historyTail": json.dumps([json.dumps(last)]), "eventsTail": "[]",
                  "wandbConfig": json.dumps({"t": {}})}
        return {"id": "project", "name": variables.get("project"), "entity": {"id": "entity", "name": "entity"},
                "bucket": bucket}

    def stop(self) -> None:
        """Go away: from now on every connection is refused."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
