"""Models trained on frozen Virchow embeddings.

Tile level: :mod:`~virchow.downstream.probe` (linear and kNN probes) with inputs from
:mod:`~virchow.downstream.tile_inputs` and :mod:`~virchow.downstream.image_folder`.
Slide level: :mod:`virchow.downstream.mil` (ABMIL and Agata aggregators, training and prediction)
and :mod:`~virchow.downstream.heatmap` (attention overlays). Metrics with bootstrap intervals live
in :mod:`~virchow.downstream.metrics` and fold construction in :mod:`~virchow.downstream.splits`.
"""
