#!/usr/bin/env bash
# Builds the binaries of the e2e test cluster from the pinned Go modules in
# tests/cluster/{k8s,etcd,kwok,helm,seaweedfs,kueue} into .cache/bin/ (repository-relative):
#   kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm weed kueue
# (weed is SeaweedFS, whose S3 gateway is the e2e tier's S3 server; kueue queues and
# gang-admits the e2e tests' GPU Jobs.)
#
# Each tool lives in its own Go module because their dependency pins (client-go,
# grpc, otel, ...) conflict; one module would silently move them all.
#
# Each binary has a stamp file (.cache/bin/.stamp.NAME) holding a hash of
# everything its build depends on: the Go version and platform, the build
# environment, its module's go.mod, go.sum and tools.go, the package and the full
# build flags. A binary whose inputs did not change is not rebuilt, so changing one
# tool's flags rebuilds that tool only; with nothing changed the script returns at
# once. Set FORCE=1 to rebuild everything anyway.
#
# ONLY="weed helm" builds (and stamps) just the binaries named; the others are left
# as they are, built or not.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
bin_dir="${root}/.cache/bin"
binaries=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok helm weed kueue)

selected=" ${binaries[*]} "
if [[ -n "${ONLY:-}" ]]; then
  selected=" "
  for name in ${ONLY}; do
    if [[ " ${binaries[*]} " != *" ${name} "* ]]; then
      echo "ONLY: unknown binary '${name}' (accepted: ${binaries[*]})" >&2
      exit 2
    fi
    selected+="${name} "
  done
fi
is_selected() { [[ "${selected}" == *" $1 "* ]]; }

# Builds must not pick up a go.work from a parent directory or a developer's
# GOFLAGS (e.g. -mod=mod would rewrite the committed go.sum).
export GOWORK=off
export GOFLAGS="-mod=readonly -buildvcs=false"
# Static binaries: no C toolchain needed, and they run on any Linux host.
export CGO_ENABLED=0

# Version of a module as pinned in one of our go.mod files; the ldflags below
# are derived from it so the pins are the single source of truth.
mod_version() { (cd "${here}/$1" && go list -m -f '{{.Version}}' "$2"); }

go_version="$(go env GOVERSION)"
platform="$(go env GOOS GOARCH | tr '\n' ' ')"

inputs_hash() { # module-dir go-build-args...
  local dir="$1" f
  shift
  {
    printf '%s\n' "${go_version}" "${platform}" \
      "GOWORK=${GOWORK} GOFLAGS=${GOFLAGS} CGO_ENABLED=${CGO_ENABLED}" "$@"
    for f in go.mod go.sum tools.go; do
      printf '%s\n' "${dir}/${f}"
      cat "${here}/${dir}/${f}"
    done
  } | sha256sum | cut -d' ' -f1
}

mkdir -p "${bin_dir}"
# Build into a scratch directory and move into place at the end, so that an
# interrupted build never leaves a mix of old and new binaries looking current.
stage="$(mktemp -d "${bin_dir}/.stage.XXXXXX")"
trap 'rm -rf "${stage}"' EXIT
built=()
declare -A want=() adopted=()

# Binaries built by the earlier version of this script carry a single stamp
# (.cache/bin/.stamp) for all of them. Those whose build flags have not changed
# since (all but helm, which gained its default Kubernetes version) are adopted
# when they report the current Go version and their module's current pin, rather
# than rebuilt from scratch.
legacy_stamp="${bin_dir}/.stamp"
adopt_legacy() { # output-name module-dir pinned-module
  local out="$1" bin="${bin_dir}/$1"
  [[ -f "${legacy_stamp}" && ! -f "${bin_dir}/.stamp.${out}" && -x "${bin}" ]] || return 1
  local info
  info="$(go version -m "${bin}")" || return 1
  [[ "$(head -n1 <<<"${info}")" == "${bin}: ${go_version}" ]] || return 1
  grep -Eq "^[[:space:]](mod|dep)[[:space:]]+$3[[:space:]]+$(mod_version "$2" "$3")([[:space:]]|\$)" \
    <<<"${info}"
}

