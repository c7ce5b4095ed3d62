"""What a reconcile reads besides the informers' copies, each read as seldom as
correctness allows:

- ``SecretCache``: a run's credentials Secret, read again after ``ttl`` seconds so that
  rotated credentials take effect; values stay in memory, never in logs or reprs.
- ``StoreCache``: one S3 client per bucket, endpoint, region and credentials (a
  fingerprint of them, not the values), shared by every run that uses them; building a
  boto3 client costs milliseconds and megabytes.
- ``ProgressReader``: a run's progress records, read at most once per poll interval,
  only for a stage that has a Job (or had one at the last read, to see the record its
  pods wrote when they stopped), and at once when that Job's state changes (complete,
  failed, deleted): that is when FINAL decides what happens next. FINAL is asked for
  only when the Job completed, so a running stage costs one request per read. When the
  Secret or the store cannot be read, the records say UNKNOWN, with the reason, and the
  plan decides nothing that depends on them.
- ``ArchitectureReader``: the config.json of a run's Hugging Face ``model.from``, for
  the up-front estimate: read once per (namespace, ``model.from``), with the run's
  Secret and a shared client; a failed read is tried again only after ``retry_after``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from kubetrain.core import api
from kubetrain.core.architecture import read_hf_config_from
from kubetrain.core.contract import ENV_AWS_ACCESS_KEY_ID, ENV_AWS_SECRET_ACCESS_KEY
from kubetrain.core.hf_config import ModelConfig
from kubetrain.core.store import ObjectStore, StoreError, open_store
from kubetrain.operator import plan as planner
from kubetrain.operator.progress import (
    StageRecords,
    StoreAnswer,
    read_stage_records,
    unknown_records,
)

log = logging.getLogger("kubetrain.operator")

Key = tuple[str, str]  # (namespace, name)
StoreFactory = Callable[[api.S3Storage, dict[str, str] | None], ObjectStore]

# A reconcile holds its run while it reads the store: fail fast and let the next poll
# retry, rather than wait out a trainer's patient upload settings.
STORE_RETRIES = 3
STORE_CONNECT_TIMEOUT = 5.0
STORE_READ_TIMEOUT = 20.0
# Polls are jittered by ±10%: records read this much of an interval ago count as stale,
# so that every poll reads.
FRESH_SHARE = 0.8
MAX_CLIENTS = 64
MAX_ARCHITECTURES = 1024


def open_run_store(s3: api.S3Storage, credentials: dict[str, str] | None) -> ObjectStore:
    """The run's store, read with the run's own credentials when it names a Secret
    (held in the boto3 client only, never logged), else the operator's."""
    credentials = credentials or {}
    return open_store(
        s3.uri(),
        endpoint=s3.endpoint,
        region=s3.region,
        access_key_id=credentials.get(ENV_AWS_ACCESS_KEY_ID) or None,
        secret_access_key=credentials.get(ENV_AWS_SECRET_ACCESS_KEY) or None,
        retries=STORE_RETRIES,
        connect_timeout=STORE_CONNECT_TIMEOUT,
        read_timeout=STORE_READ_TIMEOUT,
    )


class SecretCache:
    """Secrets by (namespace, name), kept ``ttl`` seconds; errors are not kept (the
    next reconcile asks again)."""

    def __init__(
        self,
        read: Callable[[str, str], dict[str, str]],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._read = read
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Key, tuple[float, dict[str, str]]] = {}

    def get(self, namespace: str, name: str) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            hit = self._entries.get((namespace, name))
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        data = self._read(namespace, name)
        with self._lock:
            # Expired entries go, so Secrets of deleted runs are not kept for ever.
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl}
            self._entries[(namespace, name)] = (now, data)
        return data

    def __repr__(self) -> str:
        return f"SecretCache(entries={len(self._entries)}, ttl={self.ttl:g}s)"


def fingerprint(credentials: dict[str, str] | None) -> str:
    """Tells credentials apart without keeping them: a hash of the key pair ("" for
    the operator's own, ambient credentials)."""
    if not credentials:
        return ""
    pair = f"{credentials.get(ENV_AWS_ACCESS_KEY_ID, '')}\0"
    pair += credentials.get(ENV_AWS_SECRET_ACCESS_KEY, "")
    return hashlib.sha256(pair.encode()).hexdigest()


