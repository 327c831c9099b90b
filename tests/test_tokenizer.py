import torch

from diffusion_caption.tokenizer import CaptionTokenizer


def test_round_trip_and_layout(tokenizer, tmp_path):
    caption = "a small red circle to the left of a large green triangle on a dark blue background"
    ids = tokenizer.encode([caption], 24)[0].tolist()
    assert ids[0] == tokenizer.cls_id
    assert tokenizer.sep_id in ids and ids[-1] == tokenizer.pad_id
    assert tokenizer.hf.unk_token_id not in ids  # every world word is in the vocabulary
    assert tokenizer.decode(ids) == caption
    tokenizer.save_pretrained(str(tmp_path))
    again = CaptionTokenizer.from_pretrained(str(tmp_path))
    assert again.encode([caption], 24).tolist() == [ids]
    assert again.decode(ids) == caption


def test_decode_stops_at_sep_and_drops_specials(tokenizer):
    ids = tokenizer.encode(["two blue squares"], 10)[0].tolist()
    sep = ids.index(tokenizer.sep_id)
    garbage_after = ids[:sep + 1] + tokenizer.encode(["red star"], 10)[0].tolist()[1:sep]
    assert tokenizer.decode(garbage_after) == "two blue squares"
    assert tokenizer.decode([tokenizer.cls_id, tokenizer.pad_id] + ids[1:]) == "two blue squares"


def test_word_ids_encode_as_their_decoded_text_does(tokenizer):
    captions = ["a red circle on a gray background", "two shapes: a small blue star and a green square", "a"]
    ids = tokenizer.encode(captions, 24)
    words = [[i for i in row.tolist() if i not in tokenizer.special_ids] for row in ids]
    assert tokenizer.decode_batch(words) == [tokenizer.decode(w) for w in words]
    pieces = {i for t, i in tokenizer.hf.get_vocab().items() if t.startswith("##")}
    if not any(i in pieces for w in words for i in w):
        assert torch.equal(tokenizer.encode_ids(words, 24), tokenizer.encode(tokenizer.decode_batch(words), 24))
    assert tokenizer.same_vocabulary(tokenizer) and not tokenizer.same_vocabulary(object())
    # where the round trip through text could tokenise otherwise, or the caption does not fit: no ids
    if pieces:
        assert tokenizer.encode_ids([words[0] + [min(pieces)]], 24) is None
    assert tokenizer.encode_ids([words[0]], len(words[0]) + 1) is None
    assert tokenizer.encode_ids([[tokenizer.sep_id]], 24) is None


def test_token_strings_are_the_tokenizers_own_even_past_its_vocabulary(tokenizer):
    """Read from a table made once; an id the table does not hold goes to the tokenizer (which says None)."""
    every = list(range(tokenizer.vocab_size))
    assert tokenizer.token_strings(every) == tokenizer.hf.convert_ids_to_tokens(every)
    assert tokenizer.token_strings([tokenizer.cls_id, tokenizer.vocab_size + 5]) == ["[CLS]", None]
