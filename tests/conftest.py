"""Shared fixtures: real DICOM peers on loopback (DCMTK tools, DCMTK storescp, Orthanc).

Nothing here is mocked. Peers listen on free ports of 127.0.0.1 and write into pytest's
temporary folders. When a test fails, the log of every peer it used is added to the report.

Fixtures
    unused_tcp_port          an int, a free TCP port on 127.0.0.1
    unused_tcp_port_factory  ``() -> int``, as many free ports as wanted
    dcmtk                    ``Dcmtk``: absolute paths of DCMTK's binaries and an env with
                             TCP_NODELAY=1 (session)
    orthanc                  ``Orthanc``: a shared Orthanc, emptied before each test
    orthanc_factory          ``(aet="ORTHANC", modalities=None, **options) -> Orthanc``:
                             a private Orthanc with its own configuration
    storescp                 ``(aet="STORESCP", *args) -> StoreSCP(aet, port, folder)``:
                             a DCMTK storescp writing every received file into ``folder``
    postgres_url             a SQLAlchemy URL of a PostgreSQL server (session)
    postgres_server          ``PostgresServer``: a private one, with ``stop()`` and ``start()``
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# Every process of the tests (pytest's and the nodes it starts) runs ONNX Runtime without its
# usage telemetry, which would otherwise try to reach an internet host.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

LOCALHOST = "127.0.0.1"
DCMTK_BIN = Path("/usr/bin")
DCMTK_TOOLS = ("storescu", "storescp", "echoscu", "dcmdump", "dcmsend")
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

_given_ports: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now and was not handed out before."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = sock.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until ``port`` on 127.0.0.1 accepts connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode} before listening "
                        f"on port {port}:\n{_read_log(log)}", pytrace=False)
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    pytest.fail(f"{process.args[0]} did not listen on port {port} within {timeout} s:\n"
                f"{_read_log(log)}", pytrace=False)


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """Terminate ``process``; kill it if it is still there after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _read_log(log: Path, start: int = 0, limit: int = 20_000) -> str:
    try:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log {log} unreadable: {exc})"
    if not text:
        return "(empty)"
    return text if len(text) <= limit else "...\n" + text[-limit:]


# --- peer logs in failure reports -------------------------------------------------------

_PEER_LOGS = pytest.StashKey[list]()


def _attach_log(request: pytest.FixtureRequest, title: str, log: Path) -> None:
    """Show ``log`` (from its current end) in the report if the requesting test fails."""
    start = log.stat().st_size if log.exists() else 0
    request.node.stash.setdefault(_PEER_LOGS, []).append((title, log, start))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.failed:
        for title, log, start in item.stash.get(_PEER_LOGS, []):
            report.sections.append((f"{title} log ({log})", _read_log(log, start)))
    return report


# --- ports ------------------------------------------------------------------------------

@pytest.fixture
def unused_tcp_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def unused_tcp_port_factory() -> Callable[[], int]:
    """A function returning a new free TCP port on 127.0.0.1 at each call."""
    return free_port


# --- DCMTK ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dcmtk:
    """Absolute paths of DCMTK's binaries (not pynetdicom's look-alikes on PATH)."""

    storescu: str
    storescp: str
    echoscu: str
    dcmdump: str
    dcmsend: str
    env: dict[str, str] = field(repr=False)

    def run(self, tool: str, *args: str | os.PathLike, timeout: float = 60.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run DCMTK's ``tool`` with ``env``; with ``check``, fail showing its output."""
        command = [getattr(self, tool), *map(str, args)]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(command)} exited with {done.returncode}:\n"
                        f"{done.stdout}{done.stderr}", pytrace=False)
        return done


@pytest.fixture(scope="session")
def dcmtk() -> Dcmtk:
    """DCMTK's binaries from /usr/bin, and an environment with TCP_NODELAY=1 to run them."""
    missing = [t for t in DCMTK_TOOLS if not os.access(DCMTK_BIN / t, os.X_OK)]
    if missing:
        pytest.fail(f"DCMTK binaries missing in {DCMTK_BIN}: {', '.join(missing)} "
                    "(apt-get install dcmtk; see .ci/run)", pytrace=False)
    env = {**os.environ, "TCP_NODELAY": "1"}
    return Dcmtk(**{t: str(DCMTK_BIN / t) for t in DCMTK_TOOLS}, env=env)


class StoreSCP(NamedTuple):
    """A running DCMTK storescp: its AE title, port on 127.0.0.1 and output folder."""

    aet: str
    port: int
    folder: Path

    def files(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.folder.rglob("*") if p.is_file())


