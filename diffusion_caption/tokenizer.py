"""Caption tokenizers: a WordPiece vocabulary trained on the shapes world, or DistilBERT's own.

Both are ``transformers`` fast tokenizers saved with ``save_pretrained`` (tokenizer.json and
tokenizer_config.json, no pickle). A caption is encoded as ``[CLS] words [SEP] [PAD]...`` to a fixed
length; decoding stops at the first [SEP] and drops special tokens.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CaptionTokenizer:
    """Thin wrapper giving fixed-length encoding and trace-friendly decoding over a HF fast tokenizer."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.pad_id = hf_tokenizer.pad_token_id
        self.cls_id = hf_tokenizer.cls_token_id
        self.sep_id = hf_tokenizer.sep_token_id
        self.special_ids = set(hf_tokenizer.all_special_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 512) -> "CaptionTokenizer":
        """Train a lowercase WordPiece vocabulary (BERT pre-tokenisation) on ``captions``."""
        from tokenizers import BertWordPieceTokenizer
        from transformers import DistilBertTokenizerFast

        wp = BertWordPieceTokenizer(lowercase=True)
        wp.train_from_iterator(list(captions), vocab_size=vocab_size, min_frequency=1,
                               special_tokens=SPECIAL_TOKENS, show_progress=False)
        with tempfile.TemporaryDirectory() as d:
            wp.save_model(d)
            # vocab= (not vocab_file=) is the argument transformers 5 honours
            hf = DistilBertTokenizerFast(vocab=os.path.join(d, "vocab.txt"))
        return cls(hf)

    @classmethod
    def from_pretrained(cls, path: str) -> "CaptionTokenizer":
        from transformers import DistilBertTokenizerFast

        from . import hub

        hub.require([hub.Need(path, "tokenizer", "--tokenizer DIR", files=("tokenizer.json", "vocab.txt"))])
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "tokenizer.json")) \
                and not os.path.isfile(os.path.join(path, "vocab.txt")):
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this directory")
        return cls(DistilBertTokenizerFast.from_pretrained(path))

    def save_pretrained(self, path: str) -> None:
        self.hf.save_pretrained(path)

    def encode(self, captions: list[str], length: int) -> torch.Tensor:
        """[N, length] token ids: [CLS] caption [SEP] then [PAD]; too long captions are truncated."""
        enc = self.hf(list(captions), padding="max_length", truncation=True, max_length=length)
        return torch.tensor(enc["input_ids"], dtype=torch.long)

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each id's token (``convert_ids_to_tokens``, from a table made once)."""
        table = self.__dict__.get("_tokens")
        if table is None:
            table = self._tokens = self.hf.convert_ids_to_tokens(list(range(len(self.hf))))
        ids = list(ids)
        if all(0 <= i < len(table) for i in ids):
            return [table[i] for i in ids]
        return self.hf.convert_ids_to_tokens(ids)

    def same_vocabulary(self, other) -> bool:
        """Whether ``other`` (a tokenizer of any kind) maps every token and the special tokens to the same ids."""
        return (isinstance(other, CaptionTokenizer) and (self.cls_id, self.sep_id, self.pad_id) ==
                (other.cls_id, other.sep_id, other.pad_id) and self.hf.get_vocab() == other.hf.get_vocab())

    def encode_ids(self, words: list[list[int]], length: int) -> torch.Tensor | None:
        """What ``encode`` gives for the captions that these word ids (no special tokens) decode to, built
        from the ids without the round trip through text: [CLS] words [SEP] then [PAD]. None when the two
        could differ: a continuation piece ("##...") that decoding would glue to its neighbour and encoding
        might split otherwise, or a caption too long for ``length``. Whole-word tokens decode to words that
        WordPiece maps back to the same token, so otherwise the result is exact."""
        if not hasattr(self, "_not_words"):  # continuation pieces and special tokens
            self._not_words = frozenset(i for t, i in self.hf.get_vocab().items() if t.startswith("##")) | \
                frozenset(self.special_ids)
        rows = []
        for ids in words:
            if len(ids) + 2 > length or not self._not_words.isdisjoint(ids):
                return None
            rows.append([self.cls_id, *ids, self.sep_id] + [self.pad_id] * (length - len(ids) - 2))
        return torch.tensor(rows, dtype=torch.long) if rows else torch.full((0, length), self.pad_id, dtype=torch.long)

    def words(self, ids: list[int]) -> list[int]:
        """The caption's own ids in one sequence: those before the first [SEP], special tokens dropped."""
        ids = list(ids)
        try:
            ids = ids[: ids.index(self.sep_id)]
        except ValueError:  # no [SEP]: the whole sequence
            pass
        special = self.special_ids
        return [i for i in ids if i not in special]

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        """``decode`` of every sequence, in one call to the Rust tokenizer (what ``transformers``' own
        ``batch_decode`` does for each sequence, without its per-item Python conversions)."""
        cut = [self.words(ids) for ids in batch]
        return [t.strip() for t in self.hf.backend_tokenizer.decode_batch(cut, skip_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Caption text of one sequence: everything after [CLS] up to the first [SEP], specials dropped."""
        return self.hf.decode(self.words(ids), clean_up_tokenization_spaces=False).strip()
