"""Students cut from the teacher: exact forwards against a hand-chained teacher, the choice of blocks, training
from the cut student, and one-line refusals (tiny models built from configs; nothing downloaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.init_student import InitStudentConfig
from kd_pipeline.stages.init_student import run as init_student
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.label import run as label
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

LENGTH = 16  # tokens per calibration sequence
CAL = ["--calibration-length", str(LENGTH), "--calibration-tokens", "96", "--selection-tokens", "96"]
IDENTITY = (1, 4)  # blocks of the trained teacher that add nothing to the residual stream


def _quiet(msg: str) -> None:
    pass


def _zero_block(layer: Any) -> None:
    """A Llama block whose attention and MLP outputs are 0: it passes the residual stream on unchanged."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _packed(tokenizer: Any, length: int) -> torch.Tensor:
    """The test corpus as the calibration sample sees it, rebuilt here: ids joined with EOS, cut into rows."""
    ids: list[int] = []
    for text in SENTENCES * 4:
        ids += [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    rows = len(ids) // length
    return torch.tensor(ids[: rows * length]).reshape(rows, length)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Calibration text; a 6-block Llama trained on it (blocks 1 and 4 frozen as identities); a 5-block BERT."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("init_student")
    tokenizer = make_tokenizer(root / "tok")
    vocab = len(tokenizer)
    write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 4])
    model = make_model(root / "llama", "causal-lm", vocab_size=vocab, layers=6)
    for i in IDENTITY:
        _zero_block(model.model.layers[i])
        model.model.layers[i].requires_grad_(False)
    # Trained to a loss near 0 on the calibration text, so that removing any working block can only raise it.
    rows = _packed(AutoTokenizer.from_pretrained(root / "llama"), LENGTH)
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model(input_ids=rows, labels=rows).loss.backward()
        opt.step()
    model.save_pretrained(root / "llama")
    make_model(root / "bert", "masked-lm", vocab_size=vocab, layers=5)
    return {"root": root, "vocab": vocab, "rows": rows}


def _cli(*args: str) -> Any:
    return CliRunner().invoke(cli, ["init-student", *args], catch_exceptions=False)


