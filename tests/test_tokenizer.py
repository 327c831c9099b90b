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
