"""Open a report.html in headless Chromium: every figure must decode, and the page must load
with no console errors.

    python tools/check_report_html.py runs/demo/report/report.html [--chromium chromium]

The report has no script of its own, so the check runs on a temporary copy with one script
appended: after load it writes, into the DOM, how many <img> elements there are and which
did not decode (``complete`` and ``naturalWidth > 0``). Chromium prints the DOM
(``--dump-dom``) and its console messages (``--enable-logging=stderr``); any console line of
level ERROR, or an uncaught exception, fails the check. Exit status 0: fine, 1: problems (listed),
2: Chromium not found.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); })
                .map(function (im) { return im.alt || im.src.slice(0, 40); });
  var out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = "IMAGES " + imgs.length + " BAD " + JSON.stringify(bad);
  document.body.appendChild(out);
});
</script>
"""


def find_chromium(name: str = "") -> str | None:
    for candidate in ([name] if name else ["chromium", "chromium-browser", "google-chrome", "chrome"]):
        path = shutil.which(candidate)
        if path:
            return path
    return None


def check_report(html_path: str | Path, chromium: str, timeout_s: float = 60.0) -> tuple[int, list[str]]:
    """(number of images, problems) of the report at ``html_path``."""
    html = Path(html_path).read_text(encoding="utf-8")
    probe = html.replace("</body>", PROBE + "</body>") if "</body>" in html else html + PROBE
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(probe, encoding="utf-8")
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp}/profile", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=timeout_s)
    problems = []
    m = re.search(r"IMAGES (\d+) BAD (\[.*?\])", proc.stdout)
    if m is None:
        return 0, [f"the page did not finish loading (chromium exit {proc.returncode}): "
                   + proc.stderr.strip()[-500:]]
    num_images = int(m.group(1))
    if m.group(2) != "[]":
        problems.append(f"images that did not decode: {m.group(2)}")
    for line in proc.stderr.splitlines():
        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line):
            problems.append(f"console: {line.strip()}")
        elif "Uncaught" in line:
            problems.append(f"console: {line.strip()}")
    return num_images, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="report.html (from `detect compare`)")
    parser.add_argument("--chromium", default="", help="browser binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_report_html: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    num_images, problems = check_report(args.report, chromium)
    for p in problems:
        print(f"check_report_html: {p}", file=sys.stderr)
    print(f"{args.report}: {num_images} image(s), {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
