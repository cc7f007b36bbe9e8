#!/usr/bin/env bash
# Installs what bench/run.py needs from Debian/Ubuntu packages (idempotent; run as root):
#   nghttp2-client  h2load, the load generator (HTTP/2 for gRPC, --h1 for the direct runs)
#   nginx-light     the fast upstream (fixed OpenAI replies); it pulls libnginx-mod-http-echo,
#                   used for the delayed stream of the time-to-first-token measurement
# run.py starts its own nginx with its own config on 127.0.0.1; no system service is used.
set -euo pipefail
need=()
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ] || need+=(libnginx-mod-http-echo)
if [ ${#need[@]} -eq 0 ]; then
  echo "bench/setup.sh: nothing to install (h2load, nginx and the echo module are present)"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "bench/setup.sh: installing ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
