"""stages.heldout.score / reference_logprobs: perplexity, KL(reference || model) and top-1 agreement against a
float64 computation written out here, with padded (-100) positions left out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_pipeline.stages.heldout import reference_logprobs, score
from tests.tiny import make_model

VOCAB = 40


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two batches of 3 sequences of 9 tokens; the last positions of some rows padded (label -100)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for pad in ((0, 3, 5), (2, 0, 7)):
        ids = torch.randint(0, VOCAB, (3, 9), generator=g)
        mask = torch.ones_like(ids)
        for row, n in enumerate(pad):
            if n:
                mask[row, -n:] = 0
        labels = ids[:, 1:].clone()
        labels[mask[:, 1:] == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _float64(model: Any, batches: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: float64 log-probs (B, L-1, V) at every next-token position, and the scored mask (B, L-1)."""
    out = []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            out.append((torch.log_softmax(logits[:, :-1], dim=-1), b["labels"] != -100))
    return out


def _assert_the_models_logprobs(got: Any, model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    """``got`` (reference_logprobs of ``batches``) is ``model``'s full log-probs at the scored positions."""
    for lp, (want, scored) in zip(got, _float64(model, batches), strict=True):
        assert lp.shape == (int(scored.sum()), VOCAB)
        torch.testing.assert_close(lp.double(), want[scored], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("heldout")
    student = make_model(root / "student", "causal-lm", vocab_size=VOCAB, seed=1)
    # the teacher: the student's weights moved by noise, so that the two agree on many positions but not all
    teacher = make_model(root / "teacher", "causal-lm", vocab_size=VOCAB, seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.7)
    teacher.save_pretrained(root / "teacher")
    return {"student": (root / "student", student.eval()), "teacher": (root / "teacher", teacher.eval())}


def test_reference_logprobs_are_the_full_distribution_at_scored_positions(models: dict[str, Any]) -> None:
    folder, model = models["teacher"]
    batches = _batches()
    got = reference_logprobs(folder, batches)
    # a Llama's logits are its head on its last hidden state: every batch is kept as (positions, hidden) states
    assert got.compact == len(got) == len(batches)
    positions = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert got.nbytes == positions * model.config.hidden_size * 4
    _assert_the_models_logprobs(got, model, batches)


def test_a_tied_head_is_kept_compact_and_gives_the_models_logprobs(tmp_path: Path) -> None:
    """The real teacher ties its head to its embedding: the kept head must still be the model's."""
    model = make_model(tmp_path / "tied", "causal-lm", vocab_size=VOCAB, seed=2, tied=True).eval()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batches = _batches()
    got = reference_logprobs(tmp_path / "tied", batches)
    assert got.compact == len(batches)
    _assert_the_models_logprobs(got, model, batches)


def test_a_model_whose_logits_are_not_its_head_on_its_hidden_states_is_kept_as_logprobs(tmp_path: Path) -> None:
    """Gemma 2 soft-caps its logits after the head: the hidden states alone would give other log-probs, so each
    batch is kept as the log-probs themselves, which are still the model's."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=0.5,  # small, so that capping changes every logit
        max_position_embeddings=64,
    )
    model = Gemma2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "gemma")
    batches = _batches()
    got = reference_logprobs(tmp_path / "gemma", batches)
    assert got.compact == 0 and len(got) == len(batches)
    assert got.nbytes == sum(int((b["labels"] != -100).sum()) for b in batches) * VOCAB * 4
    _assert_the_models_logprobs(got, model, batches)


def test_score_matches_a_float64_reference(models: dict[str, Any]) -> None:
    (s_dir, student), (t_dir, teacher) = models["student"], models["teacher"]
    batches = _batches()
    ref = reference_logprobs(t_dir, batches)
    got = score(s_dir, batches, ref, keep_positions=True)

    nll, kl, agree, count, agree_labels = [], 0.0, 0, 0, 0
    for (lq, scored), (lp, _), b in zip(_float64(student, batches), _float64(teacher, batches), batches, strict=True):
        y = b["labels"][scored]
        q, p = lq[scored], lp[scored]  # (N, V) float64
        nll += (-q.gather(-1, y[:, None])[:, 0]).tolist()
        kl += float((p.exp() * (p - q)).sum())  # KL(teacher || student), summed over positions
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        agree_labels += int((y == q.argmax(-1)).sum())
        count += int(scored.sum())
    assert count == 2 * 3 * 8 - (3 + 5 + 2 + 7) == got.positions
    # the two models agree on some positions and not on others, and not where the model predicts the label: the
    # measure is informative
    assert 0 < agree < count and agree != agree_labels
    assert got.nll == pytest.approx(sum(nll) / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(sum(nll) / count), rel=1e-5)
    assert got.kl == pytest.approx(kl / count, rel=1e-4)
    assert got.top1 == pytest.approx(agree / count, abs=1e-12)
    assert got.position_nll is not None
    torch.testing.assert_close(
        torch.tensor(got.position_nll, dtype=torch.float64), torch.tensor(nll, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert "position_nll" not in got.to_dict()


def test_score_against_itself_is_zero_kl_and_full_agreement(models: dict[str, Any]) -> None:
    folder, _ = models["student"]
    batches = _batches()
    got = score(folder, batches, reference_logprobs(folder, batches))
    assert got.kl == pytest.approx(0.0, abs=1e-6)
    assert got.top1 == 1.0


def test_score_without_reference_leaves_kl_empty(models: dict[str, Any]) -> None:
    folder, _ = models["student"]
    got = score(folder, _batches())
    assert got.kl is None and got.top1 is None and got.position_nll is None


def test_a_reference_of_other_batches_is_refused(models: dict[str, Any], tmp_path: Path) -> None:
    folder, _ = models["student"]
    batches = _batches()
    ref = reference_logprobs(folder, batches)
    with pytest.raises(ValueError, match="reference batch 0 has shape"):
        score(folder, batches, [r[:-1] for r in ref])
    with pytest.raises(ValueError, match="reference has 1 batches, the data 2"):
        score(folder, batches, ref[:1])