build() { # module-dir output-name package [ldflags...]
  local dir="$1" out="$2" pkg="$3"
  shift 3
  is_selected "${out}" || return 0
  local args=(build -trimpath -ldflags "-s -w $*")
  want["${out}"]="$(inputs_hash "${dir}" "${args[@]}" "${pkg}")"
  local stamp_file="${bin_dir}/.stamp.${out}"
  if [[ "${FORCE:-0}" != 1 && -x "${bin_dir}/${out}" ]] && {
       [[ -n "${adopted[${out}]:-}" ]] ||
       [[ -f "${stamp_file}" && "$(cat "${stamp_file}")" == "${want[${out}]}" ]]; }; then
    echo "${out} is up to date"
    return
  fi
  local start=${SECONDS}
  echo "building ${out} (${pkg})"
  (cd "${here}/${dir}" && go "${args[@]}" -o "${stage}/${out}" "${pkg}")
  built+=("${out}")
  echo "built ${out} in $((SECONDS - start))s"
}

for pair in kube-apiserver:k8s.io/kubernetes kube-controller-manager:k8s.io/kubernetes \
    kube-scheduler:k8s.io/kubernetes etcd:go.etcd.io/etcd/server/v3 kwok:sigs.k8s.io/kwok; do
  out="${pair%%:*}" module="${pair#*:}"
  case "${out}" in kube-*) dir=k8s ;; *) dir="${out}" ;; esac
  if [[ "${FORCE:-0}" != 1 ]] && adopt_legacy "${out}" "${dir}" "${module}"; then
    echo "${out}: adopting the binary built before per-binary stamps"
    adopted["${out}"]=1
  fi
done

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

# Helm's default Kubernetes version (.Capabilities.KubeVersion for `helm template`
# and `helm lint` without --kube-version, and its deprecation checks) is set at
# link time; Helm's own Makefile derives it from its client-go pin. Ours is the
# control plane's, so that charts render for the cluster the tests run.
helm_version="$(mod_version helm helm.sh/helm/v3)"
build helm helm helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=${helm_version}" \
  "-X helm.sh/helm/v3/internal/version.gitTreeState=clean" \
  "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=${k8s_major}" \
  "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${k8s_minor}" \
  "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=${k8s_major}" \
  "-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=${k8s_minor}"

# SeaweedFS reports its release number from source; the commit it leaves empty is the
# one its pseudo-version names (v0.0.0-<date>-<commit>).
seaweedfs_version="$(mod_version seaweedfs github.com/seaweedfs/seaweedfs)"
build seaweedfs weed github.com/seaweedfs/seaweedfs/weed \
  "-X github.com/seaweedfs/seaweedfs/weed/util/version.COMMIT=${seaweedfs_version##*-}"

# Kueue, which the e2e tests queue and gang-admit GPU Jobs with. The manager does
# not install its CRDs or webhook configurations: tests/cluster/kueue_manager.py does,
# from Kueue's own manifests, copied here from the pinned module into .cache/kueue
# (config/components/{crd,webhook}), so the binary and its manifests are one version.
kueue_version="$(mod_version kueue sigs.k8s.io/kueue)"
build kueue kueue sigs.k8s.io/kueue/cmd/kueue \
  "-X sigs.k8s.io/kueue/pkg/version.GitVersion=${kueue_version}" \
  "-X sigs.k8s.io/kueue/pkg/version.GitCommit=${kueue_version}" \
  "-X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01T00:00:00Z"
if is_selected kueue; then
  kueue_dir="$(cd "${here}/kueue" && go mod download sigs.k8s.io/kueue &&
    go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  kueue_config="${root}/.cache/kueue"
  rm -rf "${kueue_config}" && mkdir -p "${kueue_config}"
  cp -R "${kueue_dir}/config/components/crd" "${kueue_dir}/config/components/webhook" \
    "${kueue_config}/"
  # The module cache is read-only; the copies must not be, or the next rm fails.
  chmod -R u+w "${kueue_config}"
  printf '%s\n' "${kueue_version}" >"${kueue_config}/VERSION"
fi

for b in "${built[@]}"; do
  mv -f "${stage}/${b}" "${bin_dir}/${b}"
done
# Stamps last: a binary is current only once it is in place.
for b in "${!want[@]}"; do
  printf '%s\n' "${want[${b}]}" >"${bin_dir}/.stamp.${b}"
done
[[ -n "${ONLY:-}" ]] || rm -f "${legacy_stamp}"
if ((${#built[@]} == 0)); then
  echo "cluster binaries in .cache/bin are up to date"
else
  echo "built ${built[*]} into .cache/bin (kubernetes ${k8s_version}, helm ${helm_version}," \
    "helm's default Kubernetes ${k8s_major}.${k8s_minor}, seaweedfs ${seaweedfs_version})"
fi
