"""Write a cross-validation result as ``metrics.json``, ``report.md`` and ``predictions.csv``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from virchow import __version__
from virchow.downstream.metrics import BootstrapConfig, MetricCI
from virchow.downstream.mil.bags import BagTable
from virchow.downstream.mil.cross_validation import CVResult
from virchow.downstream.tile_inputs import format_names

_logger = logging.getLogger(__name__)

METRIC_LABELS = {"auroc": "AUROC", "auprc": "AUPRC", "balanced_accuracy": "balanced accuracy"}


def _metrics_dict(metrics: dict[str, dict[str, MetricCI]]) -> dict:
    return {label: {name: value.to_dict() for name, value in values.items()} for label, values in metrics.items()}


def write_mil_report(
    result: CVResult, table: BagTable, config: dict, bootstrap: BootstrapConfig, out_dir: Path
) -> dict[str, Path]:
    """Write the report files into ``out_dir`` and return their paths by kind.

    Args:
        result: cross-validation outcome.
        table: the bags, for class names and unmatched slides.
        config: resolved run configuration (JSON-able), stored in ``metrics.json``.
        bootstrap: interval settings, stated in the report.
        out_dir: output folder, created if needed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions = out_dir / "predictions.csv"
    result.predictions.drop(columns=["row"]).to_csv(predictions, index=False)

    payload = {
        "virchow_version": __version__,
        "config": config,
        "data": {
            "n_bags": len(table.bags),
            "label_cols": table.label_cols,
            "classes": table.classes,
            "feature_dim": table.feature_dim,
            "grouped_by_patient": table.grouped,
            "slides_without_features": table.missing_features,
            "feature_files_not_in_table": table.unlisted_files,
        },
        "split_mode": result.split_mode,
        "metric_notes": {
            "auroc_auprc": "binary (score of the second class) for 2 classes, otherwise macro one-vs-rest",
            "confidence_interval": (
                f"{bootstrap.confidence:.0%} percentile bootstrap over bags, {bootstrap.n_resamples} resamples, seed {bootstrap.seed}"
            ),
        },
        "folds": [
            {
                "seed": r.seed,
                "fold": r.fold,
                "sizes": r.sizes,
                "best_epoch": r.best_epoch,
                "best_val_loss": r.best_val_loss,
                "epochs_run": r.epochs_run,
                "checkpoint": str(
                    r.checkpoint.relative_to(out_dir) if r.checkpoint.is_relative_to(out_dir) else r.checkpoint
                ),
                "metrics": {split: _metrics_dict(m) for split, m in r.metrics.items()},
            }
            for r in result.folds
        ],
        "pooled": {str(seed): _metrics_dict(m) for seed, m in result.pooled.items()},
        "seed_summary": result.seed_summary(),
    }
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")

    report_path = out_dir / "report.md"
    report_path.write_text(_markdown(result, table, config, bootstrap))
    _logger.info("wrote metrics.json, report.md and predictions.csv to %s", out_dir)
    return {"metrics": metrics_path, "report": report_path, "predictions": predictions}


def _markdown(result: CVResult, table: BagTable, config: dict, bootstrap: BootstrapConfig) -> str:
    model = config.get("model", {})
    train = config.get("train", {})
    lines = [
        "# MIL cross-validation report",
        "",
        f"- Aggregator: {model.get('kind')} (hidden {model.get('hidden_dim')}, dropout {model.get('dropout')})",
        f"- Bags: {len(table.bags)} by {config.get('data', {}).get('bag_by', 'slide')}, feature dim {table.feature_dim}",
        f"- Splits: {_split_text(result, table, config)}",
        f"- Training: AdamW lr {train.get('lr')}, weight decay {train.get('weight_decay')}, up to {train.get('max_epochs')} epochs, "
        f"patience {train.get('patience')}, class weights {train.get('class_weight')}, standardise {train.get('standardize')}",
        f"- Seeds: {', '.join(str(s) for s in config.get('seeds', []))}",
        f"- Intervals: {bootstrap.confidence:.0%} percentile bootstrap over bags, {bootstrap.n_resamples} resamples, seed {bootstrap.seed}",
        "- AUROC/AUPRC: binary (positive = second class) for two classes, otherwise macro one-vs-rest",
    ]
    if table.missing_features:
        lines.append(f"- Slides without features (left out): {format_names(table.missing_features)}")
    if table.unlisted_files:
        lines.append(f"- Feature files not in the table (ignored): {format_names(table.unlisted_files)}")
    lines.append("")

    for task, label in enumerate(table.label_cols):
        lines += [f"## {label} (classes: {', '.join(table.classes[task])})", ""]
        names = list(next(iter(result.pooled.values()))[label])
        header = "| seed | fold | split | " + " | ".join(METRIC_LABELS.get(n, n) for n in names) + " | best epoch |"
        lines += [header, "|" + "---|" * (len(names) + 4)]
        for seed, pooled in result.pooled.items():
            cells = " | ".join(pooled[label][n].format() for n in names)
            lines.append(f"| {seed} | pooled | {'test' if result.split_mode == 'kfold' else 'held out'} | {cells} | |")
        for record in result.folds:
            for split, metrics in record.metrics.items():
                cells = " | ".join(metrics[label][n].format() for n in names)
                lines.append(f"| {record.seed} | {record.fold} | {split} | {cells} | {record.best_epoch} |")
        summary = result.seed_summary()[label]
        lines += [
            "",
            "Pooled metric over seeds (mean ± std): "
            + ", ".join(f"{METRIC_LABELS.get(n, n)} {v['mean']:.3f} ± {v['std']:.3f}" for n, v in summary.items()),
            "",
        ]
    lines += ["Checkpoints: `checkpoints/seed{S}_fold{K}.pt`, predictions: `predictions.csv`", ""]
    return "\n".join(lines)


def _split_text(result: CVResult, table: BagTable, config: dict) -> str:
    if result.split_mode == "split_column":
        return "given split column (train / val for early stopping / test)"
    grouping = "grouped by patient" if table.grouped else "grouped by bag (no patient column)"
    n_folds = config.get("cv", {}).get("n_folds")
    return f"{n_folds}-fold StratifiedGroupKFold, {grouping}. Test fold k, validation fold k+1 for early stopping"
