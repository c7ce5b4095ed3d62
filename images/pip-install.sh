#!/bin/sh
# images/pip-install.sh EXTRA: the Dockerfile's install of the third-party packages that
# kubetrain's EXTRA needs (extras/EXTRA.txt, written by images/requirements.py) into
# /opt/venv, at the versions of requirements/constraints.txt, from wheels only. Runs in
# the build stage (/src).
#
# Wheels are downloaded into $WHEELS, the build's cache mount, and installed from there
# alone: a wheel already there is not fetched again. (pip's own HTTP cache cannot be
# relied on: it keeps nothing from a mirror or proxy that sends no caching headers.)
set -eu
extra=$1
WHEELS=${WHEELS:-/var/cache/kubetrain-wheels}
if [ -s /run/secrets/pip-ca ]; then
    export PIP_CERT=/run/secrets/pip-ca  # a TLS-intercepting network's CA, never stored
fi
set -- --disable-pip-version-check --only-binary=:all: \
    -c requirements/constraints.txt -c requirements/image-build.txt -r "extras/$extra.txt"
/opt/tools/bin/pip download --quiet --progress-bar off --dest "$WHEELS" "$@"
/opt/tools/bin/pip --python /opt/venv/bin/python install --no-index --find-links "$WHEELS" "$@"
