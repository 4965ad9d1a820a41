import gc

import numpy as np
import pytest

import kvvm


def make_cache(layout="interleaved", dtype="f32", **kw):
    args = dict(layers=3, kv_heads=2, head_dim=32, max_slots=4, max_tokens=512,
                budget_bytes=8 << 20, backend="host", host_granularity=64 << 10,
                dtype=dtype, layout=layout, lookahead_steps=0)
    args.update(kw)
    return kvvm.Cache(**args)


def pattern(slot, tokens, layer, kv, heads=2, dim=32):
    """A value per element that differs across slot, token, layer, K/V, head and column."""
    t = np.arange(tokens, dtype=np.float32)[:, None, None]
    h = np.arange(heads, dtype=np.float32)[None, :, None]
    d = np.arange(dim, dtype=np.float32)[None, None, :]
    return (slot * 100000 + layer * 10000 + kv * 5000 + t * 7 + h * 0.5 + d * 0.25).astype(
        np.float32)


@pytest.mark.parametrize("layout", ["interleaved", "per-layer"])
def test_numpy_write_reads_back_through_other_view_and_library(layout):
    with make_cache(layout) as cache:
        a = cache.alloc_slot()
        b = cache.alloc_slot()
        cache.step({a: 70, b: 33})
        for layer in range(3):
            for kv in ("k", "v"):
                for slot, n in ((a, 70), (b, 33)):
                    x = np.from_dlpack(cache.view(layer, kv, slot=slot))
                    assert x.shape == (n, 2, 32) and x.dtype == np.float32
                    x[:] = pattern(slot, n, layer, kv == "v")
        for layer in range(3):
            for kv in ("k", "v"):
                batch = np.from_dlpack(cache.view(layer, kv))  # another view: the whole batch
                assert batch.shape == (4, 512, 2, 32)
                for slot, n in ((a, 70), (b, 33)):
                    want = pattern(slot, n, layer, kv == "v")
                    np.testing.assert_array_equal(batch[slot, :n], want)
                    for token in (0, n // 2, n - 1):
                        raw = cache.read_row(slot, token, layer, kv)
                        np.testing.assert_array_equal(
                            np.frombuffer(raw, dtype=np.float32).reshape(2, 32), want[token])
                        addr, length = cache.row(slot, token, layer, kv)
                        assert length == 2 * 32 * 4
                        assert addr == batch[slot, token].ctypes.data


def test_library_write_is_seen_by_numpy():
    with make_cache() as cache:
        s = cache.alloc_slot()
        cache.ensure(s, 10)
        x = np.from_dlpack(cache.view(2, "v", slot=s))
        row = np.arange(64, dtype=np.float32) * 3 + 1
        cache.write_row(s, 9, 2, "v", row.tobytes())
        np.testing.assert_array_equal(x[9].ravel(), row)
        assert not x[8].any() or not np.array_equal(x[8].ravel(), row)


def test_tensor_outlives_the_cache_object():
    cache = make_cache(dtype="f16")
    s = cache.alloc_slot()
    cache.ensure(s, 40)
    x = np.from_dlpack(cache.view(1, "k", slot=s, tokens=40))
    whole = np.from_dlpack(cache.view(1, "k"))
    want = (np.arange(40 * 64) % 251).astype(np.float16).reshape(40, 2, 32)
    x[:] = want
    cache.close()
    del cache
    gc.collect()
    # The cache handle is gone; the tensors keep its memory.
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(whole[s, :40], want)
    x[0] = 7
    assert (whole[s, 0] == 7).all()
    del x, whole
    gc.collect()


def test_numpy_gets_a_versioned_capsule_and_legacy_consumers_a_legacy_one():
    with make_cache() as cache:
        s = cache.alloc_slot()
        cache.ensure(s, 5)
        view = cache.view(0, "k", slot=s)
        seen = []

        class Spy:
            def __dlpack_device__(self):
                return view.__dlpack_device__()

            def __dlpack__(self, **kw):
                seen.append(kw.get("max_version"))
                return view.__dlpack__(**kw)

        a = np.from_dlpack(Spy())
        assert seen and seen[-1] is not None and seen[-1][0] >= 1
        cap = view.__dlpack__(max_version=(1, 0))
        assert "dltensor_versioned" in repr(cap)
        legacy = view.__dlpack__()
        assert '"dltensor"' in repr(legacy)
        del cap, legacy  # unconsumed capsules free their tensors
        gc.collect()

        class Legacy:
            def __dlpack_device__(self):
                return view.__dlpack_device__()

            def __dlpack__(self, stream=None):
                return view.__dlpack__(stream=stream)

        b = np.from_dlpack(Legacy())
        a[:] = 3.0
        assert (b == 3.0).all()
        assert view.__dlpack_device__() == (1, 0)
        with pytest.raises(BufferError):
            view.__dlpack__(max_version=(1, 0), copy=True)


def test_errors_become_exceptions_with_the_message():
    with pytest.raises(kvvm.InvalidConfigError, match="layers must be positive"):
        make_cache(layers=0)
    with pytest.raises(kvvm.InvalidConfigError, match="unknown model preset"):
        kvvm.Cache(model="no-such-model", max_slots=1, max_tokens=1, budget_bytes=1 << 20)
    with make_cache(max_slots=2, budget_bytes=256 << 10) as cache:
        s = cache.alloc_slot()
        with pytest.raises(kvvm.InvalidArgumentError, match="max_tokens") as e:
            cache.ensure(s, 100000)
        assert e.value.status == 3 and e.value.status_name == "KVVM_STATUS_INVALID_ARGUMENT"
        assert isinstance(e.value, ValueError)
        with pytest.raises(kvvm.BudgetExhaustedError, match="budget"):
            cache.ensure(s, 512)  # 512 tokens need 12 pages of 64 KiB, the budget has 4
        assert cache.tokens(s) == 0  # nothing changed
        cache.alloc_slot()
        with pytest.raises(kvvm.SlotsExhaustedError, match="no free slot"):
            cache.alloc_slot()
        with pytest.raises(kvvm.InvalidArgumentError, match="holds 0 tokens"):
            np.from_dlpack(cache.view(0, "k", slot=s, tokens=1))
        with pytest.raises(kvvm.InvalidArgumentError, match="layer 3 out of range"):
            cache.layer_view(3, "k")
        stale = cache._handle
    with pytest.raises(kvvm.InvalidHandleError, match="closed"):
        cache.tokens(0)
    # The library itself refuses the destroyed handle, with its own message.
    with pytest.raises(kvvm.InvalidHandleError, match="not valid"):
        kvvm._check(kvvm.library.kvvm_cache_free(stale))


def test_swap_outs_can_keep_their_pages():
    with make_cache() as cache, \
            kvvm.SwapEngine(cache, host_budget_bytes=16 << 20, keep_pages=True) as swap:
        s = cache.alloc_slot()
        cache.ensure(s, 90)
        np.from_dlpack(cache.view(1, "v", slot=s))[:] = pattern(3, 90, 1, True)
        with swap.swap_out(s) as t:
            t.wait()
            copy = t.copy
        # Freed, its pages still mapped: swapping back into it maps nothing.
        assert cache.capacity(s) >= 90
        s2 = cache.alloc_slot(90)
        assert s2 == s
        with swap.swap_in(copy, s2) as t:
            t.wait()
        np.testing.assert_array_equal(np.from_dlpack(cache.view(1, "v", slot=s2)),
                                      pattern(3, 90, 1, True))
        swap.set_keep_pages(False)
        with swap.swap_out(s2) as t:
            t.wait()
        assert cache.capacity(s2) == 0
        with pytest.raises(TypeError):
            swap.set_keep_pages(1)
        with pytest.raises(TypeError):
            kvvm.SwapEngine(cache, keep_pages="yes")


def test_swap_round_trip_keeps_the_bytes():
    with make_cache(layout="per-layer") as cache, \
            kvvm.SwapEngine(cache, host_budget_bytes=16 << 20) as swap:
        s = cache.alloc_slot()
        cache.ensure(s, 90)
        for layer in range(3):
            for kv in ("k", "v"):
                np.from_dlpack(cache.view(layer, kv, slot=s))[:] = pattern(7, 90, layer, kv == "v")
        with swap.swap_out(s) as t:
            copy = t.copy
            assert t.bytes == 90 * 3 * 2 * 2 * 32 * 4
            t.wait()
            assert t.poll() and t.event is None
        assert swap.host_tokens(copy) == 90
        swap.pin(copy)
        swap.set_priority(copy, 9)
        with pytest.raises(kvvm.InvalidArgumentError):
            swap.set_priority(copy, 300)
        s2 = cache.alloc_slot(90)
        with swap.swap_in(copy, s2) as t:
            while not t.poll():
                pass
        assert cache.tokens(s2) == 90
        for layer in range(3):
            for kv in ("k", "v"):
                got = np.from_dlpack(cache.view(layer, kv, slot=s2))
                np.testing.assert_array_equal(got, pattern(7, 90, layer, kv == "v"))
        st = swap.stats()
        assert st.transfers == 2 and st.bytes_in == st.bytes_out > 0
        swap.release(copy)
        with pytest.raises(kvvm.InvalidArgumentError, match="does not exist"):
            swap.release(copy)


def test_stats_and_ranges():
    with make_cache() as cache:
        s = cache.alloc_slot()
        cache.ensure(s, 100)
        st = cache.stats()
        assert st.allocated_slots == 1
        assert st.live_bytes == 100 * 3 * 2 * 2 * 32 * 4
        ranges = cache.slot_ranges(s, 100)
        assert len(ranges) == 1 and ranges[0][1] == st.live_bytes
        assert kvvm.version().count(".") == 2


def test_torch_reads_the_same_memory():
    torch = pytest.importorskip("torch")
    with make_cache() as cache:
        s = cache.alloc_slot()
        cache.ensure(s, 20)
        t = torch.from_dlpack(cache.view(0, "v", slot=s))
        t.fill_(2.5)
        x = np.from_dlpack(cache.view(0, "v", slot=s))
        assert (x == 2.5).all()


def test_slot_objects():
    with make_cache() as cache:
        with cache.slot(50) as s:
            assert s.tokens == 50 and s.capacity >= 50
            x = np.from_dlpack(s.view(1, "v"))
            assert x.shape == (50, 2, 32)
            x[:] = pattern(s.id, 50, 1, True)
            s.ensure(60)
            np.testing.assert_array_equal(np.from_dlpack(s.view(1, "v", tokens=50)),
                                          pattern(s.id, 50, 1, True))
            s.shrink(10)
            assert s.tokens == 10
            slot_id = s.id
        with pytest.raises(kvvm.InvalidArgumentError):
            cache.tokens(slot_id)  # freed on leaving the block
        with pytest.raises(kvvm.InvalidArgumentError, match="max_tokens"):
            cache.slot(100000)
        assert cache.stats().allocated_slots == 0  # the failed slot was freed again


def _mapped(addr):
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def test_memory_goes_away_with_the_last_tensor():
    cache = make_cache()
    s = cache.alloc_slot()
    cache.ensure(s, 8)
    addr = cache.layer_view(0, "k").data
    view = cache.view(0, "k", slot=s)
    x = np.from_dlpack(view)
    unconsumed = view.__dlpack__(max_version=(1, 0))  # never handed to a consumer
    legacy = view.__dlpack__()
    cache.close()
    del cache, view
    gc.collect()
    assert _mapped(addr)
    del x
    gc.collect()
    assert _mapped(addr)  # the capsules still hold the cache
    del unconsumed
    gc.collect()
    assert _mapped(addr)
    del legacy
    gc.collect()
    assert not _mapped(addr)  # the last reference is gone: the reservation is released
