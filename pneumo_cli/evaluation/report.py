"""Plots and the HTML report of an evaluation folder.

The report is one HTML file with inline styles; the plots and overlay panels are separate image
files linked by relative paths, so the folder opens in a browser from disk (no server) and can
be moved or zipped as a whole. matplotlib is imported inside the functions (Agg, no display).
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from pneumo_cli.core import metrics
from pneumo_cli.core.errors import InputError
from pneumo_cli.core.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from pneumo_cli.evaluation.results import Evaluation, ImageRow

OUTCOME_COLOURS = {"TP": "#009E73", "TN": "#56B4E9", "FP": "#E69F00", "FN": "#D55E00"}
PLOT_FILES = ("roc.png", "pr.png", "dice_hist.png")


@dataclass(frozen=True)
class ReportPanel:
    """An overlay picture to show in a report section (``path`` must exist when written)."""

    section: str  # a key of pneumo_cli.evaluate.REPORT_SECTIONS
    image_id: str
    path: Path
    caption: str = ""


def _new_figure(size: tuple[float, float] = (5.0, 4.2)) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _legend(axes: Any, location: str) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc=location, fontsize=8)


def _labels_and_scores(rows: Sequence[ImageRow]) -> tuple[np.ndarray, np.ndarray | None]:
    labels = np.array([r.truth_area > 0 for r in rows], dtype=bool)
    if any(r.max_prob is None for r in rows):
        return labels, None
    return labels, np.array([r.max_prob for r in rows], dtype=np.float64)


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.any() and not labels.all())


def _plot_roc(evaluation: Evaluation, path: Path) -> Path:
    figure = _new_figure()
    axes = figure.add_subplot()
    labels, scores = _labels_and_scores(evaluation.rows)
    m = evaluation.metrics
    if scores is not None and _both_classes(labels):
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        axes.plot(fpr, tpr, color="#0072B2", label=f"max probability (AUC {m['roc_auc']:.3f})")
    else:
        axes.text(
            0.5,
            0.3,
            "no per-image probabilities (or one class):\noperating point only",
            ha="center",
            fontsize=9,
        )
    if m["specificity"] is not None and m["sensitivity"] is not None:
        axes.plot(
            [1 - m["specificity"]],
            [m["sensitivity"]],
            "o",
            color="#D55E00",
            label="masks as predicted",
        )
    axes.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="Image level: pneumothorax present?",
    )
    _legend(axes, "lower right")
    return _save_figure(figure, path)


def _plot_pr(evaluation: Evaluation, path: Path) -> Path:
    figure = _new_figure()
    axes = figure.add_subplot()
    labels, scores = _labels_and_scores(evaluation.rows)
    m = evaluation.metrics
    if scores is not None and labels.any():
        precision, recall, _ = metrics.pr_curve(labels, scores)
        label = f"max probability (AP {m['average_precision']:.3f})"
        axes.plot(
            np.concatenate(([0.0], recall)),
            np.concatenate(([1.0], precision)),
            color="#0072B2",
            label=label,
        )
    else:
        axes.text(
            0.5,
            0.3,
            "no per-image probabilities (or no positives):\noperating point only",
            ha="center",
            fontsize=9,
        )
    if m["precision"] is not None and m["sensitivity"] is not None:
        axes.plot(
            [m["sensitivity"]], [m["precision"]], "o", color="#D55E00", label="masks as predicted"
        )
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title="Image level: precision-recall",
    )
    _legend(axes, "lower left")
    return _save_figure(figure, path)


def _plot_dice_histogram(evaluation: Evaluation, path: Path) -> Path:
    figure = _new_figure((6.0, 4.2))
    axes = figure.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    groups = [(o, [r.dice for r in evaluation.rows if r.outcome == o]) for o in OUTCOME_COLOURS]
    groups = [(o, d) for o, d in groups if d]
    axes.hist(
        [d for _, d in groups],
        bins=bins,
        stacked=True,
        color=[OUTCOME_COLOURS[o] for o, _ in groups],
        label=[f"{o} ({len(d)})" for o, d in groups],
    )
    mean_dice = evaluation.metrics["mean_dice"]
    axes.axvline(
        mean_dice, color="black", linestyle="--", linewidth=1, label=f"mean Dice {mean_dice:.4f}"
    )
    axes.set(
        xlim=(0, 1),
        xlabel="Dice per image (SIIM: empty vs empty = 1)",
        ylabel="images",
        title="Per-image Dice by image-level outcome",
    )
    axes.legend(fontsize=8, loc="upper center")
    return _save_figure(figure, path)


def write_plots(evaluation: Evaluation, out_dir: Path) -> dict[str, Path]:
    """Write ``roc.png``, ``pr.png`` and ``dice_hist.png`` into ``out_dir``; name -> path."""
    return {
        "roc.png": _plot_roc(evaluation, out_dir / "roc.png"),
        "pr.png": _plot_pr(evaluation, out_dir / "pr.png"),
        "dice_hist.png": _plot_dice_histogram(evaluation, out_dir / "dice_hist.png"),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _link(target: Path, out_dir: Path) -> str:
    relative = os.path.relpath(Path(target).resolve(), out_dir.resolve())
    return html.escape(quote(Path(relative).as_posix()), quote=True)


SUMMARY_ROWS = (
    ("Mean Dice (SIIM, empty vs empty = 1)", "mean_dice"),
    ("Mean IoU (SIIM, empty vs empty = 1)", "mean_iou"),
    ("Mean Dice, positive images only", "positive_mean_dice"),
    ("Mean IoU, positive images only", "positive_mean_iou"),
    ("Sensitivity (image level)", "sensitivity"),
    ("Specificity (image level)", "specificity"),
    ("Precision (image level)", "precision"),
    ("Accuracy (image level)", "accuracy"),
    ("ROC AUC (max probability)", "roc_auc"),
    ("Images (positive / negative)", None),
)

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
img { max-width: 100%; }
.panel img { max-width: 60em; }
"""


