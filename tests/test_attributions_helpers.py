"""Shared helpers for the attribution tests (no tests here): a small real sentiment classifier,
tiny random models for shape tests, and manual forward passes to compare against."""

from __future__ import annotations

import functools

import numpy as np
import torch

POSITIVE = ["great", "wonderful", "excellent", "amazing", "superb", "brilliant", "delightful", "fantastic",
            "lovely", "beautiful", "perfect", "enjoyable"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "dreadful", "bad", "poor", "disappointing", "dull",
            "worst", "ugly", "annoying"]
_NOUNS = ["movie", "food", "book", "hotel", "concert", "service", "game", "trip"]
_TEMPLATES = ["The {n} was {w}.", "It is a {w} {n}.", "What a {w} {n}!", "This {n} felt {w} to me.",
              "Honestly, the {n} is {w}."]


@functools.lru_cache(maxsize=1)
def sentiment_classifier():
    """A real ``BertForSequenceClassification``: the built-in MiniLM-L6 encoder (real pretrained
    weights, frozen) with its pooler and a 2-class head trained for a few seconds on 120 obvious
    template sentences (sentiment word x neutral noun). Labels: 0 negative, 1 positive."""
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    from raylens.models.builtins import builtin_model_path
    from raylens.models.loading import LoadedModel

    path = builtin_model_path("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head is reported as missing weights
    try:
        model = BertForSequenceClassification.from_pretrained(
            path, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    model.requires_grad_(False)
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for label, words in ((1, POSITIVE), (0, NEGATIVE)):
        for w in words:
            for t in _TEMPLATES:
                texts.append(t.format(w=w, n=_NOUNS[rng.integers(len(_NOUNS))]))
                labels.append(label)
    with torch.no_grad():
        cls = model.bert(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state[:, :1]
    torch.manual_seed(0)
    head = list(model.bert.pooler.parameters()) + list(model.classifier.parameters())
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.Adam(head, lr=3e-3)
    y = torch.tensor(labels)
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(model.classifier(model.bert.pooler(cls)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, task="sequence_classification", source="test-sentiment")


@functools.lru_cache(maxsize=1)
def tiny_models():
    """Tiny random models with real tokenizers (shape tests only): a 3-class BERT classifier with
    the MiniLM tokenizer and a Llama causal LM with the SmolLM2 tokenizer, built from configs
    (no ``architectures`` recorded: the task comes from the auto mapping)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from raylens.models.builtins import builtin_model_path

    torch.manual_seed(0)
    btok = AutoTokenizer.from_pretrained(builtin_model_path("minilm-l6"))
    bert = BertForSequenceClassification(BertConfig(
        vocab_size=btok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3)).eval()
    ltok = AutoTokenizer.from_pretrained(builtin_model_path("smollm2-135m"))
    if ltok.pad_token is None:
        ltok.pad_token = ltok.eos_token
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(ltok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=256)).eval()
    return (bert, btok), (llama, ltok)


def transform(logits: torch.Tensor, mode: str) -> torch.Tensor:
    logits = logits.double()
    return {"logits": logits, "softmax": logits.softmax(-1), "log_softmax": logits.log_softmax(-1)}[mode]


@torch.no_grad()
def manual_scores(model, rows: list[list[int]], n_in: int | None, targets: list[int], mode: str = "logits",
                  task: str = "sequence_classification") -> np.ndarray:
    """Target scores of each token-id row, one forward per row (no batching, no padding).

    Classification: ``(n_rows, n_targets)`` classes; causal LM: each row is ``input + target[:-1]``
    with ``n_in`` input tokens and target ``t`` read at ``n_in - 1 + t``.
    """
    out = []
    for ids in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        if task == "sequence_classification":
            out.append(transform(logits, mode)[targets].numpy())
        else:
            vec = transform(logits[n_in - 1: n_in - 1 + len(targets)], mode)
            out.append(vec[torch.arange(len(targets)), torch.tensor(targets)].numpy())
    return np.array(out)


def masked(ids: list[int], positions, replace_id: int) -> list[int]:
    ids = list(ids)
    for p in positions:
        ids[p] = replace_id
    return ids
