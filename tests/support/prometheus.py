"""A real Prometheus server for tests: the Debian/upstream binary on 127.0.0.1, a fresh
config and storage folder, scraping the targets a test names (`make prometheus`
installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.services import free_port, stop_process
from tests.support.wait import wait_for

__all__ = ["PromQLError", "Prometheus", "free_port"]


class PromQLError(AssertionError):
    """Prometheus rejected a query; the message has its error."""


class Prometheus:
    """One Prometheus process; ``query`` evaluates PromQL through the HTTP API."""

    def __init__(
        self,
        workdir: Path,
        targets: dict[str, list[str]],
        rule_files: list[Path] | None = None,
        interval: str = "1s",
    ):
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.fail("prometheus is missing: run `make prometheus`")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": [str(p) for p in rule_files or []],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": addrs}]}
                for job, addrs in targets.items()
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            self._ready, timeout=60, what="Prometheus answering /-/ready", detail=self.log_tail
        )

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        data = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(url, data=data, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
            raise PromQLError(f"{path} {params}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` (at unix time ``at``, default now)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        data = self.api("query", **params)
        result = data["result"]
        return result if data["resultType"] == "vector" else [{"value": result}]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
