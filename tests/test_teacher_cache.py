"""The teacher cache: written once, resumable, refused when stale; KD from it equals live KD at
k = V and trains without a teacher."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _train_world import build_world, make_cfg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from slmkd import training as T  # noqa: E402
from slmkd.teacher.cache import (  # noqa: E402
    TeacherCacheError,
    cache_dir,
    cache_teacher,
    load_teacher_cache,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("cacheworld"))


def _cfg(world, tmp, **extra):
    return make_cfg(world, drive_root=str(tmp), **{
        "models.teacher_medium": str(world / "models" / "kdtest-teacher"),
        "methods": ["sft", "kd", "cascod-kd"], **extra})


def _link_cot(world: Path, tmp: Path) -> None:
    """The CoT of the training world under this test's drive root."""
    src = world / "cot"
    dst = tmp / "cot"
    if not dst.exists():
        import shutil

        shutil.copytree(src, dst)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*"))}


def test_kill_and_rerun_gives_the_same_cache(world, tmp_path):
    _link_cot(world, tmp_path / "a")
    _link_cot(world, tmp_path / "b")
    ca = _cfg(world, tmp_path / "a", **{"kd.cache_top_k": 16})
    cb = _cfg(world, tmp_path / "b", **{"kd.cache_top_k": 16})
    ref = cache_teacher(ca, batch_size=8, show_progress=False)
    assert ref.stats["complete"] and ref.stats["records"] == 64
    part = cache_teacher(cb, batch_size=8, max_batches=3, show_progress=False)
    assert not part.stats["complete"] and part.num_cached_now == 24
    # a shard cut short by a kill: its hash no longer matches, so its ids are cached again
    broken = sorted(cache_dir(cb).glob("shard-*.safetensors"))[-1]
    broken.write_bytes(broken.read_bytes()[:50])
    again = cache_teacher(cb, batch_size=8, show_progress=False)
    assert again.stats["complete"] and again.stats["records"] == 64
    # 64 CoT examples + 64 CasCoD rationale examples (max_seq_length 128 truncates every
    # prompt: no rationale is a prefix of its CoT example), 16 kept from before the kill
    assert again.stats["rationale_examples"] == 64 and again.num_cached_now == 2 * 64 - 16
    # same contents, no duplicates: every id once, same tensors as the uninterrupted cache
    ka = load_teacher_cache(ca, _records(ca), _vocab(ca))
    kb = load_teacher_cache(cb, _records(cb), _vocab(cb))
    assert set(ka.entries) == set(kb.entries) and len(ka.entries) == 2 * 64
    for rid in ka.entries:
        for x, y in zip(ka.get(rid, 2.0), kb.get(rid, 2.0), strict=True):
            assert torch.equal(x, y)
    s = ref.stats
    assert s["k"] == 16 and s["bytes_per_token"] > 16 * 6
    assert 0 < s["coverage"]["2.0"] <= 1.0


def _records(cfg):
    from slmkd.training.data import load_training_records

    return load_training_records(cfg)[0]


def _vocab(cfg):
    from slmkd.modeling import load_tokenizer

    return len(load_tokenizer(cfg.student_name("student_small"), cfg))


def test_stale_or_missing_cache_is_a_clear_error(world, tmp_path):
    _link_cot(world, tmp_path)
    cfg = _cfg(world, tmp_path, **{"kd.cache_top_k": 8})
    with pytest.raises(TeacherCacheError, match="slmkd cache-teacher"):
        load_teacher_cache(cfg, _records(cfg), _vocab(cfg))
    cache_teacher(cfg, batch_size=16, show_progress=False)
    other = _cfg(world, tmp_path, **{"kd.cache_top_k": 4})
    with pytest.raises(TeacherCacheError, match="other settings.*'k'"):
        load_teacher_cache(other, _records(other), _vocab(other))
    with pytest.raises(TeacherCacheError, match="--force"):
        cache_teacher(other, batch_size=16, show_progress=False)
    t2 = _cfg(world, tmp_path, **{"kd.cache_top_k": 8, "kd.temperature_schedule": [3.0]})
    with pytest.raises(TeacherCacheError, match="temperatures"):
        load_teacher_cache(t2, _records(t2), _vocab(t2))