def _summary_table(m: dict[str, Any]) -> str:
    cells = []
    for label, key in SUMMARY_ROWS:
        if key is None:
            value = f"{m['n_images']} ({m['n_positive']} / {m['n_negative']})"
        else:
            value = _fmt(m.get(key))
        cells.append(f"<tr><th>{html.escape(label)}</th><td class='num'>{value}</td></tr>")
    cm = m["confusion_matrix"]
    cells.append(
        "<tr><th>Confusion matrix</th><td class='num'>"
        f"TP {cm['tp']} &middot; FP {cm['fp']} &middot; FN {cm['fn']} &middot; TN {cm['tn']}"
        "</td></tr>"
    )
    return "<table>" + "".join(cells) + "</table>"


def _members_table(m: dict[str, Any]) -> str:
    """Each member (out of fold: each fold's model on its own fold) beside the whole."""
    members = m.get("members")
    if not members:
        return ""
    out_of_fold = m.get("mode") == "out-of-fold"
    title = "Each fold's model on its own fold" if out_of_fold else "Members and ensemble"
    head = "".join(f"<th>{name}</th>" for name in ("model", "images", "mean Dice",
                   "Dice, positives only", "mean IoU", "ROC AUC"))  # fmt: skip

    def row(name: str, values: dict[str, Any], images: Any, css: str = "") -> str:
        cells = [_fmt(values.get(key)) for key in ("mean_dice", "positive_mean_dice",
                                                    "mean_iou", "roc_auc")]  # fmt: skip
        numbers = "".join(f"<td class='num'>{cell}</td>" for cell in cells)
        return (f"<tr{css}><td><code>{html.escape(name)}</code></td>"
                f"<td class='num'>{images}</td>{numbers}</tr>")  # fmt: skip

    rows = [row(entry["run"], entry, entry["images"]) for entry in members]
    rows.append(row("all folds" if out_of_fold else "ensemble", m, m["n_images"],
                    " style='font-weight:bold'"))  # fmt: skip
    return f"<h2>{title}</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


