"""Choosing among candidate captions, an opt-in layer over the captioner: minimum Bayes risk over noise
draws (``mbr``), CLIP-score reranking (``rerank``) and a small learned text scorer (``text_scorer``)."""
