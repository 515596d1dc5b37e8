"""Teacher CoT generation: shards, resume after a crash, malformed lines, config-change refusal,
filters/stats, BBH split, vLLM backend, CLI, and the trained tiny teacher end to end.

Most tests replace the decoder with a scripted one (``slmkd.generation.iter_generate_batched``
is the only thing patched), so they exercise the real sharding/resume/filter code in
milliseconds; the real batched decoder is covered by tests/test_generation.py and by the
end-to-end test at the bottom.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from slmkd import generation
from slmkd.cli import add_generate_cot_command
from slmkd.config import load_config
from slmkd.generation import GenerationBatch, GenerationOutput, length_sorted_buckets
from slmkd.teacher import (
    CoTConfigMismatchError,
    generate_cot,
    is_cot_complete,
    load_cot_records,
    scan_shards,
)

N_ITEMS = 10
BATCH = 3


@pytest.fixture(scope="module")
def tok():
    from _tiny_lm import make_tokenizer

    return make_tokenizer()


def scripted_output(prompt: str, max_new_tokens: int = 64) -> GenerationOutput:
    """Deterministic 'teacher': item i = a - 2 answers right, except i % 4 == 1 (wrong answer)
    and i % 4 == 3 (cut off at max_new_tokens)."""
    m = re.search(r"Tom has (\d+) apples and buys (\d+) more", prompt)
    a, b = int(m.group(1)), int(m.group(2))
    i = a - 2
    if i % 4 == 3:
        return GenerationOutput(f"{a} + {b} = {a + b}\nso", max_new_tokens, True)
    s = a + b + (1 if i % 4 == 1 else 0)
    return GenerationOutput(f"{a} + {b} = {s}\nThe answer is {s}.", 9 + i, False)


class FakeDecoder:
    """Stands in for iter_generate_batched: same bucketing, scripted outputs, optional crash."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after = crash_after
        self.prompts: list[str] = []
        self.batches = 0

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, batch_size, desc=None,
                 show_progress=True):
        for bucket in length_sorted_buckets([len(p) for p in prompts], batch_size):
            if self.crash_after is not None and self.batches >= self.crash_after:
                raise RuntimeError("simulated crash")
            self.batches += 1
            self.prompts += [prompts[i] for i in bucket]
            yield GenerationBatch(bucket, [scripted_output(prompts[i], max_new_tokens)
                                           for i in bucket], 0.01)


@pytest.fixture
def world(tmp_path):
    from _tiny_lm import write_gsm8k

    data = write_gsm8k(tmp_path / "train.jsonl", N_ITEMS)

    def cfg(**ov):
        base = {"drive_root": str(tmp_path / "drive"), "data.gsm8k_train": str(data),
                "generation.max_new_tokens": 16, "generation.batch_size": BATCH}
        base.update(ov)
        return load_config("tiny", overrides=base, environ={})

    return cfg


def run(cfg, tok, monkeypatch, decoder=None, **kw):
    decoder = decoder or FakeDecoder()
    monkeypatch.setattr(generation, "iter_generate_batched", decoder)
    return generate_cot(cfg, model=object(), tokenizer=tok, show_progress=False, **kw), decoder


