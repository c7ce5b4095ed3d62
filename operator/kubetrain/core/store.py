"""One object-store interface over ``s3://`` (boto3) and ``file://``: the trainer writes
checkpoints and progress through it, the operator and the local runner read progress
and pointers through it. Same code path for both schemes, so what is tested on
``file://`` holds on S3. What the objects hold, typed, is :mod:`kubetrain.core.records`;
where they are, :mod:`kubetrain.core.layout`.

Writes of one object are atomic in both back ends (S3 PUTs are; files are written to a
temporary name and renamed), which is what the checkpoint protocol builds on.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_REGION = "us-east-1"
# A trainer's checkpoint upload may wait out a slow or briefly unavailable store; the
# operator passes shorter limits (it must not hold a reconcile for minutes).
S3_RETRIES = 5
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 60.0


class StoreError(RuntimeError):
    """The store could not be reached or refused the request (message says which)."""


class ObjectStore(ABC):
    """Keys are '/'-separated paths relative to the store's root URI."""

    root: str

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Raise FileNotFoundError when the key does not exist."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> None: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (recursive), relative to the root."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    def get_text(self, key: str) -> str | None:
        """The object as text, or None when it does not exist."""
        try:
            return self.get_bytes(key).decode()
        except FileNotFoundError:
            return None

    def child(self, sub: str) -> ObjectStore:
        """A store rooted at ``<root>/<sub>``."""
        return open_store(f"{self.root.rstrip('/')}/{sub.strip('/')}")

    def uri(self, key: str = "") -> str:
        return f"{self.root.rstrip('/')}/{key}" if key else self.root


class FileStore(ObjectStore):
    def __init__(self, root: str):
        self.root = root
        self.base = Path(urlparse(root).path if root.startswith("file://") else root)

    def _p(self, key: str) -> Path:
        return self.base / key if key else self.base

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._p(key)
        if not src.exists():
            raise FileNotFoundError(self.uri(key))
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self._p(prefix)
        if not base.exists():
            return
        if base.is_file():
            yield prefix
            return
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                yield str(p.relative_to(self.base)).replace(os.sep, "/")

    def delete_prefix(self, prefix: str) -> None:
        path = self._p(prefix)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class S3Store(ObjectStore):
    """boto3 client; multipart transfers through TransferConfig for large files.

    Everything it needs comes through the constructor (it reads no environment
    variables): ``endpoint`` None means AWS; without ``access_key_id`` and
    ``secret_access_key`` boto3 finds credentials itself (environment, IRSA, instance
    profile). ``retries``: how often a failed request is retried (boto3's standard
    mode, which backs off between attempts).
    """

    def __init__(
        self,
        root: str,
        *,
        endpoint: str | None,
        region: str,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        retries: int = S3_RETRIES,
        connect_timeout: float = S3_CONNECT_TIMEOUT,
        read_timeout: float = S3_READ_TIMEOUT,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError(
                "S3 credentials need both an access key id and a secret access key "
                f"(got only the {'access key id' if access_key_id else 'secret access key'})"
            )
        parsed = urlparse(root)
        self.root = root
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=Config(
                retries={"max_attempts": retries, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
            ),
        )
        # Parts of 16 MiB uploaded 10 at a time keep the link busy for checkpoint-sized
        # files (s3transfer enlarges parts itself where a file would need more than
        # S3's 10,000).
        self.transfer = TransferConfig(
            multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=10
        )

    def child(self, sub: str) -> ObjectStore:
        """A store rooted at ``<root>/<sub>``, with this store's client (so the same
        endpoint, credentials, retries and timeouts)."""
        out = copy.copy(self)
        out.root = f"{self.root.rstrip('/')}/{sub.strip('/')}"
        out.prefix = urlparse(out.root).path.strip("/")
        return out

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _wrap(self, exc: Exception, key: str) -> Exception:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(self.uri(key))
            if code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket!r} does not exist (create it, or fix storage.s3.bucket)"
                )
            return StoreError(f"S3 refused {self.uri(key)}: {code}")
        if isinstance(exc, EndpointConnectionError):
            return StoreError(
                f"cannot reach the S3 endpoint {self.endpoint or 'AWS'} "
                "(check storage.s3.endpoint and the network)"
            )
        if isinstance(exc, NoCredentialsError):
            return StoreError(
                "no S3 credentials found (set storage.s3.credentialsSecret, or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment)"
            )
        if isinstance(exc, BotoCoreError):
            return StoreError(f"S3 request for {self.uri(key)} failed: {exc}")
        return exc

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def get_bytes(self, key: str) -> bytes:
        try:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=self._k(key))[
                "Body"
            ].read()
            return data
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._k(key), Config=self.transfer)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        try:
            self.client.download_file(self.bucket, self._k(key), str(path), Config=self.transfer)
        except Exception as exc:
            raise self._wrap(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except Exception as exc:
            wrapped = self._wrap(exc, key)
            if isinstance(wrapped, FileNotFoundError):
                return False
            raise wrapped from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        full = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except Exception as exc:
            raise self._wrap(exc, prefix) from exc

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._k(k) for k in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
            )


def open_store(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    retries: int = S3_RETRIES,
    connect_timeout: float = S3_CONNECT_TIMEOUT,
    read_timeout: float = S3_READ_TIMEOUT,
) -> ObjectStore:
    """A store for ``s3://bucket/prefix`` or ``file:///path`` (a bare path is a file);
    the keywords configure an S3 store (see S3Store; ``region`` None: us-east-1) and
    are ignored for files."""
    if uri.startswith("s3://"):
        if not urlparse(uri).netloc:
            raise ValueError(f"{uri!r} names no bucket (accepted: s3://<bucket>/<prefix>)")
        return S3Store(
            uri,
            endpoint=endpoint,
            region=region or DEFAULT_REGION,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            retries=retries,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
    if uri.startswith("file://") or "://" not in uri:
        return FileStore(uri)
    raise ValueError(f"unsupported store URI {uri!r} (accepted: s3://... or file://...)")
