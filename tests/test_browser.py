"""A real browser: JupyterLab in headless Chromium runs a lecture's explorer and an exercise check.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them) and selenium (the dev extra). Skipped, with the reason, when either is
missing. The server runs on a free port with a random token in a temporary copy of the notebooks;
the kernel is this Python (the course's .venv), so it tests the environment ``make test`` runs in.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ROOT / "notebooks" / "01_filters.ipynb"  # ends with an explorer (layer dropdown, channel slider)
EXERCISE = ROOT / "exercises" / "03_saliency" / "03_saliency.ipynb"


def _find(*names):
    return next((p for p in map(shutil.which, names) if p), None)


CHROMIUM = _find("chromium", "chromium-browser")
CHROMEDRIVER = _find("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is in the dev extra: pip install -e '.[dev]'")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout, what):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _explorer_part(nb: dict) -> dict:
    """The lecture's set-up cells (up to the one that loads the model), the cell that loads the photo and the
    explorer cell, in their order, with their metadata: the explorer as the lecture builds it, without the 40 s of
    other cells (nbval runs the whole lecture)."""
    def code(c):
        return "".join(c["source"]) if c["cell_type"] == "code" else ""

    cells = nb["cells"]
    setup_end = next(i for i, c in enumerate(cells) if "ck.load_model(" in code(c))
    photo = next(i for i, c in enumerate(cells) if code(c).startswith("photo = "))
    explorer = next(i for i, c in enumerate(cells) if "explore_activations(" in code(c))
    keep = [i for i, c in enumerate(cells) if (i <= setup_end and c["cell_type"] == "code") or i in (photo, explorer)]
    return dict(nb, cells=[cells[i] for i in keep])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base URL, token, folder) of a JupyterLab serving a temporary copy of a lecture and an exercise."""
    work = tmp_path_factory.mktemp("lab")
    (work / LECTURE.name).write_text(json.dumps(_explorer_part(json.loads(LECTURE.read_text())), indent=1))
    shutil.copy(EXERCISE, work / EXERCISE.name)
    port, token = _free_port(), secrets.token_hex(16)
    # its own data folder: the notebook signatures that make a copy trusted (see _sign) stay in the test
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(work / ".runtime"), JUPYTER_CONFIG_DIR=str(work / ".config"),
               JUPYTER_DATA_DIR=str(work / ".data"), COURSEKIT_THREADS="1")
    for var in ("COURSEKIT_STATIC", "MPLBACKEND"):  # a live explorer and the inline backend (conftest sets Agg)
        env.pop(var, None)
    log = open(work / "lab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.expose_app_in_browser=True"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers run as root
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}: {(work / 'lab.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait(up, 60, "jupyter lab to answer")
        yield base, token, work
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


KERNEL_IDLE = """
const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
if (!w || !w.context || !w.sessionContext || !w.sessionContext.session) return false;
if (arguments.length && !w.context.path.endsWith(arguments[0])) return false;
const k = w.sessionContext.session.kernel;
return !!k && k.status === 'idle' && w.context.isReady;
"""

BUSY_PROMPTS = """
return Array.from(document.querySelectorAll('.jp-InputPrompt')).filter(e => e.textContent.includes('*')).length;
"""

ERRORS = """
const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
const found = [];
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type !== 'code') continue;
  for (const o of c.outputs.toJSON()) if (o.output_type === 'error') found.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
}
return found;
"""


def _open(browser, lab, name):
    base, token, _ = lab
    browser.get(f"{base}/lab/tree/{name}?token={token}")
    _wait(lambda: browser.execute_script(KERNEL_IDLE, name), 90, f"{name} to open with an idle kernel")
    time.sleep(1.0)  # JupyterLab writes the kernel's spec and language into the model once it is connected
    dirty = browser.execute_script("return window.jupyterapp.shell.currentWidget.context.model.dirty;")
    assert not dirty, f"{name} is marked modified just by opening it (kernelspec or language_info differ)"


def _run(browser, command, timeout, what):
    browser.execute_script(f"window.jupyterapp.commands.execute('{command}');")
    time.sleep(1.0)
    _wait(lambda: browser.execute_script(KERNEL_IDLE) and browser.execute_script(BUSY_PROMPTS) == 0,
          timeout, what)


def test_explorer_redraws_when_a_control_changes(browser, lab):
    _open(browser, lab, LECTURE.name)
    _run(browser, "notebook:run-all-cells", 240, "the lecture's set-up and explorer cells to run")
    errors = browser.execute_script(ERRORS)
    assert not errors, f"cells raised: {errors}"
    selects = _wait(lambda: browser.find_elements("css selector", ".jp-OutputArea-output .widget-dropdown select"),
                    30, "the explorer's dropdown")
    select = selects[-1]
    box = select.find_element("xpath", "ancestor::div[contains(@class, 'widget-vbox')][1]")

    def picture():
        images = box.find_elements("css selector", "img")
        return images[-1].get_attribute("src") if images else None

    before = _wait(picture, 60, "the explorer's live figure")
    options = Select(select).options
    assert len(options) > 1, "the explorer's dropdown has one option only"
    Select(select).select_by_index(len(options) - 1)
    after = _wait(lambda: (src := picture()) and src != before and src, 90, "the explorer's figure to change")
    assert after.startswith("data:image/") and len(after) > 1000

    # Saved after the live run, the explorer's output keeps a picture for places without widgets.
    saved_path = lab[2] / LECTURE.name
    mtime = saved_path.stat().st_mtime
    browser.execute_script("window.jupyterapp.commands.execute('docmanager:save');")
    _wait(lambda: saved_path.stat().st_mtime != mtime and not browser.execute_script(
        "return window.jupyterapp.shell.currentWidget.context.model.dirty;"), 30, "the notebook to be saved")
    saved = json.loads(saved_path.read_text())
    explorers = [(o, outputs[i + 2]) for c in saved["cells"] if c["cell_type"] == "code"
                 for outputs in [c.get("outputs", [])] for i, o in enumerate(outputs)
                 if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert explorers, "the saved notebook has no explorer output"
    for widget_output, picture_output in explorers:  # the widget, its style, then its picture (PNG or JPEG)
        assert {"image/png", "image/jpeg"} & set(picture_output["data"]), "a saved explorer has no picture"
        assert "VBox(" not in "".join(widget_output["data"].get("text/plain", "")), widget_output["data"]["text/plain"]
    import nbformat

    from coursekit.offline_html import offline_html

    html = offline_html(nbformat.reads(json.dumps(saved), as_version=4))  # a static renderer: no widget state
    picture_b64 = "".join(next(v for k, v in explorers[-1][1]["data"].items() if k.startswith("image/"))).strip()
    assert picture_b64[:200] in html, "the static rendering does not show the explorer's picture"


def test_unanswered_check_shows_its_verdict(browser, lab):
    _open(browser, lab, EXERCISE.name)
    cells = json.loads(EXERCISE.read_text())["cells"]
    first_check = next(i for i, c in enumerate(cells) if c["cell_type"] == "code"
                       and any(line.startswith("check(") for line in "".join(c["source"]).splitlines()))
    count = browser.execute_script("return window.jupyterapp.shell.currentWidget.content.model.cells.length;")
    assert count == len(cells), f"the browser shows {count} cells, the file has {len(cells)}"
    # run everything above the first check cell, then the check cell itself
    browser.execute_script(f"window.jupyterapp.shell.currentWidget.content.activeCellIndex = {first_check};")
    _run(browser, "notebook:run-all-above", 120, "the cells above the first check")
    browser.execute_script(f"window.jupyterapp.shell.currentWidget.content.activeCellIndex = {first_check};")
    _run(browser, "notebook:run-cell", 120, "the check cell")
    outputs_js = f"""
const c = window.jupyterapp.shell.currentWidget.content.model.cells.get({first_check});
return c.outputs.toJSON().map(o => (o.text || '') + ((o.data && o.data['text/plain']) || '')
                                  + (o.evalue ? o.ename + ': ' + o.evalue : '')).join('\\n');
"""
    text = _wait(lambda: (t := browser.execute_script(outputs_js)) and "points" in t and t, 30,
                 "the check's verdict in the check cell's output")
    assert "0/" in text and "not implemented yet" in text, text[-1500:]
    # and the page shows it (the notebook scrolls to the cell it ran)
    shown = " ".join(e.text for e in browser.find_elements("css selector", ".jp-OutputArea-output"))
    assert "not implemented yet" in shown, "the verdict is in the notebook model but not on the page"


STUDENT_CELLS = [
    "import time\nimport numpy as np\nfrom coursekit.widgets import explorer\nfrom coursekit.progress import progress_bar",
    "def draw(ax, k):\n    ax.imshow(np.eye(8) * k, vmin=0, vmax=3)\n\nexplorer(draw, {'k': [1, 2, 3]}, title='k = {k}')",
    "for i in progress_bar(range(30), desc='steps'):\n    time.sleep(0.01)",
]

# per cell: the text shown, the pictures shown (natural width > 0) and how many of them are in a live explorer
CELL_VIEW = """
const cell = window.jupyterapp.shell.currentWidget.content.node.querySelectorAll('.jp-Notebook-cell')[arguments[0]];
const shown = e => e.offsetParent !== null && getComputedStyle(e).visibility !== 'hidden';
const images = Array.from(cell.querySelectorAll('.jp-OutputArea img')).filter(i => shown(i) && i.naturalWidth > 0);
return [cell.querySelector('.jp-OutputArea').innerText, images.length,
        images.filter(i => i.closest('.coursekit-explorer')).length];
"""


def _student_copy(folder: Path, monkeypatch) -> Path:
    """A small notebook with an explorer and a progress bar, run live (no COURSEKIT_STATIC) by nbclient
    and saved without widget state: the outputs a student's copy keeps, without its kernel's widgets."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in STUDENT_CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    for var in ("COURSEKIT_STATIC", "MPLBACKEND", "TQDM_DISABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COURSEKIT_THREADS", "1")
    # store_widget_state=False fails in nbclient 0.11 on an output widget (KeyError): store it, then drop it
    NotebookClient(nb, timeout=120, kernel_name="python3", store_widget_state=True).execute()
    nb.metadata.pop("widgets", None)
    path = folder / "student_copy.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_copy_saved_after_a_live_run_reopens_with_pictures(browser, lab, monkeypatch):
    """Issue 20: reopened in JupyterLab, a copy saved after a live run showed "Error displaying widget:
    model not found" where the explorer and the progress bar were. Now it shows the explorer's picture
    and the bar's final line, trusted (saved by JupyterLab, which signs it) or not (someone else's
    copy); run again, the explorer shows its live widget and no second picture."""
    import nbformat
    from nbformat.sign import NotebookNotary

    path = _student_copy(lab[2], monkeypatch)
    nb = nbformat.read(path, as_version=4)
    assert [len(c.outputs) for c in nb.cells] == [0, 3, 1]  # widget, style, picture; the bar's final line
    untrusted = path.with_name("someone_elses_copy.ipynb")
    other = nbformat.read(path, as_version=4)
    other.cells.append(nbformat.v4.new_markdown_cell("A copy from another machine."))  # a content not signed here
    nbformat.write(other, untrusted)
    NotebookNotary(data_dir=str(lab[2] / ".data")).sign(nb)  # as JupyterLab does when it saves
    nbformat.write(nb, path)
    for name, trusted in ((path.name, True), (untrusted.name, False)):
        _open(browser, lab, name)
        assert browser.execute_script(
            "return window.jupyterapp.shell.currentWidget.content.model.cells.get(1).trusted;") is trusted
        text, pictures, live = _wait(lambda: (v := browser.execute_script(CELL_VIEW, 1))[1] and v, 30,
                                     f"the explorer's saved picture in {name}")
        assert (pictures, live) == (1, 0), f"{name}: {pictures} pictures, {live} in a live explorer"
        assert "model not found" not in text and "Error displaying widget" not in text, f"{name}: {text!r}"
        bar = browser.execute_script(CELL_VIEW, 2)[0]
        assert "steps: 100%" in bar and "30/30" in bar, f"{name}: the bar's final line is not shown: {bar!r}"
        page = browser.find_element("css selector", ".jp-NotebookPanel:not(.lm-mod-hidden)").text
        assert "model not found" not in page, f"{name}: {page[-500:]!r}"
    _run(browser, "notebook:run-all-cells", 120, "the student's copy to run")
    text, pictures, live = _wait(lambda: (v := browser.execute_script(CELL_VIEW, 1))[2] and v, 30,
                                 "the live explorer")
    assert (pictures, live) == (1, 1), f"run live: {pictures} pictures shown, {live} in the live explorer"
