# kubetrain's two images, built from the repository root (`make images` builds both, tags
# them as the Helm chart's defaults and prints their sizes):
#
#   --target operator   `kubetrain operator`, the operator the chart's Deployment runs
#   --target trainer    `python -m kubetrain_trainer`, one stage of a TrainingRun per pod
#                       (it runs torchrun as its child for several processes per pod)
#
# Both run Debian 12's Python 3.11 on the same pinned base. A build stage installs their
# third-party packages from wheels only (no compiler anywhere), at the versions the tests
# ran with (requirements/constraints.txt), into /opt/venv; the final stages copy that venv
# and carry neither pip, a compiler nor a cache.
#
# The trainer installs only what it needs: the `trainer` extra's packages, and
# kubetrain.core and kubetrain_trainer copied to /opt/kubetrain, on the venv's path. The
# operator, local runner and CLI code is not in it.

# A dated Debian tag (debuerreotype's build of the snapshot of that day); `make images`
# builds an equivalent base with mmdebstrap where no registry can be reached.
ARG BASE=docker.io/library/debian:bookworm-20250520-slim

# ---------------------------------------------------------------- runtime: both images
FROM ${BASE} AS runtime
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
        /var/log/apt /var/log/dpkg.log /var/log/alternatives.log
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp

# ---------------------------------------------------------------- builder: pip, an empty venv
FROM runtime AS builder
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/ requirements/
# The build's pip lives in its own venv so that /opt/venv holds only what runs. A host
# whose network intercepts TLS passes its CA bundle as the build secret `pip-ca` (never
# stored in a layer). images/pip-install.sh keeps downloaded wheels (torch with CUDA is
# ~3 GB) in a cache mount between builds.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/tools \
    && /opt/tools/bin/pip install --disable-pip-version-check --quiet \
        -r requirements/image-build.txt \
    && python3 -m venv --without-pip /opt/venv
COPY images/pip-install.sh images/
# Bytecode checked against a hash of the source, not its mtime, so that it stays valid
# whatever time the image's files carry and a container (read-only in the chart) never
# compiles at start-up: pip writes such bytecode when SOURCE_DATE_EPOCH is set (its
# value, ZIP's epoch, is for wheel builds only; the images' timestamps are the build's).
ENV SOURCE_DATE_EPOCH=315532800

# ---------------------------------------------------------------- requirements of each image
# The extras' requirements, from pyproject.toml, in a stage of their own: the installs
# below depend on these lists only, so that editing anything else in pyproject.toml (or
# the README it names) does not reinstall ~4 GB of packages.
FROM runtime AS requirements
COPY pyproject.toml images/requirements.py /src/
RUN mkdir /extras \
    && for extra in operator trainer; do \
        python3 /src/requirements.py /src/pyproject.toml "$extra" > "/extras/$extra.txt"; \
    done

# ---------------------------------------------------------------- trainer: build stages
FROM builder AS trainer-build
COPY --from=requirements /extras/trainer.txt extras/
# The trainer's code is not in /opt/venv but in /opt/kubetrain, on the venv's path by a
# .pth file: a layer of its own, so that a code change rebuilds and ships kilobytes, not
# the ~4 GB of packages.
RUN --mount=type=secret,id=pip-ca --mount=type=cache,target=/var/cache/kubetrain-wheels \
    images/pip-install.sh trainer \
    && echo /opt/kubetrain > "$(/opt/venv/bin/python -c \
        'import sysconfig; print(sysconfig.get_path("purelib"))')/kubetrain.pth"

FROM runtime AS trainer-code
# kubetrain.core (the contract with the operator) and the trainer, nothing else of kubetrain.
COPY operator/kubetrain/__init__.py operator/kubetrain/py.typed /opt/kubetrain/kubetrain/
COPY operator/kubetrain/core/ /opt/kubetrain/kubetrain/core/
COPY trainer_image/kubetrain_trainer/ /opt/kubetrain/kubetrain_trainer/
COPY LICENSE /opt/kubetrain/
RUN python3 -m compileall -q --invalidation-mode checked-hash /opt/kubetrain

# ---------------------------------------------------------------- operator: build stage
FROM builder AS operator-build
COPY --from=requirements /extras/operator.txt extras/
RUN --mount=type=secret,id=pip-ca --mount=type=cache,target=/var/cache/kubetrain-wheels \
    images/pip-install.sh operator
COPY pyproject.toml README.md LICENSE ./
COPY operator/kubetrain/ operator/kubetrain/
COPY trainer_image/kubetrain_trainer/ trainer_image/kubetrain_trainer/
# The distribution itself (the `kubetrain` command), built with the pinned setuptools.
RUN /opt/tools/bin/pip wheel --disable-pip-version-check --quiet --no-deps \
        --no-build-isolation --wheel-dir /tmp/wheels . \
    && /opt/tools/bin/pip --python /opt/venv/bin/python install --disable-pip-version-check \
        --quiet --no-deps --no-index /tmp/wheels/kubetrain-*.whl

# ---------------------------------------------------------------- operator image
FROM runtime AS operator
RUN groupadd --gid 10001 kubetrain \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin kubetrain
COPY --from=operator-build /opt/venv /opt/venv
# Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
USER 10001:10001
# The chart mounts the root filesystem read-only and an emptyDir at /tmp.
EXPOSE 8080 8081
ENTRYPOINT ["kubetrain", "operator", "--config", "/etc/kubetrain/config.yaml"]
# Version, revision, creation time and base come from `make images` (--label): a label
# built from an ARG would be taken from the build cache with a stale value.
LABEL org.opencontainers.image.title="kubetrain-operator" \
      org.opencontainers.image.description="kubetrain's Kubernetes operator: runs TrainingRun curricula as GPU Jobs" \
      org.opencontainers.image.source="https://github.com/kubetrain/kubetrain" \
      org.opencontainers.image.licenses="Apache-2.0"

# ---------------------------------------------------------------- trainer image
FROM runtime AS trainer
# The uid the operator's pods run as (kubetrain.operator.resources.NONROOT_UID); a home
# for the caches PyTorch and Triton write.
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin trainer
COPY --from=trainer-build /opt/venv /opt/venv
COPY --from=trainer-code /opt/kubetrain /opt/kubetrain
USER 1000:1000
WORKDIR /home/trainer
# What the NVIDIA container runtime mounts from the node's driver: CUDA (compute) and
# NVML (utility), which the trainer's energy meter reads. The CUDA libraries themselves
# come with the torch wheel.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Prometheus metrics (kubetrain.core.contract.METRICS_PORT).
EXPOSE 9400
# Exec form, no shell or init in between: the trainer is the container's process 1, gets
# the kubelet's SIGTERM itself and its exit code is the pod's (75 after a checkpoint on
# SIGTERM, also when it runs torchrun as its child: kubetrain_trainer/launch.py).
ENTRYPOINT ["python", "-m", "kubetrain_trainer"]
LABEL org.opencontainers.image.title="kubetrain-trainer" \
      org.opencontainers.image.description="kubetrain's trainer: one stage of a TrainingRun (pretrain, SFT, DPO, GRPO) with PyTorch, CUDA bundled" \
      org.opencontainers.image.source="https://github.com/kubetrain/kubetrain" \
      org.opencontainers.image.licenses="Apache-2.0"
