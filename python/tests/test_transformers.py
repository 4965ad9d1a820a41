"""kvvm as the KV cache of a transformers model: a tiny random-weight Llama must generate the same
greedy tokens and the same logits at every step with :class:`KvvmCache` as with transformers'
default cache, also when its batch is preempted (swapped out) in the middle of ``generate``."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvvm  # noqa: E402
from kvvm.integrations.transformers import KvvmCache  # noqa: E402

VOCAB, PAD, NEW = 128, 0, 8
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
LAYOUTS = ["interleaved", "per-layer"]

torch.set_num_threads(min(torch.get_num_threads(), 2))


def config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.1,  # large enough that greedy tokens vary from step to step
        pad_token_id=PAD, bos_token_id=1, eos_token_id=None)


@pytest.fixture(scope="module", params=list(DTYPES))
def model(request):
    torch.manual_seed(1234)
    m = transformers.LlamaForCausalLM(config()).to(DTYPES[request.param]).eval()
    m.generation_config.pad_token_id = PAD
    m.generation_config.eos_token_id = None
    return m


def prompts(batch, seed):
    """``batch`` prompts of different lengths, left-padded, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 4, 6][:batch]
    width = max(lengths)
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs, cache=None, processors=()):
    kw = dict(max_new_tokens=NEW, do_sample=False, output_logits=True,
              return_dict_in_generate=True,
              logits_processor=transformers.LogitsProcessorList(processors))
    if cache is not None:
        kw["cache"] = cache
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
    return out.sequences, torch.stack(out.logits)  # [batch, len], [steps, batch, vocab]


def store_for(model, layout, max_slots=6):
    return kvvm.Cache.from_hf_config(
        model.config, max_slots=max_slots, max_tokens=64, budget_bytes=16 << 20,
        dtype=model.dtype, layout=layout, backend="host", host_granularity=64 << 10,
        lookahead_steps=0)


class AtStep(transformers.LogitsProcessor):
    """Calls ``fn`` once, after the forward pass of decode step ``step`` (inside generate)."""

    def __init__(self, step, fn):
        self.step, self.fn, self.calls = step, fn, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.fn()
        return scores


def assert_same(got, want):
    (tokens, logits), (want_tokens, want_logits) = got, want
    assert torch.equal(tokens, want_tokens), (tokens, want_tokens)
    assert logits.shape == want_logits.shape
    assert torch.equal(logits, want_logits), "logits differ"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokens_and_logits_equal_the_default_cache(model, layout, batch):
    inputs = prompts(batch, seed=batch)
    want = generate(model, inputs)
    new_tokens = want[0][:, inputs["input_ids"].shape[1]:]
    assert len(set(new_tokens.flatten().tolist())) > 2  # the tokens vary: a real comparison
    with store_for(model, layout) as store, KvvmCache(store) as cache:
        got = generate(model, inputs, cache)
        assert_same(got, want)
        # The K/V are in kvvm: adjacent slots holding prompt + generated tokens (the last
        # generated token is never fed back), and the layer's keys are views of kvvm's memory.
        slots = cache.slots
        assert slots == list(range(slots[0], slots[0] + batch))
        total = want[0].shape[1] - 1
        assert [store.tokens(s) for s in slots] == [total] * batch
        k0 = torch.from_dlpack(store.view(0, "k", slot=slots[-1]))
        assert torch.equal(cache.layers[0].keys[-1].transpose(0, 1), k0)
        assert cache.layers[0].keys.data_ptr() == torch.from_dlpack(
            store.view(0, "k"))[slots[0]].data_ptr()
    # Closing the KvvmCache freed its slots.


def preempted_run(model, store, inputs_a, inputs_b, step, swap, corrupt=None):
    """Generates A; after decode step ``step`` A is swapped out, request B (same batch size) runs
    to completion in A's old slots, and A is swapped back in while B still holds them."""
    record = {}
    a = KvvmCache(store, swap)

    def preempt_and_run_b():
        old = a.slots
        a.preempt()
        assert a.preempted and store.stats().allocated_slots == 0
        # Leave only A's old slots free, so that B must take them.
        held = []
        while True:
            try:
                held.append(store.alloc_slot())
            except kvvm.SlotsExhaustedError:
                break
        for s in held:
            if s in old:
                store.free_slot(s)
        b = KvvmCache(store)
        record["b"] = generate(model, inputs_b, b)
        record["b_slots"] = b.slots
        for s in held:
            if s not in old:
                store.free_slot(s)
        if corrupt is None:
            a.resume()
        else:
            corrupt(a)
        record["a_old"], record["a_new"] = old, a.slots
        b.release()

    record["a"] = generate(model, inputs_a, a, [AtStep(step, preempt_and_run_b)])
    a.release()
    return record


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_preempted_in_the_middle_of_generate(model, layout, batch):
    inputs_a, inputs_b = prompts(batch, seed=10 + batch), prompts(batch, seed=20 + batch)
    want_a, want_b = generate(model, inputs_a), generate(model, inputs_b)
    with store_for(model, layout, max_slots=2 * batch) as store, \
            kvvm.SwapEngine(store, host_budget_bytes=16 << 20) as swap:
        rec = preempted_run(model, store, inputs_a, inputs_b, step=4, swap=swap)
        assert set(rec["b_slots"]) == set(rec["a_old"])  # B used the freed slots
        assert not set(rec["a_new"]) & set(rec["a_old"])  # A came back elsewhere
        assert_same(rec["a"], want_a)
        assert_same(rec["b"], want_b)
        st = swap.stats()
        assert st.transfers == 2 * batch and st.bytes_in == st.bytes_out > 0
        assert store.stats().allocated_slots == 0