class StoreCache:
    """Stores rooted at each run's ``storage.s3.uri()``, sharing one client per
    (bucket, endpoint, region, credentials); the least recently used of more than
    ``max_clients`` are dropped (rotated credentials leave old ones behind)."""

    def __init__(self, factory: StoreFactory = open_run_store, max_clients: int = MAX_CLIENTS):
        self._factory = factory
        self._max = max_clients
        self._lock = threading.Lock()
        self._clients: OrderedDict[tuple[str, str, str, str], ObjectStore] = OrderedDict()

    def get(self, s3: api.S3Storage, credentials: dict[str, str] | None) -> ObjectStore:
        key = (s3.bucket, s3.endpoint or "", s3.region, fingerprint(credentials))
        # Built under the lock: boto3 creates clients from a session that is not
        # thread-safe.
        with self._lock:
            base = self._clients.get(key)
            if base is None:
                base = self._factory(s3.model_copy(update={"prefix": ""}), credentials)
                self._clients[key] = base
                while len(self._clients) > self._max:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(key)
        prefix = s3.prefix.strip("/")
        return base.child(prefix) if prefix else base

    def __len__(self) -> int:
        with self._lock:
            return len(self._clients)


def job_states(
    jobs: list[dict[str, Any]], run_uid: str = ""
) -> dict[str, tuple[str, bool, bool, bool]]:
    """Per stage, what about the run's own Job makes records worth reading again: which
    Job, whether it completed, failed, is being deleted (Jobs that are not the run's,
    ``plan.owned_by``, are not looked at)."""
    out = {}
    owned = [j for j in jobs if planner.owned_by(j, run_uid)]
    for job in map(planner.ObservedJob.from_k8s, owned):
        out[job.stage] = (job.uid, job.complete, job.failed_condition, job.deleting)
    return out


@dataclass(frozen=True)
class _Read:
    at: float
    stages: list[str]
    jobs: dict[str, tuple[str, bool, bool, bool]]
    records: dict[str, StageRecords]


class ProgressReader:
    """The records a run's plan needs (``plan.records_to_read``), from the store or,
    when nothing relevant changed since a recent read, from that read."""

    def __init__(
        self,
        secrets: SecretCache,
        stores: StoreCache,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        on_requests: Callable[[int], None] | None = None,
        endpoint_allowed: Callable[[str | None], bool] = lambda _: True,
    ):
        self.secrets = secrets
        self.stores = stores
        self.interval = interval
        # The operator connects only to endpoints its configuration allows: a run
        # naming another is refused by the plan, and never read from.
        self.endpoint_allowed = endpoint_allowed
        self._clock = clock
        self._on_requests = on_requests
        self._lock = threading.Lock()
        self._last: dict[Key, _Read] = {}

    def forget(self, key: Key) -> None:
        with self._lock:
            self._last.pop(key, None)

    def read(self, run: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, StageRecords]:
        """The records for ``run``. Never raises for the Secret or the store: a stage
        whose records cannot be read is UNKNOWN, with the reason (the run still
        reconciles; nothing that depends on the store is decided)."""
        meta = run["metadata"]
        key = (meta["namespace"], meta["name"])
        wanted = planner.records_to_read(run, jobs)
        with self._lock:
            last = self._last.get(key)
        owned = job_states(jobs, str(meta.get("uid") or ""))
        states = {s: v for s, v in owned.items() if s in wanted.stages}
        had = last.jobs if last is not None else {}
        stages = [s for s in wanted.stages if s in states or s in had]
        if wanted.s3 is None or not stages or not self.endpoint_allowed(wanted.s3.endpoint):
            self.forget(key)
            return {}
        now = self._clock()
        if (
            last is not None
            and last.stages == stages
            and last.jobs == states
            and now - last.at < self.interval * FRESH_SHARE
        ):
            return last.records
        # A store that fails is not asked again before the next poll (unless a Job
        # changes): its UNKNOWN answer is remembered like any other.
        records = self._read(wanted.s3, meta["namespace"], meta["name"], stages, states)
        with self._lock:
            self._last[key] = _Read(now, stages, states, records)
        return records

    def _read(
        self,
        s3: api.S3Storage,
        namespace: str,
        name: str,
        stages: list[str],
        states: dict[str, tuple[str, bool, bool, bool]],
    ) -> dict[str, StageRecords]:
        credentials = None
        if s3.credentials_secret:
            try:
                credentials = self.secrets.get(namespace, s3.credentials_secret)
            except Exception as exc:  # missing, forbidden, unreachable
                # Only the status or the type: an API error's text is not worth the risk
                # near credentials.
                status = getattr(exc, "status", None)
                why = f"HTTP {status} {getattr(exc, 'reason', '') or ''}" if status else ""
                why = why.strip() or type(exc).__name__
                log.warning(
                    "%s/%s: cannot read Secret %s: %s", namespace, name, s3.credentials_secret, why
                )
                return unknown_records(
                    stages, f"cannot read Secret {s3.credentials_secret} ({why})"
                )
        try:
            store = self.stores.get(s3, credentials)
        except (StoreError, OSError, ValueError) as exc:
            log.warning("%s/%s: cannot open the store: %s", namespace, name, exc)
            return unknown_records(stages, str(exc) or type(exc).__name__)
        complete: Collection[str] = {s for s, state in states.items() if state[1]}
        if self._on_requests is not None:
            self._on_requests(len(stages) + len(set(stages) & set(complete)))
        records = read_stage_records(store, namespace, name, stages, final_for=complete)
        for stage, rec in records.items():
            if rec.final == StoreAnswer.UNKNOWN:
                log.warning(
                    "%s/%s: cannot read stage %s from the store: %s",
                    namespace,
                    name,
                    stage,
                    rec.error,
                )
        return records


