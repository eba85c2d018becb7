"""Open a report.html, and the viewer.html it links to, in headless Chromium: every image must
decode, the page must load with no console errors, and the viewer's controls must change
what it draws.

    python tests/check_report_html.py runs/demo/report/report.html [--screenshot viewer.png]

Each page is checked on a copy with one script appended (the viewer's copy sits beside it, so
its relative files resolve). For the report, the script writes into the DOM how many <img>
elements there are and which did not decode (``complete`` and ``naturalWidth > 0``). For the
viewer (``detect.report.viewer``) it decodes every image of its index, then moves each control
and compares what is drawn (the SVG boxes of each panel, by class, and the order of the
images): the score slider (0 against 1), the class filter (each class against all), the sort
(every option) and the proposals toggle must each change it. A control that cannot change
anything on these data is reported as not applicable (one class, one image, no detections, no
proposals), not as a failure. Chromium prints the DOM (``--dump-dom``) and its console
messages (``--enable-logging=stderr``); any console line of level ERROR, or an uncaught
exception, fails the check. ``--screenshot`` saves the viewer as Chromium draws it (first page,
score >= 0.5; ``--view`` sets the viewer's URL fragment). Exit status 0: fine, 1: problems
(listed), 2: Chromium not found.
"""

from __future__ import annotations

import argparse
import json
import os
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


