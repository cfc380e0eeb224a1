"""Run by tests/test_fsdp.py under torchrun (2 CPU ranks, gloo): one forward and backward of ``pipeline train``'s loss
through the FSDP-sharded student, each rank on its half of one batch; rank 0 writes the gathered gradients, the
initial weights and the loss to OUT (safetensors) for the test to compare with its float64 single-process reference.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_grads.py OUT
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

# (name, tied embeddings, --loss-chunk (0: dense), --fsdp-dtype)
CASES = [
    ("tied-chunked", True, 5, "float32"),
    ("untied-chunked", False, 5, "float32"),
    ("tied-dense", True, 0, "float32"),
    ("tied-chunked-bf16", True, 5, "bfloat16"),
]
VOCAB, LENGTH, K, T, ALPHA = 40, 9, 5, 2.0, 0.5


def student(tied: bool) -> Any:
    """A 2-layer Llama (two FSDP blocks) with fresh weights from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batch() -> dict[str, torch.Tensor]:
    """4 examples of LENGTH tokens (no padding: each half of the batch has the same number of positions, so the
    average of the two ranks' mean losses is the whole batch's mean), top-K targets with their tail, as the loader
    collates them."""
    g = torch.Generator().manual_seed(1)
    b, p = 4, LENGTH - 1
    input_ids = torch.randint(1, VOCAB, (b, LENGTH), generator=g)
    teacher = torch.log_softmax(torch.randn(b, p, VOCAB, generator=g) * 3, -1)
    lp, ids = teacher.topk(K, dim=-1)  # (B, P, K)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(b, LENGTH, dtype=torch.long),
        "position_mask": torch.ones(b, p, dtype=torch.bool),
        "example_weight": torch.ones(b),
        "target_ids": ids,
        "target_logprobs": lp,
        "tail_mass": (1 - lp.double().exp().sum(-1)).clamp_min(0).float(),
        "labels": input_ids[:, 1:],
    }


def main(out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from kd_pipeline.stages.batch_loss import at_positions, train_loss
    from kd_pipeline.stages.sharding import full_model_state, in_forward, shard_student
    from kd_pipeline.stages.train import TrainConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch().items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tied, chunk, dtype in CASES:
        model = student(tied)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        root = shard_student(at_positions(model, "causal-lm", chunk), dtype)
        cfg = TrainConfig(store="-", student="-", out="-", alpha=ALPHA, loss_chunk=chunk)
        loss, _ = in_forward(root, train_loss, half, "causal-lm", cfg, T)
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # collective: every rank
        assert set(full_model_state(model)) <= set(init)
        tensors |= {f"{name}/loss": mean / 2}
        tensors |= {f"{name}/grad/{n}": g for n, g in grads.items()}
        tensors |= {f"{name}/init/{n}": v for n, v in init.items()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    dist.barrier()  # no rank tears gloo down while another is still in it
    dist.destroy_process_group()
    # Twice in CI a rank died with SIGABRT ("terminate called without an active exception", a C++ thread destroyed
    # while joinable) after this point or in it; the work is done and written, so leave without the interpreter's
    # finalisation (module teardown, static destructors), where such threads are torn down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
