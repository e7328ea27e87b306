"""coursekit.progress: a finished run ends at 100 % (green), and a notebook bar leaves text, not a widget."""

import io

import pytest
import torch
from torch import nn

from coursekit import progress
from coursekit.progress import finish, progress_bar, static_bundle
from coursekit.style import stylize, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bars_on(monkeypatch):
    monkeypatch.delenv("COURSEKIT_STATIC", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


class _Handle:
    def __init__(self):
        self.updates = []

    def update(self, obj, raw=False):
        assert raw
        self.updates.append(obj)


@pytest.fixture
def fake_notebook(monkeypatch, bars_on):
    """tqdm.auto behaving as in a Jupyter kernel, with IPython's display recorded instead of shown."""
    import IPython.display
    import tqdm.auto
    import tqdm.notebook

    shown, handles = [], []

    def display(obj, display_id=None, **_):
        shown.append(obj)
        if display_id:
            handles.append(_Handle())
            return handles[-1]
        return None

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.notebook.tqdm)
    return shown, handles


def test_finish_closes_a_bar_stopped_early_at_100_percent(bars_on):
    out = io.StringIO()
    bar = progress_bar(total=300, progress=True, desc="stylize", file=out, ascii=True)
    bar.update(149)
    finish(bar)
    assert bar.total == 149 and bar.n == 149
    assert "100%" in out.getvalue().splitlines()[-1].split("\r")[-1]
    finish(bar)  # twice, or on a closed bar: nothing happens
    hidden = progress_bar(total=3, progress=False)
    finish(hidden)  # a hidden bar: nothing to do, no error


def test_notebook_bar_is_replaced_by_its_final_line(fake_notebook):
    shown, handles = fake_notebook
    bar = progress_bar(total=300, progress=True, desc="stylize (lbfgs)", unit="eval", leave=True)
    assert type(bar).__name__ == "NotebookBar" and len(handles) == 1
    bar.update(149)
    finish(bar)  # the budget ran out before the nominal count: complete all the same
    (final,) = handles[0].updates
    assert "100%" in final["text/plain"] and "149/149" in final["text/plain"]
    assert "#2e7d32" in final["text/html"] and "application/vnd.jupyter.widget-view+json" not in final

    bar = progress_bar(total=100, progress=True, desc="texture (adam)")
    bar.update(40)
    bar.close()  # an interrupt or an error: red, where it stopped
    (final,) = handles[1].updates
    assert "40%" in final["text/plain"] and "40/100" in final["text/plain"] and "#c62828" in final["text/html"]

    for _ in progress_bar(range(3), progress=True, desc="octave", leave=False):
        pass  # a finished leave=False bar vanishes, as in tqdm, but leaves no widget behind
    assert handles[2].updates == [{"text/plain": ""}]


def test_static_bundle_is_the_final_text_line(bars_on):
    bar = progress_bar(total=4, progress=True, desc="demo", file=io.StringIO())
    bar.update(4)
    bundle = static_bundle(bar, "success")
    assert set(bundle) == {"text/plain", "text/html"}
    assert bundle["text/plain"].startswith("demo: 100%") and "4/4" in bundle["text/plain"]
    bar.close()


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, stride=2),
                         nn.ReLU()).eval().requires_grad_(False)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_style_runs_end_at_100_percent_of_their_evaluations(fake_notebook, optimizer):
    """The bar counts function evaluations; L-BFGS's line search spends several per step, and the
    last Adam step stopped the loop one count short: both used to end red (50 %, 99 %)."""
    shown, handles = fake_notebook
    g = torch.Generator().manual_seed(0)
    photo, painting = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    r = stylize(_tiny_net(), photo, painting, style_layers=["1", "3"], content_layer="3", optimizer=optimizer,
                max_evals=30)
    t = synthesize(_tiny_net(), painting, layers=["1", "3"], optimizer=optimizer, max_evals=20)
    assert r.evaluations == 30 and t.evaluations == 20
    finals = [h.updates[-1]["text/plain"] for h in handles]
    assert len(finals) == 2
    assert "100%" in finals[0] and "30/30" in finals[0]
    assert "100%" in finals[1] and "20/20" in finals[1]
    assert all("#2e7d32" in h.updates[-1]["text/html"] for h in handles)


def test_notebook_class_is_cached():
    assert progress._notebook_bar_class() is progress._notebook_bar_class()
