#!/usr/bin/env bash
# The clients tests/serve.rs drives, on a fresh Debian machine: Chromium (Debian's package) for the
# page test, playwright-core (npm, pinned by .ci/package-lock.json, into the git-ignored
# .ci/node_modules) to drive it, and the official `openai` Python package in a venv
# (target/ci-venv). Each step is skipped when already done, so a warm machine pays nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
python3 -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ -d .ci/node_modules/playwright-core ] || npm ci --prefix .ci --no-audit --no-fund --loglevel=error
if ! target/ci-venv/bin/python -c "import openai" 2>/dev/null; then
  python3 -m venv target/ci-venv
  target/ci-venv/bin/pip install -q --disable-pip-version-check openai
fi
