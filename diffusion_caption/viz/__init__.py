"""What the app draws: the step viewer drawn in the browser (``step_viewer``: every step's chips, status,
confidence heatmap and trajectory map, the step shown chosen on the page), the UMAP map of the vocabulary
(``vocab_map``), other HTML views of a trace (``html_views``) and the colour scale they share (``common``)."""