class ArchitectureReader:
    """The config.json of the Hugging Face model a run starts from (``model.from`` of
    the spec ``plan.choose_spec`` picks), reached with the run's S3 endpoint and
    Secret, as its trainers reach it.

    A run's model does not change once it started, so what a (namespace, ``model.from``)
    holds is read once (the least recently used of more than ``max_entries`` are
    dropped). A read that failed is not tried again for ``retry_after`` seconds, so an
    unreachable store costs a reconcile its timeouts once per interval, not every time.
    Only ``s3://`` is read: a ``file://`` path is on the trainers' volumes, not the
    operator's."""

    def __init__(
        self,
        secrets: SecretCache,
        stores: StoreCache,
        retry_after: float,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_ARCHITECTURES,
        endpoint_allowed: Callable[[str | None], bool] = lambda _: True,
    ):
        self.secrets = secrets
        self.stores = stores
        self.endpoint_allowed = endpoint_allowed
        self.retry_after = retry_after
        self._clock = clock
        self._max = max_entries
        self._lock = threading.Lock()
        self._known: OrderedDict[Key, ModelConfig | None] = OrderedDict()
        self._failed: dict[Key, float] = {}  # monotonic time of the last failed read

    def read(self, run: dict[str, Any], jobs: list[dict[str, Any]]) -> ModelConfig | None:
        """The run's Hugging Face config; None when it starts from no model, from a
        kubetrain checkpoint, from a ``file://`` path, or while a failed read waits for
        its retry. Raises what reading the Secret or the store raises (the caller logs
        it; the run's estimate stays the manifest's until a read succeeds)."""
        stages = {planner.ObservedJob.from_k8s(j).stage for j in jobs}
        spec = planner.choose_spec(run, stages).spec
        if spec is None or spec.model.from_ is None or spec.storage.s3 is None:
            return None
        if not self.endpoint_allowed(spec.storage.s3.endpoint):
            return None
        uri = spec.model.from_
        if not uri.startswith("s3://"):
            return None
        key = (run["metadata"]["namespace"], uri)
        now = self._clock()
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
            if now - self._failed.get(key, -self.retry_after) < self.retry_after:
                return None
            # Marked before reading, so that other workers do not read it meanwhile;
            # marks past their interval go, so models of deleted runs are not kept.
            self._failed = {k: t for k, t in self._failed.items() if now - t < self.retry_after}
            self._failed[key] = now
        found = self._read(key[0], uri, spec.storage.s3)
        with self._lock:
            self._failed.pop(key, None)
            self._known[key] = found
            while len(self._known) > self._max:
                self._known.popitem(last=False)
        return found

    def _read(self, namespace: str, uri: str, s3: api.S3Storage) -> ModelConfig | None:
        credentials = None
        if s3.credentials_secret:
            credentials = self.secrets.get(namespace, s3.credentials_secret)
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        where = s3.model_copy(update={"bucket": bucket, "prefix": prefix.strip("/")})
        return read_hf_config_from(self.stores.get(where, credentials))
