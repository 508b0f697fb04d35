"""``medssl report``: one valid, self-contained HTML file with every section of a run."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from medssl.cli import main
from medssl.errors import ConfigError
from medssl.eval.results import write_results
from medssl.report import build_report
from medssl.report.plots import read_metrics_csv, roc_pr_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in ("img", "meta", "br", "link"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"unbalanced </{tag}> (open: {self.open[-3:]})"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def _png(tmp_path, name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot(1, 1, 1).imshow(np.random.default_rng(0).random((8, 8)))
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _fake_run(root, name="run", predictions=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method:\n  name: mae\nmodel:\n  backbone: vit_tiny_patch16_224 # <tiny>\n")
    lines = ["step,epoch,loss,lr,backbone_eff_rank,backbone_std"]
    lines += [f"{s},0,{2.0 / s:.4f},{1e-3 * (1 - s / 40):.6f},{3 + s / 10},{0.5}" for s in (10, 20, 30, 40)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    _png(run, "reconstructions/step_000040.png")
    rows = [{"encoder": "mae", "protocol": "linear", "label_fraction": f, "seed": sd, "n_train": 10,
             "metrics": {"auc_macro": 0.6 + 0.1 * f + 0.01 * sd, "accuracy": 0.5}, "notes": []}
            for f in (0.1, 1.0) for sd in (0, 1)]
    write_results(rows, run / "eval_linear", meta={"data": "phantom2d", "protocol": "linear"})
    _png(run, "eval_collapse/collapse_spectrum.png")
    write_results([{**rows[0], "protocol": "collapse", "metrics": {"eff_rank": 3.0}}], run / "eval_collapse")
    if predictions:
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, 50)
        s = rng.dirichlet(np.ones(3), 50)
        np.savez(run / "eval_linear" / "predictions.npz", y_true=y, scores=s, encoder="mae", label_fraction=1.0, seed=0)
    return run


def _parse(path):
    page = path.read_text(encoding="utf-8")
    p = _Collect()
    p.feed(page)
    p.close()
    assert p.open == [], f"unclosed tags: {p.open}"
    return page, p


def _assert_self_contained(p):
    imgs = [a for t, a in p.tags if t == "img"]
    for a in imgs:
        src = a["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    for _, a in p.tags:
        for key in ("src", "href"):
            assert not str(a.get(key) or "").lower().startswith(("http:", "https:", "//")), a
    assert not any(t in ("script", "link", "iframe") for t, _ in p.tags)
    return imgs


def test_single_run_report_has_every_section(tmp_path):
    run = _fake_run(tmp_path)
    path = build_report([run])
    assert path == run / "report.html"
    page, p = _parse(path)
    imgs = _assert_self_contained(p)
    alts = [a["alt"] for a in imgs]
    for alt in ("training loss", "learning rate", "effective rank over training", "embedding std over training",
                "collapse spectrum", "reconstruction step_000040"):
        assert alt in alts
    assert any(a.startswith("ROC and PR") for a in alts)
    headings = [d.strip() for d in p.text]
    for section in ("Configuration", "Training curves", "Collapse", "Reconstructions", "Evaluation", "ROC / PR curves"):
        assert section in headings
    assert "# &lt;tiny&gt;" in page  # the YAML is shown escaped
    assert "10 % of the training labels" in headings and "100 % of the training labels" in headings
    # mean ± std over seeds 0, 1 of auc 0.61 / 0.62 at 10 %
    assert f"{0.615:.3f} ± {np.std([0.61, 0.62], ddof=1):.3f}" in page


def test_several_runs_side_by_side_and_missing_parts_explained(tmp_path):
    a = _fake_run(tmp_path / "a", "run")
    b = tmp_path / "b" / "run"
    b.mkdir(parents=True)
    (b / "config.yaml").write_text("method:\n  name: mocov2\n")
    with pytest.raises(ConfigError, match="--out"):
        build_report([a, b])
    out = build_report([a, b], tmp_path / "both.html")
    page, p = _parse(out)
    _assert_self_contained(p)
    assert page.count("repeat(2, minmax(0, 1fr))") == 6  # every section has one column per run
    h3 = [p.text[i] for i in range(len(p.text))]
    assert "a/run" in h3 and "b/run" in h3
    assert "no reconstructions" in page and "no evaluation found" in page


def test_report_without_predictions_says_so(tmp_path):
    run = _fake_run(tmp_path, predictions=False)
    page, _ = _parse(build_report([run]))
    assert "no test predictions saved (predictions*.npz)" in page


def test_metrics_csv_reader_and_roc_plot(tmp_path):
    run = _fake_run(tmp_path)
    cols = read_metrics_csv(run / "metrics.csv")
    np.testing.assert_allclose(cols["step"], [10, 20, 30, 40])
    np.testing.assert_allclose(cols["loss"], [0.2, 0.1, 0.0667, 0.05])
    png = roc_pr_plot(np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.9, 0.6, 0.4, 0.3]), title="binary")
    assert png.startswith(PNG_MAGIC)


def test_cli_report_and_headless_browser(tmp_path, capsys):
    run = _fake_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert "report written to" in capsys.readouterr().out
    names = ("chromium", "chromium-browser", "google-chrome")
    browser = next((shutil.which(b) for b in names if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless browser installed (chromium / google-chrome)")
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                          (run / "report.html").as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert "ROC / PR curves" in dom and "data:image/png;base64," in dom
