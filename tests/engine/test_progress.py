"""Progress everywhere: one mechanism (:class:`medssl.engine.logging.TaskProgress`) -- plain periodic lines when the
stream is not a terminal, a rich bar with ETA on a terminal (bars open at once share one display) -- used by
evaluate, compare, embed and feature extraction."""

from __future__ import annotations

import io
import re

import pytest

from medssl.cli import main
from medssl.engine.logging import Progress, TaskProgress, progress_every


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_update_when_interval_is_zero():
    out = io.StringIO()
    with TaskProgress("features train", 10, stream=out, unit="images", every=0) as bar:
        for _ in range(4):
            bar.advance(3)  # the last advance overshoots: the count stops at the total
    lines = out.getvalue().splitlines()
    assert [re.search(r": (\d+)/10 images \((\d+)%\)", ln).groups() for ln in lines] == [
        ("3", "30"), ("6", "60"), ("9", "90"), ("10", "100")]
    assert all(re.search(r"elapsed \d+:\d\d  eta (\d+:\d\d|\?)", ln) for ln in lines)
    assert lines[-1].endswith("eta 0:00")


def test_plain_lines_are_periodic_and_the_last_always_prints():
    out = io.StringIO()
    with TaskProgress("linear", 6, stream=out, unit="fits", every=3600) as bar:
        for i in range(6):
            bar.advance(1, info=f"seed {i}")
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]
    assert "6/6 fits (100%)" in out.getvalue() and out.getvalue().rstrip().endswith("seed 5")


def test_disabled_and_empty_tasks_print_nothing():
    out = io.StringIO()
    with TaskProgress("x", 5, stream=out, enabled=False, every=0) as bar:
        bar.advance(5)
    with TaskProgress("y", 0, stream=out, every=0) as bar:
        bar.advance(1)
    assert out.getvalue() == ""


def test_rich_bar_on_a_terminal_with_nested_bars():
    tty = FakeTTY()
    with TaskProgress("compare", 2, stream=tty, unit="evaluations") as outer:
        for _ in range(2):
            with TaskProgress("features train", 4, stream=tty) as inner:  # a second live bar: shared display
                inner.advance(4)
            outer.advance(1)
    text = tty.getvalue()
    assert "compare" in text and "2/2" in text and "\x1b[" in text  # drawn by rich (control codes)
    assert "elapsed" not in text  # no plain lines on a terminal
    # the pretraining display is the same mechanism: it opens after the others closed
    bar = Progress(3, stream=tty)
    bar.update(3, 0, 1.0, 0.1, 10.0)
    bar.close()
    assert "pretrain" in tty.getvalue()


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEDSSL_PROGRESS_EVERY", "2.5")
    assert progress_every() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("MEDSSL_PROGRESS_EVERY", bad)
        assert progress_every() == 10.0


@pytest.fixture()
def every_update(monkeypatch):
    monkeypatch.setenv("MEDSSL_PROGRESS_EVERY", "0")


DATA = ["--data", "phantom2d:48", "--image-size", "32", "--batch-size", "16"]


def test_evaluate_shows_feature_and_fit_progress(tmp_path, capsys, every_update):
    code = main(["evaluate", "--init", "random", *DATA, "--protocol", "knn", "--label-fractions", "0.5,1",
                 "--seeds", "0,1", "--out", str(tmp_path / "ev")])
    cap = capsys.readouterr()
    assert code == 0
    for split in ("train", "val", "test"):
        assert re.search(rf"^features {split}: \d+/\d+ images \(100%\)", cap.err, re.M), cap.err
    assert re.search(r"^knn random-init: 4/4 fits \(100%\).*labels 1 seed 1$", cap.err, re.M), cap.err
    assert "features train" not in cap.out  # stdout keeps the table
    code = main(["evaluate", "--init", "random", *DATA, "--protocol", "knn", "--label-fractions", "1",
                 "--seeds", "0", "--out", str(tmp_path / "q"), "--quiet"])
    assert code == 0 and "images (" not in capsys.readouterr().err


def test_embed_and_compare_show_progress(tmp_path, capsys, every_update):
    assert main(["embed", "--init", "random", *DATA, "--out", str(tmp_path / "emb")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^embed random(-init)?: 48/48 images \(100%\)", err, re.M), err
    assert main(["embed", "--init", "random", *DATA, "--out", str(tmp_path / "e2"), "--quiet"]) == 0
    assert "images (" not in capsys.readouterr().err
    code = main(["compare", "--init", "random", *DATA, "--protocol", "knn", "linear", "--label-fractions", "1",
                 "--seeds", "0", "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert code == 0
    assert re.search(r"^compare: 1/2 evaluations \(50%\).*knn baselines$", err, re.M), err
    assert re.search(r"^compare: 2/2 evaluations \(100%\).*linear baselines$", err, re.M), err


def test_collapse_protocol_shows_feature_progress(tmp_path, capsys, every_update):
    code = main(["evaluate", "--init", "random", *DATA, "--protocol", "collapse", "--out", str(tmp_path / "c")])
    assert code == 0
    assert re.search(r"^features random(-init)?: 48/48 images \(100%\)", capsys.readouterr().err, re.M)


def test_inspect_and_skip_bad_show_progress(tmp_path, capsys, every_update):
    assert main(["inspect", "--data", "phantom2d:8"]) == 0
    err = capsys.readouterr().err
    assert re.findall(r"^inspect: (\d+)/8 items", err, re.M) == [str(i) for i in range(1, 9)]
    assert main(["inspect", "--data", "phantom2d:8", "--quiet"]) == 0
    assert "items (" not in capsys.readouterr().err
    code = main(["pretrain", "--method", "mocov2", "--data", "phantom2d:16", "--image-size", "32", "--batch-size", "8",
                 "--max-steps", "1", "--skip-bad", "--out", str(tmp_path / "run"), "--set", "log.backends=[csv]"])
    assert code == 0
    assert re.search(r"^check data \(--skip-bad\): 16/16 items \(100%\)", capsys.readouterr().err, re.M)
