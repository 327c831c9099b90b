"""Many users at once: 20 concurrent /caption requests through gradio_client against one running app.

Each request has its own image and seed; each must come back complete and equal to what the library
gives for that image and seed (no mixing of users' traces), with the queue's concurrency limit in place.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from app_server import memory_mib, running_app, save_tiny_checkpoint, write_examples

STEPS = 4
USERS = 20


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, clip_encoder):
    d = tmp_path_factory.mktemp("app-many")
    ck = save_tiny_checkpoint(tokenizer, clip_encoder, str(d / "ckpt"), seed=1)
    examples = write_examples(str(d / "examples"))
    (d / "cache").mkdir()
    return ck, str(d / "examples"), examples, str(d / "cache")


def test_twenty_concurrent_users_each_get_their_own_trace(files):
    from gradio_client import Client, handle_file

    from diffusion_caption import Captioner

    ck, examples_dir, examples, cache = files
    requests = [(examples[i % len(examples)], 100 + i) for i in range(USERS)]
    procs = []
    with running_app(ck, examples_dir, cache, processes=procs) as url:
        def one(req):
            image, seed = req
            client = Client(url, verbose=False)  # one client per user, as separate browsers would be
            return client.predict(handle_file(image), STEPS, "ddim", 1.0, False, seed, api_name="/caption")

        pid = procs[0].pid
        before = memory_mib(pid)
        with ThreadPoolExecutor(max_workers=USERS) as pool:
            results = list(pool.map(one, requests))
        first_wave = memory_mib(pid)
        with ThreadPoolExecutor(max_workers=USERS) as pool:  # a second wave of 20 users, other seeds
            again = list(pool.map(one, [(image, seed + USERS) for image, seed in requests]))
        second_wave = memory_mib(pid)

    # memory stays bounded: 20 users at once cost the server little beyond its idle footprint, and a second
    # wave of 20 more leaves it about where the first did (nothing kept per user)
    assert first_wave["peak"] - before["rss"] < 300, (before, first_wave)
    assert second_wave["rss"] - first_wave["rss"] < 60, (first_wave, second_wave)
    assert all(r["done"] for r in again)

    cap = Captioner.from_pretrained(ck)
    for (image, seed), res in zip(requests, results):
        assert res["done"] is True and len(res["steps"]) == STEPS
        assert res["settings"]["seed"] == seed
        expected = cap.caption(image, steps=STEPS, sampler="ddim", guidance=1.0, seed=seed)
        assert res["steps"][-1]["token_ids"] == expected.final.token_ids, (image, seed)
        assert res["text"] == expected.text
    # different seeds really give different traces, so a mix-up could not go unnoticed
    assert len({tuple(r["steps"][0]["token_ids"]) for r in results}) > 1
