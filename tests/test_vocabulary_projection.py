"""raylens.concepts.interpret.vocabulary_projection: chunked over concepts (and, for models
whose unembedding is not float32, over the vocabulary), with results equal to the one-shot
formula it replaced (the whole ``(nb_concepts, vocab)`` logits and a negated copy).

When all concepts fit in one chunk (the default up to 512 concepts) the table is bitwise the
one-shot one. Smaller chunks give the same tokens, and scores that differ by the float32
rounding of a matrix product of another shape (measured on SmolLM2: at most 2e-5 on logits
of about 20): BLAS kernels sum in an order that depends on the matrix shape."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from raylens.concepts.interpret import unembedding, vocabulary_projection


def _one_shot(dictionary: torch.Tensor, model: torch.nn.Module, k: int) -> dict[str, tuple[list, list]]:
    """The formula before chunking: ``direction -> (token ids, scores)``, each ``(nb_concepts, k)``."""
    W, g = unembedding(model)
    D = dictionary.float() * (g.float() if g is not None else 1.0)
    logits = D @ W.float().T
    top, bottom = torch.topk(logits, k, dim=1), torch.topk(-logits, k, dim=1)
    return {"promoted": (top.indices.tolist(), top.values.tolist()),
            "suppressed": (bottom.indices.tolist(), (-bottom.values).tolist())}


def _by_direction(table: pa.Table, nb_concepts: int, k: int) -> dict[str, tuple[list, list]]:
    out = {d: ([[None] * k for _ in range(nb_concepts)], [[None] * k for _ in range(nb_concepts)])
           for d in ("promoted", "suppressed")}
    for r in table.to_pylist():
        ids, scores = out[r["direction"]]
        ids[r["concept"]][r["rank"]] = r["token_id"]
        scores[r["concept"]][r["rank"]] = r["score"]
    return out


def _assert_same(table: pa.Table, reference: dict, nb_concepts: int, k: int, exact: bool = True) -> None:
    got = _by_direction(table, nb_concepts, k)
    for direction in ("promoted", "suppressed"):
        assert got[direction][0] == reference[direction][0], direction
        # the table stores float32 scores
        expected = torch.tensor(reference[direction][1], dtype=torch.float32)
        scores = torch.tensor(got[direction][1], dtype=torch.float32)
        if exact:
            assert torch.equal(scores, expected), direction
        else:
            torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)


def test_chunked_equals_one_chunk_on_smollm2(smollm):
    d_model = smollm.model.config.hidden_size
    dictionary = torch.randn(37, d_model, generator=torch.Generator().manual_seed(0))
    whole = vocabulary_projection(dictionary, smollm.model, smollm.tokenizer, k=8)
    assert whole.num_rows == 37 * 2 * 8
    _assert_same(whole, _one_shot(dictionary, smollm.model, 8), 37, 8)  # bitwise
    for chunk in (1, 5, 36):
        chunked = vocabulary_projection(dictionary, smollm.model, smollm.tokenizer, k=8, chunk_concepts=chunk)
        assert chunked.drop(["score"]).equals(whole.drop(["score"])), chunk  # same tokens, same order
        _assert_same(chunked, _one_shot(dictionary, smollm.model, 8), 37, 8, exact=False)
    with pytest.raises(ValueError, match="chunk_concepts"):
        vocabulary_projection(dictionary, smollm.model, smollm.tokenizer, chunk_concepts=0)


class _Bf16LM(torch.nn.Module):
    """A head-only language model in bfloat16: ``lm_head`` ``(vocab, d_model)`` and a final norm."""

    def __init__(self, vocab: int = 1000, d_model: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False).to(torch.bfloat16)
        self.lm_head.weight.data = torch.randn(vocab, d_model, generator=g).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(d_model).to(torch.bfloat16)
        self.norm.weight.data = (1 + 0.1 * torch.randn(d_model, generator=g)).to(torch.bfloat16)

    def get_output_embeddings(self):
        return self.lm_head


class _Tokens:
    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def test_bfloat16_unembedding_is_cast_in_vocabulary_chunks():
    model = _Bf16LM()
    dictionary = torch.randn(11, 16, generator=torch.Generator().manual_seed(2))
    reference = _one_shot(dictionary, model, 6)
    for chunk_concepts, chunk_vocab in ((256, 16_384), (4, 64), (1, 999)):
        table = vocabulary_projection(dictionary, model, _Tokens(), k=6, chunk_concepts=chunk_concepts,
                                      chunk_vocab=chunk_vocab)
        _assert_same(table, reference, 11, 6, exact=chunk_concepts >= 11)
        assert table.column("token").to_pylist()[:1] == [f"t{reference['promoted'][0][0][0]}"]
    assert model.lm_head.weight.dtype == torch.bfloat16  # the model is left as it was


_FULL_SCALE = r"""
import json, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from raylens.concepts.interpret import vocabulary_projection

class Ids:  # token strings without a 128k-token tokenizer file
    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, vocab_size=128256))
dictionary = torch.randn(16384, 64)

def peak():  # VmHWM: getrusage's ru_maxrss keeps the pre-exec peak of the (pytest) parent on Linux
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024

before = peak()
table = vocabulary_projection(dictionary, model, Ids(), k=10)
after = peak()
print(json.dumps({"rows": table.num_rows, "peak_growth": after - before}))
"""


@pytest.mark.slow
def test_full_scale_projection_stays_in_its_memory_budget():
    """16,384 concepts x a 128,256-token vocabulary on CPU: one float32 copy of the logits would be
    7.8 GiB (17.6 GiB with a negated copy and ``W.float()``); in chunks of 512 concepts the peak
    grows by the documented budget (512 x 128,256 float32 = 250 MiB) plus working copies."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FULL_SCALE], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rows"] == 16384 * 2 * 10
    assert got["peak_growth"] < 0.5 * 2**30, got  # measured 267 MiB; one unchunked float32 copy: 7.8 GiB