def _context_lines(m: dict[str, Any]) -> str:
    items = []
    if m.get("split"):
        items.append(f"split <b>{html.escape(str(m['split']))}</b>")
    for name, value in (m.get("inputs") or {}).items():
        items.append(f"{html.escape(name)}: <code>{html.escape(str(value))}</code>")
    if m.get("resolution"):
        r = m["resolution"]
        at = html.escape(str(r.get("at")))
        if r.get("width") and r.get("height"):
            items.append(f"scored at {r['width']} x {r['height']} ({at} resolution)")
        else:
            items.append(f"scored at {at} resolution")
    if m.get("gate"):
        items.append("gate: " + html.escape(", ".join(f"{k}={v}" for k, v in m["gate"].items())))
    missing = m.get("missing") or {}
    if missing.get("not_in_predictions") or missing.get("not_in_truth"):
        items.append(
            f"not scored: {missing['not_in_predictions']} ImageIds without a prediction, "
            f"{missing['not_in_truth']} without truth"
        )
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>" if items else ""


def _section(
    key: str, title: str, cases: Sequence[ImageRow], panels: Sequence[ReportPanel], out_dir: Path
) -> str:
    parts = [f"<h2 id='{key}'>{html.escape(title)}</h2>"]
    if not cases:
        parts.append("<p>None.</p>")
        return "".join(parts)
    header = (
        "<tr><th>ImageId</th><th>truth px</th><th>predicted px</th><th>Dice</th>"
        "<th>max prob</th></tr>"
    )
    body = "".join(
        f"<tr><td><code>{html.escape(r.image_id)}</code></td><td class='num'>{r.truth_area}</td>"
        f"<td class='num'>{r.pred_area}</td><td class='num'>{r.dice:.4f}</td>"
        f"<td class='num'>{_fmt(r.max_prob)}</td></tr>"
        for r in cases
    )
    parts.append(f"<table>{header}{body}</table>")
    shown = [p for p in panels if p.section == key]
    if not shown:
        parts.append("<p>No overlay panels were supplied for this section.</p>")
    for panel in shown:
        caption = html.escape(panel.caption or panel.image_id)
        parts.append(
            f"<figure class='panel'><img src='{_link(panel.path, out_dir)}' alt='{caption}'>"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "".join(parts)


def write_report(
    evaluation: Evaluation,
    out_dir: Path,
    cases: dict[str, Sequence[ImageRow]],
    panels: Sequence[ReportPanel] = (),
) -> Path:
    """Write ``report.html``: summary table, the three plots, and per section the selected cases
    with any overlay ``panels``. Links are relative to ``out_dir``.

    Raises:
        InputError: a panel's file does not exist or names an unknown section.
    """
    from pneumo_cli.evaluation.results import REPORT_SECTIONS

    for panel in panels:
        if panel.section not in REPORT_SECTIONS:
            raise InputError(
                f"overlay panel {panel.path}: unknown report section '{panel.section}'"
            )
        if not Path(panel.path).is_file():
            raise InputError(
                f"overlay panel {panel.path} does not exist; render it before the report"
            )
    m = evaluation.metrics
    figures = "".join(f"<figure><img src='{name}' alt='{name}'></figure>" for name in PLOT_FILES)
    sections = "".join(
        _section(key, title, cases.get(key, ()), panels, out_dir)
        for key, title in REPORT_SECTIONS.items()
    )
    conventions = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in m["conventions"].items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pneumo evaluation</title>
<style>{STYLE}</style></head>
<body>
<h1>pneumo evaluation</h1>
{_context_lines(m)}
{_summary_table(m)}
{_members_table(m)}
<p>Per-image scores: <a href="per_image.csv">per_image.csv</a> &middot;
all numbers: <a href="metrics.json">metrics.json</a></p>
<h2>Curves</h2>
{figures}
{sections}
<h2>Conventions</h2><ul>{conventions}</ul>
<p><small>pneumo {html.escape(str(m.get("pneumo_version", "")))}</small></p>
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
