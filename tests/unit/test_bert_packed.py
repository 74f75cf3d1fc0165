"""examples.bert: the packed forward (real tokens only through the linear layers) gives the
padded forward's pooled embeddings, whatever the mix of lengths."""

from __future__ import annotations

import pytest
import torch

from steadyserve.examples.bert import BertEncoder, mean_pool_normalize

CFG = {"hidden_size": 32, "layer_norm_eps": 1e-12, "vocab_size": 100,
       "max_position_embeddings": 64, "type_vocab_size": 2, "num_attention_heads": 4,
       "intermediate_size": 64, "num_hidden_layers": 2}


def padded(model: BertEncoder, rows: list[list[int]]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return mean_pool_normalize(model(ids, mask), mask)


@pytest.mark.parametrize("lengths", [[1], [5, 5, 5], [1, 17, 3, 40, 2], [40, 1]])
def test_packed_equals_padded(lengths: list[int]) -> None:
    torch.manual_seed(0)
    model = BertEncoder(CFG).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(len(lengths))
    rows = [torch.randint(1, 100, (n,), generator=g).tolist() for n in lengths]
    with torch.inference_mode():
        want = padded(model, rows)
        got = model.forward_packed(rows, torch.device("cpu"))
    assert got.shape == (len(rows), CFG["hidden_size"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
