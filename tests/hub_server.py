"""A loopback Hugging Face Hub for end-to-end tests of the real ``huggingface_hub`` HTTP path.

The server implements the endpoints that ``huggingface_hub`` 2.4 uses for ``push_to_hub`` (create-repo,
``ModelCard.load``, validate-yaml, preupload, commit) and for ``from_pretrained(repo_id)`` (model info, ``HEAD`` /
``GET`` on ``/<repo>/resolve/<rev>/<file>``). Preupload answers ``"regular"`` for every file, so the files arrive
base64-encoded inside the NDJSON commit and the LFS/Xet protocols are never used. Files are stored under
``root/<repo_id>/`` (datasets under ``root/datasets/<repo_id>/``, spaces under ``root/spaces/<repo_id>/``). Only the
latest commit of a repo is served; it can be addressed as ``main`` or by its commit sha.

``huggingface_hub`` reads ``HF_ENDPOINT`` at import time, so exercise the client in a subprocess: see
:func:`run_with_hub`. Unknown routes get a 404 and are recorded in ``HubServer.unhandled`` and logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger("tests.hub_server")

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_ROUTE_API = re.compile(
    rf"^/api/(?P<kind>models|datasets|spaces)/{_REPO}"
    r"(?:/(?P<action>preupload|commit|revision|tree|paths-info)/(?P<rest>.*))?$"
)
_ROUTE_RESOLVE = re.compile(
    rf"^/(?:(?P<kind>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
)
_EMPTY_SHA = "0" * 40


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    path: Path
    sha: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.is_file()
        )


class HubServer:
    """A threaded loopback Hub. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    ``lifetime_s`` bounds how long the server runs: after it, the server shuts itself down.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        lifetime_s: float = 600.0,
        host: str = "127.0.0.1",
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lifetime_s = lifetime_s
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.unhandled: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._repos_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = threading.Event()
        host_, port = self._httpd.server_address[:2]
        self.endpoint = f"http://{host_}:{port}"

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="hub-server", daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _expire(self) -> None:
        logger.warning(
            "hub server %s: lifetime of %ss reached, shutting down",
            self.endpoint,
            self.lifetime_s,
        )
        self.stop()

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None and self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage ---------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return self.root / f"{prefix}{repo_id}"

    def _get_repo(
        self, repo_type: str, repo_id: str, create: bool = False
    ) -> _Repo | None:
        key = (repo_type, repo_id)
        with self._repos_lock:
            repo = self._repos.get(key)
            if repo is None:
                path = self.repo_dir(repo_id, repo_type)
                if not (create or path.is_dir()):
                    return None
                path.mkdir(parents=True, exist_ok=True)
                repo = _Repo(path=path, sha=_EMPTY_SHA)
                if (
                    repo.files()
                ):  # pre-seeded directory: derive a stable sha from its content
                    h = hashlib.sha1()
                    for f in repo.files():
                        h.update(
                            f.encode()
                            + b"\0"
                            + _git_blob_sha((path / f).read_bytes()).encode()
                        )
                    repo.sha = h.hexdigest()
                self._repos[key] = repo
            return repo


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "LoopbackHub/1.0"

        def log_message(self, format, *args):
            logger.debug("hub %s - " + format, self.address_string(), *args)

        # -- helpers ---------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict | None = None,
            ctype="application/json",
        ):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)
            hub.requests.append((self.command, self.path, status))

        def _json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str):
            self._json(
                status,
                {"error": message},
                {"X-Error-Code": code, "X-Error-Message": message},
            )

        def _not_found_route(self):
            hub.unhandled.append((self.command, self.path))
            logger.warning("hub server: unhandled route %s %s", self.command, self.path)
            print(
                f"[hub_server] unhandled route {self.command} {self.path}",
                file=sys.stderr,
            )
            self._json(404, {"error": f"unhandled route {self.command} {self.path}"})

        def _repo_or_404(self, repo_type: str, repo_id: str) -> _Repo | None:
            repo = hub._get_repo(repo_type, repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return repo

        def _rev_ok(self, repo: _Repo, rev: str) -> bool:
            rev = unquote(rev)
            if rev in ("main", repo.sha):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False

        def _repo_url(self, repo_type: str, repo_id: str) -> str:
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            return f"{hub.endpoint}/{prefix}{repo_id}"

        # -- dispatch --------------------------------------------------------------------------------------------
        def _dispatch(self):
            try:
                url = urlsplit(self.path)
                self._query = parse_qs(url.query)
                path = url.path
                if self.command == "POST" and path == "/api/repos/create":
                    return self._create_repo()
                if self.command == "POST" and path == "/api/validate-yaml":
                    self._body()
                    return self._json(200, {"errors": [], "warnings": []})
                m = _ROUTE_API.match(path)
                if m:
                    return self._api(m)
                m = _ROUTE_RESOLVE.match(path)
                if m and self.command in ("GET", "HEAD"):
                    kind = {"datasets": "dataset", "spaces": "space"}.get(
                        m["kind"] or "", "model"
                    )
                    return self._resolve(kind, m["repo"], m["rev"], unquote(m["path"]))
                self._body()
                return self._not_found_route()
            except Exception as exc:  # keep the server alive and the failure visible
                logger.exception(
                    "hub server: error handling %s %s", self.command, self.path
                )
                print(
                    f"[hub_server] error on {self.command} {self.path}: {exc!r}",
                    file=sys.stderr,
                )
                try:
                    self._json(500, {"error": repr(exc)})
                except OSError:
                    pass

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # -- endpoints -------------------------------------------------------------------------------------------
        def _create_repo(self):
            payload = json.loads(self._body() or b"{}")
            name, org = payload["name"], payload.get("organization")
            repo_id = f"{org}/{name}" if org else name
            repo_type = payload.get("type") or "model"
            url = self._repo_url(repo_type, repo_id)
            if hub._get_repo(repo_type, repo_id) is not None:
                return self._json(
                    409,
                    {"error": f"You already created this {repo_type} repo", "url": url},
                )
            hub._get_repo(repo_type, repo_id, create=True)
            return self._json(200, {"url": url, "name": repo_id, "id": repo_id})

        def _api(self, m: re.Match):
            repo_type, repo_id, action, rest = (
                _API_TYPES[m["kind"]],
                m["repo"],
                m["action"],
                m["rest"],
            )
            body = self._body() if self.command == "POST" else b""
            repo = self._repo_or_404(repo_type, repo_id)
            if repo is None:
                return None
            if action is None and self.command == "GET":
                return self._info(repo_type, repo_id, repo)
            if action == "revision" and self.command == "GET":
                return (
                    self._info(repo_type, repo_id, repo)
                    if self._rev_ok(repo, rest)
                    else None
                )
            if action == "preupload" and self.command == "POST":
                files = json.loads(body)["files"]
                return self._json(
                    200,
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                            }
                            for f in files
                        ]
                    },
                )
            if action == "commit" and self.command == "POST":
                return self._commit(repo_type, repo_id, repo, rest, body)
            if action == "tree" and self.command == "GET":
                rev, _, sub = rest.partition("/")
                return self._tree(repo, sub) if self._rev_ok(repo, rev) else None
            return self._not_found_route()

        def _info(self, repo_type: str, repo_id: str, repo: _Repo):
            info = {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "private": False,
                "sha": repo.sha,
                "tags": [],
                "siblings": [{"rfilename": f} for f in repo.files()],
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            }
            if repo_type == "model":
                info["modelId"] = repo_id
            return self._json(200, info)

        def _tree(self, repo: _Repo, sub: str):
            recursive = self._query.get("recursive", ["false"])[0].lower() in (
                "1",
                "true",
            )
            base = (repo.path / unquote(sub)) if sub else repo.path
            if not base.is_dir():
                return self._error(
                    404, "EntryNotFound", f"{sub} does not exist on main"
                )
            entries = []
            for p in sorted(base.rglob("*") if recursive else base.iterdir()):
                rel = p.relative_to(repo.path).as_posix()
                if p.is_file():
                    data = p.read_bytes()
                    entries.append(
                        {
                            "type": "file",
                            "oid": _git_blob_sha(data),
                            "size": len(data),
                            "path": rel,
                        }
                    )
                else:
                    entries.append(
                        {"type": "directory", "oid": _EMPTY_SHA, "size": 0, "path": rel}
                    )
            return self._json(200, entries)

        def _commit(
            self, repo_type: str, repo_id: str, repo: _Repo, rev: str, body: bytes
        ):
            if unquote(rev) != "main":
                return self._error(
                    404,
                    "RevisionNotFound",
                    f"Invalid rev id: {unquote(rev)} (only main)",
                )
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return self._json(
                    400, {"error": "commit payload must start with a header line"}
                )
            with repo.lock:
                h = hashlib.sha1(repo.sha.encode())
                root = repo.path.resolve()
                for item in lines[1:]:
                    key, value = item["key"], item["value"]
                    dst = (repo.path / value["path"]).resolve()
                    if root not in dst.parents:
                        return self._json(
                            400, {"error": f"invalid path {value['path']!r}"}
                        )
                    if key == "file":
                        if value.get("encoding", "base64") != "base64":
                            return self._json(
                                400,
                                {
                                    "error": f"unsupported encoding {value.get('encoding')!r}"
                                },
                            )
                        data = base64.b64decode(value["content"])
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        dst.write_bytes(data)
                        h.update(
                            b"A"
                            + value["path"].encode()
                            + b"\0"
                            + _git_blob_sha(data).encode()
                        )
                    elif key == "deletedFile":
                        dst.unlink(missing_ok=True)
                        h.update(b"D" + value["path"].encode())
                    elif key == "deletedFolder":
                        shutil.rmtree(dst, ignore_errors=True)
                        h.update(b"F" + value["path"].encode())
                    else:  # lfsFile etc.: never requested since preupload answers "regular"
                        return self._json(
                            400, {"error": f"unsupported commit operation {key!r}"}
                        )
                h.update(json.dumps(lines[0]["value"], sort_keys=True).encode())
                repo.sha = h.hexdigest()
                sha = repo.sha
            return self._json(
                200,
                {
                    "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{sha}",
                    "commitOid": sha,
                    "pullRequestUrl": None,
                    "success": True,
                },
            )

        def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str):
            repo = self._repo_or_404(repo_type, repo_id)
            if repo is None or not self._rev_ok(repo, rev):
                return None
            file = (repo.path / path).resolve()
            if repo.path.resolve() not in file.parents or not file.is_file():
                return self._send(
                    404,
                    json.dumps({"error": "Entry not found"}).encode(),
                    {
                        "X-Error-Code": "EntryNotFound",
                        "X-Error-Message": "Entry not found",
                        "X-Repo-Commit": repo.sha,
                    },
                )
            data = file.read_bytes()
            headers = {
                "ETag": f'"{_git_blob_sha(data)}"',
                "X-Repo-Commit": repo.sha,
                "Accept-Ranges": "bytes",
            }
            status = 200
            rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
            if rng and self.command == "GET":
                start = int(rng[1])
                end = int(rng[2]) if rng[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
            # HEAD gets the same headers (Content-Length included); _send writes no body for it.
            return self._send(status, data, headers, ctype="application/octet-stream")

    return Handler


def hub_env(hub: HubServer, tmp_path: str | os.PathLike) -> dict[str, str]:
    """Environment for a subprocess that talks to ``hub`` with the real client (no ``HF_HUB_OFFLINE``)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    hf_home = Path(tmp_path) / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_TOKEN="hf_dummy",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_with_hub(
    hub: HubServer, code: str, tmp_path: str | os.PathLike, timeout: float = 120.0
) -> subprocess.CompletedProcess:
    """Run ``python -c code`` against ``hub``; raise ``AssertionError`` with stdout/stderr on a nonzero exit."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=hub_env(hub, tmp_path),
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            f"\n--- unhandled hub routes ---\n{hub.unhandled}"
        )
    return proc
