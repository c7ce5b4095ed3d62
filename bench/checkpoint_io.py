"""Checkpoint save/load throughput against an S3 endpoint (moto's server on loopback)
versus raw boto3 upload/download of the same bytes, and the time to resume from a
~100 MB checkpoint (download, verify, load into model and optimizer).

Interleaved repetitions; medians and ratios (goal: >= 0.9 of raw boto3) go to
``bench/results/checkpoint_io.json``. Numbers, not pass/fail. moto keeps objects in
memory and is CPU-bound, so absolute MB/s say little about a real S3 or MinIO; the
ratio says what the checkpoint protocol (serialisation, sha256, manifest, pointer)
costs on top of the transfer.

    python bench/checkpoint_io.py [--reps 3] [--dim 256 --layers 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
import torch

from kubetrain.core.api import Hyperparameters, ModelSpec
from kubetrain.core.records import read_manifest
from kubetrain.core.store import open_store
from kubetrain_trainer.checkpoint import Checkpointer
from kubetrain_trainer.model import build_model
from kubetrain_trainer.train import build_optimizer
from tests.support.services import start_s3_server

RESULTS = Path(__file__).parent / "results"
MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = ModelSpec(layers=args.layers, heads=4, dim=args.dim, contextLength=64)
    model = build_model(spec)
    opt = build_optimizer(model, Hyperparameters(), torch.device("cpu"))
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()  # AdamW's moments now exist: the optimizer state is 2x the model
    payload = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "trainer": {"step": 1, "cursor": 0},
    }

    server = start_s3_server()
    try:
        for key, value in server.env().items():
            os.environ[key] = value
        bucket = server.create_bucket("bench")
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name=server.region)
        store = open_store(f"s3://{bucket}/ckpt", endpoint=server.endpoint, region=server.region)
        ckpt = Checkpointer(store, keep=args.reps + 1)  # no pruning inside the timed save
        save_mbs, raw_up_mbs, load_mbs, raw_down_mbs, resume_s = [], [], [], [], []
        size = 0
        for rep in range(args.reps):
            t = time.perf_counter()
            ckpt.save(rep + 1, payload)
            save_s = time.perf_counter() - t
            key = ckpt.folder.checkpoint(rep + 1)
            manifest = read_manifest(store, ckpt.folder.manifest(rep + 1))
            assert manifest is not None
            size = manifest.total_bytes
            save_mbs.append(size / MB / save_s)

            with tempfile.TemporaryDirectory() as tmp:
                files = []
                for name in manifest.files:
                    path = Path(tmp, name)
                    store.get_file(f"{key}/{name}", path)
                    files.append(path)
                # Raw: the same bytes, one upload_file per file, boto3's defaults.
                t = time.perf_counter()
                for path in files:
                    client.upload_file(str(path), bucket, f"raw/{rep}/{path.name}")
                raw_up_mbs.append(size / MB / (time.perf_counter() - t))
                t = time.perf_counter()
                for path in files:
                    client.download_file(bucket, f"raw/{rep}/{path.name}", str(path) + ".raw")
                raw_down_mbs.append(size / MB / (time.perf_counter() - t))

            t = time.perf_counter()
            loaded = ckpt.load_latest()
            load_s = time.perf_counter() - t
            assert loaded is not None and loaded.step == rep + 1
            load_mbs.append(size / MB / load_s)
            t = time.perf_counter()
            model.load_state_dict(loaded.state["model"])
            opt.load_state_dict(loaded.state["optimizer"])
            resume_s.append(load_s + time.perf_counter() - t)
            print(
                f"rep {rep}: save {save_mbs[-1]:.0f} MB/s (raw {raw_up_mbs[-1]:.0f}), "
                f"load {load_mbs[-1]:.0f} MB/s (raw {raw_down_mbs[-1]:.0f}), "
                f"resume {resume_s[-1]:.2f} s",
                file=sys.stderr,
            )
    finally:
        server.stop()

    med = statistics.median
    result = {
        "bench": "checkpoint_io",
        "checkpointBytes": size,
        "parameters": model.num_parameters(),
        "store": "s3 (moto server, loopback)",
        "saveMBps": save_mbs,
        "rawUploadMBps": raw_up_mbs,
        "loadMBps": load_mbs,
        "rawDownloadMBps": raw_down_mbs,
        "resumeSeconds": resume_s,
        "saveRatio": med(save_mbs) / med(raw_up_mbs),
        "loadRatio": med(load_mbs) / med(raw_down_mbs),
        "resumeSecondsMedian": med(resume_s),
        "goalRatio": 0.9,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint_io.json").write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("checkpointBytes", "saveRatio", "loadRatio", "resumeSecondsMedian")
            }
        )
    )


if __name__ == "__main__":
    main()
