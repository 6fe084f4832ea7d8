#!/bin/sh
# Chromium for the browser test (tests/test_web.py) is a system package, not a pip one: install it
# with apt-get when it is missing and this runs as root on a Debian-like machine. Elsewhere it says
# how; the test then skips locally and fails under CI=true (see tests/conftest.py).
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Chromium (apt-get) for tests/test_web.py" >&2
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
        exit 0
    fi
fi
echo "Chromium is not installed: 'apt-get install chromium' (as root) for tests/test_web.py" >&2
case "$(echo "${CI:-}" | tr 'A-Z' 'a-z')" in 1|true|yes|on) exit 1 ;; esac
exit 0
