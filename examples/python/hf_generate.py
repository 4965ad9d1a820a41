"""Greedy generation with a Hugging Face transformers model whose KV cache lives in kvvm, with a
preemption (swap out to host memory, swap back into other slots) in the middle of generate.

    pip install ./python torch transformers
    python3 examples/python/hf_generate.py                       # a tiny random-weight Llama
    python3 examples/python/hf_generate.py --model PATH_OR_ID --prompt "Hello" --prompt "Hi"
    python3 examples/python/hf_generate.py --bench               # time per token vs DynamicCache

Without --model the weights are random (the tokens are meaningless but deterministic). Each run
also generates with transformers' default cache and checks that the tokens are identical.
"""

import argparse
import statistics
import time

import torch
import transformers

import kvvm
from kvvm.integrations.transformers import KvvmCache

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def tiny_llama(args):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
        initializer_range=0.1, pad_token_id=0, eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg), None


def load(args):
    if args.model is None:
        model, tok = tiny_llama(args)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    device = "cuda" if args.backend == "cuda" else "cpu"  # where kvvm's memory is
    model = model.to(device=device, dtype=DTYPES[args.dtype]).eval()
    model.generation_config.pad_token_id = model.config.pad_token_id or 0
    return model, tok


def inputs_for(args, tok, batch, prompt_len, device):
    if tok is not None:
        enc = tok(args.prompt or ["The capital of France is"], return_tensors="pt",
                  padding=True)
        return {k: v.to(device) for k, v in enc.items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (batch, prompt_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class AtStep(transformers.LogitsProcessor):
    def __init__(self, step, fn):
        self.step, self.fn, self.calls = step, fn, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.fn()
        return scores


def generate(model, inputs, new_tokens, cache=None, processors=()):
    kw = {"cache": cache} if cache is not None else {}
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                              logits_processor=transformers.LogitsProcessorList(processors),
                              **kw)


def make_store(model, args, batch, tokens):
    return kvvm.Cache.from_hf_config(
        model.config, max_slots=2 * batch, max_tokens=tokens, dtype=model.dtype,
        budget_bytes=args.budget_mib << 20, layout=args.layout, backend=args.backend)


def demo(args):
    model, tok = load(args)
    inputs = inputs_for(args, tok, args.batch, args.prompt_len, model.device)
    batch, width = inputs["input_ids"].shape
    want = generate(model, inputs, args.new_tokens)
    store = make_store(model, args, batch, width + args.new_tokens)
    swap = kvvm.SwapEngine(store, host_budget_bytes=args.budget_mib << 20)
    cache = KvvmCache(store, swap)

    def preempt_and_resume():
        before = cache.slots
        cache.preempt()
        # The slots and pages are free now: another request could run here.
        squatter = store.alloc_slots(batch)
        cache.resume()
        print(f"preempted at step {args.preempt_at}: slots {before} -> host -> {cache.slots}")
        for s in squatter:
            store.free_slot(s)

    got = generate(model, inputs, args.new_tokens, cache,
                   [AtStep(args.preempt_at, preempt_and_resume)])
    print(f"kvvm {kvvm.__version__} ({kvvm.library_path()}), {store.layout} layout, "
          f"{store.dtype}, batch {batch}")
    for row in got:
        text = tok.decode(row, skip_special_tokens=True) if tok else row[width:].tolist()
        print("  ", text)
    same = torch.equal(got, want)
    print("identical to transformers' default cache:", same)
    st = swap.stats()
    print(f"swap: {st.bytes_out} bytes out, {st.bytes_in} bytes in")
    cache.release()
    swap.close()
    store.close()
    if not same:
        raise SystemExit(1)


def bench(args):
    """Time per generated token, kvvm vs DynamicCache, alternating in the same process."""
    model, tok = load(args)
    inputs = inputs_for(args, tok, args.batch, args.prompt_len, model.device)
    batch, width = inputs["input_ids"].shape
    store = make_store(model, args, batch, width + args.new_tokens)
    times = {"default": [], "kvvm": []}
    generate(model, inputs, 2)  # warm-up
    for r in range(args.rounds):
        for name in (("default", "kvvm") if r % 2 == 0 else ("kvvm", "default")):
            cache = KvvmCache(store) if name == "kvvm" else None
            t0 = time.perf_counter()
            out = generate(model, inputs, args.new_tokens, cache)
            dt = time.perf_counter() - t0
            if cache is not None:
                cache.release()
            times[name].append(dt / args.new_tokens)
            assert out.shape[1] == width + args.new_tokens
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.kv_heads} KV heads, "
          f"{args.dtype}, batch {batch}, prompt {width}, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds alternating, torch threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"  {name:8s} median {statistics.median(ts) * 1e3:7.3f} ms/token "
              f"(min {min(ts) * 1e3:.3f}, max {max(ts) * 1e3:.3f})")
    ratio = statistics.median(times["kvvm"]) / statistics.median(times["default"])
    print(f"  kvvm / default: {ratio:.3f}")
    store.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a checkpoint path or hub id (default: a random tiny Llama)")
    p.add_argument("--prompt", action="append", help="prompt text (with --model; repeatable)")
    p.add_argument("--dtype", choices=list(DTYPES), default="f32")
    p.add_argument("--layout", choices=["interleaved", "per-layer"], default="interleaved")
    p.add_argument("--backend", choices=["auto", "host", "cuda"], default="host")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--preempt-at", type=int, default=6)
    p.add_argument("--budget-mib", type=int, default=256)
    p.add_argument("--bench", action="store_true", help="time per token vs the default cache")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    args = p.parse_args()
    bench(args) if args.bench else demo(args)


if __name__ == "__main__":
    main()
