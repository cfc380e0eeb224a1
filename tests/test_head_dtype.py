"""``--head-dtype``: a bf16 teacher's output head runs in float32, and the manifest says so.

A bf16 logit has 8 significant bits: between 16 and 32 consecutive values are 0.125 apart, between 32 and 64
0.25, far coarser than the float16 (11 bits) a store keeps its log-probs in. The teacher here is a tiny Llama
whose head weight is scaled up so that its logits reach ~±70, and it is labelled in bfloat16 on the CPU through
the real path (``--dtype bfloat16``). The reference is independent of the pipeline's head: the bf16 backbone's
hidden states (computed exactly as the labeler computes them: one example per batch, so the same bf16 kernels
see the same shapes) upcast to float64, times the float64 head weight, log-softmax at T in float64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kd_pipeline import data
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig, LabelConfigError, run
from kd_pipeline.stages.models import ModelLoadError, load_model
from tests import rawstore
from tests.tiny import SENTENCES, make_model, make_tokenizer, write_jsonl

T = 2.0
K = 5
HEAD_SCALE = 12.0  # the head's logits go from std ~1.9 to ~22, max |z| ~70: bf16 rounding of them is 0.125-0.25


@pytest.fixture(scope="module")
def sharp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sharp")
    vocab = len(make_tokenizer(root / "tok"))
    model = make_model(root / "teacher", "causal-lm", vocab_size=vocab, pad_rows=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    model.save_pretrained(root / "teacher")  # replaces the weights make_model saved
    docs = write_jsonl(root / "docs.jsonl", [{"text": s} for s in SENTENCES * 2])
    return {"root": root, "teacher": root / "teacher", "data": docs}


def _cfg(sharp: dict[str, Any], out: Path, **kw: Any) -> LabelConfig:
    # batch_size 1: the labeler's backbone call is then exactly the reference's (same shapes, same bf16 kernels)
    base: dict[str, Any] = {
        "teacher": str(sharp["teacher"]),
        "data": str(sharp["data"]),
        "out": str(out),
        "top_k": K,
        "temperature": T,
        "batch_size": 1,
        "shard_size": 4,
        "chunk_positions": 16,
        "dtype": "bfloat16",
        "device": "cpu",
    }
    base.update(kw)
    return LabelConfig(**base)


def _quiet(msg: str) -> None:
    pass


def _reference(teacher: Any, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, V) float64 log-probs at T and (P, V) float64 logits, from the bf16 backbone's hidden states."""
    x = torch.as_tensor(ids.astype(np.int64))[None]
    with torch.inference_mode():
        hidden = teacher.model(input_ids=x, attention_mask=torch.ones_like(x))[0][0, :-1]  # (P, H) bfloat16
        assert hidden.dtype == torch.bfloat16
        z = hidden.double() @ teacher.lm_head.weight.double().T  # bf16 -> float64 is exact
        return torch.log_softmax(z / T, dim=-1), z


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 values at |x| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(2.0**-126))) - 7)


def _deviations(store_path: Path, teacher: Any) -> dict[str, Any]:
    """Stored minus reference log-probs at the stored ids, with what float16 storage and bf16 logits allow."""
    dev, half_f16, bf16_bound, same_ids = [], [], [], True
    for ex in data.open_store(store_path):
        ref, z = _reference(teacher, ex["input_ids"])
        ids = torch.as_tensor(ex["target_ids"].astype(np.int64))
        want = ref.gather(-1, ids).numpy()
        got = ex["target_logprobs"].astype(np.float64)
        dev.append(got - want)
        half_f16.append(np.spacing(np.abs(want).astype(np.float16)).astype(np.float64) / 2)
        # a bf16 logit is off by at most half its spacing, and so is the largest one that dominates the lse
        err = (_bf16_ulp(z.gather(-1, ids)) + _bf16_ulp(z.max(-1, keepdim=True).values)) / 2 / T
        bf16_bound.append(err.numpy())
        same_ids &= bool((ids.sort(-1).values == ref.topk(K, -1).indices.sort(-1).values).all())
    return {
        "dev": np.concatenate(dev),
        "half_f16": np.concatenate(half_f16),
        "bf16_bound": np.concatenate(bf16_bound),
        "same_ids": same_ids,
    }


