#!/bin/sh
# The container image's entrypoint: `mesh agent` with the image's config file, run by
# the interpreter copy that carries the agent's file capabilities.
#
#   MESHPLANE_HOME   the venv (default /opt/meshplane)
#   MESHPLANE_CONFIG the config file used when no --config is given
#                    (default /etc/meshplane/agent.toml)
# Every argument is passed to `mesh agent` (flags win over the file). A join token
# comes from MESH_JOIN_TOKEN (or --token/--token-file), as `mesh agent` reads it.
set -eu

home="${MESHPLANE_HOME:-/opt/meshplane}"
config="${MESHPLANE_CONFIG:-/etc/meshplane/agent.toml}"

given_config=no
for arg in "$@"; do
    case "$arg" in
        --config|--config=*) given_config=yes ;;
    esac
done

# `mesh ...` (a CLI command) runs the client, without the capabilities.
if [ "${1:-}" = "mesh" ]; then
    shift
    exec "$home/bin/mesh" "$@"
fi

if [ "$given_config" = yes ] || [ ! -e "$config" ]; then
    exec "$home/bin/mesh-python" -m mesh agent "$@"
fi
exec "$home/bin/mesh-python" -m mesh agent --config "$config" "$@"
