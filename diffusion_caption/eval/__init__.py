"""Evaluation: caption metrics (``metrics``: BLEU, METEOR, ROUGE-L, CIDEr by the COCO protocol), the
evaluation protocol over a split (``evaluation``), step-by-step reports of a denoising run
(``step_report``) and side-by-side comparisons of two captions (``compare``).

Nothing in the captioner imports this package.
"""
