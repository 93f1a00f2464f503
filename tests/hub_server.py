"""Hub-compatible servers for the tests, on 127.0.0.1, offline, over one folder of git repositories
(`mirrors/models/<namespace>/<name>`):

- olah (PyPI), a real Hub mirror, run offline: it serves those repositories to huggingface_hub's download
  client (files, refs, LFS objects). It has no upload endpoints.
- `UploadService`: the part of the Hub's API that huggingface_hub's upload client calls (create repo, validate
  the model card's YAML, preupload, LFS batch and PUT, commit), writing each commit into the same repositories
  with git, so that what the client pushed is pulled back through olah.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

# Fixed identity and no user or system git config, so commits are the same on every machine.
GIT_ENV = {"GIT_AUTHOR_NAME": "ldm tests", "GIT_AUTHOR_EMAIL": "tests@example.com", "GIT_COMMITTER_NAME": "ldm tests",
           "GIT_COMMITTER_EMAIL": "tests@example.com", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
LFS_PATTERNS = ("*.safetensors",)  # what the service stores through LFS, as the Hub's default .gitattributes does


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the git repositories


def repo_folder(mirrors: str, repo_id: str) -> str:
    return os.path.join(mirrors, "models", *repo_id.split("/"))


def git(folder: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True).stdout.strip()


def create_repository(mirrors: str, repo_id: str) -> str:
    """A repository with one commit on main holding .gitattributes, as the Hub creates them."""
    folder = repo_folder(mirrors, repo_id)
    os.makedirs(folder)
    git(folder, "init", "--quiet", "--initial-branch", "main")
    attributes = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
    return commit(folder, {".gitattributes": attributes.encode()}, "initial commit")


def commit(folder: str, files: dict[str, bytes], message: str) -> str:
    """Write `files` (path → content) into the work tree and commit them; returns the commit id."""
    for path, content in files.items():
        target = os.path.join(folder, *path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as file:
            file.write(content)
    git(folder, "add", "--all")
    git(folder, "commit", "--quiet", "--message", message)
    return git(folder, "rev-parse", "HEAD")


def publish_folder(mirrors: str, repo_id: str, source: str, tag: str | None = None) -> str:
    """Commit every file of `source`, as plain git blobs, to the main branch of a repository (created if
    needed), and tag that commit when `tag` is given."""
    if not os.path.isdir(repo_folder(mirrors, repo_id)):
        create_repository(mirrors, repo_id)
    files = {}
    for root, _, names in os.walk(source):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, source).replace(os.sep, "/")] = file.read()
    sha = commit(repo_folder(mirrors, repo_id), files, f"add {os.path.basename(source)}")
    if tag:
        git(repo_folder(mirrors, repo_id), "tag", tag)
    return sha


def lfs_object(folder: str, oid: str) -> str:
    """Where git-lfs keeps an object, and where olah reads it from."""
    return os.path.join(folder, ".git", "lfs", "objects", oid[:2], oid[2:4], oid)


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


# ---------------------------------------------------------------- olah


class Olah:
    """olah serving `mirrors` offline on a free port; `stop()` ends it by its PID."""

    def __init__(self, mirrors: str, workdir: str):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = os.path.join(workdir, "olah.toml")
        with open(config, "w") as file:
            file.write(f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{workdir}/cache"\n'
                       f'mirrors-path = ["{mirrors}"]\n\n[accessibility]\noffline = true\n')
        self.log = open(os.path.join(workdir, "olah.log"), "w+")
        olah = os.path.join(os.path.dirname(sys.executable), "olah-cli")
        self.process = subprocess.Popen([olah, "--config", config, "--log-path", os.path.join(workdir, "logs")],
                                        cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_until_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"olah exited with code {self.process.returncode}:\n{self.log.read()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/api/models/no/such-repo/refs", timeout=1)
            except urllib.error.HTTPError:  # any answer means it serves; this one is a 404
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"olah did not answer on {self.endpoint} within {timeout} s")

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


# ---------------------------------------------------------------- the upload service


class UploadService(ThreadingHTTPServer):
    """The upload half of the Hub's API for model repositories, over the git repositories in `mirrors`.

    It accepts requests bearing `token` only, and puts a bare repository name under `user`, as the
    Hub puts it under the token's owner. Files matching LFS_PATTERNS go through LFS (batch, then PUT
    of the bytes, then a pointer in the commit), the others into the commit itself: the server decides,
    through its preupload answer, as the Hub does. Run it with `start()` in a thread of the test process.
    """

    daemon_threads = True

    def __init__(self, mirrors: str, token: str, user: str = "tester"):
        super().__init__(("127.0.0.1", 0), UploadHandler)
        self.mirrors, self.token, self.user = mirrors, token, user
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()  # one commit at a time, as git's index allows

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class UploadHandler(BaseHTTPRequestHandler):
    server: UploadService
    # (method, path, handler, whether the request must carry the token). The LFS upload URL goes without
    # it, as the Hub's pre-signed storage URLs do: the client sends no credentials there.
    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo", True),
        ("POST", r"/api/validate-yaml", "validate_yaml", True),
        ("POST", r"/api/models/(?P<repo_id>[^/]+/[^/]+)/preupload/(?P<revision>[^/]+)", "preupload", True),
        ("POST", r"/(?P<repo_id>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch", True),
        ("PUT", r"/lfs-upload/(?P<repo_id>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})", "lfs_upload", False),
        ("POST", r"/api/models/(?P<repo_id>[^/]+/[^/]+)/commit/(?P<revision>[^/]+)", "commit", True),
    ]

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def log_message(self, format, *args):  # quiet: pytest shows failures, not every request
        pass

    def route(self, method: str) -> None:
        path = self.path.split("?")[0]
        for route_method, pattern, name, needs_token in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if not match or route_method != method:
                continue
            if needs_token and self.headers.get("authorization") != f"Bearer {self.server.token}":
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            arguments = match.groupdict()
            if "repo_id" in arguments and not os.path.isdir(repo_folder(self.server.mirrors, arguments["repo_id"])):
                return self.reply(404, {"error": "Repository not found"}, "RepoNotFound")
            if arguments.pop("revision", "main") != "main":
                return self.reply(404, {"error": "Invalid rev id"}, "RevisionNotFound")
            return getattr(self, name)(**arguments)
        self.reply(404, {"error": f"no route for {method} {path}"})

    def body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("content-length", 0)))

    def reply(self, status: int, payload: dict | None = None, error_code: str | None = None) -> None:
        data = json.dumps(payload or {}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if error_code:
            self.send_header("x-error-code", error_code)
        self.end_headers()
        self.wfile.write(data)

    # -------------------------------------------------------- endpoints

    def create_repo(self) -> None:
        request = json.loads(self.body())
        repo_id = f"{request.get('organization') or self.server.user}/{request['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        with self.server.lock:
            if os.path.isdir(repo_folder(self.server.mirrors, repo_id)):
                return self.reply(409, {"error": "You already created this model repo", "url": url})
            create_repository(self.server.mirrors, repo_id)
        self.reply(200, {"url": url})

    def validate_yaml(self) -> None:
        content = json.loads(self.body())["content"]
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return self.reply(400, {"errors": [{"message": str(error)}]})
        if not isinstance(metadata, dict):
            return self.reply(400, {"errors": [{"message": "the metadata must be a mapping"}]})
        self.reply(200, {"errors": [], "warnings": []})

    def preupload(self, repo_id: str) -> None:
        files = json.loads(self.body())["files"]
        self.reply(200, {"files": [{"path": file["path"], "uploadMode": upload_mode(file["path"]),
                                    "shouldIgnore": False, "oid": None} for file in files]})

    def lfs_batch(self, repo_id: str) -> None:
        folder, objects = repo_folder(self.server.mirrors, repo_id), []
        for item in json.loads(self.body())["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if not os.path.isfile(lfs_object(folder, item["oid"])):  # a stored object needs no upload
                answer["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{repo_id}/{item['oid']}"}}
            objects.append(answer)
        self.reply(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, repo_id: str, oid: str) -> None:
        content = self.body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self.reply(400, {"error": "the content does not match its oid"})
        target = lfs_object(repo_folder(self.server.mirrors, repo_id), oid)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target + ".incomplete", "wb") as file:
            file.write(content)
        os.replace(target + ".incomplete", target)
        self.reply(200)

    def commit(self, repo_id: str) -> None:
        """The NDJSON commit: a header line, then one line per file, its content inline or an LFS pointer."""
        folder = repo_folder(self.server.mirrors, repo_id)
        header, *operations = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        files = {}
        for operation in operations:
            value = operation["value"]
            if operation["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif operation["key"] == "lfsFile" and os.path.isfile(lfs_object(folder, value["oid"])):
                files[value["path"]] = lfs_pointer(value["oid"], value["size"])
            else:
                return self.reply(422, {"error": f"cannot apply {operation['key']} {value['path']}: deletions and "
                                                 "copies are not supported here, LFS files must be uploaded first"})
        summary = header["value"]["summary"]
        with self.server.lock:
            sha = commit(folder, files, summary)
        url = f"{self.server.endpoint}/{repo_id}/commit/{sha}"
        self.reply(200, {"success": True, "commitOid": sha, "commitUrl": url})


def upload_mode(path: str) -> str:
    return "lfs" if any(fnmatch.fnmatch(os.path.basename(path), pattern) for pattern in LFS_PATTERNS) else "regular"
