#!/usr/bin/env bash
# For the status-page test in real headless Chromium (tests/e2e/test_operations_browser.py):
# Debian's `chromium` and the npm package `playwright-core` (pinned in tests/browser), which drives
# /usr/bin/chromium. Nothing downloads a browser build of its own. Idempotent: a second run only
# checks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v chromium > /dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium fonts-dejavu-core > /dev/null
fi

wanted=$(node -p 'require("./tests/browser/package.json").dependencies["playwright-core"]')
installed=$(node -p 'try { require("./tests/browser/node_modules/playwright-core/package.json").version } catch { "" }')
if [[ "$installed" != "$wanted" ]]; then
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
echo "chromium: $(chromium --version 2> /dev/null | head -1); playwright-core $wanted"
