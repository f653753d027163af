"""A stand-in for the part of the Hugging Face Hub API that `pipeline.hub.push_folder` uses, for tests.

The real `huggingface_hub` client talks to it over HTTP (set `HF_ENDPOINT` to `hub.endpoint`). It serves on
127.0.0.1 only, on a free port, from a thread; it answers `uploadMode: "regular"` to every preupload request
so no LFS/Xet protocol is involved, and keeps what was committed in memory:

    with FakeHub() as hub:
        ...                                   # push to hub.endpoint
        hub.files("user/tiny-sft")            # {"config.json": b"...", "value_model/config.json": b"...", ...}

`hub.fail_with = 401` (or 500, ...) makes every request fail with that status; `hub.fail_on = "commit"` limits
the failure to one endpoint (`create`, `validate-yaml`, `preupload`, `branch`, `commit`); `hub.stop()` takes
the server down (connections are then refused).
"""

import base64
import hashlib
import json
import re
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

MAX_BODY = 64 * 1024 * 1024  # a request body larger than this is refused (413)

_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (method, endpoint name, regex over the unquoted path)
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate-yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<revision>.+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<revision>.+)$")),
    ("POST", "branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<revision>.+)$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(/revision/(?P<revision>.+))?$")),
    # asked by the client or TRL on their own (user-agent registry, telemetry), not by the push
    ("GET", "agent-harnesses", re.compile(r"^/api/agent-harnesses$")),
    ("HEAD", "telemetry", re.compile(r"^/api/telemetry/.*$")),
]


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool|None, "branches": {name: {path: bytes}}}
        self.requests: list[dict] = []  # every request: method, path, endpoint (None if unknown), authorization
        self.commits: list[dict] = []  # header + paths of every accepted commit
        self.fail_with: int | None = None
        self.fail_on: str | None = None
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds a client may stall mid-request
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet: the requests are recorded instead
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_PUT(self):
                hub._handle(self, "PUT")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

            def do_DELETE(self):
                hub._handle(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.running = True

    # ------------------------------------------------------------------ test-facing helpers
    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos.get(repo_id, {}).get("branches", {}).get(revision, {}))

    def tokens(self) -> set[str]:
        """The bearer tokens the client sent."""
        return {r["authorization"].removeprefix("Bearer ") for r in self.requests if r["authorization"]}

    def unknown_requests(self) -> list[dict]:
        return [r for r in self.requests if r["endpoint"] is None]

    # ------------------------------------------------------------------ server side
    def _handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(request.path)
        path = urllib.parse.unquote(parsed.path)
        endpoint, match = None, None
        for route_method, name, pattern in ROUTES:
            found = pattern.match(path)
            if route_method == method and found:
                endpoint, match = name, found
                break
        length = int(request.headers.get("Content-Length") or 0)
        record = {"method": method, "path": path, "endpoint": endpoint,
                  "authorization": request.headers.get("Authorization")}
        with self.lock:
            self.requests.append(record)
        if length > MAX_BODY:
            request.close_connection = True
            return self._reply(request, 413, {"error": "request body too large"})
        body = request.rfile.read(length) if length else b""
        if self.fail_with and self.fail_on in (None, endpoint):
            message = {401: "Invalid credentials in Authorization header"}.get(self.fail_with, "Internal Error")
            return self._reply(request, self.fail_with, {"error": message}, {"X-Error-Message": message})
        if endpoint is None:
            return self._reply(request, 404, {"error": f"no such endpoint: {method} {path}"})
        try:
            with self.lock:
                status, payload, headers = getattr(self, "_" + endpoint.replace("-", "_"))(match, body)
        except (ValueError, KeyError, TypeError) as error:
            status, payload, headers = 400, {"error": f"bad request: {error}"}, {}
        self._reply(request, status, payload, headers)

    def _reply(self, request, status: int, payload, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        request.send_response(status, HTTPStatus(status).phrase)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.send_header("Connection", "close")  # one request per connection: stop() then really refuses
        for key, value in (headers or {}).items():
            request.send_header(key, value)
        request.end_headers()
        request.close_connection = True
        if request.command != "HEAD":
            request.wfile.write(data)

    def _repo(self, match):
        repo_id = match["repo"]
        if repo_id not in self.repos:
            return None, (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return self.repos[repo_id], None

    def _create(self, match, body):
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}, {}
        self.repos[repo_id] = {"private": payload.get("visibility") == "private" if "visibility" in payload
                               else payload.get("private"), "branches": {"main": {}}}
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}

    def _validate_yaml(self, match, body):
        content = json.loads(body)["content"]
        block = re.match(r"^\s*---\r?\n([\s\S]*?)\r?\n---", content)
        if block is None:
            return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}, {}
        try:
            yaml.safe_load(block.group(1))
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": str(error)}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def _info(self, match, body):
        repo, error = self._repo(match)
        if error:
            return error
        revision = match["revision"] or "main"
        if revision not in repo["branches"]:
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        files = repo["branches"][revision]
        return 200, {"id": match["repo"], "modelId": match["repo"], "sha": _tree_sha(files), "private": bool(repo["private"]),
                     "siblings": [{"rfilename": p} for p in sorted(files)]}, {}

    def _agent_harnesses(self, match, body):
        return 404, {"error": "not served here"}, {}

    def _telemetry(self, match, body):
        return 200, {}, {}

    def _branch(self, match, body):
        repo, error = self._repo(match)
        if error:
            return error
        if match["revision"] in repo["branches"]:
            return 409, {"error": "Reference already exists"}, {}
        repo["branches"][match["revision"]] = dict(repo["branches"]["main"])
        return 200, {}, {}

    def _preupload(self, match, body):
        repo, error = self._repo(match)
        if error:
            return error
        if match["revision"] not in repo["branches"]:
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                               for f in files]}, {}

    def _commit(self, match, body):
        repo, error = self._repo(match)
        if error:
            return error
        revision = match["revision"]
        if revision not in repo["branches"]:
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise ValueError("the first NDJSON line must be the header")
        staged = dict(repo["branches"][revision])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file" and value.get("encoding") == "base64":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                staged.pop(value["path"], None)
            else:  # lfsFile: never announced by this server's preupload answers
                raise ValueError(f"unsupported commit operation {line['key']}")
        repo["branches"][revision] = staged
        oid = _tree_sha(staged, salt=str(time.time_ns()))
        self.commits.append({"repo": match["repo"], "revision": revision, "header": lines[0]["value"],
                             "paths": [line["value"]["path"] for line in lines[1:]]})
        return 200, {"commitUrl": f"{self.endpoint}/{match['repo']}/commit/{oid}", "commitOid": oid,
                     "pullRequestUrl": None}, {}


def _tree_sha(files: dict[str, bytes], salt: str = "") -> str:
    digest = hashlib.sha1(salt.encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()