def test_kd_from_a_full_cache_equals_live_kd(world, tmp_path):
    """k = V: the bucket KL is the full KL, so KD from the cache trains the same weights as live
    KD (4 steps, T = 2, α = 0.5). The test fails if the cached rows were misaligned with the
    supervised positions, or the temperature's log-normaliser were the wrong one."""
    _link_cot(world, tmp_path)
    v = _vocab(make_cfg(world))
    cfg = _cfg(world, tmp_path, **{"kd.cache_top_k": v, "train.max_steps": 4})
    cache_teacher(cfg, batch_size=16, show_progress=False)
    live = T.train(cfg, "kd", "student_small", 3, run_dir=tmp_path / "live")
    cached = T.train(cfg, "kd-cached", "student_small", 3, run_dir=tmp_path / "cached")
    assert cached.summary.get("teacher") is None
    a = load_file(str(live.final_dir / "model.safetensors"))
    b = load_file(str(cached.final_dir / "model.safetensors"))
    init = load_file(str(world / "models" / "kdtest-student" / "model.safetensors"))
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)  # fp16 cached values
        moved += int(not torch.equal(a[k], init[k]))
    assert moved > 0
    # a truncated cache (k = 4) trains too, to different weights
    small = _cfg(world, tmp_path / "k4", **{"kd.cache_top_k": 4, "train.max_steps": 4})
    _link_cot(world, tmp_path / "k4")
    cache_teacher(small, batch_size=16, show_progress=False)
    k4 = T.train(small, "kd-cached", "student_small", 3, run_dir=tmp_path / "k4run")
    c = load_file(str(k4.final_dir / "model.safetensors"))
    assert any(not torch.allclose(a[k], c[k], rtol=1e-3, atol=1e-5) for k in a)


@pytest.mark.parametrize("prompt", ["chat", "short"])
def test_cascod_kd_from_a_full_cache_equals_live_cascod_kd(world, tmp_path, monkeypatch, prompt):
    """``cascod-kd`` with ``kd.teacher_source = "cached"``: no teacher is loaded and at k = V it
    trains the weights of live ``cascod-kd`` (4 steps). With the chat prompt every full CoT
    example (max_seq_length 128) left-truncates its prompt more than its rationale example
    does, so each rationale row reads the record's separately cached rationale example; with a
    short prompt nothing is truncated and the rationale rows are the first rows of the record's
    cached CoT (the cache holds no extra entry). Misaligned rows (an offset prefix, the answer
    rows) would move the weights elsewhere."""
    if prompt == "short":
        from slmkd.data import prompts

        monkeypatch.setattr(prompts, "build_prompt",
                            lambda tok, rec, bbh=None: f"Q: {rec.question}\nA: ")
    tmp_path = tmp_path / prompt
    max_len = 128 if prompt == "chat" else 256
    _link_cot(world, tmp_path)
    v = _vocab(make_cfg(world))
    base = {"kd.cache_top_k": v, "train.max_steps": 4, "train.max_seq_length": max_len}
    live_cfg = _cfg(world, tmp_path, **base)
    made = cache_teacher(live_cfg, batch_size=16, show_progress=False)
    assert made.stats["records"] == 64
    assert made.stats["rationale_examples"] == (64 if prompt == "chat" else 0)
    live = T.train(live_cfg, "cascod-kd", "student_small", 3, run_dir=tmp_path / "live")
    cfg = _cfg(world, tmp_path, **{**base, "kd.teacher_source": "cached"})
    cached = T.train(cfg, "cascod-kd", "student_small", 3, run_dir=tmp_path / "cached")
    assert cached.summary.get("teacher") is None and live.summary.get("teacher")
    d = cached.summary["data"]
    assert d["kept"] == 64 == live.summary["data"]["kept"] and d["dropped"] == {}
    assert (d["cache_rationale_from_prefix"], d["cache_rationale_separate"]) == \
        ((0, 64) if prompt == "chat" else (64, 0))
    a = load_file(str(live.final_dir / "model.safetensors"))
    b = load_file(str(cached.final_dir / "model.safetensors"))
    init = load_file(str(world / "models" / "kdtest-student" / "model.safetensors"))
    for k in a:  # fp16 cached values
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4)
    assert any(not torch.allclose(a[k], init[k], rtol=1e-3, atol=2e-3) for k in a)
    assert cached.summary["final_kd"] == pytest.approx(live.summary["final_kd"], rel=1e-3)


