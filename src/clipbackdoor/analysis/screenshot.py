"""A screenshot of the Snakemake HTML report with one item open, in headless Chromium: the check that the report
really renders the tables (issue 20), and a picture for the README.

The report is a single-page app; a copy of it gets a small script that clicks through section -> subsection ->
the item's "view" control, then Chromium's own ``--screenshot`` captures the page after a virtual-time budget.
Nothing is installed or fetched: it needs a ``chromium`` (or ``chromium-browser`` / ``google-chrome``) binary.

    python -m clipbackdoor report-screenshot --report report.html --out report.png \
        --path "2. Core study" "Tables" results/default/tables/table1.html
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from clipbackdoor.errors import UserError
from clipbackdoor.io import atomic_path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# clicks each name in turn (1.5 s apart); the last one is an item: its icon-only "view" control is clicked
DRIVER = """<script>
(function (path) {
  function byText(text) {
    return Array.from(document.querySelectorAll("a, button, li, span, div, td")).filter(
      e => (e.textContent || "").trim() === text && e.children.length <= 2);
  }
  function open(text) {
    let row = byText(text).pop();
    for (let k = 0; row && k < 4; k++, row = row.parentElement) {
      const icons = Array.from(row.querySelectorAll("a, button, svg")).filter(e => !(e.textContent || "").trim());
      if (icons.length) {
        (icons[0].closest("a, button") || icons[0]).dispatchEvent(new MouseEvent("click", {bubbles: true}));
        return;
      }
    }
  }
  path.forEach((text, i) => setTimeout(() => {
    if (i < path.length - 1) { const hit = byText(text); if (hit.length) hit[hit.length - 1].click(); }
    else open(text);
  }, 1500 * (i + 1)));
})(%s);
</script>
"""


def find_browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def screenshot_report(report: str | Path, out_png: str | Path, path: list[str], size: tuple[int, int] = (1400, 900),
                      browser: str | None = None) -> Path:
    """Open ``path`` (section, subsection..., item) in the report and save a PNG of the window."""
    report, out_png = Path(report), Path(out_png)
    if not report.is_file():
        raise UserError(f"{report}: not found", fix="snakemake --report report.html --cores 1 (after a run)")
    browser = browser or find_browser()
    if browser is None:
        raise UserError("no Chromium found (chromium, chromium-browser, google-chrome)",
                        fix="install one, e.g. apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(report.read_text(encoding="utf-8") + DRIVER % json.dumps(path), encoding="utf-8")
        shot = Path(tmp) / "shot.png"
        budget = 1500 * (len(path) + 2)
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget}",
                               f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not shot.is_file():
            raise UserError(f"{browser} made no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-300:]}",
                            fix="run it by hand to see why")
        with atomic_path(out_png) as target:
            shutil.copyfile(shot, target)
    return out_png


def report_screenshot_command(args, p: None) -> None:
    """CLI command ``report-screenshot``."""
    print(screenshot_report(args.report, args.out, args.path))
