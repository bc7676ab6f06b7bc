"""The HTML report: self-contained, and rendered by headless Chromium without errors.

The Chromium test injects a small checker into a copy of the report: it records script errors
(``window.onerror``, ``console.error``) and, after loading, whether every image decoded, into a
``<pre>`` element that ``--dump-dom`` prints.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from synthmed.datasets import simulate_cohort
from synthmed.evaluation import Report, evaluate

FIGURES = (
    "marginals",
    "structure",
    "trajectories",
    "patients",
    "correlations",
    "observation-rates",
    "utility",
    "privacy-distances",
    "training-history",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
CHECKER = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); __consoleError(...args); };
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const result = {
    errors: window.__errors,
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    figures: Array.from(document.querySelectorAll("figure")).map(f => f.id),
  };
  const out = document.createElement("pre");
  out.id = "synthmed-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Report:
    cohort = simulate_cohort(160, seed=0)
    train, holdout = cohort.split(test_size=0.5, seed=0)
    synthetic = simulate_cohort(80, seed=1)
    synthetic.metadata["history"] = {
        "epoch": [1, 2, 3, 4],
        "generator": [3.0, 2.1, 1.7, 1.5],
        "discriminator": [0.9, 0.8, 0.8, 0.7],
    }
    return evaluate(holdout, synthetic, train, gru=False)


@pytest.fixture(scope="module")
def report_path(report, tmp_path_factory) -> Path:
    return report.to_html(tmp_path_factory.mktemp("report") / "report.html")


def test_report_is_one_self_contained_file(report, report_path):
    page = report_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert "<script" not in page.lower()
    for key in FIGURES:
        match = re.search(
            rf'<figure id="fig-{key}">.*?src="data:image/png;base64,([^"]+)"', page, re.S
        )
        assert match, key
        assert base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.count("<tr><td>") == len(report.scores)


def test_report_renders_in_chromium_without_errors(report_path, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (looked for `chromium` on PATH and "
            "/usr/bin/chromium); install Debian's chromium to run this test"
        )
    page = report_path.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECKER, 1)
    checked = tmp_path / "checked.html"
    checked.write_text(page, encoding="utf-8")
    profile = tmp_path / "profile"
    profile.mkdir()
    result = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'<pre id="synthmed-check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no check output; chromium said: {result.stderr[-2000:]}"
    check = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["errors"] == []
    assert check["broken"] == []
    assert check["images"] == len(FIGURES)
    assert sorted(check["figures"]) == sorted(f"fig-{key}" for key in FIGURES)
    console_errors = [
        line
        for line in result.stderr.splitlines()
        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
    ]
    assert console_errors == []