def test_a_cache_without_the_rationale_entries_is_refused_then_completed(world, tmp_path):
    """A cache made before cascod-kd could read it (no ``#rationale`` entries) is refused with
    the command to run; rerunning it adds only the missing entries."""
    from slmkd.data.cot_format import RATIONALE_CACHE_SUFFIX
    from slmkd.modeling import load_tokenizer
    from slmkd.teacher import cache as TC
    from slmkd.training.cached_kd import build_cached_cascod_datasets

    _link_cot(world, tmp_path)
    cfg = _cfg(world, tmp_path, **{"kd.cache_top_k": 8, "kd.teacher_source": "cached"})
    real = TC._examples
    TC._examples = lambda c, r, t, rationales=False: real(c, r, t)  # the old writer
    try:
        cache_teacher(cfg, batch_size=16, show_progress=False)
    finally:
        TC._examples = real
    tok = load_tokenizer(cfg.student_name("student_small"), cfg)
    with pytest.raises(TeacherCacheError, match="lacks 64 CasCoD rationale.*cache-teacher"):
        build_cached_cascod_datasets(cfg, _records(cfg), tok)
    again = cache_teacher(cfg, batch_size=16, show_progress=False)
    assert again.num_cached_now == 64 and again.stats["complete"]
    ds, stats = build_cached_cascod_datasets(cfg, _records(cfg), tok)
    assert len(ds) == 64 and stats.cache_rationale_separate == 64
    assert all(ds[i]["cache_key"].endswith(RATIONALE_CACHE_SUFFIX) for i in range(len(ds)))


def test_preflight_names_the_cache_its_size_or_the_command_that_makes_it(world, tmp_path):
    from slmkd.preflight import format_preflight, preflight

    _link_cot(world, tmp_path)
    cfg = _cfg(world, tmp_path, **{"kd.cache_top_k": 8, "kd.teacher_source": "cached"})
    text = format_preflight(preflight(cfg, method="cascod-kd", mount=False))
    assert "teacher cache: none in" in text and "slmkd cache-teacher --profile tiny" in text
    assert "planned" in text and " GB on Drive" in text
    made = cache_teacher(cfg, batch_size=16, show_progress=False)
    text = format_preflight(preflight(cfg, method="kd", mount=False))
    assert f"{made.stats['bytes'] / 1e9:.2f} GB" in text and "top-8" in text
    assert "complete" in text and "64 records" in text
    live = _cfg(world, tmp_path, **{"kd.cache_top_k": 8})
    assert "teacher cache" not in format_preflight(preflight(live, method="kd", mount=False))


def test_rationale_examples_are_cached_only_for_cascod_kd(world, tmp_path):
    """A study without cascod-kd caches the CoT examples only (no ``#rationale`` entries)."""
    _link_cot(world, tmp_path)
    cfg = _cfg(world, tmp_path, **{"kd.cache_top_k": 8, "methods": ["sft", "kd"]})
    made = cache_teacher(cfg, batch_size=16, show_progress=False)
    assert made.stats["records"] == 64 and made.stats["rationale_examples"] == 0
    assert made.num_cached_now == 64
