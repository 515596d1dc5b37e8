"""Batched greedy generation: padding, ordering, EOS handling, the vLLM adapter."""

from __future__ import annotations

import sys
import types

import pytest

from slmkd.generation import (
    GenerationOutput,
    eos_token_ids,
    generate_batched,
    generate_batched_vllm,
    iter_generate_batched,
    length_sorted_buckets,
)


@pytest.fixture(scope="module")
def lm():
    import torch
    from _tiny_lm import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok, seed=0)
    # larger weights than the default init: peaked, diverse greedy outputs instead of near-ties
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 50k-parameter model gains nothing from more; avoids spin-waits
    yield model, tok
    torch.set_num_threads(threads)


def _prompts(tok, n=5):
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": "Tom has 3 apples" + " and 4 more" * (i % 4)}],
            tokenize=False, add_generation_prompt=True)
        for i in range(n)
    ]


def test_length_sorted_buckets():
    assert length_sorted_buckets([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_sorted_buckets([], 4) == []
    with pytest.raises(ValueError):
        length_sorted_buckets([1], 0)


def test_batched_equals_one_by_one_in_input_order(lm):
    model, tok = lm
    prompts = _prompts(tok, 5)
    batched = generate_batched(model, tok, prompts, max_new_tokens=6, batch_size=3,
                               show_progress=False)
    single = generate_batched(model, tok, prompts, max_new_tokens=6, batch_size=1,
                              show_progress=False)
    assert batched == single  # left padding + attention mask leave greedy outputs unchanged
    assert len({o.text for o in batched}) > 1  # prompts of different lengths give different text
    rev = generate_batched(model, tok, prompts[::-1], max_new_tokens=6, batch_size=3,
                           show_progress=False)
    assert rev == batched[::-1]
    for o in batched:
        assert isinstance(o, GenerationOutput)
        assert 1 <= o.num_new_tokens <= 6
        if o.hit_max_new_tokens:
            assert o.num_new_tokens == 6


def test_iter_yields_longest_bucket_first(lm):
    model, tok = lm
    prompts = _prompts(tok, 4)
    lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    batches = list(iter_generate_batched(model, tok, prompts, max_new_tokens=2, batch_size=2,
                                         show_progress=False))
    assert sorted(i for b in batches for i in b.indices) == [0, 1, 2, 3]
    assert min(lens[i] for i in batches[0].indices) >= max(lens[i] for i in batches[1].indices)
    assert all(b.wall_time_s > 0 for b in batches)


def test_stops_at_eos_from_generation_config(lm):
    import torch

    model, tok = lm
    prompt = _prompts(tok, 1)[0]
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    old = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [first]  # the very first greedy token now ends it
        stopped = generate_batched(model, tok, [prompt], max_new_tokens=4, batch_size=1,
                                   show_progress=False)[0]
    finally:
        model.generation_config.eos_token_id = old
    assert stopped == GenerationOutput("", 1, False)  # EOS counted, not decoded, not truncated


def test_hit_max_new_tokens_when_no_eos(lm):
    model, tok = lm
    old = model.generation_config.eos_token_id
    try:  # an EOS id outside the vocabulary's reachable rows: nothing ever stops
        model.generation_config.eos_token_id = [len(tok) + 7]
        tok_eos = tok.eos_token
        tok.eos_token = None
        outs = generate_batched(model, tok, _prompts(tok, 3), max_new_tokens=5, batch_size=2,
                                show_progress=False)
    finally:
        model.generation_config.eos_token_id = old
        tok.eos_token = tok_eos
    assert all(o.hit_max_new_tokens and o.num_new_tokens == 5 for o in outs)


def test_eos_ids_union_of_generation_config_and_tokenizer(lm):
    model, tok = lm
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = eos_token_ids(model, tok)
    assert ids[0] == im_end and set(ids) == {im_end, endoftext}
    assert eos_token_ids(None, tok)[0] == tok.eos_token_id
    assert endoftext in eos_token_ids(None, tok)  # chat end tokens present in the vocab count


def test_bad_inputs(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="empty"):
        generate_batched(model, tok, ["ok", ""], max_new_tokens=2, batch_size=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_batched(model, tok, ["ok"], max_new_tokens=0, batch_size=2)
    assert generate_batched(model, tok, [], max_new_tokens=2, batch_size=2) == []


def test_vllm_backend_same_contract(lm, monkeypatch):
    _, tok = lm
    calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class LLM:
        def __init__(self, model, **kw):
            self.model = model

        def generate(self, prompts, params, use_tqdm=True):
            # slmkd passes token prompts: the tokens HF generation would see
            prompts = [tok.decode(p["prompt_token_ids"]) for p in prompts]
            calls.append((list(prompts), params.kw))
            outs = []
            for p in prompts:
                n = len(p) % 7 + 1
                finish = "length" if n >= params.kw["max_tokens"] else "stop"
                comp = types.SimpleNamespace(text=p[-3:], token_ids=list(range(n)),
                                             finish_reason=finish)
                outs.append(types.SimpleNamespace(outputs=[comp]))
            return outs

    monkeypatch.setitem(sys.modules, "vllm",
                        types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    prompts = [f"prompt {'x' * i}" for i in range(5)]
    seen = []
    outs = generate_batched_vllm("some/model", tok, prompts, max_new_tokens=4, batch_size=2,
                                 on_batch=lambda b: seen.append(b.indices))
    assert [o.text for o in outs] == [p[-3:] for p in prompts]
    assert [o.hit_max_new_tokens for o in outs] == [o.num_new_tokens >= 4 for o in outs]
    assert seen == [[0, 1], [2, 3], [4]]
    kw = calls[0][1]
    assert kw["temperature"] == 0.0 and kw["max_tokens"] == 4 and kw["skip_special_tokens"]
    assert kw["stop_token_ids"] == eos_token_ids(None, tok)
