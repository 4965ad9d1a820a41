import numpy as np
import pytest

import kvvm


def make_cache(layout):
    return kvvm.Cache(layers=2, kv_heads=2, head_dim=32, max_slots=4, max_tokens=2048,
                      budget_bytes=8 << 20, backend="host", host_granularity=64 << 10,
                      dtype="f32", layout=layout, lookahead_steps=0)


@pytest.mark.parametrize("layout", ["interleaved", "per-layer"])
def test_alloc_slot_with_prefix_maps_the_published_pages(layout):
    with make_cache(layout) as cache:
        tpp = cache.tokens_per_page()
        prompt = list(range(2 * tpp + 5))
        a = cache.alloc_slot()
        cache.ensure(a, len(prompt))
        x = np.from_dlpack(cache.view(1, "v", slot=a))
        x[:] = np.arange(x.size, dtype=np.float32).reshape(x.shape)
        assert cache.publish(a, prompt) == 2
        assert cache.read_only_tokens(a) == 2 * tpp
        slot, reused = cache.alloc_slot_with_prefix(prompt + [7, 8, 9])
        assert slot != a and reused == 2 * tpp
        assert cache.tokens(slot) == reused
        y = np.from_dlpack(cache.view(1, "v", slot=slot))
        assert np.array_equal(y, x[:reused])
        # Another namespace (model) shares nothing.
        other, none = cache.alloc_slot_with_prefix(prompt, namespace=1)
        assert none == 0 and cache.read_only_tokens(other) == 0
        st = cache.prefix_stats()
        assert (st["lookups"], st["hits"], st["hit_tokens"]) == (2, 1, reused)
        with pytest.raises(kvvm.KvvmError):
            cache.shrink(slot, tpp + 1)  # inside a shared page
