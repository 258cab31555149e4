#!/usr/bin/env bash
# Renders a quench HTML report in headless Chromium and saves a screenshot, to check the page draws
# without a network or scripts. Installs Debian's chromium when it is missing (needs root).
#   bash scripts/report-screenshot.sh report.html shot.png
set -euo pipefail
page="$1"; shot="${2:-${1%.html}.png}"
if ! command -v chromium >/dev/null; then
  apt-get install -y chromium >/dev/null
fi
log="$(mktemp)"
chromium --headless --no-sandbox --disable-gpu --window-size=950,2400 \
  --screenshot="$shot" "file://$(realpath "$page")" 2>"$log"
# D-Bus complaints are harmless in a container; anything about the page itself is not.
if grep -v -e dbus -e "Fontconfig" "$log" | grep -i -e "error" -e "uncaught"; then
  echo "chromium reported errors rendering $page" >&2; exit 1
fi
test -s "$shot" && echo "wrote $shot"
