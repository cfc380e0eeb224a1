"""Systematic draws (``pipeline label --draws systematic``): one uniform offset and N evenly spaced points through the
teacher's cumulative distribution. Checked against float64 distributions computed here: every id's count is
floor(N p) or ceil(N p) (which independent draws break), the counts are unbiased over seeds, hybrid draws follow the
teacher restricted to the ids outside its top-k, and the store records the scheme and refuses to resume under the
other one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForSequenceClassification

from kd_pipeline import data
from kd_pipeline.data import ManifestError, open_store
from kd_pipeline.pipeline.cli import cli
from kd_pipeline.stages.label import LabelConfig
from kd_pipeline.stages.models import OutputHead
from kd_pipeline.stages.soft_targets import hybrid_chunked, sample_chunked
from tests import rawstore
from tests.tiny import labelling_world

ROWS, VOCAB = 23, 300


def _quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def head() -> OutputHead:
    """A real output head that takes (N, V) logits as they are: a classifier's (its logits are its rows)."""
    config = LlamaConfig(
        vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8, num_labels=2
    )
    return OutputHead(LlamaForSequenceClassification(config), "seq-cls")


def dense_counts(unique: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, width: int) -> np.ndarray:
    """Ragged (unique per row, ids, counts) -> (rows, width) int64 counts, checking each row's ids ascend."""
    out = np.zeros((unique.shape[0], width), dtype=np.int64)
    start = 0
    for r, u in enumerate(unique.tolist()):
        row_ids = ids[start : start + u].numpy()
        assert (np.diff(row_ids) > 0).all()
        out[r, row_ids] = counts[start : start + u].numpy()
        start += u
    return out


def floor_or_ceil(counts: np.ndarray, expected: np.ndarray, slack: float = 1e-6) -> bool:
    """Every count is floor or ceil of its expected count N p (``slack`` absorbs p's last float bits)."""
    return bool(np.all((counts >= np.floor(expected - slack)) & (counts <= np.ceil(expected + slack))))


@pytest.mark.parametrize("n", [1, 7, 50, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_systematic_counts_are_floor_or_ceil_of_n_p(head: OutputHead, n: int, temperature: float) -> None:
    """Per row, against softmax(z / T) in float64: the counts sum to N and each is floor(N p) or ceil(N p); the
    same rows drawn independently (multinomial) break that, so the check tells the schemes apart."""
    z = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(3)) * 3
    p = torch.softmax(z.double() / temperature, -1).numpy()
    out = sample_chunked(z, head, n, temperature, 5, None, [4, 0, 0], "systematic")
    got = dense_counts(out["unique"], out["ids"], out["counts"], VOCAB)
    assert (got.sum(-1) == n).all()
    assert floor_or_ceil(got, n * p)
    assert float(out["kept"][0]) == pytest.approx(float(p[0, got[0] > 0].sum()), rel=1e-5)
    if n >= 50:
        other = sample_chunked(z, head, n, temperature, 5, None, [4, 0, 0], "multinomial")
        assert not floor_or_ceil(dense_counts(other["unique"], other["ids"], other["counts"], VOCAB), n * p)


def test_systematic_counts_are_unbiased_over_seeds(head: OutputHead) -> None:
    """Mean count / N over 4,000 seeds within 5 standard errors of softmax(z / T) in float64 (a systematic count
    is floor(N p) plus a Bernoulli(frac(N p)), so its standard deviation is sqrt(f (1 - f)) / N); T = 1's
    probabilities lie far outside the same bound (the check has the power to see a wrong distribution)."""
    t, n, seeds = 2.0, 5, 4000
    z = torch.randn(3, 9, generator=torch.Generator().manual_seed(1)) * 2
    total = np.zeros((3, 9))
    for s in range(seeds):
        out = sample_chunked(z, head, n, t, 3, None, [s], "systematic")
        total += dense_counts(out["unique"], out["ids"], out["counts"], 9)
    mean = total / seeds / n
    p = torch.softmax(z.double() / t, -1).numpy()
    frac = n * p - np.floor(n * p)
    bound = 5 * np.sqrt(frac * (1 - frac) / seeds) / n + 1e-12
    assert np.all(np.abs(mean - p) <= bound), (np.abs(mean - p) / bound).max()
    wrong = torch.softmax(z.double(), -1).numpy()
    assert float((np.abs(mean - wrong) / bound).max()) > 10


def test_systematic_hybrid_draws_follow_the_restricted_teacher(head: OutputHead) -> None:
    """Hybrid tail draws: floor or ceil of N times the teacher restricted to the ids outside the row's top-k
    (float64), never a top-k id; the unrestricted distribution does not fit the counts."""
    k, n, t = 4, 40, 1.0
    z = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(7)) * 3
    out = hybrid_chunked(z, head, k, n, t, 6, None, [2], "systematic")
    got = dense_counts(out["tail_unique"], out["tail_ids"], out["tail_counts"], VOCAB)
    p = torch.softmax(z.double() / t, -1)
    top = p.topk(k, -1).indices
    assert torch.equal(out["ids"].sort(-1).values, top.sort(-1).values)
    restricted = p.scatter(-1, top, 0.0)
    restricted = (restricted / restricted.sum(-1, keepdim=True)).numpy()
    assert (got.sum(-1) == n).all() and (np.take_along_axis(got, top.numpy(), -1) == 0).all()
    assert floor_or_ceil(got, n * restricted)
    assert not floor_or_ceil(got, n * p.numpy())


