"""What the app draws: per-step plots (``plots``), the UMAP map of the vocabulary (``vocab_map``) and the
HTML views of a trace (``html_views``)."""
