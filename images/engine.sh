#!/usr/bin/env bash
# images/engine.sh COMMAND [ARGS...]: the container engine that builds and runs kubetrain's
# images — $CONTAINER_ENGINE, else podman, else docker — with the options podman needs on
# hosts like this project's CI machines. `make images`, the image tests and the e2e pod
# runner all go through here, so those options are written down once:
#
#   --runtime runc   on a cgroup v1 or hybrid host when runc is installed: crun fails to
#                    set up the mixed cgroup hierarchy there.
#   --ulimit ...     on `build`, `run` and `create`: podman asks for 1048576 open files and
#                    4194304 processes, which a host whose hard limits are lower (or that
#                    forbids raising them, as root too) refuses with "error setting
#                    rlimit". The limits are the host's hard ones, at most 1048576 files
#                    and 32768 processes.
#
#   images/engine.sh --name   prints the engine's name (podman or docker) and exits.
set -euo pipefail

engine=${CONTAINER_ENGINE:-}
if [ -z "$engine" ]; then
    if command -v podman >/dev/null; then
        engine=podman
    elif command -v docker >/dev/null; then
        engine=docker
    else
        echo "images/engine.sh: neither podman nor docker is installed (make container-tools installs podman)" >&2
        exit 127
    fi
fi
if [ "${1:-}" = --name ]; then
    basename "$engine"
    exit 0
fi
if [ "$(basename "$engine")" != podman ]; then
    exec "$engine" "$@"
fi

global=()
if command -v runc >/dev/null && [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" != cgroup2fs ]; then
    global+=(--runtime "$(command -v runc)")
fi

limit() {  # limit HARD CAP: the smaller of the two ("unlimited" counts as the cap)
    if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi
}
sub=${1:-}
[ $# -gt 0 ] && shift
case "$sub" in
    build | run | create)
        nofile=$(limit "$(ulimit -Hn)" 1048576)
        nproc=$(limit "$(ulimit -Hu)" 32768)
        exec podman "${global[@]}" "$sub" \
            --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" "$@"
        ;;
    *)
        exec podman "${global[@]}" ${sub:+"$sub"} "$@"
        ;;
esac