@pytest.fixture
def storescp(dcmtk: Dcmtk, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[Callable[..., StoreSCP]]:
    """Start DCMTK storescp processes: ``storescp(aet="STORESCP", *extra_args)``.

    Each accepts every transfer syntax (+xa), writes into its own folder, runs with
    TCP_NODELAY=1 and is stopped when the test ends.
    """
    processes: list[subprocess.Popen] = []

    def start(aet: str = "STORESCP", *extra_args: str) -> StoreSCP:
        folder = tmp_path_factory.mktemp(f"storescp-{aet}")
        log = folder.parent / f"{folder.name}.log"
        port = free_port()
        command = [dcmtk.storescp, "--verbose", "--aetitle", aet, "+xa", "-od", str(folder),
                   *extra_args, str(port)]
        with log.open("wb") as out:
            process = subprocess.Popen(command, env=dcmtk.env, stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        processes.append(process)
        _attach_log(request, f"storescp {aet}", log)
        wait_for_port(port, process, log, START_TIMEOUT_S)
        return StoreSCP(aet, port, folder)

    yield start
    for process in processes:
        stop_process(process)


# --- Orthanc ----------------------------------------------------------------------------

def _orthanc_binary() -> str:
    for candidate in ORTHANC_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("Orthanc")
    if found is None:
        pytest.fail("Orthanc not found (apt-get install orthanc; see .ci/run)", pytrace=False)
    return found


class Orthanc:
    """A real Orthanc process on 127.0.0.1, driven over its REST API with the stdlib.

    Attributes: ``aet``, ``host``, ``dicom_port``, ``http_port``, ``http_url``, ``log``.
    Paths given to the REST helpers start with a slash: ``orthanc.get("/system")``.
    """

    host = LOCALHOST

    def __init__(self, workdir: Path, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None,
                 **options: Any) -> None:
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.http_url = f"http://{LOCALHOST}:{self.http_port}"
        self.log = workdir / "orthanc.log"
        config = {
            "Name": f"test-{aet}",
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "SaveJobs": False,
            # any calling AE may echo and store; the called AE title is not checked
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
            **options,
        }
        self._configured_modalities = set(config["DicomModalities"])
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        # Deliberately no TCP_NODELAY: the node must cope with an untuned Orthanc.
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [_orthanc_binary(), "--verbose", str(config_path)], env=env, cwd=workdir,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_started()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.process.returncode} at start:\n"
                            f"{_read_log(self.log)}", pytrace=False)
            try:
                self.get("/system")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.02)
        self.stop()
        pytest.fail(f"Orthanc REST API did not answer within {START_TIMEOUT_S} s:\n"
                    f"{_read_log(self.log)}", pytrace=False)

    def stop(self) -> None:
        """Terminate Orthanc (a clean stop takes it ~3.5 s), killing it if it lingers."""
        stop_process(self.process)

    # REST

    def request(self, method: str, path: str, body: Any = None) -> bytes:
        """Send one REST request; a dict or list ``body`` goes as JSON, bytes as they are."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.http_url + path, data=data, method=method)
        try:
            with self._opener.open(req, timeout=30) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise AssertionError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        """GET ``path`` and return its parsed JSON."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: Any = None) -> Any:
        raw = self.request("POST", path, body)
        return json.loads(raw) if raw.strip() else None

    def put(self, path: str, body: Any = None) -> Any:
        raw = self.request("PUT", path, body)
        return json.loads(raw) if raw.strip() else None

    def delete(self, path: str) -> None:
        self.request("DELETE", path)

    # resources

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return self.get("/instances")

    def studies(self) -> list[str]:
        """Orthanc IDs of all stored studies."""
        return self.get("/studies")

    def download(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, byte for byte as Orthanc stored it."""
        return self.request("GET", f"/instances/{urllib.parse.quote(instance_id)}/file")

    def tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (``/instances/{id}/simplified-tags``)."""
        return self.get(f"/instances/{urllib.parse.quote(instance_id)}/simplified-tags")

    def lookup(self, uid: str) -> list[dict[str, str]]:
        """Resources whose DICOM UID (or patient ID, accession number) is ``uid``."""
        return self.post("/tools/lookup", uid.encode())

    def instance_by_sop_uid(self, sop_instance_uid: str) -> str | None:
        """The Orthanc ID of the instance with this SOPInstanceUID, or None."""
        hits = [r["ID"] for r in self.lookup(sop_instance_uid) if r["Type"] == "Instance"]
        return hits[0] if hits else None

    def add_modality(self, name: str, aet: str, port: int, host: str = LOCALHOST) -> None:
        """Declare a DICOM peer (e.g. the node under test) that Orthanc may send to."""
        self.put(f"/modalities/{urllib.parse.quote(name)}",
                 {"AET": aet, "Host": host, "Port": port})

    def store_to(self, modality: str, *resource_ids: str) -> Any:
        """C-STORE resources (patients, studies, series, instances) to a declared modality."""
        return self.post(f"/modalities/{urllib.parse.quote(modality)}/store",
                         {"Resources": list(resource_ids), "Synchronous": True})

    def clear(self) -> None:
        """Delete every stored resource and every modality declared at run time."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")
        for name in set(self.get("/modalities")) - self._configured_modalities:
            self.delete(f"/modalities/{urllib.parse.quote(name)}")

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0,
                 interval: float = 0.05, message: str = "condition") -> Any:
        """Poll ``predicate`` until it returns something truthy, and return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"{message} not met within {timeout} s "
                                     f"(last value: {value!r})")
            time.sleep(interval)


