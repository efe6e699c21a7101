"""The token cache under concurrent writers (two ranks loading one corpus at once)."""

import threading
import time

import numpy as np

from mixattn.data import corpora
from mixattn.models.hf.tokenizer import ByteTokenizer
from mixattn.paths import locked


def test_a_second_loader_waits_for_the_first_and_reuses_its_tokens(tmp_path, monkeypatch):
    """While one process tokenises (it holds the cache lock), a second must wait and then reuse the
    result, not tokenise again: re-tokenising replaced the folder under the first process while it
    memory-mapped it (a FileNotFoundError on the train split, seen in CI with two ranks)."""
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be, that is the question. " * 50)
    files, tok = corpora.corpus_files(str(corpus)), ByteTokenizer()
    root = corpora.token_cache(files, tok, 0.05)
    real, calls, got = corpora._tokenise, [], {}
    monkeypatch.setattr(corpora, "_tokenise", lambda *a: calls.append(a) or real(*a))
    with locked(root.parent, wait=True):  # "the first process", in the middle of its tokenising
        waiter = threading.Thread(target=lambda: got.setdefault("data", corpora.load_corpus(str(corpus))))
        waiter.start()
        time.sleep(0.3)  # time for the second loader to reach the lock (without one, it tokenises now)
        assert "data" not in got, "the second loader did not wait for the cache lock"
        real(files, tok, 0.05, root, "c")  # the first process's tokens land while the second waits
    waiter.join(30)
    assert not waiter.is_alive()
    assert calls == [], "the second loader tokenised again instead of reusing the first one's cache"
    ids = np.frombuffer(corpus.read_bytes(), dtype=np.uint8)
    np.testing.assert_array_equal(np.concatenate([got["data"].train, got["data"].val]), ids)