def test_systematic_draws_scale_to_the_row_total_and_refuse_invalid_rows() -> None:
    """Rows that do not sum to 1 (float32 softmax totals drift by ~1e-5 at large vocabularies; here 0.6 and 1.5, so
    that a wrong scale shows in the counts): the points span the row's own total, so the counts are floor or ceil
    of N p / total and an id of probability 0 at the end is never drawn, for any offset (500 seeds). A NaN row, or
    one without mass, is refused as torch.multinomial refuses it, unless the row is not kept (a hybrid row whose
    tail is 0 draws nothing)."""
    from kd_pipeline.stages.soft_targets import _draw

    probs = torch.tensor([[0.2, 0.2, 0.2, 0.0], [0.5, 0.5, 0.5, 0.0]])
    n = 10
    for s in range(500):
        ids, counts, unique = _draw(probs, n, [s], None, "systematic")
        got = dense_counts(unique, ids, counts, 4)
        assert (got[:, 3] == 0).all() and (got.sum(-1) == n).all()
        expected = n * (probs.double() / probs.double().sum(-1, keepdim=True)).numpy()
        assert floor_or_ceil(got, expected, slack=1e-9), (s, got)
    bad = torch.tensor([[0.5, float("nan"), 0.5], [0.0, 0.0, 0.0]])
    for row in bad:
        with pytest.raises(ValueError, match="cannot draw ids from a distribution that sums to"):
            _draw(row[None], n, [0], None, "systematic")
    ids, counts, unique = _draw(bad, n, [0], torch.tensor([False, False]), "systematic")
    assert unique.tolist() == [0, 0] and ids.numel() == 0


# ---------------------------------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return labelling_world(tmp_path_factory.mktemp("systematic"))


def _label_args(tiny: dict[str, Any], out: Path, *extra: str) -> list[str]:
    return [
        "label", "--teacher", str(tiny["root"] / "teacher"), "--data", str(tiny["data"]), "--out", str(out),
        "--temperature", "2", "--batch-size", "4", "--shard-size", "8", "--chunk-positions", "16", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["sample", "hybrid"])
