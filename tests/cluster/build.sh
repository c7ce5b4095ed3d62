#!/usr/bin/env bash
# Builds the binaries of the e2e test cluster from the pinned Go modules in
# tests/cluster/{k8s,etcd,kwok,helm} into .cache/bin/ (repository-relative):
#   kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm
#
# Each tool lives in its own Go module because their dependency pins (client-go,
# grpc, otel, ...) conflict; one module would silently move them all.
#
# A stamp file holds a hash of every input (go.mod, go.sum, tools.go, this
# script, the Go version), so a second run with nothing changed returns at once.
# Set FORCE=1 to rebuild anyway.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
bin_dir="${root}/.cache/bin"
stamp="${bin_dir}/.stamp"
binaries=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm)

# Builds must not pick up a go.work from a parent directory or a developer's
# GOFLAGS (e.g. -mod=mod would rewrite the committed go.sum).
export GOWORK=off
export GOFLAGS="-mod=readonly -buildvcs=false"
# Static binaries: no C toolchain needed, and they run on any Linux host.
export CGO_ENABLED=0

inputs_hash() {
  {
    go version
    go env GOOS GOARCH
    for f in "${here}/build.sh" "${here}"/*/go.mod "${here}"/*/go.sum "${here}"/*/tools.go; do
      printf '%s\n' "${f#"${here}/"}"
      cat "${f}"
    done
  } | sha256sum | cut -d' ' -f1
}

all_present() {
  local b
  for b in "${binaries[@]}"; do
    [[ -x "${bin_dir}/${b}" ]] || return 1
  done
}

want="$(inputs_hash)"
if [[ "${FORCE:-0}" != 1 && -f "${stamp}" ]] && all_present && [[ "$(cat "${stamp}")" == "${want}" ]]; then
  echo "cluster binaries in .cache/bin are up to date"
  exit 0
fi

# Version of a module as pinned in one of our go.mod files; the ldflags below
# are derived from it so the pins are the single source of truth.
mod_version() { (cd "${here}/$1" && go list -m -f '{{.Version}}' "$2"); }

mkdir -p "${bin_dir}"
# Build into a scratch directory and move into place at the end, so that an
# interrupted build never leaves a mix of old and new binaries looking current.
stage="$(mktemp -d "${bin_dir}/.stage.XXXXXX")"
trap 'rm -rf "${stage}"' EXIT
rm -f "${stamp}"

build() { # module-dir output-name package [ldflags...]
  local dir="$1" out="$2" pkg="$3"
  shift 3
  local start=${SECONDS}
  echo "building ${out} (${pkg})"
  (cd "${here}/${dir}" && go build -trimpath -ldflags "-s -w $*" -o "${stage}/${out}" "${pkg}")
  echo "built ${out} in $((SECONDS - start))s"
}

k8s_version="$(mod_version k8s k8s.io/kubernetes)"  # e.g. v1.36.3
k8s_major="${k8s_version#v}"; k8s_major="${k8s_major%%.*}"
k8s_minor="${k8s_version#v*.}"; k8s_minor="${k8s_minor%%.*}"
# A fixed build date keeps the binaries reproducible for a given pin.
k8s_ldflags=()
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=(
    "-X ${pkg}.gitVersion=${k8s_version}"
    "-X ${pkg}.gitMajor=${k8s_major}"
    "-X ${pkg}.gitMinor=${k8s_minor}"
    "-X ${pkg}.gitTreeState=clean"
    "-X ${pkg}.buildDate=1970-01-01T00:00:00Z"
  )
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
  build k8s "${cmd}" "k8s.io/kubernetes/cmd/${cmd}" "${k8s_ldflags[@]}"
done

# etcd and kwok carry their version as constants in source, so the pin alone
# sets what they report.
build etcd etcd go.etcd.io/etcd/server/v3
build kwok kwok sigs.k8s.io/kwok/cmd/kwok

helm_version="$(mod_version helm helm.sh/helm/v3)"
build helm helm helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=${helm_version}" \
  "-X helm.sh/helm/v3/internal/version.gitTreeState=clean"

for b in "${binaries[@]}"; do
  mv -f "${stage}/${b}" "${bin_dir}/${b}"
done
printf '%s\n' "${want}" >"${stamp}"
echo "cluster binaries built into .cache/bin (kubernetes ${k8s_version}, helm ${helm_version})"
