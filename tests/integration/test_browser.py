"""tests/support/browser.py: headless chromium sees a clean page clean, and names each kind of broken page's error.
Without chromium, the helper says how to install it: tests/unit/test_browser.py."""

import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.browser import open_page

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium: make browser")]

CLEAN = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>clean</title></head>
<body>
<h1>A clean page</h1>
<svg xmlns="http://www.w3.org/2000/svg" width="320" height="160">
  <rect width="320" height="160" fill="steelblue"/><circle cx="80" cy="80" r="60" fill="orange"/>
</svg>
<script>
  const made = document.createElement("p");
  made.id = "made-by-script";
  made.textContent = "written by the inline script";
  document.body.appendChild(made);
</script>
</body></html>
"""

# name: (what the body holds, what an error must name)
BROKEN = {
    "throws": ("<script>throw new Error('boom-from-script');</script>", "boom-from-script"),
    "console-error": ("<script>console.error('x');</script>", "console.error: x"),
    "http-image": ('<img src="http://example.invalid/x.png">', "http://example.invalid/x.png"),
    "broken-data-uri": ('<img src="data:image/png;base64,AAAA">', "data:image/png;base64,AAAA"),
}

LONG = '<!DOCTYPE html><html><body style="margin:0"><div style="height:9000px"></div></body></html>'


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Every page of this module, each in its own chromium, opened side by side (about half the time in a row)."""
    root = tmp_path_factory.mktemp("pages")
    sources = {"clean": CLEAN, "long": LONG}
    for name, (body, _) in BROKEN.items():
        sources[name] = f"<!DOCTYPE html><html><body><p>{name}</p>{body}</body></html>"
    for name, text in sources.items():
        (root / f"{name}.html").write_text(text)
    with ThreadPoolExecutor(len(sources)) as pool:
        return dict(zip(sources, pool.map(lambda name: open_page(root / f"{name}.html", root / "out"), sources)))


def test_clean_page(pages):
    page = pages["clean"]
    assert page.console_errors == []
    assert page.screenshot.name == "clean.png" and page.screenshot.parent.name == "out"
    width, height = png_size(page.screenshot)
    assert width == 1280 and height >= 1000
    assert 5_000 < page.screenshot.stat().st_size < 5_000_000
    assert page.dom.startswith("<!DOCTYPE html>\n<html>")
    assert '<p id="made-by-script">written by the inline script</p>' in page.dom
    assert "<circle" in page.dom


@pytest.mark.parametrize("name", BROKEN)
def test_broken_page_is_named(pages, name):
    page = pages[name]
    assert page.console_errors, f"{name}: no console error"
    assert any(BROKEN[name][1] in error for error in page.console_errors), page.console_errors
    assert png_size(page.screenshot)[0] == 1280


def test_long_page_is_captured_whole(pages):
    assert png_size(pages["long"].screenshot) == (1280, 9000)
