"""The shared loop's optimisers: Muon (Newton-Schulz in float32 or bf16) against torch.optim.Muon, and which parameters
it gets."""

from __future__ import annotations

import argparse

import pytest
import torch

from gpt2_scratch.configuration_gpt2_scratch import GPT2ScratchConfig
from gpt2_scratch.modeling_gpt2_scratch import GPT2ScratchForCausalLM, GPT2ScratchForSequenceClassification
from gpt2_scratch.training import Muon, build_optimizers, orthogonalise


def test_orthogonalise_brings_singular_values_near_one():
    torch.manual_seed(0)
    for rows, cols in [(48, 16), (16, 48), (32, 32)]:
        k = min(rows, cols)
        left, _ = torch.linalg.qr(torch.randn(rows, k))
        right, _ = torch.linalg.qr(torch.randn(cols, k))
        matrix = left @ torch.diag(torch.logspace(-1, 1, k)) @ right.T  # singular values 0.1 ... 10
        result = orthogonalise(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7)
        singular = torch.linalg.svdvals(result)
        assert result.shape == matrix.shape and result.dtype == torch.float32
        # the quintic trades exactness for speed: values land in about (0.5, 1.2), not exactly on 1
        assert singular.min() > 0.4 and singular.max() < 1.25, ((rows, cols), singular)
        half = orthogonalise(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16)
        singular = torch.linalg.svdvals(half.float())
        assert half.dtype == torch.bfloat16 and singular.min() > 0.35 and singular.max() < 1.3, singular


def test_orthogonalise_treats_a_stack_as_separate_matrices():
    torch.manual_seed(0)
    for shape in [(3, 40, 12), (3, 12, 40)]:
        stack = torch.randn(shape)
        together = orthogonalise(stack, (3.4445, -4.775, 2.0315), 5, 1e-7)
        alone = torch.stack([orthogonalise(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7) for matrix in stack])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_steps_like_torch_muon(shape, ns_dtype):
    """Same momentum, decoupled weight decay and shape scaling as torch's Muon; the iteration's precision is ours to
    choose (torch's is bfloat16), so the parameters agree to bfloat16 accuracy. Two same-shaped matrices (stacked in
    one batched iteration) and a transposed one step as torch steps each alone."""
    torch.manual_seed(0)
    starts = [torch.randn(shape), torch.randn(shape), torch.randn(shape[::-1])]
    ours = [torch.nn.Parameter(start.clone()) for start in starts]
    theirs = [torch.nn.Parameter(start.clone()) for start in starts]
    optimizers = [Muon(ours, ns_dtype, lr=0.05, weight_decay=0.1),
                  torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1)]
    for _ in range(3):
        grads = [torch.randn(start.shape) for start in starts]
        for params, optimizer in zip((ours, theirs), optimizers):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for start, mine, torchs in zip(starts, ours, theirs):
        moved_ours, moved_theirs = mine.detach() - start, torchs.detach() - start
        assert moved_ours.abs().mean() > 0.01
        assert torch.allclose(moved_ours, moved_theirs, rtol=0, atol=0.02 * moved_theirs.abs().max())
        assert optimizers[0].state[mine]["momentum_buffer"].dtype == torch.float32


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("cpu-1m", vocab_size=64, n_layers=2, emb_dim=16,
                                                                 n_heads=2, context_length=8))
    args = argparse.Namespace(optimizer="muon", learning_rate=1e-3, muon_learning_rate=0.02, muon_ns_steps=5,
                              weight_decay=0.1, mixed_precision="no")
    muon, adamw = build_optimizers(model, args)
    assert muon.ns_dtype == torch.float32
    assert build_optimizers(model, argparse.Namespace(**{**vars(args), "mixed_precision": "bf16"}))[0].ns_dtype \
        == torch.bfloat16  # a bf16 run iterates in bf16, as torch's Muon does
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if p.ndim == 2 and ".trf_blocks." in n}
    assert len(in_muon) == 2 * 6  # query, key, value, output projection and the two MLP layers, per block
    assert "transformer.tok_emb.weight" in in_adamw and "transformer.pos_emb.weight" in in_adamw
    assert in_muon.isdisjoint(in_adamw) and in_muon | in_adamw == set(names.values())
    # a classifier's head is not a hidden layer: AdamW, with weight decay like every matmul weight outside Muon
    classifier = GPT2ScratchForSequenceClassification(model.config)
    _, adamw = build_optimizers(classifier, args)
    decayed = {id(p) for p in adamw.param_groups[0]["params"]}
    assert adamw.param_groups[0]["weight_decay"] == 0.1 and decayed == {id(classifier.score.weight)}
