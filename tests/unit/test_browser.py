"""tests/support/browser.py without chromium: it says how to install it. The pages in chromium:
tests/integration/test_browser.py."""

import pytest

from tests.support.browser import BrowserError, open_page


def test_missing_chromium_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    html = tmp_path / "page.html"
    html.write_text("<!DOCTYPE html><html><body><p>a page</p></body></html>")
    with pytest.raises(BrowserError, match="make browser"):
        open_page(html, tmp_path)
