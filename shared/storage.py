"""Object storage through the ``minio`` client, against any S3 endpoint (MinIO, SeaweedFS, AWS).

Blobs are content-addressed: a file is stored once under ``cas/sha256/<hex>`` whatever job made it,
so re-uploading a dataset or an identical checkpoint costs a ``stat``, not a transfer. Lineage (which
job made an object, from which inputs) lives in the ``artifacts`` table, not in object keys.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.error import S3Error

from shared.config import Settings, get_settings

CAS_PREFIX = "cas/sha256/"
PART_SIZE = 16 * 1024 * 1024  # multipart above this size
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    sha256: str
    size: int

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def http_client(settings: Settings) -> urllib3.PoolManager:
    """minio's default client waits 5 minutes per socket operation and retries 5 times: a frozen S3 server would
    hang a request for half an hour. Bounded connect/read timeouts and two quick retries make it an error
    (503 at the API) within seconds; a read timeout bounds one socket read, so large transfers still work."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.S3_CONNECT_TIMEOUT_SECONDS, read=settings.S3_READ_TIMEOUT_SECONDS),
        maxsize=10, cert_reqs="CERT_REQUIRED" if settings.S3_SECURE else "CERT_NONE",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=2, connect=1, read=0, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )


class ObjectStore:
    """Thin, typed wrapper over one bucket of an S3 endpoint."""

    def __init__(self, settings: Settings | None = None) -> None:
        s = settings or get_settings()
        self.bucket = s.S3_BUCKET
        self._region = s.S3_REGION
        self.client = Minio(
            s.S3_ENDPOINT, access_key=s.S3_ACCESS_KEY, secret_key=s.S3_SECRET_KEY.get_secret_value(),
            secure=s.S3_SECURE, region=s.S3_REGION, http_client=http_client(s),
        )
        # Presigned URLs must name the host clients reach, which can differ from the in-cluster one.
        self._presigner = self.client
        if s.S3_PUBLIC_ENDPOINT and s.S3_PUBLIC_ENDPOINT != s.S3_ENDPOINT:
            self._presigner = Minio(
                s.S3_PUBLIC_ENDPOINT, access_key=s.S3_ACCESS_KEY,
                secret_key=s.S3_SECRET_KEY.get_secret_value(), secure=s.S3_SECURE, region=s.S3_REGION,
            )

    # --- buckets -----------------------------------------------------------------------------
    def ensure_bucket(self, bucket: str | None = None) -> None:
        b = bucket or self.bucket
        if not self.client.bucket_exists(b):
            try:
                self.client.make_bucket(b)
            except S3Error as e:  # another process made it first
                if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def ping(self) -> None:
        """Raise if the endpoint cannot be reached or the bucket is missing."""
        if not self.client.bucket_exists(self.bucket):
            raise RuntimeError(f"bucket {self.bucket!r} does not exist on the object store")

    # --- content-addressed blobs -------------------------------------------------------------
    def put_file(self, path: Path, *, sha256: str | None = None, content_type: str = "application/octet-stream",
                 ) -> StoredObject:
        """Store a file under its sha256 (no upload when the same content is already there)."""
        digest = sha256 or sha256_file(path)
        size = path.stat().st_size
        key = CAS_PREFIX + digest
        if not self.exists(key):
            self.client.fput_object(self.bucket, key, str(path), content_type=content_type, part_size=PART_SIZE)
        return StoredObject(self.bucket, key, digest, size)

    def put_stream(self, stream: BinaryIO, size: int, *, sha256: str,
                   content_type: str = "application/octet-stream") -> StoredObject:
        key = CAS_PREFIX + sha256
        if not self.exists(key):
            self.client.put_object(self.bucket, key, stream, size, content_type=content_type, part_size=PART_SIZE)
        return StoredObject(self.bucket, key, sha256, size)

    def get_file(self, key: str, dest: Path, *, bucket: str | None = None, sha256: str | None = None) -> Path:
        """Download to ``dest`` atomically (a partial download never appears under the final name)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        os.close(fd)
        try:
            self.client.fget_object(bucket or self.bucket, key, tmp)
            if sha256 is not None and sha256_file(Path(tmp)) != sha256:
                raise OSError(f"object {key} does not match its sha256 {sha256}: corrupted in transit or at rest")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def exists(self, key: str, *, bucket: str | None = None) -> bool:
        try:
            self.client.stat_object(bucket or self.bucket, key)
            return True
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"):
                return False
            raise

    def remove(self, key: str, *, bucket: str | None = None) -> None:
        self.client.remove_object(bucket or self.bucket, key)

    def list_keys(self, prefix: str, *, bucket: str | None = None) -> list[tuple[str, int, str]]:
        """(key, size, etag) of every object under a prefix."""
        return [
            (o.object_name, o.size or 0, (o.etag or "").strip('"'))
            for o in self.client.list_objects(bucket or self.bucket, prefix=prefix, recursive=True)
            if o.object_name and not o.is_dir
        ]

    def presigned_get(self, key: str, *, bucket: str | None = None, expires_s: int = 3600) -> str:
        return self._presigner.presigned_get_object(bucket or self.bucket, key, expires=timedelta(seconds=expires_s))
