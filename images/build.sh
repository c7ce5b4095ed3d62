#!/usr/bin/env bash
# images/build.sh [--names | --push]: build kubetrain's two images (`make images`).
#
#   $REGISTRY/operator:$TAG and $REGISTRY/trainer:$TAG, the Helm chart's defaults unless
#   REGISTRY (default ghcr.io/kubetrain) or TAG (default: the version in pyproject.toml)
#   say otherwise; both targets of the one Dockerfile, OCI format; then a size report.
#
#   --names   print the two image names and exit
#   --push    push the two images (after `make images`, with the same REGISTRY and TAG)
#
# The base is BASE_IMAGE if set, else the Dockerfile's dated Debian tag when it is
# present or can be pulled, else a Debian 12 minbase built here with mmdebstrap from
# DEBIAN_MIRROR (default http://deb.debian.org/debian) and imported as
# localhost/kubetrain/debian:bookworm-slim: a registry is not needed, Debian's mirror is.
#
# Reproducible: pip installs pinned versions (requirements/constraints.txt) from wheels,
# and every timestamp (files, image config, the `created` label, the mmdebstrap base)
# is SOURCE_DATE_EPOCH, by default the time of the last commit.
#
# A TLS-intercepting network: the host's CA bundle (PIP_CA_BUNDLE, else $PIP_CERT, else
# $SSL_CERT_FILE, else /etc/ssl/certs/ca-certificates.crt) is given to pip as a build
# secret, mounted for the install steps only, never stored in a layer.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=(bash images/engine.sh)
REGISTRY=${REGISTRY:-ghcr.io/kubetrain}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
TAG=${TAG:-$VERSION}
OPERATOR_IMAGE=$REGISTRY/operator:$TAG
TRAINER_IMAGE=$REGISTRY/trainer:$TAG
LOCAL_BASE=localhost/kubetrain/debian:bookworm-slim
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-${DEBIAN_MIRROR%/debian}/debian-security}

case "${1:-}" in
    --names)
        echo "$OPERATOR_IMAGE"
        echo "$TRAINER_IMAGE"
        exit 0
        ;;
    --push)
        for image in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
            echo "== push $image"
            "${ENGINE[@]}" push "$image"
        done
        exit 0
        ;;
    "") ;;
    *)
        echo "usage: $0 [--names | --push]" >&2
        exit 2
        ;;
esac

SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
CREATED=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    REVISION=$REVISION-dirty
fi
engine_name=$("${ENGINE[@]}" --name)

have_image() { "${ENGINE[@]}" image inspect "$1" >/dev/null 2>&1; }

# A Debian 12 minbase like the official slim image: no documentation, manual pages or
# translations (also for packages installed later: the dpkg options stay in the image).
build_local_base() {
    command -v mmdebstrap >/dev/null || {
        echo "mmdebstrap is not installed: run 'make container-tools' or set BASE_IMAGE" >&2
        exit 1
    }
    local tmp
    tmp=$(mktemp -d)
    echo "== base: Debian bookworm minbase from $DEBIAN_MIRROR (mmdebstrap)"
    mmdebstrap --variant=minbase --format=tar --quiet \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --aptopt='APT::Install-Recommends "false"' \
        bookworm "$tmp/rootfs.tar" \
        "deb $DEBIAN_MIRROR bookworm main" \
        "deb $DEBIAN_MIRROR bookworm-updates main" \
        "deb $DEBIAN_SECURITY_MIRROR bookworm-security main"
    "${ENGINE[@]}" import --quiet \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message "Debian bookworm minbase from $DEBIAN_MIRROR (mmdebstrap, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)" \
        "$tmp/rootfs.tar" "$LOCAL_BASE" >/dev/null
    echo "   $LOCAL_BASE: rootfs sha256 $(sha256sum "$tmp/rootfs.tar" | cut -d' ' -f1)"
    rm -rf "$tmp"
}

choose_base() {
    if [ -n "${BASE_IMAGE:-}" ]; then
        echo "$BASE_IMAGE"
        return
    fi
    local default
    default=$(sed -n 's/^ARG BASE=//p' Dockerfile)
    if have_image "$default" || "${ENGINE[@]}" pull -q "$default" >/dev/null 2>&1; then
        echo "$default"
        return
    fi
    echo "   $default cannot be pulled (no registry reachable?): using $LOCAL_BASE" >&2
    have_image "$LOCAL_BASE" || build_local_base >&2
    echo "$LOCAL_BASE"
}

# The per-build labels on IMAGE, in a build of its own that adds no layer. Not as --label
# of the main build: podman (4.x) reuses a fully cached target that is not the
# Dockerfile's last stage (the operator) with the labels of the build that made it, so
# the operator image would name an old revision.
relabel() {
    local context
    context=$(mktemp -d)
    printf 'FROM %s\n' "$1" > "$context/Dockerfile"
    "${ENGINE[@]}" build --quiet --no-cache "${label_args[@]}" "${time_args[@]}" \
        --tag "$1" "$context" >/dev/null
    rm -rf "$context"
}

BASE=$(choose_base)
build_args=(--file Dockerfile --build-arg "BASE=$BASE")
# What changes with every commit; set by `relabel` below, never through the build cache.
label_args=(
    --label "org.opencontainers.image.version=$VERSION"
    --label "org.opencontainers.image.revision=$REVISION"
    --label "org.opencontainers.image.created=$CREATED"
    --label "org.opencontainers.image.base.name=$BASE"
)
if [ "$engine_name" = podman ]; then
    time_args=(--format oci --timestamp "$SOURCE_DATE_EPOCH")
else
    # BuildKit: secrets, cache mounts, and SOURCE_DATE_EPOCH for the image's timestamps.
    export DOCKER_BUILDKIT=1
    time_args=(--build-arg "SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH")
fi
build_args+=("${time_args[@]}")
ca=${PIP_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -s "$ca" ]; then
    build_args+=(--secret "id=pip-ca,src=$ca")
fi

for target in operator trainer; do
    image=$REGISTRY/$target:$TAG
    echo "== $image (target $target, base $BASE, $engine_name)"
    start=$(date +%s)
    "${ENGINE[@]}" build "${build_args[@]}" --target "$target" --tag "$image" .
    relabel "$image"
    echo "   built in $(($(date +%s) - start)) s"
done

echo "== sizes"
for image in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
    bytes=$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$image")
    printf '   %-45s %6d MiB\n' "$image" $((bytes / 1024 / 1024))
done