@pytest.fixture(scope="session")
def _orthanc_shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def orthanc(_orthanc_shared: Orthanc, request: pytest.FixtureRequest) -> Orthanc:
    """An Orthanc (AE ORTHANC) shared by the session, empty when the test starts.

    Start-up takes ~50 ms but a clean stop ~3.5 s, hence one process for all tests. Tests
    that need other options use ``orthanc_factory``.
    """
    if _orthanc_shared.process.poll() is not None:
        pytest.fail(f"the shared Orthanc exited with {_orthanc_shared.process.returncode}:\n"
                    f"{_read_log(_orthanc_shared.log)}", pytrace=False)
    _orthanc_shared.clear()
    _attach_log(request, "Orthanc", _orthanc_shared.log)
    return _orthanc_shared


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory,
                    request: pytest.FixtureRequest) -> Iterator[Callable[..., Orthanc]]:
    """Start private Orthancs: ``orthanc_factory(aet="ORTHANC", modalities=None, **options)``.

    ``modalities`` maps a name to ``(aet, host, port)``; ``options`` are Orthanc
    configuration keys (e.g. ``OverwriteInstances=True``). Stopped when the test ends.
    """
    servers: list[Orthanc] = []

    def start(aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
              **options: Any) -> Orthanc:
        server = Orthanc(tmp_path_factory.mktemp(f"orthanc-{aet}"), aet, modalities, **options)
        servers.append(server)
        _attach_log(request, f"Orthanc {aet}", server.log)
        return server

    yield start
    for server in servers:  # stop them in parallel: each takes seconds
        server.process.terminate()
    for server in servers:
        server.stop()


# --- the node's reference model ---------------------------------------------------------

@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with ct-tissue built by its own script (the repository stays clean)."""
    from nodeproc import build_models
    return build_models(tmp_path_factory.mktemp("models"))


# --- PostgreSQL (the queue's second backend) ---------------------------------------------

PG_BIN = Path("/usr/lib/postgresql")


class PostgresServer:
    """A throw-away PostgreSQL server on a free loopback port, which a test may stop and start
    again (a database restart during traffic)."""

    def __init__(self) -> None:
        versions = sorted(PG_BIN.glob("*/bin/initdb"))
        if not versions:
            pytest.fail("PostgreSQL not found (apt-get install postgresql; see .ci/run)", pytrace=False)
        self.bindir = versions[-1].parent
        # Not under pytest's folder: that one is private to root, and the server runs as postgres.
        self.folder = Path(tempfile.mkdtemp(prefix="ainode-postgres-"))
        self.data, self.log = self.folder / "data", self.folder / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:                        # PostgreSQL refuses to run as root
            shutil.chown(self.folder, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        subprocess.run([*self.as_user, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        self.start()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                        "-w", "start", "-o",
                        f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"],
                       check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throw-away PostgreSQL server (shared by the session); yields a SQLAlchemy URL."""
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL server for one test, which it may stop and start."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The node's database on each backend: a SQLite file, then a PostgreSQL server (emptied)."""
    from node.storage.db import Database
    if request.param == "sqlite":
        database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    else:
        database = Database(request.getfixturevalue("postgres_url"))
        database.drop_all()
    database.create()
    database.create()   # idempotent
    yield database
    database.close()
