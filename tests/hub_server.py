"""A small in-memory Hub on 127.0.0.1 that speaks the parts of the Hub HTTP API `huggingface_hub` uses to push
and pull a model repo, for tests that run the real client against it (HF_ENDPOINT=hub.endpoint).

Spoken (model repos only):
    POST /api/repos/create                               create a repo (409 when it exists)
    POST /api/validate-yaml                              a README's front matter must parse to a mapping
    POST /api/models/{repo}/branch/{branch}              create a branch from main (409 when it exists)
    POST /api/models/{repo}/preupload/{rev}              every file gets upload mode "regular": the client then
                                                         sends contents base64-encoded inside the commit, with no
                                                         LFS or xet transfer (the client accepts "regular" for
                                                         any size; this Hub never asks for "lfs")
    POST /api/models/{repo}/commit/{rev}                 ndjson commit: header, file (base64), deletedFile
    GET  /api/agent-harnesses                            an empty registry (no agent detection)
    GET  /api/models/{repo}[/revision/{rev}]             repo info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]          file listing
    HEAD/GET /{repo}/resolve/{rev}/{path}                file metadata (X-Repo-Commit, ETag, Content-Length), body
    HEAD /                                               200 (the CLI's "is the Hub reachable" probe)

Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises the
same exceptions as against the real Hub. Anything else is answered 404 and recorded in `unhandled`.

Bounded: after `max_requests` requests or `lifetime` seconds the server stops by itself; `refuse_commits_to`
names repos whose commits are refused (403), to test failed uploads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class Repo:
    """Commits are full snapshots {path: bytes}; branches name commits."""

    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.history: list[str] = []  # commit ids in creation order
        self.messages: dict[str, str] = {}
        self.branches: dict[str, str] = {}
        self.commit("main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")

    def commit(self, branch: str, added: dict[str, bytes], deleted: list[str], message: str) -> str:
        files = dict(self.commits[self.branches[branch]]) if branch in self.branches else {}
        files.update(added)
        for path in deleted:
            files.pop(path, None)
        sha = hashlib.sha1(f"{len(self.history)}:{message}".encode() + "\0".join(sorted(files)).encode()).hexdigest()
        self.commits[sha], self.messages[sha], self.branches[branch] = files, message, sha
        self.history.append(sha)
        return sha

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit id -> the commit id (None when unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class LoopbackHub:
    """`with LoopbackHub() as hub:` serves on `hub.endpoint` in a daemon thread until the block ends, or until
    `max_requests` requests or `lifetime` seconds have passed."""

    def __init__(self, max_requests: int = 2000, lifetime: float = 120.0, refuse_commits_to: tuple[str, ...] = ()):
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.validated_cards: list[dict] = []
        self.max_requests, self.lifetime, self.refuse_commits_to = max_requests, lifetime, refuse_commits_to
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def start(self) -> "LoopbackHub":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            threading.Thread(target=self.server.shutdown, daemon=True).start()
            self._thread.join(timeout=5)
        self.server.server_close()

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol

    def handle(self, method: str, path: str, query: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one request; called under `self.lock`."""
        parts = [unquote(part) for part in path.strip("/").split("/")]
        if method == "HEAD" and parts == [""]:  # the CLI's reachability probe (`slimvlm.cli.hub_unreachable`)
            return 200, {}, b""
        if method == "GET" and parts == ["api", "agent-harnesses"]:  # the client's agent detection: none here
            return self._json({"standardEnvVars": [], "harnesses": {}})
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body)["content"])
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if repo_id not in self.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            repo = self.repos[repo_id]
            if method == "GET" and not rest:
                return self._info(repo_id, repo, "main")
            action, revision, inner = rest[0], (rest[1] if len(rest) > 1 else "main"), "/".join(rest[2:])
            if method == "POST" and action == "branch":
                return self._create_branch(repo, revision, json.loads(body or b"{}"))
            sha = repo.resolve(revision)
            if sha is None and not (method == "POST" and action in ("preupload", "commit")):
                return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
            if method == "GET" and action == "revision":
                return self._info(repo_id, repo, revision)
            if method == "GET" and action == "tree":
                return self._tree(repo.commits[sha], inner)
            if method == "POST" and action == "preupload":
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            if method == "POST" and action == "commit":
                return self._commit(repo_id, repo, revision, body)
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), method)
        self.unhandled.append(f"{method} {path}?{query}")
        return self._error(404, None, f"loopback hub: no route for {method} {path}")

    def _create_repo(self, payload: dict) -> tuple[int, dict[str, str], bytes]:
        repo_id = "/".join(part for part in (payload.get("organization"), payload["name"]) if part)
        if payload.get("type", "model") != "model":
            return self._error(400, None, "loopback hub: model repos only")
        if repo_id in self.repos:
            return self._json({"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}, 409)
        self.repos[repo_id] = Repo()
        return self._json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, content: str):
        """A README's YAML front matter must parse to a mapping (the real Hub checks much more)."""
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            return self._json({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            metadata = yaml.safe_load(match[1])
        except yaml.YAMLError as error:
            return self._json({"errors": [{"message": f"invalid YAML: {error}"}]}, 400)
        if not isinstance(metadata, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        self.validated_cards.append(metadata)
        return self._json({"errors": [], "warnings": []})

    def _create_branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.branches:
            return self._error(409, None, f"Branch {branch} already exists")
        start = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        return self._json({})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes):
        if repo_id in self.refuse_commits_to:
            return self._error(403, None, f"loopback hub: commits to {repo_id} are refused")
        if revision not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Branch {revision} not found")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added, deleted = {}, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"loopback hub: unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key != "header":
                return self._error(400, None, f"loopback hub: unsupported commit operation {key!r}")
        sha = repo.commit(revision, added, deleted, header["summary"])
        return self._json({"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def _info(self, repo_id: str, repo: Repo, revision: str):
        sha = repo.resolve(revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "siblings": siblings, "private": False,
                           "tags": [], "downloads": 0, "likes": 0})

    def _tree(self, files: dict[str, bytes], folder: str):
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        entries = [{"type": "file", "path": path, "size": len(content), "oid": git_blob_sha(content)}
                   for path, content in sorted(files.items()) if path.startswith(prefix)]
        if prefix and not entries:
            return self._error(404, "EntryNotFound", f"{folder} does not exist")
        return self._json(entries)

    def _resolve(self, repo_id: str, revision: str, path: str, method: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"', "Content-Type": "application/octet-stream",
                   "Content-Length": str(len(content))}
        return 200, headers, b"" if method == "HEAD" else content

    def _json(self, value, status: int = 200):
        return status, {"Content-Type": "application/json"}, json.dumps(value).encode()

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code:
            headers["X-Error-Code"] = code
        return status, headers, json.dumps({"error": message}).encode()

    # ------------------------------------------------------------------ HTTP plumbing

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                with hub.lock:
                    hub.requests.append(f"{self.command} {url.path}")
                    if len(hub.requests) > hub.max_requests:
                        status, headers, payload = 503, {}, b"loopback hub: request budget spent"
                        threading.Thread(target=hub.stop, daemon=True).start()
                    else:
                        try:
                            status, headers, payload = hub.handle(self.command, url.path, url.query, body)
                        except Exception as error:  # a bug of this server: answer, and let the test see it
                            hub.unhandled.append(f"{self.command} {url.path}: {error!r}")
                            status, headers, payload = 500, {}, repr(error).encode()
                self.send_response(status)
                headers.setdefault("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, *args):  # quiet
                pass

        return Handler


def wait_until_stopped(hub: LoopbackHub, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while hub._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not hub._thread.is_alive()
