"""Write a probe result as ``report.json``, ``report.md``, confusion PNGs and prediction CSVs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from virchow import __version__
from virchow.downstream.metrics import MetricCI
from virchow.downstream.plots import save_confusion_png
from virchow.downstream.probe import EvaluationResult, ProbeResult

_logger = logging.getLogger(__name__)

METRIC_LABELS = {
    "balanced_accuracy": "balanced accuracy",
    "f1_weighted": "weighted F1",
    "auroc": "AUROC",
    "auprc": "AUPRC",
}


def write_probe_report(result: ProbeResult, out_dir: Path) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (created if needed) and return their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    for method, method_result in result.methods.items():
        png = out_dir / f"confusion_{method}.png"
        scope = "pooled out-of-fold" if method_result.pooled else "held-out split"
        save_confusion_png(method_result.confusion, result.classes, png, f"{method} probe, {scope}")
        written[f"confusion_{method}"] = png

        csv = out_dir / f"predictions_{method}.csv"
        _predictions_frame(result, method_result.folds).to_csv(csv, index=False)
        written[f"predictions_{method}"] = csv

    report = _report_dict(result)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    written["json"] = json_path

    md_path = out_dir / "report.md"
    md_path.write_text(_report_markdown(result))
    written["markdown"] = md_path
    _logger.info("wrote probe report to %s", out_dir)
    return written


def _predictions_frame(result: ProbeResult, evaluations: list[EvaluationResult]) -> pd.DataFrame:
    frames = []
    for evaluation in evaluations:
        frame = pd.DataFrame(
            {
                "id": result.ids[evaluation.indices],
                "split": evaluation.name,
                "true": [result.classes[i] for i in result.y[evaluation.indices]],
                "predicted": [result.classes[i] for i in evaluation.proba.argmax(axis=1)],
            }
        )
        for k, name in enumerate(result.classes):
            frame[f"proba_{name}"] = evaluation.proba[:, k]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _metrics_dict(metrics: dict[str, MetricCI]) -> dict:
    return {name: value.to_dict() for name, value in metrics.items()}


def _report_dict(result: ProbeResult) -> dict:
    config = result.config
    methods = {}
    for method, method_result in result.methods.items():
        methods[method] = {
            "folds": [
                {"split": e.name, "n": int(e.indices.size), "params": e.params, "metrics": _metrics_dict(e.metrics)}
                for e in method_result.folds
            ],
            "pooled": _metrics_dict(method_result.pooled.metrics) if method_result.pooled else None,
            "confusion_matrix": method_result.confusion.tolist(),
        }
    return {
        "virchow_version": __version__,
        "source": result.source,
        "n_samples": result.n_samples,
        "n_features": result.n_features,
        "classes": result.classes,
        "class_counts": result.class_counts,
        "split_mode": result.split_mode,
        "grouped_by_patient": result.grouped,
        "config": result.config_dict(),
        "metric_notes": {
            "auroc": "binary for 2 classes, otherwise macro one-vs-rest over the classes present",
            "confidence_interval": (
                f"{config.bootstrap.confidence:.0%} percentile bootstrap, {config.bootstrap.n_resamples} resamples, "
                f"seed {config.bootstrap.seed}"
            ),
        },
        "methods": methods,
    }


def _report_markdown(result: ProbeResult) -> str:
    config = result.config
    boot = config.bootstrap
    lines = [
        "# Probe report",
        "",
        f"- Input: {result.source.get('kind', 'unknown')}, {result.n_samples} tiles, {result.n_features} features",
        f"- Classes ({len(result.classes)}): " + ", ".join(f"{c} ({n})" for c, n in result.class_counts.items()),
        f"- Splits: {_split_text(result)}",
        f"- Features: {'standardised per training split' if config.scaler == 'standard' else 'raw'}",
        f"- Intervals: {boot.confidence:.0%} percentile bootstrap, {boot.n_resamples} resamples, seed {boot.seed}",
        "- AUROC: binary for two classes, otherwise macro one-vs-rest",
        "",
    ]
    attributes = result.source.get("attributes") or result.source.get("embedder")
    if attributes:
        lines += [f"- Embedding provenance: `{json.dumps(attributes, default=str)}`", ""]

    for method, method_result in result.methods.items():
        lines += [f"## {_method_title(method, result)}", ""]
        if method_result.pooled:
            lines += ["Pooled out-of-fold:", "", *_metric_table([method_result.pooled]), ""]
        lines += ["Per split:", "", *_metric_table(method_result.folds), ""]
        lines += [f"Confusion matrix: `confusion_{method}.png`. Predictions: `predictions_{method}.csv`", ""]
    return "\n".join(lines)


def _split_text(result: ProbeResult) -> str:
    config = result.config
    if result.split_mode == "split_column":
        return "given split column (train / val / test)"
    grouped = "grouped by patient (StratifiedGroupKFold)" if result.grouped else "stratified"
    return f"{config.n_folds}-fold {grouped}, seed {config.seed}"


def _method_title(method: str, result: ProbeResult) -> str:
    config = result.config
    if method == "knn":
        return f"kNN probe (cosine, k={config.k}, {config.knn_weights} votes)"
    grid = ", ".join(f"{c:g}" for c in config.c_grid)
    return f"Linear probe (logistic regression, C from inner CV over {grid})"


def _metric_table(evaluations: list[EvaluationResult]) -> list[str]:
    names = list(evaluations[0].metrics)
    header = "| split | n | " + " | ".join(METRIC_LABELS.get(n, n) for n in names) + " | parameters |"
    rows = [header, "|" + "---|" * (len(names) + 3)]
    for e in evaluations:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.params.items())
        cells = " | ".join(e.metrics[n].format() for n in names)
        rows.append(f"| {e.name} | {e.indices.size} | {cells} | {params} |")
    return rows