def test_label_systematic_store_records_the_scheme_and_counts_fit_the_teacher(
    tiny: dict[str, Any], tmp_path: Path, method: str
) -> None:
    """``pipeline label --draws systematic``: the manifest says so (targets and config), and every position's
    counts are floor or ceil of N times the teacher's float64 distribution at T (restricted to the ids outside the
    top-k for hybrid), the teacher run here in float64 on the stored input ids."""
    n = 30
    extra = ["--method", method, "--samples", str(n), "--draws", "systematic"]
    if method == "hybrid":
        extra += ["--top-k", "4"]
    res = CliRunner().invoke(cli, _label_args(tiny, tmp_path / "s", *extra))
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "s")
    assert store.manifest.targets.draws == "systematic" and store.manifest.config["draws"] == "systematic"
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["targets"]["draws"] == "systematic"
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s")])
    assert shown.exit_code == 0 and f"N={n} systematic draws per position" in shown.output, shown.output
    teacher = tiny["teacher"].eval().double()
    prefix = "tail_" if method == "hybrid" else "target_"
    positions = 0
    for ex in store:
        ids = torch.as_tensor(ex["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            p = torch.softmax(teacher(input_ids=ids).logits[0, :-1] / 2.0, -1).numpy()  # (L - 1, V) float64
        off = ex[f"{prefix}offsets" if method == "hybrid" else "target_offsets"]
        for pos in range(len(off) - 1):
            dist = p[pos].copy()
            if method == "hybrid":
                dist[ex["target_ids"][pos].astype(np.int64)] = 0.0
                dist /= dist.sum()
            counts = np.zeros_like(dist, dtype=np.int64)
            cid = f"{prefix}ids" if method == "hybrid" else "target_ids"
            counts[ex[cid][off[pos] : off[pos + 1]].astype(np.int64)] = ex[f"{prefix}counts"][off[pos] : off[pos + 1]]
            assert counts.sum() == n
            # the labeler's probabilities are float32: allow ~1e-4 of a count at the floor/ceil edges
            assert floor_or_ceil(counts, n * dist, slack=1e-4), pos
            positions += 1
    assert positions > 50


def test_default_draws_are_multinomial_and_old_manifests_read_as_multinomial(tmp_path: Path) -> None:
    """A sampled spec made without ``draws``, and a manifest written before the field existed, are multinomial;
    a top-k spec has none (and a manifest that gives one is refused); an unknown scheme is refused by name."""
    assert data.TargetSpec("sample", 5, 1.0, 10, num_samples=5).draws == "multinomial"
    assert data.TargetSpec("topk", 5, 1.0, 10).draws is None
    spec = data.TargetSpec("hybrid", 2, 1.0, 10, encoding="plain", num_samples=5).to_dict()
    assert spec["draws"] == "multinomial"
    del spec["draws"]
    assert data.TargetSpec.from_dict(spec).draws == "multinomial"
    with pytest.raises(ManifestError, match="targets.draws='stratified' is not one of systematic, multinomial"):
        data.TargetSpec.from_dict({**spec, "draws": "stratified"})
    topk = data.TargetSpec("topk", 5, 1.0, 10, encoding="plain").to_dict()
    assert "draws" not in topk
    with pytest.raises(ManifestError, match="draws is set"):
        data.TargetSpec.from_dict({**topk, "draws": "systematic"})
    assert LabelConfig().draws == "multinomial"
    content = LabelConfig(out="o", method="sample").resolved(100, _quiet).content_dict()
    assert "draws" not in content  # as stores labelled before --draws: they still resume
    assert LabelConfig(out="o", draws="systematic").resolved(100, _quiet).content_dict()["draws"] == "systematic"


def test_resume_under_the_other_scheme_is_refused_naming_the_option(tiny: dict[str, Any], tmp_path: Path) -> None:
    """A half-labelled systematic store resumed without --draws: refused in one line that names --draws
    systematic, exit code 1, the committed shards kept; with it, the store resumes and equals one labelled at once."""
    runner = CliRunner()
    args = ["--method", "sample", "--samples", "20", "--draws", "systematic"]
    for out in ("a", "b"):
        assert runner.invoke(cli, _label_args(tiny, tmp_path / out, *args)).exit_code == 0
    raw = rawstore.load(tmp_path / "b")  # the state a crash leaves after 2 of 4 units
    raw["complete"] = False
    raw["shards"] = raw["shards"][:2]
    rawstore.save(tmp_path / "b", raw)
    res = runner.invoke(cli, _label_args(tiny, tmp_path / "b", "--method", "sample", "--samples", "20"))
    assert res.exit_code == 1 and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "differs in: config.draws, targets.draws" in errors[0], res.output
    assert "(20 systematic draws)" in errors[0] and "add --method sample --samples 20 --draws systematic" in errors[0]
    assert len(rawstore.load(tmp_path / "b")["shards"]) == 2
    assert runner.invoke(cli, _label_args(tiny, tmp_path / "b", *args)).exit_code == 0
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
