"""The stream-ordering calls on the host backend: accepted as plain integers (or objects with
``cuda_stream`` / ``cuda_event``), checked, and a stream wait leaves the swapped-in bytes there."""

import pytest

import kvvm


class FakeStream:
    cuda_stream = 0x1000


def make_cache():
    return kvvm.Cache(layers=2, kv_heads=2, head_dim=32, dtype="f32", max_slots=4,
                      max_tokens=256, budget_bytes=4 << 20, backend="host",
                      host_granularity=64 << 10, lookahead_steps=0)


def test_stream_ordered_swap_round_trip_on_host():
    with make_cache() as cache, kvvm.SwapEngine(cache) as swap:
        cache.set_stream(0)
        cache.set_stream(FakeStream())
        with pytest.raises(TypeError):
            cache.set_stream(True)
        with pytest.raises(TypeError):
            cache.set_stream("0")
        with pytest.raises(OverflowError):
            cache.set_stream(1 << 64)
        slot = cache.alloc_slot()
        cache.ensure(slot, 30)
        row = bytes(range(256)) * 1
        cache.write_row(slot, 29, 1, "v", row)
        out = swap.swap_out_after(slot, 0xBEEF)
        out.wait()
        back = cache.alloc_slot()
        t = swap.swap_in(out.copy, back)
        t.stream_wait(0)
        # The slot's bookkeeping completes with the ticket (calls on the slot wait for it).
        t.wait()
        assert cache.read_row(back, 29, 1, "v") == row
        with pytest.raises(OverflowError):
            t.stream_wait(-1)