def all_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(directory.glob("shard-*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


def test_records_fields_flags_and_stats(world, tok, monkeypatch):
    res, dec = run(world(), tok, monkeypatch)
    assert res.num_generated == N_ITEMS and dec.batches == -(-N_ITEMS // BATCH)
    assert len(list(res.output_dir.glob("shard-*.jsonl"))) == dec.batches  # one shard per batch
    recs = load_cot_records(res.output_dir, kept_only=False)
    assert [r["id"] for r in recs] == [f"gsm8k-train-{i:05d}" for i in range(N_ITEMS)]
    for r in recs:
        assert set(r) >= {"id", "dataset", "task", "question", "prompt", "completion",
                          "extracted_answer", "gold", "flags", "keep", "teacher",
                          "gen_config_hash"}
        i = int(r["id"][-5:])
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["question"] in r["prompt"]
        assert r["teacher"] == "tiny-qwen2-teacher"
        expected = {0: [], 1: ["incorrect"], 2: [], 3: ["truncated", "no_answer"]}[i % 4]
        assert r["flags"] == expected, r
        assert r["keep"] == (expected == [])
    kept = load_cot_records(res.output_dir)
    assert [r["id"] for r in kept] == [r["id"] for r in recs if not r["flags"]]
    s = json.loads(res.stats_path.read_text())
    assert s["num_records"] == N_ITEMS and s["num_kept"] == len(kept) == 5
    assert s["flag_counts"] == {"empty": 0, "truncated": 2, "repetition": 0, "no_answer": 2,
                                "incorrect": 3}
    assert s["truncation_rate"] == pytest.approx(0.2)
    lengths = [r["num_new_tokens"] for r in recs]
    assert s["cot_tokens_mean"] == pytest.approx(sum(lengths) / N_ITEMS)
    assert s["generated_tokens_total"] == sum(lengths)
    assert s["items_per_s"] > 0 and s["generated_tokens_per_s"] > 0
    assert s["generation_wall_time_s"] > 0 and s["last_run"]["batches"] == dec.batches
    assert res.histogram_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_after_crash_equals_uninterrupted_run(world, tok, monkeypatch, tmp_path):
    ref, _ = run(world(), tok, monkeypatch, output_dir=tmp_path / "ref")
    out = tmp_path / "crashy"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(world(), tok, monkeypatch, FakeDecoder(crash_after=2), output_dir=out)
    assert len(all_lines(out)) == 2 * BATCH  # finished batches survived the crash
    # a kill -9 during a shard write leaves only a temp file, never a partial shard
    (out / ".shard-00002.jsonl.abc123.tmp").write_text('{"id": "gsm8k-train-0')
    assert not is_cot_complete(world(), out)
    res, dec = run(world(), tok, monkeypatch, output_dir=out, max_batches=1)
    assert res.num_generated == BATCH and dec.batches == 1
    assert not is_cot_complete(world(), out) and not res.stats["complete"]
    res, dec = run(world(), tok, monkeypatch, output_dir=out)
    assert res.num_generated == N_ITEMS - 3 * BATCH
    assert not list(out.glob("*.tmp"))
    lines = all_lines(out)
    assert len(lines) == N_ITEMS == len({r["id"] for r in lines})  # no duplicates
    assert load_cot_records(out, kept_only=False) == load_cot_records(ref.output_dir,
                                                                      kept_only=False)
    res, dec = run(world(), tok, monkeypatch, output_dir=out)  # nothing left to do
    assert res.num_generated == 0 and dec.batches == 0
    assert is_cot_complete(world(), out) and is_cot_complete(world(**{"generation.limit": 4}), out)
    assert not is_cot_complete(world(**{"generation.max_new_tokens": 99}), out)


def test_malformed_lines_are_reported_and_regenerated(world, tok, monkeypatch, capsys):
    ref, _ = run(world(), tok, monkeypatch)
    expected = load_cot_records(ref.output_dir, kept_only=False)
    shards = sorted(ref.output_dir.glob("shard-*.jsonl"))
    lines0 = shards[0].read_text().splitlines()
    victim = json.loads(lines0[0])["id"]
    lines0[0] = lines0[0][: len(lines0[0]) // 2]  # cut mid-line: invalid JSON
    shards[0].write_text("\n".join(lines0) + "\n")
    lines1 = shards[1].read_text().splitlines()
    victim2 = json.loads(lines1[1])["id"]
    lines1[1] = json.dumps({"id": victim2, "completion": "x"})  # valid JSON, missing fields
    lines1.append(lines1[0])  # a duplicate valid line
    shards[1].write_text("\n".join(lines1) + "\n")

    scan = scan_shards(ref.output_dir)
    assert len(scan.malformed) == 2 and scan.duplicates == 1
    with pytest.raises(ValueError, match="malformed"):
        load_cot_records(ref.output_dir, strict=True)
    assert len(load_cot_records(ref.output_dir, kept_only=False)) == N_ITEMS - 2
    capsys.readouterr()

    res, dec = run(world(), tok, monkeypatch)
    out = capsys.readouterr().out
    assert "2 malformed line(s)" in out and "duplicate" in out
    assert res.num_generated == 2
    assert sorted(re.search(r"Tom has (\d+)", p).group(1) for p in dec.prompts) == sorted(
        str(int(v[-5:]) + 2) for v in (victim, victim2))
    assert load_cot_records(ref.output_dir, kept_only=False) == expected
    assert scan_shards(ref.output_dir).malformed == []


def test_config_change_is_refused_not_mixed(world, tok, monkeypatch, tmp_path):
    res, _ = run(world(), tok, monkeypatch, limit=4)
    out = res.output_dir
    assert is_cot_complete(world(**{"generation.limit": 4}))
    assert not is_cot_complete(world())  # 4 items do not cover all 10
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")}

    with pytest.raises(CoTConfigMismatchError, match="max_new_tokens.*16 -> 32(.|\n)*--force"):
        run(world(**{"generation.max_new_tokens": 32}), tok, monkeypatch, limit=6)
    with pytest.raises(CoTConfigMismatchError, match="teacher"):
        run(world(), tok, monkeypatch, teacher="tiny-qwen2-student-s", output_dir=out)
    other = tok.__class__.from_pretrained(_save(tok, tmp_path / "tok"))
    other.chat_template = tok.chat_template.replace("helpful assistant", "careful tutor")
    with pytest.raises(CoTConfigMismatchError, match="different prompt"):
        run(world(), other, monkeypatch, limit=6)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.jsonl")} == before

    # batch size and filter settings are not generation settings: continuing is fine
    res2, _ = run(world(**{"generation.batch_size": 2}), tok, monkeypatch, limit=6)
    assert res2.num_generated == 2

    # force: old output deleted, everything regenerated under the new hash, never mixed
    res3, _ = run(world(**{"generation.max_new_tokens": 32}), tok, monkeypatch, limit=5,
                  force=True)
    assert res3.num_generated == 5
    hashes = {r["gen_config_hash"] for r in all_lines(out)}
    assert hashes == {res3.stats["gen_config_hash"]} != {res.stats["gen_config_hash"]}

    # a foreign record smuggled into a shard is detected too
    shard = next(out.glob("shard-*.jsonl"))
    row = json.loads(shard.read_text().splitlines()[0])
    row.update(id="gsm8k-train-09999", gen_config_hash="0" * 16)
    (out / "shard-00099.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(CoTConfigMismatchError, match="0000000000000000"):
        run(world(**{"generation.max_new_tokens": 32}), tok, monkeypatch, limit=5)
    with pytest.raises(ValueError, match="mixes"):
        load_cot_records(out)


def _save(tok, path: Path) -> str:
    tok.save_pretrained(path)
    return str(path)


def test_keep_incorrect_refilters_without_generating(world, tok, monkeypatch):
    res, _ = run(world(), tok, monkeypatch)
    assert res.num_kept == 5
    res2, dec = run(world(**{"generation.keep_incorrect": True}), tok, monkeypatch)
    assert dec.batches == 0 and res2.num_generated == 0
    kept = load_cot_records(res.output_dir)
    assert len(kept) == res2.num_kept == 8  # the 3 wrong answers are back; truncated ones not
    assert all("truncated" not in r["flags"] for r in kept)
    assert res2.stats["filters"]["keep_incorrect"] is True


def test_bbh_uses_training_split_only(tmp_path, tok, monkeypatch):
    from slmkd.data import bbh_train_eval_split, load_bbh

    bbh_dir = Path(__file__).parent / "fixtures" / "bbh"
    cfg = load_config("tiny", environ={}, overrides={
        "drive_root": str(tmp_path), "data.bbh_dir": str(bbh_dir),
        "data.bbh_train_per_task": 1, "generation.dataset": "bbh"})
    with pytest.raises(Exception, match="bbh_train_per_task"):
        generate_cot(cfg.replace(**{"data.bbh_train_per_task": 0}), model=object(),
                     tokenizer=tok, show_progress=False)

    def decoder(model, tokenizer, prompts, **kw):
        yield GenerationBatch(list(range(len(prompts))),
                              [GenerationOutput("So the answer is (A).", 7, False)] * len(prompts),
                              0.01)

    monkeypatch.setattr(generation, "iter_generate_batched", decoder)
    res = generate_cot(cfg, model=object(), tokenizer=tok, limit=4, show_progress=False)
    recs = load_cot_records(res.output_dir, kept_only=False)
    train, pool = bbh_train_eval_split(load_bbh(bbh_dir).records, 1, cfg.data.bbh_split_seed)
    train_ids, pool_ids = {r.id for r in train}, {r.id for r in pool}
    assert len(recs) == 4 and all(r["id"] in train_ids and r["id"] not in pool_ids for r in recs)
    assert res.output_dir.parts[-2] == "bbh"
    for r in recs:
        assert r["dataset"] == "bbh" and r["task"] and "Let's think step by step" in r["prompt"]
        assert r["extracted_answer"] == "(A)" or "no_answer" in r["flags"]


def test_vllm_backend_writes_the_same_record_format(world, tok, monkeypatch, tmp_path):
    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, **kw):
            self.model = model

        def generate(self, prompts, params, use_tqdm=True):
            outs = []
            for p in prompts:  # token prompts, as slmkd passes them
                o = scripted_output(tok.decode(p["prompt_token_ids"]), params.kw["max_tokens"])
                c = types.SimpleNamespace(text=o.text, token_ids=[1] * o.num_new_tokens,
                                          finish_reason="length" if o.hit_max_new_tokens
                                          else "stop")
                outs.append(types.SimpleNamespace(outputs=[c]))
            return outs

    monkeypatch.setitem(sys.modules, "vllm",
                        types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    ref, _ = run(world(), tok, monkeypatch, teacher="org/fake-teacher", output_dir=tmp_path / "h")
    cfg = world(**{"generation.backend": "vllm"})
    res = generate_cot(cfg, teacher="org/fake-teacher", tokenizer=tok, show_progress=False,
                       output_dir=tmp_path / "v")
    a = load_cot_records(ref.output_dir, kept_only=False)
    b = load_cot_records(res.output_dir, kept_only=False)
    assert [r["backend"] for r in b] == ["vllm"] * N_ITEMS
    strip = [{k: v for k, v in r.items() if k != "backend"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "backend"} for r in b]


def test_cli_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_generate_cot_command(sub)
    args = parser.parse_args(["generate-cot", "--profile", "tiny", "--output", "/x",
                              "--limit", "5", "--dataset", "bbh", "--teacher", "t",
                              "--force", "--max-new-tokens", "256"])
    assert (args.profile, args.output, args.limit, args.dataset, args.teacher, args.force,
            args.max_new_tokens) == ("tiny", "/x", 5, "bbh", "t", True, 256)
    assert callable(args.func)


KILL_SCRIPT = r"""
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import test_teacher as T
from _tiny_lm import make_tokenizer
from slmkd import generation
from slmkd.config import load_config
from slmkd.teacher import generate_cot

class Slow(T.FakeDecoder):
    def __call__(self, *a, **kw):
        for b in super().__call__(*a, **kw):
            time.sleep(0.3)
            yield b

generation.iter_generate_batched = Slow()
cfg = load_config("tiny", environ={{}}, overrides={overrides!r})
print("ready", flush=True)
generate_cot(cfg, model=object(), tokenizer=make_tokenizer(), output_dir={out!r},
             show_progress=False)
"""


def test_kill_9_mid_run_then_resume(world, tok, monkeypatch, tmp_path):
    """A real SIGKILL while shards are being written: no partial shard, no duplicate, and the
    rerun completes to exactly the records of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import time

    ref, _ = run(world(**{"generation.batch_size": 1}), tok, monkeypatch,
                 output_dir=tmp_path / "ref")
    out = tmp_path / "killed"
    overrides = {"drive_root": str(tmp_path / "drive"),
                 "data.gsm8k_train": str(tmp_path / "train.jsonl"),
                 "generation.max_new_tokens": 16, "generation.batch_size": 1}
    script = KILL_SCRIPT.format(root=str(Path(__file__).parents[1]),
                                tests=str(Path(__file__).parent), overrides=overrides,
                                out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(out.glob("shard-*.jsonl"))) < 3:
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read()[-2000:]}")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    n_before = len(list(out.glob("shard-*.jsonl")))
    assert 3 <= n_before < N_ITEMS
    for p in out.glob("shard-*.jsonl"):  # every shard on disk is complete, valid JSONL
        assert all(json.loads(line)["id"] for line in p.read_text().splitlines())
    res, _ = run(world(**{"generation.batch_size": 1}), tok, monkeypatch, output_dir=out)
    assert res.num_generated == N_ITEMS - n_before
    lines = all_lines(out)
    assert len(lines) == N_ITEMS == len({r["id"] for r in lines})
    assert load_cot_records(out, kept_only=False) == load_cot_records(ref.output_dir,
                                                                      kept_only=False)


def test_tiny_teacher_end_to_end_cli(tmp_path, capsys):
    """`slmkd generate-cot --profile tiny` builds the (shortened) tiny world on first use and runs
    the real trained tiny teacher through the real batched decoder."""
    import dataclasses

    import slmkd.tiny
    from slmkd.cli import main
    from slmkd.config import TinyConfig

    if not hasattr(slmkd.tiny, "ensure_tiny_world"):
        pytest.skip("slmkd.tiny.ensure_tiny_world is not available yet")
    import torch

    small = {"tiny.num_train": 200, "tiny.num_test": 8, "tiny.teacher_pretrain_steps": 4,
             "tiny.teacher_batch_size": 8, "tiny.num_threads": 1, "tiny.bpe_vocab_size": 400}
    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    conf = tmp_path / "small.json"
    conf.write_text(json.dumps({k: v for k, v in small.items() if k.split(".")[1] in fields}))
    argv = ["generate-cot", "--profile", "tiny", "--drive-root", str(tmp_path / "drive"),
            "--config", str(conf), "--limit", "6", "--batch-size", "3",
            "--max-new-tokens", "24"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast and never spin-waits
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    cdir = tmp_path / "drive" / "cot" / "gsm8k" / "tiny-qwen2-teacher"
    assert str(cdir) in out and "records" in out
    recs = load_cot_records(cdir, kept_only=False)
    assert [r["id"] for r in recs] == [f"gsm8k-train-{i:05d}" for i in range(6)]
    assert len(list(cdir.glob("shard-*.jsonl"))) == 2
    for r in recs:
        assert r["prompt"].startswith("<|im_start|>system") and 1 <= r["num_new_tokens"] <= 24
        assert r["hit_max_new_tokens"] == ("truncated" in r["flags"])
        assert r["keep"] == (not r["flags"])
    stats = json.loads((cdir / "cot_stats.json").read_text())
    assert stats["num_records"] == 6 and stats["complete"] and stats["generated_tokens_per_s"] > 0
    assert (cdir / "cot_lengths.png").stat().st_size > 1000

    assert main(argv) == 0  # rerun: nothing to do
    assert "6 done, 0 to generate" in capsys.readouterr().out
    assert main(argv[:-1] + ["32"]) == 2  # other decoding settings: refused, not mixed
    assert "--force" in capsys.readouterr().err
