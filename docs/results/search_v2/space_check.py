"""Dense SmolLM2-135M on six 2k passkey prompts, three ways of ending the generation prompt:

- ``space``: the prompt as ``mixattn.data.tasks`` builds it, ending with the separating space token;
- ``prefix``: the same without that space (how prompts ended before this round);
- ``free``: no answer prefix at all (the assistant turn starts empty).

    python docs/results/search_v2/space_check.py   # about 3 minutes on 2 CPU cores
"""

import torch

from mixattn.compress.pipeline import load_model
from mixattn.data import corpus_tokens, tasks
from mixattn.eval import retrieval

L, DEPTHS = 2048, (0.1, 0.3, 0.5, 0.7, 0.9, 0.2)


def main():
    model, tok = load_model("smollm2-135m")
    hay = corpus_tokens("shakespeare", tok, 4 * L + 200, split="val")
    for variant in ("space", "prefix", "free"):
        hits = 0
        for d in DEPTHS:
            s = tasks.make("passkey", tok, hay, L, d, tasks.prompt_seed("passkey", L, d, 0))
            ids = list(s.prompt_ids)
            if variant != "space":
                assert tok.decode(ids[-1:]) == " "
                ids = ids[:-1]
            if variant == "free":  # the assistant turn starts empty: cut the answer prefix off
                text = tok.decode(ids)
                ids = tok.encode(text[: text.rindex("The pass key is")])
            s.prompt_ids = s.context_ids = ids
            r = retrieval.score(model, tok, s, 24)
            hits += r["hit"]
            print(f"{variant:6s} depth {d}: hit {r['hit']!s:5s} {r['generated'][:60]!r}", flush=True)
        print(f"{variant}: {hits} / {len(DEPTHS)} hits\n", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
