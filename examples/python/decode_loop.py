"""A small decode loop through kvvm's Python binding: admit requests, grow them step by step
while writing each new token's K and V through numpy views (DLPack), swap one out to host memory
and back, and check its KV survived.

    cargo build && PYTHONPATH=python python3 examples/python/decode_loop.py
"""

import numpy as np

import kvvm

LAYERS, STEPS = 2, 50


def stamp(req, token, layer, kv, shape):
    """The values written for one token's row: unique per (request, token, layer, K/V)."""
    base = req * 1000 + token + layer * 0.25 + kv * 0.125
    return np.full(shape, base, dtype=np.float32)


def main():
    cache = kvvm.Cache(model="llama-3-8b", layers=LAYERS, max_slots=4, max_tokens=1024,
                       budget_bytes=64 << 20, dtype="f32", backend="host",
                       host_granularity=64 << 10)
    print(f"kvvm {kvvm.version()}")
    row_shape = (cache.kv_heads, cache.head_dim)

    requests = {1: 100, 2: 37}  # request id -> prompt tokens
    slots = {r: cache.alloc_slot(n) for r, n in requests.items()}
    for r, n in requests.items():
        cache.ensure(slots[r], n)

    def write(r, first, last):
        for layer in range(LAYERS):
            for kv in (0, 1):
                x = np.from_dlpack(cache.view(layer, kv, slot=slots[r], tokens=last))
                for t in range(first, last):
                    x[t] = stamp(r, t, layer, kv, row_shape)

    def check(r):
        n = cache.tokens(slots[r])
        for layer in range(LAYERS):
            for kv in (0, 1):
                x = np.from_dlpack(cache.view(layer, kv, slot=slots[r]))
                for t in range(n):
                    assert (x[t] == stamp(r, t, layer, kv, row_shape)).all(), (r, t, layer, kv)
        return n

    for r, n in requests.items():
        write(r, 0, n)
    for _ in range(STEPS):
        cache.step({slots[r]: requests[r] + 1 for r in requests})
        for r in requests:
            write(r, requests[r], requests[r] + 1)
            requests[r] += 1
    for r in requests:
        check(r)
    st = cache.stats()
    print(f"after {STEPS} steps: {st.allocated_slots} slots, {st.live_bytes} live bytes, "
          f"{st.mapped_bytes} mapped bytes")

    with kvvm.SwapEngine(cache, host_budget_bytes=64 << 20) as swap:
        with swap.swap_out(slots[2]) as t:
            copy = t.copy
            t.wait()
        print(f"swapped out request 2: {swap.host_tokens(copy)} tokens")
        slots[2] = cache.alloc_slot(requests[2])
        with swap.swap_in(copy, slots[2]) as t:
            t.wait()
        print(f"swapped request 2 back into slot {slots[2]}: {check(2)} tokens intact")
        swap.release(copy)
    for r in requests:
        cache.free_slot(slots[r])
    cache.close()
    print("ok")


if __name__ == "__main__":
    main()