@pytest.fixture(scope="module")
def stores(sharp: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for head in ("float32", "model"):
        out[head] = root / head
        run(_cfg(sharp, out[head], head_dtype=head), log=_quiet)
    return out


def test_float32_head_matches_float64_to_storage_precision(sharp: dict[str, Any], stores: dict[str, Path]) -> None:
    teacher = load_model(str(sharp["teacher"]), "causal-lm", device=torch.device("cpu"), dtype=torch.bfloat16)
    f32 = _deviations(stores["float32"], teacher)
    # float16 rounds to nearest: half a float16 spacing of the value, plus 1e-4 for float32 arithmetic (the
    # logits are exact to ~1e-5 at |z| ~ 70; a value that close to a rounding midpoint may round either way)
    assert f32["same_ids"]
    assert np.all(np.abs(f32["dev"]) <= f32["half_f16"] + 1e-4), np.abs(f32["dev"]).max()
    model = _deviations(stores["model"], teacher)
    # the bf16 head: off by about the bf16 spacing of the logits (within the bound that rounding allows), which
    # float16 storage does not hide: most values miss the float32 head's tolerance (measured: 93% of 970, by up
    # to 0.13; mean |error| 0.034 against the float32 head's 0.0009). This is what fails without the upcast.
    assert model["same_ids"]
    assert np.all(np.abs(model["dev"]) <= model["bf16_bound"] + model["half_f16"] + 1e-4)
    assert np.mean(np.abs(model["dev"]) > model["half_f16"] + 1e-4) > 0.5
    assert np.abs(model["dev"]).max() > 0.05
    assert np.abs(model["dev"]).mean() > 10 * np.abs(f32["dev"]).mean()


def test_manifest_records_the_logit_precision(stores: dict[str, Path]) -> None:
    f32, model = data.open_store(stores["float32"]).manifest, data.open_store(stores["model"]).manifest
    assert f32.teacher["dtype"] == model.teacher["dtype"] == "bfloat16"
    assert f32.teacher["logit_dtype"] == "float32" and f32.config["head_dtype"] == "float32"
    # "model" is left out of the config (so that stores from before the option resume); the teacher says it
    assert model.teacher["logit_dtype"] == "bfloat16" and "head_dtype" not in model.config


def test_resume_with_another_head_dtype_is_refused(
    sharp: dict[str, Any], stores: dict[str, Path], tmp_path: Path
) -> None:
    store = tmp_path / "s"
    run(_cfg(sharp, store, head_dtype="auto"), log=_quiet)
    raw = rawstore.load(store)
    raw["complete"], raw["shards"] = False, raw["shards"][:2]
    rawstore.save(store, raw)
    args = ["label", "--teacher", str(sharp["teacher"]), "--data", str(sharp["data"]), "--out", str(store)]
    args += ["--top-k", str(K), "--temperature", str(T), "--batch-size", "1", "--shard-size", "4"]
    args += ["--chunk-positions", "16", "--dtype", "bfloat16", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--head-dtype", "model"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]  # the rest is the progress log
    assert len(errors) == 1 and errors[0].startswith("Error:") and "config.head_dtype" in errors[0], result.output
    assert "teacher.logit_dtype" in errors[0]  # the precision differs too
    # float32 is what auto means here, but it is another option: refused as well, naming head_dtype only
    with pytest.raises(data.StoreExistsError, match=r"differs in: config\.head_dtype\)"):
        run(_cfg(sharp, store, head_dtype="float32"), log=_quiet)
    result = CliRunner().invoke(cli, [*args, "--head-dtype", "auto"])
    assert result.exit_code == 0, result.output
    for a, b in zip(data.open_store(store), data.open_store(stores["float32"]), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_store_from_before_logit_dtype_reads_and_resumes(
    sharp: dict[str, Any], stores: dict[str, Path], tmp_path: Path
) -> None:
    """A store without ``teacher.logit_dtype`` / ``config.head_dtype`` (written before they existed) is read, and
    resumed by the run that computes what it did: the head in the teacher's dtype."""
    store = tmp_path / "old"
    run(_cfg(sharp, store, head_dtype="model"), log=_quiet)
    raw = rawstore.load(store)
    del raw["teacher"]["logit_dtype"]
    rawstore.save(store, raw)
    assert "logit_dtype" not in data.open_store(store).manifest.teacher and data.verify_store(store).ok
    raw["complete"], raw["shards"] = False, raw["shards"][:2]
    rawstore.save(store, raw)
    with pytest.raises(data.StoreExistsError, match="head_dtype"):
        run(_cfg(sharp, store), log=_quiet)  # the default, auto: float32 logits, not what the store holds
    result = run(_cfg(sharp, store, head_dtype="model"), log=_quiet)
    assert result.resumed_units == 2 and result.labelled_units > 0
    for a, b in zip(data.open_store(store), data.open_store(stores["model"]), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_auto_on_a_float32_teacher_changes_nothing(sharp: dict[str, Any], tmp_path: Path) -> None:
    """A float32 teacher has nothing to upcast: auto and model write byte-identical shards."""
    for head in ("auto", "model"):
        run(_cfg(sharp, tmp_path / head, head_dtype=head, dtype="float32", batch_size=4), log=_quiet)
    auto, model = data.open_store(tmp_path / "auto").manifest, data.open_store(tmp_path / "model").manifest
    assert auto.teacher["logit_dtype"] == model.teacher["logit_dtype"] == "float32"
    assert [s.files for s in auto.shards] == [s.files for s in model.shards]  # every file's SHA-256


def test_teachers_without_a_separate_head(tmp_path: Path) -> None:
    """masked-lm / seq-cls teachers compute logits in their own forward: auto records their dtype, float32 is
    refused for a bf16 one (one line, what to pass instead), and is allowed for a float32 one."""
    vocab = len(make_tokenizer(tmp_path / "tok"))
    folder = tmp_path / "mlm"
    make_model(folder, "masked-lm", vocab_size=vocab)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": s} for s in SENTENCES])
    base = {"teacher": str(folder), "data": str(docs), "task": "masked-lm", "top_k": 3, "device": "cpu"}
    run(LabelConfig(**base, out=str(tmp_path / "auto"), dtype="bfloat16"), log=_quiet)
    assert data.open_store(tmp_path / "auto").manifest.teacher["logit_dtype"] == "bfloat16"
    with pytest.raises(ModelLoadError, match="--head-dtype float32 needs a causal-lm teacher"):
        run(LabelConfig(**base, out=str(tmp_path / "f32"), dtype="bfloat16", head_dtype="float32"), log=_quiet)
    assert not (tmp_path / "f32" / "manifest.json").exists()
    run(LabelConfig(**base, out=str(tmp_path / "f32"), dtype="float32", head_dtype="float32"), log=_quiet)
    assert data.open_store(tmp_path / "f32").manifest.teacher["logit_dtype"] == "float32"


def test_unknown_head_dtype_is_a_config_problem() -> None:
    with pytest.raises(LabelConfigError, match="--head-dtype 'fp8' is not one of auto, float32, model"):
        LabelConfig(teacher="t", data="d", out="o", head_dtype="fp8").validate()