def _llama_by_hand(teacher: Any, kept: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of the teacher with only ``kept`` blocks, chained by hand from the teacher's own modules:
    embeddings -> kept blocks (explicit additive causal mask) -> final norm -> head."""
    T = ids.shape[1]
    position_ids = torch.arange(T)[None]
    hidden = teacher.model.embed_tokens(ids)
    rope = teacher.model.rotary_emb(hidden, position_ids)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]  # (1, 1, T, T)
    for i in kept:
        hidden = teacher.model.layers[i](
            hidden, attention_mask=mask, position_embeddings=rope, position_ids=position_ids
        )
    return teacher.lm_head(teacher.model.norm(hidden))  # type: ignore[no-any-return]


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


def test_layers_cut_exactly(world: dict[str, Any], tmp_path: Path) -> None:
    """--layers keeps exactly those blocks; the saved folder loads with transformers alone and computes the
    teacher's embeddings -> blocks 0, 2, 5 -> norm -> head, with each attention's layer_idx renumbered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    data = str(world["root"] / "docs.jsonl")
    result = _cli(
        "--teacher", str(world["root"] / "llama"), "--layers", "0,2,5", "--out", str(out), "--data", data, *CAL
    )
    assert result.exit_code == 0, result.output
    assert "kept blocks  [0, 2, 5] of 6 (layers)" in result.output
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "init_student.json",
    }
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    teacher = AutoModelForCausalLM.from_pretrained(world["root"] / "llama").eval()
    assert student.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    ids = world["rows"][:3]
    with torch.no_grad():
        expected = _llama_by_hand(teacher, [0, 2, 5], ids)
        torch.testing.assert_close(student(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        # the KV cache is indexed by layer_idx: decoding token by token gives the full forward's logits
        cache = None
        for t in range(ids.shape[1]):
            step = student(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = step.cache
            # 1e-4: one-token steps and the full forward take different float paths (2.4e-5 apart on some CPUs);
            # a cache read from the wrong layer is off by orders of magnitude more
            torch.testing.assert_close(step.logits[:, 0], expected[:, t], rtol=1e-4, atol=1e-4)
    info = json.loads((out / "init_student.json").read_text())
    assert info["result"]["kept_layers"] == [0, 2, 5]
    assert info["result"]["teacher_layers"] == 6
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab()
        == AutoTokenizer.from_pretrained(world["root"] / "tok").get_vocab()
    )
    # the reported perplexities are the teacher's and the student's own on the calibration sample (its last 6 rows)
    cal = world["rows"][-6:]
    with torch.no_grad():
        student_ppl = math.exp(_nll(student(input_ids=cal).logits, cal))
        teacher_ppl = math.exp(_nll(teacher(input_ids=cal).logits, cal))
    assert info["result"]["student_score"] == pytest.approx(student_ppl, rel=1e-5)
    assert info["result"]["teacher_score"] == pytest.approx(teacher_ppl, rel=1e-5)


@pytest.mark.parametrize("method", ["greedy-removal", "block-influence"])
def test_identity_blocks_are_dropped_first(world: dict[str, Any], tmp_path: Path, method: str) -> None:
    """Blocks 1 and 4 add nothing (o_proj and down_proj are 0) in a teacher trained to a loss near 0: both measures
    must drop exactly them when asked for 4 of 6 blocks (a random ranking passes 1 time in 15, a reversed never)."""
    cfg = InitStudentConfig(
        teacher=str(world["root"] / "llama"),
        out=str(tmp_path / "student"),
        num_layers=4,
        method=method,
        data=str(world["root"] / "docs.jsonl"),
        calibration_length=LENGTH,
        calibration_tokens=96,
        selection_tokens=96,
    )
    result = init_student(cfg, log=_quiet)
    assert result.kept_layers == [0, 2, 3, 5]
    assert result.student_score == pytest.approx(result.teacher_score, rel=1e-5)  # identities: nothing lost
    if method == "block-influence":
        bi = result.scores["block_influence"]
        assert [bi[i] for i in IDENTITY] == [pytest.approx(0.0, abs=1e-6)] * 2
        assert min(bi[i] for i in (0, 2, 3, 5)) > 1e-3


def test_greedy_removal_follows_the_measured_loss(world: dict[str, Any], tmp_path: Path) -> None:
    """Down to 2 blocks: at every step each candidate's recorded loss equals the loss of the teacher with those
    blocks removed, chained by hand, and the block removed is the one whose removal costs least."""
    from transformers import AutoModelForCausalLM

    cfg = InitStudentConfig(
        teacher=str(world["root"] / "llama"),
        out=str(tmp_path / "student"),
        num_layers=2,
        data=str(world["root"] / "docs.jsonl"),
        calibration_length=LENGTH,
        calibration_tokens=96,
        selection_tokens=96,
    )
    result = init_student(cfg, log=_quiet)
    teacher = AutoModelForCausalLM.from_pretrained(world["root"] / "llama").eval()
    cal = world["rows"][-6:]
    kept = list(range(6))
    steps = result.scores["greedy_steps"]
    assert len(steps) == 4
    for step in steps:
        with torch.no_grad():
            losses = {b: _nll(_llama_by_hand(teacher, [k for k in kept if k != b], cal), cal) for b in kept}
        assert {int(b): v for b, v in step["candidate_loss"].items()} == pytest.approx(losses, abs=1e-4)
        assert step["removed"] == min(losses, key=lambda b: losses[b])
        kept.remove(step["removed"])
    assert result.kept_layers == kept
    assert math.log(result.student_score) == pytest.approx(steps[-1]["loss"], abs=1e-4)


def test_cut_student_trains(world: dict[str, Any], tmp_path: Path) -> None:
    """The cut folder is what `pipeline train --student` loads: two steps from a store labelled by the teacher."""
    from transformers import AutoModelForCausalLM

    root = world["root"]
    out = tmp_path / "student"
    result = _cli("--teacher", str(root / "llama"), "--num-layers", "3", "--method", "even", "--out", str(out),
                  "--data", str(root / "docs.jsonl"), *CAL)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "kept blocks  [0, 2, 5] of 6 (even)" in result.output
    label(LabelConfig(teacher=str(root / "llama"), data=str(root / "docs.jsonl"), out=str(tmp_path / "store"),
                      top_k=8, shard_size=8), log=_quiet)  # fmt: skip
    run = tmp_path / "run"
    trained = CliRunner().invoke(
        cli,
        ["train", "--store", str(tmp_path / "store"), "--student", str(out), "--out", str(run), "--steps", "2",
         "--batch-size", "2", "--eval-every", "2", "--save-every", "2"],
        catch_exceptions=False,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    before = AutoModelForCausalLM.from_pretrained(out)
    after = AutoModelForCausalLM.from_pretrained(run / "final")
    assert after.config.num_hidden_layers == 3
    assert not torch.equal(before.model.layers[1].mlp.up_proj.weight, after.model.layers[1].mlp.up_proj.weight)


def test_bert_masked_lm_cut(world: dict[str, Any], tmp_path: Path) -> None:
    """A BERT masked-lm: --layers 0,3,4 equals embeddings -> those blocks -> MLM head, chained by hand."""
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "student"
    result = _cli("--teacher", str(world["root"] / "bert"), "--layers", "0,3,4", "--out", str(out),
                  "--data", str(world["root"] / "docs.jsonl"), *CAL)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output
    student = AutoModelForMaskedLM.from_pretrained(out).eval()
    teacher = AutoModelForMaskedLM.from_pretrained(world["root"] / "bert").eval()
    assert student.config.num_hidden_layers == 3
    ids = world["rows"][:3]
    with torch.no_grad():
        hidden = teacher.bert.embeddings(input_ids=ids)
        for i in (0, 3, 4):
            hidden = teacher.bert.encoder.layer[i](hidden)
        torch.testing.assert_close(student(input_ids=ids).logits, teacher.cls(hidden), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-layers", "6"], "--num-layers 6 must be below the teacher's 6 blocks (1..5)"),
        (["--layers", "0,2,9"], "--layers 0,2,9: the teacher has blocks 0..5; pick indices in it"),
        (["--layers", "0,2,2"], "must be increasing, distinct, non-negative block indices"),
        (["--layers", "0,x"], "is not a comma-separated list of block indices"),
        ([], "pass exactly one of --num-layers N or --layers i,j,..."),
        (["--num-layers", "3", "--layers", "0,1,2"], "pass exactly one of --num-layers N or --layers i,j,..."),
    ],
)
def test_bad_requests_are_one_line_errors(world: dict[str, Any], tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "student"
    result = _cli("--teacher", str(world["root"] / "llama"), "--out", str(out), *args, *CAL)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert message in result.output
    assert not out.exists()


def test_unsupported_architecture_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = tmp_path / "gpt2"
    make_tokenizer(teacher)
    GPT2LMHeadModel(GPT2Config(vocab_size=world["vocab"], n_embd=16, n_layer=4, n_head=2)).save_pretrained(teacher)
    out = tmp_path / "student"
    result = _cli("--teacher", str(teacher), "--num-layers", "2", "--out", str(out), *CAL)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot cut a 'gpt2' teacher: supported are decoders llama")
    assert result.output.count("\n") == 1
    assert not out.exists()