def test_resuming_without_the_swap_in_changes_the_tokens(model):
    """Negative control: if A's KV is not swapped back (its new slots hold B's stale pages),
    the comparison above fails."""
    inputs_a, inputs_b = prompts(3, seed=13), prompts(3, seed=23)
    want_a = generate(model, inputs_a)

    def resume_without_swap_in(cache):
        slots = list(store.alloc_slots(3))
        for s in slots:
            store.ensure(s, cache._tokens)
        cache._slots = slots
        cache._index()

    with store_for(model, "interleaved", max_slots=6) as store, \
            kvvm.SwapEngine(store, host_budget_bytes=16 << 20) as swap:
        rec = preempted_run(model, store, inputs_a, inputs_b, step=4, swap=swap,
                            corrupt=resume_without_swap_in)
    assert not torch.equal(rec["a"][0], want_a[0])


def test_one_altered_k_row_changes_the_tokens(model):
    """Negative control: one K row of one sequence altered in kvvm's memory mid-generate."""
    inputs = prompts(3, seed=3)
    want = generate(model, inputs)
    with store_for(model, "per-layer") as store, KvvmCache(store) as cache:
        def alter():
            row = torch.from_dlpack(store.view(0, "k", slot=cache.slots[1]))[6]
            row.copy_(-8 * row)
        got = generate(model, inputs, cache, [AtStep(3, alter)])
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[0][2], want[0][2])
    assert not torch.equal(got[0][1], want[0][1])


def test_model_and_cache_must_agree(model):
    other = {torch.float32: "f16"}.get(model.dtype, "f32")
    with kvvm.Cache.from_hf_config(model.config, max_slots=2, max_tokens=64,
                                   budget_bytes=16 << 20, dtype=other, backend="host",
                                   host_granularity=64 << 10) as store:
        with pytest.raises(TypeError, match="stores"):
            generate(model, prompts(1, seed=1), KvvmCache(store))
        assert store.stats().allocated_slots == 0
    with kvvm.Cache(max_slots=2, max_tokens=64, budget_bytes=16 << 20, layers=2, kv_heads=4,
                    head_dim=16, dtype=model.dtype, backend="host",
                    host_granularity=64 << 10) as store:
        with pytest.raises(ValueError, match="heads"):
            generate(model, prompts(1, seed=1), KvvmCache(store))
    with store_for(model, "interleaved") as store:
        with pytest.raises(RuntimeError, match="SwapEngine"):
            KvvmCache(store).preempt()


def test_crop_then_continue_matches_the_default_cache(model):
    """``crop`` (used by assisted decoding) shrinks the slots, and the next forward pass over
    the cropped cache gives the default cache's logits."""
    inputs = prompts(3, seed=5)
    mask = inputs["attention_mask"]
    with store_for(model, "interleaved") as store, KvvmCache(store) as cache:
        dyn = transformers.DynamicCache()
        tokens, _ = generate(model, inputs, dyn)
        assert torch.equal(generate(model, inputs, cache)[0], tokens)
        total = tokens.shape[1] - 1
        for c in (cache, dyn):
            c.crop(-3)
            assert c.get_seq_length() == total - 3
        assert [store.tokens(s) for s in cache.slots] == [total - 3] * 3
        step = tokens[:, total - 3:total - 2]
        full_mask = torch.cat([mask, torch.ones((3, total - 2 - mask.shape[1]),
                                                dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            want = model(input_ids=step, attention_mask=full_mask, cache=dyn).logits
            got = model(input_ids=step, attention_mask=full_mask, cache=cache).logits
        assert torch.equal(got, want)
        assert [store.tokens(s) for s in cache.slots] == [total - 2] * 3


def test_a_preempted_cache_refuses_to_run_until_resumed(model):
    inputs = prompts(1, seed=2)
    with store_for(model, "per-layer") as store, kvvm.SwapEngine(store) as swap, \
            KvvmCache(store, swap) as cache:
        generate(model, inputs, cache)
        n = cache.get_seq_length()
        cache.preempt()
        assert cache.slots == [None] and store.stats().allocated_slots == 0
        with pytest.raises(RuntimeError, match="preempted"):
            cache.crop(-1)
        assert cache.get_seq_length() == n
        with pytest.raises(RuntimeError, match="preempted"), torch.no_grad():
            model(input_ids=inputs["input_ids"][:, :1], cache=cache)
        cache.resume()
        assert cache.get_seq_length() == n and store.tokens(cache.slots[0]) == n
    assert store.closed and swap.closed