VIEWER_PROBE = """
<script>
window.addEventListener("load", async function () {
  const out = {images: 0, bad: [], checks: {}};
  const $ = (id) => document.getElementById(id);
  const settle = async () => { await new Promise((r) => setTimeout(r, 0)); await window.viewer.drawn; };
  const drawing = () => JSON.stringify([...document.querySelectorAll("#images section")].map((s) =>
    [s.dataset.image, [...s.querySelectorAll("figure")].map((f) =>
      [...f.querySelectorAll("rect")].map((r) => r.getAttribute("class")).sort().join(","))]));
  const count = (selector) => document.querySelectorAll(selector).length;
  async function set(id, value) {
    const el = $(id);
    if (el.type === "checkbox") el.checked = value; else el.value = value;
    el.dispatchEvent(new Event(el.type === "range" ? "input" : "change"));
    await settle();
    return drawing();
  }
  try {
    await settle();
    const withSrc = window.viewer.images.filter((im) => im.src);
    out.images = withSrc.length;
    // (load events, not img.decode(): Chromium's virtual time runs on past a pending decode)
    await Promise.all(withSrc.map((im) => new Promise((resolve) => {
      const img = new Image();
      img.onload = () => { if (!img.naturalWidth) out.bad.push(im.file); resolve(); };
      img.onerror = () => { out.bad.push(im.file); resolve(); };
      img.src = im.src;
    })));
    // score slider: every detection of the page's images at 0, fewer at 1
    const shown = [...document.querySelectorAll("#images section")].map((s) => window.viewer.boxes[s.dataset.image]);
    await set("threshold", 0);
    const low = count("rect.det");
    await set("threshold", 1);
    out.checks.slider = !shown.some((b) => b.det.some((dets) => dets.length)) ? "n/a: no detection on the page" :
      count("rect.det") < low ? "ok" : "FAIL: as many boxes at score 1 as at score 0";
    await set("threshold", 0.5);
    // class filter: some class shows less than all classes
    const classes = [...$("class-filter").options].map((o) => o.value).filter((v) => v !== "0");
    if (classes.length < 2) out.checks.filter = "n/a: one class";
    else {
      const all = drawing(), filtered = [];
      for (const c of classes) filtered.push(await set("class-filter", c));
      out.checks.filter = filtered.some((d) => d !== all) ? "ok" : "FAIL: no class changes the drawing";
      await set("class-filter", "0");
    }
    // sort: the options give more than one order of the images
    if (window.viewer.images.length < 2) out.checks.sort = "n/a: one image";
    else {
      const orders = new Set();
      for (const o of [...$("sort").options]) {
        await set("sort", o.value);
        orders.add(JSON.stringify([...document.querySelectorAll("#images section")].map((s) => s.dataset.image)));
      }
      out.checks.sort = orders.size > 1 ? "ok" : "FAIL: every sort gives the same order";
    }
    // proposals: on draws proposal boxes
    if ($("proposals").disabled) out.checks.proposals = "n/a: no proposal store";
    else {
      const off = await set("proposals", false), on = await set("proposals", true);
      out.checks.proposals = on !== off && count("rect.prop") > 0 ? "ok" : "FAIL: no proposal drawn";
      await set("proposals", false);
    }
  } catch (e) {
    out.error = String(e && e.stack || e);
  }
  const pre = document.createElement("pre");
  pre.id = "viewer-check";
  pre.textContent = "VIEWER " + JSON.stringify(out);
  document.body.appendChild(pre);
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


def _chromium_args(chromium: str, profile: str) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]


def _console_problems(stderr: str) -> list[str]:
    return [f"console: {line.strip()}" for line in stderr.splitlines()
            if ("CONSOLE" in line and "ERROR" in line) or "Uncaught" in line]


def check_viewer(viewer_path: str | Path, chromium: str, *, screenshot: str | Path | None = None,
                 view: str = "", timeout_s: float = 120.0) -> tuple[dict, list[str]]:
    """({"images": decoded images, "checks": {control: "ok" | "n/a: why"}}, problems) of the
    viewer at ``viewer_path``; ``screenshot``: a PNG of it (1400 x 1000) with ``view`` as its
    URL fragment."""
    viewer_path = Path(viewer_path).resolve()
    html = viewer_path.read_text(encoding="utf-8")
    probe = html.replace("</body>", VIEWER_PROBE + "</body>")
    page = viewer_path.with_name(f".check-{os.getpid()}-{viewer_path.name}")  # beside: relative files
    with tempfile.TemporaryDirectory() as tmp:
        try:
            page.write_text(probe, encoding="utf-8")
            proc = subprocess.run(_chromium_args(chromium, f"{tmp}/profile")
                                  + ["--virtual-time-budget=30000", "--dump-dom", page.as_uri()],
                                  capture_output=True, text=True, timeout=timeout_s)
        finally:
            page.unlink(missing_ok=True)
        if screenshot:
            subprocess.run(_chromium_args(chromium, f"{tmp}/profile2")
                           + ["--window-size=1400,1000", "--virtual-time-budget=10000",
                              f"--screenshot={Path(screenshot).resolve()}", viewer_path.as_uri() + view],
                           capture_output=True, text=True, timeout=timeout_s)
    m = re.search(r"VIEWER (\{.*\})", proc.stdout)
    if m is None:
        return {}, [f"the viewer did not finish loading (chromium exit {proc.returncode}): "
                    + proc.stderr.strip()[-500:]]
    result = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    problems = [f"viewer: {result['error']}"] if "error" in result else []
    if result["bad"]:
        problems.append(f"viewer images that did not decode: {result['bad']}")
    problems += [f"viewer {name}: {verdict}" for name, verdict in result["checks"].items()
                 if not (verdict == "ok" or verdict.startswith("n/a"))]
    problems += _console_problems(proc.stderr)
    if screenshot and not Path(screenshot).is_file():
        problems.append(f"no screenshot written to {screenshot}")
    return result, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="report.html (from `detect compare`), or a viewer.html")
    parser.add_argument("--chromium", default="", help="browser binary (default: chromium on PATH)")
    parser.add_argument("--screenshot", default="", help="save a PNG of the viewer here")
    parser.add_argument("--view", default="", help="the viewer's URL fragment for the screenshot, e.g. "
                                                   "'#sort=d1&t=0.3'")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_report_html: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    report = Path(args.report)
    problems = []
    if report.name != "viewer.html":
        num_images, problems = check_report(report, chromium)
        print(f"{report}: {num_images} image(s), {len(problems)} problem(s)")
        linked = 'href="viewer.html"' in report.read_text(encoding="utf-8")
        report = report.with_name("viewer.html")
        if not linked:
            print(f"{report}: not linked from the report, not checked")
            report = None
        elif not report.is_file():
            problems.append(f"the report links to {report}, which does not exist")
            report = None
    if report is not None:
        result, viewer_problems = check_viewer(report, chromium, screenshot=args.screenshot or None,
                                               view=args.view)
        problems += viewer_problems
        checks = ", ".join(f"{k} {v}" for k, v in result.get("checks", {}).items())
        print(f"{report}: {result.get('images', 0)} image(s) decoded; {checks}; {len(viewer_problems)} problem(s)")
    for p in problems:
        print(f"check_report_html: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
