"""Browser tests of the web dashboard (Playwright driving Debian's Chromium)."""
