"""Self-contained HTML reports of pretraining runs (:func:`medssl.report.html.build_report`)."""

from medssl.report.html import build_report

__all__ = ["build_report"]
